/* AVX-512 kernels of the quantized matmul (AVX-512 F/BW/VL/DQ and VNNI): the bits of the AVX2 and portable ones,
 * which are llama.cpp's AVX2 bits, with fewer instructions.
 *
 * What may change with the instruction set and what may not: the integer block dot products are exact sums, the
 * same integers however they are formed (vpdpbusd here, maddubs + madd in ggml's AVX2 code; neither overflows:
 * |w| <= 128, |y| <= 127, at most 32 products per lane sum); what must stay is the order of the float operations
 * of each output. So a 512-bit register holds one block of two weight rows (one per 256-bit half, the 8 lanes of
 * each as ggml's AVX2 code has them) and every lane gets exactly the fused multiply-add it gets there: two rows (or
 * two blocks of work) advance per instruction, each output in its own order.
 *
 * vpdpbusd multiplies unsigned by signed bytes; the signed weights enter as u = w + 2^k (the nibble itself for
 * Q4_0 and Q5_0, w ^ 0x80 for Q8_0) and the sum of u*y is corrected by 2^k * sum(y) of the same four activations
 * (act_q8_0.nsum4, made by the quantizer), folded into the accumulator the instruction starts from. The K-quants
 * (Q6_K, the repacked Q4_K) keep maddubs, their values being unsigned, and apply the sub-block scales with
 * vpdpwssd (madd and add in one); where llama.cpp has a scalar float step per super-block, the integer sums of 16
 * outputs are gathered into one register and the steps run one output per lane.
 *
 * Compiled per function with target attributes; _qkernels.c calls them only on CPUs that have all of these.
 */

#ifndef ELDRIC_QK_AVX512_H
#define ELDRIC_QK_AVX512_H

#include "qk_avx2.h"

#if QK_X86

#define TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c,bmi2")))
#define INLINE_AVX512 TARGET_AVX512 static inline __attribute__((always_inline))

static inline uint32_t rd_u16(const uint8_t *p) { return (uint32_t)(p[0] | (p[1] << 8)); }

/* The weights stream from memory (a decode step reads each once), and the hardware prefetcher alone leaves the
 * core waiting: while rows [0, R) are at block i, ask for the part of the next R rows (contiguous with these) that
 * keeps pace with them, R block sizes per block. Measured on the Gemma 3 output head (178 MB, 2 threads): 17 GB/s
 * of the machine's 20, against 11-13 GB/s with a fixed distance ahead in each row. */
INLINE_AVX512 void prefetch_next_rows(const uint8_t *w, size_t wrow, int R, int64_t i, int bsize) {
    const uint8_t *next = w + (size_t)R * wrow + (size_t)(i * R * bsize);
    for (int o = 0; o < R * bsize; o += 64) _mm_prefetch((const char *)(next + o), _MM_HINT_T0);
}

/* [a x 8 | b x 8]: two fp16 scales widened, one per 256-bit half. */
INLINE_AVX512 __m512 pair_scales(const uint8_t *a, const uint8_t *b) {
    const __m128 d = _mm_cvtph_ps(_mm_cvtsi32_si128((int)(rd_u16(a) | (rd_u16(b) << 16)))); /* [a, b, 0, 0] */
    const __m512i idx = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    return _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(d));
}

/* ggml's hsum_float_8 of each 256-bit half: out[0] = half a, out[ostride] = half b. */
INLINE_AVX512 void store_pair(__m512 acc, float *out, size_t ostride) {
    out[0] = hsum_ps(_mm512_castps512_ps256(acc));
    out[ostride] = hsum_ps(_mm512_extractf32x8_ps(acc, 1));
}

/* ---- Q4_0 / Q5_0 / Q8_0 (ggml_vec_dot_q*_0_q8_0 and llamafile's tinyBLAS_Q0_AVX, which agree: per block
 * acc = fma(d_w d_x, lanes, acc) on 8 lanes, hsum_float_8 at the end) */

/* log2 of the offset that makes the weights unsigned. */
static inline int q0_shift(int type) { return type == T_Q4_0 ? 3 : type == T_Q5_0 ? 4 : 7; }

/* The unsigned values of one block of weight rows a and b, row a in bytes 0..31 and row b in 32..63, element order:
 * Q4_0 nibble (w + 8), Q5_0 nibble | fifth bit << 4 (w + 16), Q8_0 w ^ 0x80 (w + 128). */
