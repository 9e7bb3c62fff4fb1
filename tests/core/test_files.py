"""The cheap header read behind the file lists."""
import torch
from safetensors.torch import save_file

from comfyui_dynamic_dit.core import files


def test_file_format_reads_only_the_header(tmp_path, monkeypatch):
    path = tmp_path / "router.safetensors"
    save_file({"big": torch.zeros(1024, 1024)}, str(path), metadata={"format": "dynamic_dit.token_router"})
    reads = []
    real_open = open

    def counting_open(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        original_read = handle.read
        handle.read = lambda n=-1: reads.append(n) or original_read(n)
        return handle

    monkeypatch.setattr("builtins.open", counting_open)
    assert files.file_format(path) == "dynamic_dit.token_router"
    assert -1 not in reads and sum(reads) < 1000  # the 4 MiB of tensor data are never read
    assert files.file_format(path) == "dynamic_dit.token_router" and len(reads) == 2  # cached: no second read


def test_file_format_of_unreadable_files_is_none(tmp_path):
    (tmp_path / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    (tmp_path / "short.safetensors").write_bytes(b"\x01")
    (tmp_path / "list.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00[]")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    for name in ("garbage", "short", "list", "plain", "missing"):
        assert files.file_format(tmp_path / f"{name}.safetensors") is None, name


def test_a_bundle_gives_each_loader_its_part(tmp_path):
    """A training run's bundle: every part's tensors and metadata come back as that part's own file holds them;
    the file lists see its parts; a part it lacks is a clear error; other files read whole."""
    import pytest

    path = tmp_path / "run.safetensors"
    router = ({"routers.single.0.weight": torch.ones(1, 4), "ratios": torch.full((2, 3), 0.5)},
              {"format": "dynamic_dit.token_router", "version": "1", "router": "diffcr"})
    lora = ({"layer.down": torch.zeros(2, 4)}, {"format": "td_lora", "version": "1", "experts": "1"})
    files.write_bundle(path, {"dynamic_dit.token_router": router, "td_lora": lora}, {"base_fingerprint": "[1.0]"})
    assert files.file_format(path) == files.BUNDLE_FORMAT
    assert files.file_formats(path) == ("dynamic_dit.token_router", "td_lora")
    assert files.header_metadata(path)["base_fingerprint"] == "[1.0]"
    tensors, metadata = files.read_safetensors(path, "Router file 'run'", part="dynamic_dit.token_router")
    assert metadata == router[1] and tensors.keys() == router[0].keys()
    assert torch.equal(tensors["ratios"], router[0]["ratios"])
    tensors, metadata = files.read_safetensors(path, "TD-LoRA file run", part="td_lora")
    assert metadata == lora[1] and list(tensors) == ["layer.down"]
    with pytest.raises(ValueError, match="Patch embedding 'run' is a training-run bundle without a "
                                         "'dynamic_dit.patch_embedding' part \\(it holds dynamic_dit.token_router, td_lora\\)"):
        files.read_safetensors(path, "Patch embedding 'run'", part="dynamic_dit.patch_embedding")
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(1)}, str(plain), metadata={"format": "td_lora"})
    assert files.read_safetensors(plain, "plain", part="td_lora")[1] == {"format": "td_lora"}
    assert files.file_formats(plain) == ("td_lora",) and files.file_formats(tmp_path / "missing.safetensors") == ()
