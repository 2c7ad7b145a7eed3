/* Matrix-vector and matrix-matrix products computed directly on GGUF weight blocks.
 *
 * out[t, r] = dot(weight row r, activation row t), with ggml's CPU arithmetic: each activation row is first
 * quantized to ggml's "vec_dot type" of the weight (Q8_0 for Q4_0/Q5_0/Q8_0, Q8_1 for Q4_1/Q5_1, Q8_K for the
 * K-quants, F16 for F16, none for F32), exactly as llama.cpp's x86 build does it, and each
 * output is the block dot product of ggml's reference vec_dot: exact integer sums inside a block, scaled by the
 * product of the two fp16 (or, for Q8_K, fp32) block scales and summed over blocks in float32. Results equal
 * ggml's up to the order of the float32 block sums.
 *
 * Every kernel has a portable C version; on x86-64 with AVX2+FMA+F16C (checked at run time) the hot types use
 * hand-written AVX2 versions, compiled with function target attributes so the module needs no -march flag.
 *
 * Python API: qmatmul(x, w, out, ggml_type, in_features, out_features, n_threads) -> None
 *   x   buffer of float32 [T, in_features] (C-contiguous)
 *   w   buffer of the raw GGUF bytes [out_features, in_features / block * type_size]
 *   out writable buffer of float32 [T, out_features]
 * Raises ValueError for sizes that do not match, TypeError for a non-float32 x/out, NotImplementedError for an
 * unsupported type. The GIL is released during the computation.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <pthread.h>
#include <stdatomic.h>
#include <time.h>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define QK_X86 1
#include <immintrin.h>
#define TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#else
#define QK_X86 0
#endif

/* ggml type ids (gguf GGMLQuantizationType). */
enum {
    T_F32 = 0, T_F16 = 1, T_Q4_0 = 2, T_Q4_1 = 3, T_Q5_0 = 6, T_Q5_1 = 7, T_Q8_0 = 8,
    T_Q2_K = 10, T_Q3_K = 11, T_Q4_K = 12, T_Q5_K = 13, T_Q6_K = 14,
};

#define QK 32     /* elements per block of the _0/_1 types */
#define QK_K 256  /* elements per super-block of the K types */

/* ------------------------------------------------------------------------------------------------------------
 * fp16 <-> fp32, bit-exact IEEE conversions (round to nearest even), as ggml's GGML_FP32_TO_FP16.
 */

static inline float f16_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    const uint32_t exp = (h >> 10) & 0x1fu;
    const uint32_t man = h & 0x3ffu;
    uint32_t bits;
    float f;
    if (exp == 0) {
        f = (float)man * 5.9604644775390625e-08f; /* man * 2^-24, exact */
        memcpy(&bits, &f, 4);
        bits |= sign;
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 112u) << 23) | (man << 13);
    }
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t f32_to_f16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    const uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    const uint32_t ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) return sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0u); /* inf, nan */
    if (ax >= 0x477ff000u) return sign | 0x7c00u;                                   /* rounds to inf */
    if (ax < 0x38800000u) {                                                           /* fp16 subnormal or 0 */
        const uint32_t s = 126u - (ax >> 23);                                         /* >= 14 */
        if (s > 24u) return sign;
        const uint32_t m = (ax & 0x7fffffu) | 0x800000u;
        uint32_t r = m >> s;
        const uint32_t rem = m & ((1u << s) - 1u), half = 1u << (s - 1u);
        if (rem > half || (rem == half && (r & 1u))) r++;
        return sign | (uint16_t)r;
    }
    uint32_t r = ((((ax >> 23) - 112u) << 10) | ((ax >> 13) & 0x3ffu));
    const uint32_t rem = ax & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) r++;
    return sign | (uint16_t)r;
}

static inline float rd_f16(const uint8_t *p) {
    return f16_to_f32((uint16_t)(p[0] | (p[1] << 8)));
}

static inline uint32_t rd_u32(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;  /* GGUF is little-endian; so is every target this module builds for */
}

/* ------------------------------------------------------------------------------------------------------------
 * Quantized activation blocks. The fp16 scales are stored already widened to float (same values).
 */

typedef struct { float d; int8_t qs[QK]; } act_q8_0;            /* d = fp16(amax / 127) */
typedef struct { float d; float s; int8_t qs[QK]; } act_q8_1;   /* s = fp16(d * sum(qs)) */
typedef struct { float d; int8_t qs[QK_K]; int16_t bsums[QK_K / 16]; } act_q8_K;

/* ggml's nearest_int: round half to even through the 1.5*2^23 trick (valid for |v| < 2^22). */
static inline int nearest_int(float v) {
    float t = v + 12582912.0f;
    int32_t i;
    memcpy(&i, &t, 4);
    return (i & 0x007fffff) - 0x00400000;
}

