/* quant.c -- quantisation modes: names, argument validation, qtensor records and dispatch to
 * the CPU reference (cpu/quant_cpu.c) or the CUDA kernels (kernels/quant.cu).  The numerics
 * live in quant_math.h; docs/quantization.md describes them. */
#include "internal.h"
#include "backend.h"
#include "quant_math.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MOE__QUANT_NAME(name, id, text) text,
static const char *const moe__quant_names[] = {MOE_QUANT_MODE_LIST(MOE__QUANT_NAME)};
#undef MOE__QUANT_NAME

const char *moe_quant_mode_name(int mode) {
    return (mode >= 0 && mode < MOE_QUANT_MODE_COUNT) ? moe__quant_names[mode] : "?";
}

int moe_quant_mode_from_name(const char *name) {
    if (!name) {
        moe__err(MOE_ERR_ARG, "moe_quant_mode_from_name: name: expected a mode name, got NULL");
        return -1;
    }
    for (int i = 0; i < MOE_QUANT_MODE_COUNT; i++)
        if (strcmp(name, moe__quant_names[i]) == 0) return i;
    moe__err(MOE_ERR_ARG,
             "moe_quant_mode_from_name: name: expected one of bf16, fp8, fp8_block, nvfp4, mxfp4, "
             "mxint4, got \"%.64s\"",
             name);
    return -1;
}

moe_quant_opts moe_quant_opts_default(void) {
    moe_quant_opts o;
    memset(&o, 0, sizeof o);
    return o;
}

/* ----------------------------------------------------------------- layouts -- */

/* Per mode: data dtype, scale dtype (-1: none), K block (0: whole row). */
static const int moe__q_data_dt[] = {MOE_BF16, MOE_F8E4M3, MOE_F8E4M3, MOE_E2M1, MOE_E2M1, MOE_I4};
static const int moe__q_scale_dt[] = {-1, MOE_F32, MOE_F32, MOE_F8E4M3, MOE_UE8M0, MOE_BF16};
static const int moe__q_kblock[] = {0, 0, 128, 16, 32, 32};
static const char *const moe__q_scale_desc[] = {
    "", "[E] or [] (one f32 per matrix)", "[E, N/block_rows, K/128]", "[E, N, K/16]", "[E, N, K/32]",
    "[E, N, K/32]"};

/* Expected layout of a mode for a logical shape. */
typedef struct moe__q_layout {
    int block_rows, block_cols;
    int scale_ndim;
    int64_t scale_shape[3];
    int global_ndim; /* -1: no global scale */
    int64_t global_shape[1];
} moe__q_layout;

/* Resolve opts.block_rows for `mode` (want: the caller's value, 0 = default). */
static moe_status moe__q_block_rows(const char *fn, int mode, int want, int *rows) {
    if (mode == MOE_QUANT_FP8_BLOCK) {
        if (want == 0) want = 128;
        if (want != 1 && want != 128)
            return moe__err(MOE_ERR_ARG, "%s: opts.block_rows: expected 128 (weights), 1 (activations) or 0 for fp8_block, got %d",
                            fn, want);
        *rows = want;
        return MOE_OK;
    }
    int ok = want == 0 || (want == 1 && (mode == MOE_QUANT_NVFP4 || mode == MOE_QUANT_MXFP4 ||
                                         mode == MOE_QUANT_MXINT4));
    if (!ok)
        return moe__err(MOE_ERR_ARG, "%s: opts.block_rows: expected 0%s for %s, got %d", fn,
                        mode == MOE_QUANT_BF16 || mode == MOE_QUANT_FP8 ? "" : " or 1",
                        moe_quant_mode_name(mode), want);
    *rows = 1;
    return MOE_OK;
}

/* Check the logical shape against the mode's blocks and compute the layout.  `arg` names the
 * tensor the shape came from. */
