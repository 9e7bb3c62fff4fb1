"""The one seam to ComfyUI: the executor on a ModelPatcher (`patching`), patch points for hosts that lack them
(`patch_points`), trained files for every node (`trained_files`), the trainer's host side (`training_host`,
`autograd_paths`) and text on a running node (`progress_text`). A method's own ComfyUI code is its `node.py`.
"""
