"""Typed configuration: one ``@dataclass(kw_only=True)`` per component.

Named runs live as TOML files in ``configs/``; each TOML table maps to one of the
dataclasses below (``[data]`` -> :class:`DataConfig`, ...).  Command-line flags are
applied on top as dotted overrides (``train.epochs=3``).  Every value is type-checked
when it is loaded, and each component validates itself in ``__post_init__``, so a bad
value fails at start-up with the field's name instead of hours into a job.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from hpcvae.config_io import (  # noqa: F401  (re-exported: every command imports them from here)
    add_options,
    dump_toml,
    field_docs,
    from_dict,
    load_options,
    options_from_args,
    read_toml,
    to_dict,
)
from hpcvae.errors import ConfigError

ArchName = Literal["vae128", "vae158", "cvae", "cvae2", "fancy_cvae", "galaxy_vae", "galaxy_film"]
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
    likelihood: Literal["mse", "gaussian", "calibrated", "calibrated_noise"] | None = None
    """Reconstruction term (``hpcvae.models.likelihoods``): ``mse`` of the normalised images (the seed's),
    ``gaussian`` (the chi^2 in physical units with each galaxy's noise variance, galaxy2galaxy's),
    ``calibrated`` (sigma-VAE: a Gaussian whose variance is each galaxy's own maximum-likelihood value, so
    beta = 1 needs no tuning per data set) or ``calibrated_noise`` (each pixel's sky noise through the
    normalisation plus a per-galaxy misfit variance at its maximum-likelihood value: bright cores weigh what
    their noise says, so small galaxies keep their size; needs NOISE_VARIANCE).  ``None``: the architecture's
    default (galaxy_film: calibrated_noise, or calibrated where the shards carry no noise variance; the others:
    mse).  Recorded in model.json."""
    conditions: list[str] | None = None
    """The conditions a multi-condition architecture (galaxy_film) takes, in order; ``None``: every condition the
    shard set carries (``hpcvae.shard --conditions``).  The seed's models and galaxy_vae take the redshift."""
    psf_forward: bool = False
    """Convolve the decoder's output with each galaxy's PSF (FFT, on the device) before the likelihood,
    so the model learns the galaxy without the telescope (galaxy2galaxy's forward model); generated
    images are then PSF-free.  Needs shards with per-galaxy PSFs (a catalog with PSF_FILENAME/PSF_HDU)."""
    margin: int = 0
    """Pixels galaxy_film's decoder draws beyond each stamp edge and crops, so the convolutions' zero padding
    falls outside the stamp (where it printed row/column streaks); at most image_size / 4.  Other
    architectures: 0."""
    padding: Literal["zeros", "circular", "reflect"] = "zeros"
    """galaxy_film's decoder padding: ``zeros``, ``circular`` (the decoder works on a torus, so an edge pixel
    is computed like any other and the border draws fewer row/column streaks; a stamp's edges are sky, so
    wrapping joins sky to sky) or ``reflect`` (an edge pixel sees the interior mirrored, so a smooth sky stays
    smooth up to the edge).  Other architectures: zeros."""

    def __post_init__(self) -> None:
        _check(self.margin >= 0, f"model.margin must be >= 0, got {self.margin}")
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
    value: float | None = None
    """β for ``constant``; the final β for ``linear_warmup`` and the peak for ``cyclical``.  ``None``: 1 for a
    likelihood that makes the loss a proper ELBO (``calibrated``), else the seed's 0.1.  With MSE(sum), β / 2 is
    the likelihood variance per normalised pixel, so the right β depends on the data set: 0.03 suits the simple
    synthetic set (``benchmarks.science``), not others; ``calibrated`` removes the knob."""
    values: list[float] = field(default_factory=list)
    """Per-epoch β for ``list`` (the seed's β arrays); the last value holds afterwards."""
    start: float = 0.0
    """Starting β for ``linear_warmup`` and ``cyclical``."""
    warmup_epochs: int = 0
    """Epochs of linear ramp for ``linear_warmup``."""
    cycle_epochs: int = 4
    """Period of ``cyclical``; the ramp takes half the period, then β holds."""

    def __post_init__(self) -> None:
        _check(self.value is None or self.value >= 0, f"beta.value must be >= 0, got {self.value}")
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
    sync_seconds: float = 10.0
    """At most about this many seconds between control points: with slow steps (a 158 px model on a CPU, a
    large batch) they come every ``sync_seconds / step time`` steps instead of every ``sync_every``, so a stop
    signal is saved well within SLURM's KillWait (30 s by default)."""
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
        _check(0 <= self.seed < 2**63, f"train.seed must be in [0, 2**63), got {self.seed}")
        _check(self.log_every >= 1, "train.log_every must be >= 1")
        _check(self.sync_every >= 1, "train.sync_every must be >= 1")
        _check(
            0 < self.sync_seconds <= 3600, f"train.sync_seconds must be in (0, 3600], got {self.sync_seconds}"
        )
        _check(self.status_every >= 1, "train.status_every must be >= 1")
        _check(self.max_skipped_in_a_row >= 1, "train.max_skipped_in_a_row must be >= 1")
        _check(self.max_steps_per_epoch >= 0, "train.max_steps_per_epoch must be >= 0")
        _check(self.val_every >= 1, "train.val_every must be >= 1")


SinkName = Literal["jsonl", "tensorboard"]


@dataclass(kw_only=True)
class MetricsConfig:
    sinks: list[SinkName] = field(default_factory=lambda: ["jsonl", "tensorboard"])
    """Where the run's records go (``hpcvae.metrics.SINKS``): ``jsonl`` (metrics.jsonl) and ``tensorboard`` (tb/)."""

    def __post_init__(self) -> None:
        from hpcvae.metrics import SINKS

        bad = [x for x in self.sinks if x not in SINKS]
        _check(
            not bad, f"metrics.sinks: unknown sink {bad[0]!r} (choices: {', '.join(SINKS)})" if bad else ""
        )
        _check(len(set(self.sinks)) == len(self.sinks), "metrics.sinks: a sink is named twice")


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
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    ddp: DDPConfig = field(default_factory=DDPConfig)

    def __post_init__(self) -> None:
        check_out_path(self.out, "out")


def check_out_path(out: str | Path, key: str = "out") -> None:
    """A folder path a file system can hold and that is not a file (checked before anything is built)."""
    p = Path(out)
    if len(str(p)) > 4000 or any(len(part) > 255 for part in p.parts):
        raise ConfigError(f"--{key}: a path of {len(str(p))} characters (or a name over 255) is longer than a "
                          "file system allows", key=key)  # fmt: skip
    if p.exists() and not p.is_dir():
        raise ConfigError(f"--{key} {p} is a file, not a folder", key=key)


def load_config(
    path: str | Path | None = None, overrides: dict[str, Any] | list[str] | None = None
) -> JobConfig:
    """Load a ``JobConfig`` from TOML (or defaults) and apply overrides."""
    return load_options(JobConfig, path, overrides)


RESUME_APPLIES = ("name", "out", "data.", "checkpoint.", "metrics.", "ddp.", "train.epochs", "train.log_every",
                  "train.status_every", "train.sync_every", "train.sync_seconds", "train.val_every", "train.sample_grid",
                  "train.max_steps_per_epoch", "train.device", "train.precision", "train.channels_last",
                  "train.compile", "train.compile_mode", "train.deterministic", "train.max_skipped_in_a_row",
                  "train.seed", "deepspeed.bucket_size", "deepspeed.loss_scale_window")  # fmt: skip
"""Options a resume can change: how the run is laid out, logged, checkpointed and computed, and more epochs.
The others (the model, the loss and its beta, the optimizer and its schedule, the engine, the normalisation)
define what is being trained: changing them mid-run would make the records lie, so a resume refuses them."""


def resume_changes(old: dict[str, Any], new: dict[str, Any]) -> tuple[list[tuple], list[tuple]]:
    """(refused, applied): the (key, old value, new value) that differ between a checkpoint's config and now."""

    def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    a, b = flat(old), flat(new)
    refused, applied = [], []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, (list, tuple)) and isinstance(vb, (list, tuple)):
            va, vb = list(va), list(vb)
        if va == vb:
            continue
        # data.path is the shard set: checkpoint.allow_new_data decides it (Trainer._choose_transform)
        safe = key != "data.transform" and any(key == p or (p.endswith(".") and key.startswith(p))
                                               for p in RESUME_APPLIES)  # fmt: skip
        (applied if safe else refused).append((key, va, vb))
    return refused, applied
