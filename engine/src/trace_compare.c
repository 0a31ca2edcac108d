/* trace_compare.c -- comparison metrics of two replay traces and statistics of one
 * (reference.md section 5; formulas in docs/traces.md).
 *
 * One streaming pass over both [T, L, K] id arrays, split by token range over a few
 * threads.  Each (token, layer) is compared as a *set* of at most K ids with fixed-size
 * loops (K is a compile-time constant for the common sizes), without any allocation per
 * position.  Every counter is an integer; the Jaccard mean is accumulated as a histogram of
 * (|A n B|, |A u B|) pairs, so the results do not depend on the number of threads.  Only the
 * weight sums are floating point (summed per thread, then in thread order). */
#include "trace.h"

#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#if defined(__SSE2__)
#include <emmintrin.h>
#define TRACE_SSE2 1
#endif

/* ------------------------------------------------------------------ helpers -- */

void moe__trace_balance(const int64_t *x, int64_t E, moe_trace_balance *out) {
    int64_t total = 0, mx = -1;
    int32_t hot = -1;
    for (int64_t e = 0; e < E; e++) {
        total += x[e];
        if (x[e] > mx) {
            mx = x[e];
            hot = (int32_t)e;
        }
    }
    out->total = total;
    out->reserved = 0;
    if (E <= 0 || total <= 0) {
        out->hot_expert = -1;
        out->max_over_mean = out->cv = out->jain = out->entropy = NAN;
        return;
    }
    out->hot_expert = hot;
    double mean = (double)total / (double)E;
    double ss = 0.0, sq = 0.0, ent = 0.0;
    for (int64_t e = 0; e < E; e++) {
        double v = (double)x[e];
        ss += (v - mean) * (v - mean);
        sq += v * v;
        if (x[e] > 0) {
            double p = v / (double)total;
            ent -= p * log(p);
        }
    }
    out->max_over_mean = (double)mx / mean;
    out->cv = sqrt(ss / (double)E) / mean;
    out->jain = ((double)total * (double)total) / ((double)E * sq);
    out->entropy = E > 1 ? ent / log((double)E) : 1.0;
}

double moe__trace_js(const int64_t *a, const int64_t *b, int64_t E) {
    int64_t sa = 0, sb = 0;
    for (int64_t e = 0; e < E; e++) {
        sa += a[e];
        sb += b[e];
    }
    if (sa <= 0 || sb <= 0) return NAN;
    double js = 0.0;
    for (int64_t e = 0; e < E; e++) {
        double p = (double)a[e] / (double)sa, q = (double)b[e] / (double)sb;
        double m = 0.5 * (p + q);
        if (p > 0) js += 0.5 * p * log2(p / m);
        if (q > 0) js += 0.5 * q * log2(q / m);
    }
    return js < 0 ? 0.0 : js;
}

int moe__trace_threads(const moe_trace_cmp_opts *opts) {
    int n = opts ? opts->threads : 0;
    if (n <= 0) {
        long c = sysconf(_SC_NPROCESSORS_ONLN);
        n = c > 0 ? (int)c : 1;
    }
    if (n > 16) n = 16;
    return n < 1 ? 1 : n;
}

moe_trace_cmp_opts moe_trace_cmp_opts_default(void) {
    moe_trace_cmp_opts o;
    memset(&o, 0, sizeof o);
    return o;
}

/* Largest id in n int16 values (-1 when none >= 0). */
static int64_t max_id(const int16_t *p, int64_t n) {
    int16_t m = -1;
    for (int64_t i = 0; i < n; i++)
        if (p[i] > m) m = p[i];
    return m;
}

/* ------------------------------------------------------------- the kernel -- */

