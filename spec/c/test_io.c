/* test_io.c -- C tests of file I/O: .npy and safetensors round trips of every dtype, files
 * built byte by byte here (expected values worked out independently of the engine), and
 * every malformed case -> the right status and a message with the key word, no crash. */
#define _POSIX_C_SOURCE 200809L
#include "moe.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include "check.h"

static const moe_device CPU = {MOE_DEVICE_CPU, 0};
static char dir[256];

static const char *tpath(const char *name) {
    static char buf[4][512];
    static int k;
    k = (k + 1) % 4;
    snprintf(buf[k], sizeof buf[k], "%s/%s", dir, name);
    return buf[k];
}

static int write_file(const char *path, const void *p, size_t n) {
    FILE *f = fopen(path, "wb");
    if (!f) return -1;
    size_t w = n ? fwrite(p, 1, n, f) : 0;
    fclose(f);
    return w == n ? 0 : -1;
}

static unsigned char *read_file(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long sz = ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *p = (unsigned char *)malloc(sz > 0 ? (size_t)sz : 1);
    *n = fread(p, 1, (size_t)sz, f);
    fclose(f);
    return p;
}

static int file_exists(const char *path) {
    struct stat sb;
    return stat(path, &sb) == 0;
}

/* Deterministic test bytes (a 32-bit LCG), independent of the engine's RNG. */
static void fill_bytes(unsigned char *p, size_t n, uint32_t seed, int dtype) {
    uint32_t s = seed * 2654435761u + 1;
    for (size_t i = 0; i < n; i++) {
        s = s * 1664525u + 1013904223u;
        p[i] = (unsigned char)(s >> 24);
        if (dtype == MOE_BOOL) p[i] &= 1;
    }
}

/* A host tensor with pseudo-random raw contents; *bytes receives a copy (caller frees). */
static moe_tensor *mk_random(int dtype, int ndim, const int64_t *shape, uint32_t seed,
                             unsigned char **bytes, size_t *nbytes) {
    moe_tensor *t = NULL;
    if (moe_tensor_new(&t, dtype, ndim, shape, CPU) != MOE_OK) {
        fprintf(stderr, "moe_tensor_new failed: %s\n", moe_last_error());
        return NULL;
    }
    *nbytes = moe_tensor_nbytes(t);
    *bytes = (unsigned char *)malloc(*nbytes ? *nbytes : 1);
    fill_bytes(*bytes, *nbytes, seed, dtype);
    moe_tensor_copy_from_host(t, *bytes, *nbytes);
    return t;
}

static int same_bytes(const moe_tensor *t, const unsigned char *want, size_t n) {
    if (moe_tensor_nbytes(t) != n) return 0;
    unsigned char *got = (unsigned char *)malloc(n ? n : 1);
    int ok = moe_tensor_copy_to_host(t, got, n) == MOE_OK && memcmp(got, want, n) == 0;
    free(got);
    return ok;
}

static int same_shape(const moe_tensor *t, int ndim, const int64_t *shape) {
    if (moe_tensor_ndim(t) != ndim) return 0;
    for (int d = 0; d < ndim; d++)
        if (moe_tensor_dim(t, d) != shape[d]) return 0;
    return 1;
}

/* ------------------------------------------------------------------ .npy -- */

/* .npy bytes: version major, the dict text, then data; header padded to 64 like numpy. */
static unsigned char *npy_bytes(int major, const char *dict, const void *data, size_t nd,
                                size_t *n) {
    size_t pre = major == 1 ? 10 : 12, dl = strlen(dict);
    size_t hl = dl + 1;
    hl += (64 - (pre + hl) % 64) % 64;
    *n = pre + hl + nd;
    unsigned char *p = (unsigned char *)calloc(1, *n);
    memcpy(p, "\x93NUMPY", 6);
    p[6] = (unsigned char)major;
    p[7] = 0;
    p[8] = (unsigned char)(hl & 0xFF);
    p[9] = (unsigned char)(hl >> 8);
    memcpy(p + pre, dict, dl);
    memset(p + pre + dl, ' ', hl - dl - 1);
    p[pre + hl - 1] = '\n';
    if (nd) memcpy(p + pre + hl, data, nd);
    return p;
}

