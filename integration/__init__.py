"""Everything of the runtime that talks to ComfyUI: the patch points (`patching`), reading LoRA and
TD-LoRA files (`td_lora_files`), the reference model the pack ships (`reference`) and benchmark
conditioning files (`conditioning_file`). Developer tooling is in the top-level `devtools/` package.
"""
