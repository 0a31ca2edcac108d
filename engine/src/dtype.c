/* dtype.c -- dtype table, scalar encode/decode, host element load/store. */
#include "internal.h"
#include "fp.h"

#include <math.h>
#include <string.h>

const char *moe_dtype_name(int dtype) {
#define X(name, id, text, bits, isf) \
    if (dtype == (id)) return text;
    MOE_DTYPE_LIST(X)
#undef X
    return "?";
}

int moe_dtype_bits(int dtype) {
#define X(name, id, text, bits, isf) \
    if (dtype == (id)) return bits;
    MOE_DTYPE_LIST(X)
#undef X
    return 0;
}

int moe_dtype_is_float(int dtype) {
#define X(name, id, text, bits, isf) \
    if (dtype == (id)) return isf;
    MOE_DTYPE_LIST(X)
#undef X
    return 0;
}

static const struct {
    const char *alias;
    int dtype;
} moe__dtype_aliases[] = {
    {"float32", MOE_F32},    {"float", MOE_F32},       {"float16", MOE_F16},
    {"half", MOE_F16},       {"bfloat16", MOE_BF16},   {"e4m3", MOE_F8E4M3},
    {"fp8", MOE_F8E4M3},     {"float8_e4m3fn", MOE_F8E4M3}, {"e5m2", MOE_F8E5M2},
    {"float8_e5m2", MOE_F8E5M2}, {"fp4", MOE_E2M1},   {"f4_e2m1", MOE_E2M1},
    {"int4", MOE_I4},        {"e8m0", MOE_UE8M0},      {"uint8", MOE_U8},
    {"int8", MOE_I8},        {"int16", MOE_I16},       {"int32", MOE_I32},
    {"int", MOE_I32},        {"int64", MOE_I64},       {"long", MOE_I64},
};

int moe_dtype_from_name(const char *name) {
    if (!name) {
        moe__err(MOE_ERR_ARG, "moe_dtype_from_name: name: expected a dtype name, got NULL");
        return -1;
    }
#define X(nm, id, text, bits, isf) \
    if (strcmp(name, text) == 0) return id;
    MOE_DTYPE_LIST(X)
#undef X
    for (size_t i = 0; i < sizeof moe__dtype_aliases / sizeof moe__dtype_aliases[0]; i++)
        if (strcmp(name, moe__dtype_aliases[i].alias) == 0) return moe__dtype_aliases[i].dtype;
    moe__err(MOE_ERR_DTYPE,
             "moe_dtype_from_name: name: expected one of f32, f16, bf16, f8_e4m3, f8_e5m2, e2m1, "
             "i4, ue8m0, u8, i8, i16, i32, i64, bool, got '%s'",
             name);
    return -1;
}

/* ------------------------------------------------------------ element I/O -- */

static int moe__is_packed(int dtype) { return dtype == MOE_E2M1 || dtype == MOE_I4; }

static uint8_t moe__load_nibble(const void *base, int64_t e) {
    uint8_t b = ((const uint8_t *)base)[e >> 1];
    return (e & 1) ? (uint8_t)(b >> 4) : (uint8_t)(b & 0xF);
}

static void moe__store_nibble(void *base, int64_t e, uint8_t v) {
    uint8_t *p = (uint8_t *)base + (e >> 1);
    if (e & 1) *p = (uint8_t)((*p & 0x0F) | ((v & 0xF) << 4));
    else *p = (uint8_t)((*p & 0xF0) | (v & 0xF));
}

float moe__load_f32(const void *base, int dtype, int64_t e) {
    switch (dtype) {
    case MOE_F32: return ((const float *)base)[e];
    case MOE_F16: return moe__f16_to_f32(((const uint16_t *)base)[e]);
    case MOE_BF16: return moe__bf16_to_f32(((const uint16_t *)base)[e]);
    case MOE_F8E4M3: return moe__e4m3_to_f32(((const uint8_t *)base)[e]);
    case MOE_F8E5M2: return moe__e5m2_to_f32(((const uint8_t *)base)[e]);
    case MOE_E2M1: return moe__e2m1_to_f32(moe__load_nibble(base, e));
    case MOE_UE8M0: return moe__ue8m0_to_f32(((const uint8_t *)base)[e]);
    default: return (float)moe__load_i64(base, dtype, e);
    }
}

int64_t moe__load_i64(const void *base, int dtype, int64_t e) {
    switch (dtype) {
    case MOE_I4: {
        int v = moe__load_nibble(base, e);
        return v >= 8 ? v - 16 : v;
    }
    case MOE_U8: return ((const uint8_t *)base)[e];
    case MOE_I8: return ((const int8_t *)base)[e];
    case MOE_I16: return ((const int16_t *)base)[e];
    case MOE_I32: return ((const int32_t *)base)[e];
    case MOE_I64: return ((const int64_t *)base)[e];
    case MOE_BOOL: return ((const uint8_t *)base)[e] != 0;
    default: return moe__f32_to_i64_sat(moe__load_f32(base, dtype, e), INT64_MIN, INT64_MAX);
    }
}

static int64_t moe__clamp_i64(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : v > hi ? hi : v; }

