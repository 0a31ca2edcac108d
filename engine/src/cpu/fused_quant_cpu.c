/* fused_quant_cpu.c -- the fused MoE reference in the quantisation modes (fp8, fp8_block,
 * nvfp4, mxfp4, mxint4), exactly each mode's numerics in f32.  docs/quantization.md, "Fused
 * MoE per mode", states them; in short, per call:
 *
 *   x'  = the GEMM1 input: fp8      dequant(quant_fp8(x))        one scale over all T x H
 *                          fp8_block dequant(quant(x)) per (token, 128 columns)
 *                          nvfp4    dequant(quant_nvfp4(x))      global over T x H, e4m3 per 16
 *                          mxfp4, mxint4: x itself (bf16, W4A16)
 *   per local pair (t, k) -> expert e, in expert-sorted order (stable):
 *   h   = (x'[t] . W13'[e]^T) * c1 + b13[e]   W' = the dequantised weights; c1 = w[t,k] for
 *                                            llama4 (the weight on the input, applied to the
 *                                            GEMM1 output, which is linear in it), else 1
 *   g   = bf16(act(h))                       (as in bf16 mode)
 *   G'  = the GEMM2 input: the rows g of all local pairs, [P_local, I], quantised like x
 *         (fp8: one scale over all local rows; fp8_block per (pair, 128); nvfp4 global over
 *         all local rows, e4m3 per 16) and dequantised; mxfp4/mxint4: g itself
 *   y   = G'[p] . W2'[e]^T + b2[e]
 *   out[t] = bf16( sum_k c2 * y[t,k] ), f32 over local k in order, c2 = w (llama4: 1).
 * Quantise/dequantise are moe_quantize / moe_dequantize (quant_math.h numerics).  Dot products
 * use fixed 8-lane partial sums; no threads: deterministic. */
#include "../backend.h"
#include "../fp.h"
#include "../fused_quant.h"
#include "../quant_math.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define FN "moe_fused_moe"

/* Activations quantised per mode: in is [rows, cols] (f32 or bf16 values), the result
 * dequantised into dst f32 [rows, cols].  W4A16 modes copy the values. */
static moe_status fq_act_quant(int mode, const moe_tensor *in, float *dst) {
    int64_t n = moe_tensor_numel(in);
    if (n == 0) return MOE_OK;
    if (mode == MOE_QUANT_MXFP4 || mode == MOE_QUANT_MXINT4) {
        for (int64_t i = 0; i < n; i++) dst[i] = moe__load_f32(in->st->data, in->dtype, in->offset + i);
        return MOE_OK;
    }
    moe_quant_opts o = moe_quant_opts_default();
    o.block_rows = mode == MOE_QUANT_FP8_BLOCK ? 1 : 0;
    moe_qtensor *q = NULL;
    moe_tensor *d = NULL;
    MOE_TRY(moe_quantize(in, mode, &o, &q));
    moe_status s = moe_dequantize(q, MOE_F32, &d);
    if (s == MOE_OK) memcpy(dst, moe_tensor_data(d), (size_t)n * sizeof(float));
    moe_tensor_free(d);
    moe_qtensor_free(q);
    return s;
}

