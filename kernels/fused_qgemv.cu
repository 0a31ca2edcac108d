/* fused_qgemv.cu -- decode path of the quantised fused MoE on CUDA (every mode; few tokens).
 *
 * At T <= a few tokens the tile path (fused_quant.cu) pays for its launches -- quantisers, align,
 * memsets, two GEMMs, finalize: 6 (fp8_block) to 13 (fp8) after routing -- more than for reading
 * the weights.  This path streams each routed expert's weights once, as matrix-vector products
 * on the tensor cores, in 2 launches after routing:
 *   1. k_qv_up (x quantisation + GEMM1 + activation): grid (N1/16 row tiles, T*K pairs); the
 *      block of the lowest pair routed to expert e (the "leader"; other blocks exit) computes a
 *      16-row tile of W13[e] -- 8 gate rows and their 8 up rows (relu2: 16 rows) -- for every
 *      pair of e, 8 pairs a pass, its 4 warps splitting H in 128-column blocks.  Before that,
 *      x is quantised exactly as moe__cuda_quantize would (fp8: one scale = amax/448 over T x H;
 *      fp8_block: per (token, 128)) into the workspace by the working blocks themselves, in
 *      chunks of 1024 elements shared out without a grid barrier (qv_share); each block first
 *      puts its first round of weight loads in flight, so they overlap that step.  Epilogue as
 *      the tile path's G1 (llama4 weight, bias, moe__fm_act) into inter[p] in pair order (bf16);
 *      fp8 also takes the amax of those values (atomicMax of their bits), the intermediate's
 *      per-tensor amax.  Block (0, 0) counts routed ids out of [0, E).
 *   2. k_qv_down (intermediate quantisation + GEMM2 + combine): grid (H/16 column tiles x T),
 *      tokens fastest (blocks reading the same W2 rows for different tokens run together).  The
 *      intermediate rows of the local pairs are quantised (fp8: with the amax of step 1; fp8_block:
 *      per (pair, 128)) in shared chunks as above, then the block's 8 warps split the token's
 *      (local pair, 128-column block) units of its 16 W2 rows, each unit's f32 partial times
 *      its scales and routing weight; out[t, c] = bf16(sum + sum_k w_k b2[e_k, c]) directly --
 *      zeros for a token without local pairs, so no finalize.
 * The MMA: mma.sync m16n8k16 f16 -> f32, A = 16 weight rows, B = up to 8 activation rows (pairs).
 * e4m3 codes are exact in f16 (cvt.rn.f16x2.e4m3x2, sm_89+; elsewhere bit placement and one
 * exact multiply), so the tensor cores multiply the codes exactly, in f32, and the scales are
 * applied to f32 sums as in the tile path: per 128 columns for fp8_block (activation scale x
 * weight scale), per tensor for fp8 (x or intermediate scale x the expert's weight scale).  Lane
 * (g, q) of a warp loads 16 consecutive codes of rows g and g + 8 (columns 64c + 16q ..) and 16
 * of activation row g, and feeds them to 4 MMAs as the MMA's columns 2q, 2q+1, 2q+8, 2q+9 (any
 * one-to-one map of the columns serves when both operands use it): 16-byte loads straight from
 * global memory, no shared-memory staging.
 * Block-local activations (fp8, fp8_block, nvfp4; x of at most QV_LOC_UP values, a token's intermediate
 * rows of at most QV_LOC_MAX: Qwen3-30B-A3B at T = 1): every block loads the activations it needs
 * into registers before the routed ids and its weights, quantises them itself into shared memory
 * (the same codes and scales as the shared steps; fp8_block and nvfp4 as the f16 values the MMAs
 * take, qv_loc_h) and skips those steps -- the redundant work costs less than the grid-wide waits.
 * k_qv_down then runs 16 warps, nvfp4's k_qv_up 2 row tiles a block (QV_UP_LOC_TILES).  The
 * intermediate's amax (fp8, nvfp4) then lives in its own slot, which the last k_qv_down block to
 * have read it resets.  When the call routed its own tokens, both kernels are launched as
 * programmatic dependents (qv_pdl): the routing kernel lets them start at once and k_qv_up
 * quantises x before griddepcontrol.wait, while the routing runs; k_qv_down reads the routed ids
 * and issues its W2 loads before its own wait, while k_qv_up's last blocks run.  At T = 1 (E <= 128)
 * no routing kernel runs: each k_qv_up block routes its own pair with the routing kernel's code
 * (route_tok.cuh) and issues its weight loads at once; block (0, 0) writes the call's ids, weights
 * and replay and releases a flag that k_qv_down's blocks acquire before reading them, with the ids
 * packed in the same word up to K = 8 (one round trip; qv_args.rt_flag) (qv_self_route; path
 * gemv_route).  The fp8 modes' k_qv_up is then itself a programmatic dependent of whatever kernel
 * precedes the call, waiting for it first (qv_args.up_pdl).  At T = 1 on sm_90a, k_qv_down copies its
 * experts' 16 W2 rows into shared memory with one bulk copy an expert as soon as it has the ids,
 * instead of loading them into registers (BK, qv_dn_bulk; paths gemv_bulk, gemv_route_bulk): the same
 * MMAs on the same values in the same order.
 * Same numerics as the tile path (quantised activations bit-identical; other f32 summation
 * order); deterministic (no atomics on values); graph-capturable (nothing allocated, no host
 * sync; grids from T on the host).  The work-sharing counters live in the workspace and are
 * zero between calls: step 1 resets step 2's, step 2 resets step 1's. */
#include "cuda_common.cuh"
#include "fused_moe.cuh"
#include "fused_quant.cuh"
#include "quant_rows.cuh"
#include "route_tok.cuh"

#include <string.h>

#define FN "moe_fused_moe"

/* MOE_QV_TL (developer builds only, -DMOE_QV_TL): thread 0 of every block of the two kernels stamps
 * %globaltimer at fixed points (qv_tl) into qv_tl_buf[kernel][block][slot], slot 7 its SM id;
 * moe_dev_qv_tl copies them out, moe_dev_qv_tl_reset zeroes them (scripts/dev/qv_timeline.lua). */
#ifdef MOE_QV_TL
__device__ unsigned long long qv_tl_buf[2][1024][8];
__device__ __forceinline__ void qv_tl(int k, int slot) {
    if (threadIdx.x != 0) return;
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    const unsigned b = blockIdx.x + blockIdx.y * gridDim.x;
    if (b >= 1024) return;
    qv_tl_buf[k][b][slot] = t;
    unsigned sm;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
    qv_tl_buf[k][b][7] = sm;
}
extern "C" __attribute__((visibility("default"))) int moe_dev_qv_tl(unsigned long long *dst) {
    return (int)cudaMemcpyFromSymbol(dst, qv_tl_buf, sizeof qv_tl_buf);
}
extern "C" __attribute__((visibility("default"))) int moe_dev_qv_tl_reset(void) {
    static unsigned long long z[2][1024][8];
    return (int)cudaMemcpyToSymbol(qv_tl_buf, z, sizeof z);
}
#define QV_TL(k, s) qv_tl(k, s)
#else
#define QV_TL(k, s) ((void)0)
#endif

#define QV_UP_THREADS 128 /* GEMM1: 4 warps split H over one 16-row tile */
#define QV_DN_THREADS 256 /* GEMM2: 8 warps split the token's units over one 16-column tile */
#define QV_DN_LOC_THREADS 512 /* ... 16 with block-local activations (a grid of at most 128 blocks; H100:
                               * Qwen3 T = 1 nvfp4 29.8 -> 26.9 us, eighth session; qv_dn_threads) */
/* row tiles a k_qv_up block (QV_UP_THREADS each): 2 for nvfp4 with block-local activations (its
 * x quantisation, redone by every block, then by half as many blocks with 2x the threads).  H100
 * Qwen3-30B-A3B T = 1: before qv_loc_h, 1 -> 4 tiles 27.0-27.1 -> 26.5 us; thirteenth session
 * (with self-routing), 4 tiles 21.9 us, 2 tiles 21.5-21.6, 8 tiles 23.1 (four alternating rounds
 * each); fp8 modes +0.1 us with 4, so they keep 1 */
#define QV_UP_LOC_TILES 2
template <int MODE, bool LOC> struct qv_up_tiles {
    static constexpr int N = LOC && MODE == MOE_QUANT_NVFP4 ? QV_UP_LOC_TILES : 1;
};
/* threads of k_qv_down: 16 warps with block-local activations (fp8, fp8_block, nvfp4), 8 otherwise.
 * Launched as programmatic dependents (qv_pdl), blocks of 8 warps, scheduled as soon as k_qv_up's free
 * their SMs, packed two an SM: H100, Qwen3-30B-A3B T = 1, fp8 / fp8_block 1.9 / 2.9 us slower than
 * plain launches with 8 warps, 0.7 us faster with 16 (and plain launches: 16 warps within 0.1-0.6 us
 * of 8, eighth session).  The same warps either launch, so routed calls reproduce native ones bit for
 * bit; the fp8 modes sum in another order than the shared steps (within the CPU tolerance). */
template <int MODE, bool LOC> struct qv_dn_threads { /* with or without bulk copies (BK): the same warps, sums */
    static constexpr int N = LOC && MODE != MOE_QUANT_MXFP4 && MODE != MOE_QUANT_MXINT4 ? QV_DN_LOC_THREADS
                                                                                       : QV_DN_THREADS;
};
/* k_qv_down with its W2 rows by bulk copies (BK; qv_dn_bulk): each local expert's 16 rows of the block's
 * column tile (contiguous in W2) by one bulk copy (cp.async.bulk, one mbarrier for all) into dynamic shared
 * memory, as they lie in W2.  (A copy a row, padded to spread the banks: 128 copies from one warp took
 * 4 us to issue; H100, Qwen3-30B-A3B T = 1.) */
#define QV_BK_MAX_SMEM (200 * 1024) /* dynamic shared memory a BK block may take (H100: 227 KB a block) */
#define QV_UP_UG 1        /* GEMM1: 128-column blocks a round (4 weight loads a lane) */
#define QV_DN_UG 4        /* GEMM2: units a round (16 weight loads a lane) */
#define QV_DN_BK_UG 2     /* ... with the weights in shared memory (BK: loaded as used) */
#define QV_NB 8           /* pairs (MMA columns) a pass */
#define QV_CHUNK 1024     /* elements of one activation-quantisation chunk */
#define QV_DEFAULT_T 4    /* T <= this takes the path unless MOE_FUSED_QGEMV says otherwise */
#define QV_MAX_T 64       /* largest bound MOE_FUSED_QGEMV may set */

