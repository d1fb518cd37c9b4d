"""kd_ray: distributed ensemble knowledge distillation on Ray."""
__version__ = "0.1.0"
