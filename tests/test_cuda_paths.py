"""The library's CUDA-only branches, reached on CPU: torch.cuda and torch.distributed replaced by fakes that
record what they are asked, or tensors faked on a CUDA device (FakeTensorMode: shapes and devices, no data).
Each test asserts what the branch decides: the process-group backend, the device, the RNG state written and
handed back, the memory budget, the launch. What no fake reaches is listed in docs/testing.md ("What has
never run"); the `gpu` tests at the end run only with CUDA.
"""

import math
import types
from collections import OrderedDict

import pytest
import torch
import torch.distributed as tdist
import torch.distributed.device_mesh
import torch.distributed.fsdp
import torch.nn as nn
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

from quietstar import attention, fused, linear_ce, provenance
from quietstar.methods.quietstar import where
from quietstar import dist as qdist
from quietstar.checkpoint import load_checkpoint
from quietstar.config import ConfigError, DistConfig, check_device_dtype
from quietstar.methods.registry import TrainConfig
from quietstar.tokenizer import ByteTokenizer
from quietstar.memory import AUTO_BUDGET_FRACTION, auto_budget, device_memory_bytes
from quietstar.model import ModelConfig, Transformer
from quietstar.optim import autocast_context, resolve_precision
from quietstar.methods.quietstar.thinker import QuietStar
from quietstar.methods.quietstar.config import ThoughtConfig

GPU = torch.device("cuda", 1)
FAKE = FakeTensorMode()  # one mode for every fake tensor: they cannot be mixed across modes


@pytest.fixture
def has_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def on_gpu(*shape, dtype=torch.float32):
    """A fake tensor on cuda:0: shape, dtype and device, no data."""
    with FAKE:
        return torch.empty(*shape, dtype=dtype, device="cuda")


# --------------------------------------------------------------------------------------------------
# dist.py: device by LOCAL_RANK, nccl on GPU


def test_device_follows_the_local_rank(monkeypatch, has_cuda):
    assert qdist.resolve_device("auto", 3) == torch.device("cuda", 3)
    assert qdist.resolve_device("cuda", 2) == torch.device("cuda", 2)
    assert qdist.resolve_device("cuda:1", 5) == torch.device("cuda", 1)  # an explicit index wins
    assert qdist.resolve_device("cpu", 2) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert qdist.resolve_device("auto", 3) == torch.device("cpu")
    with pytest.raises(ValueError, match="CUDA is not available"):
        qdist.resolve_device("cuda", 0)


@pytest.fixture
def fake_group(monkeypatch):
    """torch.distributed's init_process_group and torch.cuda.set_device, recording their arguments."""
    calls = {}
    monkeypatch.setattr(tdist, "is_initialized", lambda: "init" in calls)
    monkeypatch.setattr(tdist, "init_process_group", lambda **kw: calls.setdefault("init", kw))
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.setdefault("set_device", torch.device(d)))
    for name, value in dict(RANK="5", WORLD_SIZE="8", LOCAL_RANK="1").items():
        monkeypatch.setenv(name, value)
    return calls


@pytest.mark.parametrize("cuda,backend,device,want", [
    (True, "auto", "auto", "nccl"),
    (True, "gloo", "auto", "gloo"),  # dist.backend=gloo on a GPU: still this rank's GPU
    (True, "auto", "cpu", "gloo"),  # train.device=cpu on a GPU machine
    (False, "auto", "auto", "gloo"),
])
def test_process_group_backend_and_device(monkeypatch, fake_group, cuda, backend, device, want):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    cfg = DistConfig(kind="ddp", backend=backend, timeout_s=77)
    info = qdist.setup(cfg, device)
    gpu = cuda and device == "auto"
    local = torch.device("cuda", 1) if gpu else torch.device("cpu")  # LOCAL_RANK = 1
    assert (info.rank, info.world_size, info.local_rank, info.device) == (5, 8, 1, local)
    init = fake_group["init"]
    assert init["backend"] == want and init["timeout"].total_seconds() == 77
    assert init["device_id"] == (local if gpu else None)
    assert fake_group.get("set_device") == (local if gpu else None)