void moe__store_i64(void *base, int dtype, int64_t e, int64_t v) {
    switch (dtype) {
    case MOE_I4: moe__store_nibble(base, e, (uint8_t)(moe__clamp_i64(v, -8, 7) & 0xF)); return;
    case MOE_U8: ((uint8_t *)base)[e] = (uint8_t)moe__clamp_i64(v, 0, 255); return;
    case MOE_I8: ((int8_t *)base)[e] = (int8_t)moe__clamp_i64(v, INT8_MIN, INT8_MAX); return;
    case MOE_I16: ((int16_t *)base)[e] = (int16_t)moe__clamp_i64(v, INT16_MIN, INT16_MAX); return;
    case MOE_I32: ((int32_t *)base)[e] = (int32_t)moe__clamp_i64(v, INT32_MIN, INT32_MAX); return;
    case MOE_I64: ((int64_t *)base)[e] = v; return;
    case MOE_BOOL: ((uint8_t *)base)[e] = v != 0; return;
    default: moe__store_f32(base, dtype, e, (float)v); return;
    }
}

void moe__store_f32(void *base, int dtype, int64_t e, float v) {
    switch (dtype) {
    case MOE_F32: ((float *)base)[e] = v; return;
    case MOE_F16: ((uint16_t *)base)[e] = moe__f32_to_f16(v); return;
    case MOE_BF16: ((uint16_t *)base)[e] = moe__f32_to_bf16(v); return;
    case MOE_F8E4M3: ((uint8_t *)base)[e] = moe__f32_to_e4m3(v); return;
    case MOE_F8E5M2: ((uint8_t *)base)[e] = moe__f32_to_e5m2(v); return;
    case MOE_E2M1: moe__store_nibble(base, e, moe__f32_to_e2m1(v)); return;
    case MOE_UE8M0: ((uint8_t *)base)[e] = moe__f32_to_ue8m0(v); return;
    case MOE_BOOL: ((uint8_t *)base)[e] = v != 0.0f; return; /* NaN != 0: true */
    case MOE_I4: moe__store_i64(base, dtype, e, moe__f32_to_i64_sat(v, -8, 7)); return;
    case MOE_U8: moe__store_i64(base, dtype, e, moe__f32_to_i64_sat(v, 0, 255)); return;
    case MOE_I8: moe__store_i64(base, dtype, e, moe__f32_to_i64_sat(v, INT8_MIN, INT8_MAX)); return;
    case MOE_I16: moe__store_i64(base, dtype, e, moe__f32_to_i64_sat(v, INT16_MIN, INT16_MAX)); return;
    case MOE_I32: moe__store_i64(base, dtype, e, moe__f32_to_i64_sat(v, INT32_MIN, INT32_MAX)); return;
    case MOE_I64: moe__store_i64(base, dtype, e, moe__f32_to_i64_sat(v, INT64_MIN, INT64_MAX)); return;
    default: return;
    }
}

/* ---------------------------------------------------------- scalar API -- */

moe_status moe_encode(int dtype, double value, uint32_t *code) {
    if (!code) return moe__err(MOE_ERR_ARG, "moe_encode: code: expected a pointer, got NULL");
    float f = (float)value;
    switch (dtype) {
    case MOE_F32: *code = moe__f32_bits(f); return MOE_OK;
    case MOE_F16: *code = moe__f32_to_f16(f); return MOE_OK;
    case MOE_BF16: *code = moe__f32_to_bf16(f); return MOE_OK;
    case MOE_F8E4M3: *code = moe__f32_to_e4m3(f); return MOE_OK;
    case MOE_F8E5M2: *code = moe__f32_to_e5m2(f); return MOE_OK;
    case MOE_E2M1: *code = moe__f32_to_e2m1(f); return MOE_OK;
    case MOE_UE8M0: *code = moe__f32_to_ue8m0(f); return MOE_OK;
    case MOE_I4: *code = (uint32_t)(moe__f32_to_i64_sat(f, -8, 7) & 0xF); return MOE_OK;
    default:
        return moe__err(MOE_ERR_DTYPE, "moe_encode: dtype: expected a float dtype or i4, got %s",
                        moe_dtype_name(dtype));
    }
}

moe_status moe_decode(int dtype, uint32_t code, double *value) {
    if (!value) return moe__err(MOE_ERR_ARG, "moe_decode: value: expected a pointer, got NULL");
    uint32_t limit = dtype == MOE_F32 ? 0xFFFFFFFFu
                   : (dtype == MOE_F16 || dtype == MOE_BF16) ? 0xFFFFu
                   : (dtype == MOE_E2M1 || dtype == MOE_I4) ? 0xFu : 0xFFu;
    if (code > limit)
        return moe__err(MOE_ERR_RANGE, "moe_decode: code: expected 0..0x%X for %s, got 0x%X", limit,
                        moe_dtype_name(dtype), code);
    switch (dtype) {
    case MOE_F32: *value = moe__bits_f32(code); return MOE_OK;
    case MOE_F16: *value = moe__f16_to_f32((uint16_t)code); return MOE_OK;
    case MOE_BF16: *value = moe__bf16_to_f32((uint16_t)code); return MOE_OK;
    case MOE_F8E4M3: *value = moe__e4m3_to_f32((uint8_t)code); return MOE_OK;
    case MOE_F8E5M2: *value = moe__e5m2_to_f32((uint8_t)code); return MOE_OK;
    case MOE_E2M1: *value = moe__e2m1_to_f32((uint8_t)code); return MOE_OK;
    case MOE_UE8M0: *value = moe__ue8m0_to_f32((uint8_t)code); return MOE_OK;
    case MOE_I4: *value = code >= 8 ? (double)code - 16.0 : (double)code; return MOE_OK;
    default:
        return moe__err(MOE_ERR_DTYPE, "moe_decode: dtype: expected a float dtype or i4, got %s",
                        moe_dtype_name(dtype));
    }
}

int moe__dtype_packed(int dtype) { return moe__is_packed(dtype); }