namespace {

struct qv_args : moe__fg_shape {
    const uint16_t *x;       /* hidden bf16 [T, H] */
    const uint8_t *w13, *w2; /* e4m3 [E, N1, H], [E, H, I], logical row order */
    const float *s13, *s2;   /* fp8: f32 [E]; fp8_block: f32 [E, N/128, K/128] */
    const uint8_t *sb13, *sb2; /* the same scales as bytes: nvfp4 e4m3 [E, N, K/16]; mxfp4 ue8m0,
                                * mxint4 bf16 [E, N, K/32] */
    const float *g13, *g2;   /* nvfp4: the weights' global scales f32 [E] */
    const float *b13, *b2;   /* f32 [E, N1], [E, H] or NULL */
    const int32_t *ids;      /* [T, K] */
    const float *wts;        /* [T, K] */
    uint8_t *xc;             /* x codes [T, H] */
    float *xs;               /* fp8_block: x scales [T, H/128] */
    float *xt;               /* fp8: x's scale */
    uint16_t *inter;         /* bf16 [T*K, I], pair order */
    uint8_t *gc;             /* the intermediate's codes [T*K, I] */
    float *gs;               /* fp8_block: its scales [T*K, I/128] */
    unsigned *ctr;           /* MOE__FQ_NCTR counters (fused_quant.cuh), zero between calls */
    uint16_t *out;           /* bf16 [T, H] */
    int32_t *err;            /* routed ids out of range */
    int xpre;                /* block-local k_qv_up launched as a programmatic dependent of this call's
                              * routing kernel (qv_pdl): x is loaded and quantised before
                              * griddepcontrol.wait, while the routing runs */
    /* k_qv_up routes its own pair (qv_self_route; T = 1): the call's routing as route.cu's general
     * kernel takes it (E <= 128), logits of dtype rt_dt */
    moe__route_args rt;
    int rt_dt;
    int up_pdl;  /* rt_flag, fp8 modes: k_qv_up launched as a programmatic dependent of whatever kernel
                  * precedes the call, waiting for it (griddepcontrol.wait) before it reads anything, so its
                  * launch overlaps that kernel's end (MOE_FUSED_QVUPPDL=0: off; H100 Qwen3 T = 1 fp8 21.7 ->
                  * 20.5-20.6 us, fp8_block 21.7-21.8 -> 20.9-21.0; nvfp4 measured 19.7 -> 20.4 with it, so not nvfp4) */
    int rt_flag; /* no routing kernel (route_in 2): k_qv_up's block (0, 0) routes the token fully, writes
                  * ids, weights and replay, then sets ctr[7] and (K <= 8) the ids packed in the u64 at ctr[10]
                  * (7 bits each from bit 0, bit 62: an id outside [0, 128), read ids instead, bit 63: set);
                  * k_qv_down's blocks wait for that word (or flag) before reading them, and the last of them
                  * to count in ctr[8] resets all three */
};

/* ---------------------------------------------------------------- PTX -- */

/* 16 bytes of weights (moe__fg_ldw), as a volatile statement: the first round is issued
 * before the activation quantisation and must not be moved after it. */
__device__ __forceinline__ uint4 qv_ldw(const uint8_t *p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}

__device__ __forceinline__ unsigned qv_ld_acquire(const unsigned *p) {
    unsigned v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
    return v;
}
__device__ __forceinline__ unsigned qv_ld_relaxed(const unsigned *p) {
    unsigned v;
    asm volatile("ld.relaxed.gpu.global.u32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
    return v;
}

/* bytes (a multiple of 16) from global src to shared dst (both 16-byte aligned) by a bulk copy,
 * completing on the mbarrier bar (sm_90a; the host launches BK kernels only there: qv_dn_bulk). */
__device__ __forceinline__ void qv_bulk_g2s(uint32_t dst, const void *src, uint32_t bytes, uint32_t bar) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(dst),
                 "l"(src), "r"(bytes), "r"(bar)
                 : "memory");
#endif
}

