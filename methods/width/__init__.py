"""Timestep-wise dynamic width (DyDiT TDW) with the compute really removed."""
from . import runtime, trainable  # noqa: F401  (importing registers the method and its trainable part)
