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

/* ------------------------------------------------------------------------------------------------------------
 * AVX2 versions of the hot dot products: the same arithmetic as the portable kernels above (and as llama.cpp's
 * x86 AVX2 build), in vector registers.
 */

#if QK_X86

TARGET_AVX2 static inline float hsum_ps(__m256 v) {
    __m128 r = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    return _mm_cvtss_f32(r);
}

TARGET_AVX2 static inline int hsum4_epi32(__m128i r) {
    r = _mm_add_epi32(r, _mm_unpackhi_epi64(r, r));
    r = _mm_add_epi32(r, _mm_shuffle_epi32(r, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm_cvtsi128_si32(r);
}

TARGET_AVX2 static inline int hsum_epi32(__m256i v) {
    return hsum4_epi32(_mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1)));
}

/* a * b + c with one rounding. */
TARGET_AVX2 static inline float fma1(float a, float b, float c) {
    return _mm_cvtss_f32(_mm_fmadd_ss(_mm_set_ss(a), _mm_set_ss(b), _mm_set_ss(c)));
}

/* 32 signed bytes times 32 signed bytes -> 8 int32 lanes, lane l = sum over bytes 4l..4l+3. |y| <= 127
 * (activations) keeps the unsigned*signed multiply exact even when x holds -128. */
TARGET_AVX2 static inline __m256i dot_i8_avx2(__m256i x, __m256i y) {
    const __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(x, x), _mm256_sign_epi8(y, x));
    return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
}

/* 32 unsigned bytes (< 128) times 32 signed bytes -> 8 int32 lanes. */
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

/* acc = fma(d, lanes, acc): one block into the 8 lane accumulators. */
TARGET_AVX2 static inline __m256 fma_block_avx2(float d, __m256i lanes, __m256 acc) {
    return _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(lanes), acc);
}

/* Q5_0 values as signed bytes: a clear fifth bit means value - 16, i.e. the byte's top four bits set. */
TARGET_AVX2 static inline __m256i q5_0_values_avx2(const uint8_t *w) {
    return _mm256_or_si256(nibbles_avx2(w + 6), _mm256_andnot_si256(bits_avx2(w + 2), _mm256_set1_epi8((char)0xf0)));
}

TARGET_AVX2 static float dot_q4_1_avx2(const uint8_t *w, const void *vy, int64_t nb) {
    const act_q8_1 *y = vy;
    __m256 acc = _mm256_setzero_ps();
    float summs = 0.0f;
    for (int64_t i = 0; i < nb; i++, w += 20) {
        summs = fma1(f16_avx2(w + 2), y[i].s, summs);
        const __m256i p = dot_u8_avx2(nibbles_avx2(w + 4), _mm256_loadu_si256((const __m256i *)y[i].qs));
        acc = fma_block_avx2(f16_avx2(w) * y[i].d, p, acc);
    }
    return hsum_ps(acc) + summs;
}

TARGET_AVX2 static float dot_q5_1_avx2(const uint8_t *w, const void *vy, int64_t nb) {
    const act_q8_1 *y = vy;
    __m256 acc = _mm256_setzero_ps();
    float summs = 0.0f;
    for (int64_t i = 0; i < nb; i++, w += 24) {
        summs = fma1(f16_avx2(w + 2), y[i].s, summs);
        const __m256i x = _mm256_or_si256(nibbles_avx2(w + 8),
                                          _mm256_and_si256(bits_avx2(w + 4), _mm256_set1_epi8(0x10)));
        const __m256i p = dot_u8_avx2(x, _mm256_loadu_si256((const __m256i *)y[i].qs));
        acc = fma_block_avx2(f16_avx2(w) * y[i].d, p, acc);
    }
    return hsum_ps(acc) + summs;
}

/* The scaled lane sums of one Q4_K/Q5_K super-block: per 64 elements, 32 low nibbles (scale 2j) and 32 high
 * nibbles (scale 2j+1), lane l holding elements 4l..4l+3 of each 32. */