/* d += a * b, m16n8k16, f16 operands, f32 accumulation (fragments as moe__fm_mma). */
__device__ __forceinline__ void qv_mma(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                       uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

/* One 64-column step of a warp: d += W[rows g, g+8] . B[column g] over the quad's 64 columns;
 * lane q holds their 16 codes 16q .. 16q+15 of row g (w0), row g + 8 (w1) and activation
 * row g (b; zero for columns past the pass), the k16 MMA s taking codes 4s .. 4s+3. */
__device__ __forceinline__ void qv_step(float (&d)[4], const uint4 &w0, const uint4 &w1, const uint4 &b) {
    const uint32_t u0[4] = {w0.x, w0.y, w0.z, w0.w}, u1[4] = {w1.x, w1.y, w1.z, w1.w}, ub[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
    for (int s = 0; s < 4; s++) {
        uint32_t a0, a1, a2, a3, b0, b1;
        moe__fq_e4m3x4_f16(u0[s], a0, a2);
        moe__fq_e4m3x4_f16(u1[s], a1, a3);
        moe__fq_e4m3x4_f16(ub[s], b0, b1);
        qv_mma(d, a0, a1, a2, a3, b0, b1);
    }
}

/* d += a * b, m16n8k16, bf16 operands, f32 accumulation. */
__device__ __forceinline__ void qv_mma_bf16(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                            uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

/* Packed (4-bit) modes.  Lane q of a quad holds 16 bytes = the 32 codes 32q .. 32q+31 of a
 * 128-column block (low nibble first), word i = columns 8i .. 8i+7.  They become 16 16-bit
 * pairs, pair 4i + j = columns (8i + j, 8i + j + 4), exactly:
 *   nvfp4 (f16): e2m1 x its e4m3 scale (per 16 columns: pairs 0-7 and 8-15) -- the code's
 *     bits placed in f16 read as value x 2^-14, times 2^14, times the scale: both products
 *     exact and normal (2^-10 .. 2688, at most 6 significant bits), as the tile path's bf16;
 *   mxfp4 (bf16): the e2m1 value (bits placed as value x 2^-126, one exact multiply by 2^126);
 *   mxint4 (bf16): the signed nibble ((n ^ 8) | 0x4300 reads as 128 + (n ^ 8), minus 136).
 * The mx scales (per 32 columns = one lane's codes) do not fold into bf16 exactly (mxint4) or
 * not into f16 range (mxfp4); they are applied to f32 sums of the groups, which the MMA keeps
 * apart as its columns (qv_gc). sc: nvfp4, the two scale codes of the lane's columns. */
/* nvfp4: codes (j, j + 4) of x = (word >> 4j) & 0x000F000F times the scale s (f16 in both halves). */
__device__ __forceinline__ uint32_t qv_e2m1x2_f16(uint32_t x, uint32_t s) {
    const uint32_t b = ((x & 0x00070007u) << 9) | ((x & 0x00080008u) << 12);
    uint32_t r;
    asm("mul.rn.f16x2 %0, %1, %2;\n" : "=r"(r) : "r"(b), "r"(0x74007400u));
    asm("mul.rn.f16x2 %0, %1, %2;\n" : "=r"(r) : "r"(r), "r"(s));
    return r;
}
template <int MODE> __device__ __forceinline__ void qv_conv4(const uint4 &w, uint32_t sc, uint32_t (&o)[16]) {
    const uint32_t u[4] = {w.x, w.y, w.z, w.w};
    if constexpr (MODE == MOE_QUANT_NVFP4) {
        uint32_t s01, hi;
        moe__fq_e4m3x4_f16(sc, s01, hi);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
        /* the words through the hardware's e4m3 conversion (moe__fq_e2m1x8_f16: e2m1 x 2^-6, the
         * same pairs as below), the scale times 2^6 (exact in f16: at most 448 x 64), so the same
         * values in two thirds of the instructions */
        asm("mul.rn.f16x2 %0, %1, %2;\n" : "=r"(s01) : "r"(s01), "r"(0x54005400u));
        const uint32_t s0 = __byte_perm(s01, 0, 0x1010), s1 = __byte_perm(s01, 0, 0x3232);
#pragma unroll
        for (int i = 0; i < 4; i++) {
            uint32_t r[4];
            moe__fq_e2m1x8_f16(u[i], i < 2 ? s0 : s1, r);
#pragma unroll
            for (int j = 0; j < 4; j++) o[4 * i + j] = r[j];
        }
#else
        const uint32_t s0 = __byte_perm(s01, 0, 0x1010), s1 = __byte_perm(s01, 0, 0x3232);
#pragma unroll
        for (int i = 0; i < 4; i++)
#pragma unroll
            for (int j = 0; j < 4; j++) o[4 * i + j] = qv_e2m1x2_f16((u[i] >> (4 * j)) & 0x000F000Fu, i < 2 ? s0 : s1);
#endif
    } else {
#pragma unroll
        for (int i = 0; i < 4; i++)
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const uint32_t x = (u[i] >> (4 * j)) & 0x000F000Fu;
                uint32_t r;
                if (MODE == MOE_QUANT_MXFP4) {
                    const uint32_t b = ((x & 0x00070007u) << 6) | ((x & 0x00080008u) << 12);
                    asm("fma.rn.bf16x2 %0, %1, %2, %3;\n" : "=r"(r) : "r"(b), "r"(0x7E807E80u), "r"(0u));
                } else {
                    const uint32_t b = (x ^ 0x00080008u) | 0x43004300u;
                    asm("fma.rn.bf16x2 %0, %1, %2, %3;\n" : "=r"(r) : "r"(b), "r"(0x3F803F80u), "r"(0xC308C308u));
                }
                o[4 * i + j] = r;
            }
    }
}

/* 32 bf16 activations (columns 8i .. 8i+7 in v[i]) in the pair order of qv_conv4. */
__device__ __forceinline__ void qv_bf16_pairs(const uint4 (&v)[4], uint32_t (&o)[16]) {
#pragma unroll
    for (int i = 0; i < 4; i++) {
        o[4 * i + 0] = __byte_perm(v[i].x, v[i].z, 0x5410);
        o[4 * i + 1] = __byte_perm(v[i].x, v[i].z, 0x7632);
        o[4 * i + 2] = __byte_perm(v[i].y, v[i].w, 0x5410);
        o[4 * i + 3] = __byte_perm(v[i].y, v[i].w, 0x7632);
    }
}

/* One 128-column block of a warp in a packed mode: d += W[rows g, g+8] . B over it; w0, w1
 * the lane's codes of rows g and g + 8 (sc0, sc1: their nvfp4 scale codes), b the lane's B
 * pairs (qv_conv4 order). */
template <int MODE>
__device__ __forceinline__ void qv_step4(float (&d)[4], const uint4 &w0, uint32_t sc0, const uint4 &w1, uint32_t sc1,
                                         const uint32_t (&b)[16]) {
    uint32_t a[16], c[16];
    qv_conv4<MODE>(w0, sc0, a);
    qv_conv4<MODE>(w1, sc1, c);
#pragma unroll
    for (int s = 0; s < 8; s++) {
        if (MODE == MOE_QUANT_NVFP4) qv_mma(d, a[2 * s], c[2 * s], a[2 * s + 1], c[2 * s + 1], b[2 * s], b[2 * s + 1]);
        else qv_mma_bf16(d, a[2 * s], c[2 * s], a[2 * s + 1], c[2 * s + 1], b[2 * s], b[2 * s + 1]);
    }
}

/* One 128-column block of fp8, fp8_block (two qv_step) or nvfp4 (qv_step4; sa, sb, sx: the
 * scale codes of rows g, g + 8 and of the activation). */
template <int MODE, int NH>
__device__ __forceinline__ void qv_unit(float (&d)[4], const uint4 (&w0)[NH], const uint4 (&w1)[NH],
                                        const uint4 (&x)[NH], uint32_t sa, uint32_t sb, uint32_t sx) {
    if (MODE == MOE_QUANT_NVFP4) {
        uint32_t bw[16];
        qv_conv4<MODE>(x[0], sx, bw);
        qv_step4<MODE>(d, w0[0], sa, w1[0], sb, bw);
    } else {
        qv_step(d, w0[0], w1[0], x[0]);
        qv_step(d, w0[NH - 1], w1[NH - 1], x[NH - 1]);
    }
}

/* Block-local activations (qv_loc_quant) reach the MMAs as f16 values in shared memory, so B needs
 * no conversion.  A lane's 4 uint4 of a 128-column block: fp8 modes, columns 64h + 16q .. + 15 of
 * both halves h in order (xh[2h], xh[2h + 1]); nvfp4, its 16 pairs in qv_conv4's order. */
__device__ __forceinline__ void qv_step_h(float (&d)[4], const uint4 &w0, const uint4 &w1, const uint4 &b0,
                                          const uint4 &b1) {
    const uint32_t u0[4] = {w0.x, w0.y, w0.z, w0.w}, u1[4] = {w1.x, w1.y, w1.z, w1.w};
    const uint32_t bh[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
    for (int s = 0; s < 4; s++) {
        uint32_t a0, a1, a2, a3;
        moe__fq_e4m3x4_f16(u0[s], a0, a2);
        moe__fq_e4m3x4_f16(u1[s], a1, a3);
        qv_mma(d, a0, a1, a2, a3, bh[2 * s], bh[2 * s + 1]);
    }
}
template <int MODE, int NH>
__device__ __forceinline__ void qv_unit_h(float (&d)[4], const uint4 (&w0)[NH], const uint4 (&w1)[NH],
                                          const uint4 (&xh)[4], uint32_t sa, uint32_t sb) {
    if (MODE == MOE_QUANT_NVFP4) {
        const uint32_t bw[16] = {xh[0].x, xh[0].y, xh[0].z, xh[0].w, xh[1].x, xh[1].y, xh[1].z, xh[1].w,
                                 xh[2].x, xh[2].y, xh[2].z, xh[2].w, xh[3].x, xh[3].y, xh[3].z, xh[3].w};
        qv_step4<MODE>(d, w0[0], sa, w1[0], sb, bw);
    } else {
        qv_step_h(d, w0[0], w1[0], xh[0], xh[1]);
        qv_step_h(d, w0[NH - 1], w1[NH - 1], xh[2], xh[3]);
    }
}
/* A lane's xh for the 128-column block at f16 element `at` (the row's block start); zeros when !ok. */
template <int MODE> __device__ __forceinline__ void qv_ld_h(const uint16_t *at, int q, bool ok, uint4 (&xh)[4]) {
#pragma unroll
    for (int m = 0; m < 4; m++) {
        const int off = MODE == MOE_QUANT_NVFP4 ? 32 * q + 8 * m : 64 * (m >> 1) + 16 * q + 8 * (m & 1);
        xh[m] = ok ? *(const uint4 *)(at + off) : make_uint4(0, 0, 0, 0);
    }
}

/* mx weight scales of groups j and j + 1 (32 columns each) from their raw bytes. */
template <int MODE> __device__ __forceinline__ float qv_mx_scale(uint32_t raw, int h) {
    if (MODE == MOE_QUANT_MXFP4) return moe__ue8m0_to_f32((uint8_t)(raw >> (8 * h)));
    return moe__bf16_to_f32((uint16_t)(raw >> (16 * h)));
}
template <int MODE> __device__ __forceinline__ uint32_t qv_mx_raw(const uint8_t *s, int64_t group) {
    if (MODE == MOE_QUANT_MXFP4) return *(const uint16_t *)(s + group);
    return *(const uint32_t *)(s + 2 * group);
}

/* Per-mode constants of the kernels. */
template <int MODE> struct qv_mode {
    static constexpr bool PK = MODE == MOE_QUANT_NVFP4 || MODE == MOE_QUANT_MXFP4 || MODE == MOE_QUANT_MXINT4;
    /* mx: the 4 groups of a 128-column block are MMA columns (pair r, group j: column 4r + j),
     * so a pass takes 2 pairs */
    static constexpr bool GC = MODE == MOE_QUANT_MXFP4 || MODE == MOE_QUANT_MXINT4;
    static constexpr int NH = PK ? 1 : 2;   /* 16-byte loads a row and 128-column block */
    static constexpr int NB = GC ? 2 : QV_NB;
    static constexpr int UGU = QV_UP_UG;
};

/* 128-column blocks a k_qv_up round: 2 for the fp8 modes' self-routing kernels (half the rounds of
 * latency a block; at least 6 blocks an SM then, so Qwen3-30B-A3B T = 1's 768 blocks stay resident:
 * H100, fp8 23.1-23.3 -> 21.8-22.0 us; fp8_block's then self-routing 22.7-23.0 against 23.6-23.7
 * reading the ids; rounds of 2 in every k_qv_up instead: fp8_block T = 4 93.8 -> 98.4, nvfp4 T = 4
 * 74.0 -> 76.6, so only here), QV_UP_UG otherwise */
template <int MODE, bool RT> struct qv_up_rt {
    static constexpr int UG = RT && (MODE == MOE_QUANT_FP8 || MODE == MOE_QUANT_FP8_BLOCK) ? 2 : qv_mode<MODE>::UGU;
};

/* ------------------------------------------------ shared activation work -- */

/* Chunks 0 .. n-1 of work that the blocks needing its result share, without a grid barrier:
 * a block claims chunks from ctr[0] until none is left, does each one it claimed (work(c), all
 * threads; nothing is waited for before it is finished), counts it in ctr[1] once its writes
 * are fenced (as a cooperative grid sync does: barrier, one thread's fence, the atomic), and
 * returns when all n are counted.  Every claimed chunk belongs to a running block, so the wait
 * ends whatever the residency of the grid.  Blocks that find every chunk claimed skip the
 * atomic (hundreds of blocks would queue on one address).  Block-uniform. */
template <typename F> __device__ __forceinline__ void qv_share(unsigned *ctr, unsigned n, F &&work) {
    __shared__ unsigned s_c;
    for (;;) {
        if (threadIdx.x == 0) s_c = qv_ld_relaxed(ctr) >= n ? n : atomicAdd(ctr, 1u);
        __syncthreads();
        const unsigned c = s_c;
        __syncthreads();
        if (c >= n) break;
        work(c);
        __syncthreads(); /* the block's writes, then one fence (cumulative) and the count */
        if (threadIdx.x == 0) {
            __threadfence();
            atomicAdd(ctr + 1, 1u);
        }
    }
    if (threadIdx.x == 0) {
        while (qv_ld_acquire(ctr + 1) < n) __nanosleep(64);
        __threadfence();
    }
    __syncthreads();
}

/* Maximum absolute-value bits (moe__q_absbits) of the n bf16 values at x (n a multiple of 8,
 * x 16-byte aligned), for every thread of the block. */
template <int NT> __device__ uint32_t qv_amax_bf16(const uint16_t *x, int64_t n) {
    __shared__ uint32_t s_red[NT / 32];
    uint32_t v = 0;
    for (int64_t i = threadIdx.x; i < n / 8; i += NT) {
        const uint4 u = ((const uint4 *)x)[i];
        const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const uint32_t lo = moe__q_absbits(moe__bf16_to_f32((uint16_t)w[j]));
            const uint32_t hi = moe__q_absbits(moe__bf16_to_f32((uint16_t)(w[j] >> 16)));
            v = max(v, max(lo, hi));
        }
    }
    v = moe__q_warp_max(v, 32);
    if ((threadIdx.x & 31) == 0) s_red[threadIdx.x >> 5] = v;
    __syncthreads();
    v = 0;
#pragma unroll
    for (int w = 0; w < NT / 32; w++) v = max(v, s_red[w]);
    __syncthreads();
    return v;
}

/* Elements [i0, i1) of the bf16 source as e4m3 codes with the per-tensor scale s (the codes of
 * k_fp8_tensor: moe__q_fp8_code), 8 a thread; i0 and i1 multiples of 8. */
template <int NT>
__device__ __forceinline__ void qv_fp8_codes(const uint16_t *src, int64_t i0, int64_t i1, float s, uint8_t *dst) {
    for (int64_t i = i0 + 8 * (int64_t)threadIdx.x; i < i1; i += 8 * NT) {
        const uint4 u = *(const uint4 *)(src + i);
        const uint32_t w[4] = {u.x, u.y, u.z, u.w};
        uint32_t c[2] = {0, 0};
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const uint32_t lo = moe__q_fp8_code(moe__bf16_to_f32((uint16_t)w[j]), s);
            const uint32_t hi = moe__q_fp8_code(moe__bf16_to_f32((uint16_t)(w[j] >> 16)), s);
            c[j >> 1] |= (lo | hi << 8) << (16 * (j & 1));
        }
        *(uint2 *)(dst + i) = make_uint2(c[0], c[1]);
    }
}

/* ------------------------------------------------- local activation work -- */

#define QV_LOC_UP 2048  /* activation values a block quantises itself: T*H for GEMM1 */
#define QV_LOC_MAX 8192 /* K*I for GEMM2 */
/* their f16 values and fp8_block's scales in dynamic shared memory, requested only when used (a
 * kernel's static shared memory would change the L1 / shared split of every launch) */
#define QV_LOC_UP_SMEM (2 * QV_LOC_UP + QV_LOC_UP / 32)
#define QV_LOC_DN_SMEM (2 * QV_LOC_MAX + QV_LOC_MAX / 32)
extern __shared__ __align__(16) uint8_t qv_dyn[];

/* Load the n (<= QV_LOC_MAX, a multiple of 128) bf16 values at src, 8 a thread (uint4 i = tid +
 * NT*j), into registers: issued before the weights, so they are not queued behind them. */
template <int NT, int NV> __device__ __forceinline__ void qv_loc_load(const uint16_t *src, int64_t n, uint4 (&v)[NV]) {
#pragma unroll
    for (int j = 0; j < NV; j++) {
        const int64_t i = threadIdx.x + (int64_t)NT * j;
        v[j] = 8 * i < n ? __ldcg((const uint4 *)src + i) : make_uint4(0, 0, 0, 0);
    }
}

/* Whether block-local activations are kept as f16 values (fp8_block, nvfp4) or as codes (fp8).  f16
 * values spare the MMAs' B operand its conversion: H100, Qwen3-30B-A3B T = 1 (3 rounds each):
 * fp8_block 26.0-26.2 -> 25.2-25.3 us, nvfp4 26.9-27.2 -> 24.6 (with its 4 row tiles); fp8 25.3-25.5
 * -> 25.7-25.8, so it keeps its codes (25.4-25.6 either way then). */
template <int MODE> struct qv_loc_h {
    static constexpr bool V = MODE != MOE_QUANT_FP8;
};

/* Those values quantised as the quantisers do (moe__q_rows, qv_fp8_codes) -- the same codes and
 * scales -- into shared memory as the f16 values the MMAs take (exact), c[i] for value i: fp8 with
 * the per-tensor scale s (its codes instead, bytes: qv_loc_h); fp8_block per 128 values (16 consecutive lanes hold a
 * group; the codes' values, f32 scales sc[n / 128]); nvfp4 per 16 values (2 lanes) with the global
 * scale s (code x its e4m3 block scale, exact in f16: qv_conv4; a thread's 8 values (8i .. 8i+7) as
 * the pairs (8i + j, 8i + j + 4), j < 4, in qv_conv4's order). */
template <int MODE, int NT, int NV>
__device__ __forceinline__ void qv_loc_quant(const uint4 (&v)[NV], int64_t n, float s, uint16_t *c, float *sc) {
#pragma unroll
    for (int j = 0; j < NV; j++) {
        const int64_t i = threadIdx.x + (int64_t)NT * j;
        const uint32_t w[4] = {v[j].x, v[j].y, v[j].z, v[j].w};
        float f[8];
#pragma unroll
        for (int k = 0; k < 4; k++) {
            f[2 * k] = moe__bf16_to_f32((uint16_t)w[k]);
            f[2 * k + 1] = moe__bf16_to_f32((uint16_t)(w[k] >> 16));
        }
        float sj = s;
        if (MODE == MOE_QUANT_FP8_BLOCK || MODE == MOE_QUANT_NVFP4) {
            uint32_t b = 0;
#pragma unroll
            for (int k = 0; k < 8; k++) b = max(b, moe__q_absbits(f[k]));
            b = moe__q_warp_max(b, MODE == MOE_QUANT_NVFP4 ? 2 : 16); /* every lane: shuffles */
            if (MODE == MOE_QUANT_NVFP4) {
                const uint8_t code = moe__q_nvfp4_scale(moe__q_amax(b), s);
                const float bs = moe__e4m3_to_f32(code);
                if (8 * i < n) {
                    uint32_t cw = 0;
#pragma unroll
                    for (int k = 0; k < 8; k++) cw |= (uint32_t)moe__q_nvfp4_code(f[k], bs, s) << (4 * k);
                    uint32_t sl, sh;
                    moe__fq_e4m3x4_f16(code, sl, sh);
                    const uint32_t s2 = __byte_perm(sl, 0, 0x1010);
                    *(uint4 *)(c + 8 * i) = make_uint4(qv_e2m1x2_f16(cw & 0x000F000Fu, s2),
                                                       qv_e2m1x2_f16((cw >> 4) & 0x000F000Fu, s2),
                                                       qv_e2m1x2_f16((cw >> 8) & 0x000F000Fu, s2),
                                                       qv_e2m1x2_f16((cw >> 12) & 0x000F000Fu, s2));
                }
                continue;
            }
            sj = moe__q_fp8_scale(moe__q_amax(b));
            if (8 * i < n && (threadIdx.x & 15) == 0) sc[i >> 4] = sj;
        }
        if (8 * i < n) {
            uint32_t cw[2] = {0, 0};
#pragma unroll
            for (int k = 0; k < 8; k++) cw[k >> 2] |= (uint32_t)moe__q_fp8_code(f[k], sj) << (8 * (k & 3));
            if (MODE == MOE_QUANT_FP8) { /* the codes themselves (qv_loc_h) */
                *(uint2 *)((uint8_t *)c + 8 * i) = make_uint2(cw[0], cw[1]);
                continue;
            }
            uint32_t h[4];
            moe__fq_e4m3x4_f16(cw[0], h[0], h[1]);
            moe__fq_e4m3x4_f16(cw[1], h[2], h[3]);
            *(uint4 *)(c + 8 * i) = make_uint4(h[0], h[1], h[2], h[3]);
        }
    }
}

/* Maximum absolute-value bits of the loaded values over the block (every thread gets it). */
template <int NT, int NV> __device__ __forceinline__ uint32_t qv_loc_amax(const uint4 (&v)[NV]) {
    __shared__ uint32_t s_m[NT / 32];
    uint32_t b = 0;
#pragma unroll
    for (int j = 0; j < NV; j++) {
        const uint32_t w[4] = {v[j].x, v[j].y, v[j].z, v[j].w};
#pragma unroll
        for (int k = 0; k < 4; k++)
            b = max(b, max(moe__q_absbits(moe__bf16_to_f32((uint16_t)w[k])),
                           moe__q_absbits(moe__bf16_to_f32((uint16_t)(w[k] >> 16)))));
    }
    b = moe__q_warp_max(b, 32);
    if ((threadIdx.x & 31) == 0) s_m[threadIdx.x >> 5] = b;
    __syncthreads();
    b = 0;
#pragma unroll
    for (int w = 0; w < NT / 32; w++) b = max(b, s_m[w]);
    return b;
}

/* ------------------------------------------------------------ GEMM1 + act -- */

/* grid (N1 / 16, T*K); block (tile u, pair p). */
/* The logits of lane's 4 experts (4 lane .. 4 lane + 3; 0 past E) of the token (T = 1), as route.cu's
 * moe__k_route<4, DT> loads them (one chunk of W = 4 a lane for every logits dtype). */
__device__ __forceinline__ void qv_route_logits(const qv_args &a, int lane, float (&x)[4]) {
    const void *row = a.rt.logits;
    const int dt = a.rt_dt, E = a.rt.E, vec = a.rt.vec, e0 = 4 * lane;
    if (dt == MOE_F32) moe__rt_load<MOE_F32, 4>(row, e0, E, vec, x);
    else if (dt == MOE_BF16) moe__rt_load<MOE_BF16, 4>(row, e0, E, vec, x);
    else moe__rt_load<MOE_F16, 4>(row, e0, E, vec, x);
}

/* The expert of pair p of the token (T = 1: its rank-p choice), by one warp with route.cu's code for
 * E <= 128 (moe__k_route<4, DT>), so the expert the routing kernel writes to ids[p]; lg: this lane's
 * logits (qv_route_logits, loaded ahead).  ALL: the whole routing, stored as the routing kernel stores
 * it (ids, f32 weights, replay when given, of a.rt); else p + 1 of its top-K rounds, no weights. */
template <bool ALL>
__device__ __forceinline__ int qv_route_pair(const qv_args &a, int lane, int p, const float (&lg)[4]) {
    const void *row = a.rt.logits;
    const int dt = a.rt_dt;
    const moe__rt_pick r = moe__rt_token<4, 4, ALL>(
        a.rt, 0, lane, ALL ? a.rt.K : p + 1, ALL,
        [&](int, float *x) { /* e0 = 4 lane: the chunk qv_route_logits loaded */
#pragma unroll
            for (int i = 0; i < 4; i++) x[i] = lg[i];
        },
        [&](int e) { /* the logit of a chosen expert (the weights only) */
            return dt == MOE_F32 ? moe__rt_load1<MOE_F32>(row, e)
                 : dt == MOE_BF16 ? moe__rt_load1<MOE_BF16>(row, e) : moe__rt_load1<MOE_F16>(row, e);
        });
    return r.id; /* lane k: the rank-k choice */
}

template <int MODE, bool LOC, bool PRE, bool RT>
__global__ void __launch_bounds__(qv_up_tiles<MODE, LOC>::N * QV_UP_THREADS, qv_up_rt<MODE, RT>::UG == 2 ? 6 : 8 / qv_up_tiles<MODE, LOC>::N)
    k_qv_up(const qv_args a) {
    using M = qv_mode<MODE>;
    constexpr int UG = qv_up_rt<MODE, RT>::UG, NW = QV_UP_THREADS / 32, NH = M::NH, NB = M::NB;
    constexpr int TPB = qv_up_tiles<MODE, LOC>::N, NT = TPB * QV_UP_THREADS; /* row tiles, threads */
    constexpr bool PK = M::PK, GC = M::GC;
    if (RT && a.up_pdl) moe__fm_pdl_enter(); /* first: the preceding kernel may write x and the logits */
    QV_TL(0, 0);
    /* the wait (moe__fm_pdl_enter) comes below */
    /* warp: within its row tile (NW warps a tile); sub: the tile within the block */
    const int tid = threadIdx.x, lane = tid & 31, warp = TPB == 1 ? tid >> 5 : (tid >> 5) % NW,
              sub = TPB == 1 ? 0 : (tid >> 5) / NW, g = lane >> 2, q = lane & 3;
    const int64_t P = a.T * a.K, p = blockIdx.y;
    /* loc: x into registers first (before the routed ids are known; not queued behind the weights) */
    constexpr bool LQ = MODE == MOE_QUANT_FP8 || MODE == MOE_QUANT_FP8_BLOCK || MODE == MOE_QUANT_NVFP4;
    constexpr int XV = LQ && QV_LOC_UP / 8 / NT > 0 ? QV_LOC_UP / 8 / NT : 1;
    /* dynamic shared memory (QV_LOC_UP_SMEM bytes, only when loc): f16 values, then fp8_block's
     * f32 scales per 128 */
    uint16_t *s_xh = (uint16_t *)qv_dyn;
    float *s_xs = (float *)(qv_dyn + 2 * QV_LOC_UP);
    constexpr bool loc = LQ && LOC, LH = loc && qv_loc_h<MODE>::V;
    uint4 xl[XV];
    const int64_t nx = a.T * a.H;
    float xsl = 1.0f; /* loc: x's per-tensor scale (fp8) or global scale (nvfp4) */
    /* loc: x into registers first (not queued behind the weights), quantised into shared memory
     * (qv_loc_quant) once the weights' first loads are in flight -- or, PRE (a.xpre: launched as a
     * programmatic dependent of this call's routing kernel), at once, before griddepcontrol.wait,
     * while the routing runs (x was complete before that kernel started: it is launched without
     * programmatic serialisation) */
    auto loc_x = [&]() {
        if (MODE == MOE_QUANT_FP8) xsl = moe__q_fp8_scale(moe__q_amax(qv_loc_amax<NT>(xl)));
        if (MODE == MOE_QUANT_NVFP4) xsl = moe__q_nvfp4_global(moe__q_amax(qv_loc_amax<NT>(xl)));
        qv_loc_quant<MODE, NT>(xl, nx, xsl, s_xh, s_xs);
        __syncthreads();
    };
    /* RT (PRE, T = 1): warp 0 routes this block's pair itself while the routing kernel runs (its logits
     * loaded first, their latency under x's) and the first weight loads are issued before the wait;
     * x is quantised after those loads for the fp8 modes and before the routing for nvfp4 (qv_self_route) */
    constexpr bool x_late = RT && (MODE == MOE_QUANT_FP8 || MODE == MOE_QUANT_FP8_BLOCK);
    float lg[4];
    if (RT && tid < 32) qv_route_logits(a, lane, lg);
    if (loc && PRE) {
        qv_loc_load<NT>(a.x, nx, xl);
        if (!x_late) loc_x();
    }
    int e;
    if constexpr (RT) {
        __shared__ int s_rt;
        if (tid < 32) {
            int own;
            if (a.rt_flag && blockIdx.x == 0 && p == 0) { /* no routing kernel: this block writes the routing */
                own = qv_route_pair<true>(a, lane, (int)p, lg);
                /* K <= 8: the ids also packed in one word (qv_args.rt_flag) */
                unsigned long long w = 1ull << 63;
#pragma unroll
                for (int k = 0; k < 8; k++) {
                    const int v = __shfl_sync(0xffffffffu, own, k);
                    if (k < a.rt.K) w |= v >= 0 && v < 128 ? (unsigned long long)v << (7 * k) : 1ull << 62;
                }
                __threadfence();
                __syncwarp();
                if (lane == 0) {
                    asm volatile("st.release.gpu.global.u32 [%0], %1;\n" ::"l"(a.ctr + 7), "r"(1u) : "memory");
                    if (a.rt.K <= 8) asm volatile("st.release.gpu.global.u64 [%0], %1;\n" ::"l"(a.ctr + 10), "l"(w) : "memory");
                }
            } else {
                own = qv_route_pair<false>(a, lane, (int)p, lg);
            }
            const int id = __shfl_sync(0xffffffffu, own, (int)p);
            if (lane == 0) s_rt = id;
        }
        __syncthreads();
        e = s_rt;
        QV_TL(0, 1);
    } else {
        moe__fm_pdl_enter();
        if (loc && !PRE) qv_loc_load<NT>(a.x, nx, xl);
        if (blockIdx.x == 0 && blockIdx.y == 0 && tid < 32) moe__fg_count_bad(a.ids, P, a.E, a.err);
        e = a.ids[p];
    }
    if (!moe__fg_local(e, a.E, a.lo, a.lc)) {
        /* RT: k_qv_down may start (and read the routed ids) only once every block of this kernel has
         * waited for the routing kernel or exited */
        if constexpr (RT) moe__fm_pdl_enter();
        QV_TL(0, 6);
        return;
    }
    /* not the leader of e: its block does the work (RT, T = 1: the K experts differ) */
    if (!RT && !moe__fg_leader(a.ids, p, e)) return;
    const bool gated = a.act != MOE_ACT_RELU2;
    /* the row tile (a tile past the last one redoes the last: the same values written twice) */
    const int u = TPB == 1 ? (int)blockIdx.x : min((int)blockIdx.x * TPB + sub, a.N1 / 16 - 1), H = a.H, nkb = H >> 7;
    /* A rows g and g + 8: gate and up rows of intermediate column 8u + g (relu2: rows 16u + g, +8) */
    const int ra = gated ? 8 * u + g : 16 * u + g, rb = gated ? a.I + 8 * u + g : 16 * u + 8 + g;
    /* bytes of a row, of a 128-column block */
    const int64_t rowb = PK ? H / 2 : H;
    constexpr int kbb = PK ? 64 : 128;
    const uint8_t *wa = a.w13 + ((int64_t)e * a.N1 + ra) * rowb + 16 * q;
    const uint8_t *wb = a.w13 + ((int64_t)e * a.N1 + rb) * rowb + 16 * q;

    /* the first round's weights, in flight during the x quantisation */
    uint4 w0[UG][NH], w1[UG][NH];
    auto load_w = [&](int kb0) {
#pragma unroll
        for (int j = 0; j < UG; j++) {
            const int kb = kb0 + NW * j < nkb ? kb0 + NW * j : kb0; /* past the row: reload, unused */
#pragma unroll
            for (int h = 0; h < NH; h++) {
                w0[j][h] = qv_ldw(wa + kbb * kb + 64 * h);
                w1[j][h] = qv_ldw(wb + kbb * kb + 64 * h);
            }
        }
    };
    if (warp < nkb) load_w(warp);
    if constexpr (RT) moe__fm_pdl_enter(); /* the routing kernel's end: k_qv_down reads its ids */
    QV_TL(0, 2);

    /* x: codes (and fp8_block / nvfp4 scales) into the workspace, shared out in chunks (mx
     * modes multiply x in bf16: nothing to do) */
    if (loc) {
        if (!PRE || x_late) loc_x();
        QV_TL(0, 3);
    } else if (MODE != MOE_QUANT_MXFP4 && MODE != MOE_QUANT_MXINT4) {
        __shared__ uint32_t s_xa;
        uint32_t xamax = 0;
        bool have_amax = false;
        qv_share(a.ctr, (unsigned)((nx + QV_CHUNK - 1) / QV_CHUNK), [&](unsigned c) {
            const int64_t i0 = (int64_t)c * QV_CHUNK, i1 = min(nx, i0 + QV_CHUNK);
            if (MODE == MOE_QUANT_FP8 || MODE == MOE_QUANT_NVFP4) {
                if (!have_amax) {
                    xamax = qv_amax_bf16<NT>(a.x, nx);
                    if (MODE == MOE_QUANT_NVFP4) {
                        if (tid == 0) s_xa = xamax;
                        __syncthreads();
                    }
                }
                have_amax = true;
            }
            if (MODE == MOE_QUANT_FP8) {
                const float s = moe__q_fp8_scale(moe__q_amax(xamax));
                qv_fp8_codes<NT>(a.x, i0, i1, s, a.xc);
                if (c == 0 && tid == 0) a.xt[0] = s;
            } else if (MODE == MOE_QUANT_NVFP4) {
                moe__q_rows<MOE_QUANT_NVFP4, 16, NT>(a.x, MOE_BF16, i0 / 16, i1 / 16, NT / moe__q_rows_geom<16>::L,
                                                     nx, &s_xa, a.xc, a.xs);
                if (c == 0 && tid == 0) a.xt[0] = moe__q_nvfp4_global(moe__q_amax(xamax));
            } else {
                moe__q_rows<MOE_QUANT_FP8_BLOCK, 128, NT>(a.x, MOE_BF16, i0 / 128, i1 / 128,
                                                          NT / moe__q_rows_geom<128>::L, 1, nullptr, a.xc, a.xs);
            }
            /* step 2's counters and the intermediate amax, before any block passes this step */
            if (c == 0 && tid < 3) a.ctr[2 + tid] = 0;
        });
    }
    float ts = 1.0f;
    if (MODE == MOE_QUANT_FP8) ts = (loc ? xsl : __ldcg(a.xt)) * a.s13[e];
    if (MODE == MOE_QUANT_NVFP4) ts = (loc ? xsl : __ldcg(a.xt)) * a.g13[e];
    const int64_t srow = ((int64_t)e * (a.N1 >> 7) + (ra >> 7)) * nkb; /* fp8_block: scale rows of ra, rb */
    const int64_t srow_b = ((int64_t)e * (a.N1 >> 7) + (rb >> 7)) * nkb;
    /* packed: scale bytes of rows ra, rb (nvfp4: per 16 columns; mx: per 32) */
    const int64_t spr = MODE == MOE_QUANT_NVFP4 ? H / 16 : (MODE == MOE_QUANT_MXINT4 ? H / 16 : H / 32);
    const uint8_t *sra = a.sb13 + ((int64_t)e * a.N1 + ra) * spr, *srb = a.sb13 + ((int64_t)e * a.N1 + rb) * spr;
    const int gj = 2 * (q & 1); /* mx: the groups of this lane's accumulator columns: gj, gj + 1 */

    __shared__ float s_red[TPB][NW][32][4];
    int mem[NB];
    for (int r0 = 0;; r0 += NB) {
        int nm = 1; /* RT (T = 1): pair p alone */
        if constexpr (RT) {
#pragma unroll
            for (int j = 0; j < NB; j++) mem[j] = j == 0 ? (int)p : -1;
        } else {
            nm = moe__fg_members<NB>(a.ids, P, p, e, r0, mem);
        }
        const int n = min(NB, nm - r0);
        /* pairs of B column g and of accumulator columns 2q, 2q+1 (mx: B column g = pair g / 4,
         * group g % 4; accumulator columns: pair q / 2) */
        const int bj = GC ? g >> 2 : g, cj = GC ? q >> 1 : 2 * q;
        int pg = -1, pc0 = -1, pc1 = -1;
#pragma unroll
        for (int j = 0; j < NB; j++) {
            if (j == bj) pg = mem[j];
            if (j == cj) pc0 = mem[j];
            if (!GC && j == 2 * q + 1) pc1 = mem[j];
        }
        if (GC && (g & 3) != q) pg = -1; /* B is zero outside the column's group */
        const int64_t tg = pg >= 0 ? pg / a.K : 0;
        /* codes (shared steps; loc fp8: in shared memory), f16 values (loc fp8_block, nvfp4) */
        const uint8_t *xr = (loc ? (const uint8_t *)s_xh : a.xc) + tg * (PK ? H / 2 : H) + 16 * q;
        const uint16_t *xh = s_xh + tg * H;
        const int64_t tc0 = pc0 >= 0 ? pc0 / a.K : 0, tc1 = pc1 >= 0 ? pc1 / a.K : 0;
        float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        for (int kb0 = warp; kb0 < nkb; kb0 += NW * UG) {
            if (r0 != 0 || kb0 != warp) load_w(kb0);
            uint4 xv[UG][NH];
            float sa[UG], sb[UG], sx0[UG], sx1[UG];
            uint32_t ua[UG], ub[UG], ux[UG];
#pragma unroll
            for (int j = 0; j < UG; j++) {
                const int kb = kb0 + NW * j < nkb ? kb0 + NW * j : kb0;
                if (!GC && !LH) {
#pragma unroll
                    for (int h = 0; h < NH; h++)
                        xv[j][h] = pg < 0 ? make_uint4(0, 0, 0, 0)
                                   : loc  ? *(const uint4 *)(xr + kbb * kb + 64 * h)
                                          : __ldcg((const uint4 *)(xr + kbb * kb + 64 * h));
                }
                if (MODE == MOE_QUANT_FP8_BLOCK) {
                    sa[j] = a.s13[srow + kb];
                    sb[j] = a.s13[srow_b + kb];
                    sx0[j] = loc ? s_xs[tc0 * nkb + kb] : __ldcg(a.xs + tc0 * nkb + kb);
                    sx1[j] = loc ? s_xs[tc1 * nkb + kb] : __ldcg(a.xs + tc1 * nkb + kb);
                }
                if (MODE == MOE_QUANT_NVFP4) {
                    ua[j] = *(const uint16_t *)(sra + 8 * kb + 2 * q);
                    ub[j] = *(const uint16_t *)(srb + 8 * kb + 2 * q);
                    ux[j] = loc ? 0u
                                : __ldcg((const uint16_t *)((const uint8_t *)a.xs + tg * (H / 16) + 8 * kb + 2 * q));
                }
                if (GC) {
                    ua[j] = qv_mx_raw<MODE>(sra, 4 * kb + gj);
                    ub[j] = qv_mx_raw<MODE>(srb, 4 * kb + gj);
                }
            }
#pragma unroll
            for (int j = 0; j < UG; j++) {
                const int kb = kb0 + NW * j;
                if (kb >= nkb) break;
                uint4 xq[4]; /* LH: B's f16 values from shared memory */
                if (LH) qv_ld_h<MODE>(xh + 128 * kb, q, pg >= 0, xq);
                if (MODE == MOE_QUANT_FP8_BLOCK) {
                    float part[4] = {0.0f, 0.0f, 0.0f, 0.0f};
                    if (LH) qv_unit_h<MODE, NH>(part, w0[j], w1[j], xq, 0, 0);
                    else qv_unit<MODE, NH>(part, w0[j], w1[j], xv[j], 0, 0, 0);
                    /* as the tile path: partial x (activation scale x weight scale) */
                    acc[0] += part[0] * (sx0[j] * sa[j]);
                    acc[1] += part[1] * (sx1[j] * sa[j]);
                    acc[2] += part[2] * (sx0[j] * sb[j]);
                    acc[3] += part[3] * (sx1[j] * sb[j]);
                } else if (!GC) {
                    if (LH) qv_unit_h<MODE, NH>(acc, w0[j], w1[j], xq, ua[j], ub[j]);
                    else qv_unit<MODE, NH>(acc, w0[j], w1[j], xv[j], ua[j], ub[j], ux[j]);
                } else {
                    uint4 xb[4];
                    const uint16_t *xp = a.x + tg * H + 128 * kb + 32 * q;
#pragma unroll
                    for (int i = 0; i < 4; i++)
                        xb[i] = pg >= 0 ? __ldg((const uint4 *)(xp + 8 * i)) : make_uint4(0, 0, 0, 0);
                    uint32_t bw[16];
                    qv_bf16_pairs(xb, bw);
                    float part[4] = {0.0f, 0.0f, 0.0f, 0.0f};
                    qv_step4<MODE>(part, w0[j][0], 0, w1[j][0], 0, bw);
                    /* the group scales of rows g (ua) and g + 8 (ub) */
                    acc[0] += part[0] * qv_mx_scale<MODE>(ua[j], 0);
                    acc[1] += part[1] * qv_mx_scale<MODE>(ua[j], 1);
                    acc[2] += part[2] * qv_mx_scale<MODE>(ub[j], 0);
                    acc[3] += part[3] * qv_mx_scale<MODE>(ub[j], 1);
                }
            }
        }
        /* the warps' sums in warp order, then the epilogue on warp 0's registers */
        QV_TL(0, 4);
#pragma unroll
        for (int i = 0; i < 4; i++) s_red[sub][warp][lane][i] = acc[i];
        __syncthreads();
        QV_TL(0, 5);
        if (warp == 0) {
            uint32_t amax = 0;
#pragma unroll
            for (int i = 0; i < 4; i++) {
                float v = s_red[sub][0][lane][i];
#pragma unroll
                for (int w = 1; w < NW; w++) v += s_red[sub][w][lane][i];
                acc[i] = v;
            }
            if (GC) { /* the pair's 4 groups: this lane's 2 and its neighbour's (q ^ 1) */
                acc[0] += acc[1];
                acc[2] += acc[3];
                acc[0] += __shfl_xor_sync(0xffffffffu, acc[0], 1);
                acc[2] += __shfl_xor_sync(0xffffffffu, acc[2], 1);
                if (q & 1) pc0 = -1;
            }
            const float *bias = a.b13 ? a.b13 + (int64_t)e * a.N1 : nullptr;
#pragma unroll
            for (int cc = 0; cc < (GC ? 1 : 2); cc++) {
                const int pc = cc ? pc1 : pc0;
                if (cj + cc >= n || pc < 0) continue;
                float h0 = acc[cc] * ts, h1 = acc[2 + cc] * ts;
                if (a.llama4) {
                    const float c1 = a.wts[pc];
                    h0 *= c1;
                    h1 *= c1;
                }
                if (bias) {
                    h0 += bias[ra];
                    h1 += bias[rb];
                }
                uint16_t *orow = a.inter + (int64_t)pc * a.I;
                uint16_t v0, v1 = 0;
                if (gated) {
                    v0 = moe__f32_to_bf16(moe__fm_act(a.act, h0, h1, a.alpha, a.beta, a.limit));
                    orow[ra] = v0;
                } else {
                    v0 = moe__f32_to_bf16(moe__fm_act(MOE_ACT_RELU2, h0, 0.0f, 0, 0, 0));
                    v1 = moe__f32_to_bf16(moe__fm_act(MOE_ACT_RELU2, h1, 0.0f, 0, 0, 0));
                    orow[ra] = v0;
                    orow[rb] = v1;
                }
                if (MODE == MOE_QUANT_FP8 || MODE == MOE_QUANT_NVFP4) /* the intermediate's amax: the bf16 values' bits */
                    amax = max(amax, max(moe__q_absbits(moe__bf16_to_f32(v0)), moe__q_absbits(moe__bf16_to_f32(v1))));
            }
            if (MODE == MOE_QUANT_FP8 || MODE == MOE_QUANT_NVFP4) {
                amax = moe__q_warp_max(amax, 32);
                if (lane == 0 && amax != 0) atomicMax(a.ctr + (loc ? 5 : 4), amax);
            }
        }
        __syncthreads(); /* s_red is reused by the next pass */
        if (r0 + NB >= nm) break;
    }
    QV_TL(0, 6);
}

/* --------------------------------------------------------- GEMM2 + combine -- */

/* grid (H / 16 * T): block b = column tile b / T, token b % T. */
template <int MODE, bool LOC, bool BK>
__global__ void __launch_bounds__(qv_dn_threads<MODE, LOC>::N, qv_dn_threads<MODE, LOC>::N == QV_DN_THREADS ? 2 : 1)
    k_qv_down(const qv_args a) {
    using M = qv_mode<MODE>;
    constexpr int DT = qv_dn_threads<MODE, LOC>::N;
    constexpr int UG = BK ? QV_DN_BK_UG : QV_DN_UG, NW = DT / 32, NH = M::NH;
    constexpr bool PK = M::PK, GC = M::GC;
    QV_TL(1, 0);
    /* griddepcontrol.wait (moe__fm_pdl_enter) comes after the routed ids are read and the first round
     * of W2 loads is issued: launched as a programmatic dependent of k_qv_up, whose blocks trigger
     * right after their own wait (the routing kernel has completed then), this block streams its
     * weights while k_qv_up's last blocks run.  H100, Qwen3-30B-A3B T = 1 (2026-11-27, one call, 3
     * rounds): fp8 24.7-25.2 -> 23.7-23.8 us, fp8_block 24.5-24.6 -> 23.7-23.8, nvfp4 23.0-23.1 ->
     * 23.3-23.4 (waiting first for nvfp4 only measured 25.0-25.1 in a later call: kept for all). */
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, q = lane & 3;
    const int64_t t = blockIdx.x % a.T, P = a.T * a.K, p0 = t * a.K;
    const int c0 = (int)(blockIdx.x / a.T) * 16, I = a.I, nkb = I >> 7;
    /* loc: the token's K intermediate rows (local or not) and (fp8) the intermediate's amax bits
     * into registers right after the wait, before the quantisation needs them */
    constexpr bool F8 = MODE == MOE_QUANT_FP8 || MODE == MOE_QUANT_FP8_BLOCK;
    constexpr bool LQ = F8 || MODE == MOE_QUANT_NVFP4, PT = MODE == MOE_QUANT_FP8 || MODE == MOE_QUANT_NVFP4;
    constexpr bool loc = LQ && LOC, LH = loc && qv_loc_h<MODE>::V;
    constexpr int IV = LQ ? QV_LOC_MAX / 8 / DT : 1;
    uint16_t *s_ih = (uint16_t *)qv_dyn; /* as k_qv_up's (QV_LOC_DN_SMEM bytes) */
    float *s_is = (float *)(qv_dyn + 2 * QV_LOC_MAX);
    /* BK: the W2 rows, after the activations (from a 128-byte boundary) */
    const int64_t rowb = PK ? I / 2 : I;
    const int rs = (int)rowb; /* (shared-memory offsets in 32 bits) */
    uint8_t *s_wr = qv_dyn + (loc ? (QV_LOC_DN_SMEM + 127) / 128 * 128 : 0);
    __shared__ __align__(8) uint64_t s_bar;
    const uint32_t bar = (uint32_t)__cvta_generic_to_shared(&s_bar);
    if (BK && tid == 0) {
        moe__fm_mbar_init(bar, 1);
        moe__fm_mbar_init_fence();
    }
    uint4 il[IV];
    uint32_t lamax = 0;
    /* the token's local pairs in k order (ids and routing weights read together) */
    __shared__ int s_e[32], s_p[32], s_nl;
    __shared__ float s_w[32];
    if (warp == 0) {
        int id = -1;
        float wt = 1.0f;
        if (a.rt_flag) { /* k_qv_up's block (0, 0) routes the token (T = 1, not llama4): wait for it */
            if (a.K <= 8) { /* the ids packed in one word (qv_args.rt_flag): one round trip */
                unsigned long long w;
                do asm volatile("ld.acquire.gpu.global.u64 %0, [%1];\n" : "=l"(w) : "l"(a.ctr + 10) : "memory");
                while (!(w >> 63));
                if (lane < a.K) id = w >> 62 & 1u ? __ldcg(a.ids + p0 + lane) : (int)(w >> (7 * lane) & 127u);
            } else {
                unsigned f;
                do asm volatile("ld.acquire.gpu.global.u32 %0, [%1];\n" : "=r"(f) : "l"(a.ctr + 7) : "memory");
                while (f == 0);
                if (lane < a.K) id = __ldcg(a.ids + p0 + lane);
            }
            if (lane < a.K) wt = __ldcg(a.wts + p0 + lane); /* used below, after the weights are requested */
        } else if (lane < a.K) {
            id = a.ids[p0 + lane];
            if (!a.llama4) wt = a.wts[p0 + lane];
        }
        const unsigned m = __ballot_sync(0xffffffffu, lane < a.K && moe__fg_local(id, a.E, a.lo, a.lc));
        if (m >> lane & 1u) {
            const int kl = __popc(m & ((1u << lane) - 1u));
            s_e[kl] = id;
            s_p[kl] = (int)(p0 + lane);
        }
        if (lane == 0) s_nl = __popc(m);
        if constexpr (BK) {
            /* local pair kl's rows c0 .. c0 + 15 (shared rows 16 kl ..), copied by the lane of its id;
             * the expected bytes first */
            const int nl = __popc(m);
            if (lane == 0 && nl > 0) moe__fm_mbar_arrive_tx(bar, (uint32_t)(16 * nl * rowb));
            __syncwarp();
            if (m >> lane & 1u)
                qv_bulk_g2s((uint32_t)__cvta_generic_to_shared(s_wr + (size_t)__popc(m & ((1u << lane) - 1u)) * 16 * rs),
                            a.w2 + ((int64_t)id * a.H + c0) * rowb, (uint32_t)(16 * rowb), bar);
        }
        if (m >> lane & 1u) s_w[__popc(m & ((1u << lane) - 1u))] = wt;
    }
    __syncthreads();
    QV_TL(1, 1);
    /* loc, fp8 / nvfp4: every block has read the amax slot (above: lamax is used after this point only
     * through its register); the last block to count resets the slot for the next call (k_qv_up's
     * epilogues take its max) */
    auto end_count = [&]() {
        if (loc && PT && tid == 0 && atomicAdd(a.ctr + 6, 1u) == gridDim.x - 1) {
            a.ctr[5] = 0;
            a.ctr[6] = 0;
        }
        /* rt_flag: the blocks that have read the routing flags, counted at the block's end (the atomic's
         * returned value is a round trip); the last one resets them for the next call */
        if (a.rt_flag && tid == 0 && atomicAdd(a.ctr + 8, 1u) == gridDim.x - 1) {
            a.ctr[7] = 0;
            a.ctr[8] = 0;
            *(unsigned long long *)(a.ctr + 10) = 0;
        }
    };
    const int nl = s_nl;
    /* unit u = (local pair u / nkb, 128-column block u % nkb); warp w takes w, w + NW, ... */
    const int nu = nl * nkb;
    constexpr int kbb = PK ? 64 : 128;
    uint4 w0[UG][NH], w1[UG][NH];
    auto load_w = [&](int u0) {
#pragma unroll
        for (int j = 0; j < UG; j++) {
            const int uu = u0 + NW * j < nu ? u0 + NW * j : u0; /* past the end: reload, unused */
            const int kl = uu / nkb, kb = uu - kl * nkb;
            if constexpr (BK) { /* shared memory: the rows' copies have landed (mbarrier) */
                const uint8_t *sr = s_wr + (kl * 16 + g) * rs + kbb * kb + 16 * q;
#pragma unroll
                for (int h = 0; h < NH; h++) {
                    w0[j][h] = *(const uint4 *)(sr + 64 * h);
                    w1[j][h] = *(const uint4 *)(sr + 8 * rs + 64 * h);
                }
                continue;
            }
            const uint8_t *wr = a.w2 + ((int64_t)s_e[kl] * a.H + c0 + g) * rowb + kbb * kb + 16 * q;
#pragma unroll
            for (int h = 0; h < NH; h++) {
                w0[j][h] = qv_ldw(wr + 64 * h);
                w1[j][h] = qv_ldw(wr + 8 * rowb + 64 * h);
            }
        }
    };
    if (!BK && warp < nu) load_w(warp);
    /* fp8 modes: the first round's weight scales, in flight with its weights */
    auto wscale = [&](int uu) {
        const int kl = uu / nkb, kb = uu - kl * nkb, e = s_e[kl];
        return MODE == MOE_QUANT_FP8_BLOCK ? a.s2[((int64_t)e * (a.H >> 7) + (c0 >> 7)) * nkb + kb] : a.s2[e];
    };
    float ws0[UG];
#pragma unroll
    for (int j = 0; j < UG; j++) ws0[j] = F8 && warp < nu ? wscale(warp + NW * j < nu ? warp + NW * j : warp) : 0.0f;
    QV_TL(1, 2);
    moe__fm_pdl_enter(); /* k_qv_up's intermediate from here on */
    QV_TL(1, 3);
    if (loc) {
        qv_loc_load<DT>(a.inter + p0 * I, (int64_t)a.K * I, il);
        if (PT) lamax = __ldcg(a.ctr + 5);
    }
    if (nl == 0) {
        if (tid < 16) a.out[t * a.H + c0 + tid] = 0;
        end_count();
        return;
    }

    /* the intermediate rows of the local pairs: codes (and fp8_block / nvfp4 scales), shared
     * out in chunks (pair, 1024 columns); rows of other pairs are skipped (mx modes: bf16) */
    const int cpr = (I + QV_CHUNK - 1) / QV_CHUNK;
    const bool pt = MODE == MOE_QUANT_FP8 || MODE == MOE_QUANT_NVFP4; /* per-tensor amax */
    const uint32_t gamax = pt ? (loc ? lamax : __ldcg(a.ctr + 4)) : 0u; /* complete: step 1 ended */
    const float sg = MODE == MOE_QUANT_NVFP4 ? moe__q_nvfp4_global(moe__q_amax(gamax))
                                             : moe__q_fp8_scale(moe__q_amax(gamax));
    if (loc) {
        qv_loc_quant<MODE, DT>(il, (int64_t)a.K * I, sg, s_ih, s_is);
        __syncthreads();
        QV_TL(1, 4);
    } else if (!GC) {
        qv_share(a.ctr + 2, (unsigned)(P * cpr), [&](unsigned c) {
            const int64_t pp = c / cpr, i0 = pp * I + (int64_t)(c % cpr) * QV_CHUNK, i1 = min(pp * I + I, i0 + QV_CHUNK);
            if (moe__fg_local(a.ids[pp], a.E, a.lo, a.lc)) {
                if (MODE == MOE_QUANT_FP8)
                    qv_fp8_codes<DT>(a.inter, i0, i1, sg, a.gc);
                else if (MODE == MOE_QUANT_NVFP4)
                    moe__q_rows<MOE_QUANT_NVFP4, 16, DT>(a.inter, MOE_BF16, i0 / 16, i1 / 16,
                                                         DT / moe__q_rows_geom<16>::L, P * I, a.ctr + 4, a.gc,
                                                         a.gs);
                else
                    moe__q_rows<MOE_QUANT_FP8_BLOCK, 128, DT>(a.inter, MOE_BF16, i0 / 128, i1 / 128,
                                                              DT / moe__q_rows_geom<128>::L, 1, nullptr, a.gc,
                                                              a.gs);
            }
            if (c == 0 && tid < 2) a.ctr[tid] = 0; /* step 1's counters (it has ended) */
        });
    }

    /* packed: scale bytes a row of W2 (nvfp4: per 16 columns; mx: per 32) */
    const int64_t spr = MODE == MOE_QUANT_MXFP4 ? I / 32 : I / 16;
    const int gj = 2 * (q & 1); /* mx: groups of accumulator columns 2q, 2q+1 (q < 2) */
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int u0 = warp; u0 < nu; u0 += NW * UG) {
        if (!BK && u0 != warp) load_w(u0);
        uint4 xv[UG][NH];
        float f[UG];
        uint32_t ua[UG], ub[UG], ux[UG];
#pragma unroll
        for (int j = 0; j < UG; j++) {
            const int uu = u0 + NW * j < nu ? u0 + NW * j : u0;
            const int kl = uu / nkb, kb = uu - kl * nkb, pp = s_p[kl], e = s_e[kl];
            if (!GC && !LH) {
                const uint8_t *xr = loc ? (const uint8_t *)s_ih + (int64_t)(pp - p0) * rowb + kbb * kb + 16 * q
                                        : a.gc + (int64_t)pp * rowb + kbb * kb + 16 * q;
#pragma unroll
                for (int h = 0; h < NH; h++)
                    xv[j][h] = g != 0 ? make_uint4(0, 0, 0, 0)
                               : loc  ? *(const uint4 *)(xr + 64 * h)
                                      : __ldcg((const uint4 *)(xr + 64 * h));
            }
            /* the unit's factor: its scales (as the tile path: activation x weight) and weight */
            if (MODE == MOE_QUANT_FP8_BLOCK)
                f[j] = (loc ? s_is[(pp - p0) * nkb + kb] : __ldcg(a.gs + (int64_t)pp * nkb + kb)) *
                       (u0 == warp ? ws0[j] : wscale(uu));
            else if (MODE == MOE_QUANT_FP8)
                f[j] = sg * (u0 == warp ? ws0[j] : wscale(uu));
            else if (MODE == MOE_QUANT_NVFP4)
                f[j] = sg * a.g2[e];
            else
                f[j] = 1.0f;
            f[j] *= s_w[kl];
            const uint8_t *sr = a.sb2 + ((int64_t)e * a.H + c0 + g) * spr;
            if (MODE == MOE_QUANT_NVFP4) {
                ua[j] = *(const uint16_t *)(sr + 8 * kb + 2 * q);
                ub[j] = *(const uint16_t *)(sr + 8 * spr + 8 * kb + 2 * q);
                ux[j] = loc ? 0u
                            : __ldcg((const uint16_t *)((const uint8_t *)a.gs + (int64_t)pp * (I / 16) + 8 * kb + 2 * q));
            }
            if (GC) {
                ua[j] = qv_mx_raw<MODE>(sr, 4 * kb + gj);
                ub[j] = qv_mx_raw<MODE>(sr + 8 * spr, 4 * kb + gj);
            }
        }
        if constexpr (BK) { /* after the round's scale loads are issued */
            if (u0 == warp) moe__fm_mbar_wait(bar, 0);
            load_w(u0);
        }
#pragma unroll
        for (int j = 0; j < UG; j++) {
            if (u0 + NW * j >= nu) break;
            float part[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            if (!GC && LH) {
                const int uu = u0 + NW * j, kl = uu / nkb, kb = uu - kl * nkb;
                uint4 xq[4]; /* B's f16 values from shared memory */
                qv_ld_h<MODE>(s_ih + (int64_t)(s_p[kl] - p0) * I + 128 * kb, q, g == 0, xq);
                qv_unit_h<MODE, NH>(part, w0[j], w1[j], xq, ua[j], ub[j]);
            } else if (!GC) {
                qv_unit<MODE, NH>(part, w0[j], w1[j], xv[j], ua[j], ub[j], ux[j]);
            } else {
                /* B column j < 4 = group j of the pair's row (lanes g = q load it) */
                const int uu = u0 + NW * j, kl = uu / nkb, kb = uu - kl * nkb;
                const uint16_t *xp = a.inter + (int64_t)s_p[kl] * I + 128 * kb + 32 * q;
                uint4 xb[4];
#pragma unroll
                for (int i = 0; i < 4; i++)
                    xb[i] = g == q ? __ldg((const uint4 *)(xp + 8 * i)) : make_uint4(0, 0, 0, 0);
                uint32_t bw[16];
                qv_bf16_pairs(xb, bw);
                qv_step4<MODE>(part, w0[j][0], 0, w1[j][0], 0, bw);
                part[0] *= qv_mx_scale<MODE>(ua[j], 0);
                part[1] *= qv_mx_scale<MODE>(ua[j], 1);
                part[2] *= qv_mx_scale<MODE>(ub[j], 0);
                part[3] *= qv_mx_scale<MODE>(ub[j], 1);
            }
#pragma unroll
            for (int i = 0; i < 4; i++) acc[i] += part[i] * f[j];
        }
    }
    QV_TL(1, 5);
    /* column 0 (lanes q = 0): rows g and g + 8; mx: columns 0-3 (lanes q = 0, 1), the groups */
    if (GC) {
        acc[0] += acc[1];
        acc[2] += acc[3];
        acc[0] += __shfl_xor_sync(0xffffffffu, acc[0], 1);
        acc[2] += __shfl_xor_sync(0xffffffffu, acc[2], 1);
    }
    /* the warps' sums in warp order, the weighted biases in k order, one rounding */
    __shared__ float s_red[NW][16];
    if (q == 0) {
        s_red[warp][g] = acc[0];
        s_red[warp][g + 8] = acc[2];
    }
    __syncthreads();
    if (tid < 16) {
        float v = s_red[0][tid];
#pragma unroll
        for (int w = 1; w < NW; w++) v += s_red[w][tid];
        if (a.b2)
            for (int kl = 0; kl < nl; kl++) v += s_w[kl] * a.b2[(int64_t)s_e[kl] * a.H + c0 + tid];
        a.out[t * a.H + c0 + tid] = moe__f32_to_bf16(v);
    }
    end_count();
    QV_TL(1, 6);
}

/* The kernels with the activations block-local (LOC, qv_loc_eligible) or shared: separate instantiations,
 * so that neither carries the other's code and registers. */
/* Dynamic shared memory of a k_qv_down block: the block-local activations (loc), then (BK) the W2 rows
 * of the token's K experts. */
static size_t qv_dn_smem(bool loc, bool bk, int64_t K, int64_t I, bool pk) {
    const size_t act = loc ? (QV_LOC_DN_SMEM + 127) / 128 * 128 : 0;
    return bk ? act + (size_t)K * 16 * (pk ? I / 2 : I) : (loc ? QV_LOC_DN_SMEM : 0);
}

template <int MODE, bool LOC, bool PRE, bool RT = false, bool BK = false>
moe_status qv_launch2(cudaStream_t st, const qv_args &a) {
    constexpr int TPB = qv_up_tiles<MODE, LOC>::N;
    const bool pdl = PRE; /* both kernels start with griddepcontrol.wait, k_qv_up's PRE (and RT) work aside */
    /* rt_flag: k_qv_up is the call's first kernel (a plain launch) */
    MOE_TRY(moe__fm_go(k_qv_up<MODE, LOC, PRE, RT>, dim3((unsigned)((a.N1 / 16 + TPB - 1) / TPB), (unsigned)(a.T * a.K)),
                  TPB * QV_UP_THREADS, LOC ? QV_LOC_UP_SMEM : 0, st, pdl && (!a.rt_flag || a.up_pdl), a));
    const size_t dsm = qv_dn_smem(LOC, BK, a.K, a.I, qv_mode<MODE>::PK);
    if (BK) {
        static int set; /* the attribute once a process (QV_BK_MAX_SMEM covers every BK launch) */
        if (!__atomic_load_n(&set, __ATOMIC_ACQUIRE)) {
            MOE_CUDA_TRY(FN, cudaFuncSetAttribute(k_qv_down<MODE, LOC, BK>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                  QV_BK_MAX_SMEM));
            __atomic_store_n(&set, 1, __ATOMIC_RELEASE);
        }
    }
    MOE_TRY(moe__fm_go(k_qv_down<MODE, LOC, BK>, dim3((unsigned)(a.T * (a.H / 16))), qv_dn_threads<MODE, LOC>::N,
                  dsm, st, pdl, a));
    return MOE_OK;
}

template <int MODE> moe_status qv_launch(cudaStream_t st, const qv_args &a, bool loc, bool bk) {
    if constexpr (MODE == MOE_QUANT_FP8 || MODE == MOE_QUANT_FP8_BLOCK || MODE == MOE_QUANT_NVFP4)
        if (loc) {
            if (a.rt.logits) /* k_qv_up routing its pair */
                return bk ? qv_launch2<MODE, true, true, true, true>(st, a) : qv_launch2<MODE, true, true, true>(st, a);
            return a.xpre ? qv_launch2<MODE, true, true>(st, a) : qv_launch2<MODE, true, false>(st, a);
        }
    if constexpr (MODE == MOE_QUANT_MXFP4 || MODE == MOE_QUANT_MXINT4)
        if (bk) return qv_launch2<MODE, false, false, false, true>(st, a);
    return qv_launch2<MODE, false, false>(st, a);
}

} // namespace

