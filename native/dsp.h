/* voxgate native DSP: hot loops over samples.
 *
 * This file is both the C header and the cffi cdef (build_ext.py reads it), so
 * it holds declarations and integer #defines only: no includes, no guards.
 * The includer provides <stdint.h>.  All lengths are in samples.
 */

/* Sample formats for the resampler's input and output buffers.  VG_S16 values
 * convert to and from float by value (no 1/32768 scaling): the resampler runs
 * on whatever scale it is fed, and RNNoise wants the int16 scale. */
#define VG_F32 0
#define VG_S16 1

#define VG_RESAMPLE_UP 1   /* 16 kHz -> 48 kHz */
#define VG_RESAMPLE_DOWN 2 /* 48 kHz -> 16 kHz */
#define VG_RESAMPLE_FACTOR 3

/* Conversion; float is normalised to [-1, 1) (full scale 32768). */
void vg_s16_to_f32(const int16_t *in, float *out, long n);
void vg_f32_to_s16(const float *in, int16_t *out, long n);

/* Levels, normalised to full scale (int16: 32768; float: 1.0). */
double vg_rms_s16(const int16_t *x, long n);
double vg_peak_s16(const int16_t *x, long n);
double vg_rms_f32(const float *x, long n);
double vg_peak_f32(const float *x, long n);
/* Batch: n_frames rows of frame_len samples, one (rms, peak) pair per row. */
void vg_levels_s16(const int16_t *x, long n_frames, long frame_len, double *rms, double *peak);
void vg_levels_f32(const float *x, long n_frames, long frame_len, double *rms, double *peak);

/* 16 kHz <-> 48 kHz polyphase windowed-sinc resampler with carried state. */
typedef struct VgResampler VgResampler;
VgResampler *vg_resampler_create(int direction);
void vg_resampler_destroy(VgResampler *r);
void vg_resampler_reset(VgResampler *r);
/* Group delay in output samples; -1 for an unknown direction. */
int vg_resampler_delay(int direction);
/* Output samples that the next vg_resampler_process of n_in samples yields. */
long vg_resampler_output_len(const VgResampler *r, long n_in);
/* Returns the number of output samples written; -1 on a bad format. */
long vg_resampler_process(VgResampler *r, const void *in, int in_fmt, long n_in,
                          void *out, int out_fmt);

/* Batch: a bank of n independent resamplers (one per session) in one block.
 * Row s of `in` (n_in samples) feeds slot s; row s of `out` receives its output.
 * Every slot sees the same n_in per call, so all slots stay in phase; a down
 * bank therefore takes n_in that is a multiple of 3. */
typedef struct VgResamplerBank VgResamplerBank;
VgResamplerBank *vg_bank_create(int direction, int n_slots);
void vg_bank_destroy(VgResamplerBank *b);
/* slot -1 resets every slot.  Returns 0, or -1 if slot is out of range. */
int vg_bank_reset(VgResamplerBank *b, int slot);
/* Returns the output samples per row, or -1 on a bad format or n_in. */
long vg_bank_process(VgResamplerBank *b, const void *in, int in_fmt, long n_in,
                     void *out, int out_fmt);
