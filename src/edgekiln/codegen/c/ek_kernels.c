/* edgekiln integer kernels (portable reference C99). See ek_kernels.h. */
#include "ek_kernels.h"

static int64_t ek_floor_shift(int64_t x, int32_t t) {
    /* floor(x / 2^t) without relying on implementation-defined >> of negative values. */
    if (x >= 0) {
        return x >> t;
    }
    return -((-x + (((int64_t)1 << t) - 1)) >> t);
}

static int64_t ek_floor_div(int64_t n, int64_t d) {
    int64_t q = n / d;
    if ((n % d != 0) && (n < 0)) {
        q -= 1;
    }
    return q;
}

/* n / d rounded to nearest, ties to even; d > 0. */
static int64_t ek_div_round_half_even(int64_t n, int64_t d) {
    int64_t q = ek_floor_div(n, d);
    int64_t r2 = 2 * (n - q * d);
    if (r2 > d || (r2 == d && (q & 1) != 0)) {
        q += 1;
    }
    return q;
}

static int8_t ek_clamp8(int32_t v, int32_t lo, int32_t hi) {
    if (v < lo) {
        v = lo;
    }
    if (v > hi) {
        v = hi;
    }
    return (int8_t)v;
}

int32_t ek_requant(int32_t acc, int32_t mult, int32_t shift) {
    int32_t t;
    int64_t y;
    if (mult == 0) {
        return 0;
    }
    t = 31 - shift;
    y = ek_floor_shift((int64_t)acc * (int64_t)mult + ((int64_t)1 << (t - 1)), t);
    if (y > INT32_MAX) {
        y = INT32_MAX;
    }
    if (y < INT32_MIN) {
        y = INT32_MIN;
    }
    return (int32_t)y;
}

/* Number of significant bits of v (0 for 0). GCC/Clang: one count-leading-zeros instruction
 * (CLZ on Cortex-M3 and up); otherwise (or with -DEK_NO_BUILTINS) a portable binary search
 * giving the same value. */
static int32_t ek_bit_length(uint64_t v) {
#if (defined(__GNUC__) || defined(__clang__)) && !defined(EK_NO_BUILTINS)
    return v == 0 ? 0 : 64 - (int32_t)__builtin_clzll(v);
#else
    int32_t n = 0;
    if (v >> 32) { v >>= 32; n += 32; }
    if (v >> 16) { v >>= 16; n += 16; }
    if (v >> 8) { v >>= 8; n += 8; }
    if (v >> 4) { v >>= 4; n += 4; }
    if (v >> 2) { v >>= 2; n += 2; }
    if (v >> 1) { v >>= 1; n += 1; }
    return n + (int32_t)v;
#endif
}

/* v / 2^n rounded to nearest, ties to even (n >= 1). */
static uint64_t ek_shift_half_even(uint64_t v, int32_t n) {
    const uint64_t half = (uint64_t)1 << (n - 1);
    const uint64_t rem = v & ((half << 1) - 1);
    uint64_t q = v >> n;
    if (rem > half || (rem == half && (q & 1u) != 0)) {
        q += 1;
    }
    return q;
}

/* v rounded to its 24 most significant bits, ties to even: the significand binary32 keeps. */
static uint64_t ek_round24(uint64_t v) {
    const int32_t n = ek_bit_length(v) - 24;
    if (n <= 0) {
        return v;
    }
    return ek_shift_half_even(v, n) << n;
}

int32_t ek_requant_b32(int32_t acc, int32_t mant, int32_t rshift) {
    uint64_t a, q;
    if (acc == 0 || mant == 0) {
        return 0;
    }
    a = acc < 0 ? (uint64_t)(-(int64_t)acc) : (uint64_t)acc;
    if ((a >> 24) != 0) {
        a = ek_round24(a);                              /* float(acc) rounds only beyond 2^24 */
    }
    q = ek_round24(a * (uint64_t)mant);                 /* the float32 product; < 2^56 */
    q = ek_shift_half_even(q, rshift);                  /* rint(): ties to even */
    if (q > (uint64_t)INT32_MAX) {
        q = (uint64_t)INT32_MAX;
    }
    return acc < 0 ? -(int32_t)q : (int32_t)q;
}

