/* The small operations of a transformer layer with the exact arithmetic of ggml's x86 CPU backend.
 *
 * Included by _ggmlops.c (the Python API of each operation) and by _qkernels.c (the fused layer, qk_layer.h).
 * The matmuls are in the qk_*.h headers. What is here is everything between them whose last bits ggml computes
 * in a particular way, so that a stage gives llama.cpp's numbers bit for bit:
 *
 *   rope       theta = p * theta_scale^i built by repeated float products, cosf/sinf from libm, and the
 *              rotation as the compiler contracts ggml's `x0*c - x1*s` on an FMA machine: fma(x0, c, -(x1*s)).
 *   attention  (ggml_attn.h) scores = K . f16(q) (K is the f16 cache), softmax with ggml's vectorised expf
 *              polynomial and its summation order, out = V^T . f16(p). Dot products follow ggml's summation
 *              order: one 8-lane accumulator (llamafile's tinyBLAS, used by llama.cpp for several query rows) or
 *              four 8-lane accumulators (ggml_vec_dot_f16, used for one query row).
 *   swiglu     silu(g) * u with the same expf polynomial.
 *   rms_norm   ggml_rms_norm then the weight: squares in float summed in double, mean rounded to float,
 *              scale = 1/sqrtf(mean + eps), y = (x * scale) * w.
 *   geglu      gelu(g) * u through ggml's table of GELU (tanh form) at every f16 input, computed as ggml's
 *              compiler evaluates 0.5x(1 + tanh(sqrt(2/pi) x (1 + 0.044715 x^2))) on an FMA machine.
 *
 * Every routine is written once as portable C with explicit fmaf() and compiled twice: with the x86 "fma"
 * target (fmaf becomes one instruction) and without (fmaf is libm's exact software fma); the hot ones also have
 * AVX2 (and for attention AVX-512) versions doing the same operations lane for lane; ops_set_simd chooses at run
 * time. Files including this are built with -ffp-contract=off so the compiler adds no fused operations of its
 * own. Call ops_init() once before anything else.
 */

#ifndef ELDRIC_GGML_OPS_H
#define ELDRIC_GGML_OPS_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define OPS_X86 1
#define OPS_TARGET_FMA __attribute__((target("fma")))
#define OPS_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define OPS_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma,f16c")))
#include <immintrin.h>
#else
#define OPS_X86 0
#endif

