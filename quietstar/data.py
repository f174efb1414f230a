"""Training data: document sources, tokenization into fixed-length sequences, and a resumable cursor.

Sources (DataConfig.source):
  synthetic  the embedded math corpus (`synthetic_math`): worked arithmetic and algebra, where a thought can
             genuinely help predict the next token (the answer digits follow from a computation)
  reasoning  puzzles whose answers need serial steps, worked and unworked (quietstar/reasoning.py)
  jsonl      OpenWebMath-layout records (`{"text": ...}`, other fields ignored), .jsonl or .jsonl.gz, a file
             or a folder of them
  parquet    a file or folder of .parquet files with a text column
  text       a .txt file, or a folder of them (one document per file)
  hf         HF `datasets` streaming by name (imported lazily; needs a network)

Bad records (malformed JSON, a missing / empty / non-string text field, bytes that are not UTF-8) are
skipped and counted, with a warning naming the file and line; a file with no usable record is an error
naming the file.

Sequences (DataConfig.mode), L = seq_len:
  crop  as the official code (docs/official.md): BOS + the document's tokens; a longer document gets a random
        L-token window, a shorter one is right-padded with the pad id. attention_mask marks real tokens.
  pack  documents (BOS + tokens each) concatenated and cut into L-token rows; doc_ids (B, L) number the
        documents inside a row so that attention stays within a document; no padding.

Order: documents are visited in a per-epoch permutation seeded by (seed, epoch); crop offsets are seeded by
(seed, epoch, position). The whole reading state is a small cursor (epoch, position, offset) that a
checkpoint saves, so a resumed run reads exactly the batches the uninterrupted run would have.
"""

from __future__ import annotations

import gzip
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from quietstar.errors import UserError

log = logging.getLogger(__name__)


class DataFileError(UserError):
    """A data file or folder that gives no usable training text; the message names it."""


class MissingDataError(DataFileError, FileNotFoundError):
    """data.path names nothing."""

MAX_WARNINGS_PER_FILE = 5  # per-record warnings; the rest are only counted in the file's summary


# --------------------------------------------------------------------------------------------------
# the embedded synthetic math corpus


def _addition(r: random.Random) -> str:
    a, b = r.randint(10, 999), r.randint(10, 999)
    da, db = str(a)[::-1], str(b)[::-1]
    lines, carry = [], 0
    for k in range(max(len(da), len(db))):
        x, y = int(da[k]) if k < len(da) else 0, int(db[k]) if k < len(db) else 0
        s = x + y + carry
        lines.append(f"{x} + {y}" + (f" + {carry}" if carry else "") + f" = {s}, write {s % 10}"
                     + (", carry 1" if s >= 10 else ""))
        carry = s // 10
    if carry:
        lines.append("write the carry 1")
    return f"Compute {a} + {b}.\n" + ";\n".join(lines) + f".\nSo {a} + {b} = {a + b}.\n"


def _subtraction(r: random.Random) -> str:
    a = r.randint(50, 999)
    b = r.randint(10, a - 1)
    return (f"Compute {a} - {b}.\n{a} - {b} = {a} - {b // 10 * 10} - {b % 10} = {a - b // 10 * 10} - {b % 10} "
            f"= {a - b}.\nSo {a} - {b} = {a - b}.\n")


def _multiplication(r: random.Random) -> str:
    a, b = r.randint(11, 99), r.randint(3, 9)
    t, u = a // 10 * 10, a % 10
    return (f"Compute {a} * {b}.\n{a} * {b} = {t} * {b} + {u} * {b} = {t * b} + {u * b} = {a * b}.\n"
            f"So {a} * {b} = {a * b}.\n")


def _linear_equation(r: random.Random) -> str:
    x, a, b = r.randint(-9, 12), r.randint(2, 9), r.randint(1, 40)
    c = a * x + b
    return (f"Solve {a}x + {b} = {c}.\nSubtract {b} from both sides: {a}x = {c} - {b} = {c - b}.\n"
            f"Divide both sides by {a}: x = {c - b} / {a} = {x}.\nCheck: {a} * {x} + {b} = {a * x} + {b} = {c}.\n"
            f"So x = {x}.\n")


