/* test_cuda_core.c -- the CUDA backend against the CPU reference, bit for bit: host/device
 * round trips, strided copies, every dtype pair cast, fill/arange, Philox RNG, CUDA graph
 * capture and replay, memory accounting and the errors a capture must give.
 * Returns 77 (ctest: skipped) when there is no CUDA device. */
#include "moe.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "check.h"

#define OK(expr) CHECK((expr) == MOE_OK)


static const moe_device CPU = {MOE_DEVICE_CPU, 0};
static const moe_device GPU = {MOE_DEVICE_CUDA, 0};

/* ---------------------------------------------------------------- helpers -- */

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static uint64_t rnd(void) { /* xorshift64* */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 0x2545F4914F6CDD1Dull;
}

static moe_tensor *mk(int dtype, int ndim, const int64_t *shape, moe_device dev) {
    moe_tensor *t = NULL;
    if (moe_tensor_new(&t, dtype, ndim, shape, dev) != MOE_OK) {
        fprintf(stderr, "moe_tensor_new(%s) failed: %s\n", moe_dtype_name(dtype), moe_last_error());
        return NULL;
    }
    return t;
}

/* Contents of t (any device, any layout) as fresh host bytes (contiguous); NULL on error. */
static unsigned char *bytes_of(const moe_tensor *t, size_t *n) {
    moe_tensor *h = NULL;
    if (moe_tensor_to_device(&h, t, CPU) != MOE_OK) {
        fprintf(stderr, "moe_tensor_to_device failed: %s\n", moe_last_error());
        return NULL;
    }
    *n = moe_tensor_nbytes(h);
    unsigned char *buf = (unsigned char *)malloc(*n ? *n : 1);
    if (buf && moe_tensor_copy_to_host(h, buf, *n) != MOE_OK) {
        fprintf(stderr, "moe_tensor_copy_to_host failed: %s\n", moe_last_error());
        free(buf);
        buf = NULL;
    }
    moe_tensor_free(h);
    return buf;
}

/* 1 when a and b hold the same bytes; prints the first differing element otherwise. */
static int same_bytes(const char *what, const moe_tensor *a, const moe_tensor *b) {
    size_t na = 0, nb = 0;
    unsigned char *x = bytes_of(a, &na), *y = bytes_of(b, &nb);
    int same = x && y && na == nb && memcmp(x, y, na) == 0;
    if (!same && x && y && na == nb) {
        int bits = moe_dtype_bits(moe_tensor_dtype(a));
        for (size_t i = 0; i < na; i++)
            if (x[i] != y[i]) {
                fprintf(stderr, "  %s: first difference at byte %zu (element %zu of %s): "
                                "cpu 0x%02x, cuda 0x%02x\n",
                        what, i, i * 8 / (size_t)bits, moe_dtype_name(moe_tensor_dtype(a)), x[i],
                        y[i]);
                break;
            }
    } else if (!same) {
        fprintf(stderr, "  %s: sizes differ or copy failed (%zu vs %zu bytes)\n", what, na, nb);
    }
    free(x);
    free(y);
    return same;
}

/* Host tensor of dtype with adversarial contents: raw random bits, values of ordinary size,
 * and the special values every conversion must get right. */
