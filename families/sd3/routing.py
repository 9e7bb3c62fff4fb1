"""Token routing for SD3: the joint blocks hold the image tokens alone in `img` (the text and register tokens in
`txt`), with absolute position embeddings already added, so a subset of them runs a block by a gather and a scatter."""
from __future__ import annotations

from ..block_views import ImageStreamRouting


class SD3TokenRouting(ImageStreamRouting):
    mlp_output = "x_block.mlp.fc2"
