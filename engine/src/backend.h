/* backend.h -- the interface every compute backend implements (ggml-style table of function
 * pointers).  The core validates arguments, then dispatches on the device type of the
 * tensors.  Slots marked OPTIONAL may be NULL: the core then reports MOE_ERR_UNSUPPORTED. */
#ifndef MOE_BACKEND_H
#define MOE_BACKEND_H

#include "internal.h"

#ifdef __cplusplus
extern "C" {
#endif

struct moe__fused_args;

typedef struct moe_backend {
    const char *name;

    /* ---- memory (REQUIRED) ---- */
    moe_status (*alloc)(int dev_index, size_t bytes, void **out);
    void (*free)(int dev_index, void *ptr);
    /* Synchronous raw copies; for the CPU backend all three are memcpy. */
    moe_status (*copy_h2d)(int dev_index, void *dst, const void *src, size_t bytes);
    moe_status (*copy_d2h)(int dev_index, void *dst, const void *src, size_t bytes);
    moe_status (*copy_d2d)(int dev_index, void *dst, const void *src, size_t bytes);
    moe_status (*synchronize)(int dev_index);

    /* ---- element-wise (REQUIRED) ---- arguments already validated by the core;
     * tensors are on this backend's device, shapes equal, any strides and dtypes. */
    moe_status (*copy_cast)(moe_tensor *dst, const moe_tensor *src);
    moe_status (*fill)(moe_tensor *t, double value);
    /* kind 0: uniform [a, b); kind 1: normal(mean a, std b) */
    moe_status (*rand)(moe_tensor *t, uint64_t seed, int kind, double a, double b);
    moe_status (*arange)(moe_tensor *t, double start, double step);

    /* ---- routing (OPTIONAL) ---- validated: logits [T,E] contiguous; bias NULL or [E]
     * contiguous; ids i32 [T,K] and weights [T,K] contiguous; replay NULL or i16 [R>=T, K]
     * contiguous.  T may be 0. */
    moe_status (*route)(const moe_route_cfg *cfg, const moe_tensor *logits,
                        const moe_tensor *bias, moe_tensor *ids, moe_tensor *weights,
                        moe_tensor *replay);

    /* ---- fused MoE (OPTIONAL; engine/src/fused.h has the structs) ----
     * fused_pack: w13 [E, N1, H], w2 [E, H, I] (f32 or bf16), b13 [E, N1] / b2 [E, H] (f32
     * or bf16, may be NULL), all contiguous on this backend's device; fills ex->w13, ex->w2,
     * ex->b13, ex->b2 in the backend's own layout.
     * fused: every argument validated by engine/src/fused.c, T >= 1, routing done. */
    moe_status (*fused_pack)(struct moe_experts *ex, const moe_tensor *w13, const moe_tensor *w2,
                             const moe_tensor *b13, const moe_tensor *b2);
    moe_status (*fused)(const struct moe__fused_args *args);
} moe_backend;

const moe_backend *moe__cpu_backend(void);
/* NULL when built without CUDA.  Implemented in kernels/. */
const moe_backend *moe__cuda_backend(void);
/* engine/src/cpu/ops_cpu.c: dense math reference (validated by engine/src/ops.c) */
moe_status moe__cpu_matmul_nt(const moe_tensor *a, const moe_tensor *b, moe_tensor *out);
moe_status moe__cpu_rmsnorm(const moe_tensor *x, const moe_tensor *w, double eps, moe_tensor *out);
moe_status moe__cpu_axpby(double alpha, const moe_tensor *x, double beta, moe_tensor *y);

/* Backend of a device, or NULL with the last error set (fn names the caller). */
const moe_backend *moe__backend_for(const char *fn, moe_device dev);
/* Status of the last failed moe__backend_for on this thread (its message is the last error). */
moe_status moe__backend_status(void);

#ifdef MOE_HAVE_CUDA
/* kernels/cuda_backend.cu: capture state for moe_graph_* (the core forwards to these). */
moe_status moe__cuda_graph_begin(int dev_index);
moe_status moe__cuda_graph_end(void **graph_exec);
void moe__cuda_graph_abort(void);
int moe__cuda_graph_capturing(void);
moe_status moe__cuda_graph_replay(void *graph_exec);
void moe__cuda_graph_free(void *graph_exec);
moe_status moe__cuda_graph_time(void *graph_exec, int warmup, int n, float *times_us);
/* kernels/async_copy.cu: pinned host memory and asynchronous device-to-host copies */
moe_status moe__cuda_host_alloc(size_t bytes, void **out);
void moe__cuda_host_free(void *p);
moe_status moe__cuda_d2h_async(int dev, void *dst, const void *src, size_t bytes, void **event);
moe_status moe__cuda_event_wait(void *event);
int moe__cuda_event_query(void *event);
void moe__cuda_event_free(void *event);
/* kernels/ops.cu: dense math (validated by engine/src/ops.c) */
moe_status moe__cuda_matmul_nt(const moe_tensor *a, const moe_tensor *b, moe_tensor *out);
moe_status moe__cuda_rmsnorm(const moe_tensor *x, const moe_tensor *w, double eps, moe_tensor *out);
moe_status moe__cuda_axpby(double alpha, const moe_tensor *x, double beta, moe_tensor *y);
/* kernels/quant.cu: quantisers (validated, outputs allocated by engine/src/quant.c) */
moe_status moe__cuda_quantize(const moe_tensor *src, moe_qtensor *q);
moe_status moe__cuda_dequantize(const moe_qtensor *q, moe_tensor *out);
int moe__cuda_device_count(void);
moe_status moe__cuda_device_info(int index, char *buf, size_t buflen);
#endif

#ifdef __cplusplus
}
#endif

#endif