static int ops_use_fma = 0, ops_have_avx2 = 0, ops_have_avx512 = 0; /* set by ops_set_simd */

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
static inline float ops_hsum8(const float *a) {
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

/* RoPE's table for positions pos[T]: cs[t * n_dims + i] = cos(theta_i), cs[t * n_dims + i + 1] = sin(theta_i),
 * theta_i = freq_scale * p * theta_scale^(i/2) built by repeated float products as ggml builds it. The same for
 * every head of q and k at these positions, and for every layer with this base. */
static void rope_table(const int64_t *pos, int64_t T, int n_dims, float base, float freq_scale, float *cs) {
    const float theta_scale = powf(base, -2.0f / (float)n_dims);
    for (int64_t t = 0; t < T; t++, cs += n_dims) {
        float theta = (float)pos[t];
        for (int i = 0; i < n_dims; i += 2) {
            const float th = freq_scale * theta;
            cs[i] = cosf(th);
            cs[i + 1] = sinf(th);
            theta *= theta_scale;
        }
    }
}

#define DEFINE_ROUTINES(SUFFIX, ATTR)                                                                            \
    DEFINE_EXPF(expf_ggml_##SUFFIX, ATTR)                                                                        \
                                                                                                                 \
    /* x [T, nh, hd] rotated with the table cs [T, n_dims] of rope_table. */                                    \
    ATTR static void rope_##SUFFIX(float *x, const float *cs, int64_t T, int nh, int hd, int n_dims, int neox) {  \
        for (int64_t t = 0; t < T; t++, cs += n_dims) {                                                          \
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
    }                                                                                                            \
                                                                                                                 \
    /* Softmax of one row of scores w (hidden keys set to -inf here) into p, rounded to f16 for V^T . p. */     \
    ATTR __attribute__((unused)) static void probs_##SUFFIX(float *w, float *p, int64_t Sp, int64_t S, int64_t qpos,  \
                                                            int64_t window) {                                    \
        float max = -INFINITY;                                                                                   \
        for (int64_t s = 0; s < Sp; s++) {                                                                       \
            if (s > qpos || s >= S || (window > 0 && qpos - s >= window)) w[s] = -INFINITY;                      \
            if (w[s] > max) max = w[s];                                                                          \
        }                                                                                                        \
        /* ggml_vec_soft_max_f32: exp in blocks of 8, each block summed in float, the blocks in double */        \
        double sum = 0.0;                                                                                        \
        for (int64_t s = 0; s < Sp; s += 8) {                                                                    \
            for (int l = 0; l < 8; l++) p[s + l] = expf_ggml_##SUFFIX(w[s + l] - max);                           \
            sum += (double)ops_hsum8(p + s);                                                                         \
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
DEFINE_ROUTINES(fma, OPS_TARGET_FMA)
#endif
DEFINE_ROUTINES(generic, )

#if OPS_X86
OPS_TARGET_AVX2 static inline float hsum8_avx2(__m256 x) {
    __m128 r = _mm_add_ps(_mm256_extractf128_ps(x, 1), _mm256_castps256_ps128(x));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    return _mm_cvtss_f32(r);
}

/* ggml_v_expf (ggml-cpu/vec.h, its AVX2 version) on 8 lanes: the lane operations expf_ggml_* spells out. */
OPS_TARGET_AVX2 static inline __m256 expf_avx2(__m256 x) {
    const __m256 r = _mm256_set1_ps(0x1.8p23f);
    const __m256 z = _mm256_fmadd_ps(x, _mm256_set1_ps(0x1.715476p+0f), r);
    const __m256 n = _mm256_sub_ps(z, r);
    const __m256 b = _mm256_fnmadd_ps(n, _mm256_set1_ps(0x1.7f7d1cp-20f),
                                      _mm256_fnmadd_ps(n, _mm256_set1_ps(0x1.62e4p-1f), x));
    const __m256i e = _mm256_slli_epi32(_mm256_castps_si256(z), 23);
    const __m256 k = _mm256_castsi256_ps(_mm256_add_epi32(e, _mm256_castps_si256(_mm256_set1_ps(1))));
    const __m256 an = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), n);
    const __m256 c = _mm256_cmp_ps(an, _mm256_set1_ps(126), _CMP_GT_OQ);
    const __m256 u = _mm256_mul_ps(b, b);
    const __m256 j = _mm256_fmadd_ps(
        _mm256_fmadd_ps(_mm256_fmadd_ps(_mm256_set1_ps(0x1.0e4020p-7f), b, _mm256_set1_ps(0x1.573e2ep-5f)), u,
                        _mm256_fmadd_ps(_mm256_set1_ps(0x1.555e66p-3f), b, _mm256_set1_ps(0x1.fffdb6p-2f))),
        u, _mm256_mul_ps(_mm256_set1_ps(0x1.ffffecp-1f), b));
    if (!_mm256_movemask_ps(c)) return _mm256_fmadd_ps(j, k, k);
    const __m256i g = _mm256_and_si256(_mm256_castps_si256(_mm256_cmp_ps(n, _mm256_setzero_ps(), _CMP_LE_OQ)),
                                       _mm256_set1_epi32((int)0x82000000u));
    const __m256 s1 = _mm256_castsi256_ps(_mm256_add_epi32(g, _mm256_set1_epi32(0x7f000000)));
    const __m256 s2 = _mm256_castsi256_ps(_mm256_sub_epi32(e, g));
    const __m256 d = _mm256_cmp_ps(an, _mm256_set1_ps(192), _CMP_GT_OQ);
    return _mm256_or_ps(_mm256_and_ps(d, _mm256_mul_ps(s1, s1)),
                        _mm256_andnot_ps(d, _mm256_or_ps(_mm256_and_ps(c, _mm256_mul_ps(_mm256_fmadd_ps(s2, j, s2), s1)),
                                                         _mm256_andnot_ps(c, _mm256_fmadd_ps(k, j, k)))));
}

/* round_f16 on 8 lanes: to the nearest half (ties to even), back to float. */
OPS_TARGET_AVX2 static inline __m256 round_f16_avx2(__m256 x) {
    return _mm256_cvtph_ps(_mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
}

/* probs_fma with the exponentials and the final rounding 8 lanes at a time (Sp % 8 == 0). */
OPS_TARGET_AVX2 static void probs_avx2(float *w, float *p, int64_t Sp, int64_t S, int64_t qpos, int64_t window) {
    float max = -INFINITY;
    for (int64_t s = 0; s < Sp; s++) {
        if (s > qpos || s >= S || (window > 0 && qpos - s >= window)) w[s] = -INFINITY;
        if (w[s] > max) max = w[s];
    }
    const __m256 vmax = _mm256_set1_ps(max);
    double sum = 0.0;
    for (int64_t s = 0; s < Sp; s += 8) {
        const __m256 e = expf_avx2(_mm256_sub_ps(_mm256_loadu_ps(w + s), vmax));
        _mm256_storeu_ps(p + s, e);
        sum += (double)hsum8_avx2(e);
    }
    const __m256 inv = _mm256_set1_ps((float)(1.0 / sum));
    for (int64_t s = 0; s < Sp; s += 8) {
        _mm256_storeu_ps(p + s, round_f16_avx2(_mm256_mul_ps(_mm256_loadu_ps(p + s), inv)));
    }
}

#endif


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

/* gelu_table widened to float: what the AVX2 GEGLU gathers. */
static float gelu_table_f32[1 << 16];

static void build_gelu_table(void) {
    for (uint32_t i = 0; i < (1u << 16); i++) {
        const float x = h2f((uint16_t)i);
        const float inner = fmaf(0.044715f * x, x, 1.0f);
        const float t = tanhf(0.79788456080286535587989211986876f * x * inner);
        gelu_table[i] = f2h_bits(0.5f * x * (1.0f + t));
        gelu_table_f32[i] = h2f(gelu_table[i]);
    }
}

static void geglu_generic(const float *g, const float *u, float *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        const float x = g[i];
        if (x <= -10.0f) y[i] = 0.0f;
        else if (x >= 10.0f) y[i] = x * u[i];
        else y[i] = h2f(gelu_table[f2h_bits(x)]) * u[i];
    }
}

#if OPS_X86
/* geglu_generic 8 lanes at a time: the f16 rounding of the input by F16C (ties to even, as f2h_bits), the table
 * entry gathered already widened. */
OPS_TARGET_AVX2 static void geglu_avx2(const float *g, const float *u, float *y, int64_t n) {
    const int64_t nb = n - n % 8;
    for (int64_t i = 0; i < nb; i += 8) {
        const __m256 x = _mm256_loadu_ps(g + i), uv = _mm256_loadu_ps(u + i);
        const __m256i idx = _mm256_cvtepu16_epi32(_mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
        __m256 out = _mm256_mul_ps(_mm256_i32gather_ps(gelu_table_f32, idx, 4), uv);
        out = _mm256_blendv_ps(out, _mm256_mul_ps(x, uv), _mm256_cmp_ps(x, _mm256_set1_ps(10.0f), _CMP_GE_OQ));
        out = _mm256_blendv_ps(out, _mm256_setzero_ps(), _mm256_cmp_ps(x, _mm256_set1_ps(-10.0f), _CMP_LE_OQ));
        _mm256_storeu_ps(y + i, out);
    }
    geglu_generic(g + nb, u + nb, y + nb, n - nb);
}

/* swiglu_fma 8 lanes at a time (ggml_vec_swiglu_f32's AVX2 loop: x / (1 + v_expf(0 - x)) * u), the tail by
 * swiglu_fma (libm's expf, as ggml's tail). */
OPS_TARGET_AVX2 static void swiglu_avx2(const float *g, const float *u, float *y, int64_t n) {
    const int64_t nb = n - n % 8;
    for (int64_t i = 0; i < nb; i += 8) {
        const __m256 x = _mm256_loadu_ps(g + i);
        const __m256 e = expf_avx2(_mm256_sub_ps(_mm256_setzero_ps(), x));
        _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0f), e)),
                                              _mm256_loadu_ps(u + i)));
    }
    swiglu_fma(g + nb, u + nb, y + nb, n - nb);
}