def _order_of_operations(r: random.Random) -> str:
    a, b, c = r.randint(2, 20), r.randint(2, 12), r.randint(2, 12)
    return f"Evaluate {a} + {b} * {c}.\nFirst {b} * {c} = {b * c}, then {a} + {b * c} = {a + b * c}.\nSo the value is {a + b * c}.\n"


def _word_problem(r: random.Random) -> str:
    name = r.choice(["Ana", "Ben", "Carla", "Dev", "Emi", "Femi", "Gus", "Hana"])
    item = r.choice(["apples", "pencils", "stickers", "marbles", "cards", "coins"])
    have, bags, per = r.randint(2, 40), r.randint(2, 9), r.randint(2, 12)
    total = have + bags * per
    return (f"{name} has {have} {item} and buys {bags} packs of {per} {item}. How many {item} does {name} have now?\n"
            f"The packs hold {bags} * {per} = {bags * per} {item}. Together: {have} + {bags * per} = {total}.\n"
            f"Answer: {total}.\n")


def _sequence(r: random.Random) -> str:
    start, step = r.randint(-10, 30), r.randint(2, 11)
    terms = [start + k * step for k in range(5)]
    return (f"Find the next term of {', '.join(map(str, terms))}, ...\nEach term adds {step}: "
            f"{terms[-1]} + {step} = {terms[-1] + step}.\nThe next term is {terms[-1] + step}.\n")


def _quick_facts(r: random.Random) -> str:
    """Answers given without working: the case where a silent thought helps most."""
    facts = []
    for _ in range(r.randint(3, 6)):
        a, b = r.randint(2, 60), r.randint(2, 60)
        op = r.choice(["+", "-", "*"])
        val = a + b if op == "+" else a - b if op == "-" else a * b
        facts.append(f"{a} {op} {b} = {val}")
    return "Quick facts: " + "; ".join(facts) + ".\n"


_PROBLEMS: list[Callable[[random.Random], str]] = [_addition, _subtraction, _multiplication, _linear_equation,
                                                   _order_of_operations, _word_problem, _sequence, _quick_facts]


def synthetic_math(n_docs: int, seed: int = 0) -> list[str]:
    """`n_docs` worksheets of 2-4 worked math problems each; the same list for the same seed."""
    r = random.Random(f"quietstar-synthetic-math-{seed}")
    docs = []
    for d in range(n_docs):
        k = r.randint(2, 4)
        docs.append(f"Worksheet {d + 1}.\n" + "\n".join(r.choice(_PROBLEMS)(r) for _ in range(k)))
    return docs


# --------------------------------------------------------------------------------------------------
# reading files, with bad records skipped and counted


class _Skips:
    """Counts the bad records of one file, warning for the first few with file and line."""

    def __init__(self, path: Path, unit: str = "line"):
        self.path, self.unit = path, unit
        self.count: dict[str, int] = {}

    def add(self, where: int, reason: str, detail: str = "") -> None:
        n = sum(self.count.values())
        self.count[reason] = self.count.get(reason, 0) + 1  # counted by kind; the warning has the detail
        if n < MAX_WARNINGS_PER_FILE:
            log.warning("%s:%s %d: skipped record: %s%s", self.path, self.unit, where, reason,
                        f" ({detail})" if detail else "")

    @property
    def total(self) -> int:
        return sum(self.count.values())

    def finish(self, n_good: int) -> None:
        if self.total:
            detail = ", ".join(f"{k}: {v}" for k, v in sorted(self.count.items()))
            log.warning("%s: skipped %d bad record(s) (%s); %d usable", self.path, self.total, detail, n_good)
        if n_good == 0:
            detail = ", ".join(f"{k}: {v}" for k, v in sorted(self.count.items())) or "the file is empty"
            raise DataFileError(f"{self.path}: no usable record ({detail})")


def _check_text(rec, field: str) -> Optional[str]:
    """The reason a decoded record is unusable, or None."""
    if not isinstance(rec, dict):
        return f"not a JSON object ({type(rec).__name__})"
    if field not in rec:
        return f"missing field {field!r}"
    text = rec[field]
    if not isinstance(text, str):
        return f"field {field!r} is not a string ({type(text).__name__})"
    if not text.strip():
        return f"empty field {field!r}"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate such as "\ud800": valid JSON, not valid Unicode
        return f"field {field!r} is not valid Unicode ({e.reason} at character {e.start})"
    return None