INLINE_AVX512 __m512i q0_pair_values(const int type, const uint8_t *a, const uint8_t *b) {
    if (type == T_Q8_0) {
        const __m512i v = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(a + 2))),
                                             _mm256_loadu_si256((const __m256i *)(b + 2)), 1);
        return _mm512_xor_si512(v, _mm512_set1_epi8((char)0x80));
    }
    const int qs = type == T_Q4_0 ? 2 : 6;
    const __m256i t = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(a + qs))),
                                              _mm_loadu_si128((const __m128i *)(b + qs)), 1);
    /* [a, b, a >> 4, b >> 4] -> [a, a >> 4, b, b >> 4]: low nibbles are elements 0..15, high ones 16..31 */
    __m512i z = _mm512_inserti64x4(_mm512_castsi256_si512(t), _mm256_srli_epi16(t, 4), 1);
    z = _mm512_and_si512(_mm512_shuffle_i64x2(z, z, _MM_SHUFFLE(3, 1, 2, 0)), _mm512_set1_epi8(0x0f));
    if (type == T_Q5_0) { /* bit j of qh is element j's fifth bit */
        const __mmask64 hb = _cvtu64_mask64((uint64_t)rd_u32(a + 2) | ((uint64_t)rd_u32(b + 2) << 32));
        z = _mm512_mask_add_epi8(z, hb, z, _mm512_set1_epi8(16));
    }
    return z;
}

/* P pairs of weight rows (2P rows: w, w + wrow, ...) x C activation rows: out[c * ostride + r]. */
INLINE_AVX512 void tile_q0_avx512(const int type, const int P, const int C, const uint8_t *w, size_t wrow,
                                  const uint8_t *y, size_t yrow, int64_t nb, float *out, size_t ostride) {
    const int bsize = type == T_Q4_0 ? 18 : type == T_Q5_0 ? 22 : 34, shift = q0_shift(type);
    __m512 acc[2][8];
    for (int p = 0; p < P; p++) {
        for (int c = 0; c < C; c++) acc[p][c] = _mm512_setzero_ps();
    }
    for (int64_t i = 0; i < nb; i++) {
        prefetch_next_rows(w, wrow, 2 * P, i, bsize);
        __m512i u[2];
        __m512 dw[2];
        for (int p = 0; p < P; p++) {
            const uint8_t *a = w + (size_t)(2 * p) * wrow + i * bsize, *b = a + wrow;
            u[p] = q0_pair_values(type, a, b);
            dw[p] = pair_scales(a, b);
        }
        /* one activation row at a time, so that only its block and offsets are live beside the accumulators */
        for (int c = 0; c < C; c++) {
            const act_q8_0 *yb = (const act_q8_0 *)(y + c * yrow) + i;
            const __m512i yv = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)yb->qs));
            /* -2^k * (sum of each lane's four activations) */
            const __m512i off =
                _mm512_slli_epi32(_mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)yb->nsum4)), shift);
            const __m512 dy = _mm512_set1_ps(yb->d);
            for (int p = 0; p < P; p++) {
                const __m512i lanes = _mm512_dpbusd_epi32(off, u[p], yv);
                acc[p][c] = _mm512_fmadd_ps(_mm512_mul_ps(dw[p], dy), _mm512_cvtepi32_ps(lanes), acc[p][c]);
            }
        }
    }
    for (int p = 0; p < P; p++) {
        for (int c = 0; c < C; c++) store_pair(acc[p][c], out + c * ostride + 2 * p, 1);
    }
}

/* The instances: name_RxC, R = 2P weight rows. */
#define TILE512(name, body, arg, P, C)                                                                           \
    TARGET_AVX512 static void name##_##P##x##C(const uint8_t *w, size_t wrow, const uint8_t *y, size_t yrow,     \
                                               int64_t nb, float *out, size_t ostride) {                        \
        body(arg, P, C, w, wrow, y, yrow, nb, out, ostride);                                                    \
    }

