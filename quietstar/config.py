"""The training configuration schema: typed, nested dataclasses; Hydra's YAML under configs/ mirrors them.

This module holds the sections every run has and knows no thinking method. The root class a run reads,
`TrainConfig`, is composed by the method registry (quietstar/methods/registry.py): `train_schema(METHODS)` adds
each method's own sections (`thought`, `distill`, `explicit`, ...) to `RunConfig`'s. It is registered in Hydra's
ConfigStore as `base_config`, so `configs/train.yaml` starts `defaults: [base_config, model: ..., thought: ...,
...]` and every YAML value is type-checked against these fields. train.py turns the composed DictConfig into a
`TrainConfig` with `OmegaConf.to_object`, which runs every `__post_init__`: a bad value raises `ConfigError` (a
ValueError) naming its field. Nothing past train.py ever sees a DictConfig.

Sections of every run (each a config group under configs/):
  model       ModelSpec      which base model: pretrained weights (`name`) or a random-init preset (`preset`)
  data        DataConfig     corpus, sequence length, cropping or packing, batch size
  optim       OptimConfig    AdamW, parameter groups, LR schedule, accumulation, clipping
  train       LoopConfig     steps, seed, device, precision, compile, progress
  checkpoint  CheckpointConfig
  logger      LoggerConfig   wandb (offline by default) or none; metrics.jsonl always
  dist        DistConfig     none | ddp | fsdp (under torchrun)
  attention   AttentionConfig  the thought-grid attention backend
  health      HealthConfig   divergence detection: a loss spike, a frozen loss or zero gradient
The methods' sections (quietstar/methods/): thought (Quiet-STaR; the plain LM is thought.enabled=false),
distill, explicit, learn_to_think, policy_math_web.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

from quietstar.errors import ConfigError
from quietstar.model import PRESETS, ModelConfig
from quietstar.reasoning import ReasoningConfig

__all__ = ["ModelSpec", "DataConfig", "OptimConfig", "LoopConfig", "CheckpointConfig", "LoggerConfig", "DistConfig",
           "AttentionConfig", "HealthConfig", "RunConfig", "Method", "train_schema",
           "build_config", "load_config", "check_device_dtype", "config_to_dict"]


def _one_of(section: str, name: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{section}.{name} must be one of {tuple(allowed)}, got {value!r}")


def check_positive(section: str, name: str, value, allow_zero: bool = False) -> None:
    """value > 0 (>= 0 with allow_zero); NaN and None fail both."""
    if value is None or not (value > 0 or (allow_zero and value == 0)):
        raise ConfigError(f"{section}.{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def _in_range(section: str, name: str, value, lo: float, hi: float) -> None:
    if not lo <= value <= hi:  # False for NaN
        raise ConfigError(f"{section}.{name} must be in [{lo}, {hi}], got {value!r}")


def _check_finite(section: str, obj) -> None:
    """Every float field of a config dataclass is a finite number: NaN and inf name their field."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{section}.{f.name} must be a finite number, got {value!r}")
        if dataclasses.is_dataclass(value):
            _check_finite(f"{section}.{f.name}", value)


DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class ModelSpec:
    """Which base model to train. Either `name` (pretrained weights) or `preset` (random init).

    The architecture fields mirror `model.ModelConfig` one for one; `None` keeps the preset's value. They
    apply to a random-init preset only: a pretrained model's architecture comes from its file.
    """

    name: Optional[str] = None
    """Pretrained weights: "smollm2-135m" (the packaged GGUF), a .gguf file, or an HF model dir
    (config.json + safetensors). None = random init from `preset`."""
    preset: str = "tiny"
    """A ModelConfig preset (model.py PRESETS: tiny, bench_small, smollm2_135m, llama_1b, mistral_7b) for random
    init; its text is byte-tokenized (tokenizer.ByteTokenizer). Ignored when `name` is set."""
    dtype: str = "float32"
    """Parameter (master weight) dtype: float32 | bfloat16 | float16. On GPU, float32 weights run under
    bf16 autocast (train.precision)."""
    grad_checkpointing: str = "auto"
    """Recompute blocks in backward instead of keeping their activations (less memory, up to ~30% more
    compute): true (every block) | false | auto (the fewest first blocks that fit the step's estimated
    activation memory into train.memory_budget_gb; memory.checkpoint_plan, which prints its choice)."""

    # ---- ModelConfig fields (None = the preset's value) ----
    vocab_size: Optional[int] = None  # rows of the embedding / outputs of the LM head (>= 256 for bytes)
    dim: Optional[int] = None  # model width d
    n_layers: Optional[int] = None  # transformer blocks
    n_heads: Optional[int] = None  # query heads H
    n_kv_heads: Optional[int] = None  # key/value heads G (GQA)
    head_dim: Optional[int] = None  # D (default dim // n_heads)
    intermediate_size: Optional[int] = None  # SwiGLU width
    norm_eps: Optional[float] = None  # RMSNorm epsilon
    rope_theta: Optional[float] = None  # RoPE base
    rope_scaling: Optional[Dict[str, Any]] = None  # llama3 RoPE scaling parameters
    max_seq_len: Optional[int] = None  # longest position the model is meant for
    tie_embeddings: Optional[bool] = None  # LM head shares the embedding matrix
    qkv_bias: Optional[bool] = None  # Qwen2-style q/k/v bias
    sliding_window: Optional[int] = None  # Mistral sliding-window size
    arch: Optional[str] = None  # llama | mistral | qwen2 (used by the HF exporter)

    def __post_init__(self):
        _one_of("model", "dtype", self.dtype, DTYPES)
        # YAML / the command line give true and false as booleans: keep one spelling of the three values
        self.grad_checkpointing = str(self.grad_checkpointing).lower()
        _one_of("model", "grad_checkpointing", self.grad_checkpointing, ("auto", "true", "false"))
        _check_finite("model", self)
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "intermediate_size",
                     "norm_eps", "rope_theta", "max_seq_len", "sliding_window"):
            if getattr(self, name) is not None:
                check_positive("model", name, getattr(self, name))
        if self.name is None:
            _one_of("model", "preset", self.preset, sorted(PRESETS))
            try:
                cfg = self.architecture()
            except ValueError as e:  # ModelConfig names the field; say which section it is in
                raise ConfigError(f"model: {e}") from None
            if cfg.vocab_size < 256:
                raise ConfigError(f"model.vocab_size must be >= 256 for a byte-tokenized random-init model, "
                                 f"got {cfg.vocab_size}")
        elif not str(self.name).strip():
            raise ConfigError("model.name must be a model name or path, or null")

    def overrides(self) -> dict:
        """The ModelConfig fields set here (not None)."""
        names = {f.name for f in dataclasses.fields(ModelConfig)}
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}

    def architecture(self) -> ModelConfig:
        """The ModelConfig of a random-init preset with this spec's overrides."""
        return ModelConfig.from_preset(self.preset, **self.overrides())


@dataclass
class DataConfig:
    source: str = "synthetic"
    """synthetic (the embedded math corpus, data.synthetic_math) | reasoning (puzzles whose answers need
    serial steps, quietstar/reasoning.py) | jsonl (.jsonl / .jsonl.gz: a file or a
    folder of them) | parquet (a file or folder) | text (a folder of .txt files, or one file) | hf (HF
    `datasets` streaming by name; needs a network)."""
    path: Optional[str] = None
    """File or folder for jsonl / parquet / text (relative to the launch directory); dataset name for hf."""
    text_field: str = "text"  # the record field holding the document (OpenWebMath layout: "text")
    hf_config: Optional[str] = None  # hf: dataset config name
    hf_split: str = "train"  # hf: split to stream
    max_docs: Optional[int] = None  # use only the first N documents of the source (None = all)
    synthetic_docs: int = 4000  # synthetic: documents generated (deterministic given train.seed)
    seq_len: int = 96  # L: tokens per training sequence, BOS included
    mode: str = "crop"
    """crop (the official code: each sequence is BOS + one document, a random seq_len window of longer
    ones, right-padded with pad id) | pack (documents concatenated, doc_ids keep attention in-document)."""
    batch_size: int = 2
    """Unique sequences per micro-batch per process (each is thought about n_thoughts times). The
    global batch is batch_size * optim.grad_accum * world size."""
    shuffle: bool = True  # document order is a permutation per epoch, seeded by train.seed
    reasoning: ReasoningConfig = field(default_factory=ReasoningConfig)
    """reasoning: the puzzle families and their knobs (quietstar/reasoning.py); synthetic_docs documents."""

    def __post_init__(self):
        _one_of("data", "source", self.source, ("synthetic", "reasoning", "jsonl", "parquet", "text", "hf"))
        _one_of("data", "mode", self.mode, ("crop", "pack"))
        if self.source not in ("synthetic", "reasoning") and not self.path:
            raise ConfigError(f"data.path is required for data.source={self.source!r}")
        if self.seq_len < 4:
            raise ConfigError(f"data.seq_len must be >= 4, got {self.seq_len}")
        check_positive("data", "batch_size", self.batch_size)
        check_positive("data", "synthetic_docs", self.synthetic_docs)
        if self.max_docs is not None:
            check_positive("data", "max_docs", self.max_docs)
        if not self.text_field:
            raise ConfigError("data.text_field must be a field name")


