/* Activation quantization and the portable C block dot products of the quantized matmul (see _qkernels.c).
 *
 * Everything here computes, float operation for float operation, what llama.cpp's x86 AVX2 build computes, so
 * the vector kernels (qk_avx2.h, qk_avx512.h) are checked against these bit for bit.
 */

#ifndef ELDRIC_QK_PORTABLE_H
#define ELDRIC_QK_PORTABLE_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define QK_X86 1
#include <immintrin.h>
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

/* d = fp16(amax / 127); nsum4[l] = -(qs[4l] + .. + qs[4l+3]), what the AVX-512 kernels' unsigned weights need */
typedef struct { float d; int8_t qs[QK]; int32_t nsum4[8]; } act_q8_0;
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
        for (int l = 0; l < 8; l++) y[i].nsum4[l] = -(y[i].qs[4 * l] + y[i].qs[4 * l + 1] + y[i].qs[4 * l + 2] +
                                                      y[i].qs[4 * l + 3]);
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

/* Q8_K activations (quantize_row_q8_K_ref, which llama.cpp's x86 build uses): the signed value of largest magnitude
 * maps to -127, d = 1/iscale stays fp32. (ggml_quantize_mat_q8_K_4x8, which quantizes the activation rows of a
 * repacked Q4_K matmul four at a time, lets +m win a tie of +m and -m where this lets the first win: that negates
 * both d and every q, and so changes no product.) */
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
 * Block dot products. w: one weight row, y: its quantized activation row, nb: blocks per row.
 *
 * Both kernel sets, the portable C below and the AVX2 one further down, compute what llama.cpp's x86 AVX2 build
 * computes, float operation for float operation, so every machine gets llama.cpp's bits. Its vec_dot kernels
 * (and llamafile's tinyBLAS, which llama.cpp takes for Q4_0/Q5_0/Q8_0 batches and which computes each output the
 * same way) work like this:
 *  - the integer products inside a block are summed exactly, in 8 lanes: lane l of a group of 32 elements gets
 *    the elements 4l..4l+3 (the layout of _mm256_maddubs_epi16 + _mm256_madd_epi16);
 *  - every block adds d_w*d_x times its 8 lane sums to 8 float accumulators with a fused multiply-add (fmaf);
 *  - the accumulators are summed at the end as ggml's hsum_float_8 does.
 * The minimum terms of Q4_1/Q5_1/Q4_K/Q5_K, the Q4_K weights llama.cpp repacks and its tiled K-quant matmul have
 * their own orders, given at each kernel.
 *
 * setup.py builds with -std=c11, which keeps GCC from fusing a * b + c on its own: every fused multiply-add here
 * is written out (fmaf, _mm*_fmadd_*), every unfused one must stay unfused.
 */

typedef float (*dot_fn)(const uint8_t *w, const void *y, int64_t nb);

/* R weight rows (w, w + wrow, ...) times C activation rows (y, y + yrow, ...) at once: out[c * ostride + r]. Every
 * output is computed exactly as its one-output dot_fn computes it; a tile only decodes a weight block once for
 * several activation rows and keeps several independent chains of fused multiply-adds in flight. AVX2 only. */
typedef void (*tile_fn)(const uint8_t *w, size_t wrow, const uint8_t *y, size_t yrow, int64_t nb, float *out,
                        size_t ostride);

/* ggml's hsum_float_8: ((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7)). */
static inline float hsum8(const float *a) {
    return ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]));
}

static inline int dot4(const int8_t *a, const int8_t *b) {
    return a[0] * b[0] + a[1] * b[1] + a[2] * b[2] + a[3] * b[3];
}

/* One 32-element block into the 8 lane accumulators: acc[l] = fma(d, sum of a*b over 4l..4l+3, acc[l]). */
static inline void fma_block32(float *acc, float d, const int8_t *a, const int8_t *b) {
    for (int l = 0; l < 8; l++) acc[l] = fmaf(d, (float)dot4(a + 4 * l, b + 4 * l), acc[l]);
}

/* 16 bytes -> 32 values: low nibbles first, then high nibbles (ggml's element order), minus `offset`. */
static inline void unpack_q4(const uint8_t *qs, int offset, int8_t *a) {
    for (int j = 0; j < 16; j++) {
        a[j] = (int8_t)((qs[j] & 0x0f) - offset);
        a[j + 16] = (int8_t)((qs[j] >> 4) - offset);
    }
}

/* As unpack_q4, with the fifth bit j of the little-endian u32 at qh4 on element j. */
static inline void unpack_q5(const uint8_t *qh4, const uint8_t *qs, int offset, int8_t *a) {
    const uint32_t qh = rd_u32(qh4);
    for (int j = 0; j < 16; j++) {
        a[j] = (int8_t)(((qs[j] & 0x0f) | (((qh >> j) & 1u) << 4)) - offset);
        a[j + 16] = (int8_t)(((qs[j] >> 4) | (((qh >> (j + 16)) & 1u) << 4)) - offset);
    }
}

