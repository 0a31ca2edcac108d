/* ops.c -- dense math ops (router GEMM, RMSNorm, axpby): validation and dispatch. */
#include "internal.h"
#include "backend.h"

#include <inttypes.h>
#include <string.h>

static int moe__is_f(int dt) { return dt == MOE_F32 || dt == MOE_BF16 || dt == MOE_F16; }

static moe_status moe__check_f(const char *fn, const char *arg, const moe_tensor *t) {
    MOE_TRY(moe__check_tensor(fn, arg, t, -1, -1));
    if (!moe__is_f(t->dtype))
        return moe__err(MOE_ERR_DTYPE, "%s: %s: expected dtype f32, bf16 or f16, got %s", fn, arg,
                        moe_dtype_name(t->dtype));
    return MOE_OK;
}

static moe_status moe__check_dev(const char *fn, const char *arg, const moe_tensor *ref, const moe_tensor *t) {
    if (!moe__same_device(ref->dev, t->dev)) {
        char a[32], b[32];
        return moe__err(MOE_ERR_DEVICE, "%s: %s: expected device %s, got %s", fn, arg,
                        moe__device_str(ref->dev, a, sizeof a), moe__device_str(t->dev, b, sizeof b));
    }
    return MOE_OK;
}

moe_status moe_matmul_nt(const moe_tensor *a, const moe_tensor *b, moe_tensor **out) {
    const char *fn = "moe_matmul_nt";
    if (!out) return moe__err(MOE_ERR_ARG, "%s: out: expected a pointer, got NULL", fn);
    MOE_TRY(moe__check_f(fn, "a", a));
    MOE_TRY(moe__check_f(fn, "b", b));
    if (a->ndim != 2) return moe__err(MOE_ERR_SHAPE, "%s: a: expected 2 dimensions [M, K], got %d", fn, a->ndim);
    if (b->ndim != 2) return moe__err(MOE_ERR_SHAPE, "%s: b: expected 2 dimensions [N, K], got %d", fn, b->ndim);
    MOE_TRY(moe__check_dev(fn, "b", a, b));
    if (a->shape[1] != b->shape[1])
        return moe__err(MOE_ERR_SHAPE, "%s: b: expected [N, %" PRId64 "] (K of a), got [%" PRId64 ", %" PRId64 "]",
                        fn, a->shape[1], b->shape[0], b->shape[1]);
    int64_t M = a->shape[0], N = b->shape[0];
    int allocated = 0;
    if (*out) {
        moe_tensor *o = *out;
        MOE_TRY(moe__check_tensor(fn, "out", o, -1, 2));
        if (o->dtype != MOE_F32 && o->dtype != MOE_BF16)
            return moe__err(MOE_ERR_DTYPE, "%s: out: expected dtype f32 or bf16, got %s", fn, moe_dtype_name(o->dtype));
        if (o->shape[0] != M || o->shape[1] != N)
            return moe__err(MOE_ERR_SHAPE, "%s: out: expected [%" PRId64 ", %" PRId64 "], got [%" PRId64 ", %" PRId64 "]",
                            fn, M, N, o->shape[0], o->shape[1]);
        MOE_TRY(moe__check_contiguous(fn, "out", o));
        MOE_TRY(moe__check_dev(fn, "out", a, o));
    } else {
        int64_t shape[2] = {M, N};
        MOE_TRY(moe_tensor_new(out, MOE_F32, 2, shape, a->dev));
        allocated = 1;
    }
    moe_status s = MOE_OK;
    if (M > 0 && N > 0) {
        if (a->dev.type == MOE_DEVICE_CPU) {
            s = moe__cpu_matmul_nt(a, b, *out);
        } else {
#ifdef MOE_HAVE_CUDA
            s = moe__backend_for(fn, a->dev) ? moe__cuda_matmul_nt(a, b, *out) : moe__backend_status();
#else
            s = moe__err(MOE_ERR_NO_CUDA, "%s: moelab was built without CUDA support", fn);
#endif
        }
    }
    if (s != MOE_OK && allocated) {
        moe_tensor_free(*out);
        *out = NULL;
    }
    return s;
}