/* TFLite's MultiplyByQuantizedMultiplier for a multiplier below 1 (shift <= 0; the export refuses others):
 * x = floor((acc * mult + 2^30) / 2^31) (gemmlowp's saturating rounding doubling high multiply; it cannot
 * saturate, mult > 0), then x / 2^-shift rounded to nearest, ties away from zero. */
int32_t ek_requant_fixed(int32_t acc, int32_t mult, int32_t shift) {
    const int32_t right = -shift;
    const int32_t x = (int32_t)ek_floor_shift((int64_t)acc * (int64_t)mult + ((int64_t)1 << 30), 31);
    uint32_t mask, rem, threshold;
    if (right <= 0) {
        return x;
    }
    mask = ((uint32_t)1 << right) - 1u;
    rem = (uint32_t)x & mask;
    threshold = (mask >> 1) + (x < 0 ? 1u : 0u);
    return (int32_t)ek_floor_shift(x, right) + (rem > threshold ? 1 : 0);
}

#if EK_REQUANT_FIXED_POINT
#define EK_REQUANT_ACC ek_requant_fixed
#define EK_REQUANT_ADD ek_requant_fixed
#else
#define EK_REQUANT_ACC ek_requant_b32
#define EK_REQUANT_ADD ek_requant
#endif

/* The average of a pooling window as int8 from sum(x - input_zp) over its `count` in-bounds values;
 * t = 31 - p->shift. float32-exact: one exact rounding (half to even) of sum * mult / (count << t) + output_zp,
 * the zero point joining before the rounding as in onnxruntime's QLinearAveragePool. Fixed-point: TFLite
 * Micro's MEAN over whole axes, mult/shift dividing by the constant count too (requant_fixed.py), or with
 * mult 0 its AVERAGE_POOL_2D (input and output on one grid, count = the in-bounds values). */
static int32_t ek_pool_average(const ek_pool_params *p, int32_t sum, int32_t count, int32_t t) {
#if EK_REQUANT_FIXED_POINT
    int64_t q;
    (void)t;
    if (p->mult == 0) { /* TFLite Micro's AVERAGE_POOL_2D, one grid: the raw values' mean, ties away from zero */
        const int32_t raw = sum + p->input_zp * count;
        q = raw > 0 ? (raw + count / 2) / count : (raw - count / 2) / count;
    } else {
        q = (int64_t)ek_requant_fixed(sum, p->mult, p->shift) + p->output_zp;
    }
#else
    int64_t q, den;
    if (p->count_include_pad) {
        count = p->k_h * p->k_w;
    }
    den = (int64_t)count << t;
    q = ek_div_round_half_even((int64_t)sum * p->mult + (int64_t)p->output_zp * den, den);
#endif
    return (int32_t)(q < -128 ? -128 : (q > 127 ? 127 : q));
}

