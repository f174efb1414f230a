"""Shared pieces of the evaluations: data files, model loading, thoughts at chosen positions, a progress
bar, and the json record.

The one computation here is `next_token_logits_at`: the paper's evaluation prediction (K = 1, the mixed
logits at the <end> step) for a few chosen positions of a batch, without thinking at every other
position. A position's thought only sees the text up to that position and its own branch (the grid
predicate, docs/thought-grid.md), so the text's K/V is computed once and each chosen position's branch
<start>, t_1..t_{T-3}, <end> is decoded on top of it with the later text keys masked out.
`QuietStar.next_token_logits` given the same thoughts gives the same logits (tests/test_eval.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple, Optional, Sequence

import torch

from quietstar.errors import UserError
from quietstar.model import KVCache
from quietstar.provenance import write_json  # noqa: F401  (the evaluations' json writer: atomic)
from quietstar.methods.quietstar.thinker import QuietStar

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


class DataError(UserError):
    """A bad data file: the message names the file and the line."""


# --------------------------------------------------------------------------------------------------
# data


def default_data_path(relative: str, given: Optional[str]) -> Path:
    """`given` if set, else ../shared/data/<relative> beside the project when it exists."""
    if given:
        path = Path(given).expanduser()
        if not path.is_file():
            raise DataError(f"{path}: no such file")
        return path
    path = SHARED_DATA / relative
    if not path.is_file():
        raise DataError(f"no data.path given and the default {path} does not exist; pass data.path=FILE")
    return path


def read_jsonl(path, start: int = 0, limit: Optional[int] = None) -> list[tuple[int, dict]]:
    """(line number, record) for the non-blank lines of a jsonl file, from record `start` (negative:
    counted from the end) and at most `limit` of them. Bad json names the file and line."""
    path = Path(path)
    records = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:  # a byte order mark is not part of the first record
                rec = json.loads(raw.decode("utf-8-sig" if lineno == 1 else "utf-8"))
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 ({e.reason} at byte {e.start})") from None
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid json ({e.msg} at column {e.colno})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{lineno}: expected a json object, got {type(rec).__name__}")
            records.append((lineno, rec))
    if not records:
        raise DataError(f"{path}: no records")
    if not -len(records) <= start < len(records):
        raise DataError(f"data.start={start}: {path} has {len(records)} records (valid: {-len(records)} .. "
                        f"{len(records) - 1})")
    if limit is not None and limit < 0:
        raise DataError(f"limit={limit}: must be >= 0 (0 = all)")
    records = records[start:] if start else records
    return records[:limit] if limit else records


def field(path, lineno: int, rec: dict, name: str, kind=str):
    """rec[name], checked to be a `kind`, or a DataError naming the file, line and field."""
    if name not in rec:
        raise DataError(f"{path}:{lineno}: missing field {name!r} (fields: {sorted(rec)})")
    value = rec[name]
    if not isinstance(value, kind):
        want = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise DataError(f"{path}:{lineno}: field {name!r} should be {want}, got {type(value).__name__}")
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate such as "\ud800": valid JSON, not valid Unicode
            raise DataError(f"{path}:{lineno}: field {name!r} is not valid Unicode ({e.reason} at character "
                            f"{e.start})") from None
    return value


# --------------------------------------------------------------------------------------------------
# model


def load_model(ckpt: Optional[str] = None, model: str = "smollm2-135m", device: str = "cpu",
               n_ahead: Optional[int] = None):
    """(QuietStar, tokenizer, description) for evaluation: generate.load_for_inference in fp32."""
    from quietstar.generate import load_for_inference

    qs, tok = load_for_inference(ckpt, device, torch.float32, model, n_ahead)
    desc = f"checkpoint {ckpt}" if ckpt else f"{model} base model, fresh thought parameters"
    return qs, tok, desc


def talk_head_is_zero(qs: QuietStar) -> bool:
    """True when the mixing weight is w = 0 for every input (the zero-initialised last layer, no sigmoid):
    then the mixed prediction is exactly the base one and thinking cannot change any number."""
    return not qs.cfg.mix_sigmoid and bool((qs.talk_head.net[4].weight == 0).all())


def resolve_think(qs: QuietStar, thoughts: str) -> bool:
    """thoughts=auto|on|off -> whether to run thoughts (auto: off only when w = 0 exactly)."""
    if thoughts not in ("auto", "on", "off"):
        raise ValueError(f"thoughts must be auto, on or off, got {thoughts!r}")
    return thoughts == "on" or (thoughts == "auto" and not talk_head_is_zero(qs))


def thought_info(qs: QuietStar, think: bool) -> dict:
    T = qs.cfg.n_ahead
    return {"n_ahead": T, "thought_tokens": T - 1, "sampled_thought_tokens": T - 3,
            "thought_temperature": qs.cfg.gumbel_temperature, "n_thoughts": 1, "n_ahead_talk": 1,
            "talk_head_zero": talk_head_is_zero(qs), "thoughts_run": think,
            "note": None if think else "talk head is exactly zero (w = 0): the with-thought prediction equals "
                                       "the base prediction exactly, so thoughts were not sampled"}


# --------------------------------------------------------------------------------------------------
# the evaluation prediction at chosen positions


class PositionLogits(NamedTuple):
    base: torch.Tensor  # (P, V) no-thought logits of x_{j+1} at each chosen (row, position j)
    mixed: torch.Tensor  # (P, V) talk-head-mixed logits after the thought at j (K = 1, <end> step)
    mix_weight: torch.Tensor  # (P,)
    thoughts: torch.Tensor  # (P, T-3) the sampled thought tokens


@torch.no_grad()
def next_token_logits_at(qs: QuietStar, ids: torch.Tensor, rows: Sequence[int], positions: Sequence[int],
                         generator: Optional[torch.Generator] = None,
                         thoughts: Optional[torch.Tensor] = None) -> PositionLogits:
    """`QuietStar.next_token_logits` (n = 1) at P chosen (row, position) pairs of a right-padded batch
    ids (B, L); each chosen position must be a real token (padding only follows it).

    Cost: one causal forward over the text plus T - 1 single-token steps for all P positions together,
    instead of T - 3 rollout steps and a T-row grid over every position. The thoughts are sampled in
    the order of the pairs; pass `thoughts` (P, T-3) to score given thoughts instead."""
    model = qs.model
    T, V = qs.cfg.n_ahead, model.cfg.vocab_size
    B, L = ids.shape
    dev = ids.device
    dtype = model.tok_embeddings.weight.dtype
    P = len(positions)
    if len(rows) != P:
        raise ValueError(f"rows ({len(rows)}) and positions ({P}) must pair up")
    if P == 0:
        empty = torch.zeros(0, V, device=dev)
        return PositionLogits(empty, empty, torch.zeros(0, device=dev),
                              torch.zeros(0, T - 3, dtype=torch.long, device=dev))
    row = torch.tensor(list(rows), dtype=torch.long, device=dev)  # (P,)
    pos = torch.tensor(list(positions), dtype=torch.long, device=dev)  # (P,)
    if int(pos.min()) < 0 or int(pos.max()) >= L or int(row.min()) < 0 or int(row.max()) >= B:
        raise ValueError(f"(row, position) pairs must lie in the ({B}, {L}) batch")
    # the text, causally; right padding is never attended by a real position
    text = KVCache(model.cfg, B, L, dtype=dtype, device=dev)
    h = model(inputs_embeds=qs.embed(ids), attn=text, return_hidden=True)  # (B, L, d)
    h_base = h[row, pos]  # (P, d)
    # one branch per chosen position, on top of a copy of its row's text K/V, later text masked out
    cache = KVCache(model.cfg, P, L + T - 1, dtype=dtype, device=dev)
    cache.k[:, :, :, :L] = text.k[:, row]
    cache.v[:, :, :, :L] = text.v[:, row]
    cache.key_valid[:, :L] = torch.arange(L, device=dev)[None, :] <= pos[:, None]  # sees x_0..x_j only
    cache.seen = L

    def feed(token, position):  # one single-token step for every branch -> (P, d)
        return model(inputs_embeds=qs.embed(token[:, None]), position_ids=position[:, None], attn=cache,
                     return_hidden=True)[:, 0]

    mixed, w, th = qs.think(feed, h_base, pos, generator, thoughts=thoughts)
    return PositionLogits(model.head(h_base), mixed, w, th)


@torch.no_grad()
def base_logits_at(qs: QuietStar, ids: torch.Tensor, rows: Sequence[int], positions: Sequence[int]) -> torch.Tensor:
    """The no-thought logits (P, V) at chosen (row, position) pairs of a right-padded batch (B, L)."""
    h = qs.model(inputs_embeds=qs.embed(ids), return_hidden=True)  # (B, L, d), plain causal
    return qs.model.head(h[list(rows), list(positions)])


# --------------------------------------------------------------------------------------------------
# progress and records


class Progress:
    """The evaluation progress bar (quietstar.logging.progress_bar, on stderr): `update(n, extra)` advances it
    and shows `extra`."""

    def __init__(self, total: int, desc: str = "", stream=None, min_interval: float = 0.5):
        from quietstar.logging import progress_bar

        self.bar = progress_bar(total, stream or sys.stderr, desc, min_interval=min_interval)

    def update(self, n: int = 1, extra: Optional[str] = None):
        if extra is not None:
            self.bar.set_postfix_str(extra, refresh=False)
        self.bar.update(n)

    def close(self):
        self.bar.close()


def progress(items: Iterable, total: int, desc: str = "") -> Iterator:
    bar = Progress(total, desc)
    try:
        for x in items:
            yield x
            bar.update()
    finally:
        bar.close()