static void test_npy_roundtrip(void) {
    static const struct {
        int dtype;
        const char *descr;
    } cases[] = {{MOE_F32, "'<f4'"}, {MOE_F16, "'<f2'"}, {MOE_BF16, "'<u2'"},
                 {MOE_I8, "'|i1'"},  {MOE_I16, "'<i2'"}, {MOE_I32, "'<i4'"},
                 {MOE_I64, "'<i8'"}, {MOE_U8, "'|u1'"},  {MOE_BOOL, "'|b1'"}};
    static const struct {
        int ndim;
        int64_t shape[3];
        const char *text;
    } shapes[] = {{2, {3, 5, 0}, "(3, 5)"}, {1, {7, 0, 0}, "(7,)"}, {0, {0, 0, 0}, "()"},
                  {3, {2, 0, 4}, "(2, 0, 4)"}};
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++)
        for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
            unsigned char *want;
            size_t n;
            moe_tensor *t = mk_random(cases[c].dtype, shapes[s].ndim, shapes[s].shape,
                                      (uint32_t)(c * 10 + s), &want, &n);
            const char *path = tpath("rt.npy");
            CHECK(moe_npy_write(path, t) == MOE_OK);
            CHECK(!file_exists(tpath("rt.npy.tmp")));
            /* the file itself, checked by hand */
            size_t fn = 0;
            unsigned char *fb = read_file(path, &fn);
            CHECK(fb && fn >= 10 && memcmp(fb, "\x93NUMPY\x01\x00", 8) == 0);
            if (fb && fn >= 10) {
                size_t hl = (size_t)fb[8] | (size_t)fb[9] << 8;
                CHECK((10 + hl) % 64 == 0);
                CHECK(fn == 10 + hl + n);
                CHECK(fb[10 + hl - 1] == '\n');
                char *hdr = (char *)calloc(1, hl + 1);
                memcpy(hdr, fb + 10, hl);
                CHECK(strstr(hdr, cases[c].descr) != NULL);
                CHECK(strstr(hdr, "'fortran_order': False") != NULL);
                CHECK(strstr(hdr, shapes[s].text) != NULL);
                /* bf16 is marked by a trailing comment, so the dict keeps numpy's three keys */
                CHECK((strstr(hdr, "} # moe_dtype: bf16") != NULL) == (cases[c].dtype == MOE_BF16));
                CHECK(strstr(hdr, "'moe_dtype'") == NULL);
                CHECK(memcmp(fb + 10 + hl, want, n) == 0);
                free(hdr);
            }
            free(fb);
            moe_tensor *r = NULL;
            CHECK(moe_npy_read(path, &r) == MOE_OK);
            if (r) {
                CHECK(moe_tensor_dtype(r) == cases[c].dtype);
                CHECK(same_shape(r, shapes[s].ndim, shapes[s].shape));
                CHECK(same_bytes(r, want, n));
            }
            moe_tensor_free(r);
            moe_tensor_free(t);
            free(want);
        }

    /* the writer takes views (copied through contiguous) */
    int64_t sh[2] = {3, 4};
    unsigned char *want;
    size_t n;
    moe_tensor *t = mk_random(MOE_I32, 2, sh, 99, &want, &n);
    moe_tensor *tt = NULL, *r = NULL;
    CHECK(moe_tensor_transpose(&tt, t, 0, 1) == MOE_OK);
    CHECK(moe_npy_write(tpath("tr.npy"), tt) == MOE_OK);
    CHECK(moe_npy_read(tpath("tr.npy"), &r) == MOE_OK);
    if (r) {
        int64_t sh2[2] = {4, 3};
        CHECK(same_shape(r, 2, sh2));
        const int32_t *src = (const int32_t *)(const void *)want;
        const int32_t *got = (const int32_t *)moe_tensor_data(r);
        int ok = 1;
        for (int i = 0; i < 4; i++)
            for (int j = 0; j < 3; j++) ok &= got[i * 3 + j] == src[j * 4 + i];
        CHECK(ok);
        /* writing into a read tensor never changes the file (private mapping) */
        CHECK(moe_tensor_fill(r, 7) == MOE_OK);
        moe_tensor *r2 = NULL;
        CHECK(moe_npy_read(tpath("tr.npy"), &r2) == MOE_OK);
        if (r2) CHECK(((const int32_t *)moe_tensor_data(r2))[0] == src[0]);
        moe_tensor_free(r2);
    }
    moe_tensor_free(r);
    moe_tensor_free(tt);
    moe_tensor_free(t);
    free(want);

    /* dtypes without an .npy form */
    int dts[] = {MOE_F8E4M3, MOE_F8E5M2, MOE_E2M1, MOE_I4, MOE_UE8M0};
    for (size_t i = 0; i < sizeof dts / sizeof dts[0]; i++) {
        int64_t s2[1] = {4};
        moe_tensor *x = NULL;
        moe_tensor_new(&x, dts[i], 1, s2, CPU);
        CHECK_ERR(moe_npy_write(tpath("bad.npy"), x), MOE_ERR_DTYPE, "safetensors");
        CHECK(!file_exists(tpath("bad.npy")) && !file_exists(tpath("bad.npy.tmp")));
        moe_tensor_free(x);
    }
    CHECK_ERR(moe_npy_write(tpath("nodir/x.npy"), NULL), MOE_ERR_ARG, "t");
    moe_tensor *x = NULL;
    moe_tensor_new(&x, MOE_F32, 1, sh, CPU);
    CHECK_ERR(moe_npy_write(tpath("nodir/x.npy"), x), MOE_ERR_IO, "nodir/x.npy");
    moe_tensor_free(x);
}

