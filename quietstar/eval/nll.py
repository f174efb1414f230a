"""Held-out NLL with and without thoughts, overall and by difficulty, with the per-token gain.

For every token x_{i+1} of every record (the first seq_len tokens of its `text`), two predictions from
`QuietStar.next_token_logits` (n = 1, K = 1): the base model's, and the paper's eval prediction after a
thought sampled at position i (talk-head-mixed logits at the <end> step). The gain of a token is
CE_base - CE_thought (nats; > 0: the thought helped). Difficulty buckets are the quantiles of the base
model's per-token CE over all scored tokens (bucket 0 = easiest); entropy buckets are the quantiles of the
entropy of the base model's predictive distribution (bucket 0 = most confident: what a model can know
before it sees the token, the signal for choosing where to think). Every token is in exactly one bucket of
each. The paper's claim to compare with: thoughts help most on the hard tokens.

The uncertainty of the overall gain is over records, not tokens (a record's tokens are not independent
draws): `record_bootstrap` resamples the records with replacement and takes the percentile interval of
the token-weighted gain sum(gain) / sum(tokens) of the resampled records.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from quietstar.eval.common import DataError, Progress, field, read_jsonl
from quietstar.generate import encode_prompt
from quietstar.methods.quietstar.thinker import QuietStar


@dataclass
class TokenScores:
    """Per scored token, in record order (all numpy arrays of length N, thoughts (N, T-3))."""

    record: np.ndarray  # index of the record in the slice
    position: np.ndarray  # i: the prediction is made at position i, of token i + 1
    target: np.ndarray  # x_{i+1}
    ce_base: np.ndarray
    ce_thought: np.ndarray
    entropy_base: np.ndarray  # entropy of the base prediction (nats)
    mix_weight: np.ndarray
    thoughts: np.ndarray
    ids: list  # per record: its token ids

    @property
    def gain(self) -> np.ndarray:
        return self.ce_base - self.ce_thought


def load_texts(path, start: int = 0, limit: Optional[int] = None) -> list[tuple[int, str]]:
    """(line number, text) of the records' `text` fields; an empty text is an error naming its line."""
    path = Path(path)
    out = []
    for lineno, rec in read_jsonl(path, start, limit):
        text = field(path, lineno, rec, "text")
        if not text.strip():
            raise DataError(f"{path}:{lineno}: field 'text' is empty")
        out.append((lineno, text))
    return out


@torch.no_grad()
def score_tokens(qs: QuietStar, tok, texts: Sequence[str], seq_len: int = 128, batch_size: int = 4,
                 think: bool = True, generator: Optional[torch.Generator] = None, desc: str = "nll",
                 names: Optional[Sequence[str]] = None) -> TokenScores:
    """CE of every token with and without a thought (think=False: the thought CE is the base CE, which is
    exact when the talk head is zero). names[k] says where text k came from, for error messages."""
    dev = qs.model.tok_embeddings.weight.device
    T = qs.cfg.n_ahead
    encoded = [encode_prompt(tok, t)[:seq_len] for t in texts]  # BOS first, as in training
    for k, ids in enumerate(encoded):
        if len(ids) < 2:
            where = names[k] if names is not None else f"text {k}"
            raise DataError(f"{where}: {len(ids)} token(s); at least 2 are needed to score one")
    # longest first so that batches pad little; results go back in record order
    order = sorted(range(len(encoded)), key=lambda k: -len(encoded[k]))
    cols = {n: [] for n in ("record", "position", "target", "ce_base", "ce_thought", "entropy_base", "mix_weight",
                            "thoughts")}
    bar = Progress(len(encoded), desc)
    for b0 in range(0, len(order), batch_size):
        idx = order[b0:b0 + batch_size]
        seqs = [encoded[k] for k in idx]
        L = max(map(len, seqs))
        x = torch.tensor([s + [tok.pad_id] * (L - len(s)) for s in seqs], device=dev)
        lengths = torch.tensor([len(s) for s in seqs], device=dev)
        mask = (torch.arange(L, device=dev)[None, :] < lengths[:, None]).long()
        tgt = x[:, 1:]
        if think:
            out = qs.next_token_logits(x, mask, generator, n_thoughts=1).full()
            base, mixed, w, th = out.base[:, :-1], out.mixed[:, 0, :-1], out.mix_weight[:, 0, :-1], out.thoughts[:, 0, :-1]
        else:
            base = qs.model(x, attention_mask=mask)[:, :-1]
            mixed, w = None, torch.zeros(x.shape[0], L - 1, device=dev)
            th = torch.zeros(x.shape[0], L - 1, T - 3, dtype=torch.long, device=dev)
        ce_b = F.cross_entropy(base.float().transpose(1, 2), tgt, reduction="none")  # (B, L-1)
        ce_t = ce_b if mixed is None else F.cross_entropy(mixed.float().transpose(1, 2), tgt, reduction="none")
        logp = torch.log_softmax(base.float(), -1)
        ent = -(logp.exp() * logp).sum(-1)
        for r, k in enumerate(idx):
            n = len(seqs[r]) - 1
            cols["record"].append(np.full(n, k))
            cols["position"].append(np.arange(n))
            cols["target"].append(tgt[r, :n].cpu().numpy())
            cols["ce_base"].append(ce_b[r, :n].cpu().numpy())
            cols["ce_thought"].append(ce_t[r, :n].cpu().numpy())
            cols["entropy_base"].append(ent[r, :n].cpu().numpy())
            cols["mix_weight"].append(w[r, :n].float().cpu().numpy())
            cols["thoughts"].append(th[r, :n].cpu().numpy())
        bar.update(len(idx))
    bar.close()
    cat = {k: np.concatenate(v) for k, v in cols.items()}
    order_tok = np.lexsort((cat["position"], cat["record"]))
    cat = {k: v[order_tok] for k, v in cat.items()}
    return TokenScores(ids=encoded, **cat)


