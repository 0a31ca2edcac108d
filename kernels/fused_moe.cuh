/* fused_moe.cuh -- the fused MoE kernels' building blocks (sm_80+ PTX: cp.async, ldmatrix,
 * mma.sync m16n8k16 bf16 with f32 accumulation), the activation shared by every bf16 fused
 * kernel, and the decode GEMV path's entry points (fused_gemv.cu).  Used by fused_moe.cu and
 * fused_gemv.cu. */
#ifndef MOE_FUSED_MOE_CUH
#define MOE_FUSED_MOE_CUH

#include "cuda_common.cuh"
#include "fused.h"

#include <cuda.h>
#include <stdint.h>
#include <stdlib.h>

/* The activation on gate g and up u (relu2: u unused). */
__device__ __forceinline__ float moe__fm_act(int act, float g, float u, float alpha, float beta, float limit) {
    switch (act) {
    case MOE_ACT_SWIGLU: return g / (1.0f + expf(-g)) * u;
    case MOE_ACT_GEGLU: return 0.5f * g * (1.0f + erff(g * 0.70710678118654752f)) * u;
    case MOE_ACT_RELU2: {
        float r = fmaxf(g, 0.0f);
        return r * r;
    }
    default: {
        float gg = fminf(g, limit), uu = fminf(fmaxf(u, -limit), limit);
        return gg / (1.0f + expf(-alpha * gg)) * (uu + beta);
    }
    }
}

/* A compile-time activation for the GEMM1 epilogues (v >= 0) or the call's (-1: a.act at run time).
 * moe__fm_act_at(act, f) calls f once with SwiGLU known at compile time, or with -1 for the others,
 * so the epilogue's unrolled loop is compiled per case: with the switch inside it, every value took
 * a jump table and had every activation's code in line (k_qg_rs GEMM1, thirteenth session: 30% of
 * its stall samples; Qwen3-30B-A3B T = 4096 7% faster in every 4-bit mode once dispatched here). */
template <int A> struct moe__fm_actc {
    static constexpr int v = A;
};
template <class F> __device__ __forceinline__ void moe__fm_act_at(int act, F &&f) {
    if (act == MOE_ACT_SWIGLU)
        f(moe__fm_actc<MOE_ACT_SWIGLU>{});
    else
        f(moe__fm_actc<-1>{});
}

/* The bf16 kernels' gated epilogue for two adjacent intermediate columns: gate (g0, g1) and up
 * (u0, u1) values (already scaled), plus the biases at nn + c2 (gate) and nn + 8 + c2 (up) when
 * bias is set, through activation ACT (-1: a.act at run time), as two packed bf16. */
template <int ACT, class Args>
__device__ __forceinline__ uint32_t moe__fm_gated_pack(const Args &a, const float *bias, int nn, int c2, float g0,
                                                       float g1, float u0, float u1) {
    if (bias) {
        g0 += bias[nn + c2];
        g1 += bias[nn + c2 + 1];
        u0 += bias[nn + 8 + c2];
        u1 += bias[nn + 8 + c2 + 1];
    }
    const float v0 = moe__fm_act(ACT >= 0 ? ACT : a.act, g0, u0, a.alpha, a.beta, a.limit);
    const float v1 = moe__fm_act(ACT >= 0 ? ACT : a.act, g1, u1, a.alpha, a.beta, a.limit);
    return (uint32_t)moe__f32_to_bf16(v0) | ((uint32_t)moe__f32_to_bf16(v1) << 16);
}

/* Decode GEMV path (fused_gemv.cu): bf16 experts, 1 <= T <= the bound of MOE_FUSED_GEMV
 * (unset: 4; "0": off), local_count > 0.  moe__fm_gemv_eligible says whether a call of
 * moe__cuda_fused takes it; moe__fm_gemv then does the whole call after routing (2 launches
 * on g.stream, PDL when pdl). */
bool moe__fm_gemv_eligible(const moe__fused_args *A);
moe_status moe__fm_gemv(const moe__cuda_guard &g, const moe__fused_args *A, bool pdl);

/* ---- pieces of the decode GEMV paths (fused_gemv.cu: bf16; fused_qgemv.cu: quantised) ---- */

