/* test_core.c -- C tests of the engine core on the CPU backend: status/errors, tensors, views,
 * copies, casts, fills, RNG, memory accounting.  Expected values are worked out by hand. */
#include "moe.h"

#include <math.h>
#include <stdio.h>
#include <string.h>
#include "check.h"

static const moe_device CPU = {MOE_DEVICE_CPU, 0};

static moe_tensor *mk(int dtype, int ndim, const int64_t *shape) {
    moe_tensor *t = NULL;
    if (moe_tensor_new(&t, dtype, ndim, shape, CPU) != MOE_OK) {
        fprintf(stderr, "moe_tensor_new failed: %s\n", moe_last_error());
        return NULL;
    }
    return t;
}

static void test_status(void) {
    CHECK(strcmp(moe_status_str(MOE_OK), "ok") == 0);
    CHECK(strcmp(moe_status_name(MOE_ERR_SHAPE), "MOE_ERR_SHAPE") == 0);
    CHECK(strcmp(moe_status_str(12345), "unknown status") == 0);
    CHECK(strlen(moe_version()) >= 5);
    CHECK(strstr(moe_build_info(), "CUDA backend") != NULL);
    moe_clear_error();
    CHECK(moe_last_error()[0] == '\0');
}

static void test_new_errors(void) {
    moe_tensor *t = NULL;
    int64_t shape9[9] = {1, 1, 1, 1, 1, 1, 1, 1, 1};
    CHECK_ERR(moe_tensor_new(&t, MOE_F32, 9, shape9, CPU), MOE_ERR_ARG, "ndim: expected 0..8, got 9");
    CHECK(t == NULL);
    int64_t neg[2] = {2, -3};
    CHECK_ERR(moe_tensor_new(&t, MOE_F32, 2, neg, CPU), MOE_ERR_SHAPE, "shape[1]: expected >= 0, got -3");
    CHECK_ERR(moe_tensor_new(&t, 99, 2, neg, CPU), MOE_ERR_DTYPE, "dtype");
    /* an empty tensor whose other sizes would overflow the strides is refused too */
    int64_t huge[4] = {2, 0, INT64_MAX, 12};
    CHECK_ERR(moe_tensor_new(&t, MOE_F32, 4, huge, CPU), MOE_ERR_SHAPE, "2^60");
    int64_t odd[1] = {3};
    CHECK_ERR(moe_tensor_new(&t, MOE_E2M1, 1, odd, CPU), MOE_ERR_SHAPE, "even");
    moe_device bad = {7, 0};
    int64_t s[1] = {4};
    CHECK_ERR(moe_tensor_new(&t, MOE_F32, 1, s, bad), MOE_ERR_DEVICE, "device");
    if (moe_cuda_device_count() == 0) {
        moe_device cuda = {MOE_DEVICE_CUDA, 0};
        CHECK_ERR(moe_tensor_new(&t, MOE_F32, 1, s, cuda), MOE_ERR_NO_CUDA, "CUDA");
    }
    CHECK(moe_dtype_from_name("bfloat16") == MOE_BF16);
    CHECK(moe_dtype_from_name("nope") == -1 && strstr(moe_last_error(), "'nope'"));
    moe_tensor_free(NULL); /* no-op */
}

/* Sizes near the int64 limits: refused with a message, never wrapped into a small buffer. */
static void test_size_overflow(void) {
    moe_tensor *t = NULL, *v = NULL;
    /* 2^59 i64 elements: under the 2^60-element cap, but 2^62 bytes (numel * 64 bits wrapped) */
    int64_t big[1] = {(int64_t)1 << 59};
    CHECK_ERR(moe_tensor_new(&t, MOE_I64, 1, big, CPU), MOE_ERR_SHAPE, "shape: expected at most 2^60 bytes of i64");
    CHECK(t == NULL);
    int64_t big2[2] = {(int64_t)1 << 57, 8}; /* 2^60 elements, 2^62 bytes */
    CHECK_ERR(moe_tensor_new(&t, MOE_F32, 2, big2, CPU), MOE_ERR_SHAPE, "2^60 bytes");
    int64_t s4[1] = {4};
    CHECK(moe_tensor_new(&t, MOE_F32, 1, s4, CPU) == MOE_OK);
    CHECK(moe_tensor_nbytes(t) == 16);
    /* narrow: start + length would overflow */
    CHECK_ERR(moe_tensor_narrow(&v, t, 0, 1, INT64_MAX), MOE_ERR_RANGE, "length: expected 0..3, got");
    CHECK(v == NULL);
    /* reshape: the product of the sizes would overflow */
    int64_t wide[3] = {(int64_t)1 << 40, (int64_t)1 << 40, 0};
    CHECK_ERR(moe_tensor_reshape(&v, t, 2, wide), MOE_ERR_SHAPE, "shape: expected at most 2^63 elements");
    CHECK_ERR(moe_tensor_reshape(&v, t, 3, wide), MOE_ERR_SHAPE, "shape: expected at most 2^63 elements");
    CHECK(v == NULL);
    moe_tensor_free(t);
    int64_t e6[1] = {6};
    CHECK(moe_tensor_new(&t, MOE_E2M1, 1, e6, CPU) == MOE_OK);
    CHECK(moe_tensor_nbytes(t) == 3);
    moe_tensor_free(t);
}

