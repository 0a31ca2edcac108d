/* io_safetensors.c -- safetensors reader (mmap, zero copy, fully validated) and writer.
 *
 * File: u64 little-endian N, N bytes of JSON header, then the data section.  The header is
 * an object: "__metadata__" (optional, string -> string) and one entry per tensor:
 *   "name": {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}
 * with offsets relative to the start of the data section.  docs/io.md has the dtype table,
 * the moelab conventions (i4 as U8 + "moe_dtype.<name>" = "i4") and the validation list. */
#include "io_file.h"
#include "json.h"

#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

static const moe_device cpu_dev = {MOE_DEVICE_CPU, 0};

#define ST_MAX_HEADER 100000000u /* the format's reference limit on the header size */
#define ST_MAX_DEPTH 64
#define ST_I4_PREFIX "moe_dtype."

/* ------------------------------------------------------------------ dtypes -- */

enum { ST_NOT_MOE = -1, ST_REFUSED = -2 };

typedef struct st_dtype_info {
    const char *name;
    int bits;     /* per element */
    int moe;      /* moelab dtype, or ST_NOT_MOE (widened on get), or ST_REFUSED */
    int widen_to; /* for ST_NOT_MOE: the moelab dtype of the widened copy */
} st_dtype_info;

enum {
    ST_BOOL, ST_U8, ST_I8, ST_I16, ST_U16, ST_I32, ST_U32, ST_I64, ST_U64, ST_F16, ST_BF16,
    ST_F32, ST_F64, ST_F8_E4M3, ST_F8_E5M2, ST_F8_E8M0, ST_F4, ST_F6_E2M3, ST_F6_E3M2,
    ST_DTYPE_COUNT
};

static const st_dtype_info st_dtypes[ST_DTYPE_COUNT] = {
    [ST_BOOL] = {"BOOL", 8, MOE_BOOL, 0},
    [ST_U8] = {"U8", 8, MOE_U8, 0},
    [ST_I8] = {"I8", 8, MOE_I8, 0},
    [ST_I16] = {"I16", 16, MOE_I16, 0},
    [ST_U16] = {"U16", 16, ST_NOT_MOE, MOE_I32},
    [ST_I32] = {"I32", 32, MOE_I32, 0},
    [ST_U32] = {"U32", 32, ST_NOT_MOE, MOE_I64},
    [ST_I64] = {"I64", 64, MOE_I64, 0},
    [ST_U64] = {"U64", 64, ST_NOT_MOE, MOE_I64},
    [ST_F16] = {"F16", 16, MOE_F16, 0},
    [ST_BF16] = {"BF16", 16, MOE_BF16, 0},
    [ST_F32] = {"F32", 32, MOE_F32, 0},
    [ST_F64] = {"F64", 64, ST_NOT_MOE, MOE_F32},
    [ST_F8_E4M3] = {"F8_E4M3", 8, MOE_F8E4M3, 0},
    [ST_F8_E5M2] = {"F8_E5M2", 8, MOE_F8E5M2, 0},
    [ST_F8_E8M0] = {"F8_E8M0", 8, MOE_UE8M0, 0},
    [ST_F4] = {"F4", 4, MOE_E2M1, 0},
    [ST_F6_E2M3] = {"F6_E2M3", 6, ST_REFUSED, 0},
    [ST_F6_E3M2] = {"F6_E3M2", 6, ST_REFUSED, 0},
};

static int st_dtype_lookup(const char *s, size_t len) {
    for (int i = 0; i < ST_DTYPE_COUNT; i++)
        if (strlen(st_dtypes[i].name) == len && memcmp(st_dtypes[i].name, s, len) == 0) return i;
    return -1;
}

/* safetensors name of a moelab dtype (i4 is written as U8). */
static int st_dtype_of_moe(int dtype) {
    switch (dtype) {
    case MOE_F32: return ST_F32;
    case MOE_F16: return ST_F16;
    case MOE_BF16: return ST_BF16;
    case MOE_F8E4M3: return ST_F8_E4M3;
    case MOE_F8E5M2: return ST_F8_E5M2;
    case MOE_E2M1: return ST_F4;
    case MOE_I4: return ST_U8;
    case MOE_UE8M0: return ST_F8_E8M0;
    case MOE_U8: return ST_U8;
    case MOE_I8: return ST_I8;
    case MOE_I16: return ST_I16;
    case MOE_I32: return ST_I32;
    case MOE_I64: return ST_I64;
    case MOE_BOOL: return ST_BOOL;
    default: return -1;
    }
}

/* -------------------------------------------------------------- file object -- */

