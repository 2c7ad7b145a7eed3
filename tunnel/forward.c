/* The NAT lab's delay bridge in C: natlab.py's `forward`, frame for frame, without an interpreter.
 *
 *   forward --delay-ms D --wan pa,pb PORT...      (run inside the lab's inet namespace, as root)
 *
 * Moves Ethernet frames between PORTs over AF_PACKET sockets as a learning bridge and holds each one for D ms
 * per WAN port it crosses (from the kernel's receive timestamp), in a heap ordered by due time; waits with
 * ppoll() to the nanosecond at real-time priority with a 1 ns timer slack. SIGUSR1 restarts the report,
 * SIGTERM ends it: the report (how late the delayed frames went out, drops) goes to stderr in natlab.py's
 * words. natlab.py builds this with the system's C compiler when there is one and runs its Python forwarder
 * otherwise (or with ELDRIC_NATLAB_FORWARDER=python).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/if_packet.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_PORTS 16
#define MAX_QUEUE 4096          /* frames held at once; more are dropped, like a router's full buffer */
#define MAX_LATE 1000000        /* delayed frames whose lateness the report covers */
#define MAX_MACS 1024           /* learned addresses */
#define FRAME_MAX 65536
#define SOCKET_BUFFER (16 * 1024 * 1024)
#define FIFO_PRIORITY 10
#ifndef PACKET_IGNORE_OUTGOING
#define PACKET_IGNORE_OUTGOING 23
#endif

typedef struct {
    int64_t due; /* CLOCK_REALTIME ns, the clock of the kernel's receive timestamps */
    uint64_t seq;
    int out;
    uint32_t len;
    unsigned char *data;
} item_t;

static item_t heap[MAX_QUEUE];
static int n_heap;
static int socks[MAX_PORTS];
static int is_wan[MAX_PORTS];
static int n_ports;
static unsigned char macs[MAX_MACS][6];
static int mac_port[MAX_MACS];
static int n_macs;
static double *late;
static long n_late;
static long dropped;
static volatile sig_atomic_t stop, reset;

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int before(const item_t *a, const item_t *b) {
    return a->due < b->due || (a->due == b->due && a->seq < b->seq);
}

static void push(item_t it) {
    int i = n_heap++;
    heap[i] = it;
    while (i > 0) {
        int parent = (i - 1) / 2;
        if (!before(&heap[i], &heap[parent])) break;
        item_t t = heap[i];
        heap[i] = heap[parent];
        heap[parent] = t;
        i = parent;
    }
}

static item_t pop(void) {
    item_t top = heap[0];
    heap[0] = heap[--n_heap];
    int i = 0;
    for (;;) {
        int l = 2 * i + 1, r = l + 1, m = i;
        if (l < n_heap && before(&heap[l], &heap[m])) m = l;
        if (r < n_heap && before(&heap[r], &heap[m])) m = r;
        if (m == i) break;
        item_t t = heap[i];
        heap[i] = heap[m];
        heap[m] = t;
        i = m;
    }
    return top;
}

static int port_of(const unsigned char *mac) {
    for (int i = 0; i < n_macs; i++)
        if (memcmp(macs[i], mac, 6) == 0) return mac_port[i];
    return -1;
}

static void learn(const unsigned char *mac, int port) {
    for (int i = 0; i < n_macs; i++)
        if (memcmp(macs[i], mac, 6) == 0) {
            mac_port[i] = port;
            return;
        }
    if (n_macs < MAX_MACS) {
        memcpy(macs[n_macs], mac, 6);
        mac_port[n_macs++] = port;
    }
}

static void on_term(int sig) { (void)sig; stop = 1; }
static void on_usr1(int sig) { (void)sig; reset = 1; }

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static int open_port(const char *name) {
    unsigned idx = if_nametoindex(name);
    if (idx == 0) {
        fprintf(stderr, "forwarder: no interface %s\n", name);
        exit(2);
    }
    int s = socket(AF_PACKET, SOCK_RAW | SOCK_NONBLOCK, htons(ETH_P_ALL));
    if (s < 0) {
        perror("forwarder: socket");
        exit(2);
    }
    struct sockaddr_ll addr = {0};
    addr.sll_family = AF_PACKET;
    addr.sll_protocol = htons(ETH_P_ALL);
    addr.sll_ifindex = (int)idx;
    if (bind(s, (struct sockaddr *)&addr, sizeof addr) < 0) {
        perror("forwarder: bind");
        exit(2);
    }
    int one = 1, buf = SOCKET_BUFFER;
    setsockopt(s, SOL_SOCKET, SO_TIMESTAMPNS, &one, sizeof one);
    setsockopt(s, SOL_PACKET, PACKET_IGNORE_OUTGOING, &one, sizeof one);
    setsockopt(s, SOL_SOCKET, SO_RCVBUFFORCE, &buf, sizeof buf);
    return s;
}

