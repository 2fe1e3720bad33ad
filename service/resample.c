/* Pillow's resampling (src/libImaging/Resample.c) for the part of the output that a crop keeps.
 *
 * Image.resize computes every output pixel, and exact preprocessing then keeps a center crop of them: for a
 * 4000x3000 photo resized to 341x256 and cropped to 224x224, a third of the horizontal pass is thrown away.
 * Pillow's `box` argument would skip it, but passes the box in single precision, so its filter positions
 * and then a few pixels differ from the whole-image resize. This file repeats Pillow's arithmetic step by
 * step, in the same order and precision (coefficients in double, normalized to 22-bit fixed point, sums in
 * 32-bit integers, an 8-bit intermediate between the horizontal and the vertical pass), for the output
 * pixels [x0, x0 + w) x [y0, y0 + h) of the resize of the whole image: the same bytes as
 * `im.resize(size, filter).crop(box)` (tests/test_resample.py compares them on many sizes and filters).
 *
 * Loaded with ctypes (service/resample.py), which lets the interpreter lock go for the call; built by
 * `make resample`. Filters: 1 Lanczos, 2 bilinear, 3 bicubic, 4 box, 5 Hamming (Pillow's numbers). */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define HAVE_AVX2 1
#endif

/* x86-64: a copy of the passes for CPUs with AVX2 as well, which the compiler vectorizes wider, picked at load
 * time; integer sums, so the order of the additions does not change the result. Both passes have
 * hand-written AVX2 forms besides (below), picked at run time. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define WIDE __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define WIDE
#endif

#define PRECISION_BITS (32 - 8 - 2)

static double box_filter(double x) { return (x > -0.5 && x <= 0.5) ? 1.0 : 0.0; }

static double bilinear_filter(double x) {
    if (x < 0.0) x = -x;
    return x < 1.0 ? 1.0 - x : 0.0;
}

static double hamming_filter(double x) {
    if (x < 0.0) x = -x;
    if (x == 0.0) return 1.0;
    if (x >= 1.0) return 0.0;
    x = x * M_PI;
    return sin(x) / x * (0.54f + 0.46f * cos(x));
}

static double bicubic_filter(double x) {
    const double a = -0.5;
    if (x < 0.0) x = -x;
    if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
    if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
    return 0.0;
}

static double sinc_filter(double x) {
    if (x == 0.0) return 1.0;
    x = x * M_PI;
    return sin(x) / x;
}

static double lanczos_filter(double x) {
    if (-3.0 <= x && x < 3.0) return sinc_filter(x) * sinc_filter(x / 3);
    return 0.0;
}

struct filter {
    double (*f)(double);
    double support;
};

static int pick(int id, struct filter *out) {
    switch (id) {
        case 1: *out = (struct filter){lanczos_filter, 3.0}; return 0;
        case 2: *out = (struct filter){bilinear_filter, 1.0}; return 0;
        case 3: *out = (struct filter){bicubic_filter, 2.0}; return 0;
        case 4: *out = (struct filter){box_filter, 0.5}; return 0;
        case 5: *out = (struct filter){hamming_filter, 1.0}; return 0;
        default: return -1;
    }
}

/* Pillow's precompute_coeffs and normalize_coeffs_8bpc, for output positions [first, first + count) of a
 * resize of [0, inSize) to outSize. bounds: (xmin, taps) per position; kk: `ksize` fixed-point weights each. */
static int coeffs(int inSize, int outSize, int first, int count, const struct filter *fp, int *bounds,
                  int32_t **kkp) {
    float in0 = 0.0f, in1 = (float)inSize; /* Image.resize's default box, in single precision like Pillow's */
    double scale, filterscale, support, center, ww, ss;
    int xx, x, ksize, xmin, xmax;
    filterscale = scale = (double)(in1 - in0) / outSize;
    if (filterscale < 1.0) filterscale = 1.0;
    support = fp->support * filterscale;
    ksize = (int)ceil(support) * 2 + 1;
    double *k = malloc(sizeof(double) * ksize);
    int32_t *kk = malloc(sizeof(int32_t) * (size_t)ksize * count);
    if (!k || !kk) {
        free(k);
        free(kk);
        return -1;
    }
    for (xx = first; xx < first + count; xx++) {
        center = in0 + (xx + 0.5) * scale;
        ww = 0.0;
        ss = 1.0 / filterscale;
        xmin = (int)(center - support + 0.5);
        if (xmin < 0) xmin = 0;
        xmax = (int)(center + support + 0.5);
        if (xmax > inSize) xmax = inSize;
        xmax -= xmin;
        for (x = 0; x < xmax; x++) {
            double w = fp->f((x + xmin - center + 0.5) * ss);
            k[x] = w;
            ww += w;
        }
        for (x = 0; x < xmax; x++) {
            if (ww != 0.0) k[x] /= ww;
        }
        for (; x < ksize; x++) k[x] = 0;
        int32_t *o = &kk[(size_t)(xx - first) * ksize];
        for (x = 0; x < ksize; x++) {
            o[x] = k[x] < 0 ? (int)(-0.5 + k[x] * (1 << PRECISION_BITS)) : (int)(0.5 + k[x] * (1 << PRECISION_BITS));
        }
        bounds[(xx - first) * 2] = xmin;
        bounds[(xx - first) * 2 + 1] = xmax;
    }
    free(k);
    *kkp = kk;
    return ksize;
}

