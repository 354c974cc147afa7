# Token sampling kernels: greedy argmax, penalties, logit bias, temperature, top-k, top-p, min-p and a
# seeded inverse-CDF draw over rows of float32 or float16 logits.
#
# engine/sampling.py holds the definition every step follows (its module docstring) and a numpy
# reference of each step; this module computes the same numbers, bit for bit on x86-64 builds, without
# sorting the vocabulary and without allocating during a call.
#
# Layout: the loops over the whole vocabulary (float16 widening, NaN cleanup + penalties + temperature,
# max, the float32 exp and the integer weight sums) are C in the verbatim block below, with SSE2
# intrinsics, AVX2 copies of the two heaviest ones chosen at run time, and a scalar path; all of them
# compute identical values. The selection logic (heap, radix select, draw, log-probabilities) is
# Cython. Directives are set once in setup.py.

from libc.math cimport INFINITY, ldexp, log
from libc.stdint cimport int32_t, int64_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

cimport numpy as cnp

import numpy as np

cnp.import_array()

cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    #include <math.h>
    /* -DENG_NO_SIMD builds the scalar code only (how non-x86 machines run; used to test it on x86) */
    #if !defined(ENG_NO_SIMD) && (defined(__SSE2__) || defined(_M_X64) || (defined(_M_IX86_FP) && _M_IX86_FP >= 2))
    #include <emmintrin.h>
    #define ENG_SSE2 1
    #else
    #define ENG_SSE2 0
    #endif
    /* AVX2 copies of the heaviest loops, chosen at run time (gcc and clang on x86). They perform the
       same operations lane for lane as the SSE2 and scalar code (target "avx2,f16c" does not enable
       FMA contraction), so results do not depend on the CPU. */
    #if ENG_SSE2 && (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
    #include <immintrin.h>
    #define ENG_AVX2 1
    #define ENG_TARGET_AVX2 __attribute__((target("avx2,f16c")))
    #else
    #define ENG_AVX2 0
    #endif
    static int eng_avx2_enabled = 0;
    static int eng_cpu_has_avx2(void) {
    #if ENG_AVX2
        __builtin_cpu_init();
        return (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c")) ? 1 : 0;
    #else
        return 0;
    #endif
    }

    /* Every float operation below is one IEEE single or double operation; the numpy reference in
       engine/sampling.py performs the same ones in the same order. Builds that let the compiler
       contract a*b+c into a fused multiply-add (-mfma, some non-x86 targets) may differ in the last
       bit of a weight. */

    static inline float eng_f32_from_bits(uint32_t u) { float f; memcpy(&f, &u, sizeof f); return f; }
    static inline uint32_t eng_bits_from_f32(float f) { uint32_t u; memcpy(&u, &f, sizeof u); return u; }
    static inline int64_t eng_bits_from_f64(double f) { int64_t u; memcpy(&u, &f, sizeof u); return u; }

    /* IEEE half -> float, exact: the 15 magnitude bits shifted into a float are the value times
       2^-112 (normal and subnormal halves alike); inf and NaN get the float exponent. */
    static inline float eng_half_to_float(uint16_t h) {
        uint32_t em = (uint32_t)(h & 0x7fffu);
        float mag = eng_f32_from_bits(em << 13) * 0x1p112f;
        if (em >= 0x7c00u) mag = eng_f32_from_bits((em << 13) | 0x7f800000u);
        return eng_f32_from_bits(eng_bits_from_f32(mag) | ((uint32_t)(h & 0x8000u) << 16));
    }

    /* exp(d) for d <= 0 (never NaN), float32: Cody-Waite reduction d = n ln2 + r, |r| <= ln2/2, and the
       degree-7 Taylor polynomial of exp(r); relative error below 1e-7. 0 below -87 (and for -inf). */
    #define ENG_EXP_FLOOR (-87.0f)
    static inline float eng_exp_rel(float d) {
        float x = d < ENG_EXP_FLOOR ? ENG_EXP_FLOOR : d;
        float t = x * 0x1.715476p+0f + 12582912.0f;
        float n = t - 12582912.0f;
        float r = x - n * 0x1.63p-1f;
        r = r - n * -0x1.bd0106p-13f;
        float p = 0x1.a01a02p-13f;
        p = p * r + 0x1.6c16c2p-10f;
        p = p * r + 0x1.111112p-7f;
        p = p * r + 0x1.555556p-5f;
        p = p * r + 0x1.555556p-3f;
        p = p * r + 0.5f;
        p = p * r + 1.0f;
        p = p * r + 1.0f;
        float e = p * eng_f32_from_bits((uint32_t)((int32_t)n + 127) << 23);
        return d >= ENG_EXP_FLOOR ? e : 0.0f;
    }

    /* z - m, defined as 0 where z == m (so a +inf maximum gives its +inf tokens weight 1). */
    static inline float eng_rel(float z, float m) { return z == m ? 0.0f : z - m; }

    /* integer weight rint(e * scale) (scale = 2^Q <= 2^51, e in [0, 1]): adding 2^52 rounds to an
       integer, half to even, whose bits minus those of 2^52 are the integer. */
    static inline int64_t eng_weight(float e, double scale) {
        return eng_bits_from_f64((double)e * scale + 0x1p52) - eng_bits_from_f64(0x1p52);
    }

    /* splitmix64: the state advances by the golden gamma; the output's top 53 bits are returned. */
    static inline uint64_t eng_next53(uint64_t* state) {
        uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        return (z ^ (z >> 31)) >> 11;
    }

    /* floor(u53 * s / 2^53) for u53 < 2^53, s < 2^63: the draw's target in [0, s). */
    static inline int64_t eng_scale53(uint64_t u53, int64_t s) {
        uint64_t b = (uint64_t)s;
        uint64_t p0 = (u53 & 0xffffffffu) * (b & 0xffffffffu);
        uint64_t p1 = (u53 & 0xffffffffu) * (b >> 32);
        uint64_t p2 = (u53 >> 32) * (b & 0xffffffffu);
        uint64_t p3 = (u53 >> 32) * (b >> 32);
        uint64_t mid = (p0 >> 32) + (p1 & 0xffffffffu) + (p2 & 0xffffffffu);
        uint64_t lo = (p0 & 0xffffffffu) | (mid << 32);
        uint64_t hi = p3 + (p1 >> 32) + (p2 >> 32) + (mid >> 32);
        return (int64_t)((hi << 11) | (lo >> 53));
    }

    /* One prepared logit: NaN -> -inf, then penalties when count > 0, then / temperature (the bias is
       applied by the caller afterwards, for the few biased ids). */
    static inline float eng_prepare1(float v, int32_t c, float rep, float pres, float freq, float temp) {
        if (v != v) v = -INFINITY;
        if (c > 0) {
            float p = v > 0.0f ? v / rep : v * rep;
            v = p - (pres + freq * (float)c);
        }
        return v / temp;
    }

    #if ENG_SSE2
    static inline __m128 eng_exp_rel4(__m128 d) {
        const __m128 lo = _mm_set1_ps(ENG_EXP_FLOOR);
        const __m128 magic = _mm_set1_ps(12582912.0f);
        __m128 valid = _mm_cmpge_ps(d, lo);
        __m128 x = _mm_max_ps(d, lo);
        __m128 n = _mm_sub_ps(_mm_add_ps(_mm_mul_ps(x, _mm_set1_ps(0x1.715476p+0f)), magic), magic);
        __m128 r = _mm_sub_ps(x, _mm_mul_ps(n, _mm_set1_ps(0x1.63p-1f)));
        r = _mm_sub_ps(r, _mm_mul_ps(n, _mm_set1_ps(-0x1.bd0106p-13f)));
        __m128 p = _mm_set1_ps(0x1.a01a02p-13f);
        p = _mm_add_ps(_mm_mul_ps(p, r), _mm_set1_ps(0x1.6c16c2p-10f));
        p = _mm_add_ps(_mm_mul_ps(p, r), _mm_set1_ps(0x1.111112p-7f));
        p = _mm_add_ps(_mm_mul_ps(p, r), _mm_set1_ps(0x1.555556p-5f));
        p = _mm_add_ps(_mm_mul_ps(p, r), _mm_set1_ps(0x1.555556p-3f));
        p = _mm_add_ps(_mm_mul_ps(p, r), _mm_set1_ps(0.5f));
        p = _mm_add_ps(_mm_mul_ps(p, r), _mm_set1_ps(1.0f));
        p = _mm_add_ps(_mm_mul_ps(p, r), _mm_set1_ps(1.0f));
        __m128i bits = _mm_slli_epi32(_mm_add_epi32(_mm_cvttps_epi32(n), _mm_set1_epi32(127)), 23);
        return _mm_and_ps(_mm_mul_ps(p, _mm_castsi128_ps(bits)), valid);
    }
    static inline __m128 eng_rel4(__m128 z, __m128 m) {
        return _mm_andnot_ps(_mm_cmpeq_ps(z, m), _mm_sub_ps(z, m));
    }
    /* the integer weights of 4 floats, summed pairwise into 2 int64 lanes */
    static inline __m128i eng_weights4(__m128 e, __m128d scale) {
        const __m128d magic = _mm_set1_pd(0x1p52);
        const __m128i mbits = _mm_castpd_si128(magic);
        __m128i w0 = _mm_sub_epi64(_mm_castpd_si128(_mm_add_pd(_mm_mul_pd(_mm_cvtps_pd(e), scale), magic)), mbits);
        __m128i w1 = _mm_sub_epi64(_mm_castpd_si128(_mm_add_pd(
            _mm_mul_pd(_mm_cvtps_pd(_mm_movehl_ps(e, e)), scale), magic)), mbits);
        return _mm_add_epi64(w0, w1);
    }
    static inline int64_t eng_hsum_epi64(__m128i v) {
        int64_t a[2];
        _mm_storeu_si128((__m128i*)a, v);
        return a[0] + a[1];
    }
    static inline __m128 eng_half_to_float4(const uint16_t* h) {
        __m128i x = _mm_unpacklo_epi16(_mm_loadl_epi64((const __m128i*)h), _mm_setzero_si128());
        __m128i em = _mm_and_si128(x, _mm_set1_epi32(0x7fff));
        __m128i sign = _mm_slli_epi32(_mm_and_si128(x, _mm_set1_epi32(0x8000)), 16);
        __m128i sh = _mm_slli_epi32(em, 13);
        __m128 fin = _mm_mul_ps(_mm_castsi128_ps(sh), _mm_set1_ps(0x1p112f));
        __m128 special = _mm_castsi128_ps(_mm_cmpgt_epi32(em, _mm_set1_epi32(0x7bff)));
        __m128 inf = _mm_castsi128_ps(_mm_or_si128(sh, _mm_set1_epi32(0x7f800000)));
        __m128 mag = _mm_or_ps(_mm_and_ps(special, inf), _mm_andnot_ps(special, fin));
        return _mm_or_ps(mag, _mm_castsi128_ps(sign));
    }
    static inline float eng_hmax4(__m128 v) {
        float a[4];
        _mm_storeu_ps(a, v);
        float m = a[0];
        for (int j = 1; j < 4; j++) m = a[j] > m ? a[j] : m;
        return m;
    }
    static inline __m128 eng_prepare4(__m128 v, const int32_t* counts, float rep, float pres,
                                      float freq, float temp) {
        __m128 ord = _mm_cmpord_ps(v, v);
        v = _mm_or_ps(_mm_and_ps(ord, v), _mm_andnot_ps(ord, _mm_set1_ps(-INFINITY)));
        if (counts) {
            __m128i c = _mm_loadu_si128((const __m128i*)counts);
            __m128 has = _mm_castsi128_ps(_mm_cmpgt_epi32(c, _mm_setzero_si128()));
            __m128 pos = _mm_cmpgt_ps(v, _mm_setzero_ps());
            __m128 a = _mm_div_ps(v, _mm_set1_ps(rep));
            __m128 b = _mm_mul_ps(v, _mm_set1_ps(rep));
            __m128 p = _mm_or_ps(_mm_and_ps(pos, a), _mm_andnot_ps(pos, b));
            __m128 sub = _mm_add_ps(_mm_set1_ps(pres), _mm_mul_ps(_mm_set1_ps(freq), _mm_cvtepi32_ps(c)));
            p = _mm_sub_ps(p, sub);
            v = _mm_or_ps(_mm_and_ps(has, p), _mm_andnot_ps(has, v));
        }
        if (temp != 1.0f) v = _mm_div_ps(v, _mm_set1_ps(temp));
        return v;
    }
    #endif

    #if ENG_AVX2
    ENG_TARGET_AVX2 static inline __m256 eng_exp_rel8(__m256 d) {
        const __m256 lo = _mm256_set1_ps(ENG_EXP_FLOOR);
        const __m256 magic = _mm256_set1_ps(12582912.0f);
        __m256 valid = _mm256_cmp_ps(d, lo, _CMP_GE_OQ);
        __m256 x = _mm256_max_ps(d, lo);
        __m256 n = _mm256_sub_ps(_mm256_add_ps(_mm256_mul_ps(x, _mm256_set1_ps(0x1.715476p+0f)), magic), magic);
        __m256 r = _mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(0x1.63p-1f)));
        r = _mm256_sub_ps(r, _mm256_mul_ps(n, _mm256_set1_ps(-0x1.bd0106p-13f)));
        __m256 p = _mm256_set1_ps(0x1.a01a02p-13f);
        p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(0x1.6c16c2p-10f));
        p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(0x1.111112p-7f));
        p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(0x1.555556p-5f));
        p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(0x1.555556p-3f));
        p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(0.5f));
        p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(1.0f));
        p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(1.0f));
        __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23);
        return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(bits)), valid);
    }
    ENG_TARGET_AVX2 static inline __m256i eng_weights8(__m256 e, __m256d scale) {
        const __m256d magic = _mm256_set1_pd(0x1p52);
        const __m256i mbits = _mm256_castpd_si256(magic);
        __m256i w0 = _mm256_sub_epi64(_mm256_castpd_si256(_mm256_add_pd(
            _mm256_mul_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(e)), scale), magic)), mbits);
        __m256i w1 = _mm256_sub_epi64(_mm256_castpd_si256(_mm256_add_pd(
            _mm256_mul_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(e, 1)), scale), magic)), mbits);
        return _mm256_add_epi64(w0, w1);
    }
    ENG_TARGET_AVX2 static inline __m256 eng_prepare8(__m256 v, const int32_t* counts, float rep,
                                                      float pres, float freq, float temp) {
        __m256 ord = _mm256_cmp_ps(v, v, _CMP_ORD_Q);
        v = _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), v, ord);
        if (counts) {
            __m256i c = _mm256_loadu_si256((const __m256i*)counts);
            __m256 has = _mm256_castsi256_ps(_mm256_cmpgt_epi32(c, _mm256_setzero_si256()));
            __m256 pos = _mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_GT_OQ);
            __m256 p = _mm256_blendv_ps(_mm256_mul_ps(v, _mm256_set1_ps(rep)),
                                        _mm256_div_ps(v, _mm256_set1_ps(rep)), pos);
            __m256 sub = _mm256_add_ps(_mm256_set1_ps(pres),
                                       _mm256_mul_ps(_mm256_set1_ps(freq), _mm256_cvtepi32_ps(c)));
            v = _mm256_blendv_ps(v, _mm256_sub_ps(p, sub), has);
        }
        if (temp != 1.0f) v = _mm256_div_ps(v, _mm256_set1_ps(temp));
        return v;
    }
    ENG_TARGET_AVX2 static float eng_prepare_row_avx2(const void* xv, int is_half, float* z, Py_ssize_t n,
                                                      const int32_t* counts, float rep, float pres,
                                                      float freq, float temp, Py_ssize_t* done) {
        const float* xf = (const float*)xv;
        const uint16_t* xh = (const uint16_t*)xv;
        __m256 mv = _mm256_set1_ps(-INFINITY);
        Py_ssize_t i = 0;
        for (; i + 8 <= n; i += 8) {
            __m256 v = is_half ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(xh + i)))
                               : _mm256_loadu_ps(xf + i);
            v = eng_prepare8(v, counts ? counts + i : NULL, rep, pres, freq, temp);
            _mm256_storeu_ps(z + i, v);
            mv = _mm256_max_ps(v, mv);
        }
        *done = i;
        float a[8];
        _mm256_storeu_ps(a, mv);
        float m = a[0];
        for (int j = 1; j < 8; j++) m = a[j] > m ? a[j] : m;
        return m;
    }
    #endif

    /* z[i] = prepare(x[i]) for a float32 (is_half 0) or float16 row; returns max(z). counts may be NULL. */
    static float eng_prepare_row(const void* xv, int is_half, float* z, Py_ssize_t n,
                                 const int32_t* counts, float rep, float pres, float freq, float temp) {
        const float* xf = (const float*)xv;
        const uint16_t* xh = (const uint16_t*)xv;
        float m = -INFINITY;
        Py_ssize_t i = 0;
    #if ENG_AVX2
        if (eng_avx2_enabled) {
            m = eng_prepare_row_avx2(xv, is_half, z, n, counts, rep, pres, freq, temp, &i);
        } else
    #endif
        {
    #if ENG_SSE2
            __m128 mv = _mm_set1_ps(-INFINITY);
            for (; i + 4 <= n; i += 4) {
                __m128 v = is_half ? eng_half_to_float4(xh + i) : _mm_loadu_ps(xf + i);
                v = eng_prepare4(v, counts ? counts + i : NULL, rep, pres, freq, temp);
                _mm_storeu_ps(z + i, v);
                mv = _mm_max_ps(v, mv);
            }
            m = eng_hmax4(mv);
    #endif
        }
        for (; i < n; i++) {
            float v = is_half ? eng_half_to_float(xh[i]) : xf[i];
            v = eng_prepare1(v, counts ? counts[i] : 0, rep, pres, freq, temp);
            z[i] = v;
            m = v > m ? v : m;
        }
        return m;
    }

    #if ENG_AVX2
    ENG_TARGET_AVX2 static inline __m256 eng_load8(const void* xv, int is_half, Py_ssize_t i) {
        return is_half ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)((const uint16_t*)xv + i)))
                       : _mm256_loadu_ps((const float*)xv + i);
    }
    ENG_TARGET_AVX2 static float eng_max_row_avx2(const void* xv, int is_half, Py_ssize_t n, Py_ssize_t* done) {
        __m256 m0 = _mm256_set1_ps(-INFINITY), m1 = m0;
        Py_ssize_t i = 0;
        for (; i + 16 <= n; i += 16) {
            m0 = _mm256_max_ps(eng_load8(xv, is_half, i), m0);  /* maxps keeps m when x is NaN */
            m1 = _mm256_max_ps(eng_load8(xv, is_half, i + 8), m1);
        }
        *done = i;
        float a[8];
        _mm256_storeu_ps(a, _mm256_max_ps(m0, m1));
        float m = a[0];
        for (int j = 1; j < 8; j++) m = a[j] > m ? a[j] : m;
        return m;
    }
    ENG_TARGET_AVX2 static Py_ssize_t eng_find_eq_avx2(const void* xv, int is_half, Py_ssize_t i,
                                                       Py_ssize_t n, float m) {
        __m256 mv = _mm256_set1_ps(m);
        for (; i + 16 <= n; i += 16) {
            __m256 a = _mm256_cmp_ps(eng_load8(xv, is_half, i), mv, _CMP_EQ_OQ);
            __m256 b = _mm256_cmp_ps(eng_load8(xv, is_half, i + 8), mv, _CMP_EQ_OQ);
            if (_mm256_movemask_ps(_mm256_or_ps(a, b))) break;
        }
        return i;
    }
    #endif

    /* max over a row, NaN ignored (-inf when the row has no number). */
    static float eng_max_row(const void* xv, int is_half, Py_ssize_t n) {
        const float* xf = (const float*)xv;
        const uint16_t* xh = (const uint16_t*)xv;
        float m = -INFINITY;
        Py_ssize_t i = 0;
    #if ENG_AVX2
        if (eng_avx2_enabled) {
            m = eng_max_row_avx2(xv, is_half, n, &i);
        } else
    #endif
        {
    #if ENG_SSE2
        __m128 m0 = _mm_set1_ps(-INFINITY), m1 = m0;
        if (is_half) {
            for (; i + 8 <= n; i += 8) {
                m0 = _mm_max_ps(eng_half_to_float4(xh + i), m0);
                m1 = _mm_max_ps(eng_half_to_float4(xh + i + 4), m1);
            }
        } else {
            for (; i + 8 <= n; i += 8) {
                m0 = _mm_max_ps(_mm_loadu_ps(xf + i), m0);  /* maxps keeps m when x is NaN */
                m1 = _mm_max_ps(_mm_loadu_ps(xf + i + 4), m1);
            }
        }
        m = eng_hmax4(_mm_max_ps(m0, m1));
    #endif
        }
        for (; i < n; i++) {
            float v = is_half ? eng_half_to_float(xh[i]) : xf[i];
            m = v > m ? v : m;
        }
        return m;
    }

    /* first index i >= start with x[i] == m, or n. */
    static Py_ssize_t eng_find_eq(const void* xv, int is_half, Py_ssize_t start, Py_ssize_t n, float m) {
        const float* xf = (const float*)xv;
        const uint16_t* xh = (const uint16_t*)xv;
        Py_ssize_t i = start;
    #if ENG_AVX2
        if (eng_avx2_enabled) i = eng_find_eq_avx2(xv, is_half, i, n, m);
    #endif
    #if ENG_SSE2
        __m128 mv = _mm_set1_ps(m);
        for (; i + 8 <= n; i += 8) {
            __m128 a = is_half ? eng_half_to_float4(xh + i) : _mm_loadu_ps(xf + i);
            __m128 b = is_half ? eng_half_to_float4(xh + i + 4) : _mm_loadu_ps(xf + i + 4);
            if (_mm_movemask_ps(_mm_or_ps(_mm_cmpeq_ps(a, mv), _mm_cmpeq_ps(b, mv)))) break;
        }
    #endif
        for (; i < n; i++) {
            float v = is_half ? eng_half_to_float(xh[i]) : xf[i];
            if (v == m) return i;
        }
        return n;
    }

    /* first index i >= start with z[i] > thr, or n. */
    static Py_ssize_t eng_scan_gt(const float* z, Py_ssize_t start, Py_ssize_t n, float thr) {
        Py_ssize_t i = start;
    #if ENG_SSE2
        __m128 t = _mm_set1_ps(thr);
        for (; i + 8 <= n; i += 8) {
            __m128 a = _mm_cmpgt_ps(_mm_loadu_ps(z + i), t);
            __m128 b = _mm_cmpgt_ps(_mm_loadu_ps(z + i + 4), t);
            if (_mm_movemask_ps(_mm_or_ps(a, b))) break;
        }
    #endif
        for (; i < n; i++)
            if (z[i] > thr) return i;
        return n;
    }

    /* Weight sum: over members v, exp(rel(z[v], m)) -> integer weight, summed exactly in int64. A member
       satisfies (z > zc or (z == zc and v <= ic)) and rel(z, m) >= dmin. With e_out, every member's
       float weight exp(rel) (0 for non-members) is stored. */
    static int64_t eng_mass_sse2(const float* z, Py_ssize_t n, float m, float zc, Py_ssize_t ic,
                                 float dmin, double scale, float* e_out) {
        int64_t total = 0;
        Py_ssize_t i = 0;
    #if ENG_SSE2
        __m128i acc = _mm_setzero_si128();
        __m128 mv = _mm_set1_ps(m), zcv = _mm_set1_ps(zc), dv = _mm_set1_ps(dmin);
        __m128d sv = _mm_set1_pd(scale);
        __m128i icv = _mm_set1_epi32((int32_t)(ic > 2147483647 ? 2147483647 : ic));
        __m128i idx = _mm_set_epi32(3, 2, 1, 0);
        const __m128i four = _mm_set1_epi32(4);
        int all = (zc == -INFINITY && ic >= n - 1 && dmin == -INFINITY);
        for (; i + 4 <= n; i += 4) {
            __m128 z0 = _mm_loadu_ps(z + i);
            __m128 d0 = eng_rel4(z0, mv);
            __m128 e0 = eng_exp_rel4(d0);
            if (!all) {
                __m128 in0 = _mm_or_ps(_mm_cmpgt_ps(z0, zcv),
                    _mm_andnot_ps(_mm_castsi128_ps(_mm_cmpgt_epi32(idx, icv)), _mm_cmpeq_ps(z0, zcv)));
                e0 = _mm_and_ps(e0, _mm_and_ps(in0, _mm_cmpge_ps(d0, dv)));
                idx = _mm_add_epi32(idx, four);
            }
            if (e_out) _mm_storeu_ps(e_out + i, e0);
            acc = _mm_add_epi64(acc, eng_weights4(e0, sv));
        }
        total = eng_hsum_epi64(acc);
    #endif
        for (; i < n; i++) {
            float zz = z[i];
            float d = eng_rel(zz, m);
            int in = (zz > zc || (zz == zc && i <= ic)) && d >= dmin;
            float e = in ? eng_exp_rel(d) : 0.0f;
            if (e_out) e_out[i] = e;
            total += eng_weight(e, scale);
        }
        return total;
    }

    #if ENG_AVX2
    ENG_TARGET_AVX2 static int64_t eng_mass_avx2(const float* z, Py_ssize_t n, float m, float zc,
                                                 Py_ssize_t ic, float dmin, double scale, float* e_out) {
        int64_t total = 0;
        Py_ssize_t i = 0;
        __m256i acc = _mm256_setzero_si256();
        __m256 mv = _mm256_set1_ps(m), zcv = _mm256_set1_ps(zc), dv = _mm256_set1_ps(dmin);
        __m256d sv = _mm256_set1_pd(scale);
        __m256i icv = _mm256_set1_epi32((int32_t)(ic > 2147483647 ? 2147483647 : ic));
        __m256i idx = _mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0);
        const __m256i eight = _mm256_set1_epi32(8);
        int all = (zc == -INFINITY && ic >= n - 1 && dmin == -INFINITY);
        for (; i + 8 <= n; i += 8) {
            __m256 z0 = _mm256_loadu_ps(z + i);
            __m256 d0 = _mm256_andnot_ps(_mm256_cmp_ps(z0, mv, _CMP_EQ_OQ), _mm256_sub_ps(z0, mv));
            __m256 e0 = eng_exp_rel8(d0);
            if (!all) {
                __m256 in0 = _mm256_or_ps(_mm256_cmp_ps(z0, zcv, _CMP_GT_OQ),
                    _mm256_andnot_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(idx, icv)),
                                     _mm256_cmp_ps(z0, zcv, _CMP_EQ_OQ)));
                e0 = _mm256_and_ps(e0, _mm256_and_ps(in0, _mm256_cmp_ps(d0, dv, _CMP_GE_OQ)));
                idx = _mm256_add_epi32(idx, eight);
            }
            if (e_out) _mm256_storeu_ps(e_out + i, e0);
            acc = _mm256_add_epi64(acc, eng_weights8(e0, sv));
        }
        int64_t a[4];
        _mm256_storeu_si256((__m256i*)a, acc);
        total = (a[0] + a[1]) + (a[2] + a[3]);
        for (; i < n; i++) {
            float zz = z[i];
            float d = eng_rel(zz, m);
            int in = (zz > zc || (zz == zc && i <= ic)) && d >= dmin;
            float e = in ? eng_exp_rel(d) : 0.0f;
            if (e_out) e_out[i] = e;
            total += eng_weight(e, scale);
        }
        return total;
    }
    #endif

    static int64_t eng_mass(const float* z, Py_ssize_t n, float m, float zc, Py_ssize_t ic, float dmin,
                            double scale, float* e_out) {
    #if ENG_AVX2
        if (eng_avx2_enabled) return eng_mass_avx2(z, n, m, zc, ic, dmin, scale, e_out);
    #endif
        return eng_mass_sse2(z, n, m, zc, ic, dmin, scale, e_out);
    }

    /* Inverse CDF over a row of float weights e (0 = not a member): the first i whose running sum of
       integer weights exceeds target (0 <= target < total). Whole blocks are skipped by their sum. */
    static Py_ssize_t eng_walk(const float* e, Py_ssize_t n, double scale, int64_t target) {
        int64_t cum = 0;
        Py_ssize_t i = 0, last = 0;
    #if ENG_SSE2
        __m128d sv = _mm_set1_pd(scale);
        for (; i + 8 <= n; i += 8) {
            __m128i w = _mm_add_epi64(eng_weights4(_mm_loadu_ps(e + i), sv),
                                      eng_weights4(_mm_loadu_ps(e + i + 4), sv));
            int64_t s = eng_hsum_epi64(w);
            if (cum + s > target) break;
            cum += s;
        }
    #endif
        for (; i < n; i++) {
            int64_t w = eng_weight(e[i], scale);
            if (w > 0) {
                last = i;
                cum += w;
                if (cum > target) return i;
            }
        }
        return last;
    }
    """
    int ENG_SSE2
    int ENG_AVX2
    int eng_avx2_enabled
    int eng_cpu_has_avx2() noexcept nogil
    float ENG_EXP_FLOOR
    float eng_half_to_float(uint16_t h) noexcept nogil
    float eng_exp_rel(float d) noexcept nogil
    float eng_rel(float z, float m) noexcept nogil
    int64_t eng_weight(float e, double scale) noexcept nogil
    uint64_t eng_next53(uint64_t* state) noexcept nogil
    int64_t eng_scale53(uint64_t u53, int64_t s) noexcept nogil
    float eng_prepare1(float v, int32_t c, float rep, float pres, float freq, float temp) noexcept nogil
    float eng_prepare_row(const void* x, int is_half, float* z, Py_ssize_t n, const int32_t* counts,
                          float rep, float pres, float freq, float temp) noexcept nogil
    float eng_max_row(const void* x, int is_half, Py_ssize_t n) noexcept nogil
    Py_ssize_t eng_find_eq(const void* x, int is_half, Py_ssize_t start, Py_ssize_t n, float m) noexcept nogil
    Py_ssize_t eng_scan_gt(const float* z, Py_ssize_t start, Py_ssize_t n, float thr) noexcept nogil
    int64_t eng_mass(const float* z, Py_ssize_t n, float m, float zc, Py_ssize_t ic, float dmin,
                     double scale, float* e_out) noexcept nogil
    Py_ssize_t eng_walk(const float* e, Py_ssize_t n, double scale, int64_t target) noexcept nogil


cdef enum:
    HEAP_MAX = 1024       # largest candidate set kept by the heap; larger sets use the radix select
    FIRST_K = 64          # first nucleus candidate set when top-k does not bound it
    MAX_LOGPROBS = 20     # most alternatives reported with logprobs

MAX_TOP_LOGPROBS = MAX_LOGPROBS


def weight_bits(Py_ssize_t vocab_size):
    """Q of the integer weights rint(exp(z - max) * 2**Q): the largest with vocab * 2**Q < 2**62, at
    most 51 (the rounding trick in eng_weight needs e * 2**Q < 2**52)."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    return min(51, 62 - int(vocab_size).bit_length())


