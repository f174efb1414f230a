"""Generation with thoughts (generate.py) against slow references on a tiny random model: the KV-cached
"last position thinks" loop equals re-running the whole thought grid every token; think=False is plain
decoding; left padding and stop tokens behave."""

import pytest
import torch

from quietstar.generate import Generation, generate, generate_stream, left_pad, sample_token
from quietstar.model import KVCache, ModelConfig, Transformer
from quietstar.methods.quietstar.thinker import QuietStar
from quietstar.methods.quietstar.rollout import sample_categorical
from quietstar.methods.quietstar.config import ThoughtConfig

V = 256


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_qs(seed=0, n_ahead=6, talk_std=2.0):
    """A tiny random QuietStar whose talk head's last layer is random, so the thought changes the output.
    Untied LM head (a tied random one mostly predicts the current token again), scaled up for peakier
    distributions: fewer near-ties between float paths."""
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.from_preset("tiny", tie_embeddings=False))
    with torch.no_grad():
        model.output.weight.mul_(5)
    qs = QuietStar(model, None, ThoughtConfig(n_ahead=n_ahead, n_ahead_talk=2, n_thoughts=1)).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        w = qs.talk_head.net[4].weight
        w.copy_(torch.randn(w.shape, generator=g) * talk_std)
    return qs


