/* AVX2 kernels of the quantized matmul: the same arithmetic as the portable ones (qk_portable.h) and as
 * llama.cpp's x86 AVX2 build, in vector registers. Compiled per function with target attributes, so the module
 * needs no -march flag; _qkernels.c calls them only where the CPU has AVX2, FMA and F16C.
 */

#ifndef ELDRIC_QK_AVX2_H
#define ELDRIC_QK_AVX2_H

#include "qk_portable.h"

#if QK_X86

#define TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))


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

#endif /* QK_X86 */
#endif /* ELDRIC_QK_AVX2_H */
