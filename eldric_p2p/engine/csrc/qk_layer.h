/* A transformer layer in one C call: what engine/model.py's Stage._layer does with torch glue around the kernels,
 * done here in the same order with the same roundings, so the result is bit for bit the same (and llama.cpp's):
 *
 *   x = rms_norm(h, attn_norm)
 *   q, k, v = x @ wq, wk, wv (+ biases)                 one activation quantization shared by matmuls of a kind
 *   q, k = rms_norm per head (q_norm, k_norm)           where the model has them
 *   per session: rope(q, k); q *= q_scale; the f16 cache gets k and v; attention over the cache
 *   o = attn @ wo; o = rms_norm(o, post_attn_norm)      the post norm where the model has it
 *   h = h + o
 *   x = rms_norm(h, ffn_norm); a = act(x @ gate) * (x @ up); d = a @ down; d = rms_norm(d, post_ffn_norm)
 *   h = h + d
 *
 * The rows of a call are the segments of several sessions (a prompt, or one decode step each): the matmuls take
 * each segment's rows as llama.cpp takes a batch of that many (qk_ranges), rope and attention run per session
 * against its own cache. The attention's (row, head) units are shared out over the thread pool when there is
 * enough of them to pay for it.
 */

#ifndef ELDRIC_QK_LAYER_H
#define ELDRIC_QK_LAYER_H

#include "ggml_attn.h"
#include "ggml_ops.h"
#include "qk_matmul.h"

typedef struct {
    qk_weight wt;
    const uint8_t *w;  /* raw GGUF blocks [out, wrow] */
    const float *bias; /* [out] or NULL */
} lin_t;

typedef struct {
    int64_t hidden, nh, nkv, hd, ffn;
    int rope_dims, neox, gelu; /* gelu: GEGLU (tanh GELU through ggml's table), else SwiGLU */
    float rope_base, freq_scale, eps;
    float q_scale;     /* q *= q_scale after rope (Gemma's 1/sqrt(head_dim)); 0: none */
    float score_scale; /* on the scores K.q */
    int64_t window;    /* sliding window of this layer; 0: global */
    lin_t wq, wk, wv, wo, gate, up, down;
    const float *attn_norm, *ffn_norm;                              /* [hidden] */
    const float *q_norm, *k_norm, *post_attn_norm, *post_ffn_norm; /* NULL where the model has none */
} layer_t;

/* One session's rows in a forward: its KV cache (of the whole stage) and where its rows go. */
typedef struct {
    uint16_t *k, *v; /* f16 [n_layers, nkv, ctx, hd] */
    int64_t ctx, pos0, T;
} seg_t;

/* A rope_table for all N rows of a forward (each row at its segment's position), kept for the layers of the same
 * base (Gemma 3's local and global bases alternate). */
typedef struct {
    float base, freq_scale; /* base NAN: empty */
    int n_dims;
    float *cs; /* [N, n_dims] */
} rope_slot;

/* Scratch for a forward of N rows through layers of the same shapes. */
typedef struct {
    float *x, *q, *k, *v, *attn, *o, *gate, *up;
    void *xq;
    int64_t *sizes, *pos, *first; /* [n_seg], [max T], [n_seg + 1] */
    range_t *ranges;               /* [MAX_JOBS][2 n_seg] */
    attn_args *args;               /* [n_seg] */
    rope_slot rope[2];
    int rope_next; /* the slot to fill next */
} layer_scratch;

static size_t xq_bytes(const lin_t *l) { return l->wt.xrow; }

/* Largest quantized activation row of the layer's matmuls. */
static size_t layer_xrow(const layer_t *L) {
    const lin_t *ls[] = {&L->wq, &L->wk, &L->wv, &L->wo, &L->gate, &L->up, &L->down};
    size_t m = 0;
    for (int i = 0; i < 7; i++) m = xq_bytes(ls[i]) > m ? xq_bytes(ls[i]) : m;
    return m;
}

static void scratch_free(layer_scratch *s) {
    free(s->x);
    free(s->xq);
    free(s->sizes);
    free(s->pos);
    free(s->ranges);
    free(s->first);
    free(s->args);
    free(s->rope[0].cs);
    free(s->rope[1].cs);
    memset(s, 0, sizeof(*s));
}

