"""trainer.decode: greedy CTC decoding and WER/CER on hand-computed cases."""

from __future__ import annotations

import pytest
import torch

from trainer.decode import edit_distance, error_rates, greedy_decode


def test_greedy_decode_merges_repeats_and_drops_blanks():
    vocabulary = [" ", "A", "B"]
    # frames: A A blank A B B blank " " B, then padding that must be ignored
    path = [2, 2, 0, 2, 3, 3, 0, 1, 3, 2, 2]
    log_probs = torch.full((len(path), 1, 4), -10.0)
    for t, s in enumerate(path):
        log_probs[t, 0, s] = 0.0

    assert greedy_decode(log_probs, torch.tensor([9]), vocabulary) == ["AAB B"]


def test_edit_distance_counts_substitutions_insertions_deletions():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance([], ["a"]) == 1
    assert edit_distance(["a", "b"], ["a", "b"]) == 0


def test_error_rates_sum_errors_over_reference_lengths():
    refs = ["THE CAT SAT", "A DOG"]
    hyps = ["THE BAT SAT", "A DOG RAN"]

    rates = error_rates(hyps, refs)

    # words: 1 substitution + 1 insertion over 5 reference words
    assert rates["wer"] == pytest.approx(2 / 5)
    # chars: "THE BAT SAT" vs "THE CAT SAT": 1; "A DOG RAN" vs "A DOG": 4 inserted; over 11 + 5 chars
    assert rates["cer"] == pytest.approx(5 / 16)
    assert rates["utterances"] == 2
