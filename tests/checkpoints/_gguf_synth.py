"""Small GGUF files written with the ``gguf`` package's own ``GGUFWriter``, for the loader's tests.

Quantized tensors: the legacy types (Q4_0 ... Q8_0) are ``gguf.quants.quantize`` of a random weight;
the k-quants (the package cannot quantize them) are random bytes whose fp16 super-block scales are
set to small finite values, at the offsets of llama.cpp's ``block_q*_K`` structs.  Which values they
stand for is whatever ``gguf.quants.dequantize`` says: the tests' oracle.
"""
from __future__ import annotations

import numpy as np

gguf = __import__("gguf")
Q = gguf.GGMLQuantizationType

#: fp16 fields (byte offset) of each k-quant block, and the magnitude of values that keeps a tiny
#: model's activations finite: (offsets, scale of d)
_KQUANT_FP16 = {
    Q.Q2_K: ((80, 82), 2e-3),  # scales[16] qs[64] d dmin
    Q.Q3_K: ((108,), 2e-3),  # hmask[32] qs[64] scales[12] d
    Q.Q4_K: ((0, 2), 2e-4),  # d dmin scales[12] qs[128]
    Q.Q5_K: ((0, 2), 1e-4),  # d dmin scales[12] qh[32] qs[128]
    Q.Q6_K: ((208,), 2e-4),  # ql[128] qh[64] scales[16] d
}
LEGACY = (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0)
KQUANTS = tuple(_KQUANT_FP16)
ALL_QTYPES = LEGACY + KQUANTS


