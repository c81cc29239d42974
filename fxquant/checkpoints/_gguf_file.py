"""A GGUF file's tensor table, read without copying its data: the file is memory-mapped and each tensor
is a numpy view of its bytes.

GGUF (v2 / v3, little-endian; https://github.com/ggml-org/ggml/blob/master/docs/gguf.md): the magic
``GGUF``, ``u32`` version, ``u64`` tensor count, ``u64`` metadata count; the metadata (``string`` key,
``u32`` value type, value); per tensor its name, ``u32`` dim count, ``u64`` dims (fastest-moving
first), ``u32`` ggml type and ``u64`` offset into the data section, which starts at the next multiple
of ``general.alignment`` (32 by default) after the table.  A quantized type stores each row of ``K``
values as ``K / block_size`` blocks of ``type_size`` bytes.

Everything is checked when the file is opened (types, shapes, every tensor's bytes inside the file),
so a truncated or corrupt file fails there with the tensor and its type named, before a model is
touched.  Only small metadata values are decoded (strings and numbers; arrays are skipped): the model
config and tokenizer come from transformers' own GGUF reader.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["GgufFile", "TensorEntry", "FLOAT_TYPES", "type_name"]

#: ggml type ids of values stored as they are -> numpy dtype of one element
FLOAT_TYPES = {0: "F32", 1: "F16", 30: "BF16"}
_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32
# metadata value types: fixed-size scalars, then 8 = string, 9 = array
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class _Truncated(Exception):
    pass


def _type_table() -> dict[int, tuple[str, int, int]]:
    """ggml type id -> ``(name, block_size, type_size)`` from the ``gguf`` package's tables."""
    try:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    except ImportError:
        raise ImportError("reading GGUF files needs the gguf package: pip install gguf "
                          "(or pip install 'fxquant[models]')") from None
    return {int(t): (t.name, *GGML_QUANT_SIZES[t]) for t in GGMLQuantizationType if t in GGML_QUANT_SIZES}