def set_simd(str level="auto"):
    """Choose the vector code: "auto" (AVX2 when the CPU has it), "avx2" or "sse2". Returns the choice.

    Every choice gives identical numbers; this exists for tests and benchmarks.
    """
    global eng_avx2_enabled
    if level not in ("auto", "avx2", "sse2"):
        raise ValueError(f"level must be 'auto', 'avx2' or 'sse2', got {level!r}")
    cdef int has = eng_cpu_has_avx2()
    if level == "avx2" and not has:
        raise ValueError("this CPU (or build) has no AVX2")
    eng_avx2_enabled = has if level == "auto" else (level == "avx2")
    return "avx2" if eng_avx2_enabled else ("sse2" if ENG_SSE2 else "scalar")


SIMD = set_simd()


# ----------------------------------------------------------------------------------------------------
# argument checks (with the GIL; nothing is allocated unless an error is raised)

cdef inline cnp.ndarray _logits_array(object logits, Py_ssize_t vocab, bint* is_half):
    """Check a (rows, vocab) float32/float16 array with contiguous rows; return it typed."""
    if not cnp.PyArray_Check(logits):
        raise TypeError(f"logits must be a numpy array, got {type(logits).__name__}")
    cdef cnp.ndarray a = <cnp.ndarray>logits
    cdef int t = cnp.PyArray_TYPE(a)
    if t == cnp.NPY_FLOAT32:
        is_half[0] = False
    elif t == cnp.NPY_FLOAT16:
        is_half[0] = True
    else:
        raise ValueError(f"logits must be float32 or float16, got {a.dtype}")
    if cnp.PyArray_NDIM(a) != 2:
        raise ValueError(f"logits must be 2-D (batch, vocab), got shape {(<object>a).shape}")
    if vocab >= 0 and cnp.PyArray_DIMS(a)[1] != vocab:
        raise ValueError(f"logits have {a.shape[1]} columns but the sampler was built for vocab {vocab}")
    if cnp.PyArray_DIMS(a)[1] < 1:
        raise ValueError("logits must have at least one column")
    if (cnp.PyArray_STRIDES(a)[1] != cnp.PyArray_ITEMSIZE(a) or not cnp.PyArray_ISALIGNED(a)
            or not cnp.PyArray_ISNOTSWAPPED(a)):
        raise ValueError("logits rows must be contiguous, aligned and in native byte order "
                         "(pass np.ascontiguousarray(logits))")
    return a


