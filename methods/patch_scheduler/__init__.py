"""Dynamic patch scheduling (DDiT, arXiv 2602.16968): coarse patches at steps where the latent changes slowly."""
from . import runtime, trainable  # noqa: F401  (importing registers the method and its trainable part)
