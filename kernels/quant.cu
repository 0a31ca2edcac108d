/* quant.cu -- quantisers and dequantisers on CUDA, bit-identical to the CPU reference
 * (engine/src/cpu/quant_cpu.c): both take every scale and code from quant_math.h, whose
 * divisions and products are __fdiv_rn / __fmul_rn here (one IEEE rounding, no FMA), and amax
 * is a maximum of absolute-value bit patterns (exact in any reduction order).
 *
 *   fp8, nvfp4 global: k_amax (atomicMax of the bits into the scale / global tensor, zeroed
 *       first) -> k_fp8_tensor, or for nvfp4 k_nvfp4_bf16 (16-byte aligned bf16: one 16-column
 *       block a thread) or k_rows (each thread derives the per-matrix scale from the amax bits)
 *       -> k_finalize (amax bits -> scale, in place).  Stream order does the rest.
 *   fp8_block 128x128: k_fp8_block128, one 256-thread block per 128x128 block.
 *   fp8_block 1x128, nvfp4, mxfp4, mxint4: k_rows, a group of lanes per K-block (8 lanes for
 *       16 columns, 16 for 32, 32 for 128), amax by __shfl_xor_sync within the group; each lane
 *       writes whole bytes (two nibbles of packed data).
 *   dequantise: k_dequant, one element per thread (grid-stride).
 * Validation and allocation: engine/src/quant.c.  No host synchronisation, no allocation. */
#include "cuda_common.cuh"
#include "quant_math.h"
#include "quant_rows.cuh"

namespace {

constexpr int Q_THREADS = 256;

/* amax bits of each matrix m (blockIdx.y) of n_per elements into amax[m] (zeroed before). */
__global__ void k_amax(const void *src, int dt, int64_t n_per, unsigned int *amax) {
    int64_t m = blockIdx.y;
    const int64_t base = m * n_per;
    uint32_t v = 0;
    const int64_t t0 = (int64_t)blockIdx.x * blockDim.x + threadIdx.x, step = (int64_t)gridDim.x * blockDim.x;
    if (dt == MOE_BF16 && n_per % 8 == 0 && ((uintptr_t)src & 15) == 0) {
        /* 8 values a load; |bf16| bits << 16 are the f32 absolute bits */
        const uint4 *p = (const uint4 *)((const uint16_t *)src + base);
        for (int64_t i = t0; i < n_per / 8; i += step) {
            const uint4 q = __ldg(p + i);
            const uint32_t w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const uint32_t lo = (w[j] & 0x7FFFu) << 16, hi = (w[j] >> 16 & 0x7FFFu) << 16;
                v = max(v, max(lo, hi));
            }
        }
    } else {
        for (int64_t i = t0; i < n_per; i += step) {
            uint32_t b = moe__q_absbits(moe__cuda_load_f32(src, dt, base + i));
            v = b > v ? b : v;
        }
    }
    /* one atomic a block: one a warp serialised ~17 thousand atomics on one word (nvfp4's x at
     * Qwen3-30B-A3B T = 1024: 10.4 us for 4 MB, H100, fifteenth session) */
    __shared__ uint32_t red[32];
    v = moe__q_warp_max(v, 32);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
    __syncthreads();
    if (threadIdx.x < 32) {
        v = threadIdx.x < (blockDim.x + 31) / 32 ? red[threadIdx.x] : 0u;
        v = moe__q_warp_max(v, 32);
        if (threadIdx.x == 0 && v != 0) atomicMax(amax + m, v);
    }
}

/* scales[m] <- fp8 scale (nvfp4 = 0) or nvfp4 global (nvfp4 = 1) of the amax bits in place. */
__global__ void k_finalize(unsigned int *buf, int64_t n, int nvfp4) {
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float amax = moe__q_amax(buf[i]);
    float s = nvfp4 ? moe__q_nvfp4_global(amax) : moe__q_fp8_scale(amax);
    buf[i] = moe__f32_bits(s);
}

/* fp8 per matrix: data[i] = e4m3(x / (amax[m] / 448)). */
__global__ void k_fp8_tensor(const void *src, int dt, int64_t n, int64_t n_per, const unsigned int *amax,
                             uint8_t *data) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        float s = moe__q_fp8_scale(moe__q_amax(amax[i / n_per]));
        data[i] = moe__q_fp8_code(moe__cuda_load_f32(src, dt, i), s);
    }
}