/* The whole 8s of n floats to f16 bits (vcvtps2ph, ties to even); returns how many. */
OPS_TARGET_AVX2 static int64_t to_f16_avx2(const float *x, uint16_t *y, int64_t n) {
    const int64_t nb = n - n % 8;
    for (int64_t i = 0; i < nb; i += 8) {
        _mm_storeu_si128((__m128i *)(y + i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
    }
    return nb;
}
#endif

/* ggml's sum for rms_norm: each square rounded to float, then added to a double in order from 0.0, one long
 * chain of dependent additions per row. */
static inline double sumsq_row(const float *x, int64_t n) {
    double sum = 0.0;
    for (int64_t i = 0; i < n; i++) sum += (double)(x[i] * x[i]);
    return sum;
}

#if OPS_X86
/* The same sums for 4 x `groups` rows at once (groups 1 or 2, a constant where inlined): rows across the lanes of
 * 4-double accumulators, one per group of 4 rows, each lane adding its row's squares in the scalar order (a 4x4
 * transpose turns 4 columns of 4 rows into a column per vector), so every sum has the scalar bits while 4 x
 * groups chains run side by side instead of one. n % 4 == 0. */
__attribute__((always_inline)) OPS_TARGET_AVX2 static inline void sumsq_rows_avx2(const float *x, int64_t n,
                                                                                 double *out, const int groups) {
    __m256d acc[2] = {_mm256_setzero_pd(), _mm256_setzero_pd()};
    for (int64_t i = 0; i < n; i += 4) {
        __m128 c[2][4];
        for (int g = 0; g < groups; g++) {
            for (int r = 0; r < 4; r++) c[g][r] = _mm_loadu_ps(x + (4 * g + r) * n + i);
            _MM_TRANSPOSE4_PS(c[g][0], c[g][1], c[g][2], c[g][3]); /* c[g][j]: column i + j of the group's rows */
        }
        for (int j = 0; j < 4; j++)
            for (int g = 0; g < groups; g++) acc[g] = _mm256_add_pd(acc[g], _mm256_cvtps_pd(_mm_mul_ps(c[g][j], c[g][j])));
    }
    for (int g = 0; g < groups; g++) _mm256_storeu_pd(out + 4 * g, acc[g]);
}

OPS_TARGET_AVX2 static void sumsq_rows8_avx2(const float *x, int64_t n, double *out) { sumsq_rows_avx2(x, n, out, 2); }
OPS_TARGET_AVX2 static void sumsq_rows4_avx2(const float *x, int64_t n, double *out) { sumsq_rows_avx2(x, n, out, 1); }

/* y = (x * scale) * w, two rounded products per element as in the scalar loop. */
OPS_TARGET_AVX2 static void scale_mul_avx2(const float *x, float scale, const float *w, float *y, int64_t n) {
    const __m256 s = _mm256_set1_ps(scale);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), s), _mm256_loadu_ps(w + i)));
    }
    for (; i < n; i++) y[i] = (x[i] * scale) * w[i];
}
#endif