/* Largest T of a GEMV path from the environment variable `name`: unset, empty or not a
 * number: def; "0": 0 (off); N: N, at most max. */
static inline int64_t moe__fm_env_bound(const char *name, int64_t def, int64_t max) {
    const char *env = getenv(name);
    if (!env || !env[0]) return def;
    char *end = nullptr;
    const long v = strtol(env, &end, 10);
    if (end == env || v < 0) return def;
    return v > max ? max : (int64_t)v;
}

/* The call's sizes, expert-parallel range and activation as the GEMV kernels take them (the
 * base of their argument structs). */
struct moe__fg_shape {
    int64_t T;
    int K, E, lo, lc, H, I, N1, act, llama4;
    float alpha, beta, limit;
};

static inline void moe__fg_shape_set(moe__fg_shape *s, const moe__fused_args *A) {
    const struct moe_experts *ex = A->ex;
    s->T = A->T;
    s->K = A->K;
    s->E = (int)ex->E;
    s->lo = A->local_offset;
    s->lc = A->local_count;
    s->H = (int)ex->H;
    s->I = (int)ex->I;
    s->N1 = (int)ex->N1;
    s->act = ex->act;
    s->llama4 = A->llama4;
    s->alpha = ex->alpha;
    s->beta = ex->beta;
    s->limit = ex->limit;
}

/* Launch one of the fused MoE's kernels on `stream`, with programmatic stream serialisation when
 * `pdl` (errors name moe_fused_moe). */
template <typename... Params, typename... Args>
static inline moe_status moe__fm_go(void (*k)(Params...), dim3 grid, int threads, size_t smem, cudaStream_t stream,
                                    bool pdl, Args... args) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = dim3((unsigned)threads);
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    cudaLaunchAttribute at[1];
    at[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    at[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = pdl ? at : nullptr;
    cfg.numAttrs = pdl ? 1 : 0;
    MOE_CUDA_TRY("moe_fused_moe", cudaLaunchKernelEx(&cfg, k, args...));
    return MOE_OK;
}


/* The routing's bookkeeping kernels of the tile paths (fused_moe.cu), shared by the bf16 and the
 * quantised paths (fused_quant.cu):
 *   moe__k_fm_align (1 block of MOE_FM_ALIGN_THREADS, 2 * lc ints of dynamic shared memory): local
 *     pairs per expert, the tile table (tiles of BM rows: expert, first row, rows; *ntiles), the
 *     expert-sorted pair order, routed ids outside [0, E) counted into *err; pos (or NULL): its
 *     inverse, pair -> sorted row (-1 for a pair with no local expert).  Launched with more than
 *     one block (nvfp4's x on k_qg_rs), blocks 1.. take the largest |bf16| bits of amx_x's amx_n8
 *     16-byte words meanwhile, one partial maximum a block into amx_part (so x's amax costs no
 *     launch and no zeroed slot);
 *   moe__k_fm_finalize (grid-stride over T x H / 8): out[t, :] = bf16(sum over the token's local k,
 *     in k order, of y[t * K + k, :]).
 * Both begin with griddepcontrol.wait (moe__fm_pdl_enter): a no-op unless launched as a programmatic
 * dependent. */
#define MOE_FM_ALIGN_THREADS 1024
__global__ void moe__k_fm_align(const int32_t *ids, int64_t P, int E, int lo, int lc, int BM, int32_t *sorted,
                                int32_t *tile_e, int32_t *tile_r0, int32_t *tile_n, int32_t *ntiles, int32_t *err,
                                int32_t *pos, const uint4 *amx_x, int64_t amx_n8, unsigned int *amx_part);
__global__ void moe__k_fm_finalize(const float *y, const int32_t *ids, int64_t T, int K, int H, int E, int lo, int lc,
                                   uint16_t *out);

/* The largest |bf16| bits of eight values (per-half unsigned maxima, then the two halves): x's
 * amax parts in moe__k_fm_align, mxint4's row factors and nvfp4's block scales (fused_qgmma.cu). */
__device__ __forceinline__ uint32_t moe__fm_absmax8(const uint4 &v) {
    const uint32_t m = __vmaxu2(__vmaxu2(v.x & 0x7FFF7FFFu, v.y & 0x7FFF7FFFu), __vmaxu2(v.z & 0x7FFF7FFFu, v.w & 0x7FFF7FFFu));
    return max(m & 0xFFFFu, m >> 16);
}

/* 16 bytes of weights: read once, not worth a line in L1. */
__device__ __forceinline__ uint4 moe__fg_ldw(const void *p) {
    uint4 v;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "l"(p));
    return v;
}

