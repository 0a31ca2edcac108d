/* route_cpu.c -- the routing reference (CPU backend slot `route`).
 *
 * Exactly docs/routing.md (and ../shared/docs/reference.md §1-2):
 *   - all score arithmetic in float32 through route_math.h, so the CUDA kernels reproduce it
 *     bit for bit; the softmax denominator over all E is accumulated in double and rounded
 *     once, which makes it independent of the summation order;
 *   - selection keys are sanitised (NaN -> -inf, -0 -> +0); the K ids come out in descending
 *     key, ties to the lower expert index;
 *   - default / renormalize_naive / sigmoid_renorm select on the logit (monotone in the
 *     probability, and free of rounding ties); deepseekv3 / minimax2 select on s + b.
 * Deterministic: a plain loop over tokens, no threads, no unordered reductions.
 */
#include "../backend.h"
#include "../route_math.h"

#include <stdlib.h>
#include <string.h>

static float rc_load(const void *base, int dtype, int64_t i) {
    switch (dtype) {
    case MOE_F32: return ((const float *)base)[i];
    case MOE_BF16: return moe__bf16_to_f32(((const uint16_t *)base)[i]);
    default: return moe__f16_to_f32(((const uint16_t *)base)[i]); /* f16 */
    }
}

/* 1 when (ka, ia) ranks before (kb, ib): larger key, ties to the lower index. */
static int rc_before(uint32_t ka, int ia, uint32_t kb, int ib) {
    return ka > kb || (ka == kb && ia < ib);
}

typedef struct rc_work {
    float *x;        /* sanitised logits [E] */
    uint32_t *key;   /* selection keys [E]; 0 = not selectable */
    float *bias;     /* [E] or NULL */
    uint32_t *gkey;  /* group keys [n_group] */
    unsigned char *gkeep;
} rc_work;

static void rc_route_row(const moe_route_cfg *cfg, const rc_work *w, const void *lbase, int ldt,
                         int64_t row, int E, int K, int32_t *ids, float *wout) {
    const int method = cfg->method;
    for (int e = 0; e < E; e++) w->x[e] = moe__route_sanitize(rc_load(lbase, ldt, row * E + e));
    for (int e = 0; e < E; e++) {
        float k = w->x[e];
        if (moe__route_uses_bias(method)) {
            float s = moe__route_sigmoid(w->x[e]);
            k = moe__route_sanitize(MOE_RADD(s, w->bias ? w->bias[e] : 0.0f));
        }
        w->key[e] = moe__route_key(k);
    }
    /* deepseekv3 groups: score = sum of the group's two largest keys; keep topk_group */
    if (method == MOE_ROUTE_DEEPSEEKV3 && cfg->n_group > 1) {
        const int ng = cfg->n_group, G = E / ng;
        for (int g = 0; g < ng; g++) {
            uint32_t t1 = 0, t2 = 0;
            for (int e = g * G; e < (g + 1) * G; e++) {
                uint32_t k = w->key[e];
                if (k > t1) { t2 = t1; t1 = k; }
                else if (k > t2) t2 = k;
            }
            float gs = moe__route_unkey(t1);
            if (G > 1) gs = moe__route_sanitize(MOE_RADD(gs, moe__route_unkey(t2)));
            w->gkey[g] = moe__route_key(gs);
            w->gkeep[g] = 0;
        }
        for (int r = 0; r < cfg->topk_group; r++) {
            int best = -1;
            for (int g = 0; g < ng; g++)
                if (!w->gkeep[g] && (best < 0 || rc_before(w->gkey[g], g, w->gkey[best], best))) best = g;
            w->gkeep[best] = 1;
        }
        for (int e = 0; e < E; e++)
            if (!w->gkeep[e / G]) w->key[e] = 0;
    }
    /* top-K: K passes of "largest key, lowest index"; 0 marks taken / excluded (every real
     * key is > 0: the smallest, -inf, maps to 0x007FFFFF) */
    for (int k = 0; k < K; k++) {
        int best = -1;
        for (int e = 0; e < E; e++)
            if (w->key[e] != 0 && (best < 0 || rc_before(w->key[e], e, w->key[best], best))) best = e;
        ids[k] = best; /* best >= 0: the core checked K <= selectable experts */
        w->key[best] = 0;
    }
    /* weights */
    float m = 0.0f, S = 1.0f;
    if (moe__route_needs_softmax(method)) {
        m = w->x[0];
        for (int e = 1; e < E; e++)
            if (w->x[e] > m) m = w->x[e];
        double acc = 0.0;
        for (int e = 0; e < E; e++) acc += (double)moe__route_expf(MOE_RSUB(w->x[e], m));
        S = (float)acc;
    }
    const float x0 = w->x[ids[0]];
    for (int k = 0; k < K; k++) wout[k] = moe__route_wsrc(method, w->x[ids[k]], m, S, x0);
    const float sum = moe__route_ksum(wout, K);
    for (int k = 0; k < K; k++)
        wout[k] = moe__route_weight(method, wout[k], sum, cfg->scale, cfg->normalize);
}

moe_status moe__cpu_route(const moe_route_cfg *cfg, const moe_tensor *logits, const moe_tensor *bias,
                          moe_tensor *ids, moe_tensor *weights, moe_tensor *replay) {
    const int64_t T = logits->shape[0];
    const int E = (int)logits->shape[1], K = cfg->top_k;
    if (T == 0) return MOE_OK;
    const int ng = cfg->n_group > 1 ? cfg->n_group : 1;
    size_t bytes = (size_t)E * (sizeof(float) * 2 + sizeof(uint32_t)) + (size_t)ng * 8 + (size_t)K * 4 + 64;
    unsigned char *mem = (unsigned char *)malloc(bytes);
    if (!mem) return moe__err(MOE_ERR_NOMEM, "moe_route: cpu: out of host memory for %zu bytes of scratch", bytes);
    rc_work w;
    w.x = (float *)mem;
    w.key = (uint32_t *)(w.x + E);
    float *bias_f = (float *)(w.key + E);
    w.gkey = (uint32_t *)(bias_f + E);
    w.gkeep = (unsigned char *)(w.gkey + ng);
    float *wrow = (float *)(((uintptr_t)(w.gkeep + ng) + 3) & ~(uintptr_t)3);
    w.bias = NULL;
    if (bias) {
        const void *bb = moe_tensor_data(bias);
        for (int e = 0; e < E; e++) bias_f[e] = rc_load(bb, bias->dtype, e);
        w.bias = bias_f;
    }
    const void *lbase = moe_tensor_data(logits);
    int32_t *idp = (int32_t *)moe_tensor_data(ids);
    void *wp = moe_tensor_data(weights);
    int16_t *rp = replay ? (int16_t *)moe_tensor_data(replay) : NULL;
    for (int64_t t = 0; t < T; t++) {
        int32_t *irow = idp + t * K;
        rc_route_row(cfg, &w, lbase, logits->dtype, t, E, K, irow, wrow);
        for (int k = 0; k < K; k++) {
            if (weights->dtype == MOE_BF16) ((uint16_t *)wp)[t * K + k] = moe__f32_to_bf16(wrow[k]);
            else ((float *)wp)[t * K + k] = wrow[k];
            if (rp) rp[t * K + k] = (int16_t)irow[k];
        }
    }
    free(mem);
    return MOE_OK;
}