typedef struct cmp_job {
    /* inputs */
    const int16_t *a, *b;
    const float *wa, *wb;     /* both NULL unless weights are compared */
    int64_t t0, t1, L, K, E;
    /* per-thread accumulators */
    int64_t *loads_a, *loads_b; /* [L*E] */
    int64_t *cnt;               /* [L * NCNT] */
    int64_t *jac;               /* [L * (K+1) * (2K+1)] */
    double *wsum;               /* [L * 2]: sum |dw|, sum moved */
    int64_t *first;             /* [L] */
    int64_t tok_compared, tok_skipped, tok_differing, layers_differing;
    /* error: an id >= E */
    int bad;
    int64_t bad_t, bad_l, bad_v;
    int bad_which;
} cmp_job;

enum { C_COMPARED, C_SKIPPED, C_DIFFERING, C_EXACT, C_SHARED, C_WPAIRS, NCNT };

/* Number of distinct values in r[0..K). */
static inline int distinct(const int16_t *r, const int K) {
    int d = 0;
    for (int i = 0; i < K; i++) {
        int dup = 0;
        for (int j = 0; j < i; j++) dup |= (r[j] == r[i]);
        d += !dup;
    }
    return d;
}

static inline int in_row(const int16_t *r, const int K, int16_t v) {
    int f = 0;
    for (int j = 0; j < K; j++) f |= (r[j] == v);
    return f;
}

/* Weight metrics of one position: adds |dw| over shared experts and the moved mass. */
static inline void weights_pos(const int16_t *pa, const int16_t *pb, const float *wa,
                               const float *wb, const int K, double *absdiff, double *moved,
                               int64_t *pairs) {
    double ma = 0.0, mb = 0.0, ad = 0.0;
    int64_t np = 0;
    for (int i = 0; i < K; i++) {
        int dup = 0;
        for (int j = 0; j < i; j++) dup |= (pa[j] == pa[i]);
        if (dup) continue;
        int found = -1;
        for (int j = K - 1; j >= 0; j--)
            if (pb[j] == pa[i]) found = j;
        if (found >= 0) {
            ad += fabs((double)wa[i] - (double)wb[found]);
            np++;
        } else {
            ma += wa[i];
        }
    }
    for (int j = 0; j < K; j++) {
        int dup = 0;
        for (int i = 0; i < j; i++) dup |= (pb[i] == pb[j]);
        if (dup) continue;
        if (!in_row(pa, K, pb[j])) mb += wb[j];
    }
    *absdiff += ad;
    *moved += 0.5 * (ma + mb);
    *pairs += np;
}

/* 1 when r holds an id < 0 (not captured) in either row. */
static inline int row_neg(const int16_t *pa, const int16_t *pb, const int K) {
#ifdef TRACE_SSE2
    if (K == 8) {
        __m128i v = _mm_or_si128(_mm_loadu_si128((const __m128i *)pa),
                                 _mm_loadu_si128((const __m128i *)pb));
        return (_mm_movemask_epi8(v) & 0xAAAA) != 0; /* sign bits of the high bytes */
    }
#endif
    int16_t neg = 0;
    for (int k = 0; k < K; k++) neg |= (int16_t)(pa[k] | pb[k]);
    return neg < 0;
}

/* 1 when a (non-negative) id of either row is >= E. */
static inline int row_big(const int16_t *pa, const int16_t *pb, const int K, int64_t E) {
#ifdef TRACE_SSE2
    if (K == 8 && E <= 32768) {
        __m128i lim = _mm_set1_epi16((short)(E - 1));
        __m128i g = _mm_or_si128(_mm_cmpgt_epi16(_mm_loadu_si128((const __m128i *)pa), lim),
                                 _mm_cmpgt_epi16(_mm_loadu_si128((const __m128i *)pb), lim));
        return _mm_movemask_epi8(g) != 0;
    }
#endif
    int big = 0;
    for (int k = 0; k < K; k++) big |= (pa[k] >= E) | (pb[k] >= E);
    return big;
}

#ifdef TRACE_SSE2
/* Rotate the 8 int16 lanes of v by r lanes. */
#define ROT16(v, r) _mm_or_si128(_mm_srli_si128((v), 2 * (r)), _mm_slli_si128((v), 16 - 2 * (r)))

