/* The small operations of a transformer layer with the exact arithmetic of ggml's x86 CPU backend.
 *
 * The matmuls are in _qkernels.c. What is here is everything between them whose last bits ggml computes in a
 * particular way, so that a stage gives llama.cpp's numbers bit for bit:
 *
 *   rope       theta = p * theta_scale^i built by repeated float products, cosf/sinf from libm, and the
 *              rotation as the compiler contracts ggml's `x0*c - x1*s` on an FMA machine: fma(x0, c, -(x1*s)).
 *   attention  scores = K . f16(q) (K is the f16 cache), softmax with ggml's vectorised expf polynomial and its
 *              summation order, out = V^T . f16(p). Dot products follow ggml's summation order: one 8-lane
 *              accumulator (llamafile's tinyBLAS, used by llama.cpp for several query rows) or four 8-lane
 *              accumulators (ggml_vec_dot_f16, used for one query row).
 *   swiglu     silu(g) * u with the same expf polynomial.
 *   rms_norm   ggml_rms_norm then the weight: squares in float summed in double, mean rounded to float,
 *              scale = 1/sqrtf(mean + eps), y = (x * scale) * w.
 *   geglu      gelu(g) * u through ggml's table of GELU (tanh form) at every f16 input, computed as ggml's
 *              compiler evaluates 0.5x(1 + tanh(sqrt(2/pi) x (1 + 0.044715 x^2))) on an FMA machine.
 *
 * Every routine is written once as portable C with explicit fmaf() and compiled twice: with the x86 "fma"
 * target (fmaf becomes one instruction) and without (fmaf is libm's exact software fma), chosen at run time.
 * The file is built with -ffp-contract=off so the compiler adds no fused operations of its own.
 *
 * Python API (all buffers C-contiguous; float16 buffers are raw IEEE half bits):
 *   rope(x, pos, n_heads, head_dim, n_dims, base, freq_scale, neox)      x float32 [T, n_heads, head_dim], in place
 *   attention(q, k, v, out, n_heads, n_kv_heads, head_dim, pos0, ctx, scale, window, one_acc)
 *       q float32 [T, n_heads, head_dim]; k, v float16 [n_kv_heads, ctx, head_dim] (positions 0..pos0+T-1 set);
 *       out float32 [T, n_heads * head_dim]; window 0 = global, else keys with qpos - kpos >= window are hidden;
 *       one_acc selects the one-accumulator summation order (llama.cpp's batched path).
 *   swiglu(g, u, out)                                                      float32 [n] each
 *   geglu(g, u, out)                                                       float32 [n] each
 *   rms_norm(x, w, out, eps)                  x, out float32 [rows, n]; w float32 [n]
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define OPS_X86 1
#define TARGET_FMA __attribute__((target("fma")))
#else
#define OPS_X86 0
#endif

/* ---- fp16 -------------------------------------------------------------------------------------------------- */

static inline float h2f(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13);
    } else if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal: normalise */
            int e = -1;
            do { man <<= 1; e++; } while (!(man & 0x400u));
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ffu) << 13);
        }
    } else {
        bits = sign | ((exp + 112u) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* float -> nearest half (ties to even), then back to float: the value an f16 conversion keeps. */
static inline float round_f16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    const uint32_t sign = x & 0x80000000u, ax = x & 0x7fffffffu;
    uint16_t h;
    if (ax >= 0x7f800000u) {
        h = (uint16_t)((sign >> 16) | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0));
    } else if (ax >= 0x477ff000u) {
        h = (uint16_t)((sign >> 16) | 0x7c00u);
    } else if (ax < 0x38800000u) { /* result is subnormal or zero: round at 2^-24 */
        float a;
        memcpy(&a, &ax, 4);
        const float m = a * 16777216.0f; /* exact */
        h = (uint16_t)((sign >> 16) | (uint16_t)nearbyintf(m));
    } else {
        const uint32_t lsb = (ax >> 13) & 1u;
        const uint32_t r = ax + 0xfffu + lsb - 0x38000000u; /* rebias 127 -> 15, round half to even */
        h = (uint16_t)((sign >> 16) | (r >> 13));
    }
    return h2f(h);
}

