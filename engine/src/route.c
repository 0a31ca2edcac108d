/* route.c -- moe_route: method names, defaults, argument validation, output allocation and
 * dispatch to the backend `route` slot.  Semantics: docs/routing.md. */
#include "internal.h"
#include "backend.h"
#include "fused.h"

#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#define FN "moe_route"

/* ----------------------------------------------------------------- names -- */

#define MOE__ROUTE_NAME(name, id, text) text,
static const char *const moe__route_names[] = {MOE_ROUTE_METHOD_LIST(MOE__ROUTE_NAME)};
#undef MOE__ROUTE_NAME

const char *moe_route_method_name(int method) {
    if (method < 0 || method >= MOE_ROUTE_METHOD_COUNT) return "?";
    return moe__route_names[method];
}

int moe_route_method_from_name(const char *name) {
    if (!name) {
        moe__err(MOE_ERR_ARG, "moe_route_method_from_name: name: expected a method name, got NULL");
        return -1;
    }
    for (int i = 0; i < MOE_ROUTE_METHOD_COUNT; i++)
        if (strcmp(name, moe__route_names[i]) == 0) return i;
    moe__err(MOE_ERR_ARG,
             "moe_route_method_from_name: name: expected one of default, renormalize, "
             "renormalize_naive, topk, sigmoid_renorm, deepseekv3, minimax2, llama4, got \"%.64s\"",
             name);
    return -1;
}

moe_route_cfg moe_route_cfg_default(void) {
    moe_route_cfg c;
    memset(&c, 0, sizeof c);
    c.method = MOE_ROUTE_RENORMALIZE;
    c.top_k = 1;
    c.n_group = 0;
    c.topk_group = 0;
    c.scale = 1.0f;
    c.normalize = 1;
    c.weights_dtype = MOE_F32;
    return c;
}

/* ------------------------------------------------------------ validation -- */

static moe_status moe__route_check_out(const char *arg, const moe_tensor *t, int dtype_a, int dtype_b,
                                       const char *dtypes, int64_t rows_min, int exact_rows, int64_t K,
                                       moe_device dev) {
    char a[96], b[32], c[32];
    if (t->dtype != dtype_a && t->dtype != dtype_b)
        return moe__err(MOE_ERR_DTYPE, FN ": %s: expected dtype %s, got %s", arg, dtypes, moe_dtype_name(t->dtype));
    if (t->ndim != 2)
        return moe__err(MOE_ERR_SHAPE, FN ": %s: expected 2 dimensions, got %d (shape %s)", arg, t->ndim,
                        moe__shape_str(t, a, sizeof a));
    if (exact_rows && (t->shape[0] != rows_min || t->shape[1] != K))
        return moe__err(MOE_ERR_SHAPE, FN ": %s: expected shape [%" PRId64 ", %" PRId64 "], got %s", arg, rows_min,
                        K, moe__shape_str(t, a, sizeof a));
    if (!exact_rows && t->shape[1] != K)
        return moe__err(MOE_ERR_SHAPE, FN ": %s: expected dim 1 == top_k (%" PRId64 "), got %" PRId64 " (shape %s)",
                        arg, K, t->shape[1], moe__shape_str(t, a, sizeof a));
    if (!exact_rows && t->shape[0] < rows_min)
        return moe__err(MOE_ERR_SHAPE, FN ": %s: expected dim 0 >= T (%" PRId64 "), got %" PRId64 " (shape %s)", arg,
                        rows_min, t->shape[0], moe__shape_str(t, a, sizeof a));
    if (!moe_tensor_is_contiguous(t))
        return moe__err(MOE_ERR_ARG, FN ": %s: expected a contiguous tensor, got a strided view", arg);
    if (!moe__same_device(t->dev, dev))
        return moe__err(MOE_ERR_DEVICE, FN ": %s: expected device %s (the logits' device), got %s", arg,
                        moe__device_str(dev, b, sizeof b), moe__device_str(t->dev, c, sizeof c));
    return MOE_OK;
}

