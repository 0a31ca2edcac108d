/* async_copy.cu -- pinned host memory and device-to-host copies on a side stream, ordered after
 * the work queued so far on the moelab stream (engine/src/async_copy.c validates). */
#include "cuda_common.cuh"

#define MOE__SIDE_MAX 16
static cudaStream_t moe__side_streams[MOE__SIDE_MAX];

static cudaStream_t moe__side_stream(int dev) {
    if (dev < 0 || dev >= MOE__SIDE_MAX) return NULL;
    cudaStream_t s = __atomic_load_n(&moe__side_streams[dev], __ATOMIC_ACQUIRE);
    if (s) return s;
    cudaStream_t fresh = NULL;
    if (cudaStreamCreateWithFlags(&fresh, cudaStreamNonBlocking) != cudaSuccess) return NULL;
    cudaStream_t expected = NULL;
    if (!__atomic_compare_exchange_n(&moe__side_streams[dev], &expected, fresh, false, __ATOMIC_ACQ_REL,
                                     __ATOMIC_ACQUIRE)) {
        (void)cudaStreamDestroy(fresh);
        return expected;
    }
    return fresh;
}

extern "C" moe_status moe__cuda_host_alloc(size_t bytes, void **out) {
    MOE_CUDA_TRY("moe_tensor_new_pinned", cudaMallocHost(out, bytes));
    return MOE_OK;
}

extern "C" void moe__cuda_host_free(void *p) { (void)cudaFreeHost(p); }

extern "C" moe_status moe__cuda_d2h_async(int dev, void *dst, const void *src, size_t bytes, void **event) {
    static const char fn[] = "moe_tensor_copy_to_host_async";
    *event = NULL;
    if (moe__cuda_thread_capturing())
        return moe__err(MOE_ERR_STATE, "%s: not possible during CUDA graph capture", fn);
    moe__cuda_guard g(fn, dev);
    MOE_TRY(g.status);
    cudaStream_t side = moe__side_stream(dev);
    if (!side) return moe__err(MOE_ERR_CUDA, "%s: cannot create the side stream of cuda:%d", fn, dev);
    cudaEvent_t queued = NULL, done = NULL;
    MOE_CUDA_TRY(fn, cudaEventCreateWithFlags(&queued, cudaEventDisableTiming));
    cudaError_t e = cudaEventCreateWithFlags(&done, cudaEventDisableTiming);
    if (e != cudaSuccess) {
        cudaEventDestroy(queued);
        return moe__cuda_fail(fn, "cudaEventCreateWithFlags", e);
    }
    /* the copy waits for everything queued on the moelab stream so far, then runs beside it */
    e = cudaEventRecord(queued, g.stream);
    if (e == cudaSuccess) e = cudaStreamWaitEvent(side, queued, 0);
    if (e == cudaSuccess) e = cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, side);
    if (e == cudaSuccess) e = cudaEventRecord(done, side);
    cudaEventDestroy(queued); /* destruction is deferred by CUDA until the event completes */
    if (e != cudaSuccess) {
        cudaEventDestroy(done);
        return moe__cuda_fail(fn, "cudaMemcpyAsync", e);
    }
    *event = (void *)done;
    return MOE_OK;
}

extern "C" moe_status moe__cuda_event_wait(void *event) {
    MOE_CUDA_TRY("moe_event_wait", cudaEventSynchronize((cudaEvent_t)event));
    return MOE_OK;
}

extern "C" int moe__cuda_event_query(void *event) {
    cudaError_t e = cudaEventQuery((cudaEvent_t)event);
    if (e == cudaSuccess) return 1;
    if (e == cudaErrorNotReady) return 0;
    return (int)moe__cuda_fail("moe_event_done", "cudaEventQuery", e);
}

extern "C" void moe__cuda_event_free(void *event) { (void)cudaEventDestroy((cudaEvent_t)event); }
