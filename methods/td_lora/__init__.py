"""TD-LoRA (DyDiT++): timestep-gated mixtures of low-rank experts, applied as an in-place bypass."""
from . import runtime, trainable  # noqa: F401  (importing registers the method and its trainable part)
