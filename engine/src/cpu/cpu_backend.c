/* cpu_backend.c -- the CPU reference backend: memory and element-wise ops.
 * Routing lives in route_cpu.c (moe__cpu_route). */
#include "../backend.h"
#include "../fp.h"
#include "../philox.h"

#include <stdlib.h>
#include <string.h>

static moe_status cpu_alloc(int dev, size_t bytes, void **out) {
    size_t n = (bytes + 63) & ~(size_t)63;
    void *p = n >= bytes ? aligned_alloc(64, n) : NULL; /* n < bytes: the rounding wrapped */
    if (!p) return moe__err(MOE_ERR_NOMEM, "moe_tensor_new: cannot allocate %zu bytes of host memory", bytes);
    *out = p;
    return MOE_OK;
}

static void cpu_free(int dev, void *p) { free(p); }

static moe_status cpu_memcpy(int dev, void *dst, const void *src, size_t n) {
    memcpy(dst, src, n);
    return MOE_OK;
}

static moe_status cpu_sync(int dev) { return MOE_OK; }

/* Iterate dst and src together (same shape, any strides). */
typedef struct {
    const moe_tensor *src;
    void *dbase;
    const void *sbase;
    int ddt, sdt;
    int64_t idx[MOE_MAX_DIMS];
    int64_t soff;
} cpu_copy_ctx;

static void cpu_copy_one(void *ctx, int64_t i, int64_t doff) {
    cpu_copy_ctx *c = (cpu_copy_ctx *)ctx;
    int64_t soff = c->soff;
    int fdst = moe_dtype_is_float(c->ddt), fsrc = moe_dtype_is_float(c->sdt);
    if (c->ddt == c->sdt && fdst) {
        /* same float dtype: copy the bits (NaN payloads kept, as the contiguous path does) */
        int bits = moe_dtype_bits(c->ddt);
        if (bits == 4) {
            const uint8_t *sb = (const uint8_t *)c->sbase + (soff >> 1);
            uint8_t v = (soff & 1) ? (uint8_t)(*sb >> 4) : (uint8_t)(*sb & 0xF);
            uint8_t *db = (uint8_t *)c->dbase + (doff >> 1);
            if (doff & 1) *db = (uint8_t)((*db & 0x0F) | (v << 4));
            else *db = (uint8_t)((*db & 0xF0) | v);
        } else {
            size_t w = (size_t)bits / 8;
            memcpy((char *)c->dbase + (size_t)doff * w, (const char *)c->sbase + (size_t)soff * w, w);
        }
    } else if (!fdst && !fsrc) moe__store_i64(c->dbase, c->ddt, doff, moe__load_i64(c->sbase, c->sdt, soff));
    else if (fsrc) moe__store_f32(c->dbase, c->ddt, doff, moe__load_f32(c->sbase, c->sdt, soff));
    else moe__store_f32(c->dbase, c->ddt, doff, (float)moe__load_i64(c->sbase, c->sdt, soff));
    /* advance the source index (row-major) */
    const moe_tensor *s = c->src;
    for (int d = s->ndim - 1; d >= 0; d--) {
        if (++c->idx[d] < s->shape[d]) {
            c->soff += s->stride[d];
            break;
        }
        c->soff -= s->stride[d] * (s->shape[d] - 1);
        c->idx[d] = 0;
    }
}

static moe_status cpu_copy_cast(moe_tensor *dst, const moe_tensor *src) {
    /* fast path: identical dtype, both contiguous, and no storage overlap issue */
    if (dst->dtype == src->dtype && moe_tensor_is_contiguous(dst) && moe_tensor_is_contiguous(src)) {
        memmove(moe_tensor_data(dst), moe_tensor_data(src), moe_tensor_nbytes(src));
        return MOE_OK;
    }
    /* int -> float goes through int64 (exact), float -> int through f32 (truncation) */
    cpu_copy_ctx c;
    memset(&c, 0, sizeof c);
    c.src = src;
    c.dbase = dst->st->data;
    c.sbase = src->st->data;
    c.ddt = dst->dtype;
    c.sdt = src->dtype;
    c.soff = src->offset;
    if (dst->st == src->st) {
        /* overlapping views of one storage: go through a temporary copy of src */
        moe_tensor *tmp = NULL;
        moe_device cpu = {MOE_DEVICE_CPU, 0};
        MOE_TRY(moe_tensor_new(&tmp, src->dtype, src->ndim, src->shape, cpu));
        cpu_copy_ctx c2;
        memset(&c2, 0, sizeof c2);
        c2.src = src;
        c2.dbase = tmp->st->data;
        c2.sbase = src->st->data;
        c2.ddt = c2.sdt = src->dtype;
        c2.soff = src->offset;
        moe__for_each_offset(tmp, cpu_copy_one, &c2);
        c.src = tmp;
        c.sbase = tmp->st->data;
        c.soff = 0;
        moe__for_each_offset(dst, cpu_copy_one, &c);
        moe_tensor_free(tmp);
        return MOE_OK;
    }
    moe__for_each_offset(dst, cpu_copy_one, &c);
    return MOE_OK;
}

