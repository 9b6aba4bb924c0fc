"""The model's steps for generation: `forward` (chunks of prompts packed back to back into their cache slots,
with decode rows in the same forward: chunked prefill mixed with decode) and the decode step alone
(`Decoder`: one new token for every running sequence, static).

The decode step is static: the rows' tokens, positions and adapter slots are copied into buffers, the batch
is padded to a bucket (1, 2, 4, ... up to max_batch) and the keys read to a power of two, and on CUDA each
(bucket, keys) pair is captured once as a CUDA graph and replayed; LoRA is routed by each row's adapter slot
inside the graph, so any mix of adapters replays the same graph. Rows sit in cache slots 0..B-1 (the engine
keeps them there), read in place; the padding rows are the next free slots, written at position 0 and never
read. On a CPU the same model forward runs unpadded at the rows' exact key length, each adapter on its rows
(static=True runs the static step there uncaptured: the tests' proof that it can be captured).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..layers.kv_cache import KVCache
from ..layers.lora import route, slots_of
from ..layers.lora_routing import Route, slot_onehot
from ..layers.step import decode_step, join, packed_step, upload
from ..models.internvl import InternVL


@dataclass
class Chunk:
    """Tokens a..b of a prompt, prefilled after its first a tokens (in the cache already) into its slot."""

    ids: torch.Tensor  # [b - a]
    start: int  # a
    slot: int
    adapter: str | None
    last: bool  # b is the prompt's end: the logits of its last token are wanted
    rope: torch.Tensor | None = None  # [b - a] V2PE's RoPE positions of its tokens (None: their positions)


def forward(
    model: InternVL,
    cache: KVCache,
    chunks: list[Chunk],
    rows: tuple | None = None,
    pixel_values: torch.Tensor | None = None,
    features: torch.Tensor | None = None,
) -> torch.Tensor:
    """Chunks of prompts packed back to back and decode rows (tokens, positions, slots, adapters, and under V2PE
    each row's RoPE offset: one new token each) in one forward -> the logits [N, V] at the last token of each
    chunk that ends its prompt, then at each row. The chunks' images come as pixel_values (their tiles in order)
    or visual embeddings `features` [N, P, C] (or [1, image tokens, C]) for their image tokens."""
    device = model.device
    lengths = [len(c.ids) for c in chunks]
    ids, adapters, counts = [c.ids for c in chunks], [c.adapter for c in chunks], list(lengths)
    step = None
    if chunks:
        last = (torch.tensor(lengths).cumsum(0) - 1)[torch.tensor([c.last for c in chunks])]
        starts, slots = [c.start for c in chunks], [c.slot for c in chunks]
        rope = None
        if any(c.rope is not None for c in chunks):
            own = [torch.arange(c.start, c.start + len(c.ids)) if c.rope is None else c.rope for c in chunks]
            rope = torch.cat(own)
        step = packed_step(lengths, device, starts, slots, cache.max_len, logits=last, rope=rope)
    if rows is not None:
        tokens, positions, slots, row_adapters, offsets = rows
        where = upload([tokens, positions, slots], device)  # [3, B]: one copy to the device
        offsets = None if offsets is None else upload(offsets, device, torch.float32)  # (V2PE)
        decode = decode_step(where[1], where[2], cache.max_len, max(positions) + 1, offsets)
        step = decode if step is None else join(step, decode)
        ids.append(where[0])
        adapters, counts = adapters + list(row_adapters), counts + [1] * len(tokens)
    tiles = None
    if pixel_values is not None:  # the route over the images' tiles, worked out on the host
        host = [c.ids.cpu() for c in chunks] + ([torch.tensor(rows[0])] if rows is not None else [])
        tiles = torch.cat(host) == model.cfg.image_token_id, model.cfg.tokens_per_tile  # [T] image tokens
    step.lora = route(model, adapters, counts=counts, tiles=tiles, device=device)
    pv = pixel_values.to(device) if pixel_values is not None else None
    return model(torch.cat([i.to(device) for i in ids]), step, pv, features, cache)


def prefill(
    model: InternVL,
    cache: KVCache,
    prompts: list[torch.Tensor],
    slots: list[int],
    adapters: list[str | None],
    pixel_values: torch.Tensor | None = None,
    features: torch.Tensor | None = None,
) -> torch.Tensor:
    """Whole prompts (1-D ids) into their cache slots, each with its adapter -> the logits at each prompt's last
    token [B, V]."""
    chunks = [Chunk(p, 0, s, a, True) for p, s, a in zip(prompts, slots, adapters)]
    return forward(model, cache, chunks, None, pixel_values, features)


def buckets(max_batch: int) -> list[int]:
    """The batch sizes a decode step is padded to: powers of two, and max_batch."""
    return sorted({min(1 << i, max_batch) for i in range(max_batch.bit_length() + 1)})


class Decoder:
    def __init__(self, model: InternVL, cache: KVCache, static: bool | None = None):
        """static: the static step (default: on a GPU, where it is captured as CUDA graphs)."""
        self.model, self.cache = model, cache
        self.static = model.device.type == "cuda" if static is None else static
        self.capture = self.static and model.device.type == "cuda"
        self.buckets = buckets(cache.slots)
        self.inputs = torch.zeros(3, cache.slots, dtype=torch.long, device=model.device)  # tokens, positions, LoRA
        v2pe = model.cfg.v2pe_delta != 1.0  # each row's RoPE offset (its RoPE position minus its position)
        self.offsets = torch.zeros(cache.slots, device=model.device) if v2pe else None
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None  # the graphs' memory pool, shared
        self.layout: tuple[int, int] | None = None  # the LoRA stacks' (slots, rank) the graphs were captured with
        self.held = -1  # the slots' version the stacks hold (adapters added, loaded or removed since: re-read)

    def __call__(
        self,
        tokens: list[int],
        positions: list[int],
        slots: list[int],
        adapters: list[str | None],
        pending: tuple[torch.Tensor, torch.Tensor] | None = None,
        offsets: list[float] | None = None,
    ) -> torch.Tensor:
        """The next token of each row (at its position, in its cache slot, with its adapter) -> logits [B, V]
        (a captured graph's output: valid until the next call).
        pending (rows [P], tokens [P]): rows whose token is still on the device (sampled by the step before, not
        yet read back): those tokens, copied on the device over the rows' entries of `tokens`.
        offsets: under V2PE, each row's RoPE position minus its position."""
        b, model = len(tokens), self.model
        if slots != list(range(b)):  # rows elsewhere (a failed step retried over a part): read by slot
            assert pending is None, "pending tokens need the rows in slots 0..B-1"
            return forward(self.model, self.cache, [], (tokens, positions, slots, adapters, offsets))
        n = next(x for x in self.buckets if x >= b) if self.static else b
        slots = slots_of(model).slots
        lora = [slots[a] if a is not None else -1 for a in adapters]
        pad = n - b
        self.inputs[:, :n].copy_(upload([tokens + [0] * pad, positions + [0] * pad, lora + [-1] * pad], model.device))
        if pending is not None:
            self.inputs[0].index_copy_(0, *pending)
        if self.offsets is not None:
            self.offsets[:n].copy_(upload(list(offsets or [0.0] * b) + [0.0] * pad, model.device, torch.float32))
        keys = max(positions) + 1
        if not self.static:
            return self._forward(n, keys, route(model, adapters, device=model.device))
        keys = min(max(128, 1 << (keys - 1).bit_length()), self.cache.max_len)  # a power of two: few graphs
        self._hold_adapters()
        if not self.capture:
            return self._forward(n, keys)[:b]
        if (n, keys) not in self.graphs:
            self._capture(n, keys)
        graph, logits = self.graphs[n, keys]
        graph.replay()
        return logits[:b]

    def _forward(self, n: int, keys: int, lora: Route | None = None) -> torch.Tensor:
        """The step over the first n rows of the inputs; lora: the rows' route (None: the static step's, by each
        row's slot in the inputs, inside the step)."""
        tokens, positions, slot = self.inputs[:, :n]  # [n] each
        offsets = None if self.offsets is None else self.offsets[:n]
        step = decode_step(positions, None, self.cache.max_len, keys, offsets)
        slots = slots_of(self.model)
        if lora is None and slots.capacity:
            lora = Route(onehot=slot_onehot(slot, slots.capacity, slots.rank))  # [n, S*R]
        step.lora = lora
        return self.model(tokens, step, cache=self.cache)  # [n, V]

    def _hold_adapters(self) -> None:
        """Before a static step: every LoRA layer's stack holds the loaded adapters, re-read when adapters were
        added, loaded or removed (weights changed in place later are not seen here: load them anew); stacks of
        another shape (more adapters than there were slots) invalidate the graphs."""
        slots = slots_of(self.model)
        if (slots.capacity, slots.rank) != self.layout:
            self.graphs.clear()
            self.layout, self.held = (slots.capacity, slots.rank), -1
        if self.held != slots.version:
            slots.prepare(torch.empty(0, device=self.model.device, dtype=self.model.dtype))
            self.held = slots.version

    def _capture(self, n: int, keys: int) -> None:
        """Capture the step over n rows reading `keys` positions (run twice first, as capture requires)."""
        stream = torch.cuda.Stream(self.model.device)
        stream.wait_stream(torch.cuda.current_stream(self.model.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._forward(n, keys)
        torch.cuda.current_stream(self.model.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self._forward(n, keys)
        self.pool = graph.pool()
        self.graphs[n, keys] = graph, logits
