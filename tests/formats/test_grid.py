"""The code grid the algorithms work on (fxquant.formats.grid) is each format's own: RTN through the
grid (fit + encode + Scheme.pack_grid) stores exactly the bytes of the scheme's quantize, and decoding
the grid's codes gives the scheme's dequantization."""
import pytest
import torch

from fxquant.schemes import parse_scheme

SCHEMES = ["int8wo", "int4wo-32", "int4wo-128", "uint4wo-64", "int3wo-32", "uint2wo-16-axis0", "int8wo-128",
           "uint1wo-64", "int4wo-128-axis1", "uint5wo-8-axis0", "int6wo-64"]
SHAPES = [(64, 128), (70, 100), (5, 576), (33, 7)]


def _weight(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[0] = 0  # an all-zero row: the minimum scale
    w[:, 1] *= 20  # an outlier column
    return w


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("shape", SHAPES)
def test_rtn_through_grid_is_the_scheme_quantize(scheme, shape):
    s = parse_scheme(scheme)
    n, k = shape
    w = _weight(n, k)
    grid = s.grid(n, k)
    wg = grid.groups(w)
    assert wg.shape == (grid.num_groups(n, k), grid.group_size)
    q, scale, offset = grid.rtn(wg)
    got, want = s.pack_grid(q, scale, offset, n, k), s.quantize(w)
    assert got.op == want.op and got.attrs == want.attrs
    for name, t in want.tensors.items():
        assert got.tensors[name].dtype == t.dtype and torch.equal(got.tensors[name], t), name
    deq = grid.ungroup(grid.decode(q, scale, offset), n, k)
    assert torch.equal(deq, s.dequantize(want))


@pytest.mark.parametrize("scheme", ["int4wo-64", "uint3wo-32-axis0", "int8wo"])
def test_groups_round_trip(scheme):
    n, k = 37, 90
    w = _weight(n, k, 1)
    grid = parse_scheme(scheme).grid(n, k)
    assert torch.equal(grid.ungroup(grid.groups(w), n, k), w)


def test_formats_without_a_grid():
    for scheme in ["nf4", "onebit", "float8wo", "int8dq"]:
        assert parse_scheme(scheme).grid(64, 64) is None