typedef struct {
    void *base;
    int dtype;
    double v;
    uint64_t seed;
    int kind;
    double a, b;
} cpu_fill_ctx;

static void cpu_store_double(void *base, int dtype, int64_t off, double v) {
    if (moe_dtype_is_float(dtype)) {
        moe__store_f32(base, dtype, off, (float)v);
    } else {
        int64_t iv;
        if (v != v) iv = 0;
        else if (v >= 9223372036854775807.0) iv = INT64_MAX;
        else if (v <= -9223372036854775808.0) iv = INT64_MIN;
        else iv = (int64_t)v;
        if (dtype == MOE_BOOL) iv = v != 0.0;
        moe__store_i64(base, dtype, off, iv);
    }
}

static void cpu_fill_one(void *ctx, int64_t i, int64_t off) {
    cpu_fill_ctx *c = (cpu_fill_ctx *)ctx;
    cpu_store_double(c->base, c->dtype, off, c->v);
}

static moe_status cpu_fill(moe_tensor *t, double v) {
    cpu_fill_ctx c = {t->st->data, t->dtype, v, 0, 0, 0, 0};
    moe__for_each_offset(t, cpu_fill_one, &c);
    return MOE_OK;
}

static void cpu_rand_one(void *ctx, int64_t i, int64_t off) {
    cpu_fill_ctx *c = (cpu_fill_ctx *)ctx;
    double v = moe__rng_value(c->seed, (uint64_t)i, c->kind, c->a, c->b);
    /* the value is rounded to f32 first, then to the dtype (same on CUDA) */
    cpu_store_double(c->base, c->dtype, off, (double)(float)v);
}

static moe_status cpu_rand(moe_tensor *t, uint64_t seed, int kind, double a, double b) {
    cpu_fill_ctx c = {t->st->data, t->dtype, 0, seed, kind, a, b};
    moe__for_each_offset(t, cpu_rand_one, &c);
    return MOE_OK;
}

static void cpu_arange_one(void *ctx, int64_t i, int64_t off) {
    cpu_fill_ctx *c = (cpu_fill_ctx *)ctx;
    cpu_store_double(c->base, c->dtype, off, c->a + c->b * (double)i);
}

static moe_status cpu_arange(moe_tensor *t, double start, double step) {
    cpu_fill_ctx c = {t->st->data, t->dtype, 0, 0, 0, start, step};
    moe__for_each_offset(t, cpu_arange_one, &c);
    return MOE_OK;
}

/* Routing reference, defined in route_cpu.c (weak so the core links before it exists). */
moe_status moe__cpu_route(const moe_route_cfg *cfg, const moe_tensor *logits, const moe_tensor *bias,
                          moe_tensor *ids, moe_tensor *weights, moe_tensor *replay) __attribute__((weak));

/* Fused MoE reference, defined in fused_cpu.c. */
moe_status moe__cpu_fused_pack(struct moe_experts *ex, const moe_tensor *w13, const moe_tensor *w2,
                               const moe_tensor *b13, const moe_tensor *b2);
moe_status moe__cpu_fused(const struct moe__fused_args *args);

static const moe_backend moe__cpu = {
    .name = "cpu",
    .alloc = cpu_alloc,
    .free = cpu_free,
    .copy_h2d = cpu_memcpy,
    .copy_d2h = cpu_memcpy,
    .copy_d2d = cpu_memcpy,
    .synchronize = cpu_sync,
    .copy_cast = cpu_copy_cast,
    .fill = cpu_fill,
    .rand = cpu_rand,
    .arange = cpu_arange,
    .route = moe__cpu_route,
    .fused_pack = moe__cpu_fused_pack, /* fused_cpu.c */
    .fused = moe__cpu_fused,
};

const moe_backend *moe__cpu_backend(void) { return &moe__cpu; }

#ifndef MOE_HAVE_CUDA
const moe_backend *moe__cuda_backend(void) { return NULL; }
#endif
