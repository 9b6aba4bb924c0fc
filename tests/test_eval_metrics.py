"""The official scoring rules, case by case (vlstack.eval.metrics): the corner cases of MMMU's parsers, ANLS
and ChartQA's relaxed accuracy, each worked out by hand from the rules."""

from __future__ import annotations

import random

import pytest

from vlstack.eval.metrics import (
    anls,
    choice_correct,
    exact,
    levenshtein,
    normalise,
    numbers,
    open_correct,
    parse_choice,
    parse_open,
    relaxed,
)

OPTIONS = {"A": "red apple", "B": "green pear", "C": "blue whale", "D": "yellow sun"}


@pytest.mark.parametrize(
    "response, expected",
    [
        ("B", "B"),  # a bare letter: " B " after padding
        ("(C)", "C"),
        ("The answer is (A).", "A"),  # ends stripped of punctuation, then "(A)"
        ("(A) is wrong, the answer is (D)", "D"),  # several: the latest last occurrence
        ("A or B? B", "B"),  # " A " and " B ": B occurs last
        ("I think it must be the blue whale because of its size", "C"),  # > 5 words: the option's text
        ("It is a Green Pear, not a red apple at all really", "A"),  # both texts: the one found last
        ("the (B) and also C here", "B"),  # a bracketed letter wins over a bare one
        ("A.", "A"),  # "." stripped
        ("',A,'", "A"),  # each character stripped in turn from both ends
    ],
)
def test_multiple_choice_parsing(response, expected):
    assert parse_choice(response, OPTIONS, random.Random(42)) == expected


def test_multiple_choice_falls_back_to_a_seeded_random_letter():
    """No letter and too short for option texts: a random letter from one generator seeded with 42 per run,
    drawn in order: the same letters in every run."""
    short = ["no idea", "hmm", "blue whale"]  # "blue whale": 2 words, so no text match
    rng = random.Random(42)
    first = [parse_choice(r, OPTIONS, rng) for r in short]
    expected = random.Random(42)
    assert first == [expected.choice(list(OPTIONS)) for _ in short]
    assert choice_correct("B", "B") and choice_correct(["A", "B"], "B") and not choice_correct("A", "B")


def test_open_answers_are_parsed_as_mmmu_does():
    # the shortest text after an indicator, plus the numbers in it, each normalised; the official patterns
    # read "1,234.5" as 1,234 (thousands commas) and 234.5 (the plain pattern, which also finds the 234 of
    # "1,234"), never as 1234.5
    assert set(parse_open("The total is 1,234.5 dollars.")) == {"1,234.5 dollars", 1234.0, 234.5}
    assert set(parse_open("The total is 1,234 dollars.")) == {"1,234 dollars", 1234.0, 234.0}
    # lines split at newlines only (the ". " + capital split runs after lower-casing); "=" in the last line only
    assert set(parse_open("so x = 3\ntherefore it is 4")) == {"x = 3", 3.0, 4.0}
    assert set(parse_open("First. So the result is 12\nthe value = 7")) == {12.0, 7.0}
    assert set(parse_open("x")) == {" x", "x "}  # no indicator: the whole response; one character padded
    assert parse_open("the result is \nok") == ["is"]  # the empty tail after "is " gives way to "result "'s
    # the three official patterns in turn; the plain one also picks the pieces of the others ("000" of 1,000,
    # "2" and "3" of 2.5e3)
    assert numbers("from -3 to 1,000 or 2.5e3 and .5") == ["1,000", "2.5e3", "-3", "000", "2", "3", ".5"]
    assert normalise("1,000") == [1000.0] and normalise("3.14159") == [3.14] and normalise("Paris") == ["paris"]
    # a plain integer ends a word (official: \d+\b): glued to letters it is not a number; a decimal still is
    assert numbers("5kg") == [] and numbers("5.5kg") == ["5.5"] and numbers("x=5; y=12kg") == ["5"]
    assert 5.0 not in parse_open("so the mass is 5kg") and 5.5 in parse_open("so the mass is 5.5kg")
    assert not open_correct("5", parse_open("so the mass is 5kg")) and open_correct("5", parse_open("so it is 5 kg"))


def test_open_answers_are_scored_as_mmmu_does():
    assert open_correct("12", parse_open("So the result is 12.0"))  # numbers compared as floats
    assert open_correct("Paris", parse_open("I believe the capital is paris, france"))  # gold inside a prediction
    assert not open_correct("Paris", parse_open("The capital is Lyon"))
    assert open_correct(["7", "seven"], parse_open("It is seven"))  # any gold
    assert not open_correct("1.5", parse_open("The answer is 1.55"))  # 1.55 rounds to 1.55, not 1.5
    assert open_correct("1.5", parse_open("The answer is 1.499"))  # 1.499 rounds to 1.5


def test_anls_as_docvqa_scores_it():
    assert levenshtein("kitten", "sitting") == 3 and levenshtein("", "abc") == 3
    assert anls(["Total"], " total ") == 1.0  # case and spaces normalised
    assert anls(["12.50"], "12.5") == pytest.approx(1 - 1 / 5)  # one edit over the longer length, 5
    assert anls(["abcd"], "abxy") == 0.5  # distance 0.5 is not over tau: 1 - 0.5
    assert anls(["abcde"], "axyze") == 0.0  # 3/5 > 0.5
    assert anls(["no", "total amount"], "total amont") == pytest.approx(1 - 1 / 12)  # max over golds
    assert anls(["a  b"], "a b") == pytest.approx(1 - 0 / 4)  # collapsed spaces: distance 0
    assert anls([""], "") == 1.0


def test_relaxed_accuracy_as_chartqa_scores_it():
    assert relaxed(["100"], "104.9") == 1.0 and relaxed(["100"], "105.1") == 0.0  # 5% of the gold
    assert relaxed(["0.45"], "45%") == 1.0  # a trailing % divides by 100
    assert relaxed(["45"], "45%") == 0.0  # ... so "45%" is 0.45, far from 45
    assert relaxed(["0"], "0.0") == 0.0 and relaxed(["0"], "0") == 1.0  # a gold of 0: exact strings only
    assert relaxed(["Yes"], "yes") == 1.0 and relaxed(["blue"], "Blue ") == 1.0  # non-numbers: exact, any case
    assert relaxed(["3", "three"], "Three") == 1.0  # max over golds
    assert relaxed(["-20"], "-19.5") == 1.0  # relative to |gold|
    assert exact(["New  York"], "new york") == 1.0 and exact(["a"], "b") == 0.0
