/* trace.c -- replay traces: storage, appending rows from any device, metadata, safetensors
 * save/load (atomic), .npy import, directories of chunk files.  Metrics: trace_compare.c. */
#define _POSIX_C_SOURCE 200809L
#include "trace.h"

#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#define TRACE_FORMAT "moelab-trace/1"


static const moe_device HOST = {MOE_DEVICE_CPU, 0};

/* ---------------------------------------------------------------- lifetime -- */

static void drop_keep(moe_trace *tr) {
    for (int i = 0; i < 3; i++) {
        moe_tensor_free(tr->keep[i]);
        tr->keep[i] = NULL;
    }
}

static void drop_arrays(moe_trace *tr) {
    if (tr->owned) {
        free(tr->ids);
        free(tr->w);
        free(tr->tok);
    }
    drop_keep(tr);
    tr->ids = NULL;
    tr->w = NULL;
    tr->tok = NULL;
    tr->cap = 0;
    tr->owned = 1;
}

moe_status moe_trace_new(moe_trace **out, int64_t num_layers, int64_t top_k,
                         int64_t num_experts, int with_weights) {
    static const char *fn = "moe_trace_new";
    if (!out) return moe__err(MOE_ERR_ARG, "%s: out: expected a pointer, got NULL", fn);
    *out = NULL;
    if (num_layers < 1 || num_layers > 100000)
        return moe__err(MOE_ERR_ARG, "%s: num_layers: expected 1..100000, got %lld", fn,
                        (long long)num_layers);
    if (top_k < 1 || top_k > MOE_TRACE_MAX_TOPK)
        return moe__err(MOE_ERR_ARG, "%s: top_k: expected 1..%d, got %lld", fn,
                        MOE_TRACE_MAX_TOPK, (long long)top_k);
    if (num_experts < 0 || num_experts > 32768)
        return moe__err(MOE_ERR_ARG, "%s: num_experts: expected 0 (unknown) or 1..32768, got %lld",
                        fn, (long long)num_experts);
    if (num_experts > 0 && top_k > num_experts)
        return moe__err(MOE_ERR_ARG, "%s: top_k: expected <= num_experts %lld, got %lld", fn,
                        (long long)num_experts, (long long)top_k);
    moe_trace *tr = calloc(1, sizeof *tr);
    if (!tr) return moe__err(MOE_ERR_NOMEM, "%s: out of host memory", fn);
    tr->L = num_layers;
    tr->K = top_k;
    tr->E = num_experts;
    tr->with_weights = with_weights ? 1 : 0;
    tr->owned = 1;
    *out = tr;
    return MOE_OK;
}

void moe_trace_free(moe_trace *tr) {
    if (!tr) return;
    drop_arrays(tr);
    for (int i = 0; i < tr->nmeta; i++) {
        free(tr->mkey[i]);
        free(tr->mval[i]);
    }
    free(tr->mkey);
    free(tr->mval);
    free(tr);
}

int64_t moe_trace_tokens(const moe_trace *tr) { return tr ? tr->T : 0; }
int64_t moe_trace_layers(const moe_trace *tr) { return tr ? tr->L : 0; }
int64_t moe_trace_top_k(const moe_trace *tr) { return tr ? tr->K : 0; }
int64_t moe_trace_num_experts(const moe_trace *tr) { return tr ? tr->E : 0; }
int moe_trace_has_weights(const moe_trace *tr) { return tr ? tr->with_weights : 0; }
int moe_trace_has_token_ids(const moe_trace *tr) { return tr && tr->tok ? 1 : 0; }

moe_status moe_trace_set_num_experts(moe_trace *tr, int64_t num_experts) {
    static const char *fn = "moe_trace_set_num_experts";
    if (!tr) return moe__err(MOE_ERR_ARG, "%s: tr: expected a trace, got NULL", fn);
    if (num_experts < 0 || num_experts > 32768 || (num_experts > 0 && num_experts < tr->K))
        return moe__err(MOE_ERR_ARG, "%s: num_experts: expected 0 or %lld..32768, got %lld", fn,
                        (long long)tr->K, (long long)num_experts);
    int64_t n = tr->T * tr->L * tr->K;
    for (int64_t i = 0; num_experts > 0 && i < n; i++)
        if (tr->ids[i] >= num_experts)
            return moe__err(MOE_ERR_RANGE,
                            "%s: num_experts: expected > every expert id, got %lld but token "
                            "%lld, layer %lld has id %d",
                            fn, (long long)num_experts, (long long)(i / (tr->L * tr->K)),
                            (long long)(i / tr->K % tr->L), (int)tr->ids[i]);
    tr->E = num_experts;
    return MOE_OK;
}