static inline float bits_f(uint32_t b) { float f; memcpy(&f, &b, 4); return f; }
static inline uint32_t f_bits(float f) { uint32_t b; memcpy(&b, &f, 4); return b; }

/* ---- the routines, written once ---------------------------------------------------------------------------- */

/* ggml_v_expf's arithmetic for one lane (an expf polynomial after Arm's optimized-routines): about 1.5 ulp,
 * -inf -> 0. Each line is the lane-wise operation ggml performs, so the result is bit-identical. */
#define DEFINE_EXPF(NAME, ATTR)                                                                                  \
    ATTR static inline float NAME(float x) {                                                                     \
        const float r = 0x1.8p23f;                                                                               \
        const float z = fmaf(x, 0x1.715476p+0f, r);                                                              \
        const float n = z - r;                                                                                   \
        const float b = fmaf(-n, 0x1.7f7d1cp-20f, fmaf(-n, 0x1.62e4p-1f, x));                                    \
        const uint32_t e = f_bits(z) << 23;                                                                      \
        const float k = bits_f(e + f_bits(1.0f));                                                                \
        const int c = fabsf(n) > 126.0f;                                                                         \
        const float u = b * b;                                                                                   \
        const float j = fmaf(fmaf(fmaf(0x1.0e4020p-7f, b, 0x1.573e2ep-5f), u, fmaf(0x1.555e66p-3f, b, 0x1.fffdb6p-2f)), \
                             u, 0x1.ffffecp-1f * b);                                                             \
        if (!c) return fmaf(k, j, k);                                                                            \
        const uint32_t g = n <= 0.0f ? 0x82000000u : 0u;                                                         \
        const float s1 = bits_f(g + 0x7f000000u);                                                                \
        const float s2 = bits_f(e - g);                                                                          \
        if (fabsf(n) > 192.0f) return s1 * s1;                                                                   \
        return fmaf(s2, j, s2) * s1;                                                                             \
    }

/* ggml's horizontal sum of 8 lanes (hsum_float_8): (hi4 + lo4), then lanes 0+2 and 1+3, then those two. */
static inline float hsum8(const float *a) {
    const float r0 = a[4] + a[0], r1 = a[5] + a[1], r2 = a[6] + a[2], r3 = a[7] + a[3];
    return (r0 + r2) + (r1 + r3);
}

/* GGML_F32x8_REDUCE of four 8-lane accumulators: (a0 + a2) + (a1 + a3), then lo4 + hi4, then two hadds. */
static inline float reduce4x8(float acc[4][8]) {
    float x[8], t[4];
    for (int l = 0; l < 8; l++) x[l] = (acc[0][l] + acc[2][l]) + (acc[1][l] + acc[3][l]);
    for (int l = 0; l < 4; l++) t[l] = x[l] + x[l + 4];
    return (t[0] + t[1]) + (t[2] + t[3]);
}

