"""Recover a `gpu_bench.py` run's keys from its printed log, for a run cut short before it wrote results.json
(a device call's time limit): each `<part>: <label> plain .. ms variant .. ms ratio R [lo, hi] n=N` line becomes
`<key>`, `<key>_minmax`, `<key>_reps`, `<key>_ms` (the key found from the label in gpu_bench.py's variants), each
`<key>: median M [lo, hi]` line the paired `<key>_median`, `_minmax`, `_below_every_repeat`, and each peak-memory
line its ratio. `--calls` is given, as the log does not print it.

    python benchmarks/log_to_results.py LOG --calls 5 [--into benchmarks/results.json]
"""

from __future__ import annotations

import argparse
import ast
import json
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent


def labels() -> dict[str, str]:
    """label -> key of every `injection_variant(key, label, ...)` / `{"key": .., "label": ..}` in gpu_bench.py."""
    tree = ast.parse((HERE / "gpu_bench.py").read_text())
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "injection_variant":
            a = node.args[:2]
            if len(a) == 2 and all(isinstance(x, ast.Constant) for x in a):
                out[a[1].value] = a[0].value
        if isinstance(node, ast.Dict):
            kv = {k.value: v for k, v in zip(node.keys, node.values) if isinstance(k, ast.Constant)}
            if isinstance(kv.get("key"), ast.Constant) and isinstance(kv.get("label"), ast.Constant):
                out[kv["label"].value] = kv["key"].value
    return out


RATIO = re.compile(r"^\w+: (.+?)\s+plain\s+([\d.]+) ms\s+variant\s+([\d.]+) ms\s+ratio ([\d.]+) \[([\d.]+), ([\d.]+)\] "
                   r"n=(\d+)")
PAIRED = re.compile(r"^(\w+): median ([+-][\d.]+) \[([+-][\d.]+), ([+-][\d.]+)\]")
MEMORY = re.compile(r"^peak memory (\w+): plain ([\d.]+) GiB patched ([\d.]+) GiB ratio ([\d.]+)")


def parse(text: str, calls: int) -> dict:
    names, res = labels(), {}
    for line in text.splitlines():
        if m := RATIO.match(line):
            label = m.group(1).strip()
            if label not in names:
                raise SystemExit(f"no variant labelled {label!r} in gpu_bench.py: pass the log of this checkout's run")
            key = names[label]
            res[key] = float(m.group(4))
            res[key + "_minmax"] = [float(m.group(5)), float(m.group(6))]
            res[key + "_reps"] = int(m.group(7))
            res[key + "_calls_per_timing"] = calls
            res[key + "_ms"] = [float(m.group(2)), float(m.group(3))]
        elif m := PAIRED.match(line):
            key, med, lo, hi = m.group(1), *map(float, m.group(2, 3, 4))
            res[key + "_median"], res[key + "_minmax"], res[key + "_below_every_repeat"] = med, [lo, hi], hi < 0
        elif m := MEMORY.match(line):
            res[m.group(1)] = float(m.group(4))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("log", type=Path)
    ap.add_argument("--calls", type=int, required=True, help="the run's --calls (forwards per timing)")
    ap.add_argument("--into", type=Path, help="merge into this results.json (else print)")
    a = ap.parse_args()
    res = parse(a.log.read_text(), a.calls)
    if not res:
        raise SystemExit(f"{a.log}: no ratio, paired or peak-memory line found")
    if a.into:
        merged = json.loads(a.into.read_text()) if a.into.exists() else {}
        merged.update(res)
        a.into.write_text(json.dumps(merged, indent=2, sort_keys=True) + "\n")
        print(f"{len(res)} keys into {a.into}")
    else:
        print(json.dumps(res, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
