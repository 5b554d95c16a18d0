"""Typed configuration: one ``@dataclass(kw_only=True)`` per component.

Named runs live as TOML files in ``configs/``; each TOML table maps to one of the
dataclasses below (``[data]`` -> :class:`DataConfig`, ...).  Command-line flags are
applied on top as dotted overrides (``train.epochs=3``).  Every value is type-checked
when it is loaded, and each component validates itself in ``__post_init__``, so a bad
value fails at start-up with the field's name instead of hours into a job.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from hpcvae.errors import ConfigError

T = TypeVar("T")

ArchName = Literal["vae128", "vae158", "cvae", "cvae2", "fancy_cvae", "galaxy_vae"]
Flavour = Literal["default", "debug"]
Engine = Literal["ddp", "deepspeed"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
EnginePrecision = Literal["fp32", "bf16", "fp16"]
TransformName = Literal["minmax", "asinh"]


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass(kw_only=True)
class DataConfig:
    path: str = "shards/synth-debug"
    """Shard set folder holding ``manifest.json`` and the tar shards."""
    batch_size: int = 64
    """Per-rank batch size (the seed used 64 on one GPU)."""
    global_batch_size: int = 0
    """If > 0: the batch summed over all ranks; must divide by the world size and replaces batch_size."""
    num_workers: int = 2
    """DataLoader worker processes per rank; 0 reads in the main process."""
    shuffle_buffer: int = 1000
    """Samples held in each worker's shuffle buffer."""
    transform: TransformName = "asinh"
    """Normalisation applied to the physical pixels; its parameters come from the manifest.  ``asinh`` (the
    default) keeps the faint isophotes that carry a galaxy's shape in range; ``minmax`` is the seed's, under
    which squared errors are dominated by the bright cores and the models learn round blobs."""
    pin_memory: bool = True
    """Pin host batches so the copy to the GPU can be non-blocking (ignored on CPU)."""
    persistent_workers: bool = True
    """Keep workers alive across epochs instead of re-forking them."""
    prefetch_factor: int = 4
    """Batches each worker prepares ahead."""
    gpu_resident: bool | None = None
    """Hold the whole split on the device (fp16) and shuffle there, with no loader workers. ``None``
    (default): on a CUDA device when the train and val splits in fp16 fit in half its memory
    (81,499 x 158^2 is 4 GB); ``false`` always streams from the shards."""
    verify: bool = True
    """Check every shard's sha256 against the manifest before training (cached in the run folder by size
    and mtime, so a resume does not rehash); a changed shard is an error, never trained on."""
    start_method: Literal["spawn", "fork"] = "spawn"
    """How loader workers start.  ``spawn`` (default) is safe in a multi-threaded process (gloo, NCCL and
    TensorBoard run threads); ``fork`` starts faster.  Chosen explicitly so Python's own default
    (``forkserver`` from 3.14 on Linux) never changes how workers behave."""

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, f"data.batch_size must be >= 1, got {self.batch_size}")
        _check(
            self.global_batch_size >= 0, f"data.global_batch_size must be >= 0, got {self.global_batch_size}"
        )
        _check(self.num_workers >= 0, f"data.num_workers must be >= 0, got {self.num_workers}")
        _check(self.shuffle_buffer >= 1, f"data.shuffle_buffer must be >= 1, got {self.shuffle_buffer}")
        _check(self.prefetch_factor >= 1, "data.prefetch_factor must be >= 1")