/* Expert id `id` is in range and local (expert parallelism: lo .. lo + lc - 1). */
__device__ __forceinline__ bool moe__fg_local(int id, int E, int lo, int lc) {
    return id >= 0 && id < E && id - lo >= 0 && id - lo < lc;
}

/* One warp: lane k < K reads the id of pair p0 + k (token p0 / K) into id (-1 on other
 * lanes); returns the mask of the lanes whose expert is local. */
__device__ __forceinline__ unsigned moe__fg_token_local(const moe__fg_shape &s, const int32_t *ids, int64_t p0,
                                                        int &id) {
    const int lane = threadIdx.x & 31;
    id = -1;
    bool loc = false;
    if (lane < s.K) {
        id = ids[p0 + lane];
        loc = moe__fg_local(id, s.E, s.lo, s.lc);
    }
    return __ballot_sync(0xffffffffu, loc);
}

/* One warp: routed ids of the P pairs outside [0, E), added to *err (when any). */
__device__ __forceinline__ void moe__fg_count_bad(const int32_t *ids, int64_t P, int E, int32_t *err) {
    const int lane = threadIdx.x & 31;
    int bad = 0;
    for (int64_t i = lane; i < P; i += 32) bad += ids[i] < 0 || ids[i] >= E;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) bad += __shfl_xor_sync(0xffffffffu, bad, o);
    if (lane == 0 && bad) atomicAdd(err, bad);
}

/* Pair p is the lowest-numbered pair routed to expert e (its "leader"); warp-uniform. */
__device__ __forceinline__ bool moe__fg_leader(const int32_t *ids, int64_t p, int e) {
    const int lane = threadIdx.x & 31;
    for (int64_t base = 0; base < p; base += 32)
        if (__ballot_sync(0xffffffffu, base + lane < p && ids[base + lane] == e)) return false;
    return true;
}

/* Pairs q >= from routed to expert e, ranks r0 .. r0 + NQ - 1 among them into q[0..NQ-1]
 * (-1 past the last); returns how many there are in all.  Warp-uniform. */
template <int NQ>
__device__ __forceinline__ int moe__fg_members(const int32_t *ids, int64_t P, int64_t from, int e, int r0,
                                               int (&q)[NQ]) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int j = 0; j < NQ; j++) q[j] = -1;
    int seen = 0;
    for (int64_t base = from; base < P; base += 32) {
        const int64_t i = base + lane;
        unsigned bal = __ballot_sync(0xffffffffu, i < P && ids[i] == e);
        while (bal) {
            const int b = __ffs(bal) - 1;
            bal &= bal - 1;
            const int r = seen++ - r0;
#pragma unroll
            for (int j = 0; j < NQ; j++)
                if (r == j) q[j] = (int)(base + b);
        }
    }
    return seen;
}

__device__ __forceinline__ uint32_t moe__fm_smem(const void *p) {
    return (uint32_t)__cvta_generic_to_shared(p);
}

