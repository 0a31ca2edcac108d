/* io_npy.c -- .npy read / write / parse (NumPy format 1.0, 2.0, 3.0).
 *
 * Layout: "\x93NUMPY", major, minor, header length (u16 LE for 1.0, u32 LE for 2.0/3.0),
 * then a Python dict literal {'descr': ..., 'fortran_order': ..., 'shape': (...), }
 * padded with spaces and a newline, then the raw C-order data.
 *
 * dtypes (docs/io.md):  '<f4' f32, '<f2' f16, '|i1' i8, '<i2' i16, '<i4' i32, '<i8' i64,
 * '|u1' u8, '|b1' bool; '<u2' marked with the header comment "# moe_dtype: bf16" (or, as older
 * moelab files have it, the extra key 'moe_dtype': 'bf16') is bf16.
 * Widened on read into a fresh tensor: plain '<u2' -> i32, '<u4' -> i64, '<u8' -> i64
 * (values over INT64_MAX refused), '<f8' -> f32 (round to nearest even).
 * Refused: big-endian, fortran order, structured/object/complex/string dtypes. */
#include "io_file.h"

#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

static const moe_device cpu_dev = {MOE_DEVICE_CPU, 0};

/* How the file's element type becomes a moelab dtype. */
enum npy_conv {
    CONV_NONE = 0, /* same bytes */
    CONV_U16_I32,
    CONV_U32_I64,
    CONV_U64_I64,
    CONV_F64_F32
};

typedef struct npy_info {
    int dtype;       /* moelab dtype of the result */
    int conv;        /* enum npy_conv */
    int itemsize;    /* bytes per element in the file */
    int ndim;
    int64_t shape[MOE_MAX_DIMS];
    int64_t numel;
    size_t data_off; /* offset of the data in the file */
    size_t data_bytes;
} npy_info;

/* ------------------------------------------------------------ header dict -- */

typedef struct hparse {
    const char *fn, *name;
    const unsigned char *s;
    size_t n, i;
    size_t base; /* file offset of s[0], for messages */
} hparse;

static moe_status hfail(hparse *h, const char *what) {
    return moe__err(MOE_ERR_FORMAT, "%s: %s: header dict: %s at byte %zu", h->fn, h->name, what,
                    h->base + h->i);
}

static void hws(hparse *h) {
    while (h->i < h->n && (h->s[h->i] == ' ' || h->s[h->i] == '\t' || h->s[h->i] == '\n' ||
                           h->s[h->i] == '\r'))
        h->i++;
}

/* Python string literal in ' or " without escapes; returns a pointer into the header. */
static moe_status hstring(hparse *h, const char **out, size_t *len) {
    if (h->i >= h->n || (h->s[h->i] != '\'' && h->s[h->i] != '"'))
        return hfail(h, "expected a quoted string");
    unsigned char q = h->s[h->i];
    size_t start = ++h->i;
    while (h->i < h->n && h->s[h->i] != q) {
        if (h->s[h->i] == '\\') return hfail(h, "escapes in strings are not supported");
        if (h->s[h->i] < 0x20 || h->s[h->i] >= 0x7F) return hfail(h, "non-printable byte in string");
        h->i++;
    }
    if (h->i >= h->n) return hfail(h, "unterminated string");
    *out = (const char *)h->s + start;
    *len = h->i - start;
    h->i++;
    return MOE_OK;
}

static int hword(hparse *h, const char *w) {
    size_t len = strlen(w);
    if (h->n - h->i < len || memcmp(h->s + h->i, w, len) != 0) return 0;
    /* the word must end here */
    if (h->n - h->i > len) {
        unsigned char c = h->s[h->i + len];
        if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_')
            return 0;
    }
    h->i += len;
    return 1;
}

static int seq_eq(const char *s, size_t len, const char *lit) {
    return strlen(lit) == len && memcmp(s, lit, len) == 0;
}

/* (d0, d1, ...) with an optional trailing comma; non-negative integers (a Python 2 'L'
 * suffix is accepted). */
