/* route_tok.cuh -- one token's routing by one warp, shared by the routing kernels (route.cu) and the
 * quantised decode kernels that route their token themselves (fused_qgemv.cu, k_qv_up / k_qv_down at
 * T = 1): the same code, so the same ids and the same weight bits.  The lane layout, the keys and the
 * four steps are described in route.cu's header. */
#ifndef MOELAB_ROUTE_TOK_CUH
#define MOELAB_ROUTE_TOK_CUH

#include "cuda_common.cuh"
#include "route_math.h"

struct moe__route_args {
    const void *logits;
    const void *bias; /* NULL: no bias */
    int32_t *ids;
    void *weights;
    int16_t *replay; /* NULL: no replay */
    int64_t T;
    int E, K, method;
    int n_group, G, topk_group; /* n_group <= 1: no group step */
    float scale;
    int normalize;
    int bias_bf16, w_bf16;
    int vec;      /* rows are W-aligned: vector loads */
    int bias_vec; /* bias is W-aligned: vector loads */
    int gshift;   /* >= 0: groups span 2^gshift whole W-chunks (<= 32): the butterfly path */
};

/* Element width in bytes of a logits dtype. */
template <int DT> struct moe__rt_size { static constexpr int v = DT == MOE_F32 ? 4 : 2; };

/* Chunk width: the largest of 8, 4, 2, 1 that divides NPL and fits in 16 bytes. */
template <int NPL, int SZ> struct moe__rt_w {
    static constexpr int cap = 16 / SZ;
    static constexpr int v = (cap >= 8 && NPL % 8 == 0) ? 8 : (cap >= 4 && NPL % 4 == 0) ? 4 : (NPL % 2 == 0) ? 2 : 1;
};

template <int DT> __device__ __forceinline__ float moe__rt_cvt(uint32_t bits16) {
    if (DT == MOE_BF16) return moe__bf16_to_f32((uint16_t)bits16);
    return moe__f16_to_f32((uint16_t)bits16);
}

/* Load W elements starting at element e0 of row (vector when vec, else scalar with bounds). */
template <int DT, int W>
__device__ __forceinline__ void moe__rt_load(const void *row, int e0, int E, int vec, float *out) {
    constexpr int SZ = moe__rt_size<DT>::v;
    constexpr int B = W * SZ;
    if (vec) {
        if (e0 >= E) {
#pragma unroll
            for (int i = 0; i < W; i++) out[i] = 0.0f;
            return;
        }
        const char *p = (const char *)row + (size_t)e0 * SZ;
        uint32_t w[B >= 4 ? B / 4 : 1];
        if constexpr (B >= 16) {
#pragma unroll
            for (int c = 0; c < B / 16; c++) {
                uint4 u = __ldg((const uint4 *)p + c);
                w[4 * c] = u.x; w[4 * c + 1] = u.y; w[4 * c + 2] = u.z; w[4 * c + 3] = u.w;
            }
        } else if constexpr (B == 8) {
            uint2 u = __ldg((const uint2 *)p);
            w[0] = u.x; w[1] = u.y;
        } else if constexpr (B == 4) {
            w[0] = __ldg((const unsigned int *)p);
        } else {
            w[0] = __ldg((const unsigned short *)p);
        }
#pragma unroll
        for (int i = 0; i < W; i++) {
            if constexpr (SZ == 4) out[i] = __uint_as_float(w[i]);
            else out[i] = moe__rt_cvt<DT>((w[i / 2] >> ((i & 1) * 16)) & 0xFFFFu);
        }
    } else {
#pragma unroll
        for (int i = 0; i < W; i++) {
            int e = e0 + i;
            if (e < E) {
                if constexpr (SZ == 4) out[i] = __ldg((const float *)row + e);
                else out[i] = moe__rt_cvt<DT>(__ldg((const unsigned short *)row + e));
            } else {
                out[i] = 0.0f;
            }
        }
    }
}

/* W bias values at e0, as stored (a NaN bias makes s + b NaN, which the key reads as -inf). */
template <int W>
__device__ __forceinline__ void moe__rt_load_bias(const moe__route_args &a, int e0, float *out) {
    if (a.bias_bf16) moe__rt_load<MOE_BF16, W>(a.bias, e0, a.E, a.bias_vec, out);
    else moe__rt_load<MOE_F32, W>(a.bias, e0, a.E, a.bias_vec, out);
}

template <int DT> __device__ __forceinline__ float moe__rt_load1(const void *row, int e) {
    if (DT == MOE_F32) return __ldg((const float *)row + e);
    return moe__rt_cvt<DT>(__ldg((const unsigned short *)row + e));
}

