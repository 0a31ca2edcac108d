/* route.cu -- routing kernels (CUDA backend slot `route`).
 *
 * One launch per call, for any T: one warp per token (llama4 top-1: one half-warp per token,
 * moe__k_route_top1; sigmoid + bias at E = 256/384: the filter-and-verify kernel below).
 * General kernel: lane `lane` holds the experts
 *     e = (v * 32 + lane) * W + i,   v < NPL / W,  i < W
 * (NPL values per lane, W-element chunks loaded with one vector load: 16 bytes for f32 and
 * 16-bit logits when NPL allows), as "orderable" u32 selection keys (route_math.h): integer
 * order == float order, so the warp reduces keys with redux.sync.  Per token:
 *   1. load, key = sanitised l or sigmoid(l) + b (NaN -> -inf by max.f32; the sigmoid is
 *      moe__route_sigmoid_raw, with one reciprocal range test per W-chunk);
 *   2. deepseekv3 groups: each group's score = sum of its two largest keys (chunk top-2,
 *      merged by a butterfly or a warp max / ballot / max per group), topk_group groups kept
 *      by redux-max / ballot rounds;
 *   3. K rounds of "largest key, lowest expert index": redux max of the lanes' best keys,
 *      redux min of the expert index among the lanes holding it; lane k keeps round k;
 *   4. weights with the same float formulas as the CPU reference (route_math.h), the
 *      softmax denominator over all E summed in double; ids, weights and (when given) the
 *      replay row written by lanes 0..K-1.
 * Every kernel first lets programmatically dependent launches start (moe__rt_let_dependents: the
 * quantised decode kernels that follow overlap it).
 * No host synchronisation, no allocation: graph-capturable.  Size classes (NPL) keep the
 * keys in registers: E <= 128, 256, 384, 512, 1024, 2048.
 */
#include "route_tok.cuh"

#define MOE_RT_WARPS 4 /* tokens (warps) per block */

/* Lets a kernel launched after this one with programmatic stream serialisation start now (the
 * quantised fused MoE's decode kernels prepare their activations while the routing runs, then wait
 * for it with griddepcontrol.wait).  A no-op without such a dependent, and before sm_90. */
__device__ __forceinline__ void moe__rt_let_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

template <int NPL, int DT>
__global__ void __launch_bounds__(MOE_RT_WARPS * 32) moe__k_route(const moe__route_args a) {
    moe__rt_let_dependents();
    constexpr int SZ = moe__rt_size<DT>::v;
    constexpr int W = moe__rt_w<NPL, SZ>::v;
    const int lane = threadIdx.x & 31;
    const int64_t t = (int64_t)blockIdx.x * MOE_RT_WARPS + (threadIdx.x >> 5);
    if (t >= a.T) return; /* whole warps leave together */
    const void *row = (const char *)a.logits + (size_t)t * a.E * SZ;
    moe__rt_token<NPL, W, true>(
        a, t, lane, a.K, true, [&](int e0, float *x) { moe__rt_load<DT, W>(row, e0, a.E, a.vec, x); },
        [&](int e) { return moe__rt_load1<DT>(row, e); });
}

/* llama4 with K = 1 and E <= 128: two tokens per warp, one per half-warp (16 lanes x 8 experts),
 * so that one store instruction (one memory request) writes two tokens' ids, weights or replay
 * entries, and the weight's sigmoid is computed once for both.  Selection as the general kernel's:
 * largest sanitised logit, lowest expert among equal keys (within a lane by ascending expert
 * with strict >, across lanes by key, then index, in a 4-level butterfly).  Measured on an H100
 * at T = 16384: 4.91 us against 6.9 for the general kernel and 5.25 for a compile-time
 * specialisation of it, whose single-lane replay stores cost +0.10 us (this kernel: +0.00). */