@dataclass(kw_only=True)
class ModelConfig:
    arch: ArchName = "cvae2"
    """Architecture name from the model registry."""
    flavour: Flavour = "default"
    """``default`` reproduces the seed; ``debug`` is a tiny model for tests and the CPU demo."""
    image_size: int | None = None
    """Input side in pixels; ``None`` takes it from the shard manifest (or the arch's default)."""
    nf: int | None = None
    """Base number of conv filters; ``None`` takes the flavour's default (64 for the seed)."""
    z_dim: int | None = None
    """Latent size; ``None`` takes the flavour's default (32 for the seed)."""
    recon_reduction: Literal["sum", "mean"] = "sum"
    """``sum`` is the seed's MSE(sum); ``mean`` averages over pixels (keeps loss scale size-free)."""
    redshift_weight: float = 1000.0
    """k in fancy_cvae's ``k * MSE(z_pred, z)`` term (seed: 1000)."""
    likelihood: Literal["mse", "gaussian"] = "mse"
    """Reconstruction term: ``mse`` of the normalised images (the seed's), or ``gaussian``: the chi^2 in
    physical units with each galaxy's noise variance (galaxy2galaxy's).  Recorded in model.json."""
    psf_forward: bool = False
    """Convolve the decoder's output with each galaxy's PSF (FFT, on the device) before the likelihood,
    so the model learns the galaxy without the telescope (galaxy2galaxy's forward model); generated
    images are then PSF-free.  Needs shards with per-galaxy PSFs (a catalog with PSF_FILENAME/PSF_HDU)."""

    def __post_init__(self) -> None:
        if self.image_size is not None:
            _check(self.image_size >= 16, f"model.image_size must be >= 16, got {self.image_size}")
        if self.nf is not None:
            _check(self.nf >= 1, f"model.nf must be >= 1, got {self.nf}")
        if self.z_dim is not None:
            _check(self.z_dim >= 1, f"model.z_dim must be >= 1, got {self.z_dim}")
        _check(self.redshift_weight >= 0, "model.redshift_weight must be >= 0")