TILE512(tile512_q4_0, tile_q0_avx512, T_Q4_0, 2, 1)
TILE512(tile512_q4_0, tile_q0_avx512, T_Q4_0, 2, 2)
TILE512(tile512_q4_0, tile_q0_avx512, T_Q4_0, 2, 4)
TILE512(tile512_q4_0, tile_q0_avx512, T_Q4_0, 2, 8)
TILE512(tile512_q5_0, tile_q0_avx512, T_Q5_0, 2, 1)
TILE512(tile512_q5_0, tile_q0_avx512, T_Q5_0, 2, 2)
TILE512(tile512_q5_0, tile_q0_avx512, T_Q5_0, 2, 4)
TILE512(tile512_q5_0, tile_q0_avx512, T_Q5_0, 2, 8)
TILE512(tile512_q8_0, tile_q0_avx512, T_Q8_0, 2, 1)
TILE512(tile512_q8_0, tile_q0_avx512, T_Q8_0, 2, 2)
TILE512(tile512_q8_0, tile_q0_avx512, T_Q8_0, 2, 4)
TILE512(tile512_q8_0, tile_q0_avx512, T_Q8_0, 2, 8)

/* Four fp16 fields at p, p + stride, ... widened: [row 0, 1, 2, 3]. */
INLINE_AVX512 __m128 four_f16(const uint8_t *p, size_t stride) {
    return _mm_cvtph_ps(_mm_set_epi16(0, 0, 0, 0, (short)rd_u16(p + 3 * stride), (short)rd_u16(p + 2 * stride),
                                      (short)rd_u16(p + stride), (short)rd_u16(p)));
}

/* The integer sums of 4 weight rows (2 pairs) x 4 activation rows, z[c][p] = [row 2p lanes | row 2p+1 lanes],
 * gathered into one register: lane LANE16(r, c) holds the sum of output (row r, activation c). */
#define LANE16(r, c) (4 * (2 * ((c) >> 1) + ((r) & 1)) + 2 * ((c) & 1) + ((r) >> 1))
INLINE_AVX512 __m512i sum16_epi32(__m512i z[4][2]) {
    __m512i t[4], u[2];
    for (int m = 0; m < 4; m++) { /* z[m][0], z[m][1]: per 128-bit lane [a0+a2, b0+b2, a1+a3, b1+b3] */
        t[m] = _mm512_add_epi32(_mm512_unpacklo_epi32(z[m][0], z[m][1]), _mm512_unpackhi_epi32(z[m][0], z[m][1]));
    }
    for (int q = 0; q < 2; q++) { /* per 128-bit lane: the lane's sum of each of the 4 registers behind t[2q..] */
        u[q] = _mm512_add_epi32(_mm512_unpacklo_epi64(t[2 * q], t[2 * q + 1]),
                                _mm512_unpackhi_epi64(t[2 * q], t[2 * q + 1]));
    }
    /* the two 128-bit lanes of each half */
    return _mm512_add_epi32(_mm512_shuffle_i64x2(u[0], u[1], _MM_SHUFFLE(2, 0, 2, 0)),
                            _mm512_shuffle_i64x2(u[0], u[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

/* Lane indexes of LANE16: which weight row (rid) and activation row (cid) each lane holds. */
INLINE_AVX512 void lane16_tables(__m512i *ridx, __m512i *cidx) {
    int rid[16], cid[16];
    for (int r = 0; r < 4; r++) {
        for (int c = 0; c < 4; c++) rid[LANE16(r, c)] = r, cid[LANE16(r, c)] = c;
    }
    *ridx = _mm512_loadu_si512(rid);
    *cidx = _mm512_loadu_si512(cid);
}

/* ---- Q6_K (ggml_vec_dot_q6_K_q8_K: lanes as in dot_q6_K, acc = fma(d_x d_w, lanes, acc), hsum_float_8; and
 * the tiled path for 8+ rows: acc = fma(d_w * isum, d_x, acc)) */

/* Two 32-byte pieces, row a's in bytes 0..31 and row b's in 32..63. */
INLINE_AVX512 __m512i pair_load(const uint8_t *a, const uint8_t *b) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)a)),
                              _mm256_loadu_si256((const __m256i *)b), 1);
}

/* The unsigned 6-bit values of 32-element group 4k + gi of a super-block of rows a and b (as unpack_q6_K), from
 * the half k's low bits l0 = ql[64k..], l1 = ql[64k + 32..] and high bits h = qh[32k..], each a pair_load. */