/* 16-byte global -> shared copy; bytes 0 fills the destination with zeros. */
__device__ __forceinline__ void moe__fm_cp16(uint32_t dst, const void *src, int bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes));
}
__device__ __forceinline__ void moe__fm_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void moe__fm_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void moe__fm_ldsm4(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

/* d += a * b, m16n8k16, A row-major (K contiguous), B "col" (K contiguous per column). */
__device__ __forceinline__ void moe__fm_mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

/* Shared-memory tile rows are 64 bf16 (128 bytes = 8 chunks of 16 bytes); chunk c of row r
 * is stored at chunk c ^ (r & 7), so ldmatrix (8 rows, one chunk) hits 8 distinct bank
 * groups. */
__device__ __forceinline__ int moe__fm_swz(int r, int c) { return r * 64 + ((c ^ (r & 7)) << 3); }

/* Rows covered by the row tiles of a tile table (the last tile's first row + its rows). */
__device__ __forceinline__ int64_t moe__fm_tile_rows(const int32_t *tile_r0, const int32_t *tile_n,
                                                     const int32_t *ntiles) {
    const int nt = *ntiles;
    return nt > 0 ? (int64_t)tile_r0[nt - 1] + tile_n[nt - 1] : 0;
}

/* Programmatic dependent launch (sm_90): a kernel launched with programmatic stream
 * serialisation may start while its predecessor drains; griddepcontrol.wait (first thing in
 * every fused kernel) blocks until the predecessor has completed and its writes are visible,
 * and launch_dependents lets the next kernel's blocks get scheduled.  No-ops elsewhere. */
__device__ __forceinline__ void moe__fm_pdl_enter() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

/* ---- Hopper warpgroup MMA (sm_90a only; empty elsewhere: the host never launches the
 * wgmma kernel unless the sm_90a binary is the one loaded) ---- */

/* Shared-memory matrix descriptor of a K-major tile whose rows are 128 bytes, stored with
 * the 128-byte swizzle of moe__fm_swz (the canonical SWIZZLE_128B layout: 8-row atoms of
 * 1024 bytes, 1024-byte aligned): start address >> 4 (bits 0-13), leading byte offset 1
 * (unused for swizzled K-major), stride byte offset 1024 >> 4 (bits 32-45), layout type 1 =
 * 128-byte swizzle (bits 62-63).  A k16 step inside the 64-wide row adds 32 bytes (2 units). */
__device__ __forceinline__ uint64_t moe__fm_desc(uint32_t saddr) {
    uint64_t d = 0;
    d |= (uint64_t)((saddr & 0x3FFFFu) >> 4);
    d |= (uint64_t)1 << 16;
    d |= (uint64_t)(1024 >> 4) << 32;
    d |= (uint64_t)1 << 62;
    return d;
}

__device__ __forceinline__ void moe__fm_wg_fence() {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void moe__fm_wg_commit() {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void moe__fm_wg_wait0() {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void moe__fm_wg_wait1() {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory");
#endif
}
/* Make this thread's generic-proxy shared-memory writes (cp.async) visible to the async
 * proxy (wgmma operand reads); each writing thread runs it before the barrier. */
__device__ __forceinline__ void moe__fm_fence_async() {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

/* d[0..127] += A(64x16, smem desc) * B(16x256, smem desc); both K-major, 128-byte swizzle. */
__device__ __forceinline__ void moe__fm_wgmma_n256(float (&d)[128], uint64_t da, uint64_t db) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "setp.ne.b32 p, %130, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 "
        "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63,%64,%65,%66,%67,%68,%69,%70,%71,%72,%73,%74,%75,%76,%77,%78,%79,%80,%81,%82,%83,%84,%85,%86,%87,%88,%89,%90,%91,%92,%93,%94,%95,%96,%97,%98,%99,%100,%101,%102,%103,%104,%105,%106,%107,%108,%109,%110,%111,%112,%113,%114,%115,%116,%117,%118,%119,%120,%121,%122,%123,%124,%125,%126,%127}, %128, %129, p, 1, 1, 0, 0;\n"
        "}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
        : "l"(da), "l"(db), "r"(1));
#endif
}

/* ---- mbarriers, bulk tensor copies, register reallocation (sm_90a; empty elsewhere) ---- */

__device__ __forceinline__ void moe__fm_mbar_init(uint32_t bar, int count) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
#endif
}
/* Make the barrier initialisations visible (to the async proxy too) before first use. */
__device__ __forceinline__ void moe__fm_mbar_init_fence() {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}
/* Block until the phase of parity `parity` has completed. */
__device__ __forceinline__ void moe__fm_mbar_wait(uint32_t bar, int parity) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    uint32_t ok = 0;
    do {
        asm volatile(
            "{\n"
            ".reg .pred p;\n"
            "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
            "selp.u32 %0, 1, 0, p;\n"
            "}\n"
            : "=r"(ok)
            : "r"(bar), "r"(parity)
            : "memory");
    } while (!ok);
#endif
}
__device__ __forceinline__ void moe__fm_mbar_arrive(uint32_t bar) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
#endif
}
/* One arrival that also announces `bytes` of bulk-copy transactions for this phase. */
__device__ __forceinline__ void moe__fm_mbar_arrive_tx(uint32_t bar, uint32_t bytes) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
#endif
}
/* 2-D bulk tensor copy global -> shared (box of the tensor map at (c0 innermost, c1)),
 * completing on the mbarrier with its byte count. */
