"""The native weight decoders to bf16 (fxquant/kernels/native_decode.py): bit for bit the PyTorch
decoders they stand in for, on the dequantize + dense GEMM path that large M takes with AMX."""
import pytest
import torch

import fxquant.ops  # noqa: F401  (registers torch.ops.fxquant.*)
from fxquant.kernels import native_cpu, native_decode
from fxquant.ops import _cpu, bnb4, int4wo
from fxquant.schemes import parse_scheme
from helpers import assert_linear_close

needs_bf16_dot = pytest.mark.skipif(not native_cpu.has_bf16_dot(), reason="needs AVX512-BF16 native kernels")
pytestmark = needs_bf16_dot


def _decoders(qw, monkeypatch):
    """(native, PyTorch) block decoders of an int4wo weight for bf16 blocks."""
    kw = dict(qw.tensors, **{k: qw.attrs[k] for k in ("group_size", "block_n", "out_features", "in_features")},
              dtype=torch.bfloat16)
    native, _, mult = int4wo._block_decoder(**kw)
    assert getattr(native, "transposed", False) and mult == 64
    with monkeypatch.context() as m:
        m.setattr(native_decode, "int4_tiles_decoder_t", lambda *a, **k: None)
        plain, _, _ = int4wo._block_decoder(**kw)
    assert not getattr(plain, "transposed", False)
    return native, plain


