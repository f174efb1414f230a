"""The lm-evaluation-harness backend (quietstar.lm_eval) on a tiny model with a small BPE tokenizer, on CPU:
its log-likelihoods against the project's own scoring with and without thoughts and against lm_eval's `hf`
backend on the exported model, batching, generate_until's stop strings, the local task YAMLs end to end
through lm_eval.simple_evaluate, and one-line errors for bad model_args."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from quietstar.errors import UserError  # noqa: E402
from quietstar.eval.common import next_token_logits_at  # noqa: E402
from quietstar.lm_eval import TASKS_DIR, QuietStarLM, score_continuations  # noqa: E402
from quietstar.model import ModelConfig, Transformer  # noqa: E402
from quietstar.tokenizer import Tokenizer  # noqa: E402
from quietstar.methods.quietstar.thinker import QuietStar
from quietstar.methods.quietstar.config import ThoughtConfig  # noqa: E402

CORPUS = ["Question: what is two plus three?\nAnswer: five. #### 5", "The cat sat on the mat and the dog sat too.",
          "Compute 12 + 7 = 19. Then 19 - 4 = 15.", "A. apple B. banana C. cherry D. date E. elder",
          "Question: which fruit is red?\nAnswer: C"] * 4
CONTEXTS = [("Question: what is two plus three?\nAnswer:", " five"), ("The cat sat", " on the mat"),
            ("Compute 12 + 7 =", " 19."), ("A. apple B.", " banana C. cherry"), ("Question: which fruit", " is red?"),
            ("", "The dog sat too."), ("Then 19 - 4 =", " 15")]


def bpe_tokenizer(vocab_size: int = 320) -> Tokenizer:
    """A byte-level BPE trained on CORPUS (a few hundred tokens), with <bos>/<eos>/<pad> at ids 0-2."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    t = HFTokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 8, special_tokens=["<bos>", "<eos>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    t.train_from_iterator(CORPUS, trainer)
    return Tokenizer(t, vocab_size, bos_id=0, eos_id=1, pad_id=2, source="test-bpe")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(QuietStar with a non-zero talk head, the step dir of its training checkpoint, its HF export dir)."""
    from quietstar.export import export
    from test_export import checkpoint_of

    torch.manual_seed(0)
    tok = bpe_tokenizer()
    base = Transformer(ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size, max_seq_len=128))
    qs = QuietStar(base, tok, ThoughtConfig(n_ahead=5, n_ahead_talk=2))
    with torch.no_grad():  # a trained-looking model: the thought changes the prediction
        qs.talk_head.net[4].weight.normal_(std=0.3)
    qs.eval()
    root = tmp_path_factory.mktemp("run")
    ckpt = checkpoint_of(qs, root / "checkpoints", tok)
    return qs, ckpt, export(ckpt, root / "hf")


def requests(pairs, kind="loglikelihood"):
    return [Instance(kind, {}, args, idx=i) for i, args in enumerate(pairs)]


def backend(ckpt, **args) -> QuietStarLM:
    return QuietStarLM(ckpt=str(ckpt), **{"batch_size": 3, **args})


# --------------------------------------------------------------------------------------------------
# loglikelihood


def test_think_false_equals_the_hf_backend_on_the_exported_model(tiny):
    """Per request, within 1e-4 nats, and the same is_greedy; loglikelihood_rolling too."""
    from lm_eval.models.huggingface import HFLM

    qs, ckpt, hf_dir = tiny
    hf = HFLM(pretrained=str(hf_dir), device="cpu", batch_size=2, dtype="float32")
    ours = backend(ckpt, think=False)
    a, b = ours.loglikelihood(requests(CONTEXTS)), hf.loglikelihood(requests(CONTEXTS))
    assert [g for _, g in a] == [g for _, g in b]
    for (x, _), (y, _) in zip(a, b):
        assert abs(x - y) < 1e-4, (x, y)
    assert any(x < -1 for x, _ in a)  # non-trivial numbers
    texts = requests([(c + d,) for c, d in CONTEXTS[:4]], "loglikelihood_rolling")
    for x, y in zip(ours.loglikelihood_rolling(texts), hf.loglikelihood_rolling(texts)):
        assert abs(x - y) < 1e-4, (x, y)


def test_think_true_is_the_papers_prediction_after_a_thought(tiny):
    """The backend's log-likelihood is the sum over continuation tokens of log softmax of the talk-head-mixed
    logits, equal to the grid's QuietStar.next_token_logits given the same thoughts, and to
    next_token_logits_at for the same seed; it differs from the base score."""
    qs, ckpt, _ = tiny
    lm = backend(ckpt, seed=7)
    pairs = CONTEXTS[:3]
    reqs = [lm._encode_pair(c, d) for c, d in pairs]
    inputs = [(c + d)[:-1] for c, d in reqs]
    conts = [d for _, d in reqs]
    scored, thoughts = score_continuations(lm.qs, inputs, conts, True, 1, torch.Generator().manual_seed(7),
                                           lm.tokenizer.pad_id)
    got = [lp for lp, _ in lm.loglikelihood(requests(pairs))]  # sorted longest first, seeded 7: other draws
    assert len(got) == 3
    L = max(map(len, inputs))
    x = torch.tensor([s + [lm.tokenizer.pad_id] * (L - len(s)) for s in inputs])
    mask = (torch.arange(L)[None] < torch.tensor([len(s) for s in inputs])[:, None]).long()
    k = 0
    for r, (inp, cont) in enumerate(zip(inputs, conts)):
        pos = list(range(len(inp) - len(cont), len(inp)))
        th = torch.zeros(1, 1, L, thoughts.shape[-1], dtype=torch.long)
        th[0, 0, pos] = thoughts[0, k:k + len(cont)]
        grid = qs.next_token_logits(x[r:r + 1], mask[r:r + 1], thoughts=th).mixed[0, 0, pos]  # (len, V)
        want = torch.log_softmax(grid.float(), -1).gather(-1, torch.tensor(cont)[:, None]).sum()
        assert abs(scored[r].logprob - float(want)) < 1e-4
        k += len(cont)
    rows = [r for r, c in enumerate(conts) for _ in c]
    pos = [len(i) - len(c) + j for i, c in zip(inputs, conts) for j in range(len(c))]
    again = next_token_logits_at(qs, x, rows, pos, torch.Generator().manual_seed(7))
    assert torch.equal(again.thoughts, thoughts[0])  # the project's path, same seed, same thoughts
    base, _ = score_continuations(lm.qs, inputs, conts, False)
    assert all(abs(s.logprob - b.logprob) > 1e-3 for s, b in zip(scored, base))


def test_num_thoughts_averages_probabilities_and_batching_equals_one_by_one(tiny):
    qs, ckpt, _ = tiny
    lm = backend(ckpt)
    reqs = [lm._encode_pair(c, d) for c, d in CONTEXTS[:4]]
    inputs, conts = [(c + d)[:-1] for c, d in reqs], [d for _, d in reqs]
    batch, th = score_continuations(lm.qs, inputs, conts, True, 3, torch.Generator().manual_seed(1), 2)
    assert th.shape[0] == 3 and not torch.equal(th[0], th[1])
    k = 0
    for r in range(4):  # one request at a time, given its thoughts: the same numbers
        n = len(conts[r])
        one, _ = score_continuations(lm.qs, inputs[r:r + 1], conts[r:r + 1], True, 3, pad_id=2,
                                     thoughts=th[:, k:k + n])
        assert abs(one[0].logprob - batch[r].logprob) < 1e-5
        singles = [score_continuations(lm.qs, inputs[r:r + 1], conts[r:r + 1], True, 1, pad_id=2,
                                       thoughts=th[c:c + 1, k:k + n])[0][0] for c in range(3)]
        for j in range(n):  # the mean of the three thoughts' probabilities, token by token
            mean = sum(math.exp(s.token_logprobs[j]) for s in singles) / 3
            assert abs(math.log(mean) - batch[r].token_logprobs[j]) < 1e-5
        k += n
    inp = inputs[0]  # two choices after one context: one forward, one thought, each choice scored under it
    two, th2 = score_continuations(lm.qs, [inp, inp], [[5], [9]], True, 1, torch.Generator().manual_seed(2), 2)
    assert th2.shape[1] == 1
    for c, s in zip(([5], [9]), two):
        alone, _ = score_continuations(lm.qs, [inp], [c], True, 1, pad_id=2, thoughts=th2)
        assert abs(alone[0].logprob - s.logprob) < 1e-5
    plain = [backend(ckpt, think=False, batch_size=b).loglikelihood(requests(CONTEXTS)) for b in (1, 4)]
    for (x, g), (y, h) in zip(*plain):
        assert abs(x - y) < 1e-5 and g == h
    a, b = (backend(ckpt, batch_size=3, seed=5).loglikelihood(requests(CONTEXTS)) for _ in range(2))
    assert a == b  # seeded


def test_selective_thinking_thinks_at_the_chosen_positions_only(tiny):
    qs, ckpt, _ = tiny
    lm = backend(ckpt, where="entropy", think_fraction=0.25)
    assert lm.qs.cfg.where == "entropy" and lm.qs.cfg.think_fraction == 0.25
    reqs = [lm._encode_pair(c, d) for c, d in CONTEXTS[:4]]
    inputs, conts = [(c + d)[:-1] for c, d in reqs], [d for _, d in reqs]
    sel, _ = score_continuations(lm.qs, inputs, conts, True, 1, torch.Generator().manual_seed(0), 2)
    base, _ = score_continuations(lm.qs, inputs, conts, False)
    flags = [f for s in sel for f in s.thinking]
    assert any(flags) and not all(flags)
    for s, b in zip(sel, base):
        for f, x, y in zip(s.thinking, s.token_logprobs, b.token_logprobs):
            assert (abs(x - y) < 1e-5) == (not f)
    none = backend(ckpt, where="entropy", think_threshold=1e9)
    s0, _ = score_continuations(none.qs, inputs, conts, True, 1, torch.Generator(), 2)
    assert not any(f for s in s0 for f in s.thinking)


# --------------------------------------------------------------------------------------------------
# generate_until


def test_generate_until_stops_at_until_strings_and_matches_generate_stream(tiny):
    from quietstar.generate import generate_stream, left_pad

    qs, ckpt, _ = tiny
    lm = backend(ckpt, think=False)
    prompts = ["The cat", "Question: what"]
    free = lm.generate_until(requests([(p, {"until": [], "max_gen_toks": 12}) for p in prompts], "generate_until"))
    enc = [lm.tok_encode(p) for p in prompts]
    ids, mask = left_pad(enc, 2)
    steps = list(generate_stream(lm.qs, ids, mask, 12, 0.0, think=False, stop_ids=[1], pad_id=2))
    toks = torch.stack([s.tokens for s in steps], 1)
    for b, text in enumerate(free):  # greedy, no stop string: generate_stream's tokens (until EOS)
        row = toks[b].tolist()
        row = row[:row.index(1)] if 1 in row else row
        assert text == lm.tokenizer.decode(row)
    assert len(free[0]) > 3
    stop = free[0][2:4]  # a string the free run produces: the run stops there and drops it
    cut = lm.generate_until(requests([(prompts[0], {"until": [stop], "max_gen_toks": 12})], "generate_until"))
    assert cut == [free[0].split(stop)[0]]
    thinking = backend(ckpt, seed=3).generate_until(
        requests([(p, {"until": ["\n"], "max_gen_toks": 6, "do_sample": False}) for p in prompts], "generate_until"))
    assert len(thinking) == 2 and all("\n" not in t for t in thinking)
    long = "The cat sat on the mat. " * 40  # longer than the tiny model's positions: its end is kept
    assert lm.tok_encode(long).__len__() > lm.qs.model.cfg.max_seq_len
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # cut here to fit, not by generate_stream's warning
        assert isinstance(lm.generate_until(requests([(long, {"max_gen_toks": 4})], "generate_until"))[0], str)


# --------------------------------------------------------------------------------------------------
# tasks and arguments


def test_local_task_yamls_are_lm_evals_own_but_for_the_data():
    import lm_eval.tasks as tasks

    std = tasks.__path__[0]
    for ours, theirs in (("gsm8k_local.yaml", "gsm8k/gsm8k.yaml"), ("commonsense_qa_local.yaml",
                                                                   "commonsense_qa/default.yaml")):
        a = yaml.safe_load((TASKS_DIR / ours).read_text().replace("!function ", ""))
        b = yaml.safe_load(open(f"{std}/{theirs}").read())
        data = {"task", "tag", "dataset_path", "dataset_name", "custom_dataset", "training_split"}
        assert {k: v for k, v in a.items() if k not in data} == {k: v for k, v in b.items() if k not in data}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_local_tasks_run_end_to_end_through_simple_evaluate(tiny, tmp_path):
    qs, ckpt, _ = tiny
    gsm = [{"question": f"What is {a} + {a}?", "answer": f"{a} and {a} make {2 * a}.\n#### {2 * a}"} for a in range(8)]
    fruit = ["apple", "banana", "cherry", "date", "elder"]
    csqa = [{"id": str(i), "question": f"Which fruit {i}?", "choices": {"label": list("ABCDE"), "text": fruit},
             "answerKey": "ABCDE"[i % 5]} for i in range(6)]
    csqa[1] = {"question": {"stem": "Which fruit 1?", "choices": [{"label": c, "text": t} for c, t in
                                                                  zip("ABCDE", fruit)]}, "answerKey": "B"}  # original
    meta = {"gsm8k_test": str(write_jsonl(tmp_path / "test.jsonl", gsm[:3])),
            "gsm8k_train": str(write_jsonl(tmp_path / "train.jsonl", gsm[3:])),
            "commonsense_qa": str(write_jsonl(tmp_path / "csqa.jsonl", csqa))}
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(model="quietstar", model_args={"ckpt": str(ckpt), "think": True, "seed": 0},
                                  tasks=["commonsense_qa_local", "gsm8k_local"], num_fewshot=None, batch_size=4,
                                  device="cpu", task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False,
                                                           metadata=meta),
                                  metadata=meta, gen_kwargs="max_gen_toks=8", log_samples=True)
    acc = out["results"]["commonsense_qa_local"]["acc,none"]
    assert 0 <= acc <= 1 and len(out["samples"]["commonsense_qa_local"]) == 6
    assert {s["doc_id"] for s in out["samples"]["gsm8k_local"]} == {0, 1, 2} and "exact_match,strict-match" in out["results"]["gsm8k_local"]
    first = out["samples"]["gsm8k_local"][0]["arguments"][0][0]  # the first request's context
    assert first.count("Question:") == 6 and first.endswith("Question: What is 0 + 0?\nAnswer:")  # 5-shot
    assert out["config"]["quietstar"]["think"] is True


@pytest.mark.parametrize("args,message", [
    ({"ckpt": "{missing}", "think": True}, "ckpt=.*no such checkpoint"),
    ({"ckpt": "{ckpt}", "thinkk": True}, "unknown argument 'thinkk'"),
    ({"ckpt": "{ckpt}", "num_thoughts": 0}, "num_thoughts=0: must be >= 1"),
    ({"ckpt": "{ckpt}", "where": "somewhere"}, "where='somewhere'"),
    ({"ckpt": "{ckpt}", "where": "gate"}, "where=gate: this model has no trained gate"),
    ({"ckpt": "{ckpt}", "batch_size": "auto"}, "batch_size='auto' is not supported"),
])
def test_bad_model_args_give_one_clear_line(tiny, tmp_path, args, message):
    _, ckpt, _ = tiny
    args = {k: v.format(ckpt=ckpt, missing=tmp_path / "nope") if isinstance(v, str) else v for k, v in args.items()}
    with pytest.raises(UserError, match=message) as e:
        QuietStarLM(**args)
    assert "\n" not in str(e.value) and str(e.value).startswith("model_args: ")


def test_the_command_runs_lm_evals_cli_with_the_model_and_tasks(tiny, tmp_path, monkeypatch):
    import lm_eval.tasks

    from quietstar.lm_eval import main

    class LocalTasksOnly(lm_eval.tasks.TaskManager):  # skips indexing lm_eval's thousands of task YAMLs
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "include_defaults": False})

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", LocalTasksOnly)
    _, ckpt, _ = tiny
    csqa = [{"question": f"Pick {i}", "choices": {"label": list("ABCDE"), "text": list("vwxyz")}, "answerKey": "B"}
            for i in range(3)]
    meta = json.dumps({"commonsense_qa": str(write_jsonl(tmp_path / "c.jsonl", csqa))})
    main(["--model", "quietstar", "--model_args", f"ckpt={ckpt},think=false", "--tasks", "commonsense_qa_local",
          "--device", "cpu", "--batch_size", "2", "--metadata", meta, "--output_path", str(tmp_path / "out")])
    (result,) = (tmp_path / "out").rglob("results_*.json")
    res = json.loads(result.read_text())
    assert res["results"]["commonsense_qa_local"]["acc,none"] in (0.0, 1 / 3, 2 / 3, 1.0)
    assert res["config"]["model"] == "quietstar"
