"""The official scoring rules of the benchmarks, each as its official code behaves (REFERENCE.md,
"Evaluation rules"), quirks included: a score here is comparable with a published one.

- MMMU: `parse_choice` / `choice_correct` (multiple choice) and `parse_open` / `open_correct` (open
  questions), as MMMU's `parse_multi_choice_response`, `parse_open_response`, `eval_multi_choice` and
  `eval_open`; the random fallback draws from one generator seeded with 42 per run (`random.Random(42)`).
- DocVQA: `anls` (average normalised Levenshtein similarity, tau = 0.5, max over the gold answers).
- ChartQA: `relaxed` (5% relative tolerance for numbers, a trailing % dividing by 100, exact match
  otherwise; max over the gold answers).
- Any VQA set: `exact` (case- and space-insensitive exact match, max over the gold answers).
"""

from __future__ import annotations

import random
import re

PUNCTUATION = [",", ".", "!", "?", ";", ":", "'"]  # stripped from a multiple-choice response's ends, in turn
INDICATORS = ["could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result "]


def parse_choice(response: str, index2ans: dict[str, str], rng: random.Random) -> str:
    """The option letter a free-form response picks (MMMU's parse_multi_choice_response): letters written as
    "(X)"; else as " X "; else, in a response of more than 5 words, options whose text it contains; else a
    random letter from rng. Of several, the one whose last occurrence comes last."""
    for char in PUNCTUATION:
        response = response.strip(char)
    response = f" {response} "
    choices = list(index2ans)
    candidates = [c for c in choices if f"({c})" in response]
    where = [response.rfind(f"({c})") for c in candidates]
    if not candidates:
        candidates = [c for c in choices if f" {c} " in response]
        where = [response.rfind(f" {c} ") for c in candidates]
    if not candidates and len(response.split()) > 5:
        candidates = [c for c in choices if index2ans[c].lower() in response.lower()]
        where = [response.lower().rfind(index2ans[c].lower()) for c in candidates]
    if not candidates:
        return rng.choice(choices)
    return candidates[where.index(max(where))]  # (ties: the first, as numpy's argmax)


def choice_correct(gold: str | list[str], prediction: str) -> bool:
    return prediction in gold if isinstance(gold, list) else prediction == gold


def parse_open(response: str) -> list[str | float]:
    """The answers a response to an open question gives (MMMU's parse_open_response): in each line (the
    official split on ". " before a capital runs after lower-casing, so only newlines split) the shortest
    text after an indicator ("=" too in the last line), else the whole response; every number in those;
    each normalised (normalise)."""
    response = response.strip().strip(".").lower()
    lines = re.split(r"\.\s(?=[A-Z])|\n", response)
    keys = []
    for i, line in enumerate(lines):
        indicators = INDICATORS + (["="] if i == len(lines) - 1 else [])
        shortest = None
        for ind in indicators:
            if ind in line:
                tail = line.split(ind)[-1].strip()
                if not shortest or len(tail) < len(shortest):  # (an empty tail is replaced by the next, as there)
                    shortest = tail
        if shortest and shortest.strip() not in PUNCTUATION:
            keys.append(shortest)
    keys = keys or [response]
    found = keys + [n for k in keys for n in numbers(k)]
    return list({x for f in found for x in normalise(f)})


def numbers(text: str) -> list[str]:
    """Numbers written in text: with thousands commas, in scientific notation, and plain (MMMU's
    extract_numbers, in that order). As there, a plain integer must end a word: "5kg" gives none, "5.5kg" 5.5."""
    commas = re.findall(r"-?\b\d{1,3}(?:,\d{3})+\b", text)
    scientific = re.findall(r"-?\d+(?:\.\d+)?[eE][+-]?\d+", text)
    plain = re.findall(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])", text)  # (an integer ends a word)
    return commas + scientific + plain


def normalise(text: str) -> list[str | float]:
    """A number -> [it as a float rounded to 2 places] (commas dropped); a string -> [it lower-cased], one
    character padded with a space on either side (MMMU's normalize_str)."""
    text = text.strip()
    try:
        return [round(float(text.replace(",", "")), 2)]
    except ValueError:
        pass
    text = text.lower()
    return [f" {text}", f"{text} "] if len(text) == 1 else [text]


def open_correct(gold: str | list[str], predictions: list[str | float]) -> bool:
    """MMMU's eval_open: a predicted number equal to a gold one, or a gold string inside a predicted string."""
    golds = [n for g in (gold if isinstance(gold, list) else [gold]) for n in normalise(g)]
    for p in predictions:
        if isinstance(p, str):
            if any(isinstance(g, str) and g in p for g in golds):
                return True
        elif p in golds:
            return True
    return False


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions)."""
    if len(a) < len(b):
        a, b = b, a
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def anls(golds: list[str], prediction: str, tau: float = 0.5) -> float:
    """DocVQA's ANLS for one question: 1 - the smallest normalised distance to a gold answer (both lower-cased,
    stripped, spaces collapsed; divided by the longer of the two as given), 0 when that distance is over tau."""

    def distance(gold: str) -> float:
        g, p = " ".join(gold.strip().lower().split()), " ".join(prediction.strip().lower().split())
        longest = max(len(gold.upper()), len(prediction.upper()))
        return 0.0 if longest == 0 else levenshtein(g, p) / longest

    best = min(distance(g) for g in golds)
    return 0.0 if best > tau else 1.0 - best


def _number(text: str) -> float | None:
    try:
        return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed(golds: list[str], prediction: str, tolerance: float = 0.05) -> float:
    """ChartQA's relaxed accuracy for one question: 1 if, for some gold answer, both are numbers (a trailing %
    divides by 100) and the gold is not 0 and they differ by at most 5% of it; or else they are equal
    ignoring case. 0 otherwise."""
    prediction = prediction.strip()
    for gold in golds:
        gold = gold.strip()
        p, g = _number(prediction), _number(gold)
        if p is not None and g:
            if abs(p - g) / abs(g) <= tolerance:
                return 1.0
        elif prediction.lower() == gold.lower():
            return 1.0
    return 0.0


def exact(golds: list[str], prediction: str) -> float:
    """1 if the prediction equals a gold answer, ignoring case and runs of spaces."""
    p = " ".join(prediction.lower().split())
    return float(any(" ".join(g.lower().split()) == p for g in golds))
