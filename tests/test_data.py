"""Data: the synthetic corpus, every file format with its bad records, crop and pack rows, the cursor
(exact resume), and the rank slicing that keeps the global batch independent of the world size."""

import gzip
import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from quietstar.config import DataConfig
from quietstar.data import (ListDocs, SequenceStream, build_stream, load_documents, read_jsonl, read_parquet,
                            synthetic_math)
from quietstar.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def stream(docs, L=16, mode="crop", seed=0, batch_size=2, rank=0, world=1, shuffle=True):
    return SequenceStream(ListDocs(docs, seed, shuffle), TOK, L, mode, seed, batch_size, rank, world)


def test_synthetic_corpus_is_worked_math_and_deterministic():
    a, b, c = synthetic_math(50, seed=1), synthetic_math(50, seed=1), synthetic_math(50, seed=2)
    assert a == b and a != c and len(a) == 50
    text = "\n".join(a)
    for marker in ["Compute ", "Solve ", "So x = ", "Answer: ", " = "]:
        assert marker in text
    # the worked steps carry the answer: every "So a + b = c." line is arithmetically right
    for line in text.splitlines():
        if line.startswith("So ") and " + " in line and line.count("=") == 1 and "x" not in line:
            lhs, rhs = line[3:].rstrip(".").split(" = ")
            x, y = lhs.split(" + ")
            assert int(x) + int(y) == int(rhs)


def test_byte_tokenizer_round_trip_and_thought_ids():
    tok = ByteTokenizer(300)
    ids = tok.encode("12 + 7 = 19 ÷", add_bos=True)
    assert ids[0] == tok.bos_id and tok.decode(ids) == "12 + 7 = 19 ÷"
    assert (tok.start_thought_id, tok.end_thought_id) == (300, 301)
    assert tok.decode([tok.start_thought_id, 65, tok.pad_id]) == "A"


def test_crop_rows_are_bos_plus_a_window_right_padded():
    docs = ["short", "x" * 100]
    s = stream(docs, L=16, shuffle=False)
    b = s.next_batch()
    assert b.input_ids.shape == (2, 16) and b.doc_ids is None
    short = b.input_ids[0]
    assert short[0] == TOK.bos_id and TOK.decode(short.tolist()) == "short"
    assert b.attention_mask[0].tolist() == [1] * 6 + [0] * 10 and (short[6:] == TOK.pad_id).all()
    assert b.attention_mask[1].all() and set(TOK.decode(b.input_ids[1].tolist())) == {"x"}
    # the crop offset is random but a function of (seed, epoch, position)
    crops = {tuple(stream(["abcdefghijklmnopqrstuvwxyz" * 3], L=8, seed=seed).next_batch().input_ids[0].tolist())
             for seed in range(6)}
    assert len(crops) > 1
    again = stream(["abcdefghijklmnopqrstuvwxyz" * 3], L=8, seed=3).next_batch().input_ids
    assert torch.equal(again, stream(["abcdefghijklmnopqrstuvwxyz" * 3], L=8, seed=3).next_batch().input_ids)


def test_pack_rows_number_documents_and_continue_across_rows():
    docs = ["aaaa", "bbbbbbbbbbbb", "cc"]
    s = stream(docs, L=8, mode="pack", shuffle=False, batch_size=1)
    rows = [s.next_batch() for _ in range(3)]
    flat = sum((r.input_ids[0].tolist() for r in rows), [])
    want = sum(([TOK.bos_id] + TOK.encode(d) for d in docs), [])
    assert flat[:len(want)] == want
    assert all(r.attention_mask.all() for r in rows)
    assert rows[0].doc_ids[0].tolist() == [0] * 5 + [1] * 3  # BOS+aaaa | BOS+bb (doc 1 continues in row 2)
    assert rows[1].doc_ids[0].tolist() == [0] * 8
    assert rows[2].doc_ids[0].tolist()[:2] == [0, 0] and rows[2].doc_ids[0, -1] > 0


@pytest.mark.parametrize("mode", ["crop", "pack"])
def test_cursor_restores_the_exact_stream_across_epochs(mode):
    docs = synthetic_math(7, seed=0)
    s = stream(docs, L=24, mode=mode, seed=5)
    while s.epoch == 0:  # into the second epoch
        s.next_batch()
    s.next_batch()
    state = json.loads(json.dumps(s.state_dict()))  # what a checkpoint stores
    want = [s.next_batch() for _ in range(6)]
    t = stream(docs, L=24, mode=mode, seed=5)
    t.load_state_dict(state)
    got = [t.next_batch() for _ in range(6)]
    assert state["epoch"] >= 1
    for w, g in zip(want, got):
        assert torch.equal(w.input_ids, g.input_ids) and torch.equal(w.attention_mask, g.attention_mask)
    with pytest.raises(ValueError, match="data.seq_len"):
        stream(docs, L=32, mode=mode).load_state_dict(state)


def test_epochs_visit_every_document_in_a_seeded_order():
    docs = [f"doc {i}" for i in range(10)]
    seen = [TOK.decode(stream(docs, L=16, seed=1, batch_size=10).next_batch().input_ids[i].tolist())
            for i in range(10)]
    assert sorted(seen) == sorted(docs) and seen != docs
    assert ListDocs(docs, 1).order(0) != ListDocs(docs, 1).order(1)


@pytest.mark.parametrize("mode", ["crop", "pack"])
def test_ranks_split_one_global_batch(mode):
    docs = synthetic_math(11, seed=0)
    one = stream(docs, L=16, mode=mode, batch_size=4)
    two = [stream(docs, L=16, mode=mode, batch_size=2, rank=r, world=2) for r in range(2)]
    for _ in range(4):
        whole = one.next_batch().input_ids
        parts = torch.cat([t.next_batch().input_ids for t in two])
        assert torch.equal(whole, parts)
    assert one.state_dict() == two[0].state_dict() == two[1].state_dict()


