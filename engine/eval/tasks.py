"""RULER-style long-context tasks, generated in code (nothing downloaded), for bench.py --suite.

Each task is a prompt of exactly n tokens that ends with a completion cue, the strings a correct
greedy continuation contains, and a scorer. Completion style, as engine/eval/haystack.py and for the
same reason: the default 135M model answers completion cues, not chat questions, at 2k-8k tokens.
    niah-number / niah-word / niah-uuid   one needle ("The special magic number for <key> is: <value>.")
                                          in repetitive filler; the value a 7-digit number, a word, a UUID
    niah-multikey     the needle and 3 distractor needles with other keys
    niah-multivalue   4 needles with the same key and different numbers; all 4 are asked for
    niah-multiquery   4 needles with 4 keys; 2 of them are asked for
    vt                variable tracking: "VAR ABCDE = 12345." then 4 hops "VAR FGHIJ = VAR ABCDE."
                      spread over the filler, plus a distractor chain; the 5 names are asked for
    cwe               common-words extraction: a numbered list where 5 words appear 30 times and the
                      rest at most 3; the 5 are asked for
Every random choice comes from random.Random(f"{name}-{seed}"): a (task, seed, length) is one prompt.
Needles sit on lines of their own at sentence boundaries (the layout the default model finds, see
haystack.py). What a policy must preserve is FullKV's answer (bench.py scores agreement with it);
the default model misses some of these tasks even with the full cache.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

from engine.eval.haystack import FILLER, contains_item

TASKS = ("niah-number", "niah-word", "niah-uuid", "niah-multikey", "niah-multivalue", "niah-multiquery", "vt", "cwe")

WORDS = ("apple", "river", "candle", "garden", "silver", "mountain", "window", "pencil", "thunder", "orange",
         "blanket", "harbor", "violin", "meadow", "lantern", "copper", "falcon", "pepper", "island", "marble",
         "feather", "tunnel", "basket", "crystal", "dolphin", "engine", "forest", "giraffe", "hammer", "jacket",
         "kettle", "ladder", "magnet", "napkin", "oyster", "pillow", "quartz", "rocket", "saddle", "teapot",
         "umbrella", "velvet", "walnut", "yogurt", "zebra", "anchor", "bridge", "cactus", "desert", "eagle",
         "fountain", "glacier", "helmet", "igloo", "jungle", "kitten", "lemon", "mirror", "needle", "olive",
         "parrot", "rabbit", "spider", "tomato", "valley", "wizard", "button", "cherry", "dragon", "mango")

NIAH_INTRO = ("Some special magic {kind}s are hidden within the following text. Make sure to memorize them. "
              "I will quiz you about the {kind}s afterwards.\n")
NEEDLE = "\nThe special magic {kind} for {key} is: {value}.\n"
VT_INTRO = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n"
CWE_INTRO = ("Below is a numbered list of words. In these words, some appear more often than others. "
             "Memorize the ones that appear most often.\n")


@dataclass
class Task:
    name: str            # one of TASKS
    ids: list[int]       # the prompt, exactly the tokens asked for (BOS included when the tokenizer adds one)
    answers: list[str]   # what a correct continuation contains
    max_new_tokens: int  # greedy tokens to generate: room for every answer

    def score(self, text: str) -> float:
        """The share of the answers found in the generated text, case-insensitively, each a whole
        item: not inside a longer number or word (answer 9844349 is not found in "98443490", which
        a degraded cache does produce), as found() treats the pass key."""
        return sum(contains_item(text, a) for a in self.answers) / len(self.answers)

    def answer_key(self, text: str) -> str:
        """What two greedy answers must share to count as the same answer: answer_items(text, n)
        with n = len(self.answers), as many items as the task asks for."""
        return answer_items(text, len(self.answers))


_MARKER = re.compile(r"^(\d{1,3}|[A-Za-z])[.)]$")  # list numbering: "A)", "1.", "12)"
_PUNCT = ".,;:!?()[]{}\"'`"


def answer_items(text: str, n: int) -> str:
    """The comparable part of a greedy answer: its first n items (words or numbers, list markers and
    surrounding punctuation dropped, lower case), joined by spaces. Formatting may differ, content
    may not. E.g. n = 1: ' 4711093.\nThe special' -> '4711093'; n = 3: '\nA) 1. gumufo\nB) 2. kenimi\n
    C) 3. selilo' and 'gumufo, kenimi, selilo.' -> 'gumufo kenimi selilo'."""
    items = []
    for word in text.replace(",", " ").split():
        if _MARKER.match(word):
            continue
        word = word.strip(_PUNCT).lower()
        if word:
            items.append(word)
        if len(items) == n:
            break
    return " ".join(items)


