"""Per-layer report of a compiled model: what was quantized, how, and at what cost."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tabulate import tabulate

__all__ = ["Row", "Report", "report"]


@dataclass
class Row:
    """One linear site.  ``bytes_*`` count the weight only (bias and other params unchanged; a
    skipped site keeps its float weight, so its ``bytes_after == bytes_before``);
    ``rel_error`` is ``||W - dequant(Q)|| / ||W||`` for quantized sites, ``None`` otherwise."""

    fqn: str
    status: str  # "quantized" | "skipped"
    scheme: str | None
    reason: str
    bytes_before: int
    bytes_after: int
    rel_error: float | None
    rule: str = ""
    kind: str = ""
    shape: tuple[int, ...] | None = None  # (N, K); (E, N, K) for a mixture of experts
    method: str = ""  # the algorithm that chose the stored values ("rtn", "gptq", ...); "" when skipped
    #: ``sum ||x (W - Ŵ)ᵀ||² / sum ||x Wᵀ||²`` on the calibration data (``None`` without data)
    rel_output_error: float | None = None


@dataclass(eq=False)
class Report:
    rows: list[Row]
    frontend: str = "export"
    export_error: str | None = None
    notes: list[str] = field(default_factory=list)
    dynamic_dims: dict[str, list[int]] = field(default_factory=dict)
    model_bytes_before: int = 0  # every parameter and buffer of the model, tied tensors once
    model_bytes_after: int = 0
    op_counts_before: dict[str, int] = field(default_factory=dict)  # call_function/call_module targets
    #: per quantized layer, what its method did: ``method``, ``params``, ``quantization_time`` (s),
    #: ``weight_squared_error`` / ``mean_...`` / ``relative_...``, and with calibration data
    #: ``output_squared_error`` / ``mean_...`` / ``relative_...`` and ``calibration_tokens``; AWQ adds
    #: ``alpha`` and where its input scale went (``awq_input_scale``)
    results: dict[str, dict] = field(default_factory=dict)
    #: the spec that was applied (``Spec.to_dict()``, canonical form): ``Spec.from_dict(report.spec)``
    spec: dict[str, Any] | None = None

    @property
    def quantized(self) -> list[Row]:
        return [r for r in self.rows if r.status == "quantized"]

    @property
    def skipped(self) -> list[Row]:
        return [r for r in self.rows if r.status != "quantized"]

    def row(self, fqn: str) -> Row:
        for r in self.rows:
            if r.fqn == fqn:
                return r
        raise KeyError(f"no linear site named {fqn!r}; sites: {', '.join(r.fqn for r in self.rows)}")

    def table(self) -> str:
        outputs = any(r.rel_output_error is not None for r in self.rows)
        body = []
        for r in self.rows:
            res = self.results.get(r.fqn, {})
            row = [r.fqn, r.status, r.scheme or "-", r.rule or "-", "x".join(map(str, r.shape)) if r.shape else "-",
                   _mb(r.bytes_before), _mb(r.bytes_after), f"{r.rel_error:.4f}" if r.rel_error is not None else "-"]
            if outputs:
                row.append(f"{r.rel_output_error:.4f}" if r.rel_output_error is not None else "-")
            row.append(f"{res['quantization_time']:.2f}" if "quantization_time" in res else "-")
            body.append(row + [r.reason or _method_note(res)])
        before = sum(r.bytes_before for r in self.rows)
        after = sum(r.bytes_after for r in self.rows)
        total = sum(res.get("quantization_time", 0.0) for res in self.results.values())
        body.append([f"TOTAL ({len(self.quantized)}/{len(self.rows)} quantized)", "", "", "", "",
                     _mb(before), _mb(after), ""] + ([""] if outputs else []) +
                    [f"{total:.1f}", f"linear weights {before / max(after, 1):.2f}x smaller"])
        # rel W err: ||W - Ŵ|| / ||W||; rel out err^2: sum ||x (W - Ŵ)ᵀ||² / sum ||x Wᵀ||² (the squared ratio)
        headers = ["layer", "status", "scheme", "rule", "N x K", "MB before", "MB after", "rel W err"]
        headers += (["rel out err^2"] if outputs else []) + ["time s", "reason / method"]
        return tabulate(body, headers=headers, tablefmt="simple")

    def __str__(self) -> str:
        lines = [self.table(), ""]
        lines.append(f"frontend: {self.frontend}" + (f" (torch.export failed: {self.export_error})"
                                                     if self.export_error else ""))
        if self.dynamic_dims:
            lines.append("dynamic input dims: " + ", ".join(f"{k}{v}" for k, v in self.dynamic_dims.items()))
        if self.model_bytes_before:
            lines.append(f"model tensors: {_mb(self.model_bytes_before)} MB -> {_mb(self.model_bytes_after)} MB "
                         f"({self.model_bytes_before / max(self.model_bytes_after, 1):.2f}x smaller)")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __eq__(self, other: object) -> bool:
        """Equal decisions and results; the measured times (``quantization_time``) are not compared."""
        if not isinstance(other, Report):
            return NotImplemented
        return _untimed(self.to_dict()) == _untimed(other.to_dict())

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Report":
        d = dict(d)
        d["rows"] = [Row(**{**r, "shape": tuple(r["shape"]) if r.get("shape") else None}) for r in d["rows"]]
        return cls(**d)


def _untimed(d: dict[str, Any]) -> dict[str, Any]:
    d["results"] = {k: {f: v for f, v in r.items() if f != "quantization_time"} for k, r in d["results"].items()}
    return d


def _method_note(res: dict) -> str:
    if "alpha" in res:
        return f"awq alpha={res['alpha']:.2f}, scale {res.get('awq_input_scale', '-')}"
    fallback = res.get("fallback")
    if fallback:  # the method kept what it started from: say so where the table is read
        why = res.get("reason") or res.get("fallback_reason") or ""
        kept = "round-to-nearest" if fallback == "rtn" else "its initialisation"
        return f"{res.get('method', 'method')} kept {kept}" + (f": {why}" if why else "")
    return ""


def _mb(n: int) -> str:
    return f"{n / 2**20:.3f}" if n < 2**20 else f"{n / 2**20:.2f}"


def _storages(t: torch.Tensor):
    """The plain tensors behind ``t``: itself, or a tensor subclass's inner tensors (packed weights)."""
    if type(t) in (torch.Tensor, torch.nn.Parameter) or not hasattr(t, "__tensor_flatten__"):
        yield t
        return
    names, _ = t.__tensor_flatten__()
    for name in names:
        yield from _storages(getattr(t, name))


