"""A reasoning corpus where a thought must help: answers that need serial steps, worked and unworked.

Each document is a small, self-contained puzzle world, written as plain text, followed by queries `q=`.
Some queries are *worked*: after `=` their chain of intermediate steps is written out between the chain's
opening and closing marks (`-` and `.`), then the answer, as real text contains worked steps. The others
are *direct*: the answer follows `=` at once. A small model learns from the worked ones to do one step per
token; it cannot do all the steps inside the single position before a direct answer. A thought inserted
there can: if it writes the chain, the answer becomes a copy. The direct answers are the scored tokens.

Families (ReasoningConfig.families):

  lookup   k-hop lookup in a random map of `n_symbols` letters to themselves, listed in the document (as
           `a>f c>h ...`, or packed: one character per pair, the default), then queries:
                a3=j h1=-hd.d f2=-fjb.b ...
           `a3=j` asks for f(f(f(a))); the worked `f2=-fjb.b` writes the queried f, its image j, j's image b,
           then the answer. Difficulty: hops (1 .. max_hops).
  state    running state tracking: the sum mod 10 of a digit string, the running sums written out when worked:
                4712=4 93=-92.2 ...
           (4, 4+7=1, 1+1=2, 2+2=4). Difficulty: the number of digits (min_digits .. max_digits).

Where a thought starts. A direct and a worked query read the same up to `=`, so a thought after `=` whose
<start> is the opening mark (thought.init_token) sees exactly the text of a worked query, and the model
continues it as it has learned to continue a chain; its <end>, the closing mark (thought.end_init_token),
is followed by what follows a chain: the answer. Any sign before `=` that tells worked from direct queries
would make that context one the model never saw: a 1-layer model then reads the sign and drops the chain
(measured: 1-19% of such thoughts are correct chains, against 100% without a sign).

The price is that the answer position is shared with the opening mark: in the text, `=` is followed by `-`
as often as worked_share. So the scores (AnswerScores) are of the answer *given that no chain follows*: the
answer's probability renormalised without the opening mark, the same for every prediction compared; the raw
next-token NLL, with its floor of -ln(1 - worked_share), is reported beside it.

A fixed share of all maps (lookup) and digit strings (state) belongs to the evaluation split, chosen by a
stable hash with the seed, so no evaluation map or problem can appear in training. Documents are a
deterministic function of (seed, split, index).

Why packed maps: with `a>f`, one lookup is two attention hops (find the source, read the image two tokens
on), and a small model learns that circuit only after a long plateau; with one character per pair it is one
hop, which a 1-layer model learns within about 1,000 steps, while composing two lookups inside one position
stays out of its reach. That is the gap a thought can close: one hop per thought token.
"""

from __future__ import annotations

import random
import string
import zlib
from dataclasses import dataclass, field
from typing import List, NamedTuple, Optional, Sequence

import torch

FAMILIES = ("lookup", "state")
# one character per (symbol, image) pair for map_style=packed: printable ASCII that no other part of a
# document uses (not a-z, digits, space, or = : > and the default chain delimiter -)
PAIR_CHARS = "".join(c for c in map(chr, range(33, 127)) if not (c.isdigit() or c.islower() or c in "=>-."))