/* Mask (one bit per byte) of the lanes of a whose value occurs in b (all 8 rotations). */
static inline int lanes_in8(__m128i a, __m128i b) {
    __m128i m = _mm_cmpeq_epi16(a, b);
    m = _mm_or_si128(m, _mm_cmpeq_epi16(a, ROT16(b, 1)));
    m = _mm_or_si128(m, _mm_cmpeq_epi16(a, ROT16(b, 2)));
    m = _mm_or_si128(m, _mm_cmpeq_epi16(a, ROT16(b, 3)));
    m = _mm_or_si128(m, _mm_cmpeq_epi16(a, ROT16(b, 4)));
    m = _mm_or_si128(m, _mm_cmpeq_epi16(a, ROT16(b, 5)));
    m = _mm_or_si128(m, _mm_cmpeq_epi16(a, ROT16(b, 6)));
    m = _mm_or_si128(m, _mm_cmpeq_epi16(a, ROT16(b, 7)));
    return _mm_movemask_epi8(m);
}

/* 1 when the 8 lanes of v hold a repeated value (rotations 1..4 cover every pair). */
static inline int has_dup8(__m128i v) {
    __m128i m = _mm_cmpeq_epi16(v, ROT16(v, 1));
    m = _mm_or_si128(m, _mm_cmpeq_epi16(v, ROT16(v, 2)));
    m = _mm_or_si128(m, _mm_cmpeq_epi16(v, ROT16(v, 3)));
    m = _mm_or_si128(m, _mm_cmpeq_epi16(v, ROT16(v, 4)));
    return _mm_movemask_epi8(m) != 0;
}
#endif

/* Compare two rows as sets: *exact (same ids in the same order), |A n B|, |A u B|, and
 * whether the sets differ. */
static inline void row_sets(const int16_t *pa, const int16_t *pb, const int K, int *exact,
                            int *inter, int *uni, int *differ) {
#ifdef TRACE_SSE2
    if (K == 8) {
        __m128i va = _mm_loadu_si128((const __m128i *)pa), vb = _mm_loadu_si128((const __m128i *)pb);
        int eq = _mm_movemask_epi8(_mm_cmpeq_epi16(va, vb)) == 0xFFFF;
        if (eq && !has_dup8(va)) {
            *exact = 1;
            *inter = *uni = 8;
            *differ = 0;
            return;
        }
        if (!eq && !has_dup8(va) && !has_dup8(vb)) {
            int n = __builtin_popcount((unsigned)lanes_in8(va, vb)) / 2;
            *exact = 0;
            *inter = n;
            *uni = 16 - n;
            *differ = n != 8;
            return;
        }
        /* repeated ids: the general code below */
    }
#endif
    if (memcmp(pa, pb, sizeof(int16_t) * (size_t)K) == 0) {
        *exact = 1;
        *inter = *uni = distinct(pa, K);
        *differ = 0;
        return;
    }
    int da = distinct(pa, K), db = distinct(pb, K), n = 0;
    for (int i = 0; i < K; i++) {
        int dup = 0;
        for (int j = 0; j < i; j++) dup |= (pa[j] == pa[i]);
        n += !dup && in_row(pb, K, pa[i]);
    }
    *exact = 0;
    *inter = n;
    *uni = da + db - n;
    *differ = (n != da || n != db);
}

