/* test_fused_quant.c -- C API of quantised experts on the CPU: moe_experts_new_quant's
 * argument rules (tensor or qtensor per matrix, not both, not neither; the qtensor's mode and
 * shape; block divisibility), bf16 delegation, moe_experts_quant, a quantised fused call whose
 * output differs from bf16's and equals the same call with qtensor parts, and no leaks; the
 * range rule of mxint4's f16 fold (moe__i4_fold_of) at its edges, with hand-derived values. */
#include "moe.h"
#include "fused_quant.h"

#include <stdio.h>
#include <string.h>
#include "check.h"

static const moe_device CPU = {MOE_DEVICE_CPU, 0};

static moe_tensor *randn(int dtype, int ndim, const int64_t *shape, uint64_t seed, double std) {
    moe_tensor *t = NULL;
    if (moe_tensor_new(&t, dtype, ndim, shape, CPU) != MOE_OK) return NULL;
    if (moe_tensor_rand_normal(t, seed, 0.0, std) != MOE_OK) {
        moe_tensor_free(t);
        return NULL;
    }
    return t;
}

/* bf16 output of one routed call with ids [t % E, (t + 1) % E] and weights 0.75 / 0.25. */
static moe_tensor *run(const moe_experts *ex, const moe_tensor *x, int64_t T, int64_t E) {
    int64_t s[2] = {T, 2};
    moe_tensor *ids = NULL, *w = NULL, *y = NULL;
    moe_tensor_new(&ids, MOE_I32, 2, s, CPU);
    moe_tensor_new(&w, MOE_F32, 2, s, CPU);
    int32_t *ip = (int32_t *)moe_tensor_data(ids);
    float *wp = (float *)moe_tensor_data(w);
    for (int64_t t = 0; t < T; t++) {
        ip[2 * t] = (int32_t)(t % E);
        ip[2 * t + 1] = (int32_t)((t + 1) % E);
        wp[2 * t] = 0.75f;
        wp[2 * t + 1] = 0.25f;
    }
    moe_fused_cfg fc = moe_fused_cfg_default();
    if (moe_fused_moe(&fc, ex, x, NULL, NULL, ids, w, NULL, &y, NULL, NULL, NULL) != MOE_OK) {
        fprintf(stderr, "moe_fused_moe: %s\n", moe_last_error());
        y = NULL;
    }
    moe_tensor_free(ids);
    moe_tensor_free(w);
    return y;
}

static int same_bytes(const moe_tensor *a, const moe_tensor *b) {
    return a && b && moe_tensor_nbytes(a) == moe_tensor_nbytes(b) &&
           memcmp(moe_tensor_data(a), moe_tensor_data(b), moe_tensor_nbytes(a)) == 0;
}

/* r = {largest binade, lowest set bit, inf / NaN}: b = 12 - r[0]; allowed while r[1] + b >= -24
 * and -126 <= b <= 126. */
static void test_i4_fold(void) {
    int ok[3] = {0, -36, 0}; /* b 12: the lowest bit lands on 2^-24 exactly */
    CHECK(moe__i4_fold_of(ok) == 4096.0f);
    int low[3] = {0, -37, 0}; /* one bit below f16's subnormal step */
    CHECK(moe__i4_fold_of(low) == 0.0f);
    int typ[3] = {-6, -14, 0}; /* scales around 2^-6 with 8-bit significands: b 18 */
    CHECK(moe__i4_fold_of(typ) == 262144.0f);
    int zero[3] = {INT_MIN, INT_MAX, 0}; /* every scale zero */
    CHECK(moe__i4_fold_of(zero) == 1.0f);
    int bad[3] = {0, 0, 1}; /* an inf / NaN scale */
    CHECK(moe__i4_fold_of(bad) == 0.0f);
    int tiny[3] = {-114, -120, 0}; /* b 126, the largest f32 power of two the epilogue inverts */
    CHECK(moe__i4_fold_of(tiny) == 0x1p126f);
    int tinier[3] = {-115, -120, 0}; /* b 127: out of range */
    CHECK(moe__i4_fold_of(tinier) == 0.0f);
    int huge[3] = {127, 120, 0}; /* b -115 */
    CHECK(moe__i4_fold_of(huge) == 0x1p-115f);
}