cdef struct OutIds:
    char* data
    Py_ssize_t stride       # bytes between entries
    bint is64               # int64, else int32


cdef inline int _out_array(object out, Py_ssize_t rows, OutIds* dst) except -1:
    """Check a writeable 1-D int64 or int32 array (any stride: e.g. a column of input_ids)."""
    if not cnp.PyArray_Check(out):
        raise TypeError(f"out must be a numpy array, got {type(out).__name__}")
    cdef cnp.ndarray a = <cnp.ndarray>out
    if (not cnp.PyArray_ISSIGNED(a) or cnp.PyArray_ITEMSIZE(a) not in (4, 8) or cnp.PyArray_NDIM(a) != 1
            or not cnp.PyArray_ISWRITEABLE(a) or not cnp.PyArray_ISALIGNED(a)
            or not cnp.PyArray_ISNOTSWAPPED(a)):
        raise ValueError(f"out must be a writeable 1-D int64 or int32 array, got {a.dtype} "
                         f"with shape {(<object>a).shape}")
    if cnp.PyArray_DIMS(a)[0] < rows:
        raise ValueError(f"out has {a.shape[0]} entries, fewer than the {rows} rows to sample")
    dst.data = <char*>cnp.PyArray_DATA(a)
    dst.stride = cnp.PyArray_STRIDES(a)[0]
    dst.is64 = cnp.PyArray_ITEMSIZE(a) == 8
    return 0