moe_status moe_rmsnorm(const moe_tensor *x, const moe_tensor *w, double eps, moe_tensor **out) {
    const char *fn = "moe_rmsnorm";
    if (!out) return moe__err(MOE_ERR_ARG, "%s: out: expected a pointer, got NULL", fn);
    MOE_TRY(moe__check_f(fn, "x", x));
    if (x->ndim < 1) return moe__err(MOE_ERR_SHAPE, "%s: x: expected at least 1 dimension, got 0", fn);
    MOE_TRY(moe__check_contiguous(fn, "x", x));
    if (!(eps >= 0)) return moe__err(MOE_ERR_ARG, "%s: eps: expected >= 0, got %g", fn, eps);
    int64_t H = x->shape[x->ndim - 1];
    if (w) {
        MOE_TRY(moe__check_f(fn, "weight", w));
        MOE_TRY(moe__check_dev(fn, "weight", x, w));
        MOE_TRY(moe__check_contiguous(fn, "weight", w));
        if (w->ndim != 1 || w->shape[0] != H)
            return moe__err(MOE_ERR_SHAPE, "%s: weight: expected [%" PRId64 "], got %d dims with first %" PRId64, fn, H,
                            w->ndim, w->ndim ? w->shape[0] : 0);
    }
    int allocated = 0;
    if (*out) {
        MOE_TRY(moe__check_f(fn, "out", *out));
        MOE_TRY(moe__check_dev(fn, "out", x, *out));
        MOE_TRY(moe__check_contiguous(fn, "out", *out));
        if (!moe__same_shape(x, *out)) {
            char p[128], q[128];
            return moe__err(MOE_ERR_SHAPE, "%s: out: expected shape %s, got %s", fn, moe__shape_str(x, p, sizeof p),
                            moe__shape_str(*out, q, sizeof q));
        }
    } else {
        MOE_TRY(moe_tensor_new(out, x->dtype, x->ndim, x->shape, x->dev));
        allocated = 1;
    }
    moe_status s = MOE_OK;
    if (moe_tensor_numel(x) > 0) {
        if (x->dev.type == MOE_DEVICE_CPU) {
            s = moe__cpu_rmsnorm(x, w, eps, *out);
        } else {
#ifdef MOE_HAVE_CUDA
            s = moe__backend_for(fn, x->dev) ? moe__cuda_rmsnorm(x, w, eps, *out) : moe__backend_status();
#else
            s = moe__err(MOE_ERR_NO_CUDA, "%s: moelab was built without CUDA support", fn);
#endif
        }
    }
    if (s != MOE_OK && allocated) {
        moe_tensor_free(*out);
        *out = NULL;
    }
    return s;
}

moe_status moe_axpby(double alpha, const moe_tensor *x, double beta, moe_tensor *y) {
    const char *fn = "moe_axpby";
    MOE_TRY(moe__check_f(fn, "x", x));
    MOE_TRY(moe__check_f(fn, "y", y));
    MOE_TRY(moe__check_dev(fn, "y", x, y));
    MOE_TRY(moe__check_contiguous(fn, "x", x));
    MOE_TRY(moe__check_contiguous(fn, "y", y));
    if (!moe__same_shape(x, y)) {
        char p[128], q[128];
        return moe__err(MOE_ERR_SHAPE, "%s: y: expected shape %s (as x), got %s", fn, moe__shape_str(x, p, sizeof p),
                        moe__shape_str(y, q, sizeof q));
    }
    if (moe_tensor_numel(x) == 0) return MOE_OK;
    if (x->dev.type == MOE_DEVICE_CPU) return moe__cpu_axpby(alpha, x, beta, y);
#ifdef MOE_HAVE_CUDA
    return moe__backend_for(fn, x->dev) ? moe__cuda_axpby(alpha, x, beta, y) : moe__backend_status();
#else
    return moe__err(MOE_ERR_NO_CUDA, "%s: moelab was built without CUDA support", fn);
#endif
}
