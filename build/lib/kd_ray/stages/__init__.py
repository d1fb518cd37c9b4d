"""Thin Ray stages over the core: teachers as actors, the soft-target predictor pool and cache, the
Ray Train student, the Tune sweep, and cluster joining and checks."""