static inline uint8_t clip8(int32_t in) {
    int32_t v = in >> PRECISION_BITS;
    return v < 0 ? 0 : (v > 255 ? 255 : (uint8_t)v);
}

/* One row, pixels of `px` bytes (1: L, 4: RGB stored as RGBX like Pillow's); all `px` channels computed. */
#define INLINE static inline __attribute__((always_inline)) /* into each copy of the passes */

INLINE void horizontal_row(const uint8_t *src, uint8_t *dst, int px, int w, const int *bounds, const int32_t *kk,
                           int ksize) {
    for (int xx = 0; xx < w; xx++) {
        const int32_t *k = &kk[(size_t)xx * ksize];
        const uint8_t *p = src + (size_t)bounds[xx * 2] * px;
        int taps = bounds[xx * 2 + 1];
        if (px == 1) {
            int32_t s = 1 << (PRECISION_BITS - 1);
            for (int x = 0; x < taps; x++) s += p[x] * k[x];
            dst[xx] = clip8(s);
            continue;
        }
        int32_t s[4] = {1 << (PRECISION_BITS - 1), 1 << (PRECISION_BITS - 1), 1 << (PRECISION_BITS - 1),
                        1 << (PRECISION_BITS - 1)};
        for (int x = 0; x < taps; x++) {
            for (int c = 0; c < 4; c++) s[c] += p[x * 4 + c] * k[x];
        }
        for (int c = 0; c < 4; c++) dst[xx * 4 + c] = clip8(s[c]);
    }
}

INLINE void vertical_row(const uint8_t *src, size_t sstride, uint8_t *dst, int n, int ymin, int taps, const int32_t *k,
                         int32_t *acc) {
    for (int i = 0; i < n; i++) acc[i] = 1 << (PRECISION_BITS - 1);
    for (int y = 0; y < taps; y++) {
        const uint8_t *row = src + (size_t)(y + ymin) * sstride;
        int32_t ky = k[y];
        for (int i = 0; i < n; i++) acc[i] += row[i] * ky;
    }
    for (int i = 0; i < n; i++) dst[i] = clip8(acc[i]);
}

/* The horizontal pass over `rows` rows of `src` (`sstride` bytes apart) into `dst` (w pixels a row). */
WIDE static void horizontal(const uint8_t *src, size_t sstride, int px, int rows, const int *bounds,
                            const int32_t *kk, int ksize, int w, uint8_t *dst) {
    for (int r = 0; r < rows; r++) {
        const uint8_t *row = src + (size_t)r * sstride;
        uint8_t *out = dst + (size_t)r * w * px;
        horizontal_row(row, out, px, w, bounds, kk, ksize);
    }
}

/* The vertical pass: output row i reads src rows bounds[2i] .. + bounds[2i + 1]; each row `n` bytes. */
WIDE static int vertical(const uint8_t *src, size_t sstride, int n, int h, const int *bounds, const int32_t *kk,
                         int ksize, uint8_t *dst) {
    int32_t *acc = malloc(sizeof(int32_t) * (size_t)n);
    if (!acc) return -1;
    for (int i = 0; i < h; i++)
        vertical_row(src, sstride, dst + (size_t)i * n, n, bounds[i * 2], bounds[i * 2 + 1], &kk[(size_t)i * ksize],
                     acc);
    free(acc);
    return 0;
}

