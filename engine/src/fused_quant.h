/* fused_quant.h -- the fused MoE in the quantisation modes (fp8, fp8_block, nvfp4, mxfp4,
 * mxint4): hooks used by fused.c, the CPU reference (cpu/fused_quant_cpu.c) and the CUDA
 * kernels (kernels/fused_quant.cu).  Numerics: docs/quantization.md, "Fused MoE per mode".
 * C11 and CUDA C++. */
#ifndef MOE_FUSED_QUANT_H
#define MOE_FUSED_QUANT_H

#include "fused.h"

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
#endif

#ifdef __cplusplus
}
#endif

#endif
