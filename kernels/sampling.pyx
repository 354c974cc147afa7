# Token sampling kernels: greedy argmax, penalties, logit bias, temperature, top-k, top-p, min-p and a
# seeded inverse-CDF draw over rows of float32 or float16 logits.
#
# engine/sampling.py holds the definition every step follows (its module docstring) and a numpy
# reference of each step; this module computes the same numbers bit for bit on x86-64 builds, without
# sorting the vocabulary on the common paths and without allocating during a call.
#
# Layout: the SIMD primitives that must vectorise (float16 conversion, NaN cleanup + penalties +
# temperature, max, the float32 exp and the blocked mass sums) are C in the verbatim block below, each
# with an SSE2 path and a scalar path that computes identical values. The selection logic (heap, radix
# sort, nucleus walk, draw, log-probabilities) is Cython. Directives are set once in setup.py.

from libc.math cimport INFINITY, log, nextafterf
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
    #if defined(__SSE2__) || defined(_M_X64) || (defined(_M_IX86_FP) && _M_IX86_FP >= 2)
    #include <emmintrin.h>
    #define ENG_SSE2 1
    #else
    #define ENG_SSE2 0
    #endif

    /* Every float operation below is a plain IEEE single or double operation: the numpy reference in
       engine/sampling.py performs the same operations in the same order, so results agree bit for bit
       as long as the compiler does not contract a*b+c into a fused multiply-add (x86-64 without
       -mfma never does). */

    static inline float eng_f32_from_bits(uint32_t u) { float f; memcpy(&f, &u, sizeof f); return f; }
    static inline uint32_t eng_bits_from_f32(float f) { uint32_t u; memcpy(&u, &f, sizeof u); return u; }

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

    static inline double eng_lanes_sum(const double* a) {
        return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
    }

    /* splitmix64: the row's state advances by the golden gamma; uniform double from the top 53 bits. */
    static inline double eng_uniform(uint64_t* state) {
        uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        z ^= z >> 31;
        return (double)(z >> 11) * (1.0 / 9007199254740992.0);
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
    #endif

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

    /* z[i] = prepare(x[i]) for a float32 (is_half 0) or float16 row; returns max(z). counts may be NULL. */
    static float eng_prepare_row(const void* xv, int is_half, float* z, Py_ssize_t n,
                                 const int32_t* counts, float rep, float pres, float freq, float temp) {
        const float* xf = (const float*)xv;
        const uint16_t* xh = (const uint16_t*)xv;
        float m = -INFINITY;
        Py_ssize_t i = 0;
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
        for (; i < n; i++) {
            float v = is_half ? eng_half_to_float(xh[i]) : xf[i];
            v = eng_prepare1(v, counts ? counts[i] : 0, rep, pres, freq, temp);
            z[i] = v;
            m = v > m ? v : m;
        }
        return m;
    }

    /* max over a row, NaN ignored (-inf when the row has no number). */
    static float eng_max_row(const void* xv, int is_half, Py_ssize_t n) {
        const float* xf = (const float*)xv;
        const uint16_t* xh = (const uint16_t*)xv;
        float m = -INFINITY;
        Py_ssize_t i = 0;
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

    /* Blocked mass: sum over members v of exp(rel(z[v], m)) into 8 double lanes (lane = v mod 8, each
       lane in increasing v), combined pairwise. A member satisfies (z > zc or (z == zc and v <= ic))
       and rel(z, m) >= dmin. With e_out, every e (0 for non-members) is also stored. */
    static double eng_mass(const float* z, Py_ssize_t n, float m, float zc, Py_ssize_t ic, float dmin,
                           float* e_out) {
        double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        Py_ssize_t i = 0;
    #if ENG_SSE2
        __m128d a0 = _mm_setzero_pd(), a1 = a0, a2 = a0, a3 = a0;
        __m128 mv = _mm_set1_ps(m), zcv = _mm_set1_ps(zc), dv = _mm_set1_ps(dmin);
        __m128i icv = _mm_set1_epi32((int32_t)(ic > 2147483647 ? 2147483647 : ic));
        __m128i idx = _mm_set_epi32(3, 2, 1, 0);
        const __m128i four = _mm_set1_epi32(4);
        int all = (zc == -INFINITY && ic >= n - 1 && dmin == -INFINITY);
        for (; i + 8 <= n; i += 8) {
            __m128 z0 = _mm_loadu_ps(z + i), z1 = _mm_loadu_ps(z + i + 4);
            __m128 d0 = eng_rel4(z0, mv), d1 = eng_rel4(z1, mv);
            __m128 e0 = eng_exp_rel4(d0), e1 = eng_exp_rel4(d1);
            if (!all) {
                __m128i idx1 = _mm_add_epi32(idx, four);
                __m128 in0 = _mm_or_ps(_mm_cmpgt_ps(z0, zcv),
                    _mm_andnot_ps(_mm_castsi128_ps(_mm_cmpgt_epi32(idx, icv)), _mm_cmpeq_ps(z0, zcv)));
                __m128 in1 = _mm_or_ps(_mm_cmpgt_ps(z1, zcv),
                    _mm_andnot_ps(_mm_castsi128_ps(_mm_cmpgt_epi32(idx1, icv)), _mm_cmpeq_ps(z1, zcv)));
                e0 = _mm_and_ps(e0, _mm_and_ps(in0, _mm_cmpge_ps(d0, dv)));
                e1 = _mm_and_ps(e1, _mm_and_ps(in1, _mm_cmpge_ps(d1, dv)));
                idx = _mm_add_epi32(idx1, four);
            }
            if (e_out) {
                _mm_storeu_ps(e_out + i, e0);
                _mm_storeu_ps(e_out + i + 4, e1);
            }
            a0 = _mm_add_pd(a0, _mm_cvtps_pd(e0));
            a1 = _mm_add_pd(a1, _mm_cvtps_pd(_mm_movehl_ps(e0, e0)));
            a2 = _mm_add_pd(a2, _mm_cvtps_pd(e1));
            a3 = _mm_add_pd(a3, _mm_cvtps_pd(_mm_movehl_ps(e1, e1)));
        }
        _mm_storeu_pd(acc, a0);
        _mm_storeu_pd(acc + 2, a1);
        _mm_storeu_pd(acc + 4, a2);
        _mm_storeu_pd(acc + 6, a3);
    #endif
        for (; i < n; i++) {
            float zz = z[i];
            float d = eng_rel(zz, m);
            int in = (zz > zc || (zz == zc && i <= ic)) && d >= dmin;
            float e = in ? eng_exp_rel(d) : 0.0f;
            if (e_out) e_out[i] = e;
            acc[i & 7] += (double)e;
        }
        return eng_lanes_sum(acc);
    }
    """
    int ENG_SSE2
    float ENG_EXP_FLOOR
    float eng_half_to_float(uint16_t h) noexcept nogil
    float eng_exp_rel(float d) noexcept nogil
    float eng_rel(float z, float m) noexcept nogil
    double eng_lanes_sum(const double* a) noexcept nogil
    double eng_uniform(uint64_t* state) noexcept nogil
    float eng_prepare1(float v, int32_t c, float rep, float pres, float freq, float temp) noexcept nogil
    float eng_prepare_row(const void* x, int is_half, float* z, Py_ssize_t n, const int32_t* counts,
                          float rep, float pres, float freq, float temp) noexcept nogil
    float eng_max_row(const void* x, int is_half, Py_ssize_t n) noexcept nogil
    Py_ssize_t eng_find_eq(const void* x, int is_half, Py_ssize_t start, Py_ssize_t n, float m) noexcept nogil
    Py_ssize_t eng_scan_gt(const float* z, Py_ssize_t start, Py_ssize_t n, float thr) noexcept nogil
    double eng_mass(const float* z, Py_ssize_t n, float m, float zc, Py_ssize_t ic, float dmin,
                    float* e_out) noexcept nogil


cdef enum:
    HEAP_MAX = 1024       # largest candidate set kept by the heap; larger sets use the radix sort
    FIRST_K = 64          # first nucleus candidate set when top-k does not bound it
    MAX_LOGPROBS = 20     # most alternatives reported with logprobs
    RADIX_BINS = 2048     # 11-bit digits

MAX_TOP_LOGPROBS = MAX_LOGPROBS
HAS_SSE2 = bool(ENG_SSE2)


# ----------------------------------------------------------------------------------------------------
# argument checks (with the GIL; no allocation unless an error is raised)

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


cdef inline int64_t* _out_array(object out, Py_ssize_t rows) except NULL:
    if not cnp.PyArray_Check(out):
        raise TypeError(f"out must be a numpy array, got {type(out).__name__}")
    cdef cnp.ndarray a = <cnp.ndarray>out
    if (cnp.PyArray_TYPE(a) != cnp.NPY_INT64 or cnp.PyArray_NDIM(a) != 1
            or not cnp.PyArray_ISCARRAY(a)):
        raise ValueError(f"out must be a writeable C-contiguous 1-D int64 array, got {a.dtype} "
                         f"with shape {(<object>a).shape}")
    if cnp.PyArray_DIMS(a)[0] < rows:
        raise ValueError(f"out has {a.shape[0]} entries, fewer than the {rows} rows to sample")
    return <int64_t*>cnp.PyArray_DATA(a)


def argmax(logits, out):
    """Greedy token of every row: out[i] = argmax(logits[i]), NaN read as -inf, ties -> lowest id.

    logits: (batch, vocab) float32 or float16 with contiguous rows; out: (batch,) int64. A row with no
    number above -inf gives 0. Allocates nothing.
    """
    cdef bint is_half = False
    cdef cnp.ndarray a = _logits_array(logits, -1, &is_half)
    cdef Py_ssize_t rows = cnp.PyArray_DIMS(a)[0]
    cdef Py_ssize_t vocab = cnp.PyArray_DIMS(a)[1]
    cdef Py_ssize_t stride = cnp.PyArray_STRIDES(a)[0]
    cdef int64_t* dst = _out_array(out, rows)
    cdef const char* base = <const char*>cnp.PyArray_DATA(a)
    cdef Py_ssize_t r
    with nogil:
        for r in range(rows):
            dst[r] = _argmax_row(base + r * stride, is_half, vocab)


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


def uniform(uint64_t[::1] state, double[::1] out):
    """Draw out[i] from the splitmix64 stream in state[i] (advanced in place); for tests and tools."""
    if state.shape[0] != out.shape[0]:
        raise ValueError(f"state and out differ in length: {state.shape[0]} != {out.shape[0]}")
    cdef Py_ssize_t i
    with nogil:
        for i in range(state.shape[0]):
            out[i] = eng_uniform(&state[i])


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
    const int64_t* bias_ids      # (n_bias,) sorted ids, kept alive by SamplerKernel._bias
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
    cdef RowConfig* cfg                 # (batch,)
    cdef list _bias                     # (batch,) (ids, values) arrays referenced by cfg
    cdef int32_t[:, ::1] counts         # (batch, vocab) token counts of prompt + generated
    cdef uint64_t[::1] rng              # (batch,) splitmix64 states
    cdef float[::1] lp_out              # (batch,) chosen-token log-probability
    cdef float[:, ::1] top_lp_out       # (batch, 20)
    cdef int64_t[:, ::1] top_id_out     # (batch, 20)
    cdef float[::1] work                # (vocab,) prepared logits z of the row being sampled
    cdef float[::1] ebuf                # (vocab,) exp(z - max) of draw members (vocabulary walks)
    cdef int32_t[::1] heap              # (HEAP_MAX,) candidate ids, best first after sorting
    cdef int32_t[::1] idbuf             # (HEAP_MAX,) draw set in increasing id order
    cdef int32_t[::1] topn              # (MAX_LOGPROBS,) ids of the top alternatives
    cdef uint32_t[::1] keys_a           # (vocab,) radix sort keys, ping
    cdef uint32_t[::1] keys_b           # (vocab,) pong
    cdef int32_t[::1] ids_a             # (vocab,) radix sort ids, ping
    cdef int32_t[::1] ids_b             # (vocab,) pong
    cdef Py_ssize_t hist[RADIX_BINS]

    def __cinit__(self):
        self.cfg = NULL

    def __init__(self, Py_ssize_t batch_size, Py_ssize_t vocab_size, counts, rng, logprobs,
                 top_logprobs, top_ids):
        if batch_size < 1 or vocab_size < 1 or vocab_size > 2147483647:
            raise ValueError(f"batch_size must be >= 1 and vocab_size in [1, 2**31), got "
                             f"{batch_size} and {vocab_size}")
        self.batch_size = batch_size
        self.vocab_size = vocab_size
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
        self.keys_a = np.empty(vocab_size, np.uint32)
        self.keys_b = np.empty(vocab_size, np.uint32)
        self.ids_a = np.empty(vocab_size, np.int32)
        self.ids_b = np.empty(vocab_size, np.int32)
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
        if logprobs < -1 or logprobs > MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [-1, {MAX_LOGPROBS}], got {logprobs}")
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
        self._bias[row] = None
        cdef int64_t[::1] ids
        cdef float[::1] vals
        if bias_ids is not None and len(bias_ids) > 0:
            ids = np.ascontiguousarray(bias_ids, dtype=np.int64)
            vals = np.ascontiguousarray(bias_values, dtype=np.float32)
            if vals.shape[0] != ids.shape[0]:
                raise ValueError("bias_ids and bias_values differ in length")
            if np.any(np.asarray(ids) < 0) or np.any(np.asarray(ids) >= self.vocab_size):
                raise ValueError(f"logit_bias ids must be in [0, {self.vocab_size})")
            self._bias[row] = (ids, vals)
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
        cdef int64_t* dst = _out_array(out, n)
        cdef const char* base = <const char*>cnp.PyArray_DATA(a)
        cdef Py_ssize_t stride = cnp.PyArray_STRIDES(a)[0]
        cdef Py_ssize_t r
        cdef int64_t tok
        with nogil:
            for r in range(n):
                tok = _sample_row(self, r, base + r * stride, is_half)
                dst[r] = tok
                if self.cfg[r].penalties:
                    self.counts[r, tok] += 1


# ----------------------------------------------------------------------------------------------------
# one row

cdef int64_t _sample_row(SamplerKernel k, Py_ssize_t r, const void* x, bint is_half) noexcept nogil:
    cdef RowConfig* c = &k.cfg[r]
    cdef Py_ssize_t V = k.vocab_size
    cdef float* z = &k.work[0]
    cdef double u = 0.0
    cdef double mass = -1.0      # blocked exp sum over the whole row, once computed
    cdef Py_ssize_t n_sorted = 0  # length of the best-first prefix of heap[] valid for logprobs
    cdef Py_ssize_t tok, j
    cdef float m
    if not c.greedy:
        u = eng_uniform(&k.rng[r])          # one draw per sampled row and call, whatever happens
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
        tok = _draw(k, c, z, V, m, u, &mass, &n_sorted)
    if c.logprobs >= 0:
        _write_logprobs(k, r, c, z, V, m, tok, &mass, n_sorted)
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


# ---- ordering: better = larger z, then smaller id -----------------------------------------------

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


cdef inline uint32_t _desc_key(float v) noexcept nogil:
    """uint32 key that sorts ascending as v sorts descending (-0.0 read as +0.0)."""
    cdef uint32_t b
    if v == 0.0:
        v = 0.0
    memcpy(&b, &v, 4)
    if b & 0x80000000u:
        return b            # negative: ~(~b)
    return ~(b | 0x80000000u)


cdef Py_ssize_t _radix_sort(SamplerKernel k, const float* z, Py_ssize_t V, float m,
                            int32_t** result) noexcept nogil:
    """All ids whose exp(z - max) is not 0 (rel >= -87), best first (stable LSD radix sort on the
    value, so equal values stay in increasing id order). Returns their count; *result points to them."""
    cdef uint32_t* ka = &k.keys_a[0]
    cdef uint32_t* kb = &k.keys_b[0]
    cdef int32_t* ia = &k.ids_a[0]
    cdef int32_t* ib = &k.ids_b[0]
    cdef uint32_t* kt
    cdef int32_t* it
    cdef Py_ssize_t n = 0, v, i, total, cnt
    cdef int shift, bits, p
    cdef uint32_t mask, bin_
    for v in range(V):
        if eng_rel(z[v], m) >= ENG_EXP_FLOOR:
            ka[n] = _desc_key(z[v])
            ia[n] = <int32_t>v
            n += 1
    for p in range(3):
        shift = 11 * p
        bits = 10 if p == 2 else 11
        mask = (1u << bits) - 1
        for i in range(1 << bits):
            k.hist[i] = 0
        for i in range(n):
            k.hist[(ka[i] >> shift) & mask] += 1
        total = 0
        for i in range(1 << bits):
            cnt = k.hist[i]
            k.hist[i] = total
            total += cnt
        for i in range(n):
            bin_ = (ka[i] >> shift) & mask
            kb[k.hist[bin_]] = ka[i]
            ib[k.hist[bin_]] = ia[i]
            k.hist[bin_] += 1
        kt = ka
        ka = kb
        kb = kt
        it = ia
        ia = ib
        ib = it
    result[0] = ia
    return n


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


cdef double _set_mass(const float* z, float m, const int32_t* ids, Py_ssize_t n) noexcept nogil:
    """Blocked mass of the ids (sorted ascending): same lanes and order as eng_mass over the row."""
    cdef double acc[8]
    cdef Py_ssize_t i
    for i in range(8):
        acc[i] = 0.0
    for i in range(n):
        acc[ids[i] & 7] += <double>eng_exp_rel(eng_rel(z[ids[i]], m))
    return eng_lanes_sum(acc)


cdef Py_ssize_t _walk_ids(const float* z, float m, const int32_t* ids, Py_ssize_t n,
                          double target) noexcept nogil:
    """Inverse CDF over ids (ascending): first id whose running mass exceeds target."""
    cdef double cum = 0.0
    cdef float e
    cdef Py_ssize_t i, last = ids[0]
    for i in range(n):
        e = eng_exp_rel(eng_rel(z[ids[i]], m))
        if e > 0.0:
            last = ids[i]
            cum += <double>e
            if target < cum:
                return ids[i]
    return last


cdef Py_ssize_t _walk_row(const float* e, Py_ssize_t n, double target) noexcept nogil:
    """Inverse CDF over a whole row of stored masses (0 = not a member)."""
    cdef double cum = 0.0
    cdef Py_ssize_t i, last = 0
    for i in range(n):
        if e[i] > 0.0:
            last = i
            cum += <double>e[i]
            if target < cum:
                return i
    return last


cdef Py_ssize_t _draw(SamplerKernel k, RowConfig* c, const float* z, Py_ssize_t V, float m, double u,
                      double* mass, Py_ssize_t* n_heap) noexcept nogil:
    """Top-k, top-p, min-p, then the inverse-CDF draw in increasing id order."""
    cdef Py_ssize_t need = c.top_k if c.top_k > 0 else V
    cdef Py_ssize_t K, n_sorted = 0, L = 0, i
    cdef int32_t* sorted_ids = &k.heap[0]
    cdef bint complete
    cdef double total, thr, cum, S
    cdef float* e = &k.ebuf[0]

    if need == V and c.top_p >= 1.0:
        # no truncation by rank: every token (min-p aside) takes part; walk the row
        S = eng_mass(z, V, m, -INFINITY, V, c.min_p_threshold, e)
        if c.min_p_threshold == -INFINITY:
            mass[0] = S
        return _walk_row(e, V, u * S)

    K = need if need < V else FIRST_K
    while True:
        if K <= HEAP_MAX:
            n_sorted = _heap_select(z, V, K, sorted_ids)
            complete = n_sorted >= need
            n_heap[0] = n_sorted
        else:
            n_sorted = _radix_sort(k, z, V, m, &sorted_ids)
            if n_sorted > need:
                n_sorted = need
            complete = True
            n_heap[0] = 0
        if c.top_p >= 1.0:
            L = n_sorted
            break
        if need == V:
            if mass[0] < 0.0:
                mass[0] = eng_mass(z, V, m, -INFINITY, V, -INFINITY, NULL)
            total = mass[0]
        elif n_sorted <= HEAP_MAX:
            memcpy(&k.idbuf[0], sorted_ids, n_sorted * sizeof(int32_t))
            _sort_ids(&k.idbuf[0], n_sorted)
            total = _set_mass(z, m, &k.idbuf[0], n_sorted)
        else:
            total = eng_mass(z, V, m, z[sorted_ids[n_sorted - 1]], sorted_ids[n_sorted - 1],
                             -INFINITY, NULL)
        thr = c.top_p * total
        cum = 0.0
        L = 0
        for i in range(n_sorted):
            cum += <double>eng_exp_rel(eng_rel(z[sorted_ids[i]], m))
            if cum >= thr:
                L = i + 1
                break
        if L > 0:
            break
        if complete:
            L = n_sorted
            break
        K = HEAP_MAX if K < HEAP_MAX else HEAP_MAX + 1     # widen: bigger heap, then radix sort

    if c.min_p_threshold > -INFINITY:
        for i in range(1, L):
            if eng_rel(z[sorted_ids[i]], m) < c.min_p_threshold:
                L = i
                break

    if L <= HEAP_MAX:
        memcpy(&k.idbuf[0], sorted_ids, L * sizeof(int32_t))
        _sort_ids(&k.idbuf[0], L)
        S = _set_mass(z, m, &k.idbuf[0], L)
        return _walk_ids(z, m, &k.idbuf[0], L, u * S)
    S = eng_mass(z, V, m, z[sorted_ids[L - 1]], sorted_ids[L - 1], -INFINITY, e)
    return _walk_row(e, V, u * S)


cdef void _write_logprobs(SamplerKernel k, Py_ssize_t r, RowConfig* c, const float* z, Py_ssize_t V,
                          float m, Py_ssize_t tok, double* mass, Py_ssize_t n_heap) noexcept nogil:
    """log-softmax of the prepared logits (after penalties, bias, temperature; before truncation)."""
    cdef double log_z
    cdef Py_ssize_t j, n = c.logprobs
    cdef const int32_t* top
    if mass[0] < 0.0:
        mass[0] = eng_mass(z, V, m, -INFINITY, V, -INFINITY, NULL)
    log_z = log(mass[0])
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
