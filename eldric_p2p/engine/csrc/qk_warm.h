/* Keeping this machine's CPUs awake between a pipeline's steps, at the lowest priority there is.
 *
 * A stage of a pipeline across sites computes a few milliseconds per token and then waits tens of
 * milliseconds for the other stages and the WAN. A CPU left idle that long drops into a deeper idle state (a
 * virtual machine's vCPU halts and its host core is given to others), and the next step computes slower: a
 * decode step of Qwen2.5-Coder-0.5B that takes 21 ms back to back takes 40 ms after 33 ms of sleep per stage
 * (benchmarks/bench_idle.py). Spinners are threads that spin with `pause` while the work is expected back soon
 * (`warm_until`), under SCHED_IDLE: they run only on a CPU with nothing else to do, and any other thread that
 * wakes there preempts them at once, so they keep the CPU from idling without taking time from any work,
 * ours or another program's. Where SCHED_IDLE does not exist (not Linux) a spinner ends at once: a spinner at
 * normal priority would compete with the work.
 *
 *   warm_until(deadline_ns, n)   spinners (up to n of them, started on first use) spin until deadline_ns
 *                                (CLOCK_MONOTONIC); a later deadline extends, an earlier one is ignored
 *   g_warm_started / g_warm_idle spinner threads started / running at SCHED_IDLE
 *   g_warm_spun_ns               time spent spinning, all spinners together
 */

#ifndef ELDRIC_QK_WARM_H
#define ELDRIC_QK_WARM_H

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>

#include "qk_pool.h"

#if defined(__linux__) && !defined(SCHED_IDLE)
#define SCHED_IDLE 5
#endif

#define MAX_SPINNERS 64

static _Atomic int64_t g_warm_until_ns = 0;
static _Atomic int g_warm_started = 0;
static _Atomic int g_warm_idle = 0;
static _Atomic int64_t g_warm_spun_ns = 0;
static _Atomic int g_warm_sleepers = 0;
static pthread_mutex_t g_warm_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_warm_cv = PTHREAD_COND_INITIALIZER;

static void *spinner_main(void *arg) {
    (void)arg;
#ifdef SCHED_IDLE
    struct sched_param param = {0};
    if (pthread_setschedparam(pthread_self(), SCHED_IDLE, &param) != 0) return NULL;
#else
    return NULL;
#endif
    atomic_fetch_add(&g_warm_idle, 1);
    for (;;) {
        int64_t t = now_ns();
        if (t < atomic_load(&g_warm_until_ns)) {
            const int64_t t0 = t;
            while ((t = now_ns()) < atomic_load_explicit(&g_warm_until_ns, memory_order_relaxed)) {
                for (int i = 0; i < 64; i++) cpu_relax();
            }
            atomic_fetch_add_explicit(&g_warm_spun_ns, t - t0, memory_order_relaxed);
            continue;
        }
        pthread_mutex_lock(&g_warm_mu);
        atomic_fetch_add(&g_warm_sleepers, 1);
        while (now_ns() >= atomic_load(&g_warm_until_ns)) pthread_cond_wait(&g_warm_cv, &g_warm_mu);
        atomic_fetch_sub(&g_warm_sleepers, 1);
        pthread_mutex_unlock(&g_warm_mu);
    }
    return NULL;
}

static void warm_until(int64_t deadline_ns, int n) {
    if (n > MAX_SPINNERS) n = MAX_SPINNERS;
    int64_t cur = atomic_load(&g_warm_until_ns);
    while (cur < deadline_ns && !atomic_compare_exchange_weak(&g_warm_until_ns, &cur, deadline_ns)) {
    }
    pthread_mutex_lock(&g_warm_mu);
    while (atomic_load(&g_warm_started) < n) {
        pthread_t th;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        pthread_attr_setstacksize(&attr, 64 * 1024);
        const int rc = pthread_create(&th, &attr, spinner_main, NULL);
        pthread_attr_destroy(&attr);
        if (rc != 0) break;
        atomic_fetch_add(&g_warm_started, 1);
    }
    if (atomic_load(&g_warm_sleepers) > 0) pthread_cond_broadcast(&g_warm_cv);
    pthread_mutex_unlock(&g_warm_mu);
}

static void warm_after_fork_child(void) {
    /* the child has no spinners: forget them (and the lock's state) */
    atomic_store(&g_warm_started, 0);
    atomic_store(&g_warm_idle, 0);
    atomic_store(&g_warm_sleepers, 0);
    atomic_store(&g_warm_until_ns, 0);
    pthread_mutex_init(&g_warm_mu, NULL);
    pthread_cond_init(&g_warm_cv, NULL);
}

#endif
