/* test_fp.c -- the device's comparison encoder of e2m1 (fp.h, moe__e2m1_mag_cmp) against the
 * generic rounding (moe__minifloat_mag, the host's encoder), and the device's code-free rounding
 * (moe__e2m1_round_bf16) against the bf16 value of the generic code, both signs: every float within 4096 ulps of
 * each rounding boundary and of each code value, every 61st float up to 64, and the special
 * magnitudes.  The CUDA quantisers' bit-for-bit specs (spec/quant_gpu_spec.lua) check the
 * device end to end; this pins down the boundaries on any machine. */
#include "fp.h"

#include <math.h>
#include "check.h"

/* The generic encoder of a magnitude (not NaN): moe__f32_to_e2m1's host path. */
static uint32_t generic(float a) {
    if (moe__f32_bits(a) == 0x7F800000u) return 7;
    uint32_t m = moe__minifloat_mag(a, 1, 1);
    return m > 7 ? 7 : m;
}

static int bad;

/* moe__e2m1_round_bf16(f) against the bf16 of the code's value (NaN -> +0). */
static void rounded(uint32_t bits) {
    const float f = moe__bits_f32(bits);
    const uint32_t want = moe__f32_bits(moe__e2m1_to_f32(moe__f32_to_e2m1(f))) >> 16;
    const uint32_t got = moe__e2m1_round_bf16(f);
    if (got != want && bad++ < 10)
        fprintf(stderr, "e2m1 value of %.9g (0x%08X): rounded 0x%04X, code's 0x%04X\n", f, (unsigned)bits,
                (unsigned)got, (unsigned)want);
}

static void one(uint32_t bits) {
    rounded(bits & 0x7FFFFFFFu);
    rounded(bits | 0x80000000u);
    const float a = moe__bits_f32(bits & 0x7FFFFFFFu);
    if (a != a) return;
    if (moe__e2m1_mag_cmp(a) != generic(a) && bad++ < 10)
        fprintf(stderr, "e2m1 of %.9g (0x%08X): comparisons %u, generic %u\n", a, (unsigned)moe__f32_bits(a),
                (unsigned)moe__e2m1_mag_cmp(a), (unsigned)generic(a));
}

int main(void) {
    const float marks[] = {0.0f, 0.25f, 0.5f, 0.75f, 1.0f, 1.25f, 1.5f, 1.75f, 2.0f,
                           2.5f, 3.0f, 3.5f, 4.0f, 5.0f, 6.0f, 7.0f, 8.0f};
    long n = 0;
    for (size_t i = 0; i < sizeof marks / sizeof marks[0]; i++) {
        const int64_t c = (int64_t)moe__f32_bits(marks[i]);
        for (int64_t d = -4096; d <= 4096; d++)
            if (c + d >= 0) {
                one((uint32_t)(c + d));
                n++;
            }
    }
    for (uint32_t b = 0; b <= 0x42800000u; b += 61) { /* 0 .. 64 */
        one(b);
        n++;
    }
    for (uint32_t b = 0x42800000u; b < 0x7F800000u; b += 4099) { /* 64 .. inf, sparser */
        one(b);
        n++;
    }
    const uint32_t special[] = {0x00000001u, 0x007FFFFFu, 0x00800000u, 0x7F7FFFFFu, 0x7F800000u, 0x4B000000u,
                                0x4B800000u, 0x4C000000u, 0x7F800001u, 0x7FC00000u, 0x7FFFFFFFu};
    for (size_t i = 0; i < sizeof special / sizeof special[0]; i++) one(special[i]);
    CHECK(bad == 0);
    /* the ties by hand: even codes */
    CHECK(moe__e2m1_mag_cmp(0.25f) == 0 && moe__e2m1_mag_cmp(0.75f) == 2 && moe__e2m1_mag_cmp(1.25f) == 2);
    CHECK(moe__e2m1_mag_cmp(1.75f) == 4 && moe__e2m1_mag_cmp(2.5f) == 4 && moe__e2m1_mag_cmp(3.5f) == 6);
    CHECK(moe__e2m1_mag_cmp(5.0f) == 6 && moe__e2m1_mag_cmp(6.0f) == 7 && moe__e2m1_mag_cmp(INFINITY) == 7);
    /* the rounded values by hand (bf16 bits): ties to the even code, saturation, signs, NaN */
    CHECK(moe__e2m1_round_bf16(0.25f) == 0x0000u && moe__e2m1_round_bf16(0.75f) == 0x3F80u);
    CHECK(moe__e2m1_round_bf16(1.25f) == 0x3F80u && moe__e2m1_round_bf16(1.75f) == 0x4000u);
    CHECK(moe__e2m1_round_bf16(2.5f) == 0x4000u && moe__e2m1_round_bf16(3.5f) == 0x4080u);
    CHECK(moe__e2m1_round_bf16(5.0f) == 0x4080u && moe__e2m1_round_bf16(5.5f) == 0x40C0u);
    CHECK(moe__e2m1_round_bf16(-INFINITY) == 0xC0C0u && moe__e2m1_round_bf16(-0.1f) == 0x8000u);
    CHECK(moe__e2m1_round_bf16(-1.4f) == 0xBFC0u && moe__e2m1_round_bf16(moe__bits_f32(0xFFC00000u)) == 0);
    printf("test_fp: %ld magnitudes compared, %d checks, %d failures\n", n, checks, failures);
    return failures != 0;
}
