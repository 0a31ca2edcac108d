/* ops_cpu.c -- CPU reference of the dense math ops (f32 arithmetic). */
#include "../backend.h"
#include "../fp.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Rows of a 2-D float tensor as f32, converted once (any strides, f32/bf16/f16). */
static float *cpu_rows_f32(const moe_tensor *t) {
    int64_t R = t->shape[0], C = t->shape[1];
    float *p = (float *)malloc((size_t)(R * C > 0 ? R * C : 1) * sizeof(float));
    if (!p) return NULL;
    for (int64_t r = 0; r < R; r++)
        for (int64_t c = 0; c < C; c++)
            p[r * C + c] = moe__load_f32(t->st->data, t->dtype, t->offset + r * t->stride[0] + c * t->stride[1]);
    return p;
}

moe_status moe__cpu_matmul_nt(const moe_tensor *a, const moe_tensor *b, moe_tensor *out) {
    int64_t M = a->shape[0], N = b->shape[0], K = a->shape[1];
    float *A = cpu_rows_f32(a), *B = cpu_rows_f32(b);
    if (!A || !B) {
        free(A);
        free(B);
        return moe__err(MOE_ERR_NOMEM, "moe_matmul_nt: out of host memory for f32 copies");
    }
    void *o = moe_tensor_data(out);
    /* each dot product is a plain sequential f32 sum over K */
    for (int64_t m = 0; m < M; m++) {
        const float *ar = A + m * K;
        for (int64_t n = 0; n < N; n++) {
            const float *br = B + n * K;
            float acc = 0.0f;
            for (int64_t k = 0; k < K; k++) acc += ar[k] * br[k];
            if (out->dtype == MOE_F32) ((float *)o)[m * N + n] = acc;
            else ((uint16_t *)o)[m * N + n] = moe__f32_to_bf16(acc);
        }
    }
    free(A);
    free(B);
    return MOE_OK;
}

moe_status moe__cpu_rmsnorm(const moe_tensor *x, const moe_tensor *w, double eps, moe_tensor *out) {
    int64_t H = x->shape[x->ndim - 1];
    int64_t R = moe_tensor_numel(x) / (H > 0 ? H : 1);
    if (H == 0) return MOE_OK;
    float *row = (float *)malloc((size_t)H * sizeof(float));
    if (!row) return moe__err(MOE_ERR_NOMEM, "moe_rmsnorm: out of host memory");
    const void *xb = x->st->data, *wb = w ? w->st->data : NULL;
    void *ob = out->st->data;
    for (int64_t r = 0; r < R; r++) {
        float ss = 0.0f;
        for (int64_t h = 0; h < H; h++) {
            row[h] = moe__load_f32(xb, x->dtype, x->offset + r * H + h);
            ss += row[h] * row[h];
        }
        float inv = 1.0f / sqrtf(ss / (float)H + (float)eps);
        for (int64_t h = 0; h < H; h++) {
            float v = row[h] * inv;
            if (wb) v *= moe__load_f32(wb, w->dtype, w->offset + h);
            moe__store_f32(ob, out->dtype, out->offset + r * H + h, v);
        }
    }
    free(row);
    return MOE_OK;
}

moe_status moe__cpu_axpby(double alpha, const moe_tensor *x, double beta, moe_tensor *y) {
    int64_t n = moe_tensor_numel(x);
    float a = (float)alpha, b = (float)beta;
    for (int64_t i = 0; i < n; i++) {
        float xv = moe__load_f32(x->st->data, x->dtype, x->offset + i);
        float yv = moe__load_f32(y->st->data, y->dtype, y->offset + i);
        /* beta == 0 overwrites y (BLAS convention: y's old NaN/inf do not leak through) */
        moe__store_f32(y->st->data, y->dtype, y->offset + i, b == 0.0f ? a * xv : a * xv + b * yv);
    }
    return MOE_OK;
}
