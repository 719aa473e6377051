"""Streaming detokenization: text pieces as token ids arrive, for generate.py's and the API's stream."""
from __future__ import annotations

from weights.tokenizer import Tokenizer


class StreamDecoder:
    """Incremental detokenizer. Decoding token by token is wrong twice over: a multi-byte character can
    span tokens, and sentencepiece drops a leading space at the start of each decode call. So we decode
    a window starting one chunk back, emit what it adds beyond that chunk, and hold output while it ends
    in U+FFFD (an incomplete UTF-8 sequence) until a later token completes it."""

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self.ids: list[int] = []
        self.prefix, self.read = 0, 0  # window start (first id of the last chunk); ids emitted so far

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        return self._emit(final=False)

    def flush(self) -> str:
        text = self._emit(final=True)
        self.ids, self.prefix, self.read = [], 0, 0
        return text

    def _emit(self, final: bool) -> str:
        done = self.tok.decode(self.ids[self.prefix:self.read])
        text = self.tok.decode(self.ids[self.prefix:])
        if len(text) <= len(done) or (text.endswith("\ufffd") and not final):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(done):]