cdef inline void _store(OutIds* dst, Py_ssize_t r, int64_t tok) noexcept nogil:
    if dst.is64:
        (<int64_t*>(dst.data + r * dst.stride))[0] = tok
    else:
        (<int32_t*>(dst.data + r * dst.stride))[0] = <int32_t>tok


def argmax(logits, out):
    """Greedy token of every row: out[i] = argmax(logits[i]), NaN read as -inf, ties -> lowest id.

    logits: (batch, vocab) float32 or float16 with contiguous rows; out: (batch,) int64 or int32. A row
    with no number above -inf gives 0. Allocates nothing.
    """
    cdef bint is_half = False
    cdef cnp.ndarray a = _logits_array(logits, -1, &is_half)
    cdef Py_ssize_t rows = cnp.PyArray_DIMS(a)[0]
    cdef Py_ssize_t vocab = cnp.PyArray_DIMS(a)[1]
    cdef Py_ssize_t stride = cnp.PyArray_STRIDES(a)[0]
    cdef OutIds dst
    _out_array(out, rows, &dst)
    cdef const char* base = <const char*>cnp.PyArray_DATA(a)
    cdef Py_ssize_t r
    with nogil:
        for r in range(rows):
            _store(&dst, r, _argmax_row(base + r * stride, is_half, vocab))


