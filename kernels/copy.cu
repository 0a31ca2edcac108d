/* copy.cu -- element-wise copy/cast, fill and arange on CUDA tensors.  Results equal the CPU
 * reference (engine/src/cpu/cpu_backend.c) bit for bit:
 *   - same dtype: the element bits are copied unchanged (contiguous pairs: one byte-copy
 *     kernel with 16-byte accesses); strided bool copies normalise to 0/1 as the CPU does;
 *   - integer -> integer through int64 (saturating); otherwise through f32 (fp.h rules);
 *   - fill/arange: the double value is stored like cpu_store_double (floats via f32,
 *     integers truncated toward zero and saturated, NaN -> 0, bool = v != 0).
 * Every op is one launch on the moelab stream, with no host synchronisation, so it can be
 * captured in a CUDA graph.  A copy whose source and destination overlap in one storage
 * goes through a stream-ordered temporary (cudaMallocAsync, also capturable). */
#include "cuda_common.cuh"

#include <string.h>

/* ------------------------------------------------------------- byte copy -- */

__global__ void moe__k_copy_bytes(uint8_t *__restrict__ dst, const uint8_t *__restrict__ src,
                                  int64_t head, int64_t nvec, int64_t nbytes) {
    int64_t step = (int64_t)gridDim.x * blockDim.x;
    int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    uint4 *__restrict__ d4 = (uint4 *)(dst + head);
    const uint4 *__restrict__ s4 = (const uint4 *)(src + head);
    int64_t v = t;
    for (; v + 3 * step < nvec; v += 4 * step) { /* four 16-byte loads in flight */
        uint4 a = s4[v], b = s4[v + step], c = s4[v + 2 * step], d = s4[v + 3 * step];
        d4[v] = a;
        d4[v + step] = b;
        d4[v + 2 * step] = c;
        d4[v + 3 * step] = d;
    }
    for (; v < nvec; v += step) d4[v] = s4[v];
    for (int64_t b = t; b < head; b += step) dst[b] = src[b];
    int64_t tail0 = head + nvec * 16;
    for (int64_t b = tail0 + t; b < nbytes; b += step) dst[b] = src[b];
}

moe_status moe__cuda_copy_bytes(const char *fn, const moe__cuda_guard &g, void *dst,
                                const void *src, size_t bytes) {
    if (bytes == 0) return MOE_OK;
    uintptr_t d = (uintptr_t)dst, s = (uintptr_t)src;
    int64_t n = (int64_t)bytes, head = n, nvec = 0;
    if ((d & 15) == (s & 15)) { /* both reach 16-byte alignment after the same head */
        head = (int64_t)((16 - (d & 15)) & 15);
        if (head > n) head = n;
        nvec = (n - head) / 16;
    }
    int64_t units = nvec > 0 ? (nvec + 3) / 4 : n;
    const int threads = 256;
    moe__k_copy_bytes<<<moe__cuda_grid(g.dev, units, threads), threads, 0, g.stream>>>(
        (uint8_t *)dst, (const uint8_t *)src, head, nvec, n);
    MOE_CUDA_LAUNCHED(fn);
    return MOE_OK;
}

/* ----------------------------------------------------------------- value ops -- */

enum { MOE__CAST_RAW = 0, MOE__CAST_INT = 1, MOE__CAST_F32 = 2 };

struct moe__cast_op {
    moe__cuda_tdesc src;
    int dst_dtype;
    int how;
    __device__ uint64_t operator()(int64_t i) const {
        int64_t e = moe__cuda_offset(src, i);
        if (how == MOE__CAST_RAW) return moe__cuda_load_code(src.data, src.dtype, e);
        if (how == MOE__CAST_INT)
            return moe__cuda_encode_i64(dst_dtype, moe__cuda_load_i64(src.data, src.dtype, e));
        return moe__cuda_encode_f32(dst_dtype, moe__cuda_load_f32(src.data, src.dtype, e));
    }
};

struct moe__fill_op {
    int dtype;
    double v;
    __device__ uint64_t operator()(int64_t) const { return moe__cuda_encode_f64(dtype, v); }
};

struct moe__arange_op {
    int dtype;
    double start, step;
    __device__ uint64_t operator()(int64_t i) const {
        /* start + step * i with separate roundings, as the CPU (no fused multiply-add) */
        return moe__cuda_encode_f64(dtype, __dadd_rn(start, __dmul_rn(step, (double)i)));
    }
};

/* ------------------------------------------------------------------- overlap -- */

/* Byte range [lo, hi) of the storage that tensor t can touch. */
static void moe__cuda_span(const moe_tensor *t, int64_t *lo, int64_t *hi) {
    int64_t a = t->offset, b = t->offset;
    for (int k = 0; k < t->ndim; k++) {
        int64_t ext = (t->shape[k] - 1) * t->stride[k];
        if (ext < 0) a += ext;
        else b += ext;
    }
    int bits = moe_dtype_bits(t->dtype);
    *lo = a * bits / 8;
    *hi = ((b + 1) * bits + 7) / 8;
}