def test_collectives_run_on_the_gpu_under_nccl(monkeypatch):
    info = qdist.DistInfo("ddp", 0, 2, 1, GPU)
    monkeypatch.setattr(tdist, "get_backend", lambda: "nccl")
    assert info._comm_device() == GPU
    monkeypatch.setattr(tdist, "get_backend", lambda: "gloo")
    assert info._comm_device() == torch.device("cpu")


def test_ddp_and_fsdp_are_placed_on_the_gpu(monkeypatch):
    qs = nn.Module()
    qs.model = nn.Module()
    qs.model.layers = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])
    # buffers are constants and the EMA teacher, equal on every rank: not broadcast at each forward
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel",
                        lambda m, device_ids, broadcast_buffers: ("ddp", m, device_ids, broadcast_buffers))
    assert qdist.wrap(qs, qdist.DistInfo("ddp", device=GPU), DistConfig()) == ("ddp", qs, [1], False)
    assert qdist.wrap(qs, qdist.DistInfo("ddp"), DistConfig()) == ("ddp", qs, None, False)
    meshes, sharded = [], []
    monkeypatch.setattr(torch.distributed.device_mesh, "init_device_mesh",
                        lambda kind, shape: meshes.append((kind, shape)) or "mesh")
    monkeypatch.setattr(torch.distributed.fsdp, "fully_shard",
                        lambda m, mesh, reshard_after_forward: sharded.append((m, mesh, reshard_after_forward)))
    info = qdist.DistInfo("fsdp", 0, 4, 1, GPU)
    assert qdist.wrap(qs, info, DistConfig(kind="fsdp", reshard_after_forward=False)) is qs
    assert meshes == [("cuda", (4,))]
    assert sharded == [(qs.model.layers[0], "mesh", False), (qs.model.layers[1], "mesh", False), (qs, "mesh", False)]


# --------------------------------------------------------------------------------------------------
# checkpoint.py: the CUDA RNG states


def test_cuda_rng_states_are_saved_and_handed_back(monkeypatch, tmp_path):
    from test_checkpoint import make, save

    parts = make()
    g = torch.Generator().manual_seed(0)
    states = [torch.randint(0, 256, (16,), dtype=torch.uint8, generator=g) for _ in range(2)]  # two GPUs
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [s.clone() for s in states])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda got: restored.append(got))
    path = save(tmp_path, 1, parts)
    written = torch.load(path / "rng_rank0.pt", weights_only=True)["cuda"]
    assert len(written) == 2 and all(torch.equal(a, b) for a, b in zip(written, states))

    load_checkpoint(path, *make(seed=3)[:4])
    assert len(restored) == 1 and all(torch.equal(a, b) for a, b in zip(restored[0], states))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # resumed on a machine without a GPU
    load_checkpoint(path, *make(seed=3)[:4])
    assert len(restored) == 1


# --------------------------------------------------------------------------------------------------
# memory.py: the memory budget from the GPU's memory


def test_memory_budget_comes_from_the_gpus_memory(monkeypatch, capsys):
    asked, total = [], [80 * 2**30]
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda d: asked.append(torch.device(d)) or types.SimpleNamespace(total_memory=total[0]))
    assert device_memory_bytes(GPU) == total[0] and asked == [GPU]
    budget, text = auto_budget(GPU)
    assert budget == int(AUTO_BUDGET_FRACTION["cuda"] * total[0]) and "80.0 GB GPU memory" in text

    x = on_gpu(2, 4096, ModelConfig.from_preset("tiny").dim)

    def plan(total_bytes):
        total[0] = total_bytes
        model = Transformer(ModelConfig.from_preset("tiny", n_layers=3))
        layers = model.checkpointed_layers(x, lambda *a: None)
        return layers, capsys.readouterr().out

    layers, message = plan(80 * 2**30)
    assert layers == 0 and "no activation checkpointing" in message and "GPU memory" in message
    layers, message = plan(2**20)  # a 1 MiB GPU: the plan checkpoints every block it may
    assert layers == 2 and "over budget" in message and "0.0 GB GPU memory" in message


