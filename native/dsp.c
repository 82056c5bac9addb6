/* voxgate native DSP: conversion, levels and the 16 <-> 48 kHz resampler. */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "dsp.h"

/* ---- conversion ----------------------------------------------------------- */

static inline int16_t clip_s16(float v) {
    v = v > 32767.0f ? 32767.0f : (v < -32768.0f ? -32768.0f : v);
    return (int16_t)lrintf(v);
}

void vg_s16_to_f32(const int16_t *in, float *out, long n) {
    for (long i = 0; i < n; i++) out[i] = (float)in[i] * (1.0f / 32768.0f);
}

void vg_f32_to_s16(const float *in, int16_t *out, long n) {
    for (long i = 0; i < n; i++) out[i] = clip_s16(in[i] * 32768.0f);
}

/* ---- levels --------------------------------------------------------------- */

double vg_rms_s16(const int16_t *x, long n) {
    if (n <= 0) return 0.0;
    /* Integer accumulation is exact and, unlike a float sum, does not depend on
     * how the compiler vectorises the loop. */
    int64_t acc = 0;
    for (long i = 0; i < n; i++) acc += (int32_t)x[i] * (int32_t)x[i];
    return sqrt((double)acc / (double)n) / 32768.0;
}

double vg_peak_s16(const int16_t *x, long n) {
    int32_t m = 0;
    for (long i = 0; i < n; i++) {
        int32_t a = x[i] < 0 ? -(int32_t)x[i] : (int32_t)x[i];
        m = a > m ? a : m;
    }
    return (double)m / 32768.0;
}

double vg_rms_f32(const float *x, long n) {
    if (n <= 0) return 0.0;
    double acc = 0.0;
    for (long i = 0; i < n; i++) acc += (double)x[i] * (double)x[i];
    return sqrt(acc / (double)n);
}

double vg_peak_f32(const float *x, long n) {
    float m = 0.0f;
    for (long i = 0; i < n; i++) {
        float a = fabsf(x[i]);
        m = a > m ? a : m;
    }
    return (double)m;
}

void vg_levels_s16(const int16_t *x, long n_frames, long frame_len, double *rms, double *peak) {
    for (long f = 0; f < n_frames; f++) {
        rms[f] = vg_rms_s16(x + f * frame_len, frame_len);
        peak[f] = vg_peak_s16(x + f * frame_len, frame_len);
    }
}

void vg_levels_f32(const float *x, long n_frames, long frame_len, double *rms, double *peak) {
    for (long f = 0; f < n_frames; f++) {
        rms[f] = vg_rms_f32(x + f * frame_len, frame_len);
        peak[f] = vg_peak_f32(x + f * frame_len, frame_len);
    }
}

/* ---- resampler -------------------------------------------------------------
 *
 * One linear-phase lowpass h[0..TAPS-1] at 48 kHz serves both directions:
 * Kaiser-windowed sinc, cutoff 8 kHz (the 16 kHz Nyquist), beta 7.5.  That
 * gives < 0.003 dB ripple to 7 kHz and > 76 dB rejection from 9 kHz, so images
 * (up) and aliases (down) of speech land below -76 dB; anything folding into
 * 7-8 kHz is already in the transition band.  TAPS = 6k + 1 makes the group
 * delay (TAPS - 1) / 2 = 60 samples at 48 kHz, a whole 20 samples at 16 kHz.
 *
 * Up: y[3m + p] = 3 * sum_k h[3k + p] x[m - k], three phases of UP_K taps.
 * Down: y[m] = sum_i h[i] x[3m - i], evaluated only on every third input.
 * Lengths are padded with zero taps to multiples of 8 for the 8-way dot product.
 */
#define TAPS 121
#define BETA 7.5
#define UP_K 48    /* >= ceil(TAPS / 3), multiple of 8 */
#define DOWN_N 128 /* >= TAPS, multiple of 8 */
#define HIST DOWN_N
#define PI_D 3.14159265358979323846

/* Phase filters stored reversed so each output is a dot product with the
 * history window (oldest sample first). */
static float g_up[VG_RESAMPLE_FACTOR][UP_K];
static float g_down[DOWN_N];
static pthread_once_t g_taps_once = PTHREAD_ONCE_INIT;

