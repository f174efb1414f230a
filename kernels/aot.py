"""Ahead-of-time compilation of the thought-attention kernels for sm_80 and sm_90, with no GPU.

Every kernel of kernels/thought_attention.py is compiled by Triton's own pipeline (TTIR -> TTGIR -> LLVM ->
PTX -> ptxas cubin) at every launch the dispatch can make, and checked against the target's limits:

    shared memory    metadata.shared <= the opt-in maximum per block (SHARED_LIMIT)
    registers        no spills (ptxas -v: "N bytes spill stores/loads"), unless ACCEPTED_SPILLS says why
                     (registers x threads always fit: Triton declares .reqntid, so ptxas caps the registers)

This proves that the kernels compile and fit; it does not run them (their numerics on a GPU are untested).

The launches are not listed by hand: `launches` runs the autograd Functions (forward and backward, full and
subset grid, with and without packed documents, with one and with two dk/dv programs per key tile) on small
CPU tensors with the kernel launches recorded instead of run, so it sees exactly the kernels, the constexpr
values and the argument types the wrappers pass. Each recorded launch is then compiled at every autotune
config its pruner keeps for some problem size (R and L over the powers of two), at each dtype and at each
head dim of the model presets, for each target. Triton's JIT specializes the launch by its arguments (16-byte
aligned pointers, integers divisible by 16, integers equal to 1); `compile_job` binds the recorded arguments
with the JIT's own binder, so the compiled kernel is the one a GPU launch of that shape would build. Not
covered: the integers' other specializations (B, GROUP, P or NSPLIT equal to 1, L not a multiple of 16, P
or NSPLIT a multiple of 16), and fixed_tiles' test tilings (never chosen by the dispatch).

Under TRITON_INTERPRET=1 (the CPU tests) `triton.jit` makes interpreter functions, which do not compile, so
the compiles run in worker processes started without it (`compile_jobs`); ptxas is the one Triton ships.
Nothing is cached across runs (each worker compiles into a fresh temporary TRITON_CACHE_DIR).

    python bench/kernels_aot.py        # every job; the table and bench/results/kernels_aot.json
    python -m pytest tests/test_kernels_aot.py
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import queue
import re
import select
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch

TARGETS = (80, 90)  # compute capabilities: A100 (sm_80), H100 (sm_90, compiled as sm_90a)
# Opt-in shared memory per block, bytes: CUDA C++ Programming Guide, "Technical Specifications per Compute
# Capability" (163 KB for 8.0, 227 KB for 9.0). Triton compares metadata.shared with the same quantity
# (CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN) when it loads a kernel; it has no table of its own.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
# the dtypes thought_attention takes on CUDA (_check_cuda_dtype refuses fp32 there: its tiles do not fit)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

# Register spills accepted in bf16 and fp16 (none in fp32), for every variant of a kernel: (kernel, head dim,
# arch) -> (configs, why). Each was measured (bench/results/kernels_aot.json: at most 148 B stored + loaded);
# a spill above ACCEPTED_SPILL_BYTES, or of a config not listed, fails.
ACCEPTED_SPILL_BYTES = 160
_AT_255 = ("sm_80 (mma.sync): the tile, within thought_attention._fits' register budget (measured on sm_90), "
           "needs a few more than a thread's 255 registers. The autotuner times it against the other tiles.")
_BELOW_255 = ("ptxas spills a few values while staying at 128 or 168 registers (its own choice: the limit is "
              "255). The autotuner times the tile against the other tiles.")
_W8_128_32 = ("BLOCK_N=128,BLOCK_R=2,BLOCK_P=32,w8,s3", "BLOCK_N=128,BLOCK_R=1,BLOCK_P=64,w8,s3",
              "BLOCK_N=64,BLOCK_R=2,BLOCK_P=32,w8,s3", "BLOCK_N=64,BLOCK_R=1,BLOCK_P=64,w8,s2")
_M128 = ("BLOCK_R=1,BLOCK_P=128,BLOCK_N=64,w8,s3", "BLOCK_R=2,BLOCK_P=64,BLOCK_N=64,w8,s3",
         "BLOCK_R=4,BLOCK_P=32,BLOCK_N=64,w8,s3")
_SMALL_DKDV = ("BLOCK_N=32,BLOCK_R=1,BLOCK_P=16,w4,s3",)
ACCEPTED_SPILLS: dict[tuple[str, int, int], tuple[tuple[str, ...], str]] = {
    ("_attn_fwd", 128, 80): (_M128, _AT_255),
    ("_subset_fwd", 128, 80): (_M128, _AT_255),
    ("_subset_fwd", 64, 80): (("BLOCK_R=2,BLOCK_P=32,BLOCK_N=32,w4,s4",), _BELOW_255),
    ("_attn_bwd_dq", 64, 80): (("BLOCK_R=2,BLOCK_P=32,BLOCK_N=64,w4,s3",), _AT_255),
    ("_attn_bwd_dq", 64, 90): (("BLOCK_R=1,BLOCK_P=32,BLOCK_N=64,w4,s3",), _BELOW_255),
    ("_subset_bwd_dq", 64, 80): (("BLOCK_R=2,BLOCK_P=32,BLOCK_N=64,w4,s3",), _AT_255),
    ("_attn_bwd_dkdv_text", 16, 80): (_W8_128_32[:1] + _W8_128_32[2:] + ("BLOCK_N=64,BLOCK_R=2,BLOCK_P=16,w8,s3",),
                                      _BELOW_255),
    ("_attn_bwd_dkdv_text", 64, 80): (_W8_128_32 + ("BLOCK_N=64,BLOCK_R=2,BLOCK_P=16,w8,s3",
                                                    "BLOCK_N=64,BLOCK_R=1,BLOCK_P=32,w4,s3"), _AT_255),
    ("_attn_bwd_dkdv_text", 64, 90): (_SMALL_DKDV, _BELOW_255),
    ("_attn_bwd_dkdv_text", 128, 90): (_SMALL_DKDV, _BELOW_255),
    ("_subset_bwd_dkdv_text", 16, 80): (_W8_128_32, _BELOW_255),
    ("_subset_bwd_dkdv_text", 16, 90): (_SMALL_DKDV, _BELOW_255),
    ("_subset_bwd_dkdv_text", 64, 80): (("BLOCK_N=64,BLOCK_R=1,BLOCK_P=32,w4,s3",), _BELOW_255),
    ("_subset_bwd_dkdv_text", 64, 90): (("BLOCK_N=128,BLOCK_R=1,BLOCK_P=64,w8,s3",) + _SMALL_DKDV,
                                        "BLOCK_N=128 needs a few more than 255 registers on sm_90 too; BLOCK_N=32: "
                                        + _BELOW_255),
}

# the recorded problem: B = 2 sequences of L = 32 text tokens, n = 2 copies of S = 4 grid steps (R = 7 rows),
# P = 12 thinking positions in the subset grid; H, G from the model preset of each head dim. Sizes that the
# JIT specializes (multiples of 16, ones) are those of a typical launch: L a multiple of 16, P not.
B, N_COPIES, S, L, P = 2, 2, 4, 32, 12


# --------------------------------------------------------------------------------------------------
# the launches the dispatch makes


@dataclass
class Launch:
    """One recorded kernel launch: the kernel, its constexpr kwargs and its arguments."""
    kernel: str  # name in thought_attention
    args: tuple
    kwargs: dict
    tuned: object = field(default=None, repr=False)  # the triton.autotune wrapper, None if untuned

    @property
    def variant(self) -> str:
        """The constexpr flags set, and "R1" for the one-row grid (R = S = 1 specialize as constants)."""
        flags = [k for k in ("DOCS", "SPLIT", "SUBSET") if self.kwargs.get(k)]
        named = dict(zip(self.arg_names(), self.args))
        if named.get("R") == 1:
            flags.append("R1")
        return "+".join(flags) or "plain"

    def arg_names(self) -> list[str]:
        return _arg_names(getattr(_ta(), self.kernel))


def _ta():
    from quietstar.kernels import thought_attention
    return thought_attention


def _arg_names(fn) -> list[str]:
    import inspect
    return list(inspect.signature(getattr(fn, "fn", fn)).parameters)


@contextlib.contextmanager
def _recording(nsplit: int):
    """Inside: thought_attention's launches append a Launch to the yielded list instead of running."""
    ta = _ta()
    seen: list[Launch] = []

    def launch(kind, jit_fn, tuned_fn, grid, *args, **kwargs):
        seen.append(Launch(jit_fn.__name__, args, kwargs, tuned_fn))

    class Untuned:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            return lambda *args, **kwargs: seen.append(Launch(self.fn.__name__, args, kwargs))

    saved = {name: getattr(ta, name) for name in ("_launch", "_attn_bwd_delta", "_dkdv_nsplit")}
    ta._launch = launch
    ta._attn_bwd_delta = Untuned(saved["_attn_bwd_delta"])
    ta._dkdv_nsplit = lambda *a, **k: nsplit
    try:
        yield seen
    finally:
        for name, value in saved.items():
            setattr(ta, name, value)