TARGET_AVX2 static inline __m256i q45_K_lanes_avx2(const uint8_t *w, const int8_t *q8, const uint8_t *sc, int five) {
    const __m256i m4 = _mm256_set1_epi8(0x0f), one = _mm256_set1_epi8(1);
    const uint8_t *q4 = w + (five ? 48 : 16);
    const __m256i hb = five ? _mm256_loadu_si256((const __m256i *)(w + 16)) : _mm256_setzero_si256();
    __m256i sumi = _mm256_setzero_si256();
    for (int j = 0; j < 4; j++) {
        const __m256i q = _mm256_loadu_si256((const __m256i *)(q4 + 32 * j));
        __m256i lo = _mm256_and_si256(q, m4);
        __m256i hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
        if (five) {
            lo = _mm256_or_si256(lo, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 2 * j), one), 4));
            hi = _mm256_or_si256(hi, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 2 * j + 1), one), 4));
        }
        const __m256i plo = _mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)(q8 + 64 * j)));
        const __m256i phi = _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(q8 + 64 * j + 32)));
        sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(plo, _mm256_set1_epi16(sc[2 * j])));
        sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(phi, _mm256_set1_epi16(sc[2 * j + 1])));
    }
    return sumi;
}

/* prod[k] = mn[2k] s[2k] + mn[2k+1] s[2k+1], s[m] = the activation sum of sub-block m (see q45_K_min_prods). */
TARGET_AVX2 static inline __m128i q45_K_min_prods_avx2(const int16_t *bsums, const uint8_t *mn) {
    const __m128i s = _mm_hadd_epi16(_mm_loadu_si128((const __m128i *)bsums),
                                     _mm_loadu_si128((const __m128i *)(bsums + 8)));
    return _mm_madd_epi16(_mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)mn)), s);
}

TARGET_AVX2 static inline float dot_q45_K_avx2(const uint8_t *w, const act_q8_K *y, int64_t nb, int five) {
    const int bsize = five ? 176 : 144;
    __m256 acc = _mm256_setzero_ps();
    __m128 accm = _mm_setzero_ps();
    float summs = 0.0f;
    for (int64_t i = 0; i < nb; i++, w += bsize) {
        uint8_t sc[8], mn[8];
        k4_scales(w + 4, sc, mn);
        const float d = y[i].d * f16_avx2(w);
        const float dmin = -y[i].d * f16_avx2(w + 2);
        const __m128i prod = q45_K_min_prods_avx2(y[i].bsums, mn);
        if (five) {
            summs = fma1(dmin, (float)hsum4_epi32(prod), summs);
        } else {
            accm = _mm_fmadd_ps(_mm_set1_ps(dmin), _mm_cvtepi32_ps(prod), accm);
        }
        acc = fma_block_avx2(d, q45_K_lanes_avx2(w, y[i].qs, sc, five), acc);
    }
    if (!five) {
        accm = _mm_add_ps(accm, _mm_movehl_ps(accm, accm));
        summs = _mm_cvtss_f32(_mm_add_ss(accm, _mm_movehdup_ps(accm)));
    }
    return hsum_ps(acc) + summs;
}

TARGET_AVX2 static float dot_q4_K_avx2(const uint8_t *w, const void *vy, int64_t nb) {
    return dot_q45_K_avx2(w, vy, nb, 0);
}

TARGET_AVX2 static float dot_q5_K_avx2(const uint8_t *w, const void *vy, int64_t nb) {
    return dot_q45_K_avx2(w, vy, nb, 1);
}

TARGET_AVX2 static inline float dot_q45_K_tiled_avx2(const uint8_t *w, const act_q8_K *y, int64_t nb, int five) {
    const int bsize = five ? 176 : 144;
    float acc = 0.0f;
    for (int64_t i = 0; i < nb; i++, w += bsize) {
        uint8_t sc[8], mn[8];
        k4_scales(w + 4, sc, mn);
        const int isum = hsum_epi32(q45_K_lanes_avx2(w, y[i].qs, sc, five));
        const int msum = hsum4_epi32(q45_K_min_prods_avx2(y[i].bsums, mn));
        const float r = fma1(-f16_avx2(w + 2), (float)msum, f16_avx2(w) * (float)isum);
        acc = fma1(r, y[i].d, acc);
    }
    return acc;
}

TARGET_AVX2 static float dot_q4_K_tiled_avx2(const uint8_t *w, const void *vy, int64_t nb) {
    return dot_q45_K_tiled_avx2(w, vy, nb, 0);
}

TARGET_AVX2 static float dot_q5_K_tiled_avx2(const uint8_t *w, const void *vy, int64_t nb) {
    return dot_q45_K_tiled_avx2(w, vy, nb, 1);
}

/* ---- Tiles (see tile_fn). Each is an always-inlined generic body instantiated for a few fixed shapes, so the
 * accumulators live in registers. */

