"""GPTQ (Frantar et al. 2022): quantize one input column at a time and push each column's error onto
the columns not yet quantized, weighted by the inverse Hessian of the layer's inputs.

For a linear with inputs ``X`` and Hessian ``H = XᵀX`` (calibration pass), the output error of a
weight change ``D`` is ``tr(D H Dᵀ)``.  GPTQ visits the columns in order (or by decreasing
``diag(H)`` with ``act_order``), rounds column ``j`` on the format's grid and updates the remaining
columns by ``-err_j / [H⁻¹]_jj · [H⁻¹]_j,>j`` (OBS), using the upper Cholesky factor of ``H⁻¹``
and lazy block updates of ``block_size`` columns.  ``H`` is damped by ``damp_percent`` of its mean
diagonal; a column no input ever reached (``H_jj = 0``) is set to 0 first.

Group parameters: without ``act_order`` each group's scale / offset is fitted (the format's own
min / max rule, ``Grid.fit``) on the *updated* weights when the first column of the group is
reached; with ``act_order`` every group's parameters are fitted on the original weights before
the pass ("static groups"), so the stored layout is the format's plain one and inference needs no
permutation (no ``g_idx``).  Symmetric or not is the format's (``int<b>wo`` / ``int8wo`` symmetric,
``uint<b>wo`` / ``int4wo`` with an offset): GPTQConfig's ``sym`` chooses the format.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ._base import Method, MethodResult, Stats, check_number, column_grid_reason, quadratic_error

__all__ = ["GPTQ", "gptq_codes"]


@dataclass(frozen=True, kw_only=True)
class GPTQ(Method):
    """``@gptq``: ``damp_percent`` (of the mean Hessian diagonal, default 0.01), ``block_size``
    (columns per lazy update, 128), ``act_order`` (desc_act: columns by decreasing ``diag(H)``,
    with static groups; default True), ``true_sequential`` (calibrate each layer on the outputs of the
    already-quantized layers before it; default on)."""

    name: ClassVar[str] = "gptq"
    needs_data: ClassVar[bool] = True
    needs_hessian: ClassVar[bool] = True
    damp_percent: float = 0.01
    block_size: int = 128
    #: on by default: with static groups it costs nothing at inference, and it halved the loss on
    #: SmolLM2 (int4 g64 +21.0 % -> +11.3 %, 3-bit g64 +143 % -> +86 %; docs/accuracy.md).
    #: GPTQConfig's ``desc_act`` (default False there) sets it explicitly.
    act_order: bool = True
    true_sequential: bool = True

    def __post_init__(self):
        check_number("GPTQ", "damp_percent", self.damp_percent, lo=0, hi=1, lo_open=True,
                     valid="a number in (0, 1]")
        check_number("GPTQ", "block_size", self.block_size, kind=int, lo=1)
        for name in ("act_order", "true_sequential"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"GPTQ.{name}={getattr(self, name)!r} is not valid; valid: True, False")

    @property
    def sequential(self) -> bool:
        return self.true_sequential

    def unsupported_reason(self, scheme) -> str | None:
        return column_grid_reason("GPTQ", scheme)

    def quantize(self, scheme, weight: torch.Tensor, stats: Stats | None) -> MethodResult:
        if stats is None or stats.hessian is None:
            raise ValueError(f"GPTQ needs calibration statistics with a Hessian for {scheme}")
        n, k = weight.shape
        grid = scheme.grid(n, k)
        q, scale, offset, info = gptq_codes(weight, stats.hessian, grid, self.damp_percent, self.block_size,
                                            self.act_order)
        # never worse than RTN on GPTQ's own objective (seen at 2 bits with groups fitted on the updated
        # weights: the error feedback widens later groups' ranges)
        h, w = stats.hessian.float(), weight.detach().float()
        ours = quadratic_error(w - grid.ungroup(grid.decode(q, scale, offset), n, k), h)
        rq, rs, ro = grid.rtn(grid.groups(w))
        rtn = quadratic_error(w - grid.ungroup(grid.decode(rq, rs, ro), n, k), h)
        info.update(output_error=ours, rtn_output_error=rtn)
        if not ours < rtn:
            info["fallback"] = "rtn"
            info["reason"] = "its output error on the calibration data was not below RTN's"
            return MethodResult(scheme.quantize(weight.contiguous()), info=info)
        return MethodResult(scheme.pack_grid(q, scale, offset, n, k), info=info)


def gptq_codes(weight: torch.Tensor, hessian: torch.Tensor, grid, damp_percent: float = 0.01,
               block_size: int = 128, act_order: bool = False):
    """GPTQ on ``grid`` (axis 1): ``(codes [groups, g], scale [groups], offset [groups], info)`` in
    the grid's group layout (``Scheme.pack_grid``'s input)."""
    w = weight.detach().float().clone()
    n, k = w.shape
    g = grid.group_size
    ngroups = -(-k // g)
    h = hessian.detach().float().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    if act_order:
        perm = torch.argsort(torch.diagonal(h), descending=True, stable=True)
        scale, offset = (p.reshape(n, ngroups) for p in grid.fit(grid.groups(w)))  # static groups
    else:
        perm = torch.arange(k)
        scale = torch.empty(n, ngroups)
        offset = torch.empty(n, ngroups)
    invperm = torch.argsort(perm)
    # one row per input column, in visiting order: each step of the column loop reads and updates
    # contiguous rows of N values
    wt, h = w.t()[perm].contiguous(), h[perm][:, perm]
    damp = damp_percent * torch.diagonal(h).mean()
    h.diagonal().add_(damp)
    hinv = _upper_inverse_cholesky(h)
    codes = torch.empty(k, n)
    threads = torch.get_num_threads()
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = wt[i1:i2].clone()
        err1 = torch.empty(i2 - i1, n)
        hinv1 = hinv[i1:i2, i1:i2]
        # the column loop runs vector ops of N elements: one thread (OpenMP's fork/join per op costs
        # more than the op: 576x1536 took 11.8 s with 2 threads on a busy machine, 0.32 s with 1)
        torch.set_num_threads(1)
        try:
            _columns(wt, w1, err1, hinv1, codes, scale, offset, grid, perm, i1, i2, g, act_order)
        finally:
            torch.set_num_threads(threads)
        wt[i2:].sub_(hinv[i1:i2, i2:].t() @ err1)
    codes = codes[invperm].t().add_(grid.mid)
    kp = ngroups * g
    if kp > k:  # padded columns: copies of column K - 1's code (they meet only zero activations)
        codes = torch.cat([codes, codes[:, -1:].expand(n, kp - k)], 1)
    info = {"damp": float(damp), "dead_columns": int(dead.sum())}
    return codes.reshape(-1, g), scale.reshape(-1), offset.reshape(-1), info


def _columns(wt, w1, err1, hinv1, codes, scale, offset, grid, perm, i1, i2, g, act_order) -> None:
    """One block of GPTQ's column loop (columns ``i1 .. i2`` in visiting order; ``wt`` / ``w1`` / ``err1``
    / ``codes`` hold one input column per row)."""
    cols = perm[i1:i2].tolist()
    diag = hinv1.diagonal().tolist()
    lo, hi = grid.qlo - grid.mid, grid.qhi - grid.mid
    if act_order:  # static groups: every column's parameters are known, gathered once per block
        grps = perm[i1:i2] // g
        s_blk, o_blk = scale[:, grps].t().contiguous(), offset[:, grps].t().contiguous()
    for i, col in enumerate(cols):
        if act_order:
            s, o = s_blk[i], o_blk[i]
        else:
            grp = col // g
            if col % g == 0:  # the group starts here: fit it on the updated weights
                cur = torch.cat([w1[i:], wt[i2:]])[:g]
                scale[:, grp], offset[:, grp] = grid.fit(cur.t())
            s, o = scale[:, grp], offset[:, grp]
        col_w = w1[i]
        # Grid.encode / decode of one column, inline (this loop runs once per input column), in
        # codes relative to mid
        u = torch.sub(col_w, o).div_(s).round_().clamp_(lo, hi)
        codes[i1 + i] = u
        e = col_w.sub(torch.addcmul(o, u, s)).div_(diag[i])
        w1[i:].addr_(hinv1[i, i:], e, alpha=-1.0)  # the OBS update, rank one, in place
        err1[i] = e


def _upper_inverse_cholesky(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of ``H⁻¹``, adding more damping if ``H`` is not numerically positive definite."""
    extra = 0.0
    mean = float(torch.diagonal(h).mean())
    for _ in range(8):
        hh = h if extra == 0 else h + extra * mean * torch.eye(h.shape[0])
        chol, info = torch.linalg.cholesky_ex(hh)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(chol)
            up, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0:
                return up
        extra = 0.01 if extra == 0 else extra * 10
    raise ValueError("GPTQ: the Hessian is not positive definite even with extra damping")