/* ------------------------------------------------------------- host glue -- */

/* Whether the call takes the path.  MOE_FUSED_QGEMV set: T <= its value (0 = off, capped at
 * QV_MAX_T).  Unset: T <= 4, and up to T = 64 for nvfp4 / mxfp4 while T*K < E (below one pair
 * per expert) and for mxint4 while T*K <= 2E (at most ~2 pairs per expert, one pass of 8 pairs a
 * leader).  Since the register-operand tile kernel (fused_quant.cu, k_wreg; H100 2026-11-27):
 * DeepSeek-V3 T = 64 nvfp4 / mxfp4 3392 / 3096 us there vs 4318 / 4336 here, T = 16 1589 / 1406
 * vs 1481 / 1237; Qwen3 T = 16 nvfp4 189 vs 203, mxfp4 156 vs 154.  Earlier, with moe bench fused_quant
 * --compare-env (H100 80GB HBM3, 2026-11-26 19:58 UTC, GEMV vs tile kernels): DeepSeek-V3
 * T = 16 nvfp4/mxfp4/mxint4 1481/1256/1191 vs 2371/2234/2120 us, T = 64 4320/4368/4131 vs
 * 5174/4884/4609; Qwen3 T = 16 206/153/137 vs 252/223/212.  fp8 gains nothing reliable there
 * (DeepSeek-V3 T = 16 1623 vs 1734, T = 64 3989 vs 3897; Qwen3 T = 16 202 vs 197) and fp8_block
 * loses (its per-128-column scale work); with more pairs per expert (Qwen3 T = 64, Mixtral
 * T = 16/64) the passes re-read the weights and the tile kernels win in every mode. */