INLINE_AVX512 __m512i q6_K_pair_group(__m512i l0, __m512i l1, __m512i h, int gi) {
    const __m512i m4 = _mm512_set1_epi8(0x0f), m3 = _mm512_set1_epi8(3);
    const __m512i lo = gi & 1 ? l1 : l0;
    const __m512i nib = gi < 2 ? _mm512_and_si512(lo, m4) : _mm512_and_si512(_mm512_srli_epi16(lo, 4), m4);
    const __m512i hb = gi == 0 ? _mm512_and_si512(h, m3) : _mm512_and_si512(_mm512_srli_epi16(h, 2 * gi), m3);
    return _mm512_or_si512(nib, _mm512_slli_epi16(hb, 4));
}

/* The sum of each 256-bit half's 8 int32 lanes: [half a, half b]. */
INLINE_AVX512 void pair_hsum_epi32(__m512i v, int *a, int *b) {
    *a = hsum_epi32(_mm512_castsi512_si256(v));
    *b = hsum_epi32(_mm512_extracti64x4_epi64(v, 1));
}

/* P pairs of Q6_K weight rows x C activation rows; tiled: the 8+ row path's order, else vec_dot's. */
INLINE_AVX512 void tile_q6_K_avx512(const int tiled, const int P, const int C, const uint8_t *w, size_t wrow,
                                    const uint8_t *y, size_t yrow, int64_t nb, float *out, size_t ostride) {
    const __m512i zero = _mm512_setzero_si512();
    /* word index of the scale of each 16 activations of group 0, per 128-bit lane: a's 0 and 1, b's 0 and 1 */
    const __m512i sc_idx0 = _mm512_set_epi16(17, 17, 17, 17, 17, 17, 17, 17, 16, 16, 16, 16, 16, 16, 16, 16,
                                             1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    const int wide = tiled && P == 2 && C == 4; /* the tiled order of 16 outputs side by side (LANE16) */
    __m512i ridx, cidx;
    lane16_tables(&ridx, &cidx);
    __m512 acc[2][4], acc16 = _mm512_setzero_ps();
    float accs[2][4][2];
    for (int p = 0; p < P; p++) {
        for (int c = 0; c < C; c++) {
            acc[p][c] = _mm512_setzero_ps();
            accs[p][c][0] = accs[p][c][1] = 0.0f;
        }
    }
    for (int64_t i = 0; i < nb; i++) {
        __m512i isums[4][2];
        float dy[4];
        prefetch_next_rows(w, wrow, 2 * P, i, 210);
        for (int p = 0; p < P; p++) {
            const uint8_t *a = w + (size_t)(2 * p) * wrow + i * 210, *b = a + wrow;
            /* the 16 int8 scales of a, then of b, widened to words */
            const __m512i sc = _mm512_cvtepi8_epi16(_mm256_inserti128_si256(
                _mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(a + 192))),
                _mm_loadu_si128((const __m128i *)(b + 192)), 1));
            const __m512 dw = pair_scales(a + 208, b + 208);
            __m512i lanes[4];
            for (int c = 0; c < C; c++) {
                const act_q8_K *yb = (const act_q8_K *)(y + c * yrow) + i;
                /* the -32 offsets: -32 (sc[2l] bsums[2l] + sc[2l+1] bsums[2l+1]) in lane l of each half */
                const __m512i bs = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)yb->bsums));
                lanes[c] = _mm512_sub_epi32(zero, _mm512_slli_epi32(_mm512_madd_epi16(sc, bs), 5));
            }
            /* group by group, every activation row: only one group's values and scales are live at a time */
            for (int k = 0; k < 2; k++) {
                const __m512i l0 = pair_load(a + 64 * k, b + 64 * k), l1 = pair_load(a + 64 * k + 32, b + 64 * k + 32);
                const __m512i h = pair_load(a + 128 + 32 * k, b + 128 + 32 * k);
                for (int gi = 0; gi < 4; gi++) {
                    const __m512i g = q6_K_pair_group(l0, l1, h, gi);
                    const __m512i scv =
                        _mm512_permutexvar_epi16(_mm512_add_epi16(sc_idx0, _mm512_set1_epi16((short)(8 * k + 2 * gi))), sc);
                    for (int c = 0; c < C; c++) {
                        const int8_t *q8 = ((const act_q8_K *)(y + c * yrow) + i)->qs + 128 * k + 32 * gi;
                        const __m512i a8 = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)q8));
                        lanes[c] = _mm512_dpwssd_epi32(lanes[c], _mm512_maddubs_epi16(g, a8), scv);
                    }
                }
            }
            for (int c = 0; c < C; c++) {
                const act_q8_K *yb = (const act_q8_K *)(y + c * yrow) + i;
                if (wide) {
                    isums[c][p] = lanes[c];
                    dy[c] = yb->d;
                } else if (tiled) {
                    int ia, ib;
                    pair_hsum_epi32(lanes[c], &ia, &ib);
                    const float dwa = _mm512_cvtss_f32(dw), dwb = _mm512_cvtss_f32(_mm512_shuffle_f32x4(dw, dw, 2));
                    accs[p][c][0] = fma1(dwa * (float)ia, yb->d, accs[p][c][0]);
                    accs[p][c][1] = fma1(dwb * (float)ib, yb->d, accs[p][c][1]);
                } else {
                    acc[p][c] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(yb->d), dw), _mm512_cvtepi32_ps(lanes[c]),
                                                acc[p][c]);
                }
            }
        }
        if (wide) { /* r = d_w * isum, acc = fma(r, d_x, acc), 16 outputs at once */
            const __m512 dw16 = _mm512_permutexvar_ps(ridx, _mm512_castps128_ps512(four_f16(w + i * 210 + 208, wrow)));
            const __m512 dy16 = _mm512_permutexvar_ps(cidx, _mm512_castps128_ps512(_mm_loadu_ps(dy)));
            const __m512 r16 = _mm512_mul_ps(dw16, _mm512_cvtepi32_ps(sum16_epi32(isums)));
            acc16 = _mm512_fmadd_ps(r16, dy16, acc16);
        }
    }
    if (wide) {
        float a16[16];
        _mm512_storeu_ps(a16, acc16);
        for (int r = 0; r < 4; r++) {
            for (int c = 0; c < 4; c++) out[c * ostride + r] = a16[LANE16(r, c)];
        }
        return;
    }
    for (int p = 0; p < P; p++) {
        for (int c = 0; c < C; c++) {
            if (tiled) {
                out[c * ostride + 2 * p] = accs[p][c][0];
                out[c * ostride + 2 * p + 1] = accs[p][c][1];
            } else {
                store_pair(acc[p][c], out + c * ostride + 2 * p, 1);
            }
        }
    }
}

