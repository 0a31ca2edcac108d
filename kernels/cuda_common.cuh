/* cuda_common.cuh -- helpers shared by every .cu file of the CUDA backend.
 *
 *   - MOE_CUDA_TRY(fn, call): run a CUDA runtime call; on failure set the thread's last
 *     error ("<fn>: <cudaCall>: <cudaGetErrorString> (<cudaErrorName>)") and return
 *     MOE_ERR_CUDA (MOE_ERR_NOMEM for cudaErrorMemoryAllocation).  MOE_CUDA_LAUNCHED(fn)
 *     checks the launch just made.
 *   - moe__cuda_stream(dev): the moelab stream of a device (non-blocking, created lazily).
 *     All moelab work is queued there, so ops are ordered without host synchronisation
 *     and a graph capture of that stream records them.
 *   - moe__cuda_guard: makes a device current for a scope and looks up its stream;
 *     restores the previous device on exit.
 *   - moe__cuda_tdesc: a tensor's shape/strides passed by value to kernels, with
 *     moe__cuda_offset() turning a row-major index into a storage element offset.
 *   - Element codecs with the engine's exact rules (fp.h; mirror of engine/src/dtype.c):
 *     moe__cuda_load_f32/_i64 read element e (absolute from the storage start, so packed
 *     4-bit dtypes address nibbles: element e lives in byte e >> 1, low nibble when e is
 *     even); moe__cuda_encode_f32/_i64 give the bit pattern a value is stored as, and
 *     moe__cuda_store_code writes one (never a packed dtype: see moe__k_map).
 *   - moe__k_map: the one element-wise output kernel (cast, fill, arange, RNG): each
 *     thread writes whole bytes of packed outputs, never a read-modify-write shared with
 *     another thread (except views whose nibbles do not pair into bytes, which use an
 *     atomic compare-and-swap on the containing word).
 */
#ifndef MOE_CUDA_COMMON_CUH
#define MOE_CUDA_COMMON_CUH

#include <cuda_runtime.h>

#include <stdint.h>

#include "backend.h"
#include "fp.h"
#include "internal.h"

/* ------------------------------------------------------------------ errors -- */

/* Convert a failed CUDA call into a moelab status + message (clears the non-sticky error).
 * `call` may be a stringified expression: only the text before '(' is shown. */
moe_status moe__cuda_fail(const char *fn, const char *call, cudaError_t err);

