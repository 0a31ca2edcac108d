/* fused_quant.cuh -- shared by the quantised fused MoE's tile kernels (fused_quant.cu) and
 * its decode GEMV path (fused_qgemv.cu): the layout of the workspace region of the quantised
 * path and the GEMV path's entry points. */
#ifndef MOE_FUSED_QUANT_CUH
#define MOE_FUSED_QUANT_CUH

#include "cuda_common.cuh"
#include "fused_quant.h"

/* Byte offsets into the workspace buffer of the regions moe__fused_quant_ws_bytes sizes,
 * computed from the workspace's own max_tokens, top_k, E, H and I (each region 256-aligned):
 *   misc   +0 ntiles (i32); +16 x's per-tensor scale (fp8) or global scale (nvfp4), f32;
 *          +32 the intermediate's; +64 the GEMV path's counters (MOE__FQ_NCTR u32: x chunks
 *          claimed, x chunks done, intermediate chunks claimed, done, intermediate amax bits);
 *   tiles  tile table: expert, first row, rows (wtiles i32 each);
 *   xc/xs  x codes [max_tokens, H] and scales; gc/gs the intermediate's [max_pairs, I]. */
#define MOE__FQ_CTR_OFF 64
#define MOE__FQ_NCTR 5
struct moe__fq_layout {
    size_t misc, tiles, xc, xs, gc, gs;
    int64_t wtiles;
};

static inline moe__fq_layout moe__fq_layout_of(const moe_workspace *ws) {
    const int64_t WP = ws->max_pairs, WT = ws->max_tokens;
    moe__fq_layout L;
    L.wtiles = WP / MOE__FQ_MIN_BM + (WP < ws->E ? WP : ws->E) + 1;
    size_t o = ws->off_fq;
    size_t *const dst[6] = {&L.misc, &L.tiles, &L.xc, &L.xs, &L.gc, &L.gs};
    const int64_t n[6] = {MOE__FQ_MISC_BYTES, L.wtiles * 12, WT * ws->H, WT * (ws->H / 16) + 16, WP * ws->I,
                          WP * (ws->I / 16) + 16};
    for (int i = 0; i < 6; i++) {
        *dst[i] = o;
        o += ((size_t)n[i] + 255) & ~(size_t)255;
    }
    return L;
}

/* Decode GEMV path (fused_qgemv.cu): every quantisation mode, 1 <= T <= the bound of
 * MOE_FUSED_QGEMV (unset: 4; "0": off), local_count > 0.  moe__fq_gemv_eligible says whether
 * a call of moe__cuda_fused_quant takes it; moe__fq_gemv then does the whole call after
 * routing (2 launches on g.stream). */
bool moe__fq_gemv_eligible(const moe__fused_args *A);
moe_status moe__fq_gemv(const moe__cuda_guard &g, const moe__fused_args *A);

#endif