/* Give the trace owned arrays of capacity >= cap (copying borrowed data). */
static moe_status own(moe_trace *tr, int64_t cap, const char *fn) {
    if (tr->owned && cap <= tr->cap) return MOE_OK;
    if (cap < tr->T) cap = tr->T;
    int64_t row = tr->L * tr->K;
    if (cap > (int64_t)(SIZE_MAX / 8) / row)
        return moe__err(MOE_ERR_NOMEM, "%s: %lld tokens do not fit in memory", fn,
                        (long long)cap);
    size_t nid = (size_t)(cap * row);
    if (tr->owned) {
        int16_t *ids = realloc(tr->ids, nid * sizeof(int16_t) + 1);
        if (!ids) return moe__err(MOE_ERR_NOMEM, "%s: out of host memory (%lld tokens)", fn,
                                  (long long)cap);
        tr->ids = ids;
        if (tr->with_weights) {
            float *w = realloc(tr->w, nid * sizeof(float) + 1);
            if (!w) return moe__err(MOE_ERR_NOMEM, "%s: out of host memory", fn);
            tr->w = w;
        }
        if (tr->tok) {
            int32_t *tok = realloc(tr->tok, (size_t)cap * sizeof(int32_t) + 1);
            if (!tok) return moe__err(MOE_ERR_NOMEM, "%s: out of host memory", fn);
            tr->tok = tok;
        }
        tr->cap = cap;
        return MOE_OK;
    }
    int16_t *ids = malloc(nid * sizeof(int16_t) + 1);
    float *w = tr->with_weights ? malloc(nid * sizeof(float) + 1) : NULL;
    int32_t *tok = tr->tok ? malloc((size_t)cap * sizeof(int32_t) + 1) : NULL;
    if (!ids || (tr->with_weights && !w) || (tr->tok && !tok)) {
        free(ids);
        free(w);
        free(tok);
        return moe__err(MOE_ERR_NOMEM, "%s: out of host memory (%lld tokens)", fn,
                        (long long)cap);
    }
    size_t n = (size_t)(tr->T * row);
    if (n) memcpy(ids, tr->ids, n * sizeof(int16_t));
    if (w && n) {
        if (tr->w)
            memcpy(w, tr->w, n * sizeof(float));
        else
            memset(w, 0, n * sizeof(float));
    }
    if (tok && tr->T) memcpy(tok, tr->tok, (size_t)tr->T * sizeof(int32_t));
    drop_keep(tr);
    tr->ids = ids;
    tr->w = w;
    tr->tok = tok;
    tr->cap = cap;
    tr->owned = 1;
    return MOE_OK;
}

moe_status moe_trace_reserve(moe_trace *tr, int64_t tokens) {
    if (!tr) return moe__err(MOE_ERR_ARG, "moe_trace_reserve: tr: expected a trace, got NULL");
    if (tokens < 0)
        return moe__err(MOE_ERR_ARG, "moe_trace_reserve: tokens: expected >= 0, got %lld",
                        (long long)tokens);
    return own(tr, tokens, "moe_trace_reserve");
}

/* Grow so that T + n fits, doubling. */
static moe_status grow(moe_trace *tr, int64_t n, const char *fn) {
    if (n > INT64_MAX - tr->T)
        return moe__err(MOE_ERR_NOMEM, "%s: %lld + %lld tokens do not fit in memory", fn, (long long)tr->T,
                        (long long)n);
    int64_t need = tr->T + n;
    if (tr->owned && need <= tr->cap) return MOE_OK;
    int64_t cap = tr->owned ? tr->cap : tr->T;
    if (cap < 256) cap = 256;
    while (cap < need) cap = cap > INT64_MAX / 2 ? need : cap + cap / 2 + 1; /* own() refuses the huge */
    return own(tr, cap, fn);
}

moe_status moe_trace_resize(moe_trace *tr, int64_t tokens) {
    static const char *fn = "moe_trace_resize";
    if (!tr) return moe__err(MOE_ERR_ARG, "%s: tr: expected a trace, got NULL", fn);
    if (tokens < 0)
        return moe__err(MOE_ERR_ARG, "%s: tokens: expected >= 0, got %lld", fn,
                        (long long)tokens);
    if (tokens > tr->T) {
        MOE_TRY(own(tr, tokens, fn));
        int64_t row = tr->L * tr->K, n = (tokens - tr->T) * row;
        memset(tr->ids + tr->T * row, 0xff, (size_t)n * sizeof(int16_t)); /* -1 */
        if (tr->w) memset(tr->w + tr->T * row, 0, (size_t)n * sizeof(float));
        if (tr->tok) memset(tr->tok + tr->T, 0xff, (size_t)(tokens - tr->T) * sizeof(int32_t));
    } else if (!tr->owned && tokens < tr->T) {
        MOE_TRY(own(tr, tr->T, fn));
    }
    tr->T = tokens;
    return MOE_OK;
}

const int16_t *moe_trace_ids(const moe_trace *tr) { return tr && tr->T ? tr->ids : NULL; }
const float *moe_trace_weights(const moe_trace *tr) { return tr && tr->T ? tr->w : NULL; }
const int32_t *moe_trace_token_ids(const moe_trace *tr) { return tr && tr->T ? tr->tok : NULL; }

int16_t *moe_trace_ids_mut(moe_trace *tr) {
    if (!tr || !tr->T) return NULL;
    return own(tr, tr->T, "moe_trace_ids_mut") == MOE_OK ? tr->ids : NULL;
}

float *moe_trace_weights_mut(moe_trace *tr) {
    if (!tr || !tr->T || !tr->with_weights) return NULL;
    return own(tr, tr->T, "moe_trace_weights_mut") == MOE_OK ? tr->w : NULL;
}

static moe_status ensure_tok(moe_trace *tr, const char *fn) {
    if (tr->tok) return own(tr, tr->T, fn);
    MOE_TRY(own(tr, tr->T, fn));
    int64_t cap = tr->cap > 0 ? tr->cap : 1;
    tr->tok = malloc((size_t)cap * sizeof(int32_t) + 1);
    if (!tr->tok) return moe__err(MOE_ERR_NOMEM, "%s: out of host memory", fn);
    memset(tr->tok, 0xff, (size_t)cap * sizeof(int32_t));
    return MOE_OK;
}

int32_t *moe_trace_token_ids_mut(moe_trace *tr) {
    if (!tr || !tr->T) return NULL;
    return ensure_tok(tr, "moe_trace_token_ids_mut") == MOE_OK ? tr->tok : NULL;
}

/* ------------------------------------------------------------- appending -- */

/* Rows 0..n-1 of src (dim 0 >= n, trailing shape `tail`) as a contiguous host tensor of
 * `want_dtype` (-1: keep).  *tmp receives a new handle (free it) or NULL; *data its data. */
