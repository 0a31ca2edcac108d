/* cuda_backend.cu -- the CUDA backend table: memory, raw copies, per-device streams, device
 * queries and CUDA-graph capture of the moelab stream.  Element-wise ops live in copy.cu
 * and rng.cu; routing in route.cu (linked through a weak reference, see below). */
#include "cuda_common.cuh"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MOE__CUDA_MAX_DEVICES 64

/* ------------------------------------------------------------------ errors -- */

moe_status moe__cuda_fail(const char *fn, const char *call, cudaError_t err) {
    (void)cudaGetLastError(); /* clear a non-sticky error so the next call starts clean */
    char name[64];
    size_t n = 0;
    while (call[n] && call[n] != '(' && n + 1 < sizeof name) {
        name[n] = call[n];
        n++;
    }
    name[n] = '\0';
    moe_status st = err == cudaErrorMemoryAllocation ? MOE_ERR_NOMEM : MOE_ERR_CUDA;
    return moe__err(st, "%s: %s: %s (%s)", fn, name, cudaGetErrorString(err),
                    cudaGetErrorName(err));
}

/* ----------------------------------------------------------------- devices -- */

static int moe__cuda_count_cache = -1;

int moe__cuda_count(void) {
    int n = __atomic_load_n(&moe__cuda_count_cache, __ATOMIC_ACQUIRE);
    if (n >= 0) return n;
    n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) { /* no driver, no GPU: not an error */
        (void)cudaGetLastError();
        n = 0;
    }
    if (n > MOE__CUDA_MAX_DEVICES) n = MOE__CUDA_MAX_DEVICES;
    __atomic_store_n(&moe__cuda_count_cache, n, __ATOMIC_RELEASE);
    return n;
}

static cudaStream_t moe__cuda_streams[MOE__CUDA_MAX_DEVICES];

cudaStream_t moe__cuda_stream(int dev) {
    if (dev < 0 || dev >= MOE__CUDA_MAX_DEVICES) return NULL;
    cudaStream_t s = __atomic_load_n(&moe__cuda_streams[dev], __ATOMIC_ACQUIRE);
    if (s) return s;
    cudaStream_t fresh = NULL;
    cudaError_t e = cudaStreamCreateWithFlags(&fresh, cudaStreamNonBlocking);
    if (e != cudaSuccess) {
        moe__cuda_fail("moelab stream", "cudaStreamCreateWithFlags", e);
        return NULL;
    }
    cudaStream_t expected = NULL;
    if (!__atomic_compare_exchange_n(&moe__cuda_streams[dev], &expected, fresh, false,
                                     __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
        (void)cudaStreamDestroy(fresh); /* another thread won */
        return expected;
    }
    return fresh;
}

static int moe__cuda_sms[MOE__CUDA_MAX_DEVICES];

int moe__cuda_sm_count(int dev) {
    if (dev < 0 || dev >= MOE__CUDA_MAX_DEVICES) return 1;
    int n = __atomic_load_n(&moe__cuda_sms[dev], __ATOMIC_RELAXED);
    if (n > 0) return n;
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n < 1) {
        (void)cudaGetLastError();
        return 1;
    }
    __atomic_store_n(&moe__cuda_sms[dev], n, __ATOMIC_RELAXED);
    return n;
}

moe__cuda_guard::moe__cuda_guard(const char *fn, int dev_index)
    : status(MOE_OK), dev(dev_index), prev(-1), stream(NULL) {
    int count = moe__cuda_count();
    if (count == 0) {
        status = moe__err(MOE_ERR_NO_CUDA, "%s: no CUDA device is available (no driver or GPU)", fn);
        return;
    }
    if (dev_index < 0 || dev_index >= count) {
        status = moe__err(MOE_ERR_DEVICE, "%s: device: expected cuda:0..cuda:%d, got cuda:%d", fn,
                          count - 1, dev_index);
        return;
    }
    int cur = -1;
    cudaError_t e = cudaGetDevice(&cur);
    if (e != cudaSuccess) {
        status = moe__cuda_fail(fn, "cudaGetDevice", e);
        return;
    }
    if (cur != dev_index) {
        e = cudaSetDevice(dev_index);
        if (e != cudaSuccess) {
            status = moe__cuda_fail(fn, "cudaSetDevice", e);
            return;
        }
        prev = cur;
    }
    stream = moe__cuda_stream(dev_index);
    if (!stream) status = MOE_ERR_CUDA; /* message set by moe__cuda_stream */
}

