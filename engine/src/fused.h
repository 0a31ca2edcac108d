/* fused.h -- fused MoE internals shared by the core (fused.c), the CPU reference
 * (cpu/fused_cpu.c) and the CUDA kernels (kernels/fused_moe.cu).  C11 and CUDA C++. */
#ifndef MOE_FUSED_H
#define MOE_FUSED_H

#include "internal.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Packed experts.  Layout is the backend's own:
 *   CPU:  w13 f32 [E, N1, H] (logical row order, values rounded to bf16), w2 f32 [E, H, I];
 *   CUDA: w13 bf16 [E, N1, H] with gate and up rows interleaved in groups of 8 (packed row
 *         16g + r is gate row 8g + r for r < 8, up row 8g + r - 8 otherwise; relu2: logical
 *         order), w2 bf16 [E, H, I];
 *   both: b13 f32 [E, N1] in w13's row order, b2 f32 [E, H] (NULL when absent).
 * N1 = 2I for gated activations, I for relu2. */
struct moe_experts {
    moe_device dev;
    int64_t E, H, I, N1;
    int act;
    float alpha, beta, limit;
    moe_tensor *w13, *w2, *b13, *b2;
    /* Quantised experts (moe_experts_new_quant; engine/src/fused_quant.c): quant is the
     * moe_quant_mode (0 = bf16: the fields above only); q13 [E, N1, H] and q2 [E, H, I] in
     * logical row order on dev.  CPU: w13/w2 then hold their f32 dequantised values. */
    int quant;
    struct moe_qtensor *q13, *q2;
    /* CUDA mxint4: moe__i4_fold_of of q13's / q2's scales at creation (0: no f16 fold) */
    float i4_fold13, i4_fold2;
    /* CUDA mxfp4: every ue8m0 scale code of q13 and q2 at most 128 (scales <= 2) at creation, so
     * the Hopper register-operand kernel may fold its bf16 bit placement's 2^126 into the scale
     * (MOE__FQ_F4S) */
    int mx_small;
};

/* Scratch of moe_fused_moe: one allocation carved into regions (byte offsets into buf).
 * CPU workspaces hold only ids, wts and err. */
struct moe_workspace {
    moe_device dev;
    int64_t max_tokens;
    int32_t top_k;
    int64_t E, H, I;
    int64_t max_pairs;   /* max_tokens * top_k */
    int64_t max_tiles;   /* row tiles of the grouped GEMMs (smallest tile height) */
    size_t off_cnt;      /* CUDA: i32 [max_tokens, H/64] arrival counters of the folded finalize, 0 between calls */
    moe_tensor *buf;     /* u8 [bytes] */
    size_t off_ids, off_wts, off_sorted, off_tiles, off_ntiles, off_err, off_inter, off_y;
    size_t off_fq, fq_bytes; /* CUDA, quantised experts: region of fused_quant.cu (0 otherwise) */
    size_t bytes;
};

/* Shared by moe_experts_new and moe_experts_new_quant (fn names the caller in messages):
 * check the activation parameters of cfg; make the record (checks the CUDA tile rule on H
 * and I first; the weight fields stay NULL, quant 0). */
moe_status moe__experts_check_cfg(const char *fn, const moe_experts_cfg *cfg);
moe_status moe__experts_record(const char *fn, const moe_experts_cfg *cfg, moe_device dev, int64_t E, int64_t H,
                               int64_t I, int64_t N1, moe_experts **out);

/* Count one call of moe_fused_path `path` (moe_fused_path_counts). */
void moe__fused_path_hit(int path);

/* CPU reference pieces shared by cpu/fused_cpu.c and cpu/fused_quant_cpu.c: the dot product
 * in a fixed order (8 interleaved partial sums, combined pairwise, then the tail), the
 * activation of ex on gate g and up u, and the combine (per token, f32 over k in order of
 * the pairs with has[p], one rounding to bf16 into out [T, H]). */
float moe__cpu_fdot(const float *a, const float *b, int64_t n);
float moe__cpu_fact(const struct moe_experts *ex, float g, float u);
void moe__cpu_fcombine(int64_t T, int64_t H, int K, const unsigned char *has, const float *ypair, uint16_t *out);

/* Smallest row tile of the CUDA grouped GEMMs (sizes max_tiles). */
#define MOE__FUSED_MIN_BM 32

/* moe_route's argument checks (route.c) without the launch: for moe_fused_moe when the backend routes
 * (route_pending).  ids and weights must be given. */
moe_status moe__route_validate(const moe_route_cfg *cfg, const moe_tensor *logits, const moe_tensor *bias,
                               moe_tensor *ids, moe_tensor *weights, const moe_tensor *replay);

/* Validated arguments of the backend `fused` slot. */
typedef struct moe__fused_args {
    const struct moe_experts *ex;
    struct moe_workspace *ws;   /* CPU: may be NULL */
    const moe_tensor *hidden;   /* bf16 [T, H] contiguous */
    const moe_tensor *ids;      /* i32 [T, K] contiguous: the routing used */
    const moe_tensor *wts;      /* f32 [T, K] contiguous */
    moe_tensor *out;            /* bf16 [T, H] contiguous */
    int64_t T;
    int32_t K;
    int32_t local_offset, local_count;
    int32_t llama4;             /* weight on the input, combine with 1 */
    int32_t routed;             /* ids came from the caller (may be out of range on CUDA) */
    /* Not routed: the call's routing (validated), for kernels that compute a token's routing themselves
     * (CUDA decode, fused_qgemv.cu).  NULL in routed mode. */
    const moe_route_cfg *route;
    const moe_tensor *logits, *bias;
    /* route_pending (CUDA, quantised experts): the routing is left to the backend, which writes ids,
     * wts (f32) and replay (NULL: none) itself -- inside its decode kernels where it can, else by
     * launching the routing kernel first (moe__fused_quant_run).  0: ids and wts hold the routing. */
    int32_t route_pending;
    moe_tensor *replay;
} moe__fused_args;

#ifdef __cplusplus
}
#endif

#endif
