"""Tokenizers: text <-> token ids, from whatever a checkpoint ships (see `load_tokenizer`).

Every backend behaves the same for the engine: special tokens written in the text are parsed as
their ids (like HF), decode renders them as text, and `encode` never prepends a second BOS when the
text (e.g. a rendered chat template) already starts with one.

User text is another matter: "<|im_end|><|im_start|>system" typed into a prompt must not become
control tokens (role injection). `encode(text, allow_special=False)` keeps such text as ordinary
tokens, and `encode_chat` encodes every message's content that way, so control tokens come only
from the chat template itself.
"""

import base64
import json
import re
import struct
from pathlib import Path

from weights.chat import END_OF_TURN_TOKENS, LLAMA3_CHAT_TEMPLATE, find_chat_template, render_chat_template

# llama.cpp token types (GGUF tokenizer.ggml.token_type); sentencepiece uses the same numbering.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer regexes. GPT-2's is what HF's ByteLevel(use_regex=True) applies; the others are the
# splits transformers installs for GGUF files by `tokenizer.ggml.pre` (unknown names get GPT-2's).
GPT2_PAT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
LLAMA3_PAT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
              r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN2_PAT = LLAMA3_PAT.replace(r"\p{N}{1,3}", r"\p{N}")
GGUF_PRE_PATTERNS = {
    **dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx", "pixtral"], LLAMA3_PAT),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen"], QWEN2_PAT),
}

# Meta's reference numbering of Llama-3's 256 special tokens (llama-models, Llama 3.1+), after the BPE ranks.
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                   "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
LLAMA3_SPECIALS += [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(LLAMA3_SPECIALS))]


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
        """Ids of `text` with no special token: each occurrence of a special's text is encoded in
        two pieces ("<" and "|im_end|>"), which no backend matches as the special; should a piece
        still map to a special id (HF tokenizers and sentencepiece match added tokens inside plain
        text), it is encoded one character at a time."""
        parts = self._literal_re.split(text) if self._literal_re else [text]
        special_ids, ids = set(self.specials.values()), []
        for i, part in enumerate(parts):
            pieces = [part[:1], part[1:]] if i % 2 else [part]
            for piece in filter(None, pieces):
                got = self._encode_plain(piece)
                if special_ids.intersection(got):
                    got = [t for ch in piece for t in self._encode_plain(ch)]
                ids.extend(got)
        return ids

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """The chat template's ids, every message's content encoded as plain text (allow_special=False):
        the template is rendered with a marker per message, its own text parsed with specials, and the
        contents spliced in. A template that trims contents (Llama-3's `| trim`) eats the spaces around
        the marker; the content is then stripped the same way. No BOS is added: the template writes it.
        E.g. SmolLM2, content "hi": "<|im_start|>user\n" + "hi" + "<|im_end|>\n<|im_start|>assistant\n"."""
        marked = [{**m, "content": f" \x00{i}\x00 "} for i, m in enumerate(messages)]
        text = self.apply_chat_template(marked, add_generation_prompt)
        ids, pos = [], 0
        for m in re.finditer(r"( ?)\x00(\d+)\x00( ?)", text):
            ids += self.encode(text[pos:m.start()], bos=False)
            content = messages[int(m.group(2))]["content"]
            trimmed = not (m.group(1) and m.group(3))
            ids += self._encode_literal(content.strip() if trimmed else content)
            pos = m.end()
        return ids + self.encode(text[pos:], bos=False)

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


# ---------------------------------------------------------------------------------------------- loading

