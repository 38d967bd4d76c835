/*
 * gradprobe._kernel: the per-unit statistics of one strided tensor in a single read.
 *
 * Optional: gradprobe builds it at install time when a C compiler is present and falls back to the
 * pure-PyTorch path (gradprobe/stats.py) when it is absent; both give the same statistics (tested).
 * Plain C against the CPython API only: no torch or numpy headers, the tensor is passed as its data
 * pointer, shape and strides (in elements), and the results are written into a float64 tensor the
 * caller allocated.
 *
 * The tensor is viewed as (A, U, B) with the units in the middle (gradprobe.stats.as_units). It is
 * read in tiles of at most `budget` elements (a range of samples A, of units U, of positions B) that
 * stay in cache for the second pass: pass 1 takes each unit's sum, maximum, minimum and the zero
 * count; pass 2 the sum of squared deviations around the tile's own mean (the corrected two-pass
 * formula, exact to float64 rounding where the tile is summarised); tiles are merged per unit with
 * Chan, Golub and LeVeque's pairwise formula. Accumulation is in float64 throughout.
 *
 * Output layout (float64, 4*U + 3 values): mean[U], M2[U], max[U], min[U], nonzero, saturated (-1 when
 * not asked for), -1 (the non-finite count, which this kernel does not take): the packed form of
 * gradprobe.stats.DeviceMoments, transferred as it is.
 * A unit holding a NaN gets NaN as its maximum and minimum (as torch.amax/amin propagate it).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef Py_ssize_t idx;

typedef struct {
    idx A, U, B, sA, sU, sB, budget;
    int saturation;
    double centre, threshold;
    /* running per-unit summaries */
    double *n, *mean, *m2, *mx, *mn;
    /* per-tile scratch */
    double *tsum, *tmax, *tmin, *tdev, *tsq;
    float *fhi, *flo; /* float32 scratch of the row fast path */
    double nonzero, saturated;
    const void *data; /* the first value of the job's first unit */
    int dtype;
} Job;

/* ---- a team of threads: the OpenMP pool torch already runs ----
 * Between two of torch's operators its OpenMP worker threads spin, idle, for a while; a probe's hooks run
 * in that gap on the main thread. GOMP_parallel of the very runtime torch loaded (found by its soname,
 * never loaded here) hands work to those threads, as torch's own parallel loops do. The items (unit
 * ranges, whole tensors) are taken from a shared counter, so the result of each is the same whoever
 * takes it and however many threads come. Without the runtime (another platform, a torch built without
 * OpenMP) the items run one after another. */
typedef void (*TeamWork)(void *ctx, idx item);
typedef struct {
    TeamWork work;
    void *ctx;
    idx items, next;
    int entered;
} Team;

static int last_team = 0; /* threads that entered the last team (team(): tests) */
static const char *pool_name = NULL;

/* below this many values one thread is faster than waking a second (~10 µs) */
#define GP_TEAM_MIN (1 << 15)
/* ranges of units per thread: a thread that starts late (woken from sleep) takes fewer */
#define GP_TEAM_PARTS 4

#if defined(__linux__) && defined(__GNUC__)
#include <dlfcn.h>
#define GP_TEAMS 1
typedef void (*GompParallel)(void (*)(void *), void *, unsigned, unsigned);
static GompParallel gomp_parallel = NULL;
static int pool_found = 0;

/* with the GIL held */
static void find_pool(void) {
    if (pool_found) return;
    pool_found = 1;
    static const char *names[] = {"libgomp.so.1", "libiomp5.so", "libomp.so", "libomp.so.5"};
    for (size_t i = 0; i < sizeof names / sizeof names[0] && gomp_parallel == NULL; i++) {
        void *h = dlopen(names[i], RTLD_LAZY | RTLD_NOLOAD); /* only a runtime already in the process */
        if (h != NULL) {
            void *f = dlsym(h, "GOMP_parallel");
            memcpy(&gomp_parallel, &f, sizeof f);
            if (f != NULL) pool_name = names[i];
        }
    }
}

static void team_entry(void *arg) {
    Team *t = (Team *)arg;
    __atomic_fetch_add(&t->entered, 1, __ATOMIC_RELAXED);
    for (;;) {
        const idx i = __atomic_fetch_add(&t->next, 1, __ATOMIC_RELAXED);
        if (i >= t->items) return;
        t->work(t->ctx, i);
    }
}
#else
static void find_pool(void) {}
#endif

/* work(ctx, i) for every i < items, on up to `threads` threads; without the GIL */
static void run_team(TeamWork work, void *ctx, idx items, int threads) {
#ifdef GP_TEAMS
    if (threads > 1 && items > 1 && gomp_parallel != NULL) {
        Team t = {work, ctx, items, 0, 0};
        gomp_parallel(team_entry, &t, (unsigned)(threads < items ? threads : items), 0);
        last_team = t.entered;
        return;
    }
#endif
    (void)threads;
    for (idx i = 0; i < items; i++) work(ctx, i);
    last_team = 1;
}


/* The end of a one-pass loop over a run: the eight lanes' extremes and counts folded, the values past
 * the last whole vector (from p[i] on) added to t = Σ(x − shift) and, when sq is given, to
 * q = Σ(x − shift)², and the run's result merged into *sum, *sq, *hi, *lo, *nonzero. */
static void run_tail(const float *p, idx i, idx n, double shift, double t, double q, const float *hv,
                     const float *lv, const int32_t *cnt, double *sum, double *sq, double *hi, double *lo,
                     double *nonzero) {
    float h = -INFINITY, l = INFINITY;
    double z = 0.0;
    for (int k = 0; k < 8; k++) {
        h = hv[k] > h ? hv[k] : h;
        l = lv[k] < l ? lv[k] : l;
        z += cnt[k];
    }
    for (; i < n; i++) {
        const float x = p[i];
        const double e = (double)x - shift;
        t += e;
        q += e * e;
        h = x > h ? x : h;
        l = x < l ? x : l;
        z += x != 0.0f;
    }
    *sum += t;
    if (sq != NULL) *sq += q;
    *hi = h > *hi ? h : *hi;
    *lo = l < *lo ? l : *lo;
    *nonzero += z;
}

/* ---- float32 fast paths: 8 floats at a time (GCC/Clang vector extensions; AVX2 clone on x86-64) ---- */
#if defined(__GNUC__) && !defined(__INTEL_COMPILER)
#define GP_VECTOR 1
typedef float vf8 __attribute__((vector_size(32)));
typedef int vi8 __attribute__((vector_size(32)));
typedef float vf4 __attribute__((vector_size(16)));
typedef double vd4 __attribute__((vector_size(32)));
#if defined(__x86_64__) && !defined(__clang__)
#define GP_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define GP_CLONES
#endif
#define LD8(dst, p) memcpy(&(dst), (p), sizeof(vf8))
#define ST8(p, src) memcpy((p), &(src), sizeof(vf8))
#define LDD(dst, p) memcpy(&(dst), (p), sizeof(vd4))
#define STD(p, src) memcpy((p), &(src), sizeof(vd4))
/* select: NaN never wins a comparison, so it is skipped here and found by the tile's NaN check */
#define VMAX(a, b) ((vf8)((((vi8)((a) > (b))) & (vi8)(a)) | (~((vi8)((a) > (b))) & (vi8)(b))))
#define VMIN(a, b) ((vf8)((((vi8)((a) < (b))) & (vi8)(a)) | (~((vi8)((a) < (b))) & (vi8)(b))))
#define LO4(x) __builtin_convertvector(__builtin_shufflevector((x), (x), 0, 1, 2, 3), vd4)
#define HI4(x) __builtin_convertvector(__builtin_shufflevector((x), (x), 4, 5, 6, 7), vd4)

