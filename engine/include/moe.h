/*
 * moe.h -- the public C API of moelab, a Mixture-of-Experts routing lab.
 *
 * moelab is a small C engine (CPU reference backend + CUDA backend) scripted from
 * LuaJIT through the FFI.  This header is the whole public API and doubles as its
 * tutorial.  It is FFI-clean: the build runs `cc -E -P -DMOE_CDEF moe.h` and feeds the
 * result to ffi.cdef, so nothing is ever retyped in Lua.
 *
 * A first program:
 *
 *     moe_tensor *logits = NULL, *ids = NULL, *w = NULL;
 *     int64_t shape[2] = {4, 16};
 *     moe_device cpu = {MOE_DEVICE_CPU, 0};
 *     if (moe_tensor_new(&logits, MOE_F32, 2, shape, cpu) != MOE_OK) {
 *         fprintf(stderr, "%s\n", moe_last_error());      // says what went wrong
 *         return 1;
 *     }
 *     moe_tensor_rand_normal(logits, 42, 0.0, 1.0);        // Philox, same on CPU/CUDA
 *     moe_route_cfg cfg = moe_route_cfg_default();
 *     cfg.method = MOE_ROUTE_RENORMALIZE; cfg.top_k = 2;
 *     moe_route(&cfg, logits, NULL, &ids, &w, NULL);       // ids i32 [4,2], w f32 [4,2]
 *     moe_tensor_free(ids); moe_tensor_free(w); moe_tensor_free(logits);
 *
 * Conventions
 *   - Every fallible call returns moe_status: MOE_OK (0) or a negative code.  The
 *     thread's last error message (moe_last_error) then names the argument, what was
 *     expected and what was seen.  The library never aborts, exits or longjmps.
 *   - Handles (moe_tensor, moe_graph, ...) are opaque.  Functions that return a new
 *     handle through `**out` transfer ownership to the caller, who frees it with the
 *     matching *_free.  *_free(NULL) is a no-op.
 *   - Views share storage with their base (reference counted); freeing the base while
 *     views are alive is fine: the storage goes when its last user goes.
 *   - Shapes and strides are counted in elements.  Packed 4-bit dtypes (e2m1, i4) hold
 *     two elements per byte, element 2j in the low nibble of byte j.
 */
#ifndef MOE_H
#define MOE_H

