/* philox.h -- counter-based RNG (Philox4x32-10) and the engine's own deterministic
 * log/sin/cos, shared by the CPU backend and the CUDA kernels so that both produce the
 * same bits.  Everything is IEEE double +, -, *, / and sqrt (correctly rounded on both
 * sides); the C code is compiled with -ffp-contract=off and the CUDA file that includes
 * this with --fmad=false, so no fused multiply-add changes a rounding.
 *
 * Element i of a tensor (row-major index) uses counter n = i / 4 and lane i % 4:
 *   (x0, x1, x2, x3) = philox4x32_10(ctr = {lo(n), hi(n), 0, 0}, key = {lo(seed), hi(seed)})
 *   uniform:  u = (x_lane >> 8) * 2^-24 in [0, 1);  value = lo + (hi - lo) * u
 *   normal:   lanes (0,1) use (x0, x1), lanes (2,3) use (x2, x3):
 *             u1 = (x_a + 0.5) * 2^-32, u2 = x_b * 2^-32,
 *             r = sqrt(-2 log u1), z = r cos(2 pi u2) (even lane) or r sin(2 pi u2) (odd)
 *             value = mean + std * z
 * The double value is rounded to f32 (RNE) and then to the tensor's dtype. */
#ifndef MOE_PHILOX_H
#define MOE_PHILOX_H

#include <stdint.h>

#ifdef __CUDACC__
#define MOE_PHX __host__ __device__ __forceinline__
#else
#define MOE_PHX static inline
#endif

MOE_PHX void moe__mulhilo32(uint32_t a, uint32_t b, uint32_t *hi, uint32_t *lo) {
    uint64_t p = (uint64_t)a * (uint64_t)b;
    *hi = (uint32_t)(p >> 32);
    *lo = (uint32_t)p;
}