static moe_tensor *adversarial(int dtype, int ndim, const int64_t *shape) {
    static const float specials[] = {
        0.0f, -0.0f, INFINITY, -INFINITY, NAN, -NAN, 1.0f, -1.0f, 0.5f, 0.25f, 0.75f, 1.25f,
        2.5f, 3.5f, 5.0f, -5.0f, 6.0f, 7.0f, 448.0f, 464.0f, 480.0f, -464.0f, 57344.0f,
        61440.0f, 65504.0f, 65520.0f, -65520.0f, 3.0e38f, -3.4e38f, 1.0e-40f, -1.0e-45f,
        1.17549435e-38f, 5.96e-8f, 2.98e-8f, 1.0e-10f, 127.5f, 128.0f, -128.9f, 255.9f,
        256.0f, -8.5f, 7.9f, 32767.5f, -32769.0f, 2147483648.0f, -2147483904.0f,
        9.3e18f, -9.3e18f, 0.1f, 3.14159f, 1.5e-5f, 6.1035156e-5f};
    const int nspec = (int)(sizeof specials / sizeof specials[0]);
    moe_tensor *t = mk(dtype, ndim, shape, CPU);
    if (!t) return NULL;
    size_t nb = moe_tensor_nbytes(t);
    int64_t n = moe_tensor_numel(t);
    unsigned char *raw = (unsigned char *)malloc(nb ? nb : 1);
    for (size_t i = 0; i < nb; i++) raw[i] = (unsigned char)(rnd() >> 56);
    moe_tensor_copy_from_host(t, raw, nb);
    free(raw);
    /* overwrite two thirds of the elements with ordinary and special values */
    double *v = (double *)malloc((size_t)(n ? n : 1) * sizeof *v);
    moe_tensor_read_f64(t, v, n);
    for (int64_t i = 0; i < n; i++) {
        int pick = (int)(i % 3);
        if (pick == 1) v[i] = ((double)(int64_t)(rnd() % 2000001) - 1000000.0) / 3000.0;
        else if (pick == 2) v[i] = specials[(rnd() >> 33) % (uint64_t)nspec];
    }
    /* the raw third stays raw: write back only the chosen ones via a second tensor */
    moe_tensor *u = mk(dtype, ndim, shape, CPU);
    if (u && moe_tensor_write_f64(u, v, n) == MOE_OK) {
        size_t nbu = moe_tensor_nbytes(u);
        unsigned char *a = (unsigned char *)malloc(nbu ? nbu : 1), *b = (unsigned char *)malloc(nbu ? nbu : 1);
        moe_tensor_copy_to_host(t, a, nbu);
        moe_tensor_copy_to_host(u, b, nbu);
        int bits = moe_dtype_bits(dtype);
        for (int64_t i = 0; i < n; i++) {
            if (i % 3 == 0) continue;
            if (bits >= 8) {
                size_t w = (size_t)bits / 8;
                memcpy(a + (size_t)i * w, b + (size_t)i * w, w);
            } else { /* nibble i */
                unsigned char m = (i & 1) ? 0xF0 : 0x0F;
                a[i >> 1] = (unsigned char)((a[i >> 1] & ~m) | (b[i >> 1] & m));
            }
        }
        moe_tensor_copy_from_host(t, a, nbu);
        free(a);
        free(b);
    }
    moe_tensor_free(u);
    free(v);
    return t;
}

static moe_tensor *to_gpu(const moe_tensor *t) {
    moe_tensor *g = NULL;
    if (moe_tensor_to_device(&g, t, GPU) != MOE_OK) {
        fprintf(stderr, "to_gpu failed: %s\n", moe_last_error());
        return NULL;
    }
    return g;
}

/* ----------------------------------------------------------------- tests -- */

static void test_info(void) {
    char buf[256];
    OK(moe_cuda_device_info(0, buf, sizeof buf));
    printf("device 0: %s\n", buf);
    CHECK(strstr(buf, "sm_") != NULL);
    CHECK_ERR(moe_cuda_device_info(moe_cuda_device_count() + 3, buf, sizeof buf), MOE_ERR_DEVICE,
              "index");
    moe_device bad = {MOE_DEVICE_CUDA, moe_cuda_device_count() + 3};
    moe_tensor *t = NULL;
    int64_t s1[1] = {4};
    CHECK(moe_tensor_new(&t, MOE_F32, 1, s1, bad) == MOE_ERR_DEVICE && t == NULL);
    OK(moe_synchronize(GPU));
}