def type_name(type_id: int) -> str:
    """``"Q4_K"`` for 12, ``"type 123 (unknown to the gguf package)"`` for an id it does not know."""
    entry = _type_table().get(type_id)
    return entry[0] if entry else f"type {type_id} (unknown to the gguf package)"


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the table.  ``shape`` is in torch order (``[rows, K]`` for a matrix); ``offset``
    is from the start of the file; ``nbytes`` the bytes it occupies there."""

    name: str
    type_id: int
    type_name: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def is_float(self) -> bool:
        return self.type_id in FLOAT_TYPES

    def describe(self) -> str:
        return f"tensor {self.name!r} ({self.type_name}, shape {list(self.shape)})"


class GgufFile:
    """A GGUF file opened for reading: ``metadata`` (scalars and strings), ``tensors`` (name ->
    :class:`TensorEntry`, file order) and views of each tensor's bytes (:meth:`raw`, :meth:`floats`).

    Raises ``ValueError`` naming the file (and the tensor, where one is at fault) for anything that is
    not a complete GGUF v2/v3 file; ``ImportError`` without the ``gguf`` package."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        where = f"{self.path}:"
        if not os.path.isfile(self.path):
            raise ValueError(f"{where} no such file")
        self.size = os.path.getsize(self.path)
        if self.size < 24:
            raise ValueError(f"{where} {self.size} bytes: too short for a GGUF header (not a GGUF file?)")
        self._data = np.memmap(self.path, dtype=np.uint8, mode="r")
        self.metadata: dict[str, Any] = {}
        self.tensors: dict[str, TensorEntry] = {}
        try:
            self._read()
        except _Truncated as e:
            raise ValueError(f"{where} the file ends inside its header ({e}): truncated file?") from None
        except (struct.error, UnicodeDecodeError) as e:
            raise ValueError(f"{where} corrupt GGUF header ({e})") from None

    # -- reading the header ------------------------------------------------------------------------
    def _unpack(self, fmt: str, pos: int, what: str) -> tuple:
        end = pos + struct.calcsize(fmt)
        if end > self.size:
            raise _Truncated(f"reading {what} at byte {pos}")
        return struct.unpack_from(fmt, self._data, pos)

    def _string(self, pos: int, what: str) -> tuple[str, int]:
        (n,) = self._unpack("<Q", pos, what)
        if pos + 8 + n > self.size:
            raise _Truncated(f"reading {what} ({n} bytes) at byte {pos}")
        return bytes(self._data[pos + 8:pos + 8 + n]).decode("utf-8"), pos + 8 + n

    def _value(self, vtype: int, pos: int, key: str, depth: int = 0) -> tuple[Any, int]:
        """One metadata value and the position after it (arrays are skipped: ``None``)."""
        if vtype in _SCALARS:
            (v,) = self._unpack(_SCALARS[vtype], pos, f"metadata {key!r}")
            return v, pos + struct.calcsize(_SCALARS[vtype])
        if vtype == _STRING:
            return self._string(pos, f"metadata {key!r}")
        if vtype == _ARRAY and depth < 4:
            etype, count = self._unpack("<IQ", pos, f"metadata {key!r}")
            pos += 12
            if etype in _SCALARS:
                pos += count * struct.calcsize(_SCALARS[etype])
            else:
                for _ in range(count):
                    _, pos = self._value(etype, pos, key, depth + 1)
            if pos > self.size:
                raise _Truncated(f"reading metadata {key!r}")
            return None, pos
        raise ValueError(f"{self.path}: metadata {key!r} has value type {vtype}, which is not a GGUF value type "
                         "(corrupt file?)")

    def _read(self) -> None:
        where = f"{self.path}:"
        if bytes(self._data[:4]) != b"GGUF":
            raise ValueError(f"{where} does not start with the GGUF magic bytes (not a GGUF file)")
        (version,) = self._unpack("<I", 4, "the version")
        if version & 0xFFFF == 0 and version:
            raise ValueError(f"{where} a big-endian GGUF file; only little-endian files are supported")
        if version not in _VERSIONS:
            raise ValueError(f"{where} GGUF version {version}; supported: {', '.join(map(str, _VERSIONS))}")
        n_tensors, n_kv = self._unpack("<QQ", 8, "the counts")
        pos = 24
        for i in range(n_kv):
            key, pos = self._string(pos, f"metadata key #{i}")
            (vtype,) = self._unpack("<I", pos, f"metadata {key!r}")
            value, pos = self._value(vtype, pos + 4, key)
            if value is not None:
                self.metadata[key] = value
        table = []
        for i in range(n_tensors):
            name, pos = self._string(pos, f"the name of tensor #{i}")
            (n_dims,) = self._unpack("<I", pos, f"tensor {name!r}")
            if not 1 <= n_dims <= 4:
                raise ValueError(f"{where} tensor {name!r} has {n_dims} dims (valid: 1..4; corrupt file?)")
            dims = self._unpack(f"<{n_dims}Q", pos + 4, f"tensor {name!r}")
            type_id, offset = self._unpack("<IQ", pos + 4 + 8 * n_dims, f"tensor {name!r}")
            pos += 4 + 8 * n_dims + 12
            if name in self.tensors or any(t[0] == name for t in table):
                raise ValueError(f"{where} tensor {name!r} appears twice in the tensor table")
            table.append((name, tuple(reversed(dims)), type_id, offset))
        align = self.metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
        if not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise ValueError(f"{where} general.alignment={align!r}; valid: a power of two")
        start = -(-pos // align) * align
        types = _type_table()
        for name, shape, type_id, offset in table:
            self.tensors[name] = self._entry(name, shape, type_id, start + offset, types)

    def _entry(self, name: str, shape: tuple[int, ...], type_id: int, offset: int, types: dict) -> TensorEntry:
        where = f"{self.path}: tensor {name!r}"
        if type_id not in types:
            raise ValueError(f"{where} has ggml type id {type_id}, which the gguf package does not know "
                             "(corrupt file, or written by a newer llama.cpp)")
        tname, block, tsize = types[type_id]
        k = shape[-1]
        if k % block:
            raise ValueError(f"{where} ({tname}, shape {list(shape)}): rows of {k} values are not whole "
                             f"{tname} blocks of {block} (corrupt file?)")
        rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
        nbytes = rows * (k // block) * tsize
        entry = TensorEntry(name, type_id, tname, shape, offset, nbytes)
        if offset + nbytes > self.size:
            raise ValueError(f"{self.path}: {entry.describe()} occupies bytes {offset}..{offset + nbytes} but the file "
                             f"has {self.size} bytes: truncated file?")
        return entry

    # -- tensor data --------------------------------------------------------------------------------
    def raw(self, entry: TensorEntry) -> np.ndarray:
        """The tensor's bytes as stored: a read-only uint8 view ``[rows, row_bytes]`` (no copy)."""
        rows = _rows(entry)
        return self._data[entry.offset:entry.offset + entry.nbytes].reshape(rows, entry.nbytes // rows if rows else 0)

    def floats(self, entry: TensorEntry) -> np.ndarray:
        """An F32 / F16 / BF16 tensor as float32 numpy values of its shape (F32: a read-only view), what
        ``gguf.quants.dequantize`` gives for these types."""
        b = self._data[entry.offset:entry.offset + entry.nbytes]
        kind = FLOAT_TYPES.get(entry.type_id)
        if kind == "F32":
            v = b.view(np.float32)
        elif kind == "F16":
            v = b.view(np.float16).astype(np.float32)
        elif kind == "BF16":
            v = (b.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            raise ValueError(f"{self.path}: {entry.describe()} is not a float tensor")
        return v.reshape(entry.shape)

    def close(self) -> None:
        """Drop the memory map (views handed out keep their own reference to it)."""
        self._data = None


def _rows(entry: TensorEntry) -> int:
    return int(np.prod(entry.shape[:-1], dtype=np.int64)) if len(entry.shape) > 1 else 1