/* Q8_0/Q8_1 activations as llama.cpp quantizes them on x86 (the AVX/AVX2 quantize_row_q8_0/q8_1, which every
 * x86-64 build of it with AVX uses): d = fp16(amax / 127), but the multiplier is id = 127 / amax (not 1 / d) and
 * x * id is rounded half to even (not roundf's half away from zero, as quantize_row_q8_0_ref does). Both show only
 * on a last-bit difference of the multiplier or an exact tie, yet each moves one quantized activation by a step.
 * The same rule is used on every machine, so a result does not depend on where it was computed. */
static inline float q8_amax(const float *x) {
    float amax = 0.0f;
    for (int j = 0; j < QK; j++) amax = fmaxf(amax, fabsf(x[j]));
    return amax;
}

static void quantize_q8_0(const float *x, act_q8_0 *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, x += QK) {
        const float amax = q8_amax(x);
        const float id = amax != 0.0f ? 127.0f / amax : 0.0f;
        y[i].d = f16_to_f32(f32_to_f16(amax / 127.0f));
        for (int j = 0; j < QK; j++) y[i].qs[j] = (int8_t)nearest_int(x[j] * id);
    }
}

/* quantize_row_q8_1: as Q8_0, plus s = fp16(sum(qs) * d) with the unrounded d. */
static void quantize_q8_1(const float *x, act_q8_1 *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, x += QK) {
        const float amax = q8_amax(x);
        const float d = amax / 127.0f;
        const float id = amax != 0.0f ? 127.0f / amax : 0.0f;
        y[i].d = f16_to_f32(f32_to_f16(d));
        int sum = 0;
        for (int j = 0; j < QK; j++) {
            y[i].qs[j] = (int8_t)nearest_int(x[j] * id);
            sum += y[i].qs[j];
        }
        y[i].s = f16_to_f32(f32_to_f16((float)sum * d));
    }
}

/* quantize_row_q8_K_ref: the signed value of largest magnitude maps to -127; d = 1/iscale stays fp32. */
static void quantize_q8_K(const float *x, act_q8_K *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, x += QK_K) {
        float amax = 0.0f, max = 0.0f;
        for (int j = 0; j < QK_K; j++) {
            const float ax = fabsf(x[j]);
            if (ax > amax) { amax = ax; max = x[j]; }
        }
        if (amax == 0.0f) {
            memset(&y[i], 0, sizeof(y[i]));
            continue;
        }
        const float iscale = -127.0f / max;
        for (int j = 0; j < QK_K; j++) {
            const int v = nearest_int(iscale * x[j]);
            y[i].qs[j] = (int8_t)(v < 127 ? v : 127);
        }
        for (int j = 0; j < QK_K / 16; j++) {
            int sum = 0;
            for (int l = 0; l < 16; l++) sum += y[i].qs[j * 16 + l];
            y[i].bsums[j] = (int16_t)sum;
        }
        y[i].d = 1.0f / iscale;
    }
}

/* ------------------------------------------------------------------------------------------------------------
 * Portable block dot products (ggml's _generic vec_dot). w: one weight row, y: its quantized activation row,
 * nb: blocks per row. Integer sums are exact; the float combination follows ggml's formulas.
 */

typedef float (*dot_fn)(const uint8_t *w, const void *y, int64_t nb);

static inline int dot_i8_32(const int8_t *a, const int8_t *b) {
    int s = 0;
    for (int j = 0; j < QK; j++) s += a[j] * b[j];
    return s;
}

static float dot_q4_0(const uint8_t *w, const void *vy, int64_t nb) {
    const act_q8_0 *y = vy;
    float sumf = 0.0f;
    for (int64_t i = 0; i < nb; i++, w += 18) {
        int8_t a[QK];
        for (int j = 0; j < 16; j++) {
            a[j] = (int8_t)((w[2 + j] & 0x0f) - 8);
            a[j + 16] = (int8_t)((w[2 + j] >> 4) - 8);
        }
        sumf += (rd_f16(w) * y[i].d) * (float)dot_i8_32(a, y[i].qs);
    }
    return sumf;
}

static float dot_q4_1(const uint8_t *w, const void *vy, int64_t nb) {
    const act_q8_1 *y = vy;
    float sumf = 0.0f;
    for (int64_t i = 0; i < nb; i++, w += 20) {
        int8_t a[QK];
        for (int j = 0; j < 16; j++) {
            a[j] = (int8_t)(w[4 + j] & 0x0f);
            a[j + 16] = (int8_t)(w[4 + j] >> 4);
        }
        sumf += (rd_f16(w) * y[i].d) * (float)dot_i8_32(a, y[i].qs) + rd_f16(w + 2) * y[i].s;
    }
    return sumf;
}