static void test_roundtrip(void) {
    /* every dtype, raw bytes host -> device -> device -> host */
    int64_t sizes[] = {0, 2, 16, 34, 4098, 100002};
    for (int dt = 0; dt < MOE_DTYPE_COUNT; dt++)
        for (size_t k = 0; k < sizeof sizes / sizeof sizes[0]; k++) {
            moe_tensor *h = adversarial(dt, 1, &sizes[k]);
            moe_tensor *g = h ? to_gpu(h) : NULL, *g2 = NULL, *back = NULL;
            CHECK(g != NULL);
            if (!g) {
                moe_tensor_free(h);
                continue;
            }
            OK(moe_tensor_contiguous(&g2, g)); /* device -> device */
            OK(moe_tensor_to_device(&back, g2, CPU));
            char what[64];
            snprintf(what, sizeof what, "round trip %s [%lld]", moe_dtype_name(dt), (long long)sizes[k]);
            CHECK(back && same_bytes(what, h, back));
            CHECK(moe_tensor_device(g2).type == MOE_DEVICE_CUDA);
            moe_tensor_free(h);
            moe_tensor_free(g);
            moe_tensor_free(g2);
            moe_tensor_free(back);
        }
    /* raw host copies, and misaligned contiguous views (byte-copy head/tail paths) */
    int64_t n = 1000;
    moe_tensor *h = adversarial(MOE_U8, 1, &n), *g = h ? to_gpu(h) : NULL;
    CHECK(g != NULL);
    if (!g) return;
    for (int64_t start = 0; start < 20; start += 3) {
        moe_tensor *hv = NULL, *gv = NULL, *gd = NULL, *hd = NULL;
        int64_t len = 1000 - 2 * start - 1;
        OK(moe_tensor_narrow(&hv, h, 0, start, len));
        OK(moe_tensor_narrow(&gv, g, 0, start, len));
        gd = mk(MOE_U8, 1, &len, GPU);
        hd = mk(MOE_U8, 1, &len, CPU);
        /* device view at offset `start` into a fresh buffer, and into an offset view */
        OK(moe_tensor_copy(gd, gv));
        OK(moe_tensor_copy(hd, hv));
        CHECK(same_bytes("narrowed u8 copy", hd, gd));
        moe_tensor *gd2 = NULL, *hd2 = NULL, *gdv = NULL, *hdv = NULL;
        int64_t len2 = len + 5;
        gd2 = mk(MOE_U8, 1, &len2, GPU);
        hd2 = mk(MOE_U8, 1, &len2, CPU);
        OK(moe_tensor_fill(gd2, 7));
        OK(moe_tensor_fill(hd2, 7));
        OK(moe_tensor_narrow(&gdv, gd2, 0, 5 - start % 5, len));
        OK(moe_tensor_narrow(&hdv, hd2, 0, 5 - start % 5, len));
        OK(moe_tensor_copy(gdv, gv));
        OK(moe_tensor_copy(hdv, hv));
        CHECK(same_bytes("u8 copy into an offset view", hd2, gd2));
        moe_tensor_free(hv); moe_tensor_free(gv); moe_tensor_free(gd); moe_tensor_free(hd);
        moe_tensor_free(gd2); moe_tensor_free(hd2); moe_tensor_free(gdv); moe_tensor_free(hdv);
    }
    unsigned char in[1000], out[1000];
    for (int i = 0; i < 1000; i++) in[i] = (unsigned char)(rnd() >> 40);
    OK(moe_tensor_copy_from_host(g, in, sizeof in));
    OK(moe_tensor_copy_to_host(g, out, sizeof out));
    CHECK(memcmp(in, out, sizeof in) == 0);
    moe_tensor_free(h);
    moe_tensor_free(g);
}

