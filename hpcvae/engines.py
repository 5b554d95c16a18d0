"""DDP and DeepSpeed behind one small interface, so the training loop never branches on the engine.

Precision, per engine:

* ``fp32``: plain fp32 everywhere.
* ``bf16``: ``torch.autocast`` around the forward for both engines; weights, optimizer state and
  BatchNorm stay fp32.  We deliberately do *not* use DeepSpeed's native ``bf16`` mode: it casts
  the parameters (BatchNorm affine weights included) to bf16 while the running statistics stay
  fp32, which the CPU BatchNorm kernel rejects, and it would give the two engines different
  numerics.  ZeRO then partitions fp32 master weights, which is what saves memory anyway.
* ``fp16``: DDP uses autocast + ``torch.amp.GradScaler`` (dynamic loss scale, BatchNorm in fp32).
  DeepSpeed uses its own fp16 mode with dynamic loss scaling (GPU only; DeepSpeed refuses fp16 on
  CPU).  DeepSpeed's fp16 converts the *whole* module with ``module.half()``: BatchNorm weights and
  its running mean/variance are stored and updated in half precision.  We accept that rather than
  patch DeepSpeed: our inputs are normalised to [0, 1], so the statistics are far from fp16's
  range limits and lose only ~1e-3 relative precision; fp32 master weights live in the optimizer,
  and the consolidated ``model.safetensors`` is always written in fp32.  Prefer ``bf16`` when the
  hardware has it.

Steps skipped for an fp16 overflow are counted (``Engine.skipped``); a skipped step leaves the
weights untouched, so they never become NaN.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn

from hpcvae.config import EngineConfig
from hpcvae.dist import DistInfo
from hpcvae.errors import CheckpointError, ConfigError

DS_TAG = "deepspeed"
"""Tag (sub-folder) of the DeepSpeed checkpoint inside one of our checkpoint folders."""

_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def build_optimizer(
    cfg: EngineConfig, params: list[nn.Parameter], device: torch.device
) -> torch.optim.Optimizer:
    """Adam (AdamW with weight decay); fused kernels where the device has them (CUDA, recent CPU builds)."""
    o = cfg.optim
    cls = torch.optim.AdamW if o.weight_decay > 0 else torch.optim.Adam
    kw: dict[str, Any] = {"lr": o.lr, "betas": tuple(o.betas), "weight_decay": o.weight_decay}
    fused = o.fused if o.fused is not None else device.type in ("cuda", "cpu")
    if fused:
        try:
            return cls(params, fused=True, **kw)
        except (RuntimeError, TypeError):
            if o.fused:
                raise ConfigError(f"optim.fused = true but fused Adam is unavailable on {device}") from None
    return cls(params, **kw)


class Engine:
    """What the trainer needs from an engine.

    ``module`` is the bare model (validation, checkpoints, ``compute_loss``); ``forward`` goes
    through the distributed wrapper so gradient hooks run.
    """

    name = "base"

    def __init__(self, cfg: EngineConfig, module: nn.Module, dist: DistInfo) -> None:
        self.cfg, self.module, self.dist = cfg, module, dist
        self.device = dist.device
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.skipped = torch.zeros((), dtype=torch.int64, device=self.device)
        """Optimizer steps skipped for an fp16 overflow (device tensor: read it only when logging)."""
        self.skipped_in_a_row = torch.zeros((), dtype=torch.int64, device=self.device)
        """Consecutive skipped steps up to the last one (device tensor); the trainer stops on a long run."""
        self.grad_finite: torch.Tensor | None = None
        """Whether the last step's gradients were all finite (device bool), where the engine can tell."""
        self.overflow_is_normal = cfg.precision == "fp16"
        """fp16 overflows are expected and skipped by the loss scaler, so they are not errors."""

    # -- hot path ---------------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        p = self.cfg.precision
        if p == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=_AMP_DTYPES[p])

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Move a batch to the device (non-blocking from pinned memory) in the engine's layout."""
        x = x.to(self.device, non_blocking=True)
        if self.memory_format is torch.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def forward(self, x: torch.Tensor, redshift: torch.Tensor | None) -> Any:
        raise NotImplementedError

    def backward(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def step(self) -> None:
        """Optimizer step (skipped on fp16 overflow) and zero the gradients."""
        raise NotImplementedError

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        raise NotImplementedError

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    # -- checkpoints ------------------------------------------------------------------------
    def save(self, folder: Path) -> None:
        """Write the engine's state into ``folder``; called on every rank."""
        raise NotImplementedError

    def load(self, folder: Path) -> None:
        raise NotImplementedError

    def full_state_dict(self, folder: Path | None) -> dict[str, torch.Tensor] | None:
        """The model's full fp32 state dict on rank 0 (None elsewhere); ``folder`` is a saved checkpoint."""
        raise NotImplementedError


class DDPEngine(Engine):
    """torch DistributedDataParallel (no wrapper for a single process) + optional GradScaler."""

    name = "ddp"

    def __init__(self, cfg: EngineConfig, module: nn.Module, dist: DistInfo) -> None:
        super().__init__(cfg, module, dist)
        module.to(self.device, memory_format=self.memory_format)
        self._opt = build_optimizer(cfg, list(module.parameters()), self.device)
        wrapped: nn.Module = module
        if dist.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            d = cfg.ddp
            if d.comm_hook == "bf16" and dist.backend != "nccl":
                raise ConfigError(
                    f"ddp.comm_hook = 'bf16' needs NCCL (PyTorch's bf16 hook); this run uses {dist.backend}: "
                    "use ddp.comm_hook = 'fp16'",
                    collective=True,
                )
            wrapped = DDP(module, device_ids=[self.device] if self.device.type == "cuda" else None,
                          bucket_cap_mb=d.bucket_cap_mb, gradient_as_bucket_view=d.gradient_as_bucket_view,
                          static_graph=d.static_graph)  # fmt: skip
            if d.comm_hook != "none":
                from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

                hook = (
                    default_hooks.bf16_compress_hook
                    if d.comm_hook == "bf16"
                    else default_hooks.fp16_compress_hook
                )
                wrapped.register_comm_hook(None, hook)
        if cfg.compile:
            wrapped = torch.compile(wrapped, mode=None if cfg.compile_mode == "default" else cfg.compile_mode)
        self.wrapped = wrapped
        self.scaler = (
            torch.amp.GradScaler(
                self.device.type,
                init_scale=2.0**cfg.initial_scale_power,
                growth_interval=cfg.loss_scale_window,
            )  # fmt: skip
            if cfg.precision == "fp16"
            else None
        )

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self._opt

    def forward(self, x: torch.Tensor, redshift: torch.Tensor | None) -> Any:
        with self.autocast():
            return self.wrapped(x, redshift)

    def backward(self, loss: torch.Tensor) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def step(self) -> None:
        clip = self.cfg.optim.grad_clip
        if self.scaler is None:
            grads = [p.grad for p in self.module.parameters() if p.grad is not None]
            if clip > 0:
                norm = nn.utils.clip_grad_norm_(self.module.parameters(), clip)
            else:  # one fused reduction, kept on the device: read at the trainer's control points only
                norm = nn.utils.get_total_norm(grads)
            self.grad_finite = torch.isfinite(norm)
            self._opt.step()
        else:
            if clip > 0:
                self.scaler.unscale_(self._opt)
                nn.utils.clip_grad_norm_(self.module.parameters(), clip)
            before = self.scaler._scale.clone()  # device tensor: no host sync
            self.scaler.step(self._opt)  # skips the update when a gradient is inf/NaN
            self.scaler.update()  # ... and then lowers the scale: that is how we count skips
            skipped = (self.scaler._scale < before).to(torch.int64)
            self.skipped += skipped
            self.skipped_in_a_row.add_(1).mul_(skipped)
        self._opt.zero_grad(set_to_none=True)

    def save(self, folder: Path) -> None:
        if self.dist.is_main:
            from safetensors.torch import save_file

            save_file(_contiguous(self.module.state_dict()), str(folder / "model.safetensors"))
            state = {
                "optimizer": self._opt.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler else None,
            }
            torch.save(state, folder / "optimizer.pt")

    def load(self, folder: Path) -> None:
        from safetensors.torch import load_file

        sd = load_file(str(folder / "model.safetensors"), device=str(self.device))
        self.module.load_state_dict(sd)
        state = torch.load(folder / "optimizer.pt", map_location=self.device, weights_only=True)
        self._opt.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    def full_state_dict(self, folder: Path | None) -> dict[str, torch.Tensor] | None:
        return _fp32(self.module.state_dict()) if self.dist.is_main else None


class DeepSpeedEngine(Engine):
    """DeepSpeed ZeRO 0-3; the JSON config is generated from the engine config.

    We pass our own torch Adam (``zero_allow_untested_optimizer``) so both engines run the
    same optimizer maths, and step our LR scheduler ourselves.
    """

    name = "deepspeed"

    def __init__(self, cfg: EngineConfig, module: nn.Module, dist: DistInfo) -> None:
        super().__init__(cfg, module, dist)
        if self.device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            if cfg.precision == "fp16":
                raise ConfigError(
                    "train.precision = 'fp16' with engine 'deepspeed' needs a GPU (DeepSpeed has no fp16 on CPU); "
                    "use bf16 or fp32"
                )
        _ensure_process_group(dist)
        try:
            import deepspeed
        except ImportError:
            raise ConfigError(
                "train.engine = 'deepspeed' but deepspeed is not installed (pip install deepspeed)"
            ) from None
        # Weights go NHWC only after initialize, and only without ZeRO partitioning: DeepSpeed
        # flattens parameters through ``p.data.view(...)``, which fails on channels_last
        # tensors, and ZeRO >= 1 keeps them in flat buffers.  With ZeRO >= 1 only the inputs
        # are NHWC; convolutions still follow the input's memory format.
        module.to(self.device)
        self.ds_config = deepspeed_config(cfg, dist.world_size)
        opt = build_optimizer(cfg, list(module.parameters()), self.device)
        self.ds, self._opt, _, _ = deepspeed.initialize(model=module, optimizer=opt, config=self.ds_config)
        if self.memory_format is torch.channels_last and cfg.zero_stage == 0:
            module.to(memory_format=torch.channels_last)  # in place: same Parameter objects
        if cfg.compile:
            self.ds.compile()
        self._base_opt = opt
        self._fp16 = cfg.precision == "fp16"

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        # The LR lives in the base optimizer's param_groups, which every ZeRO wrapper shares.
        return self._base_opt

    def autocast(self) -> contextlib.AbstractContextManager:
        # DeepSpeed's fp16 already runs the module in half; bf16 is plain autocast (see module doc).
        return contextlib.nullcontext() if self._fp16 else super().autocast()

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = super().prepare(x)
        return x.half() if self._fp16 else x

    def forward(self, x: torch.Tensor, redshift: torch.Tensor | None) -> Any:
        with self.autocast():
            return self.ds(x, redshift)

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)

    def step(self) -> None:
        self.ds.step()  # clips and zeroes the gradients too
        if self._fp16:
            n = int(self.ds.skipped_steps)  # DeepSpeed has synced for its overflow check already
            self.skipped_in_a_row.add_(1).mul_(int(n > int(self.skipped)))
            self.skipped.fill_(n)

    def save(self, folder: Path) -> None:
        # Every rank writes its ZeRO partition; the config travels with the checkpoint.
        self.ds.save_checkpoint(str(folder), tag=DS_TAG, client_state={}, save_latest=False)
        if self.dist.is_main:
            (folder / "deepspeed_config.json").write_text(json.dumps(self.ds_config, indent=1))

    def load(self, folder: Path) -> None:
        from hpcvae.deepspeed_compat import weights_only_loads

        with weights_only_loads():  # DeepSpeed itself would unpickle with no restriction
            path, _ = self.ds.load_checkpoint(
                str(folder), tag=DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=False
            )
        if path is None:
            raise CheckpointError(f"{folder / DS_TAG}: DeepSpeed could not load this checkpoint")
        if self._fp16:
            self.skipped.fill_(int(self.ds.skipped_steps))

    def full_state_dict(self, folder: Path | None) -> dict[str, torch.Tensor] | None:
        if not self.dist.is_main:
            return None
        stage = self.cfg.zero_stage
        # Stages 0-2 keep full parameters in the module; only ZeRO-3 (and the fp32 masters of
        # fp16 ZeRO) must be gathered from the saved partitions.
        if folder is None or stage == 0 or (stage < 3 and not self._fp16):
            return _fp32(self.module.state_dict())
        return weights_from_checkpoint(folder, {"engine": "deepspeed", "zero_stage": stage})


