"""Generation with thoughts (docs/thought-grid.md, "Generation and evaluation"): the text's K/V is cached, and for each new token
only the last position thinks.

Per generated token, with T = n_ahead:
  1. feed <start>, then T-3 sampled thought tokens, then <end> (positions i+1 .. i+T-1) on top of the
     cached text, one token at a time;
  2. mix the <end> step's hidden state with the text's last hidden state through the talk head and
     sample the next token from the mixed prediction (the LM head has no rows for the thought ids, so
     they can never be emitted);
  3. drop the thought's K/V (truncate the cache back to the text) and feed the new token.
So a token costs T single-token forwards instead of the official code's full re-run of every
position's thought over the whole sequence. `think=False` is plain KV-cached decoding of the same model.
With thought.where = entropy or gate, a token is preceded by a thought only where the selector fires
(where.fires: above thought.think_threshold, or else in the top think_fraction of the scores so far);
the other tokens cost one forward.

CLI:  python -m quietstar.generate [ckpt=DIR] prompt="..." [max_new_tokens=64 temperature=0.7
      top_p=0.95 think=true show_thoughts=true seed=0 device=cpu]
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch

from quietstar.cli import AT_LEAST_1, NON_NEGATIVE, UNIT_OPEN_LEFT, parse_kv
from quietstar.errors import UserError, run_main
from quietstar.model import KVCache
from quietstar.methods.quietstar.thinker import QuietStar
from quietstar.methods.quietstar.rollout import sample_categorical
from quietstar.methods.quietstar.where import fires


def sample_token(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0,
                 generator: Optional[torch.Generator] = None, u: Optional[torch.Tensor] = None) -> torch.Tensor:
    """logits (B, V) -> token ids (B,). temperature 0 = greedy (draws no random numbers). `u` (B, 1) float64:
    the uniform numbers to sample with (sample_categorical), e.g. drawn from one generator per row."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(-1)
    if top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = torch.softmax(sorted_logits / temperature, -1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return sample_categorical(logits, temperature, generator, u)


@dataclass
class Step:
    tokens: torch.Tensor  # (B,) the token generated at this step (pad_id once a row has finished)
    thoughts: Optional[torch.Tensor]  # (B, T-3) the thought behind it, None when not thinking
    mix_weight: Optional[torch.Tensor]  # (B,) the talk head's w for it
    finished: torch.Tensor  # (B,) bool, True once the row produced a stop token
    thinking: Optional[torch.Tensor] = None  # (B,) bool: the rows whose token followed a thought (thought.where)


def crop_to_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor, room: int):
    """A left-padded batch cut to its last `room` columns, with a warning, when its longest prompt has more
    tokens than the positions the model leaves it (`room`: max_seq_len - max_new_tokens - n_ahead); a UserError
    when there is no room at all. Every caller of generate_stream, whatever its tokenizer, goes through this."""
    import warnings

    if room < 1:
        raise UserError(f"max_new_tokens: too large: with the thought's n_ahead it leaves no room for a prompt "
                        f"in the model's max_seq_len ({room} positions)")
    longest = int(attention_mask.sum(-1).max()) if attention_mask.numel() else 0
    if longest <= room:
        return input_ids, attention_mask
    warnings.warn(f"prompt: {longest} tokens, more than the {room} the model's max_seq_len leaves beside "
                  f"max_new_tokens; keeping its last {room} tokens")
    return input_ids[:, -room:], attention_mask[:, -room:]


