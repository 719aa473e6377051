"""weights/gguf_meta.py: our GGUF header reader gives what the gguf package's reader gives (every
value type, both byte orders, the default model's file), and a damaged file is one ValueError."""
import pytest

from weights.gguf_meta import read_gguf_metadata

gguf = pytest.importorskip("gguf")


def reference(path) -> dict:
    """The gguf package's reading; its GGUF.* entries are the header's fixed fields, not metadata."""
    return {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items() if not k.startswith("GGUF.")}


def write_every_type(path, endian):
    w = gguf.GGUFWriter(str(path), "llama", endianess=endian)
    for i, name in enumerate(["uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64"]):
        getattr(w, f"add_{name}")(f"t.{name}", (-1) ** i * (i + 3) if name.startswith("int") else i + 200)
    w.add_float32("t.float32", 0.1)  # read back as the float32 nearest 0.1, as the gguf reader does
    w.add_float64("t.float64", -2.5e-300)
    w.add_bool("t.true", True)
    w.add_bool("t.false", False)
    w.add_string("t.text", "héllo <|im_end|> \u2581token")
    w.add_string("t.empty", "")
    w.add_array("t.ints", [3, -1, 7])
    w.add_array("t.floats", [0.5, -1.25, 3.0e-3])
    w.add_array("t.strings", ["a", "", "ünï", "x y"])
    w.add_array("t.no_items", [])
    for write in (w.write_header_to_file, w.write_kv_data_to_file, w.write_tensors_to_file, w.close):
        write()


@pytest.mark.parametrize("endian", ["LITTLE", "BIG"])
def test_every_value_type_as_the_gguf_package_reads_it(tmp_path, endian):
    path = tmp_path / "t.gguf"
    write_every_type(path, getattr(gguf.GGUFEndian, endian))
    ours, ref = read_gguf_metadata(str(path)), reference(str(path))
    assert ours == ref
    assert ours["t.int8"] == -4 and ours["t.true"] is True and ours["t.strings"][2] == "ünï"
    assert read_gguf_metadata(str(path), "t.s") == {"t.strings": ref["t.strings"]}  # the rest stepped over


def test_the_default_models_header(default_model):
    """49,152 tokens, 48,900 merges and the chat template: what the tokenizer reads at every start."""
    from weights.load import default_gguf_path
    path = default_gguf_path()
    ours = read_gguf_metadata(path)
    assert ours == reference(path)
    assert len(ours["tokenizer.ggml.tokens"]) == default_model.args.vocab_size


def test_damaged_files_are_one_value_error(tmp_path):
    path = tmp_path / "t.gguf"
    write_every_type(path, gguf.GGUFEndian.LITTLE)
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    for n in [0, 3, 10, 30, len(data) // 2, data.index(b"x y") + 2]:  # in the fixed fields, a key, a value
        cut.write_bytes(data[:n])
        with pytest.raises(ValueError, match="cut.gguf: GGUF header unreadable"):
            read_gguf_metadata(str(cut))
    i = data.index(b"t.uint8") + len(b"t.uint8")  # the value type follows the key
    cut.write_bytes(data[:i] + (99).to_bytes(4, "little") + data[i + 4:])
    with pytest.raises(ValueError, match="KeyError: 99"):
        read_gguf_metadata(str(cut))
    # arrays of arrays thousands deep (no real file nests any): still one ValueError, not a RecursionError
    deep = b"GGUF" + (3).to_bytes(4, "little") + (0).to_bytes(8, "little") + (1).to_bytes(8, "little")
    deep += (1).to_bytes(8, "little") + b"a" + (9).to_bytes(4, "little") + ((9).to_bytes(4, "little")
                                                                         + (1).to_bytes(8, "little")) * 5000
    cut.write_bytes(deep + (4).to_bytes(4, "little") + (0).to_bytes(8, "little"))
    with pytest.raises(ValueError, match="GGUF header unreadable"):
        read_gguf_metadata(str(cut))
    (tmp_path / "text.gguf").write_text("not a model")
    with pytest.raises(ValueError, match="no GGUF magic"):
        read_gguf_metadata(str(tmp_path / "text.gguf"))
