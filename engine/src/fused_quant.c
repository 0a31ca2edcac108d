/* fused_quant.c -- quantised experts (moe_experts_new_quant) and the dispatch of the fused
 * MoE in the quantisation modes to the CPU reference (cpu/fused_quant_cpu.c) or the CUDA
 * kernels (kernels/fused_quant.cu).  Routing, validation, replay and the workspace are
 * fused.c's; only the expert GEMMs' operands differ.  Numerics: docs/quantization.md,
 * "Fused MoE per mode". */
#include "internal.h"
#include "backend.h"
#include "fused_quant.h"
#include "quant_math.h"

#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define FNQ "moe_experts_new_quant"

/* K block of each mode's activation and weight quantisation (0: none / whole row). */
static int moe__fq_kblock(int mode) {
    switch (mode) {
    case MOE_QUANT_FP8_BLOCK: return 128;
    case MOE_QUANT_NVFP4: return 16;
    case MOE_QUANT_MXFP4:
    case MOE_QUANT_MXINT4: return 32;
    default: return 1;
    }
}

int moe_experts_quant(const moe_experts *ex) { return ex ? ex->quant : -1; }

size_t moe__fused_quant_ws_bytes(int64_t max_tokens, int32_t top_k, int64_t E, int64_t H, int64_t I) {
    const int64_t P = max_tokens * top_k;
    const int64_t tiles = P / MOE__FQ_MIN_BM + (P < E ? P : E) + 1;
    size_t b = 0;
#define FQ_ADD(n) b += ((size_t)(n) + 255) & ~(size_t)255
    FQ_ADD(MOE__FQ_MISC_BYTES);                 /* ntiles, per-tensor scales, GEMV counters */
    FQ_ADD(tiles * 12);                         /* tile table: expert, first row, rows */
    FQ_ADD(max_tokens * H);                     /* x codes (e4m3; e2m1 uses half) */
    FQ_ADD(max_tokens * (H / 16) + 16);         /* x scales (nvfp4 e4m3 per 16 >= f32 per 128) */
    FQ_ADD(P * I);                              /* intermediate codes */
    FQ_ADD(P * (I / 16) + 16);                  /* intermediate scales */
#undef FQ_ADD
    return b;
}

moe_status moe__fused_quant_run(const moe__fused_args *A) {
    const struct moe_experts *ex = A->ex;
    if (ex->dev.type == MOE_DEVICE_CPU) return moe__cpu_fused_quant(A);
#ifdef MOE_HAVE_CUDA
    if (!A->ws || A->ws->fq_bytes < moe__fused_quant_ws_bytes(A->ws->max_tokens, A->ws->top_k, ex->E, ex->H, ex->I))
        return moe__err(MOE_ERR_ARG,
                        "moe_fused_moe: ws: expected a workspace made for quantised experts (moe_workspace_new with "
                        "these %s experts), got one without the quantised region",
                        moe_quant_mode_name(ex->quant));
    return moe__cuda_fused_quant(A);
#else
    return moe__err(MOE_ERR_NO_CUDA, "moe_fused_moe: moelab was built without CUDA support");
#endif
}

/* -------------------------------------------------------------- experts -- */

static moe_status moe__fq_float(const char *arg, const moe_tensor *t, int64_t d0, int64_t d1, int64_t d2, int nd,
                                const char *what) {
    char a[96];
    if (t->dtype != MOE_F32 && t->dtype != MOE_BF16)
        return moe__err(MOE_ERR_DTYPE, FNQ ": %s: expected dtype f32 or bf16 (or a qtensor), got %s", arg,
                        moe_dtype_name(t->dtype));
    int ok = t->ndim == nd && t->shape[0] == d0 && t->shape[1] == d1 && (nd < 3 || t->shape[2] == d2);
    if (!ok) {
        if (nd == 3)
            return moe__err(MOE_ERR_SHAPE, FNQ ": %s: expected shape [%" PRId64 ", %" PRId64 ", %" PRId64 "] (%s), got %s",
                            arg, d0, d1, d2, what, moe__shape_str(t, a, sizeof a));
        return moe__err(MOE_ERR_SHAPE, FNQ ": %s: expected shape [%" PRId64 ", %" PRId64 "] (%s), got %s", arg, d0, d1,
                        what, moe__shape_str(t, a, sizeof a));
    }
    return MOE_OK;
}

