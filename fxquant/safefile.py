"""fxquant's file container: one ``.safetensors`` file whose metadata holds fxquant's JSON document.

A safetensors file is an 8-byte little-endian header length ``N``, ``N`` bytes of JSON (per tensor
its dtype, shape and byte span; ``__metadata__``: string -> string), then the raw tensor bytes.
fxquant writes two metadata entries: ``fxquant``, the document (JSON: ``format``, ``version``,
``kind`` and what the kind needs), and ``fxquant_sha256``, the document's SHA-256.  The document
lists every stored tensor with its dtype, shape and the SHA-256 of its bytes (``tensors``), and
the names stored under another's bytes (``aliases``: tensors that share storage, such as tied
weights, are stored once; safetensors refuses shared storage).

Reading checks, before any tensor reaches a model: the framing (a truncated file, a header that is
not JSON, byte spans that do not tile the data), the document's checksum, format and version,
that the safetensors header and the document list the same tensors with the same dtype and shape,
and each tensor's bytes against its checksum.  Nothing is unpickled: the header is JSON and the
tensors are raw bytes, read by ``safetensors``.  Writing goes to a temporary file in the same
directory, renamed over ``path`` only when complete, so a failed save leaves ``path`` as it was.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Any, Mapping

import torch

__all__ = ["FORMAT", "FORMAT_VERSION", "FileError", "write", "read_document", "read_tensors", "is_zip"]

FORMAT = "fxquant"
#: the document's version: a file of another version is refused with an error naming both
FORMAT_VERSION = 1
_DOC_KEY, _SUM_KEY = "fxquant", "fxquant_sha256"
_MAX_HEADER = 100_000_000  # safetensors' own limit

#: safetensors dtype codes (the header's) <-> torch dtypes
_CODES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _sha256(t: torch.Tensor) -> str:
    flat = t.detach().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy() if flat.numel() else b"").hexdigest()


def is_zip(path: str | os.PathLike) -> bool:
    """Whether ``path`` starts like a zip archive (a ``torch.export`` ``.pt2`` file)."""
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


# ---- writing ----------------------------------------------------------------------------------------------
def _dedupe(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Stored tensors (contiguous, on the CPU, no two sharing storage) and ``alias -> stored name``: a
    tensor that is the same view of the same storage as an earlier one is stored once (tied weights);
    one that overlaps an earlier one another way is stored as its own copy."""
    stored, aliases, seen, owners = {}, {}, {}, set()
    for name, t in tensors.items():
        if t.numel():
            key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
            if key in seen:
                aliases[name] = seen[key]
                continue
            seen[key] = name
        c = t.detach().cpu().contiguous()
        if c.numel() and c.untyped_storage().data_ptr() in owners:
            c = c.clone()
        owners.add(c.untyped_storage().data_ptr())
        stored[name] = c
    return stored, aliases


