/* fused.c -- moe_experts / moe_workspace / moe_fused_moe: names, defaults, validation,
 * routing (through the public moe_route, so its kernel runs on the same moelab stream; for quantised
 * experts on CUDA it is validated here and left to the backend, route_pending, whose decode kernels
 * route T = 1 themselves) and dispatch to the backend `fused_pack` and `fused` slots.  Semantics:
 * docs/fused.md. */
#include "internal.h"
#include "backend.h"
#include "fused.h"
#include "fused_quant.h"

#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ----------------------------------------------------------------- names -- */

#define MOE__ACT_NAME(name, id, text) text,
static const char *const moe__act_names[] = {MOE_ACTIVATION_LIST(MOE__ACT_NAME)};
#undef MOE__ACT_NAME

const char *moe_activation_name(int act) {
    if (act < 0 || act >= MOE_ACTIVATION_COUNT) return "?";
    return moe__act_names[act];
}

int moe_activation_from_name(const char *name) {
    if (!name) {
        moe__err(MOE_ERR_ARG, "moe_activation_from_name: name: expected an activation name, got NULL");
        return -1;
    }
    for (int i = 0; i < MOE_ACTIVATION_COUNT; i++)
        if (strcmp(name, moe__act_names[i]) == 0) return i;
    moe__err(MOE_ERR_ARG,
             "moe_activation_from_name: name: expected one of swiglu, geglu, relu2, swiglu_oai, got \"%.64s\"",
             name);
    return -1;
}

moe_experts_cfg moe_experts_cfg_default(void) {
    moe_experts_cfg c;
    memset(&c, 0, sizeof c);
    c.activation = MOE_ACT_SWIGLU;
    c.alpha = 1.702f;
    c.beta = 1.0f;
    c.limit = 7.0f;
    return c;
}

/* ---- path counts ---- */

static int64_t moe__path_counts[MOE_FUSED_PATH_COUNT];

void moe__fused_path_hit(int path) {
    if (path >= 0 && path < MOE_FUSED_PATH_COUNT) __atomic_fetch_add(&moe__path_counts[path], 1, __ATOMIC_RELAXED);
}

void moe_fused_path_counts(int64_t *counts) {
    if (!counts) return;
    for (int i = 0; i < MOE_FUSED_PATH_COUNT; i++) counts[i] = __atomic_load_n(&moe__path_counts[i], __ATOMIC_RELAXED);
}

void moe_fused_path_reset(void) {
    for (int i = 0; i < MOE_FUSED_PATH_COUNT; i++) __atomic_store_n(&moe__path_counts[i], 0, __ATOMIC_RELAXED);
}

const char *moe_fused_path_name(int path) {
    static const char *const names[MOE_FUSED_PATH_COUNT] = {"cpu",        "gemv",     "tile",       "wreg",
                                                            "wgmma",      "gemv_route", "wgmma_rs", "wreg_i4f16",
                                                            "wgmma_rs_i4f16", "wgmma_rs_xonce", "gemv_bulk",
                                                            "gemv_route_bulk"};
    return path >= 0 && path < MOE_FUSED_PATH_COUNT ? names[path] : NULL;
}

moe_fused_cfg moe_fused_cfg_default(void) {
    moe_fused_cfg c;
    memset(&c, 0, sizeof c);
    c.route = moe_route_cfg_default();
    c.local_offset = 0;
    c.local_count = -1;
    return c;
}

/* --------------------------------------------------------------- experts -- */

#define FNE "moe_experts_new"

static moe_status moe__fused_float_arg(const char *fn, const char *arg, const moe_tensor *t, int ndim,
                                       const int64_t *shape, const char *what) {
    char a[96];
    if (t->dtype != MOE_F32 && t->dtype != MOE_BF16)
        return moe__err(MOE_ERR_DTYPE, "%s: %s: expected dtype f32 or bf16, got %s", fn, arg, moe_dtype_name(t->dtype));
    int ok = t->ndim == ndim;
    for (int d = 0; ok && d < ndim; d++) ok = t->shape[d] == shape[d];
    if (!ok) {
        char want[96];
        return moe__err(MOE_ERR_SHAPE, "%s: %s: expected shape %s (%s), got %s", fn, arg,
                        moe__dims_str(ndim, shape, want, sizeof want), what, moe__shape_str(t, a, sizeof a));
    }
    return MOE_OK;
}