static inline __attribute__((always_inline)) void cmp_range(cmp_job *J, const int K) {
    const int64_t L = J->L, E = J->E, LK = L * (int64_t)K;
    const int JW = 2 * K + 1, JS = (K + 1) * JW;
    for (int64_t t = J->t0; t < J->t1; t++) {
        const int16_t *ra = J->a + t * LK, *rb = J->b + t * LK;
        int64_t ncmp = 0, ndiff = 0, first = -1;
        for (int64_t l = 0; l < L; l++) {
            const int16_t *pa = ra + l * K, *pb = rb + l * K;
            int64_t *cnt = J->cnt + l * NCNT;
            if (row_neg(pa, pb, K)) {
                cnt[C_SKIPPED]++;
                continue;
            }
            if (row_big(pa, pb, K, E)) {
                for (int k = 0; k < K; k++) {
                    if (pa[k] >= E || pb[k] >= E) {
                        J->bad = 1;
                        J->bad_which = pa[k] >= E ? 0 : 1;
                        J->bad_v = pa[k] >= E ? pa[k] : pb[k];
                        break;
                    }
                }
                J->bad_t = t;
                J->bad_l = l;
                return;
            }
            int64_t *la = J->loads_a + l * E, *lb = J->loads_b + l * E;
            for (int k = 0; k < K; k++) {
                la[pa[k]]++;
                lb[pb[k]]++;
            }
            ncmp++;
            cnt[C_COMPARED]++;
            int exact, inter, uni, differ;
            row_sets(pa, pb, K, &exact, &inter, &uni, &differ);
            cnt[C_EXACT] += exact;
            if (differ) {
                cnt[C_DIFFERING]++;
                ndiff++;
                if (first < 0) first = l;
            }
            cnt[C_SHARED] += inter;
            J->jac[l * JS + inter * JW + uni]++;
            if (J->wa) {
                const int64_t off = (t * L + l) * K;
                weights_pos(pa, pb, J->wa + off, J->wb + off, K, &J->wsum[2 * l],
                            &J->wsum[2 * l + 1], &cnt[C_WPAIRS]);
            }
        }
        if (ncmp == 0) {
            J->tok_skipped++;
            continue;
        }
        J->tok_compared++;
        J->layers_differing += ndiff;
        if (ndiff) {
            J->tok_differing++;
            J->first[first]++;
        }
    }
}

static void cmp_range_any(cmp_job *J) {
    switch (J->K) {
    case 1: cmp_range(J, 1); break;
    case 2: cmp_range(J, 2); break;
    case 4: cmp_range(J, 4); break;
    case 6: cmp_range(J, 6); break;
    case 8: cmp_range(J, 8); break;
    default: cmp_range(J, (int)J->K); break;
    }
}

static void *cmp_thread(void *p) {
    cmp_range_any((cmp_job *)p);
    return NULL;
}

static void job_free(cmp_job *J) {
    free(J->loads_a);
    free(J->loads_b);
    free(J->cnt);
    free(J->jac);
    free(J->wsum);
    free(J->first);
}

static int job_alloc(cmp_job *J) {
    const int64_t L = J->L, E = J->E, K = J->K;
    J->loads_a = calloc((size_t)(L * E), sizeof(int64_t));
    J->loads_b = calloc((size_t)(L * E), sizeof(int64_t));
    J->cnt = calloc((size_t)(L * NCNT), sizeof(int64_t));
    J->jac = calloc((size_t)(L * (K + 1) * (2 * K + 1)), sizeof(int64_t));
    J->wsum = calloc((size_t)(L * 2), sizeof(double));
    J->first = calloc((size_t)L, sizeof(int64_t));
    return J->loads_a && J->loads_b && J->cnt && J->jac && J->wsum && J->first;
}

/* Run n (<= 16) jobs of `size` bytes each from the array `jobs` with tfn: job 0 on the
 * caller, the others on threads; a job whose thread cannot start runs on the caller. */
static void run_jobs(void *jobs, size_t size, int n, void *(*tfn)(void *)) {
    pthread_t th[16];
    int started[16] = {0};
    char *base = (char *)jobs;
    for (int i = 1; i < n; i++) started[i] = pthread_create(&th[i], NULL, tfn, base + (size_t)i * size) == 0;
    (void)tfn(base);
    for (int i = 1; i < n; i++) {
        if (started[i])
            pthread_join(th[i], NULL);
        else
            (void)tfn(base + (size_t)i * size);
    }
}

static double ratio(int64_t num, int64_t den) {
    return den > 0 ? (double)num / (double)den : NAN;
}