/* AVX2 forms of the passes, with vpmaddwd: it multiplies 16-bit pairs and adds each pair into 32 bits. A
 * weight has 22 bits, so each is split into hi * 2048 + lo (lo in [0, 2048), hi signed, both 16-bit); the
 * sums of pixel * hi and of pixel * lo then give Pillow's sum as (hi_sum << 11) + lo_sum. The arithmetic is
 * modulo 2^32 throughout, so the result is Pillow's wherever Pillow's own 32-bit sum does not overflow. */
#ifdef HAVE_AVX2
static int simd = -1; /* -1: not yet asked; 0: the portable passes; 1: AVX2 */

static int use_avx2(void) {
    if (simd < 0) {
        __builtin_cpu_init();
        simd = __builtin_cpu_supports("avx2") ? 1 : 0;
    }
    return simd;
}

/* Whether every weight's high part fits 16 bits (it does for weights of Pillow's filters, all near or below
 * 1.0, so up to about 2^22; a window of weights that nearly cancel could give larger ones) */
static int fits16(const int32_t *kk, size_t count) {
    for (size_t i = 0; i < count; i++)
        if ((kk[i] >> 11) > 32767 || (kk[i] >> 11) < -32768) return 0;
    return 1;
}

/* The horizontal weights as the AVX2 passes read them: for output pixel xx, `groups` groups of taps from
 * source pixel starts[xx]; a group is 16 hi words, then 16 lo words. RGBX pixels: 4 taps a group, the pairs
 * of taps 0,1 four times, then 2,3 four times (one pair per channel, in the order the pixels are shuffled
 * to); grey pixels: 16 taps a group, in order. A window is moved left where it would pass the end of the
 * row, its weights moved right with it; returns NULL where the row is narrower than a window. */
static int16_t *split_horizontal(const int *bounds, const int32_t *kk, int ksize, int w, int row_px, int px,
                                 int *starts, int *groups_out) {
    int per = px == 4 ? 4 : 16, copies = px == 4 ? 4 : 1;
    int groups = (ksize + per - 1) / per;
    if (groups * per > row_px) return NULL;
    int16_t *kw = calloc((size_t)w * groups * 32, sizeof(int16_t));
    if (!kw) return NULL;
    for (int xx = 0; xx < w; xx++) {
        int xmin = bounds[xx * 2], taps = bounds[xx * 2 + 1];
        int start = xmin + groups * per > row_px ? row_px - groups * per : xmin;
        starts[xx] = start;
        int16_t *o = kw + (size_t)xx * groups * 32;
        for (int x = 0; x < taps; x++) {
            int j = xmin - start + x, g = j / per, t = j % per;
            int32_t k = kk[(size_t)xx * ksize + x];
            for (int c = 0; c < copies; c++) {
                int at = g * 32 + (px == 4 ? (t / 2) * 8 + c * 2 + t % 2 : t);
                o[at] = (int16_t)(k >> 11);
                o[at + 16] = (int16_t)(k & 2047);
            }
        }
    }
    *groups_out = groups;
    return kw;
}

/* Pillow's rounding, shift and clip of four sums, given as hi and lo sums */
__attribute__((target("avx2"))) static inline __m128i finish4(__m128i hi, __m128i lo) {
    __m128i s = _mm_add_epi32(_mm_add_epi32(_mm_slli_epi32(hi, 11), lo), _mm_set1_epi32(1 << (PRECISION_BITS - 1)));
    return _mm_srai_epi32(s, PRECISION_BITS);
}

/* RGBX pixels (px 4): four taps a step, the two halves of the register taking two pixels each, their R, G, B
 * and X words paired as vpmaddwd pairs them. Grey pixels (px 1): sixteen taps a step, widened to words, the
 * eight sums added at the end. */