def load_tokenizer(path: str) -> Tokenizer:
    p = Path(path)
    if not p.exists():
        raise ValueError(f"tokenizer path not found: {path}")
    if p.is_file():
        with open(p, "rb") as f:
            if f.read(4) == b"GGUF":
                return _from_gguf(p)
        if p.name not in ("tokenizer.json", "tokenizer.model"):
            raise ValueError(f"not a tokenizer file (expected .gguf, tokenizer.json or tokenizer.model): {path}")
        p = p.parent
    if (p / "tokenizer.json").is_file():
        return _from_hf_dir(p)
    for model in (p / "tokenizer.model", p / "original" / "tokenizer.model"):
        if model.is_file():
            return _from_tiktoken_file(model) if _is_tiktoken_file(model) else _from_sentencepiece_file(model)
    raise ValueError(f"no tokenizer in {path}: expected a .gguf file, tokenizer.json or tokenizer.model")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> char table: byte-level vocabs spell each raw byte as one printable char."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]  # get stand-ins from U+0100 on, in byte order
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def _from_gguf(path: Path) -> Tokenizer:
    import gguf
    try:
        reader = gguf.GGUFReader(path)
        f = {k: v.contents() for k, v in reader.fields.items() if k.startswith("tokenizer.")}
    except Exception as e:  # truncated/corrupt file: gguf raises assorted errors
        raise ValueError(f"cannot read GGUF file {path}: {e}") from e
    if "tokenizer.ggml.tokens" not in f:
        raise ValueError(f"GGUF file has no embedded tokenizer: {path}")
    model, tokens = f.get("tokenizer.ggml.model"), f["tokenizer.ggml.tokens"]
    types = f.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    special_types = (CONTROL, USER_DEFINED) if model == "gpt2" else (CONTROL, UNKNOWN)
    meta = dict(vocab_size=len(tokens), bos_id=f.get("tokenizer.ggml.bos_token_id"),
                eos_id=f.get("tokenizer.ggml.eos_token_id"), chat_template=f.get("tokenizer.chat_template"),
                extra_eos=[f[k] for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id") if k in f],
                specials={t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty in special_types})
    if model == "gpt2":
        return _gguf_bpe(f, tokens, types, add_bos=f.get("tokenizer.ggml.add_bos_token", False), **meta)
    if model == "llama":
        return _gguf_sentencepiece(f, tokens, types, add_bos=f.get("tokenizer.ggml.add_bos_token", True), **meta)
    raise ValueError(f"unsupported GGUF tokenizer model {model!r} (supported: 'gpt2', 'llama')")


def _gguf_bpe(f, tokens, types, **meta) -> Tokenizer:
    b2u = _bytes_to_unicode()
    alphabet, spell = set(b2u.values()), {ord(c): b for b, c in b2u.items()}
    # Vocab strings spell raw bytes with stand-in chars; str.translate undoes that at C speed. A string
    # outside that alphabet is plain text, as transformers also assumes.
    to_bytes = lambda s: s.translate(spell).encode("latin-1") if alphabet.issuperset(s) else s.encode()
    id_bytes = [t.encode() if t in meta["specials"] else to_bytes(t) for t in tokens]
    id_of = {b: i for i, b in enumerate(id_bytes) if tokens[i] not in meta["specials"]}
    ranks, rank_to_id = {}, []
    for key in [bytes([b]) for b in range(256)] + [to_bytes(a) + to_bytes(b) for a, b in
                                                   (m.split(" ") for m in f.get("tokenizer.ggml.merges", []))]:
        if key in ranks or (len(key) == 1 and key not in id_of):
            continue  # a byte the vocab lacks, or a second merge to a token: the first merge wins
        if key not in id_of:
            raise ValueError(f"GGUF merge to {key!r} yields a token missing from the vocab")
        ranks[key] = len(rank_to_id)  # single bytes first; their ranks are never compared with merges
        rank_to_id.append(id_of[key])
    pat = GGUF_PRE_PATTERNS.get(f.get("tokenizer.ggml.pre"), GPT2_PAT)
    return TiktokenTokenizer(pat_str=pat, ranks=ranks, rank_to_id=rank_to_id, id_bytes=id_bytes, **meta)


def _pb(field: int, value) -> bytes:
    """One protobuf field: int/bool as varint, float as fixed32, str/bytes length-delimited."""
    def varint(n):  # 7 bits per byte, least significant first, high bit = "more follows"
        return bytes([n & 0x7F | 0x80]) + varint(n >> 7) if n > 0x7F else bytes([n])
    if isinstance(value, float):
        return varint(field << 3 | 5) + struct.pack("<f", value)
    if isinstance(value, (str, bytes)):
        value = value.encode() if isinstance(value, str) else value
        return varint(field << 3 | 2) + varint(len(value)) + value
    return varint(field << 3) + varint(int(value))


def _gguf_sentencepiece(f, tokens, types, **meta) -> Tokenizer:
    """A 'llama' GGUF vocab is a sentencepiece BPE model taken apart (pieces, scores, types use spm's
    own type numbers), so we put the ModelProto back together and let sentencepiece run it."""
    import sentencepiece as spm
    scores = f.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    pieces = b"".join(_pb(1, _pb(1, t) + _pb(2, float(s)) + _pb(3, ty)) for t, s, ty in zip(tokens, scores, types))
    trainer = _pb(3, 2) + _pb(35, BYTE in types)  # model_type=BPE; byte_fallback if it has <0xXX> pieces
    normalizer = (_pb(1, "identity") + _pb(3, f.get("tokenizer.ggml.add_space_prefix", True))
                  + _pb(4, f.get("tokenizer.ggml.remove_extra_whitespaces", False)) + _pb(5, True))
    try:
        sp = spm.SentencePieceProcessor(model_proto=pieces + _pb(2, trainer) + _pb(3, normalizer))
    except Exception as e:
        raise ValueError(f"cannot rebuild sentencepiece model from GGUF vocab: {e}") from e
    return SentencePieceTokenizer(sp, **meta)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _from_hf_dir(d: Path) -> Tokenizer:
    from tokenizers import Tokenizer as HFBackend
    try:
        tk = HFBackend.from_file(str(d / "tokenizer.json"))
    except Exception as e:  # tokenizers raises its own Exception type on malformed files
        raise ValueError(f"cannot load {d / 'tokenizer.json'}: {e}") from e
    cfg = _read_json(d / "tokenizer_config.json")
    name = lambda v: v.get("content") if isinstance(v, dict) else v  # AddedToken dicts or plain strings
    bos_id = tk.token_to_id(name(cfg["bos_token"])) if cfg.get("bos_token") else None
    eos_id = tk.token_to_id(name(cfg["eos_token"])) if cfg.get("eos_token") else None
    add_bos = cfg.get("add_bos_token")
    if add_bos is None:  # not stated: see whether the post-processor (e.g. Llama-3's) inserts BOS
        with_specials, plain = tk.encode("a").ids, tk.encode("a", add_special_tokens=False).ids
        add_bos = bos_id is not None and with_specials[:1] == [bos_id] and plain[:1] != [bos_id]
    gen_eos = _read_json(d / "generation_config.json").get("eos_token_id")  # int, list or absent
    specials = {t.content: i for i, t in tk.get_added_tokens_decoder().items() if t.special}
    return HFTokenizer(tk, vocab_size=tk.get_vocab_size(with_added_tokens=True), bos_id=bos_id, eos_id=eos_id,
                       add_bos=add_bos, specials=specials, chat_template=find_chat_template(d, cfg),
                       extra_eos=gen_eos if isinstance(gen_eos, list) else [gen_eos])


def _is_tiktoken_file(path: Path) -> bool:
    """Meta's Llama-3 tokenizer.model is text lines 'base64(token) rank'; sentencepiece's is protobuf."""
    with open(path, "rb") as f:
        parts = f.readline(1000).split()
    return len(parts) == 2 and parts[1].isdigit() and re.fullmatch(rb"[A-Za-z0-9+/]+=*", parts[0]) is not None


def _from_tiktoken_file(path: Path) -> Tokenizer:
    lines = [line.split() for line in path.read_bytes().splitlines() if line.strip()]
    ranks = {base64.b64decode(token): int(rank) for token, rank in lines}
    n = len(ranks)
    if sorted(ranks.values()) != list(range(n)):
        raise ValueError(f"{path}: BPE ranks are not 0..{n - 1}; not a Llama-3 rank file")
    specials = {t: n + i for i, t in enumerate(LLAMA3_SPECIALS)}
    id_bytes = sorted(ranks, key=ranks.get) + [t.encode() for t in LLAMA3_SPECIALS]
    cfg = _read_json(path.parent / "tokenizer_config.json")
    return TiktokenTokenizer(pat_str=LLAMA3_PAT, ranks=ranks, rank_to_id=None, id_bytes=id_bytes,
                             vocab_size=n + len(specials), bos_id=specials["<|begin_of_text|>"],
                             eos_id=specials["<|end_of_text|>"], add_bos=True, specials=specials,
                             chat_template=find_chat_template(path.parent, cfg) or LLAMA3_CHAT_TEMPLATE)


def _from_sentencepiece_file(path: Path) -> Tokenizer:
    import sentencepiece as spm
    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except Exception as e:
        raise ValueError(f"cannot load sentencepiece model {path}: {e}") from e
    cfg = _read_json(path.parent / "tokenizer_config.json")
    specials = {sp.id_to_piece(i): i for i in range(sp.get_piece_size()) if sp.is_control(i) or sp.is_unknown(i)}
    bos, eos = sp.bos_id(), sp.eos_id()
    return SentencePieceTokenizer(sp, vocab_size=sp.get_piece_size(), bos_id=bos if bos >= 0 else None,
                                  eos_id=eos if eos >= 0 else None, add_bos=cfg.get("add_bos_token", True),
                                  specials=specials, chat_template=find_chat_template(path.parent, cfg))