#define DEFINE_ROUTINES(SUFFIX, ATTR)                                                                            \
    DEFINE_EXPF(expf_ggml_##SUFFIX, ATTR)                                                                        \
                                                                                                                 \
    ATTR static void rope_##SUFFIX(float *x, const int64_t *pos, int64_t T, int nh, int hd, int n_dims,          \
                                   float base, float freq_scale, int neox) {                                     \
        const float theta_scale = powf(base, -2.0f / (float)n_dims);                                             \
        float *cs = malloc(sizeof(float) * (size_t)n_dims);                                                      \
        if (!cs) return;                                                                                         \
        for (int64_t t = 0; t < T; t++) {                                                                        \
            float theta = (float)pos[t];                                                                         \
            for (int i = 0; i < n_dims; i += 2) {                                                                \
                const float th = freq_scale * theta;                                                             \
                cs[i] = cosf(th);                                                                                \
                cs[i + 1] = sinf(th);                                                                            \
                theta *= theta_scale;                                                                            \
            }                                                                                                    \
            for (int h = 0; h < nh; h++) {                                                                       \
                float *v = x + ((size_t)t * nh + h) * hd;                                                        \
                const int off = neox ? n_dims / 2 : 1;                                                           \
                for (int i = 0; i < n_dims; i += 2) {                                                            \
                    float *p = neox ? v + i / 2 : v + i;                                                         \
                    const float x0 = p[0], x1 = p[off], c = cs[i], s = cs[i + 1];                                \
                    p[0] = fmaf(x0, c, -(x1 * s));                                                               \
                    p[off] = fmaf(x0, s, x1 * c);                                                                \
                }                                                                                                \
            }                                                                                                    \
        }                                                                                                        \
        free(cs);                                                                                                \
    }                                                                                                            \
                                                                                                                 \
    /* Softmax of one row of scores w (hidden keys set to -inf here) into p, rounded to f16 for V^T . p. */     \
    ATTR static void probs_##SUFFIX(float *w, float *p, int64_t Sp, int64_t S, int64_t qpos, int64_t window) {   \
        float max = -INFINITY;                                                                                   \
        for (int64_t s = 0; s < Sp; s++) {                                                                       \
            if (s > qpos || s >= S || (window > 0 && qpos - s >= window)) w[s] = -INFINITY;                      \
            if (w[s] > max) max = w[s];                                                                          \
        }                                                                                                        \
        /* ggml_vec_soft_max_f32: exp in blocks of 8, each block summed in float, the blocks in double */        \
        double sum = 0.0;                                                                                        \
        for (int64_t s = 0; s < Sp; s += 8) {                                                                    \
            for (int l = 0; l < 8; l++) p[s + l] = expf_ggml_##SUFFIX(w[s + l] - max);                           \
            sum += (double)hsum8(p + s);                                                                         \
        }                                                                                                        \
        const float inv = (float)(1.0 / sum);                                                                    \
        for (int64_t s = 0; s < Sp; s++) p[s] = round_f16(p[s] * inv);                                          \
    }                                                                                                            \
                                                                                                                 \
    /* ggml_vec_swiglu_f32: blocks of 8 with the polynomial expf, the tail with libm's expf. */                  \
    ATTR static void swiglu_##SUFFIX(const float *g, const float *u, float *y, int64_t n) {                     \
        const int64_t nb = n - n % 8;                                                                            \
        for (int64_t i = 0; i < nb; i++) y[i] = g[i] / (1.0f + expf_ggml_##SUFFIX(0.0f - g[i])) * u[i];          \
        for (int64_t i = nb; i < n; i++) y[i] = g[i] / (1.0f + expf(-g[i])) * u[i];                              \
    }

#if OPS_X86
DEFINE_ROUTINES(fma, TARGET_FMA)
#endif
DEFINE_ROUTINES(generic, )

/* dot(a, b) over n floats in one of ggml's two orders; n is padded by the caller to 8 (one_acc) or 32. */
static float dot_generic(const float *a, const float *b, int n, int one_acc) {
    if (one_acc) {
        float acc[8] = {0};
        for (int i = 0; i < n; i += 8)
            for (int l = 0; l < 8; l++) acc[l] = fmaf(a[i + l], b[i + l], acc[l]);
        return hsum8(acc);
    }
    float acc[4][8] = {{0}};
    for (int i = 0; i < n; i += 32)
        for (int j = 0; j < 4; j++)
            for (int l = 0; l < 8; l++) acc[j][l] = fmaf(a[i + 8 * j + l], b[i + 8 * j + l], acc[j][l]);
    return reduce4x8(acc);
}

/* Lane reductions of the weighted value sums (see attention_*): lane arrays L[nl][hd] -> out[hd]. */
static void reduce_lanes(float *const *L, int nl, int hd, float *out) {
    for (int d = 0; d < hd; d++) {
        float a[8];
        if (nl == 8) {
            for (int l = 0; l < 8; l++) a[l] = L[l][d];
            out[d] = hsum8(a);
        } else {
            float acc[4][8];
            for (int j = 0; j < 4; j++)
                for (int l = 0; l < 8; l++) acc[j][l] = L[8 * j + l][d];
            out[d] = reduce4x8(acc);
        }
    }
}

