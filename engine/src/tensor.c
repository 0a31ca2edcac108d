/* tensor.c -- storage, tensor handles, views, copies, casts, fills and memory accounting.
 * Device-specific work goes through the backend table (backend.h). */
#include "internal.h"
#include "backend.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------- accounting -- */

static int64_t moe__stat_tensors, moe__stat_storages, moe__stat_host, moe__stat_dev;
static int64_t moe__stat_peak_host, moe__stat_peak_dev;

static void moe__peak(int64_t *peak, int64_t now) {
    int64_t p = __atomic_load_n(peak, __ATOMIC_RELAXED);
    while (now > p && !__atomic_compare_exchange_n(peak, &p, now, 1, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
}

void moe__mem_add(moe_device dev, int64_t bytes) {
    if (dev.type == MOE_DEVICE_CUDA) {
        int64_t now = __atomic_add_fetch(&moe__stat_dev, bytes, __ATOMIC_RELAXED);
        moe__peak(&moe__stat_peak_dev, now);
    } else {
        int64_t now = __atomic_add_fetch(&moe__stat_host, bytes, __ATOMIC_RELAXED);
        moe__peak(&moe__stat_peak_host, now);
    }
}

void moe__count_tensor(int delta) { __atomic_add_fetch(&moe__stat_tensors, delta, __ATOMIC_RELAXED); }

moe_status moe_mem_stats(moe_mem_info *out) {
    if (!out) return moe__err(MOE_ERR_ARG, "moe_mem_stats: out: expected a pointer, got NULL");
    out->live_tensors = __atomic_load_n(&moe__stat_tensors, __ATOMIC_RELAXED);
    out->live_storages = __atomic_load_n(&moe__stat_storages, __ATOMIC_RELAXED);
    out->host_bytes = __atomic_load_n(&moe__stat_host, __ATOMIC_RELAXED);
    out->device_bytes = __atomic_load_n(&moe__stat_dev, __ATOMIC_RELAXED);
    out->peak_device_bytes = __atomic_load_n(&moe__stat_peak_dev, __ATOMIC_RELAXED);
    out->peak_host_bytes = __atomic_load_n(&moe__stat_peak_host, __ATOMIC_RELAXED);
    return MOE_OK;
}

/* --------------------------------------------------------------- devices -- */

int moe__same_device(moe_device a, moe_device b) {
    if (a.type != b.type) return 0;
    return a.type == MOE_DEVICE_CPU || a.index == b.index;
}

const char *moe__device_str(moe_device d, char *buf, size_t n) {
    if (d.type == MOE_DEVICE_CPU) snprintf(buf, n, "cpu");
    else if (d.type == MOE_DEVICE_CUDA) snprintf(buf, n, "cuda:%d", (int)d.index);
    else snprintf(buf, n, "device(type=%d)", (int)d.type);
    return buf;
}

int moe_cuda_built(void) {
#ifdef MOE_HAVE_CUDA
    return 1;
#else
    return 0;
#endif
}

int moe_cuda_device_count(void) {
#ifdef MOE_HAVE_CUDA
    return moe__cuda_device_count();
#else
    return 0;
#endif
}

moe_status moe_cuda_device_info(int index, char *buf, size_t buflen) {
    if (!buf || buflen == 0)
        return moe__err(MOE_ERR_ARG, "moe_cuda_device_info: buf: expected a buffer, got NULL/0");
#ifdef MOE_HAVE_CUDA
    return moe__cuda_device_info(index, buf, buflen);
#else
    buf[0] = '\0';
    return moe__err(MOE_ERR_NO_CUDA, "moe_cuda_device_info: moelab was built without CUDA support");
#endif
}

static _Thread_local moe_status moe__bk_status;

moe_status moe__backend_status(void) { return moe__bk_status; }

static const moe_backend *moe__backend_lookup(const char *fn, moe_device dev);

const moe_backend *moe__backend_for(const char *fn, moe_device dev) {
    moe__bk_status = MOE_OK;
    const moe_backend *b = moe__backend_lookup(fn, dev);
    return b;
}

static const moe_backend *moe__backend_lookup(const char *fn, moe_device dev) {
    if (dev.type == MOE_DEVICE_CPU) return moe__cpu_backend();
    if (dev.type == MOE_DEVICE_CUDA) {
        const moe_backend *b = moe__cuda_backend();
        if (!b) {
            moe__bk_status = moe__err(MOE_ERR_NO_CUDA,
                     "%s: device: cuda:%d requested, but moelab was built without CUDA support", fn,
                     (int)dev.index);
            return NULL;
        }
        int n = moe_cuda_device_count();
        if (dev.index < 0 || dev.index >= n) {
            if (n == 0)
                moe__bk_status = moe__err(MOE_ERR_NO_CUDA, "%s: device: cuda:%d requested, but no CUDA device is available",
                         fn, (int)dev.index);
            else
                moe__bk_status = moe__err(MOE_ERR_DEVICE, "%s: device: expected cuda:0..cuda:%d, got cuda:%d", fn, n - 1,
                         (int)dev.index);
            return NULL;
        }
        return b;
    }
    moe__bk_status = moe__err(MOE_ERR_DEVICE, "%s: device: expected type 0 (cpu) or 1 (cuda), got %d", fn, (int)dev.type);
    return NULL;
}

moe_status moe_synchronize(moe_device dev) {
    const moe_backend *b = moe__backend_for("moe_synchronize", dev);
    if (!b) return moe__backend_status();
    return b->synchronize(dev.index);
}

/* --------------------------------------------------------------- storage -- */

moe_status moe__storage_new(moe_storage **out, size_t bytes, moe_device dev) {
    const moe_backend *b = moe__backend_for("moe_tensor_new", dev);
    if (!b) return moe__backend_status();
    moe_storage *s = (moe_storage *)calloc(1, sizeof *s);
    if (!s) return moe__err(MOE_ERR_NOMEM, "moe_tensor_new: out of host memory for a storage record");
    void *p = NULL;
    moe_status st = b->alloc(dev.index, bytes ? bytes : 1, &p);
    if (st != MOE_OK) {
        free(s);
        return st;
    }
    s->data = p;
    s->bytes = bytes;
    s->dev = dev;
    s->refs = 1;
    s->accounted = 1;
    __atomic_add_fetch(&moe__stat_storages, 1, __ATOMIC_RELAXED);
    moe__mem_add(dev, (int64_t)bytes);
    *out = s;
    return MOE_OK;
}

moe_status moe__storage_wrap(moe_storage **out, void *data, size_t bytes, moe_device dev,
                             void (*release)(moe_storage *), void *ctx, int accounted_host) {
    moe_storage *s = (moe_storage *)calloc(1, sizeof *s);
    if (!s) return moe__err(MOE_ERR_NOMEM, "moe__storage_wrap: out of host memory");
    s->data = data;
    s->bytes = bytes;
    s->dev = dev;
    s->refs = 1;
    s->release = release;
    s->ctx = ctx;
    s->accounted = accounted_host;
    __atomic_add_fetch(&moe__stat_storages, 1, __ATOMIC_RELAXED);
    if (accounted_host) moe__mem_add(dev, (int64_t)bytes);
    *out = s;
    return MOE_OK;
}

void moe__storage_retain(moe_storage *s) {
    if (s) __atomic_add_fetch(&s->refs, 1, __ATOMIC_ACQ_REL);
}

void moe__storage_release(moe_storage *s) {
    if (!s) return;
    if (__atomic_sub_fetch(&s->refs, 1, __ATOMIC_ACQ_REL) != 0) return;
    if (s->accounted) moe__mem_add(s->dev, -(int64_t)s->bytes);
    __atomic_sub_fetch(&moe__stat_storages, 1, __ATOMIC_RELAXED);
    if (s->release) {
        s->release(s);
    } else {
        const moe_backend *b = s->dev.type == MOE_DEVICE_CPU ? moe__cpu_backend() : moe__cuda_backend();
        if (b) b->free(s->dev.index, s->data);
    }
    free(s);
}

/* --------------------------------------------------------------- tensors -- */

int64_t moe__numel(int ndim, const int64_t *shape) {
    int64_t n = 1;
    for (int i = 0; i < ndim; i++) n *= shape[i];
    return n;
}

size_t moe__dtype_nbytes(int dtype, int64_t numel) {
    /* split so that numel * bits cannot overflow (numel may be up to 2^60, bits up to 64) */
    size_t bits = (size_t)moe_dtype_bits(dtype), n = (size_t)numel;
    return n / 8 * bits + (n % 8 * bits + 7) / 8;
}

static void moe__contig_strides(int ndim, const int64_t *shape, int64_t *stride) {
    int64_t s = 1;
    for (int i = ndim - 1; i >= 0; i--) {
        stride[i] = s;
        s *= shape[i] > 0 ? shape[i] : 1;
    }
}

moe_status moe__tensor_wrap(moe_tensor **out, moe_storage *st, int dtype, int ndim,
                            const int64_t *shape, const int64_t *stride, int64_t offset) {
    moe_tensor *t = (moe_tensor *)calloc(1, sizeof *t);
    if (!t) return moe__err(MOE_ERR_NOMEM, "moe_tensor: out of host memory for a tensor record");
    t->dtype = dtype;
    t->ndim = ndim;
    for (int i = 0; i < ndim; i++) t->shape[i] = shape[i];
    if (stride)
        for (int i = 0; i < ndim; i++) t->stride[i] = stride[i];
    else
        moe__contig_strides(ndim, shape, t->stride);
    t->offset = offset;
    t->dev = st->dev;
    t->st = st;
    moe__storage_retain(st);
    moe__count_tensor(1);
    *out = t;
    return MOE_OK;
}

moe_status moe__check_dtype_id(const char *fn, const char *arg, int dtype) {
    if (dtype < 0 || dtype >= MOE_DTYPE_COUNT)
        return moe__err(MOE_ERR_DTYPE, "%s: %s: expected a dtype id 0..%d, got %d", fn, arg,
                        MOE_DTYPE_COUNT - 1, dtype);
    return MOE_OK;
}

moe_status moe__check_shape(const char *fn, int dtype, int ndim, const int64_t *shape) {
    if (ndim < 0 || ndim > MOE_MAX_DIMS)
        return moe__err(MOE_ERR_ARG, "%s: ndim: expected 0..%d, got %d", fn, MOE_MAX_DIMS, ndim);
    if (ndim > 0 && !shape) return moe__err(MOE_ERR_ARG, "%s: shape: expected %d sizes, got NULL", fn, ndim);
    int64_t n = 1; /* product of the non-zero sizes: bounds the strides even when numel is 0 */
    for (int i = 0; i < ndim; i++) {
        if (shape[i] < 0)
            return moe__err(MOE_ERR_SHAPE, "%s: shape[%d]: expected >= 0, got %" PRId64, fn, i, shape[i]);
        if (shape[i] > 0 && n > ((int64_t)1 << 60) / shape[i])
            return moe__err(MOE_ERR_SHAPE, "%s: shape: expected at most 2^60 elements (counting non-zero sizes), got more",
                            fn);
        if (shape[i] > 0) n *= shape[i];
    }
    if (moe__dtype_nbytes(dtype, moe__numel(ndim, shape)) > ((size_t)1 << 60))
        return moe__err(MOE_ERR_SHAPE, "%s: shape: expected at most 2^60 bytes of %s, got %" PRId64 " elements", fn,
                        moe_dtype_name(dtype), moe__numel(ndim, shape));
    if (moe__dtype_packed(dtype) && ndim > 0 && (shape[ndim - 1] % 2) != 0)
        return moe__err(MOE_ERR_SHAPE, "%s: shape[%d]: expected an even size for packed dtype %s, got %" PRId64,
                        fn, ndim - 1, moe_dtype_name(dtype), shape[ndim - 1]);
    if (moe__dtype_packed(dtype) && ndim == 0)
        return moe__err(MOE_ERR_SHAPE, "%s: ndim: packed dtype %s needs at least 1 dimension, got 0", fn,
                        moe_dtype_name(dtype));
    return MOE_OK;
}

moe_status moe_tensor_new(moe_tensor **out, int dtype, int ndim, const int64_t *shape, moe_device dev) {
    if (!out) return moe__err(MOE_ERR_ARG, "moe_tensor_new: out: expected a pointer, got NULL");
    *out = NULL;
    MOE_TRY(moe__check_dtype_id("moe_tensor_new", "dtype", dtype));
    MOE_TRY(moe__check_shape("moe_tensor_new", dtype, ndim, shape));
    moe_storage *st = NULL;
    MOE_TRY(moe__storage_new(&st, moe__dtype_nbytes(dtype, moe__numel(ndim, shape)), dev));
    moe_status s = moe__tensor_wrap(out, st, dtype, ndim, shape, NULL, 0);
    moe__storage_release(st); /* the tensor holds the only reference now */
    return s;
}

void moe_tensor_free(moe_tensor *t) {
    if (!t) return;
    moe__storage_release(t->st);
    moe__count_tensor(-1);
    free(t);
}

int moe_tensor_dtype(const moe_tensor *t) { return t ? t->dtype : -1; }
int moe_tensor_ndim(const moe_tensor *t) { return t ? t->ndim : -1; }
int64_t moe_tensor_dim(const moe_tensor *t, int dim) {
    if (!t) return -1;
    if (dim < 0) dim += t->ndim;
    return (dim < 0 || dim >= t->ndim) ? -1 : t->shape[dim];
}
int64_t moe_tensor_stride(const moe_tensor *t, int dim) {
    if (!t) return 0;
    if (dim < 0) dim += t->ndim;
    return (dim < 0 || dim >= t->ndim) ? 0 : t->stride[dim];
}
int64_t moe_tensor_numel(const moe_tensor *t) { return t ? moe__numel(t->ndim, t->shape) : 0; }
int64_t moe_tensor_offset(const moe_tensor *t) { return t ? t->offset : 0; }
size_t moe_tensor_nbytes(const moe_tensor *t) {
    return t ? moe__dtype_nbytes(t->dtype, moe_tensor_numel(t)) : 0;
}
moe_device moe_tensor_device(const moe_tensor *t) {
    moe_device d = {MOE_DEVICE_CPU, 0};
    return t ? t->dev : d;
}

int moe_tensor_is_contiguous(const moe_tensor *t) {
    if (!t) return 0;
    if (moe__dtype_packed(t->dtype) && (t->offset & 1)) return 0;
    int64_t s = 1;
    for (int i = t->ndim - 1; i >= 0; i--) {
        if (t->shape[i] == 1) continue;
        if (t->shape[i] == 0) return 1;
        if (t->stride[i] != s) return 0;
        s *= t->shape[i];
    }
    return 1;
}

void *moe_tensor_data(const moe_tensor *t) {
    if (!t || !t->st) return NULL;
    size_t off = moe__dtype_packed(t->dtype) ? (size_t)(t->offset >> 1)
                                             : (size_t)t->offset * (size_t)(moe_dtype_bits(t->dtype) / 8);
    return (char *)t->st->data + off;
}

int moe__same_shape(const moe_tensor *a, const moe_tensor *b) {
    if (a->ndim != b->ndim) return 0;
    for (int i = 0; i < a->ndim; i++)
        if (a->shape[i] != b->shape[i]) return 0;
    return 1;
}

const char *moe__dims_str(int ndim, const int64_t *shape, char *buf, size_t n) {
    size_t k = 0;
    k += (size_t)snprintf(buf + k, n - k, "[");
    for (int i = 0; i < ndim && k < n; i++)
        k += (size_t)snprintf(buf + k, n - k, i ? ", %" PRId64 : "%" PRId64, shape[i]);
    if (k < n) snprintf(buf + k, n - k, "]");
    return buf;
}

const char *moe__shape_str(const moe_tensor *t, char *buf, size_t n) {
    return moe__dims_str(t->ndim, t->shape, buf, n);
}

moe_status moe__check_tensor(const char *fn, const char *arg, const moe_tensor *t, int dtype, int ndim) {
    if (!t) return moe__err(MOE_ERR_ARG, "%s: %s: expected a tensor, got NULL", fn, arg);
    if (dtype >= 0 && t->dtype != dtype)
        return moe__err(MOE_ERR_DTYPE, "%s: %s: expected dtype %s, got %s", fn, arg, moe_dtype_name(dtype),
                        moe_dtype_name(t->dtype));
    if (ndim >= 0 && t->ndim != ndim)
        return moe__err(MOE_ERR_SHAPE, "%s: %s: expected %d dimensions, got %d", fn, arg, ndim, t->ndim);
    return MOE_OK;
}

moe_status moe__check_contiguous(const char *fn, const char *arg, const moe_tensor *t) {
    if (!moe_tensor_is_contiguous(t))
        return moe__err(MOE_ERR_ARG, "%s: %s: expected a contiguous tensor, got a strided view", fn, arg);
    return MOE_OK;
}

void moe__for_each_offset(const moe_tensor *t, void (*fn)(void *ctx, int64_t i, int64_t off), void *ctx) {
    int64_t n = moe_tensor_numel(t);
    if (n == 0) return;
    int64_t idx[MOE_MAX_DIMS] = {0};
    int64_t off = t->offset;
    for (int64_t i = 0; i < n; i++) {
        fn(ctx, i, off);
        for (int d = t->ndim - 1; d >= 0; d--) {
            if (++idx[d] < t->shape[d]) {
                off += t->stride[d];
                break;
            }
            off -= t->stride[d] * (t->shape[d] - 1);
            idx[d] = 0;
        }
    }
}

/* ----------------------------------------------------------------- views -- */

static moe_status moe__view(moe_tensor **out, const moe_tensor *t, int ndim, const int64_t *shape,
                            const int64_t *stride, int64_t offset) {
    return moe__tensor_wrap(out, t->st, t->dtype, ndim, shape, stride, offset);
}

static moe_status moe__norm_dim(const char *fn, const moe_tensor *t, int *dim) {
    int d = *dim < 0 ? *dim + t->ndim : *dim;
    if (d < 0 || d >= t->ndim)
        return moe__err(MOE_ERR_ARG, "%s: dim: expected -%d..%d, got %d", fn, t->ndim, t->ndim - 1, *dim);
    *dim = d;
    return MOE_OK;
}

moe_status moe_tensor_narrow(moe_tensor **out, const moe_tensor *t, int dim, int64_t start, int64_t length) {
    const char *fn = "moe_tensor_narrow";
    if (!out) return moe__err(MOE_ERR_ARG, "%s: out: expected a pointer, got NULL", fn);
    *out = NULL;
    MOE_TRY(moe__check_tensor(fn, "t", t, -1, -1));
    MOE_TRY(moe__norm_dim(fn, t, &dim));
    if (start < 0 || start > t->shape[dim])
        return moe__err(MOE_ERR_RANGE, "%s: start: expected 0..%" PRId64 ", got %" PRId64, fn, t->shape[dim], start);
    if (length < 0 || length > t->shape[dim] - start)
        return moe__err(MOE_ERR_RANGE, "%s: length: expected 0..%" PRId64 ", got %" PRId64, fn,
                        t->shape[dim] - start, length);
    int64_t shape[MOE_MAX_DIMS];
    memcpy(shape, t->shape, sizeof shape);
    shape[dim] = length;
    return moe__view(out, t, t->ndim, shape, t->stride, t->offset + start * t->stride[dim]);
}

moe_status moe_tensor_select(moe_tensor **out, const moe_tensor *t, int dim, int64_t index) {
    const char *fn = "moe_tensor_select";
    if (!out) return moe__err(MOE_ERR_ARG, "%s: out: expected a pointer, got NULL", fn);
    *out = NULL;
    MOE_TRY(moe__check_tensor(fn, "t", t, -1, -1));
    MOE_TRY(moe__norm_dim(fn, t, &dim));
    if (index < 0 || index >= t->shape[dim])
        return moe__err(MOE_ERR_RANGE, "%s: index: expected 0..%" PRId64 ", got %" PRId64, fn, t->shape[dim] - 1,
                        index);
    if (moe__dtype_packed(t->dtype) && t->ndim == 1)
        return moe__err(MOE_ERR_SHAPE, "%s: t: selecting a single element of packed dtype %s is not supported",
                        fn, moe_dtype_name(t->dtype));
    int64_t shape[MOE_MAX_DIMS], stride[MOE_MAX_DIMS];
    int k = 0;
    for (int i = 0; i < t->ndim; i++) {
        if (i == dim) continue;
        shape[k] = t->shape[i];
        stride[k] = t->stride[i];
        k++;
    }
    return moe__view(out, t, t->ndim - 1, shape, stride, t->offset + index * t->stride[dim]);
}

moe_status moe_tensor_transpose(moe_tensor **out, const moe_tensor *t, int d0, int d1) {
    const char *fn = "moe_tensor_transpose";
    if (!out) return moe__err(MOE_ERR_ARG, "%s: out: expected a pointer, got NULL", fn);
    *out = NULL;
    MOE_TRY(moe__check_tensor(fn, "t", t, -1, -1));
    MOE_TRY(moe__norm_dim(fn, t, &d0));
    MOE_TRY(moe__norm_dim(fn, t, &d1));
    int64_t shape[MOE_MAX_DIMS], stride[MOE_MAX_DIMS];
    memcpy(shape, t->shape, sizeof shape);
    memcpy(stride, t->stride, sizeof stride);
    shape[d0] = t->shape[d1];
    shape[d1] = t->shape[d0];
    stride[d0] = t->stride[d1];
    stride[d1] = t->stride[d0];
    return moe__view(out, t, t->ndim, shape, stride, t->offset);
}

moe_status moe_tensor_reshape(moe_tensor **out, const moe_tensor *t, int ndim, const int64_t *shape_in) {
    const char *fn = "moe_tensor_reshape";
    if (!out) return moe__err(MOE_ERR_ARG, "%s: out: expected a pointer, got NULL", fn);
    *out = NULL;
    MOE_TRY(moe__check_tensor(fn, "t", t, -1, -1));
    if (ndim < 0 || ndim > MOE_MAX_DIMS)
        return moe__err(MOE_ERR_ARG, "%s: ndim: expected 0..%d, got %d", fn, MOE_MAX_DIMS, ndim);
    if (ndim > 0 && !shape_in) return moe__err(MOE_ERR_ARG, "%s: shape: expected %d sizes, got NULL", fn, ndim);
    if (!moe_tensor_is_contiguous(t))
        return moe__err(MOE_ERR_ARG,
                        "%s: t: expected a contiguous tensor, got a strided view (call contiguous() first)", fn);
    int64_t shape[MOE_MAX_DIMS];
    int infer = -1;
    int64_t known = 1;
    for (int i = 0; i < ndim; i++) {
        shape[i] = shape_in[i];
        if (shape[i] == -1) {
            if (infer >= 0) return moe__err(MOE_ERR_SHAPE, "%s: shape: expected at most one -1, got two", fn);
            infer = i;
        } else if (shape[i] < 0) {
            return moe__err(MOE_ERR_SHAPE, "%s: shape[%d]: expected >= 0 or -1, got %" PRId64, fn, i, shape[i]);
        } else {
            if (shape[i] > 0 && known > INT64_MAX / shape[i])
                return moe__err(MOE_ERR_SHAPE, "%s: shape: expected at most 2^63 elements, got more", fn);
            known *= shape[i];
        }
    }
    int64_t n = moe_tensor_numel(t);
    if (infer >= 0) {
        if (known == 0 || n % known != 0)
            return moe__err(MOE_ERR_SHAPE, "%s: shape: cannot infer -1 for %" PRId64 " elements", fn, n);
        shape[infer] = n / known;
        known *= shape[infer];
    }
    if (known != n) {
        char b[128];
        return moe__err(MOE_ERR_SHAPE, "%s: shape: expected %" PRId64 " elements (from %s), got %" PRId64, fn, n,
                        moe__shape_str(t, b, sizeof b), known);
    }
    MOE_TRY(moe__check_shape(fn, t->dtype, ndim, shape));
    return moe__view(out, t, ndim, shape, NULL, t->offset);
}

/* ---------------------------------------------------------- copy & cast -- */

/* Contiguous copy of src onto device dev (dtype kept). */
static moe_status moe__to_device_contig(moe_tensor **out, const moe_tensor *src, moe_device dev) {
    moe_tensor *c = NULL;
    const moe_tensor *from = src;
    if (!moe_tensor_is_contiguous(src)) {
        MOE_TRY(moe_tensor_contiguous(&c, src));
        from = c;
    }
    moe_tensor *dst = NULL;
    moe_status s = moe_tensor_new(&dst, src->dtype, src->ndim, src->shape, dev);
    if (s == MOE_OK) {
        size_t n = moe_tensor_nbytes(from);
        if (n > 0) {
            if (from->dev.type == MOE_DEVICE_CPU && dev.type == MOE_DEVICE_CPU)
                memcpy(moe_tensor_data(dst), moe_tensor_data(from), n);
            else if (from->dev.type == MOE_DEVICE_CPU)
                s = moe__backend_for("moe_tensor_copy", dev)->copy_h2d(dev.index, moe_tensor_data(dst),
                                                                       moe_tensor_data(from), n);
            else if (dev.type == MOE_DEVICE_CPU)
                s = moe__backend_for("moe_tensor_copy", from->dev)
                        ->copy_d2h(from->dev.index, moe_tensor_data(dst), moe_tensor_data(from), n);
            else if (from->dev.index == dev.index)
                s = moe__backend_for("moe_tensor_copy", dev)->copy_d2d(dev.index, moe_tensor_data(dst),
                                                                       moe_tensor_data(from), n);
            else { /* between two GPUs: through the host */
                moe_tensor *h = NULL;
                moe_device cpu = {MOE_DEVICE_CPU, 0};
                s = moe__to_device_contig(&h, from, cpu);
                if (s == MOE_OK) {
                    moe_tensor_free(dst);
                    dst = NULL;
                    s = moe__to_device_contig(&dst, h, dev);
                }
                moe_tensor_free(h);
            }
        }
    }
    moe_tensor_free(c);
    if (s != MOE_OK) {
        moe_tensor_free(dst);
        return s;
    }
    *out = dst;
    return MOE_OK;
}

static moe_status moe__cast_copy(const char *fn, moe_tensor *dst, const moe_tensor *src) {
    if (!moe__same_shape(dst, src)) {
        char a[128], b[128];
        return moe__err(MOE_ERR_SHAPE, "%s: src: expected shape %s (as dst), got %s", fn,
                        moe__shape_str(dst, a, sizeof a), moe__shape_str(src, b, sizeof b));
    }
    if (moe_tensor_numel(dst) == 0) return MOE_OK;
    if (moe__same_device(dst->dev, src->dev)) {
        const moe_backend *b = moe__backend_for(fn, dst->dev);
        if (!b) return moe__backend_status();
        return b->copy_cast(dst, src);
    }
    /* different devices: move src to dst's device first, then copy/cast there */
    moe_tensor *tmp = NULL;
    MOE_TRY(moe__to_device_contig(&tmp, src, dst->dev));
    moe_status s = moe__backend_for(fn, dst->dev)->copy_cast(dst, tmp);
    moe_tensor_free(tmp);
    return s;
}

moe_status moe_tensor_copy(moe_tensor *dst, const moe_tensor *src) {
    const char *fn = "moe_tensor_copy";
    MOE_TRY(moe__check_tensor(fn, "dst", dst, -1, -1));
    MOE_TRY(moe__check_tensor(fn, "src", src, dst->dtype, -1));
    return moe__cast_copy(fn, dst, src);
}

moe_status moe_tensor_cast_into(moe_tensor *dst, const moe_tensor *src) {
    const char *fn = "moe_tensor_cast_into";
    MOE_TRY(moe__check_tensor(fn, "dst", dst, -1, -1));
    MOE_TRY(moe__check_tensor(fn, "src", src, -1, -1));
    if (!moe__same_device(dst->dev, src->dev)) {
        char a[32], b[32];
        return moe__err(MOE_ERR_DEVICE, "%s: src: expected device %s (as dst), got %s", fn,
                        moe__device_str(dst->dev, a, sizeof a), moe__device_str(src->dev, b, sizeof b));
    }
    return moe__cast_copy(fn, dst, src);
}

moe_status moe_tensor_copy_from_host(moe_tensor *t, const void *src, size_t nbytes) {
    const char *fn = "moe_tensor_copy_from_host";
    MOE_TRY(moe__check_tensor(fn, "t", t, -1, -1));
    MOE_TRY(moe__check_contiguous(fn, "t", t));
    if (nbytes != moe_tensor_nbytes(t))
        return moe__err(MOE_ERR_SHAPE, "%s: nbytes: expected %zu, got %zu", fn, moe_tensor_nbytes(t), nbytes);
    if (nbytes == 0) return MOE_OK;
    if (!src) return moe__err(MOE_ERR_ARG, "%s: src: expected a pointer, got NULL", fn);
    if (t->dev.type == MOE_DEVICE_CPU) {
        memcpy(moe_tensor_data(t), src, nbytes);
        return MOE_OK;
    }
    const moe_backend *b = moe__backend_for(fn, t->dev);
    if (!b) return moe__backend_status();
    return b->copy_h2d(t->dev.index, moe_tensor_data(t), src, nbytes);
}

moe_status moe_tensor_copy_to_host(const moe_tensor *t, void *dst, size_t nbytes) {
    const char *fn = "moe_tensor_copy_to_host";
    MOE_TRY(moe__check_tensor(fn, "t", t, -1, -1));
    MOE_TRY(moe__check_contiguous(fn, "t", t));
    if (nbytes != moe_tensor_nbytes(t))
        return moe__err(MOE_ERR_SHAPE, "%s: nbytes: expected %zu, got %zu", fn, moe_tensor_nbytes(t), nbytes);
    if (nbytes == 0) return MOE_OK;
    if (!dst) return moe__err(MOE_ERR_ARG, "%s: dst: expected a pointer, got NULL", fn);
    if (t->dev.type == MOE_DEVICE_CPU) {
        memcpy(dst, moe_tensor_data(t), nbytes);
        return MOE_OK;
    }
    const moe_backend *b = moe__backend_for(fn, t->dev);
    if (!b) return moe__backend_status();
    return b->copy_d2h(t->dev.index, dst, moe_tensor_data(t), nbytes);
}

moe_status moe_tensor_to_device(moe_tensor **out, const moe_tensor *src, moe_device dev) {
    const char *fn = "moe_tensor_to_device";
    if (!out) return moe__err(MOE_ERR_ARG, "%s: out: expected a pointer, got NULL", fn);
    *out = NULL;
    MOE_TRY(moe__check_tensor(fn, "src", src, -1, -1));
    if (!moe__backend_for(fn, dev)) return moe__backend_status();
    return moe__to_device_contig(out, src, dev);
}

moe_status moe_tensor_contiguous(moe_tensor **out, const moe_tensor *src) {
    const char *fn = "moe_tensor_contiguous";
    if (!out) return moe__err(MOE_ERR_ARG, "%s: out: expected a pointer, got NULL", fn);
    *out = NULL;
    MOE_TRY(moe__check_tensor(fn, "src", src, -1, -1));
    moe_tensor *dst = NULL;
    MOE_TRY(moe_tensor_new(&dst, src->dtype, src->ndim, src->shape, src->dev));
    moe_status s = moe__cast_copy(fn, dst, src);
    if (s != MOE_OK) {
        moe_tensor_free(dst);
        return s;
    }
    *out = dst;
    return MOE_OK;
}

moe_status moe_tensor_cast(moe_tensor **out, const moe_tensor *src, int dtype) {
    const char *fn = "moe_tensor_cast";
    if (!out) return moe__err(MOE_ERR_ARG, "%s: out: expected a pointer, got NULL", fn);
    *out = NULL;
    MOE_TRY(moe__check_tensor(fn, "src", src, -1, -1));
    MOE_TRY(moe__check_dtype_id(fn, "dtype", dtype));
    moe_tensor *dst = NULL;
    MOE_TRY(moe_tensor_new(&dst, dtype, src->ndim, src->shape, src->dev));
    moe_status s = moe__cast_copy(fn, dst, src);
    if (s != MOE_OK) {
        moe_tensor_free(dst);
        return s;
    }
    *out = dst;
    return MOE_OK;
}

moe_status moe_tensor_fill(moe_tensor *t, double value) {
    const char *fn = "moe_tensor_fill";
    MOE_TRY(moe__check_tensor(fn, "t", t, -1, -1));
    if (moe_tensor_numel(t) == 0) return MOE_OK;
    const moe_backend *b = moe__backend_for(fn, t->dev);
    if (!b) return moe__backend_status();
    return b->fill(t, value);
}

static moe_status moe__rand(const char *fn, moe_tensor *t, uint64_t seed, int kind, double a, double b) {
    MOE_TRY(moe__check_tensor(fn, "t", t, -1, -1));
    if (moe_tensor_numel(t) == 0) return MOE_OK;
    const moe_backend *be = moe__backend_for(fn, t->dev);
    if (!be) return moe__backend_status();
    return be->rand(t, seed, kind, a, b);
}

moe_status moe_tensor_rand_uniform(moe_tensor *t, uint64_t seed, double lo, double hi) {
    if (!(hi >= lo))
        return moe__err(MOE_ERR_ARG, "moe_tensor_rand_uniform: hi: expected >= lo (%g), got %g", lo, hi);
    return moe__rand("moe_tensor_rand_uniform", t, seed, 0, lo, hi);
}

moe_status moe_tensor_rand_normal(moe_tensor *t, uint64_t seed, double mean, double std) {
    if (!(std >= 0)) return moe__err(MOE_ERR_ARG, "moe_tensor_rand_normal: std: expected >= 0, got %g", std);
    return moe__rand("moe_tensor_rand_normal", t, seed, 1, mean, std);
}

moe_status moe_tensor_arange(moe_tensor *t, double start, double step) {
    const char *fn = "moe_tensor_arange";
    MOE_TRY(moe__check_tensor(fn, "t", t, -1, -1));
    if (moe_tensor_numel(t) == 0) return MOE_OK;
    const moe_backend *b = moe__backend_for(fn, t->dev);
    if (!b) return moe__backend_status();
    return b->arange(t, start, step);
}

/* ------------------------------------------------------ host f64 access -- */

static moe_status moe__host_view(const char *fn, const moe_tensor *t, moe_tensor **host) {
    if (t->dev.type == MOE_DEVICE_CPU) {
        *host = NULL;
        return MOE_OK;
    }
    moe_device cpu = {MOE_DEVICE_CPU, 0};
    return moe__to_device_contig(host, t, cpu);
}

typedef struct {
    const void *base;
    int dtype;
    double *out;
    const double *in;
    void *wbase;
} moe__f64_ctx;

static void moe__read_one(void *ctx, int64_t i, int64_t off) {
    moe__f64_ctx *c = (moe__f64_ctx *)ctx;
    if (moe_dtype_is_float(c->dtype)) c->out[i] = (double)moe__load_f32(c->base, c->dtype, off);
    else c->out[i] = (double)moe__load_i64(c->base, c->dtype, off);
}

moe_status moe_tensor_read_f64(const moe_tensor *t, double *out, int64_t n) {
    const char *fn = "moe_tensor_read_f64";
    MOE_TRY(moe__check_tensor(fn, "t", t, -1, -1));
    if (n != moe_tensor_numel(t))
        return moe__err(MOE_ERR_SHAPE, "%s: n: expected %" PRId64 " (numel), got %" PRId64, fn, moe_tensor_numel(t), n);
    if (n == 0) return MOE_OK;
    if (!out) return moe__err(MOE_ERR_ARG, "%s: out: expected a pointer, got NULL", fn);
    moe_tensor *h = NULL;
    MOE_TRY(moe__host_view(fn, t, &h));
    const moe_tensor *src = h ? h : t;
    moe__f64_ctx c = {src->st->data, src->dtype, out, NULL, NULL};
    moe__for_each_offset(src, moe__read_one, &c);
    moe_tensor_free(h);
    return MOE_OK;
}

static void moe__write_one(void *ctx, int64_t i, int64_t off) {
    moe__f64_ctx *c = (moe__f64_ctx *)ctx;
    double v = c->in[i];
    if (moe_dtype_is_float(c->dtype)) {
        moe__store_f32(c->wbase, c->dtype, off, (float)v);
    } else {
        int64_t iv;
        if (v != v) iv = 0;
        else if (v >= 9223372036854775807.0) iv = INT64_MAX;
        else if (v <= -9223372036854775808.0) iv = INT64_MIN;
        else iv = (int64_t)v;
        if (c->dtype == MOE_BOOL) iv = v != 0.0;
        moe__store_i64(c->wbase, c->dtype, off, iv);
    }
}

moe_status moe_tensor_write_f64(moe_tensor *t, const double *src, int64_t n) {
    const char *fn = "moe_tensor_write_f64";
    MOE_TRY(moe__check_tensor(fn, "t", t, -1, -1));
    if (n != moe_tensor_numel(t))
        return moe__err(MOE_ERR_SHAPE, "%s: n: expected %" PRId64 " (numel), got %" PRId64, fn, moe_tensor_numel(t), n);
    if (n == 0) return MOE_OK;
    if (!src) return moe__err(MOE_ERR_ARG, "%s: src: expected a pointer, got NULL", fn);
    if (t->dev.type == MOE_DEVICE_CPU) {
        moe__f64_ctx c = {NULL, t->dtype, NULL, src, t->st->data};
        moe__for_each_offset(t, moe__write_one, &c);
        return MOE_OK;
    }
    /* device: build a contiguous host tensor, then copy into t (any strides) */
    moe_tensor *h = NULL;
    moe_device cpu = {MOE_DEVICE_CPU, 0};
    MOE_TRY(moe_tensor_new(&h, t->dtype, t->ndim, t->shape, cpu));
    moe__f64_ctx c = {NULL, t->dtype, NULL, src, h->st->data};
    moe__for_each_offset(h, moe__write_one, &c);
    moe_status s = moe_tensor_copy(t, h);
    moe_tensor_free(h);
    return s;
}

/* ---------------------------------------------------------------- graphs -- */

struct moe_graph {
    void *exec;
    moe_device dev;
};

moe_status moe_graph_begin(moe_device dev) {
#ifdef MOE_HAVE_CUDA
    if (dev.type != MOE_DEVICE_CUDA)
        return moe__err(MOE_ERR_DEVICE, "moe_graph_begin: dev: expected a CUDA device, got cpu");
    if (!moe__backend_for("moe_graph_begin", dev)) return moe__backend_status();
    return moe__cuda_graph_begin(dev.index);
#else
    return moe__err(MOE_ERR_NO_CUDA, "moe_graph_begin: CUDA graphs need CUDA: moelab was built without CUDA support");
#endif
}

moe_status moe_graph_end(moe_graph **out) {
    if (!out) return moe__err(MOE_ERR_ARG, "moe_graph_end: out: expected a pointer, got NULL");
    *out = NULL;
#ifdef MOE_HAVE_CUDA
    moe_graph *g = (moe_graph *)calloc(1, sizeof *g);
    if (!g) {
        moe__cuda_graph_abort();
        return moe__err(MOE_ERR_NOMEM, "moe_graph_end: out of host memory");
    }
    moe_status s = moe__cuda_graph_end(&g->exec);
    if (s != MOE_OK) {
        free(g);
        return s;
    }
    *out = g;
    return MOE_OK;
#else
    return moe__err(MOE_ERR_NO_CUDA, "moe_graph_end: moelab was built without CUDA support");
#endif
}

void moe_graph_abort(void) {
#ifdef MOE_HAVE_CUDA
    moe__cuda_graph_abort();
#endif
}

int moe_graph_capturing(void) {
#ifdef MOE_HAVE_CUDA
    return moe__cuda_graph_capturing();
#else
    return 0;
#endif
}

moe_status moe_graph_replay(moe_graph *g) {
    if (!g) return moe__err(MOE_ERR_ARG, "moe_graph_replay: g: expected a graph, got NULL");
#ifdef MOE_HAVE_CUDA
    return moe__cuda_graph_replay(g->exec);
#else
    return moe__err(MOE_ERR_NO_CUDA, "moe_graph_replay: moelab was built without CUDA support");
#endif
}

moe_status moe_graph_time(moe_graph *g, int warmup, int n, float *times_us) {
    if (!g) return moe__err(MOE_ERR_ARG, "moe_graph_time: g: expected a graph, got NULL");
    if (warmup < 0) return moe__err(MOE_ERR_ARG, "moe_graph_time: warmup: expected >= 0, got %d", warmup);
    if (n < 1) return moe__err(MOE_ERR_ARG, "moe_graph_time: n: expected >= 1, got %d", n);
    if (!times_us) return moe__err(MOE_ERR_ARG, "moe_graph_time: times_us: expected a buffer of n floats, got NULL");
#ifdef MOE_HAVE_CUDA
    return moe__cuda_graph_time(g->exec, warmup, n, times_us);
#else
    return moe__err(MOE_ERR_NO_CUDA, "moe_graph_time: moelab was built without CUDA support");
#endif
}

void moe_graph_free(moe_graph *g) {
    if (!g) return;
#ifdef MOE_HAVE_CUDA
    moe__cuda_graph_free(g->exec);
#endif
    free(g);
}