cdef inline Py_ssize_t _argmax_row(const void* x, int is_half, Py_ssize_t n) noexcept nogil:
    cdef float m = eng_max_row(x, is_half, n)
    if m == -INFINITY:
        return 0
    return eng_find_eq(x, is_half, 0, n, m)


def exp_rel(const float[::1] d, float[::1] out):
    """out[i] = the engine's float32 exp(d[i]) for d[i] <= 0 (0 below -87); for tests and tools."""
    if d.shape[0] != out.shape[0]:
        raise ValueError(f"d and out differ in length: {d.shape[0]} != {out.shape[0]}")
    cdef Py_ssize_t i
    with nogil:
        for i in range(d.shape[0]):
            out[i] = eng_exp_rel(d[i])


def next53(uint64_t[::1] state, uint64_t[::1] out):
    """out[i] = the next 53-bit output of the splitmix64 stream state[i] (advanced in place)."""
    if state.shape[0] != out.shape[0]:
        raise ValueError(f"state and out differ in length: {state.shape[0]} != {out.shape[0]}")
    cdef Py_ssize_t i
    with nogil:
        for i in range(state.shape[0]):
            out[i] = eng_next53(&state[i])


def scale53(uint64_t u53, int64_t total):
    """floor(u53 * total / 2**53): the draw's target for a 53-bit random integer."""
    if u53 >= (<uint64_t>1) << 53 or total < 0:
        raise ValueError(f"need u53 < 2**53 and total >= 0, got {u53} and {total}")
    return eng_scale53(u53, total)


# ----------------------------------------------------------------------------------------------------
# the per-row state

