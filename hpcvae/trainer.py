"""The training loop: ``Trainer.train()`` -> ``train_step()`` -> ``forward_backward_step()``.

One loop for every engine and precision (the differences live in ``hpcvae.engines``).
Rules it keeps:

* Exact epochs: every rank runs ``ShardData.steps_per_epoch`` steps; a resumed epoch
  starts at the consumed step, so a preempted-and-resumed run matches an uninterrupted one
  bit for bit (same data order, same RNG streams, same optimizer state).
* No host sync on the hot path: metrics accumulate in a device tensor and are read every
  ``train.log_every`` steps.
* Preemption: SIGUSR2/SIGTERM (or ``request_stop()``) only set a flag; at the next step
  boundary the ranks agree on it (one CPU all-reduce), save together and return
  ``preempted``.
* Data loading never touches the global torch RNG (``hpcvae.data.EpochLoader`` guards it),
  so the reparameterisation noise stream depends only on the training steps.
  Bit-identical resume also needs the same kernels: same device, world size, precision
  and CPU thread count (``OMP_NUM_THREADS``), since BLAS reductions depend on threads.
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as tdist

from hpcvae._version import __version__
from hpcvae.checkpoint import Checkpointer, read_meta, resolve_resume
from hpcvae.config import JobConfig, dump_toml, to_dict
from hpcvae.dist import DistInfo, barrier, on_rank0, print0
from hpcvae.engines import Engine, build_engine
from hpcvae.errors import CheckpointError, ConfigError, HpcvaeError, NumericalError
from hpcvae.metrics import Metrics
from hpcvae.runlock import RunLock
from hpcvae.schedules import beta_schedule, lr_scheduler
from hpcvae.shards.manifest import Manifest

METRICS = ("loss", "recon", "kl", "redshift")


@dataclass(kw_only=True)
class RunResult:
    status: Literal["completed", "preempted"]
    out: Path
    """The run folder."""
    epoch: int = 0
    """Epoch the run stopped in (``train.epochs`` when completed)."""
    global_step: int = 0
    checkpoint: Path | None = None
    """Last checkpoint written (the one to resume from when preempted)."""
    model_path: Path | None = None
    """``model.safetensors`` when completed."""
    summary: dict[str, Any] = field(default_factory=dict)


def _rank_seed(seed: int, rank: int) -> int:
    """Independent per-rank streams that do not overlap another seed's rank 0."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