static moe_status host_rows(const char *fn, const char *arg, const moe_tensor *src, int64_t n,
                            int ndim, const int64_t *tail, int want_dtype, moe_tensor **tmp,
                            const void **data) {
    *tmp = NULL;
    *data = NULL;
    if (moe_tensor_ndim(src) != ndim)
        return moe__err(MOE_ERR_SHAPE, "%s: %s: expected %d dims, got %d", fn, arg, ndim,
                        moe_tensor_ndim(src));
    if (moe_tensor_dim(src, 0) < n)
        return moe__err(MOE_ERR_SHAPE, "%s: %s: expected dim 0 >= %lld, got %lld", fn, arg,
                        (long long)n, (long long)moe_tensor_dim(src, 0));
    for (int d = 1; d < ndim; d++)
        if (moe_tensor_dim(src, d) != tail[d - 1])
            return moe__err(MOE_ERR_SHAPE, "%s: %s: expected dim %d == %lld, got %lld", fn, arg,
                            d, (long long)tail[d - 1], (long long)moe_tensor_dim(src, d));
    moe_tensor *v = NULL, *h = NULL;
    MOE_TRY(moe_tensor_narrow(&v, src, 0, 0, n));
    moe_status st = MOE_OK;
    if (moe_tensor_device(v).type != MOE_DEVICE_CPU)
        st = moe_tensor_to_device(&h, v, HOST);
    else if (!moe_tensor_is_contiguous(v))
        st = moe_tensor_contiguous(&h, v);
    if (st != MOE_OK) {
        moe_tensor_free(v);
        return st;
    }
    if (h) {
        moe_tensor_free(v);
        v = h;
    }
    if (want_dtype >= 0 && moe_tensor_dtype(v) != want_dtype) {
        st = moe_tensor_cast(&h, v, want_dtype);
        moe_tensor_free(v);
        if (st != MOE_OK) return st;
        v = h;
    }
    *tmp = v;
    *data = moe_tensor_data(v);
    return MOE_OK;
}

/* Convert n ids of dtype into int16 (below 0 -> -1); range errors name the argument. */
static moe_status ids_into(const char *fn, const char *arg, const void *src, int dtype,
                           int64_t n, int64_t E, int16_t *dst, int64_t dst_stride,
                           int64_t row) {
    /* dst_stride: elements between consecutive rows of `row` ids in dst. */
    int64_t lim = E > 0 ? E : 32768;
    for (int64_t i = 0; i < n; i++) {
        int64_t v;
        switch (dtype) {
        case MOE_I16: v = ((const int16_t *)src)[i]; break;
        case MOE_I32: v = ((const int32_t *)src)[i]; break;
        default: v = ((const int64_t *)src)[i]; break;
        }
        if (v < 0) v = -1;
        if (v >= lim)
            return moe__err(MOE_ERR_RANGE, "%s: %s: expected expert ids < %lld, got %lld at row %lld",
                            fn, arg, (long long)lim, (long long)v, (long long)(i / row));
        dst[(i / row) * dst_stride + i % row] = (int16_t)v;
    }
    return MOE_OK;
}

static moe_status check_ids_dtype(const char *fn, const char *arg, const moe_tensor *t) {
    int dt = moe_tensor_dtype(t);
    if (dt != MOE_I16 && dt != MOE_I32 && dt != MOE_I64)
        return moe__err(MOE_ERR_DTYPE, "%s: %s: expected i16, i32 or i64, got %s", fn, arg,
                        moe_dtype_name(dt));
    return MOE_OK;
}

moe_status moe_trace_append(moe_trace *tr, int64_t n, const moe_tensor *ids,
                            const moe_tensor *weights, const moe_tensor *token_ids) {
    static const char *fn = "moe_trace_append";
    if (!tr) return moe__err(MOE_ERR_ARG, "%s: tr: expected a trace, got NULL", fn);
    if (n < 0) return moe__err(MOE_ERR_ARG, "%s: n: expected >= 0, got %lld", fn, (long long)n);
    if (weights && !tr->with_weights)
        return moe__err(MOE_ERR_ARG, "%s: weights: expected NULL (trace made without weights), got a tensor", fn);
    if (ids) MOE_TRY(check_ids_dtype(fn, "ids", ids));
    if (token_ids && moe_tensor_dtype(token_ids) != MOE_I32 && moe_tensor_dtype(token_ids) != MOE_I64)
        return moe__err(MOE_ERR_DTYPE, "%s: token_ids: expected i32 or i64, got %s", fn,
                        moe_dtype_name(moe_tensor_dtype(token_ids)));
    int64_t tail[2] = {tr->L, tr->K};
    moe_tensor *hi = NULL, *hw = NULL, *ht = NULL;
    const void *di = NULL, *dw = NULL, *dt = NULL;
    moe_status st = MOE_OK;
    if (ids) st = host_rows(fn, "ids", ids, n, 3, tail, -1, &hi, &di);
    if (st == MOE_OK && weights) st = host_rows(fn, "weights", weights, n, 3, tail, MOE_F32, &hw, &dw);
    if (st == MOE_OK && token_ids) st = host_rows(fn, "token_ids", token_ids, n, 1, tail, MOE_I32, &ht, &dt);
    if (st == MOE_OK && token_ids && !tr->tok) st = ensure_tok(tr, fn);
    if (st == MOE_OK) st = grow(tr, n, fn);
    if (st == MOE_OK) {
        int64_t row = tr->L * tr->K, T0 = tr->T;
        int16_t *dst = tr->ids + T0 * row;
        if (hi)
            st = ids_into(fn, "ids", di, moe_tensor_dtype(hi), n * row, tr->E, dst, row, row);
        else
            memset(dst, 0xff, (size_t)(n * row) * sizeof(int16_t));
        if (st == MOE_OK) {
            if (tr->w) {
                if (dw)
                    memcpy(tr->w + T0 * row, dw, (size_t)(n * row) * sizeof(float));
                else
                    memset(tr->w + T0 * row, 0, (size_t)(n * row) * sizeof(float));
            }
            if (tr->tok) {
                if (dt)
                    memcpy(tr->tok + T0, dt, (size_t)n * sizeof(int32_t));
                else
                    memset(tr->tok + T0, 0xff, (size_t)n * sizeof(int32_t));
            }
            tr->T += n;
        }
    }
    moe_tensor_free(hi);
    moe_tensor_free(hw);
    moe_tensor_free(ht);
    return st;
}