static moe_status moe__q_make_layout(const char *fn, const char *arg, int mode, int block_rows, int ndim,
                                     const int64_t *shape, moe__q_layout *L) {
    int64_t N = shape[ndim - 2], K = shape[ndim - 1];
    int kb = moe__q_kblock[mode];
    memset(L, 0, sizeof *L);
    L->global_ndim = -1;
    if (kb > 0 && K % kb != 0)
        return moe__err(MOE_ERR_SHAPE, "%s: %s: expected the last dimension K divisible by %d (the %s block), got %" PRId64,
                        fn, arg, kb, moe_quant_mode_name(mode), K);
    if (mode == MOE_QUANT_FP8_BLOCK && block_rows == 128 && N % 128 != 0)
        return moe__err(MOE_ERR_SHAPE,
                        "%s: %s: expected dimension N (%d of %d) divisible by 128 (the fp8_block 128x128 weight block; "
                        "block_rows 1 quantises activations per row), got %" PRId64,
                        fn, arg, ndim - 1, ndim, N);
    int lead = ndim - 2;
    for (int i = 0; i < lead; i++) L->scale_shape[i] = shape[i];
    switch (mode) {
    case MOE_QUANT_BF16:
        L->block_rows = L->block_cols = 0;
        L->scale_ndim = -1;
        break;
    case MOE_QUANT_FP8:
        L->block_rows = (int)(N > 0x7FFFFFFF ? 0x7FFFFFFF : N);
        L->block_cols = (int)(K > 0x7FFFFFFF ? 0x7FFFFFFF : K);
        L->scale_ndim = lead;
        break;
    default:
        L->block_rows = mode == MOE_QUANT_FP8_BLOCK ? block_rows : 1;
        L->block_cols = kb;
        L->scale_ndim = lead + 2;
        L->scale_shape[lead] = N / L->block_rows;
        L->scale_shape[lead + 1] = K / kb;
        break;
    }
    if (mode == MOE_QUANT_NVFP4) {
        L->global_ndim = lead;
        if (lead) L->global_shape[0] = shape[0];
    }
    return MOE_OK;
}

static moe_status moe__q_check_mode(const char *fn, int mode) {
    if (mode < 0 || mode >= MOE_QUANT_MODE_COUNT)
        return moe__err(MOE_ERR_ARG, "%s: mode: expected a quantisation mode id 0..%d (bf16, fp8, fp8_block, nvfp4, mxfp4, mxint4), got %d",
                        fn, MOE_QUANT_MODE_COUNT - 1, mode);
    return MOE_OK;
}

/* ---------------------------------------------------------------- records -- */

void moe_qtensor_free(moe_qtensor *q) {
    if (!q) return;
    moe_tensor_free(q->data);
    moe_tensor_free(q->scales);
    moe_tensor_free(q->global);
    free(q);
}

static moe_status moe__q_new(const char *fn, moe_qtensor **out, int mode, int ndim, const int64_t *shape,
                             const moe__q_layout *L) {
    moe_qtensor *q = (moe_qtensor *)calloc(1, sizeof *q);
    if (!q) return moe__err(MOE_ERR_NOMEM, "%s: out of host memory for a qtensor record", fn);
    q->mode = mode;
    q->ndim = ndim;
    for (int i = 0; i < ndim; i++) q->shape[i] = shape[i];
    q->block_rows = L->block_rows;
    q->block_cols = L->block_cols;
    *out = q;
    return MOE_OK;
}

int moe_qtensor_mode(const moe_qtensor *q) { return q ? q->mode : -1; }
int moe_qtensor_ndim(const moe_qtensor *q) { return q ? q->ndim : -1; }
int64_t moe_qtensor_dim(const moe_qtensor *q, int dim) {
    if (!q) return -1;
    if (dim < 0) dim += q->ndim;
    return (dim < 0 || dim >= q->ndim) ? -1 : q->shape[dim];
}
moe_device moe_qtensor_device(const moe_qtensor *q) {
    moe_device d = {MOE_DEVICE_CPU, 0};
    return q ? q->data->dev : d;
}
int moe_qtensor_block_rows(const moe_qtensor *q) { return q ? q->block_rows : -1; }
int moe_qtensor_block_cols(const moe_qtensor *q) { return q ? q->block_cols : -1; }
const moe_tensor *moe_qtensor_data(const moe_qtensor *q) { return q ? q->data : NULL; }
const moe_tensor *moe_qtensor_scales(const moe_qtensor *q) { return q ? q->scales : NULL; }
const moe_tensor *moe_qtensor_global_scale(const moe_qtensor *q) { return q ? q->global : NULL; }

/* --------------------------------------------------------------- quantise -- */

static moe_status moe__q_dispatch_quant(const char *fn, const moe_tensor *src, moe_qtensor *q) {
    if (src->dev.type == MOE_DEVICE_CPU) return moe__cpu_quantize(src, q);
#ifdef MOE_HAVE_CUDA
    return moe__backend_for(fn, src->dev) ? moe__cuda_quantize(src, q) : moe__backend_status();
#else
    return moe__err(MOE_ERR_NO_CUDA, "%s: moelab was built without CUDA support", fn);
#endif
}