def tensor_bytes(module: torch.nn.Module) -> int:
    """Bytes of every distinct tensor storage a module holds (tied tensors counted once)."""
    seen, total = set(), 0
    for outer in list(module.parameters()) + list(module.buffers()):
        for t in _storages(outer):
            key = (t.untyped_storage().data_ptr(), t.device)
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
    return total


REPORT_KEY = "fxquant_report"
#: attribute of a module ``fxquant.quantize_`` converted in place that holds its report
INPLACE_REPORT_ATTR = "_fxquant_report"


def build_report(sites, *, frontend: str, export_error: str | None, dynamic_dims: dict, notes: list[str],
                 model_bytes_before: int, model_bytes_after: int, op_counts_before: dict,
                 spec: Any = None) -> Report:
    """The report of a plan (the passes' sites), the same for both emits."""
    rows = [Row(fqn=s.name, status=s.status, scheme=str(s.scheme) if s.scheme else None, reason=s.reason,
                bytes_before=s.bytes_before,
                bytes_after=s.bytes_after if s.status == "quantized" else s.bytes_before,  # float stays
                rel_error=s.rel_error, rule=s.rule, kind=s.kind,
                shape=(s.experts, *s.out_shape) if s.experts and s.out_shape else s.out_shape,
                method=s.result.get("method", "") if s.status == "quantized" else "",
                rel_output_error=s.result.get("relative_output_squared_error") if s.status == "quantized" else None)
            for s in sites]
    results = {s.name: _plain(s.result) for s in sites if s.status == "quantized" and s.result}
    notes = list(notes)
    if not rows:
        notes.append("no linear layer found in the traced graph")
    grown = [r for r in rows if r.status == "quantized" and r.bytes_after > r.bytes_before]
    if grown:
        shown = ", ".join(f"{r.fqn} ({'x'.join(map(str, r.shape))}, {r.scheme}: {r.bytes_before} -> "
                          f"{r.bytes_after} bytes)"
                          for r in grown[:3])
        notes.append(f"{len(grown)} quantized layers are larger than in float: {shown}"
                     f"{' ...' if len(grown) > 3 else ''}. Layers with few output rows (a mixture-of-experts "
                     "router, a classification head) do not shrink under formats that pad rows to tiles; skip them")
    return Report(rows=rows, frontend=frontend, export_error=export_error, notes=notes, dynamic_dims=dynamic_dims,
                  model_bytes_before=model_bytes_before, model_bytes_after=model_bytes_after,
                  op_counts_before=dict(op_counts_before), results=results,
                  spec=None if spec is None else spec.to_dict())


def _plain(d: dict) -> dict:
    """A JSON-safe copy (tensors as lists, tuples as lists)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            v = _plain(v)
        elif isinstance(v, torch.Tensor):
            v = v.tolist()
        elif isinstance(v, tuple):
            v = list(v)
        out[k] = v
    return out


def report(qm: torch.nn.Module) -> Report:
    """The :class:`Report` of a module ``fxquant.compile`` returned or ``fxquant.quantize_`` converted."""
    rep = getattr(qm, "meta", {}).get(REPORT_KEY) if isinstance(getattr(qm, "meta", None), dict) else None
    if rep is None:
        rep = getattr(qm, INPLACE_REPORT_ATTR, None) if isinstance(qm, torch.nn.Module) else None
    if rep is None:
        raise ValueError("this module has no fxquant report: pass the module fxquant.compile returned "
                         "or the model fxquant.quantize_ converted")
    return rep
