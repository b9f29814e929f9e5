"""GGUF export: block formats bit-exact against gguf-py, the file checked by its own reader, llama.cpp when installed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from tests.conftest import requires_smollm2
from toolkit import models
from toolkit.errors import ToolkitError
from toolkit.interop import gguf_file, rope_factors
from toolkit.models import gguf_reader
from toolkit.models.architectures import layout_of
from toolkit.models.tiny import family_config, tiny_model, tiny_tokenizer
from toolkit.passes import configs
from toolkit.passes.export_gguf import FILE, ExportGGUFConfig, export
from toolkit.passes.rtn import RTNConfig
from toolkit.passes.rtn import apply as rtn_apply
from toolkit.paths import atomic_dir
from toolkit.quant.arithmetic import dequantize
from toolkit.quant.formats import GGUFQ4_0, GGUFQ4_1, GGUFQ8_0
from toolkit.quant.spec import QuantSpec

HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
requires_llama_cpp = pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama-cpp-python is not installed "
                                        "(pip install llama-cpp-python, or the 'consumers' extra)")
Q = gguf.GGMLQuantizationType


def codes(rows: int, cols: int, bits: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 2**bits, (rows, cols), generator=g, dtype=torch.uint8)
    scales = (torch.rand(rows, cols // 32, generator=g) * 0.05 + 1e-3).half()
    return q, scales


def tiny(bits: int | None = 4, group: int = 32, symmetric: bool = True, head_bits: int | None = 8) -> models.LoadedModel:
    loaded = models.load("tiny-llama")
    if bits is not None:
        rtn_apply(loaded.model, RTNConfig(bits=bits, group_size=group, symmetric=symmetric, lm_head_bits=head_bits))
    return loaded


def run_export(loaded: models.LoadedModel, folder: Path, **config: object) -> dict:
    with atomic_dir(folder) as tmp:
        return export(loaded.model, loaded.tokenizer, ExportGGUFConfig(**{"pre_tokenizer": "default", **config}), tmp)


# ---------------------------------------------------------------- block formats

@pytest.mark.parametrize("fmt,qtype,bits,zero", [(GGUFQ4_0, Q.Q4_0, 4, 8), (GGUFQ8_0, Q.Q8_0, 8, 128)])
def test_symmetric_blocks_equal_gguf_dequantization(fmt, qtype, bits, zero) -> None:
    q, s = codes(5, 96, bits)
    z = torch.full(s.shape, zero, dtype=torch.uint8)
    spec = QuantSpec(bits, 32, True)
    raw = fmt.pack(q, s, z, spec)["blocks"]
    assert raw.shape == (5, 3 * fmt.block_bytes()) and raw.dtype == torch.uint8
    assert (fmt.block_bytes(), 32) == tuple(reversed(gguf.GGML_QUANT_SIZES[qtype]))  # our size table is ggml's
    assert np.array_equal(gguf.quants.dequantize(raw.numpy(), qtype), dequantize(q, s, z, 32).numpy())
    back = fmt.unpack({"blocks": raw}, spec, tuple(q.shape))
    assert all(torch.equal(a, b) for a, b in zip(back, (q, s, z), strict=True))


def test_q4_0_layout_is_low_nibbles_first_half() -> None:
    q = torch.arange(32, dtype=torch.uint8).remainder(16).reshape(1, 32)
    raw = GGUFQ4_0.pack(q, torch.ones(1, 1).half(), torch.full((1, 1), 8, dtype=torch.uint8), QuantSpec(4, 32))["blocks"]
    assert raw[0, :2].tolist() == list(np.float16(1.0).tobytes())
    assert int(raw[0, 2]) == int(q[0, 0]) | int(q[0, 16]) << 4  # element j low, j + 16 high (ggml-common.h)


def test_q4_0_refuses_asymmetric_codes() -> None:
    q, s = codes(2, 32, 4)
    with pytest.raises(ValueError, match="Q4_1"):
        GGUFQ4_0.pack(q, s, torch.full(s.shape, 7, dtype=torch.uint8), QuantSpec(4, 32))


def test_q4_1_is_exact_when_the_offset_fits_float16_and_says_how_far_off_otherwise() -> None:
    q, _ = codes(2, 64, 4)
    s = torch.tensor([[0.5, 0.0999755859375], [0.25, 0.0999755859375]]).half()  # 0.0999.. * 7 needs 14 bits
    z = torch.tensor([[3, 7], [12, 1]], dtype=torch.uint8)
    spec = QuantSpec(4, 32, False)
    raw = GGUFQ4_1.pack(q, s, z, spec)["blocks"]
    assert (GGUFQ4_1.block_bytes(), 32) == tuple(reversed(gguf.GGML_QUANT_SIZES[Q.Q4_1]))
    got = gguf.quants.dequantize(raw.numpy(), Q.Q4_1).reshape(2, 2, 32)
    ref = dequantize(q, s, z, 32).numpy().reshape(2, 2, 32)
    err = GGUFQ4_1.offset_error(s, z)
    assert float(err[0, 0]) == 0 and float(err[1, 0]) == 0 and float(err[1, 1]) == 0 and float(err[0, 1]) > 0
    assert np.array_equal(got[0, 0], ref[0, 0]) and np.array_equal(got[1], ref[1])
    assert np.abs(got[0, 1] - ref[0, 1]).max() == pytest.approx(float(err[0, 1]), rel=1e-3)
    back_q, back_s, back_z = GGUFQ4_1.unpack({"blocks": raw}, spec, (2, 64))
    assert torch.equal(back_q, q) and torch.equal(back_s, s) and torch.equal(back_z, z)


def test_rope_permutation_is_the_one_transformers_undoes() -> None:
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = torch.randn(3 * 32, 8)
    permuted = gguf_file.permute(w, 3)
    assert not torch.equal(permuted, w) and torch.equal(gguf_file.unpermute(permuted, 3), w)
    undo = LlamaTensorProcessor()._reverse_permute_weights  # what transformers applies when it reads a GGUF
    assert np.array_equal(undo(permuted.numpy(), 3, 3), w.numpy())


# ---------------------------------------------------------------- the export

@pytest.mark.parametrize("bits,symmetric,main", [(4, True, "Q4_0"), (4, False, "Q4_1"), (8, True, "Q8_0")])
def test_export_carries_the_codes_bit_exactly(tmp_path: Path, bits: int, symmetric: bool, main: str) -> None:
    loaded = tiny(bits, 32, symmetric)
    metrics = run_export(loaded, tmp_path / "out")
    assert metrics["tensor_types"][main] == 14 + (main == "Q8_0")  # 14 decoder linears; the int8 head is Q8_0
    reader = gguf_reader.read(tmp_path / "out" / FILE)
    names = {t.name: t for t in reader.tensors}
    assert "output.weight" not in names  # tied: llama.cpp reads token_embd as the head
    assert names["token_embd.weight"].tensor_type == Q.Q8_0
    # independent of the export's own check: one linear dequantized by gguf-py equals the QuantLinear
    k = loaded.model.model.layers[1].self_attn.k_proj
    got = torch.from_numpy(gguf_reader.dequantized_tensor(names["blk.1.attn_k.weight"]))
    assert torch.equal(gguf_file.unpermute(got, 1), k.dequantized_weight()) == (main != "Q4_1" or metrics["q4_1_max_offset_error"] == 0)
    v = loaded.model.model.layers[0].self_attn.v_proj
    if main != "Q4_1":
        assert torch.equal(torch.from_numpy(gguf_reader.dequantized_tensor(names["blk.0.attn_v.weight"])), v.dequantized_weight())


def test_export_writes_the_metadata_llama_cpp_reads(tmp_path: Path) -> None:
    loaded = tiny()
    run_export(loaded, tmp_path / "out")
    reader = gguf_reader.read(tmp_path / "out" / FILE)
    meta = gguf_reader.metadata(reader, ["general.architecture", "llama.block_count", "llama.attention.head_count_kv",
                                       "llama.rope.freq_base", "llama.context_length", "tokenizer.ggml.model",
                                       "tokenizer.ggml.eos_token_id", "tokenizer.ggml.bos_token_id",
                                       "tokenizer.chat_template", "general.file_type"])
    c = loaded.model.config
    assert meta["general.architecture"] == "llama" and meta["llama.block_count"] == c.num_hidden_layers
    assert meta["llama.attention.head_count_kv"] == 1 and meta["llama.context_length"] == c.max_position_embeddings
    assert meta["llama.rope.freq_base"] == pytest.approx(10000.0)
    assert meta["tokenizer.ggml.eos_token_id"] == 257 and meta["tokenizer.ggml.bos_token_id"] == 256
    assert meta["tokenizer.chat_template"] == loaded.tokenizer.chat_template
    assert meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q4_0
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == c.vocab_size


def test_exported_gguf_is_a_model_source_again(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A merge-less BPE vocabulary is written with an empty merges array (no placeholder merge naming a token
    the vocabulary lacks), so transformers rebuilds the tokenizer and the file runs as ``model:``."""
    from toolkit.cli import main

    run_export(tiny(), tmp_path / "out", float_type="f32")
    merges = gguf_reader.read(tmp_path / "out" / FILE).fields["tokenizer.ggml.merges"]
    assert merges.contents() == [] and merges.types == [gguf.GGUFValueType.ARRAY]
    ref = models.resolve(str(tmp_path / "out" / FILE))
    for text in ("hello world", "  two spaces\nand é ü 🦙", "<s>x</s>"):
        assert models.load_tokenizer(ref)(text)["input_ids"] == tiny_tokenizer()(text)["input_ids"]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {tmp_path / 'out' / FILE}\noutput: {tmp_path / 'run'}\n"
                      "evaluation: {count: 2, length: 32}\npasses: [{rtn: {group_size: 32}}]\n")
    assert main(["run", str(recipe), "--no-progress"]) == 0, capsys.readouterr().err
    assert (tmp_path / "run" / "model" / "quantization.json").is_file()