moe_status moe_trace_set_layer(moe_trace *tr, int64_t start, int64_t n, int64_t layer,
                               const moe_tensor *ids, const moe_tensor *weights) {
    static const char *fn = "moe_trace_set_layer";
    if (!tr) return moe__err(MOE_ERR_ARG, "%s: tr: expected a trace, got NULL", fn);
    if (!ids) return moe__err(MOE_ERR_ARG, "%s: ids: expected a tensor, got NULL", fn);
    if (layer < 0 || layer >= tr->L)
        return moe__err(MOE_ERR_RANGE, "%s: layer: expected 0..%lld, got %lld", fn,
                        (long long)(tr->L - 1), (long long)layer);
    if (n < 0 || start < 0 || n > tr->T - start)
        return moe__err(MOE_ERR_RANGE, "%s: start/n: expected a token range within 0..%lld, got start %lld, n %lld",
                        fn, (long long)tr->T, (long long)start, (long long)n);
    if (weights && !tr->with_weights)
        return moe__err(MOE_ERR_ARG, "%s: weights: expected NULL (trace made without weights), got a tensor", fn);
    MOE_TRY(check_ids_dtype(fn, "ids", ids));
    MOE_TRY(own(tr, tr->T, fn));
    int64_t tail[1] = {tr->K};
    moe_tensor *hi = NULL, *hw = NULL;
    const void *di = NULL, *dw = NULL;
    moe_status st = host_rows(fn, "ids", ids, n, 2, tail, -1, &hi, &di);
    if (st == MOE_OK && weights) st = host_rows(fn, "weights", weights, n, 2, tail, MOE_F32, &hw, &dw);
    int64_t row = tr->L * tr->K;
    if (st == MOE_OK)
        st = ids_into(fn, "ids", di, moe_tensor_dtype(hi), n * tr->K, tr->E,
                      tr->ids + start * row + layer * tr->K, row, tr->K);
    if (st == MOE_OK && dw)
        for (int64_t i = 0; i < n; i++)
            memcpy(tr->w + (start + i) * row + layer * tr->K, (const float *)dw + i * tr->K,
                   (size_t)tr->K * sizeof(float));
    moe_tensor_free(hi);
    moe_tensor_free(hw);
    return st;
}

moe_status moe_trace_append_host(moe_trace *tr, int64_t n, const int16_t *ids,
                                 const float *weights, const int32_t *token_ids) {
    static const char *fn = "moe_trace_append_host";
    if (!tr) return moe__err(MOE_ERR_ARG, "%s: tr: expected a trace, got NULL", fn);
    if (n < 0) return moe__err(MOE_ERR_ARG, "%s: n: expected >= 0, got %lld", fn, (long long)n);
    if (n > 0 && !ids) return moe__err(MOE_ERR_ARG, "%s: ids: expected host ids, got NULL", fn);
    if (weights && !tr->with_weights)
        return moe__err(MOE_ERR_ARG, "%s: weights: expected NULL (trace made without weights), got an array", fn);
    if (token_ids) MOE_TRY(ensure_tok(tr, fn));
    MOE_TRY(grow(tr, n, fn));
    int64_t row = tr->L * tr->K;
    MOE_TRY(ids_into(fn, "ids", ids, MOE_I16, n * row, tr->E, tr->ids + tr->T * row, row, row));
    if (tr->w) {
        if (weights)
            memcpy(tr->w + tr->T * row, weights, (size_t)(n * row) * sizeof(float));
        else
            memset(tr->w + tr->T * row, 0, (size_t)(n * row) * sizeof(float));
    }
    if (tr->tok) {
        if (token_ids)
            memcpy(tr->tok + tr->T, token_ids, (size_t)n * sizeof(int32_t));
        else
            memset(tr->tok + tr->T, 0xff, (size_t)n * sizeof(int32_t));
    }
    tr->T += n;
    return MOE_OK;
}

moe_status moe_trace_append_trace(moe_trace *dst, const moe_trace *src, int64_t start,
                                  int64_t n) {
    static const char *fn = "moe_trace_append_trace";
    if (!dst || !src) return moe__err(MOE_ERR_ARG, "%s: %s: expected a trace, got NULL", fn, dst ? "src" : "dst");
    if (src->L != dst->L || src->K != dst->K)
        return moe__err(MOE_ERR_SHAPE, "%s: src: expected %lld layers x top_k %lld, got %lld x %lld",
                        fn, (long long)dst->L, (long long)dst->K, (long long)src->L, (long long)src->K);
    if (src->E > 0 && dst->E > 0 && src->E != dst->E)
        return moe__err(MOE_ERR_SHAPE, "%s: src: expected num_experts %lld, got %lld", fn,
                        (long long)dst->E, (long long)src->E);
    if (start < 0 || n < 0 || n > src->T - start)
        return moe__err(MOE_ERR_RANGE, "%s: start/n: expected a range within 0..%lld, got start %lld, n %lld",
                        fn, (long long)src->T, (long long)start, (long long)n);
    if (src->tok && n) MOE_TRY(ensure_tok(dst, fn));
    int64_t row = src->L * src->K;
    MOE_TRY(grow(dst, n, fn));
    if (n) {
        MOE_TRY(ids_into(fn, "src", src->ids + start * row, MOE_I16, n * row, dst->E,
                         dst->ids + dst->T * row, row, row));
        if (dst->w) {
            if (src->w)
                memcpy(dst->w + dst->T * row, src->w + start * row, (size_t)(n * row) * sizeof(float));
            else
                memset(dst->w + dst->T * row, 0, (size_t)(n * row) * sizeof(float));
        }
        if (dst->tok) {
            if (src->tok)
                memcpy(dst->tok + dst->T, src->tok + start, (size_t)n * sizeof(int32_t));
            else
                memset(dst->tok + dst->T, 0xff, (size_t)n * sizeof(int32_t));
        }
    }
    dst->T += n;
    return MOE_OK;
}