/* Attention for T query rows with ggml's arithmetic. ggml computes V^T . p: output element d is a dot product
 * over key positions s, whose 8 (or 4x8) float lanes take s mod 8 (or s mod 32). Here the same lanes are kept as
 * arrays over d, L[s mod nl][d] += p[s] * V[s][d], which is the same sequence of fused multiply-adds per lane.
 * Keys with p = 0 (masked, or beyond the sequence) are skipped: adding 0 * v leaves a lane unchanged.
 * work: 2 * Sp + (nl + 1) * hd floats. */
static void attention_generic(const float *q, const uint16_t *k, const uint16_t *v, float *out, int64_t T, int nh,
                              int nkv, int hd, int64_t pos0, int64_t ctx, float scale, int64_t window, int one_acc,
                              float *work) {
    const int64_t S = pos0 + T, Sp = (S + 31) / 32 * 32;
    const int nl = one_acc ? 8 : 32, group = nh / nkv;
    float *w = work, *p = w + Sp, *qv = p + Sp, *lanes = qv + hd;
    float *L[32];
    for (int l = 0; l < nl; l++) L[l] = lanes + (size_t)l * hd;
    float *kr = malloc(sizeof(float) * (size_t)hd);
    if (!kr) return;
    for (int64_t t = 0; t < T; t++) {
        for (int h = 0; h < nh; h++) {
            const uint16_t *kh = k + (size_t)(h / group) * ctx * hd, *vh = v + (size_t)(h / group) * ctx * hd;
            const float *qr = q + ((size_t)t * nh + h) * hd;
            for (int d = 0; d < hd; d++) qv[d] = round_f16(qr[d]);
            for (int64_t s = 0; s < Sp; s++) {
                w[s] = 0.0f;
                if (s >= S) continue;
                for (int d = 0; d < hd; d++) kr[d] = h2f(kh[(size_t)s * hd + d]);
                w[s] = dot_generic(kr, qv, hd, one_acc) * scale;
            }
            probs_generic(w, p, Sp, S, pos0 + t, window);
            memset(lanes, 0, sizeof(float) * (size_t)nl * hd);
            for (int64_t s = 0; s < S; s++) {
                if (p[s] == 0.0f) continue;
                float *acc = L[s % nl];
                for (int d = 0; d < hd; d++) acc[d] = fmaf(p[s], h2f(vh[(size_t)s * hd + d]), acc[d]);
            }
            reduce_lanes(L, nl, hd, out + ((size_t)t * nh + h) * hd);
        }
    }
    free(kr);
}

#if OPS_X86
#define TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#include <immintrin.h>

TARGET_AVX2 static inline float hsum8_avx2(__m256 x) {
    __m128 r = _mm_add_ps(_mm256_extractf128_ps(x, 1), _mm256_castps256_ps128(x));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    return _mm_cvtss_f32(r);
}

