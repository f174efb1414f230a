"""One training step (rollout + learning pass + AdamW) of two source trees in ONE process, steps interleaved
old/new/new/old..., so that the load of a shared machine hits both alike.

    python bench/scripts/ab_inprocess.py L REPS OLD_TREE NEW_TREE [THREADS]

bench_small, B=2, T=12, K=4, n=2. Each tree's modules are imported under the same names one after the
other (the first tree's objects keep their own module globals). Prints each step time and a JSON line.
"""
import importlib, json, os, sys, time
import torch

def load(tree):
    for m in [m for m in sys.modules if m == "quietstar" or m.startswith("quietstar.") or m == "kernels" or m.startswith("kernels.")]:
        del sys.modules[m]
    sys.path.insert(0, tree)
    try:
        model = importlib.import_module("quietstar.model")
        methods = os.path.isdir(os.path.join(tree, "quietstar", "methods"))  # a tree from before the methods/ folder
        thinker = importlib.import_module("quietstar.methods.quietstar.thinker" if methods else "quietstar.thinker")
        attention = importlib.import_module("quietstar.attention")
    finally:
        sys.path.remove(tree)
    return model, thinker, attention

def build(tree, L):
    model, thinker, attention = load(tree)
    torch.manual_seed(0)
    base = model.Transformer(model.ModelConfig.from_preset("bench_small"))
    qs = thinker.QuietStar(base, None, thinker.ThoughtConfig(n_ahead=12, n_ahead_talk=4, n_thoughts=2))
    opt = torch.optim.AdamW(qs.parameters(), lr=1e-5)
    x = torch.randint(0, base.cfg.vocab_size, (2, L))
    g = torch.Generator().manual_seed(0)
    def step():
        loss = qs(x, generator=g).loss
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
        return float(loss.detach())
    return step

L, reps = int(sys.argv[1]), int(sys.argv[2])
if len(sys.argv) > 5: torch.set_num_threads(int(sys.argv[5]))
steps = {"old": build(sys.argv[3], L), "new": build(sys.argv[4], L)}
for s in steps.values(): s()  # warm-up
times = {"old": [], "new": []}
for r in range(reps):
    for name in (("old", "new") if r % 2 == 0 else ("new", "old")):
        t0 = time.perf_counter(); steps[name](); times[name].append(time.perf_counter() - t0)
        print(name, round(times[name][-1], 2), flush=True)
print(json.dumps({"L": L, "old_step_s": times["old"], "new_step_s": times["new"]}))
