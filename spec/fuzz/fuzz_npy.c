/* fuzz_npy.c -- libFuzzer target: parse arbitrary bytes as a .npy file and read the values.
 * Built by spec/fuzz.cmake (MOE_FUZZ=ON, clang). */
#include "moe.h"

#include <stdint.h>
#include <stdlib.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    moe_tensor *t = NULL;
    if (moe_npy_parse(data, size, &t) != MOE_OK) {
        if (t) abort();
        if (!moe_last_error()[0]) abort();
        return 0;
    }
    int64_t numel = moe_tensor_numel(t);
    if (numel > 0 && numel <= 4096) {
        double *v = (double *)malloc((size_t)numel * sizeof *v);
        if (v && moe_tensor_read_f64(t, v, numel) != MOE_OK) abort();
        free(v);
    }
    size_t nb = moe_tensor_nbytes(t);
    const volatile uint8_t *p = (const volatile uint8_t *)moe_tensor_data(t);
    uint8_t acc = 0;
    for (size_t k = 0; k < nb; k++) acc ^= p[k];
    (void)acc;
    moe_tensor_free(t);
    return 0;
}
