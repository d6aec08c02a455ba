"""What a first command costs before it does anything: `import vlhooks` and `vlhooks --help` against `import torch`.

Each figure is the wall time of a fresh interpreter (`python -c ...`, or the `vlhooks` entry point), the three run
interleaved rep by rep so that a busy machine's drift hits them alike; medians with min-max over the repeats, and
each ratio to `import torch` of the same rep.

    .venv/bin/python benchmarks/import_time.py [--reps 7]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent
RUNS = {
    "import torch": [sys.executable, "-c", "import torch"],
    "import vlhooks": [sys.executable, "-c", "import vlhooks"],
    "vlhooks --help": [str(BIN / "vlhooks"), "--help"],
    "import vlhooks; vh.inject": [sys.executable, "-c", "import vlhooks as vh; vh.inject"],
}


def _wall(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - t


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=7)
    a = p.parse_args()
    for cmd in RUNS.values():  # warm the file cache once
        _wall(cmd)
    times: dict[str, list[float]] = {k: [] for k in RUNS}
    for _ in range(a.reps):
        for name, cmd in RUNS.items():
            times[name].append(_wall(cmd))
    out = {}
    print(f"{'run':28s} {'median s':>9s} {'min-max':>13s} {'/ import torch (median, min-max)':>34s}")
    for name, ts in times.items():
        ratios = [t / b for t, b in zip(ts, times["import torch"])]
        out[name] = {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts),
                     "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}
        print(f"{name:28s} {statistics.median(ts):9.3f} {min(ts):6.3f}-{max(ts):6.3f} "
              f"{statistics.median(ratios):14.3f} ({min(ratios):.3f}-{max(ratios):.3f})")
    path = Path(__file__).with_name("results.json")
    results = json.loads(path.read_text()) if path.is_file() else {}
    results["import_vlhooks_over_import_torch"] = out["import vlhooks"]["ratio_median"]
    results["vlhooks_help_over_import_torch"] = out["vlhooks --help"]["ratio_median"]
    results["import_time"] = out
    path.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
