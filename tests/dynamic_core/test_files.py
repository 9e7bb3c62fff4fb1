"""The cheap header read behind the file lists."""
import torch
from safetensors.torch import save_file

from comfyui_dynamic_dit.dynamic_core import files


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
