"""One benchmark run from parsed arguments: cases, workload, repeats, outputs."""
from __future__ import annotations

import argparse
import datetime
import os
import re
from pathlib import Path

from .cases import parse_cases
from .report import append_markdown, contact_sheet, markdown, pareto_plot
from .runner import run_cases
from .workloads import checkpoint_workload, random_workload, reference_workload, tiny_ltxv_workload, tiny_wan_workload


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "bench"


def run(args: argparse.Namespace) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        cases = parse_cases(args.cases)
        if args.model:
            workload = checkpoint_workload(args)
        elif args.tiny_wan:
            workload = tiny_wan_workload(args)
        elif args.tiny_ltxv:
            workload = tiny_ltxv_workload(args)
        elif args.full_size_random or args.random:
            workload = random_workload(args, full_size=args.full_size_random)
        else:
            workload = reference_workload(args)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    print(f"{workload.title}: {workload.settings}\ncases: {', '.join(c.name for c in cases)}", flush=True)
    report = run_cases(workload, cases, args.repeats)
    out = args.out or (args.markdown.parent / "benchmarks" if args.markdown else Path("out/bench"))
    stem = f"{_slug(workload.title)}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    plot = pareto_plot(report, out / f"{stem}.png")
    sheet = contact_sheet(report, out / f"{stem}_images.png")
    base = args.markdown.parent if args.markdown else Path.cwd()
    section = markdown(report, plot=os.path.relpath(plot, base), images=os.path.relpath(sheet, base))
    print(section)
    if args.markdown:
        append_markdown(args.markdown, section)
        print(f"appended to {args.markdown}")
    print(f"plot: {plot}\nimages: {sheet}")
    return 0
