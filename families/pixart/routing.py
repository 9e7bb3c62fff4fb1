"""Token routing for PixArt: a block's `img` holds the image tokens alone (the text is the cross-attention context, which
every kept token still attends to in full), absolute position embeddings already added and the modulation per sample,
so a subset of them runs a block by a gather and a scatter."""
from __future__ import annotations

from ..block_views import ImageStreamRouting


class PixArtTokenRouting(ImageStreamRouting):
    mlp_output = "mlp.fc2"
