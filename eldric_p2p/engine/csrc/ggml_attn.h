/* Attention over an f16 KV cache with the exact arithmetic of ggml's x86 CPU backend (see ggml_ops.h, whose
 * helpers it uses): scores = K . f16(q), softmax with ggml's vectorised expf and its summation order, out = V^T .
 * f16(p), the dot products in tinyBLAS's order (several query rows) or ggml_vec_dot_f16's (one row). Portable C,
 * and AVX2 and AVX-512 versions of the same operations lane for lane, chosen by ops_set_simd.
 */

#ifndef ELDRIC_GGML_ATTN_H
#define ELDRIC_GGML_ATTN_H

#include "ggml_ops.h"

/* dot(a, b) over n floats in one of ggml's two orders; n is padded by the caller to 8 (one_acc) or 32. */
static float dot_generic(const float *a, const float *b, int n, int one_acc) {
    if (one_acc) {
        float acc[8] = {0};
        for (int i = 0; i < n; i += 8)
            for (int l = 0; l < 8; l++) acc[l] = fmaf(a[i + l], b[i + l], acc[l]);
        return ops_hsum8(acc);
    }
    float acc[4][8] = {{0}};
    for (int i = 0; i < n; i += 32)
        for (int j = 0; j < 4; j++)
            for (int l = 0; l < 8; l++) acc[j][l] = fmaf(a[i + 8 * j + l], b[i + 8 * j + l], acc[j][l]);
    return reduce4x8(acc);
}

/* Lane reductions of the weighted value sums (see attend_generic): lane arrays L[nl][hd] -> out[hd]. */
static void reduce_lanes(float *const *L, int nl, int hd, float *out) {
    for (int d = 0; d < hd; d++) {
        float a[8];
        if (nl == 8) {
            for (int l = 0; l < 8; l++) a[l] = L[l][d];
            out[d] = ops_hsum8(a);
        } else {
            float acc[4][8];
            for (int j = 0; j < 4; j++)
                for (int l = 0; l < 8; l++) acc[j][l] = L[8 * j + l][d];
            out[d] = reduce4x8(acc);
        }
    }
}

/* Attention over an f16 KV cache for T query rows at positions pos0..pos0+T-1 (keys and values of positions
 * 0..pos0+T-1 already in the cache):
 *   q    float32 [T, nh, hd]           k, v  f16 bits [nkv, ctx, hd]     out  float32 [T, nh * hd]
 *   window 0 = global, else keys with qpos - kpos >= window are hidden; one_acc: the one-accumulator summation
 *   order (llama.cpp's batched path) instead of ggml_vec_dot_f16's four accumulators (its one-row path).
 * The work is cut into units, each computed on its own (so threads may share them out): one per (query row,
 * head), u = t * nh + h, or with the AVX2 code for several query rows one per (query row, KV head), u = t * nkv
 * + kvh, the heads that share a KV head side by side (ops_attn_units says how many); a unit needs
 * ops_attn_work_floats() floats of scratch. */
typedef struct {
    const float *q;
    const uint16_t *k, *v;
    float *out;
    int64_t T, pos0, ctx, window;
    int nh, nkv, hd, one_acc;
    float scale;
} attn_args;

/* Whether the units are (query row, KV head): the AVX2 code for several query rows (tinyBLAS's order). */
static inline int ops_attn_grouped(const attn_args *a) { return OPS_X86 && ops_have_avx2 && a->one_acc; }

static inline int64_t ops_attn_units(const attn_args *a) {
    return a->T * (ops_attn_grouped(a) ? a->nkv : a->nh);
}

static inline size_t ops_attn_work_floats(const attn_args *a) {
    const int64_t Sp = (a->pos0 + a->T + 31) / 32 * 32, group = a->nh / a->nkv;
    return (size_t)(group * (2 * Sp + a->hd) + 35 * (int64_t)a->hd); /* + one head's q for an odd group */
}

/* ggml computes V^T . p: output element d is a dot product over key positions s, whose 8 (or 4x8) float lanes
 * take s mod 8 (or s mod 32). Here the same lanes are kept as arrays over d, L[s mod nl][d] += p[s] * V[s][d],
 * which is the same sequence of fused multiply-adds per lane. Keys with p = 0 (masked, or beyond the sequence)
 * are skipped: adding 0 * v leaves a lane unchanged. */
