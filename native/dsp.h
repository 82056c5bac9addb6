/* voxgate native DSP: hot loops over samples. All lengths are in samples. */
void vg_s16_to_f32(const short *in, float *out, long n);
void vg_f32_to_s16(const float *in, short *out, long n);
