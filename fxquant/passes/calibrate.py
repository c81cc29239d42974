"""Calibrate pass: run the calibration data through the traced graph, collect each site's input
statistics, and quantize the sites whose method needs them (GPTQ, AWQ, OneBit).

Two ways to run the data, both over the traced graph (the same for ``compile`` and ``quantize_``):

- **observers** (no method asks for sequential calibration): an observer module is inserted after
  each distinct input of the calibrated sites (a graph rewrite, removed afterwards), the batches run
  once, one at a time (tqdm progress bar), and each observer streams its statistics
  (:class:`~fxquant.methods.Stats`: per-channel absmax and mean ``|x|``, token count, ``H = XᵀX``
  only where a method needs it) plus, for sites quantized without data (RTN, HQQ), their output
  error against the float output.  No activation is kept.  Then the data-driven sites are quantized.
- **sequential** (GPTQ's ``true_sequential``, on by default): the graph is walked node by node with
  every batch at once; at each site the statistics of its input are taken, the site is quantized
  there, and its output is computed by the site's own op on the packed weight, one call per batch
  (the deployed numerics and fast kernels), so every later site is calibrated on exactly what the
  quantized model feeds it; when an AWQ group's scale folds into the norm before it, the norm is
  run again with the divided weight.  The walk holds the live intermediate values of all
  calibration batches (as a layer-by-layer GPTQ caches a block's inputs), never more than the
  graph's own live set.  There every group's ``H`` is taken (transient) and gives the output errors.

Sites reading the same input share one :class:`Stats` (q / k / v); AWQ quantizes such a group
together (one input scale) and its inverse scale is folded into the op that produces the input when
that op feeds only these sites and is a multiplication by a 1-D parameter (a norm's weight), a
linear, or a product with such a linear (``down_proj(act(gate_proj(x)) * up_proj(x))``: ``up_proj``'s
output rows); otherwise the input is divided by it just before each site (``site.input_scale``).
Folds into a linear are made in observer mode only, where the groups are quantized last site first
(the folded linear, quantized after the site whose scale it takes, is quantized with its rows
divided); the sequential walk has already run the linear when it meets the later site.  Folds into
parameters are recorded in ``ctx.folds`` and applied by the emit (the user's model is changed only
by ``quantize_``).
"""
from __future__ import annotations

import operator
import time
import warnings
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import experts
from ..methods import Stats
from ..ops._experts import expert_rows, group_ends
from ..methods._base import quadratic_error
from ..modules import QuantizedLinear
from ._base import InputError, PassContext, PassResult, Site, get_attr_path, meta, node_arg
from .calibration_inputs import as_call, batches, check_guards, flat_inputs, graph_calls, real_tokens, token_mask
from .quantize import check_supported, method_of, quantize_experts, quantize_site

_MULS = {torch.ops.aten.mul.Tensor, operator.mul, torch.mul}
_LAYER_NORMS = {torch.ops.aten.layer_norm.default, F.layer_norm, torch.layer_norm}


@dataclass
class Fold:
    """An AWQ inverse scale folded into a 1-D parameter: ``attr`` becomes ``attr / scale``."""

    attr: str
    scale: torch.Tensor
    sites: list[str]
    axis: int = 0  # the axis of a 2-D parameter (a linear's weight) the scale runs along
    rows: bool = False  # a linear's output rows (its weight), not a 1-D parameter

    def divided(self, p: torch.Tensor) -> torch.Tensor:
        """``p / scale`` along ``axis``, in ``p``'s dtype (what the folded parameter becomes, in either emit)."""
        shape = [1] * p.dim()
        shape[self.axis] = -1
        return (p.detach().float() / self.scale.reshape(shape)).to(p.dtype)

    def note(self) -> str:
        return f"{'output rows ' if self.rows else ''}divided by the AWQ input scale of {', '.join(self.sites)}"


