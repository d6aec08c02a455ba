"""`vlhooks` command line: one dispatch table, one function per verb."""

from __future__ import annotations

import argparse
import json
import sys


def _demo(argv: list[str]) -> int:
    from . import demo
    from .demo import run

    p = argparse.ArgumentParser(prog="vlhooks demo", description=demo.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/demo", help="output folder (default: outputs/demo)")
    p.add_argument("--steps", type=int, default=8, help="denoising steps (default: 8)")
    a = p.parse_args(argv)
    summary = run(out_dir=a.out, steps=a.steps)
    print(json.dumps(summary, indent=2))
    print(f"\nSide-by-side grid: {summary['image']}")
    return 0 if summary["removal_restores_bit_identical"] else 1


def _sites(argv: list[str]) -> int:
    from .models import families

    names = [f.name for f in families()]
    p = argparse.ArgumentParser(prog="vlhooks sites", description="List the injectable blocks of a family's "
                                "full-size DiT (built on the meta device: no weights are read or made).")
    p.add_argument("family", choices=names)
    a = p.parse_args(argv)
    import torch

    import vlhooks as vh
    from .models import family_named

    with torch.device("meta"):
        model = family_named(a.family).transformer_class()()  # full-size defaults, no weights
    for i, name in enumerate(vh.list_sites(model)):
        print(f"{i:3d}  {name}")
    for preset, names in vh.list_presets(model).items():
        print(f"preset {preset!r}: {len(names)} blocks")
    return 0


def _train(argv: list[str]) -> int:
    from vlhooks.train.cli import main

    return main(argv)


def _pretrain(argv: list[str]) -> int:
    from vlhooks.train.pretrain import main

    return main(argv)


def _compare(argv: list[str]) -> int:
    from vlhooks.eval.compare import main

    return main(argv)


def _extract(argv: list[str]) -> int:
    from .feature_cache import extract_main

    return extract_main(argv)


def _stats(argv: list[str]) -> int:
    from .feature_cache import stats_main

    return stats_main(argv)


COMMANDS = {"demo": _demo, "compare": _compare, "sites": _sites, "train": _train, "pretrain": _pretrain, "extract": _extract, "stats": _stats}


HELP = {
    "demo": "patch a tiny offline pipeline; save unpatched vs zero-shot images side by side",
    "compare": "run arms (none, blend, zero-shot, trained adapters, random) on the same prompts x references x\n"
               "             seeds; grid, HTML report, metrics (default: the embedded toy world)",
    "sites": "list the injectable blocks and presets of a DiT family (full-size config, meta device)",
    "train": "fit an adapter on a frozen DiT: vlhooks train --config configs/<family>/<adapter>.yaml",
    "pretrain": "train a small DiT from scratch (the toy world): --config configs/toy/pretrain.yaml",
    "extract": "encode images (or captions) to cached VLFeatures safetensors",
    "stats": "per-dimension reference statistics of a text encoder over a prompt file",
}


def usage() -> str:
    lines = ["usage: vlhooks {" + ",".join(COMMANDS) + "} [options]", ""]
    lines += [f"  {name:10s} {HELP[name]}" for name in COMMANDS]
    lines += ["", "vlhooks COMMAND --help shows a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(argv[0], COMMANDS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        print(f"error: unknown command '{argv[0]}'{hint}\n\n{usage()}", file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