static moe_status hshape(hparse *h, npy_info *info) {
    if (h->i >= h->n || h->s[h->i] != '(') return hfail(h, "'shape' must be a tuple");
    h->i++;
    int nd = 0;
    for (;;) {
        hws(h);
        if (h->i < h->n && h->s[h->i] == ')') {
            h->i++;
            break;
        }
        if (h->i >= h->n || h->s[h->i] < '0' || h->s[h->i] > '9')
            return hfail(h, "expected a non-negative integer in 'shape'");
        int64_t v = 0;
        while (h->i < h->n && h->s[h->i] >= '0' && h->s[h->i] <= '9') {
            int d = h->s[h->i] - '0';
            if (v > (INT64_MAX - d) / 10) return hfail(h, "dimension too large in 'shape'");
            v = v * 10 + d;
            h->i++;
        }
        if (h->i < h->n && (h->s[h->i] == 'L' || h->s[h->i] == 'l')) h->i++;
        if (nd < MOE_MAX_DIMS) info->shape[nd] = v;
        nd++;
        hws(h);
        if (h->i < h->n && h->s[h->i] == ',') {
            h->i++;
            continue;
        }
        if (h->i < h->n && h->s[h->i] == ')') {
            h->i++;
            break;
        }
        return hfail(h, "expected ',' or ')' in 'shape'");
    }
    if (nd == 1) {
        /* "(5)" is an int in Python, not a tuple: numpy always writes "(5,)" */
        size_t k = h->i - 2;
        while (k > 0 && (h->s[k] == ' ' || h->s[k] == '\t')) k--;
        if (h->s[k] != ',') return hfail(h, "'shape' (n) must be written as a tuple (n,)");
    }
    if (nd > MOE_MAX_DIMS)
        return moe__err(MOE_ERR_SHAPE, "%s: %s: shape: expected at most %d dimensions, got %d",
                        h->fn, h->name, MOE_MAX_DIMS, nd);
    info->ndim = nd;
    return MOE_OK;
}

static moe_status npy_descr(const char *fn, const char *name, const char *d, size_t len,
                            int bf16_key, npy_info *info) {
    char shown[24];
    size_t sl = len < sizeof shown - 1 ? len : sizeof shown - 1;
    memcpy(shown, d, sl);
    shown[sl] = '\0';
    if (len < 3 || len > 4)
        return moe__err(MOE_ERR_DTYPE, "%s: %s: unsupported dtype '%s'", fn, name, shown);
    char order = d[0], kind = d[1];
    int size = 0;
    for (size_t k = 2; k < len; k++) {
        if (d[k] < '0' || d[k] > '9')
            return moe__err(MOE_ERR_DTYPE, "%s: %s: unsupported dtype '%s'", fn, name, shown);
        size = size * 10 + (d[k] - '0');
    }
    if (order != '<' && order != '>' && order != '|' && order != '=')
        return moe__err(MOE_ERR_DTYPE, "%s: %s: unsupported dtype '%s' (byte order '%c')", fn, name,
                        shown, order);
    if (size > 1 && order == '>')
        return moe__err(MOE_ERR_DTYPE, "%s: %s: big-endian dtype '%s' is not supported", fn, name,
                        shown);
    if (size > 1 && order == '|')
        return moe__err(MOE_ERR_DTYPE, "%s: %s: dtype '%s' needs a byte order", fn, name, shown);
    info->itemsize = size;
    info->conv = CONV_NONE;
    info->dtype = -1;
    switch (kind) {
    case 'f':
        if (size == 4) info->dtype = MOE_F32;
        else if (size == 2) info->dtype = MOE_F16;
        else if (size == 8) info->dtype = MOE_F32, info->conv = CONV_F64_F32;
        break;
    case 'i':
        if (size == 1) info->dtype = MOE_I8;
        else if (size == 2) info->dtype = MOE_I16;
        else if (size == 4) info->dtype = MOE_I32;
        else if (size == 8) info->dtype = MOE_I64;
        break;
    case 'u':
        if (size == 1) info->dtype = MOE_U8;
        else if (size == 2) {
            if (bf16_key) info->dtype = MOE_BF16;
            else info->dtype = MOE_I32, info->conv = CONV_U16_I32;
        } else if (size == 4) info->dtype = MOE_I64, info->conv = CONV_U32_I64;
        else if (size == 8) info->dtype = MOE_I64, info->conv = CONV_U64_I64;
        break;
    case 'b':
        if (size == 1) info->dtype = MOE_BOOL;
        break;
    default:
        break;
    }
    if (info->dtype < 0)
        return moe__err(MOE_ERR_DTYPE, "%s: %s: unsupported dtype '%s'", fn, name, shown);
    if (bf16_key && info->dtype != MOE_BF16)
        return moe__err(MOE_ERR_FORMAT, "%s: %s: 'moe_dtype': 'bf16' needs descr '<u2', got '%s'",
                        fn, name, shown);
    return MOE_OK;
}

