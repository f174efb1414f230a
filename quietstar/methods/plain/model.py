"""The same module trained as a plain language model: no rollout, no grid, no talk head (thought.enabled=false).

`PlainLM` is a `QuietStar` (same parameters, same checkpoints), whose forward is the base model's next-token
NLL alone. It pretrains a random-init model before Quiet-STaR, and it is the matched no-thought baseline: the
same checkpoint trained on the same data as a plain LM.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from quietstar.checkpoint import init_weights
from quietstar.linear_ce import linear_logprob_sum
from quietstar.masks import ThoughtGrid, dense_grid_mask
from quietstar.methods.quietstar.thinker import QuietStar, thought_init_ids
from quietstar.methods.quietstar.scoring import ThoughtOutput


def _in_document(L: int, lengths, doc_ids, device):
    """Attention for packed rows: the grid predicate's text row (causal, padding, same document)."""
    allowed = dense_grid_mask(L, 1, 1, lengths, doc_ids, device)[:, None]  # (B, 1, L, L)

    def attn(i, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=q.shape[1] != k.shape[1])
    return attn


class PlainLM(QuietStar):
    def forward(self, input_ids, attention_mask=None, generator=None, doc_ids=None, thoughts=None) -> ThoughtOutput:
        lengths = self._check_input(input_ids, attention_mask)
        B, L = input_ids.shape
        attn = None if doc_ids is None else _in_document(L, lengths, doc_ids, input_ids.device)
        h = self.model(input_ids, attention_mask=attention_mask, attn=attn, return_hidden=True)  # (B, L, d)
        # x_{i+1} is a real token of position i's document (the last token of a document predicts nothing)
        ok = ThoughtGrid.target_ok(L, 0, lengths, doc_ids, input_ids.device).expand(B, L)
        ok = ok.to(h.dtype if h.dtype == torch.float64 else torch.float32)
        tgt = ThoughtGrid.target(input_ids, 0)
        coef = ok / ok.sum().clamp_min(1)
        weighted, _ = linear_logprob_sum(h.reshape(B * L, -1), self.model.lm_head_weight, tgt.flatten(), coef.flatten())
        nll = -weighted
        zero = nll.new_zeros(())
        empty = torch.zeros(B, 1, L, 0, dtype=torch.long, device=input_ids.device)
        v = nll.detach()  # 0-dim tensors: train.py turns them into numbers once per log_every
        metrics = {"train/loss": v, "train/nll": v, "train/nll_base": v}
        return ThoughtOutput(loss=nll, nll=nll.detach(), policy_loss=zero, reward=zero, mix_weight=zero,
                             thoughts=empty, metrics=metrics)


def build(cfg, base, tok, device) -> PlainLM:
    """The plain LM's entry in the method registry: PlainLM around `base`, with init_from's weights."""
    qs = PlainLM(base, tok, cfg.thought)
    if cfg.init_from:
        init_weights(qs, cfg.init_from)
    return qs.to(device)


@torch.no_grad()
def reset_thought_embeddings(qs: QuietStar) -> None:
    """Set <start> and <end> to the current embeddings of thought.init_token / end_init_token. A plain-LM
    stage never trains them, so a Quiet-STaR run that starts from its checkpoint would otherwise begin with
    the embeddings those tokens had at random init, which the trained model no longer reads as chain marks."""
    w = qs.model.tok_embeddings.weight
    for param, i in zip((qs.start_embedding, qs.end_embedding), thought_init_ids(qs.cfg, qs.tokenizer)):
        param.copy_((w[i].float() / qs.cfg.embedding_scale).to(param.dtype))