typedef struct st_entry {
    const char *name; /* in the JSON arena */
    int dtype;        /* ST_* */
    int i4;           /* U8 entry that holds packed i4 ("moe_dtype.<name>" = "i4") */
    int ndim;         /* may exceed MOE_MAX_DIMS (refused on get) */
    int64_t shape[MOE_MAX_DIMS];
    uint64_t numel;
    uint64_t begin, end; /* relative to the data section */
} st_entry;

struct moe_st_file {
    moe_storage *st;   /* the whole file (mapping or copy) */
    size_t size;       /* file size */
    size_t data_off;   /* 8 + header length */
    char *label;       /* path or "<memory>", for messages */
    moe_json_doc *doc; /* owns names, keys and values */
    int n;
    st_entry *e;
    int *by_name; /* entry indices sorted by name */
    int n_meta;
    const char **mkey, **mval;
};

void moe_st_close(moe_st_file *f) {
    if (!f) return;
    moe__storage_release(f->st);
    moe__json_free(f->doc);
    free(f->label);
    free(f->e);
    free(f->by_name);
    free(f->mkey);
    free(f->mval);
    free(f);
}

int moe_st_count(const moe_st_file *f) { return f ? f->n : 0; }

const char *moe_st_name(const moe_st_file *f, int i) {
    if (!f || i < 0 || i >= f->n) return NULL;
    return f->e[i].name;
}

int moe_st_find(const moe_st_file *f, const char *name) {
    if (!f || !name) return -1;
    int lo = 0, hi = f->n - 1;
    while (lo <= hi) {
        int mid = lo + (hi - lo) / 2;
        int c = strcmp(f->e[f->by_name[mid]].name, name);
        if (c == 0) return f->by_name[mid];
        if (c < 0) lo = mid + 1;
        else hi = mid - 1;
    }
    return -1;
}

int moe_st_meta_count(const moe_st_file *f) { return f ? f->n_meta : 0; }

const char *moe_st_meta_key(const moe_st_file *f, int i) {
    if (!f || i < 0 || i >= f->n_meta) return NULL;
    return f->mkey[i];
}

const char *moe_st_meta_value(const moe_st_file *f, int i) {
    if (!f || i < 0 || i >= f->n_meta) return NULL;
    return f->mval[i];
}

/* ------------------------------------------------------------------ parsing -- */

/* qsort comparators need the entry table; parsing is reentrant, so sort (index, key) pairs. */
typedef struct sort_item {
    const char *name;
    uint64_t begin, end;
    int idx;
} sort_item;

static int cmp_name(const void *a, const void *b) {
    return strcmp(((const sort_item *)a)->name, ((const sort_item *)b)->name);
}

static int cmp_offsets(const void *a, const void *b) {
    const sort_item *x = (const sort_item *)a, *y = (const sort_item *)b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    if (x->end != y->end) return x->end < y->end ? -1 : 1;
    return x->idx - y->idx;
}

/* Messages quote names; keep them short and printable. */
static const char *shown(const char *s, char *buf, size_t n) {
    size_t k = 0;
    for (; s[k] && k + 4 < n; k++) buf[k] = (s[k] >= 0x20 && s[k] < 0x7F) ? s[k] : '?';
    if (s[k]) {
        buf[k++] = '.';
        buf[k++] = '.';
        buf[k++] = '.';
    }
    buf[k] = '\0';
    return buf;
}

#define FMT_ERR(...) moe__err(MOE_ERR_FORMAT, __VA_ARGS__)