moe__cuda_guard::~moe__cuda_guard() {
    if (prev >= 0) (void)cudaSetDevice(prev);
}

/* ------------------------------------------------------------ tensor descs -- */

void moe__cuda_tdesc_pair(const moe_tensor *dst, const moe_tensor *src, moe__cuda_tdesc *d,
                          moe__cuda_tdesc *s) {
    d->data = dst->st->data;
    d->dtype = dst->dtype;
    d->offset = dst->offset;
    if (src) {
        s->data = src->st->data;
        s->dtype = src->dtype;
        s->offset = src->offset;
    }
    int nd = 0;
    for (int k = 0; k < dst->ndim; k++) {
        if (dst->shape[k] == 1) continue; /* size-1 dims never move the offset */
        if (nd > 0) {
            int64_t n = dst->shape[k];
            int mergeable = d->stride[nd - 1] == dst->stride[k] * n &&
                            (!src || s->stride[nd - 1] == src->stride[k] * n);
            if (mergeable) {
                d->shape[nd - 1] *= n;
                d->stride[nd - 1] = dst->stride[k];
                if (src) s->stride[nd - 1] = src->stride[k];
                continue;
            }
        }
        d->shape[nd] = dst->shape[k];
        d->stride[nd] = dst->stride[k];
        if (src) {
            s->shape[nd] = src->shape[k];
            s->stride[nd] = src->stride[k];
        }
        nd++;
    }
    if (nd == 0) { /* 0-d tensor or all dims of size 1 */
        d->shape[0] = 1;
        d->stride[0] = 1;
        if (src) {
            s->shape[0] = 1;
            s->stride[0] = 1;
        }
        nd = 1;
    }
    d->ndim = nd;
    if (src) {
        s->ndim = nd;
        for (int k = 0; k < nd; k++) s->shape[k] = d->shape[k];
    }
}

int moe__cuda_map_mode(const moe__cuda_tdesc *d, int64_t numel) {
    if (!moe__cuda_packed(d->dtype)) return MOE__MAP_PLAIN;
    int last = d->ndim - 1;
    int pairs = d->stride[last] == 1 && (d->shape[last] & 1) == 0 && (d->offset & 1) == 0;
    for (int k = 0; k < last && pairs; k++)
        if (d->stride[k] & 1) pairs = 0;
    return pairs ? MOE__MAP_PAIRS : MOE__MAP_NIBBLE_ATOMIC;
}

/* ------------------------------------------------------------ capture state -- */

/* A finished capture: the executable graph plus device buffers freed while it was being
 * captured, which the graph may still use; they are released with the graph. */
struct moe__cuda_graph {
    cudaGraphExec_t exec;
    int dev;
    int nkeep;
    struct moe__cuda_kept { int dev; void *ptr; } *keep;
};

static thread_local int moe__tl_capture_dev = -1;
static thread_local moe__cuda_graph::moe__cuda_kept *moe__tl_keep;
static thread_local int moe__tl_nkeep, moe__tl_capkeep;

int moe__cuda_thread_capturing(void) { return moe__tl_capture_dev >= 0; }

static void moe__cuda_free_now(int dev, void *ptr) {
    moe__cuda_guard g("cuda free", dev);
    if (g.status != MOE_OK) return;
    if (cudaFree(ptr) != cudaSuccess) (void)cudaGetLastError();
}

static void moe__cuda_release_kept(moe__cuda_graph::moe__cuda_kept *keep, int n) {
    for (int i = 0; i < n; i++) moe__cuda_free_now(keep[i].dev, keep[i].ptr);
    free(keep);
}

