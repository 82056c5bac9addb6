/* C side of native._opusenc: libopusenc plus non-variadic wrappers for its ctls. */
#include <opus/opusenc.h>

/* ope_encoder_ctl is variadic; cffi cannot check (or, on some ABIs, correctly
 * pass) variadic arguments, so each request we use gets a fixed-signature
 * wrapper.  Each returns the libopusenc error code (OPE_OK = 0; libopus codes
 * come back shifted by -10, e.g. OPE_BAD_ARG = -11). */
int vg_ope_set_bitrate(OggOpusEnc *enc, opus_int32 v);
int vg_ope_set_complexity(OggOpusEnc *enc, opus_int32 v);
int vg_ope_get_complexity(OggOpusEnc *enc, opus_int32 *v);
int vg_ope_set_vbr(OggOpusEnc *enc, opus_int32 v);
int vg_ope_set_signal(OggOpusEnc *enc, opus_int32 v);
int vg_ope_set_frame_duration(OggOpusEnc *enc, opus_int32 v);
int vg_ope_set_max_bandwidth(OggOpusEnc *enc, opus_int32 v);
int vg_ope_set_decision_delay(OggOpusEnc *enc, opus_int32 v);
int vg_ope_set_muxing_delay(OggOpusEnc *enc, opus_int32 v);
int vg_ope_set_comment_padding(OggOpusEnc *enc, opus_int32 v);

/* The close callback.  libopusenc calls it when the stream ends (drain) and
 * from ope_encoder_destroy; the latter can run inside Python's garbage
 * collector (ffi.gc), where calling back into Python is best avoided, and
 * there is nothing to close anyway: the bytes went to Python as they came. */
int vg_ope_close(void *user_data);
