/* json.c -- strict, bounds-checked JSON reader and string writer (see json.h). */
#include "json.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ----------------------------------------------------------------- arena -- */

typedef struct arena_block {
    struct arena_block *next;
    size_t used, cap;
    /* data follows, max_align_t aligned */
} arena_block;

#define ARENA_HDR ((sizeof(arena_block) + 15u) & ~(size_t)15u)

struct moe_json_doc {
    arena_block *head;
    moe_json_value root;
};

static void *arena_alloc(moe_json_doc *d, size_t n) {
    n = (n + 15u) & ~(size_t)15u;
    if (n == 0) n = 16;
    arena_block *b = d->head;
    if (!b || b->cap - b->used < n) {
        size_t cap = n > 16384 ? n : 16384;
        b = (arena_block *)malloc(ARENA_HDR + cap);
        if (!b) return NULL;
        b->next = d->head;
        b->used = 0;
        b->cap = cap;
        d->head = b;
    }
    void *p = (char *)b + ARENA_HDR + b->used;
    b->used += n;
    return p;
}

void moe__json_free(moe_json_doc *doc) {
    if (!doc) return;
    arena_block *b = doc->head;
    while (b) {
        arena_block *nx = b->next;
        free(b);
        b = nx;
    }
    free(doc);
}

/* ---------------------------------------------------------------- parser -- */

typedef struct parser {
    const unsigned char *s;
    size_t n, i;
    int depth, max_depth;
    int oom;
    moe_json_doc *doc;
    moe_json_error *err;
} parser;

static int fail(parser *p, size_t pos, const char *fmt, ...) {
    if (p->err) {
        va_list ap;
        va_start(ap, fmt);
        p->err->pos = pos;
        vsnprintf(p->err->msg, sizeof p->err->msg, fmt, ap);
        va_end(ap);
    }
    return -1;
}

static int nomem(parser *p) {
    p->oom = 1;
    if (p->err) {
        p->err->pos = p->i;
        snprintf(p->err->msg, sizeof p->err->msg, "out of memory");
    }
    return -1;
}

static void skip_ws(parser *p) {
    while (p->i < p->n) {
        unsigned char c = p->s[p->i];
        if (c != ' ' && c != '\t' && c != '\n' && c != '\r') break;
        p->i++;
    }
}

/* Length of the valid UTF-8 sequence at s[0..n) (1..4), or 0 when invalid. */
static size_t utf8_seq(const unsigned char *s, size_t n) {
    unsigned char c = s[0];
    if (c < 0x80) return 1;
    size_t len;
    uint32_t cp;
    if (c >= 0xC2 && c <= 0xDF) {
        len = 2;
        cp = c & 0x1F;
    } else if (c >= 0xE0 && c <= 0xEF) {
        len = 3;
        cp = c & 0x0F;
    } else if (c >= 0xF0 && c <= 0xF4) {
        len = 4;
        cp = c & 0x07;
    } else {
        return 0;
    }
    if (n < len) return 0;
    for (size_t k = 1; k < len; k++) {
        if ((s[k] & 0xC0) != 0x80) return 0;
        cp = (cp << 6) | (s[k] & 0x3F);
    }
    if (len == 3 && (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF))) return 0;
    if (len == 4 && (cp < 0x10000 || cp > 0x10FFFF)) return 0;
    return len;
}

int moe__utf8_valid(const char *s, size_t len) {
    const unsigned char *u = (const unsigned char *)s;
    size_t i = 0;
    while (i < len) {
        size_t k = utf8_seq(u + i, len - i);
        if (!k) return 0;
        i += k;
    }
    return 1;
}

static int hex4(parser *p, size_t at, uint32_t *out) {
    if (p->n - at < 4) return fail(p, at, "truncated \\u escape");
    uint32_t v = 0;
    for (size_t k = 0; k < 4; k++) {
        unsigned char c = p->s[at + k];
        uint32_t d;
        if (c >= '0' && c <= '9') d = (uint32_t)(c - '0');
        else if (c >= 'a' && c <= 'f') d = (uint32_t)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F') d = (uint32_t)(c - 'A' + 10);
        else return fail(p, at + k, "invalid hex digit in \\u escape");
        v = (v << 4) | d;
    }
    *out = v;
    return 0;
}

