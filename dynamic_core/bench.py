"""`python -m dynamic_core.bench ...` is `python -m dynamic_core.comfy_integration.bench ...` (see there).

Imports nothing from ComfyUI: the benchmark locates and prepares a ComfyUI host before it imports one.
"""
from __future__ import annotations

if __name__ == "__main__":
    from .comfy_integration.bench import main

    raise SystemExit(main())
