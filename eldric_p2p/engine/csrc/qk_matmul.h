/* The quantized matmul driver: the type table (which kernel reproduces which llama.cpp path), the choice of
 * kernel set (portable, AVX2, AVX-512), the activation quantization of a call and the work split over threads.
 *
 *   qk_weight_init(&wt, type, in, out, repacked)       a weight's type, sizes and llama.cpp path (checks them)
 *   qk_ranges(&wt, sizes, n_seg, ranges)               the code path of each segment of activation rows
 *   qk_quantize(&wt, x, T, xq, threads)                activation rows -> the weight's vec_dot type
 *   qk_compute(&wt, w, ranges, n, xq, out, T, threads) out[T, out] from the quantized rows
 */

#ifndef ELDRIC_QK_MATMUL_H
#define ELDRIC_QK_MATMUL_H

#include "qk_portable.h"
#include "qk_avx2.h"
#include "qk_avx512.h"
#include "qk_pool.h"

/* ------------------------------------------------------------------------------------------------------------
 * Type table.
 */

enum act_kind { ACT_F32, ACT_F16, ACT_Q8_0, ACT_Q8_1, ACT_Q8_K };

/* One instruction set's functions for one llama.cpp path: `dot` one output; `rows` rw weight rows x 1
 * activation row; tiles[k] rw weight rows x (tc >> k) activation rows; `tile1` 1 weight row x tc activation rows.
 * Every output of a tile is computed exactly as `dot` computes it. NULL where there is none. */
typedef struct {
    dot_fn dot;
    tile_fn rows, tiles[3], tile1;
    int rw, tc;
} kset;

typedef struct {
    dot_fn portable;
    kset avx2, avx512;
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

#if QK_X86
#define X2(fn) {fn##_avx2, NULL, {NULL, NULL, NULL}, NULL, 1, 1}
#define X2T(fn, tile) {fn##_avx2, NULL, {tile##_2x4, NULL, NULL}, tile##_1x4, 2, 4}
#else
#define X2(fn) {NULL, NULL, {NULL, NULL, NULL}, NULL, 1, 1}
#define X2T(fn, tile) {NULL, NULL, {NULL, NULL, NULL}, NULL, 1, 1}
#endif
#define X2_NONE {NULL, NULL, {NULL, NULL, NULL}, NULL, 1, 1}
#define K(fn, x2, x512) {fn, x2, x512}
#define NONE {NULL, X2_NONE, X512_NONE}
static const qtype_info TYPES[] = {
    {T_F32, 1, 4, ACT_F32, K(dot_f32, X2(dot_f32), X512_NONE), NONE, NONE, NONE},
    {T_F16, 1, 2, ACT_F16, K(dot_f16, X2(dot_f16), X512_NONE), NONE, NONE, NONE},
    {T_Q4_0, QK, 18, ACT_Q8_0, K(dot_q4_0, X2T(dot_q4_0, tile_q4_0), X512_Q4_0), NONE, NONE, NONE},
    {T_Q4_1, QK, 20, ACT_Q8_1, K(dot_q4_1, X2(dot_q4_1), X512_NONE), NONE, NONE, NONE},
    {T_Q5_0, QK, 22, ACT_Q8_0, K(dot_q5_0, X2T(dot_q5_0, tile_q5_0), X512_Q5_0), NONE, NONE, NONE},
    {T_Q5_1, QK, 24, ACT_Q8_1, K(dot_q5_1, X2(dot_q5_1), X512_NONE), NONE, NONE, NONE},
    {T_Q8_0, QK, 34, ACT_Q8_0, K(dot_q8_0, X2T(dot_q8_0, tile_q8_0), X512_Q8_0), NONE, NONE, NONE},
    {T_Q2_K, QK_K, 84, ACT_Q8_K, K(dot_q2_K, X2_NONE, X512_NONE), NONE, NONE, NONE},
    {T_Q3_K, QK_K, 110, ACT_Q8_K, K(dot_q3_K, X2_NONE, X512_NONE), NONE, NONE, NONE},
    {T_Q4_K, QK_K, 144, ACT_Q8_K, K(dot_q4_K, X2(dot_q4_K), X512_NONE),
     K(dot_q4_K_tiled, X2(dot_q4_K_tiled), X512_NONE),
     K(dot_q4_K_gemm4, X2T(dot_q4_K_gemm4, tile_q4_K_gemm4), X512_Q4_K_GEMM4),
     K(dot_q4_K_gemv, X2T(dot_q4_K_gemv, tile_q4_K_gemv), X512_Q4_K_GEMV)},
    {T_Q5_K, QK_K, 176, ACT_Q8_K, K(dot_q5_K, X2(dot_q5_K), X512_NONE),
     K(dot_q5_K_tiled, X2(dot_q5_K_tiled), X512_NONE), NONE, NONE},
    {T_Q6_K, QK_K, 210, ACT_Q8_K, K(dot_q6_K, X2T(dot_q6_K, tile_q6_K), X512_Q6_K),
     K(dot_q6_K_tiled, X2T(dot_q6_K_tiled, tile_q6_K_tiled), X512_Q6_K_TILED), NONE, NONE},
};
#undef X2
#undef X2T
#undef X2_NONE
#undef K
#undef NONE
#define N_TYPES ((int)(sizeof(TYPES) / sizeof(TYPES[0])))

static const qtype_info *find_type(int type) {
    for (int i = 0; i < N_TYPES; i++) {
        if (TYPES[i].type == type) return &TYPES[i];
    }
    return NULL;
}

/* ------------------------------------------------------------------------------------------------------------
 * Kernel sets: every one computes the same bits; the widest the CPU has runs unless told otherwise.
 */

enum { SIMD_PORTABLE = 0, SIMD_AVX2 = 1, SIMD_AVX512 = 2 };
static const char *const SIMD_NAMES[] = {"portable", "avx2", "avx512"};
static int simd_level = SIMD_PORTABLE;

/* The widest kernel set this CPU can run. */
static int simd_available(void) {
#if QK_X86
    __builtin_cpu_init();
    if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))) {
        return SIMD_PORTABLE;
    }
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("bmi2")) {
        return SIMD_AVX512;
    }
    return SIMD_AVX2;