static void test_npy_parse_variants(void) {
    size_t n;
    unsigned char *p;
    moe_tensor *t = NULL;
    double v[4];

    /* plain '<u2' -> i32 */
    const uint16_t u2[3] = {0, 1, 65535};
    p = npy_bytes(1, "{'descr': '<u2', 'fortran_order': False, 'shape': (3,), }", u2, 6, &n);
    CHECK(moe_npy_parse(p, n, &t) == MOE_OK);
    if (t) {
        CHECK(moe_tensor_dtype(t) == MOE_I32);
        CHECK(moe_tensor_read_f64(t, v, 3) == MOE_OK && v[0] == 0 && v[1] == 1 && v[2] == 65535);
    }
    moe_tensor_free(t);
    t = NULL;
    free(p);

    /* '<u2' + moe_dtype bf16 -> bf16 (0x3F80 = 1.0, 0xC000 = -2.0), version 2.0 */
    const uint16_t b16[2] = {0x3F80, 0xC000};
    p = npy_bytes(2, "{'descr': '<u2', 'fortran_order': False, 'shape': (1, 2), 'moe_dtype': 'bf16'}",
                  b16, 4, &n);
    CHECK(moe_npy_parse(p, n, &t) == MOE_OK);
    if (t) {
        CHECK(moe_tensor_dtype(t) == MOE_BF16);
        CHECK(moe_tensor_read_f64(t, v, 2) == MOE_OK && v[0] == 1.0 && v[1] == -2.0);
    }
    moe_tensor_free(t);
    t = NULL;
    free(p);

    /* the same marked by a trailing comment (what moelab writes; numpy ignores it) */
    p = npy_bytes(1, "{'descr': '<u2', 'fortran_order': False, 'shape': (1, 2), } # moe_dtype: bf16",
                  b16, 4, &n);
    CHECK(moe_npy_parse(p, n, &t) == MOE_OK);
    if (t) {
        CHECK(moe_tensor_dtype(t) == MOE_BF16);
        CHECK(moe_tensor_read_f64(t, v, 2) == MOE_OK && v[0] == 1.0 && v[1] == -2.0);
    }
    moe_tensor_free(t);
    t = NULL;
    free(p);
    /* any other comment is ignored: plain '<u2' -> i32 */
    p = npy_bytes(1, "{'descr': '<u2', 'fortran_order': False, 'shape': (2,), } # made by hand", b16, 4, &n);
    CHECK(moe_npy_parse(p, n, &t) == MOE_OK);
    if (t) CHECK(moe_tensor_dtype(t) == MOE_I32);
    moe_tensor_free(t);
    t = NULL;
    free(p);

    /* '<f8' -> f32, rounded to nearest even; version 3.0, double quotes */
    const double f8[3] = {0.1, -3.5, 1.0 + 1.0 / (1 << 24)}; /* the last is a tie -> 1.0 */
    p = npy_bytes(3, "{\"descr\": \"<f8\", \"fortran_order\": False, \"shape\": (3,)}", f8, 24, &n);
    CHECK(moe_npy_parse(p, n, &t) == MOE_OK);
    if (t) {
        CHECK(moe_tensor_dtype(t) == MOE_F32);
        CHECK(moe_tensor_read_f64(t, v, 3) == MOE_OK && v[0] == (double)0.1f && v[1] == -3.5 &&
              v[2] == 1.0);
    }
    moe_tensor_free(t);
    t = NULL;
    free(p);

    /* '<u4' -> i64 and '<u8' -> i64, with the over-range value refused */
    const uint32_t u4[2] = {4000000000u, 7};
    p = npy_bytes(1, "{'descr': '<u4', 'fortran_order': False, 'shape': (2,), }", u4, 8, &n);
    CHECK(moe_npy_parse(p, n, &t) == MOE_OK);
    if (t) {
        CHECK(moe_tensor_dtype(t) == MOE_I64);
        CHECK(((const int64_t *)moe_tensor_data(t))[0] == 4000000000LL);
    }
    moe_tensor_free(t);
    t = NULL;
    free(p);
    const uint64_t u8[2] = {5, (uint64_t)1 << 63};
    p = npy_bytes(1, "{'descr': '<u8', 'fortran_order': False, 'shape': (2,), }", u8, 16, &n);
    CHECK_ERR(moe_npy_parse(p, n, &t), MOE_ERR_DTYPE, "over the i64 maximum");
    CHECK(t == NULL);
    free(p);

    /* a file read misaligned data (header not padded to the item size): copied, same values */
    const int32_t i4v[2] = {-5, 123456};
    const char *d = "{'descr': '<i4', 'fortran_order': False, 'shape': (2,)}";
    size_t dl = strlen(d);
    n = 10 + dl + 1 + 8;
    p = (unsigned char *)calloc(1, n);
    memcpy(p, "\x93NUMPY\x01\x00", 8);
    p[8] = (unsigned char)(dl + 1);
    memcpy(p + 10, d, dl);
    p[10 + dl] = '\n'; /* data at offset 10 + 56 + 1 = 67: not a multiple of 4 */
    memcpy(p + 11 + dl, i4v, 8);
    CHECK(write_file(tpath("odd.npy"), p, n) == 0);
    CHECK(moe_npy_read(tpath("odd.npy"), &t) == MOE_OK);
    if (t) CHECK(moe_tensor_read_f64(t, v, 2) == MOE_OK && v[0] == -5 && v[1] == 123456);
    moe_tensor_free(t);
    t = NULL;
    free(p);
}

static void npy_bad(const char *dict, size_t data_bytes, int code, const char *needle) {
    size_t n;
    unsigned char zeros[64] = {0};
    unsigned char *p = npy_bytes(1, dict, zeros, data_bytes, &n);
    moe_tensor *t = NULL;
    CHECK_ERR(moe_npy_parse(p, n, &t), code, needle);
    CHECK(t == NULL);
    /* and the same through a file */
    CHECK(write_file(tpath("bad.npy"), p, n) == 0);
    CHECK_ERR(moe_npy_read(tpath("bad.npy"), &t), code, needle);
    CHECK(strstr(moe_last_error(), "bad.npy") != NULL);
    free(p);
}