template <int DT>
__global__ void __launch_bounds__(MOE_RT_WARPS * 32) moe__k_route_top1(const moe__route_args a) {
    moe__rt_let_dependents();
    constexpr int SZ = moe__rt_size<DT>::v;
    constexpr int W = SZ == 4 ? 4 : 8; /* elements per 16-byte load */
    const int lane = threadIdx.x & 31, hl = lane & 15;
    const int64_t t = ((int64_t)blockIdx.x * MOE_RT_WARPS + (threadIdx.x >> 5)) * 2 + (lane >> 4);
    if (t - (lane >> 4) >= a.T) return; /* whole warps leave together */
    const bool valid = t < a.T;
    const int E = a.E;
    const void *row = (const char *)a.logits + (size_t)(valid ? t : a.T - 1) * E * SZ;
    uint32_t best = 0;
    int bj = 0x7FFFFFFF;
#pragma unroll
    for (int v = 0; v < 8 / W; v++) {
        const int e0 = (v * 16 + hl) * W;
        float x[W];
        moe__rt_load<DT, W>(row, e0, E, a.vec, x);
#pragma unroll
        for (int i = 0; i < W; i++) {
            const uint32_t k = e0 + i < E ? moe__rt_key(fmaxf(MOE_RADD(x[i], 0.0f), -INFINITY)) : 0u;
            if (k > best) { best = k; bj = e0 + i; }
        }
    }
#pragma unroll
    for (int o = 8; o > 0; o >>= 1) {
        const uint32_t ob = __shfl_xor_sync(0xFFFFFFFFu, best, o);
        const int oj = __shfl_xor_sync(0xFFFFFFFFu, bj, o);
        const bool take = ob > best || (ob == best && oj < bj);
        best = take ? ob : best;
        bj = take ? oj : bj;
    }
    if (hl == 0 && valid) {
        a.ids[t] = bj;
        if (a.replay) a.replay[t] = (int16_t)bj;
    }
    const float w = moe__route_weight(MOE_ROUTE_LLAMA4, moe__route_sigmoid_raw(moe__rt_unkey(best)), 0.0f, a.scale,
                                      a.normalize);
    if (hl == 0 && valid) {
        if (a.w_bf16) ((uint16_t *)a.weights)[t] = moe__f32_to_bf16(w);
        else ((float *)a.weights)[t] = w;
    }
}

/* ------------------------------------------------------------------------------------------
 * Sigmoid + bias selection (deepseekv3, minimax2) for E = 32 * NPL: filter, then verify.
 *
 * Lane l holds the NPL consecutive experts l*NPL .. l*NPL + NPL - 1 (groups of G = NPL * 2^gs
 * experts are 2^gs whole lanes); one token per warp.
 *
 * Per token the selection first runs on APPROXIMATE offset keys v~ = s~ + (b + 2) with
 * s~ = rcp.approx(1 + ex2.approx(-x log2 e)) (5 instructions instead of the ~27 of the
 * bit-reproducible sigmoid of route_math.h).  |s~ - s| <= 4e-7 for every x (ex2.approx:
 * 2 + 1.17|x| ulp, times s(1 - s); rcp.approx: 1 ulp; the reference sigmoid itself is within
 * 1 ulp); the two f32 additions add 2^-24 (|b + 2| + |v~|) and the reference's own s + b
 * 2^-24 |s + b|, so v~ - 2 is within e = 4e-7 + 2^-22 (|v~| + 3) of the reference key, and a
 * group score (the sum of two keys) within 2e.  With b >= -2 every v~ is >= 0, so the f32 bits
 * themselves order the keys (no sanitising or sign flip); NaN logits or bias, infinities and
 * b < -2 show as bits >= 0x7F800000 and send the token to the exact path.  The selection works
 * on packed keys (below: the key's low 8 or 9 bits replaced by a code of the expert, so one
 * redux names a winner; the group key likewise loses 5 bits to the group index), a
 * quantisation step of 2^-15 |v~| (2^-14 for E = 384; 2^-18 |g| for groups).  The approximate
 * selection is accepted only when every decision it took is separated by more than all of that
 * (u > v "apart" when u - v > abs + (|u| + |v|) rel; at least twice the bounds above):
 *   - the topk_group-th group score and the best dropped one: abs 2^-17, rel 2^-17;
 *   - consecutive chosen experts (so the returned order is the exact one): 2^-18, 2^-20;
 *   - the K-th chosen and the top of the (K+1)-th's quantum (no unchosen expert beats the
 *     K-th): 2^-18, 2^-20.
 * Then the ids equal the reference ids (exact ties always fail the test).  Otherwise (rare:
 * near-ties, ~1% of random normal logits; NaN/inf, b < -2) the warp redoes the token with the exact
 * keys, exactly as the general kernel does.  The weights always come from the exact sigmoid of
 * the chosen logits, so ids AND weights are bit-identical to the CPU reference either way.
 * ---------------------------------------------------------------------------------------- */
