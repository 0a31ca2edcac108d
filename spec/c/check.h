/* check.h -- the tiny assertion kit of the C tests: CHECK counts a condition, CHECK_ERR checks
 * a call's status and that moe_last_error() contains a needle.  Each test's main prints the
 * counts and returns failures != 0. */
#ifndef MOE_SPEC_CHECK_H
#define MOE_SPEC_CHECK_H

#include "moe.h"

#include <stdio.h>
#include <string.h>

static int failures, checks;

#define CHECK(cond)                                                                  \
    do {                                                                             \
        checks++;                                                                    \
        if (!(cond)) {                                                               \
            failures++;                                                              \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
        }                                                                            \
    } while (0)

#define CHECK_ERR(expr, code, needle)                                                          \
    do {                                                                                       \
        int st_ = (expr);                                                                      \
        checks++;                                                                              \
        if (st_ != (code) || !strstr(moe_last_error(), needle)) {                              \
            failures++;                                                                        \
            fprintf(stderr, "%s:%d: expected %s containing '%s', got %s: '%s'\n", __FILE__,    \
                    __LINE__, moe_status_name(code), needle, moe_status_name(st_),             \
                    moe_last_error());                                                         \
        }                                                                                      \
    } while (0)

#endif