@dataclass(kw_only=True)
class BetaConfig:
    kind: Literal["constant", "list", "linear_warmup", "cyclical"] = "constant"
    """How β evolves over epochs."""
    value: float = 0.1
    """β for ``constant``; the final β for ``linear_warmup`` and the peak for ``cyclical``. With MSE(sum), β / 2
    is the likelihood variance per normalised pixel. On ``benchmarks.science``'s asinh set the seed's 0.1 is well
    above the noise and blurs (sizes 13% too big); 0.03 gets them within 2%."""
    values: list[float] = field(default_factory=list)
    """Per-epoch β for ``list`` (the seed's β arrays); the last value holds afterwards."""
    start: float = 0.0
    """Starting β for ``linear_warmup`` and ``cyclical``."""
    warmup_epochs: int = 0
    """Epochs of linear ramp for ``linear_warmup``."""
    cycle_epochs: int = 4
    """Period of ``cyclical``; the ramp takes half the period, then β holds."""

    def __post_init__(self) -> None:
        _check(self.value >= 0, f"beta.value must be >= 0, got {self.value}")
        _check(self.start >= 0, f"beta.start must be >= 0, got {self.start}")
        _check(all(v >= 0 for v in self.values), f"beta.values must all be >= 0, got {self.values}")
        if self.kind == "list":
            _check(len(self.values) > 0, "beta.kind = 'list' needs a non-empty beta.values")
        _check(self.warmup_epochs >= 0, "beta.warmup_epochs must be >= 0")
        _check(self.cycle_epochs >= 1, "beta.cycle_epochs must be >= 1")


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 1e-3
    """Adam learning rate (seed: 1e-3)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW when > 0)."""
    fused: bool | None = None
    """Fused Adam kernel; ``None`` uses it where the device supports it."""
    grad_clip: float = 0.0
    """Clip the global grad norm to this value; 0 disables."""

    def __post_init__(self) -> None:
        _check(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        _check(self.weight_decay >= 0, "optim.weight_decay must be >= 0")
        _check(self.grad_clip >= 0, "optim.grad_clip must be >= 0")


@dataclass(kw_only=True)
class SchedulerConfig:
    kind: Literal["constant", "cosine", "step"] = "constant"
    """LR decay after warm-up."""
    warmup_steps: int = 0
    """Linear LR warm-up from 0, in optimizer steps."""
    min_lr_ratio: float = 0.0
    """Cosine floor as a fraction of ``optim.lr``."""
    step_epochs: int = 10
    """``step``: multiply the LR by ``gamma`` every this many epochs."""
    gamma: float = 0.5
    """``step`` decay factor."""

    def __post_init__(self) -> None:
        _check(self.warmup_steps >= 0, "scheduler.warmup_steps must be >= 0")
        _check(0 <= self.min_lr_ratio <= 1, "scheduler.min_lr_ratio must be in [0, 1]")
        _check(self.step_epochs >= 1, "scheduler.step_epochs must be >= 1")
        _check(0 < self.gamma <= 1, "scheduler.gamma must be in (0, 1]")


@dataclass(kw_only=True)
class TrainConfig:
    epochs: int = 10
    """Passes over the train split."""
    seed: int = 0
    """Seeds weights, shuffling and the reparameterisation noise."""
    engine: Engine = "ddp"
    """``ddp`` (torch DistributedDataParallel) or ``deepspeed``."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """``auto`` uses CUDA when a GPU is visible."""
    precision: Precision = "auto"
    """``auto`` (default): bf16 where the device computes it natively, fp16 on a GPU with fp16 but no bf16,
    else fp32 (``hpcvae.hardware``); the choice and its reason are printed and recorded.  ``bf16``/``fp16`` run
    under autocast; ``fp16`` adds dynamic loss scaling."""
    channels_last: bool | None = None
    """NHWC memory format.  ``None`` (auto): on CPUs and tensor-core GPUs, where its
    convolutions are faster; ``--channels-last`` / ``--channels-last false`` force it."""
    compile: bool = False
    """Wrap the model in ``torch.compile``."""
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = "default"
    """``torch.compile`` mode: ``reduce-overhead`` replays CUDA graphs, for a launch-bound step (a small model
    at a small batch on a GPU); ``max-autotune`` also searches kernels (slow to compile)."""
    deterministic: bool = False
    """Deterministic kernels (bit-reproducible on CPU); slower."""
    log_every: int = 20
    """Optimizer steps between metric logs (one host sync each)."""
    status_every: int = 200
    """When stderr is not a terminal (a SLURM log): print one status line every this many steps, not a bar."""
    sync_every: int = 50
    """Optimizer steps between the ranks' agreement on stopping and on numerical health (one host sync and,
    with several ranks, one small CPU all-reduce); a stop signal takes effect within this many steps."""
    max_skipped_in_a_row: int = 50
    """fp16: stop with an error once this many optimizer steps in a row were skipped for overflow."""
    max_steps_per_epoch: int = 0
    """Cap steps per epoch (0 = none); for smoke runs and benchmarks."""
    val_every: int = 1
    """Validate every this many epochs (and always after the last)."""
    sample_grid: bool = True
    """Write a PNG grid of samples at the end of the run."""

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, f"train.epochs must be >= 1, got {self.epochs}")
        _check(self.log_every >= 1, "train.log_every must be >= 1")
        _check(self.sync_every >= 1, "train.sync_every must be >= 1")
        _check(self.status_every >= 1, "train.status_every must be >= 1")
        _check(self.max_skipped_in_a_row >= 1, "train.max_skipped_in_a_row must be >= 1")
        _check(self.max_steps_per_epoch >= 0, "train.max_steps_per_epoch must be >= 0")
        _check(self.val_every >= 1, "train.val_every must be >= 1")


@dataclass(kw_only=True)
class CheckpointConfig:
    every_steps: int = 500
    """Save every this many optimizer steps (0 = only at epoch ends and on request)."""
    keep_last: int = 3
    """Complete checkpoints kept; older ones are deleted after a new one is complete."""
    resume: str = "auto"
    """``auto`` resumes from the latest complete checkpoint if any, ``none`` starts fresh, else a path."""
    lock: bool = True
    """Hold an exclusive lock on the run folder (``RUN/.hpcvae.lock``) so two runs never share one."""
    allow_new_data: bool = False
    """Let a resume continue on another shard set (or normalisation) than the checkpoint's.  The run keeps
    the checkpoint's normalisation, and an epoch interrupted on the old data is not finished."""

    def __post_init__(self) -> None:
        _check(self.every_steps >= 0, "checkpoint.every_steps must be >= 0")
        _check(self.keep_last >= 1, "checkpoint.keep_last must be >= 1")


@dataclass(kw_only=True)
class DeepSpeedConfig:
    zero_stage: int = 0
    """ZeRO stage 0-3."""
    initial_scale_power: int = 16
    """fp16 dynamic loss scale starts at 2**this."""
    loss_scale_window: int = 1000
    """Overflow-free steps before the fp16 scale grows."""
    bucket_size: int = 20_000_000
    """Elements per ZeRO reduce/all-gather bucket (DeepSpeed's 5e8 default is sized for LLMs)."""

    def __post_init__(self) -> None:
        _check(self.zero_stage in (0, 1, 2, 3), f"deepspeed.zero_stage must be 0-3, got {self.zero_stage}")
        _check(self.bucket_size >= 1, f"deepspeed.bucket_size must be >= 1, got {self.bucket_size}")