/* Allocate for N rows and n_seg segments; returns -1 when out of memory. */
static int scratch_alloc(layer_scratch *s, const layer_t *L, int64_t N, int64_t n_seg, int64_t max_T) {
    const int64_t qd = L->nh * L->hd, kvd = L->nkv * L->hd;
    const int64_t floats = N * (L->hidden + qd + 2 * kvd + qd + L->hidden + 2 * L->ffn);
    memset(s, 0, sizeof(*s));
    s->x = malloc(sizeof(float) * (size_t)floats);
    s->xq = malloc(layer_xrow(L) * (size_t)N + 64);
    s->sizes = malloc(sizeof(int64_t) * (size_t)n_seg);
    s->pos = malloc(sizeof(int64_t) * (size_t)max_T);
    s->ranges = malloc(sizeof(range_t) * (size_t)(2 * MAX_JOBS * n_seg));
    s->first = malloc(sizeof(int64_t) * (size_t)(n_seg + 1));
    s->args = malloc(sizeof(attn_args) * (size_t)n_seg);
    for (int k = 0; k < 2; k++) {
        s->rope[k] = (rope_slot){NAN, 0.0f, L->rope_dims, malloc(sizeof(float) * (size_t)(N * L->rope_dims))};
    }
    if (!s->x || !s->xq || !s->sizes || !s->pos || !s->ranges || !s->first || !s->args || !s->rope[0].cs ||
        !s->rope[1].cs) {
        scratch_free(s);
        return -1;
    }
    s->q = s->x + N * L->hidden;
    s->k = s->q + N * qd;
    s->v = s->k + N * kvd;
    s->attn = s->v + N * kvd;
    s->o = s->attn + N * qd;
    s->gate = s->o + N * L->hidden;
    s->up = s->gate + N * L->ffn;
    return 0;
}

static void add_bias(const lin_t *l, int64_t N, float *out) {
    if (l->bias == NULL) return;
    for (int64_t t = 0; t < N; t++) {
        for (int64_t i = 0; i < l->wt.out; i++) out[t * l->wt.out + i] = out[t * l->wt.out + i] + l->bias[i];
    }
}

/* outs[k] [N, ls[k].out] = x [N, in] @ W_k.T (+ bias) for n (<= MAX_JOBS) matmuls of the same input: one
 * activation quantization when they share its kind, one pool job for all. s->xq (and xq_src, xq_kind: what it
 * holds) is the quantized x; matmuls of other kinds run one by one. */
static void lin_apply(const lin_t *const *ls, float *const *outs, int n, const float *x, int64_t N, layer_scratch *s,
                      int64_t n_seg, const float **xq_src, int *xq_kind, int n_threads) {
    int shared = 1;
    for (int k = 1; k < n; k++) shared = shared && ls[k]->wt.ti->act == ls[0]->wt.ti->act;
    if (!shared) {
        for (int k = 0; k < n; k++) lin_apply(&ls[k], &outs[k], 1, x, N, s, n_seg, xq_src, xq_kind, n_threads);
        return;
    }
    if (*xq_src != x || *xq_kind != ls[0]->wt.ti->act) {
        qk_quantize(&ls[0]->wt, x, N, s->xq, n_threads);
        *xq_src = x;
        *xq_kind = ls[0]->wt.ti->act;
    }
    mm_multi m;
    m.n = n;
    m.first[0] = 0;
    for (int k = 0; k < n; k++) {
        range_t *ranges = s->ranges + (size_t)k * 2 * (size_t)n_seg;
        const int n_ranges = qk_ranges(&ls[k]->wt, s->sizes, n_seg, ranges);
        m.first[k + 1] = m.first[k] + qk_job(&m.jobs[k], &ls[k]->wt, ls[k]->w, ranges, n_ranges, s->xq, outs[k], N,
                                             n_threads);
    }
    qk_compute_multi(&m, n_threads);
    for (int k = 0; k < n; k++) add_bias(ls[k], N, outs[k]);
}

/* ---- attention over all the segments as one pool job: unit u of segment g is (row, head) of that segment */

static _Thread_local float *tl_work = NULL;
static _Thread_local size_t tl_work_floats = 0;