TILE512(tile512_q6_K, tile_q6_K_avx512, 0, 2, 1)
TILE512(tile512_q6_K, tile_q6_K_avx512, 0, 2, 2)
TILE512(tile512_q6_K, tile_q6_K_avx512, 0, 2, 4)
TILE512(tile512_q6_K_tiled, tile_q6_K_avx512, 1, 2, 1)
TILE512(tile512_q6_K_tiled, tile_q6_K_avx512, 1, 2, 2)
TILE512(tile512_q6_K_tiled, tile_q6_K_avx512, 1, 2, 4)

/* ---- Q4_K weights llama.cpp repacks (q4_K_8x8): its gemv, per super-block acc = fma(isum, d_w d_x, acc) and
 * accm = fma(msum, dmin_w d_x, accm), and its gemm, the same per 64 elements (see dot_q4_K_repacked). Out:
 * acc - accm. Two weight rows per register as above; the integer sums are then gathered per output and the float
 * steps of several outputs run side by side, one output per lane. */

/* The 8 six-bit scales and 8 mins of a Q4_K super-block (k4_scales' values) as bytes [sc 0..7, mn 0..7], by
 * ggml's word arithmetic (its utmp). */
static inline void k4_scales_mins(const uint8_t *b, uint8_t out[16]) {
    uint32_t u[4];
    memcpy(u, b, 12);
    u[3] = ((u[2] >> 4) & 0x0f0f0f0fu) | (((u[1] >> 6) & 0x03030303u) << 4);
    const uint32_t mins_lo = u[1] & 0x3f3f3f3fu;
    u[1] = (u[2] & 0x0f0f0f0fu) | (((u[0] >> 6) & 0x03030303u) << 4);
    u[2] = mins_lo;
    u[0] &= 0x3f3f3f3fu;
    memcpy(out, u, 16);
}