/* The approximate sigmoid s~ (NaN stays NaN). */
__device__ __forceinline__ float moe__rt_sig_approx_raw(float x) {
    float e, r;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(e) : "f"(x * -1.4426950408889634f));
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(1.0f + e));
    return r;
}

/* u > v by more than the tolerance (false for NaN gaps, infinite values, ties). */
__device__ __forceinline__ bool moe__rt_apart(float u, float v, float abs_tol, float rel_tol) {
    return u - v > abs_tol + (fabsf(u) + fabsf(v)) * rel_tol;
}

/* R rounds (R > 0: unrolled; R = 0: rr rounds) of "largest packed key" over the lanes' cached
 * best two (p1 > p2) of the packed keys pk; lane r returns round r's winner (0: none).  The
 * owner of a winner promotes its second; a lane whose cache ran dry rescans for the best two
 * below the one it gave up (packed keys are distinct, so "below" is exact) in a warp-uniform
 * branch taken only when some lane needs it. */
template <int NPL, int R>
__device__ __forceinline__ uint32_t moe__rt_rounds(uint32_t p1, uint32_t p2, const uint32_t (&pk)[NPL], int rr,
                                                   int lane) {
    uint32_t mine = 0;
#pragma unroll
    for (int r = 0; r < (R > 0 ? R : 33); r++) {
        if (R == 0 && r >= rr) break;
        const uint32_t M = __reduce_max_sync(0xFFFFFFFFu, p1);
        mine = lane == r ? M : mine;
        const bool own = p1 == M && M != 0;
        p1 = own ? p2 : p1;
        p2 = own ? 0u : p2;
        if (R > 0 ? r + 1 < R : r + 1 < rr) {
            const bool dry = own && p1 == 0;
            if (__any_sync(0xFFFFFFFFu, dry) && dry) {
#pragma unroll
                for (int j = 0; j < NPL; j++) {
                    const uint32_t q = pk[j] < M ? pk[j] : 0u;
                    p2 = max(p2, min(p1, q));
                    p1 = max(p1, q);
                }
            }
        }
    }
    return mine;
}

/* The exact selection of one token (the fallback): keys from the reference sigmoid, the group
 * step and K rounds exactly as moe__k_route does them; lane r < K gets the r-th id. */