/* __frcp_rn(d) for d in [1, 2^126): the compiler's own fast path of the correctly rounded
 * reciprocal (MUFU.RCP, then one Newton step with two FMAs), without its range test. */
__device__ __forceinline__ float moe__rt_rcp_fast(float d) {
    float r;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(d));
    const float t = __fmaf_rn(d, r, -1.0f);
    return __fmaf_rn(r, -t, r);
}

/* W sigmoids of raw (unsanitised) logits, = moe__route_sigmoid_raw: one range test for the W
 * reciprocals (1 + exp(-x) < 2^126, true unless some x < -87) instead of one each. */
template <int W> __device__ __forceinline__ void moe__rt_sigmoid_w(const float *x, float *s) {
    float d[W];
    bool fast = true;
#pragma unroll
    for (int i = 0; i < W; i++) {
        d[i] = MOE_RADD(1.0f, moe__route_expneg_raw(x[i]));
        fast = fast && d[i] < 0x1p126f;
    }
    if (fast) {
#pragma unroll
        for (int i = 0; i < W; i++) s[i] = moe__rt_rcp_fast(d[i]);
    } else {
#pragma unroll
        for (int i = 0; i < W; i++) s[i] = MOE_RRCP(d[i]);
    }
}

/* Orderable key of a sanitised float and back (= moe__route_key / moe__route_unkey, written as
 * one shift and one three-input logic op each). */
__device__ __forceinline__ uint32_t moe__rt_key(float x) {
    const uint32_t u = __float_as_uint(x);
    return u ^ ((uint32_t)((int32_t)u >> 31) | 0x80000000u);
}
__device__ __forceinline__ float moe__rt_unkey(uint32_t k) {
    return __uint_as_float(k ^ (~(uint32_t)((int32_t)k >> 31) | 0x80000000u));
}

/* Group scores with chunks of CW elements (CW divides G): each lane's top-2 per group, then
 * warp max / ballot / max; returns the key of group `lane` (0 for lanes >= n_group). */
template <int NPL, int W, int CW>
__device__ __forceinline__ uint32_t moe__rt_group_keys(const uint32_t (&key)[NPL], int lane, int G, int ng) {
    constexpr int NC = NPL / CW; /* chunks per lane */
    uint32_t c1[NC], c2[NC];
    int cg[NC];
#pragma unroll
    for (int c = 0; c < NC; c++) {
        /* chunk c covers slots c*CW .. c*CW+CW-1 (inside one W-chunk since CW divides W) */
        int j0 = c * CW;
        int e0 = ((j0 / W) * 32 + lane) * W + (j0 % W);
        cg[c] = e0 / G;
        uint32_t a = 0, b = 0;
#pragma unroll
        for (int i = 0; i < CW; i++) {
            uint32_t k = key[j0 + i];
            b = max(b, min(a, k));
            a = max(a, k);
        }
        c1[c] = a;
        c2[c] = b;
    }
    uint32_t mine = 0;
#pragma unroll 1
    for (int g = 0; g < ng; g++) {
        uint32_t t1 = 0, t2 = 0;
#pragma unroll
        for (int c = 0; c < NC; c++) {
            bool in = cg[c] == g;
            uint32_t a = in ? c1[c] : 0u, b = in ? c2[c] : 0u;
            t2 = max(t2, max(b, min(t1, a)));
            t1 = max(t1, a);
        }
        uint32_t M1 = __reduce_max_sync(0xFFFFFFFFu, t1);
        unsigned holders = __ballot_sync(0xFFFFFFFFu, t1 == M1);
        uint32_t M2;
        if (__popc(holders) >= 2) M2 = M1;
        else M2 = __reduce_max_sync(0xFFFFFFFFu, t1 == M1 ? t2 : t1);
        float s = moe__rt_unkey(M1);
        if (G > 1) s = fmaxf(MOE_RADD(s, moe__rt_unkey(M2)), -INFINITY); /* inf + -inf: NaN -> -inf */
        if (lane == g) mine = moe__rt_key(s);
    }
    return mine;
}

/* Host: a call's arguments (ids, weights, replay may be NULL: nothing stored); vec, bias_vec and gshift
 * are set per kernel (moe__rt_general_flags for the general kernel). */