static inline void unpack_q5(const uint8_t *qh4, const uint8_t *qs, int offset, int8_t *a) {
    const uint32_t qh = rd_u32(qh4);
    for (int j = 0; j < 16; j++) {
        a[j] = (int8_t)(((qs[j] & 0x0f) | (((qh >> j) & 1u) << 4)) - offset);
        a[j + 16] = (int8_t)(((qs[j] >> 4) | (((qh >> (j + 16)) & 1u) << 4)) - offset);
    }
}

static float dot_q5_0(const uint8_t *w, const void *vy, int64_t nb) {
    const act_q8_0 *y = vy;
    float sumf = 0.0f;
    for (int64_t i = 0; i < nb; i++, w += 22) {
        int8_t a[QK];
        unpack_q5(w + 2, w + 6, 16, a);
        sumf += (rd_f16(w) * y[i].d) * (float)dot_i8_32(a, y[i].qs);
    }
    return sumf;
}

static float dot_q5_1(const uint8_t *w, const void *vy, int64_t nb) {
    const act_q8_1 *y = vy;
    float sumf = 0.0f;
    for (int64_t i = 0; i < nb; i++, w += 24) {
        int8_t a[QK];
        unpack_q5(w + 4, w + 8, 0, a);
        sumf += (rd_f16(w) * y[i].d) * (float)dot_i8_32(a, y[i].qs) + rd_f16(w + 2) * y[i].s;
    }
    return sumf;
}

static float dot_q8_0(const uint8_t *w, const void *vy, int64_t nb) {
    const act_q8_0 *y = vy;
    float sumf = 0.0f;
    for (int64_t i = 0; i < nb; i++, w += 34) {
        sumf += (rd_f16(w) * y[i].d) * (float)dot_i8_32((const int8_t *)(w + 2), y[i].qs);
    }
    return sumf;
}

/* Q2_K: scales[16] (low nibble scale, high nibble min), qs[64] (2 bits), d, dmin. */
static float dot_q2_K(const uint8_t *w, const void *vy, int64_t nb) {
    const act_q8_K *y = vy;
    float sumf = 0.0f;
    for (int64_t i = 0; i < nb; i++, w += 84) {
        const uint8_t *sc = w, *q2 = w + 16;
        const int8_t *q8 = y[i].qs;
        int summs = 0;
        for (int j = 0; j < 16; j++) summs += y[i].bsums[j] * (sc[j] >> 4);
        int isum = 0;
        for (int k = 0; k < 2; k++) {            /* 128-element halves */
            for (int s = 0; s < 4; s++) {        /* 2-bit planes */
                for (int h = 0; h < 2; h++) {    /* 16-element sub-blocks */
                    int acc = 0;
                    for (int l = 0; l < 16; l++) {
                        acc += q8[k * 128 + s * 32 + h * 16 + l] * ((q2[k * 32 + h * 16 + l] >> (2 * s)) & 3);
                    }
                    isum += (sc[k * 8 + s * 2 + h] & 0x0f) * acc;
                }
            }
        }
        const float dall = y[i].d * rd_f16(w + 80);
        const float dmin = y[i].d * rd_f16(w + 82);
        sumf += dall * (float)isum - dmin * (float)summs;
    }
    return sumf;
}

/* The 16 6-bit scales of Q3_K (12 bytes): low 4 bits from bytes 0..7, high 2 bits from bytes 8..11. */
static inline void q3_K_scales(const uint8_t *b, int *sc) {
    for (int j = 0; j < 16; j++) {
        const int lo = j < 8 ? (b[j] & 0x0f) : (b[j - 8] >> 4);
        const int hi = (b[8 + (j & 3)] >> (2 * (j >> 2))) & 3;
        sc[j] = (lo | (hi << 4)) - 32;
    }
}

/* Q3_K: hmask[32], qs[64] (low 2 bits), scales[12], d. A clear hmask bit subtracts 4. */
static float dot_q3_K(const uint8_t *w, const void *vy, int64_t nb) {
    const act_q8_K *y = vy;
    float sumf = 0.0f;
    for (int64_t i = 0; i < nb; i++, w += 110) {
        const uint8_t *hm = w, *q3 = w + 32;
        const int8_t *q8 = y[i].qs;
        int8_t a[QK_K];
        for (int k = 0; k < 2; k++) {
            for (int s = 0; s < 4; s++) {
                const uint8_t m = (uint8_t)(1u << (k * 4 + s));
                for (int l = 0; l < 32; l++) {
                    a[k * 128 + s * 32 + l] = (int8_t)(((q3[k * 32 + l] >> (2 * s)) & 3) - ((hm[l] & m) ? 0 : 4));
                }
            }
        }
        int sc[16];
        q3_K_scales(w + 96, sc);
        int isum = 0;
        for (int j = 0; j < 16; j++) {
            int acc = 0;
            for (int l = 0; l < 16; l++) acc += q8[j * 16 + l] * a[j * 16 + l];
            isum += sc[j] * acc;
        }
        sumf += (rd_f16(w + 108) * y[i].d) * (float)isum;
    }
    return sumf;
}