/* A contiguous copy of src on dev, or src itself (*tmp NULL) when it already is one. */
static moe_status moe__on_device(const moe_tensor *src, moe_device dev, const moe_tensor **use, moe_tensor **tmp) {
    *tmp = NULL;
    *use = src;
    if (!src) return MOE_OK;
    if (!moe__same_device(src->dev, dev)) {
        MOE_TRY(moe_tensor_to_device(tmp, src, dev));
    } else if (!moe_tensor_is_contiguous(src)) {
        MOE_TRY(moe_tensor_contiguous(tmp, src));
    }
    if (*tmp) *use = *tmp;
    return MOE_OK;
}

moe_status moe__experts_check_cfg(const char *fn, const moe_experts_cfg *cfg) {
    if (cfg->activation < 0 || cfg->activation >= MOE_ACTIVATION_COUNT)
        return moe__err(MOE_ERR_ARG, "%s: activation: expected 0..%d (a moe_activation), got %d", fn,
                        MOE_ACTIVATION_COUNT - 1, cfg->activation);
    if (!isfinite(cfg->alpha) || !isfinite(cfg->beta) || !(cfg->limit > 0.0f) || !isfinite(cfg->limit))
        return moe__err(MOE_ERR_ARG, "%s: alpha/beta/limit: expected finite numbers with limit > 0, got %g/%g/%g", fn,
                        (double)cfg->alpha, (double)cfg->beta, (double)cfg->limit);
    return MOE_OK;
}

moe_status moe__experts_record(const char *fn, const moe_experts_cfg *cfg, moe_device dev, int64_t E, int64_t H,
                               int64_t I, int64_t N1, moe_experts **out) {
    if (dev.type == MOE_DEVICE_CUDA && (H % 128 != 0 || I % 128 != 0))
        return moe__err(MOE_ERR_UNSUPPORTED, "%s: down: expected H and I multiples of 128 on CUDA, got H %" PRId64
                        ", I %" PRId64, fn, H, I);
    moe_experts *ex = (moe_experts *)calloc(1, sizeof *ex);
    if (!ex) return moe__err(MOE_ERR_NOMEM, "%s: out of host memory", fn);
    ex->dev = dev;
    ex->E = E;
    ex->H = H;
    ex->I = I;
    ex->N1 = N1;
    ex->act = cfg->activation;
    ex->alpha = cfg->alpha;
    ex->beta = cfg->beta;
    ex->limit = cfg->limit;
    *out = ex;
    return MOE_OK;
}

void moe_experts_free(moe_experts *ex) {
    if (!ex) return;
    moe_tensor_free(ex->w13);
    moe_tensor_free(ex->w2);
    moe_tensor_free(ex->b13);
    moe_tensor_free(ex->b2);
    moe_qtensor_free(ex->q13);
    moe_qtensor_free(ex->q2);
    free(ex);
}