def prompt(length, seed):
    return torch.randint(0, V, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


class ByteTokenizer:
    """The smallest tokenizer with the interface generate() needs: bytes are ids, 0 is pad, 10 ('\\n') eos."""

    pad_id, eos_id, bos_id = 0, 10, None

    def encode(self, text, add_bos=False):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


@torch.no_grad()
def slow_think_decode(qs, ids, n_new, temperature, g):
    """The reference: for every new token, re-run the whole grid over the whole current sequence (B, L)
    and use the last position only. Thought token m of the last position is sampled from grid row m
    given the thought so far; the token from the mixed prediction at the <end> step (K = 1)."""
    T = qs.cfg.n_ahead
    x = ids.clone()
    out, thoughts = [], []
    with qs.overridden(n_ahead_talk=1, n_thoughts=1):
        for _ in range(n_new):
            B, L = x.shape
            th = torch.zeros(B, 1, L, T - 3, dtype=torch.long)
            for m in range(1, T - 2):
                z = qs.grid_logits(x, th)  # (B, 1, S, L, V); row m predicts t_m
                th[:, 0, L - 1, m - 1] = sample_categorical(z[:, 0, m, L - 1], qs.cfg.gumbel_temperature, g)
            mixed = qs.next_token_logits(x, thoughts=th).mixed[:, 0, L - 1]
            nxt = sample_token(mixed, temperature, 1.0, g)
            out.append(nxt)
            thoughts.append(th[:, 0, L - 1].clone())
            x = torch.cat([x, nxt[:, None]], dim=1)
    return torch.stack(out, 1), torch.stack(thoughts, 1)


def run_stream(qs, ids, mask=None, **kw):
    steps = list(generate_stream(qs, ids, mask, **kw))
    tokens = torch.stack([s.tokens for s in steps], 1)
    thoughts = torch.stack([s.thoughts for s in steps], 1) if steps[0].thoughts is not None else None
    return tokens, thoughts, steps


@pytest.mark.parametrize("n_ahead,temperature,B", [(6, 1.0, 1), (4, 0.7, 1), (6, 1.0, 2), (3, 1.0, 1), (5, 0.0, 2)])
def test_think_equals_full_grid_reference(n_ahead, temperature, B):
    qs = tiny_qs(n_ahead=n_ahead)
    ids = torch.tensor([prompt(7, seed=b) for b in range(B)])
    got, got_th, _ = run_stream(qs, ids, max_new_tokens=6, temperature=temperature, think=True,
                                generator=torch.Generator().manual_seed(3))
    want, want_th = slow_think_decode(qs, ids, 6, temperature, torch.Generator().manual_seed(3))
    assert got.tolist() == want.tolist()
    assert got_th.tolist() == want_th.tolist()
    assert got_th.shape == (B, 6, n_ahead - 3)


def test_thinking_changes_the_output_and_mix_weight_is_reported():
    qs = tiny_qs()
    ids = torch.tensor([prompt(7, seed=0)])
    think, _, steps = run_stream(qs, ids, max_new_tokens=12, temperature=0.0, think=True,
                                 generator=torch.Generator().manual_seed(0))
    plain, _, _ = run_stream(qs, ids, max_new_tokens=12, temperature=0.0, think=False)
    assert think.tolist() != plain.tolist()  # the random talk head makes thoughts matter
    assert all(s.mix_weight is not None and s.mix_weight.shape == (1,) for s in steps)


def test_zero_talk_head_thinking_is_plain_decoding():
    qs = tiny_qs(talk_std=0.0)  # w = 0: the mixed prediction is exactly the base one
    ids = torch.tensor([prompt(7, seed=0)])
    think, _, _ = run_stream(qs, ids, max_new_tokens=10, temperature=0.0, think=True,
                             generator=torch.Generator().manual_seed(0))
    plain, _, _ = run_stream(qs, ids, max_new_tokens=10, temperature=0.0, think=False)
    assert think.tolist() == plain.tolist()


@torch.no_grad()
def test_no_think_equals_plain_cached_sampling_and_full_forward_argmax():
    qs = tiny_qs()
    model = qs.model
    ids = torch.tensor([prompt(9, seed=1), prompt(9, seed=2)])
    n_new = 10

    # sampling: a plain KV-cached loop drawing from the same generator
    got, thoughts, _ = run_stream(qs, ids, max_new_tokens=n_new, temperature=0.8, top_p=0.9, think=False,
                                  generator=torch.Generator().manual_seed(5))
    assert thoughts is None
    g = torch.Generator().manual_seed(5)
    cache = KVCache(model.cfg, 2, 9 + n_new)
    logits = model(ids, attn=cache)[:, -1]
    want = []
    for _ in range(n_new):
        nxt = sample_token(logits, 0.8, 0.9, g)
        want.append(nxt)
        logits = model(nxt[:, None], attn=cache)[:, -1]
    assert got.tolist() == torch.stack(want, 1).tolist()

    # greedy: full forward over the whole sequence every token
    got, _, _ = run_stream(qs, ids, max_new_tokens=n_new, temperature=0.0, think=False)
    x = ids
    for _ in range(n_new):
        x = torch.cat([x, model(x)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert got.tolist() == x[:, 9:].tolist()


def test_thought_ids_never_appear_in_the_output():
    qs = tiny_qs(n_ahead=5)
    ids = torch.tensor([prompt(5, seed=3)] * 3)
    tokens, thoughts, _ = run_stream(qs, ids, max_new_tokens=40, temperature=1.5, think=True,
                                     generator=torch.Generator().manual_seed(0))
    assert int(tokens.max()) < V and int(thoughts.max()) < V
    assert qs.start_token_id not in tokens and qs.end_token_id not in tokens


@pytest.mark.parametrize("think", [True, False])
def test_left_padded_batch_equals_one_by_one(think):
    """Greedy, with near-greedy thoughts (thought_temperature -> 0) so that no random draw matters. Sampled
    runs cannot line up row by row: every draw takes one random number per row of the batch at once, so
    from the second draw on a batch of one reads a different part of the random stream than its row."""
    qs = tiny_qs()
    seqs = [prompt(4, seed=10), prompt(9, seed=11), prompt(6, seed=12)]
    ids, mask = left_pad(seqs, pad_id=0)
    kw = dict(max_new_tokens=8, temperature=0.0, think=think, thought_temperature=1e-6,
              generator=torch.Generator().manual_seed(0))
    batched, batched_th, _ = run_stream(qs, ids, mask, **kw)
    for b, s in enumerate(seqs):
        one, one_th, _ = run_stream(qs, torch.tensor([s]), **kw)
        assert batched[b].tolist() == one[0].tolist()
        if think:
            assert batched_th[b].tolist() == one_th[0].tolist()


def test_stop_tokens_end_a_row_and_the_rest_continue():
    qs = tiny_qs()
    seqs = [prompt(6, seed=20), prompt(6, seed=21)]
    ids, mask = left_pad(seqs, pad_id=0)
    kw = dict(max_new_tokens=10, temperature=0.0, think=True, thought_temperature=1e-6,
              generator=torch.Generator().manual_seed(0))
    free, _, _ = run_stream(qs, ids, mask, **kw)
    stop = int(free[0, 2])
    assert stop not in free[1].tolist() and stop not in free[0, :2].tolist()  # the case this test needs
    tokens, _, steps = run_stream(qs, ids, mask, stop_ids=[stop], pad_id=0, **kw)
    assert tokens[0, :3].tolist() == free[0, :3].tolist()
    assert tokens[0, 3:].tolist() == [0] * (tokens.shape[1] - 3)  # pad after the stop token
    assert tokens[1].tolist() == free[1].tolist()  # the other row is unaffected
    assert [bool(s.finished[0]) for s in steps[:4]] == [False, False, True, True]
    # every row stopping ends the stream
    all_stop = list(generate_stream(qs, ids, mask, stop_ids=free[:, 0].tolist(), **kw))
    assert len(all_stop) == 1 and bool(all_stop[0].finished.all())


def test_generate_text_api_cuts_at_stop_and_keeps_thoughts():
    qs = tiny_qs(n_ahead=5)
    tok = ByteTokenizer()
    qs.pad_token_id = tok.pad_id
    gen = generate(qs, tok, ["abc", "hello world"], max_new_tokens=6, temperature=0.0,
                   generator=torch.Generator().manual_seed(0), stop_ids=[])
    assert isinstance(gen, Generation) and len(gen.tokens) == 2
    assert all(len(t) == 6 for t in gen.tokens) and all(len(th) == 6 for th in gen.thoughts)
    assert all(len(x) == 2 for th in gen.thoughts for x in th)  # T - 3 sampled tokens per thought
    assert gen.texts[0] == tok.decode(gen.tokens[0]) and gen.tokens_per_s > 0
    stop = gen.tokens[1][1]
    cut = generate(qs, tok, ["abc", "hello world"], max_new_tokens=6, temperature=0.0,
                   generator=torch.Generator().manual_seed(0), stop_ids=[stop])
    assert cut.tokens[1][-1] == stop and len(cut.tokens[1]) == gen.tokens[1].index(stop) + 1


def test_right_padded_prompts_are_refused():
    qs = tiny_qs()
    ids = torch.tensor([[5, 6, 7, 0]])
    with pytest.raises(ValueError, match="left-padded"):
        next(generate_stream(qs, ids, torch.tensor([[1, 1, 1, 0]])))


def test_sample_token_greedy_and_top_p():
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0]])
    assert sample_token(logits, 0.0).tolist() == [1]
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_token(logits, 1.0, top_p=0.3, generator=g)) for _ in range(50)}
    assert draws == {1}  # the top token alone holds >= 30% of the mass