/* cudaFree would break a capture (it synchronises): keep the buffer until the graph goes. */
static int moe__cuda_defer_free(int dev, void *ptr) {
    if (moe__tl_nkeep == moe__tl_capkeep) {
        int cap = moe__tl_capkeep ? 2 * moe__tl_capkeep : 16;
        void *p = realloc(moe__tl_keep, (size_t)cap * sizeof *moe__tl_keep);
        if (!p) return 0;
        moe__tl_keep = (moe__cuda_graph::moe__cuda_kept *)p;
        moe__tl_capkeep = cap;
    }
    moe__tl_keep[moe__tl_nkeep].dev = dev;
    moe__tl_keep[moe__tl_nkeep].ptr = ptr;
    moe__tl_nkeep++;
    return 1;
}

static void moe__cuda_capture_reset(void) {
    moe__tl_capture_dev = -1;
    moe__tl_keep = NULL;
    moe__tl_nkeep = moe__tl_capkeep = 0;
}

/* ------------------------------------------------------------------ memory -- */

static moe_status moe__cuda_alloc(int dev, size_t bytes, void **out) {
    *out = NULL;
    if (moe__cuda_thread_capturing())
        return moe__err(MOE_ERR_STATE,
                        "moe_tensor_new: cannot allocate device memory during CUDA graph "
                        "capture; allocate outputs before capture (cuda:%d, %zu bytes)",
                        dev, bytes);
    moe__cuda_guard g("cuda alloc", dev);
    MOE_TRY(g.status);
    cudaError_t e = cudaMalloc(out, bytes ? bytes : 1);
    if (e == cudaErrorMemoryAllocation) {
        (void)cudaGetLastError();
        size_t fr = 0, total = 0;
        if (cudaMemGetInfo(&fr, &total) != cudaSuccess) (void)cudaGetLastError();
        *out = NULL;
        return moe__err(MOE_ERR_NOMEM,
                        "moe_tensor_new: out of device memory on cuda:%d allocating %zu bytes "
                        "(%zu of %zu bytes free)",
                        dev, bytes, fr, total);
    }
    if (e != cudaSuccess) {
        *out = NULL;
        return moe__cuda_fail("cuda alloc", "cudaMalloc", e);
    }
    return MOE_OK;
}

static void moe__cuda_free(int dev, void *ptr) {
    if (!ptr) return;
    if (moe__cuda_thread_capturing() && moe__cuda_defer_free(dev, ptr)) return;
    moe__cuda_free_now(dev, ptr);
}

static moe_status moe__cuda_refuse_in_capture(const char *what) {
    return moe__err(MOE_ERR_STATE,
                    "%s: not possible during CUDA graph capture (it needs the host to wait); "
                    "do it before moe_graph_begin or after moe_graph_end",
                    what);
}

static moe_status moe__cuda_copy(const char *fn, int dev, void *dst, const void *src,
                                 size_t bytes, cudaMemcpyKind kind) {
    if (bytes == 0) return MOE_OK;
    if (moe__cuda_thread_capturing()) return moe__cuda_refuse_in_capture(fn);
    moe__cuda_guard g(fn, dev);
    MOE_TRY(g.status);
    MOE_CUDA_TRY(fn, cudaMemcpyAsync(dst, src, bytes, kind, g.stream));
    MOE_CUDA_TRY(fn, cudaStreamSynchronize(g.stream));
    return MOE_OK;
}

static moe_status moe__cuda_copy_h2d(int dev, void *dst, const void *src, size_t bytes) {
    return moe__cuda_copy("cuda copy host->device", dev, dst, src, bytes, cudaMemcpyHostToDevice);
}

static moe_status moe__cuda_copy_d2h(int dev, void *dst, const void *src, size_t bytes) {
    return moe__cuda_copy("cuda copy device->host", dev, dst, src, bytes, cudaMemcpyDeviceToHost);
}

/* Device to device: an SM copy kernel on the moelab stream (graph-capturable); outside a
 * capture the host then waits, as for the other raw copies. */