/* pass 1 over a contiguous run: sum (float64), max, min, nonzero count */
GP_CLONES static void run_pass1(const float *p, idx n, double *sum, double *hi, double *lo,
                                double *nonzero) {
    vd4 s0 = {0, 0, 0, 0}, s1 = {0, 0, 0, 0};
    const vf8 inf = {INFINITY, INFINITY, INFINITY, INFINITY, INFINITY, INFINITY, INFINITY, INFINITY};
    const vf8 zero = {0, 0, 0, 0, 0, 0, 0, 0};
    vf8 vh = -inf, vl = inf;
    vi8 nz = {0, 0, 0, 0, 0, 0, 0, 0};
    idx i = 0;
    for (; i + 8 <= n; i += 8) {
        vf8 x;
        LD8(x, p + i);
        s0 += LO4(x);
        s1 += HI4(x);
        vh = VMAX(x, vh);
        vl = VMIN(x, vl);
        nz -= (vi8)(x != zero);
    }
    vd4 s = s0 + s1;
    float hv[8], lv[8];
    int32_t c[8];
    memcpy(hv, &vh, sizeof hv), memcpy(lv, &vl, sizeof lv), memcpy(c, &nz, sizeof c);
    run_tail(p, i, n, 0.0, (s[0] + s[1]) + (s[2] + s[3]), 0.0, hv, lv, c, sum, NULL, hi, lo, nonzero);
}

/* pass 2 over a contiguous run: Σd and Σd² with d = x − m */
GP_CLONES static void run_pass2(const float *p, idx n, double m, double *dev, double *sq) {
    const vd4 mv = {m, m, m, m};
    vd4 d0 = {0, 0, 0, 0}, d1 = d0, q0 = d0, q1 = d0;
    idx i = 0;
    for (; i + 8 <= n; i += 8) {
        vf8 x;
        LD8(x, p + i);
        const vd4 a = LO4(x) - mv, b = HI4(x) - mv;
        d0 += a;
        d1 += b;
        q0 += a * a;
        q1 += b * b;
    }
    vd4 d = d0 + d1, q = q0 + q1;
    double dd = (d[0] + d[1]) + (d[2] + d[3]), qq = (q[0] + q[1]) + (q[2] + q[3]);
    for (; i < n; i++) {
        const double a = (double)p[i] - m;
        dd += a;
        qq += a * a;
    }
    *dev += dd;
    *sq += qq;
}

/* pass 1 down 8 contiguous units over `rows` rows `stride` apart: everything stays in registers */
GP_CLONES static void col_pass1(const float *p, idx rows, idx stride, double *sum, double *hi,
                                double *lo, double *nonzero) {
    vd4 s0 = {0, 0, 0, 0}, s1 = {0, 0, 0, 0};
    const vf8 inf = {INFINITY, INFINITY, INFINITY, INFINITY, INFINITY, INFINITY, INFINITY, INFINITY};
    const vf8 zero = {0, 0, 0, 0, 0, 0, 0, 0};
    vf8 vh = -inf, vl = inf;
    vi8 nz = {0, 0, 0, 0, 0, 0, 0, 0};
    for (idx a = 0; a < rows; a++) {
        vf8 x;
        LD8(x, p + a * stride);
        s0 += LO4(x);
        s1 += HI4(x);
        vh = VMAX(x, vh);
        vl = VMIN(x, vl);
        nz -= (vi8)(x != zero);
    }
    double z = 0.0;
    for (int k = 0; k < 4; k++) sum[k] = s0[k], sum[k + 4] = s1[k];
    for (int k = 0; k < 8; k++) hi[k] = vh[k], lo[k] = vl[k], z += nz[k];
    *nonzero += z;
}

/* pass 2 down 8 contiguous units: Σd and Σd² around the per-unit means */
GP_CLONES static void col_pass2(const float *p, idx rows, idx stride, const double *mean, double *dev,
                                double *sq) {
    vd4 m0, m1, d0 = {0, 0, 0, 0}, d1 = d0, q0 = d0, q1 = d0;
    LDD(m0, mean);
    LDD(m1, mean + 4);
    for (idx a = 0; a < rows; a++) {
        vf8 x;
        LD8(x, p + a * stride);
        const vd4 e = LO4(x) - m0, f = HI4(x) - m1;
        d0 += e;
        d1 += f;
        q0 += e * e;
        q1 += f * f;
    }
    for (int k = 0; k < 4; k++) dev[k] = d0[k], dev[k + 4] = d1[k], sq[k] = q0[k], sq[k + 4] = q1[k];
}
#endif


/* ---- x86-64 with AVX2: the same passes with explicit intrinsics (one vcvtps2pd per 4 values, vmaxps;
 * chosen at run time, so the module still loads on CPUs without AVX2) ---- */
#if defined(__x86_64__) && defined(__GNUC__)
#define GP_AVX2_PATH 1
#include <immintrin.h>
#define GP_AVX2 __attribute__((target("avx2,fma")))
static int have_avx2 = 0;

GP_AVX2 static inline double avx_hsum(__m256d v) {
    __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
}

/* pass 1 over a contiguous run (added into *sum, *hi, *lo, *nonzero) */
GP_AVX2 static void avx_run_pass1(const float *p, idx n, double *sum, double *hi, double *lo,
                                  double *nonzero) {
    __m256d s0 = _mm256_setzero_pd(), s1 = s0;
    __m256 h = _mm256_set1_ps(-INFINITY), l = _mm256_set1_ps(INFINITY);
    const __m256 zero = _mm256_setzero_ps();
    __m256i nz = _mm256_setzero_si256();
    idx i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 x = _mm256_loadu_ps(p + i);
        s0 = _mm256_add_pd(s0, _mm256_cvtps_pd(_mm256_castps256_ps128(x)));
        s1 = _mm256_add_pd(s1, _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1)));
        h = _mm256_max_ps(x, h), l = _mm256_min_ps(x, l);
        nz = _mm256_sub_epi32(nz, _mm256_castps_si256(_mm256_cmp_ps(x, zero, _CMP_NEQ_UQ)));
    }
    float hv[8], lv[8];
    int32_t c[8];
    _mm256_storeu_ps(hv, h), _mm256_storeu_ps(lv, l);
    _mm256_storeu_si256((__m256i *)c, nz);
    run_tail(p, i, n, 0.0, avx_hsum(_mm256_add_pd(s0, s1)), 0.0, hv, lv, c, sum, NULL, hi, lo, nonzero);
}

/* pass 2 over a contiguous run: Σd and Σd² with d = x − m (added) */
GP_AVX2 static void avx_run_pass2(const float *p, idx n, double m, double *dev, double *sq) {
    const __m256d mv = _mm256_set1_pd(m);
    __m256d d0 = _mm256_setzero_pd(), d1 = d0, q0 = d0, q1 = d0;
    idx i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 x = _mm256_loadu_ps(p + i);
        const __m256d a = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(x)), mv);
        const __m256d b = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(x, 1)), mv);
        d0 = _mm256_add_pd(d0, a), d1 = _mm256_add_pd(d1, b);
        q0 = _mm256_fmadd_pd(a, a, q0), q1 = _mm256_fmadd_pd(b, b, q1);
    }
    double dd = avx_hsum(_mm256_add_pd(d0, d1)), qq = avx_hsum(_mm256_add_pd(q0, q1));
    for (; i < n; i++) {
        const double a = (double)p[i] - m;
        dd += a;
        qq += a * a;
    }
    *dev += dd;
    *sq += qq;
}

/* Σx and Σx² of a contiguous run (parameters and their gradients) */
GP_AVX2 static void avx_sums(const float *p, idx n, double *out) {
    __m256d s0 = _mm256_setzero_pd(), s1 = s0, q0 = s0, q1 = s0;
    idx i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 x = _mm256_loadu_ps(p + i);
        const __m256d a = _mm256_cvtps_pd(_mm256_castps256_ps128(x));
        const __m256d b = _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1));
        s0 = _mm256_add_pd(s0, a), s1 = _mm256_add_pd(s1, b);
        q0 = _mm256_fmadd_pd(a, a, q0), q1 = _mm256_fmadd_pd(b, b, q1);
    }
    double s = avx_hsum(_mm256_add_pd(s0, s1)), q = avx_hsum(_mm256_add_pd(q0, q1));
    for (; i < n; i++) {
        const double x = p[i];
        s += x;
        q += x * x;
    }
    out[0] = s;
    out[1] = q;
}
#endif


