"""Torch implementations of the registered methods, one model per file (as in diffusers)."""
