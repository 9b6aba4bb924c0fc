"""`vlstack merge`: fold a PEFT adapter into the base and write a checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import ConfigError
from . import options


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="fold a PEFT adapter into the base and write a checkpoint")
    options.model(p)
    p.add_argument("--adapter", required=True, help="PEFT adapter directory")
    p.add_argument("--output", required=True, help="directory for the merged checkpoint")
    options.dtype(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from ..adapters import merge_adapter
    from ..api import load

    vlm = load(args.model, device="cpu", dtype=args.dtype)
    for what, source in (("base model", vlm.directory), ("adapter", Path(args.adapter))):
        if Path(args.output).resolve() == source.resolve():
            raise ConfigError(f"--output {args.output} is the {what}'s own directory; write the merge elsewhere")
    vlm.load_adapter("merge", args.adapter)
    merge_adapter(vlm.model, "merge")
    vlm.adapters.clear()
    print(f"merged checkpoint written to {vlm.save(args.output)}")