/* scalar passes down one unit of a rows layout (the units left over by the vector blocks) */
static void scalar_col_pass1(const float *p, idx rows, idx stride, double *sum, double *hi, double *lo,
                             double *nonzero) {
    double s = 0.0, h = -INFINITY, l = INFINITY, z = 0.0;
    for (idx a = 0; a < rows; a++) {
        const double x = p[a * stride];
        s += x;
        h = x > h ? x : h;
        l = x < l ? x : l;
        z += x != 0.0;
    }
    *sum = s, *hi = h, *lo = l, *nonzero += z;
}

static void scalar_col_pass2(const float *p, idx rows, idx stride, double m, double *dev, double *sq) {
    double d = 0.0, q = 0.0;
    for (idx a = 0; a < rows; a++) {
        const double e = p[a * stride] - m;
        d += e;
        q += e * e;
    }
    *dev = d, *sq = q;
}

/* ---- one pass (AVX2): shifted sums around a per-unit shift c, the mean of the unit's first k values.
 * With c the mean of k of the n values, (c − mean)² ≤ M2/k (Cauchy–Schwarz), so
 * S2 = Σ(x − c)² = M2 + n(c − mean)² ≤ M2·(1 + n/k): M2 = S2 − S1²/n loses at most a factor 1 + n/k
 * of float64 rounding (k ≥ min(n, 32) rows, or a whole first run of positions), for any data.
 * Partial sums are folded into the totals every GP_FOLD rows, so no long sequential sums. ---- */
#ifdef GP_AVX2_PATH
#define GP_FOLD 256
#define GP_SHIFT_ROWS 32
#define GP_BAND 16

/* 16 contiguous units over `rows` rows `stride` apart, one block of rows: the shifted sums are added
 * to t1 and t2, the extremes kept in hi and lo (float32, exact). In the first block (first != 0) the
 * shift is set to the mean of its first min(rows, GP_SHIFT_ROWS) rows. */
GP_AVX2 static void avx_rows16(const float *p, idx rows, idx stride, int first, double *shift, double *t1,
                               double *t2, float *hi, float *lo, double *nonzero) {
    if (first) {
        const idx k = rows < GP_SHIFT_ROWS ? rows : GP_SHIFT_ROWS;
        __m256d c0 = _mm256_setzero_pd(), c1 = c0, c2 = c0, c3 = c0;
        for (idx a = 0; a < k; a++) {
            const __m256 x = _mm256_loadu_ps(p + a * stride), y = _mm256_loadu_ps(p + a * stride + 8);
            c0 = _mm256_add_pd(c0, _mm256_cvtps_pd(_mm256_castps256_ps128(x)));
            c1 = _mm256_add_pd(c1, _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1)));
            c2 = _mm256_add_pd(c2, _mm256_cvtps_pd(_mm256_castps256_ps128(y)));
            c3 = _mm256_add_pd(c3, _mm256_cvtps_pd(_mm256_extractf128_ps(y, 1)));
        }
        const __m256d inv = _mm256_set1_pd(1.0 / (double)k);
        _mm256_storeu_pd(shift, _mm256_mul_pd(c0, inv)), _mm256_storeu_pd(shift + 4, _mm256_mul_pd(c1, inv));
        _mm256_storeu_pd(shift + 8, _mm256_mul_pd(c2, inv)), _mm256_storeu_pd(shift + 12, _mm256_mul_pd(c3, inv));
        for (int u = 0; u < 16; u++) t1[u] = t2[u] = 0.0, hi[u] = -INFINITY, lo[u] = INFINITY;
    }
    const __m256d c0 = _mm256_loadu_pd(shift), c1 = _mm256_loadu_pd(shift + 4);
    const __m256d c2 = _mm256_loadu_pd(shift + 8), c3 = _mm256_loadu_pd(shift + 12);
    __m256 h0 = _mm256_loadu_ps(hi), h1 = _mm256_loadu_ps(hi + 8), l0 = _mm256_loadu_ps(lo), l1 = _mm256_loadu_ps(lo + 8);
    const __m256 zero = _mm256_setzero_ps();
    __m256i nz = _mm256_setzero_si256();
    __m256d s0 = _mm256_setzero_pd(), s1 = s0, s2 = s0, s3 = s0, q0 = s0, q1 = s0, q2 = s0, q3 = s0;
    for (idx a = 0; a < rows; a++) {
        const float *q = p + a * stride;
        _mm_prefetch((const char *)(q + 16 * stride), _MM_HINT_T0); /* rows a page apart: no hardware prefetch */
        const __m256 x = _mm256_loadu_ps(q), y = _mm256_loadu_ps(q + 8);
        const __m256d e0 = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(x)), c0);
        const __m256d e1 = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(x, 1)), c1);
        const __m256d e2 = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(y)), c2);
        const __m256d e3 = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(y, 1)), c3);
        s0 = _mm256_add_pd(s0, e0), s1 = _mm256_add_pd(s1, e1);
        s2 = _mm256_add_pd(s2, e2), s3 = _mm256_add_pd(s3, e3);
        q0 = _mm256_fmadd_pd(e0, e0, q0), q1 = _mm256_fmadd_pd(e1, e1, q1);
        q2 = _mm256_fmadd_pd(e2, e2, q2), q3 = _mm256_fmadd_pd(e3, e3, q3);
        h0 = _mm256_max_ps(x, h0), h1 = _mm256_max_ps(y, h1);
        l0 = _mm256_min_ps(x, l0), l1 = _mm256_min_ps(y, l1);
        nz = _mm256_sub_epi32(nz, _mm256_castps_si256(_mm256_cmp_ps(x, zero, _CMP_NEQ_UQ)));
        nz = _mm256_sub_epi32(nz, _mm256_castps_si256(_mm256_cmp_ps(y, zero, _CMP_NEQ_UQ)));
    }
    _mm256_storeu_pd(t1, _mm256_add_pd(_mm256_loadu_pd(t1), s0));
    _mm256_storeu_pd(t1 + 4, _mm256_add_pd(_mm256_loadu_pd(t1 + 4), s1));
    _mm256_storeu_pd(t1 + 8, _mm256_add_pd(_mm256_loadu_pd(t1 + 8), s2));
    _mm256_storeu_pd(t1 + 12, _mm256_add_pd(_mm256_loadu_pd(t1 + 12), s3));
    _mm256_storeu_pd(t2, _mm256_add_pd(_mm256_loadu_pd(t2), q0));
    _mm256_storeu_pd(t2 + 4, _mm256_add_pd(_mm256_loadu_pd(t2 + 4), q1));
    _mm256_storeu_pd(t2 + 8, _mm256_add_pd(_mm256_loadu_pd(t2 + 8), q2));
    _mm256_storeu_pd(t2 + 12, _mm256_add_pd(_mm256_loadu_pd(t2 + 12), q3));
    _mm256_storeu_ps(hi, h0), _mm256_storeu_ps(hi + 8, h1), _mm256_storeu_ps(lo, l0), _mm256_storeu_ps(lo + 8, l1);
    int32_t c[8];
    _mm256_storeu_si256((__m256i *)c, nz);
    double z = 0.0;
    for (int i = 0; i < 8; i++) z += c[i];
    *nonzero += z;
}