template <int NPL>
__device__ __forceinline__ int moe__rt_sb_exact(const moe__route_args &a, const float (&x)[NPL], const float (&b)[NPL],
                                                int lane, int gs) {
    const int K = a.K;
    uint32_t key[NPL];
    {
        float sg[NPL];
        moe__rt_sigmoid_w<NPL>(x, sg);
#pragma unroll
        for (int j = 0; j < NPL; j++) key[j] = moe__rt_key(fmaxf(MOE_RADD(sg[j], b[j]), -INFINITY));
    }
    if (a.n_group > 1) {
        uint32_t t1 = 0, t2 = 0;
#pragma unroll
        for (int j = 0; j < NPL; j++) {
            t2 = max(t2, min(t1, key[j]));
            t1 = max(t1, key[j]);
        }
        for (int o = 1; o < (1 << gs); o <<= 1) {
            const uint32_t o1 = __shfl_xor_sync(0xFFFFFFFFu, t1, o);
            const uint32_t o2 = __shfl_xor_sync(0xFFFFFFFFu, t2, o);
            t2 = max(max(t2, o2), min(t1, o1));
            t1 = max(t1, o1);
        }
        uint32_t gk = moe__rt_key(fmaxf(MOE_RADD(moe__rt_unkey(t1), moe__rt_unkey(t2)), -INFINITY));
        unsigned keep = 0;
        for (int r = 0; r < a.topk_group; r++) {
            const uint32_t M = __reduce_max_sync(0xFFFFFFFFu, gk);
            const int g = (__ffs(__ballot_sync(0xFFFFFFFFu, gk == M)) - 1) >> gs;
            keep |= 1u << g;
            if ((lane >> gs) == g) gk = 0;
        }
        if (!((keep >> (lane >> gs)) & 1u)) {
#pragma unroll
            for (int j = 0; j < NPL; j++) key[j] = 0;
        }
    }
    /* the lane's two best (key desc, expert asc), refilled by a rescan when dry */
    uint32_t k1 = 0, k2 = 0;
    int j1 = NPL, j2 = NPL;
#pragma unroll
    for (int j = 0; j < NPL; j++) {
        const uint32_t k = key[j];
        if (k > k1) { k2 = k1; j2 = j1; k1 = k; j1 = j; }
        else if (k > k2) { k2 = k; j2 = j; }
    }
    int my_id = 0;
    for (int r = 0; r < K; r++) {
        const uint32_t M = __reduce_max_sync(0xFFFFFFFFu, k1);
        const int mine = lane * NPL + j1;
        const int win = (int)__reduce_min_sync(0xFFFFFFFFu, k1 == M && j1 < NPL ? (unsigned)mine : 0x7FFFFFFFu);
        if (lane == r) my_id = win;
        if (mine == win && j1 < NPL) {
            const uint32_t fk = k1;
            const int fj = j1;
            k1 = k2; j1 = j2; k2 = 0; j2 = NPL;
            if (k1 == 0 && r + 1 < K) {
#pragma unroll
                for (int j = 0; j < NPL; j++) {
                    const uint32_t k0 = key[j];
                    const uint32_t k = (k0 < fk || (k0 == fk && j > fj)) ? k0 : 0u;
                    if (k > k1) { k2 = k1; j2 = j1; k1 = k; j1 = j; }
                    else if (k > k2) { k2 = k; j2 = j; }
                }
            }
        }
    }
    return my_id;
}

/* One token per warp.  Measured on an H100 (deepseekv3, T = 16384) and rejected: two tokens per
 * warp side by side (19.1 vs 17.7 us: the registers cost more warps than the overlap won back),
 * the bias in shared memory for 64 warps per SM (18.5), a persistent grid prefetching the next
 * token into registers (20.7) or shared memory (19.8 vs 18.35), half-warps with one token each and
 * shuffle reductions (22.9), 8-warp blocks (+1.5%), programmatic dependent launch (-1%), 64 warps
 * per SM at 32 registers with the bias reloaded by the fallback (+2%).
 * GS: the group shift when fixed at compile time (DeepSeek-V3's 8 groups of 32 at E = 256: 2),
 * else -1 (a.gshift). */
