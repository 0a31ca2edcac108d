/* fused_cpu.c -- the fused MoE reference (CPU backend slots `fused_pack` and `fused`).
 *
 * Per (token, k) pair whose expert is local, in this order and precision:
 *   a   = x[t] as f32 (bf16 values); llama4: a = x[t] * w[t,k] in f32 (not re-rounded)
 *   h   = a . W13[e]^T + b13[e]          f32 dot products (fixed 8-lane partial sums)
 *   g   = act(h) rounded to bf16         (the intermediate the GPU pipeline stores in bf16)
 *   y   = g . W2[e]^T + b2[e]            f32
 *   out[t] = bf16( sum_k c[t,k] * y[t,k] ) over local k in order, f32 accumulation, with
 *            c = w (llama4: c = 1)
 * Pairs are grouped by expert (counting sort, stable) so that each expert's weights are
 * streamed once per call; everything is deterministic (no threads). */
#include "../backend.h"
#include "../fp.h"
#include "../fused.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define FN "moe_fused_moe"

static float fc_bf16r(float v) { return moe__bf16_to_f32(moe__f32_to_bf16(v)); }

/* Copy n elements of a contiguous f32/bf16 tensor into f32, optionally rounding to bf16. */
static void fc_load(float *dst, const moe_tensor *src, int64_t n, int round) {
    const void *base = moe_tensor_data(src);
    for (int64_t i = 0; i < n; i++) {
        float v = src->dtype == MOE_BF16 ? moe__bf16_to_f32(((const uint16_t *)base)[i]) : ((const float *)base)[i];
        dst[i] = round ? fc_bf16r(v) : v;
    }
}

static moe_status fc_new_f32(moe_tensor **out, int ndim, const int64_t *shape) {
    moe_device cpu = {MOE_DEVICE_CPU, 0};
    return moe_tensor_new(out, MOE_F32, ndim, shape, cpu);
}

moe_status moe__cpu_fused_pack(struct moe_experts *ex, const moe_tensor *w13, const moe_tensor *w2,
                               const moe_tensor *b13, const moe_tensor *b2) {
    int64_t s13[3] = {ex->E, ex->N1, ex->H}, s2[3] = {ex->E, ex->H, ex->I};
    int64_t sb13[2] = {ex->E, ex->N1}, sb2[2] = {ex->E, ex->H};
    MOE_TRY(fc_new_f32(&ex->w13, 3, s13));
    MOE_TRY(fc_new_f32(&ex->w2, 3, s2));
    fc_load((float *)moe_tensor_data(ex->w13), w13, moe_tensor_numel(ex->w13), 1);
    fc_load((float *)moe_tensor_data(ex->w2), w2, moe_tensor_numel(ex->w2), 1);
    if (b13) {
        MOE_TRY(fc_new_f32(&ex->b13, 2, sb13));
        fc_load((float *)moe_tensor_data(ex->b13), b13, moe_tensor_numel(ex->b13), 0);
    }
    if (b2) {
        MOE_TRY(fc_new_f32(&ex->b2, 2, sb2));
        fc_load((float *)moe_tensor_data(ex->b2), b2, moe_tensor_numel(ex->b2), 0);
    }
    return MOE_OK;
}

/* Dot product in a fixed order: 8 interleaved partial sums, combined pairwise, then the
 * tail.  No FMA contraction (the library is built with -ffp-contract=off). */
float moe__cpu_fdot(const float *a, const float *b, int64_t n) {
    float p[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) p[j] += a[i + j] * b[i + j];
    float s = ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]));
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

float moe__cpu_fact(const struct moe_experts *ex, float g, float u) {
    switch (ex->act) {
    case MOE_ACT_SWIGLU: return g / (1.0f + expf(-g)) * u;
    case MOE_ACT_GEGLU: return 0.5f * g * (1.0f + erff(g * 0.70710678118654752f)) * u;
    case MOE_ACT_RELU2: {
        float r = g > 0.0f ? g : 0.0f;
        return r * r;
    }
    default: { /* swiglu_oai */
        float L = ex->limit;
        float gg = g < L ? g : L;
        float uu = u < -L ? -L : (u > L ? L : u);
        return gg / (1.0f + expf(-ex->alpha * gg)) * (uu + ex->beta);
    }
    }
}

void moe__cpu_fcombine(int64_t T, int64_t H, int K, const unsigned char *has, const float *ypair, uint16_t *out) {
    /* f32 over k in order, one rounding */
    for (int64_t t = 0; t < T; t++)
        for (int64_t h = 0; h < H; h++) {
            float acc = 0.0f;
            for (int k = 0; k < K; k++) {
                int64_t p = t * K + k;
                if (has[p]) acc += ypair[p * H + h];
            }
            out[t * H + h] = moe__f32_to_bf16(acc);
        }
}

