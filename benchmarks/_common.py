"""Shared bits of the benchmark scripts: machine description and JSON output."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FASHIONLENS_DATA", REPO.parent / "shared" / "data"))


def machine() -> dict:
    import torch

    cpu = platform.processor() or ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            # "-dirty": run with uncommitted changes (the JSON then names the commit before them)
            "git": subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                                  capture_output=True, text=True).stdout.strip()}


def emit(result: dict) -> None:
    result = {**result, "machine": machine(), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
    print(json.dumps(result, indent=2))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def sweep_args(doc: str, default_runs: str):
    """The arguments of a sweep script: CONFIG, --runs DIR, --only NAME..., --set key=value."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("--runs", default=default_runs)
    parser.add_argument("--only", nargs="*", help="variant names (default: all)")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="override for every variant")
    return parser.parse_args()


def chosen(only: list[str] | None, known, what: str = "variants") -> list[str]:
    """The names ``--only`` asks for (all of ``known`` without it); exits on an unknown one."""
    import sys

    names = only or list(known)
    unknown = [n for n in names if n not in known]
    if unknown:
        sys.exit(f"unknown {what} {unknown}; known: {', '.join(known)}")
    return names