__attribute__((target("avx2"), always_inline)) static inline void horizontal_avx2_px(
    const uint8_t *src, size_t sstride, const int px, int rows, const int *starts, const int16_t *kw, int groups, int w,
    uint8_t *dst) {
    const __m256i shuffle = _mm256_setr_epi8(0, -1, 4, -1, 1, -1, 5, -1, 2, -1, 6, -1, 3, -1, 7, -1, 8, -1, 12, -1, 9,
                                             -1, 13, -1, 10, -1, 14, -1, 11, -1, 15, -1);
    for (int r = 0; r < rows; r++) {
        const uint8_t *row = src + (size_t)r * sstride;
        uint8_t *out = dst + (size_t)r * w * px;
        for (int xx = 0; xx < w; xx++) {
            const uint8_t *p = row + (size_t)starts[xx] * px;
            const int16_t *k = kw + (size_t)xx * groups * 32;
            __m256i hi = _mm256_setzero_si256(), lo = _mm256_setzero_si256();
            for (int g = 0; g < groups; g++) {
                __m128i bytes = _mm_loadu_si128((const __m128i *)(p + g * 16));
                __m256i v = px == 4 ? _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(bytes), shuffle)
                                    : _mm256_cvtepu8_epi16(bytes);
                hi = _mm256_add_epi32(hi, _mm256_madd_epi16(v, _mm256_loadu_si256((const __m256i *)(k + g * 32))));
                lo = _mm256_add_epi32(lo, _mm256_madd_epi16(v, _mm256_loadu_si256((const __m256i *)(k + g * 32 + 16))));
            }
            __m128i h = _mm_add_epi32(_mm256_castsi256_si128(hi), _mm256_extracti128_si256(hi, 1));
            __m128i l = _mm_add_epi32(_mm256_castsi256_si128(lo), _mm256_extracti128_si256(lo, 1));
            if (px == 1) { /* four partial sums of one grey pixel: added into lane 0 */
                h = _mm_hadd_epi32(_mm_hadd_epi32(h, h), h);
                l = _mm_hadd_epi32(_mm_hadd_epi32(l, l), l);
            }
            __m128i v = finish4(h, l);
            int32_t out4 = _mm_cvtsi128_si32(_mm_packus_epi16(_mm_packs_epi32(v, v), v));
            memcpy(out + (size_t)xx * px, &out4, (size_t)px); /* little-endian: lane 0's byte first */
        }
    }
}

/* One copy of the loop for each pixel size, each with its own branch taken out of it */
__attribute__((target("avx2"))) static void horizontal_avx2(const uint8_t *src, size_t sstride, int px, int rows,
                                                             const int *starts, const int16_t *kw, int groups, int w,
                                                             uint8_t *dst) {
    if (px == 4)
        horizontal_avx2_px(src, sstride, 4, rows, starts, kw, groups, w, dst);
    else
        horizontal_avx2_px(src, sstride, 1, rows, starts, kw, groups, w, dst);
}

/* Sixteen columns a step, two source rows a step: the rows' bytes interleaved as 16-bit pairs */
__attribute__((target("avx2"))) static void vertical_avx2(const uint8_t *src, size_t sstride, int n, int h,
                                                           const int *bounds, const int32_t *kk, int ksize,
                                                           uint8_t *dst) {
    const __m256i round = _mm256_set1_epi32(1 << (PRECISION_BITS - 1));
    for (int i = 0; i < h; i++) {
        int ymin = bounds[i * 2], taps = bounds[i * 2 + 1];
        const int32_t *k = &kk[(size_t)i * ksize];
        uint8_t *out = dst + (size_t)i * n;
        int c = 0;
        for (; c + 16 <= n; c += 16) {
            __m256i h0 = _mm256_setzero_si256(), h1 = h0, l0 = h0, l1 = h0;
            for (int y = 0; y < taps; y += 2) {
                const uint8_t *a = src + (size_t)(ymin + y) * sstride + c;
                __m256i va = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)a)), vb = _mm256_setzero_si256();
                int32_t k0 = k[y], k1 = 0;
                if (y + 1 < taps) {
                    vb = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(a + sstride)));
                    k1 = k[y + 1];
                }
                __m256i pairs0 = _mm256_unpacklo_epi16(va, vb), pairs1 = _mm256_unpackhi_epi16(va, vb);
                __m256i khi = _mm256_set1_epi32((int32_t)((uint32_t)(uint16_t)(k0 >> 11) | ((uint32_t)(k1 >> 11) << 16)));
                __m256i klo = _mm256_set1_epi32((k0 & 2047) | ((k1 & 2047) << 16));
                h0 = _mm256_add_epi32(h0, _mm256_madd_epi16(pairs0, khi));
                h1 = _mm256_add_epi32(h1, _mm256_madd_epi16(pairs1, khi));
                l0 = _mm256_add_epi32(l0, _mm256_madd_epi16(pairs0, klo));
                l1 = _mm256_add_epi32(l1, _mm256_madd_epi16(pairs1, klo));
            }
            __m256i s0 = _mm256_srai_epi32(_mm256_add_epi32(_mm256_add_epi32(_mm256_slli_epi32(h0, 11), l0), round),
                                           PRECISION_BITS);
            __m256i s1 = _mm256_srai_epi32(_mm256_add_epi32(_mm256_add_epi32(_mm256_slli_epi32(h1, 11), l1), round),
                                           PRECISION_BITS);
            /* columns 0-3, 8-11 in s0 and 4-7, 12-15 in s1: the packs put them back in order, lane by lane */
            __m256i v = _mm256_packs_epi32(s0, s1);
            v = _mm256_packus_epi16(v, v);
            v = _mm256_permute4x64_epi64(v, 0x08);
            _mm_storeu_si128((__m128i *)(out + c), _mm256_castsi256_si128(v));
        }
        for (; c < n; c++) { /* the last columns of a row not a multiple of 16 wide */
            int32_t s = 1 << (PRECISION_BITS - 1);
            for (int y = 0; y < taps; y++) s += src[(size_t)(ymin + y) * sstride + c] * k[y];
            out[c] = clip8(s);
        }
    }
}
#endif

