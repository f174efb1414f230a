"""GGUF files of the llama architecture -> Transformer.

F32/F16/BF16/Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 tensors are dequantised with the `gguf` package; the key maps are
explicit tables (`GGUF_KEY_MAP`, `GGUF_LAYER_KEYS`); the model config comes from the file's llama.* metadata.
The file's tokenizer is built by tokenizer.tokenizer_from_gguf from the same metadata.

NOTE llama.cpp's convert script permutes the rows of HF's q/k projections (per head, it interleaves the
two RoPE halves for its GPT-J-style rotation). `unpermute_qk` undoes it so that model.py's HF-layout RoPE
applies to GGUF weights unchanged.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from quietstar.errors import LoadError, MissingFileError
from quietstar.hf_dir import model_from_tensors
from quietstar.model import ModelConfig, Transformer

GGUF_KEY_MAP = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
                "output.weight": "output.weight"}  # GGUF -> ours
GGUF_LAYER_KEYS = {  # GGUF -> ours, under blk.{i}. / layers.{i}.
    "attn_norm.weight": "attention_norm.weight", "attn_q.weight": "attention.wq.weight",
    "attn_k.weight": "attention.wk.weight", "attn_v.weight": "attention.wv.weight",
    "attn_output.weight": "attention.wo.weight", "ffn_norm.weight": "ffn_norm.weight",
    "ffn_gate.weight": "feed_forward.w1.weight", "ffn_up.weight": "feed_forward.w3.weight",
    "ffn_down.weight": "feed_forward.w2.weight",
}
GGUF_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")  # dequantised by gguf.quants


def gguf_reader(path: Path):
    import gguf

    if not path.is_file():
        raise MissingFileError(f"{path}: file not found")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # bad magic, truncated header, tensor data past the end of the file, ...
        raise LoadError(f"{path}: truncated or corrupt GGUF file ({type(e).__name__}: {e})") from e


def gguf_metadata(reader, path: Path) -> dict:
    try:
        return {k: f.contents() for k, f in reader.fields.items()}
    except Exception as e:
        raise LoadError(f"{path}: corrupt GGUF metadata ({type(e).__name__}: {e})") from e


def config_from_gguf(meta: dict, tensor_shapes: dict[str, tuple], path: Path) -> ModelConfig:
    """GGUF metadata (llama.* keys) -> ModelConfig; tied embeddings when there is no output.weight."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise LoadError(f"{path}: unsupported GGUF architecture {arch!r} (only 'llama')")
    if "rope_freqs.weight" in tensor_shapes or meta.get("llama.rope.scaling.type", "none") not in ("none", None):
        raise LoadError(f"{path}: GGUF rope scaling is not supported")
    if "token_embd.weight" not in tensor_shapes:
        raise LoadError(f"{path}: missing tensor 'token_embd.weight'")

    def get(key, default=KeyError):
        if f"llama.{key}" in meta:
            return meta[f"llama.{key}"]
        if default is KeyError:
            raise LoadError(f"{path}: missing GGUF metadata key 'llama.{key}'")
        return default

    n_heads = int(get("attention.head_count"))
    head_dim = get("attention.key_length", None)
    rope_dim = get("rope.dimension_count", None)
    try:
        cfg = ModelConfig(
            vocab_size=int(tensor_shapes["token_embd.weight"][0]), dim=int(get("embedding_length")),
            n_layers=int(get("block_count")), n_heads=n_heads, n_kv_heads=int(get("attention.head_count_kv", n_heads)),
            head_dim=None if head_dim is None else int(head_dim), intermediate_size=int(get("feed_forward_length")),
            norm_eps=float(get("attention.layer_norm_rms_epsilon")), rope_theta=float(get("rope.freq_base", 10000.0)),
            max_seq_len=int(get("context_length", 4096)), tie_embeddings="output.weight" not in tensor_shapes)
    except ValueError as e:
        raise LoadError(f"{path}: {e}") from e
    if rope_dim is not None and int(rope_dim) != cfg.head_dim:
        raise LoadError(f"{path}: partial rotary (rope.dimension_count={rope_dim} != head_dim={cfg.head_dim}) "
                        "is not supported")
    return cfg


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (convert_hf_to_gguf.py `permute`): per head, its rows are stored
    as (D/2, 2) interleaved pairs; HF's rotate-half RoPE wants the (2, D/2) halves.  w (n_heads*D, d)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _dequantize(t, path: Path) -> torch.Tensor:
    import gguf

    try:
        qtype = gguf.GGMLQuantizationType(int(t.tensor_type))
    except ValueError as e:
        raise LoadError(f"{path}: tensor {t.name!r} has an unknown GGML type {int(t.tensor_type)}") from e
    if qtype.name not in GGUF_TYPES:
        raise LoadError(f"{path}: tensor {t.name!r} has quantisation type {qtype.name}, which is not supported "
                        f"(supported: {', '.join(GGUF_TYPES)})")
    shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists dimensions innermost first
    try:
        arr = gguf.quants.dequantize(np.asarray(t.data), qtype).reshape(shape)
    except Exception as e:
        raise LoadError(f"{path}: cannot dequantise tensor {t.name!r} ({qtype.name}, shape {shape}): "
                        f"{type(e).__name__}: {e}") from e
    arr = arr.astype(np.float32, copy=False)
    return torch.from_numpy(arr if arr.flags.writeable and arr.flags.c_contiguous else arr.copy())


def _gguf_name(name: str) -> Optional[str]:
    """A GGUF tensor name -> ours, or None when it has no counterpart."""
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
    if m is None:
        return GGUF_KEY_MAP.get(name)
    ours = GGUF_LAYER_KEYS.get(m.group(2))
    return None if ours is None else f"layers.{m.group(1)}.{ours}"


def _to_gguf_name(ours: str) -> str:
    """Our tensor name -> the GGUF one (for error messages)."""
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", ours)
    if m is None:
        return {v: k for k, v in GGUF_KEY_MAP.items()}.get(ours, ours)
    gguf_key = {v: k for k, v in GGUF_LAYER_KEYS.items()}.get(m.group(2))
    return ours if gguf_key is None else f"blk.{m.group(1)}.{gguf_key}"


def load_gguf_model(reader, meta: dict, path: Path, dtype=None, device=None) -> Transformer:
    """A parsed GGUF file -> Transformer (dtype None = float32)."""
    shapes = {t.name: tuple(int(n) for n in reversed(t.shape)) for t in reader.tensors}
    cfg = config_from_gguf(meta, shapes, path)
    ours = {}
    for t in reader.tensors:
        name = _gguf_name(t.name)
        if name is None:
            raise LoadError(f"{path}: unexpected tensor {t.name!r}")
        w = _dequantize(t, path)
        if name.endswith("wq.weight"):
            w = unpermute_qk(w, cfg.n_heads)
        elif name.endswith("wk.weight"):
            w = unpermute_qk(w, cfg.n_kv_heads)
        ours[name] = w
    return model_from_tensors(cfg, ours, _to_gguf_name, path, dtype or torch.float32, device)