static void attend_generic(const attn_args *a, int64_t t, int h, float *work) {
    const int hd = a->hd, nl = a->one_acc ? 8 : 32, group = a->nh / a->nkv;
    const int64_t S = a->pos0 + a->T, Sp = (S + 31) / 32 * 32;
    float *w = work, *p = w + Sp, *qv = p + Sp, *kr = qv + hd, *lanes = kr + hd;
    float *L[32];
    for (int l = 0; l < nl; l++) L[l] = lanes + (size_t)l * hd;
    const uint16_t *kh = a->k + (size_t)(h / group) * a->ctx * hd, *vh = a->v + (size_t)(h / group) * a->ctx * hd;
    const float *qr = a->q + ((size_t)t * a->nh + h) * hd;
    for (int d = 0; d < hd; d++) qv[d] = round_f16(qr[d]);
    for (int64_t s = 0; s < Sp; s++) {
        w[s] = 0.0f;
        if (s >= S) continue;
        for (int d = 0; d < hd; d++) kr[d] = h2f(kh[(size_t)s * hd + d]);
        w[s] = dot_generic(kr, qv, hd, a->one_acc) * a->scale;
    }
    probs_generic(w, p, Sp, S, a->pos0 + t, a->window);
    memset(lanes, 0, sizeof(float) * (size_t)nl * hd);
    for (int64_t s = 0; s < S; s++) {
        if (p[s] == 0.0f) continue;
        float *acc = L[s % nl];
        for (int d = 0; d < hd; d++) acc[d] = fmaf(p[s], h2f(vh[(size_t)s * hd + d]), acc[d]);
    }
    reduce_lanes(L, nl, hd, a->out + ((size_t)t * a->nh + h) * hd);
}

#if OPS_X86
/* K row (f16) . q (f32 holding f16 values), hd % 32 == 0, in ggml's order. */
OPS_TARGET_AVX2 static inline float kdot_avx2(const uint16_t *kr, const float *qv, int hd, int one_acc) {
    if (one_acc) {
        __m256 acc = _mm256_setzero_ps();
        for (int i = 0; i < hd; i += 8)
            acc = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(kr + i))), _mm256_loadu_ps(qv + i), acc);
        return hsum8_avx2(acc);
    }
    __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int i = 0; i < hd; i += 32)
        for (int j = 0; j < 4; j++)
            a[j] = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(kr + i + 8 * j))),
                                   _mm256_loadu_ps(qv + i + 8 * j), a[j]);
    const __m256 x = _mm256_add_ps(_mm256_add_ps(a[0], a[2]), _mm256_add_ps(a[1], a[3]));
    const __m128 t0 = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    const __m128 t1 = _mm_hadd_ps(t0, t0);
    return _mm_cvtss_f32(_mm_hadd_ps(t1, t1));
}