/* Σ(x − c), Σ(x − c)², max, min and the nonzero count of one contiguous run, added in */
GP_AVX2 static void avx_run_shifted(const float *p, idx n, double c, double *s1, double *s2, double *hi, double *lo,
                                    double *nonzero) {
    const __m256d cv = _mm256_set1_pd(c);
    __m256d d0 = _mm256_setzero_pd(), d1 = d0, q0 = d0, q1 = d0;
    __m256 h = _mm256_set1_ps(-INFINITY), l = _mm256_set1_ps(INFINITY);
    const __m256 zero = _mm256_setzero_ps();
    __m256i nz = _mm256_setzero_si256();
    idx i = 0;
    for (; i + 8 <= n; i += 8) {
        if ((i & 15) == 0) _mm_prefetch((const char *)(p + i + 256), _MM_HINT_NTA);
        const __m256 x = _mm256_loadu_ps(p + i);
        const __m256d a = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(x)), cv);
        const __m256d b = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(x, 1)), cv);
        d0 = _mm256_add_pd(d0, a), d1 = _mm256_add_pd(d1, b);
        q0 = _mm256_fmadd_pd(a, a, q0), q1 = _mm256_fmadd_pd(b, b, q1);
        h = _mm256_max_ps(x, h), l = _mm256_min_ps(x, l);
        nz = _mm256_sub_epi32(nz, _mm256_castps_si256(_mm256_cmp_ps(x, zero, _CMP_NEQ_UQ)));
    }
    float hv[8], lv[8];
    int32_t cnt[8];
    _mm256_storeu_ps(hv, h), _mm256_storeu_ps(lv, l);
    _mm256_storeu_si256((__m256i *)cnt, nz);
    run_tail(p, i, n, c, avx_hsum(_mm256_add_pd(d0, d1)), avx_hsum(_mm256_add_pd(q0, q1)), hv, lv, cnt, s1, s2, hi, lo,
             nonzero);
}

/* elements with |x − centre| > threshold in a contiguous run (compared in float64, exactly) */
GP_AVX2 static double avx_count_outside(const float *p, idx n, double centre, double threshold) {
    const __m256d c = _mm256_set1_pd(centre), th = _mm256_set1_pd(threshold), sign = _mm256_set1_pd(-0.0);
    __m256i cnt = _mm256_setzero_si256();
    idx i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 x = _mm256_loadu_ps(p + i);
        const __m256d a = _mm256_andnot_pd(sign, _mm256_sub_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(x)), c));
        const __m256d b = _mm256_andnot_pd(sign, _mm256_sub_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(x, 1)), c));
        cnt = _mm256_sub_epi64(cnt, _mm256_castpd_si256(_mm256_cmp_pd(a, th, _CMP_GT_OQ)));
        cnt = _mm256_sub_epi64(cnt, _mm256_castpd_si256(_mm256_cmp_pd(b, th, _CMP_GT_OQ)));
    }
    int64_t c4[4];
    _mm256_storeu_si256((__m256i *)c4, cnt);
    double total = (double)(c4[0] + c4[1] + c4[2] + c4[3]);
    for (; i < n; i++) total += fabs((double)p[i] - centre) > threshold;
    return total;
}

/* A dense tensor of short runs (8 <= B < 64 positions per unit: late convolution stages, 4x4 or 7x7),
 * in one pass: run (a, u) adds into unit u's own lane accumulators (4 float64 lanes for Σ(x − c) and
 * Σ(x − c)², 8 float32 lanes for the extremes), c = the mean of the unit's first run (so S2 <= M2·(1 + A),
 * as above); positions past the last whole vector go to per-unit scalars; lanes are folded into the
 * totals every GP_FOLD samples. 0 when the scratch cannot be allocated (the caller takes another path). */
GP_AVX2 static int avx_short_runs(Job *j, const float *base) {
    const idx A = j->A, U = j->U, B = j->B, nv = B - B % 8;
    double *acc = (double *)aligned_alloc(32, (size_t)U * 8 * sizeof(double));
    float *ext = (float *)aligned_alloc(32, (size_t)U * 16 * sizeof(float));
    if (!acc || !ext) {
        free(acc), free(ext);
        return 0;
    }
    double *c = j->tdev, *t1 = j->tsum, *t2 = j->tsq;
    for (idx u = 0; u < U; u++) {
        double s = 0.0;
        for (idx b = 0; b < B; b++) s += base[u * j->sU + b];
        c[u] = s / (double)B, t1[u] = t2[u] = 0.0;
        for (int k = 0; k < 8; k++) acc[u * 8 + k] = 0.0, ext[u * 16 + k] = -INFINITY, ext[u * 16 + 8 + k] = INFINITY;
    }
    const __m256 zero = _mm256_setzero_ps();
    __m256i nz = _mm256_setzero_si256();
    double tail_nz = 0.0;
    for (idx a0 = 0; a0 < A; a0 += GP_FOLD) {
        const idx a1 = a0 + GP_FOLD < A ? a0 + GP_FOLD : A;
        for (idx a = a0; a < a1; a++) {
            const float *row = base + a * j->sA;
            for (idx u = 0; u < U; u++) {
                const float *p = row + u * j->sU;
                const __m256d cv = _mm256_set1_pd(c[u]);
                __m256d d = _mm256_load_pd(acc + u * 8), q = _mm256_load_pd(acc + u * 8 + 4);
                __m256 h = _mm256_load_ps(ext + u * 16), l = _mm256_load_ps(ext + u * 16 + 8);
                for (idx i = 0; i < nv; i += 8) {
                    const __m256 x = _mm256_loadu_ps(p + i);
                    const __m256d e = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(x)), cv);
                    const __m256d f = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(x, 1)), cv);
                    d = _mm256_add_pd(d, _mm256_add_pd(e, f));
                    q = _mm256_fmadd_pd(e, e, _mm256_fmadd_pd(f, f, q));
                    h = _mm256_max_ps(x, h), l = _mm256_min_ps(x, l);
                    nz = _mm256_sub_epi32(nz, _mm256_castps_si256(_mm256_cmp_ps(x, zero, _CMP_NEQ_UQ)));
                }
                _mm256_store_pd(acc + u * 8, d), _mm256_store_pd(acc + u * 8 + 4, q);
                _mm256_store_ps(ext + u * 16, h), _mm256_store_ps(ext + u * 16 + 8, l);
                for (idx i = nv; i < B; i++) {
                    const float x = p[i];
                    const double e = (double)x - c[u];
                    t1[u] += e, t2[u] += e * e;
                    ext[u * 16] = x > ext[u * 16] ? x : ext[u * 16];
                    ext[u * 16 + 8] = x < ext[u * 16 + 8] ? x : ext[u * 16 + 8];
                    tail_nz += x != 0.0f;
                }
            }
        }
        for (idx u = 0; u < U; u++) { /* fold the lanes into the totals */
            double *v = acc + u * 8;
            t1[u] += (v[0] + v[1]) + (v[2] + v[3]);
            t2[u] += (v[4] + v[5]) + (v[6] + v[7]);
            for (int k = 0; k < 8; k++) v[k] = 0.0;
        }
        int32_t cnt[8];
        _mm256_storeu_si256((__m256i *)cnt, nz);
        for (int k = 0; k < 8; k++) j->nonzero += cnt[k];
        nz = _mm256_setzero_si256();
    }
    j->nonzero += tail_nz;
    const double n = (double)(A * B);
    for (idx u = 0; u < U; u++) {
        float h = -INFINITY, l = INFINITY;
        for (int k = 0; k < 8; k++) {
            h = ext[u * 16 + k] > h ? ext[u * 16 + k] : h;
            l = ext[u * 16 + 8 + k] < l ? ext[u * 16 + 8 + k] : l;
        }
        j->mean[u] = c[u] + t1[u] / n;
        j->m2[u] = t2[u] - t1[u] * t1[u] / n;
        j->mx[u] = h, j->mn[u] = l;
    }
    free(acc), free(ext);
    return 1;
}

/* The one-pass float32 statistics of rows of contiguous units (any row stride), or of contiguous runs
 * of positions (of at least 64, or short runs of 8 to 63) with each sample's runs side by side (sU == B;
 * samples any stride apart); 0 when the layout is neither. Each unit's statistics depend on that unit's
 * values only (blocks of 16 units from the first unit), so a range of units starting at a multiple of 16
 * gets the same bits on its own (the units split between threads, unit_stats). */
