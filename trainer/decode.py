"""Greedy CTC decoding and error rates (WER, CER)."""

from __future__ import annotations

import jiwer
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


# What jiwer compares, set here rather than left to its defaults, which strip the ends: words as str.split()
# gives them, and every character, a space at either end included.
WORDS = jiwer.Compose([jiwer.SubstituteRegexes({r"\s+": " "}), jiwer.ReduceToListOfListOfWords()])
CHARACTERS = jiwer.ReduceToListOfListOfChars()


def error_totals(hypotheses: list[str], references: list[str]) -> list[int]:
    """Returns [word errors, reference words, char errors, reference chars, utterances] summed over a corpus:
    substitutions, deletions and insertions, counted by jiwer over WORDS and CHARACTERS.

    Totals of parts of a corpus add up to the corpus's: ranks that each decode a part sum them.
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    if not references:
        return [0, 0, 0, 0, 0]
    words = jiwer.process_words(references, hypotheses, reference_transform=WORDS, hypothesis_transform=WORDS)
    chars = jiwer.process_characters(references, hypotheses, reference_transform=CHARACTERS,
                                     hypothesis_transform=CHARACTERS)
    return [*errors_and_length(words), *errors_and_length(chars), len(references)]


def errors_and_length(alignment: jiwer.WordOutput | jiwer.CharacterOutput) -> tuple[int, int]:
    """Returns (substitutions + deletions + insertions, reference length) of a jiwer alignment."""
    a = alignment
    return a.substitutions + a.deletions + a.insertions, a.hits + a.substitutions + a.deletions


def rates(totals: list[int]) -> dict:
    """Returns {"wer", "cer", "utterances"} from `error_totals`: errors over reference lengths."""
    we, wn, ce, cn, n = totals
    return {"wer": we / max(wn, 1), "cer": ce / max(cn, 1), "utterances": int(n)}


def error_rates(hypotheses: list[str], references: list[str]) -> dict:
    """Returns {"wer", "cer", "utterances"}: errors summed over the corpus, over reference lengths."""
    return rates(error_totals(hypotheses, references))