template <int NPL, int DT, bool K8, int GS>
__global__ void __launch_bounds__(MOE_RT_WARPS * 32, NPL <= 8 ? 12 : 8) moe__k_route_sb(const moe__route_args a) {
    moe__rt_let_dependents();
    constexpr int SZ = moe__rt_size<DT>::v;
    constexpr int W = moe__rt_w<NPL, SZ>::v; /* chunk of one vector load (rows are W-aligned) */
    constexpr int E = 32 * NPL;
    /* packed approximate keys: the selection key with its low IB bits replaced by a code unique
     * to the expert, (NPL - 1 - j) << 5 | (31 - lane) for expert lane * NPL + j, so that one redux
     * max per round names the winner.  Among equal quantised keys this orders by (j, lane), not
     * by expert: the verification below passes only when every decision is apart by more than
     * the quantum and the error bound, so the order among near-equal keys never reaches the
     * output (exact ties fail it and take the exact path).  0 = none (every real key is
     * nonzero: the code of lane 31, j = NPL - 1 is 0 only with a zero key, which no value has). */
    constexpr int IB = E <= 256 ? 8 : 9;
    constexpr uint32_t IM = (1u << IB) - 1u;
    const int lane = threadIdx.x & 31;
    const int64_t t0 = (int64_t)blockIdx.x * MOE_RT_WARPS + (threadIdx.x >> 5);
    /* a warp past T redoes token T - 1 and stores nothing (no early exit: the warp stays
     * provably converged, so the warp reductions below need no divergence checks) */
    const bool valid = t0 < a.T;
    const int64_t t = valid ? t0 : a.T - 1;
    const int K = a.K, gs = GS >= 0 ? GS : a.gshift;
    const bool groups = a.n_group > 1;
    const void *row = (const char *)a.logits + (size_t)t * E * SZ;
    const uint32_t lc = ~IM | (31u - (uint32_t)lane);

    float b[NPL];
    uint32_t pk[NPL], p1 = 0, p2 = 0, p3 = 0, g1 = 0, g2 = 0;
    bool ok = true, kept = true;
    {
        float x[NPL];
#pragma unroll
        for (int v = 0; v < NPL / W; v++) {
            moe__rt_load<DT, W>(row, lane * NPL + v * W, E, 1, x + v * W);
            if (a.bias) moe__rt_load_bias<W>(a, lane * NPL + v * W, b + v * W);
        }
#pragma unroll
        for (int j = 0; j < NPL; j++) {
            if (!a.bias) b[j] = 0.0f;
            /* offset keys: s~ + (b + 2) >= 0 whenever b >= -2, so the float's own bits are the
             * order (no sanitising, no sign flip; 15% faster than orderable keys at T = 16384);
             * NaN logits or bias, infinities and b < -2 give bits >= 0x7F800000 -- checked
             * below, the token then takes the exact path */
            const uint32_t k = __float_as_uint(moe__rt_sig_approx_raw(x[j]) + (b[j] + 2.0f));
            uint32_t q;
            asm("lop3.b32 %0, %1, %2, %3, 0xE6;" : "=r"(q) : "r"(k), "r"(~IM | ((uint32_t)(NPL - 1 - j) << 5)), "r"(lc));
            pk[j] = q; /* (k & ~IM) | code: where imm & lc, k; else imm | lc */
            const uint32_t l1 = min(p1, q); /* the lane's best three */
            p1 = max(p1, q);
            const uint32_t l2 = min(p2, l1);
            p2 = max(p2, l1);
            p3 = max(p3, l2);
            if (groups) { /* group scores from the full (unquantised) keys */
                g2 = max(g2, min(g1, k));
                g1 = max(g1, k);
            }
        }
    }
    ok = p1 < (0x7F800000u & ~IM); /* no NaN, infinity or b < -2 in this lane */
    if (groups) {
#pragma unroll
        for (int o = 1; o < (GS >= 0 ? (1 << GS) : 32); o <<= 1) {
            if (GS < 0 && o >= (1 << gs)) break;
            const uint32_t o1 = __shfl_xor_sync(0xFFFFFFFFu, g1, o);
            const uint32_t o2 = __shfl_xor_sync(0xFFFFFFFFu, g2, o);
            g2 = max(max(g2, o2), min(g1, o1));
            g1 = max(g1, o1);
        }
        const int grp = lane >> gs, ng = 32 >> gs, tg = a.topk_group;
        /* distinct per group (quantised score, then the lower group first); every lane counts
         * the groups ranked before its own: kept = rank < topk_group */
        const uint32_t gk = (__float_as_uint(__uint_as_float(g1) + __uint_as_float(g2)) & ~31u) | (uint32_t)(31 - grp);
        int rank = 0;
        if (ng == 8) {
#pragma unroll
            for (int h = 0; h < 8; h++) rank += __shfl_sync(0xFFFFFFFFu, gk, h << gs) > gk;
        } else {
            for (int h = 0; h < ng; h++) rank += __shfl_sync(0xFFFFFFFFu, gk, h << gs) > gk;
        }
        if (tg < ng) { /* the topk_group-th group against the best one dropped */
            const uint32_t last = __reduce_max_sync(0xFFFFFFFFu, rank == tg - 1 ? gk : 0u);
            const uint32_t next = __reduce_max_sync(0xFFFFFFFFu, rank == tg ? gk : 0u);
            ok = ok && moe__rt_apart(__uint_as_float(last & ~31u), __uint_as_float(next & ~31u), 0x1p-17f, 0x1p-17f);
        }
        kept = rank < tg;
        if (!kept) p1 = p2 = p3 = 0;
    }
    /* K + 1 rounds on the lanes' cached best three (lane r keeps round r's winner; the owner
     * promotes its next), no rescans: a kept lane whose cache ran dry before the last round (it
     * may have missed a later win) makes the warp redo the rounds with rescans (~6% of random
     * tokens) */
    uint32_t mine = 0;
    const int R = K8 ? 9 : K + 1;
    {
        bool dry = false;
#pragma unroll(K8 ? 9 : 3)
        for (int r = 0; r < R; r++) {
            if (r == R - 1) dry = kept && p1 == 0;
            const uint32_t M = __reduce_max_sync(0xFFFFFFFFu, p1);
            mine = lane == r ? M : mine;
            const bool own = p1 == M;
            p1 = own ? p2 : p1;
            p2 = own ? p3 : p2;
            p3 = own ? 0u : p3;
        }
        if (__any_sync(0xFFFFFFFFu, dry)) {
            uint32_t q1 = 0, q2 = 0;
            if (kept) {
#pragma unroll
                for (int j = 0; j < NPL; j++) {
                    q2 = max(q2, min(q1, pk[j]));
                    q1 = max(q1, pk[j]);
                }
            }
            mine = moe__rt_rounds<NPL, K8 ? 9 : 0>(q1, q2, pk, R, lane);
        }
    }
    /* verify with the full approximate keys of the K + 1 winners: consecutive winners apart
     * by the error bound (the order is exact), and the K-th above the top of the (K+1)-th's
     * quantum by it (every unchosen packed key is below the (K+1)-th's, so its approximate
     * key is at most that top: no unchosen expert can beat the K-th) */
    const uint32_t code = mine & IM;
    int my_id = (int)(31u - (code & 31u)) * NPL + (NPL - 1 - (int)(code >> 5));
    float xe = moe__rt_load1<DT>(row, mine ? my_id : 0);
    {
        const float be = !a.bias ? 0.0f
                         : a.bias_bf16 ? moe__bf16_to_f32(((const uint16_t *)a.bias)[my_id])
                                       : ((const float *)a.bias)[my_id];
        const float v = moe__rt_sig_approx_raw(xe) + (be + 2.0f);
        const float vn = __shfl_down_sync(0xFFFFFFFFu, v, 1);
        const uint32_t mn = __shfl_down_sync(0xFFFFFFFFu, mine, 1);
        const bool last = lane + 1 == K;
        const float vc = last ? __uint_as_float(mn | IM) : vn;
        const bool good = lane >= K || (mine != 0 && ((last && mn == 0) || moe__rt_apart(v, vc, 0x1p-18f, 0x1p-20f)));
        ok = __all_sync(0xFFFFFFFFu, ok && good);
    }
    if (!ok) { /* the exact selection, as the general kernel does it */
        float x[NPL];
#pragma unroll
        for (int j = 0; j < NPL; j++) x[j] = moe__rt_load1<DT>(row, lane * NPL + j);
        my_id = moe__rt_sb_exact<NPL>(a, x, b, lane, gs);
        xe = moe__rt_load1<DT>(row, lane < K ? my_id : 0);
    }
    const int64_t o = t * K + lane;
    if (lane < K && valid) { /* ids (and replay) first: their stores overlap the weight math */
        a.ids[o] = my_id;
        if (a.replay) a.replay[o] = (int16_t)my_id;
    }
    float val;
    {
        float sg[1];
        const float xv[1] = { xe };
        moe__rt_sigmoid_w<1>(xv, sg); /* = moe__route_sigmoid_raw, with the fast reciprocal */
        val = sg[0];
    }
    float sum = lane < K ? val : 0.0f;
    if (K8) {
#pragma unroll
        for (int q = 4; q > 0; q >>= 1) sum = MOE_RADD(sum, __shfl_xor_sync(0xFFFFFFFFu, sum, q));
    } else {
        int P = 1;
        while (P < K) P <<= 1;
        for (int q = P >> 1; q > 0; q >>= 1) sum = MOE_RADD(sum, __shfl_xor_sync(0xFFFFFFFFu, sum, q));
    }
    if (lane < K && valid) {
        const float w = moe__route_weight(a.method, val, sum, a.scale, a.normalize);
        if (a.w_bf16) ((uint16_t *)a.weights)[o] = moe__f32_to_bf16(w);
        else ((float *)a.weights)[o] = w;
    }
}


