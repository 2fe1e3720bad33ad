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

/* x86-64: a copy of the passes for CPUs with AVX2 as well, which the compiler vectorizes wider, picked at load
 * time; integer sums, so the order of the additions does not change the result */
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

/* src: the image's rows, `stride` bytes apart, pixels of `px` bytes (1 or 4). out: h rows of w pixels of
 * `px` bytes, the output pixels [x0, x0 + w) x [y0, y0 + h) of a resize to out_w x out_h. Returns 0, or -1
 * for arguments it does not take or memory it could not have. */
int crop_resize(const uint8_t *src, long stride, int px, int in_w, int in_h, int out_w, int out_h, int x0, int y0,
                int w, int h, int filter, uint8_t *out) {
    struct filter fp;
    if (pick(filter, &fp) || (px != 1 && px != 4) || in_w < 1 || in_h < 1 || out_w < 1 || out_h < 1 || w < 1 ||
        h < 1 || x0 < 0 || y0 < 0 || x0 + w > out_w || y0 + h > out_h || stride < (long)in_w * px)
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
            horizontal(rows, stride, px, last - first, bh, kh, ksh, w, tmp);
        else
            for (int r = 0; r < last - first; r++)
                memcpy(tmp + r * ostride, rows + (size_t)r * stride + (size_t)x0 * px, ostride);
        if (need_v) {
            if (vertical(tmp, ostride, (int)ostride, h, bv, kv, ksv, out)) goto done;
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
        if (vertical(src + (size_t)first * px, stride, (int)tstride, h, bv, kv, ksv, tmp)) goto done;
        if (need_h)
            horizontal(tmp, tstride, px, h, bh, kh, ksh, w, out);
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
