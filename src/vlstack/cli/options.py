"""Options several verbs share."""

from __future__ import annotations

import argparse

DTYPES = ["float32", "bfloat16", "float16"]


def model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny", help="checkpoint directory (default: the built-in tiny model)")


def dtype(p: argparse.ArgumentParser, help: str | None = None) -> None:
    p.add_argument("--dtype", default=None, choices=DTYPES, help=help)


def device(
    p: argparse.ArgumentParser, dtype_help: str | None = None, with_dtype: bool = True, default: str = "a GPU if any"
) -> None:
    """--device, and --dtype unless with_dtype is False."""
    p.add_argument("--device", default=None, help=f"cpu, cuda, cuda:1, ... (default: {default})")
    if with_dtype:
        dtype(p, dtype_help)


def v2pe(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--v2pe-delta",
        type=float,
        default=None,
        help="V2PE: the position step of image tokens, e.g. 0.25 (InternVL3; default: the checkpoint's, else 1)",
    )
