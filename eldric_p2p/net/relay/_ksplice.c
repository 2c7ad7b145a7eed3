/* The relay's TCP lane copied by the kernel: splice(2) socket -> pipe -> socket, both ways, in one call that
 * holds no GIL from start to end (ksplice.py drives it from a worker thread).
 *
 * pump(fd_a, fd_b, wake_fd, chunk) -> (code, moved)
 *   code 1: both directions ended, each EOF passed on as shutdown(SHUT_WR)
 *   code 0: a side broke (reset, error) or wake_fd became readable (the caller was cancelled)
 *   code -1: nothing could be spliced and nothing was read (no pipes, or the kernel refuses splice on
 *            these sockets): the caller copies them itself
 *   moved: bytes delivered, both directions
 * The sockets must be non-blocking (trio's are) and are left open: they stay the caller's.
 */
#define _GNU_SOURCE
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#ifdef __linux__
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#define IN_EVENTS (POLLIN | POLLHUP | POLLERR)
#define OUT_EVENTS (POLLOUT | POLLHUP | POLLERR)

struct way {
    int src, dst;   /* sockets */
    int r, w;       /* the pipe between them */
    size_t held;    /* bytes in the pipe */
    int eof;        /* src ended and dst was shut down for writing */
};

static int pump(int a, int b, int wake, size_t chunk, unsigned long long *moved) {
    struct way ways[2] = {{a, b, -1, -1, 0, 0}, {b, a, -1, -1, 0, 0}};
    int code = 0, started = 0;
    for (int i = 0; i < 2; i++) {
        int p[2];
        if (pipe2(p, O_NONBLOCK | O_CLOEXEC) != 0) {
            code = -1;
            goto done;
        }
        ways[i].r = p[0];
        ways[i].w = p[1];
    }
    for (;;) {
        short mask[2] = {0, 0}; /* for a, b */
        for (int i = 0; i < 2; i++) {
            struct way *d = &ways[i];
            if (d->held)
                mask[i == 0 ? 1 : 0] |= OUT_EVENTS; /* way 0 writes to b, way 1 to a */
            else if (!d->eof)
                mask[i] |= IN_EVENTS;
        }
        if (!mask[0] && !mask[1]) {
            code = 1;
            goto done;
        }
        /* a side with nothing to wait for is left out (fd -1): its POLLHUP would wake us for nothing */
        struct pollfd pf[3] = {{wake, POLLIN, 0}, {mask[0] ? a : -1, mask[0], 0}, {mask[1] ? b : -1, mask[1], 0}};
        if (poll(pf, 3, -1) < 0) {
            if (errno == EINTR)
                continue;
            code = 0;
            goto done;
        }
        if (pf[0].revents)
            goto done; /* cancelled: code 0 */
        if ((pf[1].revents | pf[2].revents) & POLLNVAL)
            goto done; /* a socket was closed under us (never by the lane): stop, do not spin */
        for (int i = 0; i < 2; i++) {
            struct way *d = &ways[i];
            short src_events = pf[1 + i].revents;
            if (!d->held && !d->eof && (src_events & IN_EVENTS)) {
                ssize_t n = splice(d->src, NULL, d->w, NULL, chunk, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
                if (n == 0) {
                    d->eof = 1;
                    started = 1;
                    shutdown(d->dst, SHUT_WR); /* fails only when dst is gone: the other way sees it */
                    continue;
                }
                if (n < 0) {
                    if (errno == EAGAIN)
                        continue;
                    if (errno == EINVAL && !started)
                        code = -1; /* this kernel does not splice these sockets; nothing was read */
                    goto done;
                }
                d->held = (size_t)n;
                started = 1;
            }
            if (d->held) { /* at once: the socket usually has room, no second poll needed */
                ssize_t n = splice(d->r, NULL, d->dst, NULL, d->held, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
                if (n < 0) {
                    if (errno == EAGAIN)
                        continue;
                    goto done; /* broken */
                }
                d->held -= (size_t)n;
                *moved += (unsigned long long)n;
            }
        }
    }
done:
    for (int i = 0; i < 2; i++) {
        if (ways[i].r >= 0)
            close(ways[i].r);
        if (ways[i].w >= 0)
            close(ways[i].w);
    }
    return code;
}

static PyObject *py_pump(PyObject *self, PyObject *args) {
    int a, b, wake;
    Py_ssize_t chunk;
    if (!PyArg_ParseTuple(args, "iiin", &a, &b, &wake, &chunk))
        return NULL;
    if (chunk <= 0) {
        PyErr_SetString(PyExc_ValueError, "chunk must be positive");
        return NULL;
    }
    unsigned long long moved = 0;
    int code;
    Py_BEGIN_ALLOW_THREADS
    code = pump(a, b, wake, (size_t)chunk, &moved);
    Py_END_ALLOW_THREADS
    return Py_BuildValue("iK", code, moved);
}

static PyMethodDef methods[] = {
    {"pump", py_pump, METH_VARARGS, "pump(fd_a, fd_b, wake_fd, chunk) -> (code, moved): see _ksplice.c"},
    {NULL, NULL, 0, NULL},
};
#else
static PyMethodDef methods[] = {{NULL, NULL, 0, NULL}};
#endif

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_ksplice", NULL, -1, methods};

PyMODINIT_FUNC PyInit__ksplice(void) { return PyModule_Create(&module); }