#ifndef MOE_CDEF
#include <stddef.h>
#include <stdint.h>
#include <stdbool.h>
#ifdef __cplusplus
extern "C" {
#endif
#if defined(__GNUC__)
/* the library is built with -fvisibility=hidden: everything declared here is exported */
#pragma GCC visibility push(default)
#endif
#endif

/* ------------------------------------------------------------------ status -- */

/* X(name, value, text): the one table of status codes. */
#define MOE_STATUS_LIST(X)                                                   \
    X(MOE_OK, 0, "ok")                                                       \
    X(MOE_ERR_ARG, -1, "invalid argument")                                   \
    X(MOE_ERR_DTYPE, -2, "unsupported or mismatched dtype")                  \
    X(MOE_ERR_SHAPE, -3, "shape mismatch")                                   \
    X(MOE_ERR_DEVICE, -4, "wrong or mismatched device")                      \
    X(MOE_ERR_NOMEM, -5, "out of memory")                                    \
    X(MOE_ERR_NO_CUDA, -6, "CUDA not available")                             \
    X(MOE_ERR_CUDA, -7, "CUDA error")                                        \
    X(MOE_ERR_IO, -8, "I/O error")                                           \
    X(MOE_ERR_FORMAT, -9, "malformed file")                                  \
    X(MOE_ERR_UNSUPPORTED, -10, "unsupported configuration")                 \
    X(MOE_ERR_STATE, -11, "invalid state")                                   \
    X(MOE_ERR_RANGE, -12, "value out of range")

#define MOE__STATUS_ENUM(name, value, text) name = value,
typedef enum moe_status { MOE_STATUS_LIST(MOE__STATUS_ENUM) MOE__STATUS_END = -1000 } moe_status;
#undef MOE__STATUS_ENUM

/* Short English text of a status code ("invalid argument"); never NULL. */
const char *moe_status_str(int status);
/* Symbolic name of a status code ("MOE_ERR_ARG"); never NULL. */
const char *moe_status_name(int status);
/* The calling thread's message for its last failed call, e.g.
 * "moe_tensor_new: ndim: expected 0..8, got 9".  Empty string when none.  The pointer is
 * valid until the thread's next moelab call. */
const char *moe_last_error(void);
/* Forget the calling thread's last error message. */
void moe_clear_error(void);
/* Library version "MAJOR.MINOR.PATCH". */
const char *moe_version(void);
/* Build description: compiler, CUDA yes/no, CUDA architectures. */
const char *moe_build_info(void);

/* ------------------------------------------------------------------ dtypes -- */

/* X(name, id, text, bits, is_float): every element type. */
#define MOE_DTYPE_LIST(X)                         \
    X(MOE_F32, 0, "f32", 32, 1)                   \
    X(MOE_F16, 1, "f16", 16, 1)                   \
    X(MOE_BF16, 2, "bf16", 16, 1)                 \
    X(MOE_F8E4M3, 3, "f8_e4m3", 8, 1)             \
    X(MOE_F8E5M2, 4, "f8_e5m2", 8, 1)             \
    X(MOE_E2M1, 5, "e2m1", 4, 1)                  \
    X(MOE_I4, 6, "i4", 4, 0)                      \
    X(MOE_UE8M0, 7, "ue8m0", 8, 1)                \
    X(MOE_U8, 8, "u8", 8, 0)                      \
    X(MOE_I8, 9, "i8", 8, 0)                      \
    X(MOE_I16, 10, "i16", 16, 0)                  \
    X(MOE_I32, 11, "i32", 32, 0)                  \
    X(MOE_I64, 12, "i64", 64, 0)                  \
    X(MOE_BOOL, 13, "bool", 8, 0)

#define MOE__DTYPE_ENUM(name, id, text, bits, isf) name = id,
typedef enum moe_dtype { MOE_DTYPE_LIST(MOE__DTYPE_ENUM) MOE_DTYPE_COUNT } moe_dtype;
#undef MOE__DTYPE_ENUM

/* "f32", "bf16", ...; "?" for an unknown id. */
const char *moe_dtype_name(int dtype);
/* Parse a dtype name (also accepts "float32", "bfloat16", "float16", "int32", ...).
 * Returns the id, or -1 (with the last error set) for an unknown name. */
int moe_dtype_from_name(const char *name);
/* Bits per element: 4, 8, 16, 32 or 64; 0 for an unknown id. */
int moe_dtype_bits(int dtype);
/* 1 for floating types (f32 .. e2m1, ue8m0), 0 for integers and bool. */
int moe_dtype_is_float(int dtype);

/* Scalar conversions with the engine's exact rules (round-to-nearest-even; e4m3 saturates
 * to +-448 and maps +-inf to +-448; e5m2 saturates finite overflow to +-57344 and keeps
 * +-inf; e2m1 saturates to +-6 and maps NaN to +0; ue8m0 rounds to the nearest power of two,
 * ties to the even exponent code, 0 and below map to code 0, NaN to 0xFF).  `code` is the
 * raw bit pattern (a nibble for e2m1/i4).  moe_encode returns MOE_ERR_DTYPE for non-float
 * dtypes other than i4. */
moe_status moe_encode(int dtype, double value, uint32_t *code);
moe_status moe_decode(int dtype, uint32_t code, double *value);

/* ----------------------------------------------------------------- devices -- */

typedef enum moe_device_type {
    MOE_DEVICE_CPU = 0,  /* host memory */
    MOE_DEVICE_CUDA = 1  /* CUDA device memory; index selects the GPU */
} moe_device_type;

typedef struct moe_device {
    int32_t type;  /* moe_device_type */
    int32_t index; /* CUDA ordinal; 0 for the CPU */
} moe_device;

/* 1 when the library was built with CUDA support. */
int moe_cuda_built(void);
/* Number of usable CUDA devices (0 without CUDA support, driver or GPU). Never fails. */
int moe_cuda_device_count(void);
/* Name and compute capability of a CUDA device, written into buf (NUL-terminated). */
moe_status moe_cuda_device_info(int index, char *buf, size_t buflen);
/* Wait until all moelab work queued on the device is done (CPU: no-op). */
moe_status moe_synchronize(moe_device dev);

/* ----------------------------------------------------------------- tensors -- */

#define MOE_MAX_DIMS 8

typedef struct moe_tensor moe_tensor; /* opaque */

/* New tensor with uninitialised contents (CUDA memory is allocated on the moelab stream's
 * device; host memory is 64-byte aligned).  ndim 0..8; every dim >= 0; packed 4-bit dtypes
 * need an even last dimension.  Caller owns *out. */
moe_status moe_tensor_new(moe_tensor **out, int dtype, int ndim, const int64_t *shape,
                          moe_device dev);
/* Release a tensor handle (its storage goes when no view uses it). NULL is a no-op. */
void moe_tensor_free(moe_tensor *t);

int moe_tensor_dtype(const moe_tensor *t);
int moe_tensor_ndim(const moe_tensor *t);
/* Size of dimension `dim` (negative counts from the end); -1 when out of range. */
int64_t moe_tensor_dim(const moe_tensor *t, int dim);
/* Stride of dimension `dim` in elements; 0 when out of range. */
int64_t moe_tensor_stride(const moe_tensor *t, int dim);
int64_t moe_tensor_numel(const moe_tensor *t);
/* Offset of element [0,...,0] from the start of the storage, in elements. */
int64_t moe_tensor_offset(const moe_tensor *t);
/* Bytes the elements of a contiguous tensor of this shape and dtype occupy. */
size_t moe_tensor_nbytes(const moe_tensor *t);
moe_device moe_tensor_device(const moe_tensor *t);
/* 1 when row-major contiguous (and, for packed dtypes, starting on a byte boundary). */
int moe_tensor_is_contiguous(const moe_tensor *t);
/* Address of element [0,...,0] (device pointer for CUDA tensors; byte containing it for
 * packed dtypes).  Borrowed: valid while t or a view of its storage lives. */
void *moe_tensor_data(const moe_tensor *t);

/* Copy between any two tensors of equal shape and dtype, on any devices, with any strides.
 * dst is written in place (it may be a view). */
moe_status moe_tensor_copy(moe_tensor *dst, const moe_tensor *src);
/* Copy nbytes of raw host memory into / out of a contiguous tensor; nbytes must equal
 * moe_tensor_nbytes(t). */
moe_status moe_tensor_copy_from_host(moe_tensor *t, const void *src, size_t nbytes);
moe_status moe_tensor_copy_to_host(const moe_tensor *t, void *dst, size_t nbytes);
/* New contiguous tensor on `dev` with src's values (dtype kept).  Caller owns *out. */
moe_status moe_tensor_to_device(moe_tensor **out, const moe_tensor *src, moe_device dev);
/* New contiguous copy of src (same device and dtype).  Caller owns *out. */
moe_status moe_tensor_contiguous(moe_tensor **out, const moe_tensor *src);
/* New tensor (same device) with src's values converted to dtype.  Caller owns *out. */
moe_status moe_tensor_cast(moe_tensor **out, const moe_tensor *src, int dtype);
/* Convert src's values into dst (equal shapes, same device, any dtypes and strides). */
moe_status moe_tensor_cast_into(moe_tensor *dst, const moe_tensor *src);
/* Set every element to value, converted with the cast rules. */
moe_status moe_tensor_fill(moe_tensor *t, double value);

/* Host-side element access for bindings and tests: all numel elements in row-major order,
 * converted to / from double with the cast rules (integers: truncation toward zero,
 * saturating; NaN -> 0).  Works on any device (CUDA tensors are staged through the host). */
moe_status moe_tensor_read_f64(const moe_tensor *t, double *out, int64_t n);
moe_status moe_tensor_write_f64(moe_tensor *t, const double *src, int64_t n);

/* Views: new handles sharing t's storage.  Caller owns *out. */
/* Elements start .. start+length-1 of dimension dim. */
moe_status moe_tensor_narrow(moe_tensor **out, const moe_tensor *t, int dim, int64_t start,
                             int64_t length);
/* Index `index` of dimension dim, removing that dimension. */
moe_status moe_tensor_select(moe_tensor **out, const moe_tensor *t, int dim, int64_t index);
/* Swap dimensions d0 and d1. */
moe_status moe_tensor_transpose(moe_tensor **out, const moe_tensor *t, int d0, int d1);
/* New shape with the same numel; t must be contiguous.  One entry may be -1 (inferred). */
moe_status moe_tensor_reshape(moe_tensor **out, const moe_tensor *t, int ndim,
                              const int64_t *shape);

/* --------------------------------------------------------------------- RNG -- */

/* Counter-based Philox4x32-10.  Element i of a tensor (row-major) uses counter i/4, lane i%4,
 * key = seed; the value is computed in double with the engine's own log/sin/cos and rounded
 * to the tensor's dtype, so CPU and CUDA give identical values for the same seed, shape and
 * dtype.  Integer dtypes get the value truncated. */
/* Uniform on [lo, hi). */
moe_status moe_tensor_rand_uniform(moe_tensor *t, uint64_t seed, double lo, double hi);
/* Normal(mean, std) by Box-Muller. */
moe_status moe_tensor_rand_normal(moe_tensor *t, uint64_t seed, double mean, double std);
/* Fill with start, start+step, ... (row-major). */
moe_status moe_tensor_arange(moe_tensor *t, double start, double step);

/* ------------------------------------------------------------------ memory -- */

typedef struct moe_mem_info {
    int64_t live_tensors;     /* tensor handles alive */
    int64_t live_storages;    /* distinct storages alive */
    int64_t host_bytes;       /* bytes of host storage alive (mmapped files included) */
    int64_t device_bytes;     /* bytes of CUDA storage alive, all devices */
    int64_t peak_device_bytes;/* high-water mark of device_bytes */
    int64_t peak_host_bytes;  /* high-water mark of host_bytes */
} moe_mem_info;

/* Snapshot of the memory accounting (process-wide, thread-safe counters). */
moe_status moe_mem_stats(moe_mem_info *out);

/* ---------------------------------------------------------------- file I/O -- */

/* .npy (format 1.0-3.0, C order, little-endian): f32, f16, i8, i16, i32, i64, u8, bool.
 * bf16 is written as '<u2' marked by the header comment "# moe_dtype: bf16" (numpy loads it as
 * uint16) and read back as bf16;
 * other dtypes are refused by the writer with MOE_ERR_DTYPE.  Reader: caller owns *out
 * (a host tensor). */
moe_status moe_npy_read(const char *path, moe_tensor **out);
moe_status moe_npy_write(const char *path, const moe_tensor *t);
/* Parse .npy bytes already in memory (used by the fuzzer and by the trace importer). */
moe_status moe_npy_parse(const void *data, size_t size, moe_tensor **out);

/* safetensors: 8-byte little-endian header length, JSON header, raw data.  Every dtype name
 * of the format is parsed and validated.  Names with a moelab dtype map to it (BOOL, U8, I8,
 * I16, I32, I64, F16, BF16, F32, F8_E4M3, F8_E5M2, F8_E8M0 -> ue8m0, F4 -> e2m1); the others
 * are widened on moe_st_get into a fresh tensor (U16 -> i32, U32 -> i64, F64 -> f32 with
 * round-to-nearest-even) or refused with MOE_ERR_DTYPE (U64 values over INT64_MAX, F6_*).
 * i4 tensors are written as U8 bytes (two nibbles each, last dimension halved) with the
 * metadata key "moe_dtype.<name>" = "i4", which the reader honours.  docs/io.md has
 * the table. */
typedef struct moe_st_file moe_st_file; /* an opened, mmapped safetensors file */

/* Open and validate a file: every entry's dtype, shape, byte count and offsets are checked
 * before anything is returned.  Caller owns *out. */
moe_status moe_st_open(const char *path, moe_st_file **out);
/* Same from bytes in memory (copied). */
moe_status moe_st_open_memory(const void *data, size_t size, moe_st_file **out);
void moe_st_close(moe_st_file *f);
int moe_st_count(const moe_st_file *f);
/* Name of entry i (0 <= i < count), in file order; NULL when out of range. */
const char *moe_st_name(const moe_st_file *f, int i);
/* Index of the entry named `name`, or -1. */
int moe_st_find(const moe_st_file *f, const char *name);
/* Host tensor viewing (zero-copy, read-only by contract) entry i; it keeps the mapping
 * alive after moe_st_close.  Caller owns *out. */
moe_status moe_st_get(const moe_st_file *f, int i, moe_tensor **out);
/* Number of __metadata__ pairs and their keys/values (NULL when out of range). */
int moe_st_meta_count(const moe_st_file *f);
const char *moe_st_meta_key(const moe_st_file *f, int i);
const char *moe_st_meta_value(const moe_st_file *f, int i);
/* Write n tensors (any device; copied through the host) with names and optional
 * string metadata (meta_keys/meta_values of length n_meta; may be NULL when n_meta = 0).
 * Written to path.tmp then renamed, so a crash never leaves a half file under path. */
moe_status moe_st_write(const char *path, int n, const char *const *names,
                        const moe_tensor *const *tensors, int n_meta,
                        const char *const *meta_keys, const char *const *meta_values);

/* ------------------------------------------------- asynchronous host copies -- */

typedef struct moe_event moe_event; /* opaque: completion of an asynchronous copy */

/* New host tensor in page-locked (pinned) memory, so device-to-host copies into it can run
 * asynchronously; plain host memory when moelab has no CUDA device.  Caller owns *out. */
moe_status moe_tensor_new_pinned(moe_tensor **out, int dtype, int ndim, const int64_t *shape);
/* Queue a copy of contiguous src (any device) into contiguous host tensor dst (same dtype and
 * numel) without waiting: for CUDA src it runs on a side stream after all work queued so far on
 * the moelab stream, so later work on the moelab stream overlaps it.  *ev completes when dst
 * holds the data; dst and src must stay alive until then.  CPU src: copied at once.  Refused
 * during graph capture.  Caller owns *ev (moe_event_free). */
moe_status moe_tensor_copy_to_host_async(moe_tensor *dst, const moe_tensor *src, moe_event **ev);
/* Block until the event's copy is done. */
moe_status moe_event_wait(moe_event *ev);
/* 1 when done (or ev is NULL), 0 while running, negative status on error. */
int moe_event_done(moe_event *ev);
/* Waits for the copy, then frees the event.  NULL is a no-op. */
void moe_event_free(moe_event *ev);

/* ----------------------------------------------------------- CUDA graphs -- */

typedef struct moe_graph moe_graph; /* opaque */

/* Start capturing the moelab CUDA stream of device `dev`.  Every moelab call on CUDA
 * tensors until moe_graph_end is recorded instead of run.  Device allocations are refused
 * during capture (allocate outputs beforehand).  Without CUDA: MOE_ERR_NO_CUDA. */
moe_status moe_graph_begin(moe_device dev);
/* Finish the capture and instantiate it.  Caller owns *out. */
moe_status moe_graph_end(moe_graph **out);
/* Abandon a capture in progress (after an error in the captured code). */
void moe_graph_abort(void);
/* 1 while a capture is in progress on the calling thread. */
int moe_graph_capturing(void);
/* Launch the captured work again (asynchronous; moe_synchronize waits for it). */
moe_status moe_graph_replay(moe_graph *g);
void moe_graph_free(moe_graph *g);
/* Benchmark helper: `warmup` untimed replays, then n replays each bracketed by CUDA events on
 * the moelab stream; times_us[i] receives replay i's time in microseconds.  Synchronises. */
moe_status moe_graph_time(moe_graph *g, int warmup, int n, float *times_us);

/* -------------------------------------------------------- dense math ops -- */

/* out[M, N] = a[M, K] . b[N, K]^T with f32 accumulation (router GEMMs: logits = x . W^T).
 * a and b: f32, bf16 or f16 (any mix), any strides; same device.  *out is used when non-NULL
 * on entry (f32 or bf16 [M, N], contiguous), else allocated as f32 (caller owns it). */
moe_status moe_matmul_nt(const moe_tensor *a, const moe_tensor *b, moe_tensor **out);
/* RMSNorm over the last dimension: out = x / sqrt(mean(x^2) + eps) * weight, f32 arithmetic.
 * x [.., H] f32/bf16/f16 contiguous; weight [H] (NULL: 1); out like x (allocated with x's dtype
 * when *out is NULL; may be x itself). */
moe_status moe_rmsnorm(const moe_tensor *x, const moe_tensor *weight, double eps, moe_tensor **out);
/* y = alpha * x + beta * y, element-wise in f32 (x, y of equal shape, float dtypes, same
 * device, contiguous).  Used for residual adds and scaling. */
moe_status moe_axpby(double alpha, const moe_tensor *x, double beta, moe_tensor *y);

/* ---- quantisation ---- */

/* Quantised weights and activations: a moe_qtensor holds the packed data, its block scales
 * and (nvfp4) a per-matrix global scale, for a logical f32 matrix [N, K] or a stack of E
 * matrices [E, N, K].  Scales are always taken along the last dimension K (the GEMM's
 * reduction dimension).  Exact numerics, layouts and the all-zero / NaN rules:
 * docs/quantization.md (reference.md section 4).  "lead" below is [E] for 3-D inputs and
 * [] (no dimension) for 2-D ones.
 *
 *   mode       data            scales                                  global
 *   bf16       bf16 [.., N, K] -                                       -
 *   fp8        e4m3 [.., N, K] f32 lead (amax/448 per matrix)          -
 *   fp8_block  e4m3 [.., N, K] f32 lead+[N/128, K/128] (weights) or     -
 *                              f32 lead+[N, K/128] (block_rows 1: activations)
 *   nvfp4      e2m1 [.., N, K] e4m3 lead+[N, K/16]                     f32 lead
 *   mxfp4      e2m1 [.., N, K] ue8m0 lead+[N, K/32]                    -
 *   mxint4     i4   [.., N, K] bf16 lead+[N, K/32]                     -
 *
 *     moe_qtensor *q = NULL;
 *     moe_quantize(w, MOE_QUANT_NVFP4, NULL, &q);    // w: f32/bf16/f16 [E, N, K], K % 16 == 0
 *     const moe_tensor *codes = moe_qtensor_data(q); // e2m1 [E, N, K], two per byte
 *     moe_tensor *back = NULL;
 *     moe_dequantize(q, MOE_F32, &back);              // f32 [E, N, K]
 *     moe_tensor_free(back); moe_qtensor_free(q);
 */

/* X(name, id, text): quantisation modes. */
#define MOE_QUANT_MODE_LIST(X)                  \
    X(MOE_QUANT_BF16, 0, "bf16")                \
    X(MOE_QUANT_FP8, 1, "fp8")                  \
    X(MOE_QUANT_FP8_BLOCK, 2, "fp8_block")      \
    X(MOE_QUANT_NVFP4, 3, "nvfp4")              \
    X(MOE_QUANT_MXFP4, 4, "mxfp4")              \
    X(MOE_QUANT_MXINT4, 5, "mxint4")

#define MOE__QUANT_ENUM(name, id, text) name = id,
typedef enum moe_quant_mode { MOE_QUANT_MODE_LIST(MOE__QUANT_ENUM) MOE_QUANT_MODE_COUNT } moe_quant_mode;
#undef MOE__QUANT_ENUM

/* "fp8_block", ...; "?" for an unknown id. */
const char *moe_quant_mode_name(int mode);
/* Parse a mode name; -1 with the last error set for an unknown name. */
int moe_quant_mode_from_name(const char *name);

typedef struct moe_quant_opts {
    int32_t block_rows; /* fp8_block: rows per scale block, 128 (weights) or 1 (activations:
                           one scale per row and 128 columns); 0 = default (quantize: 128;
                           from_parts: read off the scales' shape).  Other modes: 0 or their
                           own value (fp8: 0; nvfp4/mxfp4/mxint4: 0 or 1). */
    int32_t reserved[3];
} moe_quant_opts;

/* All zero: the defaults above. */
moe_quant_opts moe_quant_opts_default(void);

typedef struct moe_qtensor moe_qtensor; /* opaque */

/* Quantise t (f32, bf16 or f16; 2-D [N, K] or 3-D [E, N, K]; any strides) in `mode` on t's
 * device.  K must be a multiple of the mode's block (16 nvfp4, 32 mxfp4/mxint4, 128
 * fp8_block), and N of 128 for fp8_block with block_rows 128.  opts may be NULL.  CUDA: no
 * host synchronisation.  Caller owns *out (moe_qtensor_free). */
moe_status moe_quantize(const moe_tensor *t, int mode, const moe_quant_opts *opts,
                        moe_qtensor **out);
/* Dequantise into f32, bf16 or f16 (values computed in f32, then rounded to nearest even),
 * shape [.., N, K], on q's device.  Caller owns *out. */
moe_status moe_dequantize(const moe_qtensor *q, int dtype, moe_tensor **out);
/* Build a qtensor from already-quantised parts (as loaded from a checkpoint), sharing their
 * storage.  data: the mode's dtype [.., N, K], or for e2m1/i4 also u8 [.., N, K/2] (two codes
 * per byte, low nibble first); scales / global_scale as in the table (NULL where the mode has
 * none; ue8m0 scales may be u8; a per-matrix f32 of a 2-D matrix may be [] or [1]).  Every
 * shape, dtype and device is checked; strided parts are copied.  Caller owns *out. */
moe_status moe_qtensor_from_parts(moe_qtensor **out, int mode, const moe_tensor *data,
                                  const moe_tensor *scales, const moe_tensor *global_scale,
                                  const moe_quant_opts *opts);
void moe_qtensor_free(moe_qtensor *q);

int moe_qtensor_mode(const moe_qtensor *q);
/* Logical shape: 2 or 3 dimensions ([N, K] or [E, N, K]); dim < 0 counts from the end, -1
 * when out of range. */
int moe_qtensor_ndim(const moe_qtensor *q);
int64_t moe_qtensor_dim(const moe_qtensor *q, int dim);
moe_device moe_qtensor_device(const moe_qtensor *q);
/* Scale block: rows x columns of the logical matrix sharing one scale (fp8: N x K, one per
 * matrix; fp8_block: 128 x 128 or 1 x 128; nvfp4 1 x 16; mxfp4, mxint4 1 x 32; bf16 0 x 0). */
int moe_qtensor_block_rows(const moe_qtensor *q);
int moe_qtensor_block_cols(const moe_qtensor *q);
/* The parts (contiguous).  Borrowed: valid while q lives (take a view with
 * moe_tensor_reshape to keep one longer).  scales is NULL for bf16, global_scale NULL
 * except for nvfp4. */
const moe_tensor *moe_qtensor_data(const moe_qtensor *q);
const moe_tensor *moe_qtensor_scales(const moe_qtensor *q);
const moe_tensor *moe_qtensor_global_scale(const moe_qtensor *q);

/* ----------------------------------------------------------------- routing -- */

/* X(name, id, text): routing methods; semantics in docs/routing.md. */
#define MOE_ROUTE_METHOD_LIST(X)                          \
    X(MOE_ROUTE_DEFAULT, 0, "default")                    \
    X(MOE_ROUTE_RENORMALIZE, 1, "renormalize")            \
    X(MOE_ROUTE_RENORMALIZE_NAIVE, 2, "renormalize_naive")\
    X(MOE_ROUTE_TOPK, 3, "topk")                          \
    X(MOE_ROUTE_SIGMOID_RENORM, 4, "sigmoid_renorm")      \
    X(MOE_ROUTE_DEEPSEEKV3, 5, "deepseekv3")              \
    X(MOE_ROUTE_MINIMAX2, 6, "minimax2")                  \
    X(MOE_ROUTE_LLAMA4, 7, "llama4")

#define MOE__ROUTE_ENUM(name, id, text) name = id,
typedef enum moe_route_method { MOE_ROUTE_METHOD_LIST(MOE__ROUTE_ENUM) MOE_ROUTE_METHOD_COUNT } moe_route_method;
#undef MOE__ROUTE_ENUM

#define MOE_ROUTE_MAX_EXPERTS 2048
#define MOE_ROUTE_MAX_TOPK 32

typedef struct moe_route_cfg {
    int32_t method;      /* moe_route_method */
    int32_t top_k;       /* K, 1..32, <= E */
    int32_t n_group;     /* deepseekv3: number of expert groups (<= 1: no group step) */
    int32_t topk_group;  /* deepseekv3: groups kept, 1..n_group */
    float scale;         /* deepseekv3: routed_scaling_factor (default 1) */
    int32_t normalize;   /* sigmoid_renorm: 1 = divide by the sum (default 1) */
    int32_t weights_dtype; /* MOE_F32 (default) or MOE_BF16, for allocated weights */
} moe_route_cfg;

const char *moe_route_method_name(int method);
/* Parse a method name; -1 with the last error set for an unknown name. */
int moe_route_method_from_name(const char *name);
/* Defaults: method renormalize, top_k 1, n_group 0, topk_group 0, scale 1, normalize 1,
 * weights f32. */
moe_route_cfg moe_route_cfg_default(void);

/* Route T tokens: logits [T, E] (f32/bf16/f16), optional bias [E] (f32/bf16; deepseekv3 and
 * minimax2 only), on one device.  *ids (i32 [T,K]) and *weights (f32 or bf16 [T,K]) are used
 * as outputs when non-NULL on entry (validated), else allocated (caller owns them).
 * `replay` (optional, i16 [R >= T, K], contiguous, same device) receives the ids as int16 in
 * the returned order; rows >= T untouched.  T = 0 is a valid no-op.  CUDA: one launch, no
 * host synchronisation, no allocation when outputs are given (graph-capturable). */
moe_status moe_route(const moe_route_cfg *cfg, const moe_tensor *logits, const moe_tensor *bias,
                     moe_tensor **ids, moe_tensor **weights, moe_tensor *replay);

/* ---- fused MoE ---- */

/* One MoE layer in one call: routing -> permute (group the T*K (token, expert) pairs by
 * expert) -> GEMM1 (x . W13^T) -> activation -> GEMM2 (. W2^T) -> weighted combine, the
 * combine accumulated in f32.  Semantics: docs/fused.md (and reference.md section 3).
 *
 *     moe_experts_cfg ec = moe_experts_cfg_default();          // swiglu
 *     moe_experts *ex = NULL;
 *     moe_experts_new(&ex, &ec, w13, w2, NULL, NULL, cuda);    // packs once, on cuda
 *     moe_workspace *ws = NULL;
 *     moe_workspace_new(&ws, cuda, 4096, 8, ex);                // sized for T <= 4096, K 8
 *     moe_fused_cfg fc = moe_fused_cfg_default();
 *     fc.route.method = MOE_ROUTE_RENORMALIZE; fc.route.top_k = 8;
 *     moe_tensor *y = NULL;                                     // allocated: bf16 [T, H]
 *     moe_fused_moe(&fc, ex, x, logits, NULL, NULL, NULL, NULL, &y, NULL, NULL, ws);
 *
 * Numerics (bf16 mode): weights are stored as bf16 (f32 inputs rounded to nearest even
 * when packed); hidden states are bf16; GEMMs accumulate in f32; the activation output is
 * rounded to bf16 (the intermediate the GPU pipeline stores); out[t] = sum_k w[t,k] * y[t,k]
 * in f32 over k in order, rounded to bf16 once.  Llama 4 (method llama4): the routing
 * weight scales the expert input (x * w, in f32, before GEMM1) and the expert output is
 * combined with weight 1: the weight is applied exactly once. */

/* X(name, id, text): expert activations. */
#define MOE_ACTIVATION_LIST(X)                  \
    X(MOE_ACT_SWIGLU, 0, "swiglu")              \
    X(MOE_ACT_GEGLU, 1, "geglu")                \
    X(MOE_ACT_RELU2, 2, "relu2")                \
    X(MOE_ACT_SWIGLU_OAI, 3, "swiglu_oai")

#define MOE__ACT_ENUM(name, id, text) name = id,
typedef enum moe_activation { MOE_ACTIVATION_LIST(MOE__ACT_ENUM) MOE_ACTIVATION_COUNT } moe_activation;
#undef MOE__ACT_ENUM

/* "swiglu", ...; "?" for an unknown id. */
const char *moe_activation_name(int act);
/* Parse an activation name; -1 with the last error set for an unknown name. */
int moe_activation_from_name(const char *name);

typedef struct moe_experts_cfg {
    int32_t activation; /* moe_activation: swiglu (silu(gate)*up, default), geglu (erf
                           gelu(gate)*up), relu2 (relu(h)^2, not gated: W13 is [E, I, H]),
                           swiglu_oai (g = min(gate, limit), u = clamp(up, -limit, limit),
                           g * sigmoid(alpha * g) * (u + beta)) */
    float alpha;        /* swiglu_oai: 1.702 (GPT-OSS) */
    float beta;         /* swiglu_oai: 1 */
    float limit;        /* swiglu_oai: 7 */
} moe_experts_cfg;

/* Defaults: swiglu, alpha 1.702, beta 1, limit 7. */
moe_experts_cfg moe_experts_cfg_default(void);

typedef struct moe_experts moe_experts; /* opaque: packed expert weights on one device */

/* Pack E experts for device `dev`: gate_up W13 [E, 2I, H] (rows [0, I) gate, [I, 2I) up;
 * [E, I, H] for relu2) and down W2 [E, H, I], f32 or bf16, any device, any strides.
 * Optional per-expert biases bias_gate_up [E, 2I] ([E, I] for relu2) and bias_down [E, H]
 * (f32 or bf16; kept in f32).  The weights are converted to bf16 and copied into the
 * kernels' layout once (the caller may free the inputs afterwards).  CUDA needs H and I
 * multiples of 128.  Caller owns *out (moe_experts_free). */
moe_status moe_experts_new(moe_experts **out, const moe_experts_cfg *cfg,
                           const moe_tensor *gate_up, const moe_tensor *down,
                           const moe_tensor *bias_gate_up, const moe_tensor *bias_down,
                           moe_device dev);
/* Quantised experts (docs/quantization.md, "Fused MoE per mode"): mode is a moe_quant_mode.
 * Per matrix give either the f32/bf16 weights (gate_up [E, N1, H], down [E, H, I], quantised
 * here on `dev` with moe_quantize: fp8 one scale per expert, fp8_block 128x128 blocks, ...)
 * or an already-quantised qtensor of that mode and shape on `dev` (gate_up_q / down_q, e.g.
 * from moe_qtensor_from_parts; its storage is shared, not copied), not both.  H and I must
 * divide by the mode's block (128 fp8_block, 16 nvfp4, 32 mxfp4/mxint4): the activations are
 * quantised along them too; CUDA needs multiples of 128.  Biases as for moe_experts_new.
 * Mode bf16 is moe_experts_new (a bf16 qtensor's data is the weight).  moe_fused_moe then
 * runs the mode's numerics.  Caller owns *out (moe_experts_free). */
moe_status moe_experts_new_quant(moe_experts **out, const moe_experts_cfg *cfg, int mode,
                                 const moe_tensor *gate_up, const moe_tensor *down,
                                 const moe_qtensor *gate_up_q, const moe_qtensor *down_q,
                                 const moe_tensor *bias_gate_up, const moe_tensor *bias_down,
                                 moe_device dev);
/* The experts' moe_quant_mode (MOE_QUANT_BF16 for moe_experts_new). */
int moe_experts_quant(const moe_experts *ex);
void moe_experts_free(moe_experts *ex);
int64_t moe_experts_num(const moe_experts *ex);          /* E */
int64_t moe_experts_hidden(const moe_experts *ex);       /* H */
int64_t moe_experts_intermediate(const moe_experts *ex); /* I */
int moe_experts_activation(const moe_experts *ex);
moe_device moe_experts_device(const moe_experts *ex);
/* Bytes of device (or host) memory the packed weights occupy. */
int64_t moe_experts_nbytes(const moe_experts *ex);

typedef struct moe_workspace moe_workspace; /* opaque: scratch memory of moe_fused_moe */

/* Scratch memory of moe_fused_moe for up to max_tokens tokens with top_k experts each
 * (routing outputs, the permutation, the bf16 intermediate, per-pair outputs, an error
 * counter), allocated once so that the CUDA call allocates nothing and never waits for the
 * device (capturable in a CUDA graph).  One workspace serves any experts object of the same
 * device with the same or smaller H, I and E; calls that share one workspace must not run
 * concurrently (they are ordered on the moelab stream).  Caller owns *out. */
moe_status moe_workspace_new(moe_workspace **out, moe_device dev, int64_t max_tokens,
                             int32_t top_k, const moe_experts *ex);
void moe_workspace_free(moe_workspace *ws);
int64_t moe_workspace_max_tokens(const moe_workspace *ws);
int32_t moe_workspace_top_k(const moe_workspace *ws);
int64_t moe_workspace_nbytes(const moe_workspace *ws);
/* Routed ids out of [0, E) are refused up front on the CPU (MOE_ERR_RANGE naming the
 * position).  On CUDA they are not read back (that would need a host wait): such pairs are
 * skipped and counted on the device.  moe_workspace_check waits for the device, reads and
 * resets the count, and returns MOE_ERR_RANGE ("N routed ids out of range were skipped")
 * when it was not 0; *skipped (may be NULL) receives the count. */
moe_status moe_workspace_check(moe_workspace *ws, int64_t *skipped);

typedef struct moe_fused_cfg {
    moe_route_cfg route;  /* routing (native mode); route.top_k is K */
    int32_t local_offset; /* expert parallelism: experts [local_offset, local_offset + */
    int32_t local_count;  /* local_count) are computed; local_count -1 = up to E */
} moe_fused_cfg;

/* Defaults: moe_route_cfg_default(), local_offset 0, local_count -1 (all experts). */
moe_fused_cfg moe_fused_cfg_default(void);

/* Run one MoE layer on the experts' device.
 *   hidden  bf16 [T, H], contiguous.
 *   Native mode: logits [T, E] (f32/bf16/f16) and bias [E] (or NULL) as for moe_route,
 *     routed with cfg->route.  routed_ids and routed_weights must be NULL.
 *   Routed mode: logits and bias NULL; routed_ids i32 [T, K] and routed_weights f32 [T, K]
 *     (for example read back from a replay trace), used as given (K = their dim 1;
 *     cfg->route is ignored, except that llama4 still means "weight on the input").
 *   replay  optional i16 [R >= T, K]: receives the ids used, in both modes.
 *   *out    bf16 [T, H] contiguous: written when non-NULL on entry, else allocated (caller
 *     owns it).  Under expert parallelism it holds the partial sum over local experts.
 *   ids_out i32 [T, K] / weights_out f32 [T, K]: optional copies of the routing used.
 *   ws      workspace with max_tokens >= T and top_k == K; required on CUDA, may be NULL on
 *     the CPU (temporaries are then allocated).
 * T = 0 is valid (nothing is launched).  CUDA: routing + 4 kernels on the moelab stream, no
 * allocation (when *out is given) and no host synchronisation. */
moe_status moe_fused_moe(const moe_fused_cfg *cfg, const moe_experts *ex,
                         const moe_tensor *hidden, const moe_tensor *logits,
                         const moe_tensor *bias, const moe_tensor *routed_ids,
                         const moe_tensor *routed_weights, moe_tensor *replay,
                         moe_tensor **out, moe_tensor *ids_out, moe_tensor *weights_out,
                         moe_workspace *ws);

/* Which kernels ran the expert GEMMs of moe_fused_moe calls: one count per call that ran them
 * (T > 0 and local experts), process-wide, since the start or moe_fused_path_reset.  A call
 * captured into a CUDA graph counts once, when it is captured (not per replay).  For specs and
 * experiments that must know which path a setting (the MOE_FUSED_* variables) or a size took. */
typedef enum moe_fused_path {
    MOE_FUSED_PATH_CPU = 0, /* the CPU reference */
    MOE_FUSED_PATH_GEMV,    /* CUDA decode GEMV kernels (bf16 and quantised) */
    MOE_FUSED_PATH_TILE,    /* CUDA mma.sync tile kernels (weights through shared memory) */
    MOE_FUSED_PATH_WREG,    /* CUDA register-operand tile kernel (quantised modes) */
    MOE_FUSED_PATH_WGMMA,   /* CUDA Hopper wgmma kernels (sm_90a) */
    MOE_FUSED_PATH_GEMV_ROUTE, /* CUDA decode GEMV kernels that route the token themselves (no routing
                                * kernel; fp8, fp8_block, nvfp4 at T = 1, sm_90+) */
    MOE_FUSED_PATH_WGMMA_RS,   /* CUDA Hopper wgmma kernels with the weights widened in registers as
                                * the A operand (fp8, nvfp4, mxfp4, mxint4, fp8_block from H = 4096;
                                * sm_90a) */
    MOE_FUSED_PATH_WREG_I4F16,     /* mxint4 on f16 MMAs (its scales folded into the weights, see
                                    * docs/quantization.md) in the register-operand tile kernel */
    MOE_FUSED_PATH_WGMMA_RS_I4F16, /* ... in the Hopper register-operand kernel (sm_90a) */
    MOE_FUSED_PATH_WGMMA_RS_XONCE, /* nvfp4, fp8_block, mxfp4, mxint4 (per-32) in the Hopper
                                    * register-operand kernel with x quantised or converted once a
                                    * token and scattered to its pairs' rows (sm_90a) */
    MOE_FUSED_PATH_GEMV_BULK,       /* the decode GEMV kernels with the second GEMM's weight rows
                                     * bulk-copied into shared memory (mxfp4, mxint4 at T = 1; sm_90a) */
    MOE_FUSED_PATH_GEMV_ROUTE_BULK, /* ... and routing the token themselves (fp8, fp8_block, nvfp4 at
                                     * T = 1; sm_90a) */
    MOE_FUSED_PATH_COUNT
} moe_fused_path;

/* counts[i] = calls of path i (MOE_FUSED_PATH_COUNT entries). */
void moe_fused_path_counts(int64_t *counts);
void moe_fused_path_reset(void);
const char *moe_fused_path_name(int path); /* "cpu", "gemv", "tile", "wreg", "wgmma", "gemv_route",
                                            "wgmma_rs", "wreg_i4f16", "wgmma_rs_i4f16",
                                            "wgmma_rs_xonce", "gemv_bulk", "gemv_route_bulk"; NULL if
                                            out of range */

/* ---- traces ---- */

/* A routing replay trace: the expert ids chosen for T tokens in L MoE layers, K per token
 * ("routed_experts" int16 [T, L, K], the layout vLLM returns), -1 where a position was not
 * captured; optionally the routing weights (f32 [T, L, K]) and the token ids (i32 [T]), plus
 * string metadata.  Held in host memory (a loaded file stays memory-mapped until it is
 * modified).  docs/traces.md has the file format and every metric's formula. */
typedef struct moe_trace moe_trace; /* opaque */

#define MOE_TRACE_MAX_TOPK 64

/* New empty trace of L layers and K ids per token; num_experts E may be 0 (unknown: ids are
 * then only checked to be < 32768); with_weights 1 keeps a weights array.  Caller owns *out. */
moe_status moe_trace_new(moe_trace **out, int64_t num_layers, int64_t top_k,
                         int64_t num_experts, int with_weights);
void moe_trace_free(moe_trace *tr);
int64_t moe_trace_tokens(const moe_trace *tr);
int64_t moe_trace_layers(const moe_trace *tr);
int64_t moe_trace_top_k(const moe_trace *tr);
/* 0 when unknown (for example a trace imported from .npy). */
int64_t moe_trace_num_experts(const moe_trace *tr);
/* Set E; every captured id must be < E (MOE_ERR_RANGE otherwise, naming the position). */
moe_status moe_trace_set_num_experts(moe_trace *tr, int64_t num_experts);
int moe_trace_has_weights(const moe_trace *tr);
int moe_trace_has_token_ids(const moe_trace *tr);
/* Make room for `tokens` tokens in total without changing T. */
moe_status moe_trace_reserve(moe_trace *tr, int64_t tokens);
/* Set T: new rows get ids -1, weights 0, token id -1; shrinking drops the last rows. */
moe_status moe_trace_resize(moe_trace *tr, int64_t tokens);
/* The arrays ([T, L, K] row-major; token ids [T]).  Borrowed: valid until the next call
 * that changes T or the storage.  NULL when T = 0 or the array is absent.  The _mut forms
 * first give the trace its own copy of a memory-mapped file's data (NULL + last error when
 * that fails); moe_trace_token_ids_mut creates the array (all -1) when absent. */
const int16_t *moe_trace_ids(const moe_trace *tr);
const float *moe_trace_weights(const moe_trace *tr);
const int32_t *moe_trace_token_ids(const moe_trace *tr);
int16_t *moe_trace_ids_mut(moe_trace *tr);
float *moe_trace_weights_mut(moe_trace *tr);
int32_t *moe_trace_token_ids_mut(moe_trace *tr);

/* Append n tokens.  ids: i16, i32 or i64 [>= n, L, K] (rows 0..n-1 are taken) on any device,
 * or NULL: rows of -1 to be filled layer by layer with moe_trace_set_layer.  weights
 * (f32/bf16/f16 [>= n, L, K], needs a trace with weights) and token_ids (i32/i64 [>= n])
 * are optional.  Ids below 0 are stored as -1. */
moe_status moe_trace_append(moe_trace *tr, int64_t n, const moe_tensor *ids,
                            const moe_tensor *weights, const moe_tensor *token_ids);
/* Write rows 0..n-1 of ids (i16/i32/i64 [>= n, K], any device: a replay buffer) and
 * optionally weights ([>= n, K]) into tokens start..start+n-1 of layer `layer`. */
moe_status moe_trace_set_layer(moe_trace *tr, int64_t start, int64_t n, int64_t layer,
                               const moe_tensor *ids, const moe_tensor *weights);
/* Append n tokens from host arrays: ids [n, L, K] (required), weights [n, L, K] and
 * token_ids [n] (each may be NULL). */
moe_status moe_trace_append_host(moe_trace *tr, int64_t n, const int16_t *ids,
                                 const float *weights, const int32_t *token_ids);
/* Append tokens start..start+n-1 of src (same L and K; weights kept when both have them). */
moe_status moe_trace_append_trace(moe_trace *dst, const moe_trace *src, int64_t start,
                                  int64_t n);

/* Metadata (string -> string).  Setting an existing key replaces it; value NULL removes it. */
moe_status moe_trace_set_meta(moe_trace *tr, const char *key, const char *value);
/* Value of key, or NULL.  Borrowed until the key is changed or the trace freed. */
const char *moe_trace_get_meta(const moe_trace *tr, const char *key);
int moe_trace_meta_count(const moe_trace *tr);
const char *moe_trace_meta_key(const moe_trace *tr, int i);
const char *moe_trace_meta_value(const moe_trace *tr, int i);

/* Write safetensors: routed_experts I16 [T, L, K], weights F32 [T, L, K] and token_ids I32
 * [T] when present; __metadata__ has every key of the trace plus num_layers, top_k,
 * num_experts (when known), tokens, engine, engine_version, format ("moelab-trace/1").
 * Atomic (temporary file, then rename).  _range writes tokens start..start+n-1 only. */
moe_status moe_trace_save(const moe_trace *tr, const char *path);
moe_status moe_trace_save_range(const moe_trace *tr, const char *path, int64_t start,
                                int64_t n);
/* Load a trace: one of our safetensors files (any file with a routed_experts I16/I32 [T,L,K]
 * entry), a .npy [T, L, K] array of int16/int32/int64 (what an inference engine's Python
 * API returns; num_experts unknown), or a directory of chunk files
 * "chunk-NNNNNN.safetensors" (plus "chunk-NNNNNN.part-MMMMMM.safetensors" batches of a chunk
 * that was never completed) concatenated in order.  Caller owns *out. */
moe_status moe_trace_load(const char *path, moe_trace **out);

/* Balance of one layer's expert loads x[0..E): mean m = sum/E. */
typedef struct moe_trace_balance {
    int64_t total;        /* sum of the counts */
    int32_t hot_expert;   /* expert with the largest count (lowest index on ties); -1 if none */
    int32_t reserved;
    double max_over_mean; /* max(x) / m */
    double cv;            /* population standard deviation / m */
    double jain;          /* (sum x)^2 / (E * sum x^2); 1 = perfectly even, 1/E = one expert */
    double entropy;       /* -sum p ln p / ln E with p = x / sum; 1 = perfectly even */
} moe_trace_balance;      /* NaN fields when total = 0 */

typedef struct moe_trace_layer_cmp {
    int64_t compared;     /* tokens where both traces captured this layer */
    int64_t skipped;      /* tokens with an id < 0 in either trace */
    int64_t differing;    /* compared tokens whose top-K *sets* differ */
    int64_t exact;        /* compared tokens with the same ids in the same order */
    int64_t shared;       /* sum of |A intersect B| over compared tokens */
    int64_t weight_pairs; /* (token, shared expert) pairs behind weight_abs_diff */
    double router_disagreement; /* differing / compared */
    double jaccard;       /* mean |A n B| / |A u B| */
    double overlap;       /* shared / (K * compared) */
    double exact_agreement; /* exact / compared */
    double js_divergence; /* Jensen-Shannon divergence (bits) of the two load distributions */
    double weight_abs_diff;   /* mean |wA - wB| over shared experts (NaN without weights) */
    double weight_mass_moved; /* mean of (sum wA on A\B + sum wB on B\A) / 2 (NaN without) */
    moe_trace_balance load_a, load_b; /* loads over the compared tokens */
} moe_trace_layer_cmp;

/* Result of moe_trace_compare.  Ratios are NaN when their denominator is 0. */
typedef struct moe_trace_cmp {
    int64_t tokens, layers, top_k, num_experts;
    int64_t positions;        /* tokens * layers */
    int64_t compared, skipped, differing, exact, shared, weight_pairs;
    int64_t tokens_compared;  /* tokens with at least one compared layer */
    int64_t tokens_skipped;   /* tokens with no compared layer */
    int64_t tokens_differing; /* tokens with at least one differing layer */
    int64_t layers_differing; /* sum over tokens of their number of differing layers */
    double router_disagreement;   /* differing / compared */
    double token_disagreement;    /* tokens_differing / tokens_compared */
    double mean_layers_differing; /* layers_differing / tokens_compared */
    double jaccard, overlap, exact_agreement; /* over all compared positions */
    double js_divergence;         /* mean over layers that have data */
    double weight_abs_diff, weight_mass_moved; /* NaN unless both traces have weights */
    int32_t has_weights;
    int32_t reserved;
    moe_trace_balance load_a, load_b; /* per trace: means over layers of the per-layer
                                         values; total and hot_expert of all layers summed */
    moe_trace_layer_cmp *per_layer;   /* [layers] */
    int64_t *first_diff_hist;         /* [layers]: tokens whose first differing layer is l */
    int64_t *loads_a, *loads_b;       /* [layers * num_experts]: counts over compared tokens */
} moe_trace_cmp;

typedef struct moe_trace_cmp_opts {
    int32_t threads;          /* worker threads; 0 = one per core (at most 16) */
    int32_t ignore_weights;   /* 1: skip the weight metrics */
    int32_t ignore_token_ids; /* 1: do not require equal token ids where both have them */
    int32_t reserved;
} moe_trace_cmp_opts;

moe_trace_cmp_opts moe_trace_cmp_opts_default(void);
/* Compare two traces of the same tokens (equal T, L, K and, when both are known, E; E known
 * on one side is used for both; unknown on both: the largest id + 1).  Positions where
 * either trace has an id < 0 are skipped and counted.  opts may be NULL.  Caller owns *out
 * (moe_trace_cmp_free). */
moe_status moe_trace_compare(const moe_trace *a, const moe_trace *b,
                             const moe_trace_cmp_opts *opts, moe_trace_cmp **out);
void moe_trace_cmp_free(moe_trace_cmp *c);

/* Statistics of one trace: per-layer expert loads over captured positions. */
typedef struct moe_trace_summary {
    int64_t tokens, layers, top_k, num_experts;
    int64_t captured;          /* (token, layer) positions with all ids >= 0 */
    int64_t skipped;           /* positions with an id < 0 */
    moe_trace_balance balance; /* means over layers; total and hot_expert of the summed loads */
    moe_trace_balance *per_layer; /* [layers] */
    int64_t *loads;            /* [layers * num_experts] */
} moe_trace_summary;

/* Caller owns *out (moe_trace_summary_free). */
moe_status moe_trace_stats(const moe_trace *tr, const moe_trace_cmp_opts *opts,
                           moe_trace_summary **out);
void moe_trace_summary_free(moe_trace_summary *s);

#ifndef MOE_CDEF
#if defined(__GNUC__)
#pragma GCC visibility pop
#endif
#ifdef __cplusplus
}
#endif
#endif
#endif /* MOE_H */