@dataclass
class OptimConfig:
    lr: float = 1e-5  # peak learning rate
    weight_decay: float = 0.001  # decoupled (AdamW) decay of matrices; norms and biases get none
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    fused: Optional[bool] = None  # fused AdamW kernel; None = when all parameters are on the CPU or all on a GPU
    base_lr_mult: float = 1.0  # LR multiplier of the base model (0 freezes it)
    thought_embedding_lr_mult: float = 1.0
    """LR multiplier of <start>/<end> embeddings, on top of the x thought.embedding_scale
    parameterisation (the official code's effective 100x; set embedding_scale=1 and this =100 for
    the same effect made explicit)."""
    thought_embedding_weight_decay: Optional[float] = None  # None = weight_decay (the official code)
    talk_head_lr_mult: float = 1.0  # LR multiplier of the mixing (talk) head
    schedule: str = "constant"  # after warmup: constant | cosine | linear (decay to min_lr_ratio * lr at max_steps)
    warmup_steps: int = 5  # linear warmup from 0 over this many optimizer steps (official: 20)
    min_lr_ratio: float = 0.1  # cosine/linear: final LR as a fraction of lr
    grad_clip: float = 1.0  # max global grad norm (0 = no clipping; official 1.0)
    grad_accum: int = 1  # micro-batches per optimizer step

    def __post_init__(self):
        _one_of("optim", "schedule", self.schedule, ("constant", "cosine", "linear"))
        check_positive("optim", "lr", self.lr)
        check_positive("optim", "grad_accum", self.grad_accum)
        for name in ("weight_decay", "warmup_steps", "grad_clip", "base_lr_mult", "thought_embedding_lr_mult",
                     "talk_head_lr_mult", "eps"):
            check_positive("optim", name, getattr(self, name), allow_zero=True)
        for name in ("beta1", "beta2", "min_lr_ratio"):
            _in_range("optim", name, getattr(self, name), 0.0, 1.0)
        if self.thought_embedding_weight_decay is not None:
            check_positive("optim", "thought_embedding_weight_decay", self.thought_embedding_weight_decay, True)