moe_status moe_experts_new(moe_experts **out, const moe_experts_cfg *cfg, const moe_tensor *gate_up,
                           const moe_tensor *down, const moe_tensor *bias_gate_up, const moe_tensor *bias_down,
                           moe_device dev) {
    char a[96];
    if (!out) return moe__err(MOE_ERR_ARG, FNE ": out: expected a pointer to a handle, got NULL");
    *out = NULL;
    moe_experts_cfg defc = moe_experts_cfg_default();
    if (!cfg) cfg = &defc;
    MOE_TRY(moe__experts_check_cfg(FNE, cfg));
    if (!gate_up) return moe__err(MOE_ERR_ARG, FNE ": gate_up: expected a tensor [E, 2I, H], got NULL");
    if (!down) return moe__err(MOE_ERR_ARG, FNE ": down: expected a tensor [E, H, I], got NULL");
    const int gated = cfg->activation != MOE_ACT_RELU2;
    if (down->ndim != 3)
        return moe__err(MOE_ERR_SHAPE, FNE ": down: expected 3 dimensions [E, H, I], got shape %s",
                        moe__shape_str(down, a, sizeof a));
    if (gate_up->ndim != 3)
        return moe__err(MOE_ERR_SHAPE, FNE ": gate_up: expected 3 dimensions [E, %s, H], got shape %s",
                        gated ? "2I" : "I", moe__shape_str(gate_up, a, sizeof a));
    const int64_t E = down->shape[0], H = down->shape[1], I = down->shape[2];
    if (E < 1 || E > MOE_ROUTE_MAX_EXPERTS)
        return moe__err(MOE_ERR_UNSUPPORTED, FNE ": down: expected 1..%d experts (dim 0), got %" PRId64,
                        MOE_ROUTE_MAX_EXPERTS, E);
    if (H < 1 || I < 1)
        return moe__err(MOE_ERR_SHAPE, FNE ": down: expected H >= 1 and I >= 1, got shape %s",
                        moe__shape_str(down, a, sizeof a));
    const int64_t N1 = gated ? 2 * I : I;
    int64_t s13[3] = {E, N1, H}, s2[3] = {E, H, I}, sb13[2] = {E, N1}, sb2[2] = {E, H};
    MOE_TRY(moe__fused_float_arg(FNE, "gate_up", gate_up, 3, s13,
                                 gated ? "E and H from down, 2I rows: gate then up" : "relu2: [E, I, H]"));
    MOE_TRY(moe__fused_float_arg(FNE, "down", down, 3, s2, "[E, H, I]"));
    if (bias_gate_up) MOE_TRY(moe__fused_float_arg(FNE, "bias_gate_up", bias_gate_up, 2, sb13, "[E, N] of gate_up"));
    if (bias_down) MOE_TRY(moe__fused_float_arg(FNE, "bias_down", bias_down, 2, sb2, "[E, H]"));
    const moe_backend *be = moe__backend_for(FNE, dev);
    if (!be) return moe__backend_status();
    if (!be->fused_pack || !be->fused) {
        char d[32];
        return moe__err(MOE_ERR_UNSUPPORTED, FNE ": dev: expected a device with fused MoE kernels, got %s (backend %s has none)",
                        moe__device_str(dev, d, sizeof d), be->name);
    }
    moe_experts *ex = NULL;
    MOE_TRY(moe__experts_record(FNE, cfg, dev, E, H, I, N1, &ex));
    const moe_tensor *u13, *u2, *ub13, *ub2;
    moe_tensor *t13 = NULL, *t2 = NULL, *tb13 = NULL, *tb2 = NULL;
    moe_status s = moe__on_device(gate_up, dev, &u13, &t13);
    if (s == MOE_OK) s = moe__on_device(down, dev, &u2, &t2);
    if (s == MOE_OK) s = moe__on_device(bias_gate_up, dev, &ub13, &tb13);
    if (s == MOE_OK) s = moe__on_device(bias_down, dev, &ub2, &tb2);
    if (s == MOE_OK) s = be->fused_pack(ex, u13, u2, ub13, ub2);
    moe_tensor_free(t13);
    moe_tensor_free(t2);
    moe_tensor_free(tb13);
    moe_tensor_free(tb2);
    if (s != MOE_OK) {
        moe_experts_free(ex);
        return s;
    }
    *out = ex;
    return MOE_OK;
}

int64_t moe_experts_num(const moe_experts *ex) { return ex ? ex->E : 0; }
int64_t moe_experts_hidden(const moe_experts *ex) { return ex ? ex->H : 0; }
int64_t moe_experts_intermediate(const moe_experts *ex) { return ex ? ex->I : 0; }
int moe_experts_activation(const moe_experts *ex) { return ex ? ex->act : -1; }
moe_device moe_experts_device(const moe_experts *ex) {
    moe_device d = {MOE_DEVICE_CPU, 0};
    return ex ? ex->dev : d;
}
int64_t moe_experts_nbytes(const moe_experts *ex) {
    if (!ex) return 0;
    int64_t n = 0;
    const moe_tensor *ts[4] = {ex->w13, ex->w2, ex->b13, ex->b2};
    for (int i = 0; i < 4; i++)
        if (ts[i]) n += (int64_t)moe_tensor_nbytes(ts[i]);
    const moe_qtensor *qs[2] = {ex->q13, ex->q2};
    for (int i = 0; i < 2; i++) {
        if (!qs[i]) continue;
        const moe_tensor *ps[3] = {moe_qtensor_data(qs[i]), moe_qtensor_scales(qs[i]), moe_qtensor_global_scale(qs[i])};
        for (int j = 0; j < 3; j++)
            if (ps[j]) n += (int64_t)moe_tensor_nbytes(ps[j]);
    }
    return n;
}