/* ---------------------------------------------------------------- metadata -- */

static int meta_index(const moe_trace *tr, const char *key) {
    for (int i = 0; i < tr->nmeta; i++)
        if (strcmp(tr->mkey[i], key) == 0) return i;
    return -1;
}

static char *dupstr(const char *s) {
    size_t n = strlen(s) + 1;
    char *d = malloc(n);
    if (d) memcpy(d, s, n);
    return d;
}

moe_status moe_trace_set_meta(moe_trace *tr, const char *key, const char *value) {
    static const char *fn = "moe_trace_set_meta";
    if (!tr) return moe__err(MOE_ERR_ARG, "%s: tr: expected a trace, got NULL", fn);
    if (!key || !*key)
        return moe__err(MOE_ERR_ARG, "%s: key: expected a non-empty string, got %s", fn, key ? "\"\"" : "NULL");
    int i = meta_index(tr, key);
    if (!value) {
        if (i >= 0) {
            free(tr->mkey[i]);
            free(tr->mval[i]);
            memmove(tr->mkey + i, tr->mkey + i + 1, sizeof(char *) * (size_t)(tr->nmeta - i - 1));
            memmove(tr->mval + i, tr->mval + i + 1, sizeof(char *) * (size_t)(tr->nmeta - i - 1));
            tr->nmeta--;
        }
        return MOE_OK;
    }
    char *v = dupstr(value);
    if (!v) return moe__err(MOE_ERR_NOMEM, "%s: out of host memory", fn);
    if (i >= 0) {
        free(tr->mval[i]);
        tr->mval[i] = v;
        return MOE_OK;
    }
    if (tr->nmeta == tr->meta_cap) {
        int cap = tr->meta_cap ? tr->meta_cap * 2 : 8;
        char **k2 = realloc(tr->mkey, sizeof(char *) * (size_t)cap);
        if (k2) tr->mkey = k2;
        char **v2 = k2 ? realloc(tr->mval, sizeof(char *) * (size_t)cap) : NULL;
        if (v2) tr->mval = v2;
        if (!k2 || !v2) {
            free(v);
            return moe__err(MOE_ERR_NOMEM, "%s: out of host memory", fn);
        }
        tr->meta_cap = cap;
    }
    char *k = dupstr(key);
    if (!k) {
        free(v);
        return moe__err(MOE_ERR_NOMEM, "%s: out of host memory", fn);
    }
    tr->mkey[tr->nmeta] = k;
    tr->mval[tr->nmeta] = v;
    tr->nmeta++;
    return MOE_OK;
}

const char *moe_trace_get_meta(const moe_trace *tr, const char *key) {
    if (!tr || !key) return NULL;
    int i = meta_index(tr, key);
    return i >= 0 ? tr->mval[i] : NULL;
}
int moe_trace_meta_count(const moe_trace *tr) { return tr ? tr->nmeta : 0; }
const char *moe_trace_meta_key(const moe_trace *tr, int i) {
    return tr && i >= 0 && i < tr->nmeta ? tr->mkey[i] : NULL;
}
const char *moe_trace_meta_value(const moe_trace *tr, int i) {
    return tr && i >= 0 && i < tr->nmeta ? tr->mval[i] : NULL;
}

/* Keys derived from the arrays: written on save, never stored as metadata. */
static int structural_key(const char *k) {
    return !strcmp(k, "num_layers") || !strcmp(k, "top_k") || !strcmp(k, "num_experts") ||
           !strcmp(k, "tokens") || !strcmp(k, "format");
}

/* ------------------------------------------------------------------- save -- */

static void noop_release(moe_storage *s) { (void)s; }

/* A host tensor viewing `data` (not owned). */
static moe_status view(moe_tensor **out, void *data, size_t bytes, int dtype, int ndim,
                       const int64_t *shape) {
    static int16_t dummy[8];
    moe_storage *st = NULL;
    MOE_TRY(moe__storage_wrap(&st, data ? data : dummy, bytes ? bytes : 1, HOST, noop_release,
                              NULL, 0));
    moe_status s = moe__tensor_wrap(out, st, dtype, ndim, shape, NULL, 0);
    moe__storage_release(st);
    return s;
}