#define INLINE_AVX2 TARGET_AVX2 static inline __attribute__((always_inline))

/* Ask for the cache lines of the weight block `ahead` bytes further on: a weight row streams from memory once per
 * call (a decode step reads every weight once), and the hardware prefetcher alone leaves the core waiting. */
INLINE_AVX2 void prefetch_block(const uint8_t *w, int bytes, int ahead) {
    for (int o = 0; o < bytes; o += 64) _mm_prefetch((const char *)(w + ahead + o), _MM_HINT_T0);
}

/* The signed values of one Q4_0 / Q5_0 / Q8_0 weight block. */
INLINE_AVX2 __m256i q0_values_avx2(int type, const uint8_t *w) {
    if (type == T_Q4_0) return _mm256_sub_epi8(nibbles_avx2(w + 2), _mm256_set1_epi8(8));
    if (type == T_Q5_0) return q5_0_values_avx2(w);
    return _mm256_loadu_si256((const __m256i *)(w + 2));
}

/* Q4_0 / Q5_0 / Q8_0: as dot_q4_0_avx2 etc., R x C outputs. */
INLINE_AVX2 void tile_q0_avx2(const int type, const int R, const int C, const uint8_t *w, size_t wrow,
                              const uint8_t *y, size_t yrow, int64_t nb, float *out, size_t ostride) {
    const int bsize = type == T_Q4_0 ? 18 : type == T_Q5_0 ? 22 : 34;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[2][4];
    for (int r = 0; r < R; r++) {
        for (int c = 0; c < C; c++) acc[r][c] = _mm256_setzero_ps();
    }
    for (int64_t i = 0; i < nb; i++) {
        for (int r = 0; r < R; r++) {
            const uint8_t *wb = w + r * wrow + i * bsize;
            const __m256i x = q0_values_avx2(type, wb);
            const __m256i ax = _mm256_sign_epi8(x, x);
            const float dw = f16_avx2(wb);
            for (int c = 0; c < C; c++) {
                const act_q8_0 *yb = (const act_q8_0 *)(y + c * yrow) + i;
                const __m256i sy = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)yb->qs), x);
                const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(ax, sy), ones);
                acc[r][c] = fma_block_avx2(dw * yb->d, p, acc[r][c]);
            }
        }
    }
    for (int r = 0; r < R; r++) {
        for (int c = 0; c < C; c++) out[c * ostride + r] = hsum_ps(acc[r][c]);
    }
}

/* Q6_K: as dot_q6_K_avx2 (tiled = 0) or dot_q6_K_tiled_avx2 (tiled = 1), R x C outputs. */
INLINE_AVX2 void tile_q6_K_avx2(const int tiled, const int R, const int C, const uint8_t *w, size_t wrow,
                                const uint8_t *y, size_t yrow, int64_t nb, float *out, size_t ostride) {
    const __m256i m4 = _mm256_set1_epi8(0x0f), m3 = _mm256_set1_epi8(3);
    __m256 acc[2][4];
    float accs[2][4];
    for (int r = 0; r < R; r++) {
        for (int c = 0; c < C; c++) {
            acc[r][c] = _mm256_setzero_ps();
            accs[r][c] = 0.0f;
        }
    }
    for (int64_t i = 0; i < nb; i++) {
        for (int r = 0; r < R; r++) {
            const uint8_t *wb = w + r * wrow + i * 210;
            prefetch_block(wb, 210, 2 * 210);
            const int8_t *sc = (const int8_t *)(wb + 192);
            __m256i sumi[4];
            for (int c = 0; c < C; c++) sumi[c] = _mm256_setzero_si256();
            for (int k = 0; k < 2; k++) {
                const __m256i l0 = _mm256_loadu_si256((const __m256i *)(wb + 64 * k));
                const __m256i l1 = _mm256_loadu_si256((const __m256i *)(wb + 64 * k + 32));
                const __m256i h = _mm256_loadu_si256((const __m256i *)(wb + 128 + 32 * k));
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
                    const __m256i scv = _mm256_set_m128i(_mm_set1_epi16(sc[s + 1]), _mm_set1_epi16(sc[s]));
                    for (int c = 0; c < C; c++) {
                        const act_q8_K *yb = (const act_q8_K *)(y + c * yrow) + i;
                        const __m256i a8 = _mm256_loadu_si256((const __m256i *)(yb->qs + 128 * k + 32 * gi));
                        sumi[c] = _mm256_add_epi32(sumi[c], _mm256_madd_epi16(_mm256_maddubs_epi16(g[gi], a8), scv));
                    }
                }
            }
            const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)sc));
            const float dw = f16_avx2(wb + 208);
            for (int c = 0; c < C; c++) {
                const act_q8_K *yb = (const act_q8_K *)(y + c * yrow) + i;
                const __m256i offset = _mm256_madd_epi16(sc16, _mm256_loadu_si256((const __m256i *)yb->bsums));
                const __m256i lanes = _mm256_sub_epi32(sumi[c], _mm256_slli_epi32(offset, 5));
                if (tiled) {
                    accs[r][c] = fma1(dw * (float)hsum_epi32(lanes), yb->d, accs[r][c]);
                } else {
                    acc[r][c] = fma_block_avx2(yb->d * dw, lanes, acc[r][c]);
                }
            }
        }
    }
    for (int r = 0; r < R; r++) {
        for (int c = 0; c < C; c++) out[c * ostride + r] = tiled ? accs[r][c] : hsum_ps(acc[r][c]);
    }
}