void moe_trace_cmp_free(moe_trace_cmp *c) {
    if (!c) return;
    free(c->per_layer);
    free(c->first_diff_hist);
    free(c->loads_a);
    free(c->loads_b);
    free(c);
}

/* Mean over layers (skipping NaN) of the per-layer balances; total/hot from summed loads. */
static void balance_summary(const moe_trace_balance *per, int64_t L, size_t stride_bytes,
                            const int64_t *loads, int64_t E, int64_t *sum_buf,
                            moe_trace_balance *out) {
    memset(sum_buf, 0, sizeof(int64_t) * (size_t)E);
    for (int64_t l = 0; l < L; l++)
        for (int64_t e = 0; e < E; e++) sum_buf[e] += loads[l * E + e];
    moe__trace_balance(sum_buf, E, out);
    double s[4] = {0, 0, 0, 0};
    int64_t n = 0;
    for (int64_t l = 0; l < L; l++) {
        const moe_trace_balance *b =
            (const moe_trace_balance *)((const char *)per + (size_t)l * stride_bytes);
        if (b->total <= 0) continue;
        s[0] += b->max_over_mean;
        s[1] += b->cv;
        s[2] += b->jain;
        s[3] += b->entropy;
        n++;
    }
    out->max_over_mean = n ? s[0] / (double)n : NAN;
    out->cv = n ? s[1] / (double)n : NAN;
    out->jain = n ? s[2] / (double)n : NAN;
    out->entropy = n ? s[3] / (double)n : NAN;
}