/* K row (f16) . q (f32 holding f16 values), hd % 32 == 0, in ggml's order. */
TARGET_AVX2 static inline float kdot_avx2(const uint16_t *kr, const float *qv, int hd, int one_acc) {
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

/* The same computation as attention_generic, eight output elements at a time. Needs hd % 32 == 0. */
TARGET_AVX2 static void attention_avx2(const float *q, const uint16_t *k, const uint16_t *v, float *out, int64_t T,
                                       int nh, int nkv, int hd, int64_t pos0, int64_t ctx, float scale,
                                       int64_t window, int one_acc, float *work) {
    const int64_t S = pos0 + T, Sp = (S + 31) / 32 * 32;
    const int nl = one_acc ? 8 : 32, group = nh / nkv;
    float *w = work, *p = w + Sp, *qv = p + Sp, *lanes = qv + hd;
    for (int64_t t = 0; t < T; t++) {
        const int64_t qpos = pos0 + t;
        const int64_t first = window > 0 && qpos - window + 1 > 0 ? qpos - window + 1 : 0;
        for (int h = 0; h < nh; h++) {
            const uint16_t *kh = k + (size_t)(h / group) * ctx * hd, *vh = v + (size_t)(h / group) * ctx * hd;
            const float *qr = q + ((size_t)t * nh + h) * hd;
            for (int d = 0; d < hd; d++) qv[d] = round_f16(qr[d]);
            for (int64_t s = 0; s < Sp; s++)
                w[s] = s >= first && s <= qpos ? kdot_avx2(kh + (size_t)s * hd, qv, hd, one_acc) * scale : 0.0f;
            probs_fma(w, p, Sp, S, qpos, window);
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
            float *o = out + ((size_t)t * nh + h) * hd;
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
    }
}
#endif

static int have_avx2 = 0;

static int have_fma(void) {
#if OPS_X86
    __builtin_cpu_init();
    return __builtin_cpu_supports("fma");
#else
    return 0;
#endif
}

static int use_fma = -1;

/* ---- GELU table --------------------------------------------------------------------------------------------- */

static uint16_t gelu_table[1 << 16]; /* f16 input bits -> f16 bits of gelu */

static uint16_t f2h_bits(float f) {
    const float r = round_f16(f); /* exact in half: convert by taking the bits apart */
    uint32_t x = f_bits(r);
    const uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) return (uint16_t)(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0));
    if (ax < 0x38800000u) return (uint16_t)(sign | (uint16_t)(bits_f(ax) * 16777216.0f));
    return (uint16_t)(sign | ((ax - 0x38000000u) >> 13));
}

static void build_gelu_table(void) {
    for (uint32_t i = 0; i < (1u << 16); i++) {
        const float x = h2f((uint16_t)i);
        const float inner = fmaf(0.044715f * x, x, 1.0f);
        const float t = tanhf(0.79788456080286535587989211986876f * x * inner);
        gelu_table[i] = f2h_bits(0.5f * x * (1.0f + t));
    }
}

static void geglu(const float *g, const float *u, float *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        const float x = g[i];
        if (x <= -10.0f) y[i] = 0.0f;
        else if (x >= 10.0f) y[i] = x * u[i];
        else y[i] = h2f(gelu_table[f2h_bits(x)]) * u[i];
    }
}

/* ---- Python bindings --------------------------------------------------------------------------------------- */

static int get_buffer(PyObject *o, Py_buffer *b, int writable, Py_ssize_t need, const char *what) {
    if (PyObject_GetBuffer(o, b, (writable ? PyBUF_WRITABLE : 0) | PyBUF_C_CONTIGUOUS) < 0) return -1;
    if (b->len != need) {
        PyErr_Format(PyExc_ValueError, "%s has %zd bytes, expected %zd", what, b->len, need);
        PyBuffer_Release(b);
        return -1;
    }
    return 0;
}

static PyObject *py_rope(PyObject *self, PyObject *args) {
    PyObject *ox, *opos;
    int nh, hd, n_dims, neox;
    float base, freq_scale;
    if (!PyArg_ParseTuple(args, "OOiiiffp", &ox, &opos, &nh, &hd, &n_dims, &base, &freq_scale, &neox)) return NULL;
    if (nh <= 0 || hd <= 0 || n_dims <= 0 || n_dims > hd || n_dims % 2) {
        PyErr_SetString(PyExc_ValueError, "rope: bad head or rotary dimensions");
        return NULL;
    }
    Py_buffer bpos, bx;
    if (PyObject_GetBuffer(opos, &bpos, PyBUF_C_CONTIGUOUS) < 0) return NULL;
    const int64_t T = bpos.len / 8;
    if (get_buffer(ox, &bx, 1, (Py_ssize_t)(T * nh * hd * 4), "rope: x") < 0) {
        PyBuffer_Release(&bpos);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
#if OPS_X86
    if (use_fma) rope_fma(bx.buf, bpos.buf, T, nh, hd, n_dims, base, freq_scale, neox);
    else
#endif
        rope_generic(bx.buf, bpos.buf, T, nh, hd, n_dims, base, freq_scale, neox);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&bx);
    PyBuffer_Release(&bpos);
    Py_RETURN_NONE;
}

