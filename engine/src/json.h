/* json.h -- a small, strict, bounds-checked JSON reader (RFC 8259) and a string writer.
 *
 * Made for safetensors headers: objects, arrays, strings (all escapes, \uXXXX with
 * surrogate pairs, UTF-8 validated), numbers (integers are kept exactly as int64 when they
 * fit; other numbers are only validated), true/false/null, with a nesting limit.
 * The reader never looks past `size` bytes, needs no NUL terminator, and on failure reports
 * the byte position and the reason.  Duplicate object keys are kept (the caller decides).
 * Everything a parse allocates lives in one arena freed by moe__json_free. */
#ifndef MOE_JSON_H
#define MOE_JSON_H

#include <stddef.h>
#include <stdint.h>

typedef enum moe_json_type {
    MOE_JSON_NULL = 0,
    MOE_JSON_FALSE,
    MOE_JSON_TRUE,
    MOE_JSON_NUMBER,
    MOE_JSON_STRING,
    MOE_JSON_ARRAY,
    MOE_JSON_OBJECT
} moe_json_type;

typedef struct moe_json_value moe_json_value;
struct moe_json_value {
    int type;             /* moe_json_type */
    size_t pos;           /* byte offset of the value's first character in the input */
    /* NUMBER */
    int is_int;           /* 1: an integer literal (no fraction/exponent) that fits int64 */
    int64_t ival;         /* its value when is_int */
    /* STRING: decoded UTF-8, NUL-terminated; len excludes the NUL (may hold \u0000). */
    char *str;
    size_t len;
    /* ARRAY / OBJECT: n items; for objects keys[i] / key_len[i] is the key of items[i]. */
    size_t n;
    moe_json_value *items;
    char **keys;
    size_t *key_len;
};

typedef struct moe_json_doc moe_json_doc; /* owns the arena */

typedef struct moe_json_error {
    size_t pos;       /* byte offset where the problem was found */
    char msg[128];    /* e.g. "expected ':' after object key" */
} moe_json_error;

/* Parse exactly `size` bytes (leading/trailing whitespace allowed, nothing else after the
 * value).  max_depth bounds array/object nesting (e.g. 64).  Returns 0 and sets *doc and
 * *root on success; -1 with *err filled on a syntax error, -2 when out of memory. */
int moe__json_parse(const char *text, size_t size, int max_depth, moe_json_doc **doc,
                    const moe_json_value **root, moe_json_error *err);
void moe__json_free(moe_json_doc *doc);

/* Member of an object by key (first match), or NULL. */
const moe_json_value *moe__json_get(const moe_json_value *obj, const char *key);

/* 1 when s[0..len) is valid UTF-8 (no overlongs, no surrogates, <= U+10FFFF). */
int moe__utf8_valid(const char *s, size_t len);

/* ------------------------------------------------------------ writer -- */

/* Growable byte buffer.  Appends never fail loudly: on allocation failure `oom` is set and
 * further appends are ignored; check it once at the end. */
typedef struct moe_buf {
    char *p;
    size_t len, cap;
    int oom;
} moe_buf;

void moe__buf_put(moe_buf *b, const void *s, size_t n);
void moe__buf_puts(moe_buf *b, const char *s);
void moe__buf_printf(moe_buf *b, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;
void moe__buf_free(moe_buf *b);
/* Append s[0..len) as a JSON string literal with quotes; control characters, '"' and '\'
 * are escaped, other bytes are copied (the caller checks UTF-8 validity). */
void moe__json_put_string(moe_buf *b, const char *s, size_t len);

#endif
