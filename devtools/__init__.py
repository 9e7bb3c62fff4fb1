"""Developer tooling, not needed by the nodes: locating and bootstrapping a ComfyUI host (`host`), small
real Flux and Wan models (`tiny_flux`, `tiny_wan`), the demo, the benchmark (`bench/`), the example
workflows (`workflows`, `example_graphs`) and the reference model's training (`reference_training`).

Run its commands from the pack's folder, e.g. `python -m devtools.bench`. This package itself imports
nothing, so `host` can run before ComfyUI is importable; nothing in `nodes/` imports it.
"""