def make_task(name: str, tok, n_tokens: int, seed: int = 0) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    rng = random.Random(f"{name}-{seed}")
    if name == "cwe":
        return _cwe(tok, n_tokens, rng)
    if name == "vt":
        return _vt(tok, n_tokens, rng)
    return _niah(name, tok, n_tokens, rng)


# ---- building blocks -----------------------------------------------------------------------------------
def _head(tok, intro: str) -> list[int]:
    return ([tok.bos_id] if tok.add_bos and tok.bos_id is not None else []) + tok.encode(intro, bos=False)


def _in_filler(tok, n_tokens: int, head: list[int], needles: list[list[int]], question: list[int],
               rng: random.Random) -> list[int]:
    """head + filler with the needles at seeded depths (in order, at sentence ends) + question,
    exactly n_tokens long."""
    room = n_tokens - len(head) - sum(map(len, needles)) - len(question)
    if room < 8 * len(needles):
        raise ValueError(f"this task needs more than {n_tokens - room + 8 * len(needles)} tokens, "
                         f"asked for {n_tokens}")
    filler = tok.encode(FILLER, bos=False)
    hay = (filler * (room // len(filler) + 1))[:room]
    period = tok.encode(".", bos=False)[-1]
    cuts = []
    for depth in sorted(rng.uniform(0.05, 0.95) for _ in needles):
        cut = int(depth * room)
        while 0 < cut < room and hay[cut - 1] != period:  # back to the end of a sentence
            cut -= 1
        cuts.append(cut)
    out, prev = list(head), 0
    for cut, needle in zip(cuts, needles):
        out += hay[prev:cut] + needle
        prev = cut
    out += hay[prev:] + question
    assert len(out) == n_tokens
    return out


def _key(rng: random.Random, taken: set[str]) -> str:
    while True:
        key = f"{rng.choice(WORDS)}-{rng.choice(WORDS)}"
        if key not in taken and key.split("-")[0] != key.split("-")[1]:
            taken.add(key)
            return key


def _value(kind: str, rng: random.Random, taken: set[str]) -> str:
    while True:
        if kind == "number":
            v = str(rng.randint(1_000_000, 9_999_999))
        elif kind == "word":
            v = rng.choice(WORDS)
        else:  # a UUID-like string: 8-4-4-4-12 hex digits
            v = "-".join(f"{rng.getrandbits(4 * n):0{n}x}" for n in (8, 4, 4, 4, 12))
        if v not in taken:
            taken.add(v)
            return v


# ---- the tasks -------------------------------------------------------------------------------------------
def _niah(name: str, tok, n_tokens: int, rng: random.Random) -> Task:
    kind = {"niah-word": "word", "niah-uuid": "uuid"}.get(name, "number")
    keys_taken, values_taken = set(WORDS), set(WORDS)  # keys and values never collide with each other
    keys = [_key(rng, keys_taken) for _ in range({"niah-multikey": 4, "niah-multiquery": 4}.get(name, 1))]
    if kind == "word":  # a value is a word, but none of the keys' words: an answer echoing a key scores 0
        values_taken = {w for k in keys for w in k.split("-")}
    if name == "niah-multivalue":
        pairs = [(keys[0], _value(kind, rng, values_taken)) for _ in range(4)]
    else:
        pairs = [(k, _value(kind, rng, values_taken)) for k in keys]
    needles = [tok.encode(NEEDLE.format(kind=kind, key=k, value=v), bos=False) for k, v in pairs]
    order = list(range(len(needles)))
    rng.shuffle(order)  # the asked-for needle is not always the first
    needles = [needles[i] for i in order]
    if name == "niah-multiquery":
        asked = pairs[:2]
        q = (f"\nWhat are the special magic {kind}s for {asked[0][0]} and {asked[1][0]} mentioned in the provided "
             f"text? The special magic {kind}s for {asked[0][0]} and {asked[1][0]} mentioned in the provided text are")
        answers, new = [v for _, v in asked], 32
    elif name == "niah-multivalue":
        q = (f"\nWhat are all the special magic {kind}s for {keys[0]} mentioned in the provided text? The special "
             f"magic {kind}s for {keys[0]} mentioned in the provided text are")
        answers, new = [v for _, v in pairs], 48
    else:  # single and multikey: the first pair is the one asked for, the others are distractors
        q = (f"\nWhat is the special magic {kind} for {keys[0]} mentioned in the provided text? The special magic "
             f"{kind} for {keys[0]} mentioned in the provided text is")
        answers, new = [pairs[0][1]], (48 if kind == "uuid" else 16)  # hex digits cost a token each or two
    ids = _in_filler(tok, n_tokens, _head(tok, NIAH_INTRO.format(kind=kind)), needles, tok.encode(q, bos=False), rng)
    return Task(name, ids, answers, new)


def _vt(tok, n_tokens: int, rng: random.Random) -> Task:
    names: set[str] = set()

    def var() -> str:
        while True:
            v = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
            if v not in names:
                names.add(v)
                return v

    value, other = rng.randint(10000, 99999), rng.randint(10000, 99999)
    chain, decoy = [var() for _ in range(5)], [var() for _ in range(5)]
    statements = []
    for vars_, v in ((chain, value), (decoy, other)):
        statements.append([f"\nVAR {vars_[0]} = {v}.\n"] + [f"\nVAR {b} = VAR {a}.\n" for a, b in zip(vars_, vars_[1:])])
    # interleave the two chains, each in its own order (an assignment always follows its source)
    merged, a, b = [], statements[0], statements[1]
    while a or b:
        src = a if (a and (not b or rng.random() < 0.5)) else b
        merged.append(src.pop(0))
    q = (f"\nQuestion: Find all variables that are assigned the value {value} in the text above. Answer: According "
         f"to the chain(s) of variable assignment in the text above, 5 variables are assigned the value {value}, "
         "they are:")
    ids = _in_filler(tok, n_tokens, _head(tok, VT_INTRO), [tok.encode(s, bos=False) for s in merged],
                     tok.encode(q, bos=False), rng)
    return Task("vt", ids, chain, 32)


def _pseudo_word(rng: random.Random) -> str:
    """Three consonant-vowel syllables, e.g. 'kemari': endless distinct words with no meaning, so
    neither the common nor the rare ones stand out as real words."""
    return "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(3))


def _cwe(tok, n_tokens: int, rng: random.Random) -> Task:
    q = tok.encode("\nQuestion: What are the 5 most common words in the above list? Answer: The top 5 words that "
                   "appear most often in the list are:", bos=False)
    head = _head(tok, CWE_INTRO)
    room = n_tokens - len(head) - len(q)
    taken: set[str] = set()

    def fresh() -> str:
        while True:
            w = _pseudo_word(rng)
            if w not in taken:
                taken.add(w)
                return w

    common = [fresh() for _ in range(5)]
    per_entry = len(tok.encode("\n100. kemari", bos=False))
    entries = max(1, room // per_entry)
    freq = max(5, min(30, entries // 12))  # RULER: 30 each; fewer when the list is short
    pool = [w for w in common for _ in range(freq)]
    while len(pool) < entries:  # rare words, 1-3 times each
        w = fresh()
        pool += [w] * rng.randint(1, 3)
    rng.shuffle(pool)
    body: list[int] = []
    items: list[str] = []
    for w in pool + [fresh() for _ in range(entries)]:  # the estimate may be short: more rare words, once each
        piece = tok.encode(f"\n{len(items) + 1}. {w}", bos=False)
        if len(body) + len(piece) > room:
            break
        body += piece
        items.append(w)
    if min(items.count(w) for w in common) <= 3:
        raise ValueError(f"cwe needs more than {n_tokens} tokens for a list whose common words stand out")
    body += (tok.encode("\n", bos=False) * room)[:room - len(body)]  # a blank line or two closes it exactly
    ids = head + body + q
    assert len(ids) == n_tokens
    return Task("cwe", ids, common, 48)
