"""RULER-style tasks (engine/eval/tasks.py): exact lengths, seeded, answers present and intact in the
prompt, scoring with partial credit, and clear errors; no model runs here."""
import pytest

from engine.eval.tasks import TASKS, answer_items, make_task


@pytest.fixture(scope="module")
def tok(default_model):
    return default_model.tokenizer


@pytest.mark.parametrize("name", TASKS)
def test_exact_length_seeded_answers_in_prompt(tok, name):
    for n in (700, 2048, 4096):
        task = make_task(name, tok, n, seed=0)
        assert task.name == name and len(task.ids) == n and task.max_new_tokens >= 16
        start = 1 if tok.add_bos else 0  # BOS first exactly when the tokenizer adds one
        assert (task.ids[0] == tok.bos_id) == bool(start)
        text = tok.decode(task.ids)
        assert all(a in text for a in task.answers), (name, n, task.answers)
        assert not set(tok.specials.values()).intersection(task.ids[start:])  # plain text after it
    assert make_task(name, tok, 2048, seed=3).ids == make_task(name, tok, 2048, seed=3).ids
    assert make_task(name, tok, 2048, seed=3).ids != make_task(name, tok, 2048, seed=4).ids


def test_what_each_task_asks(tok):
    t = make_task("niah-multivalue", tok, 2048, 1)
    assert len(t.answers) == 4 and len(set(t.answers)) == 4
    key = tok.decode(t.ids).rsplit("magic numbers for ", 1)[1].split(" ")[0]
    assert tok.decode(t.ids).count(f"for {key} is:") == 4  # one key, four values
    t = make_task("niah-multikey", tok, 2048, 1)
    needles = [ln for ln in tok.decode(t.ids).splitlines() if ln.startswith("The special magic number for ")
               and " is: " in ln]
    assert len(needles) == 4 and len({ln.split(" is: ")[0] for ln in needles}) == 4  # 4 keys: 1 asked, 3 decoys
    t = make_task("vt", tok, 2048, 1)
    text = tok.decode(t.ids)
    assert len(t.answers) == 5 and text.count("VAR ") == 2 * 5 + 2 * 4  # two chains of 5 (4 hops each)
    t = make_task("cwe", tok, 2048, 1)
    items = [ln.split(". ", 1)[1] for ln in tok.decode(t.ids).splitlines() if ". " in ln and ln[:1].isdigit()]
    counts = {w: items.count(w) for w in set(items)}
    assert set(sorted(counts, key=counts.get, reverse=True)[:5]) == set(t.answers)
    assert min(counts[w] for w in t.answers) > max(c for w, c in counts.items() if w not in t.answers)


def test_scoring(tok):
    t = make_task("niah-multiquery", tok, 1024, 0)
    assert t.score(" " + ", ".join(t.answers) + ".") == 1.0
    assert t.score(f" {t.answers[0]} and 123.") == 0.5
    assert t.score("I do not know.") == 0.0
    w = make_task("niah-word", tok, 1024, 0)
    assert w.score(w.answers[0].upper()) == 1.0  # words case-insensitively
    # whole items only: a degraded cache's longer number or word is not the answer
    n = make_task("niah-number", tok, 1024, 0)
    key = n.answers[0]
    assert n.score(f": {key}.") == n.score(f"({key})") == 1.0
    assert n.score(f": {key}9.") == n.score(f": 1{key}") == n.score(f"x{key}") == 0.0
    assert w.score("w" + w.answers[0]) == w.score(w.answers[0] + "s") == 0.0


def test_pass_key_is_found_as_a_whole_number():
    from engine.eval.haystack import Haystack
    h = Haystack(ids=[], key="27611", depth=0.5)
    assert h.found(" 27611. Remember") and h.found("is 27611")
    assert not h.found(" 276111.") and not h.found(" 127611") and not h.found("a27611")


