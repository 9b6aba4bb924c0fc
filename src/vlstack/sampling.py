"""Generation options and text: the options (`SamplingParams`, checked for every caller) and the `Detokenizer`
that turns a row's tokens into text cut at stop strings. The model's steps are engine/runner.py's, sampling
engine/sampler.py's; the one generation loop is the engine's (engine/scheduler.py): the server runs it in a
thread, VLM.chat / stream / generate step it themselves."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import PromptError


class SamplingError(PromptError):
    """A generation option out of its range; `field` names it, `what` says what it must be."""

    def __init__(self, field: str, what: str):
        super().__init__(f"{field} must be {what}")
        self.field, self.what = field, what


def is_int(v: Any) -> bool:
    """An integer, not a bool (JSON's true would pass isinstance(v, int))."""
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass
class SamplingParams:
    """Generation options, checked here for every caller (VLM.chat and the server alike)."""

    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1, vLLM's spelling): off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0  # OpenAI's: subtracted from the logit of every token already generated
    frequency_penalty: float = 0.0  # OpenAI's: subtracted once for each time a token was generated
    logit_bias: dict[int, float] = field(default_factory=dict)  # OpenAI's: token id -> added to its logit

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        bias = self.logit_bias
        checks = [
            (is_int(self.max_new_tokens) and self.max_new_tokens >= 1, "max_new_tokens", "an integer >= 1"),
            (_number(self.temperature) and 0 <= self.temperature <= 2, "temperature", "a number in [0, 2]"),
            (_number(self.top_p) and 0 < self.top_p <= 1, "top_p", "a number in (0, 1]"),
            (is_int(self.top_k) and -1 <= self.top_k < 2**31, "top_k", "an integer >= -1 (-1 or 0: off)"),
            (self.seed is None or is_int(self.seed) and -(2**63) <= self.seed < 2**64, "seed", "a 64-bit integer"),
            (
                isinstance(self.stop, (list, tuple))
                and len(self.stop) <= 4
                and all(isinstance(s, str) and s and is_unicode(s) for s in self.stop),
                "stop",
                "a string or up to 4 strings",
            ),
            *(
                (_number(getattr(self, p)) and -2 <= getattr(self, p) <= 2, p, "a number in [-2, 2]")
                for p in ("presence_penalty", "frequency_penalty")
            ),
            (
                isinstance(bias, dict) and all(_token(t) and _number(b) and -100 <= b <= 100 for t, b in bias.items()),
                "logit_bias",
                "an object mapping token ids >= 0 to numbers in [-100, 100]",
            ),
        ]
        for ok, name, what in checks:
            if not ok:
                raise SamplingError(name, what)
        self.stop = tuple(self.stop)
        self.top_k = max(0, self.top_k)
        self.logit_bias = {int(t): b for t, b in bias.items()}

    def check_vocab(self, size: int) -> None:
        """Refuse a logit_bias naming a token the model does not have (before any step, which it would fail)."""
        if any(t >= size for t in self.logit_bias):
            raise SamplingError("logit_bias", f"an object mapping token ids below {size} to numbers in [-100, 100]")


def _token(t: Any) -> bool:
    """A token id: an integer >= 0, or its decimal digits (JSON object keys are strings)."""
    return (is_int(t) and t >= 0) or (isinstance(t, str) and t.isascii() and t.isdigit())


def is_unicode(s: str) -> bool:
    """Whether s is valid Unicode (JSON can carry lone surrogates, which UTF-8 cannot)."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class Detokenizer:
    """One row's tokens -> text that is safe to send: cut at the first stop string (which is not sent),
    holding back half-decoded characters and any tail that could still become a stop string."""

    def __init__(self, decode: Callable[[list[int]], str], stop: tuple[str, ...] = ()):
        self.decode, self.stop = decode, stop
        self.ids: list[int] = []
        self.text = ""  # what has been sent
        self.stopped = False

    def push(self, token: int) -> str:
        """Add a token; return the new text that can be sent now."""
        self.ids.append(token)
        full = self.decode(self.ids)
        cuts = [full.find(s) for s in self.stop if s in full]
        if cuts:
            self.stopped = True
            return self._send(full[: min(cuts)])
        return self._send(full[: len(full) - self._held(full)])

    def flush(self) -> str:
        """At the end: whatever was held back (a stop string never completed)."""
        return "" if self.stopped else self._send(self.decode(self.ids))

    def _held(self, full: str) -> int:
        held = len(full) - len(full.rstrip("\ufffd"))  # bytes of a character still to come
        for s in self.stop:
            for k in range(min(len(s) - 1, len(full)), 0, -1):
                if full.endswith(s[:k]):
                    held = max(held, k)
                    break
        return held

    def _send(self, visible: str) -> str:
        if not visible.startswith(self.text):  # decoding revised earlier text: send nothing new
            return ""
        new, self.text = visible[len(self.text) :], visible
        return new