moe_status moe__cpu_fused(const moe__fused_args *A) {
    const struct moe_experts *ex = A->ex;
    const int64_t T = A->T, H = ex->H, I = ex->I, N1 = ex->N1;
    const int K = A->K;
    const int64_t P = T * K;
    const int lo = A->local_offset, lc = A->local_count;
    const int gated = ex->act != MOE_ACT_RELU2;
    const int32_t *ids = (const int32_t *)moe_tensor_data(A->ids);
    const float *wts = (const float *)moe_tensor_data(A->wts);
    const uint16_t *x = (const uint16_t *)moe_tensor_data(A->hidden);
    const float *W13 = (const float *)moe_tensor_data(ex->w13);
    const float *W2 = (const float *)moe_tensor_data(ex->w2);
    const float *B13 = ex->b13 ? (const float *)moe_tensor_data(ex->b13) : NULL;
    const float *B2 = ex->b2 ? (const float *)moe_tensor_data(ex->b2) : NULL;
    uint16_t *out = (uint16_t *)moe_tensor_data(A->out);

    /* group local pairs by expert (stable counting sort) */
    int64_t *start = (int64_t *)calloc((size_t)lc + 1, sizeof *start);
    int64_t *order = (int64_t *)malloc((size_t)(P > 0 ? P : 1) * sizeof *order);
    float *ypair = (float *)malloc((size_t)(P > 0 ? P : 1) * (size_t)H * sizeof *ypair);
    unsigned char *has = (unsigned char *)calloc((size_t)(P > 0 ? P : 1), 1);
    int64_t maxrows = 0;
    if (!start || !order || !ypair || !has) {
        free(start), free(order), free(ypair), free(has);
        return moe__err(MOE_ERR_NOMEM, FN ": out of host memory for %lld pairs", (long long)P);
    }
    for (int64_t p = 0; p < P; p++) {
        int64_t le = (int64_t)ids[p] - lo;
        if (ids[p] >= 0 && le >= 0 && le < lc) start[le + 1]++;
    }
    for (int e = 0; e < lc; e++) {
        if (start[e + 1] > maxrows) maxrows = start[e + 1];
        start[e + 1] += start[e];
    }
    {
        int64_t *cur = (int64_t *)malloc(((size_t)lc + 1) * sizeof *cur);
        if (!cur) {
            free(start), free(order), free(ypair), free(has);
            return moe__err(MOE_ERR_NOMEM, FN ": out of host memory");
        }
        memcpy(cur, start, ((size_t)lc + 1) * sizeof *cur);
        for (int64_t p = 0; p < P; p++) {
            int64_t le = (int64_t)ids[p] - lo;
            if (ids[p] >= 0 && le >= 0 && le < lc) {
                order[cur[le]++] = p;
                has[p] = 1;
            }
        }
        free(cur);
    }
    size_t mr = (size_t)(maxrows > 0 ? maxrows : 1);
    float *X = (float *)malloc(mr * (size_t)H * sizeof(float));
    float *Hb = (float *)malloc(mr * (size_t)N1 * sizeof(float));
    float *G = (float *)malloc(mr * (size_t)I * sizeof(float));
    if (!X || !Hb || !G) {
        free(X), free(Hb), free(G), free(start), free(order), free(ypair), free(has);
        return moe__err(MOE_ERR_NOMEM, FN ": out of host memory for the expert buffers");
    }
    for (int le = 0; le < lc; le++) {
        const int64_t r0 = start[le], nr = start[le + 1] - r0;
        if (nr == 0) continue;
        const int64_t e = lo + le;
        /* gather the rows */
        for (int64_t r = 0; r < nr; r++) {
            int64_t p = order[r0 + r], t = p / K;
            float sc = A->llama4 ? wts[p] : 1.0f;
            for (int64_t h = 0; h < H; h++) {
                float v = moe__bf16_to_f32(x[t * H + h]);
                X[r * H + h] = A->llama4 ? v * sc : v;
            }
        }
        /* GEMM1 (weight row outer: each row of W13 read once per expert) */
        const float *w13 = W13 + e * N1 * H;
        for (int64_t n = 0; n < N1; n++) {
            float bn = B13 ? B13[e * N1 + n] : 0.0f;
            for (int64_t r = 0; r < nr; r++) Hb[r * N1 + n] = moe__cpu_fdot(X + r * H, w13 + n * H, H) + bn;
        }
        /* activation, intermediate rounded to bf16 */
        for (int64_t r = 0; r < nr; r++)
            for (int64_t i = 0; i < I; i++) {
                float g = Hb[r * N1 + i], u = gated ? Hb[r * N1 + I + i] : 0.0f;
                G[r * I + i] = fc_bf16r(moe__cpu_fact(ex, g, u));
            }
        /* GEMM2 + combine weight */
        const float *w2 = W2 + e * H * I;
        for (int64_t h = 0; h < H; h++) {
            float bh = B2 ? B2[e * H + h] : 0.0f;
            for (int64_t r = 0; r < nr; r++) {
                int64_t p = order[r0 + r];
                float y = moe__cpu_fdot(G + r * I, w2 + h * I, I) + bh;
                ypair[p * H + h] = A->llama4 ? y : wts[p] * y;
            }
        }
    }
    moe__cpu_fcombine(T, H, K, has, ypair, out);
    free(X), free(Hb), free(G), free(start), free(order), free(ypair), free(has);
    return MOE_OK;
}
