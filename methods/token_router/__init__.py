"""Token Router: image tokens that skip the MLP (DyDiT SDT) or the whole block (DiffCR), or reuse it."""
from . import runtime, trainable  # noqa: F401  (importing registers the method and its trainable part)