/* The same computation as attend_generic, eight output elements at a time. Needs hd % 32 == 0. */
OPS_TARGET_AVX2 static void attend_avx2(const attn_args *a, int64_t t, int h, float *work) {
    const int hd = a->hd, nl = a->one_acc ? 8 : 32, group = a->nh / a->nkv, one_acc = a->one_acc;
    const int64_t S = a->pos0 + a->T, Sp = (S + 31) / 32 * 32;
    float *w = work, *p = w + Sp, *qv = p + Sp, *lanes = qv + hd;
    const int64_t qpos = a->pos0 + t, window = a->window;
    const int64_t first = window > 0 && qpos - window + 1 > 0 ? qpos - window + 1 : 0;
    const uint16_t *kh = a->k + (size_t)(h / group) * a->ctx * hd, *vh = a->v + (size_t)(h / group) * a->ctx * hd;
    const float *qr = a->q + ((size_t)t * a->nh + h) * hd;
    for (int d = 0; d < hd; d += 8) _mm256_storeu_ps(qv + d, round_f16_avx2(_mm256_loadu_ps(qr + d)));
    for (int64_t s = 0; s < Sp; s++)
        w[s] = s >= first && s <= qpos ? kdot_avx2(kh + (size_t)s * hd, qv, hd, one_acc) * a->scale : 0.0f;
    probs_avx2(w, p, Sp, S, qpos, window);
    memset(lanes, 0, sizeof(float) * (size_t)nl * hd);
    for (int64_t s = first; s <= qpos; s++) {
        if (p[s] == 0.0f) continue;
        const __m256 ps = _mm256_set1_ps(p[s]);
        float *acc = lanes + (size_t)(s % nl) * hd;
        const uint16_t *vr = vh + (size_t)s * hd;
        for (int d = 0; d < hd; d += 8) {
            const __m256 vv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(vr + d)));
            _mm256_storeu_ps(acc + d, _mm256_fmadd_ps(ps, vv, _mm256_loadu_ps(acc + d)));
        }
    }
    float *o = a->out + ((size_t)t * a->nh + h) * hd;
    for (int d = 0; d < hd; d += 8) {
#define LANE(l) _mm256_loadu_ps(lanes + (size_t)(l) * hd + d)
        __m256 x[8];
        if (one_acc) {
            for (int l = 0; l < 8; l++) x[l] = LANE(l);
        } else { /* GGML_F32x8_REDUCE of the four accumulators, lane by lane */
            for (int l = 0; l < 8; l++)
                x[l] = _mm256_add_ps(_mm256_add_ps(LANE(l), LANE(16 + l)), _mm256_add_ps(LANE(8 + l), LANE(24 + l)));
        }
#undef LANE
        __m256 res;
        if (one_acc) { /* hsum_float_8: (l4 + l0), ...; then (r0 + r2) + (r1 + r3) */
            const __m256 r0 = _mm256_add_ps(x[4], x[0]), r1 = _mm256_add_ps(x[5], x[1]);
            const __m256 r2 = _mm256_add_ps(x[6], x[2]), r3 = _mm256_add_ps(x[7], x[3]);
            res = _mm256_add_ps(_mm256_add_ps(r0, r2), _mm256_add_ps(r1, r3));
        } else { /* lo4 + hi4, then two horizontal adds: (t0 + t1) + (t2 + t3) */
            const __m256 t0 = _mm256_add_ps(x[0], x[4]), t1 = _mm256_add_ps(x[1], x[5]);
            const __m256 t2 = _mm256_add_ps(x[2], x[6]), t3 = _mm256_add_ps(x[3], x[7]);
            res = _mm256_add_ps(_mm256_add_ps(t0, t1), _mm256_add_ps(t2, t3));
        }
        _mm256_storeu_ps(o + d, res);
    }
}

/* The scores of keys s and s+1 for heads j0..j0+n-1 (n <= 4, a constant where inlined), each (key, head) its own
 * accumulator summed over d in the single-key loop's order: the same bits, 2n chains of FMAs side by side. */
__attribute__((always_inline)) OPS_TARGET_AVX2 static inline void scores2_avx2(
    const float *qv, const uint16_t *kh, int hd, int64_t s, int j0, const int n, int64_t Sp, float scale, float *w) {
    __m256 acc[2][4];
    for (int k = 0; k < 2; k++)
        for (int j = 0; j < n; j++) acc[k][j] = _mm256_setzero_ps();
    for (int d = 0; d < hd; d += 8) {
        const __m256 k0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(kh + (size_t)s * hd + d)));
        const __m256 k1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(kh + (size_t)(s + 1) * hd + d)));
        for (int j = 0; j < n; j++) {
            const __m256 q = _mm256_loadu_ps(qv + (j0 + j) * hd + d);
            acc[0][j] = _mm256_fmadd_ps(k0, q, acc[0][j]);
            acc[1][j] = _mm256_fmadd_ps(k1, q, acc[1][j]);
        }
    }
    for (int j = 0; j < n; j++)
        for (int k = 0; k < 2; k++) w[(size_t)(j0 + j) * Sp + s + k] = hsum8_avx2(acc[k][j]) * scale;
}

/* attend_avx2's one-accumulator order (several query rows) for query row t and every head of KV head kvh: each K
 * row is widened once for all the heads, each head keeping its own 8-lane accumulator; V^T . p per 8 outputs with
 * the 8 lane sums in registers, keys in order within each lane. Keys with p = 0 are added here (fma(0, v, lane)),
 * which leaves a lane as it is for every finite v, as skipping them does. */