static void test_npy_malformed(void) {
    moe_tensor *t = NULL;
    /* truncated / bad magic / header longer than the file / version */
    CHECK_ERR(moe_npy_parse("\x93NUMPY\x01", 7, &t), MOE_ERR_FORMAT, "too short");
    CHECK_ERR(moe_npy_parse("\x93NUMPZ\x01\x00\x10\x00{}", 12, &t), MOE_ERR_FORMAT, "magic");
    unsigned char big[80] = "\x93NUMPY\x01\x00";
    big[8] = 0xE8; /* 1000 */
    big[9] = 0x03;
    CHECK(write_file(tpath("a.npy"), big, sizeof big) == 0);
    CHECK_ERR(moe_npy_read(tpath("a.npy"), &t), MOE_ERR_FORMAT, "header length 1000 exceeds file size 80");
    CHECK(strstr(moe_last_error(), "moe_npy_read: ") == moe_last_error());
    CHECK_ERR(moe_npy_parse("\x93NUMPY\x04\x00\x00\x00\x00\x00", 12, &t), MOE_ERR_FORMAT, "version 4.0");
    CHECK_ERR(moe_npy_parse("\x93NUMPY\x02\x00\x00\x00", 10, &t), MOE_ERR_FORMAT, "too short");
    CHECK_ERR(moe_npy_parse(NULL, 0, &t), MOE_ERR_FORMAT, "too short");
    CHECK_ERR(moe_npy_parse(NULL, 5, &t), MOE_ERR_ARG, "data");
    CHECK(t == NULL);
    /* empty file, missing file, directory */
    CHECK(write_file(tpath("empty.npy"), "", 0) == 0);
    CHECK_ERR(moe_npy_read(tpath("empty.npy"), &t), MOE_ERR_FORMAT, "too short");
    CHECK_ERR(moe_npy_read(tpath("missing.npy"), &t), MOE_ERR_IO, "missing.npy");
    CHECK_ERR(moe_npy_read(dir, &t), MOE_ERR_IO, "not a regular file");

    npy_bad("{'descr': '<f4', 'fortran_order': True, 'shape': (2,), }", 8, MOE_ERR_UNSUPPORTED, "fortran_order");
    npy_bad("{'descr': '>f4', 'fortran_order': False, 'shape': (2,), }", 8, MOE_ERR_DTYPE, "big-endian");
    npy_bad("{'descr': '<c8', 'fortran_order': False, 'shape': (2,), }", 16, MOE_ERR_DTYPE, "unsupported dtype '<c8'");
    npy_bad("{'descr': '|O', 'fortran_order': False, 'shape': (2,), }", 16, MOE_ERR_DTYPE, "unsupported dtype");
    npy_bad("{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (2,), }", 8, MOE_ERR_DTYPE, "structured");
    npy_bad("{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }", 8, MOE_ERR_FORMAT, "too short");
    npy_bad("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 4611686018427387904), }", 8, MOE_ERR_FORMAT, "too many elements");
    npy_bad("{'descr': '<f4', 'fortran_order': False, 'shape': (1024, 1024), }", 8, MOE_ERR_FORMAT, "too short");
    /* found by fuzz_npy: an empty array whose other sizes overflow the strides */
    npy_bad("{'descr': '|b1', 'fortran_order': False, 'shape': (2, 0, 9223372036854775807, 12, 0), }", 0, MOE_ERR_FORMAT, "too many elements");
    npy_bad("{'descr': '<f4', 'fortran_order': False, 'shape': (2,) ", 8, MOE_ERR_FORMAT, "header dict");
    npy_bad("{'descr': '<f4', 'fortran_order': False, 'shape': (2), }", 8, MOE_ERR_FORMAT, "tuple");
    npy_bad("{'descr': '<f4', 'fortran_order': False, 'shape': (-2,), }", 8, MOE_ERR_FORMAT, "non-negative");
    npy_bad("{'descr': '<f4', 'shape': (2,), }", 8, MOE_ERR_FORMAT, "missing key 'fortran_order'");
    npy_bad("{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (2,)}", 8, MOE_ERR_FORMAT, "duplicate");
    npy_bad("{'descr': '<f4', 'fortran_order': False, 'shape': (2,), 'x': 1}", 8, MOE_ERR_FORMAT, "unknown key");
    npy_bad("{'descr': '<f4', 'fortran_order': Nope, 'shape': (2,)}", 8, MOE_ERR_FORMAT, "True or False");
    npy_bad("{'descr': '<f4', 'fortran_order': False, 'shape': (2,)} x", 8, MOE_ERR_FORMAT, "after the dict");
    npy_bad("{'descr': '<i4', 'fortran_order': False, 'shape': (2,), 'moe_dtype': 'bf16'}", 8, MOE_ERR_FORMAT, "needs descr '<u2'");
    npy_bad("{'descr': '<u2', 'fortran_order': False, 'shape': (2,), 'moe_dtype': 'f8'}", 8, MOE_ERR_FORMAT, "expected 'bf16'");
    npy_bad("{'descr': '<f4', 'fortran_order': False, 'shape': (1,1,1,1,1,1,1,1,1), }", 8, MOE_ERR_SHAPE, "at most 8");
    npy_bad("{'descr': '<f4\\x', 'fortran_order': False, 'shape': (2,), }", 8, MOE_ERR_FORMAT, "escapes");
}

/* ------------------------------------------------------------ safetensors -- */

/* safetensors bytes from a header text (padded as given) and a data section. */
static unsigned char *st_bytes(const char *hdr, const void *data, size_t nd, size_t *n) {
    size_t hl = strlen(hdr);
    *n = 8 + hl + nd;
    unsigned char *p = (unsigned char *)calloc(1, *n);
    for (int k = 0; k < 8; k++) p[k] = (unsigned char)((uint64_t)hl >> (8 * k));
    memcpy(p + 8, hdr, hl);
    if (nd) memcpy(p + 8 + hl, data, nd);
    return p;
}

