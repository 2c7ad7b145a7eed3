/* Matrix-vector and matrix-matrix products computed directly on GGUF weight blocks, bit for bit as llama.cpp
 * computes them on x86 with AVX2.
 *
 * out[t, r] = dot(weight row r, activation row t): each activation row is first quantized to the weight's ggml
 * "vec_dot type" (Q8_0 for Q4_0/Q5_0/Q8_0, Q8_1 for Q4_1/Q5_1, Q8_K for the K-quants, F16 for F16, none for F32)
 * as llama.cpp's x86 build does it; each output is then a sum of exact integer block dot products scaled by the
 * block scales, with the float32 operations in the order of the llama.cpp code path that the weight and the
 * number of activation rows select (ggml's AVX2 vec_dot and llamafile's tinyBLAS, which agree; its tiled K-quant
 * matmul for 8+ rows; the gemv/gemm of the Q4_K weights it repacks). Q2_K, Q3_K, F16 and F32 follow ggml's
 * formulas in a simpler float order (equal to llama.cpp's up to float32 rounding).
 *
 * Every kernel has a portable C version computing the same bits; on x86-64 with AVX2+FMA+F16C (checked at run
 * time) the hot types use AVX2 versions, compiled with function target attributes so the module needs no -march
 * flag. The result does not depend on the machine, the kernel set or the thread count.
 *
 * Python API: qmatmul(x, w, out, ggml_type, in_features, out_features, n_threads, repacked=-1) -> None
 *   x        buffer of float32 [T, in_features] (C-contiguous): one batch, as llama.cpp would get it
 *   w        buffer of the raw GGUF bytes [out_features, in_features / block * type_size]
 *   out      writable buffer of float32 [T, out_features]
 *   repacked -1: as llama.cpp decides (it repacks Q4_K weights with out_features % 8 == 0), 0: no, 1: yes
 * Raises ValueError for sizes that do not match (or a weight llama.cpp cannot repack), TypeError for a
 * non-float32 x/out, NotImplementedError for an unsupported type. The GIL is released during the computation.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "csrc/qk_portable.h"
#include "csrc/qk_avx2.h"

#include <pthread.h>
#include <stdatomic.h>
#include <time.h>

#if QK_X86
#define AVX2(fn) fn##_avx2
#define TILE(name, shape) name##_##shape
#else
#define AVX2(fn) NULL
#define TILE(name, shape) NULL
#endif

/* ------------------------------------------------------------------------------------------------------------
 * Type table.
 */

enum act_kind { ACT_F32, ACT_F16, ACT_Q8_0, ACT_Q8_1, ACT_Q8_K };

typedef struct {
    dot_fn portable;
    dot_fn avx2;                /* NULL when there is none */
    tile_fn avx2_1x4, avx2_2x4; /* 1 or 2 weight rows x 4 activation rows; NULL when there are none */
} kernel;

typedef struct {
    int type;
    int block;     /* elements per block */
    int type_size; /* bytes per block */
    int act;       /* enum act_kind */
    kernel dot;    /* llama.cpp's vec_dot */
    kernel tiled;  /* its tiled K-quant matmul, taken for 8 or more activation rows; NULL: never */
    /* Weights llama.cpp repacks (x86 AVX2: Q4_K with out_features % 8 == 0; NULL: never): its gemm for the
     * activation rows in groups of four, its gemv for the rest. */
    kernel gemm4, gemv;
} qtype_info;

