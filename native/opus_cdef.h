/* cffi cdef for native._opus: the part of libopus (opus.h, 1.3+) we call, plus
 * the ctl wrappers of opus_shim.h.  `#define X ...` takes the value from the
 * real header at build time. */
typedef int16_t opus_int16;
typedef int32_t opus_int32;
typedef struct OpusEncoder OpusEncoder;
typedef struct OpusDecoder OpusDecoder;

#define OPUS_OK ...
#define OPUS_BAD_ARG ...
#define OPUS_BUFFER_TOO_SMALL ...
#define OPUS_INTERNAL_ERROR ...
#define OPUS_INVALID_PACKET ...
#define OPUS_UNIMPLEMENTED ...
#define OPUS_INVALID_STATE ...
#define OPUS_ALLOC_FAIL ...

#define OPUS_AUTO ...
#define OPUS_BITRATE_MAX ...
#define OPUS_APPLICATION_VOIP ...
#define OPUS_APPLICATION_AUDIO ...
#define OPUS_APPLICATION_RESTRICTED_LOWDELAY ...

const char *opus_strerror(int error);
const char *opus_get_version_string(void);

OpusEncoder *opus_encoder_create(opus_int32 Fs, int channels, int application, int *error);
void opus_encoder_destroy(OpusEncoder *st);
opus_int32 opus_encode(OpusEncoder *st, const opus_int16 *pcm, int frame_size,
                       unsigned char *data, opus_int32 max_data_bytes);

OpusDecoder *opus_decoder_create(opus_int32 Fs, int channels, int *error);
void opus_decoder_destroy(OpusDecoder *st);
int opus_decode(OpusDecoder *st, const unsigned char *data, opus_int32 len, opus_int16 *pcm,
                int frame_size, int decode_fec);

int opus_packet_get_nb_samples(const unsigned char packet[], opus_int32 len, opus_int32 Fs);

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