static moe_status moe__cuda_copy_d2d(int dev, void *dst, const void *src, size_t bytes) {
    static const char fn[] = "cuda copy device->device";
    if (bytes == 0) return MOE_OK;
    moe__cuda_guard g(fn, dev);
    MOE_TRY(g.status);
    MOE_TRY(moe__cuda_copy_bytes(fn, g, dst, src, bytes));
    if (!moe__cuda_thread_capturing()) MOE_CUDA_TRY(fn, cudaStreamSynchronize(g.stream));
    return MOE_OK;
}

static moe_status moe__cuda_sync(int dev) {
    static const char fn[] = "moe_synchronize";
    if (moe__cuda_thread_capturing()) return moe__cuda_refuse_in_capture(fn);
    moe__cuda_guard g(fn, dev);
    MOE_TRY(g.status);
    MOE_CUDA_TRY(fn, cudaStreamSynchronize(g.stream));
    return MOE_OK;
}

/* ------------------------------------------------------------ device info -- */

extern "C" int moe__cuda_device_count(void) { return moe__cuda_count(); }

extern "C" moe_status moe__cuda_device_info(int index, char *buf, size_t buflen) {
    static const char fn[] = "moe_cuda_device_info";
    if (!buf || buflen == 0)
        return moe__err(MOE_ERR_ARG, "%s: buf: expected a buffer of at least 1 byte, got %s", fn,
                        buf ? "0 bytes" : "NULL");
    buf[0] = '\0';
    int count = moe__cuda_count();
    if (count == 0) return moe__err(MOE_ERR_NO_CUDA, "%s: no CUDA device is available", fn);
    if (index < 0 || index >= count)
        return moe__err(MOE_ERR_DEVICE, "%s: index: expected 0..%d, got %d", fn, count - 1, index);
    cudaDeviceProp p;
    MOE_CUDA_TRY(fn, cudaGetDeviceProperties(&p, index));
    snprintf(buf, buflen, "%s, sm_%d%d, %.1f GiB, %d SMs", p.name, p.major, p.minor,
             (double)p.totalGlobalMem / (1024.0 * 1024.0 * 1024.0), p.multiProcessorCount);
    return MOE_OK;
}

/* ------------------------------------------------------------------ graphs -- */

extern "C" moe_status moe__cuda_graph_begin(int dev) {
    static const char fn[] = "moe_graph_begin";
    if (moe__cuda_thread_capturing())
        return moe__err(MOE_ERR_STATE,
                        "%s: a capture is already in progress on this thread (cuda:%d); end or "
                        "abort it first",
                        fn, moe__tl_capture_dev);
    moe__cuda_guard g(fn, dev);
    MOE_TRY(g.status);
    (void)moe__cuda_sm_count(dev); /* cache the launch-size query outside the capture */
    MOE_CUDA_TRY(fn, cudaStreamBeginCapture(g.stream, cudaStreamCaptureModeThreadLocal));
    moe__tl_capture_dev = dev;
    moe__tl_keep = NULL;
    moe__tl_nkeep = moe__tl_capkeep = 0;
    return MOE_OK;
}