static moe_status parse_entry(const char *fn, const char *lab, moe_st_file *f, size_t data_size,
                              const char *name, const moe_json_value *v, st_entry *e) {
    char nb[72];
    const char *nm = shown(name, nb, sizeof nb);
    memset(e, 0, sizeof *e);
    e->name = name;
    if (v->type != MOE_JSON_OBJECT)
        return FMT_ERR("%s: %s: entry '%s': expected an object", fn, lab, nm);
    const moe_json_value *dt = moe__json_get(v, "dtype");
    const moe_json_value *sh = moe__json_get(v, "shape");
    const moe_json_value *of = moe__json_get(v, "data_offsets");
    if (!dt || !sh || !of)
        return FMT_ERR("%s: %s: entry '%s': missing \"%s\"", fn, lab, nm,
                       !dt ? "dtype" : !sh ? "shape" : "data_offsets");
    if (dt->type != MOE_JSON_STRING)
        return FMT_ERR("%s: %s: entry '%s': \"dtype\" must be a string", fn, lab, nm);
    e->dtype = st_dtype_lookup(dt->str, dt->len);
    if (e->dtype < 0) {
        char db[40];
        return FMT_ERR("%s: %s: entry '%s': unknown dtype '%s'", fn, lab, nm,
                       shown(dt->str, db, sizeof db));
    }
    if (sh->type != MOE_JSON_ARRAY)
        return FMT_ERR("%s: %s: entry '%s': \"shape\" must be an array", fn, lab, nm);
    if (sh->n > 1024)
        return FMT_ERR("%s: %s: entry '%s': shape has %zu dimensions", fn, lab, nm, sh->n);
    e->ndim = (int)sh->n;
    uint64_t numel = 1;
    int zero = 0;
    for (size_t d = 0; d < sh->n; d++) {
        const moe_json_value *x = &sh->items[d];
        if (x->type != MOE_JSON_NUMBER || !x->is_int || x->ival < 0)
            return FMT_ERR("%s: %s: entry '%s': shape[%zu] must be a non-negative integer", fn,
                           lab, nm, d);
        if (d < MOE_MAX_DIMS) e->shape[d] = x->ival;
        /* element count, exactly; the product of the non-zero sizes is bounded by 2^60 (as
         * for moe_tensor_new) so that strides of empty tensors cannot overflow either */
        if (x->ival == 0) {
            zero = 1;
            continue;
        }
        if (numel > ((uint64_t)1 << 60) / (uint64_t)x->ival)
            return FMT_ERR("%s: %s: entry '%s': shape has too many elements", fn, lab, nm);
        numel *= (uint64_t)x->ival;
    }
    if (zero) numel = 0;
    e->numel = numel;
    if (of->type != MOE_JSON_ARRAY || of->n != 2 || of->items[0].type != MOE_JSON_NUMBER ||
        of->items[1].type != MOE_JSON_NUMBER || !of->items[0].is_int || !of->items[1].is_int ||
        of->items[0].ival < 0 || of->items[1].ival < 0)
        return FMT_ERR("%s: %s: entry '%s': \"data_offsets\" must be 2 non-negative integers", fn,
                       lab, nm);
    e->begin = (uint64_t)of->items[0].ival;
    e->end = (uint64_t)of->items[1].ival;
    if (e->end < e->begin)
        return FMT_ERR("%s: %s: entry '%s': data_offsets [%" PRIu64 ", %" PRIu64
                       "] are decreasing",
                       fn, lab, nm, e->begin, e->end);
    if (e->end > data_size)
        return FMT_ERR("%s: %s: entry '%s': data_offsets end %" PRIu64
                       " is beyond the data size %zu (out of range)",
                       fn, lab, nm, e->end, data_size);
    /* numel <= 2^60 and bits <= 64: numel * bits could wrap, so split it (numel / 8 * bits
     * <= 2^63) */
    const uint64_t bits = (uint64_t)st_dtypes[e->dtype].bits;
    if (numel % 8 * bits % 8 != 0)
        return FMT_ERR("%s: %s: entry '%s': %" PRIu64 " elements of %s do not fill whole bytes",
                       fn, lab, nm, numel, st_dtypes[e->dtype].name);
    const uint64_t need = numel / 8 * bits + numel % 8 * bits / 8;
    if (e->end - e->begin != need)
        return FMT_ERR("%s: %s: entry '%s': byte count mismatch: data_offsets span %" PRIu64
                       " bytes, shape x %s needs %" PRIu64,
                       fn, lab, nm, e->end - e->begin, st_dtypes[e->dtype].name, need);
    (void)f;
    return MOE_OK;
}