/* Q4_0: d, qs[16]; values nibble - 8. */
static float dot_q4_0(const uint8_t *w, const void *vy, int64_t nb) {
    const act_q8_0 *y = vy;
    float acc[8] = {0};
    for (int64_t i = 0; i < nb; i++, w += 18) {
        int8_t a[QK];
        unpack_q4(w + 2, 8, a);
        fma_block32(acc, rd_f16(w) * y[i].d, a, y[i].qs);
    }
    return hsum8(acc);
}

/* Q4_1: d, m, qs[16]. The m * s terms go to one scalar, fused (ggml's summs += m * s, which its compiler fuses);
 * the result is hsum8(acc) + summs. */
static float dot_q4_1(const uint8_t *w, const void *vy, int64_t nb) {
    const act_q8_1 *y = vy;
    float acc[8] = {0}, summs = 0.0f;
    for (int64_t i = 0; i < nb; i++, w += 20) {
        int8_t a[QK];
        unpack_q4(w + 4, 0, a);
        summs = fmaf(rd_f16(w + 2), y[i].s, summs);
        fma_block32(acc, rd_f16(w) * y[i].d, a, y[i].qs);
    }
    return hsum8(acc) + summs;
}

/* Q5_0: d, qh[4], qs[16]; values (nibble | bit << 4) - 16. */
static float dot_q5_0(const uint8_t *w, const void *vy, int64_t nb) {
    const act_q8_0 *y = vy;
    float acc[8] = {0};
    for (int64_t i = 0; i < nb; i++, w += 22) {
        int8_t a[QK];
        unpack_q5(w + 2, w + 6, 16, a);
        fma_block32(acc, rd_f16(w) * y[i].d, a, y[i].qs);
    }
    return hsum8(acc);
}

/* Q5_1: d, m, qh[4], qs[16]; as Q4_1. */
static float dot_q5_1(const uint8_t *w, const void *vy, int64_t nb) {
    const act_q8_1 *y = vy;
    float acc[8] = {0}, summs = 0.0f;
    for (int64_t i = 0; i < nb; i++, w += 24) {
        int8_t a[QK];
        unpack_q5(w + 4, w + 8, 0, a);
        summs = fmaf(rd_f16(w + 2), y[i].s, summs);
        fma_block32(acc, rd_f16(w) * y[i].d, a, y[i].qs);
    }
    return hsum8(acc) + summs;
}