static moe_status moe__q_check_input(const char *fn, const char *arg, const moe_tensor *t) {
    MOE_TRY(moe__check_tensor(fn, arg, t, -1, -1));
    if (t->dtype != MOE_F32 && t->dtype != MOE_BF16 && t->dtype != MOE_F16)
        return moe__err(MOE_ERR_DTYPE, "%s: %s: expected dtype f32, bf16 or f16, got %s", fn, arg,
                        moe_dtype_name(t->dtype));
    if (t->ndim != 2 && t->ndim != 3)
        return moe__err(MOE_ERR_SHAPE, "%s: %s: expected 2 dimensions [N, K] or 3 [E, N, K], got %d", fn, arg,
                        t->ndim);
    return MOE_OK;
}

moe_status moe_quantize(const moe_tensor *t, int mode, const moe_quant_opts *opts, moe_qtensor **out) {
    const char *fn = "moe_quantize";
    if (!out) return moe__err(MOE_ERR_ARG, "%s: out: expected a pointer, got NULL", fn);
    *out = NULL;
    MOE_TRY(moe__q_check_input(fn, "t", t));
    MOE_TRY(moe__q_check_mode(fn, mode));
    int rows = 0;
    MOE_TRY(moe__q_block_rows(fn, mode, opts ? opts->block_rows : 0, &rows));
    moe__q_layout L;
    MOE_TRY(moe__q_make_layout(fn, "t", mode, rows, t->ndim, t->shape, &L));

    moe_qtensor *q = NULL;
    MOE_TRY(moe__q_new(fn, &q, mode, t->ndim, t->shape, &L));
    moe_status s = moe_tensor_new(&q->data, moe__q_data_dt[mode], t->ndim, t->shape, t->dev);
    if (s == MOE_OK && L.scale_ndim >= 0)
        s = moe_tensor_new(&q->scales, moe__q_scale_dt[mode], L.scale_ndim, L.scale_shape, t->dev);
    if (s == MOE_OK && L.global_ndim >= 0)
        s = moe_tensor_new(&q->global, MOE_F32, L.global_ndim, L.global_shape, t->dev);
    if (s == MOE_OK) {
        if (mode == MOE_QUANT_BF16) {
            s = moe_tensor_cast_into(q->data, t); /* RNE, any strides, CPU or CUDA */
        } else if (moe_tensor_numel(t) == 0) {
            /* nothing to quantise; per-matrix scales of empty matrices are 0 (amax 0) */
            if (q->scales && moe_tensor_numel(q->scales) > 0) s = moe_tensor_fill(q->scales, 0.0);
            if (s == MOE_OK && q->global && moe_tensor_numel(q->global) > 0) s = moe_tensor_fill(q->global, 0.0);
        } else {
            moe_tensor *tmp = NULL;
            const moe_tensor *src = t;
            if (!moe_tensor_is_contiguous(t)) {
                s = moe_tensor_contiguous(&tmp, t);
                src = tmp;
            }
            if (s == MOE_OK) s = moe__q_dispatch_quant(fn, src, q);
            moe_tensor_free(tmp);
        }
    }
    if (s != MOE_OK) {
        moe_qtensor_free(q);
        return s;
    }
    *out = q;
    return MOE_OK;
}

/* ------------------------------------------------------------- dequantise -- */

moe_status moe_dequantize(const moe_qtensor *q, int dtype, moe_tensor **out) {
    const char *fn = "moe_dequantize";
    if (!out) return moe__err(MOE_ERR_ARG, "%s: out: expected a pointer, got NULL", fn);
    *out = NULL;
    if (!q) return moe__err(MOE_ERR_ARG, "%s: q: expected a qtensor, got NULL", fn);
    if (dtype != MOE_F32 && dtype != MOE_BF16 && dtype != MOE_F16)
        return moe__err(MOE_ERR_DTYPE, "%s: dtype: expected f32, bf16 or f16, got %s", fn, moe_dtype_name(dtype));
    moe_tensor *o = NULL;
    MOE_TRY(moe_tensor_new(&o, dtype, q->ndim, q->shape, q->data->dev));
    moe_status s = MOE_OK;
    if (q->mode == MOE_QUANT_BF16) {
        s = moe_tensor_cast_into(o, q->data);
    } else if (moe_tensor_numel(o) > 0) {
        if (o->dev.type == MOE_DEVICE_CPU) {
            s = moe__cpu_dequantize(q, o);
        } else {
#ifdef MOE_HAVE_CUDA
            s = moe__backend_for(fn, o->dev) ? moe__cuda_dequantize(q, o) : moe__backend_status();
#else
            s = moe__err(MOE_ERR_NO_CUDA, "%s: moelab was built without CUDA support", fn);
#endif
        }
    }
    if (s != MOE_OK) {
        moe_tensor_free(o);
        return s;
    }
    *out = o;
    return MOE_OK;
}