static inline void moe__rt_args_init(moe__route_args &a, const moe_route_cfg *cfg, const moe_tensor *logits,
                                     const moe_tensor *bias, moe_tensor *ids, moe_tensor *weights,
                                     moe_tensor *replay) {
    a.T = logits->shape[0];
    a.logits = moe_tensor_data(logits);
    a.bias = bias ? moe_tensor_data(bias) : NULL;
    a.bias_bf16 = bias && bias->dtype == MOE_BF16;
    a.ids = ids ? (int32_t *)moe_tensor_data(ids) : NULL;
    a.weights = weights ? moe_tensor_data(weights) : NULL;
    a.w_bf16 = weights && weights->dtype == MOE_BF16;
    a.replay = replay ? (int16_t *)moe_tensor_data(replay) : NULL;
    a.E = (int)logits->shape[1];
    a.K = cfg->top_k;
    a.method = cfg->method;
    a.n_group = cfg->method == MOE_ROUTE_DEEPSEEKV3 && cfg->n_group > 1 ? cfg->n_group : 0;
    a.G = a.n_group > 1 ? a.E / a.n_group : a.E;
    a.topk_group = cfg->topk_group;
    a.scale = cfg->scale;
    a.normalize = cfg->normalize;
    a.vec = 0;
    a.bias_vec = 0;
    a.gshift = -1;
}

/* Host: vector-load flags of a call for chunks of W elements of SZ bytes (every kernel's launcher). */
template <int W, int SZ> static inline void moe__rt_vec_flags(moe__route_args &a) {
    a.vec = (a.E % W == 0) && ((uintptr_t)a.logits % (W * SZ) == 0);
    a.bias_vec = a.bias && (a.E % W == 0) && ((uintptr_t)a.bias % (W * (a.bias_bf16 ? 2 : 4)) == 0);
}

/* Host: the general kernel's flags (chunks of W): vector loads, and gshift >= 0 when groups span 2^gshift
 * whole chunks (the butterfly path). */
template <int W, int SZ> static inline void moe__rt_general_flags(moe__route_args &a) {
    moe__rt_vec_flags<W, SZ>(a);
    a.gshift = -1;
    if (a.n_group > 1 && a.G % W == 0) {
        const int P = a.G / W;
        for (int s = 0; s <= 5; s++)
            if (P == (1 << s)) a.gshift = s;
    }
}

/* A token's routing result in lane k < K: the k-th expert chosen (rank order) and its weight. */
struct moe__rt_pick {
    int id;
    float w;
};

/* Routes token t of a (the steps of route.cu's header) with the warp's 32 lanes, which must all call
 * it.  load_x(e0, x) puts the W logits at experts e0 .. e0 + W - 1 of the token's row into x (0 past
 * E), load1(e) the logit of expert e.  rounds (<= K): the top-K rounds run; lanes >= rounds get no
 * id.  WTS: the weights (else w = 0).  store: ids, replay and weights written to row t of a. */
