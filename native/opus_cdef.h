typedef struct OpusEncoder OpusEncoder;
typedef struct OpusDecoder OpusDecoder;
const char *opus_strerror(int error);
const char *opus_get_version_string(void);