static void test_views(void) {
    int64_t shape[2] = {3, 4};
    moe_tensor *a = mk(MOE_F32, 2, shape);
    CHECK(a && moe_tensor_arange(a, 0, 1) == MOE_OK); /* a[i][j] = 4i + j */
    moe_tensor *tr = NULL, *nar = NULL, *sel = NULL, *rs = NULL, *c = NULL;
    CHECK(moe_tensor_transpose(&tr, a, 0, 1) == MOE_OK);
    CHECK(moe_tensor_dim(tr, 0) == 4 && moe_tensor_dim(tr, 1) == 3 && !moe_tensor_is_contiguous(tr));
    double buf[12];
    CHECK(moe_tensor_read_f64(tr, buf, 12) == MOE_OK);
    /* tr[i][j] = a[j][i] = 4j + i: row-major over tr -> 0,4,8,1,5,9,2,6,10,3,7,11 */
    double want_tr[12] = {0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11};
    CHECK(memcmp(buf, want_tr, sizeof buf) == 0);
    CHECK(moe_tensor_narrow(&nar, a, 1, 1, 2) == MOE_OK); /* columns 1..2 */
    double b6[6];
    CHECK(moe_tensor_read_f64(nar, b6, 6) == MOE_OK);
    double want_n[6] = {1, 2, 5, 6, 9, 10};
    CHECK(memcmp(b6, want_n, sizeof b6) == 0);
    CHECK(moe_tensor_select(&sel, a, 0, 2) == MOE_OK); /* row 2: 8 9 10 11 */
    double b4[4];
    CHECK(moe_tensor_ndim(sel) == 1 && moe_tensor_read_f64(sel, b4, 4) == MOE_OK && b4[0] == 8 && b4[3] == 11);
    int64_t ns[2] = {-1, 6};
    CHECK(moe_tensor_reshape(&rs, a, 2, ns) == MOE_OK && moe_tensor_dim(rs, 0) == 2);
    CHECK_ERR(moe_tensor_reshape(&c, tr, 2, ns), MOE_ERR_ARG, "contiguous");
    int64_t bad[1] = {5};
    CHECK_ERR(moe_tensor_reshape(&c, a, 1, bad), MOE_ERR_SHAPE, "expected 12 elements");
    CHECK_ERR(moe_tensor_narrow(&c, a, 1, 3, 2), MOE_ERR_RANGE, "length");
    CHECK_ERR(moe_tensor_select(&c, a, 2, 0), MOE_ERR_ARG, "dim");
    /* contiguous copy of a transpose */
    CHECK(moe_tensor_contiguous(&c, tr) == MOE_OK && moe_tensor_is_contiguous(c));
    CHECK(moe_tensor_read_f64(c, buf, 12) == MOE_OK && memcmp(buf, want_tr, sizeof buf) == 0);
    moe_tensor_free(c);
    c = NULL;
    /* writing through a view changes the base */
    CHECK(moe_tensor_fill(nar, -1) == MOE_OK);
    CHECK(moe_tensor_read_f64(a, buf, 12) == MOE_OK && buf[1] == -1 && buf[2] == -1 && buf[0] == 0 && buf[3] == 3);
    /* copy into a strided view from a contiguous tensor */
    int64_t s43[2] = {4, 3};
    moe_tensor *src = mk(MOE_F32, 2, s43);
    CHECK(moe_tensor_arange(src, 100, 1) == MOE_OK);
    CHECK(moe_tensor_copy(tr, src) == MOE_OK); /* a[j][i] = 100 + 3i + j */
    CHECK(moe_tensor_read_f64(a, buf, 12) == MOE_OK && buf[0] == 100 && buf[1] == 103 && buf[4] == 101);
    CHECK_ERR(moe_tensor_copy(a, src), MOE_ERR_SHAPE, "expected shape [3, 4]");
    /* freeing the base keeps views valid */
    moe_tensor_free(a);
    CHECK(moe_tensor_read_f64(sel, b4, 4) == MOE_OK && b4[0] == 102);
    moe_tensor_free(tr);
    moe_tensor_free(nar);
    moe_tensor_free(sel);
    moe_tensor_free(rs);
    moe_tensor_free(src);
}