@dataclass
class ReasoningConfig:
    """The knobs of the reasoning corpus (data.source=reasoning)."""

    families: List[str] = field(default_factory=lambda: ["lookup"])
    """Which puzzle families the documents are drawn from (round robin): lookup | state."""
    n_symbols: int = 7  # lookup: letters in the map (2 .. 26; at most 7 when packed)
    max_hops: int = 3  # lookup: queries ask for 1 .. max_hops hops
    min_digits: int = 2  # state: shortest digit string
    max_digits: int = 4  # state: longest digit string
    n_queries: int = 8  # queries per document
    worked_share: float = 0.5  # share of queries whose chain is written out
    decoy_share: float = 0.0
    """Share of the worked queries whose written steps are a decoy (the first step repeated: `a3=-aaaa.d`):
    the model then learns two habits after the opening mark, only one of which helps, and REINFORCE has a
    choice to make between thoughts that both look like text."""
    chain_open: str = "-"
    """Opens a worked chain. <start> is initialised from thought.init_token: when both are this token, a
    thought begins where the model has learned that a chain begins."""
    chain_close: str = "."
    """Closes a worked chain, before its answer (thought.end_init_token: the same token for <end>)."""
    map_style: str = "packed"
    """lookup: how the map is written. arrow: `a>f c>b ...` (a lookup is two attention hops: find the source,
    read the image two tokens on); packed: each pair (x, f(x)) is one character of PAIR_CHARS, so one attention
    hop reads an image (a 1-layer model can learn a lookup, and cannot compose two in one position)."""
    map_kind: str = "permutation"
    """lookup: permutation (of the n_symbols letters) | function (any map of the letters to themselves: far
    more distinct maps for few symbols, so the held-out split can still use maps never seen)."""
    chain_from_query: bool = True
    """lookup: a worked chain starts with the queried symbol (`a3=-afjb.b`), so every chain step looks up the
    token before it; False: the chain holds the looked-up symbols only (`a3=-fjb.b`)."""
    eval_docs: int = 256  # documents in the held-out evaluation split
    eval_share: float = 0.2  # share of all maps / digit strings reserved for the evaluation split

    def __post_init__(self):
        bad = [f for f in self.families if f not in FAMILIES]
        if not self.families or bad:
            raise ValueError(f"data.reasoning.families must be a non-empty list of {FAMILIES}, got {list(self.families)}")
        if not 2 <= self.n_symbols <= 26:
            raise ValueError(f"data.reasoning.n_symbols must be in [2, 26], got {self.n_symbols}")
        if not 1 <= self.max_hops <= 9:
            raise ValueError(f"data.reasoning.max_hops must be in [1, 9], got {self.max_hops}")
        if not 1 <= self.min_digits <= self.max_digits:
            raise ValueError(f"data.reasoning needs 1 <= min_digits <= max_digits, got {self.min_digits}, "
                             f"{self.max_digits}")
        if self.n_queries < 1:
            raise ValueError(f"data.reasoning.n_queries must be >= 1, got {self.n_queries}")
        for name in ("worked_share", "decoy_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"data.reasoning.{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("chain_open", "chain_close"):
            c = getattr(self, name)
            if len(c) != 1 or c.isalnum() or c in " =>\n":
                raise ValueError(f"data.reasoning.{name} must be one punctuation character other than '=', '>', "
                                 f"got {c!r}")
        marks = (self.chain_open, self.chain_close)
        if self.chain_open == self.chain_close:
            raise ValueError(f"data.reasoning.chain_open and chain_close must differ, both are {self.chain_open!r}")
        if self.map_style not in ("arrow", "packed"):
            raise ValueError(f"data.reasoning.map_style must be arrow or packed, got {self.map_style!r}")
        if self.map_kind not in ("permutation", "function"):
            raise ValueError(f"data.reasoning.map_kind must be permutation or function, got {self.map_kind!r}")
        if self.map_style == "packed" and self.n_symbols ** 2 > len(PAIR_CHARS):
            raise ValueError(f"data.reasoning.map_style=packed holds at most {int(len(PAIR_CHARS) ** 0.5)} symbols "
                             f"(one character per pair), got n_symbols={self.n_symbols}")
        if not 0.0 < self.eval_share < 1.0:
            raise ValueError(f"data.reasoning.eval_share must be in (0, 1), got {self.eval_share}")
        if self.map_style == "packed" and set(marks) & set(PAIR_CHARS):
            raise ValueError(f"data.reasoning.chain_open and chain_close must not be pair characters of "
                             f"map_style=packed; use '-' and '.'")
        if self.eval_docs < 1:
            raise ValueError(f"data.reasoning.eval_docs must be >= 1, got {self.eval_docs}")


class Segment(NamedTuple):
    text: str
    difficulty: int = 0  # > 0: a scored answer of this difficulty (hops or digits); 0: plain text


@dataclass
class Document:
    family: str
    segments: List[Segment]
    key: tuple  # what must not repeat between the splits (the map, or the digit strings)

    @property
    def text(self) -> str:
        return "".join(s.text for s in self.segments)


# --------------------------------------------------------------------------------------------------
# the families


def held_out(key, seed: int, share: float) -> bool:
    """Whether a map or problem belongs to the evaluation split: a fixed share of the whole space of them,
    chosen by a stable hash with the seed, so that no training document can ever contain one."""
    return zlib.crc32(f"{seed}:{key}".encode()) % 10_000 < share * 10_000


class _Split(NamedTuple):
    seed: int
    share: float
    evaluation: bool

    def draw(self, make, what: str, tries: int = 10_000):
        """make() until the result belongs to this split."""
        for _ in range(tries):
            key = make()
            if held_out(key, self.seed, self.share) == self.evaluation:
                return key
        raise ValueError(f"reasoning corpus: no {what} of the {'evaluation' if self.evaluation else 'training'} "
                         f"split after {tries} draws: the space is too small; raise data.reasoning.n_symbols / "
                         f"max_digits or move data.reasoning.eval_share away from 0 and 1")


def _decoy(r: random.Random, cfg: ReasoningConfig, steps: list) -> list:
    """The steps as written: themselves, or (decoy_share of the time) the first one repeated."""
    return [steps[0]] * len(steps) if cfg.decoy_share and r.random() < cfg.decoy_share else steps


def _lookup(r: random.Random, cfg: ReasoningConfig, split: _Split) -> Document:
    letters = list(string.ascii_lowercase[:cfg.n_symbols])
    if cfg.map_kind == "permutation":
        draw = lambda: tuple(r.sample(letters, len(letters)))
    else:
        draw = lambda: tuple(r.choice(letters) for _ in letters)
    image = split.draw(draw, "map")
    f = dict(zip(letters, image))
    listing = letters[:]
    r.shuffle(listing)
    if cfg.map_style == "packed":
        n = cfg.n_symbols
        pair = lambda a: PAIR_CHARS[letters.index(a) * n + letters.index(f[a])]
        segs = [Segment("".join(pair(a) for a in listing) + "\n")]
    else:
        segs = [Segment(" ".join(f"{a}>{f[a]}" for a in listing) + "\n")]
    o, c = cfg.chain_open, cfg.chain_close
    for q in range(cfg.n_queries):
        sep = " " if q else ""
        a, hops = r.choice(letters), r.randint(1, cfg.max_hops)
        chain = [a]
        for _ in range(hops):
            chain.append(f[chain[-1]])
        if r.random() < cfg.worked_share:
            written = _decoy(r, cfg, chain if cfg.chain_from_query else chain[1:])
            segs.append(Segment(f"{sep}{a}{hops}={o}{''.join(written)}{c}{chain[-1]}"))
        else:
            segs += [Segment(f"{sep}{a}{hops}="), Segment(chain[-1], hops)]
    segs.append(Segment("\n"))
    return Document("lookup", segs, tuple(image))


def _state(r: random.Random, cfg: ReasoningConfig, split: _Split) -> Document:
    segs: List[Segment] = []
    keys = []
    o, c = cfg.chain_open, cfg.chain_close
    for q in range(cfg.n_queries):
        sep = " " if q else ""
        digits = split.draw(lambda: "".join(r.choice(string.digits)
                                            for _ in range(r.randint(cfg.min_digits, cfg.max_digits))), "digit string")
        keys.append(digits)
        running, total = [], 0
        for ch in digits:
            total = (total + int(ch)) % 10
            running.append(str(total))
        if r.random() < cfg.worked_share:
            segs.append(Segment(f"{sep}{digits}={o}{''.join(_decoy(r, cfg, running))}{c}{running[-1]}"))
        else:
            segs += [Segment(f"{sep}{digits}="), Segment(running[-1], len(digits))]
    segs.append(Segment("\n"))
    return Document("state", segs, tuple(keys))


_MAKERS = {"lookup": _lookup, "state": _state}


def make_documents(cfg: ReasoningConfig, n_docs: int, seed: int, split: str = "train") -> List[Document]:
    """`n_docs` documents of one split ("train" or "eval"), a deterministic function of (seed, split, index):
    document i does not depend on n_docs, and no map or problem of one split ever appears in the other."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be train or eval, got {split!r}")
    which = _Split(seed, cfg.eval_share, split == "eval")
    docs = []
    for i in range(n_docs):
        family = cfg.families[i % len(cfg.families)]
        docs.append(_MAKERS[family](random.Random(f"reasoning-{split}-{seed}-{i}"), cfg, which))
    return docs


def train_and_eval_documents(cfg: ReasoningConfig, n_train: int, seed: int):
    """(training documents, held-out evaluation documents) for one seed."""
    return make_documents(cfg, n_train, seed, "train"), make_documents(cfg, cfg.eval_docs, seed, "eval")


def max_document_chars(cfg: ReasoningConfig) -> int:
    """An upper bound on a document's length in characters (so data.seq_len can hold a whole one)."""
    per_query = {"lookup": 1 + 2 + 2 * cfg.max_hops + 4, "state": 1 + 2 * cfg.max_digits + 4}
    header = {"lookup": (1 if cfg.map_style == "packed" else 4) * cfg.n_symbols, "state": 0}
    return max(header[f] + cfg.n_queries * per_query[f] + 1 for f in cfg.families)


# --------------------------------------------------------------------------------------------------
# tokens and scoring


def encode_document(doc: Document, tokenizer) -> tuple[list[int], list[int]]:
    """-> (ids with BOS first, difficulty of each token: > 0 on scored answer tokens). Segments are encoded one
    by one, so an answer is its own tokens whatever the tokenizer (bytes here: the same ids as the text)."""
    ids, diff = [tokenizer.bos_id], [0]
    for seg in doc.segments:
        t = tokenizer.encode(seg.text, add_bos=False)
        ids += t
        diff += [seg.difficulty] * len(t)
    return ids, diff


def batches(docs: Sequence[Document], tokenizer, batch_size: int, pad_id: int = 0):
    """Right-padded (ids (B, L), attention_mask (B, L), difficulty (B, L), docs) batches."""
    for b0 in range(0, len(docs), batch_size):
        chunk = docs[b0:b0 + batch_size]
        enc = [encode_document(d, tokenizer) for d in chunk]
        L = max(len(i) for i, _ in enc)
        ids = torch.full((len(chunk), L), pad_id, dtype=torch.long)
        mask = torch.zeros(len(chunk), L, dtype=torch.long)
        diff = torch.zeros(len(chunk), L, dtype=torch.long)
        for row, (i, d) in enumerate(enc):
            ids[row, :len(i)] = torch.tensor(i)
            mask[row, :len(i)] = 1
            diff[row, :len(d)] = torch.tensor(d)
        yield ids, mask, diff, chunk


def chain_open_ids(cfg: ReasoningConfig, tokenizer) -> list:
    """The token(s) that open a worked chain: what competes with a direct answer at its position."""
    return tokenizer.encode(cfg.chain_open, add_bos=False)[:1]


class AnswerScores:
    """Sums of answer-token CE and correct top-1 predictions, by difficulty, of the answer given that no chain
    follows (the answer's probability renormalised without the `without` tokens), and the raw CE."""

    def __init__(self, without=()):
        self.without = list(without)
        self.nll: dict = {}
        self.nll_raw: dict = {}
        self.correct: dict = {}
        self.count: dict = {}

    def add(self, logits: torch.Tensor, ids: torch.Tensor, diff: torch.Tensor) -> None:
        """logits (B, L, V) predict ids[:, 1:] from positions :-1; only tokens with diff > 0 count."""
        logits = logits[:, :-1].float()
        tgt, dd = ids[:, 1:], diff[:, 1:]
        raw = -torch.log_softmax(logits, -1).gather(-1, tgt[..., None]).squeeze(-1)
        if self.without:
            logits = logits.clone()
            logits[..., self.without] = float("-inf")
        logp = torch.log_softmax(logits, -1)
        ce = -logp.gather(-1, tgt[..., None]).squeeze(-1)
        hit = logp.argmax(-1) == tgt
        for k in dd[dd > 0].unique().tolist():
            sel = dd == k
            self.nll[k] = self.nll.get(k, 0.0) + float(ce[sel].sum())
            self.nll_raw[k] = self.nll_raw.get(k, 0.0) + float(raw[sel].sum())
            self.correct[k] = self.correct.get(k, 0) + int(hit[sel].sum())
            self.count[k] = self.count.get(k, 0) + int(sel.sum())

    def summary(self) -> dict:
        """{"nll": {"all": .., "1": .., ...}, "nll_raw": {...}, "acc": {...}, "count": {...}} (difficulty keys
        as strings)."""
        keys = sorted(self.count)
        total = max(1, sum(self.count.values()))
        out = {name: {"all": sum(getattr(self, name).values()) / total} for name in ("nll", "nll_raw")}
        out["acc"] = {"all": sum(self.correct.values()) / total}
        out["count"] = {"all": sum(self.count.values())}
        for k in keys:
            out["nll"][str(k)] = self.nll[k] / self.count[k]
            out["nll_raw"][str(k)] = self.nll_raw[k] / self.count[k]
            out["acc"][str(k)] = self.correct[k] / self.count[k]
            out["count"][str(k)] = self.count[k]
        return out


def lookup_chain(doc: Document, query: str, hops: int, cfg: ReasoningConfig) -> tuple[str, str]:
    """(the chain a worked lookup query writes, its decoy) as text: `afcd` and `aaaa` for `a3=` (chain_from_query)."""
    letters = string.ascii_lowercase[:len(doc.key)]
    f = dict(zip(letters, doc.key))
    chain = [query]
    for _ in range(hops):
        chain.append(f[chain[-1]])
    steps = chain if cfg.chain_from_query else chain[1:]
    return "".join(steps), steps[0] * len(steps)


def query_symbol(tokenizer, ids: torch.Tensor, p: int) -> str:
    """The queried symbol of the direct answer at token p: `a` in `a3=`, three characters back (decoded from the
    last three tokens, which hold at least three characters, not from the whole prefix)."""
    return tokenizer.decode(ids[max(0, p - 3):p].tolist())[-3]


def thought_kind(thought: str, chain: str, decoy: str) -> str:
    """`chain` when a thought begins with the query's chain of lookups, `decoy` with its decoy (and not the
    chain: a map's fixed point makes them equal), `other` otherwise."""
    if thought.startswith(chain):
        return "chain"
    return "decoy" if thought.startswith(decoy) else "other"


@torch.no_grad()
def score_answers(qs, docs: Sequence[Document], tokenizer, batch_size: int = 32, seed: int = 0,
                  thoughts: bool = True, n_examples: int = 0, device="cpu", without=(),
                  chains: Optional[ReasoningConfig] = None) -> dict:
    """Answer-token NLL and top-1 accuracy on `docs`, by difficulty: `no_thought` (the base prediction) and,
    with `thoughts`, `thought` (the talk-head-mixed prediction after one sampled thought, as the paper
    evaluates). `without`: tokens left out of the answer's distribution (chain_open_ids: the scores are then of
the answer given that no chain follows). `examples`: the first `n_examples` decoded thoughts before an
answer of the hardest level. With `chains` (the corpus config), `thought_kinds`: by difficulty, how many of
the thoughts before a lookup answer write its chain, its decoy or something else (thought_kind), with
`chain_later` for the others that hold the chain after something else."""
    was_training = qs.training
    kinds: dict = {}
    qs.eval()
    g = torch.Generator(device=device).manual_seed(seed)
    base, mixed = AnswerScores(without), AnswerScores(without)
    examples: list = []
    top = max(max(s.difficulty for s in d.segments) for d in docs)
    for ids, mask, diff, chunk in batches(docs, tokenizer, batch_size, getattr(tokenizer, "pad_id", 0) or 0):
        ids, mask, diff = ids.to(device), mask.to(device), diff.to(device)
        if not thoughts:
            base.add(qs.model(ids, attention_mask=mask), ids, diff)
            continue
        out = qs.next_token_logits(ids, mask, generator=g, n_thoughts=1).full()  # base where none is thought
        base.add(out.base, ids, diff)
        mixed.add(out.mixed[:, 0], ids, diff)
        for b, p in (diff == top).nonzero().tolist():
            if len(examples) >= n_examples:
                break
            examples.append({"context": tokenizer.decode(ids[b, max(0, p - 8):p].tolist()),
                             "thought": qs.decode_thought(out.thoughts, b, 0, p - 1),
                             "answer": tokenizer.decode([int(ids[b, p])]),
                             "mix_weight": float(out.mix_weight[b, 0, p - 1])})
        if chains is not None:
            for b, p in (diff > 0).nonzero().tolist():
                doc = chunk[b]
                if doc.family != "lookup":
                    continue
                query = query_symbol(tokenizer, ids[b], p)
                chain, decoy = lookup_chain(doc, query, int(diff[b, p]), chains)
                thought = qs.decode_thought(out.thoughts, b, 0, p - 1)
                kind = thought_kind(thought, chain, decoy)
                if kind == "other" and chain in thought:  # e.g. `a3=-afcd` from a <start> that restates the query
                    kind = "chain_later"
                counts = kinds.setdefault(str(int(diff[b, p])), {"chain": 0, "chain_later": 0, "decoy": 0, "other": 0})
                counts[kind] += 1
    qs.train(was_training)
    res = {"no_thought": base.summary()}
    if thoughts:
        res["thought"] = mixed.summary()
        res["examples"] = examples
        if chains is not None:
            res["thought_kinds"] = dict(sorted(kinds.items()))
    return res