moe_status moe_trace_compare(const moe_trace *a, const moe_trace *b,
                             const moe_trace_cmp_opts *opts, moe_trace_cmp **out) {
    static const char *fn = "moe_trace_compare";
    if (!out) return moe__err(MOE_ERR_ARG, "%s: out: expected a pointer, got NULL", fn);
    *out = NULL;
    if (!a) return moe__err(MOE_ERR_ARG, "%s: a: expected a trace, got NULL", fn);
    if (!b) return moe__err(MOE_ERR_ARG, "%s: b: expected a trace, got NULL", fn);
    if (a->T != b->T)
        return moe__err(MOE_ERR_SHAPE, "%s: b: expected %lld tokens (as a), got %lld", fn,
                        (long long)a->T, (long long)b->T);
    if (a->L != b->L)
        return moe__err(MOE_ERR_SHAPE, "%s: b: expected %lld layers (as a), got %lld", fn,
                        (long long)a->L, (long long)b->L);
    if (a->K != b->K)
        return moe__err(MOE_ERR_SHAPE, "%s: b: expected top_k %lld (as a), got %lld", fn,
                        (long long)a->K, (long long)b->K);
    if (a->E > 0 && b->E > 0 && a->E != b->E)
        return moe__err(MOE_ERR_SHAPE, "%s: b: expected num_experts %lld (as a), got %lld", fn,
                        (long long)a->E, (long long)b->E);
    const int64_t T = a->T, L = a->L, K = a->K;
    int use_w = a->w && b->w && !(opts && opts->ignore_weights);
    if (a->tok && b->tok && !(opts && opts->ignore_token_ids)) {
        for (int64_t t = 0; t < T; t++)
            if (a->tok[t] >= 0 && b->tok[t] >= 0 && a->tok[t] != b->tok[t])
                return moe__err(MOE_ERR_ARG,
                                "%s: b: expected the same tokens as a, got token id %ld at "
                                "position %lld where a has %ld (opts.ignore_token_ids skips "
                                "this check)",
                                fn, (long)b->tok[t], (long long)t, (long)a->tok[t]);
    }
    int64_t E = a->E > 0 ? a->E : b->E;
    if (E <= 0) {
        int64_t ma = T ? max_id(a->ids, T * L * K) : -1, mb = T ? max_id(b->ids, T * L * K) : -1;
        E = (ma > mb ? ma : mb) + 1;
        if (E <= 0) E = 1;
    }

    int nth = moe__trace_threads(opts);
    if (T < 4096) nth = 1;
    if ((int64_t)nth > T && T > 0) nth = (int)T;
    cmp_job jobs[16];
    memset(jobs, 0, sizeof jobs);
    moe_status st = MOE_OK;
    for (int i = 0; i < nth; i++) {
        cmp_job *J = &jobs[i];
        J->a = a->ids;
        J->b = b->ids;
        J->wa = use_w ? a->w : NULL;
        J->wb = use_w ? b->w : NULL;
        J->L = L;
        J->K = K;
        J->E = E;
        J->t0 = T * i / nth;
        J->t1 = T * (i + 1) / nth;
        if (!job_alloc(J)) st = moe__err(MOE_ERR_NOMEM, "%s: out of host memory", fn);
    }
    moe_trace_cmp *c = NULL;
    int64_t *sum_buf = NULL;
    if (st != MOE_OK) goto done;
    run_jobs(jobs, sizeof jobs[0], nth, cmp_thread);
    for (int i = 0; i < nth; i++) {
        if (jobs[i].bad) {
            st = moe__err(MOE_ERR_RANGE,
                          "%s: %s: expected expert ids < num_experts %lld, got %lld at token "
                          "%lld, layer %lld",
                          fn, jobs[i].bad_which ? "b" : "a", (long long)E,
                          (long long)jobs[i].bad_v, (long long)jobs[i].bad_t,
                          (long long)jobs[i].bad_l);
            goto done;
        }
    }

    c = calloc(1, sizeof *c);
    sum_buf = malloc(sizeof(int64_t) * (size_t)(E > 0 ? E : 1));
    if (!c || !sum_buf) {
        st = moe__err(MOE_ERR_NOMEM, "%s: out of host memory", fn);
        goto done;
    }
    c->per_layer = calloc((size_t)(L ? L : 1), sizeof *c->per_layer);
    c->first_diff_hist = calloc((size_t)(L ? L : 1), sizeof(int64_t));
    c->loads_a = calloc((size_t)(L * E > 0 ? L * E : 1), sizeof(int64_t));
    c->loads_b = calloc((size_t)(L * E > 0 ? L * E : 1), sizeof(int64_t));
    if (!c->per_layer || !c->first_diff_hist || !c->loads_a || !c->loads_b) {
        st = moe__err(MOE_ERR_NOMEM, "%s: out of host memory", fn);
        goto done;
    }
    c->tokens = T;
    c->layers = L;
    c->top_k = K;
    c->num_experts = E;
    c->positions = T * L;
    c->has_weights = use_w;
    const int JW = (int)(2 * K + 1), JS = (int)((K + 1) * JW);
    double jac_total = 0.0, wabs = 0.0, wmov = 0.0;
    for (int64_t l = 0; l < L; l++) {
        moe_trace_layer_cmp *pl = &c->per_layer[l];
        int64_t cnt[NCNT] = {0};
        double jsum = 0.0, ws0 = 0.0, ws1 = 0.0;
        for (int i = 0; i < nth; i++) {
            cmp_job *J = &jobs[i];
            for (int q = 0; q < NCNT; q++) cnt[q] += J->cnt[l * NCNT + q];
            ws0 += J->wsum[2 * l];
            ws1 += J->wsum[2 * l + 1];
            c->first_diff_hist[l] += J->first[l];
            for (int64_t e = 0; e < E; e++) {
                c->loads_a[l * E + e] += J->loads_a[l * E + e];
                c->loads_b[l * E + e] += J->loads_b[l * E + e];
            }
        }
        /* Jaccard from the exact (intersection, union) histogram. */
        for (int in = 0; in <= K; in++)
            for (int un = 1; un < JW; un++) {
                int64_t n = 0;
                for (int i = 0; i < nth; i++) n += jobs[i].jac[l * JS + in * JW + un];
                if (n) jsum += (double)n * (double)in / (double)un;
            }
        pl->compared = cnt[C_COMPARED];
        pl->skipped = cnt[C_SKIPPED];
        pl->differing = cnt[C_DIFFERING];
        pl->exact = cnt[C_EXACT];
        pl->shared = cnt[C_SHARED];
        pl->weight_pairs = cnt[C_WPAIRS];
        pl->router_disagreement = ratio(pl->differing, pl->compared);
        pl->jaccard = pl->compared ? jsum / (double)pl->compared : NAN;
        pl->overlap = ratio(pl->shared, K * pl->compared);
        pl->exact_agreement = ratio(pl->exact, pl->compared);
        pl->js_divergence = moe__trace_js(c->loads_a + l * E, c->loads_b + l * E, E);
        pl->weight_abs_diff = use_w && pl->weight_pairs ? ws0 / (double)pl->weight_pairs : NAN;
        pl->weight_mass_moved = use_w && pl->compared ? ws1 / (double)pl->compared : NAN;
        moe__trace_balance(c->loads_a + l * E, E, &pl->load_a);
        moe__trace_balance(c->loads_b + l * E, E, &pl->load_b);
        c->compared += pl->compared;
        c->skipped += pl->skipped;
        c->differing += pl->differing;
        c->exact += pl->exact;
        c->shared += pl->shared;
        c->weight_pairs += pl->weight_pairs;
        jac_total += jsum;
        wabs += ws0;
        wmov += ws1;
    }
    for (int i = 0; i < nth; i++) {
        c->tokens_compared += jobs[i].tok_compared;
        c->tokens_skipped += jobs[i].tok_skipped;
        c->tokens_differing += jobs[i].tok_differing;
        c->layers_differing += jobs[i].layers_differing;
    }
    c->router_disagreement = ratio(c->differing, c->compared);
    c->token_disagreement = ratio(c->tokens_differing, c->tokens_compared);
    c->mean_layers_differing = ratio(c->layers_differing, c->tokens_compared);
    c->jaccard = c->compared ? jac_total / (double)c->compared : NAN;
    c->overlap = ratio(c->shared, K * c->compared);
    c->exact_agreement = ratio(c->exact, c->compared);
    c->weight_abs_diff = use_w && c->weight_pairs ? wabs / (double)c->weight_pairs : NAN;
    c->weight_mass_moved = use_w && c->compared ? wmov / (double)c->compared : NAN;
    {
        double js = 0.0;
        int64_t n = 0;
        for (int64_t l = 0; l < L; l++)
            if (!isnan(c->per_layer[l].js_divergence)) {
                js += c->per_layer[l].js_divergence;
                n++;
            }
        c->js_divergence = n ? js / (double)n : NAN;
    }
    balance_summary(&c->per_layer[0].load_a, L, sizeof(moe_trace_layer_cmp), c->loads_a, E,
                    sum_buf, &c->load_a);
    balance_summary(&c->per_layer[0].load_b, L, sizeof(moe_trace_layer_cmp), c->loads_b, E,
                    sum_buf, &c->load_b);

done:
    for (int i = 0; i < nth; i++) job_free(&jobs[i]);
    free(sum_buf);
    if (st != MOE_OK) {
        moe_trace_cmp_free(c);
        return st;
    }
    *out = c;
    return MOE_OK;
}

