"""Train the reference model: a small model of ComfyUI's own Flux class, on real photographs.

    python -m devtools.reference_training --out reference/flux_photo_reference.safetensors

No real FLUX weights can be downloaded here, and speed numbers mean little without fidelity next to
them, so the benchmark needs a model whose images are worth comparing. This one is trained by flow
matching (rectified flow, velocity target `noise - x0`, exactly what ComfyUI's Flux sampling assumes)
on random crops (random scale, horizontal flips) of the photographs bundled inside the scikit-image
wheel, in pixel space through the fixed invertible transform of `reference_model.photo_to_model_space`.
It is class-conditional: every photo has a fixed random text embedding and pooled vector, and 10 %
of the training samples get the null (zero) conditioning, so both cfg 1 and real CFG sample well.

Seeded and deterministic on one machine; the weights saved are the EMA weights in fp16, with the
exact command, the training configuration, the final loss and the wall time in the safetensors
metadata. Needs scikit-image (a dev requirement), and only to train.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from . import host

# Photographs bundled in the scikit-image wheel (no download): class name -> skimage.data loaders.
# Synthetic images (logo, colorwheel, phantom, blobs, checkerboard) and scanned text are left out.
PHOTOS: dict[str, tuple[str, ...]] = {
    "astronaut": ("astronaut",),
    "brick": ("brick",),
    "camera": ("camera",),
    "cat": ("chelsea",),
    "clock": ("clock",),
    "coffee": ("coffee",),
    "coins": ("coins",),
    "grass": ("grass",),
    "gravel": ("gravel",),
    "hubble_deep_field": ("hubble_deep_field",),
    "immunohistochemistry": ("immunohistochemistry",),
    "moon": ("moon",),
    "motorcycle": ("stereo_motorcycle[0]", "stereo_motorcycle[1]"),
    "retina": ("retina",),
    "rocket": ("rocket",),
}


@dataclass(frozen=True)
class TrainConfig:
    image_size: int = 64  # crop size in pixels (the model sees image_size / 4 tokens per side)
    low_res_size: int = 32  # crop size of the first, cheaper phase (progressive resizing)
    low_res_steps: int = 3500
    steps: int = 4000
    batch: int = 32
    lr: float = 3e-4
    warmup: int = 200
    ema: float = 0.995
    label_dropout: float = 0.1
    text_tokens: int = 8
    scales: tuple[float, ...] = (1.5, 2.0, 2.75, 4.0)  # photos are resized so their short side is this x the crop size
    seed: int = 0

    def crop_size(self, step: int) -> int:
        return self.low_res_size if step < self.low_res_steps else self.image_size


def load_photos(crop_size: int, scales: tuple[float, ...]) -> list[list[torch.Tensor]]:
    """Per class, a pyramid of (3, H, W) float images in [0, 1] (grey photos as three equal channels).

    Scales are relative to the crop size, so a crop covers the same share of a photo at every crop size.
    """
    import numpy as np
    import skimage.data
    from PIL import Image

    def load(loader: str) -> np.ndarray:
        name, _, index = loader.partition("[")
        image = getattr(skimage.data, name)()
        return image[int(index.rstrip("]"))] if index else image

    classes = []
    for loaders in PHOTOS.values():
        pyramid = []
        for loader in loaders:
            array = load(loader)
            if array.ndim == 2:
                array = np.stack([array] * 3, axis=-1)
            image = Image.fromarray(array[..., :3].astype(np.uint8))
            for relative in scales:
                scale = relative * crop_size / min(image.size)
                size = (max(crop_size, round(image.width * scale)), max(crop_size, round(image.height * scale)))
                resized = np.asarray(image.resize(size, Image.Resampling.LANCZOS), dtype=np.float32) / 255
                pyramid.append(torch.from_numpy(resized).permute(2, 0, 1).contiguous())
        classes.append(pyramid)
    return classes


def random_crops(photos: list[list[torch.Tensor]], labels: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    crops = []
    for label in labels.tolist():
        pyramid = photos[label]
        image = pyramid[int(torch.randint(len(pyramid), (), generator=generator))]
        top = int(torch.randint(image.shape[1] - size + 1, (), generator=generator))
        left = int(torch.randint(image.shape[2] - size + 1, (), generator=generator))
        crop = image[:, top : top + size, left : left + size]
        if torch.rand((), generator=generator) < 0.5:
            crop = crop.flip(-1)
        crops.append(crop)
    return torch.stack(crops)


def class_conditioning(classes: int, tiny, tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed random text embeddings and pooled vectors per class; the extra last row (zeros) is the null."""
    generator = torch.Generator().manual_seed(seed + 1)
    contexts = torch.randn(classes + 1, tokens, tiny.context_dim, generator=generator)
    pooled = torch.randn(classes + 1, tiny.vec_dim, generator=generator)
    contexts[-1] = 0
    pooled[-1] = 0
    return contexts, pooled


