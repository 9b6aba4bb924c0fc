"""Sampling on the device, and OpenAI's logit_bias and penalties before it (`adjust`): every row's next token
at once, each row with its own temperature, top-k, top-p and seed as tensors; no loop over rows, no
generator objects, no host sync.

A sampled row draws with the Gumbel-max trick: the argmax of logit / temperature + Gumbel noise over the
tokens top-k and top-p keep is a draw from their renormalised softmax. The noise is a hash of (the row's
seed, its step, the token id), so a seeded request gives the same tokens whatever else shares its batch, and
a row's draw needs no state carried between steps."""

from __future__ import annotations

import torch

from ..layers.step import upload
from ..sampling import SamplingParams

M32 = 0xFFFFFFFF


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    top_k: torch.Tensor,
    seeds: torch.Tensor,
    steps: torch.Tensor,
    filtered: bool = True,
) -> torch.Tensor:
    """logits [B, V]; per row [B]: temperature (0: greedy), top_p, top_k (0: off), seed (64 bits as two 32-bit
    words [B, 2]) and step -> token ids [B]. filtered=False: no row uses top-k or top-p (no sort)."""
    greedy = logits.argmax(-1)  # [B]
    scaled = logits.float() / temperature.clamp(min=1e-6)[:, None]  # [B, V]
    vocab = logits.shape[-1]
    if filtered:
        scaled, order = scaled.sort(-1, descending=True)  # [B, V] each row's tokens, likeliest first
        probs = scaled.softmax(-1)
        k = torch.where(top_k > 0, top_k, vocab)[:, None]  # [B, 1]
        drop = (torch.arange(vocab, device=logits.device) >= k) | (probs.cumsum(-1) - probs > top_p[:, None])
        scaled = scaled.masked_fill(drop, float("-inf"))  # keep the top k and the smallest prefix reaching top_p
    else:
        order = torch.arange(vocab, device=logits.device).expand_as(scaled)
    pick = (scaled + gumbel(seeds, steps, order)).argmax(-1)  # [B]
    sampled = order.gather(1, pick[:, None])[:, 0]
    return torch.where(temperature > 0, sampled, greedy)


def gumbel(seeds: torch.Tensor, steps: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Gumbel noise [B, V] for token ids [B, V], a hash of (seed [B, 2], step [B], token id): -log(-log u)."""
    h = _mix(seeds[:, :1] ^ _mul(steps[:, None] & M32, 0x9E3779B1))
    h = _mix(h ^ seeds[:, 1:] ^ _mul(ids, 0x85EBCA77))  # [B, V]
    u = ((h >> 8).double() + 0.5) / 2**24  # (0, 1)
    return -torch.log(-torch.log(u)).float()


def _mul(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for x, c < 2^32, in int64 without overflow (x split in 16-bit halves)."""
    return ((x & 0xFFFF) * c + (((x >> 16) * c) & 0xFFFF) * 65536) & M32


def _mix(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser: every input bit reaches every output bit."""
    h = h ^ (h >> 16)
    h = _mul(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def adjust(logits: torch.Tensor, generated: list[list[int]], params: list[SamplingParams]) -> torch.Tensor:
    """logits [B, V] with OpenAI's logit_bias added and its presence and frequency penalties: each row's
    logit of a token it has generated c times lowered by presence_penalty + c * frequency_penalty. The same
    tensor when no row has any, else a new one (the caller's logits stay the model's)."""
    penalised = [bool((p.presence_penalty or p.frequency_penalty) and ids) for p, ids in zip(params, generated)]
    rows = [i for i, p in enumerate(params) if penalised[i] or p.logit_bias]
    if not rows:
        return logits
    logits = logits.clone()
    for i in rows:
        p = params[i]
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias), device=logits.device)
            logits[i, ids] += torch.tensor(list(p.logit_bias.values()), device=logits.device, dtype=logits.dtype)
        if penalised[i]:
            counts = torch.bincount(torch.tensor(generated[i], device=logits.device), minlength=logits.shape[-1])
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)  # [V]
    return logits


def seed_words(seed: int) -> tuple[int, int]:
    """A 64-bit seed (negative too) as two 32-bit words."""
    seed %= 2**64
    return seed & M32, seed >> 32


def sample_rows(logits: torch.Tensor, params: list[SamplingParams], seeds: list[tuple[int, int]], steps: list[int]):
    """logits [B, V] of rows with these options, seeds and steps -> token ids [B] (greedy rows by argmax alone)."""
    if all(p.temperature == 0 for p in params):
        return logits.argmax(-1)
    device = logits.device
    floats = upload([[p.temperature for p in params], [p.top_p for p in params]], device, torch.float32)  # [2, B]
    ints = upload([[p.top_k for p in params], steps, *zip(*seeds)], device)  # [4, B]
    filtered = any(p.top_k or p.top_p < 1 for p in params if p.temperature > 0)
    return sample(logits, floats[0], floats[1], ints[0], ints[2:].T, ints[1], filtered)


def logprobs(logits: torch.Tensor, tokens: torch.Tensor, want: dict[int, int]) -> dict[int, tuple]:
    """logits [B, V] and the chosen tokens [B] -> {row: (the token's logprob, [(id, logprob)] of the row's
    likeliest tokens)} for the rows in want (row -> how many likeliest tokens)."""
    rows = upload(list(want), logits.device)  # [W]
    lp = logits[rows].float().log_softmax(-1)  # [W, V]
    chosen = lp.gather(1, tokens[rows, None])[:, 0].tolist()  # [W]
    top = lp.topk(max(want.values()), -1)  # [W, k]
    ids, values = top.indices.tolist(), top.values.tolist()
    return {i: (chosen[j], list(zip(ids[j][:k], values[j][:k]))) for j, (i, k) in enumerate(want.items())}
