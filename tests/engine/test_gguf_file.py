"""engine/gguf_file.py against the gguf package's own reader: the same metadata values and the same
tensor bytes, on the embedded model and on files written here with every value type; clear
errors on files that are not GGUF or are cut short."""
from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from lenserve.engine.gguf_file import GGUFFile, GGUFFormatError  # noqa: E402
from lenserve.engine.loader_gguf import find_embedded_gguf  # noqa: E402


def _reference(path):
    r = gguf.GGUFReader(path)
    fields = {}
    for name, f in r.fields.items():
        fields[name] = f.contents()
    return r, fields


def _same_value(a, b) -> bool:
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return float(a) == float(b) or (np.isnan(a) and np.isnan(b))
    return a == b and type(a) is type(b)


def _check_against_reader(path):
    gf = GGUFFile(path)
    ref, ref_fields = _reference(path)
    # GGUFReader adds the header's own pseudo-fields (GGUF.version, GGUF.tensor_count, GGUF.kv_count)
    ref_fields = {k: v for k, v in ref_fields.items() if not k.startswith("GGUF.")}
    assert set(gf.fields) == set(ref_fields)
    for k, v in ref_fields.items():
        if k == "t.arr_arr":  # GGUFReader.contents() flattens an array of arrays; checked below
            continue
        assert _same_value(gf.fields[k], v), k
    assert [t.name for t in gf.tensors] == [t.name for t in ref.tensors]
    for info, t in zip(gf.tensors, ref.tensors):
        assert info.tensor_type == int(t.tensor_type), info.name
        assert info.shape == tuple(int(x) for x in t.shape), info.name
        assert info.offset == int(t.data_offset), info.name
        assert info.n_bytes == int(t.n_bytes), info.name
        raw = gf.read_tensor(info)
        assert raw.flags.writeable and (raw.base if raw.base is not None else raw).flags.owndata  # a buffer of its own, no file mapping
        assert raw.shape[0] == info.num_rows
        np.testing.assert_array_equal(raw.reshape(-1), np.asarray(t.data).view(np.uint8).reshape(-1), err_msg=info.name)
    return gf


def test_embedded_model_matches_gguf_reader():
    try:
        path = find_embedded_gguf()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    gf = _check_against_reader(path)
    assert len(gf.fields["tokenizer.ggml.tokens"]) == 49152
    assert gf.fields["general.architecture"] == "llama"


def test_every_value_type_and_tensor_type(tmp_path):
    path = str(tmp_path / "all.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_uint8("t.u8", 250)
    w.add_int8("t.i8", -7)
    w.add_uint16("t.u16", 65000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 0.15625)
    w.add_uint64("t.u64", 2**63 + 5)
    w.add_int64("t.i64", -(2**62))
    w.add_float64("t.f64", 1e-300)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo ✓ \x00 nul")
    w.add_string("t.empty", "")
    w.add_array("t.arr_i32", [1, -2, 3])
    w.add_array("t.arr_f32", [0.5, -1.25])
    w.add_array("t.arr_str", ["a", "", "ünï", "<|im_end|>"])
    w.add_array("t.arr_empty", [])
    w.add_array("t.arr_arr", [[1, 2], [3]])
    w.add_custom_alignment(64)
    rng = np.random.default_rng(0)
    T = gguf.GGMLQuantizationType
    w.add_tensor("f32", rng.standard_normal((3, 5)).astype(np.float32))
    w.add_tensor("f16", rng.standard_normal((7, 32)).astype(np.float16))
    w.add_tensor("vec", rng.standard_normal(11).astype(np.float32))
    from gguf.quants import quantize

    for qtype in (T.Q8_0, T.Q4_0, T.Q4_1):
        x = rng.standard_normal((9, 96)).astype(np.float32)
        w.add_tensor(qtype.name, quantize(x, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    gf = _check_against_reader(path)
    assert gf.fields["t.str"] == "héllo ✓ \x00 nul"
    assert gf.fields["t.arr_str"] == ["a", "", "ünï", "<|im_end|>"]
    assert gf.fields["t.u64"] == 2**63 + 5
    assert gf.fields["t.arr_arr"] == [[1, 2], [3]]
    assert all(t.offset % 64 == 0 for t in gf.tensors)


def test_clear_errors(tmp_path):
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"PK\x03\x04" + b"\x00" * 100)
    with pytest.raises(GGUFFormatError, match="not a GGUF file"):
        GGUFFile(str(not_gguf))
    bad_version = tmp_path / "v.gguf"
    bad_version.write_bytes(b"GGUF" + (99).to_bytes(4, "little") + b"\x00" * 16)
    with pytest.raises(GGUFFormatError, match="unsupported GGUF version 99"):
        GGUFFile(str(bad_version))
    # a real file cut inside its vocabulary, and cut inside its tensor data
    try:
        data = open(find_embedded_gguf(), "rb").read()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:200_000])
    with pytest.raises(GGUFFormatError, match="truncated or malformed"):
        GGUFFile(str(cut))
    cut.write_bytes(data[: len(data) - 1000])
    with pytest.raises(GGUFFormatError, match="runs past the end of the file"):
        GGUFFile(str(cut))