def test_answer_items():
    assert answer_items(" 4711093.\nThe special", 1) == "4711093"
    assert answer_items("\n\n  a   b \n c", 2) == "a b"
    assert answer_items("   ", 3) == ""
    # A list answer: every item counts, its formatting does not (the first line alone would agree
    # on "gumufo" and miss the rest).
    full = "\nA) 1. gumufo\nB) 2. kenimi\nC) 3. selilo\nD) 4. selilo"
    assert answer_items(full, 3) == "gumufo kenimi selilo" == answer_items("Gumufo, kenimi, selilo.", 3)
    assert answer_items(full, 3) != answer_items("\nA) 1. gumufo\nB) 2. keni\nC) 3. kadu", 3)
    assert answer_items(": 1360457, 1174890, 1174890, 99", 3) == "1360457 1174890 1174890"
    assert answer_items(" 47aa2c46-7622-1446-8ac2-c17d23d5cc40.\nThe", 1) == "47aa2c46-7622-1446-8ac2-c17d23d5cc40"


def test_answer_key_asks_for_every_answer(tok):
    task = make_task("cwe", tok, 600)
    assert len(task.answers) == 5
    assert task.answer_key("A) 1. a\nB) 2. b\nC) 3. c\nD) 4. d\nE) 5. e\nF) 6. f") == "a b c d e"


def test_bad_requests(tok):
    with pytest.raises(ValueError, match="unknown task 'poetry'"):
        make_task("poetry", tok, 2048)
    for name in TASKS:
        with pytest.raises(ValueError, match="tokens"):
            make_task(name, tok, 60)


def test_a_word_needles_value_is_none_of_its_keys_words(tok):
    """Task.score finds answers as substrings: a value that is a word of its own key ("island" for
    island-glacier, seed 18) scored an answer that only echoed the key as right."""
    for seed in range(40):
        t = make_task("niah-word", tok, 600, seed)
        key = tok.decode(t.ids).rsplit("magic word for ", 1)[1].split(" ")[0]
        assert t.answers[0] not in key.split("-"), (seed, key, t.answers)


def test_needles_sit_at_sentence_ends(tok):
    """Each needle goes in right after a period of the filler (a cut mid-sentence would make the
    task harder than RULER's), in seeded depth order, and the prompt is exactly as long as asked."""
    import random
    from engine.eval.tasks import _in_filler
    period = tok.encode(".", bos=False)[-1]
    head, question = tok.encode("Read this.", bos=False), tok.encode(" What was it?", bos=False)
    for seed in range(5):
        needles = [[-1, -1], [-2], [-3, -3, -3]]  # ids no tokenizer makes, to find them again
        out = _in_filler(tok, 600, head, needles, question, random.Random(seed))
        starts = [out.index(-i) for i in (1, 2, 3)]
        assert len(out) == 600 and starts == sorted(starts)
        assert all(out[s - 1] == period for s in starts), (seed, [tok.decode(out[s - 8:s]) for s in starts])


def test_variable_tracking_keeps_each_chain_in_order(tok):
    """vt interleaves two chains at random; whatever the seed, each assignment comes after the one it
    copies (VAR b = VAR a after VAR a's own line), the asked chain starts from the asked value, and
    the chains are mixed rather than one after the other."""
    interleaved = 0
    for seed in range(12):
        t = make_task("vt", tok, 1024, seed)
        lines = [ln for ln in tok.decode(t.ids).splitlines() if ln.startswith("VAR ")]
        assert len(lines) == 10, seed
        first = {ln.split(" ")[1]: i for i, ln in enumerate(lines)}  # the line that assigns each variable
        interleaved += max(first[x] for x in t.answers) > 4  # a decoy line among the asked chain's
        for a, b in zip(t.answers, t.answers[1:]):
            assert lines[first[b]] == f"VAR {b} = VAR {a}." and first[a] < first[b], (seed, lines)
        value = lines[first[t.answers[0]]].split(" = ")[1].rstrip(".")
        assert value.isdigit() and f"assigned the value {value} " in tok.decode(t.ids)
    assert interleaved >= 6  # the chains are mixed, not one after the other (11 of these 12 seeds)


