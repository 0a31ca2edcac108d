/* ops.cu -- dense math on CUDA: router GEMM (a . b^T, f32 accumulation), RMSNorm, axpby.
 * Arguments are validated by engine/src/ops.c.  All work goes on the moelab stream; no host
 * synchronisation, no allocation (graph-capturable). */
#include "cuda_common.cuh"

namespace {

constexpr int MM_BM = 64, MM_BN = 64, MM_BK = 16, MM_THREADS = 256;

struct mat2 {
    const void *data; /* storage base */
    int dtype;
    int64_t offset, s0, s1;
};

__device__ __forceinline__ float mat_load(const mat2 &m, int64_t r, int64_t c) {
    return moe__cuda_load_f32(m.data, m.dtype, m.offset + r * m.s0 + c * m.s1);
}

/* 64x64 output tile per block, 256 threads each computing 4x4, K in steps of 16 through
 * shared memory.  f32 FMA accumulation. */
__global__ void __launch_bounds__(MM_THREADS) k_matmul_nt(mat2 a, mat2 b, void *out, int out_bf16,
                                                          int64_t M, int64_t N, int64_t K) {
    __shared__ float As[MM_BK][MM_BM + 4];
    __shared__ float Bs[MM_BK][MM_BN + 4];
    int tid = threadIdx.x;
    int64_t m0 = (int64_t)blockIdx.y * MM_BM, n0 = (int64_t)blockIdx.x * MM_BN;
    int tr = tid / 16, tc = tid % 16; /* thread's 4x4 sub-tile at rows tr*4, cols tc*4 */
    float acc[4][4] = {};
    for (int64_t k0 = 0; k0 < K; k0 += MM_BK) {
        /* each thread loads 4 elements of A's tile and 4 of B's: (row, k) pairs */
        for (int i = tid; i < MM_BM * MM_BK; i += MM_THREADS) {
            int r = i / MM_BK, kk = i % MM_BK;
            int64_t gr = m0 + r, gk = k0 + kk;
            As[kk][r] = (gr < M && gk < K) ? mat_load(a, gr, gk) : 0.0f;
            int64_t gn = n0 + r;
            Bs[kk][r] = (gn < N && gk < K) ? mat_load(b, gn, gk) : 0.0f;
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < MM_BK; kk++) {
            float av[4], bv[4];
#pragma unroll
            for (int i = 0; i < 4; i++) av[i] = As[kk][tr * 4 + i];
#pragma unroll
            for (int j = 0; j < 4; j++) bv[j] = Bs[kk][tc * 4 + j];
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < 4; j++) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; i++) {
        int64_t r = m0 + tr * 4 + i;
        if (r >= M) continue;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            int64_t c = n0 + tc * 4 + j;
            if (c >= N) continue;
            if (out_bf16) ((uint16_t *)out)[r * N + c] = moe__f32_to_bf16(acc[i][j]);
            else ((float *)out)[r * N + c] = acc[i][j];
        }
    }
}

/* One block per row: sum of squares in f32 (tree reduction), then scale. */
__global__ void k_rmsnorm(const void *x, int xdt, const void *w, int wdt, void *out, int odt,
                          int64_t H, float eps) {
    int64_t row = blockIdx.x;
    __shared__ float red[32];
    float ss = 0.0f;
    for (int64_t h = threadIdx.x; h < H; h += blockDim.x) {
        float v = moe__cuda_load_f32(x, xdt, row * H + h);
        ss = fmaf(v, v, ss);
    }
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = ss;
    __syncthreads();
    if (threadIdx.x < 32) {
        float v = threadIdx.x < (blockDim.x + 31) / 32 ? red[threadIdx.x] : 0.0f;
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        if (threadIdx.x == 0) red[0] = v;
    }
    __syncthreads();
    float inv = 1.0f / sqrtf(red[0] / (float)H + eps);
    for (int64_t h = threadIdx.x; h < H; h += blockDim.x) {
        float v = moe__cuda_load_f32(x, xdt, row * H + h) * inv;
        if (w) v *= moe__cuda_load_f32(w, wdt, h);
        moe__cuda_store_code(out, odt, row * H + h, moe__cuda_encode_f32(odt, v));
    }
}

__global__ void k_axpby(float alpha, const void *x, int xdt, float beta, void *y, int ydt, int64_t n) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        float xv = moe__cuda_load_f32(x, xdt, i);
        float r = alpha * xv;
        if (beta != 0.0f) r = r + beta * moe__cuda_load_f32(y, ydt, i);
        moe__cuda_store_code(y, ydt, i, moe__cuda_encode_f32(ydt, r));
    }
}

} // namespace

extern "C" moe_status moe__cuda_matmul_nt(const moe_tensor *a, const moe_tensor *b, moe_tensor *out) {
    const char *fn = "moe_matmul_nt";
    moe__cuda_guard g(fn, a->dev.index);
    MOE_TRY(g.status);
    int64_t M = a->shape[0], N = b->shape[0], K = a->shape[1];
    mat2 ma = {a->st->data, a->dtype, a->offset, a->stride[0], a->stride[1]};
    mat2 mb = {b->st->data, b->dtype, b->offset, b->stride[0], b->stride[1]};
    dim3 grid((unsigned)((N + MM_BN - 1) / MM_BN), (unsigned)((M + MM_BM - 1) / MM_BM));
    if (grid.y > 65535u)
        return moe__err(MOE_ERR_UNSUPPORTED, "%s: a: expected at most %d rows on CUDA, got %lld", fn,
                        65535 * MM_BM, (long long)M);
    k_matmul_nt<<<grid, MM_THREADS, 0, g.stream>>>(ma, mb, moe_tensor_data(out), out->dtype == MOE_BF16, M,
                                                   N, K);
    MOE_CUDA_LAUNCHED(fn);
    return MOE_OK;
}

extern "C" moe_status moe__cuda_rmsnorm(const moe_tensor *x, const moe_tensor *w, double eps, moe_tensor *out) {
    const char *fn = "moe_rmsnorm";
    moe__cuda_guard g(fn, x->dev.index);
    MOE_TRY(g.status);
    int64_t H = x->shape[x->ndim - 1];
    if (H == 0) return MOE_OK;
    int64_t rows = moe_tensor_numel(x) / H;
    if (rows > 2147483647LL)
        return moe__err(MOE_ERR_UNSUPPORTED, "%s: x: too many rows for one launch (%lld)", fn, (long long)rows);
    k_rmsnorm<<<(unsigned)rows, 256, 0, g.stream>>>(moe_tensor_data(x), x->dtype, w ? moe_tensor_data(w) : nullptr,
                                                     w ? w->dtype : 0, moe_tensor_data(out), out->dtype, H,
                                                     (float)eps);
    MOE_CUDA_LAUNCHED(fn);
    return MOE_OK;
}

extern "C" moe_status moe__cuda_axpby(double alpha, const moe_tensor *x, double beta, moe_tensor *y) {
    const char *fn = "moe_axpby";
    moe__cuda_guard g(fn, x->dev.index);
    MOE_TRY(g.status);
    int64_t n = moe_tensor_numel(x);
    k_axpby<<<moe__cuda_grid(g.dev, n, 256), 256, 0, g.stream>>>((float)alpha, moe_tensor_data(x), x->dtype,
                                                                 (float)beta, moe_tensor_data(y), y->dtype, n);
    MOE_CUDA_LAUNCHED(fn);
    return MOE_OK;
}
