"""``quantize_``'s emit: lower each planned site into the user's module tree, one at a time.

The plan (the passes' :class:`~fxquant.passes.Site` records) names each site's weight by its
attribute path, which is the same on the user's model and on its trace.  :class:`Lowering` is the
quantize pass's ``read_weight`` / ``on_quantized`` pair: it reads a float weight from the model, and
once the pass has packed it, installs the packed weight and drops every reference fxquant holds to
the float one, so the float tensor is freed before the next layer is quantized (unless the model
still uses it elsewhere: a tied embedding keeps it, once).

How each site is lowered (docs/design.md, "Two emits"):
- the site's module is an ``nn.Linear`` whose ``forward`` is ``nn.Linear.forward`` and whose weight
  is the site's: the module is replaced by :class:`~fxquant.modules.QuantizedLinear` at every path
  it is registered under (its bias parameter and hooks move with it);
- otherwise the weight tensor is replaced, at every module that holds it, by a
  :class:`~fxquant.modules.PackedWeight` (a parameter if it was one).
"""
from __future__ import annotations

import collections
import ctypes
import functools
import inspect

import torch
import torch.fx
from torch import nn

from .modules import PackedWeight, QuantizedLinear
from .passes import Site
from .passes._base import get_attr_path
from .passes.match import weight_view
from .report import REPORT_KEY



def check_not_quantized(model: nn.Module) -> None:
    """``ValueError`` if fxquant already quantized ``model`` (in place, or it is a compiled GraphModule)."""
    if isinstance(getattr(model, "meta", None), dict) and REPORT_KEY in model.meta:
        raise ValueError("this model is a GraphModule fxquant.compile returned: it is already quantized; "
                         "pass the original float model")
    packed = [name for name, m in model.named_modules() if isinstance(m, QuantizedLinear)]
    packed += [name for name, t in list(model.named_parameters()) + list(model.named_buffers())
               if isinstance(t, PackedWeight)]
    if packed:  # a quantize_ that packed nothing (every site skipped) may be run again
        where = f" ({len(packed)} packed layers, e.g. {packed[0]!r})" if packed else ""
        raise ValueError(f"this model was already quantized by fxquant.quantize_{where}; quantize the original "
                         "float model (fxquant.report(model) shows what was done)")


@functools.lru_cache(maxsize=None)
def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc; absent elsewhere
    except (OSError, AttributeError):
        return None


def trim_heap() -> None:
    """Give the C heap's free pages back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    A freed float weight is returned at once (its own mapping), but the quantize temporaries of
    mid-sized layers come from the heap once glibc's mmap threshold has grown, and the long-lived
    packed weights allocated between them keep those pages resident: measured on the 1.1B Llama
    (int4wo-128), RSS after ``quantize_`` 1.25 GB for 0.65 GB of tensors without it."""
    fn = _malloc_trim()
    if fn is not None:
        fn(0)


def planning_kwargs(model: nn.Module, example_kwargs) -> dict:
    """The keyword arguments the plan is traced with: the user's, plus ``use_cache=False`` when the
    model's ``forward`` takes ``use_cache`` and the user did not set it (a Hugging Face model would
    otherwise return its KV cache object, which ``torch.export`` cannot output; the sites are the
    same with or without a cache, and ``quantize_`` keeps only the sites, not the graph)."""
    kwargs = dict(example_kwargs or {})
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}
    # named, or taken by **kwargs on a model whose config has use_cache (a transformers model)
    takes_cache = "use_cache" in params or (
        any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        and isinstance(getattr(getattr(model, "config", None), "use_cache", None), bool))
    if takes_cache:
        kwargs.setdefault("use_cache", False)
    return kwargs


def calibration_calls(model: nn.Module, calibration):
    """The calibration items as ``quantize_`` traces: each with the planning keyword arguments
    (``use_cache=False`` for a Hugging Face model) added; lazily, in order (the calibrate pass reads
    them once).  ``quantize_`` passes ``None`` on itself."""
    from .passes.calibration_inputs import Call, as_call

    for i, item in enumerate(calibration):
        args, kwargs = as_call(item, f"calibration[{i}]")
        yield Call((args, planning_kwargs(model, kwargs)))


def takes_input_scale(site: Site, sites: list[Site]) -> bool:
    """Whether ``site``'s lowering can divide its input by an AWQ scale: a :class:`QuantizedLinear` and a
    :class:`PackedWeight` both can, unless the weight also serves another site (one module or packed
    tensor per weight, so one scale; the graph emit divides before each op and has no such limit)."""
    return sum(s.weight_attr == site.weight_attr for s in sites) == 1


def apply_folds(model: nn.Module, folds) -> None:
    """AWQ folds into the user's model: each 1-D parameter divided by its scale, in place."""
    with torch.no_grad():
        for fold in folds:
            p = get_attr_path(model, fold.attr)
            p.copy_(fold.divided(p))