@torch.no_grad()
def generate_stream(qs: QuietStar, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                    max_new_tokens: int = 64, temperature: float = 1.0, top_p: float = 1.0,
                    think: bool = True, generator: Optional[torch.Generator] = None,
                    stop_ids: Sequence[int] = (), pad_id: int = 0,
                    thought_temperature: Optional[float] = None,
                    pick: Optional[Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]] = None) -> Iterator[Step]:
    """Yield one Step per generated token for a left-padded batch of prompts input_ids (B, P).

    pick(logits (B, V)) -> (tokens (B,), done (B,) bool), if given, chooses each step's tokens in place of
    sample_token and the stop_ids check: a caller's own per-row rule (explicit/sample.py forces a marker
    token and ends rows on its stop rules). The tokens may be any ids qs.embed reads, thought ids included."""
    model, cfg = qs.model, qs.cfg
    B, P = input_ids.shape
    dev = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if bool((attention_mask[:, -1] == 0).any()):
        raise ValueError("prompts must be left-padded: the last column of attention_mask has a 0")
    T = cfg.n_ahead
    input_ids, attention_mask = crop_to_positions(input_ids, attention_mask, model.cfg.max_seq_len - max_new_tokens - T)
    P = input_ids.shape[1]
    dtype = model.tok_embeddings.weight.dtype
    cache = KVCache(model.cfg, B, P + max_new_tokens + T, dtype=dtype, device=dev)
    cache.key_valid[:, :P] = attention_mask.bool()
    pos = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)  # (B, P) left padding shifts positions
    h = model(inputs_embeds=qs.embed(input_ids), position_ids=pos, attn=cache, return_hidden=True)
    h_last, last_pos = h[:, -1], pos[:, -1]  # (B, d), (B,)
    stop = torch.tensor(list(stop_ids) or [-1], device=dev)
    finished = torch.zeros(B, dtype=torch.bool, device=dev)

    def one(token, position):  # feed one token per row at `position` -> hidden (B, d)
        return model(inputs_embeds=qs.embed(token[:, None]), position_ids=position[:, None], attn=cache,
                     return_hidden=True)[:, -1]

    selective = think and cfg.where != "all"
    if selective:  # thought.where: each row's scores so far, the prompt's included (where.fires)
        history = qs.think_scores(h).masked_fill(~attention_mask.bool(), float("nan"))  # (B, P)
    for _ in range(max_new_tokens):
        thought, w, thinking = None, None, None
        base = model.head(h_last) if not think or selective else None  # (B, V): the prediction without a thought
        if selective:
            score = qs.think_scores(h_last[:, None], base[:, None])[:, 0]
            thinking = fires(score, history, cfg.think_fraction, cfg.think_threshold) & ~finished
            history = torch.cat([history, score[:, None]], 1)
        if think and (thinking is None or bool(thinking.any())):  # rows of a batch think together
            text_len = cache.seen
            logits, w, thought = qs.think(one, h_last, last_pos, generator, thought_temperature)
            cache.truncate(text_len)  # the thought is not part of the text
            if thinking is not None:
                logits = torch.where(thinking[:, None], logits, base)
                w = torch.where(thinking, w, torch.zeros_like(w))
        else:
            logits = base
        if pick is None:
            nxt = sample_token(logits, temperature, top_p, generator)
            done = torch.isin(nxt, stop)
        else:
            nxt, done = pick(logits)
        nxt = torch.where(finished, torch.full_like(nxt, pad_id), nxt)
        finished = finished | done
        yield Step(nxt, thought, w, finished.clone(), thinking)
        if bool(finished.all()):
            return
        last_pos = last_pos + 1
        h_last = one(nxt, last_pos)


@dataclass
class Generation:
    tokens: list  # per prompt: generated ids (stop token included, nothing after it)
    texts: list  # per prompt: decoded generated text
    thoughts: list  # per prompt: per generated token, the thought ids behind it (empty lists if think=False)
    tokens_per_s: float


def encode_prompt(tokenizer, text: str, max_len: Optional[int] = None) -> list[int]:
    """Token ids of `text` as training reads a document (data.py): BOS (when the tokenizer has one), then
    the text's tokens; with max_len, BOS and the text's last max_len - 1 tokens. Generation and every
    evaluation encode their inputs with this, so a model is evaluated the way it was trained."""
    ids = tokenizer.encode(text, add_bos=False)
    bos = [] if getattr(tokenizer, "bos_id", None) is None else [tokenizer.bos_id]
    if max_len is not None:
        ids = ids[max(0, len(ids) - (max_len - len(bos))):]
    return bos + ids


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device=None):
    P = max(len(s) for s in seqs)
    ids = torch.tensor([[pad_id] * (P - len(s)) + list(s) for s in seqs], device=device)
    mask = torch.tensor([[0] * (P - len(s)) + [1] * len(s) for s in seqs], device=device)
    return ids, mask


def fit_prompt(tokenizer, prompt: str, room: int) -> list[int]:
    """The prompt's ids: an empty prompt starts from BOS; a prompt longer than the model's positions leave
    room for (`room`: max_seq_len - max_new_tokens - n_ahead) keeps its last `room` tokens, with a warning."""
    import warnings

    if room < 1:
        raise UserError(f"max_new_tokens: too large: with the thought's n_ahead it leaves no room for a prompt "
                        f"in the model's max_seq_len ({room} positions)")
    ids = encode_prompt(tokenizer, prompt)
    if not ids:  # no BOS to start from: EOS, or an error
        if tokenizer.eos_id is None:
            raise UserError("prompt: empty, and this tokenizer has no BOS token to start from")
        ids = [tokenizer.eos_id]
    if len(ids) > room:
        warnings.warn(f"prompt: {len(ids)} tokens, more than the {room} the model's max_seq_len leaves beside "
                      f"max_new_tokens; keeping its last {room} tokens")
        ids = encode_prompt(tokenizer, prompt, room)
    return ids