# --------------------------------------------------------------------------------------------------
# thinker.py: the padding check stays on the device


def test_mask_check_is_a_device_assert_on_the_gpu(monkeypatch):
    qs = QuietStar(Transformer(ModelConfig.from_preset("tiny", n_layers=1)), ByteTokenizer(),
                   ThoughtConfig(n_ahead=4, n_ahead_talk=2))
    ids, mask = torch.zeros(2, 6, dtype=torch.long), torch.ones(2, 6, dtype=torch.long)
    mask[1] = 0
    with pytest.raises(ValueError, match="at least one real token"):  # on CPU: read on the host at once
        qs._check_input(ids, mask)
    asserts = []
    monkeypatch.setattr(torch, "_assert_async", lambda cond, msg: asserts.append((cond, msg)))
    with FAKE:  # a host read of a value (bool, .item()) raises here
        with pytest.raises(DataDependentOutputException):
            qs._check_input(torch.zeros(2, 6, dtype=torch.long), torch.ones(2, 6, dtype=torch.long))
        lengths = qs._check_input(torch.zeros(2, 6, dtype=torch.long, device="cuda"),
                                  torch.ones(2, 6, dtype=torch.long, device="cuda"))
    assert lengths.device.type == "cuda" and lengths.shape == (2,)
    (cond, msg), = asserts
    assert cond.device.type == "cuda" and cond.shape == () and cond.dtype == torch.bool
    assert "at least one real token" in msg


# --------------------------------------------------------------------------------------------------
# defaults that depend on the device