__device__ __forceinline__ void moe__fm_tma2d(uint32_t dst, const void *tmap, int c0, int c1, uint32_t bar) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(dst),
        "l"(tmap), "r"(c0), "r"(c1), "r"(bar)
        : "memory");
#endif
}
template <int N> __device__ __forceinline__ void moe__fm_setmaxnreg_dec() {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
#endif
}
template <int N> __device__ __forceinline__ void moe__fm_setmaxnreg_inc() {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
#endif
}

/* Cluster-scope variants (2-CTA clusters sharing the weight tile). */
__device__ __forceinline__ void moe__fm_mbar_wait_cl(uint32_t bar, int parity) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    uint32_t ok = 0;
    do {
        asm volatile(
            "{\n"
            ".reg .pred p;\n"
            "mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 p, [%1], %2;\n"
            "selp.u32 %0, 1, 0, p;\n"
            "}\n"
            : "=r"(ok)
            : "r"(bar), "r"(parity)
            : "memory");
    } while (!ok);
#endif
}
/* Arrive on the barrier at the same shared-memory offset in CTA `rank` of the cluster. */
__device__ __forceinline__ void moe__fm_mbar_arrive_remote(uint32_t bar, uint32_t rank) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile(
        "{\n"
        ".reg .b32 ra;\n"
        "mapa.shared::cluster.u32 ra, %0, %1;\n"
        "mbarrier.arrive.release.cluster.shared::cluster.b64 _, [ra];\n"
        "}\n" ::"r"(bar),
        "r"(rank)
        : "memory");
#endif
}
/* The bulk tensor copy, written to the same offset in every CTA of `mask` and completing on
 * the barrier at the same offset in each. */
__device__ __forceinline__ void moe__fm_tma2d_mc(uint32_t dst, const void *tmap, int c0, int c1, uint32_t bar,
                                                 uint16_t mask) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster [%0], [%1, {%2, "
        "%3}], [%4], %5;\n" ::"r"(dst),
        "l"(tmap), "r"(c0), "r"(c1), "r"(bar), "h"(mask)
        : "memory");
#endif
}
__device__ __forceinline__ void moe__fm_cluster_sync() {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory");
    asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory");
#endif
}


/* ---- pieces of fused_moe.cu's Hopper path reused by the quantised wgmma kernels
 * (fused_qgmma.cu) ---- */

/* xp[i, :] = rows[sorted[i] / K, :] for the rows of the row tiles (nc 16-byte chunks a row). */
__global__ void __launch_bounds__(256)
    moe__k_fm_permute(const uint4 *__restrict__ hidden, const int32_t *sorted, const int32_t *tile_r0,
                                  const int32_t *tile_n, const int32_t *ntiles, int K, int H8, uint4 *__restrict__ xp);
/* *ok = the sm_90a binary is loaded on a 9.x device and the driver's tensor-map encoder was
 * found (sets up fused_moe.cu's kernel attributes on first use). */
moe_status moe__fm_hopper_ready(bool *ok);
/* Tensor map of a row-major [rows, cols] matrix of elem_bytes-byte elements (1 or 2; `what`, for
 * the error), boxes of box_cols x box_rows, the swizzle of `swizzle` bytes (128: 128-byte box
 * rows; 32: 32-byte box rows) or none (0), zeros past the matrix. */
moe_status moe__fm_tmap2(CUtensorMap *m, const void *base, int64_t rows, int64_t cols, int elem_bytes, int box_cols,
                         int box_rows, int swizzle, const char *what);

#endif