/* The filter-and-verify kernel (the caller checked moe__rt_sb_ok). */
template <int NPL, int DT>
static moe_status moe__rt_launch_sb(const moe__cuda_guard &g, moe__route_args a) {
    constexpr int SZ = moe__rt_size<DT>::v;
    moe__rt_vec_flags<moe__rt_w<NPL, SZ>::v, SZ>(a);
    a.gshift = 0;
    if (a.n_group > 1) {
        const int lpg = a.G / NPL;
        a.gshift = -1;
        for (int s = 0; s <= 5; s++)
            if (lpg == (1 << s)) a.gshift = s;
    }
    const int64_t blocks = (a.T + MOE_RT_WARPS - 1) / MOE_RT_WARPS; /* T < 2^33: checked by the caller */
    const unsigned nb = (unsigned)blocks;
    const bool g2 = NPL == 8 && a.n_group > 1 && a.gshift == 2;
    if (a.K == 8 && g2) moe__k_route_sb<NPL, DT, true, 2><<<nb, MOE_RT_WARPS * 32, 0, g.stream>>>(a);
    else if (a.K == 8) moe__k_route_sb<NPL, DT, true, -1><<<nb, MOE_RT_WARPS * 32, 0, g.stream>>>(a);
    else moe__k_route_sb<NPL, DT, false, -1><<<nb, MOE_RT_WARPS * 32, 0, g.stream>>>(a);
    MOE_CUDA_LAUNCHED("moe_route");
    return MOE_OK;
}