static moe_status st_parse(const char *fn, moe_st_file *f) {
    const unsigned char *p = (const unsigned char *)f->st->data;
    const char *lab = f->label;
    size_t size = f->size;
    if (size < 8)
        return FMT_ERR("%s: %s: file is %zu bytes, shorter than the 8-byte header length", fn,
                       lab, size);
    uint64_t hlen = 0;
    for (int k = 7; k >= 0; k--) hlen = hlen << 8 | p[k];
    if (hlen > (uint64_t)(size - 8))
        return FMT_ERR("%s: %s: header length %" PRIu64 " exceeds file size %zu", fn, lab, hlen,
                       size);
    if (hlen > ST_MAX_HEADER)
        return FMT_ERR("%s: %s: header length %" PRIu64 " exceeds the format's limit of %u bytes",
                       fn, lab, hlen, ST_MAX_HEADER);
    f->data_off = 8 + (size_t)hlen;
    size_t data_size = size - f->data_off;

    const moe_json_value *root = NULL;
    moe_json_error jerr;
    int rc = moe__json_parse((const char *)p + 8, (size_t)hlen, ST_MAX_DEPTH, &f->doc, &root,
                             &jerr);
    if (rc == -2) return moe__err(MOE_ERR_NOMEM, "%s: %s: out of memory parsing the header", fn, lab);
    if (rc != 0)
        return FMT_ERR("%s: %s: header is not valid JSON: %s at byte %zu", fn, lab, jerr.msg,
                       8 + jerr.pos);
    if (root->type != MOE_JSON_OBJECT)
        return FMT_ERR("%s: %s: header is not a JSON object", fn, lab);

    /* metadata first (the i4 markers refer to entries) */
    const moe_json_value *meta = NULL;
    size_t n_ent = 0;
    for (size_t i = 0; i < root->n; i++) {
        if (strcmp(root->keys[i], "__metadata__") == 0 && root->key_len[i] == 12) {
            if (meta) return FMT_ERR("%s: %s: duplicate name \"__metadata__\"", fn, lab);
            meta = &root->items[i];
        } else {
            n_ent++;
        }
    }
    if (n_ent > (size_t)INT32_MAX / 2) return FMT_ERR("%s: %s: too many entries", fn, lab);
    f->n = (int)n_ent;
    f->e = (st_entry *)calloc(n_ent ? n_ent : 1, sizeof *f->e);
    f->by_name = (int *)calloc(n_ent ? n_ent : 1, sizeof *f->by_name);
    sort_item *si = (sort_item *)calloc(n_ent ? n_ent : 1, sizeof *si);
    size_t n_meta = meta ? meta->n : 0;
    f->mkey = (const char **)calloc(n_meta ? n_meta : 1, sizeof *f->mkey);
    f->mval = (const char **)calloc(n_meta ? n_meta : 1, sizeof *f->mval);
    moe_status st = MOE_OK;
    if (!f->e || !f->by_name || !si || !f->mkey || !f->mval) {
        st = moe__err(MOE_ERR_NOMEM, "%s: %s: out of memory", fn, lab);
        goto out;
    }

    size_t k = 0;
    for (size_t i = 0; i < root->n; i++) {
        if (&root->items[i] == meta) continue;
        if (strlen(root->keys[i]) != root->key_len[i]) {
            st = FMT_ERR("%s: %s: a tensor name contains a NUL character", fn, lab);
            goto out;
        }
        st = parse_entry(fn, lab, f, data_size, root->keys[i], &root->items[i], &f->e[k]);
        if (st != MOE_OK) goto out;
        si[k].name = f->e[k].name;
        si[k].begin = f->e[k].begin;
        si[k].end = f->e[k].end;
        si[k].idx = (int)k;
        k++;
    }

    /* duplicate names */
    qsort(si, n_ent, sizeof *si, cmp_name);
    for (size_t i = 0; i < n_ent; i++) {
        f->by_name[i] = si[i].idx;
        if (i > 0 && strcmp(si[i - 1].name, si[i].name) == 0) {
            char nb[72];
            st = FMT_ERR("%s: %s: duplicate name '%s'", fn, lab, shown(si[i].name, nb, sizeof nb));
            goto out;
        }
    }
    /* overlapping entries (empty ones take no bytes) */
    qsort(si, n_ent, sizeof *si, cmp_offsets);
    {
        const sort_item *prev = NULL;
        for (size_t i = 0; i < n_ent; i++) {
            if (si[i].begin == si[i].end) continue;
            if (prev && si[i].begin < prev->end) {
                char a[72], b[72];
                st = FMT_ERR("%s: %s: entries '%s' [%" PRIu64 ", %" PRIu64 ") and '%s' [%" PRIu64
                             ", %" PRIu64 ") overlap",
                             fn, lab, shown(prev->name, a, sizeof a), prev->begin, prev->end,
                             shown(si[i].name, b, sizeof b), si[i].begin, si[i].end);
                goto out;
            }
            prev = &si[i];
        }
    }

    /* metadata: string -> string; "moe_dtype.<name>" markers are applied and hidden */
    if (meta) {
        if (meta->type != MOE_JSON_OBJECT) {
            st = FMT_ERR("%s: %s: \"__metadata__\" must be an object of strings", fn, lab);
            goto out;
        }
        /* duplicate keys (sorted copy) */
        sort_item *mk = (sort_item *)calloc(meta->n ? meta->n : 1, sizeof *mk);
        if (!mk) {
            st = moe__err(MOE_ERR_NOMEM, "%s: %s: out of memory", fn, lab);
            goto out;
        }
        for (size_t i = 0; i < meta->n; i++) mk[i].name = meta->keys[i];
        qsort(mk, meta->n, sizeof *mk, cmp_name);
        for (size_t i = 1; i < meta->n; i++)
            if (strcmp(mk[i - 1].name, mk[i].name) == 0) {
                char kb[72];
                st = FMT_ERR("%s: %s: \"__metadata__\" has the key '%s' twice (duplicate)", fn,
                             lab, shown(mk[i].name, kb, sizeof kb));
                break;
            }
        free(mk);
        if (st != MOE_OK) goto out;
        int nm = 0;
        for (size_t i = 0; i < meta->n; i++) {
            const char *key = meta->keys[i];
            const moe_json_value *v = &meta->items[i];
            char kb[72];
            if (v->type != MOE_JSON_STRING) {
                st = FMT_ERR("%s: %s: \"__metadata__\" value of '%s' must be a string", fn, lab,
                             shown(key, kb, sizeof kb));
                goto out;
            }
            if (strlen(key) != meta->key_len[i] || strlen(v->str) != v->len) {
                st = FMT_ERR("%s: %s: \"__metadata__\" contains a NUL character", fn, lab);
                goto out;
            }
            if (strncmp(key, ST_I4_PREFIX, sizeof ST_I4_PREFIX - 1) == 0) {
                const char *tname = key + sizeof ST_I4_PREFIX - 1;
                int idx = moe_st_find(f, tname);
                if (strcmp(v->str, "i4") != 0) {
                    char vb[40];
                    st = FMT_ERR("%s: %s: metadata '%s': unknown moe_dtype '%s' (expected i4)", fn,
                                 lab, shown(key, kb, sizeof kb), shown(v->str, vb, sizeof vb));
                    goto out;
                }
                char vb[72];
                if (idx < 0 || f->e[idx].dtype != ST_U8 || f->e[idx].ndim < 1 ||
                    f->e[idx].ndim > MOE_MAX_DIMS) {
                    st = FMT_ERR("%s: %s: metadata '%s' = \"i4\" needs a U8 tensor '%s' with 1..%d "
                                 "dimensions",
                                 fn, lab, shown(key, kb, sizeof kb), shown(tname, vb, sizeof vb),
                                 MOE_MAX_DIMS);
                    goto out;
                }
                f->e[idx].i4 = 1;
                continue;
            }
            f->mkey[nm] = key;
            f->mval[nm] = v->str;
            nm++;
        }
        f->n_meta = nm;
    }
out:
    free(si);
    return st;
}