def deepspeed_config(cfg: EngineConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON for our config: one micro-batch per step, ZeRO stage, fp16 loss scaling."""
    b = cfg.batch_size
    fp16 = cfg.precision == "fp16"
    return {
        "train_micro_batch_size_per_gpu": b,
        "gradient_accumulation_steps": 1,
        "train_batch_size": b * world_size,
        "zero_optimization": {
            "stage": cfg.zero_stage,
            # DeepSpeed's 5e8-element default buckets cost seconds per step to fill and zero
            # on a CPU; our models have 1e5-1e7 parameters.
            "reduce_bucket_size": cfg.bucket_size,
            "allgather_bucket_size": cfg.bucket_size,
        },
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": cfg.optim.grad_clip,
        "fp16": {
            "enabled": fp16,
            "loss_scale": 0,  # 0 = dynamic
            "initial_scale_power": cfg.initial_scale_power,
            "loss_scale_window": cfg.loss_scale_window,
            "hysteresis": 1,
        },
        "bf16": {"enabled": False},  # bf16 runs under autocast, see the module docstring
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def weights_from_checkpoint(folder: Path, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Full fp32 model weights from one of our checkpoint folders, whatever engine wrote it.

    The one reader of a checkpoint's weights: the end of a DeepSpeed run that must gather its
    partitions and ``hpcvae.consolidate`` both call it (``meta``: the checkpoint's engine and stage).
    """
    if meta.get("engine") == "deepspeed":
        return zero0_state_dict(folder) if int(meta.get("zero_stage", 0)) == 0 else zero_state_dict(folder)
    from safetensors.torch import load_file

    from hpcvae.model_files import MODEL_FILE

    path = folder / MODEL_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing from the checkpoint")
    return load_file(str(path))


def zero_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights (BatchNorm buffers included) from a ZeRO 1-3 checkpoint folder."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError:
        raise CheckpointError(
            f"{folder}: a DeepSpeed ZeRO checkpoint needs deepspeed installed to consolidate"
        ) from None
    from hpcvae.deepspeed_compat import weights_only_loads

    # It prints progress lines meant for interactive use, and would unpickle with no restriction.
    with contextlib.redirect_stdout(None), weights_only_loads():
        sd = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=DS_TAG)
    return _fp32(sd)