/* Apply the same view-and-copy to a CPU and a CUDA copy of src; compare the results. */
static void strided_case(const char *what, int dtype, int64_t r, int64_t c) {
    int64_t shape[2] = {r, c};
    moe_tensor *h = adversarial(dtype, 2, shape), *g = h ? to_gpu(h) : NULL;
    CHECK(g != NULL);
    if (!g) {
        moe_tensor_free(h);
        return;
    }
    moe_tensor *ht = NULL, *gt = NULL, *hc = NULL, *gc = NULL;
    /* transpose -> contiguous */
    OK(moe_tensor_transpose(&ht, h, 0, 1));
    OK(moe_tensor_transpose(&gt, g, 0, 1));
    OK(moe_tensor_contiguous(&hc, ht));
    OK(moe_tensor_contiguous(&gc, gt));
    char msg[96];
    snprintf(msg, sizeof msg, "%s: transpose %s", what, moe_dtype_name(dtype));
    CHECK(hc && gc && same_bytes(msg, hc, gc));
    moe_tensor_free(hc); moe_tensor_free(gc);
    hc = gc = NULL;
    /* narrow both dims (odd start) -> contiguous */
    moe_tensor *hn = NULL, *gn = NULL, *hn2 = NULL, *gn2 = NULL;
    OK(moe_tensor_narrow(&hn, h, 0, 1, r - 3));
    OK(moe_tensor_narrow(&gn, g, 0, 1, r - 3));
    OK(moe_tensor_narrow(&hn2, hn, 1, 1, c - 4));
    OK(moe_tensor_narrow(&gn2, gn, 1, 1, c - 4));
    OK(moe_tensor_contiguous(&hc, hn2));
    OK(moe_tensor_contiguous(&gc, gn2));
    snprintf(msg, sizeof msg, "%s: narrow %s", what, moe_dtype_name(dtype));
    CHECK(hc && gc && same_bytes(msg, hc, gc));
    /* contiguous -> strided destination (a transposed view of a fresh tensor) */
    int64_t tshape[2] = {c, r};
    moe_tensor *hd = mk(dtype, 2, tshape, CPU), *gd = mk(dtype, 2, tshape, GPU);
    moe_tensor *hdt = NULL, *gdt = NULL;
    OK(moe_tensor_fill(hd, 1));
    OK(moe_tensor_fill(gd, 1));
    OK(moe_tensor_transpose(&hdt, hd, 0, 1));
    OK(moe_tensor_transpose(&gdt, gd, 0, 1));
    OK(moe_tensor_copy(hdt, h));
    OK(moe_tensor_copy(gdt, g));
    snprintf(msg, sizeof msg, "%s: copy into transposed %s", what, moe_dtype_name(dtype));
    CHECK(same_bytes(msg, hd, gd));
    /* narrowed destination view (odd offset: packed nibbles that do not pair into bytes) */
    moe_tensor_free(hc); moe_tensor_free(gc);
    hc = mk(dtype, 2, shape, CPU);
    gc = mk(dtype, 2, shape, GPU);
    OK(moe_tensor_fill(hc, 2));
    OK(moe_tensor_fill(gc, 2));
    moe_tensor *hcv = NULL, *gcv = NULL, *hcv2 = NULL, *gcv2 = NULL;
    OK(moe_tensor_narrow(&hcv, hc, 0, 1, r - 3));
    OK(moe_tensor_narrow(&gcv, gc, 0, 1, r - 3));
    OK(moe_tensor_narrow(&hcv2, hcv, 1, 1, c - 4));
    OK(moe_tensor_narrow(&gcv2, gcv, 1, 1, c - 4));
    OK(moe_tensor_copy(hcv2, hn2));
    OK(moe_tensor_copy(gcv2, gn2));
    snprintf(msg, sizeof msg, "%s: copy into narrowed %s", what, moe_dtype_name(dtype));
    CHECK(same_bytes(msg, hc, gc));
    /* overlapping copy inside one storage (shift a row range by one row) */
    moe_tensor *ha = NULL, *hb = NULL, *ga = NULL, *gb = NULL;
    OK(moe_tensor_narrow(&ha, h, 0, 0, r - 1));
    OK(moe_tensor_narrow(&hb, h, 0, 1, r - 1));
    OK(moe_tensor_narrow(&ga, g, 0, 0, r - 1));
    OK(moe_tensor_narrow(&gb, g, 0, 1, r - 1));
    OK(moe_tensor_copy(hb, ha));
    OK(moe_tensor_copy(gb, ga));
    snprintf(msg, sizeof msg, "%s: overlapping copy %s", what, moe_dtype_name(dtype));
    CHECK(same_bytes(msg, h, g));
    moe_tensor *all[] = {h, g, ht, gt, hc, gc, hn, gn, hn2, gn2, hd, gd, hdt, gdt,
                         hcv, gcv, hcv2, gcv2, ha, hb, ga, gb};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) moe_tensor_free(all[i]);
}