static void test_st_roundtrip(void) {
    static const struct {
        int dtype;
        const char *stname;
    } cases[] = {{MOE_F32, "F32"},     {MOE_F16, "F16"},         {MOE_BF16, "BF16"},
                 {MOE_F8E4M3, "F8_E4M3"}, {MOE_F8E5M2, "F8_E5M2"}, {MOE_E2M1, "F4"},
                 {MOE_I4, "U8"},       {MOE_UE8M0, "F8_E8M0"},   {MOE_U8, "U8"},
                 {MOE_I8, "I8"},       {MOE_I16, "I16"},         {MOE_I32, "I32"},
                 {MOE_I64, "I64"},     {MOE_BOOL, "BOOL"}};
    enum { NC = sizeof cases / sizeof cases[0] };
    /* odd sizes so that byte counts of the narrow types are not multiples of 8 */
    int64_t shape[NC][2];
    moe_tensor *ts[NC];
    unsigned char *want[NC];
    size_t nb[NC];
    char names[NC][32];
    const char *np[NC];
    for (int i = 0; i < NC; i++) {
        shape[i][0] = 3;
        shape[i][1] = (cases[i].dtype == MOE_E2M1 || cases[i].dtype == MOE_I4) ? 6 : 5;
        ts[i] = mk_random(cases[i].dtype, 2, shape[i], (uint32_t)(100 + i), &want[i], &nb[i]);
        snprintf(names[i], sizeof names[i], "layer.%d.%s", i, moe_dtype_name(cases[i].dtype));
        np[i] = names[i];
    }
    const char *mk[3] = {"model", "quote\"and\\back", "unicode"};
    const char *mv[3] = {"qwen3", "line\nbreak", "\xc3\xa9t\xc3\xa9"};
    const char *path = tpath("rt.safetensors");
    CHECK(moe_st_write(path, NC, np, (const moe_tensor *const *)ts, 3, mk, mv) == MOE_OK);
    CHECK(!file_exists(tpath("rt.safetensors.tmp")));

    /* raw checks: header length multiple of 8, padded with spaces, data offsets aligned */
    size_t fn = 0;
    unsigned char *fb = read_file(path, &fn);
    CHECK(fb && fn > 8);
    if (fb && fn > 8) {
        uint64_t hl = 0;
        for (int k = 7; k >= 0; k--) hl = hl << 8 | fb[k];
        CHECK(hl % 8 == 0 && 8 + hl <= fn);
        CHECK(fb[8] == '{');
        size_t total = 0;
        for (int i = 0; i < NC; i++) total += nb[i];
        CHECK(fn == 8 + hl + total); /* no gaps */
        char *hdr = (char *)calloc(1, hl + 1);
        memcpy(hdr, fb + 8, hl);
        CHECK(strstr(hdr, "\"moe_dtype.layer.6.i4\":\"i4\"") != NULL);
        CHECK(strstr(hdr, "\"quote\\\"and\\\\back\":\"line\\nbreak\"") != NULL);
        /* each tensor's bytes at its offset, and offsets multiples of the element size */
        for (int i = 0; i < NC; i++) {
            char key[64];
            snprintf(key, sizeof key, "\"%s\":{\"dtype\":\"%s\"", names[i], cases[i].stname);
            char *at = strstr(hdr, key);
            CHECK(at != NULL);
            if (!at) continue;
            char *of = strstr(at, "\"data_offsets\":[");
            unsigned long long b = 0, e = 0;
            CHECK(of && sscanf(of, "\"data_offsets\":[%llu,%llu]", &b, &e) == 2);
            CHECK(e - b == nb[i]);
            int bits = moe_dtype_bits(cases[i].dtype);
            CHECK(bits < 8 || b % (unsigned)(bits / 8) == 0);
            CHECK(8 + hl + e <= fn && memcmp(fb + 8 + hl + b, want[i], nb[i]) == 0);
        }
        free(hdr);
    }
    free(fb);

    moe_mem_info m0, m1;
    moe_st_file *f = NULL;
    CHECK(moe_st_open(path, &f) == MOE_OK);
    if (f) {
        CHECK(moe_st_count(f) == NC);
        CHECK(moe_st_meta_count(f) == 3); /* the i4 marker is hidden */
        for (int i = 0; i < 3; i++) {
            CHECK(moe_st_meta_key(f, i) && strcmp(moe_st_meta_key(f, i), mk[i]) == 0);
            CHECK(moe_st_meta_value(f, i) && strcmp(moe_st_meta_value(f, i), mv[i]) == 0);
        }
        CHECK(moe_st_meta_key(f, 3) == NULL && moe_st_meta_value(f, -1) == NULL);
        CHECK(moe_st_name(f, NC) == NULL && moe_st_find(f, "nope") == -1);
        moe_tensor *got[NC] = {0};
        moe_mem_stats(&m0);
        for (int i = 0; i < NC; i++) {
            CHECK(moe_st_name(f, i) && strcmp(moe_st_name(f, i), names[i]) == 0); /* file order */
            CHECK(moe_st_find(f, names[i]) == i);
            CHECK(moe_st_get(f, i, &got[i]) == MOE_OK);
        }
        moe_mem_stats(&m1);
        CHECK(m1.host_bytes == m0.host_bytes); /* zero copy: views of the mapping */
        moe_tensor *none = NULL;
        CHECK_ERR(moe_st_get(f, NC, &none), MOE_ERR_ARG, "expected 0..13, got 14");
        moe_st_close(f);
        /* tensors outlive the file object */
        for (int i = 0; i < NC; i++) {
            if (!got[i]) continue;
            CHECK(moe_tensor_dtype(got[i]) == cases[i].dtype);
            CHECK(same_shape(got[i], 2, shape[i]));
            CHECK(same_bytes(got[i], want[i], nb[i]));
            moe_tensor_free(got[i]);
        }
    }
    /* the same bytes from memory */
    fb = read_file(path, &fn);
    CHECK(moe_st_open_memory(fb, fn, &f) == MOE_OK);
    free(fb);
    if (f) {
        for (int i = 0; i < NC; i++) {
            moe_tensor *g = NULL;
            CHECK(moe_st_get(f, i, &g) == MOE_OK);
            if (g) CHECK(same_bytes(g, want[i], nb[i]));
            moe_tensor_free(g);
        }
        moe_st_close(f);
    }
    for (int i = 0; i < NC; i++) {
        moe_tensor_free(ts[i]);
        free(want[i]);
    }

    /* empty file list, no metadata: "{}" padded to 8 */
    CHECK(moe_st_write(tpath("empty.safetensors"), 0, NULL, NULL, 0, NULL, NULL) == MOE_OK);
    fb = read_file(tpath("empty.safetensors"), &fn);
    CHECK(fb && fn == 16 && fb[0] == 8 && memcmp(fb + 8, "{}      ", 8) == 0);
    free(fb);
    CHECK(moe_st_open(tpath("empty.safetensors"), &f) == MOE_OK);
    CHECK(moe_st_count(f) == 0 && moe_st_meta_count(f) == 0);
    moe_st_close(f);

    /* byte-identical to the format's reference writer on its own documented examples */
    {
        int64_t s123[3] = {1, 2, 3};
        moe_tensor *a0 = NULL;
        moe_tensor_new(&a0, MOE_F32, 3, s123, CPU);
        moe_tensor_arange(a0, 0, 1);
        const char *nm1[1] = {"attn.0"};
        const moe_tensor *ta[1] = {a0};
        CHECK(moe_st_write(tpath("ref.safetensors"), 1, nm1, ta, 0, NULL, NULL) == MOE_OK);
        static const char hdr[] = "{\"attn.0\":{\"dtype\":\"F32\",\"shape\":[1,2,3],"
                                  "\"data_offsets\":[0,24]}}";
        const float vals[6] = {0, 1, 2, 3, 4, 5};
        unsigned char want[8 + 64 + 24] = {64};
        CHECK(sizeof hdr - 1 == 64);
        memcpy(want + 8, hdr, 64);
        memcpy(want + 72, vals, 24);
        fb = read_file(tpath("ref.safetensors"), &fn);
        CHECK(fb && fn == sizeof want && memcmp(fb, want, sizeof want) == 0);
        free(fb);
        moe_tensor_free(a0);
        const char *fk[1] = {"framework"}, *fv[1] = {"pt"};
        CHECK(moe_st_write(tpath("ref2.safetensors"), 0, NULL, NULL, 1, fk, fv) == MOE_OK);
        fb = read_file(tpath("ref2.safetensors"), &fn);
        CHECK(fb && fn == 48 && fb[0] == 40 &&
              memcmp(fb + 8, "{\"__metadata__\":{\"framework\":\"pt\"}}     ", 40) == 0);
        free(fb);
    }

    /* writer errors */
    int64_t s1[1] = {4};
    moe_tensor *a = NULL;
    moe_tensor_new(&a, MOE_F32, 1, s1, CPU);
    const moe_tensor *two[2] = {a, a};
    const char *dup[2] = {"x", "x"};
    CHECK_ERR(moe_st_write(tpath("w.safetensors"), 2, dup, two, 0, NULL, NULL), MOE_ERR_ARG, "duplicate");
    const char *res[1] = {"__metadata__"};
    CHECK_ERR(moe_st_write(tpath("w.safetensors"), 1, res, two, 0, NULL, NULL), MOE_ERR_ARG, "reserved");
    const char *ok1[1] = {"x"}, *rk[1] = {"moe_dtype.x"}, *rv[1] = {"i4"};
    CHECK_ERR(moe_st_write(tpath("w.safetensors"), 1, ok1, two, 1, rk, rv), MOE_ERR_ARG, "reserved");
    const char *dk[2] = {"k", "k"}, *dv[2] = {"1", "2"};
    CHECK_ERR(moe_st_write(tpath("w.safetensors"), 1, ok1, two, 2, dk, dv), MOE_ERR_ARG, "duplicate");
    const char *badu[1] = {"\xff"};
    CHECK_ERR(moe_st_write(tpath("w.safetensors"), 1, badu, two, 0, NULL, NULL), MOE_ERR_ARG, "UTF-8");
    CHECK_ERR(moe_st_write(tpath("nodir/w.safetensors"), 1, ok1, two, 0, NULL, NULL), MOE_ERR_IO, "nodir");
    CHECK(!file_exists(tpath("w.safetensors")));
    moe_tensor_free(a);
}

