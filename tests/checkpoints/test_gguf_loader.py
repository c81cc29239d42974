"""``fxquant.from_gguf`` and ``from_pretrained(gguf_file=..., quantization_config=FxQuantConfig(spec="gguf"))``
on small GGUF files written with the ``gguf`` package's ``GGUFWriter`` (:mod:`_gguf_synth`).

Oracles: ``gguf.GGUFReader`` (what the file holds), ``gguf.quants.dequantize`` (what its blocks stand for),
llama.cpp's q/k row interleave re-implemented in ``_gguf_synth.hf_row_order``, and transformers' own
dequantize-at-load GGUF model (its weights bit for bit; its logits up to fp32 summation order).
"""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

pytest.importorskip("gguf", reason="the GGUF loader needs the gguf package: pip install -e '.[models]'")
pytest.importorskip("transformers", reason="the GGUF loader needs transformers: pip install -e '.[models]'")
pytest.importorskip("accelerate", reason="the GGUF loader needs accelerate: pip install -e '.[models]'")

import gguf  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

import _gguf_synth as S  # noqa: E402
import fxquant  # noqa: E402
from fxquant.checkpoints._gguf_embedding import PackedEmbedding  # noqa: E402
from fxquant.checkpoints._gguf_file import GgufFile  # noqa: E402
from fxquant.hf import FxQuantConfig  # noqa: E402
from fxquant.modules import QuantizedLinear  # noqa: E402

Q = S.Q
F32 = dict(dtype=torch.float32, compute_dtype=torch.float32)


def _file(folder, name, arch, metadata, tensors):
    path = os.path.join(folder, name)
    S.write(path, arch, metadata, tensors)
    return path


def _mixed_types(shapes):
    """Every supported type at least once over a tiny model's 2-D tensors."""
    names = [n for n, s in shapes.items() if len(s) == 2]
    return {n: S.ALL_QTYPES[i % len(S.ALL_QTYPES)] for i, n in enumerate(names)}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf")
    shapes = S.llama_shapes()
    out = {"dir": str(d), "llama": _file(d, "llama.gguf", "llama", S.llama_metadata(),
                                         S.tensors_for(shapes, _mixed_types(shapes)))}
    gshapes = S.gemma3_shapes()
    gtypes = {n: (Q.Q8_0 if n == "token_embd.weight" else Q.Q4_K if "ffn" in n else Q.Q5_0)
              for n, s in gshapes.items() if len(s) == 2}
    gtypes["blk.1.attn_norm.weight"] = Q.Q8_0  # a quantized norm: dequantized, then transformers' w - 1
    out["gemma3"] = _file(d, "gemma3.gguf", "gemma3", S.gemma3_metadata(), S.tensors_for(gshapes, gtypes, seed=1))
    return out


def _reference(path):
    """transformers' own model for the file: every tensor dequantized at load (float32)."""
    folder, name = os.path.split(path)
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()


def _ids(vocab, shape=(2, 9), seed=0):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _same_storage(a, b):
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _close(a, b):
    """fp32 logits of the same weights: equal up to summation order (1e-5 of their scale)."""
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * b.abs().max().item())


# ---- the file ------------------------------------------------------------------------------------------------
def test_tensor_table_is_gguf_readers(files, tmp_path):
    """Names, types, shapes and bytes as gguf.GGUFReader sees them (F32, F16, BF16 and blocks)."""
    rng = np.random.default_rng(0)
    path = _file(tmp_path, "t.gguf", "llama", {"general.alignment": 64}, [
        ("a", None, rng.standard_normal((3, 5)).astype(np.float32)),
        ("b", None, rng.standard_normal((7,)).astype(np.float16)),
        ("c", Q.BF16, gguf.quants.quantize(rng.standard_normal((2, 6)).astype(np.float32), Q.BF16)),
        ("d", Q.Q6_K, S.quantized(rng, Q.Q6_K, 3, 512))])
    for p in (path, files["llama"]):
        ours = GgufFile(p)
        ref = gguf.GGUFReader(p)
        assert list(ours.tensors) == [t.name for t in ref.tensors]
        for t in ref.tensors:
            e = ours.tensors[t.name]
            assert e.type_name == t.tensor_type.name and list(e.shape) == list(reversed(t.shape.tolist()))
            if e.is_float:
                want = gguf.quants.dequantize(t.data, t.tensor_type).reshape(e.shape)
                assert np.array_equal(ours.floats(e), want), t.name
            else:
                assert np.array_equal(ours.raw(e), t.data), t.name


