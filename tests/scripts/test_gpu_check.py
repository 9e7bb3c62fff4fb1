"""scripts/gpu_check.sh runs end to end (tiny, on the CPU) and reports what the GPU run reports."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CASES = "unpatched off width:0.5 ramp:0.5-1.0 reuse:0.5 sdt:0.5 ddit:0-100%:2 width:0.75+reuse:0.7"


def test_tiny_gpu_check_reports_every_case_without_pack_syncs(tmp_path):
    env = {**os.environ, "GPU_CHECK_TINY": "1", "OUT": str(tmp_path), "CASES": CASES, "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check_main.json").read_text())
    rows = {row["case"]: row for row in report["rows"]}
    assert list(rows) == CASES.split()
    for name, row in rows.items():
        assert row["pack_syncs_per_step"] == 0, (name, done.stdout[-2000:])  # steady state: nothing waits for the device
        assert row["probes"].get("kernels", 0) > 0, name
        if name != "unpatched":
            assert 0 < row["flops"] <= 1.0001 and row["steps_ms"], name
    assert rows["width:0.5"]["flops"] < 0.6 and rows["ddit:0-100%:2"]["flops"] < 0.5
    markdown = (tmp_path / "gpu_check_main.md").read_text()
    assert "| width:0.5 |" in markdown and "peak RSS GiB" in markdown
    assert "speedup (fastest)" in markdown and all(row["model_fastest_s"] <= row["model_s"] for row in rows.values())


def test_memory_part_measures_each_case_in_a_process_of_its_own(tmp_path):
    env = {**os.environ, "GPU_CHECK_TINY": "1", "OUT": str(tmp_path), "CASES": "unpatched width:0.5"}
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "memory"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = (tmp_path / "gpu_check_memory.md").read_text()
    assert "| unpatched |" in table and "| width:0.5 |" in table and "x1.000" in table
