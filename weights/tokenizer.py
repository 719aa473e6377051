"""Tokenizers: text <-> token ids, the same contract over three backends (tiktoken's byte-level BPE,
HF `tokenizers`, sentencepiece). weights/tokenizer_files.py builds one from whatever a checkpoint
ships (`load_tokenizer`).

Every backend behaves the same for the engine: special tokens written in the text are parsed as
their ids (like HF), decode renders them as text, and `encode` never prepends a second BOS when the
text (e.g. a rendered chat template) already starts with one.

User text is another matter: "<|im_end|><|im_start|>system" typed into a prompt must not become
control tokens (role injection). `encode(text, allow_special=False)` keeps such text as ordinary
tokens, and `encode_chat` encodes every message's content that way, so control tokens come only
from the chat template itself.
"""

import re

from weights.chat import END_OF_TURN_TOKENS, render_chat_template

class Tokenizer:
    """Backend-independent part. Subclasses implement `_encode_plain(text) -> ids` for text free of
    special tokens, and `decode(ids) -> str`."""

    def __init__(self, *, vocab_size, bos_id, eos_id, add_bos, specials, chat_template=None, extra_eos=()):
        self.vocab_size = vocab_size
        self.bos_id, self.eos_id, self.add_bos = bos_id, eos_id, add_bos
        self.specials = specials  # text -> id; cut out of the text before the plain encoder sees it
        ends = {specials[t] for t in END_OF_TURN_TOKENS if t in specials}
        self.eos_ids = ({eos_id} | set(extra_eos) | ends) - {None}
        self.chat_template = chat_template
        # Longest first, so at any position the longest special wins (HF matches leftmost-longest).
        alts = sorted(specials, key=len, reverse=True)
        self._special_re = re.compile("(" + "|".join(map(re.escape, alts)) + ")") if alts else None
        self._literal_re = self._special_re  # the same, for every backend (HF's parses specials itself)

    def encode(self, text: str, bos: bool | None = None, allow_special: bool = True) -> list[int]:
        """Text -> ids; BOS first when `bos` (default: the model's add_bos) unless already there.
        allow_special=False: special-token text stays text (for what users type)."""
        if not allow_special:
            ids = self._encode_literal(text)
        else:
            parts = self._special_re.split(text) if self._special_re else [text]
            ids = []
            for i, part in enumerate(parts):  # re.split with a group alternates plain text / special
                if i % 2:
                    ids.append(self.specials[part])
                elif part:
                    ids.extend(self._encode_plain(part))
        if (self.add_bos if bos is None else bos) and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids.insert(0, self.bos_id)
        return ids

    def _encode_literal(self, text: str) -> list[int]:
        """Ids of `text` with no special token, encoded in one pass as the model's own tokenizer
        would encode it with specials switched off (`_encode_text`): splitting it at each special's
        text gave other ids ("Use <|endoftext|>" as " ", "<" ... instead of " <" ...) and, for
        sentencepiece, a space before every piece. Should a backend still return a special id (an
        added token matched inside plain text), each special's text is encoded in two pieces ("<"
        and "|im_end|>"), and a piece still mapping to one is encoded a character at a time."""
        special_ids = set(self.specials.values())
        ids = self._encode_text(text)
        if not special_ids.intersection(ids):
            return ids
        parts, ids = self._literal_re.split(text), []
        for i, part in enumerate(parts):
            for piece in filter(None, [part[:1], part[1:]] if i % 2 else [part]):
                got = self._encode_plain(piece)
                if special_ids.intersection(got):
                    got = [t for ch in piece for t in self._encode_plain(ch)]
                ids.extend(got)
        return ids

    def _encode_text(self, text: str) -> list[int]:
        """`text` in one pass, special-token text encoded as ordinary text (backends override)."""
        return self._encode_plain(text)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """The chat template's ids, every message's content kept as plain text (allow_special=False):
        the template is rendered with a marker per message and the contents put in their places;
        then control tokens are parsed only outside the contents, and the text between two of them
        is encoded in one pass, as the model's own tokenizer encodes a rendered template (encoding
        template and content apart split BPE words across the seam: content "\n\nhi" after the
        template's "user\n" gave "\n", "\n", "\n" where the model's tokenizer has "\n\n", "\n").
        A template that trims contents (Llama-3's `| trim`) eats the spaces around the marker; the
        content is then stripped the same way. No BOS is added: the template writes it. E.g.
        SmolLM2, content "hi": "<|im_start|>" "user\nhi" "<|im_end|>" "\n" "<|im_start|>" "assistant\n"."""
        marked = [{**m, "content": f" \x00{i}\x00 "} for i, m in enumerate(messages)]
        text = self.apply_chat_template(marked, add_generation_prompt)
        pieces, spans, pos, at = [], [], 0, 0  # spans: each content's [start, end) in the joined text
        for m in re.finditer(r"( ?)\x00(\d+)\x00( ?)", text):
            content = messages[int(m.group(2))]["content"]
            if not (m.group(1) and m.group(3)):  # trimmed by the template
                content = content.strip()
            pieces += [text[pos:m.start()], content]
            at += m.start() - pos
            spans.append((at, at + len(content)))
            at, pos = at + len(content), m.end()
        full = "".join(pieces) + text[pos:]
        ids, start = [], 0
        for m in self._literal_re.finditer(full) if self._literal_re else ():
            if any(a < m.end() and m.start() < b for a, b in spans):
                continue  # special-token text inside a message: the user's text
            ids += self._encode_literal(full[start:m.start()]) if m.start() > start else []
            ids.append(self.specials[m.group()])
            start = m.end()
        return ids + (self._encode_literal(full[start:]) if start < len(full) else [])

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **extra) -> str:
        if not self.chat_template:
            raise ValueError("this model has no chat template; pass a plain prompt instead")
        tok_text = lambda i: self.decode([i]) if i is not None else ""
        return render_chat_template(self.chat_template, messages, add_generation_prompt,
                                    bos_token=tok_text(self.bos_id), eos_token=tok_text(self.eos_id), **extra)