static moe_status npy_header(const char *fn, const char *name, const unsigned char *p,
                             size_t size, npy_info *info) {
    static const unsigned char magic[6] = {0x93, 'N', 'U', 'M', 'P', 'Y'};
    memset(info, 0, sizeof *info);
    if (size < 10)
        return moe__err(MOE_ERR_FORMAT, "%s: %s: file too short for a .npy header (%zu bytes)", fn,
                        name, size);
    if (memcmp(p, magic, 6) != 0)
        return moe__err(MOE_ERR_FORMAT, "%s: %s: bad magic: not a .npy file", fn, name);
    int major = p[6], minor = p[7];
    if (major < 1 || major > 3 || minor != 0)
        return moe__err(MOE_ERR_FORMAT, "%s: %s: unsupported .npy version %d.%d (expected 1.0-3.0)",
                        fn, name, major, minor);
    size_t hstart, hlen;
    if (major == 1) {
        hlen = (size_t)p[8] | (size_t)p[9] << 8;
        hstart = 10;
    } else {
        if (size < 12)
            return moe__err(MOE_ERR_FORMAT, "%s: %s: file too short for a .npy %d.0 header", fn,
                            name, major);
        uint32_t v = (uint32_t)p[8] | (uint32_t)p[9] << 8 | (uint32_t)p[10] << 16 |
                     (uint32_t)p[11] << 24;
        hlen = v;
        hstart = 12;
    }
    if (hlen > size - hstart)
        return moe__err(MOE_ERR_FORMAT, "%s: %s: header length %zu exceeds file size %zu", fn, name,
                        hlen, size);

    hparse h = {fn, name, p + hstart, hlen, 0, hstart};
    const char *descr = NULL, *mdt = NULL;
    size_t descr_len = 0, mdt_len = 0;
    int have_fortran = 0, fortran = 0, have_shape = 0;
    hws(&h);
    if (h.i >= h.n || h.s[h.i] != '{') return hfail(&h, "expected '{'");
    h.i++;
    for (;;) {
        hws(&h);
        if (h.i < h.n && h.s[h.i] == '}') {
            h.i++;
            break;
        }
        const char *key;
        size_t klen;
        MOE_TRY(hstring(&h, &key, &klen));
        hws(&h);
        if (h.i >= h.n || h.s[h.i] != ':') return hfail(&h, "expected ':' after key");
        h.i++;
        hws(&h);
        if (seq_eq(key, klen, "descr")) {
            if (descr) return hfail(&h, "duplicate key 'descr'");
            if (h.i < h.n && h.s[h.i] == '[')
                return moe__err(MOE_ERR_DTYPE, "%s: %s: structured dtypes are not supported", fn,
                                name);
            MOE_TRY(hstring(&h, &descr, &descr_len));
        } else if (seq_eq(key, klen, "fortran_order")) {
            if (have_fortran) return hfail(&h, "duplicate key 'fortran_order'");
            have_fortran = 1;
            if (hword(&h, "True")) fortran = 1;
            else if (hword(&h, "False")) fortran = 0;
            else return hfail(&h, "'fortran_order' must be True or False");
        } else if (seq_eq(key, klen, "shape")) {
            if (have_shape) return hfail(&h, "duplicate key 'shape'");
            have_shape = 1;
            MOE_TRY(hshape(&h, info));
        } else if (seq_eq(key, klen, "moe_dtype")) {
            if (mdt) return hfail(&h, "duplicate key 'moe_dtype'");
            MOE_TRY(hstring(&h, &mdt, &mdt_len));
        } else {
            return hfail(&h, "unknown key");
        }
        hws(&h);
        if (h.i < h.n && h.s[h.i] == ',') {
            h.i++;
            continue;
        }
        if (h.i < h.n && h.s[h.i] == '}') {
            h.i++;
            break;
        }
        return hfail(&h, "expected ',' or '}'");
    }
    hws(&h);
    /* A trailing Python comment is legal (numpy parses the header as a literal).  moelab marks
     * bf16 arrays with "# moe_dtype: bf16" there, so that numpy still loads them (as uint16). */
    if (h.i < h.n && h.s[h.i] == '#') {
        static const char mark[] = "# moe_dtype: bf16";
        size_t ml = sizeof mark - 1;
        if (h.n - h.i >= ml && memcmp(h.s + h.i, mark, ml) == 0) {
            if (mdt) return hfail(&h, "bf16 marked twice");
            mdt = mark + 13;
            mdt_len = 4;
        }
        while (h.i < h.n && h.s[h.i] != '\n') h.i++;
        hws(&h);
    }
    if (h.i != h.n) return hfail(&h, "unexpected bytes after the dict");
    if (!descr || !have_fortran || !have_shape)
        return moe__err(MOE_ERR_FORMAT, "%s: %s: header dict: missing key '%s'", fn, name,
                        !descr ? "descr" : !have_fortran ? "fortran_order" : "shape");
    if (mdt && !seq_eq(mdt, mdt_len, "bf16"))
        return moe__err(MOE_ERR_FORMAT, "%s: %s: 'moe_dtype': expected 'bf16', got '%.*s'", fn,
                        name, (int)(mdt_len < 16 ? mdt_len : 16), mdt);
    if (fortran)
        return moe__err(MOE_ERR_UNSUPPORTED,
                        "%s: %s: fortran_order True is not supported (save a C-order array)", fn,
                        name);
    MOE_TRY(npy_descr(fn, name, descr, descr_len, mdt != NULL, info));

    /* element count and byte count, exactly (no overflow) */
    size_t avail = size - hstart - hlen;
    /* the product of the non-zero sizes is bounded too (by 2^60, as for moe_tensor_new), so
     * that strides of an empty array with huge other dimensions cannot overflow */
    uint64_t numel = 1;
    int zero = 0;
    for (int d = 0; d < info->ndim; d++) {
        uint64_t s = (uint64_t)info->shape[d];
        if (s == 0) {
            zero = 1;
            continue;
        }
        if (numel > ((uint64_t)1 << 60) / s)
            return moe__err(MOE_ERR_FORMAT, "%s: %s: shape has too many elements", fn, name);
        numel *= s;
    }
    if (zero) numel = 0;
    if (numel > (uint64_t)avail / (uint64_t)info->itemsize)
        return moe__err(MOE_ERR_FORMAT,
                        "%s: %s: data is %zu bytes, too short for the shape in the header", fn,
                        name, avail);
    info->numel = (int64_t)numel;
    info->data_off = hstart + hlen;
    info->data_bytes = (size_t)numel * (size_t)info->itemsize;
    return MOE_OK;
}

