#include "opus_shim.h"