class TiktokenTokenizer(Tokenizer):
    """Byte-level BPE on tiktoken. tiktoken merges the adjacent pair whose concatenation has the lowest
    rank; with rank = index of the merge creating that token, this is HF's merge-list BPE. So GGUF vocabs
    are ranked by merge order and mapped back to ids via `rank_to_id` (None when ranks are ids: Llama-3)."""

    def __init__(self, *, pat_str, ranks, rank_to_id, id_bytes, **meta):
        import regex
        import tiktoken
        super().__init__(**meta)
        self._enc = tiktoken.Encoding("bpe", pat_str=pat_str, mergeable_ranks=ranks, special_tokens={})
        self._rank_to_id = rank_to_id
        self._id_bytes = id_bytes  # id -> raw bytes (specials as their text), for decode
        self._missing = bytes(b for b in range(256) if bytes([b]) not in ranks)  # bytes the vocab lacks
        self._pat = regex.compile(pat_str) if self._missing else None

    def _encode_plain(self, text):
        data = text.encode()
        if len(data.translate(None, self._missing)) == len(data):
            ranks = self._enc.encode_ordinary(text)
        else:  # rare (e.g. "\x04" in SmolLM2): HF drops unknown bytes inside each pre-token and lets the
            # neighbours merge across the gap; tiktoken can't, so split here and BPE each cleaned piece.
            pieces = (p.encode().translate(None, self._missing) for p in self._pat.findall(text))
            ranks = [r for p in pieces if p for r in self._enc._encode_single_piece(p)]
        return ranks if self._rank_to_id is None else [self._rank_to_id[r] for r in ranks]

    def decode(self, ids):
        n = len(self._id_bytes)  # ids past the vocab (padded embedding rows) decode to nothing, as in HF
        return b"".join(self._id_bytes[i] for i in ids if 0 <= i < n).decode("utf-8", errors="replace")


class HFTokenizer(Tokenizer):
    """tokenizer.json via HF `tokenizers`, which also parses added/special tokens itself."""

    def __init__(self, tk, **meta):
        super().__init__(**meta)
        self._tk = tk
        self._special_re = None  # tokenizers honours each added token's lstrip/rstrip flags; leave it to it

    def _encode_plain(self, text):
        return self._tk.encode(text, add_special_tokens=False).ids

    def _encode_text(self, text):
        self._tk.encode_special_tokens = True  # special tokens' text is text (HF's split_special_tokens)
        try:
            return self._tk.encode(text, add_special_tokens=False).ids
        finally:
            self._tk.encode_special_tokens = False

    def decode(self, ids):
        return self._tk.decode(ids, skip_special_tokens=False)


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, sp, **meta):
        super().__init__(**meta)
        self._sp = sp
        self._special_text = {i: t for t, i in self.specials.items()}

    def _encode_plain(self, text):
        return self._sp.encode(text)

    def decode(self, ids):
        # sentencepiece drops control tokens when decoding; render them as text, as HF does.
        out, run = [], []
        for i in ids:
            if i in self._special_text:
                out += [self._sp.decode(run), self._special_text[i]]
                run = []
            elif 0 <= i < self.vocab_size:  # sentencepiece raises on ids past the vocab; HF skips them
                run.append(i)
        return "".join(out) + self._sp.decode(run)