def read_jsonl(path, text_field: str = "text", skipped: Optional[dict] = None) -> list[str]:
    """The `text_field` of every usable record of a .jsonl or .jsonl.gz file."""
    path = Path(path)
    skips = _Skips(path)
    docs = []
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue  # blank lines are not records
                try:  # a UTF-8 byte order mark before the first record is not part of it
                    line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    skips.add(lineno, "not UTF-8", f"{e.reason} at byte {e.start}")
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    skips.add(lineno, "malformed JSON", f"{e.msg} at column {e.colno}")
                    continue
                reason = _check_text(rec, text_field)
                if reason:
                    skips.add(lineno, reason)
                    continue
                docs.append(rec[text_field])
    except (OSError, EOFError) as e:  # unreadable, or a truncated / corrupt gzip stream
        raise DataFileError(f"{path}: cannot read ({e})") from e
    skips.finish(len(docs))
    if skipped is not None:
        skipped[str(path)] = skips.total
    return docs


def read_parquet(path, text_field: str = "text", skipped: Optional[dict] = None) -> list[str]:
    """The `text_field` column of a parquet file; null, empty, or non-UTF-8 values are skipped."""
    import pyarrow.parquet as pq

    path = Path(path)
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own error types for a bad file
        raise DataFileError(f"{path}: not a readable parquet file ({e})") from e
    if text_field not in pf.schema_arrow.names:
        raise DataFileError(f"{path}: no column {text_field!r} (columns: {pf.schema_arrow.names})")
    skips = _Skips(path, unit="row")
    docs, row = [], 0
    for batch in pf.iter_batches(columns=[text_field]):
        for value in batch.column(0).to_pylist():
            row += 1
            if isinstance(value, bytes):
                try:
                    value = value.decode("utf-8")
                except UnicodeDecodeError as e:
                    skips.add(row, "not UTF-8", f"{e.reason} at byte {e.start}")
                    continue
            reason = _check_text({text_field: value} if value is not None else {}, text_field)
            if reason:
                skips.add(row, reason if value is not None else f"null {text_field!r}")
                continue
            docs.append(value)
    skips.finish(len(docs))
    if skipped is not None:
        skipped[str(path)] = skips.total
    return docs


def read_text_file(path) -> Optional[str]:
    """One document per file; None (with a warning) for a file that is empty or not UTF-8."""
    path = Path(path)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        log.warning("%s: skipped file: not UTF-8 (%s at byte %d)", path, e.reason, e.start)
        return None
    if not text.strip():
        log.warning("%s: skipped file: empty", path)
        return None
    return text


def _files(path: Path, suffixes: tuple[str, ...]) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise MissingDataError(f"data.path {str(path)!r} does not exist")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(suffixes))
    if not files:
        raise DataFileError(f"data.path {str(path)!r}: no {'/'.join(suffixes)} files in this folder")
    return files


def load_documents(source: str, path: Optional[str], text_field: str = "text", max_docs: Optional[int] = None,
                   synthetic_docs: int = 4000, seed: int = 0, skipped: Optional[dict] = None) -> list[str]:
    """All documents of a file-based source (or the synthetic corpus), in file order."""
    if source == "synthetic":
        return synthetic_math(max_docs or synthetic_docs, seed)
    root = Path(path).expanduser()
    docs: list[str] = []
    if source == "jsonl":
        for f in _files(root, (".jsonl", ".jsonl.gz", ".json")):
            docs += read_jsonl(f, text_field, skipped)
    elif source == "parquet":
        for f in _files(root, (".parquet",)):
            docs += read_parquet(f, text_field, skipped)
    elif source == "text":
        files = _files(root, (".txt", ".md"))
        texts = [read_text_file(f) for f in files]
        if skipped is not None:
            skipped[str(root)] = sum(t is None for t in texts)
        docs = [t for t in texts if t is not None]
        if not docs:
            raise DataFileError(f"{root}: no usable text file")
    else:
        raise ValueError(f"data.source={source!r} is not file-based")
    return docs[:max_docs] if max_docs else docs


# --------------------------------------------------------------------------------------------------
# document order


