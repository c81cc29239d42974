"""The Triton VPTQ kernel against the op's reference, on the CPU interpreter (or a GPU if present)."""
import pytest
import torch

from fxquant.formats import vptq as fmt
from fxquant.ops import vptq as op
from fxquant.schemes import parse_scheme
from helpers import triton_kernel

kernel, DEVICE, pytestmark = triton_kernel("vptq")  # skips the module without Triton

# Kernel and reference differ in fp32 summation order (fp32 x, and bf16 routed through fp32 under the
# interpreter); on a GPU 16-bit x meets the decoded tile rounded to its dtype.  Relative Frobenius bounds.
TOL = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 2e-3}
SCHEMES = ["vptq-v8-c16", "vptq-v4-c8-r4", "vptq-v3-c16-r8-o6-ov2-oc4-g3-norm-perm", "vptq-v2-c256-r256-norm",
           "vptq-v5-c4-o3-perm-fp16", "vptq-v4-c65536-r65536"]


def _case(scheme, m, n, k, dtype, with_bias, seed=0):
    s = parse_scheme(scheme)
    lay = s.layout(n, k)
    g = torch.Generator().manual_seed(seed)
    dt = s.codebook_dtype
    idx = torch.randint(0, lay.num_centroids, (lay.group_num, lay.rows, lay.group_size), generator=g)
    res = torch.randint(0, lay.num_res_centroids, idx.shape, generator=g) if lay.num_res_centroids else None
    t = {"indices": fmt.pack_indices(fmt.merge(idx, res, lay.index_bits), lay.total_bits),
         "centroids": torch.randn(lay.group_num, lay.num_centroids * lay.vector_len, generator=g).to(dt)}
    if res is not None:
        t["res_centroids"] = (torch.randn(lay.group_num, lay.num_res_centroids * lay.vector_len, generator=g) / 4).to(dt)
    if lay.outlier_size:
        t["outlier_indices"] = fmt.to_uint16_bits(torch.randint(0, lay.num_outlier_centroids,
                                                                (1, lay.outlier_rows, lay.outlier_size), generator=g))
        t["outlier_centroids"] = torch.randn(1, lay.num_outlier_centroids * lay.outlier_vector_len, generator=g).to(dt)
    if lay.enable_perm:
        t["perm"] = fmt.to_uint16_bits(torch.randperm(k, generator=g))
    if lay.enable_norm:
        t["weight_scale"] = (torch.rand(k, generator=g) + 0.5).to(dt)
        t["weight_bias"] = (torch.randn(k, generator=g) / 10).to(dt)
    qw = s.packed(t, n, k)
    x = torch.randn(m, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype) if with_bias else None
    return x.to(DEVICE), {name: v.to(DEVICE) for name, v in qw.tensors.items()}, qw.attrs, None if bias is None else bias.to(DEVICE)


def _rel(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp(min=1e-12)).item()


def _check(x, t, attrs, bias):
    y = kernel.vptq_linear(x, bias=bias, **t, **attrs)
    ref = op.reference(x, *t.values(), bias, **attrs)
    assert y.dtype == x.dtype and y.shape == ref.shape
    assert _rel(y, ref) <= TOL[x.dtype]


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("m,n,k", [(1, 16, 36), (3, 33, 42), (17, 40, 30)])
def test_matches_reference(scheme, m, n, k):
    if parse_scheme(scheme)._layout_problem(n, k):
        pytest.skip("layout does not fit this shape")
    _check(*_case(scheme, m, n, k, torch.float32, with_bias=m % 2 == 1, seed=m * n + k))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_activations(dtype):
    _check(*_case("vptq-v3-c16-r8-o6-ov2-oc4-g3-norm-perm", 5, 24, 36, dtype, with_bias=True))


def test_strided_activation_and_empty_batch():
    x, t, attrs, bias = _case("vptq-v4-c8-r4-norm-perm", 5, 24, 32, torch.float32, with_bias=True)
    wide = torch.randn(5, 64, device=DEVICE)
    wide[:, ::2] = x
    _check(wide[:, ::2], t, attrs, bias)
    assert kernel.vptq_linear(x[:0], bias=bias, **t, **attrs).shape == (0, 24)


@pytest.mark.parametrize("mutate,match", [
    (lambda x, t, a: (x[:, :-1], t, a), r"x has 31 input features .* in_features=32"),
    (lambda x, t, a: (x.to(torch.int32), t, a), r"x2d must be a 2-D \[M, K\] tensor of dtype"),
    (lambda x, t, a: (x, {**t, "indices": t["indices"][:, 1:]}, a), r"indices must be one of torch.int32"),
    (lambda x, t, a: (x, {**t, "perm": t["perm"][:-1]}, a), r"perm must be one of torch.int16 of shape \(32,\)"),
], ids=["wrong_K", "x_int32", "indices_rows", "perm_len"])
def test_bad_inputs_raise(mutate, match):
    x, t, attrs, _ = _case("vptq-v4-c8-r4-norm-perm", 2, 24, 32, torch.float32, with_bias=False)
    x, t, attrs = mutate(x, t, attrs)
    with pytest.raises(ValueError, match=r"vptq_linear: fxquant::linear_vptq: " + match if "x2d" not in match else match):
        kernel.vptq_linear(x, **t, **attrs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_op_dispatches_to_kernel():
    x, t, attrs, bias = _case("vptq-v8-c256-r256-norm-perm", 7, 72, 96, torch.bfloat16, with_bias=True)
    x = x.cuda().reshape(7, 1, 96)
    y = torch.ops.fxquant.linear_vptq(x, *(v.cuda() for v in t.values()), bias.cuda(), **attrs)
    assert y.is_cuda and y.shape == (7, 1, 72)
