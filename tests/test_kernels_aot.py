"""The Triton kernels compiled ahead of time for sm_80 and sm_90 with no GPU (kernels/aot.py).

Each case compiles one launch of kernels/thought_attention.py (kernel, constexpr variant, autotune config,
dtype, head dim, target) through Triton's whole pipeline down to ptxas, and fails on a compile error, on
shared memory above the target's per-block limit, or on register spills not listed in aot.ACCEPTED_SPILLS.
It shows that the kernels compile and fit; it does not run them (their numerics on a GPU are untested).

The kernel takes fp16/bf16 on CUDA (fp32 only in the interpreter): compiled, its fp32 tiles exceed sm_80's
shared memory at head dim 128 and spill at every head dim (the fp32 rows of bench/results/kernels_aot.json),
so thought_attention refuses fp32 on CUDA and the `auto` backend runs `split` there. All the launches (every
reachable config x bf16/fp16 x every preset head dim x both targets, 1788 compiles) take most of an hour on
2 cores: QUIETSTAR_AOT=all runs them here, `python bench/kernels_aot.py` records them. By default 75 run
(default_jobs): at the largest head dim each (kernel, variant) on both targets in bf16 or fp16, so that every
config reachable there is compiled once; at the smallest head dim each (kernel, variant) once more.
"""

import os
from collections import defaultdict

import pytest

from quietstar.kernels import aot

SKIP = aot.ptxas_available()


def default_jobs(jobs: list[aot.Job]) -> list[aot.Job]:
    """At the largest head dim each (kernel, variant) once per target, in bf16 on one and fp16 on the other
    (swapped from one variant to the next), with a config of the kernel not taken yet, else its configs in
    turn; at the smallest head dim each (kernel, variant) once, fp16 and bf16 and the targets in turn,
    first config."""
    dims = sorted({j.head_dim for j in jobs})
    by = defaultdict(list)  # (kernel, variant, arch, dtype, head dim) -> its jobs, one per config
    for j in jobs:
        by[j.kernel, j.variant, j.arch, j.dtype, j.head_dim].append(j)
    variants = list(dict.fromkeys((j.kernel, j.variant) for j in jobs))
    picked, taken, count = [], defaultdict(set), defaultdict(int)
    for kernel, variant in variants:
        v = count[kernel]
        count[kernel] += 1
        for a, arch in enumerate(aot.TARGETS):
            options = by[kernel, variant, arch, ("bf16", "fp16")[(v + a) % 2], dims[-1]]
            fresh = [j for j in options if j.config not in taken[kernel]]
            picked.append(fresh[0] if fresh else options[(2 * v + a) % len(options)])
            taken[kernel].add(picked[-1].config)
    for n, (kernel, variant) in enumerate(variants):
        arch, dtype = aot.TARGETS[n % len(aot.TARGETS)], ("fp16", "bf16")[n % 2]
        picked.append(by[kernel, variant, arch, dtype, dims[0]][0])
    return picked


ALL = [] if SKIP else aot.enumerate_jobs()
JOBS = ALL if os.environ.get("QUIETSTAR_AOT") == "all" else default_jobs(ALL) if ALL else []
CASES = [pytest.param(j, id=j.id) for j in JOBS] or [pytest.param(None, marks=pytest.mark.skip(reason=SKIP))]


@pytest.fixture(scope="module")
def compiled():
    """Every job of this run, compiled once by two worker processes."""
    if SKIP:
        pytest.skip(SKIP)
    return aot.compile_jobs(JOBS, processes=2)


@pytest.mark.skipif(bool(SKIP), reason=SKIP or "")
def test_every_kernel_is_enumerated():
    """Every @triton.jit kernel of thought_attention (a function that reads tl.program_id) has launches."""
    import inspect

    from quietstar.kernels import thought_attention as ta

    kernels = {name for name, f in vars(ta).items()
               if inspect.isfunction(getattr(f, "fn", None)) and "program_id(" in inspect.getsource(f.fn)}
    assert kernels == {j.kernel for j in ALL}
    assert {j.arch for j in ALL} == set(aot.TARGETS) and {j.dtype for j in ALL} == set(aot.DTYPES)


def test_check_flags_each_limit():
    job = aot.Job("_attn_fwd", "plain", "cfg", "bf16", 64, 80)
    fits = {"shared": aot.SHARED_LIMIT[80], "num_warps": 4, "registers": 255, "spill_stores": 0, "spill_loads": 0}
    assert aot.check(job, fits) == []
    assert "shared memory" in aot.check(job, {**fits, "shared": aot.SHARED_LIMIT[80] + 1})[0]
    assert "spills" in aot.check(job, {**fits, "spill_loads": 4})[0]
    assert aot.check(job, {"error": "boom"}) == ["compile error: boom"]
    (kernel, D, arch), (configs, _) = next(iter(aot.ACCEPTED_SPILLS.items()))
    accepted = aot.Job(kernel, "plain", configs[0], "bf16", D, arch)
    cap = aot.ACCEPTED_SPILL_BYTES
    small, large = ({**fits, "spill_stores": n, "spill_loads": 0} for n in (cap, cap + 1))
    assert aot.check(accepted, small) == [] and aot.check(accepted, large)
    assert aot.check(aot.Job(kernel, "plain", configs[0], "fp32", D, arch), small)  # fp32: no spill accepted


@pytest.mark.parametrize("job", CASES)
def test_compiles_and_fits(compiled, job):
    result = compiled[job.id]
    assert not aot.check(job, result), f"{job.id}: {'; '.join(aot.check(job, result))} ({result})"