static void test_st_widen(void) {
    /* U16 [2] @0, U32 [2] @4, F64 [2] @12 (misaligned on purpose), U64 [1] @28, F6_E2M3 [4] @36,
     * F32 [1] @39 (misaligned: copied), U8 [2] @43 with an i4 marker */
    unsigned char d[48] = {0};
    uint16_t u16[2] = {65535, 2};
    uint32_t u32[2] = {4294967295u, 3};
    double f64[2] = {1.0 / 3.0, -1e300};
    uint64_t u64 = (uint64_t)1 << 63;
    float f32 = 2.5f;
    memcpy(d + 0, u16, 4);
    memcpy(d + 4, u32, 8);
    memcpy(d + 12, f64, 16);
    memcpy(d + 28, &u64, 8);
    memcpy(d + 39, &f32, 4);
    d[43] = 0x7F; /* nibbles: low 0xF = -1, high 0x7 = 7 */
    d[44] = 0x18; /* low 8 = -8, high 1 */
    const char *hdr =
        "{\"__metadata__\":{\"moe_dtype.q\":\"i4\",\"note\":\"x\"},"
        "\"a\":{\"dtype\":\"U16\",\"shape\":[2],\"data_offsets\":[0,4]},"
        "\"b\":{\"dtype\":\"U32\",\"shape\":[2],\"data_offsets\":[4,12]},"
        "\"c\":{\"dtype\":\"F64\",\"shape\":[2],\"data_offsets\":[12,28]},"
        "\"d\":{\"dtype\":\"U64\",\"shape\":[],\"data_offsets\":[28,36]},"
        "\"e\":{\"dtype\":\"F6_E2M3\",\"shape\":[4],\"data_offsets\":[36,39]},"
        "\"f\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[39,43]},"
        "\"q\":{\"dtype\":\"U8\",\"shape\":[1,2],\"data_offsets\":[43,45]}}";
    size_t n;
    unsigned char *p = st_bytes(hdr, d, 45, &n);
    moe_st_file *f = NULL;
    CHECK(moe_st_open_memory(p, n, &f) == MOE_OK);
    free(p);
    if (!f) return;
    CHECK(moe_st_meta_count(f) == 1 && strcmp(moe_st_meta_key(f, 0), "note") == 0);
    moe_tensor *t = NULL;
    double v[4];
    CHECK(moe_st_get(f, moe_st_find(f, "a"), &t) == MOE_OK);
    if (t) CHECK(moe_tensor_dtype(t) == MOE_I32 && moe_tensor_read_f64(t, v, 2) == MOE_OK &&
                 v[0] == 65535 && v[1] == 2);
    moe_tensor_free(t);
    t = NULL;
    CHECK(moe_st_get(f, moe_st_find(f, "b"), &t) == MOE_OK);
    if (t) CHECK(moe_tensor_dtype(t) == MOE_I64 &&
                 ((const int64_t *)moe_tensor_data(t))[0] == 4294967295LL);
    moe_tensor_free(t);
    t = NULL;
    CHECK(moe_st_get(f, moe_st_find(f, "c"), &t) == MOE_OK);
    if (t) CHECK(moe_tensor_dtype(t) == MOE_F32 && ((const float *)moe_tensor_data(t))[0] == 1.0f / 3.0f &&
                 ((const float *)moe_tensor_data(t))[1] == -(float)INFINITY);
    moe_tensor_free(t);
    t = NULL;
    CHECK_ERR(moe_st_get(f, moe_st_find(f, "d"), &t), MOE_ERR_DTYPE, "over the i64 maximum");
    CHECK_ERR(moe_st_get(f, moe_st_find(f, "e"), &t), MOE_ERR_DTYPE, "F6_E2M3");
    CHECK(t == NULL);
    CHECK(moe_st_get(f, moe_st_find(f, "f"), &t) == MOE_OK);
    if (t) CHECK(moe_tensor_read_f64(t, v, 1) == MOE_OK && v[0] == 2.5);
    moe_tensor_free(t);
    t = NULL;
    CHECK(moe_st_get(f, moe_st_find(f, "q"), &t) == MOE_OK);
    if (t) {
        int64_t s[2] = {1, 4};
        CHECK(moe_tensor_dtype(t) == MOE_I4 && same_shape(t, 2, s));
        CHECK(moe_tensor_read_f64(t, v, 4) == MOE_OK && v[0] == -1 && v[1] == 7 && v[2] == -8 &&
              v[3] == 1);
    }
    moe_tensor_free(t);
    moe_st_close(f);
}

