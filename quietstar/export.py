"""Export a training checkpoint, and load a thinking model back from an export or a checkpoint.

    python -m quietstar.export ckpt=<checkpoint or run dir> out=<dir> [format=hf|safetensors] [dtype=float32|bfloat16]

format=hf (default): a plain Hugging Face causal-LM dir that `transformers` loads as Llama / Mistral / Qwen2
    config.json, model.safetensors (HF key names, via loading.hf_config / hf_state_dict),
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
import sys
from pathlib import Path
from typing import Optional

import torch

from quietstar.checkpoint import (CheckpointError, build_thinker, find_checkpoint, load_thinker_checkpoint,
                                  load_tokenizer_from, save_tokenizer)
from quietstar.thinker import QuietStar, ThoughtConfig



def _thought_state(qs: QuietStar) -> dict[str, torch.Tensor]:
    """The parameters Quiet-STaR adds to the base model."""
    return {k: v for k, v in qs.state_dict().items() if not k.startswith("model.")}


def _write_meta(out: Path, qs: QuietStar, fmt: str, source: Path, dtype: torch.dtype) -> None:
    meta = {"format": fmt, "thought": dataclasses.asdict(qs.cfg), "source": str(source),
            "dtype": str(dtype).removeprefix("torch.")}
    (out / "quietstar.json").write_text(json.dumps(meta, indent=2) + "\n")


def export(ckpt, out, fmt: str = "hf", dtype: Optional[str] = None) -> Path:
    """Write an export of checkpoint `ckpt` (a step dir, checkpoints/ dir or run dir) to `out`."""
    from safetensors.torch import save_file

    if fmt not in ("hf", "safetensors"):
        raise ValueError(f"format must be 'hf' or 'safetensors', got {fmt!r}")
    source = find_checkpoint(ckpt)
    qs = load_thinker_checkpoint(source)
    dt = getattr(torch, dtype) if dtype else qs.model.tok_embeddings.weight.dtype
    cast = lambda sd: {k: v.detach().to(dt).contiguous() for k, v in sd.items()}  # noqa: E731
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "hf":
        from quietstar.loading import hf_config, hf_state_dict

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
    return out


def load_thinker(path, device=None, dtype=None) -> QuietStar:
    """The full thinking model from an export dir (either format) or a training checkpoint."""
    path = Path(path)
    meta_file = path / "quietstar.json"
    if not meta_file.is_file():
        return load_thinker_checkpoint(path, device=device, dtype=dtype)
    from safetensors.torch import load_file

    meta = json.loads(meta_file.read_text())
    thought = ThoughtConfig(**meta["thought"])
    if meta["format"] == "safetensors":
        from quietstar.checkpoint import read_model_config

        cfg = read_model_config(path)
        tok = load_tokenizer_from(path, cfg.vocab_size)
        return build_thinker(cfg, tok, thought, load_file(path / "model.safetensors"), dtype, device)
    from quietstar.loading import load_hf_model

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


def main(argv=None) -> None:
    args = dict(a.split("=", 1) for a in (sys.argv[1:] if argv is None else argv))
    unknown = set(args) - {"ckpt", "out", "format", "dtype"}
    if unknown or "ckpt" not in args or "out" not in args:
        raise SystemExit("usage: python -m quietstar.export ckpt=<dir> out=<dir> [format=hf|safetensors] "
                         "[dtype=float32|bfloat16]" + (f"  (unknown: {sorted(unknown)})" if unknown else ""))
    out = export(args["ckpt"], args["out"], args.get("format", "hf"), args.get("dtype"))
    print(f"exported {find_checkpoint(args['ckpt'])} -> {out} ({args.get('format', 'hf')})")


if __name__ == "__main__":
    main()