static moe_status st_open_storage(const char *fn, const char *label, moe_storage *s, size_t size,
                                  moe_st_file **out) {
    moe_st_file *f = (moe_st_file *)calloc(1, sizeof *f);
    char *lab = (char *)malloc(strlen(label) + 1);
    if (!f || !lab) {
        free(f);
        free(lab);
        moe__storage_release(s);
        return moe__err(MOE_ERR_NOMEM, "%s: out of host memory", fn);
    }
    memcpy(lab, label, strlen(label) + 1);
    f->st = s;
    f->size = size;
    f->label = lab;
    moe_status st = st_parse(fn, f);
    if (st != MOE_OK) {
        moe_st_close(f);
        return st;
    }
    *out = f;
    return MOE_OK;
}

moe_status moe_st_open(const char *path, moe_st_file **out) {
    static const char fn[] = "moe_st_open";
    if (!out) return moe__err(MOE_ERR_ARG, "%s: out: expected a pointer, got NULL", fn);
    *out = NULL;
    if (!path) return moe__err(MOE_ERR_ARG, "%s: path: expected a string, got NULL", fn);
    moe_storage *s = NULL;
    size_t size = 0;
    MOE_TRY(moe__file_map(fn, path, &s, &size));
    return st_open_storage(fn, path, s, size, out);
}

moe_status moe_st_open_memory(const void *data, size_t size, moe_st_file **out) {
    static const char fn[] = "moe_st_open_memory";
    if (!out) return moe__err(MOE_ERR_ARG, "%s: out: expected a pointer, got NULL", fn);
    *out = NULL;
    if (!data && size) return moe__err(MOE_ERR_ARG, "%s: data: expected a pointer, got NULL", fn);
    moe_storage *s = NULL;
    MOE_TRY(moe__mem_copy_storage(fn, data, size, &s));
    return st_open_storage(fn, "<memory>", s, size, out);
}

/* -------------------------------------------------------------------- get -- */

