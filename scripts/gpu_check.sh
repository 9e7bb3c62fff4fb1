#!/usr/bin/env bash
# FLUX.1-dev-size check of every method on this machine's accelerator (see scripts/gpu_check.py).
#   scripts/gpu_check.sh                      full size on the GPU: part main (~4-6 min on an H100/H200), then part
#                                             lowvram (a 16 GB card emulated with ComfyUI's partial loading)
#   GPU_CHECK_TINY=1 scripts/gpu_check.sh     a tiny model, seconds, anywhere (the test suite runs this)
#   GPU_CHECK_PROXY=1 scripts/gpu_check.sh    the CPU proxy: hidden 3072, 3 blocks, 4096 image tokens, bf16, then part
#                                             memory (every case's peak RSS in a process of its own)
# No network needed: the ComfyUI host comes from $COMFYUI_PATH or the pack's own lookup (host.py).
# Results: $OUT (default out/gpu_check)/gpu_check_<part>.md and .json.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export OUT="${OUT:-out/gpu_check}" PYTHONUNBUFFERED=1
mkdir -p "$OUT"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
"$PY" scripts/gpu_check.py main 2>&1 | tee "$OUT/gpu_check_main.log"
if [ "${LOWVRAM:-1}" = "1" ] && [ "${GPU_CHECK_TINY:-0}" != "1" ] && [ "${GPU_CHECK_PROXY:-0}" != "1" ] \
   && [ "$SECONDS" -lt 380 ] && "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  "$PY" scripts/gpu_check.py lowvram 2>&1 | tee "$OUT/gpu_check_lowvram.log"
fi
if [ "${GPU_CHECK_PROXY:-0}" = "1" ] && [ "${MEMORY:-1}" = "1" ]; then
  "$PY" scripts/gpu_check.py memory 2>&1 | tee "$OUT/gpu_check_memory.log"   # each case in a fresh process
fi
echo "gpu_check: results in $OUT/gpu_check_*.md / .json"