OPS_TARGET_AVX2 static void attend_group_avx2(const attn_args *a, int64_t t, int kvh, float *work) {
    const int hd = a->hd, group = a->nh / a->nkv;
    const int64_t S = a->pos0 + a->T, Sp = (S + 31) / 32 * 32, qpos = a->pos0 + t, window = a->window;
    const int64_t first = window > 0 && qpos - window + 1 > 0 ? qpos - window + 1 : 0;
    const uint16_t *kh = a->k + (size_t)kvh * a->ctx * hd, *vh = a->v + (size_t)kvh * a->ctx * hd;
    float *qv = work, *w = qv + (size_t)group * hd, *p = w + (size_t)group * Sp; /* [group][hd], [group][Sp] x 2 */
    for (int j = 0; j < group; j++) {
        const float *qr = a->q + ((size_t)t * a->nh + (size_t)kvh * group + j) * hd;
        for (int d = 0; d < hd; d += 8) _mm256_storeu_ps(qv + j * hd + d, round_f16_avx2(_mm256_loadu_ps(qr + d)));
        memset(w + (size_t)j * Sp, 0, sizeof(float) * (size_t)Sp);
    }
    int64_t s = first;
    for (; s + 1 <= qpos; s += 2) { /* two keys at a time: 2 x n chains of FMAs side by side instead of n */
        for (int j0 = 0; j0 < group; j0 += 4) {
            switch (group - j0 < 4 ? group - j0 : 4) {
            case 1: scores2_avx2(qv, kh, hd, s, j0, 1, Sp, a->scale, w); break;
            case 2: scores2_avx2(qv, kh, hd, s, j0, 2, Sp, a->scale, w); break;
            case 3: scores2_avx2(qv, kh, hd, s, j0, 3, Sp, a->scale, w); break;
            default: scores2_avx2(qv, kh, hd, s, j0, 4, Sp, a->scale, w); break;
            }
        }
    }
    for (; s <= qpos; s++) {
        const uint16_t *kr = kh + (size_t)s * hd;
        for (int j0 = 0; j0 < group; j0 += 8) {
            const int n = group - j0 < 8 ? group - j0 : 8;
            __m256 acc[8];
            for (int j = 0; j < n; j++) acc[j] = _mm256_setzero_ps();
            for (int d = 0; d < hd; d += 8) {
                const __m256 kf = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(kr + d)));
                for (int j = 0; j < n; j++) {
                    acc[j] = _mm256_fmadd_ps(kf, _mm256_loadu_ps(qv + (j0 + j) * hd + d), acc[j]);
                }
            }
            for (int j = 0; j < n; j++) w[(size_t)(j0 + j) * Sp + s] = hsum8_avx2(acc[j]) * a->scale;
        }
    }
    const int64_t s0 = first & ~(int64_t)7, full = s0 + (qpos + 1 - s0) / 8 * 8; /* whole blocks of 8 keys */
    for (int j = 0; j < group; j++) {
        float *wj = w + (size_t)j * Sp, *pj = p + (size_t)j * Sp;
        probs_avx2(wj, pj, Sp, S, qpos, window);
        float *o = a->out + ((size_t)t * a->nh + (size_t)kvh * group + j) * hd;
        for (int d = 0; d < hd; d += 8) {
            __m256 L[8];
            for (int l = 0; l < 8; l++) L[l] = _mm256_setzero_ps();
            int64_t s = s0;
            for (; s < full; s += 8) {
                for (int l = 0; l < 8; l++) {
                    const __m256 vv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(vh + (size_t)(s + l) * hd + d)));
                    L[l] = _mm256_fmadd_ps(_mm256_set1_ps(pj[s + l]), vv, L[l]);
                }
            }
            for (int l = 0; s + l <= qpos; l++) {
                const __m256 vv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(vh + (size_t)(s + l) * hd + d)));
                L[l] = _mm256_fmadd_ps(_mm256_set1_ps(pj[s + l]), vv, L[l]);
            }
            /* hsum_float_8 lane by lane: (l4 + l0), ...; then (r0 + r2) + (r1 + r3) */
            const __m256 r0 = _mm256_add_ps(L[4], L[0]), r1 = _mm256_add_ps(L[5], L[1]);
            const __m256 r2 = _mm256_add_ps(L[6], L[2]), r3 = _mm256_add_ps(L[7], L[3]);
            _mm256_storeu_ps(o + d, _mm256_add_ps(_mm256_add_ps(r0, r2), _mm256_add_ps(r1, r3)));
        }
    }
}