/* Logical shape of matrix `arg` (tensor or qtensor): dims into s[3]. */
static moe_status moe__fq_shape(const char *arg, int mode, const moe_tensor *t, const moe_qtensor *q, int64_t *s) {
    if (!t && !q)
        return moe__err(MOE_ERR_ARG, FNQ ": %s: expected an f32/bf16 tensor or a %s qtensor, got neither", arg,
                        moe_quant_mode_name(mode));
    if (t && q)
        return moe__err(MOE_ERR_ARG, FNQ ": %s: expected an f32/bf16 tensor or a qtensor, got both", arg);
    if (t) {
        if (t->ndim != 3) {
            char a[96];
            return moe__err(MOE_ERR_SHAPE, FNQ ": %s: expected 3 dimensions, got shape %s", arg, moe__shape_str(t, a, sizeof a));
        }
        for (int i = 0; i < 3; i++) s[i] = t->shape[i];
        return MOE_OK;
    }
    if (moe_qtensor_mode(q) != mode)
        return moe__err(MOE_ERR_ARG, FNQ ": %s: expected a qtensor of mode %s, got mode %s", arg, moe_quant_mode_name(mode),
                        moe_quant_mode_name(moe_qtensor_mode(q)));
    if (moe_qtensor_ndim(q) != 3)
        return moe__err(MOE_ERR_SHAPE, FNQ ": %s: expected a qtensor of 3 dimensions [E, N, K], got %d", arg,
                        moe_qtensor_ndim(q));
    if (mode == MOE_QUANT_FP8_BLOCK && moe_qtensor_block_rows(q) != 128)
        return moe__err(MOE_ERR_ARG, FNQ ": %s: expected fp8_block weight scales per 128x128 block, got blocks of %d x 128",
                        arg, moe_qtensor_block_rows(q));
    for (int i = 0; i < 3; i++) s[i] = moe_qtensor_dim(q, i);
    return MOE_OK;
}

/* A qtensor of `mode` on dev for one matrix: quantised from t, or sharing q's parts. */
static moe_status moe__fq_make(const char *arg, int mode, const moe_tensor *t, const moe_qtensor *q, moe_device dev,
                               moe_qtensor **out) {
    char b[32], c[32];
    if (q) {
        moe_device qd = moe_qtensor_device(q);
        if (!moe__same_device(qd, dev))
            return moe__err(MOE_ERR_DEVICE, FNQ ": %s: expected a qtensor on %s (the experts' device), got one on %s", arg,
                            moe__device_str(dev, b, sizeof b), moe__device_str(qd, c, sizeof c));
        /* every CUDA GEMM kernel loads the codes 16 bytes at a time (a misaligned view faulted
         * the device) */
        const uintptr_t pd = (uintptr_t)moe_tensor_data(moe_qtensor_data(q));
        if (dev.type == MOE_DEVICE_CUDA && (pd & 15))
            return moe__err(MOE_ERR_ARG,
                            FNQ ": %s: expected CUDA codes 16-byte aligned (the GEMM kernels load them 16 bytes at "
                            "a time), got codes at offset %d mod 16 (a view at an offset: pass a copy, t:clone())",
                            arg, (int)(pd & 15));
        /* scales: the Hopper register-operand kernel loads a row's scales of a stage as one word
         * (k_qg_rs), so CUDA scales that do not start 16-byte aligned are copied (the experts then
         * own the copy: scales are taken as they are when the experts are made) */
        const moe_tensor *sc = moe_qtensor_scales(q);
        moe_tensor *sca = NULL;
        moe_status s = MOE_OK;
        if (dev.type == MOE_DEVICE_CUDA && sc && ((uintptr_t)moe_tensor_data(sc) & 15)) {
            s = moe_tensor_new(&sca, sc->dtype, sc->ndim, sc->shape, dev);
            if (s == MOE_OK) s = moe_tensor_copy(sca, sc);
        }
        moe_quant_opts o = moe_quant_opts_default();
        o.block_rows = mode == MOE_QUANT_FP8_BLOCK ? 128 : 0;
        if (s == MOE_OK)
            s = moe_qtensor_from_parts(out, mode, moe_qtensor_data(q), sca ? sca : sc, moe_qtensor_global_scale(q), &o);
        moe_tensor_free(sca);
        return s;
    }
    moe_tensor *tmp = NULL;
    const moe_tensor *src = t;
    if (!moe__same_device(t->dev, dev)) {
        MOE_TRY(moe_tensor_to_device(&tmp, t, dev));
        src = tmp;
    }
    moe_status s = moe_quantize(src, mode, NULL, out);
    if (s == MOE_OK && tmp) s = moe_synchronize(dev); /* the source is freed next */
    moe_tensor_free(tmp);
    return s;
}