@dataclass(kw_only=True)
class DDPConfig:
    """Gradient communication of the DDP engine, for a small model whose step is a millisecond."""

    comm_hook: Literal["none", "bf16", "fp16"] = "none"
    """Compress gradients for the all-reduce (a DDP comm hook): cast to bf16/fp16, all-reduced at half the
    bytes, cast back to fp32; ``none`` all-reduces the fp32 gradients (cvae2 at 158: 21.6 MB a step)."""
    bucket_cap_mb: float = 25.0
    """Gradient bucket size: smaller buckets start all-reducing earlier in the backward pass (overlap),
    bigger ones pay the per-message latency fewer times."""
    gradient_as_bucket_view: bool = True
    """Gradients are views into the all-reduce buckets: no copy in and out, less memory."""
    static_graph: bool = False
    """The same parameters get gradients every step (true for every hpcvae model): lets DDP skip its
    per-step unused-parameter search and reorder buckets once."""

    def __post_init__(self) -> None:
        _check(self.bucket_cap_mb > 0, f"ddp.bucket_cap_mb must be > 0, got {self.bucket_cap_mb}")


@dataclass(kw_only=True)
class EngineConfig:
    """What an engine (``hpcvae.engines``) needs: built from a JobConfig, or directly (the flow prior)."""

    kind: Engine = "ddp"
    """``ddp`` or ``deepspeed``."""
    precision: EnginePrecision = "fp32"
    """Resolved: ``auto`` is decided by ``hpcvae.hardware`` before an engine is built."""
    channels_last: bool = False
    compile: bool = False
    compile_mode: str = "default"
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch_size: int = 64
    """Per-rank micro-batch (DeepSpeed's JSON needs it)."""
    initial_scale_power: int = 16
    """fp16 dynamic loss scale starts at 2**this."""
    loss_scale_window: int = 1000
    zero_stage: int = 0
    bucket_size: int = 20_000_000
    ddp: DDPConfig = field(default_factory=DDPConfig)

    @classmethod
    def from_job(cls, cfg: JobConfig) -> EngineConfig:
        t, d = cfg.train, cfg.deepspeed
        if t.precision == "auto" or t.channels_last is None:
            raise ConfigError("EngineConfig.from_job needs a resolved precision and layout (hpcvae.hardware)")
        return cls(kind=t.engine, precision=t.precision, channels_last=t.channels_last, compile=t.compile,
                   compile_mode=t.compile_mode,
                   optim=cfg.optim, batch_size=cfg.data.batch_size, initial_scale_power=d.initial_scale_power,
                   loss_scale_window=d.loss_scale_window, zero_stage=d.zero_stage, bucket_size=d.bucket_size,
                   ddp=cfg.ddp)  # fmt: skip


@dataclass(kw_only=True)
class JobConfig:
    """A whole training run: what ``configs/<name>.toml`` describes."""

    name: str = "run"
    """Run name, used in logs and job names."""
    out: str = "runs/run"
    """Run folder: checkpoints, metrics, the consolidated model."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    beta: BetaConfig = field(default_factory=BetaConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    ddp: DDPConfig = field(default_factory=DDPConfig)


# ----------------------------------------------------------------------------------------
# Loading, overriding and dumping


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; convert where TOML/CLI is lossy."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{where}: {value!r} is not one of {choices}", key=where)
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}", key=where)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}", key=where)
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}", key=where)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}", key=where)
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        out = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}", key=where)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}", key=where)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # TOML and --set both accept inf and nan
                raise ConfigError(f"{where}: {value!r} is not a finite number", key=where)
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}", key=where)
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}", key=where)
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise ConfigError(f"{where}: expected a path, got {value!r}", key=where)
    return value


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass ``cls`` from a (TOML) dict, rejecting unknown keys and naming missing ones."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    prefix = f"{where}." if where else ""
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]} (known: {', '.join(sorted(names))})",
            key=f"{prefix}{unknown[0]}",
        )
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in data and _required(f)]
    if missing:
        raise ConfigError(f"{prefix}{missing[0]} is required", key=f"{prefix}{missing[0]}")
    kwargs = {}
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    for k, v in data.items():
        key = f"{where}.{k}" if where else k
        f = by_name[k]
        if (
            isinstance(v, dict)
            and dataclasses.is_dataclass(hints[k])
            and f.default_factory is not dataclasses.MISSING
        ):
            v = {
                **dataclasses.asdict(f.default_factory()),
                **v,
            }  # a partial table keeps this field's defaults
        kwargs[k] = _coerce(v, hints[k], key)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # pragma: no cover - kw_only mismatch
        raise ConfigError(f"{where or cls.__name__}: {exc}") from None


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-dict form (TOML/JSON-safe: tuples become lists, ``None`` is dropped)."""

    def clean(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items() if x is not None}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return clean(dataclasses.asdict(cfg))