/* The 8 6-bit scales and mins of Q4_K/Q5_K (ggml's get_scale_min_k4). */
static inline void k4_scales(const uint8_t *b, uint8_t *sc, uint8_t *mn) {
    for (int j = 0; j < 4; j++) {
        sc[j] = b[j] & 63;
        mn[j] = b[j + 4] & 63;
        sc[j + 4] = (uint8_t)((b[j + 8] & 0x0f) | ((b[j] >> 6) << 4));
        mn[j + 4] = (uint8_t)((b[j + 8] >> 4) | ((b[j + 4] >> 6) << 4));
    }
}

/* Q4_K / Q5_K share everything but the fifth bit: d, dmin, scales[12], [qh[32]], qs[128]. */
static inline float dot_q45_K(const uint8_t *w, const act_q8_K *y, int64_t nb, int five) {
    const int bsize = five ? 176 : 144;
    float sumf = 0.0f;
    for (int64_t i = 0; i < nb; i++, w += bsize) {
        const uint8_t *qh = w + 16, *q4 = w + (five ? 48 : 16);
        const int8_t *q8 = y[i].qs;
        uint8_t sc[8], mn[8];
        k4_scales(w + 4, sc, mn);
        int sumi_m = 0;
        for (int j = 0; j < 16; j++) sumi_m += y[i].bsums[j] * mn[j / 2];
        int isum = 0;
        for (int j = 0; j < 4; j++) {  /* 64 elements: low nibbles (sub-block 2j), high nibbles (2j+1) */
            int acc_lo = 0, acc_hi = 0;
            for (int l = 0; l < 32; l++) {
                int lo = q4[j * 32 + l] & 0x0f, hi = q4[j * 32 + l] >> 4;
                if (five) {
                    lo |= ((qh[l] >> (2 * j)) & 1) << 4;
                    hi |= ((qh[l] >> (2 * j + 1)) & 1) << 4;
                }
                acc_lo += q8[j * 64 + l] * lo;
                acc_hi += q8[j * 64 + 32 + l] * hi;
            }
            isum += sc[2 * j] * acc_lo + sc[2 * j + 1] * acc_hi;
        }
        const float d = rd_f16(w) * y[i].d;
        const float dmin = rd_f16(w + 2) * y[i].d;
        sumf += d * (float)isum - dmin * (float)sumi_m;
    }
    return sumf;
}

static float dot_q4_K(const uint8_t *w, const void *vy, int64_t nb) { return dot_q45_K(w, vy, nb, 0); }
static float dot_q5_K(const uint8_t *w, const void *vy, int64_t nb) { return dot_q45_K(w, vy, nb, 1); }