/* The scores of keys s..s+3 for head pairs j0..j0+n-1 (n <= 4, a constant where inlined): each (key, pair) its own
 * accumulator, summed over d in the single-key loop's order, so the bits are the same while 4n independent chains
 * of FMAs run side by side (one key at a time, a few heads waited on each FMA's latency). */
__attribute__((always_inline)) OPS_TARGET_AVX512 static inline void scores4_avx512(
    const float *qp, const uint16_t *kh, int hd, int64_t s, int j0, const int n, int group, int64_t Sp, float scale,
    float *w) {
    __m512 acc[4][4];
    for (int k = 0; k < 4; k++)
        for (int j = 0; j < n; j++) acc[k][j] = _mm512_setzero_ps();
    for (int d = 0; d < hd; d += 8) {
        __m512 kf[4];
        for (int k = 0; k < 4; k++)
            kf[k] = _mm512_broadcast_f32x8(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(kh + (size_t)(s + k) * hd + d))));
        for (int j = 0; j < n; j++) {
            const __m512 q = _mm512_loadu_ps(qp + ((size_t)(j0 + j) * hd + d) * 2);
            for (int k = 0; k < 4; k++) acc[k][j] = _mm512_fmadd_ps(kf[k], q, acc[k][j]);
        }
    }
    for (int j = 0; j < n; j++) {
        const int h0 = 2 * (j0 + j);
        for (int k = 0; k < 4; k++) {
            w[(size_t)h0 * Sp + s + k] = hsum8_avx2(_mm512_castps512_ps256(acc[k][j])) * scale;
            if (h0 + 1 < group) w[(size_t)(h0 + 1) * Sp + s + k] = hsum8_avx2(_mm512_extractf32x8_ps(acc[k][j], 1)) * scale;
        }
    }
}

/* attend_group_avx2 with 512-bit registers: two heads' 8-lane score accumulators per register (the K row's 8
 * values broadcast to both halves), and V^T . p 16 outputs at a time; every lane's sequence of operations is the
 * AVX2 code's. Needs hd % 16 == 0. */