static void test_strided(void) {
    /* same-dtype strided copies move raw bits; use dtypes whose random bits are all
     * canonical values, plus the packed ones */
    strided_case("strided", MOE_F32, 33, 66);
    strided_case("strided", MOE_I64, 17, 10);
    strided_case("strided", MOE_U8, 65, 130);
    strided_case("strided", MOE_E2M1, 34, 66);
    strided_case("strided", MOE_I4, 20, 34);
    strided_case("strided", MOE_F8E4M3, 9, 12);
    /* a 4-d permutation */
    int64_t shape[4] = {3, 5, 7, 4};
    moe_tensor *h = adversarial(MOE_I16, 4, shape), *g = h ? to_gpu(h) : NULL;
    moe_tensor *h1 = NULL, *g1 = NULL, *h2 = NULL, *g2 = NULL, *hc = NULL, *gc = NULL;
    OK(moe_tensor_transpose(&h1, h, 0, 3));
    OK(moe_tensor_transpose(&g1, g, 0, 3));
    OK(moe_tensor_transpose(&h2, h1, 1, 2));
    OK(moe_tensor_transpose(&g2, g1, 1, 2));
    OK(moe_tensor_contiguous(&hc, h2));
    OK(moe_tensor_contiguous(&gc, g2));
    CHECK(hc && gc && same_bytes("4-d permutation i16", hc, gc));
    moe_tensor *all[] = {h, g, h1, g1, h2, g2, hc, gc};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) moe_tensor_free(all[i]);
}

static void test_cast_pairs(void) {
    int bad = 0;
    for (int s = 0; s < MOE_DTYPE_COUNT; s++) {
        int64_t n = 4098;
        int64_t shape2[2] = {62, 66};
        moe_tensor *h = adversarial(s, 1, &n), *h2 = adversarial(s, 2, shape2);
        moe_tensor *g = h ? to_gpu(h) : NULL, *g2 = h2 ? to_gpu(h2) : NULL;
        moe_tensor *h2t = NULL, *g2t = NULL;
        OK(moe_tensor_transpose(&h2t, h2, 0, 1));
        OK(moe_tensor_transpose(&g2t, g2, 0, 1));
        for (int d = 0; d < MOE_DTYPE_COUNT && g && g2t; d++) {
            moe_tensor *hc = NULL, *gc = NULL, *hct = NULL, *gct = NULL;
            OK(moe_tensor_cast(&hc, h, d));
            OK(moe_tensor_cast(&gc, g, d));
            char what[96];
            snprintf(what, sizeof what, "cast %s -> %s", moe_dtype_name(s), moe_dtype_name(d));
            int same = hc && gc && same_bytes(what, hc, gc);
            /* strided source (transposed view) */
            OK(moe_tensor_cast(&hct, h2t, d));
            OK(moe_tensor_cast(&gct, g2t, d));
            snprintf(what, sizeof what, "cast transposed %s -> %s", moe_dtype_name(s), moe_dtype_name(d));
            /* same-dtype strided copies: the CPU quiets NaN payloads going through f32,
             * CUDA copies the bits; compare those through a value check instead */
            if (s == d && (s == MOE_F16 || s == MOE_BF16 || s == MOE_F8E5M2)) {
                moe_tensor *a = NULL, *b = NULL;
                OK(moe_tensor_cast(&a, hct, MOE_F32));
                OK(moe_tensor_cast(&b, gct, MOE_F32));
                int64_t m = moe_tensor_numel(a);
                double *x = (double *)malloc((size_t)m * sizeof *x), *y = (double *)malloc((size_t)m * sizeof *y);
                OK(moe_tensor_read_f64(a, x, m));
                OK(moe_tensor_read_f64(b, y, m));
                int eq = 1;
                for (int64_t i = 0; i < m; i++)
                    if (!(x[i] == y[i] || (x[i] != x[i] && y[i] != y[i]))) eq = 0;
                CHECK(eq);
                free(x);
                free(y);
                moe_tensor_free(a);
                moe_tensor_free(b);
            } else {
                same = same && hct && gct && same_bytes(what, hct, gct);
            }
            CHECK(same);
            if (!same) bad++;
            moe_tensor_free(hc); moe_tensor_free(gc); moe_tensor_free(hct); moe_tensor_free(gct);
        }
        moe_tensor *all[] = {h, g, h2, g2, h2t, g2t};
        for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) moe_tensor_free(all[i]);
    }
    printf("cast pairs: %d of %d dtype pairs differ from the CPU\n", bad,
           MOE_DTYPE_COUNT * MOE_DTYPE_COUNT);
}