static bool moe__rt_fast_on(void) {
    const char *env = getenv("MOE_ROUTE_FAST");
    return !(env && env[0] == '0');
}

/* Whether moe__k_route_sb<E / 32, DT> handles this call. */
static bool moe__rt_sb_ok(const moe__route_args &a, int sz) {
    if (!moe__route_uses_bias(a.method) || (a.E != 256 && a.E != 384) || a.K >= 32 || !moe__rt_fast_on()) return false;
    const int npl = a.E / 32, rb = npl * sz, vb = (rb % 16 == 0) ? 16 : (rb % 8 == 0) ? 8 : 4;
    if ((uintptr_t)a.logits % vb != 0) return false;
    if (a.bias && ((uintptr_t)a.bias % (a.bias_bf16 ? 2 : 4)) != 0) return false;
    if (a.n_group > 1) {
        if (a.G % npl != 0 || a.topk_group < 1 || a.topk_group > a.n_group) return false;
        const int lpg = a.G / npl;
        if (lpg > 32 || (lpg & (lpg - 1)) != 0) return false;
    }
    return true;
}

template <int NPL, int DT>
static moe_status moe__rt_launch(const moe__cuda_guard &g, moe__route_args a) {
    constexpr int SZ = moe__rt_size<DT>::v;
    constexpr int W = moe__rt_w<NPL, SZ>::v;
    moe__rt_general_flags<W, SZ>(a);
    const int64_t blocks = (a.T + MOE_RT_WARPS - 1) / MOE_RT_WARPS;
    if (blocks > 0x7FFFFFFF) return moe__err(MOE_ERR_UNSUPPORTED, "moe_route: logits: expected T < 2^33, got %lld", (long long)a.T);
    bool top1 = false;
    if constexpr (NPL == 4) top1 = a.K == 1 && a.method == MOE_ROUTE_LLAMA4;
    if (top1) {
        moe__rt_vec_flags<SZ == 4 ? 4 : 8, SZ>(a);
        const int64_t b2 = (a.T + 2 * MOE_RT_WARPS - 1) / (2 * MOE_RT_WARPS);
        moe__k_route_top1<DT><<<(unsigned)b2, MOE_RT_WARPS * 32, 0, g.stream>>>(a);
    } else {
        moe__k_route<NPL, DT><<<(unsigned)blocks, MOE_RT_WARPS * 32, 0, g.stream>>>(a);
    }
    MOE_CUDA_LAUNCHED("moe_route");
    return MOE_OK;
}