def difficulty_buckets(values: np.ndarray, n_buckets: int = 5):
    """-> (bucket index per token in 0..n_buckets-1, the n_buckets - 1 inner edges). Quantiles of `values`
    (the base CE, or its entropy); a token equal to an edge goes to the upper bucket, so the buckets
    partition the tokens."""
    edges = np.quantile(values, np.arange(1, n_buckets) / n_buckets) if n_buckets > 1 else np.zeros(0)
    return np.searchsorted(edges, values, side="right"), edges


def bucket_table(scores: TokenScores, values: np.ndarray, n_buckets: int, range_name: str) -> list:
    """Per quantile bucket of `values`: its range, token count, NLL with and without a thought, the gain."""
    b, edges = difficulty_buckets(values, n_buckets)
    gain = scores.gain
    rows = []
    for k in range(n_buckets):
        sel = b == k
        lo = float(edges[k - 1]) if k > 0 else float(values.min())
        hi = float(edges[k]) if k < n_buckets - 1 else float(values.max())
        rows.append({"bucket": k, range_name: [lo, hi], "tokens": int(sel.sum()),
                     "nll_base": _mean(scores.ce_base[sel]), "nll_thought": _mean(scores.ce_thought[sel]),
                     "gain": _mean(gain[sel]), "frac_improved": _mean((gain[sel] > 0).astype(float))})
    return rows


def record_bootstrap(gain_sums, token_counts, level: float = 0.95, n_boot: int = 10_000,
                     seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval over records of the token-weighted gain: n_boot draws of as many
    records as there are, with replacement; each draw's statistic is sum(gain sums) / sum(token counts) of
    the records drawn; -> its (1 - level) / 2 and (1 + level) / 2 quantiles. Seeded: the same inputs give
    the same interval."""
    sums, counts = np.asarray(gain_sums, dtype=np.float64), np.asarray(token_counts, dtype=np.float64)
    if sums.shape != counts.shape or sums.ndim != 1 or not len(sums):
        raise ValueError(f"one gain sum and one token count per record, got shapes {sums.shape} and {counts.shape}")
    rng = np.random.default_rng(seed)
    stats = []
    for b0 in range(0, n_boot, 1024):  # (draws, records) index blocks of bounded size
        idx = rng.integers(0, len(sums), size=(min(1024, n_boot - b0), len(sums)))
        stats.append(sums[idx].sum(1) / counts[idx].sum(1))
    lo, hi = np.quantile(np.concatenate(stats), [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def record_gains(scores: TokenScores) -> tuple[np.ndarray, np.ndarray]:
    """-> (the summed gain, the scored tokens) of each record, in record order."""
    n = len(scores.ids)
    sums = np.bincount(scores.record, weights=scores.gain.astype(np.float64), minlength=n)
    return sums, np.bincount(scores.record, minlength=n)


def summarize(scores: TokenScores, n_buckets: int = 5, n_boot: int = 10_000, seed: int = 0) -> dict:
    """The headline numbers and the per-bucket tables, by base CE and by base entropy (token-weighted means,
    nats); the gain's 95% record-bootstrap interval (`record_bootstrap`, n_boot draws from `seed`), the share
    of records whose mean gain is > 0, and each record's mean gain and token count."""
    gain = scores.gain
    nb, nt = float(scores.ce_base.mean()), float(scores.ce_thought.mean())
    sums, counts = record_gains(scores)
    per_record = sums / np.maximum(counts, 1)
    return {"nll_base": nb, "nll_thought": nt, "gain": nb - nt, "ppl_base": float(np.exp(nb)),
            "ppl_thought": float(np.exp(nt)), "tokens": int(len(gain)), "records": len(scores.ids),
            "frac_improved": float((gain > 0).mean()), "mix_weight_mean": float(scores.mix_weight.mean()),
            "gain_ci95_record_bootstrap": list(record_bootstrap(sums, counts, 0.95, n_boot, seed)),
            "records_improved_share": float((per_record > 0).mean()),
            "record_gain": per_record.tolist(), "record_tokens": counts.tolist(),
            "n_buckets": n_buckets, "buckets": bucket_table(scores, scores.ce_base, n_buckets, "base_ce_range"),
            "entropy_buckets": bucket_table(scores, scores.entropy_base, n_buckets, "base_entropy_range")}


def _mean(x: np.ndarray) -> Optional[float]:
    return float(x.mean()) if len(x) else None


def save_npz(path, scores: TokenScores, n_buckets: int = 5):
    b, _ = difficulty_buckets(scores.ce_base, n_buckets)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, record=scores.record, position=scores.position, target=scores.target,
                        ce_base=scores.ce_base, ce_thought=scores.ce_thought, gain=scores.gain,
                        entropy_base=scores.entropy_base,
                        mix_weight=scores.mix_weight, thoughts=scores.thoughts, bucket=b)
