"""Everything that talks to ComfyUI: the patch points (`patching`), locating and bootstrapping a
ComfyUI host (`host`), small real Flux models for tests and demos (`tiny_flux`), and the demo.

Import the submodule you need; this package itself imports nothing, so `host` can run before
ComfyUI is importable.
"""