@pytest.mark.filterwarnings("ignore:CUDA is not available")
def test_gpu_defaults(monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    with attention.use_backend("auto"):
        assert attention.resolve_backend(cuda) == "triton" and attention.resolve_backend(cpu) == "split"
        assert attention.resolve_backend(cuda, torch.bfloat16) == attention.resolve_backend(cuda, torch.float16) \
            == "triton"
        assert attention.resolve_backend(cuda, torch.float32) == "split"  # the kernel's fp32 tiles do not fit
    with attention.use_backend("flex"):
        assert attention.resolve_backend(cuda) == "flex"
        with pytest.raises(RuntimeError, match="needs a CUDA device"):
            attention.resolve_backend(cpu)
    assert resolve_precision(cuda, "auto") == "bf16" and resolve_precision(cpu, "auto") == "fp32"
    ctx = autocast_context(cuda, "bf16")
    assert isinstance(ctx, torch.autocast) and ctx.device == "cuda" and ctx.fast_dtype == torch.bfloat16  # disabled here
    cfg = TrainConfig()
    cfg.model.dtype = "bfloat16"
    check_device_dtype(cfg, cuda)  # bf16 master weights: a GPU only
    with pytest.raises(ConfigError, match="not supported on CPU"):
        check_device_dtype(cfg, cpu)
    from quietstar.methods.quietstar.report import recipe_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert recipe_device(TrainConfig()) == "cuda"


def test_machine_record_names_the_gpu(monkeypatch, has_cuda):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU 80GB")
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    info = provenance.machine()
    assert info["gpu"] == "Fake GPU 80GB" and info["cuda"] == "12.8"


def test_vocabulary_and_row_passes_are_one_block_off_cpu(monkeypatch):
    """The CPU's cache-sized blocks (linear_ce.VOCAB_BLOCK, where.ENTROPY_BLOCK_BYTES, fused.SWIGLU_BLOCK_BYTES)
    become one call on any other device. The meta device reaches these branches (a fake CUDA tensor cannot be
    sliced by a CPU-only build)."""
    calls = {"mm": 0, "logsumexp": 0}

    def counting(name, fn):
        def wrapped(*a, **kw):
            calls[name] += 1
            return fn(*a, **kw)
        return wrapped

    monkeypatch.setattr(torch, "mm", counting("mm", torch.mm))
    monkeypatch.setattr(torch, "logsumexp", counting("logsumexp", torch.logsumexp))
    V, block = 3000, linear_ce.VOCAB_BLOCK["cpu"]
    h, w = torch.randn(5, 8), torch.randn(V, 8)
    linear_ce.logits_into(h, w, torch.empty(5, V))
    assert calls["mm"] == math.ceil(V / block)
    calls["mm"] = 0
    meta = lambda *shape: torch.empty(*shape, device="meta")
    linear_ce.logits_into(meta(5, 8), meta(V, 8), meta(5, V))
    assert calls["mm"] == 1
    rows = 4 * where.ENTROPY_BLOCK_BYTES // (4 * V)  # four CPU blocks of rows
    where.row_entropy(meta(rows, V))
    assert calls["logsumexp"] == 1
    I = 4096
    assert fused._block_rows(10**5, I, torch.device("cuda")) == 10**5 > fused._block_rows(10**5, I, torch.device("cpu"))
    assert linear_ce.chunk_rows(torch.device("cuda"), V) > linear_ce.chunk_rows(torch.device("cpu"), V)


# --------------------------------------------------------------------------------------------------
# flex.py and the Triton kernel's host side


def test_flex_block_mask_is_built_compiled_on_the_gpu(monkeypatch):
    flex = pytest.importorskip("quietstar.flex", reason="torch.nn.attention.flex_attention is unavailable")
    built = []
    monkeypatch.setattr(flex, "_BLOCK_MASKS", OrderedDict())
    monkeypatch.setattr(flex, "_create_block_mask_compiled",
                        lambda mask_mod, B, H, Q, KV, device: built.append((B, H, Q, KV, device)) or "compiled")
    L, n, S = 23, 2, 3
    N = L * (1 + n * (S - 1))
    assert flex.grid_block_mask(L, n, S, 2, device="cuda") == "compiled"
    assert flex.grid_block_mask(L, n, S, 4, device="cuda") == "compiled"  # cached: no per-sequence input
    assert built == [(None, None, N, N, torch.device("cuda"))]
    assert isinstance(flex.grid_block_mask(L, n, S, 2, device="cpu"), flex.BlockMask) and len(built) == 1


def test_kernel_launch_choices_on_the_gpu(monkeypatch):
    ta = pytest.importorskip("quietstar.kernels.thought_attention")
    n_sm = [132]
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda d: types.SimpleNamespace(multi_processor_count=n_sm[0]))
    monkeypatch.setattr(ta, "INTERPRET", False)  # as on a GPU: autotuned tiles, nothing fixed
    monkeypatch.setattr(ta, "_fixed", {})

    # dk/dv of the text row: enough programs per key tile for about two waves, at most 16 and GROUP * R
    def nsplit(B, G, L, GROUP, R, device=GPU):
        k = ta._dkdv_nsplit(device, B, G, L, GROUP, R)
        base = math.ceil(L / 64) * B * G  # key tiles
        cap = min(16, GROUP * R)
        assert 1 <= k <= cap
        assert k * base >= 2 * n_sm[0] or k == cap  # two waves, or as many as allowed
        assert k == 1 or (k - 1) * base < 2 * n_sm[0]  # and no more than that
        return k

    assert nsplit(1, 1, 256, 4, 7) == 16  # 4 key tiles: capped at 16
    assert nsplit(1, 2, 256, 1, 3) == 3  # GROUP * R = 3
    assert nsplit(8, 8, 4096, 4, 7) == 1  # 4096 key tiles already fill the GPU
    mid = nsplit(2, 2, 512, 4, 7)
    n_sm[0] = 16
    assert nsplit(2, 2, 512, 4, 7) < mid  # fewer SMs, fewer splits
    assert ta._dkdv_nsplit(torch.device("cpu"), 1, 1, 256, 4, 7) == 1

    launched = []

    class Kernel:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *a, **kw: launched.append((self.name, grid, a, kw))

    ta._launch("dkdv", Kernel("jit"), Kernel("tuned"), (3,), 1, X=2)
    assert launched == [("tuned", (3,), (1,), {"X": 2})]
    with ta.fixed_tiles(dkdv=dict(BLOCK_N=32, BLOCK_R=1, BLOCK_P=16, nsplit=3)):
        ta._launch("dkdv", Kernel("jit"), Kernel("tuned"), (3,), 1, X=2)
    assert launched[1] == ("jit", (3,), (1,), {"X": 2, "BLOCK_N": 32, "BLOCK_R": 1, "BLOCK_P": 16})
    on = ta._on_device(on_gpu(1))
    assert isinstance(on, torch.cuda.device) and on.idx == 0