/* Whether fp8, fp8_block and nvfp4 quantise their activations block-locally (k_qv_up: x of
 * T*H <= QV_LOC_UP values; k_qv_down: a token's K*I <= QV_LOC_MAX) instead of in the shared steps.
 * Off with MOE_FUSED_QVLOC=0.  H100, moe bench fused_quant --compare-env MOE_FUSED_QVLOC=0
 * (2026-11-27, docs/performance.md): Qwen3-30B-A3B T = 1 fp8 31.3 -> 25.5 us, fp8_block 33.7 ->
 * 26.2, nvfp4 33.0 -> 27.2. */
static bool qv_loc_eligible(const moe__fused_args *A) {
    const struct moe_experts *ex = A->ex;
    if (ex->quant != MOE_QUANT_FP8 && ex->quant != MOE_QUANT_FP8_BLOCK && ex->quant != MOE_QUANT_NVFP4) return false;
    if (moe__fq_env_off("MOE_FUSED_QVLOC")) return false;
    return A->T * ex->H <= QV_LOC_UP && A->K * ex->I <= QV_LOC_MAX;
}

/* Block-local calls that routed their own tokens (logits given) launch both kernels as programmatic
 * dependents (sm_90+; MOE_FUSED_QVPDL=0: off): k_qv_up's blocks start while the routing kernel
 * runs (it lets them, moe__rt_let_dependents) and quantise x meanwhile.  Not in routed mode: the
 * kernel before k_qv_up is then the caller's, which may let dependents start before x is written. */