moe_status moe_st_get(const moe_st_file *f, int i, moe_tensor **out) {
    static const char fn[] = "moe_st_get";
    if (!out) return moe__err(MOE_ERR_ARG, "%s: out: expected a pointer, got NULL", fn);
    *out = NULL;
    if (!f) return moe__err(MOE_ERR_ARG, "%s: f: expected an open file, got NULL", fn);
    if (i < 0 || i >= f->n)
        return moe__err(MOE_ERR_ARG, "%s: i: expected 0..%d, got %d", fn, f->n - 1, i);
    const st_entry *e = &f->e[i];
    const st_dtype_info *di = &st_dtypes[e->dtype];
    char nb[72];
    const char *nm = shown(e->name, nb, sizeof nb);
    if (e->ndim > MOE_MAX_DIMS)
        return moe__err(MOE_ERR_SHAPE, "%s: %s: '%s': expected at most %d dimensions, got %d", fn,
                        f->label, nm, MOE_MAX_DIMS, e->ndim);
    if (di->moe == ST_REFUSED)
        return moe__err(MOE_ERR_DTYPE, "%s: %s: '%s': dtype %s is not supported by moelab", fn,
                        f->label, nm, di->name);
    int dtype = di->moe >= 0 ? di->moe : di->widen_to;
    int64_t shape[MOE_MAX_DIMS];
    for (int d = 0; d < e->ndim; d++) shape[d] = e->shape[d];
    if (e->i4) {
        dtype = MOE_I4;
        shape[e->ndim - 1] *= 2; /* two nibbles per byte; bytes <= file size */
    }
    if ((dtype == MOE_E2M1 || dtype == MOE_I4) && (e->ndim == 0 || shape[e->ndim - 1] % 2 != 0))
        return moe__err(MOE_ERR_SHAPE,
                        "%s: %s: '%s': %s tensors need an even last dimension (packed two per "
                        "byte)",
                        fn, f->label, nm, moe_dtype_name(dtype));
    size_t abs = f->data_off + (size_t)e->begin;
    size_t nbytes = (size_t)(e->end - e->begin);
    const unsigned char *src = (const unsigned char *)f->st->data + abs;

    if (di->moe >= 0 && nbytes > 0) {
        int bits = moe_dtype_bits(dtype);
        size_t unit = bits >= 8 ? (size_t)bits / 8 : 1;
        if (abs % unit == 0 && ((uintptr_t)f->st->data % unit) == 0) {
            /* zero copy: a view of the mapping, which it keeps alive */
            int64_t off = bits >= 8 ? (int64_t)(abs / unit) : (int64_t)abs * (8 / bits);
            return moe__tensor_wrap(out, f->st, dtype, e->ndim, shape, NULL, off);
        }
    }
    moe_tensor *t = NULL;
    moe_status st = moe_tensor_new(&t, dtype, e->ndim, shape, cpu_dev);
    if (st != MOE_OK) return moe__err_prefix(st, fn, f->label);
    void *dst = moe_tensor_data(t);
    uint64_t n = e->numel;
    switch (e->dtype) {
    case ST_U16:
        for (uint64_t k = 0; k < n; k++) {
            uint16_t v;
            memcpy(&v, src + 2 * k, 2);
            ((int32_t *)dst)[k] = (int32_t)v;
        }
        break;
    case ST_U32:
        for (uint64_t k = 0; k < n; k++) {
            uint32_t v;
            memcpy(&v, src + 4 * k, 4);
            ((int64_t *)dst)[k] = (int64_t)v;
        }
        break;
    case ST_U64:
        for (uint64_t k = 0; k < n; k++) {
            uint64_t v;
            memcpy(&v, src + 8 * k, 8);
            if (v > (uint64_t)INT64_MAX) {
                moe_tensor_free(t);
                return moe__err(MOE_ERR_DTYPE,
                                "%s: %s: '%s': U64 element %" PRIu64 " is %" PRIu64
                                ", over the i64 maximum",
                                fn, f->label, nm, k, v);
            }
            ((int64_t *)dst)[k] = (int64_t)v;
        }
        break;
    case ST_F64:
        for (uint64_t k = 0; k < n; k++) {
            double v;
            memcpy(&v, src + 8 * k, 8);
            ((float *)dst)[k] = (float)v; /* round to nearest even */
        }
        break;
    default:
        if (nbytes) memcpy(dst, src, nbytes);
        break;
    }
    *out = t;
    return MOE_OK;
}

/* ------------------------------------------------------------------ write -- */

typedef struct w_item {
    const char *name;
    int idx;
} w_item;

static int cmp_w_item(const void *a, const void *b) {
    return strcmp(((const w_item *)a)->name, ((const w_item *)b)->name);
}

/* Bytes per element used for data alignment: 8, 4, 2 or 1. */
static int st_align_of(int st_dtype) {
    int bits = st_dtypes[st_dtype].bits;
    return bits >= 8 ? bits / 8 : 1;
}