extern "C" moe_status moe__cuda_graph_end(void **graph_exec) {
    static const char fn[] = "moe_graph_end";
    if (!graph_exec) return moe__err(MOE_ERR_ARG, "%s: out: expected a pointer, got NULL", fn);
    *graph_exec = NULL;
    if (!moe__cuda_thread_capturing())
        return moe__err(MOE_ERR_STATE, "%s: no capture in progress on this thread (call "
                                       "moe_graph_begin first)", fn);
    int dev = moe__tl_capture_dev;
    moe__cuda_graph::moe__cuda_kept *keep = moe__tl_keep;
    int nkeep = moe__tl_nkeep;
    moe__cuda_capture_reset();

    moe__cuda_guard g(fn, dev);
    if (g.status != MOE_OK) {
        moe__cuda_release_kept(keep, nkeep);
        return g.status;
    }
    cudaGraph_t graph = NULL;
    cudaError_t e = cudaStreamEndCapture(g.stream, &graph);
    if (e != cudaSuccess) {
        if (graph) (void)cudaGraphDestroy(graph);
        moe__cuda_release_kept(keep, nkeep);
        (void)cudaGetLastError();
        return moe__err(MOE_ERR_CUDA,
                        "%s: cudaStreamEndCapture: %s (%s); an operation inside the capture "
                        "was not capturable or failed",
                        fn, cudaGetErrorString(e), cudaGetErrorName(e));
    }
    cudaGraphExec_t exec = NULL;
    e = cudaGraphInstantiate(&exec, graph, 0);
    (void)cudaGraphDestroy(graph);
    if (e != cudaSuccess) {
        moe__cuda_release_kept(keep, nkeep);
        return moe__cuda_fail(fn, "cudaGraphInstantiate", e);
    }
    e = cudaGraphUpload(exec, g.stream); /* first replay without the upload cost */
    moe__cuda_graph *gr = (moe__cuda_graph *)malloc(sizeof *gr);
    if (e != cudaSuccess || !gr) {
        free(gr);
        (void)cudaGraphExecDestroy(exec);
        moe__cuda_release_kept(keep, nkeep);
        if (e != cudaSuccess) return moe__cuda_fail(fn, "cudaGraphUpload", e);
        return moe__err(MOE_ERR_NOMEM, "%s: out of host memory", fn);
    }
    gr->exec = exec;
    gr->dev = dev;
    gr->keep = keep;
    gr->nkeep = nkeep;
    *graph_exec = gr;
    return MOE_OK;
}

extern "C" void moe__cuda_graph_abort(void) {
    if (!moe__cuda_thread_capturing()) return;
    int dev = moe__tl_capture_dev;
    moe__cuda_graph::moe__cuda_kept *keep = moe__tl_keep;
    int nkeep = moe__tl_nkeep;
    moe__cuda_capture_reset();
    {
        moe__cuda_guard g("moe_graph_abort", dev);
        if (g.status == MOE_OK) {
            cudaGraph_t graph = NULL;
            if (cudaStreamEndCapture(g.stream, &graph) != cudaSuccess) (void)cudaGetLastError();
            if (graph) (void)cudaGraphDestroy(graph);
        }
    }
    moe__cuda_release_kept(keep, nkeep);
}

extern "C" int moe__cuda_graph_capturing(void) { return moe__cuda_thread_capturing(); }

extern "C" moe_status moe__cuda_graph_replay(void *graph_exec) {
    static const char fn[] = "moe_graph_replay";
    moe__cuda_graph *gr = (moe__cuda_graph *)graph_exec;
    if (!gr) return moe__err(MOE_ERR_ARG, "%s: g: expected a graph, got NULL", fn);
    moe__cuda_guard g(fn, gr->dev);
    MOE_TRY(g.status);
    MOE_CUDA_TRY(fn, cudaGraphLaunch(gr->exec, g.stream));
    return MOE_OK;
}

extern "C" void moe__cuda_graph_free(void *graph_exec) {
    moe__cuda_graph *gr = (moe__cuda_graph *)graph_exec;
    if (!gr) return;
    {
        moe__cuda_guard g("moe_graph_free", gr->dev);
        if (g.status == MOE_OK && cudaGraphExecDestroy(gr->exec) != cudaSuccess)
            (void)cudaGetLastError();
    }
    for (int i = 0; i < gr->nkeep; i++) moe__cuda_free(gr->keep[i].dev, gr->keep[i].ptr);
    free(gr->keep);
    free(gr);
}

