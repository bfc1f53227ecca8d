"""The ``crosslayer`` command: one thin entrypoint whose subcommands call typed functions elsewhere."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import get_args

from cli_module.config import Method


def cmd_params(args: argparse.Namespace) -> int:
    """Parameter counts of the fused model; with ``--config``, the whole training recipe is loaded and its
    plug-in settings are checked against the base's real shapes (``--base`` defaults to the recipe's base; a
    ``*-shape`` preset builds a published model's shapes on the meta device, without downloading it)."""
    from cli_module.config import CLIConfig
    from cli_module.loading import load_base
    from cli_module.model import FusedVLM

    from .train_config import load_config

    recipe = load_config(args.config) if args.config else None
    cfg = recipe.cli if recipe else CLIConfig()
    if args.method:
        cfg = CLIConfig.from_dict({**cfg.to_dict(), "method": args.method})
    name = args.base or (recipe.base if recipe else "tiny")
    base = load_base(name, weights=False)
    counts = FusedVLM(base, cfg).param_counts()
    print(json.dumps({"base": name, "method": cfg.method, **counts}, indent=2))
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    from .quickstart import run_quickstart

    return run_quickstart(preset=args.preset, out=Path(args.out))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crosslayer", description="Dynamic Cross-Layer Injection for VLMs on Ray")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("params", help="count total and trainable parameters of a fused model")
    p.add_argument("--base", help="preset (tiny, tiny-onevision, small, llava-1.5-7b-shape, "
                                  "llava-onevision-0.5b-shape, qwen2.5-vl-3b-shape, qwen2.5-vl-7b-shape, "
                                  "qwen3-vl-8b-shape), hub id, local folder or s3:// prefix "
                                  "(default: the --config recipe's base, else tiny)")
    p.add_argument("--config", help="a training recipe (crosslayer train --config): validated, and its `cli:` "
                                    "settings checked against the base")
    p.add_argument("--method", choices=list(get_args(Method)))
    p.set_defaults(func=cmd_params)

    p = sub.add_parser("quickstart", help="run the main job end to end on an embedded base")
    p.add_argument("--preset", default="small", choices=["tiny", "small"])
    p.add_argument("--out", default="report", help="report folder")
    p.set_defaults(func=cmd_quickstart)

    for register in _extensions():
        register(sub)
    return parser


def _extensions():
    """Subcommands that live beside their code (pipelines/, jobs/); each module exposes ``register``."""
    import importlib

    for name in ("pipelines.features", "jobs.train", "jobs.caption", "pipelines.serve", "pipelines.gates",
                 "jobs.submit", "jobs.evaluate", "pipelines.synth", "jobs.probe"):
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name == name:
                continue
            raise
        yield module.register


def main(argv: list[str] | None = None) -> int:
    from pipelines.storage import SourceError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, SourceError) as err:
        print(f"crosslayer {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