static PyObject *py_attention(PyObject *self, PyObject *args) {
    PyObject *oq, *ok, *ov, *oout;
    int nh, nkv, hd, one_acc;
    long long pos0, ctx, window;
    float scale;
    if (!PyArg_ParseTuple(args, "OOOOiiiLLfLp", &oq, &ok, &ov, &oout, &nh, &nkv, &hd, &pos0, &ctx, &scale,
                          &window, &one_acc))
        return NULL;
    if (nh <= 0 || nkv <= 0 || nh % nkv || hd <= 0 || hd % 32 || pos0 < 0 || ctx <= 0) {
        PyErr_SetString(PyExc_ValueError,
                        "attention: bad head counts, head size (a multiple of 32), position or context");
        return NULL;
    }
    Py_buffer bq, bk, bv, bo;
    if (PyObject_GetBuffer(oq, &bq, PyBUF_C_CONTIGUOUS) < 0) return NULL;
    const int64_t T = bq.len / ((Py_ssize_t)nh * hd * 4);
    if (T <= 0 || bq.len != (Py_ssize_t)(T * nh * hd * 4) || pos0 + T > ctx) {
        PyErr_SetString(PyExc_ValueError, "attention: q does not fit the context");
        PyBuffer_Release(&bq);
        return NULL;
    }
    const Py_ssize_t kv_bytes = (Py_ssize_t)nkv * ctx * hd * 2;
    if (get_buffer(ok, &bk, 0, kv_bytes, "attention: k") < 0) goto fail_q;
    if (get_buffer(ov, &bv, 0, kv_bytes, "attention: v") < 0) goto fail_k;
    if (get_buffer(oout, &bo, 1, (Py_ssize_t)(T * nh * hd * 4), "attention: out") < 0) goto fail_v;
    const int64_t Sp = pos0 + T + 32;
    float *work = malloc(sizeof(float) * (size_t)(2 * Sp + 33 * (int64_t)hd));
    if (!work) {
        PyErr_NoMemory();
        goto fail_o;
    }
    Py_BEGIN_ALLOW_THREADS
#if OPS_X86
    if (have_avx2 && hd % 32 == 0)
        attention_avx2(bq.buf, bk.buf, bv.buf, bo.buf, T, nh, nkv, hd, pos0, ctx, scale, window, one_acc, work);
    else
#endif
        attention_generic(bq.buf, bk.buf, bv.buf, bo.buf, T, nh, nkv, hd, pos0, ctx, scale, window, one_acc, work);
    Py_END_ALLOW_THREADS
    free(work);
    PyBuffer_Release(&bo);
    PyBuffer_Release(&bv);
    PyBuffer_Release(&bk);
    PyBuffer_Release(&bq);
    Py_RETURN_NONE;
fail_o:
    PyBuffer_Release(&bo);
fail_v:
    PyBuffer_Release(&bv);
fail_k:
    PyBuffer_Release(&bk);
fail_q:
    PyBuffer_Release(&bq);
    return NULL;
}

typedef void (*gated_fn)(const float *g, const float *u, float *y, int64_t n);

static void swiglu(const float *g, const float *u, float *y, int64_t n) {
#if OPS_X86
    if (use_fma) {
        swiglu_fma(g, u, y, n);
        return;
    }
#endif
    swiglu_generic(g, u, y, n);
}

/* name(g, u, out): out = act(g) * u over equal-sized float32 buffers. */
static PyObject *gated_call(PyObject *args, const char *name, gated_fn fn) {
    PyObject *og, *ou, *oy;
    if (!PyArg_ParseTuple(args, "OOO", &og, &ou, &oy)) return NULL;
    Py_buffer bg, bu, by;
    if (PyObject_GetBuffer(og, &bg, PyBUF_C_CONTIGUOUS) < 0) return NULL;
    if (get_buffer(ou, &bu, 0, bg.len, name) < 0) {
        PyBuffer_Release(&bg);
        return NULL;
    }
    if (get_buffer(oy, &by, 1, bg.len, name) < 0) {
        PyBuffer_Release(&bu);
        PyBuffer_Release(&bg);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    fn(bg.buf, bu.buf, by.buf, bg.len / 4);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&by);
    PyBuffer_Release(&bu);
    PyBuffer_Release(&bg);
    Py_RETURN_NONE;
}