/* One output row `oy` of the convolution into out_row (out_w * out_c values). */
static void ek_conv_row(const ek_conv_params *p, const int8_t *in, const int8_t *weights, const int32_t *bias,
                        const int32_t *mult, const int32_t *shift, int32_t oy, int8_t *out_row) {
    const int32_t cin_g = p->in_c / p->groups;
    const int32_t cout_g = p->out_c / p->groups;
    int32_t ox, oc, ky, kx, ic;
    for (ox = 0; ox < p->out_w; ++ox) {
        for (oc = 0; oc < p->out_c; ++oc) {
            const int32_t ic0 = (oc / cout_g) * cin_g;
            const int8_t *w = weights + (int32_t)oc * p->k_h * p->k_w * cin_g;
            int32_t acc = bias[oc];
            for (ky = 0; ky < p->k_h; ++ky) {
                const int32_t iy = oy * p->stride_h - p->pad_top + ky * p->dil_h;
                if (iy < 0 || iy >= p->in_h) {
                    continue; /* padding holds the zero point: (x - zp) * w == 0 */
                }
                for (kx = 0; kx < p->k_w; ++kx) {
                    const int32_t ix = ox * p->stride_w - p->pad_left + kx * p->dil_w;
                    const int8_t *x;
                    const int8_t *wk;
                    if (ix < 0 || ix >= p->in_w) {
                        continue;
                    }
                    x = in + ((int32_t)iy * p->in_w + ix) * p->in_c + ic0;
                    wk = w + (ky * p->k_w + kx) * cin_g;
                    for (ic = 0; ic < cin_g; ++ic) {
                        acc += ((int32_t)x[ic] - p->input_zp) * (int32_t)wk[ic];
                    }
                }
            }
            acc = EK_REQUANT_ACC(acc, mult[oc], shift[oc]) + p->output_zp;
            out_row[(int32_t)ox * p->out_c + oc] = ek_clamp8(acc, p->act_min, p->act_max);
        }
    }
}

void ek_conv2d(const ek_conv_params *p, const int8_t *in, const int8_t *weights, const int32_t *bias,
               const int32_t *mult, const int32_t *shift, int8_t *out) {
    int32_t oy;
    for (oy = 0; oy < p->out_h; ++oy) {
        ek_conv_row(p, in, weights, bias, mult, shift, oy, out + (int32_t)oy * p->out_w * p->out_c);
    }
}

void ek_conv_pool(const ek_conv_pool_params *p, const int8_t *in, const int8_t *weights, const int32_t *bias,
                  const int32_t *mult, const int32_t *shift, int8_t *scratch, int8_t *out) {
    const ek_pool_params *pp = &p->pool;
    const int32_t row_len = p->conv.out_w * p->conv.out_c;
    const int32_t t = 31 - pp->shift;
    int32_t next_row = 0; /* first conv row not computed yet; rows are only ever needed in order */
    int32_t oy, ox, c, ky, kx, r;
    for (oy = 0; oy < pp->out_h; ++oy) {
        int32_t lo = oy * pp->stride_h - pp->pad_top;
        int32_t hi = lo + pp->k_h - 1;
        if (lo < 0) {
            lo = 0;
        }
        if (hi >= p->conv.out_h) {
            hi = p->conv.out_h - 1;
        }
        if (next_row < lo) {
            next_row = lo; /* pool stride > window: rows nobody reads are skipped */
        }
        for (r = next_row; r <= hi; ++r) {
            /* ring slot r % rows: a window spans <= rows consecutive rows, so no live row is overwritten */
            ek_conv_row(&p->conv, in, weights, bias, mult, shift, r, scratch + (r % p->rows) * row_len);
        }
        if (hi + 1 > next_row) {
            next_row = hi + 1;
        }
        for (ox = 0; ox < pp->out_w; ++ox) {
            for (c = 0; c < pp->channels; ++c) {
                int32_t best = -129;
                int32_t sum = 0;
                int32_t count = 0;
                for (ky = 0; ky < pp->k_h; ++ky) {
                    const int32_t iy = oy * pp->stride_h - pp->pad_top + ky;
                    const int8_t *row;
                    if (iy < 0 || iy >= pp->in_h) {
                        continue;
                    }
                    row = scratch + (iy % p->rows) * row_len;
                    for (kx = 0; kx < pp->k_w; ++kx) {
                        const int32_t ix = ox * pp->stride_w - pp->pad_left + kx;
                        int32_t v;
                        if (ix < 0 || ix >= pp->in_w) {
                            continue;
                        }
                        v = row[(int32_t)ix * pp->channels + c];
                        if (v > best) {
                            best = v;
                        }
                        sum += v - pp->input_zp;
                        count += 1;
                    }
                }
                if (p->is_avg) {
                    best = ek_pool_average(pp, sum, count, t);
                }
                out[((int32_t)oy * pp->out_w + ox) * pp->channels + c] = (int8_t)best;
            }
        }
    }
}