static void test_casts(void) {
    /* values and their expected encodings, worked out from the format definitions */
    int64_t shape[1] = {8};
    moe_tensor *f = mk(MOE_F32, 1, shape), *q = NULL, *back = NULL;
    double in[8] = {1.0, 1.0 + 1.0 / 256, 1.0 + 3.0 / 256, 3e38, -0.0, 65520.0, 1e-8, -2.5};
    CHECK(moe_tensor_write_f64(f, in, 8) == MOE_OK);
    /* bf16: 1+1/256 is the midpoint of 1 and 1+1/128 -> even (1.0); 1+3/256 -> 1+4/256 */
    CHECK(moe_tensor_cast(&q, f, MOE_BF16) == MOE_OK);
    uint16_t h[8];
    CHECK(moe_tensor_copy_to_host(q, h, sizeof h) == MOE_OK);
    CHECK(h[0] == 0x3F80 && h[1] == 0x3F80 && h[2] == 0x3F82 && h[4] == 0x8000 && h[7] == 0xC020);
    moe_tensor_free(q);
    /* f16: 65520 overflows to inf (0x7C00); 1e-8 underflows to 0 (min subnormal 2^-24 ~ 6e-8) */
    CHECK(moe_tensor_cast(&q, f, MOE_F16) == MOE_OK);
    CHECK(moe_tensor_copy_to_host(q, h, sizeof h) == MOE_OK);
    CHECK(h[0] == 0x3C00 && h[5] == 0x7C00 && h[6] == 0x0000 && h[7] == 0xC100);
    moe_tensor_free(q);
    /* e4m3: 3e38 saturates to 448 (0x7E); -2.5 = -1.25*2^1 -> 1 1000 010 = 0xC2 */
    CHECK(moe_tensor_cast(&q, f, MOE_F8E4M3) == MOE_OK);
    uint8_t b[8];
    CHECK(moe_tensor_copy_to_host(q, b, sizeof b) == MOE_OK);
    CHECK(b[0] == 0x38 && b[3] == 0x7E && b[7] == 0xC2);
    CHECK(moe_tensor_cast(&back, q, MOE_F32) == MOE_OK);
    double o[8];
    CHECK(moe_tensor_read_f64(back, o, 8) == MOE_OK && o[3] == 448 && o[7] == -2.5);
    moe_tensor_free(q);
    moe_tensor_free(back);
    /* e2m1 packed: element 0 in the low nibble.  1.0 = 0.10.0 = 0x2, 1+1/256 -> 1.0 (0x2) */
    CHECK(moe_tensor_cast(&q, f, MOE_E2M1) == MOE_OK);
    uint8_t p[4];
    CHECK(moe_tensor_nbytes(q) == 4 && moe_tensor_copy_to_host(q, p, 4) == MOE_OK);
    /* elements: 1->0x2, 1.004->0x2, 1.012->0x2, 3e38->6 (0x7), -0->0x8, 65520->0x7, 1e-8->0, -2.5->-2 (0xC)
       (2.5 is the midpoint of 2 (0.10.0... code 4) and 3 (code 5): even code 4 = 2.0) */
    CHECK(p[0] == 0x22 && p[1] == 0x72 && p[2] == 0x78 && p[3] == 0xC0);
    moe_tensor_free(q);
    /* ints: truncation toward zero, saturation */
    CHECK(moe_tensor_cast(&q, f, MOE_I8) == MOE_OK);
    int8_t i8[8];
    CHECK(moe_tensor_copy_to_host(q, i8, 8) == MOE_OK);
    CHECK(i8[0] == 1 && i8[3] == 127 && i8[5] == 127 && i8[7] == -2);
    moe_tensor_free(q);
    /* scalar API */
    uint32_t code;
    double v;
    CHECK(moe_encode(MOE_UE8M0, 3.0, &code) == MOE_OK && code == 128); /* 3 -> tie between 2 and 4: even code 128 (2^1) */
    CHECK(moe_encode(MOE_UE8M0, 3.5, &code) == MOE_OK && code == 129); /* 3.5 > 3: 4 */
    CHECK(moe_decode(MOE_UE8M0, 127, &v) == MOE_OK && v == 1.0);
    CHECK(moe_decode(MOE_I4, 0xF, &v) == MOE_OK && v == -1.0);
    CHECK_ERR(moe_decode(MOE_F8E4M3, 0x100, &v), MOE_ERR_RANGE, "code");
    CHECK_ERR(moe_encode(MOE_I32, 1.0, &code), MOE_ERR_DTYPE, "dtype");
    moe_tensor_free(f);
}

