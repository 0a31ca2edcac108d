/* test_route.c -- the routing C API on the CPU backend: names, defaults, the argument checks
 * that Lua cannot reach (NULL pointers, out-of-range enums), allocation and ownership of the
 * outputs, and one hand-worked route.  The Lua specs (route_spec.lua) cover the rest. */
#include "moe.h"

#include <math.h>
#include <stdio.h>
#include <string.h>
#include "check.h"

static const moe_device CPU = {MOE_DEVICE_CPU, 0};

int main(void) {
    /* names */
    const char *names[] = {"default", "renormalize", "renormalize_naive", "topk",
                           "sigmoid_renorm", "deepseekv3", "minimax2", "llama4"};
    CHECK(MOE_ROUTE_METHOD_COUNT == 8);
    for (int i = 0; i < 8; i++) {
        CHECK(strcmp(moe_route_method_name(i), names[i]) == 0);
        CHECK(moe_route_method_from_name(names[i]) == i);
    }
    CHECK(strcmp(moe_route_method_name(8), "?") == 0);
    CHECK(strcmp(moe_route_method_name(-1), "?") == 0);
    CHECK(moe_route_method_from_name("Renormalize") == -1);
    CHECK(strstr(moe_last_error(), "got \"Renormalize\"") != NULL);
    CHECK(moe_route_method_from_name(NULL) == -1);
    CHECK(strstr(moe_last_error(), "name: expected a method name, got NULL") != NULL);

    /* defaults */
    moe_route_cfg c = moe_route_cfg_default();
    CHECK(c.method == MOE_ROUTE_RENORMALIZE && c.top_k == 1 && c.n_group == 0 && c.topk_group == 0);
    CHECK(c.scale == 1.0f && c.normalize == 1 && c.weights_dtype == MOE_F32);

    /* logits [2, 4]: rows {1, 3, 2, 0}, {0.5, 0.5, -1, 2} */
    int64_t shape[2] = {2, 4};
    moe_tensor *L = NULL;
    CHECK(moe_tensor_new(&L, MOE_F32, 2, shape, CPU) == MOE_OK);
    const float lv[8] = {1, 3, 2, 0, 0.5f, 0.5f, -1, 2};
    CHECK(moe_tensor_copy_from_host(L, lv, sizeof lv) == MOE_OK);

    moe_tensor *ids = NULL, *w = NULL;
    c.top_k = 2;
    /* checks Lua cannot reach */
    CHECK_ERR(moe_route(NULL, L, NULL, &ids, &w, NULL), MOE_ERR_ARG, "moe_route: cfg: expected a moe_route_cfg, got NULL");
    CHECK_ERR(moe_route(&c, NULL, NULL, &ids, &w, NULL), MOE_ERR_ARG, "moe_route: logits: expected a tensor, got NULL");
    CHECK_ERR(moe_route(&c, L, NULL, NULL, &w, NULL), MOE_ERR_ARG, "moe_route: ids: expected a pointer");
    CHECK_ERR(moe_route(&c, L, NULL, &ids, NULL, NULL), MOE_ERR_ARG, "moe_route: weights: expected a pointer");
    moe_route_cfg bad = c;
    bad.method = 8;
    CHECK_ERR(moe_route(&bad, L, NULL, &ids, &w, NULL), MOE_ERR_ARG, "method: expected 0..7 (a moe_route_method), got 8");
    bad.method = -1;
    CHECK_ERR(moe_route(&bad, L, NULL, &ids, &w, NULL), MOE_ERR_ARG, "method: expected 0..7 (a moe_route_method), got -1");
    bad = c;
    bad.normalize = 2;
    CHECK_ERR(moe_route(&bad, L, NULL, &ids, &w, NULL), MOE_ERR_ARG, "normalize: expected 0 or 1, got 2");
    bad = c;
    bad.weights_dtype = MOE_I32;
    CHECK_ERR(moe_route(&bad, L, NULL, &ids, &w, NULL), MOE_ERR_DTYPE, "weights_dtype: expected f32 or bf16, got i32");
    bad = c;
    bad.scale = INFINITY;
    bad.method = MOE_ROUTE_DEEPSEEKV3;
    CHECK_ERR(moe_route(&bad, L, NULL, &ids, &w, NULL), MOE_ERR_ARG, "scale: expected a finite number, got inf");
    CHECK(ids == NULL && w == NULL); /* failures allocate nothing */

    /* a route with allocated outputs (caller owns them) */
    CHECK(moe_route(&c, L, NULL, &ids, &w, NULL) == MOE_OK);
    CHECK(ids && w);
    if (ids && w) {
        CHECK(moe_tensor_dtype(ids) == MOE_I32 && moe_tensor_dtype(w) == MOE_F32);
        CHECK(moe_tensor_dim(ids, 0) == 2 && moe_tensor_dim(ids, 1) == 2);
        const int32_t *ip = (const int32_t *)moe_tensor_data(ids);
        const float *wp = (const float *)moe_tensor_data(w);
        CHECK(ip[0] == 1 && ip[1] == 2 && ip[2] == 3 && ip[3] == 0);
        double d0 = 1 + exp(-1.0), d1 = 1 + exp(-1.5);
        CHECK(fabs(wp[0] - 1 / d0) < 1e-6 && fabs(wp[1] - exp(-1.0) / d0) < 1e-6);
        CHECK(fabs(wp[2] - 1 / d1) < 1e-6 && fabs(wp[3] - exp(-1.5) / d1) < 1e-6);
        /* the same handles passed back in are written in place, replay too */
        moe_tensor *keep_i = ids, *keep_w = w, *rep = NULL;
        int64_t rs[2] = {3, 2};
        CHECK(moe_tensor_new(&rep, MOE_I16, 2, rs, CPU) == MOE_OK);
        CHECK(moe_tensor_fill(rep, -1) == MOE_OK);
        c.method = MOE_ROUTE_TOPK;
        CHECK(moe_route(&c, L, NULL, &ids, &w, rep) == MOE_OK);
        CHECK(ids == keep_i && w == keep_w);
        const int16_t *rp = (const int16_t *)moe_tensor_data(rep);
        CHECK(rp[0] == 1 && rp[1] == 2 && rp[2] == 3 && rp[3] == 0 && rp[4] == -1 && rp[5] == -1);
        CHECK(wp[0] == 3.0f && wp[1] == 2.0f && wp[2] == 2.0f && wp[3] == 0.5f);
        moe_tensor_free(rep);
    }
    moe_tensor_free(ids);
    moe_tensor_free(w);

    /* T = 0: outputs [0, K], nothing else */
    int64_t s0[2] = {0, 16};
    moe_tensor *Z = NULL, *zi = NULL, *zw = NULL;
    CHECK(moe_tensor_new(&Z, MOE_BF16, 2, s0, CPU) == MOE_OK);
    c.method = MOE_ROUTE_DEEPSEEKV3;
    c.top_k = 8;
    c.n_group = 8;
    c.topk_group = 4;
    c.weights_dtype = MOE_BF16;
    CHECK(moe_route(&c, Z, NULL, &zi, &zw, NULL) == MOE_OK);
    CHECK(zi && zw && moe_tensor_dim(zi, 0) == 0 && moe_tensor_dim(zi, 1) == 8 && moe_tensor_dtype(zw) == MOE_BF16);
    moe_tensor_free(zi);
    moe_tensor_free(zw);
    moe_tensor_free(Z);
    moe_tensor_free(L);

    moe_mem_info mi;
    CHECK(moe_mem_stats(&mi) == MOE_OK && mi.live_tensors == 0);

    printf("test_route: %d checks, %d failures\n", checks, failures);
    return failures ? 1 : 0;
}