moe_status moe_st_write(const char *path, int n, const char *const *names,
                        const moe_tensor *const *tensors, int n_meta,
                        const char *const *meta_keys, const char *const *meta_values) {
    static const char fn[] = "moe_st_write";
    if (!path) return moe__err(MOE_ERR_ARG, "%s: path: expected a string, got NULL", fn);
    if (n < 0) return moe__err(MOE_ERR_ARG, "%s: n: expected >= 0, got %d", fn, n);
    if (n_meta < 0) return moe__err(MOE_ERR_ARG, "%s: n_meta: expected >= 0, got %d", fn, n_meta);
    if (n > 0 && (!names || !tensors))
        return moe__err(MOE_ERR_ARG, "%s: %s: expected %d entries, got NULL", fn,
                        !names ? "names" : "tensors", n);
    if (n_meta > 0 && (!meta_keys || !meta_values))
        return moe__err(MOE_ERR_ARG, "%s: %s: expected %d entries, got NULL", fn,
                        !meta_keys ? "meta_keys" : "meta_values", n_meta);
    char nb[72];
    for (int i = 0; i < n; i++) {
        if (!names[i]) return moe__err(MOE_ERR_ARG, "%s: names[%d]: expected a string, got NULL", fn, i);
        if (!tensors[i])
            return moe__err(MOE_ERR_ARG, "%s: tensors[%d] ('%s'): expected a tensor, got NULL", fn,
                            i, shown(names[i], nb, sizeof nb));
        if (!moe__utf8_valid(names[i], strlen(names[i])))
            return moe__err(MOE_ERR_ARG, "%s: names[%d]: expected UTF-8, got invalid bytes", fn, i);
        if (strcmp(names[i], "__metadata__") == 0)
            return moe__err(MOE_ERR_ARG, "%s: names[%d]: \"__metadata__\" is reserved", fn, i);
        if (st_dtype_of_moe(moe_tensor_dtype(tensors[i])) < 0)
            return moe__err(MOE_ERR_DTYPE, "%s: tensors[%d] ('%s'): unsupported dtype %d", fn, i,
                            shown(names[i], nb, sizeof nb), moe_tensor_dtype(tensors[i]));
    }
    for (int i = 0; i < n_meta; i++) {
        if (!meta_keys[i] || !meta_values[i])
            return moe__err(MOE_ERR_ARG, "%s: meta_%s[%d]: expected a string, got NULL", fn,
                            !meta_keys[i] ? "keys" : "values", i);
        if (!moe__utf8_valid(meta_keys[i], strlen(meta_keys[i])) ||
            !moe__utf8_valid(meta_values[i], strlen(meta_values[i])))
            return moe__err(MOE_ERR_ARG, "%s: metadata %d: expected UTF-8, got invalid bytes", fn, i);
        if (strncmp(meta_keys[i], ST_I4_PREFIX, sizeof ST_I4_PREFIX - 1) == 0)
            return moe__err(MOE_ERR_ARG,
                            "%s: meta_keys[%d]: keys starting with \"" ST_I4_PREFIX
                            "\" are reserved, got '%s'",
                            fn, i, shown(meta_keys[i], nb, sizeof nb));
    }
    /* unique names and keys */
    int most = n > n_meta ? n : n_meta;
    w_item *wi = (w_item *)calloc(most ? (size_t)most : 1, sizeof *wi);
    uint64_t *offs = (uint64_t *)calloc(n ? (size_t)n * 2 : 1, sizeof *offs);
    if (!wi || !offs) {
        free(wi);
        free(offs);
        return moe__err(MOE_ERR_NOMEM, "%s: out of host memory", fn);
    }
    moe_status st = MOE_OK;
    for (int pass = 0; pass < 2 && st == MOE_OK; pass++) {
        int cnt = pass == 0 ? n : n_meta;
        for (int i = 0; i < cnt; i++) {
            wi[i].name = pass == 0 ? names[i] : meta_keys[i];
            wi[i].idx = i;
        }
        qsort(wi, (size_t)cnt, sizeof *wi, cmp_w_item);
        for (int i = 1; i < cnt; i++)
            if (strcmp(wi[i - 1].name, wi[i].name) == 0) {
                st = moe__err(MOE_ERR_ARG, "%s: %s: '%s' appears twice (duplicate)", fn,
                              pass == 0 ? "names" : "meta_keys", shown(wi[i].name, nb, sizeof nb));
                break;
            }
    }
    free(wi);
    if (st != MOE_OK) {
        free(offs);
        return st;
    }

    /* data layout: by alignment 8, 4, 2, 1 (stable), with no gaps -- each tensor then starts
     * on a multiple of its element size, as the format's reference writer arranges it */
    uint64_t pos = 0;
    for (int a = 8; a >= 1; a /= 2)
        for (int i = 0; i < n; i++) {
            int sd = st_dtype_of_moe(moe_tensor_dtype(tensors[i]));
            if (st_align_of(sd) != a) continue;
            offs[2 * i] = pos;
            pos += moe_tensor_nbytes(tensors[i]);
            offs[2 * i + 1] = pos;
        }

    /* header */
    moe_buf b = {0};
    int any_i4 = 0;
    for (int i = 0; i < n; i++) any_i4 |= moe_tensor_dtype(tensors[i]) == MOE_I4;
    moe__buf_puts(&b, "{");
    int first = 1;
    if (n_meta > 0 || any_i4) {
        moe__buf_puts(&b, "\"__metadata__\":{");
        for (int i = 0; i < n_meta; i++) {
            if (!first) moe__buf_puts(&b, ",");
            first = 0;
            moe__json_put_string(&b, meta_keys[i], strlen(meta_keys[i]));
            moe__buf_puts(&b, ":");
            moe__json_put_string(&b, meta_values[i], strlen(meta_values[i]));
        }
        for (int i = 0; i < n; i++) {
            if (moe_tensor_dtype(tensors[i]) != MOE_I4) continue;
            if (!first) moe__buf_puts(&b, ",");
            first = 0;
            size_t nl = strlen(names[i]), pl = sizeof ST_I4_PREFIX - 1;
            char *key = (char *)malloc(pl + nl + 1);
            if (!key) {
                b.oom = 1;
                break;
            }
            memcpy(key, ST_I4_PREFIX, pl);
            memcpy(key + pl, names[i], nl + 1);
            moe__json_put_string(&b, key, pl + nl);
            free(key);
            moe__buf_puts(&b, ":\"i4\"");
        }
        moe__buf_puts(&b, "}");
        first = 0;
    }
    for (int i = 0; i < n; i++) {
        const moe_tensor *t = tensors[i];
        int dt = moe_tensor_dtype(t);
        int nd = moe_tensor_ndim(t);
        if (!first) moe__buf_puts(&b, ",");
        first = 0;
        moe__json_put_string(&b, names[i], strlen(names[i]));
        int sdt = st_dtype_of_moe(dt); /* validated above: >= 0 */
        const char *sname = sdt >= 0 && st_dtypes[sdt].name ? st_dtypes[sdt].name : "?";
        moe__buf_printf(&b, ":{\"dtype\":\"%s\",\"shape\":[", sname);
        for (int d = 0; d < nd; d++) {
            int64_t s = moe_tensor_dim(t, d);
            if (dt == MOE_I4 && d == nd - 1) s /= 2; /* bytes */
            moe__buf_printf(&b, "%s%" PRId64, d ? "," : "", s);
        }
        moe__buf_printf(&b, "],\"data_offsets\":[%" PRIu64 ",%" PRIu64 "]}", offs[2 * i],
                        offs[2 * i + 1]);
    }
    moe__buf_puts(&b, "}");
    while (!b.oom && b.len % 8 != 0) moe__buf_puts(&b, " ");
    if (b.oom) {
        moe__buf_free(&b);
        free(offs);
        return moe__err(MOE_ERR_NOMEM, "%s: out of host memory for the header", fn);
    }
    unsigned char len8[8];
    for (int k = 0; k < 8; k++) len8[k] = (unsigned char)((uint64_t)b.len >> (8 * k));

    moe_wfile w;
    st = moe__wfile_open(&w, fn, path);
    if (st == MOE_OK) {
        st = moe__wfile_write(&w, len8, 8);
        if (st == MOE_OK) st = moe__wfile_write(&w, b.p, b.len);
        for (int a = 8; a >= 1 && st == MOE_OK; a /= 2)
            for (int i = 0; i < n && st == MOE_OK; i++) {
                if (st_align_of(st_dtype_of_moe(moe_tensor_dtype(tensors[i]))) != a) continue;
                moe_tensor *tmp = NULL;
                const void *bytes = NULL;
                size_t nbytes = 0;
                st = moe__host_bytes(tensors[i], &tmp, &bytes, &nbytes);
                if (st != MOE_OK) st = moe__err_prefix(st, fn, path);
                else st = moe__wfile_write(&w, bytes, nbytes);
                moe_tensor_free(tmp);
            }
        if (st == MOE_OK) st = moe__wfile_commit(&w);
        else moe__wfile_abort(&w);
    }
    moe__buf_free(&b);
    free(offs);
    return st;
}