def write(path: str | os.PathLike, doc: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
    """Write ``doc`` (JSON-safe; ``format``/``version``/``tensors``/``aliases`` are added) and
    ``tensors`` (name -> tensor, shared storage allowed) to ``path`` as one safetensors file."""
    from safetensors.torch import save_file

    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or type(t) not in (torch.Tensor, torch.nn.Parameter):
            raise TypeError(f"fxquant.save: tensor {name!r} is a {type(t).__name__}; only plain tensors can be "
                            "stored (a tensor subclass fxquant does not know)")
        if t.device.type == "meta":
            raise ValueError(f"fxquant.save: tensor {name!r} is on the meta device (it holds no data); "
                             "load or materialize the model before saving it")
        if t.dtype not in _CODES.values():
            raise ValueError(f"fxquant.save: tensor {name!r} has dtype {t.dtype}, which safetensors cannot store "
                             f"(supported: {', '.join(sorted(dtype_name(d) for d in _CODES.values()))})")
    stored, aliases = _dedupe(tensors)
    full = {"format": FORMAT, "version": FORMAT_VERSION, **doc, "aliases": aliases,
            "tensors": {n: {"dtype": dtype_name(t.dtype), "shape": list(t.shape), "sha256": _sha256(t)}
                        for n, t in stored.items()}}
    text = json.dumps(full, sort_keys=False)
    meta = {_DOC_KEY: text, _SUM_KEY: hashlib.sha256(text.encode()).hexdigest()}
    path = os.fspath(path)
    tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        save_file(stored, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ---- reading ----------------------------------------------------------------------------------------------
class FileError(ValueError):
    """A file fxquant cannot load: not fxquant's, corrupt, truncated, of another version, or not
    matching the model it is loaded into.  The message names the file and what is wrong."""


def _header(path: str) -> tuple[dict, dict, int]:
    """The safetensors header (tensor entries), its ``__metadata__``, and the data section's size;
    checks the framing."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise FileError(f"fxquant.load: {path}: {size} bytes; a safetensors file starts with an 8-byte header length "
                            "(truncated, or not a safetensors file)")
        n = int.from_bytes(head, "little")
        if n > min(size - 8, _MAX_HEADER):
            raise FileError(f"fxquant.load: {path}: its header claims {n} bytes but the file has {size - 8} after the length "
                            "(truncated, or not a safetensors file)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FileError(f"fxquant.load: {path}: the safetensors header is not valid JSON ({e}); the file is corrupt") from None
    if not isinstance(header, dict):
        raise FileError(f"fxquant.load: {path}: the safetensors header is a {type(header).__name__}, expected an object")
    meta = header.pop("__metadata__", None) or {}
    data = size - 8 - n
    spans = []
    for name, e in header.items():
        try:
            code, shape, (a, b) = e["dtype"], [int(s) for s in e["shape"]], e["data_offsets"]
            nbytes = math.prod(shape) * _CODES[code].itemsize
            ok = (isinstance(a, int) and isinstance(b, int) and 0 <= a <= b and b - a == nbytes
                  and min(shape, default=0) >= 0)
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise FileError(f"fxquant.load: {path}: header entry for tensor {name!r} is malformed: {e!r}")
        spans.append((a, b, name))
    pos = 0
    for a, b, name in sorted(spans):
        if a != pos:
            raise FileError(f"fxquant.load: {path}: tensor {name!r} starts at byte {a} of the data, expected {pos} (corrupt header)")
        pos = b
    if pos != data:
        what = "truncated" if pos > data else "has trailing bytes"
        raise FileError(f"fxquant.load: {path}: the header's tensors span {pos} bytes of data, the file holds {data} ({what})")
    return header, meta, data


def read_document(path: str | os.PathLike) -> dict:
    """The fxquant document of ``path``, checked (framing, checksum, format, version, tensor list)."""
    path = os.fspath(path)
    header, meta, _ = _header(path)
    if _DOC_KEY not in meta:
        raise FileError(f"fxquant.load: {path}: not a file fxquant.save wrote (its safetensors metadata has no {_DOC_KEY!r} "
                        f"entry; keys: {sorted(meta) or 'none'}); a plain safetensors checkpoint loads with "
                        "safetensors.torch.load_file / model.load_state_dict")
    text = meta[_DOC_KEY]
    if hashlib.sha256(text.encode()).hexdigest() != meta.get(_SUM_KEY):
        raise FileError(f"fxquant.load: {path}: the fxquant document does not match its checksum ({_SUM_KEY}); the file is corrupt")
    doc = json.loads(text)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise FileError(f"fxquant.load: {path}: document format {doc.get('format') if isinstance(doc, dict) else doc!r}, "
                        f"expected {FORMAT!r}")
    if doc.get("version") != FORMAT_VERSION:
        raise FileError(f"fxquant.load: {path}: fxquant file format version {doc.get('version')!r}; this fxquant reads version "
                        f"{FORMAT_VERSION} (written by {'a newer' if _newer(doc.get('version')) else 'another'} "
                        "fxquant?)")
    listed = doc.get("tensors", {})
    missing, extra = sorted(set(listed) - set(header)), sorted(set(header) - set(listed))
    if missing or extra:
        raise FileError(f"fxquant.load: {path}: the document lists tensors the file does not hold ({_few(missing)}) or the file "
                        f"holds tensors the document does not list ({_few(extra)})")
    for name, spec in listed.items():
        h = header[name]
        if _CODES.get(h["dtype"]) is None or dtype_name(_CODES[h["dtype"]]) != spec.get("dtype") \
                or list(h["shape"]) != spec.get("shape"):
            raise FileError(f"fxquant.load: {path}: tensor {name!r} is {h['dtype']} {h['shape']} in the file, "
                            f"{spec.get('dtype')} {spec.get('shape')} in the document (changed after saving?)")
    for alias, target in doc.get("aliases", {}).items():
        if target not in listed:
            raise FileError(f"fxquant.load: {path}: alias {alias!r} names tensor {target!r}, which the file does not hold")
    return doc


def read_tensors(path: str | os.PathLike, doc: Mapping[str, Any], device: torch.device | str = "cpu",
                 ) -> dict[str, torch.Tensor]:
    """Every tensor of the file by name (aliases included: the same tensor object as their target),
    on ``device``; each stored tensor's bytes are checked against the document's checksum."""
    from safetensors import safe_open

    path = os.fspath(path)
    out = {}
    with safe_open(path, framework="pt", device="cpu") as f:
        for name, spec in doc["tensors"].items():
            t = f.get_tensor(name)
            if _sha256(t) != spec["sha256"]:
                raise FileError(f"fxquant.load: {path}: the bytes of tensor {name!r} do not match their checksum; the file is "
                                "corrupt")
            # a fresh allocation: the file's tensors sit at arbitrary byte offsets, and a kernel may take
            # another path (another summation order) on a misaligned weight; nor should the model alias the file
            out[name] = torch.empty_like(t, device=device).copy_(t)
    for alias, target in doc.get("aliases", {}).items():
        out[alias] = out[target]
    return out


def _newer(v: Any) -> bool:
    return isinstance(v, int) and v > FORMAT_VERSION


def _few(names: list[str], n: int = 8) -> str:
    if not names:
        return "none"
    more = f", ... ({len(names)} in all)" if len(names) > n else ""
    return ", ".join(repr(x) for x in names[:n]) + more
