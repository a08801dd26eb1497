"""Greedy CTC decoding and error rates (WER, CER)."""

from __future__ import annotations

import torch


def greedy_decode(log_probs: torch.Tensor, lengths: torch.Tensor, vocabulary: list[str]) -> list[str]:
    """Returns the best path of each utterance: argmax per frame, repeats merged, blanks (0) dropped.

    `log_probs` is (T, B, symbols) as the model returns it.
    """
    best = log_probs.argmax(-1).transpose(0, 1).tolist()
    out = []
    for path, n in zip(best, lengths.tolist()):
        symbols, previous = [], 0
        for s in path[:n]:
            if s != previous and s != 0:
                symbols.append(vocabulary[s - 1])
            previous = s
        out.append("".join(symbols))
    return out


def edit_distance(a: list, b: list) -> int:
    """Returns the Levenshtein distance between two sequences."""
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        diagonal, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            diagonal, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diagonal + (x != y))
    return row[-1]


def error_counts(hypothesis: str, reference: str) -> tuple[int, int, int, int]:
    """Returns (word errors, reference words, char errors, reference chars)."""
    return (edit_distance(hypothesis.split(), reference.split()), len(reference.split()),
            edit_distance(list(hypothesis), list(reference)), len(reference))


def error_totals(hypotheses: list[str], references: list[str]) -> list[int]:
    """Returns [word errors, reference words, char errors, reference chars, utterances] summed over a corpus.

    Totals of parts of a corpus add up to the corpus's: ranks that each decode a part sum them.
    """
    totals = [0, 0, 0, 0, 0]
    for h, r in zip(hypotheses, references, strict=True):
        totals = [a + b for a, b in zip(totals, (*error_counts(h, r), 1))]
    return totals


def rates(totals: list[int]) -> dict:
    """Returns {"wer", "cer", "utterances"} from `error_totals`: errors over reference lengths."""
    we, wn, ce, cn, n = totals
    return {"wer": we / max(wn, 1), "cer": ce / max(cn, 1), "utterances": int(n)}


def error_rates(hypotheses: list[str], references: list[str]) -> dict:
    """Returns {"wer", "cer", "utterances"}: errors summed over the corpus, over reference lengths."""
    return rates(error_totals(hypotheses, references))