/* -------------------------------------------------------------- from parts -- */

/* A contiguous handle on part `t` with `dtype` and `shape` (the same bytes: a u8 tensor of
 * packed nibbles becomes e2m1/i4 with twice the last dimension; a [1] per-matrix scale
 * becomes []).  Strided parts are copied first. */
static moe_status moe__q_part(const moe_tensor *t, int dtype, int ndim, const int64_t *shape, moe_tensor **out) {
    moe_tensor *tmp = NULL;
    if (!moe_tensor_is_contiguous(t)) {
        MOE_TRY(moe_tensor_contiguous(&tmp, t));
        t = tmp;
    }
    int64_t offset = t->offset;
    if (t->dtype == MOE_U8 && moe__dtype_packed(dtype)) offset *= 2; /* bytes -> nibbles */
    moe_status s = moe__tensor_wrap(out, t->st, dtype, ndim, shape, NULL, offset);
    moe_tensor_free(tmp);
    return s;
}

static int moe__q_shape_eq(const moe_tensor *t, int ndim, const int64_t *shape) {
    if (t->ndim != ndim) return 0;
    for (int i = 0; i < ndim; i++)
        if (t->shape[i] != shape[i]) return 0;
    return 1;
}

static moe_status moe__q_check_part_dev(const char *fn, const char *arg, const moe_tensor *data, const moe_tensor *t) {
    if (!moe__same_device(data->dev, t->dev)) {
        char a[32], b[32];
        return moe__err(MOE_ERR_DEVICE, "%s: %s: expected device %s (as data), got %s", fn, arg,
                        moe__device_str(data->dev, a, sizeof a), moe__device_str(t->dev, b, sizeof b));
    }
    return MOE_OK;
}