def _parse_scalar(text: str) -> Any:
    """Parse a CLI override value the way TOML would (``3``, ``1e-3``, ``true``, ``[1, 2]``)."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare string such as ``cosine`` or a path


def apply_overrides(cfg: Any, overrides: dict[str, Any] | list[str]) -> Any:
    """Return a copy of ``cfg`` with dotted-key overrides applied and re-validated.

    ``overrides`` is a mapping (``{"train.epochs": 3}``) or ``key=value`` strings as
    given on the command line.
    """
    overrides = _pairs(overrides)
    data = dataclasses.asdict(cfg)
    for key, value in overrides.items():
        parts = key.split(".")
        node = data
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                raise ConfigError(f"unknown config key {key}")
            node = node[p]
        if parts[-1] not in node:
            raise ConfigError(f"unknown config key {key}")
        node[parts[-1]] = value
    return from_dict(type(cfg), data)


def read_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        return tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {p}: invalid TOML: {exc}") from None


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    node = data
    parts = key.split(".")
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"unknown config key {key}")
        node = nxt
    node[parts[-1]] = value


def _pairs(overrides: dict[str, Any] | list[str] | None) -> dict[str, Any]:
    if not overrides:
        return {}
    if isinstance(overrides, dict):
        return dict(overrides)
    pairs: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        k, v = item.split("=", 1)
        pairs[k.strip()] = _parse_scalar(v.strip())
    return pairs


def load_options(
    cls: type[T],
    path: str | Path | None = None,
    overrides: dict[str, Any] | list[str] | None = None,
    *,
    flags: dict[str, Any] | None = None,
    base: dict[str, Any] | None = None,
) -> T:
    """Every command's options, loaded the same way: defaults < TOML file < ``--set`` < named flags.

    ``overrides`` and ``flags`` map dotted keys (``train.epochs``) to values (``--set`` strings are
    parsed the way TOML would); ``base`` is a dict under the file (a site profile's implied name,
    say).  Everything is type-checked once, field by field, so a bad value names its key; an error
    in a key that came from the file names the file.
    """
    data: dict[str, Any] = dict(base or {})
    file_keys: set[str] = set()
    if path is not None:
        file_data = read_toml(path)
        file_keys = _flat_keys(file_data)
        for k, v in _flatten(file_data).items():
            _set_dotted(data, k, v)
    later = {**_pairs(overrides), **(flags or {})}
    for k, v in later.items():
        _set_dotted(data, k, v)
    try:
        return from_dict(cls, data)
    except ConfigError as exc:
        key = exc.key or ""
        if path is not None and key in file_keys and key not in later:
            raise ConfigError(f"config file {path}: {exc}", key=exc.key) from None
        raise


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


def _flat_keys(data: dict[str, Any]) -> set[str]:
    return set(_flatten(data))


def load_config(
    path: str | Path | None = None, overrides: dict[str, Any] | list[str] | None = None
) -> JobConfig:
    """Load a ``JobConfig`` from TOML (or defaults) and apply overrides."""
    return load_options(JobConfig, path, overrides)


# ----------------------------------------------------------------------------------------
# Command lines: one flag per field, from the dataclass


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (and its bases): the help text of its flag."""
    import ast
    import inspect

    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(inspect.getsource(klass).lstrip())
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for a, b in zip(body, body[1:]):
            if isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name):
                if (
                    isinstance(b, ast.Expr)
                    and isinstance(b.value, ast.Constant)
                    and isinstance(b.value.value, str)
                ):
                    docs[a.target.id] = " ".join(b.value.value.split())
    return docs


def _leaf(cls: type, key: str) -> tuple[type, dataclasses.Field]:
    """The dataclass and field a dotted key names."""
    parts = key.split(".")
    for p in parts[:-1]:
        cls = typing.get_type_hints(cls)[p]
    f = next((f for f in dataclasses.fields(cls) if f.name == parts[-1]), None)
    if f is None:
        raise KeyError(key)
    return cls, f