/* fp8_block weights: block (blockIdx.x, blockIdx.y) = (column block, row block) of matrix
 * blockIdx.z.  Thread t handles columns (t % 32) * 4 .. +3 of rows t / 32 + 8 i, i < 16. */
__global__ void __launch_bounds__(Q_THREADS) k_fp8_block128(const void *src, int dt, int64_t N, int64_t K,
                                                            uint8_t *data, float *scales) {
    __shared__ uint32_t red[Q_THREADS / 32];
    int64_t m = blockIdx.z, rb = blockIdx.y, cb = blockIdx.x;
    int64_t ncb = K / 128;
    int64_t start = m * N * K + rb * 128 * K + cb * 128;
    int c0 = (threadIdx.x & 31) * 4, r0 = threadIdx.x >> 5;
    float x[16][4];
    uint32_t v = 0;
#pragma unroll
    for (int i = 0; i < 16; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) {
            x[i][j] = moe__cuda_load_f32(src, dt, start + (int64_t)(r0 + 8 * i) * K + c0 + j);
            uint32_t b = moe__q_absbits(x[i][j]);
            v = b > v ? b : v;
        }
    v = moe__q_warp_max(v, 32);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
    __syncthreads();
    v = 0;
#pragma unroll
    for (int w = 0; w < Q_THREADS / 32; w++) v = red[w] > v ? red[w] : v;
    float s = moe__q_fp8_scale(moe__q_amax(v));
    if (threadIdx.x == 0) scales[(m * (N / 128) + rb) * ncb + cb] = s;
#pragma unroll
    for (int i = 0; i < 16; i++) {
        uint32_t word = 0;
#pragma unroll
        for (int j = 0; j < 4; j++) word |= (uint32_t)moe__q_fp8_code(x[i][j], s) << (8 * j);
        *(uint32_t *)(data + start + (int64_t)(r0 + 8 * i) * K + c0) = word;
    }
}

/* nvfp4 from bf16, 16-byte aligned: one 16-column block a thread (32 bytes in, 8 code bytes and
 * one scale code out), the same functions as moe__q_rows (quant_math.h), so the same codes and
 * scales; the matrix's amax bits in mat_amax[(g * 16) / n_per]. */
__global__ void __launch_bounds__(Q_THREADS) k_nvfp4_bf16(const uint4 *src, int64_t groups, int64_t n_per,
                                                          const unsigned int *mat_amax, uint2 *data, uint8_t *scales) {
    /* one matrix (x, the common case): its global scale once, not a 64-bit division and an IEEE
     * division per group */
    const bool one = groups * 16 <= n_per;
    const float gs1 = one ? moe__q_nvfp4_global(moe__q_amax(mat_amax[0])) : 0.0f;
    for (int64_t g = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; g < groups; g += (int64_t)gridDim.x * blockDim.x) {
        const uint4 a = __ldg(src + 2 * g), b = __ldg(src + 2 * g + 1);
        const uint32_t w[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
        uint32_t m = 0;
#pragma unroll
        for (int i = 0; i < 8; i++) m = max(m, max(w[i] & 0x7FFFu, (w[i] >> 16) & 0x7FFFu));
        const float gs = one ? gs1 : moe__q_nvfp4_global(moe__q_amax(mat_amax[(g * 16) / n_per]));
        const uint8_t code = moe__q_nvfp4_scale(moe__q_amax(m << 16), gs);
        scales[g] = code;
        const float sc = moe__e4m3_to_f32(code);
        uint32_t out[2] = {0, 0};
#pragma unroll
        for (int i = 0; i < 16; i++) {
            const uint32_t h = (w[i >> 1] >> (16 * (i & 1))) & 0xFFFFu;
            out[i >> 3] |= (uint32_t)moe__q_nvfp4_code(__uint_as_float(h << 16), sc, gs) << (4 * (i & 7));
        }
        data[g] = make_uint2(out[0], out[1]);
    }
}

/* Per-row K-blocks of B columns (quant_rows.cuh), a grid-stride loop over the groups. */
template <int MODE, int B>
__global__ void __launch_bounds__(Q_THREADS) k_rows(const void *src, int dt, int64_t groups, int64_t n_per,
                                                    const unsigned int *mat_amax, uint8_t *data, void *scales) {
    constexpr int GPB = Q_THREADS / moe__q_rows_geom<B>::L; /* groups per thread block per iteration */
    moe__q_rows<MODE, B, Q_THREADS>(src, dt, (int64_t)blockIdx.x * GPB, groups, (int64_t)gridDim.x * GPB, n_per,
                                    mat_amax, data, scales);
}

struct deq_args {
    const uint8_t *data;
    const void *scales;
    const float *global;
    void *out;
    int odt, mode, block_rows, block_cols;
    int64_t n, N, K;
};

__global__ void k_dequant(deq_args a) {
    const int64_t NK = a.N * a.K;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < a.n; i += (int64_t)gridDim.x * blockDim.x) {
        int64_t m = i / NK, r = (i / a.K) % a.N, c = i % a.K;
        float v;
        switch (a.mode) {
        case MOE_QUANT_FP8: v = moe__q_deq_fp8(a.data[i], ((const float *)a.scales)[m]); break;
        case MOE_QUANT_FP8_BLOCK: {
            int64_t nrb = a.N / a.block_rows, ncb = a.K / a.block_cols;
            float s = ((const float *)a.scales)[(m * nrb + r / a.block_rows) * ncb + c / a.block_cols];
            v = moe__q_deq_fp8(a.data[i], s);
            break;
        }
        case MOE_QUANT_NVFP4:
            v = moe__q_deq_nvfp4((uint8_t)moe__cuda_nibble(a.data, i),
                                 ((const uint8_t *)a.scales)[(m * a.N + r) * (a.K / 16) + c / 16], a.global[m]);
            break;
        case MOE_QUANT_MXFP4:
            v = moe__q_deq_mxfp4((uint8_t)moe__cuda_nibble(a.data, i),
                                 ((const uint8_t *)a.scales)[(m * a.N + r) * (a.K / 32) + c / 32]);
            break;
        default: /* MXINT4 */
            v = moe__q_deq_int4((uint8_t)moe__cuda_nibble(a.data, i),
                                ((const uint16_t *)a.scales)[(m * a.N + r) * (a.K / 32) + c / 32]);
            break;
        }
        moe__cuda_store_code(a.out, a.odt, i, moe__cuda_encode_f32(a.odt, v));
    }
}

