"""Pass-key retrieval prompts ("needle in a haystack"), completion style.

A five-digit key is hidden at a chosen depth inside repetitive filler, and the prompt ends with
"What is the pass key? The pass key is" so the model completes it. Completion style is used on
purpose: the default small model answers it reliably at 2k-4k tokens with a full cache, while the
chat phrasing fails beyond ~1k, so this isolates what the KV policy does to retrieval.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.\n\n")
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
# The needle on a line of its own and a single newline before the question: measured on the default
# model at 2k tokens, this layout is found 3/3 where the same needle inline in the filler was 0/3.
NEEDLE = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "\nWhat is the pass key? The pass key is"


def contains_item(text: str, item: str) -> bool:
    """`item` occurs in `text` (case aside) with no letter or digit right before or after it."""
    return re.search(rf"(?<![^\W_]){re.escape(item.lower())}(?![^\W_])", text.lower()) is not None


@dataclass
class Haystack:
    ids: list[int]
    key: str
    depth: float  # where the needle sits, as a fraction of the filler

    def found(self, generated_text: str) -> bool:
        """The key as a whole number: " 604941." or " 960494" is not key 60494."""
        return contains_item(generated_text, self.key)


def make_haystack(tok, n_tokens: int, depth: float = 0.5, seed: int = 0, key: str | None = None) -> Haystack:
    """A prompt of exactly `n_tokens` tokens (BOS included when the tokenizer adds one).

    Pieces are tokenized separately and concatenated, which keeps the length exact and the needle
    intact; each piece starts at a word boundary, so the ids are what the text would tokenize to
    up to merges across those boundaries."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    key = key or str(random.Random(seed).randint(10000, 99999))
    head = ([tok.bos_id] if tok.add_bos and tok.bos_id is not None else []) + tok.encode(INTRO, bos=False)
    needle = tok.encode(NEEDLE.format(key=key), bos=False)
    question = tok.encode(QUESTION, bos=False)
    filler = tok.encode(FILLER, bos=False)
    room = n_tokens - len(head) - len(needle) - len(question)
    if room < 0:
        raise ValueError(f"a pass-key prompt needs at least {n_tokens - room} tokens, asked for {n_tokens}")
    hay = (filler * (room // len(filler) + 1))[:room]
    # Put the needle at a sentence boundary near the requested depth, so no sentence is split.
    cut = int(round(depth * room))
    period = tok.encode(".", bos=False)[-1]
    while 0 < cut < room and hay[cut - 1] != period:
        cut -= 1
    ids = head + hay[:cut] + needle + hay[cut:] + question
    assert len(ids) == n_tokens
    return Haystack(ids, key, cut / room if room else 0.0)
