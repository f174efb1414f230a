"""Quiet-STaR's entry in the method registry: the run's model, and the checks across config sections that its
`thought` section needs."""

from __future__ import annotations

from quietstar.checkpoint import init_weights, read_config_node
from quietstar.config import check_positive
from quietstar.errors import ConfigError
from quietstar.methods.plain.model import reset_thought_embeddings
from quietstar.methods.quietstar.thinker import QuietStar


def build(cfg, base, tok, device) -> QuietStar:
    """QuietStar around `base`; with init_from, the weights of that checkpoint. From a plain-LM stage's
    checkpoint, <start>/<end> are set anew from the trained embeddings (reset_thought_embeddings)."""
    qs = QuietStar(base, tok, cfg.thought)
    if cfg.init_from:
        source = init_weights(qs, cfg.init_from)
        if not read_config_node(source).thought.enabled:
            reset_thought_embeddings(qs)
    return qs.to(device)


def check(cfg) -> None:
    """The thought section against the others: a ConfigError naming the field."""
    t = cfg.thought
    check_positive("thought", "policy_weight", t.policy_weight, allow_zero=True)
    if t.talk_head_hidden is not None:
        check_positive("thought", "talk_head_hidden", t.talk_head_hidden)
    if t.ema_decay is not None and cfg.dist.kind == "fsdp":
        raise ConfigError("thought.ema_decay: the EMA teacher is not sharded; use dist=ddp or dist=none, or "
                          "thought.ema_decay=null (the base pass as the counterfactual)")
    if cfg.data.seq_len <= t.n_ahead_talk:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} must exceed thought.n_ahead_talk={t.n_ahead_talk}")
    if cfg.model.name is None:
        max_len = cfg.model.architecture().max_seq_len
        if cfg.data.seq_len + t.n_grid_steps > max_len:
            raise ConfigError(f"data.seq_len={cfg.data.seq_len} + thought steps exceeds model.max_seq_len={max_len}")
