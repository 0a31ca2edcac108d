/* test_trace_compare.c -- trace comparison metrics on hand-built traces (expected values
 * worked out by hand in the comments), error cases, thread-count independence, and a
 * randomised cross-check against a naive reference written here. */
#include "moe.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "check.h"

#define NEAR(a, b) CHECK(fabs((double)(a) - (double)(b)) < 1e-12)
#define OK(expr)                                                                           \
    do {                                                                                   \
        moe_status s_ = (expr);                                                            \
        if (s_ != MOE_OK) {                                                                \
            fprintf(stderr, "%s:%d: %s -> %s: %s\n", __FILE__, __LINE__, #expr,            \
                    moe_status_name(s_), moe_last_error());                                \
            failures++;                                                                    \
        }                                                                                  \
    } while (0)

static moe_trace *mk(int64_t T, int64_t L, int64_t K, int64_t E, const int16_t *ids,
                     const float *w) {
    moe_trace *tr = NULL;
    OK(moe_trace_new(&tr, L, K, E, w != NULL));
    OK(moe_trace_append_host(tr, T, ids, w, NULL));
    return tr;
}

/* T = 3 tokens, L = 2 layers, K = 2, E = 4.
 *            layer 0          layer 1
 *   A  t0   [0,1]            [2,3]
 *      t1   [1,2]            [0,3]
 *      t2   [3,0]            [-1,-1]   (not captured)
 *   B  t0   [1,0] same set   [2,3] exact
 *      t1   [1,3] differ     [2,1] differ
 *      t2   [3,0] exact      [1,2]     (skipped: A has -1)             */