/* ------------------------------------------------------------ conversions -- */

static moe_status npy_convert(const char *fn, const char *name, const npy_info *info,
                              const unsigned char *src, void *dst) {
    int64_t n = info->numel;
    switch (info->conv) {
    case CONV_NONE:
        memcpy(dst, src, info->data_bytes);
        break;
    case CONV_U16_I32:
        for (int64_t i = 0; i < n; i++) {
            uint16_t v;
            memcpy(&v, src + 2 * i, 2);
            ((int32_t *)dst)[i] = (int32_t)v;
        }
        break;
    case CONV_U32_I64:
        for (int64_t i = 0; i < n; i++) {
            uint32_t v;
            memcpy(&v, src + 4 * i, 4);
            ((int64_t *)dst)[i] = (int64_t)v;
        }
        break;
    case CONV_U64_I64:
        for (int64_t i = 0; i < n; i++) {
            uint64_t v;
            memcpy(&v, src + 8 * i, 8);
            if (v > (uint64_t)INT64_MAX)
                return moe__err(MOE_ERR_DTYPE,
                                "%s: %s: element %" PRId64 " of a '<u8' array is %" PRIu64
                                ", over the i64 maximum",
                                fn, name, i, v);
            ((int64_t *)dst)[i] = (int64_t)v;
        }
        break;
    case CONV_F64_F32:
        for (int64_t i = 0; i < n; i++) {
            double v;
            memcpy(&v, src + 8 * i, 8);
            ((float *)dst)[i] = (float)v; /* round to nearest even */
        }
        break;
    }
    return MOE_OK;
}

/* New host tensor holding a converted copy of the data. */
static moe_status npy_copy_out(const char *fn, const char *name, const npy_info *info,
                               const unsigned char *file, moe_tensor **out) {
    moe_tensor *t = NULL;
    moe_status st = moe_tensor_new(&t, info->dtype, info->ndim, info->shape, cpu_dev);
    if (st != MOE_OK) return moe__err_prefix(st, fn, name);
    st = npy_convert(fn, name, info, file + info->data_off, moe_tensor_data(t));
    if (st != MOE_OK) {
        moe_tensor_free(t);
        return st;
    }
    *out = t;
    return MOE_OK;
}

moe_status moe_npy_parse(const void *data, size_t size, moe_tensor **out) {
    static const char fn[] = "moe_npy_parse";
    if (!out) return moe__err(MOE_ERR_ARG, "%s: out: expected a pointer, got NULL", fn);
    *out = NULL;
    if (!data && size)
        return moe__err(MOE_ERR_ARG, "%s: data: expected a pointer, got NULL", fn);
    npy_info info;
    MOE_TRY(npy_header(fn, "<memory>", (const unsigned char *)data, size, &info));
    return npy_copy_out(fn, "<memory>", &info, (const unsigned char *)data, out);
}

