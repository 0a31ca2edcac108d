/* quant_cpu.c -- CPU reference of the quantisation modes (validated by engine/src/quant.c).
 * Every scale and code comes from quant_math.h, which the CUDA kernels share. */
#include "../quant_math.h"

#include <string.h>

/* Input element i (row-major) of a contiguous f32/bf16/f16 tensor. */
static float moe__q_in(const moe_tensor *src, int64_t i) { return moe__load_f32(src->st->data, src->dtype, src->offset + i); }

static uint32_t moe__q_amax_bits(const moe_tensor *src, int64_t start, int64_t rows, int64_t cols, int64_t ld) {
    uint32_t m = 0;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t c = 0; c < cols; c++) {
            uint32_t b = moe__q_absbits(moe__q_in(src, start + r * ld + c));
            if (b > m) m = b;
        }
    return m;
}

/* Store nibble codes: element i of a packed tensor whose element 0 is byte-aligned. */
static void moe__q_put_nibble(uint8_t *d, int64_t i, uint8_t code) {
    uint8_t b = d[i >> 1];
    d[i >> 1] = (i & 1) ? (uint8_t)((b & 0x0F) | (code << 4)) : (uint8_t)((b & 0xF0) | (code & 0x0F));
}

moe_status moe__cpu_quantize(const moe_tensor *src, struct moe_qtensor *q) {
    int64_t M = moe__q_mats(q), N = moe__q_rows(q), K = moe__q_cols(q);
    int64_t NK = N * K;
    void *dv = moe_tensor_data(q->data);
    uint8_t *d8 = (uint8_t *)dv;
    switch (q->mode) {
    case MOE_QUANT_FP8: {
        float *sc = (float *)moe_tensor_data(q->scales);
        for (int64_t m = 0; m < M; m++) {
            float s = moe__q_fp8_scale(moe__q_amax(moe__q_amax_bits(src, m * NK, N, K, K)));
            sc[m] = s;
            for (int64_t i = m * NK; i < (m + 1) * NK; i++) d8[i] = moe__q_fp8_code(moe__q_in(src, i), s);
        }
        return MOE_OK;
    }
    case MOE_QUANT_FP8_BLOCK: {
        float *sc = (float *)moe_tensor_data(q->scales);
        int64_t br = q->block_rows, bc = q->block_cols, nrb = N / br, ncb = K / bc;
        for (int64_t m = 0; m < M; m++)
            for (int64_t rb = 0; rb < nrb; rb++)
                for (int64_t cb = 0; cb < ncb; cb++) {
                    int64_t start = m * NK + rb * br * K + cb * bc;
                    float s = moe__q_fp8_scale(moe__q_amax(moe__q_amax_bits(src, start, br, bc, K)));
                    sc[(m * nrb + rb) * ncb + cb] = s;
                    for (int64_t r = 0; r < br; r++)
                        for (int64_t c = 0; c < bc; c++) {
                            int64_t i = start + r * K + c;
                            d8[i] = moe__q_fp8_code(moe__q_in(src, i), s);
                        }
                }
        return MOE_OK;
    }
    case MOE_QUANT_NVFP4: {
        uint8_t *sc = (uint8_t *)moe_tensor_data(q->scales);
        float *gl = (float *)moe_tensor_data(q->global);
        int64_t nb = K / 16;
        for (int64_t m = 0; m < M; m++) {
            float g = moe__q_nvfp4_global(moe__q_amax(moe__q_amax_bits(src, m * NK, N, K, K)));
            gl[m] = g;
            for (int64_t r = 0; r < N; r++)
                for (int64_t b = 0; b < nb; b++) {
                    int64_t start = m * NK + r * K + b * 16;
                    uint8_t code = moe__q_nvfp4_scale(moe__q_amax(moe__q_amax_bits(src, start, 1, 16, K)), g);
                    sc[(m * N + r) * nb + b] = code;
                    float s = moe__e4m3_to_f32(code);
                    for (int64_t c = 0; c < 16; c++)
                        moe__q_put_nibble(d8, start + c, moe__q_nvfp4_code(moe__q_in(src, start + c), s, g));
                }
        }
        return MOE_OK;
    }
    case MOE_QUANT_MXFP4:
    case MOE_QUANT_MXINT4: {
        int64_t rows = M * N, nb = K / 32;
        for (int64_t r = 0; r < rows; r++)
            for (int64_t b = 0; b < nb; b++) {
                int64_t start = r * K + b * 32;
                uint32_t ab = moe__q_amax_bits(src, start, 1, 32, K);
                if (q->mode == MOE_QUANT_MXFP4) {
                    uint8_t code = moe__q_mx_scale(ab);
                    ((uint8_t *)moe_tensor_data(q->scales))[r * nb + b] = code;
                    for (int64_t c = 0; c < 32; c++)
                        moe__q_put_nibble(d8, start + c, moe__q_mx_code(moe__q_in(src, start + c), code));
                } else {
                    uint16_t sb = moe__q_int4_scale(moe__q_amax(ab));
                    ((uint16_t *)moe_tensor_data(q->scales))[r * nb + b] = sb;
                    float s = moe__bf16_to_f32(sb);
                    for (int64_t c = 0; c < 32; c++)
                        moe__q_put_nibble(d8, start + c, moe__q_int4_code(moe__q_in(src, start + c), s));
                }
            }
        return MOE_OK;
    }
    default:
        return moe__err(MOE_ERR_UNSUPPORTED, "moe_quantize: mode: %s has no CPU quantiser", moe_quant_mode_name(q->mode));
    }
}