static int single_pass_f32(Job *j, const float *base) {
    if (!have_avx2) return 0;
    const idx A = j->A, U = j->U, B = j->B;
    if (B == 1 && j->sU == 1 && U >= 16) {
        /* blocks of rows of at most ~256 KiB (in L2 while the 16-unit blocks walk across them, so
         * every page is read in order) and at most GP_FOLD rows (partial sums folded per block) */
        const idx nv = U - U % 16;
        double *shift = j->tdev, *t1 = j->tsum, *t2 = j->tsq;
        for (idx a0 = 0; a0 < A;) {
            /* bands of GP_BAND rows walked across all units (GP_BAND pages read in order at once);
             * the first band sets the shifts */
            const idx band = a0 == 0 ? GP_SHIFT_ROWS : GP_BAND;
            const idx rows = a0 + band < A ? band : A - a0;
            for (idx u = 0; u < nv; u += 16)
                avx_rows16(base + a0 * j->sA + u, rows, j->sA, a0 == 0, shift + u, t1 + u, t2 + u, j->fhi + u,
                           j->flo + u, &j->nonzero);
            a0 += rows;
        }
        const double n = (double)A;
        for (idx u = 0; u < nv; u++) {
            j->mean[u] = shift[u] + t1[u] / n;
            j->m2[u] = t2[u] - t1[u] * t1[u] / n;
            j->mx[u] = j->fhi[u], j->mn[u] = j->flo[u];
        }
        for (idx u = nv; u < U; u++) {
            /* the units left over: two passes down the column */
            double s = 0.0, h = -INFINITY, l = INFINITY, d = 0.0, q = 0.0;
            scalar_col_pass1(base + u, A, j->sA, &s, &h, &l, &j->nonzero);
            const double m = s / (double)A;
            scalar_col_pass2(base + u, A, j->sA, m, &d, &q);
            j->mean[u] = m, j->m2[u] = q - d * d / (double)A, j->mx[u] = h, j->mn[u] = l;
        }
    } else if (j->sB == 1 && j->sU == B && B >= 64) {
        double *s1 = j->tsum, *s2 = j->tsq;
        for (idx u = 0; u < U; u++) {
            const float *p = base + u * j->sU;
            const idx k = B < 4096 ? B : 4096;
            double s = 0.0, h = -INFINITY, l = INFINITY, z = 0.0;
            avx_run_pass1(p, k, &s, &h, &l, &z); /* only the sum is used: the shift */
            j->tdev[u] = s / (double)k;
            s1[u] = s2[u] = 0.0, j->mx[u] = -INFINITY, j->mn[u] = INFINITY;
        }
        for (idx a = 0; a < A; a++)
            for (idx u = 0; u < U; u++)
                avx_run_shifted(base + a * j->sA + u * j->sU, B, j->tdev[u], s1 + u, s2 + u, j->mx + u, j->mn + u,
                                &j->nonzero);
        const double n = (double)(A * B);
        for (idx u = 0; u < U; u++) {
            j->mean[u] = j->tdev[u] + s1[u] / n;
            j->m2[u] = s2[u] - s1[u] * s1[u] / n;
        }
    } else if (j->sB == 1 && j->sU == B && B >= 8 && A >= 1) {
        if (!avx_short_runs(j, base)) return 0;
    } else {
        return 0;
    }
    for (idx u = 0; u < U; u++) {
        if (isnan(j->mean[u])) {
            /* rare: look for a NaN element (the sum is also NaN for +inf and -inf) */
            for (idx a = 0; a < A; a++)
                for (idx b = 0; b < B; b++) {
                    const float x = base[a * j->sA + u * j->sU + b];
                    if (isnan(x)) j->mx[u] = j->mn[u] = x;
                }
        }
    }
    if (j->saturation) {
        if (j->sA == U * B) { /* dense: one run */
            j->saturated += avx_count_outside(base, A * U * B, j->centre, j->threshold);
        } else { /* each sample's U * B values are contiguous (sU == B, sB == 1), samples further apart */
            for (idx a = 0; a < A; a++) j->saturated += avx_count_outside(base + a * j->sA, U * B, j->centre, j->threshold);
        }
    }
    return 1;
}
#endif

/* The float32 fast paths of a tile; 0 when the layout has none (the generic loops run instead).
 * They fill the tile's per-unit sums (then means), extremes, Σd and Σd², and add to the zero count. */
static int fast_f32(Job *j, const float *base, idx a0, idx a1, idx u0, idx u1, idx b0, idx b1) {
#ifdef GP_VECTOR
    const idx nu = u1 - u0, nb = b1 - b0, sA = j->sA, sU = j->sU, sB = j->sB;
    double *tsum = j->tsum, *tmax = j->tmax, *tmin = j->tmin, *tdev = j->tdev, *tsq = j->tsq;
    const double count = (double)((a1 - a0) * nb);
    if (nb == 1 && sU == 1 && nu >= 8) {
        /* units contiguous along a row: blocks of units down the rows, then the units left over */
        const idx rows = a1 - a0;
        const float *p = base + a0 * sA + b0 * sB + u0;
        /* (with AVX2, rows of at least 16 units take the one-pass path and never reach the tiles) */
        const idx nv = nu - nu % 8;
        for (idx u = 0; u < nv; u += 8) col_pass1(p + u, rows, sA, tsum + u, tmax + u, tmin + u, &j->nonzero);
        for (idx u = nv; u < nu; u++) scalar_col_pass1(p + u, rows, sA, tsum + u, tmax + u, tmin + u, &j->nonzero);
        for (idx u = 0; u < nu; u++) tsum[u] /= count;
        for (idx u = 0; u < nv; u += 8) col_pass2(p + u, rows, sA, tsum + u, tdev + u, tsq + u);
        for (idx u = nv; u < nu; u++) scalar_col_pass2(p + u, rows, sA, tsum[u], tdev + u, tsq + u);
        return 1;
    }
    if (sB == 1 && nb >= 16) {
        /* a contiguous run of positions per (sample, unit) */
        for (idx u = 0; u < nu; u++) tsum[u] = tdev[u] = tsq[u] = 0.0, tmax[u] = -INFINITY, tmin[u] = INFINITY;
        for (idx a = a0; a < a1; a++)
            for (idx u = 0; u < nu; u++) {
                const float *p = base + a * sA + (u0 + u) * sU + b0;
#ifdef GP_AVX2_PATH
                if (have_avx2) {
                    avx_run_pass1(p, nb, tsum + u, tmax + u, tmin + u, &j->nonzero);
                    continue;
                }
#endif
                run_pass1(p, nb, tsum + u, tmax + u, tmin + u, &j->nonzero);
            }
        for (idx u = 0; u < nu; u++) tsum[u] /= count;
        for (idx a = a0; a < a1; a++)
            for (idx u = 0; u < nu; u++) {
                const float *p = base + a * sA + (u0 + u) * sU + b0;
#ifdef GP_AVX2_PATH
                if (have_avx2) {
                    avx_run_pass2(p, nb, tsum[u], tdev + u, tsq + u);
                    continue;
                }
#endif
                run_pass2(p, nb, tsum[u], tdev + u, tsq + u);
            }
        return 1;
    }
#else
    (void)j, (void)base, (void)a0, (void)a1, (void)u0, (void)u1, (void)b0, (void)b1;
#endif
    return 0;
}

static int single_f32(Job *j, const float *base) {
#ifdef GP_AVX2_PATH
    return single_pass_f32(j, base);
#else
    (void)j, (void)base;
    return 0;
#endif
}

static int single_f64(Job *j, const double *base) {
    (void)j, (void)base;
    return 0;
}

static int fast_f64(Job *j, const double *base, idx a0, idx a1, idx u0, idx u1, idx b0, idx b1) {
    (void)j, (void)base, (void)a0, (void)a1, (void)u0, (void)u1, (void)b0, (void)b1;
    return 0;
}


/* Merge a tile's per-unit summaries (tsum holds the tile means) into the running ones: the corrected
 * two-pass M2 of the tile, then Chan's pairwise formula. Every unit of a tile has seen the same count
 * so far (tiles cover whole unit blocks), so the factors are computed once. */
