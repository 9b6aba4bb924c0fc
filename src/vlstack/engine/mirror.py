"""The engine's mirror under tensor parallelism (`vlstack serve --tp N`, parallel/serving.py starts the ranks).

Rank 0's engine schedules every step and, before running a step's model call, broadcasts it (the call's name and
arguments) to the other ranks, which run the same call on their part of the model (`replay`). The ranks'
collectives inside the call (parallel/tp.py) then meet. Between steps an idle rank 0 sends a heartbeat, so a lost
rank shows within a second and the others are never left waiting.
"""

from __future__ import annotations

import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .runner import forward


def _forward(engine, chunks: list, rows: tuple | None, features: torch.Tensor | None) -> torch.Tensor:
    return forward(engine.model, engine.cache, chunks, rows, features=features)


# the calls the engine broadcasts: name -> what each rank runs (engine, *args)
OPS: dict[str, Callable] = {
    "decode": lambda engine, *args: engine.decoder(*args),
    "forward": _forward,
    "move": lambda engine, src, dst, length: engine.cache.move(src, dst, length),
    "load": lambda engine, name, path: engine.adapters.load(name, path),
    "unload": lambda engine, name: engine.adapters.unload(name),
    "ping": lambda engine: None,
}


@dataclass(frozen=True)
class OnDevice:
    """In a broadcast call's pickled arguments: a GPU tensor sent after them by the backend."""

    shape: tuple[int, ...]
    dtype: torch.dtype


class Mirror:
    """Rank 0's side: broadcast a call before running it. Tensors on a GPU go by the collective backend (NCCL keeps
    them on the device and in stream order); everything else, pickled. A broadcast that fails means a rank is gone:
    this process then exits (the supervisor, or torchrun, stops the rest) rather than serve from part of a model."""

    def __init__(self) -> None:
        self.last = time.monotonic()

    def send(self, op: str, args: tuple) -> None:
        try:
            _broadcast(op, args)
        except Exception as e:  # noqa: BLE001 (whatever the backend raises)
            print(f"vlstack serve: lost contact with another rank ({type(e).__name__}: {e}); exiting", flush=True)
            os._exit(3)
        self.last = time.monotonic()


def _broadcast(op: str, args: tuple) -> None:
    gpu: list[torch.Tensor] = []

    def hold(t: torch.Tensor):
        if not t.is_cuda:
            return t
        gpu.append(t)
        return OnDevice(tuple(t.shape), t.dtype)

    dist.broadcast_object_list([op, _map(args, torch.Tensor, hold)], src=0)
    for t in gpu:  # (in the order _map met them, which is the order the receivers fill them in)
        dist.broadcast(t.contiguous(), src=0)


def _receive(device: torch.device) -> tuple[str, tuple]:
    got = [None, None]
    dist.broadcast_object_list(got, src=0, device=device if device.type == "cuda" else None)
    op, meta = got

    def fill(x: OnDevice) -> torch.Tensor:
        t = torch.empty(x.shape, dtype=x.dtype, device=device)
        dist.broadcast(t, src=0)
        return t

    return op, _map(meta, OnDevice, fill)


def _map(x, kind: type, fn: Callable):
    """x with fn(y) for every y of this kind in it (in tuples, lists and dataclasses, depth first, in order)."""
    if isinstance(x, kind):
        return fn(x)
    if isinstance(x, (tuple, list)):
        return type(x)(_map(y, kind, fn) for y in x)
    if hasattr(x, "__dataclass_fields__"):
        return type(x)(**{f: _map(getattr(x, f), kind, fn) for f in x.__dataclass_fields__})
    return x


def replay(engine) -> None:
    """A rank above 0: run each call rank 0 broadcasts, until it is gone. A call that fails here failed on rank 0
    as well (the same inputs), which carries on; so does this rank."""
    device = engine.model.device
    with torch.inference_mode():
        while True:
            try:
                op, args = _receive(device)
            except Exception as e:  # noqa: BLE001 (rank 0 has gone: nothing more to serve)
                print(f"vlstack serve: rank {dist.get_rank()} lost rank 0 ({type(e).__name__}); exiting", flush=True)
                os._exit(3)
            try:
                OPS[op](engine, *args)
            except Exception:  # noqa: BLE001
                traceback.print_exc()
