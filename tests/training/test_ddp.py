"""Two CPU processes under torchrun (gloo) train the same weights: DistributedDataParallel averages gradients."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("ddp_worker.py")


@pytest.mark.parametrize("parts, options", [("width,td_lora", ""), ("tokens,td_lora", ""), ("coarse", "checkpointing,on_policy")])
def test_two_ranks_end_with_identical_weights(tmp_path, parts, options):
    """Also with gradient checkpointing and an on-policy round after training (both ranks roll out the same seeds,
    so their rows stay equal, and train on them data-parallel)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER), str(tmp_path),
               parts, options]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    # each rank saw its own batches (data parallel) ...
    assert [h["distill"] for h in ranks[0]["history"]] != [h["distill"] for h in ranks[1]["history"]]
    # ... started from different local initialisations (rank 1's replaced by rank 0's broadcast) ...
    assert any(not torch.equal(a, b) for a, b in zip(ranks[0]["initial"].values(), ranks[1]["initial"].values()))
    # ... trained ...
    assert any(not torch.equal(a, b) for a, b in zip(ranks[0]["initial"].values(), ranks[0]["state"].values()))
    # ... and ended with the same weights, bit for bit
    for name, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][name]), name
