#!/usr/bin/env bash
# One entry point for a fresh machine:
#   scripts/run.sh test [pytest args]   install everything into .venv, fetch the ComfyUI host, run the tests
#   scripts/run.sh demo [demo args]     the same install, then the tiny-Flux demo (per-step speedup table + chart)
set -euo pipefail
cd "$(dirname "$0")/.."
command="${1:-test}"
shift || true

python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
.venv/bin/python -m devtools.host >/dev/null  # fetch the ComfyUI host once

case "$command" in
  test) exec .venv/bin/python -m pytest "$@" ;;
  demo) exec .venv/bin/python -m devtools.demo "$@" ;;
  *) echo "usage: scripts/run.sh test|demo [args]" >&2; exit 2 ;;
esac