moe_status moe_trace_save_range(const moe_trace *tr, const char *path, int64_t start,
                                int64_t n) {
    static const char *fn = "moe_trace_save";
    if (!tr) return moe__err(MOE_ERR_ARG, "%s: tr: expected a trace, got NULL", fn);
    if (!path || !*path)
        return moe__err(MOE_ERR_ARG, "%s: path: expected a file name, got %s", fn, path ? "\"\"" : "NULL");
    if (start < 0 || n < 0 || n > tr->T - start)
        return moe__err(MOE_ERR_RANGE, "%s: start/n: expected a range within 0..%lld, got start %lld, n %lld",
                        fn, (long long)tr->T, (long long)start, (long long)n);
    int64_t row = tr->L * tr->K;
    int64_t shape[3] = {n, tr->L, tr->K};
    moe_tensor *ts[3] = {NULL, NULL, NULL};
    const char *names[3];
    int nt = 0;
    moe_status st = view(&ts[nt], n ? tr->ids + start * row : NULL,
                         (size_t)(n * row) * sizeof(int16_t), MOE_I16, 3, shape);
    names[nt++] = "routed_experts";
    if (st == MOE_OK && tr->w) {
        st = view(&ts[nt], n ? tr->w + start * row : NULL, (size_t)(n * row) * sizeof(float),
                  MOE_F32, 3, shape);
        names[nt++] = "weights";
    }
    if (st == MOE_OK && tr->tok) {
        st = view(&ts[nt], n ? tr->tok + start : NULL, (size_t)n * sizeof(int32_t), MOE_I32, 1,
                  shape);
        names[nt++] = "token_ids";
    }
    /* metadata: structural keys first, then the trace's own (engine_version/created added
     * when absent). */
    int cap = tr->nmeta + 8, nm = 0;
    const char **keys = malloc(sizeof(char *) * (size_t)cap);
    const char **vals = malloc(sizeof(char *) * (size_t)cap);
    char b_l[32], b_k[32], b_e[32], b_t[32], b_c[40];
    if (!keys || !vals) st = moe__err(MOE_ERR_NOMEM, "%s: out of host memory", fn);
    if (st == MOE_OK) {
        snprintf(b_l, sizeof b_l, "%lld", (long long)tr->L);
        snprintf(b_k, sizeof b_k, "%lld", (long long)tr->K);
        snprintf(b_e, sizeof b_e, "%lld", (long long)tr->E);
        snprintf(b_t, sizeof b_t, "%lld", (long long)n);
        keys[nm] = "format"; vals[nm++] = TRACE_FORMAT;
        keys[nm] = "num_layers"; vals[nm++] = b_l;
        keys[nm] = "top_k"; vals[nm++] = b_k;
        if (tr->E > 0) { keys[nm] = "num_experts"; vals[nm++] = b_e; }
        keys[nm] = "tokens"; vals[nm++] = b_t;
        for (int i = 0; i < tr->nmeta; i++) {
            if (structural_key(tr->mkey[i])) continue;
            keys[nm] = tr->mkey[i];
            vals[nm++] = tr->mval[i];
        }
        if (meta_index(tr, "engine_version") < 0) {
            keys[nm] = "engine_version";
            vals[nm++] = moe_version();
        }
        if (meta_index(tr, "created") < 0) {
            time_t now = time(NULL);
            struct tm g;
            gmtime_r(&now, &g);
            strftime(b_c, sizeof b_c, "%Y-%m-%dT%H:%M:%SZ", &g);
            keys[nm] = "created";
            vals[nm++] = b_c;
        }
        st = moe_st_write(path, nt, names, (const moe_tensor *const *)ts, nm, keys, vals);
    }
    free(keys);
    free(vals);
    for (int i = 0; i < 3; i++) moe_tensor_free(ts[i]);
    return st;
}

moe_status moe_trace_save(const moe_trace *tr, const char *path) {
    if (!tr) return moe__err(MOE_ERR_ARG, "moe_trace_save: tr: expected a trace, got NULL");
    return moe_trace_save_range(tr, path, 0, tr->T);
}

/* ------------------------------------------------------------------- load -- */

static int64_t parse_i64(const char *s, int64_t dflt) {
    if (!s || !*s) return dflt;
    char *end = NULL;
    long long v = strtoll(s, &end, 10);
    return (end && *end == '\0') ? (int64_t)v : dflt;
}

