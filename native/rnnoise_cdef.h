/* cffi cdef for native._rnnoise (ABI mode).  The pyrnnoise wheel ships
 * librnnoise.so without a header; these match rnnoise.h of RNNoise 0.2
 * (xiph/rnnoise).  Passing NULL as the model selects the built-in weights.
 * rnnoise_process_frame takes and returns rnnoise_get_frame_size() float
 * samples at 48 kHz on the int16 scale, may run in place, and returns the
 * frame's voice probability in [0, 1]. */
typedef struct DenoiseState DenoiseState;
typedef struct RNNModel RNNModel;

int rnnoise_get_frame_size(void);
DenoiseState *rnnoise_create(RNNModel *model);
void rnnoise_destroy(DenoiseState *st);
float rnnoise_process_frame(DenoiseState *st, float *out, const float *in);