/* This thread's attention scratch of at least n floats (kept for the next call); NULL when out of memory. */
static float *thread_work(size_t n) {
    if (n > tl_work_floats) {
        float *p = realloc(tl_work, sizeof(float) * n);
        if (p == NULL) return NULL;
        tl_work = p;
        tl_work_floats = n;
    }
    return tl_work;
}

#define ATTN_CHUNK 4 /* units per chunk */

typedef struct {
    const attn_args *args; /* one per segment */
    const int64_t *first;  /* first unit of each segment, n_seg + 1 entries */
    int64_t n_seg;
    _Atomic int failed;
} attn_job;

static void attn_chunk(const void *ctx, int64_t c) {
    attn_job *j = (attn_job *)ctx;
    const int64_t u0 = c * ATTN_CHUNK, u1 = u0 + ATTN_CHUNK < j->first[j->n_seg] ? u0 + ATTN_CHUNK : j->first[j->n_seg];
    int64_t g = 0;
    for (int64_t u = u0; u < u1; u++) {
        while (u >= j->first[g + 1]) g++;
        float *work = thread_work(ops_attn_work_floats(&j->args[g]));
        if (work == NULL) {
            atomic_store(&j->failed, 1);
            return;
        }
        ops_attention(&j->args[g], u - j->first[g], u - j->first[g] + 1, work);
    }
}

/* ---- the gated activation, in place over gate, in chunks over the pool for a prompt's many rows */

#define ACT_CHUNK 16384 /* elements; a multiple of 8, so every chunk but the last is whole vectors */

typedef struct {
    void (*fn)(const float *g, const float *u, float *y, int64_t n);
    float *gate;
    const float *up;
    int64_t n;
} act_job;

static void act_chunk(const void *ctx, int64_t c) {
    const act_job *j = ctx;
    const int64_t i0 = c * ACT_CHUNK, n = i0 + ACT_CHUNK < j->n ? ACT_CHUNK : j->n - i0;
    j->fn(j->gate + i0, j->up + i0, j->gate + i0, n);
}

/* The rope table of this layer's base for the forward's rows: the one a previous layer built, or a new one. */
static const rope_slot *layer_rope(const layer_t *L, const seg_t *segs, int64_t n_seg, layer_scratch *s) {
    for (int k = 0; k < 2; k++) {
        const rope_slot *r = &s->rope[k];
        if (r->base == L->rope_base && r->freq_scale == L->freq_scale && r->n_dims == L->rope_dims) return r;
    }
    rope_slot *r = &s->rope[s->rope_next];
    s->rope_next ^= 1;
    r->base = L->rope_base, r->freq_scale = L->freq_scale, r->n_dims = L->rope_dims;
    float *cs = r->cs;
    for (int64_t g = 0; g < n_seg; g++) {
        for (int64_t t = 0; t < segs[g].T; t++) s->pos[t] = segs[g].pos0 + t;
        rope_table(s->pos, segs[g].T, L->rope_dims, L->rope_base, L->freq_scale, cs);
        cs += segs[g].T * L->rope_dims;
    }
    return r;
}

