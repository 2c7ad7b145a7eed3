/* AVX-512 kernels of the quantized matmul (placeholder: none yet). */

#ifndef ELDRIC_QK_AVX512_H
#define ELDRIC_QK_AVX512_H

#include "qk_avx2.h"

#define X512_NONE {NULL, NULL, NULL, NULL, 1, 1}
#define X512_Q4_0 X512_NONE
#define X512_Q5_0 X512_NONE
#define X512_Q8_0 X512_NONE
#define X512_Q6_K X512_NONE
#define X512_Q6_K_TILED X512_NONE
#define X512_Q4_K_GEMV X512_NONE
#define X512_Q4_K_GEMM4 X512_NONE

#endif /* ELDRIC_QK_AVX512_H */