def test_common_word_list_fills_the_prompt(tok):
    """cwe: a list as long as the prompt allows (what is left before the question is less than one
    more entry), and at 4096 tokens each of the 5 common words 30 times, as RULER has it."""
    for n in (1024, 4096):
        t = make_task("cwe", tok, n, 0)
        text = tok.decode(t.ids)
        tail = text.split("\nQuestion:")[0]
        items = [ln.split(". ", 1)[1] for ln in tail.splitlines() if ". " in ln and ln[:1].isdigit()]
        assert len(tail) - len(tail.rstrip("\n")) < 8, n  # the blank lines that close it exactly
        if n == 4096:
            assert [items.count(w) for w in t.answers] == [30] * 5


def test_pass_key_prompt(tok):
    """engine/eval/haystack.py: exact length, one BOS, a seeded five-digit key (or the one given) in
    one needle placed after a whole sentence near the asked depth, the ends included; the shortest
    prompt the error names is accepted, and bad input is refused in one line."""
    import re

    from engine.eval.haystack import NEEDLE, QUESTION, make_haystack
    h = make_haystack(tok, 1000, depth=0.3, seed=5)
    start = 1 if tok.add_bos else 0
    assert len(h.ids) == 1000 and (h.ids[0] == tok.bos_id) == bool(start)
    assert not set(tok.specials.values()).intersection(h.ids[start:])
    text = tok.decode(h.ids[start:])
    assert re.fullmatch(r"\d{5}", h.key) and text.count(NEEDLE.format(key=h.key)) == 1
    assert text.split(NEEDLE.format(key=h.key))[0].endswith(".") and abs(h.depth - 0.3) < 0.05
    assert make_haystack(tok, 1000, depth=0.3, seed=5).ids == h.ids and make_haystack(tok, 1000, seed=6).key != h.key
    assert make_haystack(tok, 1000, key="31337").key == "31337"
    first, last = make_haystack(tok, 777, depth=0.0), make_haystack(tok, 777, depth=1.0)
    assert first.depth == 0.0 and tok.decode(first.ids).split(NEEDLE.format(key=first.key))[0].endswith("\n\n")
    assert last.depth == 1.0 and tok.decode(last.ids).endswith(NEEDLE.format(key=last.key) + QUESTION)
    with pytest.raises(ValueError, match="needs at least") as err:
        make_haystack(tok, 10)
    shortest = int(re.search(r"at least (\d+)", str(err.value)).group(1))
    assert len(make_haystack(tok, shortest).ids) == shortest
    with pytest.raises(ValueError, match="needs at least"):
        make_haystack(tok, shortest - 1)
    for depth in (-0.1, 1.5):
        with pytest.raises(ValueError, match="depth must be in"):
            make_haystack(tok, 1000, depth=depth)


def test_pass_key_prompt_with_a_tokenizer_that_adds_bos():
    """Llama-3.1's tokenizer adds BOS (the default model's does not): one BOS, first, and the needle
    still after a period. One token per character stands in for it."""
    from engine.eval.haystack import make_haystack

    class CharTokenizer:
        add_bos, bos_id = True, 1

        def encode(self, text, bos=True):
            return [self.bos_id] * bos + [ord(c) + 2 for c in text]

    h = make_haystack(CharTokenizer(), 3000, depth=0.5)
    needle = CharTokenizer().encode(f"\nThe pass key is {h.key}.", bos=False)
    at = next(i for i in range(len(h.ids)) if h.ids[i:i + len(needle)] == needle)
    assert len(h.ids) == 3000 and h.ids.count(1) == 1 and h.ids[0] == 1
    assert h.ids[at - 1] == ord(".") + 2 and abs(h.depth - 0.5) < 0.05