/* Q6_K: ql[128] (low 4 bits), qh[64] (high 2 bits), scales[16] int8, d. Values are q - 32. */
static float dot_q6_K(const uint8_t *w, const void *vy, int64_t nb) {
    const act_q8_K *y = vy;
    float sumf = 0.0f;
    for (int64_t i = 0; i < nb; i++, w += 210) {
        const int8_t *q8 = y[i].qs;
        const int8_t *sc = (const int8_t *)(w + 192);
        int8_t a[QK_K];
        for (int k = 0; k < 2; k++) {
            const uint8_t *ql = w + k * 64, *qh = w + 128 + k * 32;
            int8_t *ak = a + k * 128;
            for (int l = 0; l < 32; l++) {
                ak[l] = (int8_t)(((ql[l] & 0x0f) | (((qh[l] >> 0) & 3) << 4)) - 32);
                ak[l + 32] = (int8_t)(((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) - 32);
                ak[l + 64] = (int8_t)(((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32);
                ak[l + 96] = (int8_t)(((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32);
            }
        }
        int isum = 0;
        for (int j = 0; j < 16; j++) {
            int acc = 0;
            for (int l = 0; l < 16; l++) acc += q8[j * 16 + l] * a[j * 16 + l];
            isum += sc[j] * acc;
        }
        sumf += (rd_f16(w + 208) * y[i].d) * (float)isum;
    }
    return sumf;
}

/* F16 weights against the activation rounded to fp16 (ggml's vec_dot_f16); nb = elements. */
static float dot_f16(const uint8_t *w, const void *vy, int64_t n) {
    const uint16_t *y = vy;
    float acc[8] = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        for (int l = 0; l < 8; l++) acc[l] += rd_f16(w + 2 * (i + l)) * f16_to_f32(y[i + l]);
    }
    float sumf = 0.0f;
    for (; i < n; i++) sumf += rd_f16(w + 2 * i) * f16_to_f32(y[i]);
    for (int l = 0; l < 8; l++) sumf += acc[l];
    return sumf;
}

static float dot_f32(const uint8_t *w, const void *vy, int64_t n) {
    const float *y = vy;
    float acc[8] = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        for (int l = 0; l < 8; l++) {
            float wv;
            memcpy(&wv, w + 4 * (i + l), 4);
            acc[l] += wv * y[i + l];
        }
    }
    float sumf = 0.0f;
    for (; i < n; i++) {
        float wv;
        memcpy(&wv, w + 4 * i, 4);
        sumf += wv * y[i];
    }
    for (int l = 0; l < 8; l++) sumf += acc[l];
    return sumf;
}

/* ------------------------------------------------------------------------------------------------------------
 * AVX2 versions of the hot dot products. Integer block sums are the same exact integers; only the order of the
 * float32 sums over blocks differs from the portable code (vector lanes, fused multiply-add).
 */

#if QK_X86

TARGET_AVX2 static inline float hsum_ps(__m256 v) {
    __m128 r = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    return _mm_cvtss_f32(r);
}

TARGET_AVX2 static inline int hsum_epi32(__m256i v) {
    __m128i r = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    r = _mm_add_epi32(r, _mm_unpackhi_epi64(r, r));
    r = _mm_add_epi32(r, _mm_shuffle_epi32(r, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm_cvtsi128_si32(r);
}

/* 32 signed bytes times 32 signed bytes -> 8 int32 sums of 4 products. |y| <= 127 (activations) keeps the
 * unsigned*signed multiply exact even when x holds -128. */
TARGET_AVX2 static inline __m256i dot_i8_avx2(__m256i x, __m256i y) {
    const __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(x, x), _mm256_sign_epi8(y, x));
    return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
}

/* 32 unsigned bytes (< 128) times 32 signed bytes -> 8 int32. */
TARGET_AVX2 static inline __m256i dot_u8_avx2(__m256i x, __m256i y) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(x, y), _mm256_set1_epi16(1));
}

/* 16 bytes -> 32 nibbles: low nibbles in bytes 0..15, high nibbles in bytes 16..31 (ggml's order). */
TARGET_AVX2 static inline __m256i nibbles_avx2(const uint8_t *p) {
    const __m128i t = _mm_loadu_si128((const __m128i *)p);
    const __m256i b = _mm256_set_m128i(_mm_srli_epi16(t, 4), t);
    return _mm256_and_si256(b, _mm256_set1_epi8(0x0f));
}

/* 32 bits of a little-endian u32 -> 32 bytes, 0xff where the bit is set. */
TARGET_AVX2 static inline __m256i bits_avx2(const uint8_t *p) {
    const __m256i v = _mm256_set1_epi32((int)rd_u32(p));
    const __m256i spread = _mm256_shuffle_epi8(
        v, _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0));
    const __m256i mask = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    return _mm256_cmpeq_epi8(_mm256_and_si256(spread, mask), mask);
}

TARGET_AVX2 static inline float f16_avx2(const uint8_t *p) {
    return _cvtsh_ss((unsigned short)(p[0] | (p[1] << 8)));
}

TARGET_AVX2 static float dot_q8_0_avx2(const uint8_t *w, const void *vy, int64_t nb) {
    const act_q8_0 *y = vy;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 1 < nb; i += 2, w += 68) {
        const __m256i x0 = _mm256_loadu_si256((const __m256i *)(w + 2));
        const __m256i x1 = _mm256_loadu_si256((const __m256i *)(w + 36));
        const __m256i p0 = dot_i8_avx2(x0, _mm256_loadu_si256((const __m256i *)y[i].qs));
        const __m256i p1 = dot_i8_avx2(x1, _mm256_loadu_si256((const __m256i *)y[i + 1].qs));
        acc0 = _mm256_fmadd_ps(_mm256_set1_ps(f16_avx2(w) * y[i].d), _mm256_cvtepi32_ps(p0), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_set1_ps(f16_avx2(w + 34) * y[i + 1].d), _mm256_cvtepi32_ps(p1), acc1);
    }
    for (; i < nb; i++, w += 34) {
        const __m256i p = dot_i8_avx2(_mm256_loadu_si256((const __m256i *)(w + 2)),
                                      _mm256_loadu_si256((const __m256i *)y[i].qs));
        acc0 = _mm256_fmadd_ps(_mm256_set1_ps(f16_avx2(w) * y[i].d), _mm256_cvtepi32_ps(p), acc0);
    }
    return hsum_ps(_mm256_add_ps(acc0, acc1));
}