def _record_all(dtype: torch.dtype, H: int, G: int, D: int) -> list[Launch]:
    """Forward and backward of both autograd Functions, with and without documents, nsplit 1 and 2."""
    ta = _ta()
    R = 1 + N_COPIES * (S - 1)
    doc_ids = torch.tensor([[0] * (L // 2) + [1] * (L - L // 2), [0] * L])
    positions = torch.arange(1, 2 * P, 2)[:P].expand(B, P).contiguous()
    out = []
    for docs in (None, doc_ids):
        for nsplit in (1, 2):
            with _recording(nsplit) as seen:
                q, k, v = (torch.empty(B, h, R, L, D, dtype=dtype, requires_grad=True) for h in (H, G, G))
                o, _ = ta.ThoughtAttention.apply(q, k, v, N_COPIES, None, docs)
                o.backward(torch.zeros_like(o))
                N = L + N_COPIES * (S - 1) * P
                q, k, v = (torch.empty(B, h, N, D, dtype=dtype, requires_grad=True) for h in (H, G, G))
                o = ta.SubsetThoughtAttention.apply(q, k, v, N_COPIES, S, positions, None, docs)
                o.backward(torch.zeros_like(o))
            out += seen
    return out


def _spec_key(launch: Launch) -> tuple:
    """What the JIT specializes a launch on, for deduplication: pointer dtypes, ints by ==1 / %16, constexprs."""
    def spec(a):
        if isinstance(a, torch.Tensor):
            return str(a.dtype)
        if isinstance(a, bool) or not isinstance(a, int):
            return type(a).__name__
        return "1" if a == 1 else "D" if a % 16 == 0 else "i"
    return (launch.kernel, tuple(spec(a) for a in launch.args), tuple(sorted(launch.kwargs.items())))


def head_dims() -> dict[int, tuple[str, int, int]]:
    """head dim -> (the first model preset with it, its H, its G)."""
    from quietstar.model import PRESETS, ModelConfig
    dims = {}
    for name in PRESETS:
        cfg = ModelConfig.from_preset(name)
        dims.setdefault(cfg.head_dim, (name, cfg.n_heads, cfg.n_kv_heads))
    return dict(sorted(dims.items()))


@functools.lru_cache(maxsize=None)
def launches(dtype: str, D: int) -> list[Launch]:
    """The distinct launches (as the JIT specializes them) the dispatch makes at this dtype and head dim."""
    _, H, G = head_dims()[D]
    unique = {}
    for launch in _record_all(DTYPES[dtype], H, G, D):
        unique.setdefault(_spec_key(launch), launch)
    return list(unique.values())


def reachable_configs(launch: Launch) -> list:
    """The autotune configs the launch's pruner keeps for some problem: R and L over the powers of two
    (R stays 1 where the launch specializes it as 1). The pruner reads R, L (named args) and D (a constexpr)."""
    tuned = launch.tuned
    if tuned is None:
        return [None]
    assert tuned.perf_model is None, "a perf_model would prune further; enumerate through it"
    named = dict(zip(launch.arg_names(), launch.args))
    sizes = [2 ** i for i in range(1, 13)]
    kept = {}
    for R in [1] if named["R"] == 1 else sizes:
        for L_ in [1] + sizes:
            for c in tuned.early_config_prune(tuned.configs, {**named, "R": R, "L": L_}, **launch.kwargs):
                kept.setdefault(config_name(c), c)
    return [c for c in tuned.configs if config_name(c) in kept]


def config_name(c) -> str:
    """BLOCK_R=2,BLOCK_P=64,BLOCK_N=64,w8,s3; "default" for an untuned launch (Triton's num_warps=4, stages)."""
    if c is None:
        return "default"
    return ",".join([f"{k}={v}" for k, v in c.kwargs.items()] + [f"w{c.num_warps}", f"s{c.num_stages}"])


# --------------------------------------------------------------------------------------------------
# jobs


@dataclass(frozen=True)
class Job:
    kernel: str
    variant: str
    config: str
    dtype: str
    head_dim: int
    arch: int

    @property
    def id(self) -> str:
        return f"{self.kernel}[{self.variant}]-{self.config}-{self.dtype}-D{self.head_dim}-sm{self.arch}"


def enumerate_jobs(dtypes: Iterable[str] = tuple(DTYPES), dims: Optional[Iterable[int]] = None,
                   targets: Iterable[int] = TARGETS) -> list[Job]:
    """Every (kernel, variant, reachable config, dtype, head dim, target)."""
    jobs = []
    for D in head_dims() if dims is None else dims:
        for dtype in dtypes:
            for launch in launches(dtype, D):
                for c in reachable_configs(launch):
                    jobs += [Job(launch.kernel, launch.variant, config_name(c), dtype, D, arch) for arch in targets]
    ids = [j.id for j in jobs]
    assert len(set(ids)) == len(ids), "two launches share a job id"
    return jobs


# --------------------------------------------------------------------------------------------------
# compiling one job (in a process without TRITON_INTERPRET)

_PTXAS = {"registers": r"Used (\d+) registers", "spill_stores": r"(\d+) bytes spill stores",
          "spill_loads": r"(\d+) bytes spill loads", "stack": r"(\d+) bytes stack frame"}


def _find(job: Job):
    """The recorded launch and config of a job."""
    for launch in launches(job.dtype, job.head_dim):
        if launch.kernel == job.kernel and launch.variant == job.variant:
            for c in reachable_configs(launch):
                if config_name(c) == job.config:
                    return launch, c
    raise KeyError(job.id)


def compile_job(job: Job, launch: Launch, config) -> dict:
    """Compile as JITFunction.run would for this launch on this target (its binder and _pack_args, Triton 3.9
    internals), and read ptxas' resource report."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    fn = getattr(_ta(), job.kernel)
    assert isinstance(fn, JITFunction), "compile in a process without TRITON_INTERPRET=1"
    target = GPUTarget("cuda", job.arch, 32)
    backend = make_backend(target)
    kwargs = {**launch.kwargs, **(config.all_kwargs() if config is not None else {}),
              "debug": fn.debug or knobs.runtime.debug, "instrumentation_mode": knobs.compilation.instrumentation_mode,
              "fpsan_homomorphic_casts": knobs.compilation.fpsan_homomorphic_casts}
    bound, specialization, options = create_function_from_signature(fn.signature, fn.params, backend)(
        *launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    log = io.StringIO()
    knobs.nvidia.dump_ptxas_log = True  # make_cubin prints ptxas -v's report: no second ptxas run
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(triton.compiler.ASTSource(fn, signature, constexprs, attrs), target=target,
                                      options=options.__dict__)
    except Exception as e:  # noqa: BLE001  (a compile error is a result)
        return {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:500]}
    report = {k: [int(x) for x in re.findall(p, log.getvalue())] for k, p in _PTXAS.items()}
    if any(len(v) != 1 for v in report.values()):
        return {"error": f"unexpected ptxas report: {log.getvalue()[-2000:]}"}
    return {"shared": compiled.metadata.shared, "num_warps": compiled.metadata.num_warps,
            **{k: v[0] for k, v in report.items()}}


def check(job: Job, result: dict) -> list[str]:
    """The limits a result breaks (empty: it compiles and fits)."""
    if "error" in result:
        return [f"compile error: {result['error']}"]
    problems = []
    if result["shared"] > SHARED_LIMIT[job.arch]:
        problems.append(f"shared memory {result['shared']} B > {SHARED_LIMIT[job.arch]} B")
    spilled = result["spill_stores"] + result["spill_loads"]
    configs, _ = ACCEPTED_SPILLS.get((job.kernel, job.head_dim, job.arch), ((), ""))
    if spilled and not (job.dtype != "fp32" and job.config in configs and spilled <= ACCEPTED_SPILL_BYTES):
        problems.append(f"spills {result['spill_stores']} B stored, {result['spill_loads']} B loaded")
    return problems


# --------------------------------------------------------------------------------------------------
# worker processes


def ptxas_available() -> Optional[str]:
    """None if triton and its bundled ptxas are here, else why not."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        paths = [get_ptxas(arch).path for arch in TARGETS]
    except Exception as e:  # noqa: BLE001  (no triton, no nvidia backend, or no ptxas binary)
        return f"triton's nvidia backend or its ptxas is unavailable: {type(e).__name__}: {e}"
    bad = [p for p in paths if not (p and os.access(p, os.X_OK))]
    return f"ptxas not executable: {bad}" if bad else None


def compile_jobs(jobs: list[Job], processes: int = 2, on_result=None,
                 timeout: Optional[float] = None) -> dict[str, dict]:
    """job id -> compile_job's result, from `processes` worker processes (no TRITON_INTERPRET, a fresh
    cache); on_result(job, result) is called as each one arrives. A compile still running after `timeout`
    seconds (a worker's start counts towards its first) is stopped and reported as an error."""
    todo: queue.Queue = queue.Queue()
    for job in jobs:
        todo.put(job)
    results: dict[str, dict] = {}
    errors: list[str] = []
    lock = threading.Lock()
    cache = tempfile.mkdtemp(prefix="quietstar-aot-")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # TRITON_DEFAULT_FP_FUSION=1 is Triton 3.9's default (fused multiply-add on), set to silence its warning
    env.update(TRITON_CACHE_DIR=cache, TRITON_DEFAULT_FP_FUSION=env.get("TRITON_DEFAULT_FP_FUSION", "1"))

    def start(log):
        return subprocess.Popen([sys.executable, "-m", "quietstar.kernels.aot"], env=env, text=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)

    def serve():
        with tempfile.TemporaryFile("w+") as log:
            worker = start(log)
            try:
                while not errors:
                    try:
                        job = todo.get_nowait()
                    except queue.Empty:
                        break
                    worker.stdin.write(json.dumps(job.__dict__) + "\n")
                    worker.stdin.flush()
                    if timeout is not None and not select.select([worker.stdout], [], [], timeout)[0]:
                        worker.kill()
                        worker.wait()
                        result = {"error": f"compile still running after {timeout:.0f} s (stopped)"}
                        worker = start(log)
                    else:
                        line = worker.stdout.readline()
                        if not line:
                            log.seek(0)
                            errors.append(f"worker exited (code {worker.wait()}) at {job.id}: {log.read()[-3000:]}")
                            return
                        result = json.loads(line)
                    with lock:
                        results[job.id] = result
                        if on_result is not None:
                            on_result(job, result)
            finally:
                worker.stdin.close()
                worker.wait()

    try:
        threads = [threading.Thread(target=serve) for _ in range(max(1, min(processes, len(jobs))))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    if errors:
        raise RuntimeError("; ".join(errors))
    return results


def _worker() -> None:
    """Read jobs (JSON lines) on stdin, answer compile_job's results (JSON lines) on stdout."""
    reply = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything else written to stdout (by triton or ptxas) must not reach the replies
    for line in sys.stdin:
        job = Job(**json.loads(line))
        launch, config = _find(job)
        reply.write(json.dumps(compile_job(job, launch, config)) + "\n")
        reply.flush()


if __name__ == "__main__":
    _worker()