/* ------------------------------------------------------------------- stats -- */

typedef struct stat_job {
    const int16_t *ids;
    int64_t t0, t1, L, K, E;
    int64_t *loads; /* [L*E] */
    int64_t captured, skipped;
    int bad;
    int64_t bad_t, bad_l, bad_v;
} stat_job;

static void stat_range(stat_job *J) {
    const int64_t L = J->L, K = J->K, E = J->E;
    for (int64_t t = J->t0; t < J->t1; t++) {
        for (int64_t l = 0; l < L; l++) {
            const int16_t *p = J->ids + (t * L + l) * K;
            int16_t neg = 0;
            for (int64_t k = 0; k < K; k++) neg |= p[k];
            if (neg < 0) {
                J->skipped++;
                continue;
            }
            int64_t *ld = J->loads + l * E;
            for (int64_t k = 0; k < K; k++) {
                if (p[k] >= E) {
                    J->bad = 1;
                    J->bad_t = t;
                    J->bad_l = l;
                    J->bad_v = p[k];
                    return;
                }
                ld[p[k]]++;
            }
            J->captured++;
        }
    }
}

static void *stat_thread(void *p) {
    stat_range((stat_job *)p);
    return NULL;
}

void moe_trace_summary_free(moe_trace_summary *s) {
    if (!s) return;
    free(s->per_layer);
    free(s->loads);
    free(s);
}