void ek_fully_connected(const ek_fc_params *p, const int8_t *in, const int8_t *weights, const int32_t *bias,
                        const int32_t *mult, const int32_t *shift, int8_t *out) {
    int32_t o, i;
    for (o = 0; o < p->out_features; ++o) {
        const int8_t *w = weights + (int32_t)o * p->in_features;
        int32_t acc = bias[o];
        for (i = 0; i < p->in_features; ++i) {
            acc += ((int32_t)in[i] - p->input_zp) * (int32_t)w[i];
        }
        acc = EK_REQUANT_ACC(acc, mult[o], shift[o]) + p->output_zp;
        out[o] = ek_clamp8(acc, p->act_min, p->act_max);
    }
}

void ek_add(const ek_add_params *p, const int8_t *a, const int8_t *b, int8_t *out) {
    int32_t i;
    for (i = 0; i < p->size; ++i) {
        /* (x - zp) * 2^left_shift fits in int32: |x - zp| <= 255 and left_shift is 20. */
        const int32_t xa = ((int32_t)a[i] - p->a_zp) * ((int32_t)1 << p->left_shift);
        const int32_t xb = ((int32_t)b[i] - p->b_zp) * ((int32_t)1 << p->left_shift);
        const int32_t sum = EK_REQUANT_ADD(xa, p->a_mult, p->a_shift) + EK_REQUANT_ADD(xb, p->b_mult, p->b_shift);
        out[i] = ek_clamp8(EK_REQUANT_ADD(sum, p->out_mult, p->out_shift) + p->output_zp, p->act_min, p->act_max);
    }
}

void ek_requantize(const ek_requant_params *p, const int8_t *in, int8_t *out) {
    int32_t i;
    for (i = 0; i < p->size; ++i) {
        const int32_t y = ek_requant((int32_t)in[i] - p->input_zp, p->mult, p->shift) + p->output_zp;
        out[i] = ek_clamp8(y, p->act_min, p->act_max);
    }
}

void ek_max_pool(const ek_pool_params *p, const int8_t *in, int8_t *out) {
    int32_t oy, ox, c, ky, kx;
    for (oy = 0; oy < p->out_h; ++oy) {
        for (ox = 0; ox < p->out_w; ++ox) {
            for (c = 0; c < p->channels; ++c) {
                int32_t best = -129;
                for (ky = 0; ky < p->k_h; ++ky) {
                    const int32_t iy = oy * p->stride_h - p->pad_top + ky;
                    if (iy < 0 || iy >= p->in_h) {
                        continue;
                    }
                    for (kx = 0; kx < p->k_w; ++kx) {
                        const int32_t ix = ox * p->stride_w - p->pad_left + kx;
                        int32_t v;
                        if (ix < 0 || ix >= p->in_w) {
                            continue;
                        }
                        v = in[((int32_t)iy * p->in_w + ix) * p->channels + c];
                        if (v > best) {
                            best = v;
                        }
                    }
                }
                out[((int32_t)oy * p->out_w + ox) * p->channels + c] = (int8_t)best;
            }
        }
    }
}

void ek_avg_pool(const ek_pool_params *p, const int8_t *in, int8_t *out) {
    const int32_t t = 31 - p->shift;
    int32_t oy, ox, c, ky, kx;
    for (oy = 0; oy < p->out_h; ++oy) {
        for (ox = 0; ox < p->out_w; ++ox) {
            for (c = 0; c < p->channels; ++c) {
                int32_t sum = 0;
                int32_t count = 0;
                for (ky = 0; ky < p->k_h; ++ky) {
                    const int32_t iy = oy * p->stride_h - p->pad_top + ky;
                    if (iy < 0 || iy >= p->in_h) {
                        continue;
                    }
                    for (kx = 0; kx < p->k_w; ++kx) {
                        const int32_t ix = ox * p->stride_w - p->pad_left + kx;
                        if (ix < 0 || ix >= p->in_w) {
                            continue;
                        }
                        sum += (int32_t)in[((int32_t)iy * p->in_w + ix) * p->channels + c] - p->input_zp;
                        count += 1;
                    }
                }
                out[((int32_t)oy * p->out_w + ox) * p->channels + c] = (int8_t)ek_pool_average(p, sum, count, t);
            }
        }
    }
}