/* ------------------------------------------------------------- workspace -- */

#define FNW "moe_workspace_new"

static size_t moe__align_up(size_t x) { return (x + 255) & ~(size_t)255; }

moe_status moe_workspace_new(moe_workspace **out, moe_device dev, int64_t max_tokens, int32_t top_k,
                             const moe_experts *ex) {
    if (!out) return moe__err(MOE_ERR_ARG, FNW ": out: expected a pointer to a handle, got NULL");
    *out = NULL;
    if (!ex) return moe__err(MOE_ERR_ARG, FNW ": experts: expected an experts object, got NULL");
    if (max_tokens < 0 || max_tokens > ((int64_t)1 << 31) / MOE_ROUTE_MAX_TOPK)
        return moe__err(MOE_ERR_ARG, FNW ": max_tokens: expected 0..%" PRId64 ", got %" PRId64,
                        ((int64_t)1 << 31) / MOE_ROUTE_MAX_TOPK, max_tokens);
    if (top_k < 1 || top_k > MOE_ROUTE_MAX_TOPK)
        return moe__err(MOE_ERR_UNSUPPORTED, FNW ": top_k: expected 1..%d, got %d", MOE_ROUTE_MAX_TOPK, top_k);
    if (!moe__same_device(dev, ex->dev)) {
        char b[32], c[32];
        return moe__err(MOE_ERR_DEVICE, FNW ": dev: expected the experts' device %s, got %s",
                        moe__device_str(ex->dev, b, sizeof b), moe__device_str(dev, c, sizeof c));
    }
    moe_workspace *ws = (moe_workspace *)calloc(1, sizeof *ws);
    if (!ws) return moe__err(MOE_ERR_NOMEM, FNW ": out of host memory");
    ws->dev = dev;
    ws->max_tokens = max_tokens;
    ws->top_k = top_k;
    ws->E = ex->E;
    ws->H = ex->H;
    ws->I = ex->I;
    const int64_t P = max_tokens * top_k;
    ws->max_pairs = P;
    ws->max_tiles = P / MOE__FUSED_MIN_BM + (P < ex->E ? P : ex->E) + 1;
    size_t o = 0;
    ws->off_ids = o;
    o = moe__align_up(o + (size_t)P * 4);
    ws->off_wts = o;
    o = moe__align_up(o + (size_t)P * 4);
    ws->off_err = o;
    o = moe__align_up(o + 16);
    if (dev.type == MOE_DEVICE_CUDA) {
        ws->off_ntiles = o;
        o = moe__align_up(o + 16);
        ws->off_cnt = o;
        o = moe__align_up(o + (size_t)max_tokens * (size_t)((ex->H + 63) / 64) * 4);
        ws->off_sorted = o;
        o = moe__align_up(o + (size_t)P * 4);
        ws->off_tiles = o; /* 3 arrays: expert, first row, rows */
        o = moe__align_up(o + (size_t)ws->max_tiles * 12);
        ws->off_inter = o;
        o = moe__align_up(o + (size_t)P * (size_t)ex->I * 2);
        ws->off_y = o;
        o = moe__align_up(o + (size_t)P * (size_t)ex->H * 4);
        if (ex->quant != MOE_QUANT_BF16) { /* fused_quant.cu's region */
            ws->off_fq = o;
            ws->fq_bytes = moe__fused_quant_ws_bytes(max_tokens, top_k, ex->E, ex->H, ex->I);
            o = moe__align_up(o + ws->fq_bytes);
        }
    }
    ws->bytes = o;
    int64_t shape[1] = {(int64_t)o};
    moe_status s = moe_tensor_new(&ws->buf, MOE_U8, 1, shape, dev);
    if (s == MOE_OK) s = moe_tensor_fill(ws->buf, 0);
    if (s != MOE_OK) {
        moe_workspace_free(ws);
        return s;
    }
    *out = ws;
    return MOE_OK;
}