static void test_rng(void) {
    int dtypes[] = {MOE_F32, MOE_BF16, MOE_F16, MOE_F8E4M3, MOE_E2M1, MOE_I32, MOE_BOOL};
    int64_t sizes[] = {1, 3, 4, 4097, 65536 + 6};
    uint64_t seeds[] = {0, 42, 0xFFFFFFFFFFFFFFFFull};
    int bad = 0, total = 0;
    for (size_t a = 0; a < sizeof dtypes / sizeof dtypes[0]; a++)
        for (size_t b = 0; b < sizeof sizes / sizeof sizes[0]; b++)
            for (int kind = 0; kind < 2; kind++) {
                int dt = dtypes[a];
                int64_t n = sizes[b];
                if (dt == MOE_E2M1 && (n & 1)) n++;
                uint64_t seed = seeds[(a + b) % 3];
                moe_tensor *h = mk(dt, 1, &n, CPU), *g = mk(dt, 1, &n, GPU);
                if (!h || !g) {
                    CHECK(0);
                    moe_tensor_free(h);
                    moe_tensor_free(g);
                    continue;
                }
                if (kind == 0) {
                    OK(moe_tensor_rand_uniform(h, seed, -2.0, 3.0));
                    OK(moe_tensor_rand_uniform(g, seed, -2.0, 3.0));
                } else {
                    OK(moe_tensor_rand_normal(h, seed, 0.5, 2.0));
                    OK(moe_tensor_rand_normal(g, seed, 0.5, 2.0));
                }
                char what[96];
                snprintf(what, sizeof what, "rand %s %s [%lld] seed %llu", kind ? "normal" : "uniform",
                         moe_dtype_name(dt), (long long)n, (unsigned long long)seed);
                int same = same_bytes(what, h, g);
                CHECK(same);
                bad += !same;
                total++;
                moe_tensor_free(h);
                moe_tensor_free(g);
            }
    /* into a strided view: element order is the view's row-major order */
    int64_t shape[2] = {40, 66};
    moe_tensor *h = mk(MOE_BF16, 2, shape, CPU), *g = mk(MOE_BF16, 2, shape, GPU);
    moe_tensor *hv = NULL, *gv = NULL;
    OK(moe_tensor_fill(h, 0.25));
    OK(moe_tensor_fill(g, 0.25));
    OK(moe_tensor_transpose(&hv, h, 0, 1));
    OK(moe_tensor_transpose(&gv, g, 0, 1));
    OK(moe_tensor_rand_normal(hv, 7, 0.0, 1.0));
    OK(moe_tensor_rand_normal(gv, 7, 0.0, 1.0));
    CHECK(same_bytes("rand normal into transposed bf16 view", h, g));
    /* the values look normal: mean ~ 0, variance ~ 1 */
    int64_t n = 40 * 66;
    double *v = (double *)malloc((size_t)n * sizeof *v), s1 = 0, s2 = 0;
    OK(moe_tensor_read_f64(g, v, n));
    for (int64_t i = 0; i < n; i++) {
        s1 += v[i];
        s2 += v[i] * v[i];
    }
    CHECK(fabs(s1 / n) < 0.1 && fabs(s2 / n - 1.0) < 0.15);
    free(v);
    moe_tensor_free(h); moe_tensor_free(g); moe_tensor_free(hv); moe_tensor_free(gv);
    printf("rng: %d of %d (dtype, size, kind) cases differ from the CPU\n", bad, total);
}