def generate(qs: QuietStar, tokenizer, prompts: Sequence[str], max_new_tokens: int = 64,
             temperature: float = 1.0, top_p: float = 1.0, think: bool = True,
             generator: Optional[torch.Generator] = None, stop_ids: Optional[Sequence[int]] = None,
             on_step=None) -> Generation:
    """Generate continuations of text prompts (batched, left-padded). on_step(Step) streams."""
    dev = qs.model.tok_embeddings.weight.device
    room = qs.model.cfg.max_seq_len - max_new_tokens - qs.cfg.n_ahead  # positions left for the prompt
    ids, mask = left_pad([fit_prompt(tokenizer, p, room) for p in prompts], tokenizer.pad_id, dev)
    stop_ids = [tokenizer.eos_id] if stop_ids is None else stop_ids
    out = [[] for _ in prompts]
    thoughts = [[] for _ in prompts]
    t0, n_tok = time.perf_counter(), 0
    for step in generate_stream(qs, ids, mask, max_new_tokens, temperature, top_p, think, generator, stop_ids,
                                tokenizer.pad_id):
        if on_step is not None:
            on_step(step)
        for b in range(len(prompts)):
            if len(out[b]) and out[b][-1] in stop_ids:
                continue
            out[b].append(int(step.tokens[b]))
            thought = step.thoughts is not None and (step.thinking is None or bool(step.thinking[b]))
            thoughts[b].append(step.thoughts[b].tolist() if thought else [])
            n_tok += 1
    dt = time.perf_counter() - t0
    texts = [tokenizer.decode([t for t in o if t not in stop_ids]) for o in out]
    return Generation(out, texts, thoughts, n_tok / max(dt, 1e-9))


# --------------------------------------------------------------------------------------------------
# CLI


def load_for_inference(ckpt: Optional[str] = None, device: str = "cpu", dtype: Optional[torch.dtype] = None,
                       model: str = "smollm2-135m", n_ahead: Optional[int] = None):
    """(QuietStar, tokenizer) in eval mode, from a training checkpoint (step dir, checkpoints/ dir or run dir)
    or an export dir, or else the pretrained base model `model` with fresh thought parameters (talk head at
    its zero init: the mixed prediction is exactly the base one). n_ahead overrides T."""
    if ckpt:
        from quietstar.export import load_thinker

        qs = load_thinker(ckpt, device=device)
        tok = qs.tokenizer
    else:
        from quietstar.loading import load_pretrained
        from quietstar.methods.quietstar.config import ThoughtConfig

        base, tok = load_pretrained(model, dtype=dtype, device=device)
        qs = QuietStar(base, tok, ThoughtConfig())
    if n_ahead is not None:
        qs.configure(dataclasses.replace(qs.cfg, n_ahead=n_ahead))
    return qs.to(device).eval(), tok


RULES = {"max_new_tokens": AT_LEAST_1, "temperature": NON_NEGATIVE, "top_p": UNIT_OPEN_LEFT, "seed": NON_NEGATIVE}


def main(argv=None):
    args = parse_kv(sys.argv[1:] if argv is None else argv, dict(
        ckpt="", model="smollm2-135m", prompt="Q: What is 12 + 7?\nA:", max_new_tokens=48, temperature=0.7,
        top_p=0.95, think=True, show_thoughts=True, seed=0, device="cpu"), RULES)
    args["prompt"] = args["prompt"] or ""  # prompt= or prompt=none: generate from BOS
    qs, tok = load_for_inference(args["ckpt"], args["device"], model=args["model"])
    qs.eval()
    g = torch.Generator(device=args["device"]).manual_seed(args["seed"])
    print(args["prompt"], end="", flush=True)

    def show(step: Step):
        if args["show_thoughts"] and step.thoughts is not None and (step.thinking is None or bool(step.thinking[0])):
            print(f"\033[2m[{tok.decode(step.thoughts[0].tolist())}]\033[0m", end="")
        print(tok.decode([int(step.tokens[0])]), end="", flush=True)

    gen = generate(qs, tok, [args["prompt"]], args["max_new_tokens"], args["temperature"], args["top_p"],
                   args["think"], g, on_step=show)
    print(f"\n\n[{len(gen.tokens[0])} tokens, {gen.tokens_per_s:.1f} tok/s, think={args['think']}]")


if __name__ == "__main__":
    run_main(main)