def weights_used_outside_sites(gm: torch.fx.GraphModule, sites: list[Site]) -> set[str]:
    """Weight paths of the planned sites that the graph also reads elsewhere than in a linear site
    (directly or through a transpose feeding one): their float tensor must be kept."""
    site_nodes = {s.node for s in sites if s.node is not None}
    planned = {s.weight_attr for s in sites if s.scheme is not None and s.weight_attr}
    out = set()
    for node in gm.graph.nodes:
        if node.op != "get_attr" or node.target not in planned:
            continue
        for user in node.users:
            if user in site_nodes:
                continue
            # param.T (param.mT for experts) feeding sites
            transpose = user.op != "get_attr" and weight_view(gm, user) is not None
            if transpose and user.users and all(u in site_nodes for u in user.users):
                continue
            out.add(node.target)
    return out


class Lowering:
    """Reads float weights from ``model`` and installs packed ones, site by site (see module docs)."""

    def __init__(self, model: nn.Module, extra_uses: set[str], sites: list[Site]):
        self.model = model
        self.extra_uses = extra_uses
        # every path a module / tensor is registered under (shared modules, tied parameters)
        self.module_paths: dict[int, list[tuple[nn.Module, str]]] = collections.defaultdict(list)
        self.tensor_paths: dict[int, list[tuple[nn.Module, str, bool]]] = collections.defaultdict(list)
        for _, parent in model.named_modules(remove_duplicate=False):
            for name, child in parent._modules.items():
                if child is not None:
                    self.module_paths[id(child)].append((parent, name))
            for name, p in parent._parameters.items():
                if p is not None:
                    self.tensor_paths[id(p)].append((parent, name, True))
            for name, b in parent._buffers.items():
                if b is not None:
                    self.tensor_paths[id(b)].append((parent, name, False))
        # sites still to come per weight: a float weight is kept here until its last site is lowered
        self.pending = collections.Counter(s.weight_attr for s in sites if s.scheme is not None and not s.reason)
        self.kept: dict[str, torch.Tensor] = {}
        self.done: dict[int, nn.Module | torch.Tensor] = {}  # id(qweight) -> what it became

    def read_weight(self, site: Site) -> torch.Tensor:
        if site.weight_attr in self.kept:
            return self.kept[site.weight_attr]
        return get_attr_path(self.model, site.weight_attr)

    def apply(self, site: Site) -> None:
        """Install ``site.qweight`` in the model (the quantize pass's ``on_quantized``)."""
        weight = self.read_weight(site)
        self.pending[site.weight_attr] -= 1
        if self.pending[site.weight_attr] > 0:
            self.kept[site.weight_attr] = weight
        else:
            self.kept.pop(site.weight_attr, None)
        module = self._linear_module(site, weight)
        if module is not None:
            self._swap_module(site, module)
        elif id(site.qweight) not in self.done:
            self._swap_tensor(site, weight)
        del weight
        trim_heap()

    def finish(self, sites: list[Site]) -> None:
        """Drop every reference to the model's old modules and tensors."""
        self.module_paths.clear()
        self.tensor_paths.clear()
        self.kept.clear()
        self.done.clear()

    # -- the two lowerings ----------------------------------------------------------------------------------
    def _linear_module(self, site: Site, weight: torch.Tensor) -> nn.Linear | None:
        try:
            module = self.model.get_submodule(site.name)
        except AttributeError:
            return None
        if isinstance(module, QuantizedLinear):  # a module called twice: its second site shares the buffers
            return module if id(site.qweight) in self.done else None
        plain = isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward
        return module if plain and not site.transposed and module.weight is weight else None

    def _swap_module(self, site: Site, module: nn.Module) -> None:
        if isinstance(module, QuantizedLinear):
            return
        new = QuantizedLinear(site.qweight, module.bias, str(site.scheme), site.input_scale, module.weight.dtype)
        new.train(module.training)
        for hooks in ("_forward_pre_hooks", "_forward_hooks", "_forward_hooks_with_kwargs",
                      "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called"):
            getattr(new, hooks).update(getattr(module, hooks))
        for parent, name in self.module_paths.pop(id(module), []):
            setattr(parent, name, new)
            self.module_paths[id(new)].append((parent, name))
        for t in list(module._parameters.values()) + list(module._buffers.values()):  # forget the old module
            if t is not None and id(t) in self.tensor_paths:
                self.tensor_paths[id(t)] = [e for e in self.tensor_paths[id(t)] if e[0] is not module]
        self.done[id(site.qweight)] = new

    def _swap_tensor(self, site: Site, weight: torch.Tensor) -> None:
        keep = weight if site.weight_attr in self.extra_uses else None  # the same tensor: still the model's
        packed = PackedWeight(site.qweight, site.transposed, weight.dtype, keep, site.input_scale)
        is_param = isinstance(weight, nn.Parameter)
        new = nn.Parameter(packed, requires_grad=False) if is_param else packed
        for parent, name, as_param in self.tensor_paths.pop(id(weight), []):
            if as_param:
                parent._parameters[name] = new
            else:
                parent._buffers[name] = new
        self.done[id(site.qweight)] = new