moe_status moe__cpu_dequantize(const struct moe_qtensor *q, moe_tensor *out) {
    int64_t M = moe__q_mats(q), N = moe__q_rows(q), K = moe__q_cols(q);
    int64_t NK = N * K, n = M * NK;
    const moe_tensor *dt = q->data;
    const void *db = dt->st->data;
    int64_t doff = dt->offset;
    const void *sb = q->scales ? moe_tensor_data(q->scales) : NULL;
    const float *gl = q->global ? (const float *)moe_tensor_data(q->global) : NULL;
    void *ob = out->st->data;
    int64_t ooff = out->offset;
    for (int64_t i = 0; i < n; i++) {
        int64_t m = i / NK, r = (i / K) % N, c = i % K;
        float v;
        switch (q->mode) {
        case MOE_QUANT_FP8:
            v = moe__q_deq_fp8(((const uint8_t *)db)[doff + i], ((const float *)sb)[m]);
            break;
        case MOE_QUANT_FP8_BLOCK: {
            int64_t nrb = N / q->block_rows, ncb = K / q->block_cols;
            float s = ((const float *)sb)[(m * nrb + r / q->block_rows) * ncb + c / q->block_cols];
            v = moe__q_deq_fp8(((const uint8_t *)db)[doff + i], s);
            break;
        }
        case MOE_QUANT_NVFP4: {
            uint8_t code = (uint8_t)moe__load_i64(db, MOE_I4, doff + i) & 0xF;
            v = moe__q_deq_nvfp4(code, ((const uint8_t *)sb)[(m * N + r) * (K / 16) + c / 16], gl[m]);
            break;
        }
        case MOE_QUANT_MXFP4: {
            uint8_t code = (uint8_t)moe__load_i64(db, MOE_I4, doff + i) & 0xF;
            v = moe__q_deq_mxfp4(code, ((const uint8_t *)sb)[(m * N + r) * (K / 32) + c / 32]);
            break;
        }
        case MOE_QUANT_MXINT4: {
            uint8_t code = (uint8_t)moe__load_i64(db, MOE_I4, doff + i) & 0xF;
            v = moe__q_deq_int4(code, ((const uint16_t *)sb)[(m * N + r) * (K / 32) + c / 32]);
            break;
        }
        default:
            return moe__err(MOE_ERR_UNSUPPORTED, "moe_dequantize: mode: %s has no CPU dequantiser",
                            moe_quant_mode_name(q->mode));
        }
        moe__store_f32(ob, out->dtype, ooff + i, v);
    }
    return MOE_OK;
}