static double bessel_i0(double x) {
    double sum = 1.0, term = 1.0, q = x * x / 4.0;
    for (int k = 1; k < 64; k++) {
        term *= q / ((double)k * (double)k);
        sum += term;
        if (term < sum * 1e-17) break;
    }
    return sum;
}

static void init_taps(void) {
    double h[UP_K * VG_RESAMPLE_FACTOR] = {0};
    double fc = 8000.0 / 48000.0, sum = 0.0, mid = (TAPS - 1) / 2.0;
    for (int i = 0; i < TAPS; i++) {
        double t = i - mid;
        double sinc = t == 0.0 ? 2.0 * fc : sin(2.0 * PI_D * fc * t) / (PI_D * t);
        double r = t / mid;
        h[i] = sinc * bessel_i0(BETA * sqrt(1.0 - r * r)) / bessel_i0(BETA);
        sum += h[i];
    }
    for (int i = 0; i < TAPS; i++) h[i] /= sum;
    for (int p = 0; p < VG_RESAMPLE_FACTOR; p++)
        for (int j = 0; j < UP_K; j++)
            g_up[p][j] = (float)(VG_RESAMPLE_FACTOR * h[VG_RESAMPLE_FACTOR * (UP_K - 1 - j) + p]);
    for (int j = 0; j < DOWN_N; j++) g_down[j] = (float)h[DOWN_N - 1 - j];
}

struct VgResampler {
    int direction;
    int ring;  /* history length in use: UP_K or DOWN_N */
    int pos;   /* next write index in [0, ring) */
    int phase; /* down: inputs since the last output, mod 3 */
    /* Each sample is written at pos and pos + ring, so the newest `ring`
     * samples are always contiguous at &hist[pos] (after the advance). */
    float hist[2 * HIST];
};

struct VgResamplerBank {
    int n;
    VgResampler slot[];
};