static PyObject *py_swiglu(PyObject *self, PyObject *args) { return gated_call(args, "swiglu: u/out", swiglu); }

static PyObject *py_geglu(PyObject *self, PyObject *args) { return gated_call(args, "geglu: u/out", geglu); }

static void rms_norm(const float *x, const float *w, float *y, int64_t rows, int64_t n, float eps) {
    for (int64_t r = 0; r < rows; r++, x += n, y += n) {
        double sum = 0.0;
        for (int64_t i = 0; i < n; i++) sum += (double)(x[i] * x[i]);
        const float mean = (float)(sum / (double)n);
        const float scale = 1.0f / sqrtf(mean + eps);
        for (int64_t i = 0; i < n; i++) y[i] = (x[i] * scale) * w[i];
    }
}

static PyObject *py_rms_norm(PyObject *self, PyObject *args) {
    PyObject *ox, *ow, *oy;
    float eps;
    if (!PyArg_ParseTuple(args, "OOOf", &ox, &ow, &oy, &eps)) return NULL;
    Py_buffer bx, bw, by;
    if (PyObject_GetBuffer(ow, &bw, PyBUF_C_CONTIGUOUS) < 0) return NULL;
    const int64_t n = bw.len / 4;
    if (n <= 0 || PyObject_GetBuffer(ox, &bx, PyBUF_C_CONTIGUOUS) < 0) {
        if (n <= 0) PyErr_SetString(PyExc_ValueError, "rms_norm: empty weight");
        PyBuffer_Release(&bw);
        return NULL;
    }
    if (bx.len % (n * 4) || get_buffer(oy, &by, 1, bx.len, "rms_norm: out") < 0) {
        if (bx.len % (n * 4)) PyErr_SetString(PyExc_ValueError, "rms_norm: x is not [rows, len(w)]");
        PyBuffer_Release(&bx);
        PyBuffer_Release(&bw);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    rms_norm(bx.buf, bw.buf, by.buf, bx.len / (n * 4), n, eps);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&by);
    PyBuffer_Release(&bx);
    PyBuffer_Release(&bw);
    Py_RETURN_NONE;
}

/* set_simd(enabled) -> bool: use the FMA/AVX2 versions where the CPU has them (default), or the portable ones
 * (for tests: both must give the same bits). Returns whether the vector versions are now in use. */
static PyObject *py_set_simd(PyObject *self, PyObject *arg) {
    const int on = PyObject_IsTrue(arg);
    if (on < 0) return NULL;
    use_fma = on && have_fma();
#if OPS_X86
    have_avx2 = use_fma && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
#endif
    return PyBool_FromLong(use_fma);
}

static PyMethodDef methods[] = {
    {"set_simd", py_set_simd, METH_O, "Use the FMA/AVX2 versions (True, default where available) or portable C."},
    {"rms_norm", py_rms_norm, METH_VARARGS, "RMS norm times a weight, ggml's arithmetic."},
    {"geglu", py_geglu, METH_VARARGS, "gelu(g) * u through ggml's f16 GELU table."},
    {"rope", py_rope, METH_VARARGS, "Rotary embedding in place, ggml's arithmetic."},
    {"attention", py_attention, METH_VARARGS, "Causal attention over an f16 KV cache, ggml's arithmetic."},
    {"swiglu", py_swiglu, METH_VARARGS, "silu(g) * u, ggml's arithmetic."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_ggmlops", "Layer operations with ggml's CPU arithmetic.", -1, methods,
};

PyMODINIT_FUNC PyInit__ggmlops(void) {
    use_fma = have_fma();
#if OPS_X86
    have_avx2 = use_fma && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
#endif
    build_gelu_table();
    return PyModule_Create(&module);
}