#else
    return SIMD_PORTABLE;
#endif
}

/* Use kernel set `level` or the widest below it that this CPU has; returns the level now in use. */
static int qk_set_simd(int level) {
    const int have = simd_available();
    simd_level = level < have ? level : have;
    return simd_level;
}

/* The functions of a kernel that run here. */
static kset pick(const kernel *k) {
    if (simd_level >= SIMD_AVX512 && k->avx512.dot != NULL) return k->avx512;
    if (simd_level >= SIMD_AVX2 && k->avx2.dot != NULL) return k->avx2;
    return (kset){k->portable, NULL, {NULL, NULL, NULL}, NULL, 1, 1};
}

/* ------------------------------------------------------------------------------------------------------------
 * A weight and its activation rows.
 */

typedef struct {
    const qtype_info *ti;
    int64_t in, out, nb;  /* in_features, out_features, blocks per row */
    size_t wrow, xrow;    /* bytes per weight row, per quantized activation row */
    int repack;           /* llama.cpp repacks it (Q4_K with a multiple of 8 rows): gemm4 + gemv paths */
} qk_weight;

/* Fill `wt`; returns 0, or -1 with `err` set (an unsupported type: err = "type"; bad sizes: "sizes"; a repack
 * llama.cpp would not do: "repack"). repacked: -1 as llama.cpp decides, 0 no, 1 yes. */
static int qk_weight_init(qk_weight *wt, int type, int64_t in, int64_t out, int repacked, const char **err) {
    const qtype_info *ti = find_type(type);
    if (ti == NULL) {
        *err = "type";
        return -1;
    }
    if (in <= 0 || out <= 0 || in % ti->block != 0) {
        *err = "sizes";
        return -1;
    }
    /* llama.cpp (x86 AVX2) repacks a Q4_K weight with a multiple of 8 rows and computes it in another order */
    if (repacked > 0 && (ti->gemv.portable == NULL || out % 8 != 0)) {
        *err = "repack";
        return -1;
    }
    wt->ti = ti;
    wt->in = in;
    wt->out = out;
    wt->nb = in / ti->block;
    wt->wrow = (size_t)wt->nb * (size_t)ti->type_size;
    switch (ti->act) {
        case ACT_F32: wt->xrow = (size_t)in * 4; break;
        case ACT_F16: wt->xrow = (size_t)in * 2; break;
        case ACT_Q8_0: wt->xrow = (size_t)wt->nb * sizeof(act_q8_0); break;
        case ACT_Q8_1: wt->xrow = (size_t)wt->nb * sizeof(act_q8_1); break;
        default: wt->xrow = (size_t)wt->nb * sizeof(act_q8_K); break;
    }
    wt->repack = ti->gemv.portable != NULL && (repacked > 0 || (repacked < 0 && out % 8 == 0));
    return 0;
}