/* Q8_0: d, qs[32]. */
static float dot_q8_0(const uint8_t *w, const void *vy, int64_t nb) {
    const act_q8_0 *y = vy;
    float acc[8] = {0};
    for (int64_t i = 0; i < nb; i++, w += 34) {
        fma_block32(acc, rd_f16(w) * y[i].d, (const int8_t *)(w + 2), y[i].qs);
    }
    return hsum8(acc);
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

/* The 256 values of a Q4_K/Q5_K super-block in ggml's element order: 64-element groups j, the low nibbles of
 * qs[32j..32j+31] first (sub-block 2j), then the high nibbles (sub-block 2j+1); Q5_K adds bit 2j or 2j+1 of qh[l]
 * as the fifth bit. */
static inline void unpack_q45_K(const uint8_t *w, int five, int8_t *a) {
    const uint8_t *qh = w + 16, *q4 = w + (five ? 48 : 16);
    for (int j = 0; j < 4; j++) {
        for (int l = 0; l < 32; l++) {
            int lo = q4[j * 32 + l] & 0x0f, hi = q4[j * 32 + l] >> 4;
            if (five) {
                lo |= ((qh[l] >> (2 * j)) & 1) << 4;
                hi |= ((qh[l] >> (2 * j + 1)) & 1) << 4;
            }
            a[j * 64 + l] = (int8_t)lo;
            a[j * 64 + 32 + l] = (int8_t)hi;
        }
    }
}

/* The minimum term of a Q4_K/Q5_K super-block in ggml's AVX2 layout: prod[k] = mn[2k] s[2k] + mn[2k+1] s[2k+1]
 * with s[m] the activation sum over the 32 elements of sub-block m. */
static inline void q45_K_min_prods(const int16_t *bs, const uint8_t *mn, int *prod) {
    for (int k = 0; k < 4; k++) {
        prod[k] = mn[2 * k] * (bs[4 * k] + bs[4 * k + 1]) + mn[2 * k + 1] * (bs[4 * k + 2] + bs[4 * k + 3]);
    }
}

/* Q4_K / Q5_K (d, dmin, scales[12], [qh[32]], qs[128]) as ggml_vec_dot_q4_K_q8_K / q5_K_q8_K (AVX2): the scaled
 * sums in 8 lanes, acc += (d_x * d_w) * lanes; the minimum term with dmin = -d_x * dmin_w goes to 4 lanes for Q4_K
 * (summed (m0 + m2) + (m1 + m3)), to one scalar for Q5_K; the result is hsum8(acc) + that. */
static inline float dot_q45_K(const uint8_t *w, const act_q8_K *y, int64_t nb, int five) {
    const int bsize = five ? 176 : 144;
    float acc[8] = {0}, accm[4] = {0}, summs = 0.0f;
    for (int64_t i = 0; i < nb; i++, w += bsize) {
        const int8_t *q8 = y[i].qs;
        uint8_t sc[8], mn[8];
        k4_scales(w + 4, sc, mn);
        int8_t a[QK_K];
        unpack_q45_K(w, five, a);
        int lanes[8] = {0};
        for (int j = 0; j < 8; j++) {  /* sub-block j: 32 elements, scale sc[j] */
            for (int l = 0; l < 8; l++) lanes[l] += sc[j] * dot4(a + 32 * j + 4 * l, q8 + 32 * j + 4 * l);
        }
        const float d = y[i].d * rd_f16(w);
        const float dmin = -y[i].d * rd_f16(w + 2);
        for (int l = 0; l < 8; l++) acc[l] = fmaf(d, (float)lanes[l], acc[l]);
        int prod[4];
        q45_K_min_prods(y[i].bsums, mn, prod);
        if (five) {
            summs = fmaf(dmin, (float)(prod[0] + prod[1] + prod[2] + prod[3]), summs);
        } else {
            for (int k = 0; k < 4; k++) accm[k] = fmaf(dmin, (float)prod[k], accm[k]);
        }
    }
    return hsum8(acc) + (five ? summs : (accm[0] + accm[2]) + (accm[1] + accm[3]));
}

static float dot_q4_K(const uint8_t *w, const void *vy, int64_t nb) { return dot_q45_K(w, vy, nb, 0); }
static float dot_q5_K(const uint8_t *w, const void *vy, int64_t nb) { return dot_q45_K(w, vy, nb, 1); }

/* Q4_K weights that llama.cpp repacks (q4_K_8x8: every Q4_K weight with a multiple of 8 rows, on x86 with AVX2).
 * Its gemv (one activation row) adds, per super-block, the whole integer sums isum = sum(sc_j i_j) and
 * msum = sum(mn_j s_j) to two scalars: acc = fma(isum, d_w d_x, acc), accm = fma(msum, dmin_w d_x, accm). Its gemm
 * (activation rows in groups of four, quantized by ggml_quantize_mat_q8_K_4x8) does the same per 64 elements, i.e.
 * per pair of sub-blocks. Either returns acc - accm. */
static inline float dot_q4_K_repacked(const uint8_t *w, const act_q8_K *y, int64_t nb, int per64) {
    float acc = 0.0f, accm = 0.0f;
    for (int64_t i = 0; i < nb; i++, w += 144) {
        uint8_t sc[8], mn[8];
        k4_scales(w + 4, sc, mn);
        int8_t a[QK_K];
        unpack_q45_K(w, 0, a);
        int isum[4], msum[4];
        q45_K_min_prods(y[i].bsums, mn, msum);
        for (int k = 0; k < 4; k++) {
            isum[k] = 0;
            for (int m = 2 * k; m < 2 * k + 2; m++) {
                int s = 0;
                for (int l = 0; l < 32; l++) s += a[32 * m + l] * y[i].qs[32 * m + l];
                isum[k] += sc[m] * s;
            }
        }
        const float d = rd_f16(w) * y[i].d, dmin = rd_f16(w + 2) * y[i].d;
        if (per64) {
            for (int k = 0; k < 4; k++) {
                acc = fmaf((float)isum[k], d, acc);
                accm = fmaf((float)msum[k], dmin, accm);
            }
        } else {
            acc = fmaf((float)(isum[0] + isum[1] + isum[2] + isum[3]), d, acc);
            accm = fmaf((float)(msum[0] + msum[1] + msum[2] + msum[3]), dmin, accm);
        }
    }
    return acc - accm;
}

static float dot_q4_K_gemv(const uint8_t *w, const void *vy, int64_t nb) {
    return dot_q4_K_repacked(w, vy, nb, 0);
}

static float dot_q4_K_gemm4(const uint8_t *w, const void *vy, int64_t nb) {
    return dot_q4_K_repacked(w, vy, nb, 1);
}

/* K-quant weights against 8 or more activation rows (llama.cpp's "tiled" matmul, ggml-cpu/tiled, for the weights
 * it does not repack): per super-block the whole integer sums isum and msum (as above), r = d_w * isum, for
 * Q4_K/Q5_K r = fma(-dmin_w, msum, r), then acc = fma(r, d_x, acc). */
static inline float dot_q45_K_tiled(const uint8_t *w, const act_q8_K *y, int64_t nb, int five) {
    const int bsize = five ? 176 : 144;
    float acc = 0.0f;
    for (int64_t i = 0; i < nb; i++, w += bsize) {
        uint8_t sc[8], mn[8];
        k4_scales(w + 4, sc, mn);
        int8_t a[QK_K];
        unpack_q45_K(w, five, a);
        int isum = 0, prod[4];
        for (int j = 0; j < 8; j++) {
            int s = 0;
            for (int l = 0; l < 32; l++) s += a[32 * j + l] * y[i].qs[32 * j + l];
            isum += sc[j] * s;
        }
        q45_K_min_prods(y[i].bsums, mn, prod);
        const int msum = prod[0] + prod[1] + prod[2] + prod[3];
        acc = fmaf(fmaf(-rd_f16(w + 2), (float)msum, rd_f16(w) * (float)isum), y[i].d, acc);
    }
    return acc;
}

static float dot_q4_K_tiled(const uint8_t *w, const void *vy, int64_t nb) {
    return dot_q45_K_tiled(w, vy, nb, 0);
}

static float dot_q5_K_tiled(const uint8_t *w, const void *vy, int64_t nb) {
    return dot_q45_K_tiled(w, vy, nb, 1);
}

/* The 256 unsigned 6-bit values of a Q6_K super-block (ql[128] low 4 bits, qh[64] high 2 bits), in element
 * order; the weight is value - 32. */
static inline void unpack_q6_K(const uint8_t *w, int8_t *a) {
    for (int k = 0; k < 2; k++) {
        const uint8_t *ql = w + k * 64, *qh = w + 128 + k * 32;
        int8_t *ak = a + k * 128;
        for (int l = 0; l < 32; l++) {
            ak[l] = (int8_t)((ql[l] & 0x0f) | (((qh[l] >> 0) & 3) << 4));
            ak[l + 32] = (int8_t)((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4));
            ak[l + 64] = (int8_t)((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4));
            ak[l + 96] = (int8_t)((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4));
        }
    }
}

/* Q6_K: ql[128], qh[64], scales[16] int8, d. As ggml_vec_dot_q6_K_q8_K (AVX2): with q the unsigned values, lane l
 * gets sc[2c + l/4] * (sum of q * q8 over elements 4l..4l+3) of every 32-element group c, and the whole -32 offset
 * of sub-blocks 2l and 2l+1, through the activation sums: -32 (sc[2l] bsums[2l] + sc[2l+1] bsums[2l+1]); then
 * acc += (d_x d_w) lanes as for the other types. */
static float dot_q6_K(const uint8_t *w, const void *vy, int64_t nb) {
    const act_q8_K *y = vy;
    float acc[8] = {0};
    for (int64_t i = 0; i < nb; i++, w += 210) {
        const int8_t *q8 = y[i].qs;
        const int8_t *sc = (const int8_t *)(w + 192);
        int8_t a[QK_K];
        unpack_q6_K(w, a);
        const int16_t *bs = y[i].bsums;
        int lanes[8];
        for (int l = 0; l < 8; l++) lanes[l] = -32 * (sc[2 * l] * bs[2 * l] + sc[2 * l + 1] * bs[2 * l + 1]);
        for (int c = 0; c < 8; c++) {
            for (int l = 0; l < 8; l++) {
                lanes[l] += sc[2 * c + l / 4] * dot4(a + 32 * c + 4 * l, q8 + 32 * c + 4 * l);
            }
        }
        const float d = y[i].d * rd_f16(w + 208);
        for (int l = 0; l < 8; l++) acc[l] = fmaf(d, (float)lanes[l], acc[l]);
    }
    return hsum8(acc);
}

/* Q6_K against 8 or more activation rows (see dot_q45_K_tiled): acc = fma(d_w * isum, d_x, acc). */
static float dot_q6_K_tiled(const uint8_t *w, const void *vy, int64_t nb) {
    const act_q8_K *y = vy;
    float acc = 0.0f;
    for (int64_t i = 0; i < nb; i++, w += 210) {
        const int8_t *sc = (const int8_t *)(w + 192);
        int8_t a[QK_K];
        unpack_q6_K(w, a);
        int isum = 0;
        for (int j = 0; j < 16; j++) {
            int s = 0;
            for (int l = 0; l < 16; l++) s += (a[16 * j + l] - 32) * y[i].qs[16 * j + l];
            isum += sc[j] * s;
        }
        acc = fmaf(rd_f16(w + 208) * (float)isum, y[i].d, acc);
    }
    return acc;
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

#endif /* ELDRIC_QK_PORTABLE_H */
