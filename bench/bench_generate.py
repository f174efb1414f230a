"""Generation speed with and without thoughts (not a pytest test; run by hand).

    python bench/bench_generate.py [model=smollm2-135m] [new_tokens=24] [reps=3] [threads=1]
                                   [batches=1,8] [thought_lengths=4,8,12] [out=bench/results/generate_cpu.json]

Thought length = the tokens a thought feeds through the model: <start>, the sampled tokens, <end>; that
is T - 1 with T = n_ahead (docs/thought-grid.md), so lengths 4 / 8 / 12 are n_ahead 5 / 9 / 13 with 2 / 6 / 10
sampled tokens. Each generated token then costs thought length + 1 single-token forwards (the thought,
then the token itself), so the ideal ratio of tok/s with thoughts to plain decoding is 1 / (length + 1);
the goal is 0.8 of that.

tok/s counts generated tokens of all rows per second of decoding, after the prompt's forward and the
first token (prefill excluded). Runs are interleaved (plain, then each thought length, repeated `reps`
times) and the median is kept, so that load from other processes hits every configuration alike.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quietstar.cli import parse_kv  # noqa: E402
from quietstar.generate import generate_stream  # noqa: E402
from quietstar.provenance import write_record  # noqa: E402
from quietstar.methods.quietstar.thinker import QuietStar
from quietstar.methods.quietstar.config import ThoughtConfig  # noqa: E402

PROMPT = ("Q: Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
          "How many clips did Natalia sell altogether in April and May?\nA: Let's think step by step.")


@torch.no_grad()
def decode_rate(qs: QuietStar, ids: torch.Tensor, new_tokens: int, think: bool, seed: int = 0) -> float:
    """Generated tokens per second (all rows), prefill and first token excluded."""
    g = torch.Generator().manual_seed(seed)
    stream = generate_stream(qs, ids, max_new_tokens=new_tokens + 1, temperature=1.0, think=think, generator=g)
    next(stream)  # prompt forward + first token
    t0 = time.perf_counter()
    n = sum(1 for _ in stream)
    return ids.shape[0] * n / (time.perf_counter() - t0)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_kv(argv, dict(
        model="smollm2-135m", new_tokens=24, reps=3, threads=1, batches="1,8", thought_lengths="4,8,12",
        out="bench/results/generate_cpu.json"))
    if args["threads"]:
        torch.set_num_threads(args["threads"])
    from quietstar.loading import load_pretrained

    base, tok = load_pretrained(args["model"], dtype=torch.float32)
    base.eval()
    lengths = [int(x) for x in args["thought_lengths"].split(",")]
    batches = [int(x) for x in args["batches"].split(",")]
    prompt = tok.encode(PROMPT)
    results = []
    for B in batches:
        ids = torch.tensor([prompt] * B)
        thinkers = {n: QuietStar(base, tok, ThoughtConfig(n_ahead=n + 1)).eval() for n in lengths}
        decode_rate(thinkers[lengths[0]], ids, 2, think=True)  # warm-up
        runs = {"plain": [], **{n: [] for n in lengths}}
        for r in range(args["reps"]):
            runs["plain"].append(decode_rate(thinkers[lengths[0]], ids, args["new_tokens"], think=False, seed=r))
            for n in lengths:
                runs[n].append(decode_rate(thinkers[n], ids, args["new_tokens"], think=True, seed=r))
            print(f"batch {B} rep {r}: plain {runs['plain'][-1]:.2f} tok/s; "
                  + ", ".join(f"len {n} {runs[n][-1]:.2f}" for n in lengths), file=sys.stderr)
        plain = statistics.median(runs["plain"])
        for n in lengths:
            rate = statistics.median(runs[n])
            ratio = rate / plain
            results.append({"batch": B, "thought_length": n, "n_ahead": n + 1, "sampled_thought_tokens": n - 2,
                            "plain_tok_s": round(plain, 3), "think_tok_s": round(rate, 3),
                            "ratio": round(ratio, 4), "ideal_ratio": round(1 / (n + 1), 4),
                            "goal_ratio": round(0.8 / (n + 1), 4), "ratio_over_ideal": round(ratio * (n + 1), 3),
                            "goal_met": ratio >= 0.8 / (n + 1),
                            "runs_plain": [round(x, 3) for x in runs["plain"]], "runs_think": [round(x, 3) for x in runs[n]]})
            print(f"batch {B}, thought length {n}: {rate:.2f} vs plain {plain:.2f} tok/s = {ratio:.4f} "
                  f"(ideal {1 / (n + 1):.4f}, {ratio * (n + 1):.2f}x of ideal)")
    record = {"benchmark": "generation with thoughts vs plain KV-cached decoding", "model": args["model"],
              "dtype": "float32", "prompt_tokens": len(prompt), "new_tokens": args["new_tokens"],
              "reps": args["reps"], "statistic": "median over reps, runs interleaved",
              "convention": "thought length = n_ahead - 1 tokens fed per thought (<start>, n_ahead-3 sampled, "
                            "<end>); ideal ratio 1/(length+1), goal 0.8/(length+1)",
              "results": results, "all_goals_met": all(r["goal_met"] for r in results)}
    write_record(args["out"], record, seeds=[], command=["python", "bench/bench_generate.py", *argv])
    print(f"-> {args['out']}")


if __name__ == "__main__":
    main()