static bool qv_pdl(const moe__fused_args *A, int dev) {
    if (A->routed) return false;
    /* H100, Qwen3-30B-A3B T = 1 (2026-11-27, one call): nvfp4 24.5-24.8 -> 22.7-22.8 us, fp8 25.4 ->
     * 24.7, fp8_block 25.2-25.3 -> 24.5 (with a 16-warp k_qv_down: qv_dn_threads).  MOE_FUSED_QVPDL=0:
     * off */
    if (moe__fq_env_off("MOE_FUSED_QVPDL")) return false;
    static int major[64]; /* per device, as cuda_backend.cu's caches */
    if (dev < 0 || dev >= 64) return false;
    int m = __atomic_load_n(&major[dev], __ATOMIC_RELAXED);
    if (m == 0) {
        if (cudaDeviceGetAttribute(&m, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) {
            (void)cudaGetLastError();
            return false;
        }
        __atomic_store_n(&major[dev], m, __ATOMIC_RELAXED);
    }
    return m >= 9;
}

/* Whether k_qv_up routes its own pair (block-local activations, qv_loc_eligible, on sm_90+, qv_pdl: fp8,
 * fp8_block, nvfp4; T = 1): E <= 128 (route.cu's moe__k_route<4, DT> computes those ids; its code is
 * shared, route_tok.cuh), not llama4 (its own top-1 kernel), MOE_FUSED_QVRT not "0".  Each block issues its
 * weight loads right after its routing instead of after the routing kernel's end and an ids read.  When
 * moe_fused_moe left the routing to this call (route_pending; moe__fq_gemv_routes 2) no routing kernel
 * runs: k_qv_up's block (0, 0) routes the token fully and stores ids, weights and replay, and k_qv_down
 * acquires its flag (qv_args.rt_flag); MOE_FUSED_QVRT=1 keeps the routing kernel (k_qv_up launched as its
 * dependent, k_qv_down reading its ids).  x is quantised after the weight loads for the fp8 modes, before
 * the routing for nvfp4 (compile-time: 0.2 us faster for nvfp4 than a runtime switch), and the fp8 modes'
 * kernels run rounds of 2 column blocks (qv_up_rt).  H100, Qwen3-30B-A3B T = 1 (2026-11-27,
 * --compare-env in one build, 2 runs): no routing kernel fp8 21.8 us, fp8_block 22.0-22.1, nvfp4
 * 21.9-22.0; MOE_FUSED_QVRT=1 21.9-22.0 / 23.0-23.2 / 21.8-21.9; =0 23.9 / 23.8 / 23.4.  x early for the
 * fp8 modes (with the routing kernel): 23.5 / 23.6-23.7.  Both kernels routing the token (every
 * k_qv_down block too) measured slower (fp8 25.5, fp8_block 25.3, nvfp4 23.6 us: k_qv_down's blocks
 * start as k_qv_up's leave, then route before their W2 loads; docs/performance.md). */
static bool qv_self_route(const moe__fused_args *A, int dev) {
    if (!qv_loc_eligible(A) || !qv_pdl(A, dev)) return false;
    const int m = A->ex->quant;
    if (m != MOE_QUANT_FP8 && m != MOE_QUANT_NVFP4 && m != MOE_QUANT_FP8_BLOCK) return false;
    if (!A->route || A->routed || A->T != 1 || A->llama4 || A->ex->E > 128) return false;
    const int dt = A->logits->dtype;
    if (dt != MOE_F32 && dt != MOE_BF16 && dt != MOE_F16) return false;
    const char *env = getenv("MOE_FUSED_QVRT");
    return !(env && env[0] == '0' && !env[1]);
}

/* Whether k_qv_down takes its W2 rows by bulk copies into shared memory (BK) rather than 16-byte loads
 * into registers: T = 1 (one block per column tile; at T > 1 blocks of this much shared memory would
 * run in waves), the mx modes, or the fp8 modes and nvfp4 when their kernels route the token themselves
 * (qv_self_route: route_in != 0), the rows of the token's K experts within QV_BK_MAX_SMEM, and the
 * sm_90a binary (the bulk copies exist only there).  MOE_FUSED_QVBK=0: off.  H100, Qwen3-30B-A3B
 * T = 1 (2026-11-28, alternated with MOE_FUSED_QVBK=0, with the packed ids and the late count):
 * fp8 22.2 -> 21.7 us, fp8_block 22.3 -> 21.7-21.8, nvfp4 21.1-21.2 -> 19.9-20.0, mxfp4 21.0-21.2 ->
 * 19.5-20.1, mxint4 19.2-19.3 -> 18.7; with qv_args.up_pdl (fp8 modes) fp8 20.5-20.6, fp8_block
 * 20.9-21.0.  The %globaltimer timeline (MOE_QV_TL) showed k_qv_down's register loads streaming W2
 * at about 1.6 TB/s; copies of each row (128 from one warp) took 4 us to issue; 2 or 4 copies an
 * expert, 8 warps with the units' sums kept apart, and k_qv_up held to 72 registers so k_qv_down fits
 * beside it earlier all measured slower (docs/performance.md, twenty-first session). */
static bool qv_dn_bulk(const moe__fused_args *A, bool loc, bool self_route) {
    if (A->T != 1 || moe__fq_env_off("MOE_FUSED_QVBK")) return false;
    const struct moe_experts *ex = A->ex;
    const int m = ex->quant;
    const bool packed = m == MOE_QUANT_NVFP4 || m == MOE_QUANT_MXFP4 || m == MOE_QUANT_MXINT4;
    if (m == MOE_QUANT_MXFP4 || m == MOE_QUANT_MXINT4) {
        if (loc) return false;
    } else if (!loc || !self_route) {
        return false;
    }
    if (qv_dn_smem(loc, true, A->K, ex->I, packed) > QV_BK_MAX_SMEM) return false;
    bool ok = false; /* the sm_90a binary on a 9.x device, as the Hopper tile kernels ask */
    if (moe__fm_hopper_ready(&ok) != MOE_OK || !ok) {
        moe_clear_error();
        return false;
    }
    return true;
}

int moe__fq_gemv_routes(const moe__fused_args *A, int dev) {
    if (!qv_self_route(A, dev)) return 0;
    const char *env = getenv("MOE_FUSED_QVRT");
    return A->route_pending && !(env && env[0] == '1' && !env[1]) ? 2 : 1;
}

bool moe__fq_gemv_eligible(const moe__fused_args *A) {
    const struct moe_experts *ex = A->ex;
    const int m = ex->quant;
    if (m != MOE_QUANT_FP8 && m != MOE_QUANT_FP8_BLOCK && m != MOE_QUANT_NVFP4 && m != MOE_QUANT_MXFP4 &&
        m != MOE_QUANT_MXINT4)
        return false;
    if (!A->ws || A->local_count <= 0 || A->T < 1) return false;
    const char *env = getenv("MOE_FUSED_QGEMV");
    if (env && env[0]) {
        if (A->T > moe__fm_env_bound("MOE_FUSED_QGEMV", QV_DEFAULT_T, QV_MAX_T)) return false;
    } else if (A->T > QV_DEFAULT_T) {
        /* past decode only the 4-bit modes, below one pair per expert (nvfp4 / mxfp4, and mxint4
         * on f16 MMAs: from there fused_quant.cu's k_wreg is faster) or up to two (mxint4 with
         * per-32 promotions, against the tile kernels); H100, docs/performance.md */
        const int64_t tk = A->T * A->K, E = ex->E;
        if (m == MOE_QUANT_FP8 || m == MOE_QUANT_FP8_BLOCK || A->T > QV_MAX_T) return false;
        if (m == MOE_QUANT_MXINT4 && !moe__fq_i4f_ok(ex) ? tk > 2 * E : tk >= E) return false;
    }
    if (ex->H % 128 != 0 || ex->I % 128 != 0) return false; /* checked when the experts are made */
    /* 16-byte loads of x and the codes (views and qtensors made from parts may be offset) */
    const uintptr_t x = (uintptr_t)moe_tensor_data(A->hidden);
    const uintptr_t w13 = (uintptr_t)moe_tensor_data(moe_qtensor_data(ex->q13));
    const uintptr_t w2 = (uintptr_t)moe_tensor_data(moe_qtensor_data(ex->q2));
    /* packed modes: 2- and 4-byte loads of the scales */
    const uintptr_t s13 = (uintptr_t)moe_tensor_data(moe_qtensor_scales(ex->q13));
    const uintptr_t s2 = (uintptr_t)moe_tensor_data(moe_qtensor_scales(ex->q2));
    return ((x | w13 | w2) & 15) == 0 && ((s13 | s2) & 3) == 0;
}

bool moe__fq_gemv_bulk(const moe__fused_args *A, int route_in) {
    return qv_dn_bulk(A, qv_loc_eligible(A), route_in != 0);
}

moe_status moe__fq_gemv(const moe__cuda_guard &g, const moe__fused_args *A, int route_in, bool bk) {
    const struct moe_experts *ex = A->ex;
    const struct moe_workspace *ws = A->ws;
    const moe__fq_layout L = moe__fq_layout_of(ws);
    unsigned char *base = (unsigned char *)moe_tensor_data(ws->buf);
    qv_args a;
    memset(&a, 0, sizeof a);
    a.x = (const uint16_t *)moe_tensor_data(A->hidden);
    a.w13 = (const uint8_t *)moe_tensor_data(moe_qtensor_data(ex->q13));
    a.w2 = (const uint8_t *)moe_tensor_data(moe_qtensor_data(ex->q2));
    a.s13 = (const float *)moe_tensor_data(moe_qtensor_scales(ex->q13));
    a.s2 = (const float *)moe_tensor_data(moe_qtensor_scales(ex->q2));
    a.sb13 = (const uint8_t *)a.s13;
    a.sb2 = (const uint8_t *)a.s2;
    if (ex->quant == MOE_QUANT_NVFP4) {
        a.g13 = (const float *)moe_tensor_data(moe_qtensor_global_scale(ex->q13));
        a.g2 = (const float *)moe_tensor_data(moe_qtensor_global_scale(ex->q2));
    }
    a.b13 = ex->b13 ? (const float *)moe_tensor_data(ex->b13) : nullptr;
    a.b2 = ex->b2 ? (const float *)moe_tensor_data(ex->b2) : nullptr;
    a.ids = (const int32_t *)moe_tensor_data(A->ids);
    a.wts = (const float *)moe_tensor_data(A->wts);
    a.xc = base + L.xc;
    a.xs = (float *)(base + L.xs);
    a.xt = (float *)(base + L.misc + 16);
    a.inter = (uint16_t *)(base + ws->off_inter);
    a.gc = base + L.gc;
    a.gs = (float *)(base + L.gs);
    a.ctr = (unsigned *)(base + L.misc + MOE__FQ_CTR_OFF);
    a.out = (uint16_t *)moe_tensor_data(A->out);
    a.err = (int32_t *)(base + ws->off_err);
    moe__fg_shape_set(&a, A);
    const bool loc = qv_loc_eligible(A);
    a.xpre = loc && qv_pdl(A, g.dev);
    if (route_in) { /* as moe__cuda_route and moe__rt_launch<4, DT> set them (route.cu) */
        moe__route_args &r = a.rt; /* route_in 2: k_qv_up's block (0, 0) stores ids, weights, replay */
        a.rt_flag = route_in == 2;
        a.up_pdl = a.rt_flag && (ex->quant == MOE_QUANT_FP8 || ex->quant == MOE_QUANT_FP8_BLOCK) &&
                   !moe__fq_env_off("MOE_FUSED_QVUPPDL");
        moe__rt_args_init(r, A->route, A->logits, A->bias, a.rt_flag ? (moe_tensor *)A->ids : nullptr,
                          a.rt_flag ? (moe_tensor *)A->wts : nullptr, a.rt_flag ? A->replay : nullptr);
        if (A->logits->dtype == MOE_F32) moe__rt_general_flags<4, 4>(r);
        else moe__rt_general_flags<4, 2>(r);
        a.rt_dt = A->logits->dtype;
    }
    switch (ex->quant) {
    case MOE_QUANT_FP8: return qv_launch<MOE_QUANT_FP8>(g.stream, a, loc, bk);
    case MOE_QUANT_NVFP4: return qv_launch<MOE_QUANT_NVFP4>(g.stream, a, loc, bk);
    case MOE_QUANT_MXFP4: return qv_launch<MOE_QUANT_MXFP4>(g.stream, a, loc, bk);
    case MOE_QUANT_MXINT4: return qv_launch<MOE_QUANT_MXINT4>(g.stream, a, loc, bk);
    default: return qv_launch<MOE_QUANT_FP8_BLOCK>(g.stream, a, loc, bk);
    }
}
