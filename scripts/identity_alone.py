"""Every test file that holds a bit-identity test, run alone (a pytest process of its own), optionally while another
process keeps a core busy and holds all but about 2 GB of the free memory (issue 22: such a file failed alone although
the suite passed, because an earlier test's reference had been computed on other kernels).

    .venv/bin/python scripts/identity_alone.py            # idle machine
    .venv/bin/python scripts/identity_alone.py --load     # one core busy, ~2 GB free
    .venv/bin/python scripts/identity_alone.py --load tests/nodes/test_width.py ...   # only these files

The host is whichever the environment selects (COMFYUI_PATH, as for pytest). Exits 1 if any file fails.
"""
from __future__ import annotations

import argparse
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IDENTITY = re.compile(r"torch\.equal\(|bit[-_ ]identical")

LOAD = """
import sys, time
import numpy, psutil
keep_free = float(sys.argv[1]) * 2**30
held = numpy.ones(max(0, int(psutil.virtual_memory().available - keep_free)) // 8)  # written: really resident
print(f"holding {held.nbytes / 2**30:.1f} GiB, {psutil.virtual_memory().available / 2**30:.1f} GiB left free", flush=True)
while True:
    pass  # one core busy
"""


def identity_files() -> list[Path]:
    return sorted(p for p in (ROOT / "tests").rglob("test_*.py") if IDENTITY.search(p.read_text()))


def run_alone(path: Path) -> tuple[bool, float, str]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(path.relative_to(ROOT))],
                          cwd=ROOT, capture_output=True, text=True)
    lines = (done.stdout + done.stderr).strip().splitlines()
    return done.returncode == 0, time.perf_counter() - started, lines[-1] if lines else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="*", type=Path, help="test files (default: every file with an identity test)")
    parser.add_argument("--load", action="store_true", help="run while another process loads a core and holds memory")
    parser.add_argument("--free-gib", type=float, default=2.0, help="free memory the load leaves (default 2 GiB)")
    args = parser.parse_args(argv)
    files = [p.resolve() for p in args.files] or identity_files()
    load = None
    if args.load:
        load = subprocess.Popen([sys.executable, "-c", LOAD, str(args.free_gib)], stdout=subprocess.PIPE, text=True)
        print("load:", load.stdout.readline().strip())
    print(f"{len(files)} files, each alone, on {platform.processor() or platform.machine()}"
          f"{' under load' if load else ''}", flush=True)
    failed = []
    try:
        for path in files:
            ok, seconds, summary = run_alone(path)
            print(f"{'ok  ' if ok else 'FAIL'} {seconds:6.1f} s  {path.relative_to(ROOT)}  ({summary})", flush=True)
            if not ok:
                failed.append(path)
            if load is not None and load.poll() is not None:  # e.g. the kernel's OOM killer chose the load
                print(f"the load process ended (exit code {load.returncode}) during that file: the run was no longer "
                      "under load; not counted", flush=True)
                return 1
    finally:
        if load is not None:
            load.kill()
    print(f"{len(files) - len(failed)} of {len(files)} files passed alone" + (f"; failed: {', '.join(str(p.relative_to(ROOT)) for p in failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