/* One layer (index li within the stage's caches) over h [N, hidden], in place. Returns -1 when out of memory. */
static int layer_forward(const layer_t *L, int64_t li, float *h, int64_t N, const seg_t *segs, int64_t n_seg,
                         layer_scratch *s, int n_threads) {
    const int64_t hid = L->hidden, nh = L->nh, nkv = L->nkv, hd = L->hd, qd = nh * hd, kvd = nkv * hd;
    const float *xq_src = NULL;
    int xq_kind = -1;
    for (int64_t g = 0; g < n_seg; g++) s->sizes[g] = segs[g].T;

    ops_rms_norm(h, L->attn_norm, s->x, N, hid, L->eps);
    const lin_t *qkv[] = {&L->wq, &L->wk, &L->wv};
    float *qkv_out[] = {s->q, s->k, s->v}; /* [N, nh, hd], [N, nkv, hd], [N, nkv, hd] */
    lin_apply(qkv, qkv_out, 3, s->x, N, s, n_seg, &xq_src, &xq_kind, n_threads);
    if (L->q_norm != NULL) {
        ops_rms_norm(s->q, L->q_norm, s->q, N * nh, hd, L->eps);
        ops_rms_norm(s->k, L->k_norm, s->k, N * nkv, hd, L->eps);
    }

    /* rope (one table per base for all the layers), q scale and the cache writes of every segment, then their
     * attention as one job */
    const rope_slot *rope = layer_rope(L, segs, n_seg, s);
    attn_args *args = s->args;
    int64_t *first = s->first, row = 0;
    first[0] = 0;
    for (int64_t g = 0; g < n_seg; g++) {
        const seg_t *sg = &segs[g];
        float *q = s->q + row * qd, *k = s->k + row * kvd, *v = s->v + row * kvd;
        const float *cs = rope->cs + row * L->rope_dims;
        ops_rope_rotate(q, cs, sg->T, (int)nh, (int)hd, L->rope_dims, L->neox);
        ops_rope_rotate(k, cs, sg->T, (int)nkv, (int)hd, L->rope_dims, L->neox);
        if (L->q_scale != 0.0f) {
            for (int64_t i = 0; i < sg->T * qd; i++) q[i] = q[i] * L->q_scale;
        }
        const size_t layer_off = (size_t)li * (size_t)(nkv * sg->ctx * hd);
        uint16_t *kc = sg->k + layer_off, *vc = sg->v + layer_off; /* [nkv, ctx, hd] */
        for (int64_t t = 0; t < sg->T; t++) {
            for (int64_t j = 0; j < nkv; j++) {
                const size_t at = ((size_t)j * sg->ctx + sg->pos0 + t) * hd;
                ops_to_f16(k + (t * nkv + j) * hd, kc + at, hd);
                ops_to_f16(v + (t * nkv + j) * hd, vc + at, hd);
            }
        }
        args[g] = (attn_args){q, kc, vc, s->attn + row * qd, sg->T, sg->pos0, sg->ctx, L->window,
                              (int)nh, (int)nkv, (int)hd, sg->T > 1, L->score_scale};
        first[g + 1] = first[g] + ops_attn_units(&args[g]);
        row += sg->T;
    }
    /* the (row, head) units cost about S * hd each: share them out when the whole is worth ~100 us */
    double cost = 0.0;
    for (int64_t g = 0; g < n_seg; g++) cost += (double)(segs[g].T * nh) * (double)(segs[g].pos0 + segs[g].T) * hd;
    attn_job aj = {args, first, n_seg, 0};
    const int64_t n_chunks = (first[n_seg] + ATTN_CHUNK - 1) / ATTN_CHUNK;
    pool_run(attn_chunk, &aj, n_chunks, cost > 2e5 ? n_threads : 1);
    if (atomic_load(&aj.failed)) return -1;

    const lin_t *wo[] = {&L->wo};
    lin_apply(wo, &s->o, 1, s->attn, N, s, n_seg, &xq_src, &xq_kind, n_threads); /* [N, hidden] */
    if (L->post_attn_norm != NULL) ops_rms_norm(s->o, L->post_attn_norm, s->o, N, hid, L->eps);
    for (int64_t i = 0; i < N * hid; i++) h[i] = h[i] + s->o[i];

    ops_rms_norm(h, L->ffn_norm, s->x, N, hid, L->eps);
    const lin_t *gate_up[] = {&L->gate, &L->up};
    float *gate_up_out[] = {s->gate, s->up}; /* [N, ffn] each */
    lin_apply(gate_up, gate_up_out, 2, s->x, N, s, n_seg, &xq_src, &xq_kind, n_threads);
    const act_job actj = {L->gelu ? ops_geglu : ops_swiglu, s->gate, s->up, N * L->ffn};
    pool_run(act_chunk, &actj, (actj.n + ACT_CHUNK - 1) / ACT_CHUNK, n_threads);
    const lin_t *down[] = {&L->down};
    lin_apply(down, &s->o, 1, s->gate, N, s, n_seg, &xq_src, &xq_kind, n_threads); /* [N, hidden] */
    if (L->post_ffn_norm != NULL) ops_rms_norm(s->o, L->post_ffn_norm, s->o, N, hid, L->eps);
    for (int64_t i = 0; i < N * hid; i++) h[i] = h[i] + s->o[i];
    return 0;
}

#endif /* ELDRIC_QK_LAYER_H */