static void quantize_rows(const qk_weight *wt, const float *x, int64_t t0, int64_t t1, void *xq) {
    for (int64_t t = t0; t < t1; t++) {
        const float *xt = x + t * wt->in;
        void *y = (uint8_t *)xq + (size_t)t * wt->xrow;
        switch (wt->ti->act) {
            case ACT_F32: memcpy(y, xt, (size_t)wt->in * 4); break;
            case ACT_F16:
                for (int64_t i = 0; i < wt->in; i++) ((uint16_t *)y)[i] = f32_to_f16(xt[i]);
                break;
            case ACT_Q8_0: quantize_q8_0(xt, y, wt->nb); break;
            case ACT_Q8_1: quantize_q8_1(xt, y, wt->nb); break;
            default: quantize_q8_K(xt, y, wt->nb); break;
        }
    }
}

typedef struct {
    const qk_weight *wt;
    const float *x;
    void *xq;
    int64_t T, rows; /* rows per chunk */
} quant_job;

static void quant_chunk(const void *ctx, int64_t c) {
    const quant_job *j = ctx;
    const int64_t t1 = (c + 1) * j->rows < j->T ? (c + 1) * j->rows : j->T;
    quantize_rows(j->wt, j->x, c * j->rows, t1, j->xq);
}

/* Activation rows x [T, in] -> xq [T, xrow bytes], on up to n_threads threads for a prompt's many rows. */
static void qk_quantize(const qk_weight *wt, const float *x, int64_t T, void *xq, int n_threads) {
    const int64_t rows = (16384 + wt->in - 1) / wt->in; /* ~16K elements a chunk */
    if (n_threads <= 1 || T <= rows) {
        quantize_rows(wt, x, 0, T, xq);
        return;
    }
    const quant_job j = {wt, x, xq, T, rows};
    pool_run(quant_chunk, &j, (T + rows - 1) / rows, n_threads);
}

/* Activation rows [t0, t1) computed with one kernel set. A call is one or more ranges: one batch of rows takes
 * two (repacked Q4_K: the rows in groups of four, then the rest); several sessions' rows batched together take
 * the ranges each would take alone. */
typedef struct {
    int64_t t0, t1;
    kset ks;
} range_t;

/* Append rows [t0, t1) with kernel set ks, joined to the previous range when it has the same set: every output
 * is computed on its own in the set's order whichever rows share a tile (and a joined 4-row gemm range stays
 * aligned: each part is a multiple of four), so single-row segments still go several at a time through a tile. */
static void add_range(range_t *ranges, int *n, int64_t t0, int64_t t1, kset ks) {
    if (*n > 0) {
        range_t *last = &ranges[*n - 1];
        if (last->t1 == t0 && memcmp(&last->ks, &ks, sizeof(ks)) == 0) {
            last->t1 = t1;
            return;
        }
    }
    ranges[(*n)++] = (range_t){t0, t1, ks};
}

/* The rows form segments (sizes[n_seg], each >= 1), each computed as llama.cpp computes a batch of that many
 * rows: several sessions' prompts and decode steps in one call, each with the bits of its own call, the weights
 * read once for all. `ranges` has room for 2 * n_seg; returns how many were filled. */
static int qk_ranges(const qk_weight *wt, const int64_t *sizes, int64_t n_seg, range_t *ranges) {
    const qtype_info *ti = wt->ti;
    int n_ranges = 0;
    int64_t t0 = 0;
    for (int64_t k = 0; k < n_seg; k++) {
        const int64_t n = sizes[k];
        /* llama.cpp's path for this weight and n rows: repacked, tiled (8+ rows, K-quants it does not repack),
         * vec_dot */
        const int tiled = n >= 8 && ti->tiled.portable != NULL;
        const kset ks = pick(wt->repack ? &ti->gemv : tiled ? &ti->tiled : &ti->dot);
        const int64_t grouped = wt->repack ? n - n % 4 : 0; /* rows llama.cpp takes four at a time */
        if (grouped > 0) add_range(ranges, &n_ranges, t0, t0 + grouped, pick(&ti->gemm4));
        if (grouped < n) add_range(ranges, &n_ranges, t0 + grouped, t0 + n, ks);
        t0 += n;
    }
    return n_ranges;
}

/* ------------------------------------------------------------------------------------------------------------
 * The product. The weight rows are cut into chunks for the thread pool; each weight row meets every activation
 * row while it is in the L1 cache.
 */

typedef struct {
    const range_t *ranges;
    int n_ranges;
    const uint8_t *w;
    const uint8_t *xq;
    float *out;
    int64_t nb, nout, chunk;
    size_t wrow, xrow;
} mm_job;

/* Activation rows [t, t1) times weight rows [r, r + R), with kernel set ks: ks.rw weight rows at a time (R ==
 * ks.rw) through the set's widest tile that the rows left fill, and its rows kernel (or dot) for the rest; fewer
 * weight rows (a chunk's last) through tile1 and dot. */