@pytest.mark.parametrize("qtype", S.ALL_QTYPES, ids=lambda q: q.name)
def test_every_type_stays_packed_as_the_file_holds_it(tmp_path, qtype):
    """Every linear and the embedding of one type: ``blocks`` are the file's rows (q/k rows in transformers'
    order), their dequantization is gguf's, and the packed bytes are the file's quantized bytes exactly."""
    shapes = S.llama_shapes()
    types = {n: qtype for n, s in shapes.items() if len(s) == 2}
    path = _file(tmp_path, "m.gguf", "llama", S.llama_metadata(), S.tensors_for(shapes, types, seed=3))
    model = fxquant.from_gguf(path, **F32)
    reader = {t.name: t for t in gguf.GGUFReader(path).tensors}
    c = S.LLAMA
    head = {"attn_q": c["heads"], "attn_k": c["kv_heads"]}
    for b in range(c["layers"]):
        for gname, hf in [("attn_q", "self_attn.q_proj"), ("attn_k", "self_attn.k_proj"),
                          ("attn_v", "self_attn.v_proj"), ("attn_output", "self_attn.o_proj"),
                          ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"), ("ffn_down", "mlp.down_proj")]:
            t = reader[f"blk.{b}.{gname}.weight"]
            rows = np.arange(t.data.shape[0]) if gname not in head else S.hf_row_order(t.data.shape[0], head[gname])
            m = model.get_submodule(f"model.layers.{b}.{hf}")
            assert isinstance(m, QuantizedLinear) and m.scheme == f"gguf-{qtype.name.lower()}"
            assert np.array_equal(m.blocks.numpy(), t.data[rows])
            want = gguf.quants.dequantize(t.data, qtype)[rows]
            assert torch.equal(m.dequantize(), torch.from_numpy(want)), gname
    emb, table = model.model.embed_tokens, reader["token_embd.weight"]
    assert isinstance(emb, PackedEmbedding) and _same_storage(model.lm_head.blocks, emb.blocks)  # tied: one tensor
    ids = torch.tensor([[0, 5, 319], [7, 7, 1]])
    want = torch.from_numpy(gguf.quants.dequantize(table.data, qtype))[ids]
    assert torch.equal(emb(ids), want)
    packed = {b.untyped_storage().data_ptr(): b.untyped_storage().nbytes() for n, b in model.named_buffers()
              if n.endswith("blocks")}
    packed = sum(packed.values())
    assert packed == sum(t.n_bytes for t in reader.values() if t.tensor_type not in (Q.F32, Q.F16, Q.BF16))


# ---- against transformers' dequantize-at-load model ------------------------------------------------------------
def test_llama_equals_transformers(files):
    ref = _reference(files["llama"])
    model = fxquant.from_gguf(files["llama"], **F32)
    sd = ref.state_dict()
    for name, m in model.named_modules():
        if isinstance(m, QuantizedLinear):
            assert torch.equal(m.dequantize(), sd[f"{name}.weight"]), name
    assert torch.equal(model.model.embed_tokens.dequantize(), sd["model.embed_tokens.weight"])
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p, sd[name]), name
    ids = _ids(S.LLAMA["vocab"])
    with torch.no_grad():
        _close(model(ids).logits, ref(ids).logits)
        a = model.generate(ids[:1], max_new_tokens=6, do_sample=False)
        b = ref.generate(ids[:1], max_new_tokens=6, do_sample=False)
    assert torch.equal(a, b)