static void test_hand(void) {
    const int16_t a[] = {0, 1, 2, 3, /**/ 1, 2, 0, 3, /**/ 3, 0, -1, -1};
    const int16_t b[] = {1, 0, 2, 3, /**/ 1, 3, 2, 1, /**/ 3, 0, 1, 2};
    moe_trace *A = mk(3, 2, 2, 4, a, NULL), *B = mk(3, 2, 2, 4, b, NULL);
    for (int threads = 1; threads <= 2; threads++) {
        moe_trace_cmp_opts o = moe_trace_cmp_opts_default();
        o.threads = threads;
        moe_trace_cmp *c = NULL;
        OK(moe_trace_compare(A, B, &o, &c));
        if (!c) return;
        /* layer 0: 3 compared, t1 differs ({1,2} vs {1,3}: |n| = 1, |u| = 3), t2 exact.
         *   router disagreement 1/3; exact 1/3; shared 2+1+2 = 5 -> overlap 5/6;
         *   jaccard (1 + 1/3 + 1)/3 = 7/9. */
        const moe_trace_layer_cmp *l0 = &c->per_layer[0], *l1 = &c->per_layer[1];
        CHECK(l0->compared == 3 && l0->skipped == 0 && l0->differing == 1 && l0->exact == 1);
        CHECK(l0->shared == 5);
        NEAR(l0->router_disagreement, 1.0 / 3);
        NEAR(l0->exact_agreement, 1.0 / 3);
        NEAR(l0->overlap, 5.0 / 6);
        NEAR(l0->jaccard, 7.0 / 9);
        /* layer 1: 2 compared (t2 skipped); t0 exact; t1 {0,3} vs {2,1}: n = 0, u = 4.
         *   disagreement 1/2, exact 1/2, shared 2 -> overlap 2/4, jaccard (1 + 0)/2. */
        CHECK(l1->compared == 2 && l1->skipped == 1 && l1->differing == 1 && l1->exact == 1);
        NEAR(l1->router_disagreement, 0.5);
        NEAR(l1->overlap, 0.5);
        NEAR(l1->jaccard, 0.5);
        /* overall: compared 5, skipped 1, differing 2, exact 2, shared 7;
         *   jaccard (7/3 + 1)/5 = 2/3; overlap 7/10. */
        CHECK(c->compared == 5 && c->skipped == 1 && c->differing == 2 && c->exact == 2);
        NEAR(c->router_disagreement, 0.4);
        NEAR(c->exact_agreement, 0.4);
        NEAR(c->jaccard, 2.0 / 3);
        NEAR(c->overlap, 0.7);
        /* tokens: t1 differs in both layers (first: layer 0); t0, t2 never. */
        CHECK(c->tokens_compared == 3 && c->tokens_differing == 1 && c->tokens_skipped == 0);
        NEAR(c->token_disagreement, 1.0 / 3);
        NEAR(c->mean_layers_differing, 2.0 / 3);
        CHECK(c->first_diff_hist[0] == 1 && c->first_diff_hist[1] == 0);
        /* loads over compared positions: A l0 = [2,2,1,1], B l0 = [2,2,0,2],
         * A l1 = [1,0,1,2], B l1 = [0,1,2,1]. */
        const int64_t la0[] = {2, 2, 1, 1}, lb0[] = {2, 2, 0, 2}, la1[] = {1, 0, 1, 2},
                      lb1[] = {0, 1, 2, 1};
        for (int e = 0; e < 4; e++) {
            CHECK(c->loads_a[e] == la0[e] && c->loads_b[e] == lb0[e]);
            CHECK(c->loads_a[4 + e] == la1[e] && c->loads_b[4 + e] == lb1[e]);
        }
        /* A l0 balance: mean 1.5, max/mean 2/1.5 = 4/3, std 0.5 -> cv 1/3,
         * jain 6^2/(4*10) = 0.9, entropy ((2/3)ln3 + (1/3)ln6)/ln4. */
        NEAR(l0->load_a.max_over_mean, 4.0 / 3);
        NEAR(l0->load_a.cv, 1.0 / 3);
        NEAR(l0->load_a.jain, 0.9);
        NEAR(l0->load_a.entropy, ((2.0 / 3) * log(3) + (1.0 / 3) * log(6)) / log(4));
        CHECK(l0->load_a.total == 6 && l0->load_a.hot_expert == 0);
        /* JS(l0) with P = [1/3,1/3,1/6,1/6], Q = [1/3,1/3,0,1/3], M = [1/3,1/3,1/12,1/4]:
         * 1/2 (1/6 log2 2 + 1/6 log2 (2/3)) + 1/2 (1/3 log2 (4/3)). */
        NEAR(l0->js_divergence, 1.0 / 12 + log2(2.0 / 3) / 12 + log2(4.0 / 3) / 6);
        CHECK(isnan(c->weight_abs_diff) && !c->has_weights);
        moe_trace_cmp_free(c);
    }
    /* stats of A: loads as above (t2 l1 not captured): captured 5, skipped 1. */
    moe_trace_summary *s = NULL;
    OK(moe_trace_stats(A, NULL, &s));
    if (s) {
        CHECK(s->captured == 5 && s->skipped == 1);
        CHECK(s->loads[0] == 2 && s->loads[2] == 1 && s->loads[7] == 2);
        /* summed over layers: [3,2,2,3] -> hot expert 0 (lowest index of the ties) */
        CHECK(s->balance.total == 10 && s->balance.hot_expert == 0);
        NEAR(s->per_layer[0].jain, 0.9);
        /* A l1 = [1,0,1,2]: jain 16/(4*6) = 2/3; mean over layers (0.9 + 2/3)/2 */
        NEAR(s->per_layer[1].jain, 2.0 / 3);
        NEAR(s->balance.jain, (0.9 + 2.0 / 3) / 2);
        moe_trace_summary_free(s);
    }
    moe_trace_free(A);
    moe_trace_free(B);
}

/* Weights: L = 1, K = 2, E = 3, T = 2.
 *   t0: A [0,1] w [.75,.25]; B [1,0] w [.375,.625]: shared 0: |.75-.625| = .125,
 *       shared 1: |.25-.375| = .125; nothing moved.
 *   t1: A [0,1] w [.5,.5];   B [0,2] w [.75,.25]: shared 0: .25; A\B {1}: .5; B\A {2}: .25;
 *       moved (.5 + .25)/2 = .375.
 *   mean |dw| = (.125+.125+.25)/3 = 1/6; mass moved = (0 + .375)/2 = .1875. */
static void test_weights(void) {
    const int16_t a[] = {0, 1, 0, 1}, b[] = {1, 0, 0, 2};
    const float wa[] = {0.75f, 0.25f, 0.5f, 0.5f}, wb[] = {0.375f, 0.625f, 0.75f, 0.25f};
    moe_trace *A = mk(2, 1, 2, 3, a, wa), *B = mk(2, 1, 2, 3, b, wb);
    moe_trace_cmp *c = NULL;
    OK(moe_trace_compare(A, B, NULL, &c));
    if (c) {
        CHECK(c->has_weights == 1 && c->weight_pairs == 3);
        NEAR(c->weight_abs_diff, 1.0 / 6);
        NEAR(c->weight_mass_moved, 0.1875);
        moe_trace_cmp_free(c);
    }
    moe_trace_cmp_opts o = moe_trace_cmp_opts_default();
    o.ignore_weights = 1;
    OK(moe_trace_compare(A, B, &o, &c));
    if (c) {
        CHECK(c->has_weights == 0 && isnan(c->weight_abs_diff));
        moe_trace_cmp_free(c);
    }
    moe_trace_free(A);
    moe_trace_free(B);
}

