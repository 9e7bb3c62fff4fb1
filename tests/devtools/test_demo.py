"""The README's demo command: the pack's nodes at their defaults on the reference model, a per-step table, the image's
PSNR against full compute, a chart file."""
import re

from PIL import Image

from comfyui_dynamic_dit.devtools import demo


def test_demo_prints_the_per_step_table_and_writes_the_chart(tmp_path, capsys):
    assert demo.main(["--steps", "6", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for name, _ in demo.DEMO_CHAIN:
        assert name in out
    lines = out.splitlines()
    rows = [i for i, line in enumerate(lines) if re.match(r"^\s+\d+\s+\d\.\d{4}\s+1\s", line)]
    assert len(rows) == 6  # one row per step, what the methods did on the line below it
    methods = [lines[i + 1] for i in rows]
    assert "heads 0.88" in methods[0] and "token_router: reuse keep 0.70" in methods[1]  # the defaults ran, as the table says
    summary = re.search(r"x(\d+\.\d+) fewer FLOPs", out)
    assert summary and float(summary.group(1)) > 1.1
    fidelity = re.search(r"(\d+\.\d) dB PSNR, SSIM (\d\.\d+) against full compute's image", out)
    assert fidelity and 15 < float(fidelity.group(1)) < 60  # measured, not identical: the defaults changed the image
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