def add_options(
    parser: Any,
    cls: type,
    *,
    flags: dict[str, str] | None = None,
    skip: tuple[str, ...] = (),
    config: bool = True,
) -> dict[str, str]:
    """Add ``--config FILE``, ``--set KEY=VALUE`` and one ``--flag`` per scalar field of ``cls``.

    ``flags`` adds named flags for nested keys (``{"resume": "checkpoint.resume"}``) or renames
    (``{"workers": "num_workers"}``).  A bool field gets ``--name`` (or ``--no-name`` when its
    default is true).  Returns ``dest -> dotted key`` for :func:`options_from_args`.
    """
    table: dict[str, str] = {}
    for f in dataclasses.fields(cls):
        if f.name not in skip and not dataclasses.is_dataclass(typing.get_type_hints(cls)[f.name]):
            table.setdefault(f.name, f.name)
    for name, key in (flags or {}).items():
        table.pop(key, None) if key in table and key != name else None
        table[name] = key
    for name, key in table.items():
        owner, f = _leaf(cls, key)
        tp = typing.get_type_hints(owner)[f.name]
        doc = field_docs(owner).get(f.name, "")
        default = f.default if f.default is not dataclasses.MISSING else None
        flag = "--" + name.replace("_", "-")
        if tp is bool:
            if default is True:
                parser.add_argument("--no-" + name.replace("_", "-"), dest=name, action="store_false",
                                    default=None, help=doc)  # fmt: skip
            else:
                parser.add_argument(flag, dest=name, action="store_true", default=None, help=doc)
            continue
        if tp == bool | None:  # ``--flag`` = true, ``--flag false``, absent = None (auto)
            parser.add_argument(flag, dest=name, nargs="?", const="true", default=None, metavar="true|false",
                                help=(doc + " Default: auto.").strip())  # fmt: skip
            continue
        # Choices are checked by the config (one line naming the key), not by argparse (a usage dump).
        choices = typing.get_args(tp) if typing.get_origin(tp) is Literal else ()
        shown = (f" One of: {', '.join(map(str, choices))}." if choices else "") + (
            f" Default: {default}." if default not in (None, "") else "")  # fmt: skip
        parser.add_argument(
            flag, dest=name, default=None, metavar=name.upper(), help=(doc + shown).strip() or None
        )
    if config:
        parser.add_argument("--config", help="TOML file of options (the command line overrides it)")
        parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                            help="any option, e.g. --set checkpoint.every_steps=100 (repeatable)")  # fmt: skip
    return table


def options_from_args(cls: type[T], args: Any, table: dict[str, str], **given: Any) -> T:
    """The options of ``cls`` from parsed arguments: ``--config``, ``--set``, then the named flags.

    ``given`` holds values the command sets itself (positional arguments), as dotted keys.
    """
    flags: dict[str, Any] = {}
    for name, key in table.items():
        value = getattr(args, name, None)
        if value is None:
            continue
        owner, f = _leaf(cls, key)
        flags[key] = _flag_value(value, typing.get_type_hints(owner)[f.name])
    flags.update({k: v for k, v in given.items() if v is not None})
    try:
        return load_options(
            cls, getattr(args, "config", None), list(getattr(args, "set", []) or []), flags=flags
        )
    except ConfigError as exc:
        flag = next((n for n, k in table.items() if k == exc.key), None)
        if flag and str(exc).endswith(" is required"):  # name the flag the user types
            raise ConfigError(f"--{flag.replace('_', '-')} is required") from None
        raise


def _flag_value(text: Any, tp: Any) -> Any:
    """A flag's string as its field wants it: strings stay strings, ``64,64`` is a list, the rest as TOML."""
    if not isinstance(text, str):
        return text
    union = typing.get_origin(tp) in (typing.Union, types.UnionType)
    base = [a for a in typing.get_args(tp) if a is not type(None)] if union else [tp]
    if str in base or Path in base or any(typing.get_origin(a) is Literal for a in base):
        return text
    if any(typing.get_origin(a) in (list, tuple) for a in base) and not text.startswith("["):
        return [_parse_scalar(x.strip()) for x in text.split(",") if x.strip()]
    return _parse_scalar(text)


def dump_toml(cfg: Any) -> str:
    import tomli_w

    return tomli_w.dumps(to_dict(cfg))