def calibrate(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """Quantize every site whose method needs data from statistics of ``ctx.calibration`` (and measure the others' output error)."""
    candidates = [s for s in ctx.sites if s.scheme is not None and not s.reason]
    needy = [s for s in candidates if method_of(s).needs_data]
    if ctx.calibration is None:
        if needy:
            by_method = {}
            for s in needy:
                by_method.setdefault(str(method_of(s)), []).append(s.name)
            what = "; ".join(f"{m}: {', '.join(names[:4])}{' ...' if len(names) > 4 else ''} ({len(names)} sites)"
                             for m, names in by_method.items())
            raise InputError(f"these methods need calibration data and none was given ({what}); pass "
                             "calibration=<iterable of model inputs> to fxquant.compile / quantize_ (to from_pretrained: "
                             "FxQuantConfig(spec=..., calibration=[texts or model inputs])); RTN and HQQ need none"
                             + ("; the spec's calibration_texts (a config's dataset) are tokenized only by "
                                "FxQuantConfig, which has the model's tokenizer: tokenize them and pass the "
                                "result as calibration" if ctx.spec.calibration_texts else ""))
        return PassResult(gm)
    check_supported(candidates, lambda site: _weight(gm, site))
    # experts: calibrated only by a data method (each expert on the rows routed to it); data-free ones
    # are quantized by the quantize pass
    sites = [s for s in candidates if not s.reason and (not s.experts or method_of(s).needs_data)]
    if not sites:
        return PassResult(gm)
    if any(method_of(s).sequential for s in sites):
        _Walk(gm, ctx, sites).run(list(ctx.calibration))
    else:
        _observe(gm, ctx, sites)
    _few_tokens(ctx, sites)
    return PassResult(gm)


def _few_tokens(ctx: PassContext, sites: list[Site]) -> None:
    """Warn (and note in the report) when a Hessian method saw fewer tokens than its layers' inputs:
    ``H = XᵀX`` is then rank-deficient and the method fits the calibration data, not the model."""
    _unseen_experts(ctx, sites)
    thin = [(s, s.result.get("calibration_tokens", 0)) for s in sites if not s.experts
            and method_of(s).needs_hessian and s.result.get("calibration_tokens", 0) < s.out_shape[1]]
    if not thin:
        return
    site, tokens = thin[0]
    msg = (f"calibration gave {tokens} tokens, fewer than the {site.out_shape[1]} inputs of {site.name} "
           f"({len(thin)} such sites, method {method_of(site).name}): the Hessian XᵀX is rank-deficient and the "
           "result can be worse than round-to-nearest; give many more tokens than any layer has inputs "
           "(GPTQ is usually calibrated on 128 samples x 2048 tokens)")
    warnings.warn(f"fxquant: {msg}", stacklevel=2)
    ctx.notes.append(msg)


def _unseen_experts(ctx: PassContext, sites: list[Site]) -> None:
    """Note the experts no calibration token was routed to (rounded to nearest instead)."""
    unseen = [(s.name, s.result["experts_rounded_to_nearest"]) for s in sites
              if s.experts and s.result.get("experts_rounded_to_nearest")]
    if unseen:
        shown = ", ".join(f"{name} ({n})" for name, n in unseen[:3])
        ctx.notes.append(f"{sum(n for _, n in unseen)} experts saw no calibration token and were rounded to nearest "
                         f"(by weight: {shown}{' ...' if len(unseen) > 3 else ''}); more or more varied calibration "
                         "data reaches more experts")


# -- experts ---------------------------------------------------------------------------------------
def _grouped_input(site: Site, x: torch.Tensor, offs) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x [rows, K], offs)`` of an experts site's input: as given for a grouped matmul; for a ``bmm``
    site x ``[E, T, K]`` flattened, expert e's rows ending at ``(e + 1) * T``."""
    if site.kind != "bmm":
        return x, offs
    e, t, k = x.shape
    return x.reshape(-1, k), group_ends(e, t)


def _channel_stats(sites: list[Site]) -> bool:
    """Whether any of ``sites``' methods reads the per-channel statistics (``Stats.absmax`` / ``mean_abs``)."""
    return any(method_of(s).needs_channel_stats for s in sites)


def _expert_stats(site: Site, pairs) -> list[Stats]:
    """Each expert's statistics over the ``(x, offs)`` pairs of the calibration batches."""
    stats = [Stats(site.out_shape[1]) for _ in range(site.experts)]
    method = method_of(site)
    for x, offs in pairs:
        x, offs = _grouped_input(site, x, offs)
        for e, a, b in expert_rows(offs.tolist()):
            stats[e].update(x[a:b], method.needs_hessian, method.needs_channel_stats)
    return stats


