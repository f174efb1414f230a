"""A backend for EleutherAI's lm-evaluation-harness (`lm_eval`): any of its tasks, scored by a thinking model.

    python -m quietstar.lm_eval --model quietstar --model_args ckpt=<checkpoint, run or export dir>,think=true \\
        --tasks gsm8k_local --output_path out/lm_eval

takes every argument `lm_eval` takes (lm_eval has no plugin mechanism for outside models: this command
registers the `quietstar` model, adds the task YAMLs shipped in quietstar/eval/tasks to --include_path and
runs lm_eval's own command line). From Python, `import quietstar.lm_eval` registers the model for
`lm_eval.simple_evaluate(model="quietstar", ...)`.

The three request types, each through the project's own inference code:
  loglikelihood: the log-probability of the continuation with a thought before every continuation token:
    the paper's evaluation prediction (K = 1: the talk-head-mixed logits at the <end> step after a thought
    sampled at that position), computed for all continuation positions of a batch at once by
    eval.common.next_token_logits_at (one causal pass over the text, then T - 1 single-token steps of every
    position's branch together). num_thoughts = n > 1 samples n thoughts per position and scores the mean
    of their probabilities. is_greedy: every continuation token is the argmax of that prediction.
  loglikelihood_rolling: the same over lm_eval's rolling windows of the whole text.
  generate_until: generate.generate_stream (KV-cached generation with a thought before each token),
    batched and left-padded, stopped per row at an `until` string or EOS.
think=false scores and generates with the base model alone (the plain causal forward, the LM head applied
only at the continuation positions), which gives the `hf` backend's numbers on the exported model.
where=entropy|gate (with think_fraction or think_threshold) thinks only at some positions: in log-likelihoods
the training rule (where.select over each row's own positions), in generation generate.py's online rule.

Thoughts and samples are drawn from one generator seeded by `seed`: a run is reproducible for the same
requests and batch_size (changing batch_size redraws the thoughts, as it regroups them; think=false does not
depend on it). Tokenization follows lm_eval's `hf` backend (no BOS unless the tokenizer adds one by default,
or add_bos_token=true), so a context, continuation and window are the same tokens in both.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import warnings
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import torch

from quietstar.cli import AT_LEAST_1, NON_NEGATIVE, Rule, one_of, parse_kv
from quietstar.errors import UserError, run_main
from quietstar.eval.common import Progress, next_token_logits_at, talk_head_is_zero

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError as e:  # the optional dependency: pip install -e ".[eval]"
    raise ImportError(f"quietstar.lm_eval needs lm-evaluation-harness: pip install 'quietstar[eval]' ({e})") from e

TASKS_DIR = Path(__file__).resolve().parent / "eval" / "tasks"

# model_args: key -> default (the type of the default is the type of the value)
MODEL_ARGS = dict(
    ckpt="",  # a training checkpoint (step, checkpoints/ or run dir) or an export dir; empty: `model` below
    model="smollm2-135m",  # without ckpt: this pretrained base model with fresh thought parameters (w = 0)
    think=True,  # False: the base model alone
    num_thoughts=1,  # thoughts sampled per scored position; their probabilities are averaged
    seed=1234,  # of the generator every thought and sampled token is drawn from
    where="",  # thought.where: all | entropy | gate (empty: the checkpoint's)
    think_fraction=0.0,  # with where = entropy or gate: the share of positions that think (0: the checkpoint's)
    think_threshold=None,  # with where = entropy or gate: think above this score instead
    n_ahead=0,  # T, the thought length (0: the checkpoint's)
    thought_temperature=0.0,  # temperature of thought sampling (0: the checkpoint's thought.gumbel_temperature)
    dtype="float32",
    device="cpu",
    batch_size=8,
    max_batch_size=None,  # lm_eval passes it; batches are batch_size requests
    max_length=0,  # the longest input in tokens (0: the model's max_seq_len, less a thought's n_ahead)
    max_gen_toks=256,  # generate_until's default when a task sets none
    add_bos_token=None,  # prepend BOS to every encoded string (None: the tokenizer's default, as `hf`)
    branch_memory_mb=1024,  # the K/V of thinking positions held at once (they are scored in chunks of it)
)
RULES = {"num_thoughts": AT_LEAST_1, "seed": NON_NEGATIVE, "batch_size": AT_LEAST_1, "max_length": NON_NEGATIVE,
         "max_gen_toks": AT_LEAST_1, "n_ahead": NON_NEGATIVE, "thought_temperature": NON_NEGATIVE,
         "think_fraction": Rule(lambda x: 0 <= x <= 1, "in [0, 1] (0: the checkpoint's)"),
         "where": one_of("", "all", "entropy", "gate"), "dtype": one_of("float32", "bfloat16", "float16"),
         "branch_memory_mb": AT_LEAST_1}
GEN_KWARGS = ("until", "max_gen_toks", "temperature", "do_sample", "top_p")


def parse_model_args(kwargs: dict) -> dict:
    """lm_eval's model_args (already typed by lm_eval, or strings) -> checked values; a UserError names a bad
    or unknown key."""
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if "batch_size" in kwargs and str(kwargs["batch_size"]).startswith("auto"):
        raise UserError(f"model_args: batch_size={kwargs['batch_size']!r} is not supported; give a number")
    try:
        args = parse_kv([f"{k}={v}" for k, v in kwargs.items()], MODEL_ARGS, RULES)
    except UserError as e:
        raise UserError(f"model_args: {e}") from None
    for key in ("think_threshold", "add_bos_token"):  # optional values, typed here
        args[key] = _optional(key, args[key], float if key == "think_threshold" else bool)
    if args["device"].startswith("cuda") and not torch.cuda.is_available():  # lm_eval's default is cuda:0
        warnings.warn(f"model_args: device={args['device']}: CUDA is not available, running on cpu")
        args["device"] = "cpu"
    return args


def _optional(key: str, value, kind):
    if value is None or isinstance(value, kind):
        return value
    text = str(value).lower()
    if kind is bool:
        if text not in ("true", "false"):
            raise UserError(f"model_args: argument {key}={value!r}: expected true or false")
        return text == "true"
    try:
        x = float(text)
    except ValueError:
        raise UserError(f"model_args: argument {key}={value!r}: expected a number") from None
    if not math.isfinite(x):
        raise UserError(f"model_args: argument {key}={value!r}: must be a finite number")
    return x


def load_model(args: dict):
    """(QuietStar in eval mode with the model_args' thought settings, tokenizer)."""
    from quietstar.generate import load_for_inference

    ckpt = args["ckpt"]
    if ckpt and not Path(ckpt).expanduser().exists():
        raise UserError(f"model_args: ckpt={ckpt}: no such checkpoint or export directory")
    dtype = getattr(torch, args["dtype"])
    qs, tok = load_for_inference(str(Path(ckpt).expanduser()) if ckpt else None, args["device"], dtype, args["model"],
                                 args["n_ahead"] or None)
    if tok is None:
        raise UserError(f"model_args: ckpt={ckpt}: the checkpoint has no tokenizer, which lm_eval's text needs")
    changes = {}
    if args["where"]:
        changes["where"] = args["where"]
    if args["think_fraction"]:
        changes["think_fraction"] = args["think_fraction"]
    if args["think_threshold"] is not None:
        changes["think_threshold"] = args["think_threshold"]
    if args["thought_temperature"]:
        changes["gumbel_temperature"] = args["thought_temperature"]
    try:
        qs.configure(dataclasses.replace(qs.cfg, **changes))
    except ValueError as e:
        raise UserError(f"model_args: {e}") from None
    if qs.cfg.where == "gate" and qs.gate is None:
        raise UserError("model_args: where=gate: this model has no trained gate (it was not trained with "
                        "thought.where=gate); use where=entropy")
    return qs.to(dtype).eval(), tok


# --------------------------------------------------------------------------------------------------
# scoring


class Scored(NamedTuple):
    """One continuation's score."""

    logprob: float  # sum over its tokens of log p(token), nats
    greedy: bool  # every token is the argmax of its prediction
    token_logprobs: list  # per continuation token
    thinking: list  # per continuation token: whether a thought preceded its prediction


def _branch_chunk(qs, L: int, budget_mb: int) -> int:
    """Thinking positions per next_token_logits_at call: each holds a K/V cache of L + T - 1 positions."""
    c = qs.model.cfg
    per = 2 * c.n_layers * c.n_kv_heads * c.head_dim * (L + qs.cfg.n_ahead) * qs.model.tok_embeddings.weight.element_size()
    return max(1, budget_mb * 2 ** 20 // per)


@torch.no_grad()
def score_continuations(qs, inputs: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]], think: bool,
                        n_thoughts: int = 1, generator: Optional[torch.Generator] = None, pad_id: int = 0,
                        branch_memory_mb: int = 1024, thoughts: Optional[torch.Tensor] = None
                        ) -> tuple[list[Scored], Optional[torch.Tensor]]:
    """Score a batch: inputs[r] is the model's input (context + continuation without its last token), the
    last len(continuations[r]) positions of which predict continuations[r]. Requests with the same input (the
    choices of a multiple-choice question) share its forward and, at each position, its thoughts: every
    distinct (input, position) is predicted once. -> (one Scored per request, the thoughts used (n, U, T-3) at
    the U distinct thinking positions in order of first use, or None).

    `thoughts` (n, U, T-3) scores given thoughts instead of sampling them (tests)."""
    dev = qs.model.tok_embeddings.weight.device
    uniq: dict = {}
    row_of = [uniq.setdefault(tuple(s), len(uniq)) for s in inputs]  # request -> distinct input
    seqs = list(uniq)
    L = max(len(s) for s in seqs)
    x = torch.tensor([list(s) + [pad_id] * (L - len(s)) for s in seqs], device=dev)  # right-padded (B, L)
    pairs = [(row_of[r], len(inputs[r]) - len(c) + j) for r, c in enumerate(continuations) for j in range(len(c))]
    at: dict = {}
    inv = torch.tensor([at.setdefault(p, len(at)) for p in pairs], device=dev)  # token -> distinct (row, position)
    upairs = list(at)
    target = torch.tensor([t for c in continuations for t in c], device=dev)
    if not think:
        thinks = [False] * len(upairs)
    elif qs.cfg.where == "all":
        thinks = [True] * len(upairs)
    else:
        thinks = _selected(qs, x, [len(s) for s in seqs], upairs)
    logp = torch.empty(len(pairs), device=dev)  # log p(target) per continuation token
    greedy = torch.empty(len(pairs), dtype=torch.bool, device=dev)

    def take(u_idx: list, z: torch.Tensor):  # z (len(u_idx), V) log-probs at these distinct pairs
        where = torch.full((len(upairs),), -1, device=dev)
        where[u_idx] = torch.arange(len(u_idx), device=dev)
        k = (where[inv] >= 0).nonzero().squeeze(-1)
        zk = z[where[inv[k]]]
        logp[k] = zk.gather(-1, target[k, None]).squeeze(-1)
        greedy[k] = zk.argmax(-1) == target[k]

    base_idx = [u for u, t in enumerate(thinks) if not t]
    if base_idx:
        h = qs.model(inputs_embeds=qs.embed(x), return_hidden=True)  # (B, L, d), causal: right padding unseen
        for c0 in range(0, len(base_idx), 1024):  # the LM head at the scored positions only
            idx = base_idx[c0:c0 + 1024]
            hs = h[[upairs[u][0] for u in idx], [upairs[u][1] for u in idx]]
            take(idx, torch.log_softmax(qs.model.head(hs).float(), -1))
    think_idx = [u for u, t in enumerate(thinks) if t]
    used, n = [], n_thoughts
    per_chunk = max(1, _branch_chunk(qs, L, branch_memory_mb) // n)
    for c0 in range(0, len(think_idx), per_chunk):
        idx = think_idx[c0:c0 + per_chunk]
        P = len(idx)
        given = None if thoughts is None else thoughts[:, c0:c0 + P].reshape(n * P, -1)
        out = next_token_logits_at(qs, x, [upairs[u][0] for u in idx] * n, [upairs[u][1] for u in idx] * n,
                                   generator, given)
        z = torch.log_softmax(out.mixed.float(), -1).view(n, P, -1)  # (n, P, V)
        take(idx, torch.logsumexp(z, 0) - math.log(n))  # the mean of the n thoughts' probabilities
        used.append(out.thoughts.view(n, P, -1))
    scored, k = [], 0
    for c in continuations:
        lp = logp[k:k + len(c)].double()
        flags = [thinks[int(u)] for u in inv[k:k + len(c)]]
        scored.append(Scored(float(lp.sum()), bool(greedy[k:k + len(c)].all()), lp.tolist(), flags))
        k += len(c)
    return scored, (torch.cat(used, 1) if used else None)


def _selected(qs, x, lengths: Sequence[int], pairs: Sequence[tuple[int, int]]) -> list[bool]:
    """thought.where in log-likelihoods: which of the (row, position) pairs think, chosen as training chooses
    (where.select over each row's own positions that have a next token, without the gate's exploration)."""
    from quietstar.methods.quietstar.where import select

    h = qs.model(inputs_embeds=qs.embed(x), return_hidden=True)  # (B, L, d)
    scores = qs.think_scores(h)  # (B, L)
    chosen = set()
    for r, n in enumerate(lengths):
        eligible = torch.ones(1, n, dtype=torch.bool, device=x.device)  # each input position predicts a token
        sel = select(scores[r:r + 1, :n], eligible, qs.cfg.think_fraction, qs.cfg.think_threshold)
        chosen |= {(r, int(p)) for p, ok in zip(sel.positions[0].tolist(), sel.valid[0].tolist()) if ok}
    return [p in chosen for p in pairs]


# --------------------------------------------------------------------------------------------------
# the lm_eval model


@register_model("quietstar")
class QuietStarLM(TemplateLM):
    """lm_eval's model `quietstar`: model_args are MODEL_ARGS (see the module docstring)."""

    def __init__(self, **kwargs):
        super().__init__()
        self.args = parse_model_args(kwargs)
        self.qs, self.tokenizer = load_model(self.args)
        self.think = self.args["think"]
        self.n_thoughts = self.args["num_thoughts"]
        self.batch_size_per_gpu = self.args["batch_size"]
        self._device = torch.device(self.args["device"])
        self.generator = torch.Generator(device=self._device).manual_seed(self.args["seed"])
        room = self.qs.model.cfg.max_seq_len - (self.qs.cfg.n_ahead if self.think else 0)
        self._max_length = min(self.args["max_length"] or room, room)

    # ---- what lm_eval reads ----

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self.args["max_gen_toks"]

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self):
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "source", "")).replace("/", "__")

    def get_model_info(self) -> dict:
        cfg = self.qs.cfg
        return {"quietstar": {"ckpt": self.args["ckpt"] or None, "model": None if self.args["ckpt"] else self.args["model"],
                              "think": self.think, "num_thoughts": self.n_thoughts, "seed": self.args["seed"],
                              "n_ahead": cfg.n_ahead, "thought_temperature": cfg.gumbel_temperature,
                              "where": cfg.where, "think_fraction": cfg.think_fraction,
                              "think_threshold": cfg.think_threshold, "talk_head_zero": talk_head_is_zero(self.qs),
                              "dtype": self.args["dtype"], "max_length": self.max_length}}

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, left_truncate_len=None,
                   **kwargs) -> list[int]:
        """As the `hf` backend: add_special_tokens None means add_bos_token, else the tokenizer's default, and
        no second BOS for a string that starts with it."""
        add = self.args["add_bos_token"] if add_special_tokens is None else add_special_tokens
        tok = self.tokenizer
        if add_special_tokens is None and tok.bos_id is not None and string.startswith(tok.decode([tok.bos_id])):
            add = False
        ids = tok.encode(string, add_bos=add)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(tokens), skip_thought_tokens=True)

    # ---- requests ----

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context, continuation) or None, context ids, continuation ids), as the `hf` backend
        takes them; inputs longer than max_length + 1 lose tokens on the left, as there."""
        items = []
        for _, ctx, cont in requests:
            if not cont:
                raise UserError("loglikelihood: a request with an empty continuation")
            if len(cont) > self.max_length:
                raise UserError(f"loglikelihood: a continuation of {len(cont)} tokens is longer than max_length="
                                f"{self.max_length}")
            items.append(((list(ctx) + list(cont))[-(self.max_length + 1):][:-1], list(cont)))
        groups: dict = {}  # requests with the same input go in one batch (they share its forward)
        for i, (inp, _) in enumerate(items):
            groups.setdefault(tuple(inp), []).append(i)
        order = sorted(groups, key=lambda inp: (-len(inp), inp))  # longest first: little padding
        out: list = [None] * len(items)
        bar = None if disable_tqdm else Progress(len(items), "loglikelihood")
        for b0 in range(0, len(order), self.batch_size):  # batch_size distinct inputs
            idx = [i for inp in order[b0:b0 + self.batch_size] for i in groups[inp]]
            scored, _ = score_continuations(self.qs, [items[i][0] for i in idx], [items[i][1] for i in idx],
                                            self.think, self.n_thoughts, self.generator, self.tokenizer.pad_id,
                                            self.args["branch_memory_mb"])
            for i, s in zip(idx, scored):
                out[i] = (s.logprob, s.greedy)
                req = requests[i][0]
                if req is not None:
                    self.cache_hook.add_partial("loglikelihood", req, out[i])
            if bar is not None:
                bar.update(len(idx))
        if bar is not None:
            bar.close()
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """lm_eval's rolling windows of max_length (as the `hf` backend), each scored as a continuation."""
        from lm_eval import utils

        windows, owner = [], []
        for r, (text,) in enumerate(req.args for req in requests):
            for ctx, cont in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(r)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        total = [0.0] * len(requests)
        for r, (lp, _) in zip(owner, scores):
            total[r] += lp
        for req, t in zip(requests, total):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, t)
        return total

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Batches of requests with the same gen_kwargs, longest context first, through generate_stream."""
        groups: dict = {}
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            groups.setdefault(json.dumps(gen_kwargs, sort_keys=True, default=str), []).append(i)
        out: list = [None] * len(requests)
        bar = None if disable_tqdm else Progress(len(requests), "generate_until")
        for idx in groups.values():
            kw = self._gen_kwargs(requests[idx[0]].args[1])
            # generate_stream's cache holds the prompt, the new tokens and one thought
            room = min(self.max_length, self.qs.model.cfg.max_seq_len - self.qs.cfg.n_ahead) - kw["max_gen_toks"]
            if room < 1:
                raise UserError(f"generate_until: max_gen_toks={kw['max_gen_toks']} leaves no room for a context in "
                                f"the model's max_seq_len={self.qs.model.cfg.max_seq_len} (with n_ahead="
                                f"{self.qs.cfg.n_ahead})")
            enc = {i: self.tok_encode(requests[i].args[0], left_truncate_len=room) for i in idx}
            idx = sorted(idx, key=lambda i: -len(enc[i]))
            for b0 in range(0, len(idx), self.batch_size):
                batch = idx[b0:b0 + self.batch_size]
                for i, text in zip(batch, self._generate([enc[i] for i in batch], **kw)):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                if bar is not None:
                    bar.update(len(batch))
        if bar is not None:
            bar.close()
        return out

    def _gen_kwargs(self, gen_kwargs: dict) -> dict:
        """A task's gen_kwargs -> until, max_gen_toks, temperature (0: greedy), top_p. Sampling as `hf`: with
        do_sample true, or a temperature > 0 and no do_sample."""
        unknown = sorted(set(gen_kwargs) - set(GEN_KWARGS))
        if unknown:
            raise UserError(f"generate_until: unsupported gen_kwargs {unknown} (supported: {list(GEN_KWARGS)})")
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        temperature = float(gen_kwargs.get("temperature", 0.0) or 0.0)
        sample = gen_kwargs.get("do_sample")
        sample = temperature > 0 if sample is None else bool(sample)
        if sample and temperature == 0:
            temperature = 1.0
        return {"until": [u for u in until if u], "max_gen_toks": int(gen_kwargs.get("max_gen_toks", self.max_gen_toks)),
                "temperature": temperature if sample else 0.0, "top_p": float(gen_kwargs.get("top_p", 1.0))}

    @torch.no_grad()
    def _generate(self, prompts: list[list[int]], until: list[str], max_gen_toks: int, temperature: float,
                  top_p: float) -> list[str]:
        """Continuations of token prompts, each cut at its first `until` string; a row stops at EOS or once
        its text holds an `until` string."""
        from quietstar.generate import generate_stream, left_pad, sample_token

        tok, eos = self.tokenizer, self.eot_token_id
        ids, mask = left_pad([p or [self.prefix_token_id] for p in prompts], tok.pad_id, self._device)
        made = [[] for _ in prompts]
        done = [False] * len(prompts)
        longest = max((len(u) for u in until), default=0)

        def pick(logits):  # (B, V) -> (tokens (B,), done (B,))
            nxt = sample_token(logits, temperature, top_p, self.generator)
            for b, t in enumerate(nxt.tolist()):
                if done[b]:
                    continue
                if t == eos:
                    done[b] = True
                    continue
                made[b].append(t)
                tail = tok.decode(made[b][-(longest + 8):]) if until else ""  # a stop string ends in the tail
                done[b] = any(u in tail for u in until)
            return nxt, torch.tensor(done, device=nxt.device)

        for _ in generate_stream(self.qs, ids, mask, max_gen_toks, temperature, top_p, self.think, self.generator,
                                 pad_id=tok.pad_id, pick=pick):
            pass
        texts = []
        for m in made:
            text = tok.decode(m, skip_thought_tokens=True)
            for u in until:
                text = text.split(u)[0]
            texts.append(text)
        return texts


# --------------------------------------------------------------------------------------------------
# CLI: lm_eval's own, with the model registered and the shipped tasks included


def main(argv: Optional[Sequence[str]] = None) -> None:
    from lm_eval.__main__ import cli_evaluate

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--include_path" not in argv and not any(a.startswith("--include_path=") for a in argv):
        argv += ["--include_path", str(TASKS_DIR)]
    saved = sys.argv
    sys.argv = ["lm_eval", *argv]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved


if __name__ == "__main__":
    run_main(main)
