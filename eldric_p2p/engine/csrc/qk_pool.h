/* The thread pool of _qkernels: a job is cut into chunks that the calling thread and a pool of workers claim
 * with a compare-and-swap. The caller works too and waits only for chunks that a worker has already claimed,
 * so a worker the OS has not scheduled (a busy or oversubscribed machine) delays nothing. Workers spin briefly
 * after a job (the matmuls of a forward pass come back to back), then sleep on a condition variable.
 *
 *   pool_run(run, ctx, n_chunks, n_threads)   calls run(ctx, c) once for every c in [0, n_chunks), on up to
 *                                             n_threads threads (the caller included); returns when all are done
 */

#ifndef ELDRIC_QK_POOL_H
#define ELDRIC_QK_POOL_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

typedef void (*task_fn)(const void *ctx, int64_t chunk);

typedef struct {
    task_fn run;
    const void *ctx; /* lives on the caller's stack until every chunk is done */
    int64_t n_chunks;
    int n_workers; /* workers allowed to take part (n_threads - 1) */
} job_t;

#define MAX_WORKERS 255
/* A worker spins this long for the next job before it sleeps: long enough to bridge the Python between two
 * forward calls, short enough not to hold a core that the next pipeline stage (or torch) needs. */
static _Atomic int64_t g_spin_ns = 200000;
#define CLOSED 0xffffffffu

static job_t g_job;
static _Atomic uint64_t g_claim;  /* (generation << 32) | next chunk; CLOSED while g_job is written */
static _Atomic int64_t g_done;    /* chunks of the current job finished */
static _Atomic uint32_t g_gen;    /* bumped once per job */
static _Atomic int g_sleepers;
static pthread_mutex_t g_sleep_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_sleep_cv = PTHREAD_COND_INITIALIZER;
static pthread_mutex_t g_call_mu = PTHREAD_MUTEX_INITIALIZER; /* one job at a time (the GIL is released) */
static int g_n_started = 0;

/* Claim and run chunks of job generation `gen` (described by `j`, a copy) until none is left. */
static void work(const job_t *j, uint32_t gen) {
    uint64_t cur = atomic_load_explicit(&g_claim, memory_order_acquire);
    for (;;) {
        if ((uint32_t)(cur >> 32) != gen) return;
        const uint32_t c = (uint32_t)cur;
        if (c == CLOSED || (int64_t)c >= j->n_chunks) return;
        if (atomic_compare_exchange_weak_explicit(&g_claim, &cur, cur + 1, memory_order_acq_rel,
                                                  memory_order_acquire)) {
            j->run(j->ctx, c);
            atomic_fetch_add_explicit(&g_done, 1, memory_order_release);
            cur = atomic_load_explicit(&g_claim, memory_order_acquire);
        }
    }
}

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static inline void cpu_relax(void) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
    __builtin_ia32_pause();
#endif
}

static void *worker_main(void *arg) {
    const int idx = (int)(intptr_t)arg;
    uint32_t seen = atomic_load(&g_gen);
    for (;;) {
        uint32_t g = atomic_load_explicit(&g_gen, memory_order_acquire);
        const int64_t t0 = now_ns();
        for (int spins = 1; g == seen; spins++) {
            cpu_relax();
            if ((spins & 255) == 0 && now_ns() - t0 > atomic_load_explicit(&g_spin_ns, memory_order_relaxed)) {
                pthread_mutex_lock(&g_sleep_mu);
                atomic_fetch_add(&g_sleepers, 1);
                while ((g = atomic_load(&g_gen)) == seen) pthread_cond_wait(&g_sleep_cv, &g_sleep_mu);
                atomic_fetch_sub(&g_sleepers, 1);
                pthread_mutex_unlock(&g_sleep_mu);
                break;
            }
            g = atomic_load_explicit(&g_gen, memory_order_acquire);
        }
        seen = g;
        job_t j;
        memcpy(&j, &g_job, sizeof(j)); /* may be torn by a newer job: then the claim of `g` fails */
        atomic_thread_fence(memory_order_acquire);
        if (idx < j.n_workers) work(&j, g);
    }
    return NULL;
}

static void start_workers(int n) {
    while (g_n_started < n && g_n_started < MAX_WORKERS) {
        pthread_t th;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        const int rc = pthread_create(&th, &attr, worker_main, (void *)(intptr_t)g_n_started);
        pthread_attr_destroy(&attr);
        if (rc != 0) break; /* run with the workers we have; the caller does any work left */
        g_n_started++;
    }
}

static void pool_after_fork_child(void) {
    /* the child has only the forking thread: forget the workers and the locks' state */
    g_n_started = 0;
    pthread_mutex_init(&g_call_mu, NULL);
    pthread_mutex_init(&g_sleep_mu, NULL);
    pthread_cond_init(&g_sleep_cv, NULL);
    atomic_store(&g_sleepers, 0);
}

static void pool_run(task_fn run, const void *ctx, int64_t n_chunks, int n_threads) {
    if (n_threads > MAX_WORKERS + 1) n_threads = MAX_WORKERS + 1;
    if (n_threads <= 1 || n_chunks <= 1) {
        for (int64_t c = 0; c < n_chunks; c++) run(ctx, c);
        return;
    }
    const job_t j = {run, ctx, n_chunks, n_threads - 1};
    pthread_mutex_lock(&g_call_mu);
    start_workers(j.n_workers);
    const uint32_t gen = atomic_load(&g_gen) + 1;
    atomic_store(&g_claim, ((uint64_t)gen << 32) | CLOSED); /* stale claims fail from here on */
    memcpy(&g_job, &j, sizeof(j));
    atomic_store(&g_done, 0);
    atomic_store(&g_claim, (uint64_t)gen << 32);
    atomic_store(&g_gen, gen);
    if (atomic_load(&g_sleepers) > 0) {
        pthread_mutex_lock(&g_sleep_mu);
        pthread_cond_broadcast(&g_sleep_cv);
        pthread_mutex_unlock(&g_sleep_mu);
    }
    work(&j, gen);
    while (atomic_load_explicit(&g_done, memory_order_acquire) < j.n_chunks) cpu_relax();
    pthread_mutex_unlock(&g_call_mu);
}

#endif /* ELDRIC_QK_POOL_H */