TARGET_AVX2 static float dot_q4_0_avx2(const uint8_t *w, const void *vy, int64_t nb) {
    const act_q8_0 *y = vy;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < nb; i++, w += 18) {
        const __m256i x = _mm256_sub_epi8(nibbles_avx2(w + 2), _mm256_set1_epi8(8));
        const __m256i p = dot_i8_avx2(x, _mm256_loadu_si256((const __m256i *)y[i].qs));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(f16_avx2(w) * y[i].d), _mm256_cvtepi32_ps(p), acc);
    }
    return hsum_ps(acc);
}

TARGET_AVX2 static float dot_q5_0_avx2(const uint8_t *w, const void *vy, int64_t nb) {
    const act_q8_0 *y = vy;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    const __m256i f0 = _mm256_set1_epi8((char)0xf0);
    int64_t i = 0;
    /* a clear fifth bit means value - 16: set the byte's top four bits so it reads as nibble - 16 */
    for (; i + 1 < nb; i += 2, w += 44) {
        const __m256i x0 = _mm256_or_si256(nibbles_avx2(w + 6), _mm256_andnot_si256(bits_avx2(w + 2), f0));
        const __m256i x1 = _mm256_or_si256(nibbles_avx2(w + 28), _mm256_andnot_si256(bits_avx2(w + 24), f0));
        const __m256i p0 = dot_i8_avx2(x0, _mm256_loadu_si256((const __m256i *)y[i].qs));
        const __m256i p1 = dot_i8_avx2(x1, _mm256_loadu_si256((const __m256i *)y[i + 1].qs));
        acc0 = _mm256_fmadd_ps(_mm256_set1_ps(f16_avx2(w) * y[i].d), _mm256_cvtepi32_ps(p0), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_set1_ps(f16_avx2(w + 22) * y[i + 1].d), _mm256_cvtepi32_ps(p1), acc1);
    }
    for (; i < nb; i++, w += 22) {
        const __m256i x = _mm256_or_si256(nibbles_avx2(w + 6), _mm256_andnot_si256(bits_avx2(w + 2), f0));
        const __m256i p = dot_i8_avx2(x, _mm256_loadu_si256((const __m256i *)y[i].qs));
        acc0 = _mm256_fmadd_ps(_mm256_set1_ps(f16_avx2(w) * y[i].d), _mm256_cvtepi32_ps(p), acc0);
    }
    return hsum_ps(_mm256_add_ps(acc0, acc1));
}

TARGET_AVX2 static float dot_q4_1_avx2(const uint8_t *w, const void *vy, int64_t nb) {
    const act_q8_1 *y = vy;
    __m256 acc = _mm256_setzero_ps();
    float summs = 0.0f;
    for (int64_t i = 0; i < nb; i++, w += 20) {
        const __m256i p = dot_u8_avx2(nibbles_avx2(w + 4), _mm256_loadu_si256((const __m256i *)y[i].qs));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(f16_avx2(w) * y[i].d), _mm256_cvtepi32_ps(p), acc);
        summs += f16_avx2(w + 2) * y[i].s;
    }
    return hsum_ps(acc) + summs;
}

TARGET_AVX2 static float dot_q5_1_avx2(const uint8_t *w, const void *vy, int64_t nb) {
    const act_q8_1 *y = vy;
    __m256 acc = _mm256_setzero_ps();
    float summs = 0.0f;
    for (int64_t i = 0; i < nb; i++, w += 24) {
        const __m256i x = _mm256_or_si256(nibbles_avx2(w + 8),
                                          _mm256_and_si256(bits_avx2(w + 4), _mm256_set1_epi8(0x10)));
        const __m256i p = dot_u8_avx2(x, _mm256_loadu_si256((const __m256i *)y[i].qs));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(f16_avx2(w) * y[i].d), _mm256_cvtepi32_ps(p), acc);
        summs += f16_avx2(w + 2) * y[i].s;
    }
    return hsum_ps(acc) + summs;
}