@dataclass
class LoopConfig:
    max_steps: int = 30  # optimizer steps in total (a resumed run continues up to this)
    seed: int = 42  # seeds the model init, the data order and crops, and thought sampling
    device: str = "auto"  # auto (cuda if available, else cpu) | cpu | cuda | cuda:N
    # auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | bf16 (autocast on GPU or CPU; fp32 master weights)
    precision: str = "auto"
    compile: bool = False  # torch.compile each transformer block (GPU; checkpoints keep plain keys)
    log_every: int = 1  # write metrics (jsonl, wandb) every N steps
    progress: bool = True  # print a progress bar with loss, reward, mix weight and tok/s
    threads: Optional[int] = None  # torch CPU threads (None = torch's default)
    memory_budget_gb: Optional[float] = None
    """GB a step may use, for model.grad_checkpointing=auto. None = memory.AUTO_BUDGET_FRACTION of the
    device's memory (80% of a GPU's, 50% of the machine's RAM)."""
    sample_position: int = -1  # the end-of-run summary decodes the thought after this position (-1 = middle)
    record_samples: bool = False
    """Write <output dir>/samples.jsonl: per step, the ids (epoch.position.offset of the data cursor) of the
    rows each process consumed, to check that a resumed run skips and repeats none."""

    def __post_init__(self):
        check_positive("train", "max_steps", self.max_steps)
        check_positive("train", "log_every", self.log_every)
        _one_of("train", "precision", self.precision, ("auto", "fp32", "bf16"))
        if not (self.device in ("auto", "cpu", "cuda", "mps") or self.device.startswith("cuda:")):
            raise ConfigError(f"train.device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        if self.threads is not None:
            check_positive("train", "threads", self.threads)
        if self.memory_budget_gb is not None:
            check_positive("train", "memory_budget_gb", self.memory_budget_gb)
        check_positive("train", "seed", self.seed, allow_zero=True)
        if self.seed > 2**63 - 1:  # every derived seed fits torch's and numpy's generators (quietstar/seeds.py)
            raise ConfigError(f"train.seed must be at most 2**63 - 1 = {2**63 - 1}, got {self.seed}")
        if self.sample_position < -1:
            raise ConfigError(f"train.sample_position must be >= -1 (-1 = the middle), got {self.sample_position}")


@dataclass
class CheckpointConfig:
    every: int = 0  # save every N optimizer steps (0 = only at the end)
    keep_last: int = 2  # keep this many newest checkpoints (0 = keep all)
    save_final: bool = True  # save after the last step
    save_optimizer: bool = True  # include optimizer state (needed to resume exactly)
    verify_hashes: bool = True  # record sha256 of every file and check it on load

    def __post_init__(self):
        check_positive("checkpoint", "every", self.every, allow_zero=True)
        check_positive("checkpoint", "keep_last", self.keep_last, allow_zero=True)


@dataclass
class HealthConfig:
    """When a run has gone bad (quietstar/health.py). A non-finite loss, gradient or weight always stops
    the run; these settings catch the runs that stay finite but stop learning or blow up."""

    on_divergence: str = "stop"
    """stop (end the run, keep the checkpoints written before it went bad) | warn (print and go on)."""
    spike_factor: float = 4.0  # diverged: train/nll above this times the median of the last `window` steps
    window: int = 8  # steps of history for the median
    min_history: int = 3  # steps seen before a spike can be called
    frozen_steps: int = 3  # diverged: this many steps in a row with a zero gradient or an unchanged loss
    frozen_rtol: float = 1e-7  # a loss is unchanged when it moves by less than this fraction of itself

    def __post_init__(self):
        _one_of("health", "on_divergence", self.on_divergence, ("stop", "warn"))
        if not self.spike_factor > 1:
            raise ConfigError(f"health.spike_factor must be > 1, got {self.spike_factor!r}")
        for name in ("window", "min_history", "frozen_steps"):
            check_positive("health", name, getattr(self, name))
        check_positive("health", "frozen_rtol", self.frozen_rtol, allow_zero=True)


@dataclass
class LoggerConfig:
    backend: str = "wandb"  # wandb | none (metrics.jsonl is written either way)
    mode: str = "offline"  # wandb mode: offline (default: no network) | online | disabled
    project: str = "quietstar"
    entity: Optional[str] = None
    run_name: Optional[str] = None  # None = wandb's generated name
    group: Optional[str] = None  # e.g. a sweep name
    tags: List[str] = field(default_factory=list)

    def __post_init__(self):
        _one_of("logger", "backend", self.backend, ("wandb", "none"))
        _one_of("logger", "mode", self.mode, ("offline", "online", "disabled"))


@dataclass
class DistConfig:
    kind: str = "none"  # none | ddp | fsdp (FSDP2 fully_shard); launch with torchrun for ddp/fsdp
    backend: str = "auto"  # process-group backend: auto (nccl on GPU, gloo on CPU) | nccl | gloo
    reshard_after_forward: bool = True  # fsdp: free gathered parameters after forward (ZeRO-3)
    timeout_s: int = 1800  # collective timeout

    def __post_init__(self):
        _one_of("dist", "kind", self.kind, ("none", "ddp", "fsdp"))
        _one_of("dist", "backend", self.backend, ("auto", "nccl", "gloo"))
        check_positive("dist", "timeout_s", self.timeout_s)


@dataclass
class AttentionConfig:
    backend: str = "auto"  # thought-grid attention: auto (triton on GPU, split on CPU) | dense | split | flex | triton

    def __post_init__(self):
        _one_of("attention", "backend", self.backend, ("auto", "dense", "split", "flex", "triton"))


@dataclass
class RunConfig:
    """The sections every run has, whatever its method. The root config a run reads, `TrainConfig`, is this
    plus each thinking method's own sections (quietstar/methods/registry.py composes it with `train_schema`)."""

    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    resume: Optional[str] = None
    """A checkpoint to continue: a step_XXXXXXX dir, a run's checkpoints/ dir or a run dir (newest step)."""
    init_from: Optional[str] = None
    """A checkpoint whose weights start this run (a step dir, checkpoints/ dir or run dir): a new run with a
    fresh optimizer, schedule and data order, unlike `resume`."""
    recipe: Optional[str] = None
    """A multi-stage experiment run by train.py in place of one training run: the name of a registered method
    with a `run` (quietstar/methods/): learn_to_think, policy_math_web, distill_reasoning (experiment presets),
    explicit (configs/explicit/*.yaml)."""
    output_dir: Optional[str] = None
    """Where the run writes (checkpoints, metrics.jsonl, wandb, config.yaml). train.py sets it to Hydra's
    output dir; None = ./outputs/run."""


@dataclass(frozen=True)
class Method:
    """One thinking method, as the registry (quietstar/methods/registry.py) lists it.

    name      the registry key (`recipe=<name>` selects a method with a `run`)
    sections  its config sections: {root field: dataclass}, e.g. {"thought": ThoughtConfig}; each becomes a
              field of TrainConfig and a config group under configs/
    build     (cfg, base Transformer, tokenizer, device) -> the trained module; None for a method that only runs
    run       (cfg, train_fn) -> result: a multi-stage experiment run by train.py in place of one training run
    check     (cfg) -> None: checks across sections (raise ConfigError), and settings one section implies in
              another, run when the root config is built
    selects   (cfg) -> bool: whether this method's `build` makes the run's model (the registry takes the first
              method that says so)
    """

    name: str
    sections: Dict[str, type] = field(default_factory=dict)
    build: Optional[Callable] = None
    run: Optional[Callable] = None
    check: Optional[Callable] = None
    selects: Optional[Callable] = None


def train_schema(methods: Sequence[Method]) -> type:
    """The root config class, `TrainConfig`: RunConfig's fields, then every method's sections in registry
    order. Its __post_init__ checks that `recipe` names a method with a `run` and that every float is finite,
    then runs each method's `check`."""
    sections = [(name, cls, field(default_factory=cls)) for m in methods for name, cls in m.sections.items()]
    recipes = tuple(m.name for m in methods if m.run is not None)
    checks = [m.check for m in methods if m.check is not None]

    def __post_init__(self):
        if self.recipe is not None and self.recipe not in recipes:
            raise ConfigError(f"recipe must be one of {recipes} or null, got {self.recipe!r}")
        for f in dataclasses.fields(self):
            if dataclasses.is_dataclass(getattr(self, f.name)):
                _check_finite(f.name, getattr(self, f.name))
        for check in checks:
            check(self)

    cls = dataclasses.make_dataclass("TrainConfig", sections, bases=(RunConfig,),
                                     namespace={"__post_init__": __post_init__, "RECIPES": recipes})
    cls.__module__ = "quietstar.methods.registry"  # where it is built: pickling (a spawned stage) finds it there
    cls.__doc__ = "The root config (ConfigStore: `base_config`): " + ", ".join(f.name for f in dataclasses.fields(cls))
    return cls


def config_to_dict(cfg) -> dict:
    """A plain, JSON/YAML-able dict of the whole config."""
    return dataclasses.asdict(cfg)


def build_config(node):
    """The root config from a composed DictConfig: every `__post_init__` runs, and a bad value (including one
    rejected by ThoughtConfig or ModelConfig) is a ConfigError naming its field."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.to_object(node)
    except ConfigError:
        raise
    except (ValueError, TypeError, OmegaConfBaseException) as e:
        raise ConfigError(" ".join(str(e).split())) from e


def load_config(obj, schema: type):
    """A `schema` instance (the root config class) from a YAML file path, a dict or a DictConfig, checked
    against it."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        data = OmegaConf.load(str(obj)) if isinstance(obj, (str, os.PathLike)) else obj
        merged = OmegaConf.merge(OmegaConf.structured(schema), data)
    except (OmegaConfBaseException, ValueError) as e:  # YAML syntax (a yaml error is a ValueError), types
        where = f"{obj}: " if isinstance(obj, (str, os.PathLike)) else ""
        raise ConfigError(f"{where}{' '.join(str(e).split())}") from e
    return build_config(merged)


def check_device_dtype(cfg, device) -> None:
    """Half-precision master weights need a GPU: on CPU the weights stay float32 (train.precision=bf16 runs
    the step under bf16 autocast there)."""
    if getattr(device, "type", str(device)) == "cpu" and cfg.model.dtype != "float32":
        raise ConfigError(f"model.dtype={cfg.model.dtype} is not supported on CPU; use model.dtype=float32 "
                          "(or train on a GPU)")