cdef struct RowConfig:
    bint greedy                  # argmax of the prepared logits; no draw
    bint penalties               # repetition/presence/frequency active (counts are kept)
    float temperature            # effective temperature, float32 (1 for greedy rows)
    float repetition_penalty
    float presence_penalty
    float frequency_penalty
    Py_ssize_t top_k             # 0 = off (also when >= vocab)
    double top_p                 # >= 1 = off
    float min_p_threshold        # keep rel(z, max) >= this; -inf = off
    int logprobs                 # -1 = off, else the number of alternatives (0..20)
    const int64_t* bias_ids      # (n_bias,) ids, kept alive by SamplerKernel._bias
    const float* bias_values     # (n_bias,) float32
    Py_ssize_t n_bias


cdef class SamplerKernel:
    """Compiled state of engine.sampling.Sampler: per-row settings, scratch buffers, outputs.

    The arrays handed to __init__ are owned by the Python Sampler and written in place: counts
    (batch, vocab) int32, rng (batch,) uint64, logprobs (batch,) float32, top_logprobs (batch, 20)
    float32, top_ids (batch, 20) int64. Scratch is allocated here, once.
    """

    cdef readonly Py_ssize_t batch_size
    cdef readonly Py_ssize_t vocab_size
    cdef readonly int weight_bits       # Q: weights are rint(exp(rel) * 2**Q)
    cdef double scale                   # 2**Q
    cdef RowConfig* cfg                 # (batch,)
    cdef list _bias                     # (batch,) (ids, values) memoryviews referenced by cfg
    cdef int32_t[:, ::1] counts         # (batch, vocab) token counts of prompt + generated
    cdef uint64_t[::1] rng              # (batch,) splitmix64 states
    cdef float[::1] lp_out              # (batch,) chosen-token log-probability
    cdef float[:, ::1] top_lp_out       # (batch, 20)
    cdef int64_t[:, ::1] top_id_out     # (batch, 20)
    cdef float[::1] work                # (vocab,) prepared logits z of the row being sampled
    cdef float[::1] ebuf                # (vocab,) float weights exp(rel(z, max)) (0 = not a member)
    cdef int32_t[::1] heap              # (HEAP_MAX,) candidate ids, best first after sorting
    cdef int32_t[::1] idbuf             # (HEAP_MAX,) draw set in increasing id order
    cdef int32_t[::1] topn              # (MAX_LOGPROBS,) ids of the top alternatives
    cdef int32_t[::1] cand              # (vocab,) radix select candidates
    cdef int64_t hist_n[4 * 2048]       # radix select: count per digit (4 interleaved copies)
    cdef int64_t hist_w[4 * 2048]       # radix select: weight per digit (4 interleaved copies)

    def __cinit__(self):
        self.cfg = NULL

    def __init__(self, Py_ssize_t batch_size, Py_ssize_t vocab_size, counts, rng, logprobs,
                 top_logprobs, top_ids):
        if batch_size < 1 or vocab_size < 1 or vocab_size > 2147483647:
            raise ValueError(f"batch_size must be >= 1 and vocab_size in [1, 2**31), got "
                             f"{batch_size} and {vocab_size}")
        self.batch_size = batch_size
        self.vocab_size = vocab_size
        self.weight_bits = weight_bits(vocab_size)
        self.scale = ldexp(1.0, self.weight_bits)
        self.counts = counts
        self.rng = rng
        self.lp_out = logprobs
        self.top_lp_out = top_logprobs
        self.top_id_out = top_ids
        if (self.counts.shape[0] != batch_size or self.counts.shape[1] != vocab_size
                or self.rng.shape[0] != batch_size or self.lp_out.shape[0] != batch_size
                or self.top_lp_out.shape[0] != batch_size or self.top_id_out.shape[0] != batch_size
                or self.top_lp_out.shape[1] != MAX_LOGPROBS or self.top_id_out.shape[1] != MAX_LOGPROBS):
            raise ValueError("state arrays do not match (batch_size, vocab_size)")
        self.work = np.empty(vocab_size, np.float32)
        self.ebuf = np.empty(vocab_size, np.float32)
        self.heap = np.empty(HEAP_MAX, np.int32)
        self.idbuf = np.empty(HEAP_MAX, np.int32)
        self.topn = np.empty(MAX_LOGPROBS, np.int32)
        self.cand = np.empty(vocab_size, np.int32)
        self.cfg = <RowConfig*>malloc(batch_size * sizeof(RowConfig))
        if self.cfg == NULL:
            raise MemoryError()
        self._bias = [None] * batch_size
        cdef Py_ssize_t r
        for r in range(batch_size):
            self.set_row(r)

    def __dealloc__(self):
        free(self.cfg)

    def set_row(self, Py_ssize_t row, *, bint greedy=True, bint penalties=False, float temperature=1.0,
                float repetition_penalty=1.0, float presence_penalty=0.0,
                float frequency_penalty=0.0, Py_ssize_t top_k=0, double top_p=1.0,
                float min_p_threshold=-INFINITY, int logprobs=-1, bias_ids=None, bias_values=None):
        """Store one row's settings (already validated and derived by engine.sampling.Sampler)."""
        if row < 0 or row >= self.batch_size:
            raise ValueError(f"row {row} outside [0, {self.batch_size})")
        if not temperature > 0.0:
            raise ValueError(f"temperature must be > 0 here, got {temperature}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if logprobs < -1 or logprobs > MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [-1, {MAX_LOGPROBS}], got {logprobs}")
        cdef int64_t[::1] ids
        cdef float[::1] vals
        bias = None
        if bias_ids is not None and len(bias_ids) > 0:
            ids = np.ascontiguousarray(bias_ids, dtype=np.int64)
            vals = np.ascontiguousarray(bias_values, dtype=np.float32)
            if vals.shape[0] != ids.shape[0]:
                raise ValueError("bias_ids and bias_values differ in length")
            if np.any(np.asarray(ids) < 0) or np.any(np.asarray(ids) >= self.vocab_size):
                raise ValueError(f"logit_bias ids must be in [0, {self.vocab_size})")
            bias = (ids.base, vals.base)   # the arrays; the memoryviews below point into them
        cdef RowConfig* c = &self.cfg[row]
        c.greedy = greedy
        c.penalties = penalties
        c.temperature = temperature
        c.repetition_penalty = repetition_penalty
        c.presence_penalty = presence_penalty
        c.frequency_penalty = frequency_penalty
        c.top_k = top_k if 0 < top_k < self.vocab_size else 0
        c.top_p = top_p
        c.min_p_threshold = min_p_threshold
        c.logprobs = logprobs
        c.n_bias = 0
        c.bias_ids = NULL
        c.bias_values = NULL
        self._bias[row] = bias
        if bias is not None:
            ids, vals = bias
            c.bias_ids = &ids[0]
            c.bias_values = &vals[0]
            c.n_bias = ids.shape[0]

    def sample(self, logits, out, rows=None):
        """Choose one token per row: see engine.sampling.Sampler.sample."""
        cdef bint is_half = False
        cdef cnp.ndarray a = _logits_array(logits, self.vocab_size, &is_half)
        cdef Py_ssize_t n = cnp.PyArray_DIMS(a)[0] if rows is None else rows
        if n < 0 or n > cnp.PyArray_DIMS(a)[0] or n > self.batch_size:
            raise ValueError(f"rows must be in [0, {min(a.shape[0], self.batch_size)}], got {rows}")
        cdef OutIds dst
        _out_array(out, n, &dst)
        cdef const char* base = <const char*>cnp.PyArray_DATA(a)
        cdef Py_ssize_t stride = cnp.PyArray_STRIDES(a)[0]
        cdef Py_ssize_t r
        cdef int64_t tok
        with nogil:
            for r in range(n):
                tok = _sample_row(self, r, base + r * stride, is_half)
                _store(&dst, r, tok)
                if self.cfg[r].penalties:
                    self.counts[r, tok] += 1