static void merge_tile(Job *j, idx u0, idx nu, double count) {
    const double n = j->n[u0], total = n + count, ic = 1.0 / count;
    double *mean = j->mean + u0, *m2 = j->m2 + u0, *mx = j->mx + u0, *mn = j->mn + u0;
    const double *tsum = j->tsum, *tdev = j->tdev, *tsq = j->tsq, *tmax = j->tmax, *tmin = j->tmin;
    if (n == 0.0) {
        for (idx u = 0; u < nu; u++) {
            mean[u] = tsum[u];
            m2[u] = tsq[u] - tdev[u] * tdev[u] * ic;
            mx[u] = tmax[u];
            mn[u] = tmin[u];
        }
    } else {
        const double f = count / total, g = n * f;
        for (idx u = 0; u < nu; u++) {
            const double delta = tsum[u] - mean[u];
            mean[u] += delta * f;
            m2[u] += (tsq[u] - tdev[u] * tdev[u] * ic) + delta * delta * g;
            /* NaN-propagating, as torch.amax/amin */
            mx[u] = (tmax[u] > mx[u] || tmax[u] != tmax[u]) ? tmax[u] : mx[u];
            mn[u] = (tmin[u] < mn[u] || tmin[u] != tmin[u]) ? tmin[u] : mn[u];
        }
    }
    for (idx u = 0; u < nu; u++) j->n[u0 + u] = total;
}

#define DEFINE_KERNEL(SUFFIX, T)                                                                   \
    static void compute_##SUFFIX(Job *j, const T *base, idx a0, idx a1, idx u0, idx u1, idx b0,   \
                                 idx b1) {                                                         \
        const idx nu = u1 - u0, nb = b1 - b0;                                                      \
        const idx sA = j->sA, sU = j->sU, sB = j->sB;                                              \
        double *tsum = j->tsum, *tmax = j->tmax, *tmin = j->tmin, *tdev = j->tdev, *tsq = j->tsq; \
        double nonzero = 0.0;                                                                      \
        for (idx u = 0; u < nu; u++) {                                                             \
            tsum[u] = 0.0;                                                                         \
            tmax[u] = -INFINITY;                                                                   \
            tmin[u] = INFINITY;                                                                    \
            tdev[u] = 0.0;                                                                         \
            tsq[u] = 0.0;                                                                          \
        }                                                                                          \
        const double count = (double)((a1 - a0) * nb);                                             \
        if (nb == 1 && sU == 1) {                                                                  \
            /* units contiguous: vectorised across the units of a row */                           \
            for (idx a = a0; a < a1; a++) {                                                        \
                const T *row = base + a * sA + b0 * sB + u0;                                       \
                for (idx u = 0; u < nu; u++) {                                                     \
                    const double x = (double)row[u];                                               \
                    tsum[u] += x;                                                                  \
                    tmax[u] = x > tmax[u] ? x : tmax[u];                                           \
                    tmin[u] = x < tmin[u] ? x : tmin[u];                                           \
                    nonzero += (x != 0.0) ? 1.0 : 0.0;                                             \
                }                                                                                  \
            }                                                                                      \
            for (idx u = 0; u < nu; u++) tsum[u] /= count; /* now the tile mean */                 \
            for (idx a = a0; a < a1; a++) {                                                        \
                const T *row = base + a * sA + b0 * sB + u0;                                       \
                for (idx u = 0; u < nu; u++) {                                                     \
                    const double d = (double)row[u] - tsum[u];                                     \
                    tdev[u] += d;                                                                  \
                    tsq[u] += d * d;                                                               \
                }                                                                                  \
            }                                                                                      \
        } else {                                                                                   \
            /* a run of positions per (sample, unit) */                                            \
            for (idx a = a0; a < a1; a++) {                                                        \
                for (idx u = 0; u < nu; u++) {                                                     \
                    const T *p = base + a * sA + (u0 + u) * sU + b0 * sB;                          \
                    double s = 0.0, hi = -INFINITY, lo = INFINITY, nz = 0.0;                       \
                    if (sB == 1) {                                                                 \
                        for (idx b = 0; b < nb; b++) {                                             \
                            const double x = (double)p[b];                                         \
                            s += x;                                                                \
                            hi = x > hi ? x : hi;                                                  \
                            lo = x < lo ? x : lo;                                                  \
                            nz += (x != 0.0) ? 1.0 : 0.0;                                          \
                        }                                                                          \
                    } else {                                                                       \
                        for (idx b = 0; b < nb; b++) {                                             \
                            const double x = (double)p[b * sB];                                    \
                            s += x;                                                                \
                            hi = x > hi ? x : hi;                                                  \
                            lo = x < lo ? x : lo;                                                  \
                            nz += (x != 0.0) ? 1.0 : 0.0;                                          \
                        }                                                                          \
                    }                                                                              \
                    tsum[u] += s;                                                                  \
                    tmax[u] = hi > tmax[u] ? hi : tmax[u];                                         \
                    tmin[u] = lo < tmin[u] ? lo : tmin[u];                                         \
                    nonzero += nz;                                                                 \
                }                                                                                  \
            }                                                                                      \
            for (idx u = 0; u < nu; u++) tsum[u] /= count;                                         \
            for (idx a = a0; a < a1; a++) {                                                        \
                for (idx u = 0; u < nu; u++) {                                                     \
                    const T *p = base + a * sA + (u0 + u) * sU + b0 * sB;                          \
                    const double m = tsum[u];                                                      \
                    double dev = 0.0, sq = 0.0;                                                    \
                    if (sB == 1) {                                                                 \
                        for (idx b = 0; b < nb; b++) {                                             \
                            const double d = (double)p[b] - m;                                     \
                            dev += d;                                                              \
                            sq += d * d;                                                           \
                        }                                                                          \
                    } else {                                                                       \
                        for (idx b = 0; b < nb; b++) {                                             \
                            const double d = (double)p[b * sB] - m;                                \
                            dev += d;                                                              \
                            sq += d * d;                                                           \
                        }                                                                          \
                    }                                                                              \
                    tdev[u] += dev;                                                                \
                    tsq[u] += sq;                                                                  \
                }                                                                                  \
            }                                                                                      \
        }                                                                                          \
        j->nonzero += nonzero;                                                                     \
    }                                                                                              \
                                                                                                   \
    static void finish_##SUFFIX(Job *j, const T *base, idx a0, idx a1, idx u0, idx u1, idx b0,    \
                                idx b1) {                                                          \
        const idx nu = u1 - u0, nb = b1 - b0;                                                      \
        const idx sA = j->sA, sU = j->sU, sB = j->sB;                                              \
        const double count = (double)((a1 - a0) * nb);                                             \
        double *tsum = j->tsum, *tmax = j->tmax, *tmin = j->tmin;                              \
        if (j->saturation) {                                                                       \
            const double c = j->centre, th = j->threshold;                                         \
            double sat = 0.0;                                                                      \
            for (idx a = a0; a < a1; a++)                                                          \
                for (idx u = 0; u < nu; u++) {                                                     \
                    const T *p = base + a * sA + (u0 + u) * sU + b0 * sB;                          \
                    for (idx b = 0; b < nb; b++) sat += (fabs((double)p[b * sB] - c) > th) ? 1.0 : 0.0; \
                }                                                                                  \
            j->saturated += sat;                                                                   \
        }                                                                                          \
        for (idx u = 0; u < nu; u++) {                                                             \
            if (isnan(tsum[u])) {                                                                  \
                /* rare: look for a NaN element (the sum is also NaN for +inf and -inf) */         \
                for (idx a = a0; a < a1; a++)                                                      \
                    for (idx b = 0; b < nb; b++) {                                                 \
                        const double x = (double)base[a * sA + (u0 + u) * sU + (b0 + b) * sB];     \
                        if (isnan(x)) tmax[u] = tmin[u] = x;                                       \
                    }                                                                              \
            }                                                                                      \
        }                                                                                          \
        merge_tile(j, u0, nu, count);                                                              \
    }                                                                                              \
                                                                                                   \
    static void tile_##SUFFIX(Job *j, const T *base, idx a0, idx a1, idx u0, idx u1, idx b0,      \
                              idx b1) {                                                            \
        if (!fast_##SUFFIX(j, base, a0, a1, u0, u1, b0, b1))                                       \
            compute_##SUFFIX(j, base, a0, a1, u0, u1, b0, b1);                                     \
        finish_##SUFFIX(j, base, a0, a1, u0, u1, b0, b1);                                          \
    }                                                                                              \
                                                                                                   \
    static void run_##SUFFIX(Job *j, const T *base) {                                              \
        if (single_##SUFFIX(j, base)) return;                                                      \
        const idx A = j->A, U = j->U, B = j->B, budget = j->budget;                                \
        idx nb, nu, na;                                                                            \
        if (B == 1 && j->sU == 1) {                                                                \
            /* rows of contiguous units: tall tiles at most 128 units wide */                      \
            nb = 1;                                                                                \
            nu = U < 128 ? U : 128;                                                                \
            na = budget / nu > 1 ? budget / nu : 1;                                                \
        } else if (B >= budget) {                                                                  \
            nb = budget, nu = 1, na = 1;                                                           \
        } else {                                                                                   \
            nb = B;                                                                                \
            nu = budget / B < U ? budget / B : U;                                                  \
            na = nu < U ? 1 : (budget / (U * B) > 1 ? budget / (U * B) : 1);                       \
        }                                                                                          \
        for (idx a0 = 0; a0 < A; a0 += na)                                                         \
            for (idx u0 = 0; u0 < U; u0 += nu)                                                     \
                for (idx b0 = 0; b0 < B; b0 += nb)                                                 \
                    tile_##SUFFIX(j, base, a0, a0 + na < A ? a0 + na : A, u0,                      \
                                  u0 + nu < U ? u0 + nu : U, b0, b0 + nb < B ? b0 + nb : B);       \
    }                                                                                              \
                                                                                                   \
    static void sums_##SUFFIX(const T *p, idx n, double *out) {                                    \
        double s[8] = {0}, q[8] = {0};                                                             \
        idx i = 0;                                                                                 \
        for (; i + 8 <= n; i += 8)                                                                 \
            for (int l = 0; l < 8; l++) {                                                          \
                const double x = (double)p[i + l];                                                 \
                s[l] += x;                                                                         \
                q[l] += x * x;                                                                     \
            }                                                                                      \
        double ts = 0.0, tq = 0.0;                                                                 \
        for (; i < n; i++) {                                                                       \
            const double x = (double)p[i];                                                         \
            ts += x;                                                                               \
            tq += x * x;                                                                           \
        }                                                                                          \
        for (int l = 0; l < 8; l++) ts += s[l], tq += q[l];                                        \
        out[0] = ts;                                                                               \
        out[1] = tq;                                                                               \
    }