def test_gemma3_norms_scaled_embedding_and_a_dequantized_tensor(files):
    """Gemma's norms are stored as w + 1 (transformers subtracts 1, on a quantized norm too, after
    dequantizing it); its embedding scales rows by sqrt(hidden); its head is tied to the packed table."""
    ref = _reference(files["gemma3"])
    model = fxquant.from_gguf(files["gemma3"], **F32)
    sd = ref.state_dict()
    for name, p in model.named_parameters():
        assert torch.equal(p, sd[name]), name
    emb = model.model.embed_tokens
    assert isinstance(emb, PackedEmbedding) and torch.equal(emb.embed_scale, ref.model.embed_tokens.embed_scale)
    assert torch.equal(emb.dequantize(), sd["model.embed_tokens.weight"])
    notes = " ".join(fxquant.report(model).notes)
    assert "input_layernorm.weight: Q8_0 tensor 'blk.1.attn_norm.weight' dequantized at load" in notes
    ids = _ids(S.GEMMA3["vocab"])
    with torch.no_grad():
        _close(model(ids).logits, ref(ids).logits)


def test_default_compute_dtype_is_fxquants_cpu_policy(files):
    """compute_dtype=None: fp32 activations may be rounded to bf16 once (docs/design.md): close, not equal."""
    ref = _reference(files["llama"])
    model = fxquant.from_gguf(files["llama"], dtype=torch.float32)
    ids = _ids(S.LLAMA["vocab"])
    with torch.no_grad():
        a, b = model(ids).logits, ref(ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=2e-2 * b.abs().max().item())


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_through_transformers_from_pretrained(files, arch):
    """The quantizer transformers runs for gguf_file= with FxQuantConfig(spec="gguf") builds what from_gguf does."""
    folder, name = os.path.split(files[arch])
    hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                              quantization_config=FxQuantConfig(spec="gguf-fp32"))
    ours = fxquant.from_gguf(files[arch], **F32)
    assert type(hf) is type(ours)
    assert _same_storage(hf.lm_head.blocks, hf.model.embed_tokens.blocks)
    for (n1, t1), (n2, t2) in zip(hf.state_dict().items(), ours.state_dict().items()):
        assert n1 == n2 and t1.dtype == t2.dtype and torch.equal(t1, t2), n1
    ids = _ids(hf.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, ours(ids).logits)
    qc = hf.config.quantization_config
    assert qc.quant_method == "fxquant" and qc.to_dict()["spec"] == "gguf-fp32"
    assert not hf.hf_quantizer.is_serializable()
    assert [r.fqn for r in fxquant.report(hf).rows] == [r.fqn for r in fxquant.report(ours).rows]


def test_into_a_meta_skeleton(files):
    folder, name = os.path.split(files["gemma3"])
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    model = fxquant.from_gguf(files["gemma3"], skeleton, **F32)
    assert model is skeleton
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    fresh = fxquant.from_gguf(files["gemma3"], **F32)
    ids = _ids(S.GEMMA3["vocab"])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, fresh(ids).logits)


