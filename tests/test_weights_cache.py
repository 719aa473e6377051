"""The GGUF import cache repairs itself: a damaged entry (cut-short weights, no or broken config)
is found on open and imported again with a note; temporary directories left by killed imports are
removed, those of running ones kept. The import itself is replaced by a small fake writer here (the
real one is exercised by the default-model tests), so only the cache logic runs."""
import json
import os
import weakref

import pytest
import torch
from safetensors.torch import save_file

import weights.gguf_import as gi
from weights.safetensors_write import write_safetensors


def write_entry(directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    save_file({"a": torch.arange(100, dtype=torch.float32), "b": torch.ones(3, 5)},
              os.path.join(directory, "model.safetensors"))
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump({"model_type": "llama"}, f)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache, a fake .gguf file, and a fake import that counts its calls."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF fake")
    calls = []

    def fake_write(path, out_dir, name, dtype):
        calls.append(out_dir)
        write_entry(out_dir)
        gi._sync(out_dir)
    monkeypatch.setattr(gi, "_write_import", fake_write)
    return str(gguf), calls


def test_entry_problem_finds_every_kind_of_damage(tmp_path):
    good = str(tmp_path / "good")
    write_entry(good)
    assert gi.entry_problem(good) is None
    cases = {
        "truncated": lambda d: open(os.path.join(d, "model.safetensors"), "r+b").truncate(300),
        "longer": lambda d: open(os.path.join(d, "model.safetensors"), "ab").write(b"xx"),
        "no config": lambda d: os.remove(os.path.join(d, "config.json")),
        "bad config": lambda d: open(os.path.join(d, "config.json"), "w").write("{"),
        "no weights": lambda d: os.remove(os.path.join(d, "model.safetensors")),
        "garbage header": lambda d: open(os.path.join(d, "model.safetensors"), "wb").write(b"\x05" * 64),
        "empty": lambda d: open(os.path.join(d, "model.safetensors"), "wb").close(),
    }
    for name, damage in cases.items():
        d = str(tmp_path / name.replace(" ", "_"))
        write_entry(d)
        damage(d)
        assert gi.entry_problem(d), name


def test_a_good_entry_is_reused(cache):
    gguf, calls = cache
    first = gi.import_gguf(gguf, log=lambda _: None)
    assert gi.import_gguf(gguf, log=lambda _: None) == first and len(calls) == 1


@pytest.mark.parametrize("damage", ["truncate", "no_config"])
def test_a_damaged_entry_is_imported_again_with_a_note(cache, damage):
    gguf, calls = cache
    entry = gi.import_gguf(gguf, log=lambda _: None)
    if damage == "truncate":  # a full disk or a killed copy
        with open(os.path.join(entry, "model.safetensors"), "r+b") as f:
            f.truncate(200)
    else:  # a folder without config.json used to block every later import ("Directory not empty")
        os.remove(os.path.join(entry, "config.json"))
    notes = []
    assert gi.import_gguf(gguf, log=notes.append) == entry
    assert len(calls) == 2 and gi.entry_problem(entry) is None
    assert any("damaged" in n and "importing again" in n for n in notes), notes


def test_temporary_dirs_of_dead_imports_are_removed(cache):
    gguf, _ = cache
    root = os.path.join(gi.cache_root(), "gguf")
    os.makedirs(root)
    dead, alive, legacy = (os.path.join(root, n) for n in
                           (".importing-999999999-abc", f".importing-{os.getpid()}-def", ".importing-xyz"))
    for d in (dead, alive, legacy):
        os.makedirs(d)
    os.utime(legacy, (0, 0))  # an old unnamed one, from before names carried the pid
    notes = []
    gi.import_gguf(gguf, log=notes.append)
    assert not os.path.exists(dead) and not os.path.exists(legacy)
    assert os.path.exists(alive)  # this process counts as running
    assert sum("did not finish" in n for n in notes) == 2
    leftovers = [n for n in os.listdir(root) if n.startswith(".importing-")]
    assert leftovers == [os.path.basename(alive)]  # the import's own temporary dir was renamed away


def test_two_processes_importing_at_once(cache, monkeypatch):
    """Another process finishes the same import first (its rename lands before ours): its entry is
    used and ours removed; if what it left is damaged, the import fails rather than use it."""
    gguf, calls = cache
    real_write = gi._write_import

    def other_process_first(path, out_dir, name, dtype):
        real_write(path, out_dir, name, dtype)
        write_entry(final)  # what a faster process renamed into place meanwhile
    final = gi._entries(gguf)[1][torch.float32]
    monkeypatch.setattr(gi, "_write_import", other_process_first)
    assert gi.import_gguf(gguf, log=lambda _: None) == final and gi.entry_problem(final) is None
    root = os.path.dirname(final)
    assert os.listdir(root) == [os.path.basename(final)]  # our temporary copy removed

    def other_process_damaged(path, out_dir, name, dtype):
        other_process_first(path, out_dir, name, dtype)
        os.remove(os.path.join(final, "config.json"))
    os.remove(os.path.join(final, "config.json"))  # damaged: the next import starts afresh
    monkeypatch.setattr(gi, "_write_import", other_process_damaged)
    with pytest.raises(OSError):
        gi.import_gguf(gguf, log=lambda _: None)
    assert [n for n in os.listdir(root) if n.startswith(".importing-")] == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_streamed_safetensors_read_back_and_make_one_tensor_at_a_time(tmp_path, dtype):
    """The import writes its file tensor by tensor (an 8B model's float32 weights, gathered first,
    were 32 GB of memory): safetensors reads it back exactly, and each tensor is made only after
    the one before it has been written."""
    from safetensors.torch import load_file
    g = torch.Generator().manual_seed(0)
    want = {"w": torch.randn(3, 5, generator=g), "norm": torch.randn(7, generator=g), "e": torch.randn(2, 3, 4, generator=g)}
    path, alive, seen = str(tmp_path / "m.safetensors"), set(), []

    def make(name):
        seen.append(len(alive))  # tensors made before and still held when this one is made
        t = want[name].clone()
        alive.add(name)
        weakref.finalize(t, alive.discard, name)
        return t
    write_safetensors(path, [(k, tuple(v.shape), lambda k=k: make(k)) for k, v in want.items()], dtype)
    got = load_file(path)
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].dtype == dtype and torch.equal(got[k], v.to(dtype))
    assert seen == [0, 0, 0]
    assert gi.entry_problem(str(tmp_path)) is not None  # no config.json: only the weights were written
    with pytest.raises(ValueError, match="made \\(3, 5\\), the header says \\(5, 3\\)"):
        write_safetensors(path, [("w", (5, 3), lambda: want["w"])], dtype)