static void ops_rms_norm(const float *x, const float *w, float *y, int64_t rows, int64_t n, float eps) {
    double sums[8];
    for (int64_t r = 0; r < rows; r += 8, x += 8 * n, y += 8 * n) {
        const int64_t m = rows - r < 8 ? rows - r : 8;
        int64_t j = 0;
#if OPS_X86
        if (ops_have_avx2 && n % 4 == 0) {
            if (m == 8) {
                sumsq_rows8_avx2(x, n, sums);
                j = 8;
            } else if (m >= 4) {
                sumsq_rows4_avx2(x, n, sums);
                j = 4;
            }
        }
#endif
        for (; j < m; j++) sums[j] = sumsq_row(x + j * n, n);
        for (j = 0; j < m; j++) { /* x and y may be the same rows: each row is summed before it is written */
            const float mean = (float)(sums[j] / (double)n);
            const float scale = 1.0f / sqrtf(mean + eps);
#if OPS_X86
            if (ops_have_avx2) {
                scale_mul_avx2(x + j * n, scale, w, y + j * n, n);
                continue;
            }
#endif
            for (int64_t i = 0; i < n; i++) y[j * n + i] = (x[j * n + i] * scale) * w[i];
        }
    }
}

/* ---- dispatch: the FMA/AVX2 versions where the CPU has them, else the portable ones ---------------------- */