void moe_workspace_free(moe_workspace *ws) {
    if (!ws) return;
    moe_tensor_free(ws->buf);
    free(ws);
}

int64_t moe_workspace_max_tokens(const moe_workspace *ws) { return ws ? ws->max_tokens : 0; }
int32_t moe_workspace_top_k(const moe_workspace *ws) { return ws ? ws->top_k : 0; }
int64_t moe_workspace_nbytes(const moe_workspace *ws) { return ws ? (int64_t)ws->bytes : 0; }

/* View of `count` elements of dtype at byte offset off of the workspace buffer. */
static moe_status moe__ws_view(moe_tensor **out, const moe_workspace *ws, size_t off, int dtype, int ndim,
                               const int64_t *shape) {
    int64_t esize = moe_dtype_bits(dtype) / 8;
    return moe__tensor_wrap(out, ws->buf->st, dtype, ndim, shape, NULL,
                            ws->buf->offset + (int64_t)off / esize);
}

moe_status moe_workspace_check(moe_workspace *ws, int64_t *skipped) {
    if (skipped) *skipped = 0;
    if (!ws) return moe__err(MOE_ERR_ARG, "moe_workspace_check: ws: expected a workspace, got NULL");
    moe_tensor *err = NULL;
    int64_t shape[1] = {1};
    MOE_TRY(moe__ws_view(&err, ws, ws->off_err, MOE_I32, 1, shape));
    double v = 0;
    moe_status s = moe_tensor_read_f64(err, &v, 1); /* waits for the device */
    if (s == MOE_OK && v != 0) s = moe_tensor_fill(err, 0);
    moe_tensor_free(err);
    MOE_TRY(s);
    if (skipped) *skipped = (int64_t)v;
    if (v != 0)
        return moe__err(MOE_ERR_RANGE, "moe_workspace_check: %" PRId64
                        " routed ids out of range [0, E) were skipped since the last check", (int64_t)v);
    return MOE_OK;
}

/* ------------------------------------------------------------- fused MoE -- */

#define FN "moe_fused_moe"

static moe_status moe__fused_check2(const char *arg, const moe_tensor *t, int dtype, int64_t d0, int64_t d1,
                                    int at_least, moe_device dev) {
    char a[96], b[32], c[32];
    if (t->dtype != dtype)
        return moe__err(MOE_ERR_DTYPE, FN ": %s: expected dtype %s, got %s", arg, moe_dtype_name(dtype),
                        moe_dtype_name(t->dtype));
    if (t->ndim != 2 || (at_least ? t->shape[0] < d0 : t->shape[0] != d0) || t->shape[1] != d1)
        return moe__err(MOE_ERR_SHAPE, FN ": %s: expected shape [%s%" PRId64 ", %" PRId64 "], got %s", arg,
                        at_least ? ">= " : "", d0, d1, moe__shape_str(t, a, sizeof a));
    if (!moe_tensor_is_contiguous(t))
        return moe__err(MOE_ERR_ARG, FN ": %s: expected a contiguous tensor, got a strided view", arg);
    if (!moe__same_device(t->dev, dev))
        return moe__err(MOE_ERR_DEVICE, FN ": %s: expected device %s (the experts' device), got %s", arg,
                        moe__device_str(dev, b, sizeof b), moe__device_str(t->dev, c, sizeof c));
    return MOE_OK;
}