def flow_matching_loss(net: torch.nn.Module, x0: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Rectified flow as ComfyUI's Flux sampling reads the model: x_t = s*noise + (1-s)*x0, target noise - x0."""
    sigma = torch.sigmoid(torch.randn(x0.shape[0], generator=generator))  # logit-normal, as SD3 / Flux
    noise = torch.randn(x0.shape, generator=generator)
    s = sigma.view(-1, 1, 1, 1)
    x_t = s * noise + (1 - s) * x0
    # ComfyUI's Flux blocks add residuals in place (inference code); saving copies of what autograd
    # keeps for backward lets us train the host's own module unchanged.
    with torch.autograd.graph.saved_tensors_hooks(torch.clone, lambda saved: saved):
        prediction = net(x_t, sigma, context, y=pooled, transformer_options={})
    return torch.nn.functional.mse_loss(prediction.float(), noise - x0)


def learning_rate(step: int, config: TrainConfig) -> float:
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(config: TrainConfig, model_config, log: Callable[[str], None] = print, checkpoint: Path | None = None) -> dict:
    """Train; returns the EMA state dict, the conditioning tables and the run's statistics."""
    from ..demo import reference as reference_model

    torch.manual_seed(config.seed)
    pyramids = {size: load_photos(size, config.scales) for size in {config.low_res_size, config.image_size}}
    labels_count = len(PHOTOS)
    contexts, pooled = class_conditioning(labels_count, model_config, config.text_tokens, config.seed)
    net = reference_model.build_model(model_config).model.diffusion_model
    with torch.no_grad():  # a zero final projection: the model starts by predicting zero velocity
        net.final_layer.linear.weight.zero_()
        net.final_layer.linear.bias.zero_()
    net.train()
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.lr, betas=(0.9, 0.99), weight_decay=0.0)
    generator = torch.Generator().manual_seed(config.seed + 2)
    start_step, losses, elapsed = 0, [], 0.0
    if checkpoint is not None and checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=False)
        net.load_state_dict(state["net"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        start_step, losses, elapsed = state["step"], state["losses"], state["elapsed"]
        log(f"resumed from {checkpoint} at step {start_step}")

    started = time.perf_counter() - elapsed
    for step in range(start_step, config.steps):
        labels = torch.randint(labels_count, (config.batch,), generator=generator)
        size = config.crop_size(step)
        x0 = reference_model.photo_to_model_space(random_crops(pyramids[size], labels, size, generator))
        dropped = torch.rand(config.batch, generator=generator) < config.label_dropout
        rows = torch.where(dropped, torch.full_like(labels, labels_count), labels)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, config)
        loss = flow_matching_loss(net, x0, contexts[rows], pooled[rows], generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        decay = min(config.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for target, source in zip(ema.parameters(), net.parameters()):
                target.lerp_(source, 1 - decay)
        losses.append(loss.item())
        if (step + 1) % 50 == 0 or step + 1 == config.steps:
            recent = sum(losses[-50:]) / len(losses[-50:])
            spent = time.perf_counter() - started
            log(f"step {step + 1}/{config.steps} ({config.crop_size(step)} px) loss {recent:.4f} lr {learning_rate(step, config):.2e} "
                f"{spent / 60:.1f} min ({spent / (step + 1):.2f} s/step)")
        if checkpoint is not None and ((step + 1) % 250 == 0 or step + 1 == config.steps):
            torch.save(
                dict(net=net.state_dict(), ema=ema.state_dict(), optimizer=optimizer.state_dict(),
                     generator=generator.get_state(), step=step + 1, losses=losses, elapsed=time.perf_counter() - started),
                checkpoint,
            )
    wall = time.perf_counter() - started
    final_loss = evaluation_loss(ema, pyramids[config.image_size], contexts, pooled, config)
    return dict(state=ema.state_dict(), contexts=contexts, pooled=pooled, wall_seconds=wall,
                final_train_loss=sum(losses[-200:]) / max(1, len(losses[-200:])), final_eval_loss=final_loss)


@torch.no_grad()
def evaluation_loss(net: torch.nn.Module, photos, contexts, pooled, config: TrainConfig, batches: int = 8) -> float:
    """Flow-matching loss of `net` on fixed crops, noise and sigmas (seeded), for a comparable number."""
    from ..demo import reference as reference_model

    generator = torch.Generator().manual_seed(12345)
    total = 0.0
    for _ in range(batches):
        labels = torch.randint(len(photos), (config.batch,), generator=generator)
        x0 = reference_model.photo_to_model_space(random_crops(photos, labels, config.image_size, generator))
        total += float(flow_matching_loss(net, x0, contexts[labels], pooled[labels], generator))
    return total / batches


def sample_grid(reference, path: Path, seeds: int = 4, steps: int = 24, cfg: float = 2.0, zoom: int = 2) -> Path:
    """Sample every class with a few seeds through ComfyUI's sampler; one row per class."""
    from PIL import Image

    from ..demo import reference as reference_model, tiny_flux

    size = reference.image_size
    tiles = []
    for index in range(len(reference.classes)):
        positive, negative = reference.conditioning(index), reference.null_conditioning()
        row = []
        for seed in range(seeds):
            latent = tiny_flux.sample(reference.model, positive, negative, height=size // 2, width=size // 2,
                                      steps=steps, cfg=cfg, seed=seed)
            row.append(reference_model.latent_to_photo(latent)[0])
        tiles.append(torch.cat(row, dim=2))
    grid = torch.cat(tiles, dim=1)
    array = (grid.permute(1, 2, 0) * 255).round().byte().numpy()
    image = Image.fromarray(array)
    image = image.resize((image.width * zoom, image.height * zoom), Image.Resampling.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, optimize=True)
    return path


TRAIN_ARGUMENTS = ("image_size", "low_res_size", "low_res_steps", "steps", "batch", "lr", "warmup", "ema", "label_dropout", "seed")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = TrainConfig()
    parser.add_argument("--out", type=Path, default=Path("reference/flux_photo_reference.safetensors"))
    parser.add_argument("--grid", type=Path, default=Path("reference/samples.png"), help="sample grid written after training")
    parser.add_argument("--checkpoint", type=Path, default=None, help="training state, saved every 250 steps; resumes if it exists")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--double", type=int, default=2)
    parser.add_argument("--single", type=int, default=4)
    for name in TRAIN_ARGUMENTS:
        parser.add_argument("--" + name.replace("_", "-"), type=type(getattr(defaults, name)), default=getattr(defaults, name))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--time-steps", type=int, default=0, help="only time this many training steps and exit")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse(argv)
    host.prepare(cpu=True)
    host.load_pack()
    from comfyui_dynamic_dit.devtools import reference_training as pack_module
    from comfyui_dynamic_dit.demo import reference as reference_model, tiny_flux

    torch.set_num_threads(args.threads)
    config = TrainConfig(**{k: getattr(args, k) for k in TRAIN_ARGUMENTS})
    model_config = tiny_flux.TinyFlux(hidden_size=args.hidden, num_heads=args.heads, depth=args.double,
                                      depth_single_blocks=args.single, guidance_embed=False, seed=config.seed)
    if args.time_steps:
        config = TrainConfig(**{**asdict(config), "steps": args.time_steps, "warmup": 1})
        started = time.perf_counter()
        pack_module.train(config, model_config, log=lambda line: None)
        print(f"{(time.perf_counter() - started) / args.time_steps:.2f} s per step (batch {config.batch}, {config.image_size} px, "
              f"{torch.get_num_threads()} threads, including data loading and the final evaluation)")
        return 0
    command = "python -m devtools.reference_training " + shlex.join(argv)
    print(f"training: {command}\n{json.dumps(asdict(config))}\n{tiny_flux.describe(model_config)}", flush=True)
    result = pack_module.train(config, model_config, log=lambda line: print(line, flush=True), checkpoint=args.checkpoint)
    metadata = {
        "command": command,
        "training": json.dumps(asdict(config)),
        "photos": json.dumps(PHOTOS),
        "final_train_loss": f"{result['final_train_loss']:.5f}",
        "final_eval_loss": f"{result['final_eval_loss']:.5f}",
        "wall_seconds": f"{result['wall_seconds']:.0f}",
        "trained_on": f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
                      f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}",
    }
    path = reference_model.save_reference(args.out, result["state"], model_config, tuple(PHOTOS), result["contexts"],
                                    result["pooled"], config.image_size, metadata)
    print(f"saved {path} ({path.stat().st_size / 1e6:.1f} MB); final train loss {metadata['final_train_loss']}, "
          f"eval loss {metadata['final_eval_loss']}, {result['wall_seconds'] / 60:.1f} min", flush=True)
    grid = pack_module.sample_grid(reference_model.load_reference(path), args.grid)
    print(f"sample grid: {grid}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