/* [sum of z0's half a, of z0's half b (rows 0, 1), of z1's half a, half b (rows 2, 3)]. */
INLINE_AVX512 __m128i sum4_epi32(__m512i z0, __m512i z1) {
    const __m512i t = _mm512_add_epi32(_mm512_unpacklo_epi32(z0, z1), _mm512_unpackhi_epi32(z0, z1));
    __m512i u = _mm512_add_epi32(_mm512_unpacklo_epi64(t, t), _mm512_unpackhi_epi64(t, t));
    u = _mm512_add_epi32(u, _mm512_shuffle_i64x2(u, u, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm_unpacklo_epi32(_mm512_castsi512_si128(u), _mm512_extracti32x4_epi32(u, 2));
}

/* [row 0, 1, 2, 3] msum from the pairs' [a prod 0..3 | b prod 0..3]. */
INLINE_AVX512 __m128i msum4_epi32(__m256i p0, __m256i p1) {
    __m256i h = _mm256_hadd_epi32(p0, p1);
    h = _mm256_hadd_epi32(h, h);
    return _mm_unpacklo_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

/* 4 repacked Q4_K weight rows x C activation rows (C = 1, 2 or 4); per64: the gemm's order (C = 4 only), else
 * the gemv's. */
INLINE_AVX512 void tile_q4_K_repacked_avx512(const int per64, const int C, const uint8_t *w, size_t wrow,
                                             const uint8_t *y, size_t yrow, int64_t nb, float *out, size_t ostride) {
    const __m512i m4 = _mm512_set1_epi8(0x0f);
    /* word index of scale m of row a (words 0..15) and of row b (16..31) in [sc a 0..7, sc b 0..7] */
    const __m512i sc_idx0 = _mm512_set_epi16(8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8,
                                             0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
    /* the lane order of sum16_epi32 for the float steps of 16 outputs (C = 4) */
    int msrc[16], kidx[16];
    __mmask16 hi_c = 0;
    for (int r = 0; r < 4; r++) {
        for (int c = 0; c < 4; c++) {
            const int l = LANE16(r, c);
            msrc[l] = 4 * c + r, kidx[l] = 16 * (c & 1) + 4 * r;
            if (c >= 2) hi_c |= (__mmask16)(1u << l);
        }
    }
    __m512i ridx, cidx;
    lane16_tables(&ridx, &cidx);
    const __m512i midx = _mm512_loadu_si512(msrc), kidx0 = _mm512_loadu_si512(kidx);
    __m512 acc16 = _mm512_setzero_ps(), accm16 = _mm512_setzero_ps();
    __m128 acc4[2] = {_mm_setzero_ps(), _mm_setzero_ps()}, accm4[2] = {_mm_setzero_ps(), _mm_setzero_ps()};
    for (int64_t i = 0; i < nb; i++) {
        const uint8_t *w0 = w + i * 144;
        prefetch_next_rows(w, wrow, 4, i, 144);
        uint8_t sm[2][2][16]; /* [pair][row]: scales 0..7, mins 0..7 */
        __m512i sc16[2];
        for (int p = 0; p < 2; p++) {
            const uint8_t *a = w0 + (size_t)(2 * p) * wrow, *b = a + wrow;
            k4_scales_mins(a + 4, sm[p][0]);
            k4_scales_mins(b + 4, sm[p][1]);
            const __m128i ab = _mm_unpacklo_epi64(_mm_loadu_si128((const __m128i *)sm[p][0]),
                                                  _mm_loadu_si128((const __m128i *)sm[p][1]));
            sc16[p] = _mm512_castsi256_si512(_mm256_cvtepu8_epi16(ab)); /* [sc a 0..7, sc b 0..7] */
        }
        const __m128 dw4 = four_f16(w0, wrow), dmin4 = four_f16(w0 + 2, wrow);
        float dy[4];
        for (int c = 0; c < C; c++) dy[c] = ((const act_q8_K *)(y + c * yrow) + i)->d;
        /* 16 outputs side by side in the lane order of sum16_epi32 (C = 4) */
        const __m512 dyv = _mm512_permutexvar_ps(cidx, _mm512_castps128_ps512(_mm_loadu_ps(dy)));
        const __m512 d16 = _mm512_mul_ps(_mm512_permutexvar_ps(ridx, _mm512_castps128_ps512(dw4)), dyv);
        __m512i z[4][2]; /* [c][p]: the gemv's whole sums, or the gemm's sums of the current 64 elements */
        for (int c = 0; c < C; c++) z[c][0] = z[c][1] = _mm512_setzero_si512();
        /* 64 elements at a time (sub-block 2j in the low nibbles, 2j+1 in the high), every activation row: only
         * one group's values and scales are live beside the sums */
        for (int j = 0; j < 4; j++) {
            __m512i lo[2], hi[2], slo[2], shi[2];
            for (int p = 0; p < 2; p++) {
                const uint8_t *a = w0 + (size_t)(2 * p) * wrow;
                const __m512i q = pair_load(a + 16 + 32 * j, a + wrow + 16 + 32 * j);
                lo[p] = _mm512_and_si512(q, m4);
                hi[p] = _mm512_and_si512(_mm512_srli_epi16(q, 4), m4);
                slo[p] = _mm512_permutexvar_epi16(_mm512_add_epi16(sc_idx0, _mm512_set1_epi16((short)(2 * j))), sc16[p]);
                shi[p] =
                    _mm512_permutexvar_epi16(_mm512_add_epi16(sc_idx0, _mm512_set1_epi16((short)(2 * j + 1))), sc16[p]);
            }
            for (int c = 0; c < C; c++) {
                const int8_t *q8 = ((const act_q8_K *)(y + c * yrow) + i)->qs + 64 * j;
                const __m512i ylo = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)q8));
                const __m512i yhi = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(q8 + 32)));
                for (int p = 0; p < 2; p++) {
                    __m512i s = per64 ? _mm512_setzero_si512() : z[c][p];
                    s = _mm512_dpwssd_epi32(s, _mm512_maddubs_epi16(lo[p], ylo), slo[p]);
                    z[c][p] = _mm512_dpwssd_epi32(s, _mm512_maddubs_epi16(hi[p], yhi), shi[p]);
                }
            }
            if (per64) acc16 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum16_epi32(z)), d16, acc16);
        }
        /* the minimum terms: prod[k] = mn[2k] s[2k] + mn[2k+1] s[2k+1], s the activation sums per 32 */
        __m256i mp[4][2]; /* [c][p]: [a prod 0..3 | b prod 0..3] */
        for (int p = 0; p < 2; p++) {
            const __m256i mn16 = _mm256_cvtepu8_epi16(_mm_unpackhi_epi64(_mm_loadu_si128((const __m128i *)sm[p][0]),
                                                                         _mm_loadu_si128((const __m128i *)sm[p][1])));
            for (int c = 0; c < C; c++) {
                const act_q8_K *yb = (const act_q8_K *)(y + c * yrow) + i;
                const __m128i s8 = _mm_hadd_epi16(_mm_loadu_si128((const __m128i *)yb->bsums),
                                                  _mm_loadu_si128((const __m128i *)(yb->bsums + 8)));
                mp[c][p] = _mm256_madd_epi16(mn16, _mm256_broadcastsi128_si256(s8));
            }
        }
        if (C < 4) { /* the gemv for 1 or 2 activation rows: 4 weight rows side by side */
            for (int c = 0; c < C; c++) {
                const __m128 dy4 = _mm_set1_ps(dy[c]);
                acc4[c] = _mm_fmadd_ps(_mm_cvtepi32_ps(sum4_epi32(z[c][0], z[c][1])), _mm_mul_ps(dw4, dy4), acc4[c]);
                accm4[c] = _mm_fmadd_ps(_mm_cvtepi32_ps(msum4_epi32(mp[c][0], mp[c][1])), _mm_mul_ps(dmin4, dy4),
                                        accm4[c]);
            }
            continue;
        }
        const __m512 dm16 = _mm512_mul_ps(_mm512_permutexvar_ps(ridx, _mm512_castps128_ps512(dmin4)), dyv);
        if (per64) {
            __m512i wm[4]; /* [c]: 128-bit lane r = row r's prods 0..3 */
            for (int c = 0; c < 4; c++) wm[c] = _mm512_inserti64x4(_mm512_castsi256_si512(mp[c][0]), mp[c][1], 1);
            for (int k = 0; k < 4; k++) {
                const __m512i kk = _mm512_add_epi32(kidx0, _mm512_set1_epi32(k));
                const __m512i mk = _mm512_mask_blend_epi32(hi_c, _mm512_permutex2var_epi32(wm[0], kk, wm[1]),
                                                           _mm512_permutex2var_epi32(wm[2], kk, wm[3]));
                accm16 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(mk), dm16, accm16);
            }
        } else {
            acc16 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum16_epi32(z)), d16, acc16);
            __m512i ms = _mm512_castsi128_si512(msum4_epi32(mp[0][0], mp[0][1]));
            ms = _mm512_inserti32x4(ms, msum4_epi32(mp[1][0], mp[1][1]), 1);
            ms = _mm512_inserti32x4(ms, msum4_epi32(mp[2][0], mp[2][1]), 2);
            ms = _mm512_inserti32x4(ms, msum4_epi32(mp[3][0], mp[3][1]), 3);
            accm16 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_permutexvar_epi32(midx, ms)), dm16, accm16);
        }
    }
    if (C < 4) {
        for (int c = 0; c < C; c++) _mm_storeu_ps(out + c * ostride, _mm_sub_ps(acc4[c], accm4[c]));
        return;
    }
    float a16[16], m16[16];
    _mm512_storeu_ps(a16, acc16);
    _mm512_storeu_ps(m16, accm16);
    for (int r = 0; r < 4; r++) {
        for (int c = 0; c < 4; c++) out[c * ostride + r] = a16[LANE16(r, c)] - m16[LANE16(r, c)];
    }
}