static void test_fill_arange(void) {
    double values[] = {1.5, -3.7, NAN, 1e10, -1e300, -0.0, 0.3, 300.7, 3e9};
    int bad = 0;
    for (int dt = 0; dt < MOE_DTYPE_COUNT; dt++) {
        int64_t shape[2] = {31, 42};
        moe_tensor *h = mk(dt, 2, shape, CPU), *g = mk(dt, 2, shape, GPU);
        if (!h || !g) {
            CHECK(0);
            moe_tensor_free(h);
            moe_tensor_free(g);
            continue;
        }
        char what[96];
        for (size_t k = 0; k < sizeof values / sizeof values[0]; k++) {
            OK(moe_tensor_fill(h, values[k]));
            OK(moe_tensor_fill(g, values[k]));
            snprintf(what, sizeof what, "fill %s %g", moe_dtype_name(dt), values[k]);
            int same = same_bytes(what, h, g);
            CHECK(same);
            bad += !same;
        }
        OK(moe_tensor_arange(h, -200.25, 0.37));
        OK(moe_tensor_arange(g, -200.25, 0.37));
        snprintf(what, sizeof what, "arange %s", moe_dtype_name(dt));
        int same = same_bytes(what, h, g);
        CHECK(same);
        bad += !same;
        /* into a view: transposed, then narrowed on the last dimension at an odd start */
        moe_tensor *hv = NULL, *gv = NULL, *hv2 = NULL, *gv2 = NULL;
        OK(moe_tensor_transpose(&hv, h, 0, 1));
        OK(moe_tensor_transpose(&gv, g, 0, 1));
        OK(moe_tensor_arange(hv, 1e6, -12345.678));
        OK(moe_tensor_arange(gv, 1e6, -12345.678));
        OK(moe_tensor_narrow(&hv2, h, 1, 1, 40));
        OK(moe_tensor_narrow(&gv2, g, 1, 1, 40));
        OK(moe_tensor_fill(hv2, -2.5));
        OK(moe_tensor_fill(gv2, -2.5));
        snprintf(what, sizeof what, "arange/fill views %s", moe_dtype_name(dt));
        same = same_bytes(what, h, g);
        CHECK(same);
        bad += !same;
        moe_tensor_free(h); moe_tensor_free(g); moe_tensor_free(hv); moe_tensor_free(gv);
        moe_tensor_free(hv2); moe_tensor_free(gv2);
    }
    printf("fill/arange: %d cases differ from the CPU\n", bad);
}

static void test_graph(void) {
    int64_t n = 4096;
    moe_tensor *hsrc = adversarial(MOE_F32, 1, &n);
    moe_tensor *src = hsrc ? to_gpu(hsrc) : NULL;
    moe_tensor *copy = mk(MOE_F32, 1, &n, GPU), *cast = mk(MOE_BF16, 1, &n, GPU);
    moe_tensor *noise = mk(MOE_F16, 1, &n, GPU), *doomed = mk(MOE_F32, 1, &n, GPU);
    if (!src || !copy || !cast || !noise || !doomed) {
        CHECK(0);
        return;
    }
    OK(moe_tensor_fill(copy, 0));
    OK(moe_tensor_fill(cast, 0));
    OK(moe_synchronize(GPU));
    moe_mem_info m0;
    OK(moe_mem_stats(&m0));

    CHECK(moe_graph_capturing() == 0);
    OK(moe_graph_begin(GPU));
    CHECK(moe_graph_capturing() == 1);
    CHECK_ERR(moe_graph_begin(GPU), MOE_ERR_STATE, "already");
    OK(moe_tensor_copy(copy, src));
    OK(moe_tensor_cast_into(cast, src));
    OK(moe_tensor_rand_normal(noise, 3, 0.0, 1.0));
    moe_tensor_free(doomed); /* freed during capture: kept until the graph goes */
    doomed = NULL;
    /* refused inside a capture, with a message that says what to do */
    moe_tensor *t = NULL;
    CHECK_ERR(moe_tensor_new(&t, MOE_F32, 1, &n, GPU), MOE_ERR_STATE, "allocate outputs before capture");
    CHECK(t == NULL);
    CHECK(moe_graph_capturing() == 1); /* the refusal did not end the capture */
    moe_graph *gr = NULL;
    OK(moe_graph_end(&gr));
    CHECK(gr != NULL && moe_graph_capturing() == 0);
    /* capture recorded the work instead of running it */
    double first[2] = {-1, -1};
    moe_tensor *zc = NULL;
    OK(moe_tensor_narrow(&zc, copy, 0, 0, 2));
    OK(moe_tensor_read_f64(zc, first, 2));
    CHECK(first[0] == 0.0 && first[1] == 0.0);
    moe_tensor_free(zc);

    /* new input, replay, compare with the CPU */
    moe_tensor *hsrc2 = adversarial(MOE_F32, 1, &n);
    size_t nb = moe_tensor_nbytes(hsrc2);
    unsigned char *buf = (unsigned char *)malloc(nb);
    OK(moe_tensor_copy_to_host(hsrc2, buf, nb));
    OK(moe_tensor_copy_from_host(src, buf, nb));
    OK(moe_graph_replay(gr));
    OK(moe_synchronize(GPU));
    moe_tensor *hcast = NULL, *hnoise = mk(MOE_F16, 1, &n, CPU);
    OK(moe_tensor_cast(&hcast, hsrc2, MOE_BF16));
    OK(moe_tensor_rand_normal(hnoise, 3, 0.0, 1.0));
    CHECK(same_bytes("graph replay: copy", hsrc2, copy));
    CHECK(hcast && same_bytes("graph replay: cast", hcast, cast));
    CHECK(same_bytes("graph replay: rand", hnoise, noise));

    float us[8];
    OK(moe_graph_time(gr, 2, 8, us));
    int pos = 1;
    for (int i = 0; i < 8; i++) pos = pos && us[i] > 0.0f && us[i] < 1e6f;
    CHECK(pos);
    printf("graph of 3 kernels: replay %.1f us (first of 8 timed)\n", us[0]);
    moe_graph_free(gr);

    /* abort: the stream works normally afterwards */
    OK(moe_graph_begin(GPU));
    OK(moe_tensor_fill(copy, 5));
    moe_graph_abort();
    CHECK(moe_graph_capturing() == 0);
    CHECK_ERR(moe_graph_end(&gr), MOE_ERR_STATE, "no capture");
    OK(moe_tensor_fill(copy, 9));
    double v[1] = {0};
    moe_tensor *one = NULL;
    OK(moe_tensor_narrow(&one, copy, 0, 100, 1));
    OK(moe_tensor_read_f64(one, v, 1));
    CHECK(v[0] == 9.0);
    moe_tensor_free(one);

    /* a host copy inside a capture is refused and the capture can still be aborted */
    OK(moe_graph_begin(GPU));
    CHECK(moe_tensor_copy_to_host(src, buf, nb) != MOE_OK);
    moe_graph_abort();
    OK(moe_synchronize(GPU));

    moe_mem_info m1;
    OK(moe_mem_stats(&m1));
    CHECK(m1.device_bytes <= m0.device_bytes);
    free(buf);
    moe_tensor *all[] = {hsrc, src, copy, cast, noise, hsrc2, hcast, hnoise};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) moe_tensor_free(all[i]);
}

