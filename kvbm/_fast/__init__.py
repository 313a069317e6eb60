"""Compiled hot paths (Cython over csrc/): block copies, hashing, the block registry."""