#define MOE_CUDA_TRY(fn, call)                                             \
    do {                                                                   \
        cudaError_t moe__ce_ = (call);                                     \
        if (moe__ce_ != cudaSuccess) return moe__cuda_fail((fn), #call, moe__ce_); \
    } while (0)

#define MOE_CUDA_LAUNCHED(fn) MOE_CUDA_TRY(fn, cudaGetLastError())

/* ----------------------------------------------------------------- devices -- */

/* Usable CUDA devices (0 without a driver or GPU); cached after the first call. */
int moe__cuda_count(void);

/* The moelab stream of device `dev` (created on first use with cudaStreamNonBlocking; the
 * caller must have `dev` current, as moe__cuda_guard does).  NULL with the last error set
 * when it cannot be created. */
cudaStream_t moe__cuda_stream(int dev);

/* Multiprocessor count of `dev` (cached; 1 when unknown). */
int moe__cuda_sm_count(int dev);

/* 1 while the calling thread captures a CUDA graph (moe_graph_begin .. end/abort). */
int moe__cuda_thread_capturing(void);

/* Make `dev` current for a scope and fetch its stream:
 *     moe__cuda_guard g("cuda copy_cast", dev);
 *     MOE_TRY(g.status);
 *     kernel<<<grid, block, 0, g.stream>>>(...);
 * The previous current device is restored by the destructor. */
struct moe__cuda_guard {
    moe_status status;
    int dev;
    int prev;
    cudaStream_t stream;
    moe__cuda_guard(const char *fn, int dev_index);
    ~moe__cuda_guard();
    moe__cuda_guard(const moe__cuda_guard &) = delete;
    moe__cuda_guard &operator=(const moe__cuda_guard &) = delete;
};

/* Grid size for a grid-stride loop over `units` work items with `threads` per block. */
static inline unsigned moe__cuda_grid(int dev, int64_t units, int threads) {
    int64_t want = (units + threads - 1) / threads;
    int64_t cap = (int64_t)moe__cuda_sm_count(dev) * 16;
    if (want > cap) want = cap;
    if (want < 1) want = 1;
    return (unsigned)want;
}

/* ----------------------------------------------------------- tensor shape -- */

/* Shape and strides of a tensor, by value for kernels.  `data` is the storage base; the
 * element offsets it is indexed with include the tensor's own offset. */
struct moe__cuda_tdesc {
    void *data;
    int dtype;
    int ndim; /* >= 1 after moe__cuda_tdesc_pair (0-d tensors become [1]) */
    int64_t offset;
    int64_t shape[MOE_MAX_DIMS];
    int64_t stride[MOE_MAX_DIMS];
};

/* Descriptors of dst (and src, when not NULL) with their common dimensions merged where
 * both are row-major adjacent (dst[.., a, b, ..] with stride[a] == stride[b] * shape[b]) and
 * size-1 dimensions dropped, so a contiguous pair becomes one dimension of stride 1. */
void moe__cuda_tdesc_pair(const moe_tensor *dst, const moe_tensor *src, moe__cuda_tdesc *d,
                          moe__cuda_tdesc *s);

/* Storage element offset of the i-th element in row-major order. */
__device__ __forceinline__ int64_t moe__cuda_offset(const moe__cuda_tdesc &t, int64_t i) {
    if (t.ndim == 1) return t.offset + i * t.stride[0];
    int64_t off = t.offset;
#pragma unroll 1
    for (int d = t.ndim - 1; d > 0; d--) {
        int64_t n = t.shape[d];
        int64_t q = i / n;
        off += (i - q * n) * t.stride[d];
        i = q;
    }
    return off + i * t.stride[0];
}

/* ---------------------------------------------------------- element codecs -- */

__host__ __device__ __forceinline__ int moe__cuda_packed(int dtype) {
    return dtype == MOE_E2M1 || dtype == MOE_I4;
}

__host__ __device__ __forceinline__ int moe__cuda_isfloat(int dtype) {
    return dtype <= MOE_UE8M0 && dtype != MOE_I4;
}

__device__ __forceinline__ uint32_t moe__cuda_nibble(const void *base, int64_t e) {
    uint32_t b = ((const uint8_t *)base)[e >> 1];
    return (e & 1) ? (b >> 4) : (b & 0xFu);
}

__device__ __forceinline__ int64_t moe__cuda_load_i64(const void *base, int dtype, int64_t e);

/* Value of element e as f32 (integers converted with RNE, as on the host). */
__device__ __forceinline__ float moe__cuda_load_f32(const void *base, int dtype, int64_t e) {
    switch (dtype) {
    case MOE_F32: return ((const float *)base)[e];
    case MOE_F16: return moe__f16_to_f32(((const uint16_t *)base)[e]);
    case MOE_BF16: return moe__bf16_to_f32(((const uint16_t *)base)[e]);
    case MOE_F8E4M3: return moe__e4m3_to_f32(((const uint8_t *)base)[e]);
    case MOE_F8E5M2: return moe__e5m2_to_f32(((const uint8_t *)base)[e]);
    case MOE_E2M1: return moe__e2m1_to_f32((uint8_t)moe__cuda_nibble(base, e));
    case MOE_UE8M0: return moe__ue8m0_to_f32(((const uint8_t *)base)[e]);
    default: return (float)moe__cuda_load_i64(base, dtype, e);
    }
}

/* Value of element e as int64 (floats truncated toward zero, saturating, NaN -> 0). */
__device__ __forceinline__ int64_t moe__cuda_load_i64(const void *base, int dtype, int64_t e) {
    switch (dtype) {
    case MOE_I4: {
        int v = (int)moe__cuda_nibble(base, e);
        return v >= 8 ? v - 16 : v;
    }
    case MOE_U8: return ((const uint8_t *)base)[e];
    case MOE_I8: return ((const int8_t *)base)[e];
    case MOE_I16: return ((const int16_t *)base)[e];
    case MOE_I32: return ((const int32_t *)base)[e];
    case MOE_I64: return ((const int64_t *)base)[e];
    case MOE_BOOL: return ((const uint8_t *)base)[e] != 0;
    default: return moe__f32_to_i64_sat(moe__cuda_load_f32(base, dtype, e), INT64_MIN, INT64_MAX);
    }
}

/* Raw bit pattern of element e (a nibble for packed dtypes). */
__device__ __forceinline__ uint64_t moe__cuda_load_code(const void *base, int dtype, int64_t e) {
    switch (dtype) {
    case MOE_F32: case MOE_I32: return ((const uint32_t *)base)[e];
    case MOE_F16: case MOE_BF16: case MOE_I16: return ((const uint16_t *)base)[e];
    case MOE_I64: return ((const uint64_t *)base)[e];
    case MOE_E2M1: case MOE_I4: return moe__cuda_nibble(base, e);
    default: return ((const uint8_t *)base)[e];
    }
}

__device__ __forceinline__ int64_t moe__cuda_clamp(int64_t v, int64_t lo, int64_t hi) {
    return v < lo ? lo : v > hi ? hi : v;
}

__device__ __forceinline__ uint64_t moe__cuda_encode_i64(int dtype, int64_t v);

/* Bit pattern that storing f32 v into `dtype` writes (host: moe__store_f32). */
__device__ __forceinline__ uint64_t moe__cuda_encode_f32(int dtype, float v) {
    switch (dtype) {
    case MOE_F32: return moe__f32_bits(v);
    case MOE_F16: return moe__f32_to_f16(v);
    case MOE_BF16: return moe__f32_to_bf16(v);
    case MOE_F8E4M3: return moe__f32_to_e4m3(v);
    case MOE_F8E5M2: return moe__f32_to_e5m2(v);
    case MOE_E2M1: return moe__f32_to_e2m1(v);
    case MOE_UE8M0: return moe__f32_to_ue8m0(v);
    case MOE_BOOL: return v != 0.0f; /* NaN != 0: true, as on the host */
    case MOE_I4: return moe__cuda_encode_i64(dtype, moe__f32_to_i64_sat(v, -8, 7));
    case MOE_U8: return moe__cuda_encode_i64(dtype, moe__f32_to_i64_sat(v, 0, 255));
    case MOE_I8: return moe__cuda_encode_i64(dtype, moe__f32_to_i64_sat(v, INT8_MIN, INT8_MAX));
    case MOE_I16: return moe__cuda_encode_i64(dtype, moe__f32_to_i64_sat(v, INT16_MIN, INT16_MAX));
    case MOE_I32: return moe__cuda_encode_i64(dtype, moe__f32_to_i64_sat(v, INT32_MIN, INT32_MAX));
    default: return (uint64_t)moe__f32_to_i64_sat(v, INT64_MIN, INT64_MAX);
    }
}

/* Bit pattern that storing int64 v into `dtype` writes (host: moe__store_i64). */
__device__ __forceinline__ uint64_t moe__cuda_encode_i64(int dtype, int64_t v) {
    switch (dtype) {
    case MOE_I4: return (uint64_t)(moe__cuda_clamp(v, -8, 7) & 0xF);
    case MOE_U8: return (uint64_t)moe__cuda_clamp(v, 0, 255);
    case MOE_I8: return (uint8_t)(int8_t)moe__cuda_clamp(v, INT8_MIN, INT8_MAX);
    case MOE_I16: return (uint16_t)(int16_t)moe__cuda_clamp(v, INT16_MIN, INT16_MAX);
    case MOE_I32: return (uint32_t)(int32_t)moe__cuda_clamp(v, INT32_MIN, INT32_MAX);
    case MOE_I64: return (uint64_t)v;
    case MOE_BOOL: return v != 0;
    default: return moe__cuda_encode_f32(dtype, (float)v);
    }
}

/* Code that cpu_store_double writes for the double v (fill, arange and RNG share it). */
__device__ __forceinline__ uint64_t moe__cuda_encode_f64(int dtype, double v) {
    if (moe__cuda_isfloat(dtype)) return moe__cuda_encode_f32(dtype, (float)v);
    int64_t iv;
    if (v != v) iv = 0;
    else if (v >= 9223372036854775807.0) iv = INT64_MAX;
    else if (v <= -9223372036854775808.0) iv = INT64_MIN;
    else iv = (int64_t)v;
    if (dtype == MOE_BOOL) iv = v != 0.0;
    return moe__cuda_encode_i64(dtype, iv);
}

/* Write a bit pattern to element e of a non-packed dtype. */
__device__ __forceinline__ void moe__cuda_store_code(void *base, int dtype, int64_t e,
                                                     uint64_t code) {
    switch (dtype) {
    case MOE_F32: case MOE_I32: ((uint32_t *)base)[e] = (uint32_t)code; return;
    case MOE_F16: case MOE_BF16: case MOE_I16: ((uint16_t *)base)[e] = (uint16_t)code; return;
    case MOE_I64: ((uint64_t *)base)[e] = code; return;
    default: ((uint8_t *)base)[e] = (uint8_t)code; return;
    }
}

/* Replace nibble e with an atomic compare-and-swap on its aligned 32-bit word (only for
 * packed views whose element pairs do not share bytes). */
__device__ __forceinline__ void moe__cuda_store_nibble_atomic(void *base, int64_t e,
                                                              uint32_t code) {
    uintptr_t byte = (uintptr_t)base + (uintptr_t)(e >> 1);
    unsigned int *word = (unsigned int *)(byte & ~(uintptr_t)3);
    unsigned shift = (unsigned)((byte & 3) * 8 + ((e & 1) ? 4 : 0));
    unsigned int mask = 0xFu << shift;
    unsigned int old = *word, assumed;
    do {
        assumed = old;
        unsigned int next = (assumed & ~mask) | ((code & 0xFu) << shift);
        old = atomicCAS(word, assumed, next);
    } while (old != assumed);
}

/* ---------------------------------------------------- ops (copy.cu, rng.cu) -- */

/* Backend slots (see backend.h for their contracts). */
moe_status moe__cuda_copy_cast(moe_tensor *dst, const moe_tensor *src);
moe_status moe__cuda_fill(moe_tensor *t, double value);
moe_status moe__cuda_arange(moe_tensor *t, double start, double step);
moe_status moe__cuda_rand(moe_tensor *t, uint64_t seed, int kind, double a, double b);
/* Queue a raw byte copy dst <- src (device memory of g's device) on g's stream: one kernel,
 * 16-byte accesses where the two addresses agree modulo 16.  Graph-capturable. */
moe_status moe__cuda_copy_bytes(const char *fn, const struct moe__cuda_guard &g, void *dst,
                                const void *src, size_t bytes);

/* ------------------------------------------------------------ map kernel -- */

/* How moe__k_map writes: one element per work item, a byte (two nibbles) per work item, or
 * a nibble by atomic CAS. */
enum { MOE__MAP_PLAIN = 0, MOE__MAP_PAIRS = 1, MOE__MAP_NIBBLE_ATOMIC = 2 };

/* Write mode for an output descriptor (after moe__cuda_tdesc_pair). */
int moe__cuda_map_mode(const moe__cuda_tdesc *d, int64_t numel);

/* out[i] = op(i) for the n elements of dst in row-major order; op(i) returns the code to
 * store (moe__cuda_encode_*).  One template instantiation per op kind. */
template <class Op>
__global__ void moe__k_map(moe__cuda_tdesc dst, int64_t n, int mode, Op op) {
    int64_t step = (int64_t)gridDim.x * blockDim.x;
    int64_t u = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (mode == MOE__MAP_PAIRS) {
        int64_t units = n >> 1;
        for (; u < units; u += step) {
            int64_t i = u << 1;
            int64_t e = moe__cuda_offset(dst, i); /* even: pairs start on a byte */
            uint32_t lo = (uint32_t)op(i) & 0xFu, hi = (uint32_t)op(i + 1) & 0xFu;
            ((uint8_t *)dst.data)[e >> 1] = (uint8_t)(lo | (hi << 4));
        }
    } else if (mode == MOE__MAP_NIBBLE_ATOMIC) {
        for (; u < n; u += step)
            moe__cuda_store_nibble_atomic(dst.data, moe__cuda_offset(dst, u), (uint32_t)op(u));
    } else {
        for (; u < n; u += step)
            moe__cuda_store_code(dst.data, dst.dtype, moe__cuda_offset(dst, u), op(u));
    }
}

/* Launch moe__k_map over all elements of t (validated by the core) on the guard's stream. */
template <class Op>
moe_status moe__cuda_map(const char *fn, const moe__cuda_guard &g, const moe__cuda_tdesc &d,
                         int64_t n, Op op) {
    if (n <= 0) return MOE_OK;
    int mode = moe__cuda_map_mode(&d, n);
    int64_t units = mode == MOE__MAP_PAIRS ? n / 2 : n;
    const int threads = 256;
    moe__k_map<Op><<<moe__cuda_grid(g.dev, units, threads), threads, 0, g.stream>>>(d, n, mode, op);
    MOE_CUDA_LAUNCHED(fn);
    return MOE_OK;
}

#endif
