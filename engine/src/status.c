/* status.c -- status codes, the thread's last error message, version and build info. */
#include "internal.h"
#include "backend.h"

#include <stdio.h>
#include <string.h>

#define MOE_ERRBUF 1024

static _Thread_local char moe__errbuf[MOE_ERRBUF];

const char *moe_status_str(int status) {
#define X(name, value, text) \
    if (status == (value)) return text;
    MOE_STATUS_LIST(X)
#undef X
    return "unknown status";
}

const char *moe_status_name(int status) {
#define X(name, value, text) \
    if (status == (value)) return #name;
    MOE_STATUS_LIST(X)
#undef X
    return "MOE_UNKNOWN";
}

const char *moe_last_error(void) { return moe__errbuf; }

void moe_clear_error(void) { moe__errbuf[0] = '\0'; }

moe_status moe__err(moe_status status, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(moe__errbuf, sizeof moe__errbuf, fmt, ap);
    va_end(ap);
    return status;
}

const char *moe_version(void) { return MOE_VERSION_STRING; }

/* One string literal, built at compile time: no lazily filled static buffer that two
 * threads calling this for the first time at once could race on. */
const char *moe_build_info(void) {
#ifdef MOE_HAVE_CUDA
    return "moelab " MOE_VERSION_STRING "; C compiler " MOE_C_COMPILER_ID "; CUDA backend: yes (nvcc "
           MOE_CUDA_VERSION_STRING "; sm_90a + compute_80 PTX)";
#else
    return "moelab " MOE_VERSION_STRING "; C compiler " MOE_C_COMPILER_ID
           "; CUDA backend: no (built without CUDA support)";
#endif
}