moe_status moe__cpu_fused_quant(const moe__fused_args *A) {
    const struct moe_experts *ex = A->ex;
    const int64_t T = A->T, H = ex->H, I = ex->I, N1 = ex->N1;
    const int K = A->K;
    const int64_t P = T * K;
    const int lo = A->local_offset, lc = A->local_count;
    const int gated = ex->act != MOE_ACT_RELU2;
    const int32_t *ids = (const int32_t *)moe_tensor_data(A->ids);
    const float *wts = (const float *)moe_tensor_data(A->wts);
    const float *W13 = (const float *)moe_tensor_data(ex->w13);
    const float *W2 = (const float *)moe_tensor_data(ex->w2);
    const float *B13 = ex->b13 ? (const float *)moe_tensor_data(ex->b13) : NULL;
    const float *B2 = ex->b2 ? (const float *)moe_tensor_data(ex->b2) : NULL;
    uint16_t *out = (uint16_t *)moe_tensor_data(A->out);
    const moe_device cpu = {MOE_DEVICE_CPU, 0};

    /* local pairs grouped by expert (stable counting sort) */
    int64_t *start = (int64_t *)calloc((size_t)lc + 2, sizeof *start);
    int64_t *order = (int64_t *)malloc((size_t)(P > 0 ? P : 1) * sizeof *order);
    float *ypair = (float *)malloc((size_t)(P > 0 ? P : 1) * (size_t)H * sizeof *ypair);
    unsigned char *has = (unsigned char *)calloc((size_t)(P > 0 ? P : 1), 1);
    float *X = (float *)malloc((size_t)(T > 0 ? T : 1) * (size_t)H * sizeof(float));
    float *hrow = (float *)malloc((size_t)N1 * sizeof(float));
    moe_tensor *Gt = NULL;
    float *Gq = NULL;
    moe_status s = MOE_OK;
    if (!start || !order || !ypair || !has || !X || !hrow) {
        s = moe__err(MOE_ERR_NOMEM, FN ": out of host memory for %lld pairs", (long long)P);
        goto done;
    }
    for (int64_t p = 0; p < P; p++) {
        int64_t le = (int64_t)ids[p] - lo;
        if (ids[p] >= 0 && le >= 0 && le < lc) start[le + 1]++;
    }
    for (int e = 0; e < lc; e++) start[e + 1] += start[e];
    const int64_t PL = start[lc];
    {
        int64_t *cur = (int64_t *)malloc(((size_t)lc + 1) * sizeof *cur);
        if (!cur) {
            s = moe__err(MOE_ERR_NOMEM, FN ": out of host memory");
            goto done;
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

    /* GEMM1 input */
    s = fq_act_quant(ex->quant, A->hidden, X);
    if (s != MOE_OK) goto done;

    /* GEMM1 + activation: bf16 intermediate rows of the local pairs in sorted order */
    {
        int64_t gs[2] = {PL, I};
        s = moe_tensor_new(&Gt, MOE_F32, 2, gs, cpu);
        if (s != MOE_OK) goto done;
    }
    float *G = (float *)moe_tensor_data(Gt);
    for (int le = 0; le < lc; le++) {
        const int64_t e = lo + le;
        const float *w13 = W13 + e * N1 * H;
        for (int64_t r = start[le]; r < start[le + 1]; r++) {
            const int64_t p = order[r], t = p / K;
            const float c1 = A->llama4 ? wts[p] : 1.0f;
            for (int64_t n = 0; n < N1; n++) {
                float h = moe__cpu_fdot(X + t * H, w13 + n * H, H);
                if (A->llama4) h *= c1;
                hrow[n] = h + (B13 ? B13[e * N1 + n] : 0.0f);
            }
            for (int64_t i = 0; i < I; i++) {
                float v = moe__cpu_fact(ex, hrow[i], gated ? hrow[I + i] : 0.0f);
                G[r * I + i] = moe__bf16_to_f32(moe__f32_to_bf16(v));
            }
        }
    }

    /* GEMM2 input */
    Gq = (float *)malloc((size_t)(PL > 0 ? PL : 1) * (size_t)I * sizeof(float));
    if (!Gq) {
        s = moe__err(MOE_ERR_NOMEM, FN ": out of host memory for the intermediate");
        goto done;
    }
    s = fq_act_quant(ex->quant, Gt, Gq);
    if (s != MOE_OK) goto done;

    /* GEMM2 + combine weight */
    for (int le = 0; le < lc; le++) {
        const int64_t e = lo + le;
        const float *w2 = W2 + e * H * I;
        for (int64_t r = start[le]; r < start[le + 1]; r++) {
            const int64_t p = order[r];
            for (int64_t h = 0; h < H; h++) {
                float y = moe__cpu_fdot(Gq + r * I, w2 + h * I, I) + (B2 ? B2[e * H + h] : 0.0f);
                ypair[p * H + h] = A->llama4 ? y : wts[p] * y;
            }
        }
    }
    moe__cpu_fcombine(T, H, K, has, ypair, out);
done:
    moe_tensor_free(Gt);
    free(Gq), free(start), free(order), free(ypair), free(has), free(X), free(hrow);
    return s;
}