def quantized(rng: np.random.Generator, qtype, n: int, k: int) -> np.ndarray:
    """uint8 ``[n, row_bytes]``: one ``[n, k]`` tensor's bytes in ``qtype``."""
    if qtype in LEGACY:
        w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
        return gguf.quants.quantize(w, qtype)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    offsets, mag = _KQUANT_FP16[qtype]
    blocks = rng.integers(0, 256, size=(n * k // block, size), dtype=np.uint8)
    for off in offsets:
        d = (rng.uniform(0.5, 1.0, size=blocks.shape[0]) * mag).astype(np.float16)
        blocks[:, off:off + 2] = d.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(n, -1)


def write(path, arch: str, metadata: dict, tensors: list) -> None:
    """``tensors``: ``(name, qtype or None, array)``; ``None``: the array as stored (F32 / F16)."""
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in metadata.items():
        if key == "general.alignment":
            w.add_custom_alignment(value)  # the writer pads to it too
        elif isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_string(key, value)
    for name, qtype, array in tensors:
        if qtype is None:
            w.add_tensor(name, array)
        else:
            w.add_tensor(name, array, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# ---- a tiny Llama ---------------------------------------------------------------------------------
LLAMA = dict(hidden=256, inter=512, heads=4, kv_heads=2, layers=2, vocab=320)


def llama_metadata(c: dict = LLAMA) -> dict:
    return {"llama.block_count": c["layers"], "llama.context_length": 128, "llama.embedding_length": c["hidden"],
            "llama.feed_forward_length": c["inter"], "llama.attention.head_count": c["heads"],
            "llama.attention.head_count_kv": c["kv_heads"], "llama.rope.freq_base": 10000.0,
            "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.vocab_size": c["vocab"],
            "llama.rope.dimension_count": c["hidden"] // c["heads"], "general.name": "tiny-llama"}


def llama_shapes(c: dict = LLAMA) -> dict[str, tuple[int, ...]]:
    """GGUF tensor name -> shape (torch order) of a Llama with tied embeddings (no ``output.weight``)."""
    h, i, d = c["hidden"], c["inter"], c["hidden"] // c["heads"]
    shapes = {"token_embd.weight": (c["vocab"], h), "output_norm.weight": (h,)}
    for b in range(c["layers"]):
        shapes.update({f"blk.{b}.attn_q.weight": (h, h), f"blk.{b}.attn_k.weight": (c["kv_heads"] * d, h),
                       f"blk.{b}.attn_v.weight": (c["kv_heads"] * d, h), f"blk.{b}.attn_output.weight": (h, h),
                       f"blk.{b}.ffn_gate.weight": (i, h), f"blk.{b}.ffn_up.weight": (i, h),
                       f"blk.{b}.ffn_down.weight": (h, i), f"blk.{b}.attn_norm.weight": (h,),
                       f"blk.{b}.ffn_norm.weight": (h,)})
    return shapes


# ---- a tiny Gemma 3 --------------------------------------------------------------------------------
GEMMA3 = dict(hidden=256, inter=512, heads=4, kv_heads=1, head_dim=64, layers=2, vocab=288)


def gemma3_metadata(c: dict = GEMMA3) -> dict:
    return {"gemma3.block_count": c["layers"], "gemma3.context_length": 128, "gemma3.embedding_length": c["hidden"],
            "gemma3.feed_forward_length": c["inter"], "gemma3.attention.head_count": c["heads"],
            "gemma3.attention.head_count_kv": c["kv_heads"], "gemma3.attention.key_length": c["head_dim"],
            "gemma3.attention.value_length": c["head_dim"], "gemma3.rope.freq_base": 10000.0,
            "gemma3.attention.layer_norm_rms_epsilon": 1e-6, "gemma3.attention.sliding_window": 32,
            "gemma3.vocab_size": c["vocab"], "general.name": "tiny-gemma3"}


def gemma3_shapes(c: dict = GEMMA3) -> dict[str, tuple[int, ...]]:
    h, i, d = c["hidden"], c["inter"], c["head_dim"]
    shapes = {"token_embd.weight": (c["vocab"], h), "output_norm.weight": (h,)}
    for b in range(c["layers"]):
        shapes.update({f"blk.{b}.attn_q.weight": (c["heads"] * d, h), f"blk.{b}.attn_k.weight": (c["kv_heads"] * d, h),
                       f"blk.{b}.attn_v.weight": (c["kv_heads"] * d, h),
                       f"blk.{b}.attn_output.weight": (h, c["heads"] * d),
                       f"blk.{b}.ffn_gate.weight": (i, h), f"blk.{b}.ffn_up.weight": (i, h),
                       f"blk.{b}.ffn_down.weight": (h, i), f"blk.{b}.attn_q_norm.weight": (d,),
                       f"blk.{b}.attn_k_norm.weight": (d,), f"blk.{b}.attn_norm.weight": (h,),
                       f"blk.{b}.post_attention_norm.weight": (h,), f"blk.{b}.ffn_norm.weight": (h,),
                       f"blk.{b}.post_ffw_norm.weight": (h,)})
    return shapes


def tensors_for(shapes: dict, types: dict, seed: int = 0, norm_offset: float = 0.0) -> list:
    """Every tensor of ``shapes``: 2-D ones in ``types[name]`` (default F32), 1-D ones F32 around
    ``1 + norm_offset`` (Gemma's files store its norms as ``w + 1``)."""
    rng = np.random.default_rng(seed)
    out = []
    for name, shape in shapes.items():
        qtype = types.get(name)
        if qtype is None or qtype == Q.F32:
            scale = 0.05 if len(shape) == 2 else 0.1
            base = 0.0 if len(shape) == 2 else 1.0 + norm_offset
            out.append((name, None, (base + rng.standard_normal(shape) * scale).astype(np.float32)))
        elif qtype == Q.F16:
            out.append((name, None, (rng.standard_normal(shape) * 0.05).astype(np.float16)))
        else:
            rows = int(np.prod(shape[:-1], dtype=np.int64))
            out.append((name, qtype, quantized(rng, qtype, rows, shape[-1]).reshape(*shape[:-1], -1)))
    return out


def hf_row_order(n_rows: int, n_head: int) -> np.ndarray:
    """The rows of transformers' (Hugging Face) q/k weight, as file rows: llama.cpp's converter
    interleaves each head's two rotary halves (``permute`` in convert_hf_to_gguf.py), so HF row
    ``h*D + j`` is file row ``h*D + 2*(j mod D/2) + j // (D/2)``."""
    d = n_rows // n_head
    j = np.arange(d)
    within = 2 * (j % (d // 2)) + j // (d // 2)
    return (np.arange(n_head)[:, None] * d + within[None, :]).reshape(-1)
