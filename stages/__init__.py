"""voxgate stages."""
