#include <math.h>
#include "dsp.h"

void vg_s16_to_f32(const short *in, float *out, long n) {
    for (long i = 0; i < n; i++) out[i] = (float)in[i] * (1.0f / 32768.0f);
}

void vg_f32_to_s16(const float *in, short *out, long n) {
    for (long i = 0; i < n; i++) {
        float v = in[i] * 32768.0f;
        v = v > 32767.0f ? 32767.0f : (v < -32768.0f ? -32768.0f : v);
        out[i] = (short)lrintf(v);
    }
}
