"""voxgate gateway."""
