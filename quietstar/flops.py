"""Model FLOPs of a training step: the matmuls a step must compute, whatever it recomputes.

Used by the training-step benchmark (model FLOP utilisation) and by recipes that give two runs the same
compute (the Quiet-STaR run and its plain-LM baseline).
"""

from __future__ import annotations

from quietstar.masks import ThoughtGrid


def step_flops(m, mode: str, B: int, L: int, T: int, K: int, n: int, q: float = 1.0) -> float:
    """Model FLOPs of one step (matmuls only, causal attention counted at half the square): what the
    step must compute, whatever it recomputes. Backward = 2x forward. q: the fraction of positions that
    think (thought.where): their branches, talk and policy predictions scale with it, the text row does not."""
    S = ThoughtGrid(T, K).S
    qd, kvd = m.n_heads * m.head_dim, m.n_kv_heads * m.head_dim
    layer = 2 * m.n_layers * (m.dim * (2 * qd + 2 * kvd) + 3 * m.dim * m.intermediate_size)  # per token
    head = 2 * m.dim * m.vocab_size
    attn = lambda keys: 4 * m.n_layers * qd * keys  # per query over `keys` keys (QK^T and PV)
    if mode.startswith("plain"):
        rows = B * ((1 + n * (S - 1)) if mode == "plain_grid" else 1)
        return 3 * rows * (L - 1) * (layer + head + attn(L / 2))
    branch = B * n * (S - 1) * q * L  # branch tokens of the learning pass
    lm_rows = B * L + B * q * L * (n * K + n * (T - 3))  # base, talk and policy predictions
    learn = 3 * ((B * L + branch) * (layer + attn(L / 2)) + branch * attn(S / 2) + lm_rows * head)
    rollout = B * L * (layer + attn(L / 2)) + (T - 3) * B * n * q * L * (layer + attn(L / 2) + head)
    return learn + rollout