static void test_errors(void) {
    const int16_t ids[3 * 2 * 2] = {0};
    moe_trace *A = mk(3, 2, 2, 4, ids, NULL), *T2 = mk(2, 2, 2, 4, ids, NULL),
              *L1 = mk(3, 1, 2, 4, ids, NULL), *K1 = mk(3, 2, 1, 4, ids, NULL),
              *E8 = mk(3, 2, 2, 8, ids, NULL), *E0 = mk(3, 2, 2, 0, ids, NULL);
    moe_trace_cmp *c = NULL;
    CHECK(moe_trace_compare(A, T2, NULL, &c) == MOE_ERR_SHAPE && !c);
    CHECK(strstr(moe_last_error(), "expected 3 tokens (as a), got 2") != NULL);
    CHECK(moe_trace_compare(A, L1, NULL, &c) == MOE_ERR_SHAPE);
    CHECK(strstr(moe_last_error(), "expected 2 layers (as a), got 1") != NULL);
    CHECK(moe_trace_compare(A, K1, NULL, &c) == MOE_ERR_SHAPE);
    CHECK(strstr(moe_last_error(), "top_k 2 (as a), got 1") != NULL);
    CHECK(moe_trace_compare(A, E8, NULL, &c) == MOE_ERR_SHAPE);
    CHECK(strstr(moe_last_error(), "num_experts 4 (as a), got 8") != NULL);
    OK(moe_trace_compare(A, E0, NULL, &c)); /* unknown E takes the other's */
    if (c) CHECK(c->num_experts == 4);
    moe_trace_cmp_free(c);
    /* an id >= E is refused on append */
    const int16_t bad[4] = {0, 1, 2, 9};
    moe_trace *X = NULL;
    OK(moe_trace_new(&X, 2, 2, 4, 0));
    CHECK(moe_trace_append_host(X, 1, bad, NULL, NULL) == MOE_ERR_RANGE);
    CHECK(moe_trace_tokens(X) == 0);
    moe_trace_free(X);
    CHECK(moe_trace_new(&X, 0, 2, 4, 0) == MOE_ERR_ARG && X == NULL);
    moe_trace_free(A), moe_trace_free(T2), moe_trace_free(L1), moe_trace_free(K1);
    moe_trace_free(E8), moe_trace_free(E0);
    moe_trace_free(X);
}

/* Naive reference of the set metrics (sorting, no tricks). */
static int cmp16(const void *x, const void *y) {
    return *(const int16_t *)x - *(const int16_t *)y;
}