/* bias as f32 [d0, d1] on dev, logical order. */
static moe_status moe__fq_bias(const moe_tensor *b, moe_device dev, moe_tensor **out) {
    *out = NULL;
    if (!b) return MOE_OK;
    moe_tensor *tmp = NULL;
    const moe_tensor *src = b;
    if (!moe__same_device(b->dev, dev)) {
        MOE_TRY(moe_tensor_to_device(&tmp, b, dev));
        src = tmp;
    }
    moe_status s = moe_tensor_new(out, MOE_F32, 2, b->shape, dev);
    if (s == MOE_OK) s = moe_tensor_cast_into(*out, src);
    if (s == MOE_OK && tmp) s = moe_synchronize(dev);
    moe_tensor_free(tmp);
    return s;
}

moe_status moe_experts_new_quant(moe_experts **out, const moe_experts_cfg *cfg, int mode, const moe_tensor *gate_up,
                                 const moe_tensor *down, const moe_qtensor *gate_up_q, const moe_qtensor *down_q,
                                 const moe_tensor *bias_gate_up, const moe_tensor *bias_down, moe_device dev) {
    if (!out) return moe__err(MOE_ERR_ARG, FNQ ": out: expected a pointer to a handle, got NULL");
    *out = NULL;
    if (mode < 0 || mode >= MOE_QUANT_MODE_COUNT)
        return moe__err(MOE_ERR_ARG, FNQ ": mode: expected a moe_quant_mode 0..%d (bf16, fp8, fp8_block, nvfp4, mxfp4, "
                        "mxint4), got %d", MOE_QUANT_MODE_COUNT - 1, mode);
    if (mode == MOE_QUANT_BF16) {
        if ((gate_up && gate_up_q) || (down && down_q))
            return moe__err(MOE_ERR_ARG, FNQ ": gate_up/down: expected a tensor or a qtensor per matrix, got both");
        if (gate_up_q && moe_qtensor_mode(gate_up_q) != MOE_QUANT_BF16)
            return moe__err(MOE_ERR_ARG, FNQ ": gate_up: expected a qtensor of mode bf16, got mode %s",
                            moe_quant_mode_name(moe_qtensor_mode(gate_up_q)));
        if (down_q && moe_qtensor_mode(down_q) != MOE_QUANT_BF16)
            return moe__err(MOE_ERR_ARG, FNQ ": down: expected a qtensor of mode bf16, got mode %s",
                            moe_quant_mode_name(moe_qtensor_mode(down_q)));
        return moe_experts_new(out, cfg, gate_up ? gate_up : moe_qtensor_data(gate_up_q),
                               down ? down : moe_qtensor_data(down_q), bias_gate_up, bias_down, dev);
    }
    moe_experts_cfg defc = moe_experts_cfg_default();
    if (!cfg) cfg = &defc;
    MOE_TRY(moe__experts_check_cfg(FNQ, cfg));
    const char *mname = moe_quant_mode_name(mode);
    const int gated = cfg->activation != MOE_ACT_RELU2;
    int64_t s13[3], s2[3];
    MOE_TRY(moe__fq_shape("down", mode, down, down_q, s2));
    MOE_TRY(moe__fq_shape("gate_up", mode, gate_up, gate_up_q, s13));
    const int64_t E = s2[0], H = s2[1], I = s2[2], N1 = gated ? 2 * I : I;
    if (E < 1 || E > MOE_ROUTE_MAX_EXPERTS)
        return moe__err(MOE_ERR_UNSUPPORTED, FNQ ": down: expected 1..%d experts (dim 0), got %" PRId64,
                        MOE_ROUTE_MAX_EXPERTS, E);
    if (H < 1 || I < 1)
        return moe__err(MOE_ERR_SHAPE, FNQ ": down: expected H >= 1 and I >= 1, got [%" PRId64 ", %" PRId64 ", %" PRId64 "]",
                        E, H, I);
    if (s13[0] != E || s13[1] != N1 || s13[2] != H)
        return moe__err(MOE_ERR_SHAPE, FNQ ": gate_up: expected shape [%" PRId64 ", %" PRId64 ", %" PRId64 "] (%s), got [%"
                        PRId64 ", %" PRId64 ", %" PRId64 "]", E, N1, H,
                        gated ? "E and H from down, 2I rows: gate then up" : "relu2: [E, I, H]", s13[0], s13[1], s13[2]);
    if (gate_up) MOE_TRY(moe__fq_float("gate_up", gate_up, E, N1, H, 3, "[E, N1, H]"));
    if (down) MOE_TRY(moe__fq_float("down", down, E, H, I, 3, "[E, H, I]"));
    if (bias_gate_up) MOE_TRY(moe__fq_float("bias_gate_up", bias_gate_up, E, N1, 0, 2, "[E, N] of gate_up"));
    if (bias_down) MOE_TRY(moe__fq_float("bias_down", bias_down, E, H, 0, 2, "[E, H]"));
    const int kb = moe__fq_kblock(mode);
    if (H % kb != 0 || I % kb != 0)
        return moe__err(MOE_ERR_SHAPE, FNQ ": down: expected H and I divisible by %d (the %s block: weights and "
                        "activations are quantised along them), got H %" PRId64 ", I %" PRId64, kb, mname, H, I);
    if (mode == MOE_QUANT_FP8_BLOCK && N1 % 128 != 0)
        return moe__err(MOE_ERR_SHAPE, FNQ ": gate_up: expected %s rows divisible by 128 (fp8_block 128x128 weight "
                        "blocks), got %" PRId64, gated ? "2I" : "I", N1);
    const moe_backend *be = moe__backend_for(FNQ, dev);
    if (!be) return moe__backend_status();
    if (!be->fused) {
        char d[32];
        return moe__err(MOE_ERR_UNSUPPORTED, FNQ ": dev: expected a device with fused MoE kernels, got %s",
                        moe__device_str(dev, d, sizeof d));
    }
    moe_experts *ex = NULL;
    MOE_TRY(moe__experts_record(FNQ, cfg, dev, E, H, I, N1, &ex));
    ex->quant = mode;
    moe_status s = moe__fq_make("gate_up", mode, gate_up, gate_up_q, dev, &ex->q13);
    if (s == MOE_OK) s = moe__fq_make("down", mode, down, down_q, dev, &ex->q2);
    if (s == MOE_OK) s = moe__fq_bias(bias_gate_up, dev, &ex->b13);
    if (s == MOE_OK) s = moe__fq_bias(bias_down, dev, &ex->b2);
#ifdef MOE_HAVE_CUDA
    if (s == MOE_OK && dev.type == MOE_DEVICE_CUDA && mode == MOE_QUANT_MXINT4) {
        /* the f16 fold's per-matrix power of two, from the scales as they are now (a qtensor's
         * scales are contiguous and of the mode's dtype, bf16: moe_qtensor_from_parts) */
        int r[3];
        s = moe__cuda_i4_range(moe_qtensor_scales(ex->q13), r);
        if (s == MOE_OK) ex->i4_fold13 = moe__i4_fold_of(r);
        if (s == MOE_OK) s = moe__cuda_i4_range(moe_qtensor_scales(ex->q2), r);
        if (s == MOE_OK) ex->i4_fold2 = moe__i4_fold_of(r);
    }
    if (s == MOE_OK && dev.type == MOE_DEVICE_CUDA && mode == MOE_QUANT_MXFP4) {
        /* scales of at most 2 (codes <= 128, no NaN code) allow the folded bf16 widening */
        int m13 = 255, m2 = 255;
        s = moe__cuda_u8_max(moe_qtensor_scales(ex->q13), &m13);
        if (s == MOE_OK) s = moe__cuda_u8_max(moe_qtensor_scales(ex->q2), &m2);
        if (s == MOE_OK) ex->mx_small = m13 <= 128 && m2 <= 128;
    }
#endif
    if (s == MOE_OK && dev.type == MOE_DEVICE_CPU) {
        /* the reference multiplies the dequantised values (exactly the mode's x') */
        s = moe_dequantize(ex->q13, MOE_F32, &ex->w13);
        if (s == MOE_OK) s = moe_dequantize(ex->q2, MOE_F32, &ex->w2);
    }
    if (s != MOE_OK) {
        moe_experts_free(ex);
        return s;
    }
    *out = ex;
    return MOE_OK;
}
