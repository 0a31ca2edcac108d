/* internal.h -- engine internals shared by the core, the CPU backend and the CUDA backend.
 * Compiles as C11 and as CUDA C++ (kernels/ include it). */
#ifndef MOE_INTERNAL_H
#define MOE_INTERNAL_H

#include "moe.h"

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---------------------------------------------------------------- storage -- */

typedef struct moe_storage moe_storage;
struct moe_storage {
    void *data;              /* host pointer or device pointer */
    size_t bytes;            /* bytes owned / mapped */
    moe_device dev;
    int64_t refs;            /* atomic reference count (tensors + other holders) */
    int accounted;           /* counted in the memory statistics */
    /* How to give the memory back; NULL means the device backend's free. */
    void (*release)(moe_storage *s);
    void *ctx;               /* for release (e.g. the mmap record) */
};

struct moe_tensor {
    int dtype;
    int ndim;
    int64_t shape[MOE_MAX_DIMS];
    int64_t stride[MOE_MAX_DIMS]; /* elements */
    int64_t offset;               /* elements from storage->data */
    moe_device dev;
    moe_storage *st;
};

/* New device or host storage of `bytes` (at least 1 byte is allocated). */
moe_status moe__storage_new(moe_storage **out, size_t bytes, moe_device dev);
/* Wrap foreign memory (mmap, ...): release(s) is called when the last reference goes. */
moe_status moe__storage_wrap(moe_storage **out, void *data, size_t bytes, moe_device dev,
                             void (*release)(moe_storage *), void *ctx, int accounted_host);
void moe__storage_retain(moe_storage *s);
void moe__storage_release(moe_storage *s);

/* New tensor handle over storage `st` (retained); stride NULL means row-major contiguous. */
moe_status moe__tensor_wrap(moe_tensor **out, moe_storage *st, int dtype, int ndim,
                            const int64_t *shape, const int64_t *stride, int64_t offset);
/* Bytes of a contiguous tensor with numel elements of dtype. */
size_t moe__dtype_nbytes(int dtype, int64_t numel);
int64_t moe__numel(int ndim, const int64_t *shape);
/* 1 for the packed 4-bit dtypes (e2m1, i4). */
int moe__dtype_packed(int dtype);
int moe__same_shape(const moe_tensor *a, const moe_tensor *b);
int moe__same_device(moe_device a, moe_device b);
/* "cpu" / "cuda:0" into buf. */
const char *moe__device_str(moe_device d, char *buf, size_t n);
/* "[4, 16]" into buf: the shape of t, or ndim sizes from shape. */
const char *moe__shape_str(const moe_tensor *t, char *buf, size_t n);
const char *moe__dims_str(int ndim, const int64_t *shape, char *buf, size_t n);

/* ----------------------------------------------------------------- errors -- */

/* Set the thread's last error (printf-style) and return `status`.  Message convention:
 * "<function>: <argument>: expected <what>, got <what>". */
moe_status moe__err(moe_status status, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

#define MOE_TRY(expr)                        \
    do {                                     \
        moe_status moe__s_ = (expr);         \
        if (moe__s_ != MOE_OK) return moe__s_; \
    } while (0)

/* Argument checks used by every entry point; each sets a message naming fn and arg.
 * dtype < 0 / ndim < 0 mean "any". */
moe_status moe__check_tensor(const char *fn, const char *arg, const moe_tensor *t, int dtype,
                             int ndim);
moe_status moe__check_contiguous(const char *fn, const char *arg, const moe_tensor *t);
/* The checks moe_tensor_new makes: a valid dtype id; ndim 0..8, sizes >= 0, bounded byte count,
 * even last dimension for packed dtypes. */
moe_status moe__check_dtype_id(const char *fn, const char *arg, int dtype);
moe_status moe__check_shape(const char *fn, int dtype, int ndim, const int64_t *shape);

/* --------------------------------------------------------------- accounting -- */

void moe__mem_add(moe_device dev, int64_t bytes); /* bytes may be negative */
void moe__count_tensor(int delta);

/* ------------------------------------------------------------- element I/O -- */

/* Host-side scalar load/store of element `e` (absolute element index from storage start,
 * so packed dtypes can address nibbles).  Floats go through f32, integers through int64. */
float moe__load_f32(const void *base, int dtype, int64_t e);
int64_t moe__load_i64(const void *base, int dtype, int64_t e);
void moe__store_f32(void *base, int dtype, int64_t e, float v);
void moe__store_i64(void *base, int dtype, int64_t e, int64_t v);

/* Iterate the element offsets of t in row-major order: calls fn(ctx, i, off) for the i-th
 * logical element whose storage offset (elements) is off. */
void moe__for_each_offset(const moe_tensor *t, void (*fn)(void *ctx, int64_t i, int64_t off),
                          void *ctx);

#ifdef __cplusplus
}
#endif

#endif