/* Build a trace from an ids tensor [T, L, K] (host) and optional weights / token ids. */
static moe_status from_tensors_impl(const char *fn, const char *path, moe_tensor *ids,
                                    moe_tensor *w, moe_tensor *tok, int64_t E, moe_trace **out,
                                    int *consumed) {
    int dt = moe_tensor_dtype(ids);
    if (moe_tensor_ndim(ids) != 3)
        return moe__err(MOE_ERR_FORMAT, "%s: %s: expected routed_experts of 3 dims [T, L, K], got %d dims",
                        fn, path, moe_tensor_ndim(ids));
    if (dt != MOE_I16 && dt != MOE_I32 && dt != MOE_I64)
        return moe__err(MOE_ERR_FORMAT, "%s: %s: expected routed_experts of int16/int32/int64, got %s",
                        fn, path, moe_dtype_name(dt));
    int64_t T = moe_tensor_dim(ids, 0), L = moe_tensor_dim(ids, 1), K = moe_tensor_dim(ids, 2);
    if (L < 1 || K < 1 || K > MOE_TRACE_MAX_TOPK)
        return moe__err(MOE_ERR_FORMAT, "%s: %s: expected routed_experts [T, L >= 1, 1 <= K <= %d], got [%lld, %lld, %lld]",
                        fn, path, MOE_TRACE_MAX_TOPK, (long long)T, (long long)L, (long long)K);
    if (E > 32768 || (E > 0 && E < K)) E = 0;
    if (w) {
        if (moe_tensor_ndim(w) != 3 || moe_tensor_dim(w, 0) != T || moe_tensor_dim(w, 1) != L ||
            moe_tensor_dim(w, 2) != K || !moe_dtype_is_float(moe_tensor_dtype(w)))
            return moe__err(MOE_ERR_FORMAT, "%s: %s: expected weights float [%lld, %lld, %lld]",
                            fn, path, (long long)T, (long long)L, (long long)K);
    }
    if (tok && (moe_tensor_ndim(tok) != 1 || moe_tensor_dim(tok, 0) != T ||
                (moe_tensor_dtype(tok) != MOE_I32 && moe_tensor_dtype(tok) != MOE_I64)))
        return moe__err(MOE_ERR_FORMAT, "%s: %s: expected token_ids int32 [%lld]", fn, path,
                        (long long)T);
    moe_trace *tr = NULL;
    MOE_TRY(moe_trace_new(&tr, L, K, E, w != NULL));
    moe_status st = MOE_OK;
    int borrow = dt == MOE_I16 && moe_tensor_is_contiguous(ids) &&
                 ((uintptr_t)moe_tensor_data(ids) % 4) == 0 && (!w || (moe_tensor_dtype(w) == MOE_F32 &&
                 moe_tensor_is_contiguous(w) && ((uintptr_t)moe_tensor_data(w) % 4) == 0)) &&
                 (!tok || (moe_tensor_dtype(tok) == MOE_I32 && moe_tensor_is_contiguous(tok) &&
                 ((uintptr_t)moe_tensor_data(tok) % 4) == 0));
    if (borrow) {
        tr->owned = 0;
        tr->T = T;
        tr->ids = moe_tensor_data(ids);
        tr->keep[0] = ids;
        *consumed = 1;
        if (w) { tr->w = moe_tensor_data(w); tr->keep[1] = w; }
        if (tok) { tr->tok = moe_tensor_data(tok); tr->keep[2] = tok; }
        /* validate the ids once (range); negatives other than -1 are normalised on a copy */
        int64_t n = T * L * K, lim = E > 0 ? E : 32768, odd_neg = 0;
        for (int64_t i = 0; i < n; i++) {
            if (tr->ids[i] >= lim) {
                st = moe__err(MOE_ERR_RANGE, "%s: %s: expected expert ids < %lld, got %d at token %lld, layer %lld",
                              fn, path, (long long)lim, (int)tr->ids[i], (long long)(i / (L * K)),
                              (long long)(i / K % L));
                break;
            }
            odd_neg += tr->ids[i] < -1;
        }
        if (st != MOE_OK) {
            /* nothing was copied yet: give the tensors back to the wrapper, which frees them */
            tr->keep[0] = tr->keep[1] = tr->keep[2] = NULL;
            *consumed = 0;
            tr->ids = NULL; tr->w = NULL; tr->tok = NULL; tr->owned = 1; tr->T = 0;
            moe_trace_free(tr);
            return st;
        }
        if (odd_neg) {
            /* own() copies and frees the mapped tensors (they stay consumed) */
            st = own(tr, T, fn);
            if (st != MOE_OK) {
                moe_trace_free(tr); /* frees keep[] too */
                return st;
            }
            for (int64_t i = 0; i < n; i++)
                if (tr->ids[i] < 0) tr->ids[i] = -1;
        }
        *out = tr;
        return MOE_OK;
    }
    /* converting path: contiguous copies */
    moe_tensor *ci = NULL, *cw = NULL, *ct = NULL;
    if (!moe_tensor_is_contiguous(ids)) st = moe_tensor_contiguous(&ci, ids);
    if (st == MOE_OK && w) st = moe_tensor_cast(&cw, w, MOE_F32);
    if (st == MOE_OK && tok) st = moe_tensor_cast(&ct, tok, MOE_I32);
    if (st == MOE_OK) {
        if (ct) {
            st = ensure_tok(tr, fn);
        }
    }
    if (st == MOE_OK) st = own(tr, T, fn);
    if (st == MOE_OK && ct && !tr->tok) st = ensure_tok(tr, fn);
    if (st == MOE_OK) {
        const moe_tensor *src = ci ? ci : ids;
        st = ids_into(fn, path, moe_tensor_data(src), dt, T * L * K, E, tr->ids, L * K, L * K);
    }
    if (st == MOE_OK && cw) {
        /* cast gives a contiguous tensor */
        memcpy(tr->w, moe_tensor_data(cw), (size_t)(T * L * K) * sizeof(float));
    }
    if (st == MOE_OK && ct) memcpy(tr->tok, moe_tensor_data(ct), (size_t)T * sizeof(int32_t));
    if (st == MOE_OK) tr->T = T;
    *consumed = 1;
    moe_tensor_free(ci);
    moe_tensor_free(cw);
    moe_tensor_free(ct);
    moe_tensor_free(ids);
    moe_tensor_free(w);
    moe_tensor_free(tok);
    if (st != MOE_OK) {
        moe_trace_free(tr);
        return st;
    }
    *out = tr;
    return MOE_OK;
}

/* Takes ownership of ids, w and tok (kept by the trace or freed), also on failure. */
static moe_status from_tensors(const char *fn, const char *path, moe_tensor *ids,
                               moe_tensor *w, moe_tensor *tok, int64_t E, moe_trace **out) {
    int consumed = 0;
    moe_status st = from_tensors_impl(fn, path, ids, w, tok, E, out, &consumed);
    if (!consumed) {
        moe_tensor_free(ids);
        moe_tensor_free(w);
        moe_tensor_free(tok);
    }
    return st;
}

static moe_status load_st(const char *path, moe_trace **out) {
    static const char *fn = "moe_trace_load";
    moe_st_file *f = NULL;
    MOE_TRY(moe_st_open(path, &f));
    moe_tensor *ids = NULL, *w = NULL, *tok = NULL;
    moe_status st = MOE_OK;
    int i = moe_st_find(f, "routed_experts");
    if (i < 0)
        st = moe__err(MOE_ERR_FORMAT, "%s: %s: expected a tensor named routed_experts, found none",
                      fn, path);
    if (st == MOE_OK) st = moe_st_get(f, i, &ids);
    if (st == MOE_OK && (i = moe_st_find(f, "weights")) >= 0) st = moe_st_get(f, i, &w);
    if (st == MOE_OK && (i = moe_st_find(f, "token_ids")) >= 0) st = moe_st_get(f, i, &tok);
    int64_t E = 0;
    for (int m = 0; m < moe_st_meta_count(f); m++)
        if (!strcmp(moe_st_meta_key(f, m), "num_experts"))
            E = parse_i64(moe_st_meta_value(f, m), 0);
    moe_trace *tr = NULL;
    if (st == MOE_OK) {
        /* from_tensors takes the tensors (keeps or frees them) */
        st = from_tensors(fn, path, ids, w, tok, E, &tr);
        ids = w = tok = NULL;
    }
    if (st == MOE_OK) {
        for (int m = 0; m < moe_st_meta_count(f) && st == MOE_OK; m++) {
            const char *k = moe_st_meta_key(f, m);
            if (!structural_key(k)) st = moe_trace_set_meta(tr, k, moe_st_meta_value(f, m));
        }
    }
    moe_st_close(f);
    if (st != MOE_OK) {
        moe_tensor_free(ids);
        moe_tensor_free(w);
        moe_tensor_free(tok);
        moe_trace_free(tr);
        return st;
    }
    *out = tr;
    return MOE_OK;
}