static void test_memory(void) {
    moe_mem_info a, b, c;
    OK(moe_mem_stats(&a));
    int64_t shape[2] = {1024, 1024};
    moe_tensor *t = mk(MOE_F32, 2, shape, GPU);
    moe_tensor *v = NULL;
    OK(moe_tensor_narrow(&v, t, 0, 10, 100)); /* a view adds no storage */
    OK(moe_mem_stats(&b));
    CHECK(b.device_bytes - a.device_bytes == 4 * 1024 * 1024);
    CHECK(b.peak_device_bytes >= b.device_bytes);
    CHECK(b.live_storages == a.live_storages + 1 && b.live_tensors == a.live_tensors + 2);
    moe_tensor_free(t);
    OK(moe_mem_stats(&c));
    CHECK(c.device_bytes == b.device_bytes); /* the view keeps the storage */
    moe_tensor_free(v);
    OK(moe_mem_stats(&c));
    CHECK(c.device_bytes == a.device_bytes && c.live_tensors == a.live_tensors);
    /* empty tensors and an absurd allocation */
    int64_t z = 0;
    moe_tensor *e = mk(MOE_F32, 1, &z, GPU);
    CHECK(e != NULL);
    moe_tensor_free(e);
    int64_t huge[2] = {1ll << 30, 1ll << 20}; /* 4 PiB */
    moe_tensor *hh = NULL;
    CHECK_ERR(moe_tensor_new(&hh, MOE_F32, 2, huge, GPU), MOE_ERR_NOMEM, "out of device memory");
    OK(moe_mem_stats(&c));
    CHECK(c.device_bytes == a.device_bytes);
}

int main(void) {
    if (moe_cuda_device_count() == 0) {
        printf("skipped: no CUDA device (moe_cuda_built() = %d)\n", moe_cuda_built());
        return 77;
    }
    test_info();
    test_roundtrip();
    test_strided();
    test_cast_pairs();
    test_rng();
    test_fill_arange();
    test_graph();
    test_memory();
    printf("test_cuda_core: %d checks, %d failures\n", checks, failures);
    return failures ? 1 : 0;
}