/* Q4_K as llama.cpp computes the weights it repacks: gemv (per64 = 0) or gemm (per64 = 1, see dot_q4_K_repacked),
 * R x C outputs. */
INLINE_AVX2 void tile_q4_K_repacked_avx2(const int per64, const int R, const int C, const uint8_t *w, size_t wrow,
                                         const uint8_t *y, size_t yrow, int64_t nb, float *out, size_t ostride) {
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    float acc[2][4], accm[2][4];
    for (int r = 0; r < R; r++) {
        for (int c = 0; c < C; c++) acc[r][c] = accm[r][c] = 0.0f;
    }
    for (int64_t i = 0; i < nb; i++) {
        for (int r = 0; r < R; r++) {
            const uint8_t *wb = w + r * wrow + i * 144;
            prefetch_block(wb, 144, 2 * 144);
            uint8_t sc[8], mn[8];
            k4_scales(wb + 4, sc, mn);
            __m256i s[4][4]; /* [64-element group j][activation c]; for the gemv only s[0][c], the sum of all */
            for (int j = 0; j < 4; j++) {
                const __m256i q = _mm256_loadu_si256((const __m256i *)(wb + 16 + 32 * j));
                const __m256i lo = _mm256_and_si256(q, m4), hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
                const __m256i slo = _mm256_set1_epi16(sc[2 * j]), shi = _mm256_set1_epi16(sc[2 * j + 1]);
                for (int c = 0; c < C; c++) {
                    const int8_t *q8 = ((const act_q8_K *)(y + c * yrow) + i)->qs + 64 * j;
                    const __m256i plo = _mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)q8));
                    const __m256i phi = _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(q8 + 32)));
                    const __m256i sj = _mm256_add_epi32(_mm256_madd_epi16(plo, slo), _mm256_madd_epi16(phi, shi));
                    if (per64) {
                        s[j][c] = sj;
                    } else {
                        s[0][c] = j == 0 ? sj : _mm256_add_epi32(s[0][c], sj);
                    }
                }
            }
            const float dw = f16_avx2(wb), dminw = f16_avx2(wb + 2);
            for (int c = 0; c < C; c++) {
                const act_q8_K *yb = (const act_q8_K *)(y + c * yrow) + i;
                const __m128i msum = q45_K_min_prods_avx2(yb->bsums, mn);
                const float d = dw * yb->d, dmin = dminw * yb->d;
                if (per64) {
                    /* the four 64-element sums: two hadds leave (s0 s1 s2 s3) in each 128-bit half */
                    const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(s[0][c], s[1][c]),
                                                        _mm256_hadd_epi32(s[2][c], s[3][c]));
                    int is[4], ms[4];
                    _mm_storeu_si128((__m128i *)is, _mm_add_epi32(_mm256_castsi256_si128(h),
                                                                  _mm256_extracti128_si256(h, 1)));
                    _mm_storeu_si128((__m128i *)ms, msum);
                    for (int k = 0; k < 4; k++) {
                        acc[r][c] = fma1((float)is[k], d, acc[r][c]);
                        accm[r][c] = fma1((float)ms[k], dmin, accm[r][c]);
                    }
                } else {
                    acc[r][c] = fma1((float)hsum_epi32(s[0][c]), d, acc[r][c]);
                    accm[r][c] = fma1((float)hsum4_epi32(msum), dmin, accm[r][c]);
                }
            }
        }
    }
    for (int r = 0; r < R; r++) {
        for (int c = 0; c < C; c++) out[c * ostride + r] = acc[r][c] - accm[r][c];
    }
}

