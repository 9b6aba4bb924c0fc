"""The `vlstack` command: one module a verb (chat, serve, train, merge, compress, plan, eval, synth, info), each with
its options (`add`) and what it does (`run`); options.py holds the options several verbs share."""

from __future__ import annotations

import argparse
import os
import sys

from .. import __version__
from ..errors import VLStackError
from . import chat, compress, eval, info, merge, plan, serve, synth, train

VERBS = (chat, serve, train, merge, compress, plan, eval, synth, info)


def parser() -> argparse.ArgumentParser:
    verbs = ", ".join(v.__name__.rsplit(".", 1)[-1] for v in VERBS)
    p = argparse.ArgumentParser(prog="vlstack", description=f"Self-hosted InternVL: {verbs}.")
    p.add_argument("--version", action="version", version=f"vlstack {__version__}")  # (also from a source tree)
    sub = p.add_subparsers(dest="verb", required=True)
    for verb in VERBS:
        verb.add(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.func(args)
    except VLStackError as e:
        print(f"vlstack: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # (`vlstack info | head`: the reader left; nothing more to say, and no traceback)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (the interpreter's flush at exit, too)
        return 0
    return 0