static void test_random(void) {
    const int64_t T = 9000, L = 5, K = 8, E = 64;
    int16_t *a = malloc(sizeof(int16_t) * T * L * K), *b = malloc(sizeof(int16_t) * T * L * K);
    uint64_t s = 12345;
    for (int64_t p = 0; p < T * L; p++) {
        for (int k = 0; k < K; k++) {
            s = s * 6364136223846793005ULL + 1442695040888963407ULL;
            a[p * K + k] = (int16_t)((s >> 33) % E); /* duplicates allowed on purpose */
            b[p * K + k] = a[p * K + k];
        }
        s = s * 6364136223846793005ULL + 1442695040888963407ULL;
        int r = (int)((s >> 33) % 10);
        if (r == 0) b[p * K + 3] = (int16_t)((b[p * K + 3] + 1) % E); /* change one */
        if (r == 1) { int16_t t = b[p * K]; b[p * K] = b[p * K + 7]; b[p * K + 7] = t; }
        if (r == 2) a[p * K + 1] = -1;
    }
    moe_trace *A = mk(T, L, K, E, a, NULL), *B = mk(T, L, K, E, b, NULL);
    moe_trace_cmp *c1 = NULL, *c2 = NULL;
    moe_trace_cmp_opts o = moe_trace_cmp_opts_default();
    o.threads = 1;
    OK(moe_trace_compare(A, B, &o, &c1));
    o.threads = 3;
    OK(moe_trace_compare(A, B, &o, &c2));
    int64_t cmp = 0, skip = 0, diff = 0, exact = 0, shared = 0;
    double jac = 0;
    for (int64_t p = 0; p < T * L; p++) {
        int16_t x[8], y[8];
        memcpy(x, a + p * K, sizeof x);
        memcpy(y, b + p * K, sizeof y);
        int neg = 0;
        for (int k = 0; k < K; k++) neg |= x[k] < 0 || y[k] < 0;
        if (neg) { skip++; continue; }
        cmp++;
        exact += memcmp(x, y, sizeof x) == 0;
        qsort(x, K, 2, cmp16);
        qsort(y, K, 2, cmp16);
        int nx = 0, ny = 0; /* dedupe */
        for (int k = 0; k < K; k++) if (!k || x[k] != x[k - 1]) x[nx++] = x[k];
        for (int k = 0; k < K; k++) if (!k || y[k] != y[k - 1]) y[ny++] = y[k];
        int i = 0, j = 0, in = 0;
        while (i < nx && j < ny) {
            if (x[i] == y[j]) { in++; i++; j++; }
            else if (x[i] < y[j]) i++;
            else j++;
        }
        shared += in;
        diff += !(in == nx && in == ny);
        jac += (double)in / (double)(nx + ny - in);
    }
    if (c1 && c2) {
        CHECK(c1->compared == cmp && c1->skipped == skip && c1->differing == diff);
        CHECK(c1->exact == exact && c1->shared == shared);
        CHECK(fabs(c1->jaccard - jac / (double)cmp) < 1e-9);
        CHECK(c2->compared == c1->compared && c2->differing == c1->differing);
        CHECK(c2->jaccard == c1->jaccard && c2->tokens_differing == c1->tokens_differing);
        CHECK(c2->layers_differing == c1->layers_differing);
        CHECK(memcmp(c1->loads_a, c2->loads_a, sizeof(int64_t) * L * E) == 0);
        CHECK(memcmp(c1->first_diff_hist, c2->first_diff_hist, sizeof(int64_t) * L) == 0);
        CHECK(c1->js_divergence == c2->js_divergence);
    }
    /* stats: the same answer on 1 and 3 threads (T >= 4096 splits the tokens) */
    moe_trace_summary *s1 = NULL, *s3 = NULL;
    o.threads = 1;
    OK(moe_trace_stats(A, &o, &s1));
    o.threads = 3;
    OK(moe_trace_stats(A, &o, &s3));
    if (s1 && s3) {
        CHECK(s1->captured == s3->captured && s1->skipped == s3->skipped);
        CHECK(s1->captured + s1->skipped == T * L);
        CHECK(memcmp(s1->loads, s3->loads, sizeof(int64_t) * L * E) == 0);
        CHECK(s1->balance.cv == s3->balance.cv);
    }
    moe_trace_summary_free(s1);
    moe_trace_summary_free(s3);
    moe_trace_cmp_free(c1);
    moe_trace_cmp_free(c2);
    moe_trace_free(A);
    moe_trace_free(B);
    free(a);
    free(b);
}

static void test_storage(void) {
    /* resize fills -1; metadata set/replace/remove */
    moe_trace *t = NULL;
    OK(moe_trace_new(&t, 2, 2, 4, 1));
    OK(moe_trace_resize(t, 3));
    CHECK(moe_trace_tokens(t) == 3 && moe_trace_ids(t)[11] == -1 && moe_trace_weights(t)[5] == 0);
    OK(moe_trace_set_meta(t, "model", "x"));
    OK(moe_trace_set_meta(t, "model", "y"));
    OK(moe_trace_set_meta(t, "quant", "fp8"));
    CHECK(moe_trace_meta_count(t) == 2 && strcmp(moe_trace_get_meta(t, "model"), "y") == 0);
    OK(moe_trace_set_meta(t, "model", NULL));
    CHECK(moe_trace_meta_count(t) == 1 && moe_trace_get_meta(t, "model") == NULL);
    int32_t *tok = moe_trace_token_ids_mut(t);
    CHECK(tok && tok[2] == -1 && moe_trace_has_token_ids(t));
    moe_trace_free(t);
}

int main(void) {
    test_hand();
    test_weights();
    test_errors();
    test_random();
    test_storage();
    if (failures) {
        fprintf(stderr, "%d failure(s)\n", failures);
        return 1;
    }
    printf("test_trace_compare: ok\n");
    return 0;
}