/* The passes, in AVX2 where the CPU has it and the arguments allow */
static int run_horizontal(const uint8_t *src, size_t sstride, int row_px, int px, int rows, const int *bounds,
                          const int32_t *kk, int ksize, int w, uint8_t *dst) {
#ifdef HAVE_AVX2
    if (use_avx2() && fits16(kk, (size_t)w * ksize)) {
        int groups = 0, *starts = malloc(sizeof(int) * (size_t)w);
        int16_t *kw = starts ? split_horizontal(bounds, kk, ksize, w, row_px, px, starts, &groups) : NULL;
        if (kw) horizontal_avx2(src, sstride, px, rows, starts, kw, groups, w, dst);
        free(starts);
        free(kw);
        if (kw) return 0;
    }
#else
    (void)row_px;
#endif
    horizontal(src, sstride, px, rows, bounds, kk, ksize, w, dst);
    return 0;
}

static int run_vertical(const uint8_t *src, size_t sstride, int n, int h, const int *bounds, const int32_t *kk,
                        int ksize, uint8_t *dst) {
#ifdef HAVE_AVX2
    if (use_avx2() && fits16(kk, (size_t)h * ksize)) {
        vertical_avx2(src, sstride, n, h, bounds, kk, ksize, dst);
        return 0;
    }
#endif
    return vertical(src, sstride, n, h, bounds, kk, ksize, dst);
}

/* Whether the AVX2 passes may run (1) or the portable ones must (0), for tests that compare both; returns
 * whether they could before. Without AVX2, always 0. */
int resample_simd(int on) {
#ifdef HAVE_AVX2
    int before = use_avx2();
    simd = on ? -1 : 0; /* on: asked of the CPU again */
    use_avx2();
    return before;
#else
    (void)on;
    return 0;
#endif
}

/* The rows (or columns) the kept outputs read, [*first, *last), and the bounds made relative to *first. */
static void span(int *bounds, int count, int *first, int *last) {
    *first = bounds[0];
    *last = bounds[0] + bounds[1];
    for (int i = 1; i < count; i++) {
        if (bounds[i * 2] < *first) *first = bounds[i * 2];
        if (bounds[i * 2] + bounds[i * 2 + 1] > *last) *last = bounds[i * 2] + bounds[i * 2 + 1];
    }
    for (int i = 0; i < count; i++) bounds[i * 2] -= *first;
}

/* The source positions [*lo, *hi) that the output positions [first, first + count) of a resize of in_size to
 * out_size read (the whole window of each filter tap). Returns 0, or -1 for arguments it does not take. */
int crop_span(int in_size, int out_size, int first, int count, int filter, int *lo, int *hi) {
    struct filter fp;
    int32_t *kk = NULL;
    if (pick(filter, &fp) || in_size < 1 || out_size < 1 || first < 0 || count < 1 || first + count > out_size)
        return -1;
    int *bounds = malloc(sizeof(int) * 2 * count);
    if (!bounds || coeffs(in_size, out_size, first, count, &fp, bounds, &kk) < 0) {
        free(bounds);
        return -1;
    }
    span(bounds, count, lo, hi);
    free(bounds);
    free(kk);
    return 0;
}

/* Whether a window of `bounds` leaves the region [o, o + n); if none does, the bounds are made the region's. */
static int leaves(int *bounds, int count, int o, int n) {
    for (int i = 0; i < count; i++)
        if (bounds[i * 2] < o || bounds[i * 2] + bounds[i * 2 + 1] > o + n) return 1;
    for (int i = 0; i < count; i++) bounds[i * 2] -= o;
    return 0;
}

