"""Export a training checkpoint, and load a thinking model back from an export or a checkpoint.

    python -m quietstar.export ckpt=<checkpoint or run dir> out=<dir> [format=hf|safetensors] [dtype=float32|bfloat16]

format=hf (default): a plain Hugging Face causal-LM dir that `transformers` loads as Llama / Mistral / Qwen2
    config.json, model.safetensors (HF key names, via hf_dir.hf_config / hf_state_dict),
    tokenizer.json + tokenizer_config.json (when the model has a BPE tokenizer),
  plus, beside it, what only quietstar reads:
    quietstar.safetensors   start_embedding, end_embedding, talk_head.*
    quietstar.json          the ThoughtConfig and the export's provenance
format=safetensors: our own key names in one file
    model.safetensors (the whole QuietStar state dict), model_config.json, quietstar.json, tokenizer files.

`load_thinker(dir)` restores the full thinking model (QuietStar, with `.tokenizer`) from either export
format or from a training checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Optional

import torch

from quietstar.checkpoint import CheckpointError, find_checkpoint
from quietstar.methods.quietstar.load import thinker_from_state, load_thinker_checkpoint
from quietstar.cli import one_of, parse_kv
from quietstar.errors import UserError, run_main
from quietstar.tokenizer import load_tokenizer_from, save_tokenizer
from quietstar.methods.quietstar.thinker import QuietStar
from quietstar.methods.quietstar.config import ThoughtConfig


def _thought_state(qs: QuietStar) -> dict[str, torch.Tensor]:
    """The parameters Quiet-STaR adds to the base model."""
    return {k: v for k, v in qs.state_dict().items() if not k.startswith("model.")}


def _write_meta(out: Path, qs: QuietStar, fmt: str, source: Path, dtype: torch.dtype) -> None:
    meta = {"format": fmt, "thought": dataclasses.asdict(qs.cfg), "source": str(source),
            "dtype": str(dtype).removeprefix("torch.")}
    (out / "quietstar.json").write_text(json.dumps(meta, indent=2) + "\n")


EXPORT_DTYPES = ("float32", "bfloat16", "float16")


def check_export_target(source: Path, out: Path, overwrite: bool) -> None:
    """Refuse an `out` that would destroy the checkpoint or mix with other files (a UserError naming out)."""
    src, dst = source.resolve(), out.resolve()
    if dst == src or src in dst.parents or dst in src.parents:
        raise UserError(f"out={out}: overlaps the checkpoint {source}; export to a directory outside it")
    if any((p / "manifest.json").is_file() for p in [dst, *dst.parents]):
        raise UserError(f"out={out}: is inside a training checkpoint; export to a directory outside it")
    if dst.exists() and not dst.is_dir():
        raise UserError(f"out={out}: exists and is not a directory")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise UserError(f"out={out}: not empty; pass overwrite=true to replace its contents, or choose a new dir")


def export(ckpt, out, fmt: str = "hf", dtype: Optional[str] = None, overwrite: bool = False) -> Path:
    """Write an export of checkpoint `ckpt` (a step dir, checkpoints/ dir or run dir) to `out`.

    The files are written to a temporary sibling dir that is renamed to `out` when complete, so `out` holds
    either its old contents or the whole export. Refuses (UserError) an `out` that overlaps the checkpoint,
    lies inside any checkpoint, is a file, or is a non-empty dir without overwrite=True; dtype is a float."""
    if fmt not in ("hf", "safetensors"):
        raise UserError(f"format must be 'hf' or 'safetensors', got {fmt!r}")
    if dtype is not None and dtype not in EXPORT_DTYPES:
        raise UserError(f"dtype must be one of {EXPORT_DTYPES} (weights are exported as floats), got {dtype!r}")
    source, out = find_checkpoint(ckpt), Path(out)
    check_export_target(source, out, overwrite)
    qs = load_thinker_checkpoint(source)
    dt = getattr(torch, dtype) if dtype else qs.model.tok_embeddings.weight.dtype
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _write_export(tmp, qs, fmt, dt, source)
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_export(out: Path, qs: QuietStar, fmt: str, dt: torch.dtype, source: Path) -> None:
    from safetensors.torch import save_file

    cast = lambda sd: {k: v.detach().to(dt).contiguous() for k, v in sd.items()}  # noqa: E731
    if fmt == "hf":
        from quietstar.hf_dir import hf_config, hf_state_dict

        (out / "config.json").write_text(json.dumps(hf_config(qs.model.cfg, dt), indent=2) + "\n")
        save_file(cast(hf_state_dict(qs.model)), str(out / "model.safetensors"), metadata={"format": "pt"})
        save_file(cast(_thought_state(qs)), str(out / "quietstar.safetensors"), metadata={"format": "pt"})
        tok = qs.tokenizer
        if tok is not None and tok.bos_id is not None:
            gen = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
            (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    else:
        save_file(cast(qs.state_dict()), str(out / "model.safetensors"), metadata={"format": "pt"})
        (out / "model_config.json").write_text(json.dumps(qs.model.cfg.to_dict(), indent=2) + "\n")
    if qs.tokenizer is not None:
        save_tokenizer(qs.tokenizer, out)
    _write_meta(out, qs, fmt, source, dt)


def _replace_dir(new: Path, out: Path) -> None:
    """Rename the complete `new` to `out`; an existing `out` is set aside first and deleted only after."""
    old = out.with_name(f".old-{out.name}-{os.getpid()}")
    if out.exists():
        os.rename(out, old)
    os.rename(new, out)
    shutil.rmtree(old, ignore_errors=True)


def read_export_meta(meta_file: Path) -> tuple[dict, ThoughtConfig]:
    """quietstar.json -> (its dict, the ThoughtConfig); CheckpointError naming the file otherwise."""
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        if not isinstance(meta, dict) or meta.get("format") not in ("hf", "safetensors"):
            raise ValueError("expected an object with format 'hf' or 'safetensors'")
        return meta, ThoughtConfig(**meta["thought"])
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{meta_file}: not a valid export description ({type(e).__name__}: {e})") from e


def load_thinker(path, device=None, dtype=None) -> QuietStar:
    """The full thinking model from an export dir (either format) or a training checkpoint."""
    path = Path(path)
    meta_file = path / "quietstar.json"
    if not meta_file.is_file():
        return load_thinker_checkpoint(path, device=device, dtype=dtype)
    from safetensors.torch import load_file

    meta, thought = read_export_meta(meta_file)
    if meta["format"] == "safetensors":
        from quietstar.checkpoint import read_model_config

        cfg = read_model_config(path)
        tok = load_tokenizer_from(path, cfg.vocab_size)
        return thinker_from_state(cfg, tok, thought, load_file(path / "model.safetensors"), dtype, device)
    from quietstar.hf_dir import load_hf_model

    base = load_hf_model(path, dtype=dtype)
    tok = load_tokenizer_from(path, base.cfg.vocab_size)
    extra = load_file(path / "quietstar.safetensors")
    qs = QuietStar(base, tok, thought)
    want = _thought_state(qs)
    if set(want) != set(extra):
        raise CheckpointError(f"{path / 'quietstar.safetensors'}: expected tensors {sorted(want)}, "
                              f"found {sorted(extra)}")
    qs.load_state_dict({**{f"model.{k}": v for k, v in base.state_dict().items()},
                        **{k: v.to(base.tok_embeddings.weight.dtype) for k, v in extra.items()}}, strict=True)
    return qs.to(device) if device is not None else qs


USAGE = ("usage: python -m quietstar.export ckpt=<dir> out=<dir> [format=hf|safetensors] "
         "[dtype=float32|bfloat16|float16] [overwrite=false]")


def main(argv=None) -> None:
    args = parse_kv(sys.argv[1:] if argv is None else argv,
                    {"ckpt": "", "out": "", "format": "hf", "dtype": None, "overwrite": False},
                    {"format": one_of("hf", "safetensors"), "dtype": one_of(*EXPORT_DTYPES)})
    if not args["ckpt"] or not args["out"]:
        raise SystemExit(USAGE)
    out = export(args["ckpt"], args["out"], args["format"], args["dtype"], args["overwrite"])
    print(f"exported {find_checkpoint(args['ckpt'])} -> {out} ({args['format']})")


if __name__ == "__main__":
    run_main(main)