/* Q4_K / Q5_K: per 64 elements, 32 low nibbles (scale 2j) and 32 high nibbles (scale 2j+1). */
TARGET_AVX2 static inline float dot_q45_K_avx2(const uint8_t *w, const act_q8_K *y, int64_t nb, int five) {
    const int bsize = five ? 176 : 144;
    const __m256i m4 = _mm256_set1_epi8(0x0f), one = _mm256_set1_epi8(1);
    float sumf = 0.0f;
    for (int64_t i = 0; i < nb; i++, w += bsize) {
        const uint8_t *q4 = w + (five ? 48 : 16);
        const int8_t *q8 = y[i].qs;
        uint8_t sc[8], mn[8];
        k4_scales(w + 4, sc, mn);
        int sumi_m = 0;
        for (int j = 0; j < 8; j++) sumi_m += (y[i].bsums[2 * j] + y[i].bsums[2 * j + 1]) * mn[j];
        const __m256i hb = five ? _mm256_loadu_si256((const __m256i *)(w + 16)) : _mm256_setzero_si256();
        __m256i sumi = _mm256_setzero_si256();
        for (int j = 0; j < 4; j++) {
            const __m256i q = _mm256_loadu_si256((const __m256i *)(q4 + 32 * j));
            __m256i lo = _mm256_and_si256(q, m4);
            __m256i hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
            if (five) {
                lo = _mm256_or_si256(lo, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 2 * j), one), 4));
                hi = _mm256_or_si256(hi,
                                     _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 2 * j + 1), one), 4));
            }
            const __m256i plo = _mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)(q8 + 64 * j)));
            const __m256i phi = _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(q8 + 64 * j + 32)));
            sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(plo, _mm256_set1_epi16(sc[2 * j])));
            sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(phi, _mm256_set1_epi16(sc[2 * j + 1])));
        }
        const float d = f16_avx2(w) * y[i].d;
        const float dmin = f16_avx2(w + 2) * y[i].d;
        sumf += d * (float)hsum_epi32(sumi) - dmin * (float)sumi_m;
    }
    return sumf;
}

TARGET_AVX2 static float dot_q4_K_avx2(const uint8_t *w, const void *vy, int64_t nb) {
    return dot_q45_K_avx2(w, vy, nb, 0);
}

TARGET_AVX2 static float dot_q5_K_avx2(const uint8_t *w, const void *vy, int64_t nb) {
    return dot_q45_K_avx2(w, vy, nb, 1);
}

/* Q6_K: the -32 offset is applied once per 16 elements through the activation block sums. */
TARGET_AVX2 static float dot_q6_K_avx2(const uint8_t *w, const void *vy, int64_t nb) {
    const act_q8_K *y = vy;
    const __m256i m4 = _mm256_set1_epi8(0x0f), m3 = _mm256_set1_epi8(3);
    float sumf = 0.0f;
    for (int64_t i = 0; i < nb; i++, w += 210) {
        const int8_t *sc = (const int8_t *)(w + 192);
        const int8_t *q8 = y[i].qs;
        int off = 0;
        for (int j = 0; j < 16; j++) off += sc[j] * y[i].bsums[j];
        __m256i sumi = _mm256_setzero_si256();
        for (int k = 0; k < 2; k++) {
            const __m256i l0 = _mm256_loadu_si256((const __m256i *)(w + 64 * k));
            const __m256i l1 = _mm256_loadu_si256((const __m256i *)(w + 64 * k + 32));
            const __m256i h = _mm256_loadu_si256((const __m256i *)(w + 128 + 32 * k));
            __m256i g[4];
            g[0] = _mm256_or_si256(_mm256_and_si256(l0, m4), _mm256_slli_epi16(_mm256_and_si256(h, m3), 4));
            g[1] = _mm256_or_si256(_mm256_and_si256(l1, m4),
                                   _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 2), m3), 4));
            g[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4),
                                   _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 4), m3), 4));
            g[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4),
                                   _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 6), m3), 4));
            for (int gi = 0; gi < 4; gi++) {
                const int s = 8 * k + 2 * gi;
                const __m256i p = _mm256_maddubs_epi16(g[gi], _mm256_loadu_si256((const __m256i *)(q8 + 128 * k + 32 * gi)));
                const __m256i scv = _mm256_set_m128i(_mm_set1_epi16(sc[s + 1]), _mm_set1_epi16(sc[s]));
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p, scv));
            }
        }
        sumf += (f16_avx2(w + 208) * y[i].d) * (float)(hsum_epi32(sumi) - 32 * off);
    }
    return sumf;
}

TARGET_AVX2 static float dot_f16_avx2(const uint8_t *w, const void *vy, int64_t n) {
    const uint16_t *y = vy;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m256 w0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + 2 * i)));
        const __m256 w1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + 2 * i + 16)));
        acc0 = _mm256_fmadd_ps(w0, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(y + i))), acc0);
        acc1 = _mm256_fmadd_ps(w1, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(y + i + 8))), acc1);
    }
    float sumf = hsum_ps(_mm256_add_ps(acc0, acc1));
    for (; i < n; i++) sumf += f16_avx2(w + 2 * i) * f16_to_f32(y[i]);
    return sumf;
}