int main(void) {
    test_i4_fold();
    moe_mem_info m0, m1;
    CHECK(moe_mem_stats(&m0) == MOE_OK);
    const int64_t E = 3, H = 128, I = 128, T = 4;
    int64_t s13[3] = {E, 2 * I, H}, s2[3] = {E, H, I}, sx[2] = {T, H}, sbad[3] = {E, H, 96};
    moe_tensor *w13 = randn(MOE_F32, 3, s13, 1, 0.1), *w2 = randn(MOE_F32, 3, s2, 2, 0.1);
    moe_tensor *x = randn(MOE_BF16, 2, sx, 3, 1.0), *w2bad = randn(MOE_F32, 3, sbad, 4, 0.1);
    moe_experts_cfg cfg = moe_experts_cfg_default();
    moe_experts *ex = NULL;

    /* activation parameters: one shared check, named after the entry point called */
    moe_experts_cfg badc = cfg;
    badc.activation = 9;
    CHECK_ERR(moe_experts_new(&ex, &badc, w13, w2, NULL, NULL, CPU), MOE_ERR_ARG,
              "moe_experts_new: activation: expected 0..3 (a moe_activation), got 9");
    CHECK_ERR(moe_experts_new_quant(&ex, &badc, MOE_QUANT_NVFP4, w13, w2, NULL, NULL, NULL, NULL, CPU), MOE_ERR_ARG,
              "moe_experts_new_quant: activation: expected 0..3 (a moe_activation), got 9");
    badc = cfg;
    badc.limit = 0.0f;
    CHECK_ERR(moe_experts_new(&ex, &badc, w13, w2, NULL, NULL, CPU), MOE_ERR_ARG,
              "moe_experts_new: alpha/beta/limit: expected finite numbers with limit > 0, got 1.702/1/0");
    CHECK_ERR(moe_experts_new_quant(&ex, &badc, MOE_QUANT_FP8, w13, w2, NULL, NULL, NULL, NULL, CPU), MOE_ERR_ARG,
              "moe_experts_new_quant: alpha/beta/limit: expected finite numbers with limit > 0");
    CHECK(ex == NULL);

    /* argument rules */
    moe_qtensor *q13 = NULL, *q2 = NULL, *q2fp8 = NULL;
    CHECK(moe_quantize(w13, MOE_QUANT_NVFP4, NULL, &q13) == MOE_OK);
    CHECK(moe_quantize(w2, MOE_QUANT_NVFP4, NULL, &q2) == MOE_OK);
    CHECK(moe_quantize(w2, MOE_QUANT_FP8, NULL, &q2fp8) == MOE_OK);
    CHECK_ERR(moe_experts_new_quant(&ex, &cfg, MOE_QUANT_NVFP4, w13, w2, q13, NULL, NULL, NULL, CPU), MOE_ERR_ARG,
              "gate_up: expected an f32/bf16 tensor or a qtensor, got both");
    CHECK_ERR(moe_experts_new_quant(&ex, &cfg, MOE_QUANT_NVFP4, w13, NULL, NULL, NULL, NULL, NULL, CPU), MOE_ERR_ARG,
              "down: expected an f32/bf16 tensor or a nvfp4 qtensor, got neither");
    CHECK_ERR(moe_experts_new_quant(&ex, &cfg, MOE_QUANT_NVFP4, w13, NULL, NULL, q2fp8, NULL, NULL, CPU), MOE_ERR_ARG,
              "down: expected a qtensor of mode nvfp4, got mode fp8");
    CHECK_ERR(moe_experts_new_quant(&ex, &cfg, 17, w13, w2, NULL, NULL, NULL, NULL, CPU), MOE_ERR_ARG,
              "mode: expected a moe_quant_mode");
    CHECK_ERR(moe_experts_new_quant(&ex, &cfg, MOE_QUANT_MXINT4, w13, w2bad, NULL, NULL, NULL, NULL, CPU),
              MOE_ERR_SHAPE, "gate_up: expected shape [3, 192, 128]");
    CHECK(ex == NULL);

    /* bf16 is moe_experts_new */
    CHECK(moe_experts_new_quant(&ex, &cfg, MOE_QUANT_BF16, w13, w2, NULL, NULL, NULL, NULL, CPU) == MOE_OK);
    CHECK(moe_experts_quant(ex) == MOE_QUANT_BF16);
    moe_tensor *yb = run(ex, x, T, E);
    moe_experts_free(ex);
    ex = NULL;

    /* nvfp4 from weights, and from the same qtensors */
    CHECK(moe_experts_new_quant(&ex, &cfg, MOE_QUANT_NVFP4, w13, w2, NULL, NULL, NULL, NULL, CPU) == MOE_OK);
    CHECK(moe_experts_quant(ex) == MOE_QUANT_NVFP4);
    CHECK(moe_experts_nbytes(ex) > 0);
    moe_tensor *yq = run(ex, x, T, E);
    moe_experts_free(ex);
    ex = NULL;
    CHECK(moe_experts_new_quant(&ex, &cfg, MOE_QUANT_NVFP4, NULL, NULL, q13, q2, NULL, NULL, CPU) == MOE_OK);
    moe_qtensor_free(q13); /* the experts hold their own references */
    moe_qtensor_free(q2);
    moe_tensor *yp = run(ex, x, T, E);
    moe_experts_free(ex);
    CHECK(yb && yq && yp);
    CHECK(same_bytes(yq, yp));
    CHECK(!same_bytes(yq, yb)); /* the mode's numerics differ from bf16 */

    moe_qtensor_free(q2fp8);
    moe_tensor_free(yb);
    moe_tensor_free(yq);
    moe_tensor_free(yp);
    moe_tensor_free(w13);
    moe_tensor_free(w2);
    moe_tensor_free(x);
    moe_tensor_free(w2bad);
    CHECK(moe_mem_stats(&m1) == MOE_OK);
    CHECK(m1.live_tensors == m0.live_tensors && m1.host_bytes == m0.host_bytes);
    printf("test_fused_quant: %d checks, %d failures\n", checks, failures);
    return failures ? 1 : 0;
}
