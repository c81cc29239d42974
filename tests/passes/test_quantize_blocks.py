"""Large weights are quantized in row blocks (bounded memory) to exactly the bits of one piece."""
import pytest
import torch

from fxquant.schemes import Scheme, parse_scheme
from fxquant.schemes._base import _REGISTRY

SPLITTABLE = ["int8wo", "int4wo-64", "int4wo-32", "float8wo", "float8dq-row", "int8dq", "llm.int8"]


@pytest.mark.parametrize("scheme", SPLITTABLE)
@pytest.mark.parametrize("n, k", [(300, 128), (64 * 5 + 7, 256)])
def test_blocks_give_the_same_bits(scheme, n, k):
    s = parse_scheme(scheme)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(n + k)).to(torch.bfloat16)
    whole = s.quantize(w)
    blocked, err = s.quantize_in_blocks(w, max_elements=k * 70)  # several blocks, a short last one
    assert blocked.attrs == whole.attrs and (blocked.out_features, blocked.in_features) == (n, k)
    assert blocked.tensors.keys() == whole.tensors.keys()
    for name, t in whole.tensors.items():
        assert blocked.tensors[name].dtype == t.dtype and torch.equal(blocked.tensors[name], t), name
    assert err == pytest.approx(s.rel_error(w, whole), rel=1e-4)  # fp32 sums in another order


def test_unsplittable_formats_quantize_whole():
    """A format whose statistics span the weight (tensor-wise float8, OneBit's rank-1 fit) is not split."""
    for scheme in ("float8dq", "onebit"):
        s = parse_scheme(scheme)
        assert s.row_multiple(64, 64) is None
        w = torch.randn(64, 64)
        blocked, _ = s.quantize_in_blocks(w, max_elements=100)
        assert all(torch.equal(blocked.tensors[k], v) for k, v in s.quantize(w).tensors.items())


def test_row_split_names_every_stored_tensor():
    for cls in _REGISTRY:
        if cls.row_split is None:
            continue
        s = parse_scheme(cls.examples[0])
        qw = s.quantize(torch.randn(128, 128))
        assert set(cls.row_split) == set(qw.tensors), cls.__name__