/* The instances: name_RxC for the shapes the driver uses. */
#define TILE_INSTANCE(name, body, arg, R, C)                                                                       \
    TARGET_AVX2 static void name##_##R##x##C(const uint8_t *w, size_t wrow, const uint8_t *y, size_t yrow,        \
                                             int64_t nb, float *out, size_t ostride) {                           \
        body(arg, R, C, w, wrow, y, yrow, nb, out, ostride);                                                     \
    }
#define TILE_INSTANCES(name, body, arg)                                                                             \
    TILE_INSTANCE(name, body, arg, 1, 4)                                                                          \
    TILE_INSTANCE(name, body, arg, 2, 4)

TILE_INSTANCES(tile_q4_0, tile_q0_avx2, T_Q4_0)
TILE_INSTANCES(tile_q5_0, tile_q0_avx2, T_Q5_0)
TILE_INSTANCES(tile_q8_0, tile_q0_avx2, T_Q8_0)
TILE_INSTANCES(tile_q6_K, tile_q6_K_avx2, 0)
TILE_INSTANCES(tile_q6_K_tiled, tile_q6_K_avx2, 1)
TILE_INSTANCES(tile_q4_K_gemv, tile_q4_K_repacked_avx2, 0)
TILE_INSTANCES(tile_q4_K_gemm4, tile_q4_K_repacked_avx2, 1)

/* The one-output kernels of the same types: 1 x 1 tiles. */
#define DOT_FROM_TILE(name, body, arg)                                                                              \
    TARGET_AVX2 static float name(const uint8_t *w, const void *y, int64_t nb) {                                  \
        float out;                                                                                                \
        body(arg, 1, 1, w, 0, (const uint8_t *)y, 0, nb, &out, 0);                                                \
        return out;                                                                                               \
    }

/* One block of Q4_0 / Q5_0 / Q8_0 into the accumulator. */
INLINE_AVX2 __m256 q0_block_avx2(const int type, const uint8_t *w, const act_q8_0 *y, __m256 acc) {
    const __m256i p = dot_i8_avx2(q0_values_avx2(type, w), _mm256_loadu_si256((const __m256i *)y->qs));
    return fma_block_avx2(f16_avx2(w) * y->d, p, acc);
}

/* One output of Q4_0 / Q5_0 / Q8_0, the decode step's kernel: two blocks per turn into the one accumulator, and a
 * prefetch for the weight row streaming from memory. */
INLINE_AVX2 float dot_q0_avx2(const int type, const uint8_t *w, const void *vy, int64_t nb) {
    const int bsize = type == T_Q4_0 ? 18 : type == T_Q5_0 ? 22 : 34;
    const act_q8_0 *y = vy;
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 2 <= nb; i += 2, w += 2 * bsize) {
        _mm_prefetch((const char *)(w + 512), _MM_HINT_T0);
        acc = q0_block_avx2(type, w, &y[i], acc);
        acc = q0_block_avx2(type, w + bsize, &y[i + 1], acc);
    }
    if (i < nb) acc = q0_block_avx2(type, w, &y[i], acc);
    return hsum_ps(acc);
}

TARGET_AVX2 static float dot_q4_0_avx2(const uint8_t *w, const void *y, int64_t nb) {
    return dot_q0_avx2(T_Q4_0, w, y, nb);
}

TARGET_AVX2 static float dot_q5_0_avx2(const uint8_t *w, const void *y, int64_t nb) {
    return dot_q0_avx2(T_Q5_0, w, y, nb);
}

TARGET_AVX2 static float dot_q8_0_avx2(const uint8_t *w, const void *y, int64_t nb) {
    return dot_q0_avx2(T_Q8_0, w, y, nb);
}
DOT_FROM_TILE(dot_q6_K_avx2, tile_q6_K_avx2, 0)
DOT_FROM_TILE(dot_q6_K_tiled_avx2, tile_q6_K_avx2, 1)
DOT_FROM_TILE(dot_q4_K_gemv_avx2, tile_q4_K_repacked_avx2, 0)
DOT_FROM_TILE(dot_q4_K_gemm4_avx2, tile_q4_K_repacked_avx2, 1)

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