moe_status moe_trace_stats(const moe_trace *tr, const moe_trace_cmp_opts *opts,
                           moe_trace_summary **out) {
    static const char *fn = "moe_trace_stats";
    if (!out) return moe__err(MOE_ERR_ARG, "%s: out: expected a pointer, got NULL", fn);
    *out = NULL;
    if (!tr) return moe__err(MOE_ERR_ARG, "%s: tr: expected a trace, got NULL", fn);
    const int64_t T = tr->T, L = tr->L, K = tr->K;
    int64_t E = tr->E;
    if (E <= 0) {
        E = (T ? max_id(tr->ids, T * L * K) : -1) + 1;
        if (E <= 0) E = 1;
    }
    int nth = moe__trace_threads(opts);
    if (T < 4096) nth = 1;
    stat_job jobs[16];
    memset(jobs, 0, sizeof jobs);
    moe_status st = MOE_OK;
    moe_trace_summary *s = NULL;
    int64_t *sum_buf = NULL;
    for (int i = 0; i < nth; i++) {
        stat_job *J = &jobs[i];
        J->ids = tr->ids;
        J->L = L;
        J->K = K;
        J->E = E;
        J->t0 = T * i / nth;
        J->t1 = T * (i + 1) / nth;
        J->loads = calloc((size_t)(L * E > 0 ? L * E : 1), sizeof(int64_t));
        if (!J->loads) st = moe__err(MOE_ERR_NOMEM, "%s: out of host memory", fn);
    }
    if (st != MOE_OK) goto done;
    run_jobs(jobs, sizeof jobs[0], nth, stat_thread);
    for (int i = 0; i < nth; i++)
        if (jobs[i].bad) {
            st = moe__err(MOE_ERR_RANGE,
                          "%s: tr: expected expert ids < num_experts %lld, got %lld at token "
                          "%lld, layer %lld",
                          fn, (long long)E, (long long)jobs[i].bad_v, (long long)jobs[i].bad_t,
                          (long long)jobs[i].bad_l);
            goto done;
        }
    s = calloc(1, sizeof *s);
    sum_buf = malloc(sizeof(int64_t) * (size_t)E);
    if (s) {
        s->per_layer = calloc((size_t)(L ? L : 1), sizeof *s->per_layer);
        s->loads = calloc((size_t)(L * E > 0 ? L * E : 1), sizeof(int64_t));
    }
    if (!s || !sum_buf || !s->per_layer || !s->loads) {
        st = moe__err(MOE_ERR_NOMEM, "%s: out of host memory", fn);
        goto done;
    }
    s->tokens = T;
    s->layers = L;
    s->top_k = K;
    s->num_experts = E;
    for (int i = 0; i < nth; i++) {
        s->captured += jobs[i].captured;
        s->skipped += jobs[i].skipped;
        for (int64_t q = 0; q < L * E; q++) s->loads[q] += jobs[i].loads[q];
    }
    for (int64_t l = 0; l < L; l++) moe__trace_balance(s->loads + l * E, E, &s->per_layer[l]);
    balance_summary(s->per_layer, L, sizeof(moe_trace_balance), s->loads, E, sum_buf,
                    &s->balance);
done:
    for (int i = 0; i < nth; i++) free(jobs[i].loads);
    free(sum_buf);
    if (st != MOE_OK) {
        moe_trace_summary_free(s);
        return st;
    }
    *out = s;
    return MOE_OK;
}