class ListDocs:
    """Documents in memory, visited in a per-epoch permutation."""

    def __init__(self, docs: list[str], seed: int, shuffle: bool = True):
        self.docs, self.seed, self.shuffle = docs, seed, shuffle
        self._order_epoch, self._order = None, None

    def __len__(self) -> int:
        return len(self.docs)

    def order(self, epoch: int) -> list[int]:
        if self._order_epoch != epoch:
            if self.shuffle:
                # mod 2**64, manual_seed's range: the identity for every seed below about 1.8e13
                g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % 2**64)
                self._order = torch.randperm(len(self.docs), generator=g).tolist()
            else:
                self._order = list(range(len(self.docs)))
            self._order_epoch = epoch
        return self._order

    def iter_from(self, epoch: int, pos: int) -> Iterator[str]:
        order = self.order(epoch)
        for i in range(pos, len(order)):
            yield self.docs[order[i]]


class StreamingDocs:
    """HF `datasets` streaming by name (needs a network): a shuffled stream, resumed by skipping."""

    def __init__(self, name: str, text_field: str, seed: int, config: Optional[str] = None, split: str = "train",
                 shuffle: bool = True, max_docs: Optional[int] = None, buffer_size: int = 10_000):
        try:
            import datasets
        except ImportError as e:  # optional dependency
            raise ImportError("data.source=hf needs the `datasets` package: pip install datasets") from e
        self.ds = datasets.load_dataset(name, config, split=split, streaming=True)
        self.text_field, self.seed, self.shuffle, self.max_docs = text_field, seed, shuffle, max_docs
        self.buffer_size = buffer_size

    def iter_from(self, epoch: int, pos: int) -> Iterator[str]:
        ds = self.ds.shuffle(seed=self.seed + epoch, buffer_size=self.buffer_size) if self.shuffle else self.ds
        if self.max_docs:
            ds = ds.take(self.max_docs)
        for rec in ds.skip(pos):
            text = rec.get(self.text_field)
            yield text if isinstance(text, str) else ""  # counted as a position, never used: keeps the cursor exact


# --------------------------------------------------------------------------------------------------
# sequences and batches


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, L) long
    attention_mask: torch.Tensor  # (B, L) long, 1 = real token
    doc_ids: Optional[torch.Tensor] = None  # (B, L) long, document index inside a packed row

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device),
                     None if self.doc_ids is None else self.doc_ids.to(device))

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())


