"""voxgate asr."""