DEFINE_KERNEL(f32, float)
DEFINE_KERNEL(f64, double)

/* Whether single_pass_f32 takes this layout (its per-unit results then do not depend on the other units) */
static int single_layout(const Job *j) {
#ifdef GP_AVX2_PATH
    if (j->dtype != 0 || !have_avx2) return 0;
    if (j->B == 1 && j->sU == 1 && j->U >= 16) return 1;
    if (j->sB == 1 && j->sU == j->B && j->B >= 8) return 1;
#else
    (void)j;
#endif
    return 0;
}

static void run_job(Job *j) {
    if (j->dtype == 0)
        run_f32(j, (const float *)j->data);
    else
        run_f64(j, (const double *)j->data);
}

static void job_work(void *ctx, idx i) { run_job((Job *)ctx + i); }

/* unit_stats(data, dtype, A, U, B, sA, sU, sB, out, budget, saturation, centre, threshold[, threads])
 * dtype: 0 float32, 1 float64. data and out are addresses (int). With threads > 1, a large tensor of a
 * one-pass layout is split into ranges of units (starting at multiples of 16) read by up to `threads`
 * threads of torch's OpenMP pool; every statistic is the same to the bit as on one thread. */
static PyObject *unit_stats(PyObject *self, PyObject *args) {
    unsigned long long data, out;
    int dtype, saturation, threads = 1;
    Job j;
    memset(&j, 0, sizeof j);
    if (!PyArg_ParseTuple(args, "KinnnnnnKnidd|i", &data, &dtype, &j.A, &j.U, &j.B, &j.sA, &j.sU,
                          &j.sB, &out, &j.budget, &saturation, &j.centre, &j.threshold, &threads))
        return NULL;
    if (j.A < 0 || j.U <= 0 || j.B < 0 || j.budget < 1 || (dtype != 0 && dtype != 1)) {
        PyErr_SetString(PyExc_ValueError, "unit_stats: bad shape, budget or dtype");
        return NULL;
    }
    j.saturation = saturation;
    j.dtype = dtype;
    j.data = (const void *)(uintptr_t)data;
    const idx U = j.U;
    double *work = (double *)malloc(sizeof(double) * (size_t)U * 7);
    if (work == NULL) return PyErr_NoMemory();
    j.fhi = (float *)(work + 6 * U);
    j.flo = j.fhi + U;
    double *res = (double *)(uintptr_t)out;
    j.mean = res;
    j.m2 = res + U;
    j.mx = res + 2 * U;
    j.mn = res + 3 * U;
    j.n = work;
    j.tsum = work + U;
    j.tmax = work + 2 * U;
    j.tmin = work + 3 * U;
    j.tdev = work + 4 * U;
    j.tsq = work + 5 * U;
    for (idx u = 0; u < U; u++) {
        j.n[u] = 0.0;
        j.mean[u] = j.m2[u] = j.mx[u] = j.mn[u] = NAN;
    }
    /* ranges of `per` units (a multiple of 16, at least 16; the last takes the rest, so none is shorter) */
    idx per = U, parts = 1;
    if (threads > 1 && j.A > 0 && j.B > 0 && single_layout(&j) && (double)j.A * (double)U * (double)j.B >= GP_TEAM_MIN) {
        per = (U + GP_TEAM_PARTS * threads - 1) / (GP_TEAM_PARTS * threads) / 16 * 16;
        per = per < 16 ? 16 : per;
        parts = U / per;
        if (parts < 2) per = U, parts = 1; /* fewer than 32 units */
    }
    Job *jobs = parts > 1 ? (Job *)malloc(sizeof(Job) * (size_t)parts) : NULL;
    if (parts > 1 && jobs == NULL) parts = 1; /* no memory for the split: one thread */
    if (parts > 1) {
        find_pool();
        const size_t size = dtype == 0 ? sizeof(float) : sizeof(double);
        for (idx c = 0; c < parts; c++) {
            const idx u0 = c * per;
            Job *k = jobs + c;
            *k = j;
            k->U = c + 1 < parts ? per : U - u0;
            k->data = (const char *)j.data + (size_t)(u0 * j.sU) * size;
            k->mean += u0, k->m2 += u0, k->mx += u0, k->mn += u0, k->n += u0;
            k->tsum += u0, k->tmax += u0, k->tmin += u0, k->tdev += u0, k->tsq += u0;
            k->fhi += u0, k->flo += u0;
        }
    }
    Py_BEGIN_ALLOW_THREADS
    if (j.A > 0 && j.B > 0) {
        run_team(job_work, parts > 1 ? jobs : &j, parts, threads);
        if (parts > 1)
            for (idx c = 0; c < parts; c++) j.nonzero += jobs[c].nonzero, j.saturated += jobs[c].saturated;
    }
    Py_END_ALLOW_THREADS
    res[4 * U] = j.nonzero;
    res[4 * U + 1] = saturation ? j.saturated : -1.0;
    res[4 * U + 2] = -1.0;
    free(jobs);
    free(work);
    Py_RETURN_NONE;
}

/* square_sums(data, dtype, n, out): out[0] = Σx, out[1] = Σx² over n contiguous values. */
/* Σx and Σx² of n contiguous values of dtype 0 (float32) or 1 (float64) into out[0], out[1]; no GIL needed */
static void sums_one(unsigned long long data, int dtype, idx n, double *out) {
    if (dtype == 0) {
#ifdef GP_AVX2_PATH
        if (have_avx2)
            avx_sums((const float *)(uintptr_t)data, n, out);
        else
#endif
            sums_f32((const float *)(uintptr_t)data, n, out);
    } else
        sums_f64((const double *)(uintptr_t)data, n, out);
}

