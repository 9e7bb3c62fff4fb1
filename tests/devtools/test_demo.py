"""The README's demo command: the pack's nodes chained on a tiny Flux, a per-step table, a chart file."""
import re

from PIL import Image

from comfyui_dynamic_dit.devtools import demo


def test_demo_prints_the_per_step_table_and_writes_the_chart(tmp_path, capsys):
    assert demo.main(["--size", "128", "--steps", "5", "--hidden", "64", "--heads", "2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for name, _ in demo.DEMO_CHAIN:
        assert name in out
    rows = [line for line in out.splitlines() if re.match(r"^\s+\d+\s+\d\.\d{4}\s+1\s", line)]
    assert len(rows) == 5  # one row per step
    assert "patch 2x" in rows[0] and "heads 0.50" in rows[0]  # the chained methods ran, as the table says
    summary = re.search(r"x(\d+\.\d+) fewer FLOPs", out)
    assert summary and float(summary.group(1)) > 1.2
    chart = Image.open(tmp_path / "demo_chart.png")
    assert chart.width > 200 and chart.height > 100


def test_run_node_fills_the_declared_defaults(flux_model):
    from comfyui_dynamic_dit.integration.patching import plan_of

    patched = demo.run_node(_node("DynamicWidthPatcher"), model=flux_model, preset="fast")
    assert patched is not flux_model and plan_of(flux_model) is None
    assert "width" in plan_of(patched).settings


def _node(name):
    from comfyui_dynamic_dit import NODE_CLASS_MAPPINGS

    return NODE_CLASS_MAPPINGS[name]
