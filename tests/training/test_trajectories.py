"""The teacher's recorded rows: what a batch holds, and that drawing batches does not copy the bank (the rows of
four on-policy rounds of the reference model are 2.6 GB; copies of them once took 13 GB and the run was killed)."""
from __future__ import annotations

import ctypes
import ctypes.util
from pathlib import Path

import pytest
import torch

from comfyui_dynamic_dit.training.trajectories import Trajectories

ROW_FLOATS = 256 * 1024  # 1 MB of float32 per latent row, and as much per target


def bank_of(calls: int, batch: int = 2, floats: int = ROW_FLOATS) -> Trajectories:
    bank = Trajectories("x", "timestep")
    for call in range(calls):
        t = torch.full((batch,), 1.0 - call / calls)
        x = torch.arange(batch * floats, dtype=torch.float32).reshape(batch, floats) + 1000 * call
        bank.add_call({"x": x, "timestep": t}, t, -x)
    return bank


def _return_freed_memory() -> None:
    """glibc keeps freed blocks for reuse; on a heap a long suite has fragmented, the freed 16 MB batches stayed
    resident and read as exactly 64 MB of "growth" (CI, stop 30; reproduced by fragmenting the heap first, 0 MB
    after a trim). Trimming first means only memory still held is counted."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def resident_mb() -> float:
    """Resident anonymous memory still held (where copies of the bank would live). Not VmRSS: on a machine short of
    memory the kernel drops the process's file-backed pages (torch's libraries) and they come back on the next
    touch, which made VmRSS "grow" by 72 MB under load with no copy at all (issue 22)."""
    _return_freed_memory()
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    pytest.skip("no RssAnon in /proc/self/status (not Linux)")


def test_batches_are_the_recorded_rows():
    bank = bank_of(6, floats=4)
    (group,) = bank.groups.values()
    rows = list(zip(group["x"], group["target"]))
    drawn = torch.randint(len(rows), (5,), generator=torch.Generator().manual_seed(3)).tolist()
    batch = bank.sample(5, torch.Generator().manual_seed(3))
    assert torch.equal(batch["x"], torch.stack([rows[i][0] for i in drawn]))
    assert torch.equal(batch["target"], -batch["x"]) and batch["sigmas"].shape == (5,)
    fixed = bank.fixed(3)
    assert torch.equal(fixed["x"], torch.stack([rows[0][0], rows[6][0], rows[11][0]]))  # first, middle, last of 12
    assert torch.equal(bank.fixed(3)["x"], fixed["x"])


def test_drawing_batches_keeps_no_copy_of_the_bank():
    bank = bank_of(64)  # 128 rows: 256 MB
    rounds = [bank.extended(bank_of(8)) for _ in range(2)]  # as on-policy rounds do: the same row tensors, shared
    before = resident_mb()
    for current in (bank, *rounds):
        current.fixed(16)
        current.restricted(current.timesteps[:32]).sample(8, torch.Generator().manual_seed(0))
        for seed in range(4):
            current.sample(8, torch.Generator().manual_seed(seed))
    grown = resident_mb() - before
    assert grown < 64, f"drawing batches grew resident memory by {grown:.0f} MB (the bank is 256 MB)"
    held = torch.stack(bank.groups[next(iter(bank.groups))]["x"])  # a copy of half the bank, kept: the measure sees it
    assert resident_mb() - before > 100, "the measure no longer sees a copy of the bank that is held"
    del held


def test_freed_batches_on_a_fragmented_heap_are_not_counted():
    keep = [torch.empty(1000 * (1 + i % 700)) for i in range(3000)][::3]  # a heap as a long suite leaves it
    bank = bank_of(64)
    before = resident_mb()
    for seed in range(8):
        bank.sample(8, torch.Generator().manual_seed(seed))
    assert resident_mb() - before < 16 and len(keep) == 1000


def test_a_prompts_text_embedding_is_kept_once(tmp_path):
    """Each model call hands over its own copy of the conditioning; the bank keeps one per distinct value (FLUX's
    T5 embedding is 4 of the 5 MB of a 1024 px row), in memory and in the saved file, and the rows still read it."""
    bank = Trajectories("x", "timestep")
    prompts = [torch.randn(2, 256, 1024) for _ in range(2)]  # (positive, negative) x 1 MB, two prompts
    for call in range(40):
        t = torch.full((2,), 1.0 - call / 40)
        bank.add_call({"x": torch.randn(2, 16), "timestep": t, "context": prompts[call % 2].clone()}, t, torch.randn(2, 16))
    rows = bank.groups[next(iter(bank.groups))]["context"]
    assert len(rows) == 80 and len({row.untyped_storage().data_ptr() for row in rows}) == 4
    for call in range(40):
        assert all(torch.equal(rows[2 * call + i], prompts[call % 2][i]) for i in range(2))
    bank.save(str(tmp_path / "bank.pt"))
    assert (tmp_path / "bank.pt").stat().st_size < 6 * 2**20  # four contexts, not eighty
    again = Trajectories.load(str(tmp_path / "bank.pt"))
    assert torch.equal(again.sample(5, torch.Generator().manual_seed(1))["context"],
                       bank.sample(5, torch.Generator().manual_seed(1))["context"])