moe_status moe_npy_read(const char *path, moe_tensor **out) {
    static const char fn[] = "moe_npy_read";
    if (!out) return moe__err(MOE_ERR_ARG, "%s: out: expected a pointer, got NULL", fn);
    *out = NULL;
    if (!path) return moe__err(MOE_ERR_ARG, "%s: path: expected a string, got NULL", fn);
    moe_storage *st = NULL;
    size_t size = 0;
    MOE_TRY(moe__file_map(fn, path, &st, &size));
    npy_info info;
    const unsigned char *p = (const unsigned char *)st->data;
    moe_status s = npy_header(fn, path, p, size, &info);
    if (s == MOE_OK) {
        if (info.conv == CONV_NONE && info.data_bytes > 0 &&
            info.data_off % (size_t)info.itemsize == 0) {
            /* zero copy: the tensor views the (private, copy-on-write) mapping */
            s = moe__tensor_wrap(out, st, info.dtype, info.ndim, info.shape, NULL,
                                 (int64_t)(info.data_off / (size_t)info.itemsize));
        } else {
            s = npy_copy_out(fn, path, &info, p, out);
        }
    }
    moe__storage_release(st);
    return s;
}

/* ----------------------------------------------------------------- writer -- */

static const char *npy_descr_of(int dtype) {
    switch (dtype) {
    case MOE_F32: return "<f4";
    case MOE_F16: return "<f2";
    case MOE_BF16: return "<u2";
    case MOE_I8: return "|i1";
    case MOE_I16: return "<i2";
    case MOE_I32: return "<i4";
    case MOE_I64: return "<i8";
    case MOE_U8: return "|u1";
    case MOE_BOOL: return "|b1";
    default: return NULL;
    }
}

moe_status moe_npy_write(const char *path, const moe_tensor *t) {
    static const char fn[] = "moe_npy_write";
    if (!path) return moe__err(MOE_ERR_ARG, "%s: path: expected a string, got NULL", fn);
    if (!t) return moe__err(MOE_ERR_ARG, "%s: t: expected a tensor, got NULL", fn);
    int dtype = moe_tensor_dtype(t);
    const char *descr = npy_descr_of(dtype);
    if (!descr)
        return moe__err(MOE_ERR_DTYPE,
                        "%s: t: expected f32, f16, bf16, i8, i16, i32, i64, u8 or bool, got %s "
                        "(save it as safetensors)",
                        fn, moe_dtype_name(dtype));

    char hdr[512];
    int ndim = moe_tensor_ndim(t);
    size_t k = 0;
    k += (size_t)snprintf(hdr + k, sizeof hdr - k,
                          "{'descr': '%s', 'fortran_order': False, 'shape': (", descr);
    for (int d = 0; d < ndim; d++)
        k += (size_t)snprintf(hdr + k, sizeof hdr - k, "%s%" PRId64, d ? ", " : "",
                              moe_tensor_dim(t, d));
    k += (size_t)snprintf(hdr + k, sizeof hdr - k, "%s), }%s", ndim == 1 ? "," : "",
                          dtype == MOE_BF16 ? " # moe_dtype: bf16" : "");
    /* pad with spaces and end with '\n' so that 10 + header length is a multiple of 64 */
    size_t total = 10 + k + 1;
    size_t pad = (64 - total % 64) % 64;
    if (k + pad + 1 >= sizeof hdr) return moe__err(MOE_ERR_ARG, "%s: header too long", fn);
    memset(hdr + k, ' ', pad);
    k += pad;
    hdr[k++] = '\n';

    unsigned char pre[10] = {0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0, 0, 0};
    pre[8] = (unsigned char)(k & 0xFF);
    pre[9] = (unsigned char)(k >> 8);

    moe_tensor *tmp = NULL;
    const void *bytes = NULL;
    size_t nbytes = 0;
    moe_status st = moe__host_bytes(t, &tmp, &bytes, &nbytes);
    if (st != MOE_OK) return moe__err_prefix(st, fn, path);

    moe_wfile w;
    st = moe__wfile_open(&w, fn, path);
    if (st == MOE_OK) {
        st = moe__wfile_write(&w, pre, sizeof pre);
        if (st == MOE_OK) st = moe__wfile_write(&w, hdr, k);
        if (st == MOE_OK) st = moe__wfile_write(&w, bytes, nbytes);
        if (st == MOE_OK) st = moe__wfile_commit(&w);
        else moe__wfile_abort(&w);
    }
    moe_tensor_free(tmp);
    return st;
}