static size_t put_utf8(char *o, uint32_t cp) {
    if (cp < 0x80) {
        o[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        o[0] = (char)(0xC0 | (cp >> 6));
        o[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        o[0] = (char)(0xE0 | (cp >> 12));
        o[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        o[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    o[0] = (char)(0xF0 | (cp >> 18));
    o[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    o[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
    o[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

/* p->i is at the opening quote.  Decodes into the arena. */
static int parse_string(parser *p, char **out, size_t *out_len) {
    size_t start = p->i + 1, j = start;
    /* find the closing quote: decoded length <= raw length */
    for (;;) {
        if (j >= p->n) return fail(p, p->i, "unterminated string");
        unsigned char c = p->s[j];
        if (c == '"') break;
        if (c == '\\') {
            j += 2;
            continue;
        }
        j++;
    }
    size_t raw = j - start;
    char *o = (char *)arena_alloc(p->doc, raw + 1);
    if (!o) return nomem(p);
    size_t w = 0, k = start;
    while (k < j) {
        unsigned char c = p->s[k];
        if (c < 0x20) return fail(p, k, "control character 0x%02x in string", c);
        if (c == '\\') {
            /* j is the closing quote, so k + 1 < j <= n holds */
            unsigned char e = p->s[k + 1];
            switch (e) {
            case '"': o[w++] = '"'; k += 2; break;
            case '\\': o[w++] = '\\'; k += 2; break;
            case '/': o[w++] = '/'; k += 2; break;
            case 'b': o[w++] = '\b'; k += 2; break;
            case 'f': o[w++] = '\f'; k += 2; break;
            case 'n': o[w++] = '\n'; k += 2; break;
            case 'r': o[w++] = '\r'; k += 2; break;
            case 't': o[w++] = '\t'; k += 2; break;
            case 'u': {
                uint32_t cp;
                if (j - (k + 2) < 4) return fail(p, k, "truncated \\u escape");
                if (hex4(p, k + 2, &cp)) return -1;
                k += 6;
                if (cp >= 0xDC00 && cp <= 0xDFFF)
                    return fail(p, k - 6, "unpaired low surrogate in \\u escape");
                if (cp >= 0xD800 && cp <= 0xDBFF) {
                    uint32_t lo;
                    if (j - k < 6 || p->s[k] != '\\' || p->s[k + 1] != 'u')
                        return fail(p, k - 6, "unpaired high surrogate in \\u escape");
                    if (hex4(p, k + 2, &lo)) return -1;
                    if (lo < 0xDC00 || lo > 0xDFFF)
                        return fail(p, k, "high surrogate not followed by a low surrogate");
                    cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                    k += 6;
                }
                w += put_utf8(o + w, cp);
                break;
            }
            default:
                return fail(p, k, "invalid escape '\\%c'", e >= 0x20 && e < 0x7F ? e : '?');
            }
            continue;
        }
        if (c < 0x80) {
            o[w++] = (char)c;
            k++;
            continue;
        }
        size_t len = utf8_seq(p->s + k, j - k);
        if (!len) return fail(p, k, "invalid UTF-8 in string");
        memcpy(o + w, p->s + k, len);
        w += len;
        k += len;
    }
    o[w] = '\0';
    *out = o;
    *out_len = w;
    p->i = j + 1;
    return 0;
}

static int is_digit(unsigned char c) { return c >= '0' && c <= '9'; }

static int parse_number(parser *p, moe_json_value *v) {
    size_t i = p->i;
    int neg = 0;
    if (i < p->n && p->s[i] == '-') {
        neg = 1;
        i++;
    }
    if (i >= p->n || !is_digit(p->s[i])) return fail(p, p->i, "invalid number");
    /* magnitude accumulated as uint64 with overflow detection */
    uint64_t mag = 0;
    int overflow = 0;
    if (p->s[i] == '0') {
        i++;
        if (i < p->n && is_digit(p->s[i])) return fail(p, p->i, "leading zero in number");
    } else {
        while (i < p->n && is_digit(p->s[i])) {
            uint64_t d = (uint64_t)(p->s[i] - '0');
            if (mag > (UINT64_MAX - d) / 10) overflow = 1;
            else mag = mag * 10 + d;
            i++;
        }
    }
    int is_int = 1;
    if (i < p->n && p->s[i] == '.') {
        i++;
        if (i >= p->n || !is_digit(p->s[i])) return fail(p, i, "digit expected after '.'");
        while (i < p->n && is_digit(p->s[i])) i++;
        is_int = 0;
    }
    if (i < p->n && (p->s[i] == 'e' || p->s[i] == 'E')) {
        i++;
        if (i < p->n && (p->s[i] == '+' || p->s[i] == '-')) i++;
        if (i >= p->n || !is_digit(p->s[i])) return fail(p, i, "digit expected in exponent");
        while (i < p->n && is_digit(p->s[i])) i++;
        is_int = 0;
    }
    v->type = MOE_JSON_NUMBER;
    v->is_int = 0;
    if (is_int && !overflow) {
        if (!neg && mag <= (uint64_t)INT64_MAX) {
            v->is_int = 1;
            v->ival = (int64_t)mag;
        } else if (neg && mag <= (uint64_t)INT64_MAX + 1u) {
            v->is_int = 1;
            v->ival = mag == (uint64_t)INT64_MAX + 1u ? INT64_MIN : -(int64_t)mag;
        }
    }
    p->i = i;
    return 0;
}

static int literal(parser *p, const char *word, int type, moe_json_value *v) {
    size_t len = strlen(word);
    if (p->n - p->i < len || memcmp(p->s + p->i, word, len) != 0)
        return fail(p, p->i, "invalid literal");
    v->type = type;
    p->i += len;
    return 0;
}

static int parse_value(parser *p, moe_json_value *v);

/* Growable temporary vector of values (and keys for objects), moved into the arena at the
 * end of the container. */
typedef struct vec {
    moe_json_value *items;
    char **keys;
    size_t *key_len;
    size_t n, cap;
} vec;

static void vec_free(vec *a) {
    free(a->items);
    free(a->keys);
    free(a->key_len);
}

static int vec_grow(vec *a, int with_keys) {
    if (a->n < a->cap) return 0;
    size_t cap = a->cap ? a->cap * 2 : 8;
    moe_json_value *it = (moe_json_value *)realloc(a->items, cap * sizeof *it);
    if (!it) return -1;
    a->items = it;
    if (with_keys) {
        char **k = (char **)realloc(a->keys, cap * sizeof *k);
        if (!k) return -1;
        a->keys = k;
        size_t *kl = (size_t *)realloc(a->key_len, cap * sizeof *kl);
        if (!kl) return -1;
        a->key_len = kl;
    }
    a->cap = cap;
    return 0;
}

static int vec_finish(parser *p, vec *a, moe_json_value *v, int with_keys) {
    v->n = a->n;
    v->items = NULL;
    v->keys = NULL;
    v->key_len = NULL;
    if (a->n) {
        v->items = (moe_json_value *)arena_alloc(p->doc, a->n * sizeof *v->items);
        if (!v->items) return nomem(p);
        memcpy(v->items, a->items, a->n * sizeof *v->items);
        if (with_keys) {
            v->keys = (char **)arena_alloc(p->doc, a->n * sizeof *v->keys);
            v->key_len = (size_t *)arena_alloc(p->doc, a->n * sizeof *v->key_len);
            if (!v->keys || !v->key_len) return nomem(p);
            memcpy(v->keys, a->keys, a->n * sizeof *v->keys);
            memcpy(v->key_len, a->key_len, a->n * sizeof *v->key_len);
        }
    }
    return 0;
}

static int parse_container(parser *p, moe_json_value *v, int object) {
    size_t open = p->i;
    if (p->depth >= p->max_depth)
        return fail(p, open, "nesting deeper than %d levels", p->max_depth);
    p->depth++;
    p->i++; /* '[' or '{' */
    vec a = {0};
    int rc = -1;
    char close = object ? '}' : ']';
    skip_ws(p);
    if (p->i < p->n && p->s[p->i] == (unsigned char)close) {
        p->i++;
        goto done;
    }
    for (;;) {
        if (vec_grow(&a, object)) {
            nomem(p);
            goto out;
        }
        skip_ws(p);
        if (object) {
            if (p->i >= p->n || p->s[p->i] != '"') {
                fail(p, p->i, "expected a string key in object");
                goto out;
            }
            if (parse_string(p, &a.keys[a.n], &a.key_len[a.n])) goto out;
            skip_ws(p);
            if (p->i >= p->n || p->s[p->i] != ':') {
                fail(p, p->i, "expected ':' after object key");
                goto out;
            }
            p->i++;
            skip_ws(p);
        }
        if (parse_value(p, &a.items[a.n])) goto out;
        a.n++;
        skip_ws(p);
        if (p->i >= p->n) {
            fail(p, open, "unterminated %s", object ? "object" : "array");
            goto out;
        }
        if (p->s[p->i] == ',') {
            p->i++;
            continue;
        }
        if (p->s[p->i] == (unsigned char)close) {
            p->i++;
            break;
        }
        fail(p, p->i, "expected ',' or '%c' in %s", close, object ? "object" : "array");
        goto out;
    }
done:
    v->type = object ? MOE_JSON_OBJECT : MOE_JSON_ARRAY;
    rc = vec_finish(p, &a, v, object);
out:
    vec_free(&a);
    p->depth--;
    return rc;
}

static int parse_value(parser *p, moe_json_value *v) {
    memset(v, 0, sizeof *v);
    skip_ws(p);
    v->pos = p->i;
    if (p->i >= p->n) return fail(p, p->i, "unexpected end of input, expected a value");
    unsigned char c = p->s[p->i];
    switch (c) {
    case '{': return parse_container(p, v, 1);
    case '[': return parse_container(p, v, 0);
    case '"':
        v->type = MOE_JSON_STRING;
        return parse_string(p, &v->str, &v->len);
    case 't': return literal(p, "true", MOE_JSON_TRUE, v);
    case 'f': return literal(p, "false", MOE_JSON_FALSE, v);
    case 'n': return literal(p, "null", MOE_JSON_NULL, v);
    default:
        if (c == '-' || is_digit(c)) return parse_number(p, v);
        if (c >= 0x20 && c < 0x7F) return fail(p, p->i, "unexpected character '%c'", c);
        return fail(p, p->i, "unexpected byte 0x%02x", c);
    }
}

int moe__json_parse(const char *text, size_t size, int max_depth, moe_json_doc **doc,
                    const moe_json_value **root, moe_json_error *err) {
    *doc = NULL;
    *root = NULL;
    if (err) {
        err->pos = 0;
        err->msg[0] = '\0';
    }
    moe_json_doc *d = (moe_json_doc *)calloc(1, sizeof *d);
    if (!d) return -2;
    parser p = {(const unsigned char *)text, size, 0, 0, max_depth > 0 ? max_depth : 1, 0, d,
                err};
    if (parse_value(&p, &d->root) == 0) {
        skip_ws(&p);
        if (p.i == p.n) {
            *doc = d;
            *root = &d->root;
            return 0;
        }
        fail(&p, p.i, "trailing characters after the JSON value");
    }
    moe__json_free(d);
    return p.oom ? -2 : -1;
}

const moe_json_value *moe__json_get(const moe_json_value *obj, const char *key) {
    if (!obj || obj->type != MOE_JSON_OBJECT) return NULL;
    size_t kl = strlen(key);
    for (size_t i = 0; i < obj->n; i++)
        if (obj->key_len[i] == kl && memcmp(obj->keys[i], key, kl) == 0) return &obj->items[i];
    return NULL;
}

/* ---------------------------------------------------------------- writer -- */

void moe__buf_put(moe_buf *b, const void *s, size_t n) {
    if (b->oom || n == 0) return;
    if (b->cap - b->len < n + 1) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap - b->len < n + 1) {
            if (cap > SIZE_MAX / 2) {
                b->oom = 1;
                return;
            }
            cap *= 2;
        }
        char *q = (char *)realloc(b->p, cap);
        if (!q) {
            b->oom = 1;
            return;
        }
        b->p = q;
        b->cap = cap;
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
}

void moe__buf_puts(moe_buf *b, const char *s) { moe__buf_put(b, s, strlen(s)); }

void moe__buf_printf(moe_buf *b, const char *fmt, ...) {
    char tmp[256];
    va_list ap;
    va_start(ap, fmt);
    int k = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (k < 0 || (size_t)k >= sizeof tmp) {
        b->oom = 1; /* only used for short numeric fragments */
        return;
    }
    moe__buf_put(b, tmp, (size_t)k);
}

void moe__buf_free(moe_buf *b) {
    free(b->p);
    b->p = NULL;
    b->len = b->cap = 0;
}

void moe__json_put_string(moe_buf *b, const char *s, size_t len) {
    static const char hex[] = "0123456789abcdef";
    moe__buf_put(b, "\"", 1);
    size_t run = 0; /* start of the pending unescaped run */
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c >= 0x20 && c != '"' && c != '\\') continue;
        moe__buf_put(b, s + run, i - run);
        run = i + 1;
        char e[6];
        switch (c) {
        case '"': moe__buf_put(b, "\\\"", 2); break;
        case '\\': moe__buf_put(b, "\\\\", 2); break;
        case '\n': moe__buf_put(b, "\\n", 2); break;
        case '\r': moe__buf_put(b, "\\r", 2); break;
        case '\t': moe__buf_put(b, "\\t", 2); break;
        case '\b': moe__buf_put(b, "\\b", 2); break;
        case '\f': moe__buf_put(b, "\\f", 2); break;
        default:
            e[0] = '\\'; e[1] = 'u'; e[2] = '0'; e[3] = '0';
            e[4] = hex[c >> 4]; e[5] = hex[c & 15];
            moe__buf_put(b, e, 6);
        }
    }
    moe__buf_put(b, s + run, len - run);
    moe__buf_put(b, "\"", 1);
}