# ----------------------------------------------------------------------------------------------------
# one row

cdef int64_t _sample_row(SamplerKernel k, Py_ssize_t r, const void* x, bint is_half) noexcept nogil:
    cdef RowConfig* c = &k.cfg[r]
    cdef Py_ssize_t V = k.vocab_size
    cdef float* z = &k.work[0]
    cdef uint64_t u53 = 0
    cdef int64_t mass = -1        # integer weight sum over the whole row, once computed
    cdef Py_ssize_t n_heap = 0    # length of the best-first prefix of heap[] valid for logprobs
    cdef Py_ssize_t tok, j
    cdef float m
    if not c.greedy:
        u53 = eng_next53(&k.rng[r])          # one draw per sampled row and call, whatever happens
    if c.greedy and not c.penalties and c.n_bias == 0 and c.temperature == 1.0 and c.logprobs < 0:
        return _argmax_row(x, is_half, V)

    m = eng_prepare_row(x, is_half, z, V, &k.counts[r, 0] if c.penalties else NULL,
                        c.repetition_penalty, c.presence_penalty, c.frequency_penalty, c.temperature)
    if c.n_bias:
        _apply_bias(c, x, is_half, z, &k.counts[r, 0] if c.penalties else NULL)
        m = eng_max_row(z, 0, V)

    if m == -INFINITY:                      # nothing possible: token 0, every log-probability -inf
        if c.logprobs >= 0:
            k.lp_out[r] = -INFINITY
            for j in range(MAX_LOGPROBS):
                k.top_id_out[r, j] = j if (j < c.logprobs and j < V) else -1
                k.top_lp_out[r, j] = -INFINITY
        return 0
    if c.greedy:
        tok = eng_find_eq(z, 0, 0, V, m)
    else:
        tok = _draw(k, c, z, V, m, u53, &mass, &n_heap)
    if c.logprobs >= 0:
        _write_logprobs(k, r, c, z, V, m, tok, &mass, n_heap)
    return tok


cdef void _apply_bias(RowConfig* c, const void* x, bint is_half, float* z,
                      const int32_t* counts) noexcept nogil:
    """z[id] = (penalised x[id] + bias) / temperature for the biased ids."""
    cdef Py_ssize_t i
    cdef int64_t v
    cdef float xv
    for i in range(c.n_bias):
        v = c.bias_ids[i]
        xv = eng_half_to_float((<const uint16_t*>x)[v]) if is_half else (<const float*>x)[v]
        xv = eng_prepare1(xv, counts[v] if counts != NULL else 0, c.repetition_penalty,
                          c.presence_penalty, c.frequency_penalty, 1.0)
        z[v] = (xv + c.bias_values[i]) / c.temperature


# ---- ranking: better = larger z, then smaller id --------------------------------------------------

cdef inline bint _worse(const float* z, int32_t a, int32_t b) noexcept nogil:
    return z[a] < z[b] or (z[a] == z[b] and a > b)


cdef inline void _sift_down(const float* z, int32_t* h, Py_ssize_t n, Py_ssize_t i) noexcept nogil:
    """Restore the heap below i; the root holds the worst element."""
    cdef Py_ssize_t child
    cdef int32_t tmp
    while True:
        child = 2 * i + 1
        if child >= n:
            return
        if child + 1 < n and _worse(z, h[child + 1], h[child]):
            child += 1
        if not _worse(z, h[child], h[i]):
            return
        tmp = h[i]
        h[i] = h[child]
        h[child] = tmp
        i = child


cdef Py_ssize_t _heap_select(const float* z, Py_ssize_t V, Py_ssize_t K, int32_t* h) noexcept nogil:
    """The K best ids of z, best first, in h[:K]. Scans z once; most elements cost one compare."""
    cdef Py_ssize_t i
    cdef int32_t tmp
    if K > V:
        K = V
    for i in range(K):
        h[i] = <int32_t>i
    i = K // 2
    while i > 0:
        i -= 1
        _sift_down(z, h, K, i)
    cdef float thr = z[h[0]]
    i = K
    while True:
        # a later id can only replace the root with a strictly larger value (ties keep the lower id)
        i = eng_scan_gt(z, i, V, thr)
        if i >= V:
            break
        h[0] = <int32_t>i
        _sift_down(z, h, K, 0)
        thr = z[h[0]]
        i += 1
    i = K
    while i > 1:
        i -= 1
        tmp = h[0]
        h[0] = h[i]
        h[i] = tmp
        _sift_down(z, h, i, 0)
    return K


cdef inline void _sift_max(int32_t* a, Py_ssize_t root, Py_ssize_t end) noexcept nogil:
    cdef Py_ssize_t child
    cdef int32_t tmp
    while True:
        child = 2 * root + 1
        if child >= end:
            return
        if child + 1 < end and a[child + 1] > a[child]:
            child += 1
        if a[child] <= a[root]:
            return
        tmp = a[root]
        a[root] = a[child]
        a[child] = tmp
        root = child


cdef void _sort_ids(int32_t* a, Py_ssize_t n) noexcept nogil:
    """Sort ids ascending in place (heapsort; n <= HEAP_MAX)."""
    cdef Py_ssize_t i
    cdef int32_t tmp
    i = n // 2
    while i > 0:
        i -= 1
        _sift_max(a, i, n)
    i = n
    while i > 1:
        i -= 1
        tmp = a[0]
        a[0] = a[i]
        a[i] = tmp
        _sift_max(a, 0, i)


cdef inline uint32_t _rank_key(float v) noexcept nogil:
    """uint32 key that sorts ascending as v sorts descending; branch-free (signs are coin flips)."""
    cdef uint32_t b
    v = v + 0.0         # -0.0 -> +0.0, every other value unchanged
    memcpy(&b, &v, 4)
    # negative: the bits themselves; positive: all but the sign bit flipped
    return b ^ (~(<uint32_t>((<int32_t>b) >> 31)) & 0x7FFFFFFFu)


cdef inline bint _member(float zv, Py_ssize_t v, float zc, Py_ssize_t ic) noexcept nogil:
    """v ranks at or before the token (zc, ic)."""
    return (zv > zc) | ((zv == zc) & (v <= ic))