def test_report_rows_and_float_linears(tmp_path):
    """A linear stored F16 stays float (reported skipped with its type); every linear has a row; the bytes
    are exact; unmapped tensors are noted and skipped as transformers skips them."""
    shapes = S.llama_shapes()
    types = {n: Q.Q4_K for n, s in shapes.items() if len(s) == 2}
    types["blk.0.attn_v.weight"] = Q.F16
    tensors = S.tensors_for(shapes, types) + [("rope_freqs.weight", None, np.ones(32, dtype=np.float32))]
    model = fxquant.from_gguf(_file(tmp_path, "r.gguf", "llama", S.llama_metadata(), tensors), dtype=torch.bfloat16)
    rep = fxquant.report(model)
    v = rep.row("model.layers.0.self_attn.v_proj")
    assert v.status == "skipped" and "F16" in v.reason
    assert model.model.layers[0].self_attn.v_proj.weight.dtype == torch.bfloat16
    q = rep.row("model.layers.1.mlp.down_proj")
    assert q.status == "quantized" and q.scheme == "gguf-q4_k" and q.method == "checkpoint"
    assert q.bytes_after == 256 * (512 // 256 * 144) and q.bytes_before == 256 * 512 * 2
    assert len(rep.rows) == 2 * 7 + 1 and len(rep.quantized) == 2 * 7
    assert any("rope_freqs.weight" in n for n in rep.notes)


def test_packed_embedding_follows_dtype_casts(files):
    model = fxquant.from_gguf(files["gemma3"], **F32)
    ids = torch.tensor([[1, 2, 3]])
    rows = model.model.embed_tokens(ids)
    model.to(torch.bfloat16)
    assert model.model.embed_tokens.blocks.dtype == torch.uint8
    out = model.model.embed_tokens(ids)
    scale = model.model.embed_tokens.embed_scale.to(torch.bfloat16)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, (rows / 16).to(torch.bfloat16) * scale)  # embed_scale sqrt(256): the fp32 rows, exact


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_torch_compile(files, arch):
    """The packed model (its PackedEmbedding and linear_gguf layers) under torch.compile: the eager logits."""
    model = fxquant.from_gguf(files[arch], **F32)
    ids = _ids(model.config.vocab_size)
    compiled = torch.compile(model)
    with torch.no_grad():
        _close(compiled(ids).logits, model(ids).logits)


def test_loading_never_unpickles(files, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("from_gguf unpickled something")
    for owner, name in [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")]:
        monkeypatch.setattr(owner, name, refuse)
    fxquant.from_gguf(files["llama"], **F32)


# ---- refusals -------------------------------------------------------------------------------------------------
def _tensor_type_offset(path, name):
    """Byte offset of tensor ``name``'s ggml type field in the tensor table."""
    blob = open(path, "rb").read()
    pos = blob.index(name.encode() + b"\x02\x00\x00\x00")  # the name, then n_dims = 2
    return pos + len(name) + 4 + 8 * 2


def _llama_tensors(qtype=Q.Q4_0, seed=0):
    shapes = S.llama_shapes()
    return S.tensors_for(shapes, {n: qtype for n, s in shapes.items() if len(s) == 2}, seed=seed)


def _replace(tensors, name, qtype, array):
    return [(n, qtype, array) if n == name else (n, q, a) for n, q, a in tensors]


def test_unsupported_type_names_the_tensor(tmp_path):
    rng = np.random.default_rng(0)
    block, size = gguf.GGML_QUANT_SIZES[Q.IQ2_XXS]
    iq = rng.integers(0, 256, (256, 512 // block * size), dtype=np.uint8)
    path = _file(tmp_path, "iq.gguf", "llama", S.llama_metadata(),
                 _replace(_llama_tensors(), "blk.1.ffn_down.weight", Q.IQ2_XXS, iq))
    with pytest.raises(ValueError, match=r"tensor 'blk\.1\.ffn_down\.weight' \(IQ2_XXS, shape \[256, 512\]\) has type "
                                         r"IQ2_XXS .*does not load; supported types: F32, F16, BF16, Q4_0, .*Q6_K"):
        fxquant.from_gguf(path)
    folder, name = os.path.split(path)
    with pytest.raises(ValueError, match=r"'blk\.1\.ffn_down\.weight' \(IQ2_XXS"):
        AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, quantization_config=FxQuantConfig(spec="gguf"))


def test_unknown_type_id_names_the_tensor(tmp_path):
    path = _file(tmp_path, "x.gguf", "llama", S.llama_metadata(), _llama_tensors())
    data = bytearray(open(path, "rb").read())
    off = _tensor_type_offset(path, "blk.0.attn_v.weight")
    data[off:off + 4] = (99).to_bytes(4, "little")
    open(path, "wb").write(bytes(data))
    with pytest.raises(ValueError, match=r"tensor 'blk\.0\.attn_v\.weight' has ggml type id 99, which the gguf package "
                                         r"does not know"):
        fxquant.from_gguf(path)


def test_truncated_and_foreign_files(tmp_path, files):
    whole = open(files["llama"], "rb").read()
    last = list(GgufFile(files["llama"]).tensors.values())[-1]
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole[:-100])
    with pytest.raises(ValueError, match=rf"tensor '{last.name}' \({last.type_name}, shape .*\) occupies bytes "
                                         r"\d+\.\.\d+ but the file has \d+ bytes: truncated file\?"):
        fxquant.from_gguf(cut)
    cut.write_bytes(whole[:1000])
    with pytest.raises(ValueError, match=r"the file ends inside its header .*truncated file\?"):
        fxquant.from_gguf(cut)
    other = tmp_path / "other.gguf"
    other.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(ValueError, match=r"does not start with the GGUF magic bytes"):
        fxquant.from_gguf(other)
    with pytest.raises(ValueError, match=r"no such file"):
        fxquant.from_gguf(tmp_path / "missing.gguf")
    assert open(files["llama"], "rb").read() == whole  # read only


def _cpu_skeleton(path, **overrides):
    folder, name = os.path.split(path)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    for k, v in overrides.items():
        setattr(config, k, v)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def _snapshot(model):
    return [(n, type(m)) for n, m in model.named_modules()], {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, snap):
    modules, state = snap
    assert [(n, type(m)) for n, m in model.named_modules()] == modules
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], v) for k, v in state.items())