def test_a_panicking_gguf_tokenizer_is_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A merge naming a token the vocabulary lacks makes transformers' (Rust) tokenizer build panic; pyo3's
    PanicException is not an Exception, and is caught by name: one line, nothing converted, no traceback."""
    from toolkit.cli import main
    from toolkit.paths import cache_dir

    run_export(tiny(), tmp_path / "out")
    bad = rewrite(gguf_reader.read(tmp_path / "out" / FILE), tmp_path / "bad.gguf",
                  {"tokenizer.ggml.merges": ["<s> </s>"]})
    with pytest.raises(ToolkitError, match=r"transformers cannot convert GGUF file .*bad\.gguf \(a library panicked"):
        models.resolve(str(bad))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {bad}\noutput: {tmp_path / 'run'}\npasses: [{{rtn: {{group_size: 32}}}}]\n")
    assert main(["run", str(recipe), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "error: transformers cannot convert GGUF file" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists() and not list((cache_dir() / "models").glob("bad-*"))


@pytest.mark.parametrize("float_type,qtype", [("f32", Q.F32), ("f16", Q.F16)])
def test_float_model_exports_at_the_float_type(tmp_path: Path, float_type: str, qtype) -> None:
    metrics = run_export(tiny(None), tmp_path / "out", float_type=float_type)
    reader = gguf_reader.read(tmp_path / "out" / FILE)
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.ffn_down.weight"] == qtype and types["blk.0.attn_norm.weight"] == Q.F32
    assert metrics["bit_exact_tensors"] == len(types)


def test_a_format_without_a_block_type_is_refused_naming_those_that_have_one(tmp_path: Path) -> None:
    with pytest.raises(ToolkitError, match=r"int4 group 16 symmetric has no GGUF block type.*Q4_0.*Q4_1.*Q8_0"):
        run_export(tiny(4, 16), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unknown_pre_tokenizer_asks_for_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ToolkitError, match="pre_tokenizer"):
        run_export(tiny(), tmp_path / "out", pre_tokenizer="auto")
    assert not (tmp_path / "out").exists()


def test_tampered_bytes_fail_the_export(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = GGUFQ4_0.pack

    def flip(q, s, z, spec):  # type: ignore[no-untyped-def]
        raw = real(q, s, z, spec)["blocks"].clone()
        raw[0, 2] ^= 0x01
        return {"blocks": raw}

    monkeypatch.setattr(GGUFQ4_0, "pack", classmethod(lambda cls, q, s, z, spec: flip(q, s, z, spec)))
    with pytest.raises(ToolkitError, match="exactly"):
        run_export(tiny(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_recipe_key_is_registered() -> None:
    assert configs()["export_gguf"] is ExportGGUFConfig
    with pytest.raises(ValueError, match="float_type"):
        ExportGGUFConfig(float_type="bf16")


# ---------------------------------------------------------------- refusing broken files

def test_truncated_gguf_is_refused_with_one_line(tmp_path: Path) -> None:
    run_export(tiny(), tmp_path / "out")
    data = (tmp_path / "out" / FILE).read_bytes()
    for cut in (len(data) // 2, 100):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(ToolkitError) as err:
            gguf_reader.read(bad)
        assert "\n" not in str(err.value) and ("truncated" in str(err.value) or "inconsistent" in str(err.value))
    with pytest.raises(ToolkitError, match="truncated or corrupt"):  # the model loader checks first, too
        models.resolve(str(tmp_path / f"cut{len(data) // 2}.gguf"))


def rewrite(reader: gguf.GGUFReader, path: Path, changes: dict[str, object], bytes_key: str | None = None) -> Path:
    """A copy of ``reader``'s file with the metadata ``changes`` (key -> value) written as the file's own
    (and a uint8 array ``bytes_key`` first)."""
    writer = gguf_file.Writer(path, "llama")
    if bytes_key:
        writer.add_key_value(bytes_key, [1, 2, 3], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.UINT8)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        vtype, value = field.types[0], changes.get(field.name, field.contents())
        sub = None  # an empty array's item type is not stored where the reader looks: the merges' are strings
        if vtype == gguf.GGUFValueType.ARRAY:
            sub = field.types[-1] if len(field.types) > 1 else gguf.GGUFValueType.STRING
        writer.add_key_value(field.name, value, vtype, sub_type=sub)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("blocks", [3, 2**32 - 1, 0])
def test_inconsistent_gguf_is_refused_with_one_line(tmp_path: Path, blocks: int) -> None:
    """A block_count the tensors do not back is refused; one of 2^32 - 1 without listing its names first."""
    run_export(tiny(), tmp_path / "out")
    bad = rewrite(gguf_reader.read(tmp_path / "out" / FILE), tmp_path / "bad.gguf", {"llama.block_count": blocks})
    with pytest.raises(ToolkitError, match=rf"block_count is {blocks} but tensor 'blk\.(2|0)\..*' is missing"):
        gguf_reader.read(bad)


BYTES_KEY = "toolkit.test.bytes"


@pytest.mark.parametrize("key, value, message", [
    ("llama.embedding_length", 2**31, "embedding_length is 2147483648 but the tensors have 96"),
    ("llama.feed_forward_length", 2**31, "feed_forward_length is 2147483648 but the tensors have 160"),
    ("llama.attention.head_count", 0, "0 attention heads"),
])
def test_sizes_the_tensors_do_not_back_are_refused(tmp_path: Path, key: str, value: int, message: str) -> None:
    """transformers builds the model from these sizes, for real, before it reads a tensor."""
    run_export(tiny(), tmp_path / "out")
    bad = rewrite(gguf_reader.read(tmp_path / "out" / FILE), tmp_path / "bad.gguf", {key: value})
    with pytest.raises(ToolkitError, match=message):
        gguf_reader.read(bad)


def count_offsets(path: Path) -> dict[str, int]:
    """Byte offsets of the tensor count and of the lengths of metadata arrays (of strings, of uint8)."""
    reader = gguf.GGUFReader(path)
    offsets = {"tensors": 8}
    for key in ("tokenizer.ggml.tokens", BYTES_KEY):
        offsets[key] = reader.fields[key].offset + 8 + len(key) + 4 + 4  # key length, key, value type, item type
    return offsets


@pytest.mark.parametrize("where", ["tensors", "tokenizer.ggml.tokens", BYTES_KEY])
def test_a_count_beyond_what_the_file_holds_is_refused_before_anything_is_built(tmp_path: Path, where: str) -> None:
    """gguf's reader loops over a declared array length even past the end of the file (reads there are empty,
    not errors: a uint8 array of 2^62 items never ends): a count the file cannot hold is refused first."""
    run_export(tiny(), tmp_path / "out")
    good = rewrite(gguf_reader.read(tmp_path / "out" / FILE), tmp_path / "good.gguf", {}, BYTES_KEY)
    data = bytearray(good.read_bytes())
    offset = count_offsets(good)[where]
    data[offset:offset + 8] = (2**62).to_bytes(8, "little")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(ToolkitError, match=r"declares 4611686018427387904 .*more than its \d+ bytes can hold"):
        gguf_reader.read(bad)


# ---------------------------------------------------------------- llama.cpp

@requires_llama_cpp
@pytest.mark.parametrize("bits,symmetric", [(4, True), (4, False), (None, True)])
def test_llama_cpp_reads_the_export_and_agrees_with_pytorch(tmp_path: Path, bits, symmetric: bool) -> None:
    metrics = run_export(tiny(bits, 32, symmetric), tmp_path / "out", float_type="f32")
    assert metrics["llama_cpp_relative_logit_error"] < 0.1
    assert metrics["llama_cpp_top1_agreement"] > 0.9


@pytest.mark.slow
@requires_smollm2
@requires_llama_cpp
def test_smollm2_q4_0_answers_in_llama_cpp(tmp_path: Path) -> None:
    import llama_cpp

    loaded = models.load("smollm2")
    rtn_apply(loaded.model, RTNConfig(bits=4, group_size=32, symmetric=True, lm_head_bits=8))
    with atomic_dir(tmp_path / "out") as tmp:
        metrics = export(loaded.model, loaded.tokenizer, ExportGGUFConfig(), tmp)
    assert metrics["tensor_types"]["Q4_0"] == 210 and metrics["llama_cpp_top1_agreement"] > 0.9
    llm = llama_cpp.Llama(str(tmp_path / "out" / FILE), n_ctx=256, n_threads=2, verbose=False)
    reply = llm.create_chat_completion([{"role": "user", "content": "What is the capital of France?"}],
                                       max_tokens=16, temperature=0.0)
    assert "Paris" in reply["choices"][0]["message"]["content"]


def test_a_family_without_a_gguf_architecture_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(gguf_file.ARCHS, "llama")
    with pytest.raises(ToolkitError, match="no GGUF architecture for model type 'llama'; supported: qwen2, qwen3"):
        run_export(tiny(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- other families

# Mistral 7B v0.2 and later ship no sliding window, and SmolLM3-3B leaves out rotary in every 4th of its 36
# layers, as llama.cpp assumes; the tiny models' window of 8 and NoPE interval of 2 are refused below
# Phi-3's window and longrope are refused below (llama.cpp disables Phi's window; longrope is not written)
GGUF_FAMILIES: dict[str, dict[str, object]] = {
    "llama3": {}, "mistral": dict(sliding_window=None), "qwen2": {}, "qwen3": {}, "olmo2": {}, "granite": {},
    "smollm3": dict(num_hidden_layers=4, no_rope_layer_interval=4),
    "phi3": dict(sliding_window=None, rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                           partial_rotary_factor=0.5)),
    # llama.cpp derives Gemma's attention scale (head_dim) and fixes its sliding layers (Gemma 3: 5 of every 6)
    "gemma2": dict(query_pre_attn_scalar=16), "gemma3": dict(num_hidden_layers=6, layer_types=None),
}


def family(name: str) -> tuple[torch.nn.Module, object]:
    """The tiny ``name`` model, RTN int4 g32 symmetric (the head int8), and its tokenizer."""
    model = tiny_model(name, **GGUF_FAMILIES.get(name, {}))
    rtn_apply(model, RTNConfig(bits=4, group_size=32, symmetric=True, lm_head_bits=8))
    return model, tiny_tokenizer()


def export_family(model: torch.nn.Module, tokenizer: object, folder: Path, **config: object) -> dict:
    with atomic_dir(folder) as tmp:
        return export(model, tokenizer, ExportGGUFConfig(**{"pre_tokenizer": "default", **config}), tmp)  # type: ignore[arg-type]


@requires_llama_cpp
@pytest.mark.parametrize("name", GGUF_FAMILIES)
def test_llama_cpp_runs_each_family_as_pytorch_does(tmp_path: Path, name: str) -> None:
    model, tokenizer = family(name)
    metrics = export_family(model, tokenizer, tmp_path / "out", float_type="f32")
    linears = sum(len(group) for group in layout_of(model).sequential_groups())  # 7, Phi-3's fused 4
    assert metrics["tensor_types"]["Q4_0"] == linears * model.config.num_hidden_layers
    assert metrics["llama_cpp_relative_logit_error"] < 0.1 and metrics["llama_cpp_top1_agreement"] > 0.9


@pytest.mark.parametrize("name,extras", [
    ("qwen2", {"blk.0.attn_q.bias", "blk.1.attn_v.bias"}),
    ("qwen3", {"blk.0.attn_q_norm.weight", "blk.1.attn_k_norm.weight", "output.weight"}),
])
def test_qwen_tensors_keep_their_row_order_and_extras(tmp_path: Path, name: str, extras: set[str]) -> None:
    model, tokenizer = family(name)
    metrics = export_family(model, tokenizer, tmp_path / "out", check_llama_cpp=False)
    names = {t.name: t for t in gguf_reader.read(tmp_path / "out" / FILE).tensors}
    assert extras <= set(names) and metrics["bit_exact_tensors"] == len(names)
    q = model.model.layers[0].self_attn.q_proj  # type: ignore[union-attr]
    got = torch.from_numpy(gguf_reader.dequantized_tensor(names["blk.0.attn_q.weight"]))
    assert torch.equal(got, q.dequantized_weight())  # NeoX rope order: no row permutation


def test_phi3_fused_projections_keep_their_rows_and_a_partial_rotary(tmp_path: Path) -> None:
    model, tokenizer = family("phi3")
    export_family(model, tokenizer, tmp_path / "out", check_llama_cpp=False)
    reader = gguf_reader.read(tmp_path / "out" / FILE)
    names = {t.name: t for t in reader.tensors}
    assert {"blk.0.attn_qkv.weight", "blk.1.ffn_up.weight"} <= set(names) and "blk.0.ffn_gate.weight" not in names
    layer = model.model.layers[0]  # type: ignore[union-attr]
    for gguf_name, linear in (("attn_qkv", layer.self_attn.qkv_proj), ("ffn_up", layer.mlp.gate_up_proj)):
        got = torch.from_numpy(gguf_reader.dequantized_tensor(names[f"blk.0.{gguf_name}.weight"]))
        assert torch.equal(got, linear.dequantized_weight())  # [q; k; v] and [gate; up] as stored, NeoX rope order
    assert gguf_reader.metadata(reader, ["phi3.rope.dimension_count"]) == {"phi3.rope.dimension_count": 16}


def test_gemma2_norms_carry_the_offset_and_its_softcaps_and_window_are_written(tmp_path: Path) -> None:
    model, tokenizer = family("gemma2")
    export_family(model, tokenizer, tmp_path / "out", check_llama_cpp=False)
    reader = gguf_reader.read(tmp_path / "out" / FILE)
    names = {t.name: t for t in reader.tensors}
    layer = model.model.layers[1]  # type: ignore[union-attr]
    for gguf_name, norm in (("attn_norm", layer.input_layernorm), ("post_ffw_norm", layer.post_feedforward_layernorm)):
        got = torch.from_numpy(gguf_reader.dequantized_tensor(names[f"blk.1.{gguf_name}.weight"])).flatten()
        assert torch.equal(got, norm.weight.detach() + 1)  # Gemma scales by 1 + w, llama.cpp by w
    keys = ["gemma2.attn_logit_softcapping", "gemma2.final_logit_softcapping", "gemma2.attention.sliding_window"]
    assert gguf_reader.metadata(reader, keys) == dict(zip(keys, (5.0, 3.0, 8), strict=True))


def test_qwen2_yarn_is_written_as_convert_hf_to_gguf_writes_it(tmp_path: Path) -> None:
    model, tokenizer = family("qwen2")
    export_family(model, tokenizer, tmp_path / "out", check_llama_cpp=False)
    meta = gguf_reader.metadata(gguf_reader.read(tmp_path / "out" / FILE),
                              ["general.architecture", "qwen2.rope.scaling.type", "qwen2.rope.scaling.factor",
                               "qwen2.rope.scaling.original_context_length"])
    assert meta == {"general.architecture": "qwen2", "qwen2.rope.scaling.type": "yarn",
                    "qwen2.rope.scaling.factor": 8.0, "qwen2.rope.scaling.original_context_length": 32}


def test_llama3_rope_scaling_is_a_rope_freqs_tensor_without_a_scaling_type(tmp_path: Path) -> None:
    model, tokenizer = family("llama3")
    metrics = export_family(model, tokenizer, tmp_path / "out", check_llama_cpp=False)
    reader = gguf_reader.read(tmp_path / "out" / FILE)
    freqs = {t.name: t for t in reader.tensors}["rope_freqs.weight"]
    assert freqs.tensor_type == Q.F32 and metrics["bit_exact_tensors"] == len(reader.tensors)
    assert torch.equal(torch.from_numpy(gguf_reader.dequantized_tensor(freqs)).flatten(),
                       rope_factors.llama3(dict(model.config.rope_parameters), model.config.head_dim))
    assert "llama.rope.scaling.type" not in reader.fields  # a linear factor on top would slow every pair


def test_granite_multipliers_are_written_as_llama_cpp_reads_them(tmp_path: Path) -> None:
    model, tokenizer = family("granite")
    export_family(model, tokenizer, tmp_path / "out", check_llama_cpp=False)
    keys = ["granite.attention.scale", "granite.embedding_scale", "granite.residual_scale", "granite.logit_scale"]
    meta = gguf_reader.metadata(gguf_reader.read(tmp_path / "out" / FILE), keys)
    assert meta == pytest.approx(dict(zip(keys, (0.2, 6.0, 0.5, 2.5), strict=True)))


LLAMA3_ROPE = dict(family_config("llama3").rope_parameters)
PHI3_DEFAULT_ROPE = dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5)


@pytest.mark.parametrize("name,overrides,match", [
    ("mistral", {}, "attends to every key.*sliding_window"),  # llama.cpp's llama architecture has no window
    ("phi3", dict(rope_parameters=PHI3_DEFAULT_ROPE), "'phi3' architecture attends to every key"),  # disabled there
    ("phi3", dict(sliding_window=None), "rope type 'longrope' is not written"),  # its factors and attention factor
    ("qwen2", dict(rope_parameters=LLAMA3_ROPE), "needs a rope_freqs tensor, which llama.cpp's 'qwen2' architecture"),
    ("smollm3", {}, r"rotary in every 4th layer.*\[True, False\]"),  # llama.cpp's constant, not the file's
    ("gemma2", {}, r"scales attention scores by 16 \*\* -0.5, but this model's query_pre_attn_scalar is 24"),
    ("gemma3", {}, r"attends to all keys in every 6th layer.*\[8, None, 8\]"),  # its tiny pattern, not llama.cpp's
    ("gemma3", dict(num_hidden_layers=6, layer_types=None, final_logit_softcapping=3.0),
     "soft-caps with final_logit_softcapping=3.0, which this exporter does not write"),
    ("gemma3", dict(num_hidden_layers=6, layer_types=None, rope_parameters={
        "sliding_attention": dict(rope_type="default", rope_theta=20000.0),
        "full_attention": dict(rope_type="default", rope_theta=1e6)}), "rotates sliding layers with base 10000"),
])
def test_what_llama_cpp_would_compute_differently_is_refused(tmp_path: Path, name: str, overrides: dict,
                                                             match: str) -> None:
    model = tiny_model(name, **overrides)
    rtn_apply(model, RTNConfig(bits=4, group_size=32, symmetric=True))
    with pytest.raises(ToolkitError, match=match) as err:
        export_family(model, tiny_tokenizer(), tmp_path / "out")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()