/* Philox4x32 with 10 rounds (Salmon et al., SC'11); constants from the paper. */
MOE_PHX void moe__philox4x32_10(uint64_t counter, uint64_t seed, uint32_t out[4]) {
    uint32_t c0 = (uint32_t)counter, c1 = (uint32_t)(counter >> 32), c2 = 0, c3 = 0;
    uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
    for (int r = 0; r < 10; r++) {
        uint32_t hi0, lo0, hi1, lo1;
        moe__mulhilo32(0xD2511F53u, c0, &hi0, &lo0);
        moe__mulhilo32(0xCD9E8D57u, c2, &hi1, &lo1);
        uint32_t n0 = hi1 ^ c1 ^ k0, n1 = lo1, n2 = hi0 ^ c3 ^ k1, n3 = lo0;
        c0 = n0; c1 = n1; c2 = n2; c3 = n3;
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    out[0] = c0; out[1] = c1; out[2] = c2; out[3] = c3;
}

/* Natural log of u in (0, 1], |error| < 1e-15 relative.  u = m 2^e, m in [sqrt(.5), sqrt(2)),
 * log m = 2 atanh(s), s = (m - 1)/(m + 1). */
MOE_PHX double moe__det_log(double u) {
    /* u >= 2^-33 here (uniforms are (x + .5) 2^-32), so no subnormals. */
    int e = 0;
    double m = u;
    while (m < 0.70710678118654752440) { m *= 2.0; e -= 1; }
    while (m >= 1.41421356237309504880) { m *= 0.5; e += 1; }
    double s = (m - 1.0) / (m + 1.0);
    double s2 = s * s;
    /* 2 (s + s^3/3 + ... + s^23/23) */
    double p = 1.0 / 23.0;
    p = p * s2 + 1.0 / 21.0;
    p = p * s2 + 1.0 / 19.0;
    p = p * s2 + 1.0 / 17.0;
    p = p * s2 + 1.0 / 15.0;
    p = p * s2 + 1.0 / 13.0;
    p = p * s2 + 1.0 / 11.0;
    p = p * s2 + 1.0 / 9.0;
    p = p * s2 + 1.0 / 7.0;
    p = p * s2 + 1.0 / 5.0;
    p = p * s2 + 1.0 / 3.0;
    p = p * s2 + 1.0;
    return (double)e * 0.69314718055994530942 + 2.0 * s * p;
}

/* sin and cos of a in [-pi/4, pi/4] by Taylor series to degree 19/18. */
MOE_PHX void moe__det_sincos_small(double a, double *s, double *c) {
    double a2 = a * a;
    /* sin: a - a^3/3! + a^5/5! - ... - a^19/19!, Horner in a^2 */
    double ps = -1.0 / 121645100408832000.0; /* -1/19! */
    ps = ps * a2 + 1.0 / 355687428096000.0;  /* 1/17! */
    ps = ps * a2 - 1.0 / 1307674368000.0;    /* 1/15! */
    ps = ps * a2 + 1.0 / 6227020800.0;       /* 1/13! */
    ps = ps * a2 - 1.0 / 39916800.0;         /* 1/11! */
    ps = ps * a2 + 1.0 / 362880.0;           /* 1/9! */
    ps = ps * a2 - 1.0 / 5040.0;             /* 1/7! */
    ps = ps * a2 + 1.0 / 120.0;              /* 1/5! */
    ps = ps * a2 - 1.0 / 6.0;                /* 1/3! */
    ps = ps * a2 + 1.0;
    *s = a * ps;
    /* cos: 1 - a^2/2! + a^4/4! - ... - a^18/18!, Horner in a^2 */
    double pc = -1.0 / 6402373705728000.0;   /* -1/18! */
    pc = pc * a2 + 1.0 / 20922789888000.0;   /* 1/16! */
    pc = pc * a2 - 1.0 / 87178291200.0;      /* 1/14! */
    pc = pc * a2 + 1.0 / 479001600.0;        /* 1/12! */
    pc = pc * a2 - 1.0 / 3628800.0;          /* 1/10! */
    pc = pc * a2 + 1.0 / 40320.0;            /* 1/8! */
    pc = pc * a2 - 1.0 / 720.0;              /* 1/6! */
    pc = pc * a2 + 1.0 / 24.0;               /* 1/4! */
    pc = pc * a2 - 0.5;                      /* 1/2! */
    pc = pc * a2 + 1.0;
    *c = pc;
}

/* sin and cos of 2 pi x for x in [0, 1). */
MOE_PHX void moe__det_sincos_2pi(double x, double *s, double *c) {
    double x4 = x * 4.0;             /* exact */
    int q = (int)x4;                 /* quadrant 0..3 */
    double f = x4 - (double)q;       /* exact, in [0, 1) */
    const double half_pi = 1.57079632679489661923;
    double ss, cc;
    if (f <= 0.5) {
        moe__det_sincos_small(f * half_pi, &ss, &cc);
    } else {
        double c2, s2;
        moe__det_sincos_small((1.0 - f) * half_pi, &c2, &s2); /* sin(pi/2 - b) = cos b */
        ss = s2;
        cc = c2;
    }
    switch (q & 3) {
    case 0: *s = ss; *c = cc; break;
    case 1: *s = cc; *c = -ss; break;
    case 2: *s = -ss; *c = -cc; break;
    default: *s = -cc; *c = ss; break;
    }
}

#ifndef __CUDACC__
#include <math.h>
#endif
/* IEEE sqrt is correctly rounded on the host and in CUDA double precision. */
MOE_PHX double moe__sqrt_d(double x) { return sqrt(x); }

/* The double value of element i (see the header comment).  kind 0 uniform, 1 normal. */
MOE_PHX double moe__rng_value(uint64_t seed, uint64_t i, int kind, double a, double b) {
    uint32_t x[4];
    moe__philox4x32_10(i >> 2, seed, x);
    int lane = (int)(i & 3);
    if (kind == 0) {
        double u = (double)(x[lane] >> 8) * (1.0 / 16777216.0);
        return a + (b - a) * u;
    }
    int pair = lane >> 1;
    double u1 = ((double)x[2 * pair] + 0.5) * (1.0 / 4294967296.0);
    double u2 = (double)x[2 * pair + 1] * (1.0 / 4294967296.0);
    double r = moe__sqrt_d(-2.0 * moe__det_log(u1));
    double s, c;
    moe__det_sincos_2pi(u2, &s, &c);
    double z = (lane & 1) ? r * s : r * c;
    return a + b * z;
}

#endif
