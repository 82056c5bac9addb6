"""voxgate native."""
