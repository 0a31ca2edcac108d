/* quant_rows.cuh -- the per-row K-block quantiser's device code, shared by the quantisers'
 * kernels (quant.cu: k_rows) and the quantised decode GEMV path (fused_qgemv.cu, which
 * quantises its activations inside its own kernels), so that both write the same codes and
 * scales: every value comes from quant_math.h. */
#ifndef MOE_QUANT_ROWS_CUH
#define MOE_QUANT_ROWS_CUH

#include "cuda_common.cuh"
#include "quant_math.h"

#include <cuda_fp8.h>

/* Maximum of v over groups of `width` lanes (a power of two <= 32; every lane takes part). */
__device__ __forceinline__ uint32_t moe__q_warp_max(uint32_t v, int width) {
    for (int o = width / 2; o > 0; o >>= 1) {
        uint32_t w = __shfl_xor_sync(0xffffffffu, v, o);
        v = w > v ? w : v;
    }
    return v;
}

/* Lanes of a K-block of B columns: EPL elements per lane, L = B / EPL lanes per block. */
template <int B> struct moe__q_rows_geom {
    static constexpr int EPL = B <= 64 ? 2 : B / 32;
    static constexpr int L = B / EPL;
};

/* Quantise K-blocks (groups) g0 .. g1-1 of B columns of a row-major source (group g covers
 * flat elements g*B .. g*B+B-1) with the NT threads of a block, NT / L groups at a time, the
 * first at g0, then g0 + step, ... (k_rows: its block's share of a grid-stride loop; the GEMV
 * path: one chunk, step NT / L).  fp8_block: f32 scale per group; nvfp4: e4m3 scale per group
 * from the matrix amax bits mat_amax[(g*B) / n_per] (its global scale); mxfp4: ue8m0; mxint4:
 * bf16.  Codes at data (packed modes: whole bytes, low nibble first).  Every lane of every
 * warp must call it (amax by shuffles within lane groups).
 * W16 (fp8_block only): instead of the codes, their f16 values (exact) into data read as uint16_t
 * [n] -- which may be src itself (each lane reads its elements before writing them).
 * A lane's EPL elements are loaded as one vector when src is bf16 and 8-byte aligned, and fp8
 * codes stored as one word when data is 4-byte aligned (same values either way). */
template <int MODE, int B, int NT, bool W16 = false>
__device__ __forceinline__ void moe__q_rows(const void *src, int dt, int64_t g0, int64_t g1, int64_t step,
                                            int64_t n_per, const unsigned int *mat_amax, uint8_t *data,
                                            void *scales) {
    constexpr int EPL = moe__q_rows_geom<B>::EPL;
    constexpr int L = moe__q_rows_geom<B>::L;
    static_assert(!W16 || (MODE == MOE_QUANT_FP8_BLOCK && EPL == 4), "W16: fp8_block 1x128 only");
    const int lane_g = threadIdx.x % L;
    const bool vload = dt == MOE_BF16 && ((uintptr_t)src & 7) == 0;
    const bool vstore = ((uintptr_t)data & (W16 ? 7 : 3)) == 0;
    for (int64_t base = g0; base < g1; base += step) {
        int64_t g = base + threadIdx.x / L;
        bool valid = g < g1;
        int64_t e0 = g * B + (int64_t)lane_g * EPL;
        float x[EPL];
        uint32_t v = 0;
        if (vload && (EPL == 2 || EPL == 4)) {
            uint32_t w[2] = {0, 0};
            if (valid) {
                if (EPL == 4) {
                    const uint2 u = *(const uint2 *)((const uint16_t *)src + e0);
                    w[0] = u.x;
                    w[1] = u.y;
                } else {
                    w[0] = *(const uint32_t *)((const uint16_t *)src + e0);
                }
            }
#pragma unroll
            for (int j = 0; j < EPL; j++) x[j] = __uint_as_float((j & 1) ? w[j >> 1] & 0xFFFF0000u : w[j >> 1] << 16);
        } else {
#pragma unroll
            for (int j = 0; j < EPL; j++) x[j] = valid ? moe__cuda_load_f32(src, dt, e0 + j) : 0.0f;
        }
#pragma unroll
        for (int j = 0; j < EPL; j++) {
            uint32_t b = moe__q_absbits(x[j]);
            v = b > v ? b : v;
        }
        v = moe__q_warp_max(v, L); /* every lane takes part; groups are lane-aligned */
        if (!valid) continue;
        float amax = moe__q_amax(v);
        if (MODE == MOE_QUANT_FP8_BLOCK) {
            float s = moe__q_fp8_scale(amax);
            if (lane_g == 0) ((float *)scales)[g] = s;
            uint8_t c[EPL];
#pragma unroll
            for (int j = 0; j < EPL; j++) c[j] = moe__q_fp8_code(x[j], s);
            if (W16) {
                uint16_t h[4];
#pragma unroll
                for (int j = 0; j < 4; j++) h[j] = __nv_cvt_fp8_to_halfraw((__nv_fp8_storage_t)c[j], __NV_E4M3).x;
                uint16_t *d16 = (uint16_t *)data + e0;
                if (vstore) {
                    *(uint2 *)d16 = make_uint2((uint32_t)h[0] | ((uint32_t)h[1] << 16), (uint32_t)h[2] | ((uint32_t)h[3] << 16));
                } else {
#pragma unroll
                    for (int j = 0; j < 4; j++) d16[j] = h[j];
                }
            } else if (EPL == 4 && vstore) {
                *(uint32_t *)(data + e0) =
                    (uint32_t)c[0] | ((uint32_t)c[1] << 8) | ((uint32_t)c[2 % EPL] << 16) | ((uint32_t)c[3 % EPL] << 24);
            } else {
#pragma unroll
                for (int j = 0; j < EPL; j++) data[e0 + j] = c[j];
            }
        } else if (MODE == MOE_QUANT_NVFP4) {
            float gs = moe__q_nvfp4_global(moe__q_amax(mat_amax[(g * B) / n_per]));
            uint8_t code = moe__q_nvfp4_scale(amax, gs);
            if (lane_g == 0) ((uint8_t *)scales)[g] = code;
            float s = moe__e4m3_to_f32(code);
            data[e0 >> 1] = (uint8_t)(moe__q_nvfp4_code(x[0], s, gs) | (moe__q_nvfp4_code(x[1], s, gs) << 4));
        } else if (MODE == MOE_QUANT_MXFP4) {
            uint8_t code = moe__q_mx_scale(v);
            if (lane_g == 0) ((uint8_t *)scales)[g] = code;
            data[e0 >> 1] = (uint8_t)(moe__q_mx_code(x[0], code) | (moe__q_mx_code(x[1], code) << 4));
        } else { /* MXINT4 */
            uint16_t sb = moe__q_int4_scale(amax);
            if (lane_g == 0) ((uint16_t *)scales)[g] = sb;
            float s = moe__bf16_to_f32(sb);
            data[e0 >> 1] = (uint8_t)(moe__q_int4_code(x[0], s) | (moe__q_int4_code(x[1], s) << 4));
        }
    }
}

#endif
