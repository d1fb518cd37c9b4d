"""Thin Ray stages over the core: teachers as actors, the ensemble's predictor pool, the soft-target
cache and consistent teaching's stream, streamed sources, the Ray Train student (driver and worker),
the Tune sweep, and cluster joining and checks."""