/* Use the vector versions up to `level` where the CPU has them: 0 the portable ones (for tests: all must give
 * the same bits), 1 FMA and AVX2 (with F16C), 2 AVX-512 (F, VL, DQ, BW) as well. Returns the level in use. */
static int ops_set_simd(int level) {
    ops_use_fma = ops_have_avx2 = ops_have_avx512 = 0;
#if OPS_X86
    __builtin_cpu_init();
    ops_use_fma = level >= 1 && __builtin_cpu_supports("fma");
    ops_have_avx2 = ops_use_fma && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
    ops_have_avx512 = level >= 2 && ops_have_avx2 && __builtin_cpu_supports("avx512f") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                      __builtin_cpu_supports("avx512bw");
#else
    (void)level;
#endif
    return ops_have_avx512 ? 2 : ops_use_fma ? 1 : 0;
}

static void ops_init(void) {
    ops_set_simd(2);
    build_gelu_table();
}

/* x float32 [T, nh, hd] rotated in place with a rope_table. */
static void ops_rope_rotate(float *x, const float *cs, int64_t T, int nh, int hd, int n_dims, int neox) {
#if OPS_X86
    if (ops_use_fma) {
        rope_fma(x, cs, T, nh, hd, n_dims, neox);
        return;
    }
#endif
    rope_generic(x, cs, T, nh, hd, n_dims, neox);
}

/* x float32 [T, nh, hd], rotated in place at positions pos[T]. Returns -1 when out of memory. */
static inline int ops_rope(float *x, const int64_t *pos, int64_t T, int nh, int hd, int n_dims, float base,
                           float freq_scale, int neox) {
    float *cs = malloc(sizeof(float) * (size_t)(T * n_dims));
    if (cs == NULL) return -1;
    rope_table(pos, T, n_dims, base, freq_scale, cs);
    ops_rope_rotate(x, cs, T, nh, hd, n_dims, neox);
    free(cs);
    return 0;
}

/* n floats to f16 bits, rounded to nearest even (F16C where there is AVX2: the same bits for every non-NaN). */
static inline void ops_to_f16(const float *x, uint16_t *y, int64_t n) {
    int64_t i = 0;
#if OPS_X86
    if (ops_have_avx2) i = to_f16_avx2(x, y, n);
#endif
    for (; i < n; i++) y[i] = f2h_bits(x[i]);
}

static void ops_swiglu(const float *g, const float *u, float *y, int64_t n) {
#if OPS_X86
    if (ops_have_avx2) {
        swiglu_avx2(g, u, y, n);
        return;
    }
    if (ops_use_fma) {
        swiglu_fma(g, u, y, n);
        return;
    }
#endif
    swiglu_generic(g, u, y, n);
}

static void ops_geglu(const float *g, const float *u, float *y, int64_t n) {
#if OPS_X86
    if (ops_have_avx2) {
        geglu_avx2(g, u, y, n);
        return;
    }
#endif
    geglu_generic(g, u, y, n);
}

#endif /* ELDRIC_GGML_OPS_H */