#define K(fn) {fn, AVX2(fn), NULL, NULL}
#define KT(fn, tile) {fn, AVX2(fn), TILE(tile, 1x4), TILE(tile, 2x4)}
#define NONE {NULL, NULL, NULL, NULL}
static qtype_info TYPES[] = {
    {T_F32, 1, 4, ACT_F32, K(dot_f32), NONE, NONE, NONE},
    {T_F16, 1, 2, ACT_F16, K(dot_f16), NONE, NONE, NONE},
    {T_Q4_0, QK, 18, ACT_Q8_0, KT(dot_q4_0, tile_q4_0), NONE, NONE, NONE},
    {T_Q4_1, QK, 20, ACT_Q8_1, K(dot_q4_1), NONE, NONE, NONE},
    {T_Q5_0, QK, 22, ACT_Q8_0, KT(dot_q5_0, tile_q5_0), NONE, NONE, NONE},
    {T_Q5_1, QK, 24, ACT_Q8_1, K(dot_q5_1), NONE, NONE, NONE},
    {T_Q8_0, QK, 34, ACT_Q8_0, KT(dot_q8_0, tile_q8_0), NONE, NONE, NONE},
    {T_Q2_K, QK_K, 84, ACT_Q8_K, {dot_q2_K, NULL, NULL, NULL}, NONE, NONE, NONE},
    {T_Q3_K, QK_K, 110, ACT_Q8_K, {dot_q3_K, NULL, NULL, NULL}, NONE, NONE, NONE},
    {T_Q4_K, QK_K, 144, ACT_Q8_K, K(dot_q4_K), K(dot_q4_K_tiled), KT(dot_q4_K_gemm4, tile_q4_K_gemm4),
     KT(dot_q4_K_gemv, tile_q4_K_gemv)},
    {T_Q5_K, QK_K, 176, ACT_Q8_K, K(dot_q5_K), K(dot_q5_K_tiled), NONE, NONE},
    {T_Q6_K, QK_K, 210, ACT_Q8_K, KT(dot_q6_K, tile_q6_K), KT(dot_q6_K_tiled, tile_q6_K_tiled), NONE, NONE},
};
#undef K
#undef KT
#undef NONE
#define N_TYPES ((int)(sizeof(TYPES) / sizeof(TYPES[0])))

static int use_avx2 = 0;

/* The functions of a kernel that run here: the AVX2 ones when enabled, the portable one (no tiles) otherwise. */
typedef struct {
    dot_fn dot;
    tile_fn t1x4, t2x4;
} plan_t;

static plan_t pick(kernel k) {
    plan_t p = {k.portable, NULL, NULL};
    if (use_avx2 && k.avx2 != NULL) {
        p.dot = k.avx2;
        p.t1x4 = k.avx2_1x4;
        p.t2x4 = k.avx2_2x4;
    }
    return p;
}

static const qtype_info *find_type(int type) {
    for (int i = 0; i < N_TYPES; i++) {
        if (TYPES[i].type == type) return &TYPES[i];
    }
    return NULL;
}

static size_t act_row_bytes(const qtype_info *ti, int64_t in) {
    const int64_t nb = in / ti->block;
    switch (ti->act) {
        case ACT_F32: return (size_t)in * 4;
        case ACT_F16: return (size_t)in * 2;
        case ACT_Q8_0: return (size_t)nb * sizeof(act_q8_0);
        case ACT_Q8_1: return (size_t)nb * sizeof(act_q8_1);
        default: return (size_t)nb * sizeof(act_q8_K);
    }
}

static void quantize_row(const qtype_info *ti, const float *x, void *y, int64_t in) {
    const int64_t nb = in / ti->block;
    switch (ti->act) {
        case ACT_F32: memcpy(y, x, (size_t)in * 4); break;
        case ACT_F16:
            for (int64_t i = 0; i < in; i++) ((uint16_t *)y)[i] = f32_to_f16(x[i]);
            break;
        case ACT_Q8_0: quantize_q8_0(x, y, nb); break;
        case ACT_Q8_1: quantize_q8_1(x, y, nb); break;
        default: quantize_q8_K(x, y, nb); break;
    }
}

/* ------------------------------------------------------------------------------------------------------------
 * The product. The weight rows are cut into chunks that the calling thread and a pool of workers claim with a
 * compare-and-swap; each weight row meets every activation row while it is in the L1 cache. The caller works
 * too and waits only for chunks that a worker has already claimed, so a worker the OS has not scheduled (a busy
 * or oversubscribed machine) delays nothing. Workers spin briefly after a job (decode calls come back to back),
 * then sleep on a condition variable.
 */

/* Activation rows [t0, t1) computed with one plan. A call is one or more ranges: one batch of rows takes two
 * (repacked Q4_K: the rows in groups of four, then the rest); several sessions' rows batched together take the
 * ranges each would take alone. */
typedef struct {
    int64_t t0, t1;
    plan_t plan;
} range_t;

typedef struct {
    const range_t *ranges;
    int n_ranges;
    const uint8_t *w;
    const uint8_t *xq;
    float *out;
    int64_t T, nb, nout, chunk, n_chunks;
    size_t wrow, xrow;
    int n_workers; /* workers allowed to take part (n_threads - 1) */
} job_t;

/* Activation rows [t, t1) times weight rows r (and r + 1 when R == 2), with plan p: 4 activation rows at a time
 * through a tile where there is one, the rest (and every single-row decode step) one output at a time: one weight
 * row streamed from memory at a time is faster there than two interleaved. */
