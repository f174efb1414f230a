"""A trained QuietStar back from disk: from a state dict (built on the meta device, no random init) or from a
training checkpoint (the format in quietstar/checkpoint.py), for inference, evaluation and export."""

from __future__ import annotations

import torch

from quietstar.checkpoint import (CheckpointError, find_checkpoint, read_config_section, read_model_config,
                                  read_model_state, step_of, verify_checkpoint)
from quietstar.methods.quietstar.thinker import QuietStar
from quietstar.methods.quietstar.config import ThoughtConfig
from quietstar.model import Transformer, rope_inv_freq
from quietstar.tokenizer import load_tokenizer_from


def thinker_from_state(model_cfg, tokenizer, thought_cfg, state: dict, dtype=None, device=None) -> QuietStar:
    """A QuietStar holding exactly `state` (built on the meta device, no random init)."""
    with torch.device("meta"):
        base = Transformer(model_cfg)
        qs = QuietStar(base, tokenizer, thought_cfg)
    want = qs.state_dict()
    missing, unexpected = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    if missing or unexpected:
        raise CheckpointError(f"the saved weights do not match the saved model config (missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]})")
    dtype = dtype or state["model.tok_embeddings.weight"].dtype
    qs.load_state_dict({k: v.to(dtype).contiguous() for k, v in state.items()}, strict=True, assign=True)
    base.register_buffer("inv_freq", rope_inv_freq(model_cfg), persistent=False)
    return qs.to(device) if device is not None else qs


def load_thinker_checkpoint(path, device=None, dtype=None) -> QuietStar:
    """A QuietStar (with its tokenizer) from a training checkpoint, for inference or export."""
    path = find_checkpoint(path)
    verify_checkpoint(path)
    model_cfg = read_model_config(path)
    tok = load_tokenizer_from(path, model_cfg.vocab_size)
    # a curriculum's lengths at the saved step
    _, thought = read_config_section(path, "thought", ThoughtConfig).at_step(step_of(path))
    return thinker_from_state(model_cfg, tok, thought, read_model_state(path), dtype, device)