# --------------------------------------------------------------------------------------------------
# with CUDA only


@pytest.mark.gpu
def test_cuda_rng_round_trip_on_the_gpu():
    """capture_rng / restore_rng with the real CUDA generator: the draws after a restore repeat."""
    from quietstar.checkpoint import capture_rng, restore_rng

    state = capture_rng()
    assert len(state["cuda"]) == torch.cuda.device_count()
    a = torch.rand(8, device="cuda")
    restore_rng(state)
    assert torch.equal(torch.rand(8, device="cuda"), a)


@pytest.mark.gpu
def test_experiment_gpu_trains_in_bf16(tmp_path, monkeypatch):
    """experiment=gpu for three steps through train(): cuda, bf16 autocast, the triton backend, finite losses
    and a checkpoint. SmolLM2's weights where its GGUF is installed, else its architecture at random init.
    GPU-only: the experiment sets train.device=cuda."""
    from omegaconf import OmegaConf

    from conftest import smollm2_gguf_path
    from test_train import compose_node

    from quietstar import train as train_script
    from quietstar.checkpoint import verify_checkpoint

    overrides = ["experiment=gpu", "logger=none", "train.max_steps=3", "train.progress=false"]
    node = compose_node(overrides + ([] if smollm2_gguf_path() else ["model.name=null"]))
    node.output_dir = str(tmp_path)
    backends, autocast = [], []
    real_resolve, real_autocast = attention.resolve_backend, train_script.autocast_context
    monkeypatch.setattr(attention, "resolve_backend",
                        lambda device, dtype=None: backends.append(real_resolve(device, dtype)) or backends[-1])

    def recording(device, precision):
        ctx = real_autocast(device, precision)
        autocast.append((device.type, getattr(ctx, "fast_dtype", None)))
        return ctx

    monkeypatch.setattr(train_script, "autocast_context", recording)
    result = train_script.train(OmegaConf.to_object(node))
    assert result.status == "done" and result.step == 3 and all(math.isfinite(x) for x in result.losses)
    assert len(autocast) >= 3 and set(autocast) == {("cuda", torch.bfloat16)}
    assert backends and set(backends) == {"triton"}
    verify_checkpoint(result.checkpoint)


def test_the_triton_kernel_refuses_fp32_on_cuda():
    """Compiled, the kernel's fp32 tiles exceed sm_80's shared memory and spill (kernels/aot.py): on CUDA it
    takes fp16/bf16 only, with one clear error for fp32, before anything is launched."""
    from quietstar.kernels.thought_attention import subset_thought_attention, thought_attention

    q, k = on_gpu(1, 2, 3, 16, 16), on_gpu(1, 1, 3, 16, 16)
    with pytest.raises(ValueError, match="fp16/bf16 on CUDA"):
        thought_attention(q, k, k, 2)
    qs, ks = on_gpu(1, 2, 16 + 2 * 4, 16), on_gpu(1, 1, 16 + 2 * 4, 16)
    with pytest.raises(ValueError, match="fp16/bf16 on CUDA"):
        subset_thought_attention(qs, ks, ks, 2, 2, torch.arange(4)[None])