static PyObject *square_sums(PyObject *self, PyObject *args) {
    unsigned long long data, out;
    int dtype;
    idx n;
    if (!PyArg_ParseTuple(args, "KinK", &data, &dtype, &n, &out)) return NULL;
    if (n < 0 || (dtype != 0 && dtype != 1)) {
        PyErr_SetString(PyExc_ValueError, "square_sums: bad length or dtype");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    sums_one(data, dtype, n, (double *)(uintptr_t)out);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* one piece of a tensor of square_sums_many: its values (with `row` > 0: n / row rows of `row` values,
 * each row's Σx written to `rows`) */
typedef struct {
    unsigned long long data;
    int dtype;
    idx n;
    idx row;
    double *rows;
} Item;

typedef struct {
    const Item *list;
    double *res;
} Items;

/* A piece of rows: each row summed on its own from its first value (a row's sums depend on its values
 * alone, not on where it lies: identical rows get identical bits), the rows' sums added in order. */
static void rows_one(const Item *it, double *out) {
    const size_t size = it->dtype == 0 ? sizeof(float) : sizeof(double);
    const idx rows = it->row > 0 ? it->n / it->row : 0;
    double s = 0.0, q = 0.0, r[2];
    for (idx k = 0; k < rows; k++) {
        sums_one(it->data + (unsigned long long)((size_t)(k * it->row) * size), it->dtype, it->row, r);
        it->rows[k] = r[0];
        s += r[0], q += r[1];
    }
    out[0] = s, out[1] = q;
}

static void item_work(void *ctx, idx i) {
    const Items *m = (const Items *)ctx;
    if (m->list[i].row > 0)
        rows_one(&m->list[i], m->res + 2 * i);
    else
        sums_one(m->list[i].data, m->list[i].dtype, m->list[i].n, m->res + 2 * i);
}

/* values per piece: a tensor is summed in pieces of this many values (the threads share out pieces, so
 * one large tensor, a gradient as autograd makes it, is read by all of them), then its pieces' sums are
 * added in order. The pieces depend on the sizes alone: the same bits on any number of threads. */
#define GP_SUM_PIECE (1 << 18)

/* values per piece of a tensor read by rows: whole rows, at least one */
static idx piece_values(const Item *it) {
    if (it->row <= 0) return GP_SUM_PIECE;
    const idx rows = GP_SUM_PIECE / it->row;
    return (rows > 1 ? rows : 1) * it->row;
}

/* the pieces of a tensor (one, also when empty) */
static idx pieces_of(const Item *it) {
    const idx step = piece_values(it);
    return it->n > step ? (it->n + step - 1) / step : 1;
}

/* square_sums_many(items, out[, threads]): square_sums over many tensors in one call (a model's parameters,
 * their gradients): items is a sequence of (data, dtype, n); out[2k] = Σx, out[2k + 1] = Σx² of item k.
 * A tensor of at most GP_SUM_PIECE values is summed as square_sums sums it; a larger one piece by piece.
 * An item (data, dtype, n, row, rows_out) with row > 0 is read as n / row rows of `row` values: each row's
 * Σx goes to the float64 array at address rows_out (the weights' rows: gradprobe.diagnose.grouping's
 * fingerprints of units) and Σx, Σx² are the rows' sums added in order, in pieces of whole rows.
 * With threads > 1 the pieces are shared out among torch's OpenMP threads (the same bits). */
static PyObject *square_sums_many(PyObject *self, PyObject *args) {
    PyObject *items;
    unsigned long long out;
    int threads = 1;
    if (!PyArg_ParseTuple(args, "OK|i", &items, &out, &threads)) return NULL;
    PyObject *seq = PySequence_Fast(items, "square_sums_many: items must be a sequence");
    if (seq == NULL) return NULL;
    const idx k = PySequence_Fast_GET_SIZE(seq);
    Item *list = (Item *)malloc(sizeof(Item) * (size_t)(k > 0 ? k : 1));
    if (list == NULL) {
        Py_DECREF(seq);
        return PyErr_NoMemory();
    }
    double total = 0.0;
    idx pieces = 0;
    for (idx i = 0; i < k; i++) {
        PyObject *it = PySequence_Fast_GET_ITEM(seq, i);
        unsigned long long rows_out = 0;
        list[i].row = 0;
        if (!PyArg_ParseTuple(it, "Kin|nK", &list[i].data, &list[i].dtype, &list[i].n, &list[i].row, &rows_out) ||
            list[i].n < 0 || (list[i].dtype != 0 && list[i].dtype != 1) || list[i].row < 0 ||
            (list[i].row > 0 && (list[i].n % list[i].row != 0 || rows_out == 0))) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "square_sums_many: bad length, dtype or row length");
            free(list);
            Py_DECREF(seq);
            return NULL;
        }
        list[i].rows = (double *)(uintptr_t)rows_out;
        total += (double)list[i].n;
        pieces += pieces_of(&list[i]);
    }
    Py_DECREF(seq);
    double *res = (double *)(uintptr_t)out;
    Item *work = pieces > k ? (Item *)malloc(sizeof(Item) * (size_t)pieces) : list;
    double *partial = pieces > k ? (double *)malloc(sizeof(double) * 2 * (size_t)pieces) : res;
    if (pieces > k && (work == NULL || partial == NULL)) {
        if (work != list) free(work);
        if (partial != res) free(partial);
        free(list);
        return PyErr_NoMemory();
    }
    if (work != list) {
        idx c = 0;
        for (idx i = 0; i < k; i++) {
            const size_t size = list[i].dtype == 0 ? sizeof(float) : sizeof(double);
            const idx step = piece_values(&list[i]);
            for (idx p = 0; p < pieces_of(&list[i]); p++, c++) {
                const idx start = p * step, rest = list[i].n - start;
                work[c] = list[i];
                work[c].data = list[i].data + (unsigned long long)((size_t)start * size);
                work[c].n = rest < step ? rest : step;
                if (list[i].row > 0) work[c].rows = list[i].rows + start / list[i].row;
            }
        }
    }
    Items m = {work, partial};
    if (total < GP_TEAM_MIN) threads = 1;
    if (threads > 1) find_pool();
    Py_BEGIN_ALLOW_THREADS
    run_team(item_work, &m, pieces, threads); /* each piece as on one thread */
    Py_END_ALLOW_THREADS
    if (work != list) {
        idx c = 0;
        for (idx i = 0; i < k; i++) {
            double s = partial[2 * c], q = partial[2 * c + 1]; /* one piece: its own bits */
            const idx end = c + pieces_of(&list[i]);
            for (c++; c < end; c++) s += partial[2 * c], q += partial[2 * c + 1];
            res[2 * i] = s, res[2 * i + 1] = q;
        }
        free(work);
        free(partial);
    }
    free(list);
    Py_RETURN_NONE;
}

/* info(): which loops run here ("avx2", or "portable": vector extensions and scalar loops) */
static PyObject *info(PyObject *self, PyObject *args) {
#ifdef GP_AVX2_PATH
    if (have_avx2) return PyUnicode_FromString("avx2");
#endif
    return PyUnicode_FromString("portable");
}

/* team(): the OpenMP runtime whose threads the kernel shares (None: one thread) and how many threads
 * entered the last call that used it (1 when it ran on the caller's thread alone) */
static PyObject *team(PyObject *self, PyObject *args) {
    find_pool();
    return Py_BuildValue("(zi)", pool_name, last_team);
}

static PyMethodDef methods[] = {
    {"team", team, METH_NOARGS, "The OpenMP runtime shared (or None) and the threads of the last team."},
    {"info", info, METH_NOARGS, "Which loops run on this CPU: 'avx2' or 'portable'."},
    {"unit_stats", unit_stats, METH_VARARGS, "Per-unit statistics of a strided (A, U, B) tensor."},
    {"square_sums", square_sums, METH_VARARGS, "Sum and sum of squares of a contiguous tensor."},
    {"square_sums_many", square_sums_many, METH_VARARGS, "square_sums of many contiguous tensors at once."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "gradprobe._kernel",
                                    "gradprobe's optional one-read statistics kernel.", -1, methods};

PyMODINIT_FUNC PyInit__kernel(void) {
#ifdef GP_AVX2_PATH
    __builtin_cpu_init();
    have_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (getenv("GRADPROBE_KERNEL_NO_AVX2") != NULL) have_avx2 = 0; /* tests: the portable paths */
#endif
    return PyModule_Create(&module);
}
