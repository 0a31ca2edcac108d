/* async_copy.c -- pinned host tensors and asynchronous device-to-host copies (used by the
 * trace recorder so that committing a batch does not stall the next one). */
#include "internal.h"
#include "backend.h"

#include <stdlib.h>
#include <string.h>

struct moe_event {
    void *cuda_event; /* NULL: already complete */
};

#ifdef MOE_HAVE_CUDA
static void moe__pinned_release(moe_storage *s) { moe__cuda_host_free(s->data); }
#endif

moe_status moe_tensor_new_pinned(moe_tensor **out, int dtype, int ndim, const int64_t *shape) {
    const char *fn = "moe_tensor_new_pinned";
    if (!out) return moe__err(MOE_ERR_ARG, "%s: out: expected a pointer, got NULL", fn);
    *out = NULL;
    moe_device cpu = {MOE_DEVICE_CPU, 0};
#ifdef MOE_HAVE_CUDA
    if (moe_cuda_device_count() > 0) {
        MOE_TRY(moe__check_dtype_id(fn, "dtype", dtype));
        MOE_TRY(moe__check_shape(fn, dtype, ndim, shape));
        size_t bytes = moe__dtype_nbytes(dtype, moe__numel(ndim, shape));
        void *p = NULL;
        if (moe__cuda_host_alloc(bytes ? bytes : 1, &p) != MOE_OK) {
            /* pageable fallback: still correct, the copies just do not overlap */
            moe_clear_error();
            return moe_tensor_new(out, dtype, ndim, shape, cpu);
        }
        moe_storage *st = NULL;
        moe_status s = moe__storage_wrap(&st, p, bytes, cpu, moe__pinned_release, NULL, 1);
        if (s != MOE_OK) {
            moe__cuda_host_free(p);
            return s;
        }
        s = moe__tensor_wrap(out, st, dtype, ndim, shape, NULL, 0);
        moe__storage_release(st);
        return s;
    }
#endif
    return moe_tensor_new(out, dtype, ndim, shape, cpu);
}

moe_status moe_tensor_copy_to_host_async(moe_tensor *dst, const moe_tensor *src, moe_event **ev) {
    const char *fn = "moe_tensor_copy_to_host_async";
    if (!ev) return moe__err(MOE_ERR_ARG, "%s: ev: expected a pointer, got NULL", fn);
    *ev = NULL;
    MOE_TRY(moe__check_tensor(fn, "dst", dst, -1, -1));
    MOE_TRY(moe__check_tensor(fn, "src", src, dst->dtype, -1));
    if (dst->dev.type != MOE_DEVICE_CPU)
        return moe__err(MOE_ERR_DEVICE, "%s: dst: expected a host tensor, got a CUDA tensor", fn);
    MOE_TRY(moe__check_contiguous(fn, "dst", dst));
    MOE_TRY(moe__check_contiguous(fn, "src", src));
    if (moe_tensor_numel(dst) != moe_tensor_numel(src))
        return moe__err(MOE_ERR_SHAPE, "%s: src: expected %lld elements (as dst), got %lld", fn,
                        (long long)moe_tensor_numel(dst), (long long)moe_tensor_numel(src));
    moe_event *e = (moe_event *)calloc(1, sizeof *e);
    if (!e) return moe__err(MOE_ERR_NOMEM, "%s: out of host memory", fn);
    size_t n = moe_tensor_nbytes(src);
    if (n > 0) {
        if (src->dev.type == MOE_DEVICE_CPU) {
            memmove(moe_tensor_data(dst), moe_tensor_data(src), n);
        } else {
#ifdef MOE_HAVE_CUDA
            if (!moe__backend_for(fn, src->dev)) {
                free(e);
                return moe__backend_status();
            }
            moe_status s = moe__cuda_d2h_async(src->dev.index, moe_tensor_data(dst), moe_tensor_data(src), n,
                                               &e->cuda_event);
            if (s != MOE_OK) {
                free(e);
                return s;
            }
#else
            free(e);
            return moe__err(MOE_ERR_NO_CUDA, "%s: src: moelab was built without CUDA support", fn);
#endif
        }
    }
    *ev = e;
    return MOE_OK;
}

moe_status moe_event_wait(moe_event *ev) {
    if (!ev || !ev->cuda_event) return MOE_OK;
#ifdef MOE_HAVE_CUDA
    return moe__cuda_event_wait(ev->cuda_event);
#else
    return MOE_OK;
#endif
}

int moe_event_done(moe_event *ev) {
    if (!ev || !ev->cuda_event) return 1;
#ifdef MOE_HAVE_CUDA
    return moe__cuda_event_query(ev->cuda_event);
#else
    return 1;
#endif
}

void moe_event_free(moe_event *ev) {
    if (!ev) return;
#ifdef MOE_HAVE_CUDA
    if (ev->cuda_event) {
        (void)moe__cuda_event_wait(ev->cuda_event);
        moe__cuda_event_free(ev->cuda_event);
    }
#endif
    free(ev);
}