static moe_status moe__route_check(const moe_route_cfg *cfg, const moe_tensor *logits, const moe_tensor *bias,
                                   moe_tensor **ids, moe_tensor **weights, const moe_tensor *replay) {
    char a[96], b[32], c[32];
    if (!cfg) return moe__err(MOE_ERR_ARG, FN ": cfg: expected a moe_route_cfg, got NULL");
    const int method = cfg->method;
    if (method < 0 || method >= MOE_ROUTE_METHOD_COUNT)
        return moe__err(MOE_ERR_ARG, FN ": method: expected 0..%d (a moe_route_method), got %d",
                        MOE_ROUTE_METHOD_COUNT - 1, method);
    const char *mname = moe_route_method_name(method);
    if (!logits) return moe__err(MOE_ERR_ARG, FN ": logits: expected a tensor, got NULL");
    if (!ids) return moe__err(MOE_ERR_ARG, FN ": ids: expected a pointer to a tensor handle (which may be NULL), got NULL");
    if (!weights)
        return moe__err(MOE_ERR_ARG, FN ": weights: expected a pointer to a tensor handle (which may be NULL), got NULL");
    /* logits */
    if (logits->dtype != MOE_F32 && logits->dtype != MOE_BF16 && logits->dtype != MOE_F16)
        return moe__err(MOE_ERR_DTYPE, FN ": logits: expected dtype f32, bf16 or f16, got %s",
                        moe_dtype_name(logits->dtype));
    if (logits->ndim != 2)
        return moe__err(MOE_ERR_SHAPE, FN ": logits: expected 2 dimensions [T, E], got %d (shape %s)", logits->ndim,
                        moe__shape_str(logits, a, sizeof a));
    if (!moe_tensor_is_contiguous(logits))
        return moe__err(MOE_ERR_ARG, FN ": logits: expected a contiguous tensor, got a strided view");
    const int64_t T = logits->shape[0], E = logits->shape[1];
    if (E < 1 || E > MOE_ROUTE_MAX_EXPERTS)
        return moe__err(MOE_ERR_UNSUPPORTED, FN ": logits: expected 1..%d experts (dim 1), got %" PRId64,
                        MOE_ROUTE_MAX_EXPERTS, E);
    /* top_k */
    const int K = cfg->top_k;
    if (K < 1 || K > MOE_ROUTE_MAX_TOPK)
        return moe__err(MOE_ERR_UNSUPPORTED, FN ": top_k: expected 1..%d, got %d", MOE_ROUTE_MAX_TOPK, K);
    if (K > E) return moe__err(MOE_ERR_ARG, FN ": top_k: expected <= E (%" PRId64 "), got %d", E, K);
    if (method == MOE_ROUTE_LLAMA4 && K != 1)
        return moe__err(MOE_ERR_UNSUPPORTED, FN ": top_k: expected 1 for method llama4, got %d", K);
    /* groups */
    if (cfg->n_group < 0) return moe__err(MOE_ERR_ARG, FN ": n_group: expected >= 0, got %d", cfg->n_group);
    if (cfg->n_group > 1) {
        if (method != MOE_ROUTE_DEEPSEEKV3)
            return moe__err(MOE_ERR_ARG, FN ": n_group: expected 0 or 1 for method %s (groups are deepseekv3 only), got %d",
                            mname, cfg->n_group);
        if (cfg->n_group > 32)
            return moe__err(MOE_ERR_UNSUPPORTED, FN ": n_group: expected 2..32, got %d", cfg->n_group);
        if (E % cfg->n_group != 0)
            return moe__err(MOE_ERR_ARG, FN ": n_group: expected a divisor of E (%" PRId64 "), got %d", E, cfg->n_group);
        if (cfg->topk_group < 1 || cfg->topk_group > cfg->n_group)
            return moe__err(MOE_ERR_ARG, FN ": topk_group: expected 1..n_group (%d), got %d", cfg->n_group,
                            cfg->topk_group);
        int64_t avail = (int64_t)cfg->topk_group * (E / cfg->n_group);
        if (K > avail)
            return moe__err(MOE_ERR_ARG, FN ": top_k: expected <= topk_group * E / n_group (%" PRId64 "), got %d", avail,
                            K);
    } else if (cfg->topk_group != 0 && !(cfg->topk_group == 1 && cfg->n_group == 1)) {
        return moe__err(MOE_ERR_ARG, FN ": topk_group: expected 0 without groups (n_group %d), got %d", cfg->n_group,
                        cfg->topk_group);
    }
    /* scalars */
    if (!isfinite(cfg->scale))
        return moe__err(MOE_ERR_ARG, FN ": scale: expected a finite number, got %g", (double)cfg->scale);
    if (cfg->scale != 1.0f && method != MOE_ROUTE_DEEPSEEKV3 && method != MOE_ROUTE_MINIMAX2)
        return moe__err(MOE_ERR_ARG, FN ": scale: expected 1 for method %s (scale is deepseekv3's), got %g", mname,
                        (double)cfg->scale);
    if (cfg->normalize != 0 && cfg->normalize != 1)
        return moe__err(MOE_ERR_ARG, FN ": normalize: expected 0 or 1, got %d", cfg->normalize);
    if (cfg->weights_dtype != MOE_F32 && cfg->weights_dtype != MOE_BF16)
        return moe__err(MOE_ERR_DTYPE, FN ": weights_dtype: expected f32 or bf16, got %s",
                        moe_dtype_name(cfg->weights_dtype));
    /* bias */
    if (bias) {
        if (method != MOE_ROUTE_DEEPSEEKV3 && method != MOE_ROUTE_MINIMAX2)
            return moe__err(MOE_ERR_ARG, FN ": bias: expected none for method %s (bias is used by deepseekv3 and minimax2), got a tensor",
                            mname);
        if (bias->dtype != MOE_F32 && bias->dtype != MOE_BF16)
            return moe__err(MOE_ERR_DTYPE, FN ": bias: expected dtype f32 or bf16, got %s", moe_dtype_name(bias->dtype));
        if (bias->ndim != 1 || bias->shape[0] != E)
            return moe__err(MOE_ERR_SHAPE, FN ": bias: expected shape [%" PRId64 "], got %s", E,
                            moe__shape_str(bias, a, sizeof a));
        if (!moe_tensor_is_contiguous(bias))
            return moe__err(MOE_ERR_ARG, FN ": bias: expected a contiguous tensor, got a strided view");
        if (!moe__same_device(bias->dev, logits->dev))
            return moe__err(MOE_ERR_DEVICE, FN ": bias: expected device %s (the logits' device), got %s",
                            moe__device_str(logits->dev, b, sizeof b), moe__device_str(bias->dev, c, sizeof c));
    }
    /* outputs */
    if (*ids) MOE_TRY(moe__route_check_out("ids", *ids, MOE_I32, MOE_I32, "i32", T, 1, K, logits->dev));
    if (*weights)
        MOE_TRY(moe__route_check_out("weights", *weights, MOE_F32, MOE_BF16, "f32 or bf16", T, 1, K, logits->dev));
    if (replay) MOE_TRY(moe__route_check_out("replay", replay, MOE_I16, MOE_I16, "i16", T, 0, K, logits->dev));
    return MOE_OK;
}