TARGET_AVX512 static void tile512_q4_K_gemv_2x1(const uint8_t *w, size_t wrow, const uint8_t *y, size_t yrow,
                                                int64_t nb, float *out, size_t ostride) {
    tile_q4_K_repacked_avx512(0, 1, w, wrow, y, yrow, nb, out, ostride);
}
TARGET_AVX512 static void tile512_q4_K_gemv_2x2(const uint8_t *w, size_t wrow, const uint8_t *y, size_t yrow,
                                                int64_t nb, float *out, size_t ostride) {
    tile_q4_K_repacked_avx512(0, 2, w, wrow, y, yrow, nb, out, ostride);
}
TARGET_AVX512 static void tile512_q4_K_gemv_2x4(const uint8_t *w, size_t wrow, const uint8_t *y, size_t yrow,
                                                int64_t nb, float *out, size_t ostride) {
    tile_q4_K_repacked_avx512(0, 4, w, wrow, y, yrow, nb, out, ostride);
}
TARGET_AVX512 static void tile512_q4_K_gemm4_2x4(const uint8_t *w, size_t wrow, const uint8_t *y, size_t yrow,
                                                 int64_t nb, float *out, size_t ostride) {
    tile_q4_K_repacked_avx512(1, 4, w, wrow, y, yrow, nb, out, ostride);
}