# ---- files and bad records


def write_lines(path, lines: list[bytes], gz=False):
    data = b"\n".join(lines) + b"\n"
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


BAD = [json.dumps({"text": "good one", "url": "u"}).encode(),
       b'{"text": "broken',  # malformed JSON
       json.dumps({"url": "no text"}).encode(),  # missing field
       json.dumps({"text": "   "}).encode(),  # empty text
       json.dumps({"text": 5}).encode(),  # not a string
       json.dumps(["a list"]).encode(),  # not an object
       b'{"text": "caf\xe9"}',  # Latin-1 byte: not UTF-8
       b"",  # blank line: not a record
       json.dumps({"text": "good two", "metadata": {}}).encode()]


@pytest.mark.parametrize("gz", [False, True])
def test_jsonl_bad_records_are_skipped_counted_and_named(tmp_path, caplog, gz):
    path = write_lines(tmp_path / ("d.jsonl.gz" if gz else "d.jsonl"), BAD, gz)
    skipped = {}
    with caplog.at_level(logging.WARNING, logger="quietstar.data"):
        docs = read_jsonl(path, skipped=skipped)
    assert docs == ["good one", "good two"]
    assert skipped == {str(path): 6}
    text = caplog.text
    assert f"{path}:line 2" in text and "malformed JSON" in text
    assert f"{path}:line 3" in text and "missing field 'text'" in text
    assert "skipped 6 bad record(s)" in text and "not UTF-8" in text


def test_a_file_with_no_usable_record_is_an_error_naming_it(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", BAD[1:6])
    with pytest.raises(ValueError, match=rf"{path}: no usable record .*malformed JSON: 1"):
        read_jsonl(path)
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=rf"{empty}: no usable record"):
        read_jsonl(empty)
    trunc = tmp_path / "trunc.jsonl.gz"
    trunc.write_bytes(gzip.compress(b'{"text": "a"}\n' * 1000)[:40])
    with pytest.raises(ValueError, match=rf"{trunc}: cannot read"):
        read_jsonl(trunc)


def test_folders_parquet_and_text(tmp_path, caplog):
    d = tmp_path / "jsonl"
    d.mkdir()
    write_lines(d / "a.jsonl", [json.dumps({"text": "A"}).encode()])
    write_lines(d / "b.jsonl.gz", [json.dumps({"text": "B"}).encode(), b"nope"], gz=True)
    assert load_documents("jsonl", str(d)) == ["A", "B"]

    table = pa.table({"text": ["p1", None, "", "p2"], "id": [1, 2, 3, 4]})
    pq.write_table(table, tmp_path / "t.parquet")
    skipped = {}
    assert read_parquet(tmp_path / "t.parquet", skipped=skipped) == ["p1", "p2"]
    assert skipped == {str(tmp_path / "t.parquet"): 2}
    with pytest.raises(ValueError, match="no column 'body'"):
        read_parquet(tmp_path / "t.parquet", text_field="body")

    t = tmp_path / "txt"
    (t / "sub").mkdir(parents=True)
    (t / "one.txt").write_text("first doc")
    (t / "sub" / "two.txt").write_text("second doc")
    (t / "latin.txt").write_bytes(b"caf\xe9")
    with caplog.at_level(logging.WARNING, logger="quietstar.data"):
        assert sorted(load_documents("text", str(t))) == ["first doc", "second doc"]
    assert "latin.txt: skipped file: not UTF-8" in caplog.text
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_documents("jsonl", str(tmp_path / "missing"))


def test_build_stream_from_config(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", BAD)
    skipped = {}
    s = build_stream(DataConfig(source="jsonl", path=str(path), seq_len=12, batch_size=2), TOK, seed=0,
                     skipped=skipped)
    b = s.next_batch()
    assert b.input_ids.shape == (2, 12) and skipped == {str(path): 6}
    assert build_stream(DataConfig(synthetic_docs=5), TOK, seed=0).next_batch().input_ids.shape == (2, 96)


def test_shared_math_web_reads_out_of_the_box(shared_data):
    path = shared_data / "math_web" / "train.jsonl"
    docs = read_jsonl(path)
    assert len(docs) > 1900 and all(d.strip() for d in docs)
    s = build_stream(DataConfig(source="jsonl", path=str(path), seq_len=32, batch_size=2), TOK, seed=0)
    assert s.next_batch().attention_mask.sum() > 0


class FakeStream:
    """A document source shaped like StreamingDocs (no network): a fixed list, some records empty."""

    def __init__(self, docs):
        self.docs = docs

    def iter_from(self, epoch, pos):
        yield from self.docs[pos:]


def test_a_streamed_source_skips_empty_records_and_resumes_exactly():
    docs = ["one", "", "two", "   ", "three"]
    s = SequenceStream(FakeStream(docs), TOK, 8, "crop", 0, batch_size=1)
    texts = [TOK.decode(s.next_batch().input_ids[0].tolist()) for _ in range(3)]
    assert texts == ["one", "two", "three"]
    state = s.state_dict()
    assert state["pos"] == 5
    t = SequenceStream(FakeStream(docs), TOK, 8, "crop", 0, batch_size=1)
    t.load_state_dict(state)
    assert TOK.decode(t.next_batch().input_ids[0].tolist()) == "one"  # the next epoch
    with pytest.raises(ValueError, match="no \\(non-empty\\) documents"):
        SequenceStream(FakeStream(["", " "]), TOK, 8, "crop", 0).next_batch()