OPS_TARGET_AVX512 static void attend_group_avx512(const attn_args *a, int64_t t, int kvh, float *work) {
    const int hd = a->hd, group = a->nh / a->nkv, pairs = (group + 1) / 2;
    const int64_t S = a->pos0 + a->T, Sp = (S + 31) / 32 * 32, qpos = a->pos0 + t, window = a->window;
    const int64_t first = window > 0 && qpos - window + 1 > 0 ? qpos - window + 1 : 0;
    const uint16_t *kh = a->k + (size_t)kvh * a->ctx * hd, *vh = a->v + (size_t)kvh * a->ctx * hd;
    /* qp[pair][d / 8]: 8 values of head 2 pair, then 8 of head 2 pair + 1 (zeros past the last head) */
    float *qp = work, *w = qp + (size_t)(2 * pairs) * hd, *p = w + (size_t)group * Sp;
    for (int j = 0; j < 2 * pairs; j++) {
        const float *qr = a->q + ((size_t)t * a->nh + (size_t)kvh * group + j) * hd;
        for (int d = 0; d < hd; d += 8) {
            float *dst = qp + ((size_t)(j / 2) * hd + d) * 2 + (j % 2) * 8;
            _mm256_storeu_ps(dst, j < group ? round_f16_avx2(_mm256_loadu_ps(qr + d)) : _mm256_setzero_ps());
        }
        if (j < group) memset(w + (size_t)j * Sp, 0, sizeof(float) * (size_t)Sp);
    }
    int64_t s = first;
    for (; s + 3 <= qpos; s += 4) { /* four keys at a time: 4 x n chains of FMAs side by side instead of n */
        for (int j0 = 0; j0 < pairs; j0 += 4) {
            switch (pairs - j0 < 4 ? pairs - j0 : 4) {
            case 1: scores4_avx512(qp, kh, hd, s, j0, 1, group, Sp, a->scale, w); break;
            case 2: scores4_avx512(qp, kh, hd, s, j0, 2, group, Sp, a->scale, w); break;
            case 3: scores4_avx512(qp, kh, hd, s, j0, 3, group, Sp, a->scale, w); break;
            default: scores4_avx512(qp, kh, hd, s, j0, 4, group, Sp, a->scale, w); break;
            }
        }
    }
    for (; s <= qpos; s++) {
        const uint16_t *kr = kh + (size_t)s * hd;
        for (int j0 = 0; j0 < pairs; j0 += 8) {
            const int n = pairs - j0 < 8 ? pairs - j0 : 8;
            __m512 acc[8];
            for (int j = 0; j < n; j++) acc[j] = _mm512_setzero_ps();
            for (int d = 0; d < hd; d += 8) {
                const __m512 kf = _mm512_broadcast_f32x8(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(kr + d))));
                for (int j = 0; j < n; j++) {
                    acc[j] = _mm512_fmadd_ps(kf, _mm512_loadu_ps(qp + ((size_t)(j0 + j) * hd + d) * 2), acc[j]);
                }
            }
            for (int j = 0; j < n; j++) {
                const int h0 = 2 * (j0 + j);
                w[(size_t)h0 * Sp + s] = hsum8_avx2(_mm512_castps512_ps256(acc[j])) * a->scale;
                if (h0 + 1 < group) w[(size_t)(h0 + 1) * Sp + s] = hsum8_avx2(_mm512_extractf32x8_ps(acc[j], 1)) * a->scale;
            }
        }
    }
    const int64_t s0 = first & ~(int64_t)7, full = s0 + (qpos + 1 - s0) / 8 * 8; /* whole blocks of 8 keys */
    for (int j = 0; j < group; j++) {
        float *wj = w + (size_t)j * Sp, *pj = p + (size_t)j * Sp;
        probs_avx2(wj, pj, Sp, S, qpos, window);
        float *o = a->out + ((size_t)t * a->nh + (size_t)kvh * group + j) * hd;
        for (int d = 0; d < hd; d += 16) {
            __m512 L[8];
            for (int l = 0; l < 8; l++) L[l] = _mm512_setzero_ps();
            int64_t s = s0;
            for (; s < full; s += 8) {
                for (int l = 0; l < 8; l++) {
                    const __m512 vv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(vh + (size_t)(s + l) * hd + d)));
                    L[l] = _mm512_fmadd_ps(_mm512_set1_ps(pj[s + l]), vv, L[l]);
                }
            }
            for (int l = 0; s + l <= qpos; l++) {
                const __m512 vv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(vh + (size_t)(s + l) * hd + d)));
                L[l] = _mm512_fmadd_ps(_mm512_set1_ps(pj[s + l]), vv, L[l]);
            }
            const __m512 r0 = _mm512_add_ps(L[4], L[0]), r1 = _mm512_add_ps(L[5], L[1]);
            const __m512 r2 = _mm512_add_ps(L[6], L[2]), r3 = _mm512_add_ps(L[7], L[3]);
            _mm512_storeu_ps(o + d, _mm512_add_ps(_mm512_add_ps(r0, r2), _mm512_add_ps(r1, r3)));
        }
    }
}
#endif

/* Attention units [u0, u1) of `a` (see attn_args); work: ops_attn_work_floats(a) floats. */
static void ops_attention(const attn_args *a, int64_t u0, int64_t u1, float *work) {
    for (int64_t u = u0; u < u1; u++) {
#if OPS_X86
        if (ops_attn_grouped(a)) {
            if (ops_have_avx512) {
                attend_group_avx512(a, u / a->nkv, (int)(u % a->nkv), work);
            } else {
                attend_group_avx2(a, u / a->nkv, (int)(u % a->nkv), work);
            }
            continue;
        }
        if (ops_have_avx2 && a->hd % 32 == 0) {
            attend_avx2(a, u / a->nh, (int)(u % a->nh), work);
            continue;
        }
#endif
        attend_generic(a, u / a->nh, (int)(u % a->nh), work);
    }
}

#endif /* ELDRIC_GGML_ATTN_H */