class Trainer:
    def __init__(self, cfg: JobConfig, dist: DistInfo) -> None:
        self.cfg, self.dist = cfg, dist
        self.out = Path(cfg.out)
        self._stop_requested = False
        # One run per folder: rank 0 holds the lock until train() ends.  A run refused from here
        # to the end of __init__ (busy folder, bad checkpoint, changed data) leaves the folder as it was.
        self._lock = RunLock(self.out) if cfg.checkpoint.lock else None
        if self._lock is not None:
            on_rank0(self._lock.acquire)
        try:
            self._build(cfg, dist)
        except BaseException:
            self._unlock(refused=True)
            raise

    def _unlock(self, refused: bool = False) -> None:
        if self._lock is not None and self.dist.is_main:
            self._lock.release(refused=refused)

    def _build(self, cfg: JobConfig, dist: DistInfo) -> None:
        from hpcvae.data import DataPosition, make_data
        from hpcvae.models import model_from_config

        self._apply_determinism()
        self.manifest = Manifest.load(cfg.data.path)
        size = self.manifest.image_size
        if cfg.model.image_size is not None and cfg.model.image_size != size:
            raise ConfigError(
                f"{self.manifest.path}: images are {size}x{size} but model.image_size = {cfg.model.image_size}; "
                "drop model.image_size or re-shard at that size",
                collective=True,
            )
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        model = model_from_config(cfg.model, size)
        if model.conditional and not self.manifest.has_redshift:
            raise ConfigError(
                f"{self.manifest.path}: model {cfg.model.arch} is conditioned on redshift but the shard set has none; "
                "use vae128/vae158 or re-shard with redshifts",
                collective=True,
            )
        self.model = model
        # Every check against the checkpoint happens before anything is built or written.
        # Rank 0 verifies (sha256 of every file) and picks the checkpoint; every rank uses its choice.
        self.resume_from = on_rank0(lambda: resolve_resume(cfg.checkpoint.resume, self.out))
        self.resume_meta = read_meta(self.resume_from) if self.resume_from else None
        self.transform = self._choose_transform()
        model.set_normalisation(self.transform)  # the gaussian likelihood works in physical units
        if model.spec.likelihood == "gaussian" and "noise_std" not in self.manifest.stats("train"):
            raise ConfigError(
                f"{self.manifest.path}: model.likelihood = 'gaussian' needs each galaxy's noise variance, but the "
                "shards carry none (the catalog had no NOISE_VARIANCE); use likelihood 'mse'",
                collective=True,
            )
        # ShardData streams the tar shards; GpuResidentData (data.gpu_resident) holds the split on the device.
        self.data = make_data(cfg.data, self.manifest, rank=dist.rank, world_size=dist.world_size,
                              seed=cfg.train.seed, transform=self.transform,
                              max_steps=cfg.train.max_steps_per_epoch, device=dist.device)  # fmt: skip
        self.position = DataPosition(inputs=self.data.inputs)
        """The checkpoint's data position, once loaded (see :meth:`_resume`)."""
        rs = _rank_seed(cfg.train.seed, dist.rank)
        torch.manual_seed(rs)
        np.random.seed(rs % (1 << 32))
        import random

        random.seed(rs)

        self.engine: Engine = build_engine(cfg, model, dist)
        self.steps_per_epoch = self.data.steps_per_epoch
        self.total_steps = self.steps_per_epoch * cfg.train.epochs
        self.scheduler = lr_scheduler(self.engine.optimizer, cfg.scheduler, total_steps=self.total_steps,
                                      steps_per_epoch=self.steps_per_epoch)  # fmt: skip
        self.beta = beta_schedule(cfg.beta)
        self.checkpointer = Checkpointer(self.out, keep_last=cfg.checkpoint.keep_last, dist=dist)
        # Control collectives (stop flag) on the CPU: no GPU sync at the step boundary.
        self._ctrl_group = None
        if dist.distributed and dist.backend != "gloo":
            self._ctrl_group = tdist.new_group(backend="gloo")

        self.epoch = 0
        self.step_in_epoch = 0
        self.pool: np.ndarray | None = None
        """The current epoch's samples (manifest indices) when it finishes an interrupted one; else all."""
        self.global_step = 0
        self.last_checkpoint: Path | None = None
        self.summary: dict[str, Any] = {"images_per_s": None, "train": {}, "val": {}}
        self._acc = torch.zeros(len(METRICS), device=dist.device)
        self._acc_steps = 0
        self._wait = 0.0
        self._window_t0 = time.perf_counter()
        self._images_seen = 0
        self._train_time = 0.0
        self.metrics = Metrics(self.out, enabled=dist.is_main, status_every=cfg.train.status_every)
        # Numerical health, on the device (read at control points only): the first global step whose loss
        # or gradient was not finite (-1: none), and the keys of the batches since the last control point.
        self._bad_at = torch.full((), -1, dtype=torch.int64, device=dist.device)
        self._stop_agreed = False
        # Control points come at most sync_every steps apart, so the bad step is always in this window.
        self._recent: deque[tuple[int, int, int, list[str]]] = deque(maxlen=cfg.train.sync_every)
        self._resume()
        if self._lock is not None and dist.is_main:  # every refusal check has passed
            self._lock.announce()
        if cfg.data.verify:
            self._verify_shards()
        if dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.toml").write_text(dump_toml(cfg))
            if cfg.train.engine == "deepspeed":
                (self.out / "deepspeed_config.json").write_text(json.dumps(self.engine.ds_config, indent=1))

    # -- set-up -------------------------------------------------------------------------------
    def _apply_determinism(self) -> None:
        if self.cfg.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=False)
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True
        elif self.dist.device.type == "cuda":
            torch.backends.cudnn.benchmark = True

    def _expect(self) -> dict[str, Any]:
        return {
            "arch": self.cfg.model.arch,
            "model_config": self.model.config,
            "engine": self.cfg.train.engine,
        }

    def _verify_shards(self) -> None:
        """Every shard's sha256 against the manifest, once per run folder (the ranks share the hashing)."""
        from hpcvae.shards.manifest import (
            VERIFY_CACHE,
            check_hashes,
            hash_shards,
            shards_to_verify,
            write_verify_cache,
        )

        cache = self.out / VERIFY_CACHE
        todo, records = shards_to_verify(self.manifest, cache)
        t0 = time.perf_counter()
        mine = hash_shards(self.manifest, todo[self.dist.rank :: self.dist.world_size])
        if self.dist.distributed:
            parts: list[Any] = [None] * self.dist.world_size
            tdist.all_gather_object(parts, mine, group=self._ctrl_group)
            mine = {k: v for part in parts for k, v in part.items()}
        check_hashes(self.manifest, mine)
        if todo:
            gb = sum(r["size"] for r in mine.values()) / 1e9
            print0(f"data: verified {len(todo)} shard(s), {gb:.2f} GB, against {self.manifest.path} "
                   f"in {time.perf_counter() - t0:.1f} s")  # fmt: skip
            if self.dist.is_main:
                self.out.mkdir(parents=True, exist_ok=True)
                write_verify_cache(cache, self.manifest, {**records, **mine})

    def _choose_transform(self) -> Any:
        """The normalisation: from the manifest, or the checkpoint's when resuming.

        A resume on another shard set, or with another ``data.transform``, would feed the model
        differently normalised pixels mid-training; it is refused unless
        ``checkpoint.allow_new_data``, and then the checkpoint's normalisation is kept.
        """
        from hpcvae.transforms import get_transform, transform_from_dict

        fresh = get_transform(self.cfg.data.transform, self.manifest.stats("train"))
        meta = self.resume_meta
        if meta is None:
            return fresh
        for key, want in self._expect().items():  # cheap checks first: nothing built yet
            if meta.get(key) != want:
                raise CheckpointError(
                    f"{self.resume_from}: checkpoint has {key} = {meta.get(key)!r} but this run has {key} = {want!r}; "
                    "resume with the same setting or start fresh with --resume none",
                    collective=True,
                )
        changed = []
        if meta.get("manifest_digest") not in (None, self.manifest.digest):
            changed.append(f"--data {self.manifest.root} is another shard set (manifest digest differs)")
        saved = meta.get("transform")
        if saved is not None and saved != fresh.to_dict():
            changed.append(f"the normalisation differs ({saved['name']} {saved.get('params')} in the checkpoint, "
                           f"{fresh.name} {fresh.to_dict()['params']} now)")  # fmt: skip
        if not changed:
            return fresh
        if not self.cfg.checkpoint.allow_new_data:
            raise CheckpointError(
                f"{self.resume_from}: {'; '.join(changed)}; resuming would continue on other data. "
                "Pass --set checkpoint.allow_new_data=true to do it anyway, or --resume none to start fresh",
                collective=True,
            )
        self._new_data_note = "; ".join(changed)
        return transform_from_dict(saved) if saved is not None else fresh

    def _resume(self) -> None:
        from hpcvae.data import DataPosition, resume_plan

        folder, meta = self.resume_from, self.resume_meta
        if folder is None or meta is None:
            return
        saved = DataPosition(inputs=self.data.inputs)
        components = {"scheduler": self.scheduler, "data": saved}
        self.checkpointer.load(folder, engine=self.engine, components=components, meta=meta)
        self.global_step = int(meta["global_step"])
        self.summary = meta.get("summary", self.summary)
        self._images_seen = int(self.summary.get("images_seen", 0))
        self._train_time = float(self.summary.get("train_time_s", 0.0))
        note = getattr(self, "_new_data_note", None)
        if note is not None:
            # The old epoch's plan named samples of the old shard set: it cannot be finished here.
            self.epoch, self.step_in_epoch = (
                saved.epoch + (1 if saved.step or saved.pool is not None else 0),
                0,
            )
            print0(f"resume: new data: {note}; epoch {self.epoch + 1} starts on it, and the run keeps the "
                   f"normalisation of the checkpoint ({self.transform.to_dict()})")  # fmt: skip
        else:
            r = resume_plan(
                saved.inputs, epoch=saved.epoch, step=saved.step, pool=saved.pool, new=self.data.inputs
            )
            self.epoch, self.step_in_epoch, self.pool = r.epoch, r.step, r.pool
            if r.note:
                print0(r.note)
        self.last_checkpoint = folder
        steps = self.data.epoch_steps(self.pool)
        print0(f"resumed from {folder} at epoch {self.epoch}, step {self.step_in_epoch}/{steps} "
               f"(global step {self.global_step})")  # fmt: skip

    # -- stopping -------------------------------------------------------------------------------
    def request_stop(self) -> None:
        """Ask the loop to checkpoint and stop at the next step boundary (signal- and thread-safe)."""
        self._stop_requested = True

    @property
    def stop_requested(self) -> bool:
        return self._stop_requested

    def _install_signals(self) -> dict[int, Any]:
        old: dict[int, Any] = {}
        if threading.current_thread() is not threading.main_thread():
            return old  # the launcher calls request_stop() instead
        for sig in (signal.SIGUSR2, signal.SIGTERM):
            old[sig] = signal.signal(sig, lambda signum, frame: self.request_stop())
        return old

    def _control_point(self) -> bool:
        """Agree across ranks on stopping, and stop with an error on non-finite numbers; True = stop now.

        One host sync (the device health flags) and, with several ranks, one all-reduce of three
        integers on the CPU group: run every ``train.sync_every`` steps and before every save, so
        nothing non-finite is ever checkpointed and no rank is left alone in a collective.
        """
        bad_at = int(self._bad_at.item())
        in_a_row = int(self.engine.skipped_in_a_row.item())
        stop = self._stop_requested
        if self.dist.distributed:
            big = 1 << 62  # MAX-reduce of (big - step) gives the earliest bad step of any rank
            t = torch.tensor([int(stop), big - bad_at if bad_at >= 0 else 0, in_a_row], dtype=torch.int64)
            tdist.all_reduce(t, op=tdist.ReduceOp.MAX, group=self._ctrl_group)
            stop, bad_at, in_a_row = bool(t[0]), (big - int(t[1])) if int(t[1]) else -1, int(t[2])
        if bad_at >= 0:
            raise self._numerical_error(bad_at)
        limit = self.cfg.train.max_skipped_in_a_row
        if in_a_row >= limit:
            raise NumericalError(
                f"at least {limit} optimizer steps in a row were skipped for fp16 overflow (up to global step "
                f"{self.global_step}): the loss scale cannot recover; the last good checkpoint is "
                f"{self.last_checkpoint or 'none'}. Use --precision bf16, lower optim.lr, or check the data",
                collective=True,
            )
        self._recent.clear()
        self._stop_agreed = stop
        return stop

    def _numerical_error(self, bad_at: int) -> NumericalError:
        """The error for the first non-finite step: its epoch, step and batch keys, from whichever rank had it."""
        mine = next(((e, s, k) for g, e, s, k in self._recent if g == bad_at), None)
        if self.dist.distributed:
            parts: list[Any] = [None] * self.dist.world_size
            tdist.all_gather_object(parts, mine, group=self._ctrl_group)
            found = [p for p in parts if p is not None]
            keys = [k for p in found for k in p[2]]
            mine = (found[0][0], found[0][1], keys) if found else None
        epoch, step, keys = mine if mine is not None else (self.epoch, -1, [])
        shown = ", ".join(keys[:8]) + (f" (+{len(keys) - 8} more)" if len(keys) > 8 else "")
        return NumericalError(
            f"non-finite loss or gradient at epoch {epoch + 1}, step {step + 1} of the epoch (global step "
            f"{bad_at + 1}); batch keys: {shown or 'unknown'}; the last good checkpoint is "
            f"{self.last_checkpoint or 'none (none was written yet)'} and no model was written. Check those "
            "samples (hpcvae.shard --skip-bad, data.verify) or lower optim.lr",
            collective=True,
        )

    # -- the loop -----------------------------------------------------------------------------
    def train(self) -> RunResult:
        cfg = self.cfg
        old = self._install_signals()
        try:
            self._open_logs()
            print0(
                f"{cfg.model.arch} ({cfg.model.flavour}, {self.model.image_size}px) on {self.dist.world_size} rank(s), "
                f"engine {cfg.train.engine}, {cfg.train.precision}: {self.steps_per_epoch} steps/epoch of "
                f"{self.dist.world_size}x{cfg.data.batch_size}, {self.data.dropped_per_epoch} of "
                f"{self.manifest.count('train')} train samples dropped per epoch"
            )
            while self.epoch < cfg.train.epochs:
                if not self._train_epoch():
                    return self._result("preempted")
                self.epoch += 1
                self.step_in_epoch = 0
                self.pool = None
                self.save_checkpoint()
                if self._stop_agreed and self.epoch < cfg.train.epochs:  # asked during the epoch's last steps
                    print0(
                        f"stop requested: checkpoint {self.last_checkpoint} written at step {self.global_step}"
                    )
                    return self._result("preempted")
            model_path = self._finish()
            return self._result("completed", model_path)
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)
            self._close_logs()
            self.data.close()
            self._unlock()

    def _train_epoch(self) -> bool:
        """One epoch from ``step_in_epoch``; False when stopped early (checkpoint written)."""
        epoch = self.epoch
        beta = self.beta(epoch)
        steps = self.data.epoch_steps(self.pool)
        loader = self.data.train_loader(epoch, start_step=self.step_in_epoch, pool=self.pool)
        self.metrics.epoch(f"epoch {epoch + 1}/{self.cfg.train.epochs}", total=steps, done=self.step_in_epoch)
        self._window_t0, self._wait = time.perf_counter(), 0.0
        it = iter(loader)
        every = self.cfg.checkpoint.every_steps
        sync_every = self.cfg.train.sync_every
        # One process needs no agreement: a stop request is seen at the very next step.
        local_stop = not self.dist.distributed
        self.engine.module.train()
        while self.step_in_epoch < steps:
            t0 = time.perf_counter()
            batch = next(it)
            self._wait += time.perf_counter() - t0
            self.train_step(batch, beta)
            self.metrics.step()
            if self._acc_steps >= self.cfg.train.log_every:
                self._log_train(beta)
            due = every and self.global_step % every == 0 and self.step_in_epoch < steps
            if due or self.global_step % sync_every == 0 or (local_stop and self._stop_requested):
                if self._control_point():
                    if self._acc_steps:
                        self._log_train(beta)
                    self.save_checkpoint()
                    print0(
                        f"stop requested: checkpoint {self.last_checkpoint} written at step {self.global_step}"
                    )
                    return False
                if due:
                    self.save_checkpoint()
        try:  # let the loader finish: it checks that it gave exactly the planned batches
            next(it)
            raise HpcvaeError(f"epoch {epoch}: the loader gave more batches than the {steps} planned")
        except StopIteration:
            pass
        if self._acc_steps:
            self._log_train(beta)
        if (epoch + 1) % self.cfg.train.val_every == 0 or epoch + 1 == self.cfg.train.epochs:
            self.validate(beta)
        return True

    def train_step(self, batch: dict[str, Any], beta: float) -> None:
        """One optimizer step on one batch, plus the bookkeeping (no host sync)."""
        x = self.engine.prepare(batch["image"])
        r = nv = None
        if self.model.conditional:
            r = batch["redshift"].to(self.dist.device, non_blocking=True)
        if self.model.spec.likelihood == "gaussian":
            nv = batch["noise_var"].to(self.dist.device, non_blocking=True)
        losses = self.forward_backward_step(x, r, beta, nv)
        self.engine.step()
        self.scheduler.step()
        self._recent.append((self.global_step, self.epoch, self.step_in_epoch, list(batch.get("key", []))))
        if not self.engine.overflow_is_normal:  # fp16 skips and counts overflow steps instead
            ok = torch.isfinite(losses["total"].detach())
            if self.engine.grad_finite is not None:
                ok = ok & self.engine.grad_finite
            self._bad_at.masked_fill_(~ok & (self._bad_at < 0), self.global_step)
        w = 1.0 if self.model.spec.recon_reduction == "sum" else float(x.shape[0])
        zero = losses["total"].new_zeros(())
        self._acc += (
            torch.stack(
                [losses["total"], losses["recon"], losses["kl"], losses.get("redshift", zero)]
            ).detach()
            * w
        )
        self._acc_steps += 1
        self.step_in_epoch += 1
        self.global_step += 1
        self._images_seen += x.shape[0] * self.dist.world_size

    def forward_backward_step(
        self,
        x: torch.Tensor,
        redshift: torch.Tensor | None,
        beta: float,
        noise_var: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Forward through the distributed wrapper (its hooks all-reduce gradients), loss, backward."""
        out = self.engine.forward(x, redshift)
        losses = self.model.compute_loss(out, x, redshift, beta, noise_var=noise_var)
        self.engine.backward(losses["total"])
        return losses

    @torch.no_grad()
    def validate(self, beta: float) -> dict[str, float]:
        """Loss over the whole val split: per-rank sums all-reduced, so every rank gets the same numbers."""
        module = self.engine.module
        module.eval()
        sums = torch.zeros(len(METRICS) + 1, dtype=torch.float64, device=self.dist.device)
        lockstep = self.cfg.train.engine == "deepspeed" and self.cfg.deepspeed.zero_stage == 3
        it = iter(self.data.val_loader())
        size = self.model.image_size
        filler = {"image": torch.zeros(1, 1, size, size), "redshift": torch.full((1,), 0.5),
                  "noise_var": torch.ones(1)}  # fmt: skip
        while True:
            batch = next(it, None)
            # ZeRO-3 gathers parameters collectively, so with uneven val shares the ranks that
            # run out keep doing (discarded) forwards until every rank is done.
            if not (self._any(batch is not None) if lockstep else batch is not None):
                break
            real = batch is not None
            batch = batch if real else filler
            x = self.engine.prepare(batch["image"])
            r = batch["redshift"].to(self.dist.device) if self.model.conditional else None
            nv = batch["noise_var"].to(self.dist.device) if self.model.spec.likelihood == "gaussian" else None
            with self.engine.autocast():
                out = module(x, r)
            losses = module.compute_loss(out, x, r, beta, noise_var=nv)
            if not real:
                continue
            w = 1.0 if self.model.spec.recon_reduction == "sum" else float(x.shape[0])
            zero = losses["total"].new_zeros(())
            vals = [losses["total"], losses["recon"], losses["kl"], losses.get("redshift", zero)]
            sums[:-1] += torch.stack([v.double() for v in vals]) * w
            sums[-1] += x.shape[0]
        if self.dist.distributed:
            tdist.all_reduce(sums)
        module.train()
        s = sums.tolist()
        n = s[-1]
        res = {k: (s[i] / n if n else float("nan")) for i, k in enumerate(METRICS)}
        if not self.model.predicts_redshift:
            res.pop("redshift")
        res["count"] = int(n)
        self.summary["val"] = res
        self._write_metrics(
            {"kind": "val", "epoch": self.epoch, "step": self.global_step, "beta": beta, **res}
        )
        print0(
            f"epoch {self.epoch + 1}: val loss {res['loss']:.6g} (recon {res['recon']:.6g}, kl {res['kl']:.6g}) on {int(n)} images"
        )
        return res

    def _any(self, flag: bool) -> bool:
        if not self.dist.distributed:
            return flag
        t = torch.tensor([int(flag)], dtype=torch.int32)
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX, group=self._ctrl_group)
        return bool(t.item())

    # -- logging ------------------------------------------------------------------------------
    def _open_logs(self) -> None:
        # A resumed run purges TensorBoard events past its checkpoint: the replayed steps appear once.
        self.metrics.open(
            total=self.steps_per_epoch, purge_step=self.global_step if self.resume_from else None
        )
        self._write_metrics({"kind": "start", "step": self.global_step, "epoch": self.epoch,
                             "steps_per_epoch": self.steps_per_epoch, "world_size": self.dist.world_size,
                             "batch_size": self.cfg.data.batch_size,
                             "dropped_per_epoch": self.data.dropped_per_epoch,
                             "train_count": self.manifest.count("train")})  # fmt: skip

    def _close_logs(self) -> None:
        self.metrics.close()

    def _write_metrics(self, rec: dict[str, Any]) -> None:
        self.metrics.write(rec)

    def _log_train(self, beta: float) -> None:
        """One host sync: turn the accumulated device metrics into numbers and write them."""
        n = self._acc_steps
        vals = (self._acc / n).tolist()
        skipped = int(self.engine.skipped.item())
        dt = time.perf_counter() - self._window_t0
        self._train_time += dt
        images = n * self.cfg.data.batch_size * self.dist.world_size
        per_image = 1.0 if self.model.spec.recon_reduction == "mean" else 1.0 / self.cfg.data.batch_size
        m = {k: v * per_image for k, v in zip(METRICS, vals)}
        if not self.model.predicts_redshift:
            m.pop("redshift")
        if self.dist.distributed:  # report the mean over ranks, not rank 0's share
            t = torch.tensor(list(m.values()), dtype=torch.float64)
            tdist.all_reduce(t, group=self._ctrl_group)
            m = dict(zip(m, (t / self.dist.world_size).tolist()))
        rec = {"kind": "train", "epoch": self.epoch, "step": self.global_step, **m, "lr": self.engine.lr(),
               "beta": beta, "step_time_s": dt / n, "images_per_s": images / dt if dt > 0 else None,
               "data_wait_share": self._wait / dt if dt > 0 else 0.0, "skipped_steps": skipped,
               "dropped_samples": self.data.dropped_per_epoch}  # fmt: skip
        self.summary["train"] = m
        self.summary["images_per_s"] = rec["images_per_s"]
        self.summary["skipped_steps"] = skipped
        self._write_metrics(rec)
        self.metrics.postfix(loss=f"{m['loss']:.4g}", img_s=f"{rec['images_per_s'] or 0:.0f}")
        self._acc.zero_()
        self._acc_steps = 0
        self._wait = 0.0
        self._window_t0 = time.perf_counter()

    # -- checkpoints and the end of the run ---------------------------------------------------
    def _summary(self) -> dict[str, Any]:
        return {**self.summary, "epochs": self.epoch, "steps": self.global_step, "images_seen": self._images_seen,
                "train_time_s": self._train_time, "world_size": self.dist.world_size,
                "engine": self.cfg.train.engine, "precision": self.cfg.train.precision}  # fmt: skip

    def lr_schedule_dict(self) -> dict[str, Any]:
        """The LR curve for model.json: optimizer, scheduler config and the step counts it was laid over."""
        return {"optim": to_dict(self.cfg.optim), "scheduler": to_dict(self.cfg.scheduler),
                "total_steps": self.total_steps, "steps_per_epoch": self.steps_per_epoch,
                "last_lr": self.engine.lr()}  # fmt: skip

    def save_checkpoint(self) -> Path:
        """An all-rank checkpoint of the current state, after checking it is numerically sound."""
        from hpcvae.data import DataPosition

        self._control_point()  # raises before anything non-finite reaches the disk
        meta = {
            "global_step": self.global_step, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
            "steps_per_epoch": self.steps_per_epoch, "batch_size": self.cfg.data.batch_size,
            "arch": self.cfg.model.arch, "model_config": self.model.config, "engine": self.cfg.train.engine,
            "zero_stage": self.cfg.deepspeed.zero_stage, "precision": self.cfg.train.precision,
            "manifest_digest": self.manifest.digest, "transform": self.transform.to_dict(),
            "beta": self.beta.to_dict(), "lr_schedule": self.lr_schedule_dict(), "summary": self._summary(),
            "hpcvae_version": __version__,
        }  # fmt: skip
        position = DataPosition(
            inputs=self.data.inputs, epoch=self.epoch, step=self.step_in_epoch, pool=self.pool
        )
        self.last_checkpoint = self.checkpointer.save(
            self.global_step, engine=self.engine, components={"scheduler": self.scheduler, "data": position},
            meta={**meta, "data_plan": self.data.inputs.to_dict()}, config_toml=dump_toml(self.cfg),
        )  # fmt: skip
        return self.last_checkpoint

    def _finish(self) -> Path:
        """Consolidated fp32 model + sample grid (rank 0), from the final state."""
        from hpcvae.model_files import MODEL_FILE, write_model

        self._control_point()
        sd = self.engine.full_state_dict(self.last_checkpoint)
        path = self.out / MODEL_FILE
        if self.dist.is_main:
            write_model(self.out, sd, model_config=self.model.config, transform=self.transform.to_dict(),
                        training=self._summary(), manifest_digest=self.manifest.digest,
                        beta_schedule=self.beta.to_dict(), lr_schedule=self.lr_schedule_dict())  # fmt: skip
            if self.cfg.train.sample_grid:
                write_samples(self.out)
        barrier()
        return path

    def _result(self, status: Literal["completed", "preempted"], model_path: Path | None = None) -> RunResult:
        return RunResult(status=status, out=self.out, epoch=self.epoch, global_step=self.global_step,
                         checkpoint=self.last_checkpoint, model_path=model_path, summary=self._summary())  # fmt: skip


def write_samples(run_dir: Path, n: int = 64, redshift: float = 0.7, seed: int = 0) -> Path:
    """An 8x8 grid of generated galaxies from the consolidated model (fixed redshift for conditional models)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hpcvae.model_files import load_model

    model = load_model(run_dir)
    g = torch.Generator().manual_seed(seed)
    imgs = model.sample(n, redshift=redshift if model.conditional else None, generator=g, normalized=True)
    imgs = imgs[:, 0].float().numpy()
    side = int(math.ceil(math.sqrt(n)))
    fig, axes = plt.subplots(side, side, figsize=(side, side))
    for i, ax in enumerate(np.asarray(axes).ravel()):
        ax.axis("off")
        if i < n:
            ax.imshow(imgs[i], cmap="gray", origin="lower", vmin=0, vmax=1)
    title = f"{model.config['arch']} samples" + (f" at z = {redshift}" if model.conditional else "")
    fig.suptitle(title, fontsize=8)
    path = Path(run_dir) / "samples.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
