/* One rectangle of a JPEG decoded alone, with the libjpeg-turbo that Pillow decodes with.
 *
 * Exact preprocessing reads only part of a photo: the center crop of a 4000x3000 JPEG resized to 256 reads
 * about 60% of its pixels. libjpeg-turbo must entropy-decode every block before the last row it returns, but
 * the inverse DCT, the chroma upsampling and the colour conversion can be left out for the columns outside a
 * rectangle (jpeg_crop_scanline) and the rows above it (jpeg_skip_scanlines), and decoding can stop after its
 * last row. Those three steps are most of a JPEG's decode time.
 *
 * The pixels are the ones a whole decode gives (Pillow's settings: the accurate integer DCT, fancy
 * upsampling), except near the rectangle's edges, where the upsampling sees an edge that the whole image does
 * not have: the caller asks for a margin beyond what it reads (service/jpeg_region.py). Anything unusual
 * (another colour space, a warning from libjpeg, such as corrupt data) returns 1, and the caller decodes the
 * whole image with Pillow as before, so that its answer and its errors stay Pillow's.
 *
 * Built without linking libjpeg: service/jpeg_region.py loads Pillow's own copy first, whose symbols this
 * library then uses, so that both decode with the same code. Built by `make jpeg-region`. */

#include <setjmp.h>
#include <stddef.h>
#include <stdio.h> /* before jpeglib.h, which uses FILE and size_t */

#include <jpeglib.h>

struct failure {
    struct jpeg_error_mgr pub;
    jmp_buf jump;
    int warned;
};

static void fail(j_common_ptr cinfo) { longjmp(((struct failure *)cinfo->err)->jump, 1); }

static void note(j_common_ptr cinfo, int level) {
    if (level < 0) ((struct failure *)cinfo->err)->warned = 1; /* a warning: corrupt or truncated data */
}

static void quiet(j_common_ptr cinfo) { (void)cinfo; }

/* Decode the pixels [x0, x0 + w) x [y0, y0 + h) of `data` into `out`, rows `stride` bytes apart, `px` bytes
 * a pixel (4: RGBX, 1: grey). x0 must lie on a boundary of the JPEG's blocks (a multiple of 32 always does).
 * Returns 0; 1 where this does not decode it (another colour space or pixel size, a misaligned x0, an error
 * or a warning from libjpeg): the caller then decodes the whole image another way. */
int jpeg_region(const unsigned char *data, unsigned long size, int px, int x0, int y0, int w, int h,
                unsigned char *out, long stride) {
    struct jpeg_decompress_struct cinfo;
    struct failure err;
    JSAMPROW rows[16];
    cinfo.err = jpeg_std_error(&err.pub);
    err.pub.error_exit = fail;
    err.pub.emit_message = note;
    err.pub.output_message = quiet;
    err.warned = 0;
    jpeg_create_decompress(&cinfo);
    if (setjmp(err.jump)) {
        jpeg_destroy_decompress(&cinfo);
        return 1;
    }
    jpeg_mem_src(&cinfo, data, size);
    if (jpeg_read_header(&cinfo, TRUE) != JPEG_HEADER_OK) goto refuse;
    if (px == 4 && cinfo.num_components == 3 &&
        (cinfo.jpeg_color_space == JCS_YCbCr || cinfo.jpeg_color_space == JCS_RGB))
        cinfo.out_color_space = JCS_EXT_RGBX;
    else if (px == 1 && cinfo.num_components == 1 && cinfo.jpeg_color_space == JCS_GRAYSCALE)
        cinfo.out_color_space = JCS_GRAYSCALE;
    else
        goto refuse;
    if (x0 < 0 || y0 < 0 || w < 1 || h < 1 || (unsigned)(x0 + w) > cinfo.image_width ||
        (unsigned)(y0 + h) > cinfo.image_height || stride < (long)w * px)
        goto refuse;
    cinfo.dct_method = JDCT_ISLOW;
    cinfo.do_fancy_upsampling = TRUE;
    jpeg_start_decompress(&cinfo);
    if ((unsigned)w != cinfo.output_width) {
        JDIMENSION xoffset = (JDIMENSION)x0, width = (JDIMENSION)w;
        jpeg_crop_scanline(&cinfo, &xoffset, &width);
        if (xoffset != (JDIMENSION)x0 || width != (JDIMENSION)w) goto refuse;
    }
    if (y0 > 0 && jpeg_skip_scanlines(&cinfo, (JDIMENSION)y0) != (JDIMENSION)y0) goto refuse;
    while (cinfo.output_scanline < (JDIMENSION)(y0 + h)) {
        int n = (int)((JDIMENSION)(y0 + h) - cinfo.output_scanline);
        if (n > 16) n = 16;
        for (int i = 0; i < n; i++) rows[i] = out + (long)(cinfo.output_scanline - (JDIMENSION)y0 + i) * stride;
        if (jpeg_read_scanlines(&cinfo, rows, (JDIMENSION)n) == 0) goto refuse;
    }
    if (err.warned) goto refuse;
    jpeg_destroy_decompress(&cinfo); /* the rows below are never decoded */
    return 0;
refuse:
    jpeg_destroy_decompress(&cinfo);
    return 1;
}