void ek_concat(const ek_concat_params *p, const int8_t *const *inputs, const int32_t *channels,
               const int32_t *zps, const int32_t *mult, const int32_t *shift, int8_t *out) {
    int32_t i, r, c, offset = 0;
    for (i = 0; i < p->n_inputs; ++i) {
        for (r = 0; r < p->outer; ++r) {
            const int8_t *src = inputs[i] + (int32_t)r * channels[i];
            int8_t *dst = out + (int32_t)r * p->out_c + offset;
            for (c = 0; c < channels[i]; ++c) {
                const int32_t y = ek_requant((int32_t)src[c] - zps[i], mult[i], shift[i]) + p->output_zp;
                dst[c] = ek_clamp8(y, -128, 127);
            }
        }
        offset += channels[i];
    }
}

void ek_softmax(const ek_softmax_params *p, const int8_t *in, const int32_t *lut, int8_t *out) {
    int32_t r, i;
    for (r = 0; r < p->rows; ++r) {
        const int8_t *x = in + (int32_t)r * p->depth;
        int8_t *y = out + (int32_t)r * p->depth;
        int32_t max = -128;
        int64_t sum = 0;
        int64_t denom;
        for (i = 0; i < p->depth; ++i) {
            if (x[i] > max) {
                max = x[i];
            }
        }
        for (i = 0; i < p->depth; ++i) {
            sum += lut[max - x[i]];
        }
        denom = sum << p->div_shift;
        for (i = 0; i < p->depth; ++i) {
            const int64_t num = 2 * (int64_t)lut[max - x[i]] * p->inv_mult + denom;
            y[i] = ek_clamp8((int32_t)(num / (2 * denom)) + p->output_zp, -128, 127);
        }
    }
}

void ek_transpose_nchw(const ek_transpose_params *p, const int8_t *in, int8_t *out) {
    int32_t h, w, c;
    for (h = 0; h < p->height; ++h) {
        for (w = 0; w < p->width; ++w) {
            for (c = 0; c < p->channels; ++c) {
                out[((int32_t)c * p->height + h) * p->width + w] = in[((int32_t)h * p->width + w) * p->channels + c];
            }
        }
    }
}

void ek_lut(const ek_lut_params *p, const int8_t *in, const int8_t *table, int8_t *out) {
    int32_t i;
    for (i = 0; i < p->size; ++i) {
        out[i] = table[(int32_t)in[i] + 128]; /* in == out is allowed: element i is read first */
    }
}

void ek_lut_channel(const ek_lut_channel_params *p, const int8_t *in, const int8_t *table, int8_t *out) {
    int32_t i = 0;
    while (i < p->size) {
        int32_t c;
        for (c = 0; c < p->channels; ++c, ++i) {
            out[i] = table[c * 256 + (int32_t)in[i] + 128]; /* in == out is allowed */
        }
    }
}

void ek_gather(const ek_gather_params *p, const int8_t *in, const int32_t *index, int8_t *out) {
    int32_t px, j;
    for (px = 0; px < p->pixels; ++px) {
        const int8_t *src = in + px * p->in_c;
        int8_t *dst = out + px * p->out_c;
        for (j = 0; j < p->out_c; ++j) {
            dst[j] = src[index[j]];
        }
    }
}