static void st_bad(const char *hdr, size_t data_bytes, int code, const char *needle) {
    unsigned char zeros[64] = {0};
    size_t n;
    unsigned char *p = st_bytes(hdr, zeros, data_bytes, &n);
    moe_st_file *f = NULL;
    CHECK_ERR(moe_st_open_memory(p, n, &f), code, needle);
    CHECK(f == NULL);
    CHECK(write_file(tpath("bad.safetensors"), p, n) == 0);
    CHECK_ERR(moe_st_open(tpath("bad.safetensors"), &f), code, needle);
    CHECK(strstr(moe_last_error(), "bad.safetensors") != NULL);
    CHECK(f == NULL);
    moe_st_close(f);
    free(p);
}

#define E(name, dt, shape, b, e) \
    "\"" name "\":{\"dtype\":\"" dt "\",\"shape\":" shape ",\"data_offsets\":[" #b "," #e "]}"

static void test_st_malformed(void) {
    moe_st_file *f = NULL;
    const int F = MOE_ERR_FORMAT;
    CHECK_ERR(moe_st_open_memory("\x01\x00\x00", 3, &f), F, "shorter than the 8-byte header");
    CHECK_ERR(moe_st_open_memory(NULL, 0, &f), F, "shorter than");
    CHECK_ERR(moe_st_open_memory("\xe8\x03\x00\x00\x00\x00\x00\x00{}", 10, &f), F,
              "header length 1000 exceeds file size 10");
    CHECK_ERR(moe_st_open_memory("\xff\xff\xff\xff\xff\xff\xff\xff{}", 10, &f), F, "exceeds file size");
    CHECK(write_file(tpath("empty.st"), "", 0) == 0);
    CHECK_ERR(moe_st_open(tpath("empty.st"), &f), F, "shorter than");
    CHECK_ERR(moe_st_open(tpath("missing.st"), &f), MOE_ERR_IO, "missing.st");
    CHECK(f == NULL);

    st_bad("{\"a\":", 0, F, "not valid JSON");
    st_bad("{\"a\":{\"dtype\":\"F32\",}}", 0, F, "not valid JSON");
    st_bad("{\"a\":\"\xff\"}", 0, F, "invalid UTF-8");
    st_bad("[1, 2]", 0, F, "not a JSON object");
    st_bad("{\"a\":[1]}", 0, F, "expected an object");
    st_bad("{\"a\":{\"shape\":[1],\"data_offsets\":[0,4]}}", 4, F, "missing \"dtype\"");
    st_bad("{\"a\":{\"dtype\":\"F32\",\"data_offsets\":[0,4]}}", 4, F, "missing \"shape\"");
    st_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[1]}}", 4, F, "missing \"data_offsets\"");
    st_bad("{" E("a", "F32", "[1]", 0, 4) "," E("b", "F32", "[1]", 4, 8) "}", 6, F,
           "beyond the data size 6");
    st_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4,8]}}", 8, F, "2 non-negative integers");
    st_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0]}}", 8, F, "2 non-negative integers");
    st_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4.0]}}", 8, F, "2 non-negative integers");
    st_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[-4,0]}}", 8, F, "2 non-negative integers");
    st_bad("{" E("a", "F32", "[1]", 8, 4) "}", 8, F, "decreasing");
    st_bad("{" E("a", "F32", "[2]", 0, 8) "," E("b", "F32", "[1]", 4, 8) "}", 8, F, "overlap");
    st_bad("{" E("a", "F32", "[3]", 0, 8) "}", 8, F, "byte count mismatch");
    st_bad("{" E("a", "F32", "[2,-1]", 0, 8) "}", 8, F, "non-negative integer");
    st_bad("{" E("a", "F32", "[1.5]", 0, 8) "}", 8, F, "non-negative integer");
    st_bad("{" E("a", "F32", "{}", 0, 8) "}", 8, F, "must be an array");
    st_bad("{" E("a", "Q7", "[2]", 0, 8) "}", 8, F, "unknown dtype 'Q7'");
    st_bad("{\"a\":{\"dtype\":7,\"shape\":[1],\"data_offsets\":[0,4]}}", 4, F, "must be a string");
    st_bad("{" E("a", "F4", "[3]", 0, 1) "}", 8, F, "whole bytes");
    st_bad("{" E("a", "F32", "[1099511627776,1099511627776,1099511627776]", 0, 8) "}", 8, F, "too many elements");
    st_bad("{" E("a", "F32", "[0,9223372036854775807,12]", 0, 0) "}", 8, F, "too many elements");
    /* 2^60 elements x 16 bits = 2^64: the byte count must not wrap to the 0 bytes given */
    st_bad("{" E("a", "I16", "[1152921504606846976]", 0, 0) "}", 8, F,
           "byte count mismatch: data_offsets span 0 bytes, shape x I16 needs 2305843009213693952");
    st_bad("{" E("a", "I64", "[4,288230376151711744]", 0, 0) "}", 8, F, "needs 9223372036854775808");
    st_bad("{" E("a", "F32", "[1]", 0, 4) "," E("a", "F32", "[1]", 4, 8) "}", 8, F, "duplicate name 'a'");
    st_bad("{\"__metadata__\":{},\"__metadata__\":{}}", 0, F, "duplicate name");
    st_bad("{\"__metadata__\":{\"k\":1}}", 0, F, "must be a string");
    st_bad("{\"__metadata__\":[\"k\"]}", 0, F, "must be an object");
    st_bad("{\"__metadata__\":{\"k\":\"1\",\"k\":\"2\"}}", 0, F, "twice (duplicate)");
    st_bad("{\"__metadata__\":{\"moe_dtype.z\":\"i4\"}," E("a", "U8", "[2]", 0, 2) "}", 8, F, "needs a U8 tensor");
    st_bad("{\"__metadata__\":{\"moe_dtype.a\":\"i3\"}," E("a", "U8", "[2]", 0, 2) "}", 8, F, "unknown moe_dtype");
    st_bad("{\"a\\u0000b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4, F, "NUL");
    st_bad("[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]",
           0, F, "nesting deeper");

    /* valid files with entries moelab cannot represent: open works, get refuses */
    unsigned char zeros[64] = {0};
    size_t n;
    unsigned char *p = st_bytes("{" E("a", "F32", "[1,1,1,1,1,1,1,1,1]", 0, 4) ","
                                E("b", "F4", "[2,3]", 4, 7) "," E("z", "F32", "[0,5]", 7, 7) "}",
                                zeros, 8, &n);
    CHECK(moe_st_open_memory(p, n, &f) == MOE_OK);
    free(p);
    if (f) {
        moe_tensor *t = NULL;
        CHECK_ERR(moe_st_get(f, 0, &t), MOE_ERR_SHAPE, "at most 8 dimensions");
        CHECK_ERR(moe_st_get(f, 1, &t), MOE_ERR_SHAPE, "even last dimension");
        CHECK(moe_st_get(f, 2, &t) == MOE_OK); /* empty tensor */
        if (t) CHECK(moe_tensor_numel(t) == 0 && moe_tensor_dim(t, 1) == 5);
        moe_tensor_free(t);
        moe_st_close(f);
    }
    /* holes and trailing bytes are accepted when reading */
    p = st_bytes("{" E("a", "U8", "[1]", 2, 3) "}", zeros, 9, &n);
    CHECK(moe_st_open_memory(p, n, &f) == MOE_OK);
    moe_st_close(f);
    free(p);
}

int main(void) {
    snprintf(dir, sizeof dir, "/tmp/moe_test_io_XXXXXX");
    if (!mkdtemp(dir)) {
        perror("mkdtemp");
        return 1;
    }
    test_npy_roundtrip();
    test_npy_parse_variants();
    test_npy_malformed();
    test_st_roundtrip();
    test_st_widen();
    test_st_malformed();
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    if (system(cmd) != 0) fprintf(stderr, "warning: could not remove %s\n", dir);
    printf("test_io: %d checks, %d failures\n", checks, failures);
    return failures ? 1 : 0;
}
