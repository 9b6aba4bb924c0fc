"""The decode step one step ahead of reading its tokens back (a GPU's default): the rows whose newest tokens are
still on the device, their copy to the host under way."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..layers.step import upload

if TYPE_CHECKING:
    from .request import Request


class Ahead:
    """Rows whose newest tokens [B] are on the device, sampled and not yet read back; their copy to the host
    starts at once (after the step that made them), so that reading them later waits for nothing else."""

    def __init__(self, rows: list[Request], tokens: torch.Tensor):
        self.rows, self.tokens = rows, tokens  # tokens [B] on the device
        self.host = tokens.to("cpu", non_blocking=True)  # [B] once copied
        self.picks = list(range(len(rows)))  # the rows' places in host
        self.copied = None
        if tokens.is_cuda:
            self.copied = torch.cuda.Event()
            self.copied.record()

    def keep(self, rows: list[Request]) -> Ahead | None:
        """The same, for these of its rows only (None: none)."""
        if not rows:
            return None
        index = {id(r): i for i, r in enumerate(self.rows)}
        places = [index[id(r)] for r in rows]
        kept = Ahead.__new__(Ahead)
        kept.rows, kept.tokens = rows, self.tokens[upload(places, self.tokens.device)]
        kept.host, kept.picks, kept.copied = self.host, [self.picks[i] for i in places], self.copied
        return kept

    def read(self) -> list[int]:
        """The tokens on the host (waiting for their copy only)."""
        if self.copied is not None:
            self.copied.synchronize()
        tokens = self.host.tolist()
        return [tokens[i] for i in self.picks]
