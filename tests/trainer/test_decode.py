"""trainer.decode: greedy CTC decoding and WER/CER on hand-computed cases."""

from __future__ import annotations

import pytest
import torch

from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.decode import error_rates, error_totals, greedy_decode


def test_greedy_decode_merges_repeats_and_drops_blanks():
    vocabulary = [" ", "A", "B"]
    # frames: A A blank A B B blank " " B, then padding that must be ignored
    path = [2, 2, 0, 2, 3, 3, 0, 1, 3, 2, 2]
    log_probs = torch.full((len(path), 1, 4), -10.0)
    for t, s in enumerate(path):
        log_probs[t, 0, s] = 0.0

    assert greedy_decode(log_probs, torch.tensor([9]), vocabulary) == ["AAB B"]


def levenshtein(a: list, b: list) -> int:
    """The reference the error counts are checked against: the edit distance, row by row."""
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        diagonal, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            diagonal, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diagonal + (x != y))
    return row[-1]


def test_error_counts_are_substitutions_insertions_and_deletions():
    assert error_totals(["sitting"], ["kitten"]) == [1, 1, 3, 6, 1]
    assert error_totals(["a"], [""]) == [1, 0, 1, 0, 1]  # all inserted, nothing to refer to
    assert error_totals([""], ["a b"]) == [2, 2, 3, 3, 1]
    assert error_totals([], []) == [0, 0, 0, 0, 0]
    assert error_totals([" a"], ["a"]) == [0, 1, 1, 1, 1]  # a space is a character wherever it is


# words over a small alphabet, with what a greedy decoding may give too: spaces at the ends, runs of them, tabs
def spaced(words: list[str]) -> st.SearchStrategy[str]:
    gaps = st.lists(st.sampled_from([" ", "  ", "\t"]), min_size=len(words) + 1, max_size=len(words) + 1)
    return gaps.map(lambda gaps: "".join(g + w for g, w in zip(gaps, words + [""])))


TEXTS = st.lists(st.text("abcde'", max_size=6), max_size=8).flatmap(spaced)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(TEXTS, TEXTS), max_size=5))
def test_error_totals_are_the_edit_distances_of_words_and_characters(pairs):
    hypotheses, references = [h for h, _ in pairs], [r for _, r in pairs]

    totals = error_totals(hypotheses, references)

    assert totals == [sum(levenshtein(h.split(), r.split()) for h, r in pairs),
                      sum(len(r.split()) for r in references),
                      sum(levenshtein(list(h), list(r)) for h, r in pairs),
                      sum(len(r) for r in references), len(pairs)]


def test_error_rates_sum_errors_over_reference_lengths():
    refs = ["THE CAT SAT", "A DOG"]
    hyps = ["THE BAT SAT", "A DOG RAN"]

    rates = error_rates(hyps, refs)

    # words: 1 substitution + 1 insertion over 5 reference words
    assert rates["wer"] == pytest.approx(2 / 5)
    # chars: "THE BAT SAT" vs "THE CAT SAT": 1; "A DOG RAN" vs "A DOG": 4 inserted; over 11 + 5 chars
    assert rates["cer"] == pytest.approx(5 / 16)
    assert rates["utterances"] == 2
