/* Fixed-signature wrappers around libopusenc's variadic ope_encoder_ctl (see
 * opusenc_shim.h).  The OPUS_SET_x / OPE_SET_x macros type-check their
 * argument, which is the point of going through C rather than calling the ctl
 * from Python. */
#include "opusenc_shim.h"

#define CTL(name, MACRO, T) \
    int vg_ope_##name(OggOpusEnc *enc, T v) { return ope_encoder_ctl(enc, MACRO(v)); }

CTL(set_bitrate, OPUS_SET_BITRATE, opus_int32)
CTL(set_complexity, OPUS_SET_COMPLEXITY, opus_int32)
CTL(get_complexity, OPUS_GET_COMPLEXITY, opus_int32 *)
CTL(set_vbr, OPUS_SET_VBR, opus_int32)
CTL(set_signal, OPUS_SET_SIGNAL, opus_int32)
CTL(set_frame_duration, OPUS_SET_EXPERT_FRAME_DURATION, opus_int32)
CTL(set_max_bandwidth, OPUS_SET_MAX_BANDWIDTH, opus_int32)
CTL(set_decision_delay, OPE_SET_DECISION_DELAY, opus_int32)
CTL(set_muxing_delay, OPE_SET_MUXING_DELAY, opus_int32)
CTL(set_comment_padding, OPE_SET_COMMENT_PADDING, opus_int32)

int vg_ope_close(void *user_data) {
    (void)user_data;
    return 0;
}
