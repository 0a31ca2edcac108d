/* rng.cu -- Philox random fill of CUDA tensors, bit-identical with the CPU backend.
 * Compiled with --fmad=false (CMakeLists.txt): philox.h's double arithmetic must round
 * every + and * separately, as the CPU build (-ffp-contract=off) does.  Element i (row-major)
 * gets moe__rng_value(seed, i, kind, a, b) rounded to f32, then stored with the dtype rules
 * of cpu_store_double. */
#include "cuda_common.cuh"

#include "philox.h"

struct moe__rng_op {
    int dtype;
    int kind;
    uint64_t seed;
    double a, b;
    __device__ uint64_t operator()(int64_t i) const {
        double v = moe__rng_value(seed, (uint64_t)i, kind, a, b);
        return moe__cuda_encode_f64(dtype, (double)(float)v);
    }
};

moe_status moe__cuda_rand(moe_tensor *t, uint64_t seed, int kind, double a, double b) {
    static const char fn[] = "cuda rand";
    moe__cuda_guard g(fn, t->dev.index);
    MOE_TRY(g.status);
    moe__cuda_tdesc d;
    moe__cuda_tdesc_pair(t, NULL, &d, NULL);
    moe__rng_op op;
    op.dtype = t->dtype;
    op.kind = kind;
    op.seed = seed;
    op.a = a;
    op.b = b;
    return moe__cuda_map(fn, g, d, moe_tensor_numel(t), op);
}
