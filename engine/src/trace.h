/* trace.h -- internals of replay traces (trace.c: storage, files; trace_compare.c: metrics). */
#ifndef MOE_TRACE_H
#define MOE_TRACE_H

#include "internal.h"

struct moe_trace {
    int64_t T, L, K, E;     /* tokens, layers, ids per token, experts (0 = unknown) */
    int64_t cap;            /* tokens the owned arrays hold (0 when borrowed) */
    int16_t *ids;           /* [T, L, K] */
    float *w;               /* [T, L, K] or NULL */
    int32_t *tok;           /* [T] or NULL */
    int with_weights;       /* the trace carries weights */
    int owned;              /* ids/w/tok are malloc'd by the trace (else views of keep[]) */
    moe_tensor *keep[3];    /* mapped tensors backing borrowed arrays */
    int nmeta, meta_cap;
    char **mkey, **mval;
};

/* Balance metrics of x[0..E). */
void moe__trace_balance(const int64_t *x, int64_t E, moe_trace_balance *out);
/* Jensen-Shannon divergence in bits between the normalised counts a and b; NaN if either
 * sums to 0. */
double moe__trace_js(const int64_t *a, const int64_t *b, int64_t E);
/* Number of worker threads for opts (1..16). */
int moe__trace_threads(const moe_trace_cmp_opts *opts);

#endif