moe_status moe_qtensor_from_parts(moe_qtensor **out, int mode, const moe_tensor *data, const moe_tensor *scales,
                                  const moe_tensor *global, const moe_quant_opts *opts) {
    const char *fn = "moe_qtensor_from_parts";
    char e1[96], e2[96];
    if (!out) return moe__err(MOE_ERR_ARG, "%s: out: expected a pointer, got NULL", fn);
    *out = NULL;
    MOE_TRY(moe__q_check_mode(fn, mode));
    const char *mname = moe_quant_mode_name(mode);

    /* data: the mode's dtype (or u8 bytes of packed nibbles), [N, K] or [E, N, K] */
    MOE_TRY(moe__check_tensor(fn, "data", data, -1, -1));
    int ddt = moe__q_data_dt[mode];
    int packed_u8 = moe__dtype_packed(ddt) && data->dtype == MOE_U8;
    if (data->dtype != ddt && !packed_u8)
        return moe__err(MOE_ERR_DTYPE, "%s: data: expected dtype %s%s for mode %s, got %s", fn, moe_dtype_name(ddt),
                        moe__dtype_packed(ddt) ? " (or u8 holding two codes per byte)" : "", mname,
                        moe_dtype_name(data->dtype));
    if (data->ndim != 2 && data->ndim != 3)
        return moe__err(MOE_ERR_SHAPE, "%s: data: expected 2 dimensions [N, K] or 3 [E, N, K], got %d", fn, data->ndim);
    int ndim = data->ndim;
    int64_t shape[3];
    for (int i = 0; i < ndim; i++) shape[i] = data->shape[i];
    if (packed_u8) shape[ndim - 1] *= 2;
    int64_t N = shape[ndim - 2];

    /* block rows: opts, or (fp8_block) read off the scales' shape */
    int want = opts ? opts->block_rows : 0;
    if (mode == MOE_QUANT_FP8_BLOCK && want == 0 && scales && scales->ndim == ndim && N % 128 != 0 &&
        scales->shape[ndim - 2] == N)
        want = 1;
    int rows = 0;
    MOE_TRY(moe__q_block_rows(fn, mode, want, &rows));
    moe__q_layout L;
    MOE_TRY(moe__q_make_layout(fn, "data", mode, rows, ndim, shape, &L));

    /* scales */
    if (L.scale_ndim < 0) {
        if (scales)
            return moe__err(MOE_ERR_ARG, "%s: scales: expected NULL for mode %s (it has no scales), got a tensor", fn,
                            mname);
    } else {
        if (!scales)
            return moe__err(MOE_ERR_ARG, "%s: scales: expected a %s tensor %s for mode %s, got NULL", fn,
                            moe_dtype_name(moe__q_scale_dt[mode]), moe__dims_str(L.scale_ndim, L.scale_shape, e1, sizeof e1),
                            mname);
        int sdt = moe__q_scale_dt[mode];
        if (scales->dtype != sdt && !(sdt == MOE_UE8M0 && scales->dtype == MOE_U8))
            return moe__err(MOE_ERR_DTYPE, "%s: scales: expected dtype %s%s for mode %s, got %s", fn, moe_dtype_name(sdt),
                            sdt == MOE_UE8M0 ? " (or u8)" : "", mname, moe_dtype_name(scales->dtype));
        int64_t one = 1;
        int ok = moe__q_shape_eq(scales, L.scale_ndim, L.scale_shape) ||
                 (L.scale_ndim == 0 && moe__q_shape_eq(scales, 1, &one));
        if (!ok) {
            if (mode == MOE_QUANT_FP8_BLOCK)
                return moe__err(MOE_ERR_SHAPE, "%s: scales: expected shape %s (fp8_block, block_rows %d: %s), got %s", fn,
                                moe__dims_str(L.scale_ndim, L.scale_shape, e1, sizeof e1), rows,
                                moe__q_scale_desc[mode], moe__shape_str(scales, e2, sizeof e2));
            return moe__err(MOE_ERR_SHAPE, "%s: scales: expected shape %s (%s: %s), got %s", fn,
                            moe__dims_str(L.scale_ndim, L.scale_shape, e1, sizeof e1), mname,
                            moe__q_scale_desc[mode], moe__shape_str(scales, e2, sizeof e2));
        }
        MOE_TRY(moe__q_check_part_dev(fn, "scales", data, scales));
    }

    /* global scale */
    if (L.global_ndim < 0) {
        if (global)
            return moe__err(MOE_ERR_ARG, "%s: global_scale: expected NULL for mode %s (only nvfp4 has one), got a tensor",
                            fn, mname);
    } else {
        if (!global)
            return moe__err(MOE_ERR_ARG, "%s: global_scale: expected an f32 tensor %s for mode nvfp4, got NULL", fn,
                            moe__dims_str(L.global_ndim, L.global_shape, e1, sizeof e1));
        if (global->dtype != MOE_F32)
            return moe__err(MOE_ERR_DTYPE, "%s: global_scale: expected dtype f32, got %s", fn, moe_dtype_name(global->dtype));
        int64_t one = 1;
        int ok = moe__q_shape_eq(global, L.global_ndim, L.global_shape) ||
                 (L.global_ndim == 0 && moe__q_shape_eq(global, 1, &one));
        if (!ok)
            return moe__err(MOE_ERR_SHAPE, "%s: global_scale: expected shape %s (one f32 per matrix), got %s", fn,
                            moe__dims_str(L.global_ndim, L.global_shape, e1, sizeof e1),
                            moe__shape_str(global, e2, sizeof e2));
        MOE_TRY(moe__q_check_part_dev(fn, "global_scale", data, global));
    }

    moe_qtensor *q = NULL;
    MOE_TRY(moe__q_new(fn, &q, mode, ndim, shape, &L));
    moe_status s = moe__q_part(data, ddt, ndim, shape, &q->data);
    if (s == MOE_OK && L.scale_ndim >= 0)
        s = moe__q_part(scales, moe__q_scale_dt[mode], L.scale_ndim, L.scale_shape, &q->scales);
    if (s == MOE_OK && L.global_ndim >= 0) s = moe__q_part(global, MOE_F32, L.global_ndim, L.global_shape, &q->global);
    if (s != MOE_OK) {
        moe_qtensor_free(q);
        return s;
    }
    *out = q;
    return MOE_OK;
}
