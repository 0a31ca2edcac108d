/* fuzz_safetensors.c -- libFuzzer target: parse arbitrary bytes as a safetensors file and read
 * every entry and metadata pair.  Built by spec/fuzz.cmake (MOE_FUZZ=ON, clang). */
#include "moe.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    moe_st_file *f = NULL;
    if (moe_st_open_memory(data, size, &f) != MOE_OK) {
        if (f) abort(); /* no handle on failure */
        if (!moe_last_error()[0]) abort(); /* every failure has a message */
        return 0;
    }
    int n = moe_st_count(f);
    for (int i = 0; i < n; i++) {
        const char *name = moe_st_name(f, i);
        if (!name) abort();
        if (moe_st_find(f, name) != i) abort(); /* names are unique */
        moe_tensor *t = NULL;
        if (moe_st_get(f, i, &t) != MOE_OK) continue;
        int64_t numel = moe_tensor_numel(t);
        if (numel > 0 && numel <= 4096) {
            double *v = (double *)malloc((size_t)numel * sizeof *v);
            if (v && moe_tensor_read_f64(t, v, numel) != MOE_OK) abort();
            free(v);
        }
        /* touch the whole byte range through the raw pointer as well */
        size_t nb = moe_tensor_nbytes(t);
        const volatile uint8_t *p = (const volatile uint8_t *)moe_tensor_data(t);
        uint8_t acc = 0;
        for (size_t k = 0; k < nb; k++) acc ^= p[k];
        (void)acc;
        moe_tensor_free(t);
    }
    for (int i = 0; i < moe_st_meta_count(f); i++) {
        const char *k = moe_st_meta_key(f, i), *v = moe_st_meta_value(f, i);
        if (!k || !v) abort();
        (void)strlen(k);
        (void)strlen(v);
    }
    moe_st_close(f);
    return 0;
}
