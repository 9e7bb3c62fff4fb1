"""scripts/train_memory_flux.py (the FLUX.1-dev training memory estimate in BENCHMARKS.md) runs end to end; here at a
small width, where a training step must still grow memory beyond a no-grad forward and train some parameters."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux's peak-memory counter")
def test_reports_the_memory_of_a_training_step():
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_memory_flux.py"), "1", "1", "--size", "128",
                           "--text-tokens", "16", "--hidden", "256", "--heads", "4", "--parts", "width,td_lora",
                           "--checkpointing"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("flux width 256, 1+1 blocks, 64+16 tokens"))
    forward, step = (float(x) for x in re.search(r"forward \+(\d+) MB, of a training step \+(\d+) MB \(2 steps\)", line).groups())
    trainable = float(re.search(r"([\d.]+) M trainable", line).group(1))
    assert trainable > 0 and step > forward >= 0, line  # grads, AdamW states and saved tensors on top
