/* test_trace_files.c -- trace files from C: save/load round trip (with weights, token ids,
 * metadata), save_range, chunk directories, and damaged files (every truncation, byte flips,
 * wrong shapes/dtypes): each load returns OK or an error with a message, never crashes
 * (run under the sanitizer suite as well). */
#define _POSIX_C_SOURCE 200809L
#include "moe.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "check.h"

static char dir[256];

static char *path(const char *name) {
    static char buf[512];
    snprintf(buf, sizeof buf, "%s/%s", dir, name);
    return buf;
}

static unsigned char *read_file(const char *p, size_t *n) {
    FILE *f = fopen(p, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long sz = ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *b = malloc((size_t)sz + 1);
    *n = fread(b, 1, (size_t)sz, f);
    fclose(f);
    return b;
}

static void write_file(const char *p, const void *b, size_t n) {
    FILE *f = fopen(p, "wb");
    if (!f) return;
    fwrite(b, 1, n, f);
    fclose(f);
}

static moe_trace *sample(void) {
    /* T = 3, L = 2, K = 2, E = 4 */
    const int16_t ids[] = {0, 1, 2, 3, 1, 2, -1, -1, 3, 0, 2, 1};
    const float w[] = {.5f, .5f, .25f, .75f, 1, 0, 0, 0, .125f, .875f, .5f, .5f};
    const int32_t tok[] = {7, 8, 9};
    moe_trace *tr = NULL;
    CHECK(moe_trace_new(&tr, 2, 2, 4, 1) == MOE_OK);
    CHECK(moe_trace_append_host(tr, 3, ids, w, tok) == MOE_OK);
    CHECK(moe_trace_set_meta(tr, "model", "toy") == MOE_OK);
    return tr;
}

/* Token ranges whose end would overflow int64 are refused, and NULL names say so. */
static void test_bad_ranges(void) {
    moe_trace *tr = sample(), *dst = NULL;
    CHECK_ERR(moe_trace_save_range(tr, path("r.safetensors"), 1, INT64_MAX), MOE_ERR_RANGE,
              "moe_trace_save: start/n: expected a range within 0..3, got start 1, n 9223372036854775807");
    CHECK(moe_trace_new(&dst, 2, 2, 4, 1) == MOE_OK);
    CHECK_ERR(moe_trace_append_trace(dst, tr, 2, INT64_MAX), MOE_ERR_RANGE, "got start 2, n 9223372036854775807");
    CHECK(moe_trace_tokens(dst) == 0);
    moe_trace_free(dst);
    dst = NULL;
    int64_t s[2] = {1, 2};
    moe_tensor *ids = NULL;
    moe_device cpu = {MOE_DEVICE_CPU, 0};
    CHECK(moe_tensor_new(&ids, MOE_I16, 2, s, cpu) == MOE_OK);
    CHECK_ERR(moe_trace_set_layer(tr, 1, INT64_MAX, 0, ids, NULL), MOE_ERR_RANGE,
              "start/n: expected a token range within 0..3, got start 1, n 9223372036854775807");
    CHECK_ERR(moe_trace_save(tr, NULL), MOE_ERR_ARG, "moe_trace_save: path: expected a file name, got NULL");
    CHECK_ERR(moe_trace_save(tr, ""), MOE_ERR_ARG, "path: expected a file name, got \"\"");
    CHECK_ERR(moe_trace_load(NULL, &dst), MOE_ERR_ARG, "moe_trace_load: path: expected a file name, got NULL");
    CHECK(dst == NULL);
    CHECK_ERR(moe_trace_set_meta(tr, NULL, "v"), MOE_ERR_ARG, "key: expected a non-empty string, got NULL");
    CHECK_ERR(moe_trace_set_meta(tr, "", "v"), MOE_ERR_ARG, "key: expected a non-empty string, got \"\"");
    /* growing by a huge n: refused, not wrapped (it used to loop forever) */
    CHECK_ERR(moe_trace_append(tr, INT64_MAX, NULL, NULL, NULL), MOE_ERR_NOMEM, "tokens do not fit in memory");
    CHECK_ERR(moe_trace_append(tr, INT64_MAX - 1, NULL, NULL, NULL), MOE_ERR_NOMEM,
              "3 + 9223372036854775806 tokens do not fit in memory");
    CHECK_ERR(moe_trace_append(tr, (int64_t)1 << 61, NULL, NULL, NULL), MOE_ERR_NOMEM, "do not fit in memory");
    int16_t one[4] = {0, 1, 2, 3};
    CHECK_ERR(moe_trace_append_host(tr, INT64_MAX, one, NULL, NULL), MOE_ERR_NOMEM, "do not fit in memory");
    CHECK(moe_trace_tokens(tr) == 3);
    CHECK(moe_trace_append_host(tr, 1, one, NULL, NULL) == MOE_OK && moe_trace_tokens(tr) == 4);
    moe_tensor_free(ids);
    moe_trace_free(tr);
}

static void test_round_trip(void) {
    moe_trace *tr = sample(), *back = NULL;
    CHECK(moe_trace_save(tr, path("t.safetensors")) == MOE_OK);
    CHECK(moe_trace_load(path("t.safetensors"), &back) == MOE_OK);
    if (!back) return;
    CHECK(moe_trace_tokens(back) == 3 && moe_trace_layers(back) == 2 && moe_trace_top_k(back) == 2);
    CHECK(moe_trace_num_experts(back) == 4 && moe_trace_has_weights(back));
    CHECK(memcmp(moe_trace_ids(back), moe_trace_ids(tr), 12 * sizeof(int16_t)) == 0);
    CHECK(memcmp(moe_trace_weights(back), moe_trace_weights(tr), 12 * sizeof(float)) == 0);
    CHECK(moe_trace_token_ids(back)[2] == 9);
    CHECK(moe_trace_get_meta(back, "model") && !strcmp(moe_trace_get_meta(back, "model"), "toy"));
    CHECK(moe_trace_get_meta(back, "num_experts") == NULL); /* structural: not kept as meta */
    /* a loaded (mapped) trace can still be appended to */
    CHECK(moe_trace_append_trace(back, tr, 1, 2) == MOE_OK);
    CHECK(moe_trace_tokens(back) == 5 && moe_trace_ids(back)[3 * 4 + 1] == 2 && moe_trace_ids(back)[4 * 4] == 3);
    moe_trace_free(back);

    /* save_range + chunk directory (completed chunks, a part of an unfinished chunk, and a
     * part of a completed chunk, which must be ignored) */
    char d[300];
    snprintf(d, sizeof d, "%s/chunks", dir);
    char cmd[400];
    snprintf(cmd, sizeof cmd, "mkdir -p '%s'", d);
    CHECK(system(cmd) == 0);
    CHECK(moe_trace_save_range(tr, path("chunks/chunk-000001.safetensors"), 0, 2) == MOE_OK);
    CHECK(moe_trace_save_range(tr, path("chunks/chunk-000001.part-000001.safetensors"), 0, 1) == MOE_OK);
    CHECK(moe_trace_save_range(tr, path("chunks/chunk-000002.part-000001.safetensors"), 2, 1) == MOE_OK);
    write_file(path("chunks/chunk-000003.safetensors.tmp"), "junk", 4);
    moe_trace *all = NULL;
    CHECK(moe_trace_load(d, &all) == MOE_OK);
    if (all) {
        CHECK(moe_trace_tokens(all) == 3);
        CHECK(memcmp(moe_trace_ids(all), moe_trace_ids(tr), 12 * sizeof(int16_t)) == 0);
        CHECK(moe_trace_token_ids(all)[0] == 7 && moe_trace_token_ids(all)[2] == 9);
        moe_trace_free(all);
    }
    moe_trace_free(tr);
}

static void test_damaged(void) {
    size_t n = 0;
    unsigned char *good = read_file(path("t.safetensors"), &n);
    CHECK(good != NULL && n > 8);
    if (!good) return;
    int ok = 0, err = 0;
    /* every truncation */
    for (size_t len = 0; len < n; len++) {
        write_file(path("bad.safetensors"), good, len);
        moe_trace *t = NULL;
        moe_status s = moe_trace_load(path("bad.safetensors"), &t);
        if (s == MOE_OK) ok++, moe_trace_free(t);
        else {
            err++;
            CHECK(moe_last_error()[0] != '\0');
        }
    }
    CHECK(err == (int)n); /* no truncated file is accepted */
    /* byte flips everywhere */
    unsigned char *b = malloc(n);
    for (size_t i = 0; i < n; i++) {
        for (int v = 0; v < 3; v++) {
            memcpy(b, good, n);
            b[i] ^= (unsigned char)(v == 0 ? 0x01 : v == 1 ? 0x80 : 0xff);
            write_file(path("bad.safetensors"), b, n);
            moe_trace *t = NULL;
            moe_status s = moe_trace_load(path("bad.safetensors"), &t);
            if (s == MOE_OK) {
                /* data bytes may change into other valid ids; the shape is still checked */
                CHECK(moe_trace_layers(t) == 2 && moe_trace_top_k(t) == 2);
                moe_trace_free(t);
            } else {
                CHECK(moe_last_error()[0] != '\0');
            }
        }
    }
    free(b);
    free(good);
    /* a file without routed_experts, and one whose ids are 2-D */
    int64_t shape[2] = {2, 2};
    moe_tensor *x = NULL;
    moe_device cpu = {MOE_DEVICE_CPU, 0};
    CHECK(moe_tensor_new(&x, MOE_I16, 2, shape, cpu) == MOE_OK);
    CHECK(moe_tensor_fill(x, 1) == MOE_OK);
    const char *nm[1] = {"other"};
    const moe_tensor *ts[1] = {x};
    CHECK(moe_st_write(path("other.safetensors"), 1, nm, ts, 0, NULL, NULL) == MOE_OK);
    moe_trace *t = NULL;
    CHECK(moe_trace_load(path("other.safetensors"), &t) == MOE_ERR_FORMAT && !t);
    CHECK(strstr(moe_last_error(), "routed_experts") != NULL);
    nm[0] = "routed_experts";
    CHECK(moe_st_write(path("twod.safetensors"), 1, nm, ts, 0, NULL, NULL) == MOE_OK);
    CHECK(moe_trace_load(path("twod.safetensors"), &t) == MOE_ERR_FORMAT && !t);
    CHECK(strstr(moe_last_error(), "3 dims") != NULL);
    moe_tensor_free(x);
    /* .npy [1, 1, 2] int16 with an unusual negative (-5 -> -1) and an id out of range */
    int64_t s3[3] = {1, 1, 2};
    CHECK(moe_tensor_new(&x, MOE_I16, 3, s3, cpu) == MOE_OK);
    int16_t v[2] = {-5, 3};
    CHECK(moe_tensor_copy_from_host(x, v, sizeof v) == MOE_OK);
    CHECK(moe_npy_write(path("neg.npy"), x) == MOE_OK);
    CHECK(moe_trace_load(path("neg.npy"), &t) == MOE_OK);
    if (t) {
        CHECK(moe_trace_ids(t)[0] == -1 && moe_trace_ids(t)[1] == 3);
        CHECK(moe_trace_set_num_experts(t, 3) == MOE_ERR_RANGE);
        CHECK(moe_trace_set_num_experts(t, 4) == MOE_OK);
        moe_trace_free(t);
        t = NULL;
    }
    v[1] = 32767;
    CHECK(moe_tensor_copy_from_host(x, v, sizeof v) == MOE_OK);
    CHECK(moe_npy_write(path("big.npy"), x) == MOE_OK);
    CHECK(moe_trace_load(path("big.npy"), &t) == MOE_OK); /* E unknown: any int16 id >= 0 */
    moe_trace_free(t);
    t = NULL;
    moe_tensor_free(x);
    CHECK(moe_trace_load(path("nothing-here"), &t) == MOE_ERR_IO);
    CHECK(moe_trace_load(dir, &t) == MOE_ERR_IO); /* a directory without chunk files */
}

int main(void) {
    snprintf(dir, sizeof dir, "/tmp/moe_trace_files_XXXXXX");
    if (!mkdtemp(dir)) {
        perror("mkdtemp");
        return 1;
    }
    test_round_trip();
    test_bad_ranges();
    test_damaged();
    char cmd[400];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", dir);
    if (failures) {
        fprintf(stderr, "%d failure(s)\n", failures);
        return 1;
    }
    printf("test_trace_files: ok\n");
    return 0;
}