def test_a_model_of_another_shape_is_refused_unchanged(files):
    model = _cpu_skeleton(files["llama"], intermediate_size=768)
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=r"tensor 'blk\.0\.ffn_gate\.weight' \(Q2_K, shape \[512, 256\]\) is "
                                         r"'model\.layers\.0\.mlp\.gate_proj\.weight' of shape \[768, 256\] in "
                                         r"the model"):
        fxquant.from_gguf(files["llama"], model)
    _unchanged(model, snap)


def test_a_tensor_missing_from_the_file_is_refused_unchanged(tmp_path, files):
    path = _file(tmp_path, "m.gguf", "llama", S.llama_metadata(),
                 [t for t in _llama_tensors() if t[0] != "blk.1.ffn_down.weight"])
    model = _cpu_skeleton(files["llama"])
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=r"1 tensors of LlamaForCausalLM are not in the file, e\.g\. "
                                         r"'model\.layers\.1\.mlp\.down_proj\.weight'"):
        fxquant.from_gguf(path, model)
    _unchanged(model, snap)


def test_other_refusals(files):
    model = fxquant.from_gguf(files["llama"], **F32)
    with pytest.raises(ValueError, match="already quantized"):
        fxquant.from_gguf(files["llama"], model)
    with pytest.raises(TypeError, match="must be a Hugging Face model"):
        fxquant.from_gguf(files["llama"], torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"dtype=torch\.int8; valid: torch\.float32"):
        fxquant.from_gguf(files["llama"], dtype=torch.int8)
    with pytest.raises(ValueError, match=r"compute_dtype=torch\.int8; valid: None, torch\.float32"):
        fxquant.from_gguf(files["llama"], compute_dtype=torch.int8)
    from fxquant.checkpoints._gguf_hf import FxQuantGgufHfQuantizer

    with pytest.raises(ValueError, match=r"loads GGUF files: pass gguf_file= to from_pretrained"):
        FxQuantGgufHfQuantizer(FxQuantConfig(spec="gguf"))._process_model_before_weight_loading(
            _cpu_skeleton(files["llama"]))