static int moe__cuda_overlap(const moe_tensor *x, const moe_tensor *y) {
    if (x->st != y->st) return 0;
    int64_t a0, a1, b0, b1;
    moe__cuda_span(x, &a0, &a1);
    moe__cuda_span(y, &b0, &b1);
    return a0 < b1 && b0 < a1;
}

static int moe__cuda_same_layout(const moe_tensor *x, const moe_tensor *y) {
    if (x->st != y->st || x->dtype != y->dtype || x->offset != y->offset || x->ndim != y->ndim)
        return 0;
    for (int k = 0; k < x->ndim; k++)
        if (x->shape[k] != y->shape[k] || (x->shape[k] > 1 && x->stride[k] != y->stride[k]))
            return 0;
    return 1;
}

/* --------------------------------------------------------------------- ops -- */

static moe_status moe__cuda_cast_launch(const char *fn, const moe__cuda_guard &g, moe_tensor *dst,
                                        const moe_tensor *src, int64_t n) {
    if (dst->dtype == src->dtype && moe_tensor_is_contiguous(dst) && moe_tensor_is_contiguous(src))
        return moe__cuda_copy_bytes(fn, g, moe_tensor_data(dst), moe_tensor_data(src),
                                    moe_tensor_nbytes(src));
    moe__cast_op op;
    moe__cuda_tdesc d;
    moe__cuda_tdesc_pair(dst, src, &d, &op.src);
    op.dst_dtype = dst->dtype;
    int fsrc = moe__cuda_isfloat(src->dtype), fdst = moe__cuda_isfloat(dst->dtype);
    /* same dtype: the bits, except bool, which the CPU normalises to 0/1 */
    op.how = dst->dtype == src->dtype && dst->dtype != MOE_BOOL ? MOE__CAST_RAW
           : (!fsrc && !fdst)                                  ? MOE__CAST_INT
                                                               : MOE__CAST_F32;
    return moe__cuda_map(fn, g, d, n, op);
}

moe_status moe__cuda_copy_cast(moe_tensor *dst, const moe_tensor *src) {
    static const char fn[] = "cuda copy_cast";
    int64_t n = moe_tensor_numel(dst);
    if (n == 0 || moe__cuda_same_layout(dst, src)) return MOE_OK;
    moe__cuda_guard g(fn, dst->dev.index);
    MOE_TRY(g.status);
    if (!moe__cuda_overlap(dst, src)) return moe__cuda_cast_launch(fn, g, dst, src, n);

    /* Overlapping views of one storage: src -> contiguous temporary -> dst. */
    size_t bytes = moe__dtype_nbytes(src->dtype, n);
    void *tmp = NULL;
    MOE_CUDA_TRY(fn, cudaMallocAsync(&tmp, bytes ? bytes : 1, g.stream));
    moe_storage st;
    memset(&st, 0, sizeof st);
    st.data = tmp;
    st.bytes = bytes;
    st.dev = dst->dev;
    st.refs = 1;
    moe_tensor t;
    memset(&t, 0, sizeof t);
    t.dtype = src->dtype;
    t.ndim = src->ndim;
    t.dev = dst->dev;
    t.st = &st;
    int64_t stride = 1;
    for (int k = src->ndim - 1; k >= 0; k--) {
        t.shape[k] = src->shape[k];
        t.stride[k] = stride;
        stride *= src->shape[k];
    }
    moe_status s = moe__cuda_cast_launch(fn, g, &t, src, n);
    if (s == MOE_OK) s = moe__cuda_cast_launch(fn, g, dst, &t, n);
    cudaError_t e = cudaFreeAsync(tmp, g.stream);
    if (s == MOE_OK && e != cudaSuccess) s = moe__cuda_fail(fn, "cudaFreeAsync", e);
    return s;
}

moe_status moe__cuda_fill(moe_tensor *t, double value) {
    static const char fn[] = "cuda fill";
    moe__cuda_guard g(fn, t->dev.index);
    MOE_TRY(g.status);
    moe__cuda_tdesc d;
    moe__cuda_tdesc_pair(t, NULL, &d, NULL);
    moe__fill_op op;
    op.dtype = t->dtype;
    op.v = value;
    return moe__cuda_map(fn, g, d, moe_tensor_numel(t), op);
}

moe_status moe__cuda_arange(moe_tensor *t, double start, double step) {
    static const char fn[] = "cuda arange";
    moe__cuda_guard g(fn, t->dev.index);
    MOE_TRY(g.status);
    moe__cuda_tdesc d;
    moe__cuda_tdesc_pair(t, NULL, &d, NULL);
    moe__arange_op op;
    op.dtype = t->dtype;
    op.start = start;
    op.step = step;
    return moe__cuda_map(fn, g, d, moe_tensor_numel(t), op);
}