static void run_rows(const job_t *j, const plan_t *p, int64_t r, int R, int64_t t, int64_t t1) {
    const uint8_t *w = j->w + (size_t)r * j->wrow;
    const tile_fn t4 = R == 2 ? p->t2x4 : p->t1x4;
    if (t4 != NULL) {
        for (; t + 4 <= t1; t += 4) {
            t4(w, j->wrow, j->xq + (size_t)t * j->xrow, j->xrow, j->nb, j->out + t * j->nout + r, (size_t)j->nout);
        }
    }
    for (int k = 0; k < R; k++) {
        for (int64_t u = t; u < t1; u++) {
            j->out[u * j->nout + r + k] = p->dot(w + (size_t)k * j->wrow, j->xq + (size_t)u * j->xrow, j->nb);
        }
    }
}

static void run_chunk(const job_t *j, int64_t c) {
    const int64_t r1 = (c + 1) * j->chunk < j->nout ? (c + 1) * j->chunk : j->nout;
    for (int64_t r = c * j->chunk; r < r1; r += 2) {
        const int R = r + 1 < r1 ? 2 : 1;
        for (int k = 0; k < j->n_ranges; k++) {
            run_rows(j, &j->ranges[k].plan, r, R, j->ranges[k].t0, j->ranges[k].t1);
        }
    }
}

#define MAX_WORKERS 255
/* A worker spins this long for the next job before it sleeps: long enough to bridge the Python between two
 * matmuls of one forward pass, short enough not to hold a core that the next pipeline stage (or torch) needs. */
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
            run_chunk(j, c);
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
#if QK_X86
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

static void after_fork_child(void) {
    /* the child has only the forking thread: forget the workers and the locks' state */
    g_n_started = 0;
    pthread_mutex_init(&g_call_mu, NULL);
    pthread_mutex_init(&g_sleep_mu, NULL);
    pthread_cond_init(&g_sleep_cv, NULL);
    atomic_store(&g_sleepers, 0);
}