/* amax bits of every matrix into buf (an f32 tensor of M elements reused as uint32). */
moe_status launch_amax(const char *fn, const moe__cuda_guard &g, const moe_tensor *src, int64_t M, int64_t n_per,
                       void *buf) {
    MOE_CUDA_TRY(fn, cudaMemsetAsync(buf, 0, (size_t)M * 4, g.stream));
    if (M > 65535)
        return moe__err(MOE_ERR_UNSUPPORTED, "%s: t: expected at most 65535 matrices on CUDA, got %lld", fn, (long long)M);
    unsigned gx = moe__cuda_grid(g.dev, n_per, Q_THREADS);
    unsigned cap = (unsigned)((moe__cuda_sm_count(g.dev) * 16 + M - 1) / M);
    if (gx > cap) gx = cap < 1 ? 1 : cap;
    k_amax<<<dim3(gx, (unsigned)M), Q_THREADS, 0, g.stream>>>(moe_tensor_data(src), src->dtype, n_per,
                                                              (unsigned int *)buf);
    MOE_CUDA_LAUNCHED(fn);
    return MOE_OK;
}

template <int MODE, int B>
moe_status launch_rows(const char *fn, const moe__cuda_guard &g, const moe_tensor *src, int64_t n, int64_t n_per,
                       const void *mat_amax, void *data, void *scales) {
    int64_t groups = n / B;
    constexpr int L = moe__q_rows_geom<B>::L;
    k_rows<MODE, B><<<moe__cuda_grid(g.dev, groups, Q_THREADS / L), Q_THREADS, 0, g.stream>>>(
        moe_tensor_data(src), src->dtype, groups, n_per, (const unsigned int *)mat_amax, (uint8_t *)data, scales);
    MOE_CUDA_LAUNCHED(fn);
    return MOE_OK;
}

moe_status launch_finalize(const char *fn, const moe__cuda_guard &g, void *buf, int64_t M, int nvfp4) {
    k_finalize<<<(unsigned)((M + 127) / 128), 128, 0, g.stream>>>((unsigned int *)buf, M, nvfp4);
    MOE_CUDA_LAUNCHED(fn);
    return MOE_OK;
}

} // namespace

