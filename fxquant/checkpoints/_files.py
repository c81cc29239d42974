"""A Hugging Face style checkpoint directory: ``config.json`` and safetensors weights, read without
unpickling and written all at once (a failed write leaves the directory as it was)."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Mapping

import torch

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    """``config.json`` of ``directory`` as a dict (``ValueError`` naming the file otherwise)."""
    path = os.path.join(directory, CONFIG)
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file (a checkpoint directory holds config.json and {WEIGHTS})")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


def read_tensors(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of ``model.safetensors`` (or of the shards ``model.safetensors.index.json`` lists)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    single, index = os.path.join(directory, WEIGHTS), os.path.join(directory, INDEX)
    if os.path.isfile(single):
        files = [single]
    elif os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = [os.path.join(directory, name) for name in sorted(set(weight_map.values()))]
        except (OSError, KeyError, TypeError, AttributeError, json.JSONDecodeError) as e:
            raise ValueError(f"{index}: not a safetensors index (a JSON object with 'weight_map'): {e!r}") from None
    else:
        raise ValueError(f"{directory}: no {WEIGHTS} or {INDEX}")
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            part = load_file(path, device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
        dup = set(part) & set(tensors)
        if dup:
            raise ValueError(f"{path}: tensor {sorted(dup)[0]!r} is also in another shard")
        tensors.update(part)
    return tensors


def unique_storage(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors safetensors can write: a tensor registered under several names (a tied
    embedding) is kept under its first name only; a view overlapping another tensor is copied."""
    out, seen = {}, {}
    for name, t in tensors.items():
        if t.device.type == "meta":
            raise ValueError(f"tensor {name!r} is on the meta device: it has no data to write")
        t = t.detach().cpu()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if t.numel() and key in seen:
            continue
        seen[key] = name
        out[name] = t.contiguous()
    ptrs: dict[int, str] = {}
    for name, t in list(out.items()):  # distinct views of one storage: copies
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in ptrs:
            out[name] = t.clone()
        ptrs.setdefault(ptr, name)
    return out


def write_checkpoint(directory: str | os.PathLike, config: dict, tensors: Mapping[str, torch.Tensor]) -> None:
    """Write ``config.json`` and ``model.safetensors`` into ``directory`` (created if missing).

    Both files are written into a temporary directory first and moved into place only when complete,
    so an error leaves an existing directory's files untouched and creates no partial directory."""
    from safetensors.torch import save_file

    directory = os.fspath(directory)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"{directory}: exists and is not a directory")
    if os.path.exists(os.path.join(directory, INDEX)):
        raise ValueError(f"{directory}: holds a sharded checkpoint ({INDEX}); write into an empty directory")
    parent = os.path.dirname(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    text = json.dumps(config, indent=2, sort_keys=True, default=_json_default)
    tmp = tempfile.mkdtemp(prefix=".fxquant-ckpt-", dir=parent)
    try:
        save_file(dict(tensors), os.path.join(tmp, WEIGHTS), metadata={"format": "pt"})
        with open(os.path.join(tmp, CONFIG), "w") as f:
            f.write(text)
        if not os.path.exists(directory):
            os.rename(tmp, directory)
            return
        for name in (WEIGHTS, CONFIG):
            os.replace(os.path.join(tmp, name), os.path.join(directory, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _json_default(v: Any) -> Any:
    if isinstance(v, torch.dtype):
        return str(v).removeprefix("torch.")
    raise TypeError(f"config value {v!r} of type {type(v).__name__} is not JSON serializable")
