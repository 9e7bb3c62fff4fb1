"""Models are built the way the host builds a loaded checkpoint, so a newer ComfyUI's new model
fields need no code in the pack."""

import torch

import comfy.ldm.flux.model
import comfy.model_detection

from comfyui_dynamic_dit.demo import tiny_flux
from comfyui_dynamic_dit.demo import reference as reference_model


def test_a_field_only_the_host_detection_knows_reaches_the_model(monkeypatch):
    """A newer host (e.g. Flux's `txt_ids_dims` in ComfyUI 0.4+) adds a required model parameter that
    its model detection fills; the builder must not need to know it."""
    detect = comfy.model_detection.detect_unet_config
    original_params = comfy.ldm.flux.model.FluxParams

    def newer_detection(state_dict, key_prefix, metadata=None):
        config = detect(state_dict, key_prefix, metadata)
        if config is not None and config.get("image_model") == "flux":
            config["txt_ids_dims_new"] = [3]
        return config

    def newer_params(*, txt_ids_dims_new, **fields):  # a required field, as the upstream dataclass has
        params = original_params(**fields)
        object.__setattr__(params, "txt_ids_dims_new", txt_ids_dims_new)
        return params

    monkeypatch.setattr(comfy.model_detection, "detect_unet_config", newer_detection)
    monkeypatch.setattr(comfy.ldm.flux.model, "FluxParams", newer_params)
    model = reference_model.build_model(tiny_flux.TinyFlux(depth=1, depth_single_blocks=1))
    assert model.model.diffusion_model.params.txt_ids_dims_new == [3]


def test_the_skeleton_names_real_parameters_and_sizes_are_ours():
    config = tiny_flux.TinyFlux(hidden_size=192, num_heads=3, depth=1, depth_single_blocks=2)
    model = reference_model.build_model(config)
    dm = model.model.diffusion_model
    host_keys = set(reference_model.host_state(model.model.model_config, config.checkpoint_skeleton()))  # depth >= 1 here
    assert host_keys <= set(dm.state_dict())
    params = dm.params
    assert (params.hidden_size, params.num_heads, params.depth, params.depth_single_blocks) == (192, 3, 1, 2)
    assert list(params.axes_dim) == config.axes_dim() and sum(params.axes_dim) == config.head_dim


def test_checkpoint_names_round_trip_through_the_host_loader():
    model = reference_model.build_model(tiny_flux.TinyFlux(depth=1, depth_single_blocks=1))
    dm = model.model.diffusion_model
    saved = reference_model.checkpoint_state(dm)
    assert any(k.endswith("key_norm.scale") for k in saved)  # Flux.1 checkpoint names, whatever the host calls them
    rebuilt = reference_model.build_model(tiny_flux.TinyFlux(depth=1, depth_single_blocks=1, seed=3), state_dict=saved)
    for key, value in dm.state_dict().items():
        assert torch.equal(rebuilt.model.diffusion_model.state_dict()[key], value), key
    norms = reference_model.norm_parameters(dm)
    assert norms and all(torch.all(dm.get_parameter(n) == 1) for n in norms)  # initialised as unit scales


def test_a_comfy_lora_applied_and_removed_leaves_the_model_on_the_same_kernels(lora_folder):
    """Issue 22: a model built trainable (as ComfyUI 0.3.75 loads one) ran its first image with other matmul kernels
    than every image after a LoRA had been applied to it and removed (the host's unpatch freezes the layer), so a
    test's early reference and a later run differed in the last digits on some CPUs. The builder freezes the model
    as the host leaves it; the kernels must be the same before and after, which any CPU can check."""
    import nodes as comfy_nodes
    from support.op_trace import first_difference, tracing_model_calls
    from safetensors.torch import save_file

    model = reference_model.build_model(tiny_flux.TinyFlux(depth=1, depth_single_blocks=1))
    conds = tiny_flux.conditioning()

    def run(m):
        traced_model, ops = tracing_model_calls(m)
        return tiny_flux.sample(traced_model, *conds, steps=2, cfg=2.0, seed=3), ops

    before, ops_before = run(model)
    g = torch.Generator().manual_seed(0)
    lora = {}
    for name, module in model.model.diffusion_model.named_modules():
        if isinstance(module, torch.nn.Linear):  # every linear layer, the attention outputs included
            lora[f"diffusion_model.{name}.lora_A.weight"] = torch.randn(2, module.in_features, generator=g) * 0.01
            lora[f"diffusion_model.{name}.lora_B.weight"] = torch.randn(module.out_features, 2, generator=g) * 0.01
    save_file(lora, str(lora_folder / "all.safetensors"))
    with_lora = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(model, "all.safetensors", 1.0)[0]
    assert not torch.equal(run(with_lora)[0], before)
    after, ops_after = run(model)
    assert ops_after == ops_before, first_difference(ops_before, ops_after)
    assert torch.equal(after, before)
