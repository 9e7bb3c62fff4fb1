"""The plain-PyTorch floor of the pack: the executor, plans, step tracking, slicing, FLOPs, telemetry, files.

Nothing here imports ComfyUI; `integration` installs the executor on a ComfyUI ModelPatcher, `families` describe
the models, `methods` register their runtimes in `method.REGISTRY`.
"""