static void compute(const qtype_info *ti, const range_t *ranges, int n_ranges, const uint8_t *w,
                    const uint8_t *xq, float *out, int64_t T, int64_t in, int64_t nout, int n_threads) {
    job_t j;
    j.ranges = ranges;
    j.n_ranges = n_ranges;
    j.w = w;
    j.xq = xq;
    j.out = out;
    j.T = T;
    j.nb = in / ti->block;
    j.nout = nout;
    j.wrow = (size_t)(in / ti->block) * (size_t)ti->type_size;
    j.xrow = act_row_bytes(ti, in);
    if (n_threads > MAX_WORKERS + 1) n_threads = MAX_WORKERS + 1;
    /* about 8 chunks per thread, each worth at least ~16 KB of weights */
    int64_t chunk = nout / (8 * (int64_t)n_threads);
    const int64_t min_rows = (int64_t)(16384 / (j.wrow * (size_t)T) + 1);
    if (chunk < min_rows) chunk = min_rows;
    chunk += chunk & 1; /* whole pairs of rows for the tiles */
    if (n_threads == 1 || chunk >= nout) {
        j.chunk = nout;
        j.n_chunks = 1;
        run_chunk(&j, 0);
        return;
    }
    j.chunk = chunk;
    j.n_chunks = (nout + chunk - 1) / chunk;
    j.n_workers = n_threads - 1;

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

/* ------------------------------------------------------------------------------------------------------------
 * Python binding.
 */

static int is_float32_format(const char *fmt) {
    if (fmt == NULL) return 1;
    if (fmt[0] == '<' || fmt[0] == '=' || fmt[0] == '@') fmt++;
    return strcmp(fmt, "f") == 0;
}

/* Append rows [t0, t1) with plan p, joined to the previous range when it has the same plan: every output is
 * computed on its own in the plan's order whichever rows share a tile (and a joined 4-row gemm range stays
 * aligned: each part is a multiple of four), so single-row segments still go four at a time through a tile. */
static void add_range(range_t *ranges, int *n, int64_t t0, int64_t t1, plan_t p) {
    if (*n > 0) {
        range_t *last = &ranges[*n - 1];
        if (last->t1 == t0 && last->plan.dot == p.dot && last->plan.t1x4 == p.t1x4 && last->plan.t2x4 == p.t2x4) {
            last->t1 = t1;
            return;
        }
    }
    ranges[(*n)++] = (range_t){t0, t1, p};
}

static PyObject *py_qmatmul(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *ox, *ow, *oout;
    PyObject *osegments = Py_None;
    int type, n_threads, repacked = -1;
    Py_ssize_t in, nout;
    if (!PyArg_ParseTuple(args, "OOOinni|iO", &ox, &ow, &oout, &type, &in, &nout, &n_threads, &repacked,
                          &osegments)) return NULL;

    const qtype_info *ti = find_type(type);
    if (ti == NULL) {
        PyErr_Format(PyExc_NotImplementedError, "ggml type %d has no quantized matmul kernel", type);
        return NULL;
    }
    if (in <= 0 || nout <= 0 || in % ti->block != 0) {
        PyErr_Format(PyExc_ValueError, "in_features=%zd out_features=%zd: need positive sizes, in_features a "
                     "multiple of %d", in, nout, ti->block);
        return NULL;
    }
    if (n_threads < 1) n_threads = 1;
    /* llama.cpp (x86 AVX2) repacks a Q4_K weight with a multiple of 8 rows and computes it in another order */
    if (repacked > 0 && (ti->gemv.portable == NULL || nout % 8 != 0)) {
        PyErr_Format(PyExc_ValueError, "llama.cpp does not repack a ggml type %d weight of %zd rows", type, nout);
        return NULL;
    }
    const int repack = ti->gemv.portable != NULL && (repacked > 0 || (repacked < 0 && nout % 8 == 0));

    Py_buffer bx = {0}, bw = {0}, bo = {0};
    PyObject *result = NULL;
    void *xq = NULL;
    range_t *ranges = NULL;
    if (PyObject_GetBuffer(ox, &bx, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) goto done;
    if (PyObject_GetBuffer(ow, &bw, PyBUF_C_CONTIGUOUS) < 0) goto done;
    if (PyObject_GetBuffer(oout, &bo, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | PyBUF_WRITABLE) < 0) goto done;
    if (!is_float32_format(bx.format) || !is_float32_format(bo.format)) {
        PyErr_SetString(PyExc_TypeError, "x and out must be float32 buffers");
        goto done;
    }
    const Py_ssize_t row_in = in * 4;
    if (bx.len % row_in != 0) {
        PyErr_Format(PyExc_ValueError, "x has %zd bytes, not a whole number of float32 rows of %zd", bx.len, in);
        goto done;
    }
    const Py_ssize_t T = bx.len / row_in;
    const Py_ssize_t wrow = (in / ti->block) * ti->type_size;
    if (nout > PY_SSIZE_T_MAX / wrow || bw.len != nout * wrow) {
        PyErr_Format(PyExc_ValueError, "w has %zd bytes, expected %zd rows of %zd bytes", bw.len, nout, wrow);
        goto done;
    }
    if (T > 0 && (nout > PY_SSIZE_T_MAX / 4 / T || bo.len != T * nout * 4)) {
        PyErr_Format(PyExc_ValueError, "out has %zd bytes, expected [%zd, %zd] float32", bo.len, T, nout);
        goto done;
    }
    if (T == 0) {
        if (bo.len != 0) {
            PyErr_SetString(PyExc_ValueError, "out must be empty when x is");
            goto done;
        }
        Py_INCREF(Py_None);
        result = Py_None;
        goto done;
    }

    const size_t xrow = act_row_bytes(ti, in);
    xq = PyMem_RawMalloc(xrow * (size_t)T + 64);
    if (xq == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    /* The rows form segments, each computed as llama.cpp computes a batch of that many rows: one segment of T
     * by default, or the given row counts (several sessions' prompts and decode steps in one call, each with
     * the bits of its own call). The weights are read once for all of them either way. */
    Py_ssize_t n_seg = 1;
    if (osegments != Py_None) {
        if (!PyTuple_Check(osegments) || PyTuple_GET_SIZE(osegments) < 1) {
            PyErr_SetString(PyExc_ValueError, "segments must be a non-empty tuple of row counts");
            goto done;
        }
        n_seg = PyTuple_GET_SIZE(osegments);
    }
    ranges = PyMem_RawMalloc(sizeof(range_t) * (size_t)(2 * n_seg));
    if (ranges == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    int n_ranges = 0;
    Py_ssize_t t0 = 0;
    for (Py_ssize_t k = 0; k < n_seg; k++) {
        Py_ssize_t n = T;
        if (osegments != Py_None) {
            n = PyLong_AsSsize_t(PyTuple_GET_ITEM(osegments, k));
            if (n == -1 && PyErr_Occurred()) goto done;
        }
        if (n < 1 || n > T - t0) {
            PyErr_Format(PyExc_ValueError, "segments must be positive row counts summing to %zd", T);
            goto done;
        }
        /* llama.cpp's path for this weight and n rows: repacked, tiled (8+ rows, K-quants it does not repack),
         * vec_dot */
        const int tiled = n >= 8 && ti->tiled.portable != NULL;
        const plan_t plan = pick(repack ? ti->gemv : tiled ? ti->tiled : ti->dot);
        const Py_ssize_t grouped = repack ? n - n % 4 : 0; /* rows llama.cpp takes four at a time */
        if (grouped > 0) add_range(ranges, &n_ranges, t0, t0 + grouped, pick(ti->gemm4));
        if (grouped < n) add_range(ranges, &n_ranges, t0 + grouped, t0 + n, plan);
        t0 += n;
    }
    if (t0 != T) {
        PyErr_Format(PyExc_ValueError, "segments sum to %zd rows, x has %zd", t0, T);
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t t = 0; t < T; t++) {
        quantize_row(ti, (const float *)bx.buf + t * in, (uint8_t *)xq + (size_t)t * xrow, in);
    }
    compute(ti, ranges, n_ranges, bw.buf, xq, bo.buf, T, in, nout, n_threads);
    Py_END_ALLOW_THREADS
    Py_INCREF(Py_None);
    result = Py_None;

done:
    PyMem_RawFree(ranges);
    PyMem_RawFree(xq);
    if (bx.obj) PyBuffer_Release(&bx);
    if (bw.obj) PyBuffer_Release(&bw);
    if (bo.obj) PyBuffer_Release(&bo);
    return result;
}

static PyObject *py_supported_types(PyObject *self, PyObject *args) {
    (void)self;
    (void)args;
    PyObject *t = PyTuple_New(N_TYPES);
    if (t == NULL) return NULL;
    for (int i = 0; i < N_TYPES; i++) PyTuple_SET_ITEM(t, i, PyLong_FromLong(TYPES[i].type));
    return t;
}

static PyObject *py_simd(PyObject *self, PyObject *args) {
    (void)self;
    (void)args;
    return PyUnicode_FromString(use_avx2 ? "avx2" : "portable");
}

static PyObject *py_set_simd(PyObject *self, PyObject *arg) {
    (void)self;
    const int want = PyObject_IsTrue(arg);
    if (want < 0) return NULL;
    int have = 0;
#if QK_X86
    __builtin_cpu_init();
    have = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#endif
    use_avx2 = want && have;
    return PyBool_FromLong(use_avx2);
}

static PyObject *py_set_spin_us(PyObject *self, PyObject *arg) {
    (void)self;
    const long long us = PyLong_AsLongLong(arg);
    if (us == -1 && PyErr_Occurred()) return NULL;
    if (us < 0 || us > 1000000) {
        PyErr_SetString(PyExc_ValueError, "spin time must be 0..1000000 microseconds");
        return NULL;
    }
    const int64_t old = atomic_exchange(&g_spin_ns, (int64_t)us * 1000);
    return PyLong_FromLongLong(old / 1000);
}

static PyMethodDef methods[] = {
    {"set_spin_us", py_set_spin_us, METH_O,
     "set_spin_us(us) -> int: how long idle workers spin before sleeping (default 200); returns the old value."},
    {"qmatmul", py_qmatmul, METH_VARARGS,
     "qmatmul(x, w, out, ggml_type, in_features, out_features, n_threads, repacked=-1) -> None\n"
     "out[T, out_features] = x[T, in_features] @ W.T on GGUF blocks, with llama.cpp's x86 CPU arithmetic.\n"
     "repacked: -1 as llama.cpp decides (Q4_K with out_features % 8 == 0), 0 never, 1 always."},
    {"supported_types", py_supported_types, METH_NOARGS, "The ggml type ids with a kernel."},
    {"simd", py_simd, METH_NOARGS, "'avx2' when the AVX2 kernels are in use, else 'portable'."},
    {"set_simd", py_set_simd, METH_O,
     "set_simd(enabled) -> bool: use the AVX2 kernels when the CPU has them (default on); returns the state."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_qkernels", "Quantized matmul kernels on GGUF blocks (ggml's CPU arithmetic).",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__qkernels(void) {
    pthread_atfork(NULL, NULL, after_fork_child);
    PyObject *r = py_set_simd(NULL, Py_True);
    if (r == NULL) return NULL;
    Py_DECREF(r);
    return PyModule_Create(&module);
}