/* ----------------------------------------------------------------- route -- */

moe_status moe__route_validate(const moe_route_cfg *cfg, const moe_tensor *logits, const moe_tensor *bias,
                               moe_tensor *ids, moe_tensor *weights, const moe_tensor *replay) {
    return moe__route_check(cfg, logits, bias, &ids, &weights, replay);
}

moe_status moe_route(const moe_route_cfg *cfg, const moe_tensor *logits, const moe_tensor *bias, moe_tensor **ids,
                     moe_tensor **weights, moe_tensor *replay) {
    MOE_TRY(moe__route_check(cfg, logits, bias, ids, weights, replay));
    const moe_backend *be = moe__backend_for(FN, logits->dev);
    if (!be) return moe__backend_status();
    if (!be->route) {
        char d[32];
        return moe__err(MOE_ERR_UNSUPPORTED, FN ": logits: expected a device with routing kernels, got %s (backend %s has none)",
                        moe__device_str(logits->dev, d, sizeof d), be->name);
    }
    const int64_t T = logits->shape[0];
    int64_t shape[2] = {T, cfg->top_k};
    moe_tensor *new_ids = NULL, *new_w = NULL;
    if (!*ids) MOE_TRY(moe_tensor_new(&new_ids, MOE_I32, 2, shape, logits->dev));
    if (!*weights) {
        moe_status s = moe_tensor_new(&new_w, cfg->weights_dtype, 2, shape, logits->dev);
        if (s != MOE_OK) {
            moe_tensor_free(new_ids);
            return s;
        }
    }
    moe_tensor *oi = *ids ? *ids : new_ids, *ow = *weights ? *weights : new_w;
    moe_status s = MOE_OK;
    if (T > 0) s = be->route(cfg, logits, bias, oi, ow, replay);
    if (s != MOE_OK) {
        moe_tensor_free(new_ids);
        moe_tensor_free(new_w);
        return s;
    }
    *ids = oi;
    *weights = ow;
    return MOE_OK;
}