/* kset entries (qk_matmul.h): {dot, rows (4 x 1), tile (4 x tc), half (4 x tc/2), tile1 (1 x tc), rw, tc}; a
 * weight row alone (a chunk's last) takes the AVX2 kernels, which compute the same bits. The Q4_0/Q5_0/Q8_0
 * tiles take 8 activation rows (their per-block work is mostly per weight pair), the K-quants' 4. */
#define X512_KSET(name)                                                                                           \
    {dot_##name##_avx2, tile512_##name##_2x1, {tile512_##name##_2x4, tile512_##name##_2x2, NULL}, tile_##name##_1x4, 4, 4}
#define X512_Q0(name)                                                                                             \
    {dot_##name##_avx2, tile512_##name##_2x1, {tile512_##name##_2x8, tile512_##name##_2x4, tile512_##name##_2x2}, \
     NULL, 4, 8}
#define X512_Q4_0 X512_Q0(q4_0)
#define X512_Q5_0 X512_Q0(q5_0)
#define X512_Q8_0 X512_Q0(q8_0)
#define X512_Q6_K X512_KSET(q6_K)
#define X512_Q6_K_TILED X512_KSET(q6_K_tiled)
#define X512_Q4_K_GEMV X512_KSET(q4_K_gemv)
/* the gemm takes rows in fours: a range of them never leaves rows for a 4 x 1 kernel */
#define X512_Q4_K_GEMM4 {dot_q4_K_gemm4_avx2, NULL, {tile512_q4_K_gemm4_2x4, NULL, NULL}, tile_q4_K_gemm4_1x4, 4, 4}

#else
#define X512_Q4_0 X512_NONE
#define X512_Q5_0 X512_NONE
#define X512_Q8_0 X512_NONE
#define X512_Q6_K X512_NONE
#define X512_Q6_K_TILED X512_NONE
#define X512_Q4_K_GEMV X512_NONE
#define X512_Q4_K_GEMM4 X512_NONE
#endif /* QK_X86 */

#define X512_NONE {NULL, NULL, {NULL, NULL, NULL}, NULL, 1, 1}

#endif /* ELDRIC_QK_AVX512_H */