static moe_status load_npy(const char *path, moe_trace **out) {
    moe_tensor *t = NULL;
    MOE_TRY(moe_npy_read(path, &t));
    moe_trace *tr = NULL;
    moe_status st = from_tensors("moe_trace_load", path, t, NULL, NULL, 0, &tr);
    if (st == MOE_OK) *out = tr;
    return st;
}

typedef struct chunk_name {
    char *name;
    long chunk, part; /* part -1 for a completed chunk */
} chunk_name;

static int chunk_cmp(const void *x, const void *y) {
    const chunk_name *a = x, *b = y;
    if (a->chunk != b->chunk) return a->chunk < b->chunk ? -1 : 1;
    if (a->part != b->part) return a->part < b->part ? -1 : 1;
    return 0;
}

/* "chunk-000001.safetensors" -> chunk 1, part -1; "chunk-000001.part-000002.safetensors"
 * -> chunk 1, part 2.  0 when the name is neither. */
static int parse_chunk_name(const char *s, long *chunk, long *part) {
    if (strncmp(s, "chunk-", 6) != 0) return 0;
    char *end = NULL;
    long c = strtol(s + 6, &end, 10);
    if (end == s + 6 || c < 0) return 0;
    if (!strcmp(end, ".safetensors")) {
        *chunk = c;
        *part = -1;
        return 1;
    }
    if (strncmp(end, ".part-", 6) != 0) return 0;
    const char *p = end + 6;
    long q = strtol(p, &end, 10);
    if (end == p || q < 0 || strcmp(end, ".safetensors") != 0) return 0;
    *chunk = c;
    *part = q;
    return 1;
}

static moe_status load_dir(const char *path, moe_trace **out) {
    static const char *fn = "moe_trace_load";
    DIR *d = opendir(path);
    if (!d) return moe__err(MOE_ERR_IO, "%s: %s: cannot open directory: %s", fn, path, strerror(errno));
    chunk_name *names = NULL;
    size_t n = 0, cap = 0;
    moe_status st = MOE_OK;
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        long c, p;
        if (!parse_chunk_name(de->d_name, &c, &p)) continue;
        if (n == cap) {
            cap = cap ? cap * 2 : 64;
            chunk_name *nn = realloc(names, cap * sizeof *names);
            if (!nn) { st = moe__err(MOE_ERR_NOMEM, "%s: out of host memory", fn); break; }
            names = nn;
        }
        names[n].name = dupstr(de->d_name);
        names[n].chunk = c;
        names[n].part = p;
        if (!names[n].name) { st = moe__err(MOE_ERR_NOMEM, "%s: out of host memory", fn); break; }
        n++;
    }
    closedir(d);
    if (st == MOE_OK && n == 0)
        st = moe__err(MOE_ERR_IO, "%s: %s: expected chunk-NNNNNN.safetensors files in the directory, found none",
                      fn, path);
    if (st == MOE_OK) qsort(names, n, sizeof *names, chunk_cmp);
    moe_trace *acc = NULL;
    size_t plen = strlen(path);
    for (size_t i = 0; i < n && st == MOE_OK; i++) {
        /* a part of a chunk that was completed is already in the chunk file */
        if (names[i].part >= 0) {
            int done = 0;
            for (size_t j = 0; j < n; j++)
                if (names[j].chunk == names[i].chunk && names[j].part < 0) done = 1;
            if (done) continue;
        }
        char *full = malloc(plen + strlen(names[i].name) + 2);
        if (!full) { st = moe__err(MOE_ERR_NOMEM, "%s: out of host memory", fn); break; }
        sprintf(full, "%s/%s", path, names[i].name);
        moe_trace *one = NULL;
        st = load_st(full, &one);
        free(full);
        if (st != MOE_OK) break;
        if (!acc) {
            acc = one;
            continue;
        }
        if (one->with_weights != acc->with_weights)
            st = moe__err(MOE_ERR_FORMAT, "%s: %s/%s: expected weights %s as the first chunk", fn,
                          path, names[i].name, acc->with_weights ? "present" : "absent");
        if (st == MOE_OK && acc->E == 0 && one->E > 0) acc->E = one->E;
        if (st == MOE_OK) st = moe_trace_append_trace(acc, one, 0, one->T);
        moe_trace_free(one);
    }
    for (size_t i = 0; i < n; i++) free(names[i].name);
    free(names);
    if (st != MOE_OK) {
        moe_trace_free(acc);
        return st;
    }
    *out = acc;
    return MOE_OK;
}

moe_status moe_trace_load(const char *path, moe_trace **out) {
    static const char *fn = "moe_trace_load";
    if (!out) return moe__err(MOE_ERR_ARG, "%s: out: expected a pointer, got NULL", fn);
    *out = NULL;
    if (!path || !*path)
        return moe__err(MOE_ERR_ARG, "%s: path: expected a file name, got %s", fn, path ? "\"\"" : "NULL");
    struct stat sb;
    if (stat(path, &sb) != 0)
        return moe__err(MOE_ERR_IO, "%s: %s: %s", fn, path, strerror(errno));
    if (S_ISDIR(sb.st_mode)) return load_dir(path, out);
    FILE *f = fopen(path, "rb");
    if (!f) return moe__err(MOE_ERR_IO, "%s: %s: %s", fn, path, strerror(errno));
    unsigned char magic[6] = {0};
    size_t got = fread(magic, 1, 6, f);
    fclose(f);
    if (got == 6 && magic[0] == 0x93 && !memcmp(magic + 1, "NUMPY", 5)) return load_npy(path, out);
    return load_st(path, out);
}
