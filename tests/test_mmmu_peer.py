"""MMMU's rules (vlstack.eval.metrics) against a peer implementation on hundreds of answers: lmms-eval's
(installed without its dependencies: `pip install --no-deps lmms-eval==0.7.3`, as .ci/run and the README's test
command do), whose functions each cite the official MMMU code they follow. Its functions are read from its
files, never imported with its package (which needs torch's vision stack). Every parse and score agrees, but
for the one class where lmms-eval departs from the official parser (written out below)."""

from __future__ import annotations

import ast
import importlib.util
import itertools
import random
import re
from pathlib import Path

from vlstack.eval.metrics import choice_correct, numbers, open_correct, parse_choice, parse_open

PEER = "lmms-eval==0.7.3"


def peer_root() -> Path:
    spec = importlib.util.find_spec("lmms_eval")  # (finds the package without running its __init__)
    assert spec is not None and spec.submodule_search_locations, (
        f"the peer implementation is missing: pip install --no-deps {PEER}"
    )
    return Path(list(spec.submodule_search_locations)[0])


def peer_functions() -> dict:
    """lmms-eval's MMMU parsers and scorers: its multiple-choice module (random, re, numpy only) loaded from its
    file, and the open-question functions compiled from its MMMU task file alone (the file imports the whole
    harness)."""
    root = peer_root()
    spec = importlib.util.spec_from_file_location("peer_mcq", root / "tasks/_task_utils/mmmu_mcq_utils.py")
    mcq = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mcq)
    wanted = {"extract_numbers", "check_is_number", "normalize_str", "parse_open_response", "eval_open"}
    wanted |= {"eval_multi_choice"}
    tree = ast.parse((root / "tasks/mmmu/utils.py").read_text())
    module = ast.Module([n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in wanted], [])
    namespace: dict = {"re": re}
    exec(compile(module, "lmms_eval/tasks/mmmu/utils.py", "exec"), namespace)
    assert wanted <= set(namespace), f"the peer's functions moved: {sorted(wanted - set(namespace))}"
    return {"choice": mcq.parse_mmmu_multi_choice_response, **{k: namespace[k] for k in wanted}}


OPTIONS = {"A": "the mitochondria", "B": "12 kg", "C": "Paris", "D": "none of the above", "E": "1,500 years"}

CHOICE_FORMS = [
    "{x}",
    "({x})",
    "{x}.",
    "The answer is {x}.",
    "The answer is ({x}).",
    "Answer: {x}",
    "I think it is {x} because the others do not fit.",
    "Option {x} is right",
    "{x}) is the one",
    "It must be {x}, not the others",
    "Between A and {x}, I choose {x}.",
    "({x}) or maybe (A)",
    "Not (B); it is {x}",
    "{x}\n",
    "'{x}'",
    "Looking at the picture closely, {x}.",
    "Looking at the picture closely, the answer is {x}.Done",
    "the choice{x} is right here",
]
TEXTS = [
    "I believe it is the mitochondria of the cell",
    "It weighs 12 kg as the scale in the figure shows",
    "The capital shown on this map is Paris, clearly",
    "Paris, or else the mitochondria; I am not sure which one",
    "none of the above options matches what I see",
    "it took 1,500 years for the river to carve this",
    "short text",
    "no idea",
    "",
    "The figure shows a rising curve with no labels at all",
]

OPEN_RESPONSES = [
    "42",
    "The answer is 42.",
    "So the mass is 5kg",
    "So the mass is 5.5kg",
    "Therefore x = 3.14159",
    "The total is 1,234,567 dollars.",
    "The result is -2.5e-3",
    "It is 3.0 and also 7",
    "first line\nthus the value is 0.5\nfinal answer 12",
    "The speed is 30 m/s. So the time is 4 s",
    "x = 2\ny = 10",
    "The answer is Paris",
    "I believe the capital is paris, france",
    "the result is \nok",
    "Roughly .75 of it",
    "It is 1,000 or 1000.0",
    "Answer: 12%",
    "the probability is 0.125, i.e. 1/8",
    "So it's 6.00",
    "could be 7 or 8",
    "",
    "no number here at all",
    "5",
    "a",
    "The answer is B",
    "Therefore, 2,5 is not a number",
]
OPEN_GOLDS = ["42", "5", "5.5", "3.14", "1234567", "-0.0025", "7", "12", "4", "10", "Paris", "paris", "0.5"]
OPEN_GOLDS += ["0.75", "1000", "12%", "0.125", "6", ["7", "8"], "no", "a", "B", "2"]


def peer_departs(response: str) -> bool:
    """lmms-eval's one change to the official parse_multi_choice_response: where no "(X)" is in the response,
    it looks for "X " (no space before it) and then "X." instead of the official " X " alone, so a letter
    glued to the word before it, or followed by a full stop inside the response, counts there and not in the
    official code."""
    for char in [",", ".", "!", "?", ";", ":", "'"]:
        response = response.strip(char)
    padded = f" {response} "
    if any(f"({x})" in padded for x in OPTIONS):
        return False
    return any(f"{x} " in padded and f" {x} " not in padded or f"{x}." in padded for x in OPTIONS)


def test_multiple_choice_agrees_with_the_peer_on_hundreds_of_responses():
    peer = peer_functions()
    responses = [form.format(x=x) for form, x in itertools.product(CHOICE_FORMS, OPTIONS)] + TEXTS
    responses += [r.lower() for r in responses] + [f"{r} {t}" for r, t in zip(responses[::7], TEXTS * 9)]
    assert len(set(responses)) >= 200
    agree = departs = 0
    for k, response in enumerate(responses):
        ours = parse_choice(response, OPTIONS, random.Random(k))
        random.seed(k)  # (the peer draws its fallback from the global generator: the same draw)
        theirs = peer["choice"](response, list(OPTIONS), OPTIONS)
        if ours == theirs:
            agree += 1
        else:
            assert peer_departs(response), f"{response!r}: ours {ours}, the peer's {theirs}"
            departs += 1
        for gold in OPTIONS:  # the score: only the same letter is right
            assert choice_correct(gold, ours) == peer["eval_multi_choice"](gold, ours)
        assert choice_correct(["A", "C"], ours) == peer["eval_multi_choice"](["A", "C"], ours)
    assert agree >= 0.8 * len(responses) and departs > 0  # (the departing class is met, and it is all)


def test_open_questions_agree_with_the_peer_on_hundreds_of_pairs():
    peer = peer_functions()
    pairs = list(itertools.product(OPEN_RESPONSES, OPEN_GOLDS))
    assert len(pairs) >= 500
    right = 0
    for response, gold in pairs:
        ours, theirs = parse_open(response), peer["parse_open_response"](response)
        assert sorted(map(repr, ours)) == sorted(map(repr, theirs)), response
        score = open_correct(gold, ours)
        assert score == peer["eval_open"](gold, theirs), (response, gold)
        right += score
    assert 0 < right < len(pairs)
    for text in ("5kg", "5.5kg", "-3 and 2e5", "1,234.5", ".5", "x2 = 7"):  # the numbers' patterns themselves
        assert numbers(text) == peer["extract_numbers"](text), text
