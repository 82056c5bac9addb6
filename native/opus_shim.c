/* Fixed-signature wrappers around libopus' variadic ctl calls (see opus_shim.h).
 * The OPUS_SET_x / OPUS_GET_x macros type-check their argument, which is the
 * point of going through C rather than calling the ctl from Python. */
#include "opus_shim.h"

#define ENC_SET(name, MACRO) \
    int vg_opus_enc_set_##name(OpusEncoder *st, opus_int32 v) { return opus_encoder_ctl(st, MACRO(v)); }
#define ENC_GET(name, MACRO) \
    int vg_opus_enc_get_##name(OpusEncoder *st, opus_int32 *v) { return opus_encoder_ctl(st, MACRO(v)); }

ENC_SET(bitrate, OPUS_SET_BITRATE)
ENC_GET(bitrate, OPUS_GET_BITRATE)
ENC_SET(vbr, OPUS_SET_VBR)
ENC_GET(vbr, OPUS_GET_VBR)
ENC_SET(vbr_constraint, OPUS_SET_VBR_CONSTRAINT)
ENC_GET(vbr_constraint, OPUS_GET_VBR_CONSTRAINT)
ENC_SET(complexity, OPUS_SET_COMPLEXITY)
ENC_GET(complexity, OPUS_GET_COMPLEXITY)
ENC_SET(packet_loss_perc, OPUS_SET_PACKET_LOSS_PERC)
ENC_GET(packet_loss_perc, OPUS_GET_PACKET_LOSS_PERC)
ENC_SET(inband_fec, OPUS_SET_INBAND_FEC)
ENC_GET(inband_fec, OPUS_GET_INBAND_FEC)
ENC_SET(dtx, OPUS_SET_DTX)
ENC_GET(dtx, OPUS_GET_DTX)
ENC_GET(application, OPUS_GET_APPLICATION)
ENC_GET(lookahead, OPUS_GET_LOOKAHEAD)

int vg_opus_enc_reset(OpusEncoder *st) { return opus_encoder_ctl(st, OPUS_RESET_STATE); }

int vg_opus_dec_get_last_packet_duration(OpusDecoder *st, opus_int32 *v) {
    return opus_decoder_ctl(st, OPUS_GET_LAST_PACKET_DURATION(v));
}

int vg_opus_dec_reset(OpusDecoder *st) { return opus_decoder_ctl(st, OPUS_RESET_STATE); }