/* src: the rows of a region of the image, `stride` bytes apart, pixels of `px` bytes (1 or 4): the region is
 * [ox, ox + rw) x [oy, oy + rh) of an in_w x in_h image (the whole image: 0, 0, in_w, in_h). out: h rows of w
 * pixels of `px` bytes, the output pixels [x0, x0 + w) x [y0, y0 + h) of a resize of the whole image to
 * out_w x out_h. Returns 0; -1 for arguments it does not take or memory it could not have; -2 where the
 * pixels read are not all in the region. */
int crop_resize(const uint8_t *src, long stride, int px, int in_w, int in_h, int ox, int oy, int rw, int rh,
                int out_w, int out_h, int x0, int y0, int w, int h, int filter, uint8_t *out) {
    struct filter fp;
    if (pick(filter, &fp) || (px != 1 && px != 4) || in_w < 1 || in_h < 1 || out_w < 1 || out_h < 1 || w < 1 ||
        h < 1 || x0 < 0 || y0 < 0 || x0 + w > out_w || y0 + h > out_h || ox < 0 || oy < 0 || rw < 1 || rh < 1 ||
        ox + rw > in_w || oy + rh > in_h || stride < (long)rw * px)
        return -1;
    /* Pillow skips a pass whose size does not change (the box being the whole image), and runs the vertical
     * pass first where the height shrinks by more than twice what the width does */
    int need_h = out_w != in_w, need_v = out_h != in_h;
    int horizontal_first = !((in_h - out_h) > 0 && (in_h - out_h) > (in_w - out_w) * 2);
    int *bh = malloc(sizeof(int) * 2 * w), *bv = malloc(sizeof(int) * 2 * h);
    int32_t *kh = NULL, *kv = NULL;
    uint8_t *tmp = NULL;
    int rc = -1, ksh = 0, ksv = 0, first, last;
    if (!bh || !bv) goto done;
    if (need_h && (ksh = coeffs(in_w, out_w, x0, w, &fp, bh, &kh)) < 0) goto done;
    if (need_v && (ksv = coeffs(in_h, out_h, y0, h, &fp, bv, &kv)) < 0) goto done;
    /* from here on, source positions are the region's: every one read must lie in it */
    if (need_h ? leaves(bh, w, ox, rw) : (x0 < ox || x0 + w > ox + rw)) {
        rc = -2;
        goto done;
    }
    if (need_v ? leaves(bv, h, oy, rh) : (y0 < oy || y0 + h > oy + rh)) {
        rc = -2;
        goto done;
    }
    x0 -= ox, y0 -= oy;
    size_t ostride = (size_t)w * px;
    if (horizontal_first) {
        /* the source rows the kept output rows read, through the kept output columns */
        if (need_v)
            span(bv, h, &first, &last);
        else
            first = y0, last = y0 + h;
        tmp = malloc(ostride * (size_t)(last - first));
        if (!tmp) goto done;
        const uint8_t *rows = src + (size_t)first * stride;
        if (need_h)
            run_horizontal(rows, stride, rw, px, last - first, bh, kh, ksh, w, tmp);
        else
            for (int r = 0; r < last - first; r++)
                memcpy(tmp + r * ostride, rows + (size_t)r * stride + (size_t)x0 * px, ostride);
        if (need_v) {
            if (run_vertical(tmp, ostride, (int)ostride, h, bv, kv, ksv, out)) goto done;
        } else {
            memcpy(out, tmp, ostride * h);
        }
    } else { /* need_v holds here: the height shrinks */
        /* the source columns the kept output columns read, through the kept output rows */
        if (need_h)
            span(bh, w, &first, &last);
        else
            first = x0, last = x0 + w;
        size_t tstride = (size_t)(last - first) * px;
        tmp = malloc(tstride * h);
        if (!tmp) goto done;
        if (run_vertical(src + (size_t)first * px, stride, (int)tstride, h, bv, kv, ksv, tmp)) goto done;
        if (need_h)
            run_horizontal(tmp, tstride, last - first, px, h, bh, kh, ksh, w, out);
        else
            memcpy(out, tmp, ostride * h);
    }
    rc = 0;
done:
    free(bh);
    free(bv);
    free(kh);
    free(kv);
    free(tmp);
    return rc;
}
