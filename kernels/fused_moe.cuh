/* fused_moe.cuh -- the fused MoE kernels' building blocks (sm_80+ PTX: cp.async, ldmatrix,
 * mma.sync m16n8k16 bf16 with f32 accumulation).  Used by fused_moe.cu only. */
#ifndef MOE_FUSED_MOE_CUH
#define MOE_FUSED_MOE_CUH

#include <stdint.h>

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

#endif