static void test_rng_and_mem(void) {
    moe_mem_info m0, m1, m2;
    CHECK(moe_mem_stats(&m0) == MOE_OK);
    int64_t shape[1] = {1001};
    moe_tensor *a = mk(MOE_F32, 1, shape), *b = mk(MOE_F32, 1, shape), *c = mk(MOE_BF16, 1, shape);
    CHECK(moe_mem_stats(&m1) == MOE_OK);
    CHECK(m1.live_tensors == m0.live_tensors + 3);
    CHECK(m1.host_bytes == m0.host_bytes + 1001 * 4 * 2 + 1001 * 2);
    CHECK(moe_tensor_rand_normal(a, 5, 0, 1) == MOE_OK && moe_tensor_rand_normal(b, 5, 0, 1) == MOE_OK);
    CHECK(memcmp(moe_tensor_data(a), moe_tensor_data(b), 4004) == 0);
    CHECK(moe_tensor_rand_normal(b, 6, 0, 1) == MOE_OK);
    CHECK(memcmp(moe_tensor_data(a), moe_tensor_data(b), 4004) != 0);
    /* bf16 rand equals the f32 values rounded to bf16 */
    CHECK(moe_tensor_rand_normal(c, 5, 0, 1) == MOE_OK);
    moe_tensor *ab = NULL;
    CHECK(moe_tensor_cast(&ab, a, MOE_BF16) == MOE_OK);
    CHECK(memcmp(moe_tensor_data(ab), moe_tensor_data(c), 2002) == 0);
    moe_tensor_free(ab);
    CHECK(moe_tensor_rand_uniform(a, 1, 2.0, 3.0) == MOE_OK);
    const float *fa = (const float *)moe_tensor_data(a);
    int inrange = 1;
    for (int i = 0; i < 1001; i++) inrange &= fa[i] >= 2.0f && fa[i] < 3.0f;
    CHECK(inrange);
    CHECK_ERR(moe_tensor_rand_uniform(a, 1, 3.0, 2.0), MOE_ERR_ARG, "hi");
    CHECK_ERR(moe_tensor_rand_normal(a, 1, 0.0, -1.0), MOE_ERR_ARG, "std");
    moe_tensor_free(a);
    moe_tensor_free(b);
    moe_tensor_free(c);
    CHECK(moe_mem_stats(&m2) == MOE_OK);
    CHECK(m2.live_tensors == m0.live_tensors && m2.host_bytes == m0.host_bytes);
    CHECK(m2.peak_host_bytes >= m1.host_bytes);
}

static void test_async_copy(void) {
    int64_t shape[1] = {5};
    moe_tensor *src = mk(MOE_F32, 1, shape), *dst = NULL, *bad = NULL;
    CHECK(moe_tensor_arange(src, 1, 2) == MOE_OK);
    CHECK(moe_tensor_new_pinned(&dst, MOE_F32, 1, shape) == MOE_OK);
    moe_event *ev = NULL;
    CHECK(moe_tensor_copy_to_host_async(dst, src, &ev) == MOE_OK && ev != NULL);
    CHECK(moe_event_wait(ev) == MOE_OK && moe_event_done(ev) == 1);
    moe_event_free(ev);
    double v[5];
    CHECK(moe_tensor_read_f64(dst, v, 5) == MOE_OK && v[0] == 1 && v[4] == 9);
    int64_t s4[1] = {4};
    CHECK(moe_tensor_new_pinned(&bad, MOE_F32, 1, s4) == MOE_OK);
    CHECK_ERR(moe_tensor_copy_to_host_async(bad, src, &ev), MOE_ERR_SHAPE, "expected 4 elements");
    CHECK(ev == NULL);
    moe_tensor_free(bad);
    CHECK(moe_tensor_new_pinned(&bad, MOE_I32, 1, shape) == MOE_OK);
    CHECK_ERR(moe_tensor_copy_to_host_async(bad, src, &ev), MOE_ERR_DTYPE, "src: expected dtype i32");
    moe_tensor_free(bad);
    moe_event_free(NULL);
    int64_t s9[9] = {1, 1, 1, 1, 1, 1, 1, 1, 1};
    CHECK_ERR(moe_tensor_new_pinned(&bad, MOE_F32, 9, s9), MOE_ERR_ARG, "ndim: expected 0..8, got 9");
    CHECK_ERR(moe_tensor_new_pinned(&bad, 77, 1, shape), MOE_ERR_DTYPE, "dtype");
    moe_tensor_free(src);
    moe_tensor_free(dst);
}

int main(void) {
    test_status();
    test_new_errors();
    test_size_overflow();
    test_views();
    test_casts();
    test_rng_and_mem();
    test_async_copy();
    printf("test_core: %d checks, %d failures\n", checks, failures);
    return failures ? 1 : 0;
}
