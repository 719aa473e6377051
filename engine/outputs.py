"""What generation hands back: an Output per prompt, and the Stream that LLM.stream returns."""
from __future__ import annotations

from dataclasses import dataclass, field
from numbers import Integral
from typing import Callable, Iterator

from engine.plan import Plan


@dataclass
class Output:
    text: str
    token_ids: list[int]              # generated ids (an end-of-turn token included when it ended the text)
    prompt_tokens: int
    prefill_s: float
    decode_ms_per_token: float        # median steady decode step (warm-up and graph capture left out)
    kv_bytes: dict[str, int]          # {"device": ..., "host": ...}, summed from the policies' tensors
    full_kv_bytes: int                # what FullKV holds for this run: prompt + max_new_tokens
    layers: list[dict]                # each layer's policy, described
    stop_reason: str                  # "eos" | "length"
    cuda_graphs: bool = False         # decode replayed a CUDA graph
    decode_steps: int = 0
    h2d_bytes: int = 0                # host -> device copies (offloading layers)
    prompt_cut: int = 0               # tokens cut from the middle of a prompt too long for the context
    plan: Plan | None = field(default=None, repr=False)  # the plan "hybrid" made for this prompt


class Stream:
    """What LLM.stream returns: iterate for text pieces as tokens come (for a batch of prompts:
    (index, piece) pairs); afterwards `.output` holds the Output (a batch: `.outputs`, in prompt order)."""

    def __init__(self, make_pieces: Callable[["Stream"], Iterator]):
        self.output: Output | None = None
        self.outputs: list[Output] = []
        self._pieces = make_pieces(self)  # a generator: nothing runs until the first piece is asked for

    def __iter__(self) -> Iterator:
        return self._pieces


def is_batch(prompt) -> bool:
    """A list of prompts (texts or token-id lists), as opposed to one prompt (a text or one id list)."""
    return isinstance(prompt, (list, tuple)) and bool(prompt) and not isinstance(prompt[0], Integral)