def zero0_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """Weights from a DeepSpeed stage-0 checkpoint (the module state is saved whole by rank 0)."""
    path = folder / DS_TAG / "mp_rank_00_model_states.pt"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; not a complete DeepSpeed checkpoint")
    from hpcvae.deepspeed_compat import safe_load

    state = safe_load(path, map_location="cpu")  # DeepSpeed's pickle, read with weights_only=True
    return _fp32(state["module"])


def build_engine(cfg: EngineConfig, module: nn.Module, dist: DistInfo) -> Engine:
    return DeepSpeedEngine(cfg, module, dist) if cfg.kind == "deepspeed" else DDPEngine(cfg, module, dist)


def _ensure_process_group(dist: DistInfo) -> None:
    """DeepSpeed wants a process group even for one process; make a private one-rank group."""
    if tdist.is_initialized():
        return
    from hpcvae.dist import free_port

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(k, v)
    tdist.init_process_group(backend=dist.backend, rank=0, world_size=1)


def _contiguous(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in sd.items()}


def _fp32(sd: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Floating tensors to fp32 on the CPU (integer buffers such as num_batches_tracked kept)."""
    out = {}
    for k, v in sd.items():
        v = v.detach().to("cpu")
        out[k] = (v.float() if v.is_floating_point() else v).contiguous()
    return out