def _quantize_experts(gm, site: Site, stats: list[Stats]) -> None:
    """The site's experts, each from its own statistics; output errors from the Hessians when taken."""
    w = _weight(gm, site)
    quantize_experts(site, w, stats)
    if site.qweight is not None and all(st.hessian is not None or st.tokens == 0 for st in stats):
        err = ref = 0.0
        for e, st in enumerate(stats):
            if st.tokens:
                deq = _expert_effective(site, e)
                we = w[e].float()
                err, ref = err + quadratic_error(we - deq, st.hessian), ref + quadratic_error(we, st.hessian)
        site.result.update(_output_errors(err, ref, sum(st.tokens for st in stats), site.out_shape[0]))
    for st in stats:
        st.hessian = None


def _expert_effective(site: Site, e: int) -> torch.Tensor:
    """Expert ``e``'s float weight as the quantized site multiplies by it (AWQ's input scale included)."""
    deq = site.scheme.format.dequantize(experts.select(site.qweight, e))
    return deq if site.input_scale is None else deq / site.input_scale[e]


def _experts_output(gm, site: Site, x: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """The grouped matmul with the site's quantized experts, through their experts op as the emitted
    model computes it (the float experts if the site stayed float)."""
    shape = x.shape
    x, offs = _grouped_input(site, x, offs)
    if site.qweight is not None:
        y = experts.grouped(x, site.qweight, offs, site.input_scale)
    else:
        y = x.new_zeros((x.shape[0], site.out_shape[0]))
        w = _weight(gm, site)
        for e, a, b in expert_rows(offs.tolist()):
            y[a:b] = F.linear(x[a:b], w[e].to(x.dtype))
    return y.reshape(shape[0], shape[1], -1) if site.kind == "bmm" else y


class _ExpertObserver(torch.nn.Module):
    """Keeps each calibration batch's rows per expert as statistics (``forward(x, offs)``)."""

    def __init__(self, site: Site):
        super().__init__()
        self.site = [site]
        self.stats = [Stats(site.out_shape[1]) for _ in range(site.experts)]

    def forward(self, x: torch.Tensor, offs: torch.Tensor | None) -> torch.Tensor:
        method = method_of(self.site[0])
        xs, offs = _grouped_input(self.site[0], x, offs)
        for e, a, b in expert_rows(offs.tolist()):
            self.stats[e].update(xs[a:b], method.needs_hessian, method.needs_channel_stats)
        return x


# -- shared -----------------------------------------------------------------------------------------
def _weight(gm: torch.fx.GraphModule, site: Site, divided: bool = True) -> torch.Tensor:
    """The site's float weight ``[N, K]``, with the rows an AWQ fold divides divided (``divided``; else as
    the float model has it)."""
    w = get_attr_path(gm, site.weight_attr).detach()
    if site.out_fold is not None and divided:  # the stored parameter divided along its output axis, as the emit does
        w = site.out_fold.divided(w)
    return w.transpose(-2, -1) if site.transposed else w  # experts: [E, N, K]


def _x_node(site: Site):
    return node_arg(site.node, site.graph.x_arg)


def _groups(sites: list[Site]) -> dict:
    """Sites by their input node (in graph order)."""
    out: dict = {}
    for s in sites:
        out.setdefault(_x_node(s), []).append(s)
    return out


def _quantize_group(gm, ctx: PassContext, x_node, group: list[Site], stats: Stats | None,
                    out_err: dict | None = None, linears: bool = False) -> None:
    """Quantize one input group's sites (AWQ ones together) and decide where AWQ's scale goes
    (``linears``: it may go into a preceding linear not quantized yet)."""
    awq = [s for s in group if method_of(s).name == "awq" and s.qweight is None]
    if awq:
        weights = [_weight(gm, s) for s in awq]
        fold = _fold_target(gm, ctx, x_node, group, linears) if len(awq) == len(group) else None
        movable = fold is not None or all(ctx.input_scale_ok is None or ctx.input_scale_ok(s, ctx.sites) for s in awq)
        t0 = time.perf_counter()
        results = method_of(awq[0]).quantize_group([s.scheme.format for s in awq], weights, stats,
                                                   scale_search=movable)
        seconds = (time.perf_counter() - t0) / len(awq)
        scale = results[0].input_scale
        for s, w, r in zip(awq, weights, results):
            quantize_site(s, w, stats, result=r, seconds=seconds)
            if not movable:
                s.result["awq_input_scale"] = ("none: the input is not a norm / mul feeding only these sites and "
                                               "this site's weight also serves another site (clip search only)")
        if scale is not None:
            for s in awq:
                s.awq_scale = scale
            if isinstance(fold, Site):
                where = _fold_into_linear(gm, ctx, fold, scale, [s.name for s in awq])
            elif fold is not None:  # a norm's parameters: its weight (and a LayerNorm's bias)
                attrs = (fold,) if isinstance(fold, str) else fold
                ctx.folds.extend(Fold(a, scale, [s.name for s in awq]) for a in attrs)
                where = f"folded into {' and '.join(attrs)}"
            else:
                for s in awq:
                    s.input_scale = scale
                where = "applied to the input before the op"
            for s in awq:
                s.result["awq_input_scale"] = where
    for s in group:
        if s.qweight is None:
            quantize_site(s, _weight(gm, s), stats)
        if out_err is not None and s.name in out_err:
            s.result.update(_output_errors(*out_err[s.name], stats.tokens, s.out_shape[0]))
        elif out_err is not None and stats.hessian is not None:  # from H: sum ||x Dᵀ||² = tr(D H Dᵀ)
            s.result.update(_output_errors(*_hessian_errors(s, _weight(gm, s, divided=False), stats.hessian),
                                           stats.tokens, s.out_shape[0]))


def _effective(site: Site) -> torch.Tensor:
    """The float model's weight as the quantized site stands for it, ``x`` to the float model's output:
    the dequantized weight divided by AWQ's input scale (wherever its inverse went: the input, a folded
    norm) and its rows multiplied back by a fold a later site's scale made into them."""
    wq = site.scheme.format.dequantize(site.qweight)
    if site.awq_scale is not None:
        wq = wq / site.awq_scale
    if site.out_fold is not None:
        wq = wq * site.out_fold.scale.float().reshape(-1, 1)
    return wq


def _hessian_errors(site: Site, w: torch.Tensor, h: torch.Tensor) -> tuple[float, float]:
    """``(tr(D H Dᵀ), tr(W H Wᵀ))``: the output error and the float output's energy."""
    w = w.float()
    return quadratic_error(w - _effective(site), h), quadratic_error(w, h)


def _fold_target(gm, ctx: PassContext, x_node, group: list[Site], linears: bool) -> str | tuple | Site | None:
    """Where the inverse scale of ``group``'s input ``x_node`` can go, if it feeds only ``group``: the
    1-D parameter ``p`` when ``x_node`` is ``p * t`` (an RMSNorm's weight), a layer norm's weight and
    bias (a tuple of their paths); with ``linears``, the linear site that computes ``x_node``, or one
    factor of ``x_node = a * b`` (``up_proj`` in ``act(gate_proj(x)) * up_proj(x)``)."""
    if not isinstance(x_node, torch.fx.Node) or set(x_node.users) != {s.node for s in group}:
        return None
    k = group[0].out_shape[1]
    if linears and (site := _foldable_linear(gm, ctx, x_node, k)) is not None:
        return site
    if x_node.op == "call_function" and x_node.target in _LAYER_NORMS:
        return _layer_norm_params(gm, x_node, k)
    if x_node.op != "call_function" or x_node.target not in _MULS:
        return None
    factors = x_node.args[:2]
    for a in factors:
        if isinstance(a, torch.fx.Node) and a.op == "get_attr" and len(a.users) == 1:
            p = get_attr_path(gm, a.target)
            if isinstance(p, torch.Tensor) and p.shape == (k,):
                return a.target
    if linears and len(factors) == 2 and factors[0] is not factors[1]:  # x * x would be divided twice
        for a in factors:
            if isinstance(a, torch.fx.Node) and set(a.users) == {x_node}:
                site = _foldable_linear(gm, ctx, a, k)
                if site is not None:
                    return site
    return None


def _layer_norm_params(gm, node: torch.fx.Node, k: int) -> tuple | None:
    """A layer norm's ``(weight[, bias])`` paths when both are ``[k]`` parameters read by it alone
    (``(norm(x) w + b) / s = norm(x) (w / s) + b / s``); ``None`` without a weight to take the scale."""
    args = list(node.args) + [None] * (5 - len(node.args))
    weight, bias = node.kwargs.get("weight", args[2]), node.kwargs.get("bias", args[3])
    if weight is None:
        return None
    attrs = []
    for a in (weight, bias):
        if a is None:
            continue
        if not (isinstance(a, torch.fx.Node) and a.op == "get_attr" and len(a.users) == 1):
            return None
        p = get_attr_path(gm, a.target)
        if not (isinstance(p, torch.Tensor) and p.shape == (k,)):
            return None
        attrs.append(a.target)
    return tuple(attrs)


def _foldable_linear(gm, ctx: PassContext, node: torch.fx.Node, k: int) -> Site | None:
    """The linear site computing ``node`` with ``k`` outputs, when its rows can still take a fold: not
    quantized yet, its weight read by nothing else, its bias (if any) a parameter."""
    site = next((s for s in ctx.sites if s.node is node), None)
    if (site is None or site.experts or site.out_shape is None or site.out_shape[0] != k or site.qweight is not None
            or site.out_fold is not None or site.weight_attr is None
            or sum(s.weight_attr == site.weight_attr for s in ctx.sites) != 1):
        return None
    if _bias_attr(site) is False:
        return None
    for use in gm.graph.nodes:  # the weight's get_attr feeds this site only (directly or by a transpose)
        if use.op == "get_attr" and use.target == site.weight_attr:
            for user in use.users:
                if user is not node and not (set(user.users) == {node} and user.op == "call_function"):
                    return None
    return site


def _bias_attr(site: Site) -> str | None | bool:
    """The dotted path of the site's bias parameter, ``None`` without a bias, ``False`` when it is
    computed by the graph (no parameter to fold into)."""
    ref = site.graph
    if site.kind == "call_module":
        return ref.bias or None
    b = node_arg(site.node, ref.bias)
    if b is None:
        return None
    return b.target if isinstance(b, torch.fx.Node) and b.op == "get_attr" else False


def _fold_into_linear(gm, ctx: PassContext, site: Site, scale: torch.Tensor, names: list[str]) -> str:
    """Divide ``site``'s output rows (weight and bias) by ``scale``: a float site's weight through
    ``ctx.folds``, a site still to be quantized by quantizing its divided rows (``site.out_fold``)."""
    site.out_fold = Fold(site.weight_attr, scale, names, axis=1 if site.transposed else 0, rows=True)
    if site.scheme is None or site.reason:  # stays float: the emit divides the parameter
        ctx.folds.append(site.out_fold)
    bias = _bias_attr(site)
    if bias:
        ctx.folds.append(Fold(bias, scale, names))
    return f"folded into {site.name} (its output rows)"


def _output_errors(err: float, ref: float, tokens: int, n: int) -> dict:
    return {"output_squared_error": err, "mean_output_squared_error": err / max(tokens * n, 1),
            "relative_output_squared_error": err / ref if ref > 0 else 0.0, "calibration_tokens": tokens}


# -- observers --------------------------------------------------------------------------------------
class _Observer(torch.nn.Module):
    """Streams one input's statistics; for sites already quantized, their output error too."""

    def __init__(self, gm, sites: list[Site], hessian: bool, mask: list):
        super().__init__()
        self.stats = Stats(sites[0].out_shape[1])
        self.hessian, self.channels = hessian, _channel_stats(sites)
        self.gm, self.sites = [gm], sites  # a list: not a submodule
        self.mask = mask  # [the current call's real tokens or None], set by the pass per call
        self.err = {s.name: [0.0, 0.0] for s in sites if s.qweight is not None}

    def forward(self, x_in: torch.Tensor) -> torch.Tensor:
        x = real_tokens(x_in, self.mask[0])
        self.stats.update(x, self.hessian, self.channels)
        xf = x.float()
        for s in self.sites:
            if s.name in self.err:  # ||x Dᵀ||² with D = W - Ŵ (dequantized per batch: cheaper than the product)
                w = _weight(self.gm[0], s, divided=False).float()
                e = self.err[s.name]
                e[0] += float(F.linear(xf, w - _effective(s)).pow(2).sum())
                e[1] += float(F.linear(xf, w).pow(2).sum())
        return x_in


def _observe(gm: torch.fx.GraphModule, ctx: PassContext, sites: list[Site]) -> None:
    for s in sites:  # data-free methods first: their observers measure the output error as data runs
        if not method_of(s).needs_data:
            quantize_site(s, _weight(gm, s), None)
    groups = _groups([s for s in sites if not s.experts])
    observers, mask = [], [None]
    for i, (x_node, group) in enumerate(groups.items()):
        obs = _Observer(gm, group, any(method_of(s).needs_hessian for s in group), mask)
        name = f"_fxquant_observer_{i}"
        gm.add_submodule(name, obs)
        with gm.graph.inserting_after(x_node):
            node = gm.graph.call_module(name, (x_node,))
        observers.append((name, node, obs))
    expert_obs = []
    for i, site in enumerate(s for s in sites if s.experts):
        obs = _ExpertObserver(site)
        name = f"_fxquant_expert_observer_{i}"
        gm.add_submodule(name, obs)
        with gm.graph.inserting_before(site.node):
            node = gm.graph.call_module(name, (_x_node(site), node_arg(site.node, site.graph.offs)))
        expert_obs.append((name, node, obs))
    gm.recompile()
    try:
        with torch.no_grad():
            for i, (args, kwargs) in enumerate(tqdm(batches(ctx.calibration), desc="fxquant: calibrating",
                                                    unit="batch", disable=None, leave=False)):
                for args, kwargs in graph_calls(gm, ctx.model, args, kwargs):
                    check_guards(gm, f"calibration[{i}]", args, kwargs)
                    mask[0] = token_mask(gm, args, kwargs)  # a padded batch: its real tokens only
                    gm(*args, **kwargs)
    finally:
        for name, node, _ in observers + expert_obs:
            gm.graph.erase_node(node)
            delattr(gm, name)
        gm.recompile()
    if observers and observers[0][2].stats.tokens == 0:
        raise InputError("calibration is empty: it yielded no batch")
    for _, _, obs in expert_obs:
        _quantize_experts(gm, obs.site[0], obs.stats)
    # last group first: a linear that takes a later group's AWQ scale in its rows is quantized after it
    for (x_node, group), (_, _, obs) in reversed(list(zip(groups.items(), observers))):
        _quantize_group(gm, ctx, x_node, group, obs.stats, obs.err, linears=True)
        obs.stats.hessian = None


# -- sequential walk --------------------------------------------------------------------------------
class _Walk:
    """Runs the graph node by node over every batch at once, quantizing each site where it is."""

    def __init__(self, gm: torch.fx.GraphModule, ctx: PassContext, sites: list[Site]):
        self.gm, self.ctx = gm, ctx
        self.by_node = {s.node: s for s in sites}
        self.groups = _groups([s for s in sites if not s.experts])
        self.done_groups: set = set()
        # the inputs of a node whose value an AWQ fold may recompute (_refold) live until its group is done
        self.deferred = {x: () for x, g in self.groups.items() if all(method_of(s).name == "awq" for s in g)}

    def run(self, batches: list) -> None:
        calls = [as_call(b, f"calibration[{i}]") for i, b in enumerate(batches)]
        if not calls:
            raise InputError("calibration is empty: it yielded no batch")
        interps = []
        rows = []
        for i, (args, kwargs) in enumerate(calls):
            for row in graph_calls(self.gm, self.ctx.model, args, kwargs):
                check_guards(self.gm, f"calibration[{i}]", *row)
                rows.append(row)
        self.masks = [token_mask(self.gm, *row) for row in rows]  # a padded batch: its real tokens only
        for args, kwargs in rows:
            it = torch.fx.Interpreter(self.gm, garbage_collect_values=False)
            it.args_iter = iter(flat_inputs(self.gm, args, kwargs))
            interps.append(it)
        last_use = _last_uses(self.gm.graph)
        bar = tqdm(total=len(self.by_node), desc="fxquant: calibrating (sequential)", unit="layer",
                   disable=None, leave=False)
        left = len(self.by_node)
        with torch.no_grad():
            for node in self.gm.graph.nodes:
                if node.op == "output" or left == 0:  # nothing after the last site is needed (a float
                    break  # lm_head over every batch at once would be vocab x tokens x 4 bytes)
                left -= node in self.by_node
                site = self.by_node.get(node)
                if site is None:
                    for it in interps:
                        it.env[node] = it.run_node(node)
                elif site.experts:
                    self._experts(site, interps)
                    bar.update(1)
                else:
                    self._site(site, interps)
                    bar.update(1)
                if node in self.deferred:
                    self.deferred[node] = last_use.get(node, ())
                    continue
                self._free(last_use.get(node, ()), interps)
        bar.close()

    def _site(self, site: Site, interps) -> None:
        node, x_node = site.node, _x_node(site)
        xs = [it.env[x_node] for it in interps]
        if x_node not in self.done_groups:
            # H for every group here: it is transient (freed once the group is quantized) and gives
            # each site's output error as tr(D H Dᵀ), cheaper than two more products per batch
            group = self.groups[x_node]
            stats = Stats(site.out_shape[1])
            channels = _channel_stats(group)
            for x, mask in zip(xs, self.masks):
                stats.update(real_tokens(x, mask), hessian=True, channels=channels)
            _quantize_group(self.gm, self.ctx, x_node, group, stats, out_err={})
            stats.hessian = None
            self.done_groups.add(x_node)
            xs = self._refold(x_node, group, interps) or xs
            self._free(self.deferred.pop(x_node, ()), interps)
        # the product the quantized model computes: its own op, one call per batch as the model
        # makes it (the deployed numerics, which may depend on the rows per call: e.g. fp32
        # activations rounded once to bf16 on a CPU with fast bf16, bf16 results rounded by the path
        # the rows select), with the bias inside the op when it is one tensor for every batch
        biases = [self._bias(site, it) for it in interps]
        shared = biases[0] if all(b is biases[0] for b in biases) else None
        layer = QuantizedLinear(site.qweight, shared, input_scale=site.input_scale)
        for it, x, bias in zip(interps, xs, biases):
            yq = layer(x)
            it.env[node] = yq if shared is not None or bias is None else yq + bias.to(yq.dtype)
        meta(node)["calibrated"] = True

    @staticmethod
    def _free(values, interps) -> None:
        for dead in values:
            for it in interps:
                it.env.pop(dead, None)

    def _refold(self, x_node, group: list[Site], interps) -> list | None:
        """When the group's AWQ scale was just folded into ``x_node``'s parameter (a norm's weight),
        ``x_node`` run again with the divided parameter, as the emitted model computes it."""
        names = {s.name for s in group}
        folds = [f for f in self.ctx.folds if not f.rows and names & set(f.sites)]  # a norm's weight (and bias)
        if not folds:
            return None
        args = [*x_node.args, *x_node.kwargs.values()]
        params = {next(a for a in args if isinstance(a, torch.fx.Node) and a.op == "get_attr" and a.target == f.attr):
                  f.divided(get_attr_path(self.gm, f.attr)) for f in folds}
        for it in interps:
            it.env.update(params)
            it.env[x_node] = it.run_node(x_node)
            for param in params:
                del it.env[param]
        return [it.env[x_node] for it in interps]

    def _experts(self, site: Site, interps) -> None:
        """An experts site: each expert quantized from the rows routed to it, then the grouped product
        with the quantized experts for the sites after it."""
        offs_node = node_arg(site.node, site.graph.offs)
        pairs = [(it.env[_x_node(site)], it.env[offs_node] if isinstance(offs_node, torch.fx.Node) else offs_node)
                 for it in interps]
        _quantize_experts(self.gm, site, _expert_stats(site, pairs))
        for it, (x, offs) in zip(interps, pairs):
            it.env[site.node] = _experts_output(self.gm, site, x, offs)
        meta(site.node)["calibrated"] = True

    def _bias(self, site: Site, it) -> torch.Tensor | None:
        ref = site.graph
        if site.kind == "call_module":
            return get_attr_path(self.gm, ref.bias) if ref.bias else None
        b = node_arg(site.node, ref.bias)
        return it.env[b] if isinstance(b, torch.fx.Node) else b


def _last_uses(graph: torch.fx.Graph) -> dict:
    """node -> the values whose last use it is (freed after it runs)."""
    seen, out = set(), {}
    for node in reversed(graph.nodes):
        for inp in node.all_input_nodes:
            if inp not in seen:
                seen.add(inp)
                out.setdefault(node, []).append(inp)
    return out