template <int DT> static moe_status moe__rt_dispatch(const moe__cuda_guard &g, const moe__route_args &a) {
    if (moe__rt_sb_ok(a, moe__rt_size<DT>::v)) {
        if (a.E == 256) return moe__rt_launch_sb<8, DT>(g, a);
        return moe__rt_launch_sb<12, DT>(g, a);
    }
    if (a.E <= 128) return moe__rt_launch<4, DT>(g, a);
    if (a.E <= 256) return moe__rt_launch<8, DT>(g, a);
    if (a.E <= 384) return moe__rt_launch<12, DT>(g, a);
    if (a.E <= 512) return moe__rt_launch<16, DT>(g, a);
    if (a.E <= 1024) return moe__rt_launch<32, DT>(g, a);
    if (a.E <= 2048) return moe__rt_launch<64, DT>(g, a);
    return moe__err(MOE_ERR_UNSUPPORTED, "moe_route: logits: expected 1..2048 experts, got %d", a.E);
}

extern "C" moe_status moe__cuda_route(const moe_route_cfg *cfg, const moe_tensor *logits, const moe_tensor *bias,
                                      moe_tensor *ids, moe_tensor *weights, moe_tensor *replay) {
    moe__route_args a;
    a.T = logits->shape[0];
    if (a.T == 0) return MOE_OK;
    moe__cuda_guard g("moe_route", logits->dev.index);
    MOE_TRY(g.status);
    moe__rt_args_init(a, cfg, logits, bias, ids, weights, replay);
    switch (logits->dtype) {
    case MOE_F32: return moe__rt_dispatch<MOE_F32>(g, a);
    case MOE_BF16: return moe__rt_dispatch<MOE_BF16>(g, a);
    case MOE_F16: return moe__rt_dispatch<MOE_F16>(g, a);
    default: return moe__err(MOE_ERR_DTYPE, "moe_route: logits: expected dtype f32, bf16 or f16, got %s",
                             moe_dtype_name(logits->dtype));
    }
}