static inline float dot(const float *a, const float *b, int n) {
    /* Eight partial sums in a fixed order: the compiler keeps them in two SIMD
     * registers without -ffast-math, and the result is bit-identical whatever
     * the chunking of the input. */
    float acc[8] = {0};
    for (int j = 0; j < n; j += 8)
        for (int k = 0; k < 8; k++) acc[k] += a[j + k] * b[j + k];
    return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

static inline const float *push(VgResampler *r, float x) {
    r->hist[r->pos] = x;
    r->hist[r->pos + r->ring] = x;
    if (++r->pos == r->ring) r->pos = 0;
    return &r->hist[r->pos];
}

static int init_state(VgResampler *r, int direction) {
    if (direction != VG_RESAMPLE_UP && direction != VG_RESAMPLE_DOWN) return -1;
    memset(r, 0, sizeof *r);
    r->direction = direction;
    r->ring = direction == VG_RESAMPLE_UP ? UP_K : DOWN_N;
    return 0;
}

VgResampler *vg_resampler_create(int direction) {
    pthread_once(&g_taps_once, init_taps);
    VgResampler *r = malloc(sizeof *r);
    if (r == NULL) return NULL;
    if (init_state(r, direction) != 0) {
        free(r);
        return NULL;
    }
    return r;
}

void vg_resampler_destroy(VgResampler *r) { free(r); }

void vg_resampler_reset(VgResampler *r) { init_state(r, r->direction); }

int vg_resampler_delay(int direction) {
    if (direction == VG_RESAMPLE_UP) return (TAPS - 1) / 2;
    if (direction == VG_RESAMPLE_DOWN) return (TAPS - 1) / 2 / VG_RESAMPLE_FACTOR;
    return -1;
}

static long out_len(int direction, int phase, long n_in) {
    if (n_in <= 0) return 0;
    if (direction == VG_RESAMPLE_UP) return n_in * VG_RESAMPLE_FACTOR;
    /* Outputs fall on inputs where (phase + i) % 3 == 0. */
    long first = (VG_RESAMPLE_FACTOR - phase) % VG_RESAMPLE_FACTOR;
    return n_in > first ? 1 + (n_in - 1 - first) / VG_RESAMPLE_FACTOR : 0;
}

long vg_resampler_output_len(const VgResampler *r, long n_in) {
    return out_len(r->direction, r->phase, n_in);
}

static inline float load(const void *in, int fmt, long i) {
    return fmt == VG_S16 ? (float)((const int16_t *)in)[i] : ((const float *)in)[i];
}

static inline void store(void *out, int fmt, long i, float v) {
    if (fmt == VG_S16)
        ((int16_t *)out)[i] = clip_s16(v);
    else
        ((float *)out)[i] = v;
}

#if defined(__GNUC__)
#define ALWAYS_INLINE static inline __attribute__((always_inline))
#else
#define ALWAYS_INLINE static inline
#endif

/* Inlined into process() with constant formats, once per format pair. */
ALWAYS_INLINE long process_t(VgResampler *r, const void *in, int in_fmt, long n_in, void *out,
                             int out_fmt) {
    long o = 0;
    if (r->direction == VG_RESAMPLE_UP) {
        for (long i = 0; i < n_in; i++) {
            const float *w = push(r, load(in, in_fmt, i));
            for (int p = 0; p < VG_RESAMPLE_FACTOR; p++)
                store(out, out_fmt, o++, dot(g_up[p], w, UP_K));
        }
    } else {
        for (long i = 0; i < n_in; i++) {
            const float *w = push(r, load(in, in_fmt, i));
            if (r->phase == 0) store(out, out_fmt, o++, dot(g_down, w, DOWN_N));
            if (++r->phase == VG_RESAMPLE_FACTOR) r->phase = 0;
        }
    }
    return o;
}

static long process(VgResampler *r, const void *in, int in_fmt, long n_in, void *out,
                    int out_fmt) {
    /* One specialised loop per format pair keeps the per-sample format tests
     * out of the inner loops. */
    if (in_fmt == VG_F32 && out_fmt == VG_F32) return process_t(r, in, VG_F32, n_in, out, VG_F32);
    if (in_fmt == VG_S16 && out_fmt == VG_F32) return process_t(r, in, VG_S16, n_in, out, VG_F32);
    if (in_fmt == VG_F32 && out_fmt == VG_S16) return process_t(r, in, VG_F32, n_in, out, VG_S16);
    return process_t(r, in, VG_S16, n_in, out, VG_S16);
}

static int bad_fmt(int fmt) { return fmt != VG_F32 && fmt != VG_S16; }

long vg_resampler_process(VgResampler *r, const void *in, int in_fmt, long n_in, void *out,
                          int out_fmt) {
    if (bad_fmt(in_fmt) || bad_fmt(out_fmt) || n_in < 0) return -1;
    return process(r, in, in_fmt, n_in, out, out_fmt);
}

VgResamplerBank *vg_bank_create(int direction, int n_slots) {
    if (n_slots <= 0) return NULL;
    pthread_once(&g_taps_once, init_taps);
    VgResamplerBank *b = malloc(sizeof *b + (size_t)n_slots * sizeof(VgResampler));
    if (b == NULL) return NULL;
    b->n = n_slots;
    for (int s = 0; s < n_slots; s++) {
        if (init_state(&b->slot[s], direction) != 0) {
            free(b);
            return NULL;
        }
    }
    return b;
}

void vg_bank_destroy(VgResamplerBank *b) { free(b); }

int vg_bank_reset(VgResamplerBank *b, int slot) {
    if (slot == -1) {
        for (int s = 0; s < b->n; s++) vg_resampler_reset(&b->slot[s]);
        return 0;
    }
    if (slot < 0 || slot >= b->n) return -1;
    vg_resampler_reset(&b->slot[slot]);
    return 0;
}

long vg_bank_process(VgResamplerBank *b, const void *in, int in_fmt, long n_in, void *out,
                     int out_fmt) {
    if (bad_fmt(in_fmt) || bad_fmt(out_fmt) || n_in < 0) return -1;
    int direction = b->slot[0].direction;
    if (direction == VG_RESAMPLE_DOWN && n_in % VG_RESAMPLE_FACTOR != 0) return -1;
    long n_out = out_len(direction, 0, n_in);
    size_t in_size = in_fmt == VG_S16 ? sizeof(int16_t) : sizeof(float);
    size_t out_size = out_fmt == VG_S16 ? sizeof(int16_t) : sizeof(float);
    for (int s = 0; s < b->n; s++) {
        process(&b->slot[s], (const char *)in + (size_t)s * (size_t)n_in * in_size, in_fmt, n_in,
                (char *)out + (size_t)s * (size_t)n_out * out_size, out_fmt);
    }
    return n_out;
}
