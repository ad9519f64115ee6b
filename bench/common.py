"""What the benchmarks share: the machine's description and where each one leaves its final JSON line."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

RESULTS_DIR = Path("runs/bench")
"""Each benchmark writes its final JSON object to RESULTS_DIR/<name>.json; bench/summary.py reads them."""


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"cpus": os.cpu_count(), "cpu_model": model, "load_avg": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(), "commit": commit,
            "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}


def finish(result: dict[str, Any], out: str | Path | None) -> None:
    """Print the final JSON line and write it to ``out`` (RESULTS_DIR/<bench>.json when None)."""
    path = Path(out) if out else RESULTS_DIR / f"{result['bench']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result) + "\n")
    print(json.dumps(result), flush=True)