extern "C" moe_status moe__cuda_quantize(const moe_tensor *src, moe_qtensor *q) {
    const char *fn = "moe_quantize";
    moe__cuda_guard g(fn, src->dev.index);
    MOE_TRY(g.status);
    int64_t M = moe__q_mats(q), N = moe__q_rows(q), K = moe__q_cols(q);
    int64_t NK = N * K, n = M * NK;
    void *data = moe_tensor_data(q->data);
    void *scales = q->scales ? moe_tensor_data(q->scales) : nullptr;
    switch (q->mode) {
    case MOE_QUANT_FP8: {
        MOE_TRY(launch_amax(fn, g, src, M, NK, scales));
        k_fp8_tensor<<<moe__cuda_grid(g.dev, n, Q_THREADS), Q_THREADS, 0, g.stream>>>(
            moe_tensor_data(src), src->dtype, n, NK, (const unsigned int *)scales, (uint8_t *)data);
        MOE_CUDA_LAUNCHED(fn);
        return launch_finalize(fn, g, scales, M, 0);
    }
    case MOE_QUANT_FP8_BLOCK:
        if (q->block_rows == 1) return launch_rows<MOE_QUANT_FP8_BLOCK, 128>(fn, g, src, n, NK, nullptr, data, scales);
        if (N / 128 > 65535 || M > 65535 || K / 128 > 2147483647LL)
            return moe__err(MOE_ERR_UNSUPPORTED, "%s: t: shape too large for one CUDA launch (%lld matrices, %lld row blocks)",
                            fn, (long long)M, (long long)(N / 128));
        k_fp8_block128<<<dim3((unsigned)(K / 128), (unsigned)(N / 128), (unsigned)M), Q_THREADS, 0, g.stream>>>(
            moe_tensor_data(src), src->dtype, N, K, (uint8_t *)data, (float *)scales);
        MOE_CUDA_LAUNCHED(fn);
        return MOE_OK;
    case MOE_QUANT_NVFP4: {
        void *global = moe_tensor_data(q->global);
        MOE_TRY(launch_amax(fn, g, src, M, NK, global));
        if (src->dtype == MOE_BF16 && (((uintptr_t)moe_tensor_data(src) | (uintptr_t)data) & 15) == 0) {
            k_nvfp4_bf16<<<moe__cuda_grid(g.dev, n / 16, Q_THREADS), Q_THREADS, 0, g.stream>>>(
                (const uint4 *)moe_tensor_data(src), n / 16, NK, (const unsigned int *)global, (uint2 *)data,
                (uint8_t *)scales);
            MOE_CUDA_LAUNCHED(fn);
        } else {
            MOE_TRY((launch_rows<MOE_QUANT_NVFP4, 16>(fn, g, src, n, NK, global, data, scales)));
        }
        return launch_finalize(fn, g, global, M, 1);
    }
    case MOE_QUANT_MXFP4: return launch_rows<MOE_QUANT_MXFP4, 32>(fn, g, src, n, NK, nullptr, data, scales);
    case MOE_QUANT_MXINT4: return launch_rows<MOE_QUANT_MXINT4, 32>(fn, g, src, n, NK, nullptr, data, scales);
    default:
        return moe__err(MOE_ERR_UNSUPPORTED, "%s: mode: %s has no CUDA quantiser", fn, moe_quant_mode_name(q->mode));
    }
}

extern "C" moe_status moe__cuda_dequantize(const moe_qtensor *q, moe_tensor *out) {
    const char *fn = "moe_dequantize";
    moe__cuda_guard g(fn, out->dev.index);
    MOE_TRY(g.status);
    if (q->mode == MOE_QUANT_BF16)
        return moe__err(MOE_ERR_UNSUPPORTED, "%s: mode: bf16 is dequantised by a cast", fn);
    deq_args a;
    a.data = (const uint8_t *)moe_tensor_data(q->data);
    a.scales = moe_tensor_data(q->scales);
    a.global = q->global ? (const float *)moe_tensor_data(q->global) : nullptr;
    a.out = moe_tensor_data(out);
    a.odt = out->dtype;
    a.mode = q->mode;
    a.block_rows = q->block_rows;
    a.block_cols = q->block_cols;
    a.N = moe__q_rows(q);
    a.K = moe__q_cols(q);
    a.n = moe__q_mats(q) * a.N * a.K;
    k_dequant<<<moe__cuda_grid(g.dev, a.n, Q_THREADS), Q_THREADS, 0, g.stream>>>(a);
    MOE_CUDA_LAUNCHED(fn);
    return MOE_OK;
}