cdef Py_ssize_t _radix_select(SamplerKernel k, const float* z, const float* e, Py_ssize_t V,
                              float zu, Py_ssize_t iu, bint by_weight, int64_t need_n,
                              double need_w) noexcept nogil:
    """The last token of the shortest rank prefix, within the tokens ranked at or before (zu, iu),
    holding need_n tokens (by_weight false) or integer weight w with float64(w) >= need_w.

    Radix select on the rank key, 11 + 11 + 10 bits, with exact per-digit counts and weights, then
    increasing ids among equal keys. Linear time; e holds every token's float weight.
    """
    cdef int64_t* hn = k.hist_n
    cdef int64_t* hw = k.hist_w
    cdef int32_t* cand = &k.cand[0]
    cdef Py_ssize_t n_cand = 0, v, i, b = 0, n_keep
    cdef int64_t got_n = 0, got_w = 0, w
    cdef uint32_t key, prefix = 0
    cdef int d, shift, bits
    cdef double scale = k.scale
    for d in range(3):
        shift = 21 if d == 0 else (10 if d == 1 else 0)
        bits = 10 if d == 2 else 11
        for i in range(4 << bits):
            hn[i] = 0
            hw[i] = 0
        if d == 0:
            # most tokens fall in a few digits: four copies (by v % 4) keep the increments independent
            if by_weight:
                for v in range(V):
                    if _member(z[v], v, zu, iu):
                        hw[(_rank_key(z[v]) >> 21) | (<uint32_t>(v & 3) << 11)] += eng_weight(e[v], scale)
            else:
                for v in range(V):
                    if _member(z[v], v, zu, iu):
                        hn[(_rank_key(z[v]) >> 21) | (<uint32_t>(v & 3) << 11)] += 1
            for i in range(2048):
                hn[i] += hn[2048 + i] + hn[4096 + i] + hn[6144 + i]
                hw[i] += hw[2048 + i] + hw[4096 + i] + hw[6144 + i]
        elif d == 1:
            for v in range(V):      # branch-free compaction of the tokens in the chosen digit
                cand[n_cand] = <int32_t>v
                n_cand += _member(z[v], v, zu, iu) & ((_rank_key(z[v]) >> 21) == prefix)
            for i in range(n_cand):
                v = cand[i]
                key = (_rank_key(z[v]) >> 10) & 2047
                hn[key] += 1
                hw[key] += eng_weight(e[v], scale)
        else:
            n_keep = 0
            for i in range(n_cand):
                v = cand[i]
                key = _rank_key(z[v])
                if (key >> 10) == prefix:
                    cand[n_keep] = <int32_t>v
                    n_keep += 1
                    hn[key & 1023] += 1
                    hw[key & 1023] += eng_weight(e[v], scale)
            n_cand = n_keep
        b = 0
        while b < (1 << bits) - 1:     # the last digit value takes whatever is left
            if (got_n + hn[b] >= need_n) if not by_weight else (<double>(got_w + hw[b]) >= need_w):
                break
            got_n += hn[b]
            got_w += hw[b]
            b += 1
        prefix = (prefix << bits) | <uint32_t>b
    # equal keys: increasing id (cand is in increasing id order)
    v = -1
    for i in range(n_cand):
        v = cand[i]
        if _rank_key(z[v]) != prefix:
            continue
        got_n += 1
        got_w += eng_weight(e[v], scale)
        if (got_n >= need_n) if not by_weight else (<double>got_w >= need_w):
            return v
    return v   # unreachable for a satisfiable request


cdef inline int64_t _weight_of(const float* z, float m, const float* e, bint have_e, int32_t v,
                               double scale) noexcept nogil:
    if have_e:
        return eng_weight(e[v], scale)
    return eng_weight(eng_exp_rel(eng_rel(z[v], m)), scale)


cdef Py_ssize_t _walk_ids(const float* z, float m, const int32_t* ids, Py_ssize_t n, double scale,
                          uint64_t u53) noexcept nogil:
    """Inverse CDF over ids (ascending): first id whose running weight exceeds the target."""
    cdef int64_t total = 0, cum = 0, target, w
    cdef Py_ssize_t i
    for i in range(n):
        total += eng_weight(eng_exp_rel(eng_rel(z[ids[i]], m)), scale)
    target = eng_scale53(u53, total)
    for i in range(n):
        w = eng_weight(eng_exp_rel(eng_rel(z[ids[i]], m)), scale)
        cum += w
        if cum > target:
            return ids[i]
    return ids[n - 1]   # unreachable: target < total


cdef Py_ssize_t _draw(SamplerKernel k, RowConfig* c, const float* z, Py_ssize_t V, float m, uint64_t u53,
                      int64_t* mass, Py_ssize_t* n_heap) noexcept nogil:
    """Top-k, top-p, min-p, then the inverse-CDF draw in increasing id order."""
    cdef Py_ssize_t need = c.top_k if c.top_k > 0 else V
    cdef Py_ssize_t K, L = 0, i
    cdef int32_t* top = &k.heap[0]
    cdef bint have_e = False        # e[] holds every token's float weight
    cdef int64_t total, cum, S, w
    cdef double thr, scale = k.scale
    cdef float* e = &k.ebuf[0]
    cdef float zk = -INFINITY, zp
    cdef Py_ssize_t ik = V, ip

    if need == V and c.top_p >= 1.0:
        # no truncation by rank: every token (min-p aside) takes part; walk the row
        S = eng_mass(z, V, m, -INFINITY, V, c.min_p_threshold, scale, e)
        if c.min_p_threshold == -INFINITY:
            mass[0] = S
        return eng_walk(e, V, scale, eng_scale53(u53, S))

    # small candidate sets: a heap of the best K, best first
    K = need if need < V else FIRST_K
    while K <= HEAP_MAX:
        L = _heap_select(z, V, K, top)
        n_heap[0] = L
        if c.top_p >= 1.0:
            break                                   # top-k alone: all K
        if need < V:
            total = 0
            for i in range(L):
                total += _weight_of(z, m, e, have_e, top[i], scale)
        else:
            if not have_e:
                mass[0] = eng_mass(z, V, m, -INFINITY, V, -INFINITY, scale, e)
                have_e = True
            total = mass[0]
        thr = c.top_p * <double>total
        cum = 0
        w = 0
        for i in range(L):
            w = _weight_of(z, m, e, have_e, top[i], scale)
            cum += w
            if <double>cum >= thr:
                L = i + 1
                break
        else:
            if L < need:                            # nucleus wider than K: widen
                # every later token weighs at most w: skip the big heap when it cannot be enough
                if K < HEAP_MAX and <double>(cum + (HEAP_MAX - K) * w) >= thr:
                    K = HEAP_MAX
                else:
                    K = HEAP_MAX + 1
                continue
        break

    if K <= HEAP_MAX:
        if c.min_p_threshold > -INFINITY:
            for i in range(1, L):
                if eng_rel(z[top[i]], m) < c.min_p_threshold:
                    L = i
                    break
        memcpy(&k.idbuf[0], top, L * sizeof(int32_t))
        _sort_ids(&k.idbuf[0], L)
        return _walk_ids(z, m, &k.idbuf[0], L, scale, u53)

    # large candidate sets: thresholds by radix select, then one pass over the row
    n_heap[0] = 0
    if not have_e:
        mass[0] = eng_mass(z, V, m, -INFINITY, V, -INFINITY, scale, e)
        have_e = True
    if need < V:
        ik = _radix_select(k, z, e, V, -INFINITY, V, False, need, 0.0)
        zk = z[ik]
    zp = zk
    ip = ik
    if c.top_p < 1.0:
        total = mass[0] if need == V else eng_mass(z, V, m, zk, ik, -INFINITY, scale, NULL)
        ip = _radix_select(k, z, e, V, zk, ik, True, 0, c.top_p * <double>total)
        zp = z[ip]
    S = eng_mass(z, V, m, zp, ip, c.min_p_threshold, scale, e)
    return eng_walk(e, V, scale, eng_scale53(u53, S))


cdef void _write_logprobs(SamplerKernel k, Py_ssize_t r, RowConfig* c, const float* z, Py_ssize_t V,
                          float m, Py_ssize_t tok, int64_t* mass, Py_ssize_t n_heap) noexcept nogil:
    """log-softmax of the prepared logits (after penalties, bias, temperature; before truncation)."""
    cdef double log_z
    cdef Py_ssize_t j, n = c.logprobs
    cdef const int32_t* top
    if mass[0] < 0:
        mass[0] = eng_mass(z, V, m, -INFINITY, V, -INFINITY, k.scale, NULL)
    log_z = log(ldexp(<double>mass[0], -k.weight_bits))
    k.lp_out[r] = <float>(<double>eng_rel(z[tok], m) - log_z)
    if n > V:
        n = V
    if n > 0:
        if n_heap >= n:
            top = &k.heap[0]
        else:
            _heap_select(z, V, n, &k.topn[0])
            top = &k.topn[0]
        for j in range(n):
            k.top_id_out[r, j] = top[j]
            k.top_lp_out[r, j] = <float>(<double>eng_rel(z[top[j]], m) - log_z)
    for j in range(n, MAX_LOGPROBS):
        k.top_id_out[r, j] = -1
        k.top_lp_out[r, j] = -INFINITY
