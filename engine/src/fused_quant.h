/* fused_quant.h -- the fused MoE in the quantisation modes (fp8, fp8_block, nvfp4, mxfp4,
 * mxint4): hooks used by fused.c, the CPU reference (cpu/fused_quant_cpu.c) and the CUDA
 * kernels (kernels/fused_quant.cu).  Numerics: docs/quantization.md, "Fused MoE per mode".
 * C11 and CUDA C++. */
#ifndef MOE_FUSED_QUANT_H
#define MOE_FUSED_QUANT_H

#include "fused.h"

#include <limits.h>
#include <math.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Smallest row tile of the quantised CUDA grouped GEMMs (sizes its tile table). */
#define MOE__FQ_MIN_BM 16

/* Bytes of the region's first part: tile count, per-tensor scales, the decode GEMV path's
 * counters (kernels/fused_quant.cuh lays it out). */
#define MOE__FQ_MISC_BYTES 128

/* Bytes of the CUDA workspace region of the quantised path for max_tokens x top_k pairs
 * (tile table, quantised activations and intermediate, their scales). */
size_t moe__fused_quant_ws_bytes(int64_t max_tokens, int32_t top_k, int64_t E, int64_t H, int64_t I);

/* moe_fused_moe's backend step for experts with ex->quant != 0 (arguments validated). */
moe_status moe__fused_quant_run(const moe__fused_args *args);

/* Backends. */
moe_status moe__cpu_fused_quant(const moe__fused_args *args);
#ifdef MOE_HAVE_CUDA
moe_status moe__cuda_fused_quant(const moe__fused_args *args);
/* mxint4 weight scales (bf16, contiguous, on CUDA): r[0] the largest floor(log2) of a nonzero
 * finite scale (INT_MIN: none), r[1] the smallest exponent of a nonzero scale's lowest set bit
 * (INT_MAX: none), r[2] 1 if any scale is inf / NaN.  Synchronises. */
moe_status moe__cuda_i4_range(const moe_tensor *scales, int *r);
/* The largest byte of a contiguous u8 / ue8m0 CUDA tensor (0 when empty).  Synchronises. */
moe_status moe__cuda_u8_max(const moe_tensor *t, int *m);
#endif

/* mxint4's f16 fold (docs/quantization.md, "mxint4 on f16 MMAs"): 2^b for scales of range r (as
 * moe__cuda_i4_range gives it) such that every int4 x scale x 2^b is exact in f16 -- the
 * largest scale's binade at 2^12 (|-8 x s| <= 65280), every scale's lowest bit at or above 2^-24
 * (f16's subnormal step) -- or 0 where no b does (a scale's lowest bit more than 36 binades
 * below the largest scale's binade, inf / NaN scales).  Inline: spec/c/test_fused_quant.c
 * checks it without a GPU. */
static inline float moe__i4_fold_of(const int *r) {
    if (r[2]) return 0.0f;
    if (r[0] == INT_MIN) return 1.0f; /* every scale zero: any b */
    const int b = 12 - r[0];
    if (b < -126 || b > 126 || r[1] + b < -24) return 0.0f;
    return ldexpf(1.0f, b);
}

#ifdef __cplusplus
}
#endif

#endif
