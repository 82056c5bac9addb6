/* C side of native._opus: libopus plus non-variadic wrappers for its ctls. */
#include <opus.h>

/* opus_encoder_ctl/opus_decoder_ctl are variadic; cffi cannot check (or, on
 * some ABIs, correctly pass) variadic arguments, so each ctl we use gets a
 * fixed-signature wrapper.  Each returns the libopus error code (OPUS_OK = 0). */
int vg_opus_enc_set_bitrate(OpusEncoder *st, opus_int32 v);
int vg_opus_enc_get_bitrate(OpusEncoder *st, opus_int32 *v);
int vg_opus_enc_set_vbr(OpusEncoder *st, opus_int32 v);
int vg_opus_enc_get_vbr(OpusEncoder *st, opus_int32 *v);
int vg_opus_enc_set_vbr_constraint(OpusEncoder *st, opus_int32 v);
int vg_opus_enc_get_vbr_constraint(OpusEncoder *st, opus_int32 *v);
int vg_opus_enc_set_complexity(OpusEncoder *st, opus_int32 v);
int vg_opus_enc_get_complexity(OpusEncoder *st, opus_int32 *v);
int vg_opus_enc_set_packet_loss_perc(OpusEncoder *st, opus_int32 v);
int vg_opus_enc_get_packet_loss_perc(OpusEncoder *st, opus_int32 *v);
int vg_opus_enc_set_inband_fec(OpusEncoder *st, opus_int32 v);
int vg_opus_enc_get_inband_fec(OpusEncoder *st, opus_int32 *v);
int vg_opus_enc_set_dtx(OpusEncoder *st, opus_int32 v);
int vg_opus_enc_get_dtx(OpusEncoder *st, opus_int32 *v);
int vg_opus_enc_get_application(OpusEncoder *st, opus_int32 *v);
int vg_opus_enc_get_lookahead(OpusEncoder *st, opus_int32 *v);
int vg_opus_enc_reset(OpusEncoder *st);
int vg_opus_dec_get_last_packet_duration(OpusDecoder *st, opus_int32 *v);
int vg_opus_dec_reset(OpusDecoder *st);