class SequenceStream:
    """Fixed-length token rows from a document source; `state_dict()` is the exact reading position.

    Rank r of a world of W processes keeps micro-batch slots r, r + W, ... of the shared stream, so every
    rank holds the same cursor and the global batch is the same for any W.
    """

    def __init__(self, docs, tokenizer, seq_len: int, mode: str = "crop", seed: int = 0, batch_size: int = 1,
                 rank: int = 0, world_size: int = 1):
        self.docs, self.tok = docs, tokenizer
        self.L, self.mode, self.seed = seq_len, mode, seed
        self.batch_size, self.rank, self.world = batch_size, rank, world_size
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
        self.epoch, self.pos, self.offset = 0, 0, 0  # cursor: the document being read, tokens used of it
        self._it: Optional[Iterator[str]] = None  # the source's iterator, positioned at _it_at
        self._it_at: Optional[tuple[int, int]] = None
        self._cur_key: Optional[tuple[int, int]] = None  # (epoch, pos) of the cached current document
        self._cur_text: str = ""
        self._cur_tokens: Optional[list[int]] = None
        self.record = False  # keep the id of every row this rank reads (take_row_ids)
        self._row_ids: list[str] = []

    # ---- cursor ----

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "offset": self.offset, "mode": self.mode, "seq_len": self.L}

    def load_state_dict(self, state: dict) -> None:
        if (state.get("mode", self.mode), state.get("seq_len", self.L)) != (self.mode, self.L):
            raise DataFileError(f"data cursor was saved for mode={state.get('mode')!r} seq_len={state.get('seq_len')}, "
                             f"this run has data.mode={self.mode!r} data.seq_len={self.L}")
        self.epoch, self.pos, self.offset = int(state["epoch"]), int(state["pos"]), int(state["offset"])

    # ---- the document at the cursor ----

    def _doc(self) -> str:
        if self._cur_key == (self.epoch, self.pos):
            return self._cur_text
        wrapped = False
        while True:
            if self._it is None or self._it_at != (self.epoch, self.pos):
                self._it, self._it_at = self.docs.iter_from(self.epoch, self.pos), (self.epoch, self.pos)
            try:
                text = next(self._it)
            except StopIteration:  # end of an epoch: the next permutation
                if self.pos == 0 or wrapped:
                    raise DataFileError("the data source has no (non-empty) documents") from None
                self.epoch, self.pos, self.offset, self._it, wrapped = self.epoch + 1, 0, 0, None, True
                continue
            self._it_at = (self.epoch, self.pos + 1)
            if not text.strip():  # an empty streamed record: skipped, but counted by the cursor
                self.pos += 1
                continue
            self._cur_key, self._cur_text, self._cur_tokens = (self.epoch, self.pos), text, None
            return text

    def _doc_tokens(self) -> list[int]:
        text = self._doc()
        if self._cur_tokens is None:
            self._cur_tokens = [self.tok.bos_id] + self.tok.encode(text, add_bos=False)
        return self._cur_tokens

    # ---- rows ----

    def _crop_row(self, keep: bool):
        """BOS + one document: a random L-token window of a longer one, right padding for a shorter one."""
        if not keep:  # another rank's row: advance the cursor without tokenizing
            self._doc()
            self.pos, self.offset = self.pos + 1, 0
            return None
        ids = self._doc_tokens()
        if len(ids) > self.L:
            start = random.Random(f"{self.seed}-{self.epoch}-{self.pos}").randint(0, len(ids) - self.L)
            ids = ids[start:start + self.L]
        self.pos, self.offset = self.pos + 1, 0
        n = len(ids)
        return ids + [self.pad_id] * (self.L - n), [1] * n + [0] * (self.L - n), None

    def _pack_row(self):
        """L tokens from consecutive documents; a document cut at the row's end continues the next row."""
        ids: list[int] = []
        docs: list[int] = []
        d = 0
        while len(ids) < self.L:
            toks = self._doc_tokens()
            take = toks[self.offset:self.offset + self.L - len(ids)]
            ids += take
            docs += [d] * len(take)
            d += 1
            self.offset += len(take)
            if self.offset >= len(toks):
                self.pos, self.offset = self.pos + 1, 0
        return ids, [1] * self.L, docs

    def take_row_ids(self) -> list[str]:
        """The ids of the rows this rank read since the last call, when `record` is set: `epoch.position.offset`
        of the cursor where each row starts, the same for any number of processes."""
        ids, self._row_ids = self._row_ids, []
        return ids

    def next_batch(self) -> Batch:
        """This rank's next micro-batch (B = batch_size rows of L tokens)."""
        rows = []
        for slot in range(self.world):
            for _ in range(self.batch_size):
                keep = slot == self.rank
                if keep and self.record:
                    self._doc()  # the cursor on the document the row starts in (past empty records)
                    self._row_ids.append(f"{self.epoch}.{self.pos}.{self.offset}")
                row = self._crop_row(keep) if self.mode == "crop" else self._pack_row()
                if keep:
                    rows.append(row)
        ids = torch.tensor([r[0] for r in rows], dtype=torch.long)
        mask = torch.tensor([r[1] for r in rows], dtype=torch.long)
        doc_ids = torch.tensor([r[2] for r in rows], dtype=torch.long) if self.mode == "pack" else None
        return Batch(ids, mask, doc_ids)

    def __iter__(self):
        while True:
            yield self.next_batch()


def build_stream(cfg, tokenizer, seed: int, rank: int = 0, world_size: int = 1,
                 skipped: Optional[dict] = None) -> SequenceStream:
    """The SequenceStream for a DataConfig."""
    if cfg.source == "hf":
        docs = StreamingDocs(cfg.path, cfg.text_field, seed, cfg.hf_config, cfg.hf_split, cfg.shuffle, cfg.max_docs)
    else:
        if cfg.source == "reasoning":  # the training split of the reasoning corpus (its held-out split: eval)
            from quietstar.reasoning import make_documents

            texts = [d.text for d in make_documents(cfg.reasoning, cfg.max_docs or cfg.synthetic_docs, seed)]
        else:
            texts = load_documents(cfg.source, cfg.path, cfg.text_field, cfg.max_docs, cfg.synthetic_docs, seed,
                                   skipped)
        docs = ListDocs(texts, seed, cfg.shuffle)
    return SequenceStream(docs, tokenizer, cfg.seq_len, cfg.mode, seed, cfg.batch_size, rank, world_size)