TARGET_AVX2 static float dot_f32_avx2(const uint8_t *w, const void *vy, int64_t n) {
    const float *y = vy;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps((const float *)(w + 4 * i)), _mm256_loadu_ps(y + i), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps((const float *)(w + 4 * i + 32)), _mm256_loadu_ps(y + i + 8), acc1);
    }
    float sumf = hsum_ps(_mm256_add_ps(acc0, acc1));
    for (; i < n; i++) {
        float wv;
        memcpy(&wv, w + 4 * i, 4);
        sumf += wv * y[i];
    }
    return sumf;
}

#define AVX2(fn) fn##_avx2
#else
#define AVX2(fn) NULL
#endif

/* ------------------------------------------------------------------------------------------------------------
 * Type table.
 */

enum act_kind { ACT_F32, ACT_F16, ACT_Q8_0, ACT_Q8_1, ACT_Q8_K };

typedef struct {
    int type;
    int block;       /* elements per block */
    int type_size;   /* bytes per block */
    int act;         /* enum act_kind */
    dot_fn dot;      /* portable */
    dot_fn dot_avx2; /* NULL when there is none */
} qtype_info;

static qtype_info TYPES[] = {
    {T_F32, 1, 4, ACT_F32, dot_f32, AVX2(dot_f32)},
    {T_F16, 1, 2, ACT_F16, dot_f16, AVX2(dot_f16)},
    {T_Q4_0, QK, 18, ACT_Q8_0, dot_q4_0, AVX2(dot_q4_0)},
    {T_Q4_1, QK, 20, ACT_Q8_1, dot_q4_1, AVX2(dot_q4_1)},
    {T_Q5_0, QK, 22, ACT_Q8_0, dot_q5_0, AVX2(dot_q5_0)},
    {T_Q5_1, QK, 24, ACT_Q8_1, dot_q5_1, AVX2(dot_q5_1)},
    {T_Q8_0, QK, 34, ACT_Q8_0, dot_q8_0, AVX2(dot_q8_0)},
    {T_Q2_K, QK_K, 84, ACT_Q8_K, dot_q2_K, NULL},
    {T_Q3_K, QK_K, 110, ACT_Q8_K, dot_q3_K, NULL},
    {T_Q4_K, QK_K, 144, ACT_Q8_K, dot_q4_K, AVX2(dot_q4_K)},
    {T_Q5_K, QK_K, 176, ACT_Q8_K, dot_q5_K, AVX2(dot_q5_K)},
    {T_Q6_K, QK_K, 210, ACT_Q8_K, dot_q6_K, AVX2(dot_q6_K)},
};
#define N_TYPES ((int)(sizeof(TYPES) / sizeof(TYPES[0])))

static int use_avx2 = 0;

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

typedef struct {
    dot_fn dot;
    const uint8_t *w;
    const uint8_t *xq;
    float *out;
    int64_t T, nb, nout, chunk, n_chunks;
    size_t wrow, xrow;
    int n_workers; /* workers allowed to take part (n_threads - 1) */
} job_t;

static void run_chunk(const job_t *j, int64_t c) {
    const int64_t r1 = (c + 1) * j->chunk < j->nout ? (c + 1) * j->chunk : j->nout;
    for (int64_t r = c * j->chunk; r < r1; r++) {
        const uint8_t *wr = j->w + (size_t)r * j->wrow;
        for (int64_t t = 0; t < j->T; t++) j->out[t * j->nout + r] = j->dot(wr, j->xq + (size_t)t * j->xrow, j->nb);
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

static void compute(const qtype_info *ti, dot_fn dot, const uint8_t *w, const uint8_t *xq, float *out,
                    int64_t T, int64_t in, int64_t nout, int n_threads) {
    job_t j;
    j.dot = dot;
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

static PyObject *py_qmatmul(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *ox, *ow, *oout;
    int type, n_threads;
    Py_ssize_t in, nout;
    if (!PyArg_ParseTuple(args, "OOOinni", &ox, &ow, &oout, &type, &in, &nout, &n_threads)) return NULL;

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

    Py_buffer bx = {0}, bw = {0}, bo = {0};
    PyObject *result = NULL;
    void *xq = NULL;
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
    dot_fn dot = (use_avx2 && ti->dot_avx2) ? ti->dot_avx2 : ti->dot;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t t = 0; t < T; t++) {
        quantize_row(ti, (const float *)bx.buf + t * in, (uint8_t *)xq + (size_t)t * xrow, in);
    }
    compute(ti, dot, bw.buf, xq, bo.buf, T, in, nout, n_threads);
    Py_END_ALLOW_THREADS
    Py_INCREF(Py_None);
    result = Py_None;

done:
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
     "qmatmul(x, w, out, ggml_type, in_features, out_features, n_threads) -> None\n"
     "out[T, out_features] = x[T, in_features] @ W.T on GGUF blocks, with ggml's CPU arithmetic."},
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