template <int NPL, int W, bool WTS, typename LX, typename L1>
__device__ __forceinline__ moe__rt_pick moe__rt_token(const moe__route_args &a, int64_t t, int lane, int rounds,
                                                      bool store, LX &&load_x, L1 &&load1) {
    constexpr int NV = NPL / W;
    const int E = a.E, K = a.K, method = a.method;
    const bool use_bias = moe__route_uses_bias(method);

    /* 1. keys */
    uint32_t key[NPL];
#pragma unroll
    for (int v = 0; v < NV; v++) {
        const int e0 = (v * 32 + lane) * W;
        float x[W], b[W];
        load_x(e0, x);
        if (use_bias) {
            if (a.bias) moe__rt_load_bias<W>(a, e0, b);
            else {
#pragma unroll
                for (int i = 0; i < W; i++) b[i] = 0.0f;
            }
        }
        float s[W];
        if (use_bias) moe__rt_sigmoid_w<W>(x, s);
#pragma unroll
        for (int i = 0; i < W; i++) {
            /* sanitised score: NaN -> -inf (max.f32 returns the number), -0 -> +0 (x + 0).
             * s + b: s in [+0, 1] is never -0 or NaN, so only a NaN/inf bias can make it NaN */
            const float k = use_bias ? fmaxf(MOE_RADD(s[i], b[i]), -INFINITY) : fmaxf(MOE_RADD(x[i], 0.0f), -INFINITY);
            key[v * W + i] = moe__rt_key(k);
        }
        if (e0 + W > E) { /* the row's end: experts >= E are not selectable */
#pragma unroll
            for (int i = 0; i < W; i++)
                if (e0 + i >= E) key[v * W + i] = 0u;
        }
    }

    /* softmax statistics over all E (default, renormalize_naive): keys are the logits */
    float m = 0.0f, S = 1.0f;
    if (WTS && moe__route_needs_softmax(method)) {
        uint32_t lm = 0;
#pragma unroll
        for (int j = 0; j < NPL; j++) lm = max(lm, key[j]);
        m = moe__rt_unkey(__reduce_max_sync(0xFFFFFFFFu, lm));
        double acc = 0.0;
#pragma unroll
        for (int j = 0; j < NPL; j++)
            if (key[j]) acc += (double)moe__route_expf(MOE_RSUB(moe__rt_unkey(key[j]), m));
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xFFFFFFFFu, acc, o);
        S = (float)acc;
    }

    /* 2. deepseekv3 groups */
    if (a.n_group > 1 && a.gshift >= 0) {
        /* groups of P = 2^gshift whole W-chunks, P <= 32: chunk top-2, butterfly inside the
         * P-lane segments, every group score gathered in lane g, ranks by broadcast */
        const int P = 1 << a.gshift;
        uint32_t t1[NV], t2[NV];
#pragma unroll
        for (int v = 0; v < NV; v++) {
            uint32_t x1 = 0, x2 = 0;
#pragma unroll
            for (int i = 0; i < W; i++) {
                const uint32_t k = key[v * W + i];
                x2 = max(x2, min(x1, k));
                x1 = max(x1, k);
            }
            t1[v] = x1;
            t2[v] = x2;
        }
#pragma unroll 1
        for (int o = 1; o < P; o <<= 1) {
#pragma unroll
            for (int v = 0; v < NV; v++) {
                const uint32_t o1 = __shfl_xor_sync(0xFFFFFFFFu, t1[v], o);
                const uint32_t o2 = __shfl_xor_sync(0xFFFFFFFFu, t2[v], o);
                t2[v] = max(max(t2[v], o2), min(t1[v], o1));
                t1[v] = max(t1[v], o1);
            }
        }
        /* lane g < n_group fetches group g's score from lane (g*P) % 32, chunk v = g*P / 32 */
        const int src = (lane << a.gshift) & 31, vg = (lane << a.gshift) >> 5;
        uint32_t gk = 0;
#pragma unroll
        for (int v = 0; v < NV; v++) {
            float sc = moe__rt_unkey(t1[v]);
            if (a.G > 1) sc = fmaxf(MOE_RADD(sc, moe__rt_unkey(t2[v])), -INFINITY);
            const uint32_t got = __shfl_sync(0xFFFFFFFFu, moe__rt_key(sc), src);
            if (v == vg) gk = got;
        }
        if (lane >= a.n_group) gk = 0;
        /* topk_group rounds of "largest group key, lowest group index" (every group key is
         * > 0, lanes without a group hold 0) */
        unsigned keep = 0;
#pragma unroll 4
        for (int r = 0; r < a.topk_group; r++) {
            const uint32_t M = __reduce_max_sync(0xFFFFFFFFu, gk);
            const int g = __ffs(__ballot_sync(0xFFFFFFFFu, gk == M)) - 1;
            keep |= 1u << g;
            if (lane == g) gk = 0;
        }
#pragma unroll
        for (int v = 0; v < NV; v++) {
            const int q = v * 32 + lane; /* chunk index; its group is q >> gshift */
            const bool drop = q * W >= E || !((keep >> (q >> a.gshift)) & 1u);
#pragma unroll
            for (int i = 0; i < W; i++)
                if (drop) key[v * W + i] = 0;
        }
    } else if (a.n_group > 1) {
        uint32_t gk = (a.G % W == 0) ? moe__rt_group_keys<NPL, W, W>(key, lane, a.G, a.n_group)
                                     : moe__rt_group_keys<NPL, W, 1>(key, lane, a.G, a.n_group);
        unsigned keep = 0;
#pragma unroll 1
        for (int r = 0; r < a.topk_group; r++) {
            uint32_t M = __reduce_max_sync(0xFFFFFFFFu, gk);
            int g = __ffs(__ballot_sync(0xFFFFFFFFu, gk == M && lane < a.n_group)) - 1;
            keep |= 1u << g;
            if (lane == g) gk = 0;
        }
        if (a.G % W == 0) { /* a W-chunk lies in one group: one division per chunk */
#pragma unroll
            for (int v = 0; v < NV; v++) {
                const int e0 = (v * 32 + lane) * W;
                const bool drop = e0 >= E || !((keep >> (e0 / a.G)) & 1u);
#pragma unroll
                for (int i = 0; i < W; i++)
                    if (drop) key[v * W + i] = 0;
            }
        } else {
#pragma unroll
            for (int j = 0; j < NPL; j++) {
                const int e = ((j / W) * 32 + lane) * W + (j % W);
                if (e >= E || !((keep >> (e / a.G)) & 1u)) key[j] = 0;
            }
        }
    }

    /* 3. top-K.  Each lane caches its two best remaining (key, expert) pairs, ordered by key
     * (descending) then expert (ascending).  A round takes the warp's best head (redux max,
     * then redux min of the expert among equal keys); the owner promotes its second, and
     * rescans only when its cache runs dry (for "ranked after the last one it gave up":
     * every element ranked before that is taken, since rounds go in global rank order). */
    uint32_t k1 = 0, k2 = 0;
    int e1 = 0x7FFFFFFF, e2 = 0x7FFFFFFF;