@pytest.mark.parametrize("n,k,g", [(300, 576, 128), (130, 4099, 128), (64, 128, 32), (5, 96, 32)])
def test_int4_tile_decoder_is_bitwise_the_pytorch_decoder(n, k, g, monkeypatch):
    """Every block of rows (whole tiles, a partial last tile, a block from a later tile), written
    transposed into a wider buffer: the bf16 bits of the PyTorch decoder's addcmul, nothing outside
    the block's columns touched."""
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(n + k)) * 0.02
    w[0, :g] = 0  # a group of zeros: scale 0 at the floor, zero point exact
    qw = parse_scheme(f"int4wo-{g}").quantize(w)
    native, plain = _decoders(qw, monkeypatch)
    kp = qw.tensors["qweight"].shape[1] * 2
    for r0, r1 in ((0, n), (0, min(n, 64)), (64, min(n, 100)), (max(0, (n - 1) // 64 * 64), n)):
        if r1 <= r0:
            continue
        want = torch.empty(r1 - r0, kp, dtype=torch.bfloat16)
        plain(r0, r1, want)
        wide = torch.full((kp, r1 - r0 + 5), 7.0, dtype=torch.bfloat16)
        native(r0, r1, wide[:, : r1 - r0])
        assert torch.equal(wide[:, : r1 - r0].t().view(torch.int16), want.view(torch.int16)), (r0, r1)
        assert (wide[:, r1 - r0:] == 7).all()


def test_int4_tile_decoder_refuses_a_wrong_buffer_or_block(monkeypatch):
    qw = parse_scheme("int4wo-64").quantize(torch.randn(130, 256))
    native, _ = _decoders(qw, monkeypatch)
    with pytest.raises(ValueError, match="int4 tile decoder"):
        native(0, 64, torch.empty(64, 256, dtype=torch.bfloat16))  # not transposed
    with pytest.raises(ValueError, match="multiple of 64"):
        native(32, 64, torch.empty(256, 32, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="int4 tile decoder"):
        native(0, 64, torch.empty(256, 64, dtype=torch.float32))


@pytest.mark.parametrize("k,piece", [(576, 64), (256, 32), (2048, 256)])
def test_lut4_decoder_is_bitwise_the_fp32_decode_cast(k, piece):
    """Rows of 4-bit table codes -> bf16 of table[code] * scale in fp32, as the PyTorch chunked decode
    and cast; pieces below 32 elements or not dividing K are refused (nothing written)."""
    n = 37
    gen = torch.Generator().manual_seed(k)
    codes = torch.randint(0, 256, (n * k // 2,), dtype=torch.uint8, generator=gen)
    table = torch.randn(16, generator=gen)
    scale = torch.rand(n * k // piece, generator=gen) + 0.01
    q = torch.stack([codes >> 4, codes & 15], -1).reshape(n, k).long()
    want = (table[q] * scale.repeat_interleave(piece).view(n, k)).to(torch.bfloat16)
    out = torch.full((n - 3, k + 8), 7.0, dtype=torch.bfloat16)
    assert native_decode.lut4_into(codes, k=k, r0=3, r1=n, table=table, scale=scale, piece=piece, out=out[:, :k])
    assert torch.equal(out[:, :k].view(torch.int16), want[3:].view(torch.int16))
    assert (out[:, k:] == 7).all()
    blank = torch.zeros(n, k, dtype=torch.bfloat16)
    assert not native_decode.lut4_into(codes, k=k, r0=0, r1=n, table=table, scale=scale.repeat_interleave(2),
                                       piece=piece // 2 if piece == 32 else piece + 1, out=blank)
    assert not blank.any()


def _counting(monkeypatch, module, name):
    """Patches ``module.name`` to record what each call returned."""
    real, results = getattr(module, name), []

    def counted(*a, **kw):
        results.append(real(*a, **kw))
        return results[-1]
    monkeypatch.setattr(module, name, counted)
    return results


@pytest.mark.parametrize("scheme,n,k", [("int4wo-128", 130, 576), ("int4wo-64", 200, 256), ("nf4", 130, 576),
                                        ("fp4", 70, 4128), ("nf4+dq", 200, 256), ("nf4-256+dq", 130, 640)])
def test_amx_large_m_uses_the_native_decoders_with_the_same_result(scheme, n, k, monkeypatch):
    """With AMX, large M dequantizes for oneDNN's GEMM: the native decoders run (and not the PyTorch
    ones), the op's output is bit for bit what it is with the PyTorch decoders, and both are the
    reference within bf16."""
    monkeypatch.setattr(_cpu, "amx", lambda: True)
    gen = torch.Generator().manual_seed(n * k)
    w = torch.randn(n, k, generator=gen) * 0.02
    qw = parse_scheme(scheme).quantize(w)
    op, args = getattr(torch.ops.fxquant, qw.op), tuple(qw.tensors.values())
    x = torch.randn(3, 100, k, generator=gen).to(torch.bfloat16)
    name = "int4_tiles_decoder_t" if scheme.startswith("int4") else "lut4_into"
    results = _counting(monkeypatch, native_decode, name)
    y = op(x, *args, None, **qw.attrs)
    assert results and all(r not in (None, False) for r in results)
    monkeypatch.setattr(native_decode, name, lambda *a, **kw: None if name.startswith("int4") else False)
    assert torch.equal(y, op(x, *args, None, **qw.attrs))
    module = int4wo if scheme.startswith("int4") else bnb4
    opdef = module.OP if qw.op in ("linear_int4wo", "linear_bnb4") else module.OP_DQ
    wd = opdef.dequantized(qw.tensors, {**qw.attrs, "compute_dtype": None})
    ref = opdef.reference(x.float(), *args, None, **qw.attrs)
    assert_linear_close(y, ref, x, wd, 2e-2)


AFFINE = ["affine4-g128", "affine4-g32-fp16", "affine4-ch-sym", "affine4-g7", "affine8-ch-fp16", "affine8-g64-sym",
          "affine3-g16", "affine2-g8-sym", "affine5-g7-fp32", "affine6-g32-fp16", "affine7-ch", "affine3-g128"]


@pytest.mark.parametrize("scheme", AFFINE)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_affine_decoder_is_bitwise_the_pytorch_decoder(scheme, dtype):
    """Rows of integer affine bit streams (every width, groups that divide 16 or not, partial last groups,
    per channel, symmetric) -> the bits of formats.affine.decode_rows in bf16 and fp32, nothing outside
    the block's columns touched; a wrong buffer or scale is refused with nothing written."""
    from fxquant.formats import affine as fmt
    for i, (n, k) in enumerate([(6, 576), (7, 4099), (5, 33), (3, 17), (1, 1), (40, 256)]):
        w = torch.randn(n, k, generator=torch.Generator().manual_seed(i)) * 3
        w[0, : min(k, 8)] = 0
        qw = parse_scheme(scheme).quantize(w)
        t, a = qw.tensors, qw.attrs
        s = t["scale"].float().contiguous()
        zero = None if a["symmetric"] else t["zero_point"]
        for r0, r1 in ((0, n), (n // 2, n)):
            want = torch.empty(r1 - r0, k, dtype=dtype)
            fmt.decode_rows(t["qweight"], t["scale"], t["zero_point"], a["bits"], a["group_size"], k, r0, r1, want)
            wide = torch.full((r1 - r0, k + 5), 7.0, dtype=dtype)
            assert native_decode.affine_rows_into(t["qweight"], bits=a["bits"], group_size=a["group_size"],
                                                  in_features=k, scale=s, zero=zero, r0=r0, r1=r1,
                                                  out=wide[:, :k])
            iv = torch.int16 if dtype == torch.bfloat16 else torch.int32
            assert torch.equal(wide[:, :k].view(iv), want.view(iv)), (n, k, r0, r1)
            assert (wide[:, k:] == 7).all()
    blank = torch.zeros(n, k, dtype=torch.float16)
    assert not native_decode.affine_rows_into(t["qweight"], bits=a["bits"], group_size=a["group_size"],
                                              in_features=k, scale=s, zero=zero, r0=0, r1=n, out=blank)
    assert not native_decode.affine_rows_into(t["qweight"], bits=a["bits"], group_size=a["group_size"],
                                              in_features=k, scale=t["scale"].half(), zero=zero, r0=0, r1=n,
                                              out=blank.float())
    assert not blank.any()


@pytest.mark.parametrize("scheme,n,k", [("affine4-g128", 130, 576), ("affine8-ch-fp16", 70, 256),
                                        ("affine3-g64", 40, 4099)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_affine_large_m_uses_the_native_decoder_with_the_same_result(scheme, n, k, dtype, monkeypatch):
    """linear_affine above its GEMV's rows decodes blocks natively: bit for bit the op's output with the
    PyTorch decoder (bf16 and fp32 activations), and the reference within the policy's rounding."""
    from fxquant.ops import affine
    gen = torch.Generator().manual_seed(n * k)
    qw = parse_scheme(scheme).quantize(torch.randn(n, k, generator=gen) * 0.02)
    op, args = getattr(torch.ops.fxquant, qw.op), tuple(qw.tensors.values())
    x = torch.randn(2, affine.NATIVE_MAX_ROWS + 7, k, generator=gen).to(dtype)
    results = _counting(monkeypatch, native_decode, "affine_rows_into")
    y = op(x, *args, None, **qw.attrs)
    assert results and all(results)
    monkeypatch.setattr(native_decode, "affine_rows_into", lambda *a, **kw: False)
    assert torch.equal(y, op(x, *args, None, **qw.attrs))
    opdef = affine.OP
    wd = opdef.dequantized(qw.tensors, {**qw.attrs, "compute_dtype": None})
    ref = opdef.reference(x.float(), *args, None, **qw.attrs)
    assert_linear_close(y, ref, x, wd, 2e-2)