/* Read every frame waiting on port `in` and queue its copies. */
static void receive(int in, int64_t delay_ns, uint64_t *seq) {
    static unsigned char frame[FRAME_MAX];
    char control[256];
    for (;;) {
        struct sockaddr_ll from;
        struct iovec iov = {frame, sizeof frame};
        struct msghdr msg = {0};
        msg.msg_name = &from;
        msg.msg_namelen = sizeof from;
        msg.msg_iov = &iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control;
        msg.msg_controllen = sizeof control;
        ssize_t n = recvmsg(socks[in], &msg, 0);
        if (n < 0) return; /* EAGAIN: drained (or an error: the next poll says) */
        if (from.sll_pkttype == PACKET_OUTGOING || n < 14) continue;
        int64_t arrival = 0;
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c != NULL; c = CMSG_NXTHDR(&msg, c)) {
            if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_TIMESTAMPNS) {
                struct timespec ts;
                memcpy(&ts, CMSG_DATA(c), sizeof ts);
                arrival = (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
            }
        }
        if (arrival == 0) arrival = now_ns();
        learn(frame + 6, in);
        int known = port_of(frame);
        for (int out = 0; out < n_ports; out++) {
            if (out == in || (known >= 0 && out != known)) continue;
            if (n_heap >= MAX_QUEUE) {
                dropped++;
                continue;
            }
            unsigned char *copy = malloc((size_t)n);
            if (copy == NULL) {
                dropped++;
                continue;
            }
            memcpy(copy, frame, (size_t)n);
            item_t it = {arrival + delay_ns * (is_wan[in] + is_wan[out]), ++*seq, out, (uint32_t)n, copy};
            push(it);
        }
    }
}

int main(int argc, char **argv) {
    double delay_ms = 0;
    const char *wan = "";
    const char *ports[MAX_PORTS];
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--delay-ms") == 0 && i + 1 < argc) {
            delay_ms = atof(argv[++i]);
        } else if (strcmp(argv[i], "--wan") == 0 && i + 1 < argc) {
            wan = argv[++i];
        } else if (n_ports < MAX_PORTS) {
            ports[n_ports++] = argv[i];
        } else {
            fprintf(stderr, "forwarder: at most %d ports\n", MAX_PORTS);
            return 2;
        }
    }
    if (n_ports < 2) {
        fprintf(stderr, "usage: forward --delay-ms D --wan P,P PORT PORT...\n");
        return 2;
    }
    const int64_t delay_ns = (int64_t)(delay_ms * 1e6);
    for (int i = 0; i < n_ports; i++) {
        socks[i] = open_port(ports[i]);
        size_t len = strlen(ports[i]);
        for (const char *p = wan; *p;) { /* is ports[i] one of the comma-separated WAN names? */
            const char *end = strchr(p, ',');
            size_t n = end ? (size_t)(end - p) : strlen(p);
            if (n == len && strncmp(p, ports[i], n) == 0) is_wan[i] = 1;
            p += n + (end != NULL);
        }
    }
    late = malloc(sizeof(double) * MAX_LATE);
    if (late == NULL) return 2;
    struct sched_param sp = {.sched_priority = FIFO_PRIORITY};
    sched_setscheduler(0, SCHED_FIFO, &sp); /* best effort, as natlab.py's _like_hardware */
    prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0);
    struct sigaction sa = {0};
    sa.sa_handler = on_term; /* no SA_RESTART: ppoll returns EINTR */
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sa.sa_handler = on_usr1;
    sigaction(SIGUSR1, &sa, NULL);

    struct pollfd fds[MAX_PORTS];
    for (int i = 0; i < n_ports; i++) fds[i] = (struct pollfd){socks[i], POLLIN, 0};
    uint64_t seq = 0;
    while (!stop) {
        if (reset) {
            n_late = 0;
            dropped = 0;
            reset = 0;
        }
        int64_t now = now_ns();
        while (n_heap > 0 && heap[0].due <= now) {
            item_t it = pop();
            send(socks[it.out], it.data, it.len, 0); /* a full buffer drops the frame, as a link would */
            free(it.data);
            if (delay_ns > 0 && n_late < MAX_LATE) late[n_late++] = (double)(now_ns() - it.due) / 1e9;
            now = now_ns();
        }
        struct timespec ts = {0, 200000000};
        if (n_heap > 0) {
            int64_t wait = heap[0].due - now;
            ts.tv_sec = wait / 1000000000;
            ts.tv_nsec = wait % 1000000000;
        }
        int ready = ppoll(fds, (nfds_t)n_ports, &ts, NULL);
        if (ready <= 0) continue; /* due, or a signal */
        for (int i = 0; i < n_ports; i++) {
            if (fds[i].revents & POLLIN) receive(i, delay_ns, &seq);
            if (fds[i].revents & POLLERR) { /* take the pending error, or ppoll would return at once forever */
                int err;
                socklen_t len = sizeof err;
                getsockopt(socks[i], SOL_SOCKET, SO_ERROR, &err, &len);
            }
            if (fds[i].revents & (POLLNVAL | POLLHUP)) {
                fprintf(stderr, "forwarder: %s: the port went away\n", ports[i]);
                fds[i].fd = -1; /* ignored by ppoll from now on */
            }
        }
    }
    if (n_late > 0) {
        qsort(late, (size_t)n_late, sizeof(double), cmp_double);
        fprintf(stderr, "forwarder: %ld delayed frames went out late by median %.0f us, p90 %.0f, p99 %.0f\n",
                n_late, late[n_late / 2] * 1e6, late[n_late * 9 / 10] * 1e6, late[n_late * 99 / 100] * 1e6);
    }
    if (dropped > 0) fprintf(stderr, "forwarder: dropped %ld frames (queue full)\n", dropped);
    for (int i = 0; i < n_ports; i++) {
        struct tpacket_stats st;
        socklen_t len = sizeof st;
        if (getsockopt(socks[i], SOL_PACKET, PACKET_STATISTICS, &st, &len) == 0 && st.tp_drops > 0)
            fprintf(stderr, "forwarder: %s: the kernel dropped %u frames\n", ports[i], st.tp_drops);
    }
    return 0;
}