moe_status moe_fused_moe(const moe_fused_cfg *cfg, const moe_experts *ex, const moe_tensor *hidden,
                         const moe_tensor *logits, const moe_tensor *bias, const moe_tensor *routed_ids,
                         const moe_tensor *routed_weights, moe_tensor *replay, moe_tensor **out,
                         moe_tensor *ids_out, moe_tensor *weights_out, moe_workspace *ws) {
    char a[96], b[32], c[32];
    if (!cfg) return moe__err(MOE_ERR_ARG, FN ": cfg: expected a moe_fused_cfg, got NULL");
    if (!ex) return moe__err(MOE_ERR_ARG, FN ": experts: expected an experts object, got NULL");
    if (!hidden) return moe__err(MOE_ERR_ARG, FN ": hidden: expected a bf16 tensor [T, H], got NULL");
    if (!out) return moe__err(MOE_ERR_ARG, FN ": out: expected a pointer to a tensor handle (which may be NULL), got NULL");
    const moe_device dev = ex->dev;
    const int64_t E = ex->E, H = ex->H;
    /* hidden */
    if (hidden->dtype != MOE_BF16)
        return moe__err(MOE_ERR_DTYPE, FN ": hidden: expected dtype bf16, got %s", moe_dtype_name(hidden->dtype));
    if (hidden->ndim != 2)
        return moe__err(MOE_ERR_SHAPE, FN ": hidden: expected 2 dimensions [T, H], got shape %s",
                        moe__shape_str(hidden, a, sizeof a));
    if (hidden->shape[1] != H)
        return moe__err(MOE_ERR_SHAPE, FN ": hidden: expected dim 1 == H of the experts (%" PRId64 "), got shape %s", H,
                        moe__shape_str(hidden, a, sizeof a));
    if (!moe_tensor_is_contiguous(hidden))
        return moe__err(MOE_ERR_ARG, FN ": hidden: expected a contiguous tensor, got a strided view");
    if (!moe__same_device(hidden->dev, dev))
        return moe__err(MOE_ERR_DEVICE, FN ": hidden: expected device %s (the experts' device), got %s",
                        moe__device_str(dev, b, sizeof b), moe__device_str(hidden->dev, c, sizeof c));
    /* every CUDA path loads hidden and stores out 16 bytes at a time (H is a multiple of 128 there,
     * so each row is aligned when the first is); a view one element into its storage would fault */
    const uintptr_t hp = (uintptr_t)moe_tensor_data(hidden);
    if (dev.type == MOE_DEVICE_CUDA && (hp & 15))
        return moe__err(MOE_ERR_ARG,
                        FN ": hidden: expected CUDA data 16-byte aligned (the kernels load it 16 bytes at a time), got "
                           "data at offset %d mod 16 (a view at an offset: pass a copy, t:clone())",
                        (int)(hp & 15));
    const int64_t T = hidden->shape[0];
    /* mode */
    const int routed = routed_ids != NULL || routed_weights != NULL;
    int K;
    if (routed) {
        if (logits) return moe__err(MOE_ERR_ARG, FN ": logits: expected NULL in routed mode (routed ids given), got a tensor");
        if (bias) return moe__err(MOE_ERR_ARG, FN ": bias: expected NULL in routed mode (routed ids given), got a tensor");
        if (!routed_ids) return moe__err(MOE_ERR_ARG, FN ": routed_ids: expected an i32 tensor [T, K] with routed_weights, got NULL");
        if (!routed_weights)
            return moe__err(MOE_ERR_ARG, FN ": routed_weights: expected an f32 tensor [T, K] with routed_ids, got NULL");
        if (routed_ids->ndim != 2)
            return moe__err(MOE_ERR_SHAPE, FN ": routed_ids: expected 2 dimensions [T, K], got shape %s",
                            moe__shape_str(routed_ids, a, sizeof a));
        K = (int)routed_ids->shape[1];
        if (routed_ids->shape[1] < 1 || routed_ids->shape[1] > MOE_ROUTE_MAX_TOPK)
            return moe__err(MOE_ERR_UNSUPPORTED, FN ": routed_ids: expected 1..%d columns (K), got shape %s",
                            MOE_ROUTE_MAX_TOPK, moe__shape_str(routed_ids, a, sizeof a));
        MOE_TRY(moe__fused_check2("routed_ids", routed_ids, MOE_I32, T, K, 0, dev));
        MOE_TRY(moe__fused_check2("routed_weights", routed_weights, MOE_F32, T, K, 0, dev));
    } else {
        if (!logits)
            return moe__err(MOE_ERR_ARG, FN ": logits: expected a tensor [T, E] (or routed ids and weights), got NULL");
        K = cfg->route.top_k;
        if (logits->ndim != 2 || logits->shape[0] != T || logits->shape[1] != E)
            return moe__err(MOE_ERR_SHAPE, FN ": logits: expected shape [%" PRId64 ", %" PRId64 "] (T of hidden, E of the experts), got %s",
                            T, E, moe__shape_str(logits, a, sizeof a));
        if (!moe__same_device(logits->dev, dev))
            return moe__err(MOE_ERR_DEVICE, FN ": logits: expected device %s (the experts' device), got %s",
                            moe__device_str(dev, b, sizeof b), moe__device_str(logits->dev, c, sizeof c));
        if (K < 1 || K > MOE_ROUTE_MAX_TOPK)
            return moe__err(MOE_ERR_UNSUPPORTED, FN ": top_k: expected 1..%d, got %d", MOE_ROUTE_MAX_TOPK, K);
        if (K > E) return moe__err(MOE_ERR_ARG, FN ": top_k: expected <= E (%" PRId64 "), got %d", E, K);
    }
    /* expert parallelism */
    const int lo = cfg->local_offset;
    const int lc = cfg->local_count < 0 ? (int)(E - lo) : cfg->local_count;
    if (lo < 0 || lo > E)
        return moe__err(MOE_ERR_ARG, FN ": local_offset: expected 0..%" PRId64 ", got %d", E, lo);
    if (cfg->local_count < -1 || (int64_t)lo + lc > E)
        return moe__err(MOE_ERR_ARG, FN ": local_count: expected -1 or 0..%" PRId64 " (E - local_offset), got %d",
                        E - lo, cfg->local_count);
    /* outputs */
    if (replay) MOE_TRY(moe__fused_check2("replay", replay, MOE_I16, T, K, 1, dev));
    if (*out) {
        MOE_TRY(moe__fused_check2("out", *out, MOE_BF16, T, H, 0, dev));
        const uintptr_t op = (uintptr_t)moe_tensor_data(*out);
        if (dev.type == MOE_DEVICE_CUDA && (op & 15))
            return moe__err(MOE_ERR_ARG,
                            FN ": out: expected CUDA data 16-byte aligned (the kernels store it 16 bytes at a time), "
                               "got data at offset %d mod 16 (pass a tensor of its own, or let fused_moe allocate it)",
                            (int)(op & 15));
    }
    if (ids_out) MOE_TRY(moe__fused_check2("ids_out", ids_out, MOE_I32, T, K, 0, dev));
    if (weights_out) MOE_TRY(moe__fused_check2("weights_out", weights_out, MOE_F32, T, K, 0, dev));
    /* workspace */
    if (ws) {
        if (!moe__same_device(ws->dev, dev))
            return moe__err(MOE_ERR_DEVICE, FN ": ws: expected a workspace on %s (the experts' device), got one on %s",
                            moe__device_str(dev, b, sizeof b), moe__device_str(ws->dev, c, sizeof c));
        if (ws->max_tokens < T)
            return moe__err(MOE_ERR_ARG, FN ": ws: expected a workspace for >= %" PRId64 " tokens (T), got one for %" PRId64
                            " (make it with moe_workspace_new(dev, max_tokens >= T, ...))", T, ws->max_tokens);
        if (ws->top_k != K)
            return moe__err(MOE_ERR_ARG, FN ": ws: expected a workspace for top_k %d, got one for %d", K, ws->top_k);
        if (ws->E < E || ws->H < H || ws->I < ex->I)
            return moe__err(MOE_ERR_ARG, FN ": ws: expected a workspace for E >= %" PRId64 ", H >= %" PRId64 ", I >= %" PRId64
                            ", got E %" PRId64 ", H %" PRId64 ", I %" PRId64, E, H, ex->I, ws->E, ws->H, ws->I);
    } else if (dev.type != MOE_DEVICE_CPU) {
        return moe__err(MOE_ERR_ARG, FN ": ws: expected a workspace (moe_workspace_new) on %s, got NULL",
                        moe__device_str(dev, b, sizeof b));
    }
    const moe_backend *be = moe__backend_for(FN, dev);
    if (!be) return moe__backend_status();
    if (!be->fused)
        return moe__err(MOE_ERR_UNSUPPORTED, FN ": experts: expected a device with fused MoE kernels, got %s",
                        moe__device_str(dev, b, sizeof b));
    /* CPU: routed ids are checked up front */
    if (routed && dev.type == MOE_DEVICE_CPU && T > 0) {
        const int32_t *idp = (const int32_t *)moe_tensor_data(routed_ids);
        for (int64_t i = 0; i < T * K; i++)
            if (idp[i] < 0 || idp[i] >= E)
                return moe__err(MOE_ERR_RANGE, FN ": routed_ids: expected ids in [0, %" PRId64 "), got %d at [%" PRId64
                                ", %" PRId64 "]", E, idp[i], i / K, i % K);
    }

    /* ---- routing ---- */
    moe_tensor *new_out = NULL, *tmp_ids = NULL, *tmp_wts = NULL, *rview = NULL;
    const moe_tensor *use_ids = NULL, *use_wts = NULL;
    moe_status s = MOE_OK;
    moe_route_cfg rc_used; /* the routing (not routed) */
    int pending = 0;       /* ... left to the backend (moe__fused_args.route_pending) */
    int64_t shape_tk[2] = {T, K};
    if (!*out) {
        int64_t shape_th[2] = {T, H};
        MOE_TRY(moe_tensor_new(&new_out, MOE_BF16, 2, shape_th, dev));
    }
    if (routed) {
        use_ids = routed_ids;
        use_wts = routed_weights;
        if (T > 0 && replay) {
            s = moe_tensor_narrow(&rview, replay, 0, 0, T);
            if (s == MOE_OK) s = moe_tensor_cast_into(rview, routed_ids);
        }
        if (s == MOE_OK && T > 0 && ids_out) s = moe_tensor_copy(ids_out, routed_ids);
        if (s == MOE_OK && T > 0 && weights_out) s = moe_tensor_copy(weights_out, routed_weights);
    } else {
        moe_route_cfg rc = cfg->route;
        rc.weights_dtype = MOE_F32;
        rc_used = rc;
        moe_tensor *ri = ids_out, *rw = weights_out;
        if (!ri && ws) s = moe__ws_view(&tmp_ids, ws, ws->off_ids, MOE_I32, 2, shape_tk);
        if (s == MOE_OK && !rw && ws) s = moe__ws_view(&tmp_wts, ws, ws->off_wts, MOE_F32, 2, shape_tk);
        if (!ri) ri = tmp_ids; /* NULL without a workspace: moe_route allocates (CPU only) */
        if (!rw) rw = tmp_wts;
        moe_tensor *ri0 = ri, *rw0 = rw;
        /* CUDA, quantised experts: the backend routes (in its decode kernels where it can, else by the
         * routing kernel before its own); the arguments are checked here as moe_route checks them */
        pending = dev.type == MOE_DEVICE_CUDA && ex->quant != MOE_QUANT_BF16 && T > 0 && ri && rw;
        if (s == MOE_OK && pending) {
            s = moe__route_validate(&rc, logits, bias, ri, rw, replay);
            use_ids = ri;
            use_wts = rw;
        } else if (s == MOE_OK) {
            s = moe_route(&rc, logits, bias, &ri, &rw, replay);
        }
        if (s == MOE_OK && !pending) {
            if (!ri0) tmp_ids = ri; /* allocated by moe_route: ours to free */
            if (!rw0) tmp_wts = rw;
            use_ids = ri;
            use_wts = rw;
        }
    }
    if (s == MOE_OK && T > 0) {
        moe__fused_args args;
        memset(&args, 0, sizeof args);
        args.ex = ex;
        args.ws = ws;
        args.hidden = hidden;
        args.ids = use_ids;
        args.wts = use_wts;
        args.out = *out ? *out : new_out;
        args.T = T;
        args.K = K;
        args.local_offset = lo;
        args.local_count = lc;
        args.llama4 = cfg->route.method == MOE_ROUTE_LLAMA4;
        args.routed = routed;
        if (!routed) {
            args.route = &rc_used;
            args.logits = logits;
            args.bias = bias;
            args.route_pending = pending;
            args.replay = pending ? replay : NULL;
        }
        s = ex->quant != MOE_QUANT_BF16 ? moe__fused_quant_run(&args) : be->fused(&args);
        if (s == MOE_OK && lc > 0 && ex->dev.type == MOE_DEVICE_CPU) moe__fused_path_hit(MOE_FUSED_PATH_CPU);
    }
    moe_tensor_free(tmp_ids);
    moe_tensor_free(tmp_wts);
    moe_tensor_free(rview);
    if (s != MOE_OK) {
        moe_tensor_free(new_out);
        return s;
    }
    if (!*out) *out = new_out;
    return MOE_OK;
}