static void run_rows(const mm_job *j, const kset *ks, int64_t r, int R, int64_t t, int64_t t1) {
    const uint8_t *w = j->w + (size_t)r * j->wrow;
    const size_t ostride = (size_t)j->nout;
    if (R == ks->rw && R > 1) {
        for (int k = 0; k < 3; k++) {
            const int64_t tc = ks->tc >> k;
            if (ks->tiles[k] == NULL || tc < 2) continue;
            for (; t + tc <= t1; t += tc) {
                ks->tiles[k](w, j->wrow, j->xq + (size_t)t * j->xrow, j->xrow, j->nb, j->out + t * j->nout + r,
                             ostride);
            }
        }
        if (ks->rows != NULL) {
            for (; t < t1; t++) {
                ks->rows(w, j->wrow, j->xq + (size_t)t * j->xrow, j->xrow, j->nb, j->out + t * j->nout + r, ostride);
            }
        }
    }
    for (int k = 0; k < R; k++) {
        int64_t u = t;
        if (ks->tile1 != NULL) {
            for (; u + ks->tc <= t1; u += ks->tc) {
                ks->tile1(w + (size_t)k * j->wrow, j->wrow, j->xq + (size_t)u * j->xrow, j->xrow, j->nb,
                          j->out + u * j->nout + r + k, ostride);
            }
        }
        for (; u < t1; u++) {
            j->out[u * j->nout + r + k] = ks->dot(w + (size_t)k * j->wrow, j->xq + (size_t)u * j->xrow, j->nb);
        }
    }
}

/* Chunk c: its weight rows four at a time (every kernel set's rw divides 4), each group through every range
 * while it is in the L1 cache. */
static void run_chunk(const void *ctx, int64_t c) {
    const mm_job *j = ctx;
    const int64_t r1 = (c + 1) * j->chunk < j->nout ? (c + 1) * j->chunk : j->nout;
    for (int64_t r4 = c * j->chunk; r4 < r1; r4 += 4) {
        const int64_t e = r4 + 4 < r1 ? r4 + 4 : r1;
        for (int k = 0; k < j->n_ranges; k++) {
            const kset *ks = &j->ranges[k].ks;
            for (int64_t r = r4; r < e; r += ks->rw) {
                const int R = r + ks->rw <= e ? ks->rw : (int)(e - r);
                run_rows(j, ks, r, R, j->ranges[k].t0, j->ranges[k].t1);
            }
        }
    }
}

/* A product as a job for the pool: its chunks of weight rows. Returns how many chunks. */
static int64_t qk_job(mm_job *j, const qk_weight *wt, const uint8_t *w, const range_t *ranges, int n_ranges,
                      const void *xq, float *out, int64_t T, int n_threads) {
    *j = (mm_job){ranges, n_ranges, w, xq, out, wt->nb, wt->out, wt->out, wt->wrow, wt->xrow};
    if (n_threads <= 1) return 1;
    /* about 8 chunks per thread, each worth at least ~16 KB of weights, in whole groups of 4 rows (the widest
     * tile's) */
    int64_t chunk = wt->out / (8 * (int64_t)n_threads);
    const int64_t min_rows = (int64_t)(16384 / (wt->wrow * (size_t)T) + 1);
    if (chunk < min_rows) chunk = min_rows;
    chunk = (chunk + 3) / 4 * 4;
    if (chunk >= wt->out) return 1;
    j->chunk = chunk;
    return (wt->out + chunk - 1) / chunk;
}

/* out [T, nout] = the quantized rows xq [T] times weight w, ranges from qk_ranges, on n_threads threads. */
static void qk_compute(const qk_weight *wt, const uint8_t *w, const range_t *ranges, int n_ranges, const void *xq,
                       float *out, int64_t T, int n_threads) {
    mm_job j;
    const int64_t n_chunks = qk_job(&j, wt, w, ranges, n_ranges, xq, out, T, n_threads);
    pool_run(run_chunk, &j, n_chunks, n_threads);
}

/* Several products as one pool job (the matmuls of one input, e.g. q, k and v): one wake-up of the workers,
 * and the weights of all of them stream one after another. Each output is computed as its own product's. */
#define MAX_JOBS 3
typedef struct {
    mm_job jobs[MAX_JOBS];
    int64_t first[MAX_JOBS + 1]; /* first chunk of each job */
    int n;
} mm_multi;

static void run_multi_chunk(const void *ctx, int64_t c) {
    const mm_multi *m = ctx;
    int k = 0;
    while (c >= m->first[k + 1]) k++;
    run_chunk(&m->jobs[k], c - m->first[k]);
}

static void qk_compute_multi(mm_multi *m, int n_threads) { pool_run(run_multi_chunk, m, m->first[m->n], n_threads); }

#endif /* ELDRIC_QK_MATMUL_H */