#pragma unroll
    for (int j = 0; j < NPL; j++) {
        const int e = ((j / W) * 32 + lane) * W + (j % W);
        const uint32_t k = key[j];
        /* ascending e with strict > keeps the lower expert first among equal keys */
        if (k > k1) { k2 = k1; e2 = e1; k1 = k; e1 = e; }
        else if (k > k2) { k2 = k; e2 = e; }
    }
    int my_id = 0;
    uint32_t my_key = 0;
#pragma unroll 1
    for (int r = 0; r < rounds; r++) {
        const uint32_t M = __reduce_max_sync(0xFFFFFFFFu, k1);
        const int win = (int)__reduce_min_sync(0xFFFFFFFFu, k1 == M ? (unsigned)e1 : 0x7FFFFFFFu);
        if (lane == r) { my_id = win; my_key = M; }
        /* the owner gives it up (selects, no branch); e1 is unique among the lanes holding one */
        const bool own = e1 == win;
        const uint32_t fk = k1;
        const int fe = e1;
        k1 = own ? k2 : k1;
        e1 = own ? e2 : e1;
        k2 = own ? 0u : k2;
        e2 = own ? 0x7FFFFFFF : e2;
        if (own && k1 == 0 && r + 1 < rounds) { /* cache dry: the two best ranked after (fk, fe) */
#pragma unroll
            for (int j = 0; j < NPL; j++) {
                const int e = ((j / W) * 32 + lane) * W + (j % W);
                const uint32_t k0 = key[j];
                const uint32_t k = (k0 < fk || (k0 == fk && e > fe)) ? k0 : 0u;
                if (k > k1) { k2 = k1; e2 = e1; k1 = k; e1 = e; }
                else if (k > k2) { k2 = k; e2 = e; }
            }
        }
    }
    const uint32_t key0 = __shfl_sync(0xFFFFFFFFu, my_key, 0); /* round 0's key */
    const int64_t o = t * K + lane;
    if (store && lane < K) { /* ids (and replay) first: their stores overlap the weight math */
        a.ids[o] = my_id;
        if (a.replay) a.replay[o] = (int16_t)my_id;
    }

    if (!WTS) return {my_id, 0.0f};

    /* 4. weights */
    /* the sigmoid methods: sigmoid(sanitize(x)) = moe__route_sigmoid_raw(x) */
    const bool sig = method == MOE_ROUTE_SIGMOID_RENORM || method == MOE_ROUTE_DEEPSEEKV3 ||
                     method == MOE_ROUTE_MINIMAX2 || method == MOE_ROUTE_LLAMA4;
    const float x = use_bias ? load1(lane < K ? my_id : 0) : moe__rt_unkey(my_key);
    const float val = sig ? moe__route_sigmoid_raw(x) : moe__route_wsrc(method, x, m, S, moe__rt_unkey(key0));
    float sum = 0.0f;
    if (moe__route_needs_sum(method, a.normalize)) {
        /* butterfly over the next power of two >= K, as moe__route_ksum on the host */
        sum = lane < K ? val : 0.0f;
        int P = 1;
        while (P < K) P <<= 1;
#pragma unroll 1
        for (int o = P >> 1; o > 0; o >>= 1) sum = MOE_RADD(sum, __shfl_xor_sync(0xFFFFFFFFu, sum, o));
    }
    float w = 0.0f;
    if (lane < K) {
        w = moe__route_weight(method, val, sum, a.scale, a.normalize);
        if (store) {
            if (a.w_bf16) ((uint16_t *)a.weights)[o] = moe__f32_to_bf16(w);
            else ((float *)a.weights)[o] = w;
        }
    }
    return {my_id, w};
}

#endif
