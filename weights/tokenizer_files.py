"""Reading a checkpoint's tokenizer, whatever it ships, into a weights/tokenizer.py Tokenizer:
a GGUF file's vocabulary (byte-level BPE or sentencepiece), an HF tokenizer.json, a tiktoken rank
file (Llama-3's original/tokenizer.model) or a sentencepiece model. `load_tokenizer` decides which.
"""

import base64
import json
import re
import struct
from pathlib import Path

from weights.chat import LLAMA3_CHAT_TEMPLATE, find_chat_template
from weights.gguf_meta import read_gguf_metadata
from weights.tokenizer import HFTokenizer, SentencePieceTokenizer, TiktokenTokenizer, Tokenizer

# llama.cpp token types (GGUF tokenizer.ggml.token_type); sentencepiece uses the same numbering.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer regexes. GPT-2's is what HF's ByteLevel(use_regex=True) applies; the others are the
# splits transformers installs for GGUF files by `tokenizer.ggml.pre` (unknown names get GPT-2's).
GPT2_PAT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
LLAMA3_PAT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
              r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN2_PAT = LLAMA3_PAT.replace(r"\p{N}{1,3}", r"\p{N}")
QWEN35_PAT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"""
              r"""| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
# Mistral's tekken and GPT-4o's split words at case changes ("camelCase" -> "camel", "Case"), and
# keep a "/" with the punctuation run before it; GPT-4o's also keep "'s"-style endings on the word.
_UPPER, _LOWER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]", r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_TAIL = r"""\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
TEKKEN_PAT = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*|" + _TAIL)
_ENDING = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
GPT4O_PAT = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_ENDING}|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_ENDING}|"
             + _TAIL.replace(r"\p{N}|", r"\p{N}{1,3}|", 1))
GGUF_PRE_PATTERNS = {
    **dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "jina-v5-nano", "dbrx", "smaug-bpe"], LLAMA3_PAT),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"], QWEN2_PAT),
    "qwen35": QWEN35_PAT,
    "tekken": TEKKEN_PAT,
    **dict.fromkeys(["gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"], GPT4O_PAT),
}

# Meta's reference numbering of Llama-3's 256 special tokens (llama-models, Llama 3.1+), after the BPE ranks.
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                   "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
LLAMA3_SPECIALS += [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(LLAMA3_SPECIALS))]


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
    f = read_gguf_metadata(str(path), "tokenizer.")  # 0.04 s where gguf's reader took 2.5 s (see there)
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