extern "C" moe_status moe__cuda_graph_time(void *graph_exec, int warmup, int n, float *times_us) {
    static const char fn[] = "moe_graph_time";
    moe__cuda_graph *gr = (moe__cuda_graph *)graph_exec;
    if (!gr) return moe__err(MOE_ERR_ARG, "%s: g: expected a graph, got NULL", fn);
    if (n < 1 || warmup < 0)
        return moe__err(MOE_ERR_ARG, "%s: n, warmup: expected n >= 1 and warmup >= 0, got %d, %d",
                        fn, n, warmup);
    if (!times_us) return moe__err(MOE_ERR_ARG, "%s: times_us: expected a pointer, got NULL", fn);
    if (moe__cuda_thread_capturing()) return moe__cuda_refuse_in_capture(fn);
    moe__cuda_guard g(fn, gr->dev);
    MOE_TRY(g.status);
    for (int i = 0; i < warmup; i++) MOE_CUDA_TRY(fn, cudaGraphLaunch(gr->exec, g.stream));

    cudaEvent_t *ev = (cudaEvent_t *)calloc((size_t)n + 1, sizeof *ev);
    if (!ev) return moe__err(MOE_ERR_NOMEM, "%s: out of host memory for %d events", fn, n + 1);
    moe_status st = MOE_OK;
    int made = 0;
    cudaError_t e = cudaSuccess;
    const char *what = "cudaEventCreate";
    for (; made <= n; made++)
        if ((e = cudaEventCreate(&ev[made])) != cudaSuccess) break;
    if (e == cudaSuccess) {
        what = "cudaGraphLaunch";
        e = cudaEventRecord(ev[0], g.stream);
        for (int i = 0; i < n && e == cudaSuccess; i++) {
            e = cudaGraphLaunch(gr->exec, g.stream);
            if (e == cudaSuccess) e = cudaEventRecord(ev[i + 1], g.stream);
        }
    }
    if (e == cudaSuccess) {
        what = "cudaEventSynchronize";
        e = cudaEventSynchronize(ev[n]);
    }
    for (int i = 0; i < n && e == cudaSuccess; i++) {
        float ms = 0.0f;
        what = "cudaEventElapsedTime";
        e = cudaEventElapsedTime(&ms, ev[i], ev[i + 1]);
        times_us[i] = ms * 1000.0f;
    }
    if (e != cudaSuccess) st = moe__cuda_fail(fn, what, e);
    for (int i = 0; i < made; i++) (void)cudaEventDestroy(ev[i]);
    free(ev);
    return st;
}

/* ----------------------------------------------------------------- table -- */

/* Routing kernels (route.cu) define this; until they exist the slot stays NULL and the
 * core reports MOE_ERR_UNSUPPORTED. */
extern "C" moe_status moe__cuda_route(const moe_route_cfg *cfg, const moe_tensor *logits,
                                      const moe_tensor *bias, moe_tensor *ids,
                                      moe_tensor *weights, moe_tensor *replay)
    __attribute__((weak));

/* Fused MoE kernels (fused_moe.cu). */
extern "C" moe_status moe__cuda_fused_pack(struct moe_experts *ex, const moe_tensor *w13,
                                           const moe_tensor *w2, const moe_tensor *b13,
                                           const moe_tensor *b2) __attribute__((weak));
extern "C" moe_status moe__cuda_fused(const struct moe__fused_args *args) __attribute__((weak));

/* Filled field by field so that slots added to moe_backend later start out NULL (optional). */
static moe_backend moe__cuda_make_table(void) {
    moe_backend t;
    memset(&t, 0, sizeof t);
    t.name = "cuda";
    t.alloc = moe__cuda_alloc;
    t.free = moe__cuda_free;
    t.copy_h2d = moe__cuda_copy_h2d;
    t.copy_d2h = moe__cuda_copy_d2h;
    t.copy_d2d = moe__cuda_copy_d2d;
    t.synchronize = moe__cuda_sync;
    t.copy_cast = moe__cuda_copy_cast;
    t.fill = moe__cuda_fill;
    t.rand = moe__cuda_rand;
    t.arange = moe__cuda_arange;
    t.route = moe__cuda_route;
    t.fused_pack = moe__cuda_fused_pack; /* fused_moe.cu */
    t.fused = moe__cuda_fused;
    return t;
}

extern "C" const moe_backend *moe__cuda_backend(void) {
    static const moe_backend table = moe__cuda_make_table();
    return &table;
}