void ek_mul(const ek_mul_params *p, const int8_t *a, const int8_t *b, const int32_t *a_table, const int32_t *b_table,
            int8_t *out) {
    int32_t i, j = 0;
    for (i = 0; i < p->size; ++i) {
        int32_t bi = p->b_channels ? j : i;
        int64_t prod = (int64_t)a_table[(int32_t)a[i] + 128] * b_table[(int32_t)b[bi] + 128];
        if (p->pre_shift > 0) {
            prod = ek_floor_shift(prod + ((int64_t)1 << (p->pre_shift - 1)), p->pre_shift);
        }
        out[i] = ek_clamp8(ek_requant((int32_t)prod, p->mult, p->shift) + p->output_zp, p->act_min, p->act_max);
        if (p->b_channels && ++j == p->b_channels) {
            j = 0;
        }
    }
}

void ek_pad(const ek_pad_params *p, const int8_t *in, int8_t *out) {
    int32_t i, y, x, c;
    int32_t total = p->out_h * p->out_w * p->channels;
    for (i = 0; i < total; ++i) {
        out[i] = (int8_t)p->value;
    }
    for (y = 0; y < p->in_h; ++y) {
        for (x = 0; x < p->in_w; ++x) {
            const int8_t *src = in + ((int32_t)y * p->in_w + x) * p->channels;
            int8_t *dst = out + ((p->pad_top + y * p->stride_h) * p->out_w + p->pad_left + x * p->stride_w)
                                    * p->channels;
            for (c = 0; c < p->channels; ++c) {
                dst[c] = src[c];
            }
        }
    }
}

void ek_resize(const ek_resize_params *p, const int8_t *in, const int32_t *y0, const int32_t *y1, const int32_t *wy,
               const int32_t *x0, const int32_t *x1, const int32_t *wx, int8_t *out) {
    const int64_t one = (int64_t)1 << 15;
    int32_t oy, ox, c;
    for (oy = 0; oy < p->out_h; ++oy) {
        const int8_t *r0 = in + y0[oy] * p->in_w * p->channels;
        const int8_t *r1 = in + y1[oy] * p->in_w * p->channels;
        for (ox = 0; ox < p->out_w; ++ox) {
            int32_t a = x0[ox] * p->channels, b = x1[ox] * p->channels;
            for (c = 0; c < p->channels; ++c) {
                int64_t top = (one - wx[ox]) * (r0[a + c] - p->zero_point) + (int64_t)wx[ox] * (r0[b + c] - p->zero_point);
                int64_t bot = (one - wx[ox]) * (r1[a + c] - p->zero_point) + (int64_t)wx[ox] * (r1[b + c] - p->zero_point);
                int64_t acc = (one - wy[oy]) * top + (int64_t)wy[oy] * bot;
                int64_t v = ek_div_round_half_even(acc, (int64_t)1 << 30) + p->zero_point;
                *out++ = ek_clamp8((int32_t)(v < -128 ? -128 : (v > 127 ? 127 : v)), -128, 127);
            }
        }
    }
}

void ek_mean_lut(const ek_mean_lut_params *p, const int8_t *in, const int32_t *table, int8_t *out) {
    int32_t px, c;
    for (c = 0; c < p->channels; ++c) {
        int32_t acc = 0;
        for (px = 0; px < p->pixels; ++px) {
            acc += table[(int32_t)in[px * p->channels + c] + 128];
        }
        out[c] = ek_clamp8(ek_requant(acc, p->mult, p->shift) + p->output_zp, -128, 127);
    }
}

void ek_add_lut(const ek_add_lut_params *p, const int8_t *a, const int8_t *b, const int32_t *a_table,
                const int32_t *b_table, int8_t *out) {
    int32_t i, j = 0;
    for (i = 0; i < p->size; ++i) {
        int32_t bi = p->b_channels ? j : i;
        /* |a_table|, |b_table| <= 2^29: the sum stays inside int32 */
        int32_t total = a_table[(int32_t)a[i] + 128] + b_table[(int32_t)b[bi] + 128];
        out[i] = ek_clamp8(ek_requant(total, p->mult, p->shift) + p->output_zp, p->act_min, p->act_max);
        if (p->b_channels && ++j == p->b_channels) {
            j = 0;
        }
    }
}
