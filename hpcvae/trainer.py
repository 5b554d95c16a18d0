"""The VAE trainer: ``Trainer.train()`` -> ``hpcvae.loop.Loop.run()`` -> ``train_step()`` -> ``forward_backward_step()``.

One trainer for every engine and precision (the differences live in ``hpcvae.engines``); the
epochs, stops, control points and checkpoint cadence are the shared loop's (``hpcvae.loop``).
Rules it keeps:

* Exact epochs: every rank runs ``ShardData.steps_per_epoch`` steps; a resumed epoch
  starts at the consumed step, so a preempted-and-resumed run matches an uninterrupted one
  bit for bit (same data order, same RNG streams, same optimizer state); under another
  layout the interrupted epoch is finished with exactly its remaining samples.
* No host sync on the hot path: metrics accumulate in a device tensor and are read every
  ``train.log_every`` steps; health and stop flags every ``train.sync_every`` steps.
* Data loading never touches the global torch RNG (``hpcvae.data.EpochLoader`` guards it),
  so the reparameterisation noise stream depends only on the training steps.
  Bit-identical resume also needs the same kernels: same device, world size, precision
  and CPU thread count (``OMP_NUM_THREADS``), since BLAS reductions depend on threads.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as tdist

from hpcvae._version import __version__
from hpcvae.checkpoint import read_meta, resolve_resume
from hpcvae.config import EngineConfig, JobConfig, dump_toml, to_dict
from hpcvae.dist import DistInfo, barrier, on_rank0, print0
from hpcvae.engines import Engine, build_engine
from hpcvae.errors import ConfigError, HpcvaeError
from hpcvae.loop import Loop, LoopConfig
from hpcvae.metrics import Metrics
from hpcvae.model_files import MODEL_FILE
from hpcvae.models.data_fit import check_model_fits
from hpcvae.schedules import beta_schedule, lr_scheduler
from hpcvae.shards.manifest import Manifest, verify_for_run

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


def portable(x: Any) -> Any:
    """A copy without the training machine's absolute paths: files are named by their name (and sha256)."""
    if isinstance(x, dict):
        return {k: portable(v) if k not in ("catalog", "fits_catalog", "table", "h5") or not isinstance(v, str)
                else Path(v).name for k, v in x.items()}  # fmt: skip
    if isinstance(x, list):
        return [portable(v) for v in x]
    return x


def _rank_seed(seed: int, rank: int) -> int:
    """Independent per-rank streams that do not overlap another seed's rank 0."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


class Trainer(Loop):
    """Trains one VAE; every method runs on all ranks together."""

    def __init__(self, cfg: JobConfig, dist: DistInfo) -> None:
        self.cfg, self.dist = cfg, dist
        self.out = Path(cfg.out)
        self._stop_requested = False
        self._open_run(
            self.out, lambda: self._build(cfg, dist), what="hpcvae.train", lock=cfg.checkpoint.lock
        )

    def _build(self, cfg: JobConfig, dist: DistInfo) -> None:
        from hpcvae.data import DataPosition, make_data
        from hpcvae.models import get_arch, model_from_config

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
        model = model_from_config(
            cfg.model,
            size,
            conditions=self.manifest.condition_names,
            noise_known=self.manifest.has_noise_variance,
        )
        default = get_arch(cfg.model.arch).default_likelihood(cfg.model.flavour)
        if cfg.model.likelihood is None and default and model.spec.likelihood != default:
            print0(f"model: likelihood {model.spec.likelihood} ({self.manifest.path} carries no noise variance "
                   f"for {cfg.model.arch}'s default, {default})")  # fmt: skip
        model.set_conditions(self._condition_records())
        resolved = {"likelihood": model.spec.likelihood,
                    "conditions": list(model.spec.conditions) if model.multi_condition else None}  # fmt: skip
        cfg = self.cfg = dataclasses.replace(
            cfg, model=dataclasses.replace(cfg.model, **resolved)
        )  # what ran
        check_model_fits(
            model, self.manifest, where=str(self.manifest.path), error=ConfigError, collective=True
        )
        self.model = model
        # Every check against the checkpoint happens before anything is built or written.
        # Rank 0 verifies (sha256 of every file) and picks the checkpoint; every rank uses its choice.
        self.resume_from = on_rank0(lambda: resolve_resume(cfg.checkpoint.resume, self.out))
        self.resume_meta = read_meta(self.resume_from) if self.resume_from else None
        self.transform = self._choose_transform()
        model.set_normalisation(self.transform)  # the gaussian likelihood works in physical units
        # ShardData streams the tar shards; GpuResidentData (data.gpu_resident) holds the split on the device.
        self.data = make_data(cfg.data, self.manifest, rank=dist.rank, world_size=dist.world_size,
                              seed=cfg.train.seed, transform=self.transform,
                              max_steps=cfg.train.max_steps_per_epoch, device=dist.device,
                              psf=model.spec.psf_forward)  # fmt: skip
        self.position = DataPosition(inputs=self.data.inputs)
        """The checkpoint's data position, once loaded (see :meth:`_resume`)."""
        rs = _rank_seed(cfg.train.seed, dist.rank)
        torch.manual_seed(rs)
        np.random.seed(rs % (1 << 32))
        import random

        random.seed(rs)

        cfg = self._resolve_hardware(cfg, dist)
        engine = build_engine(EngineConfig.from_job(cfg), model, dist)
        self.steps_per_epoch = self.data.steps_per_epoch
        self.total_steps = self.steps_per_epoch * cfg.train.epochs
        self.scheduler = lr_scheduler(engine.optimizer, cfg.scheduler, total_steps=self.total_steps,
                                      steps_per_epoch=self.steps_per_epoch)  # fmt: skip
        self.beta = beta_schedule(cfg.beta, default=model.likelihood.default_beta or 0.1)
        if cfg.beta.value is None:  # the records say which β ran
            cfg = self.cfg = dataclasses.replace(cfg, beta=self.beta.cfg)
        t, c = cfg.train, cfg.checkpoint
        loop = LoopConfig(epochs=t.epochs, every_steps=c.every_steps, keep_last=c.keep_last, sync_every=t.sync_every,
                          log_every=t.log_every, max_skipped_in_a_row=t.max_skipped_in_a_row,
                          sync_seconds=t.sync_seconds)  # fmt: skip
        Loop.__init__(self, loop=loop, dist=dist, engine=engine, checkpoint_dir=self.out,
                      metrics=Metrics(self.out, enabled=dist.is_main, status_every=t.status_every,
                                      sinks=cfg.metrics.sinks))  # fmt: skip
        self.engine: Engine = engine
        self.pool: np.ndarray | None = None
        """The current epoch's samples (manifest indices) when it finishes an interrupted one; else all."""
        self.summary: dict[str, Any] = {"images_per_s": None, "train": {}, "val": {}}
        self._acc = torch.zeros(len(METRICS), device=dist.device)
        self._wait = 0.0
        self._window_t0 = time.perf_counter()
        self._images_seen = 0
        self._train_time = 0.0
        self._beta_now = self.beta(0)
        self._check_changed_options()
        self._resume()
        self._announce_run()  # every refusal check has passed
        if cfg.data.verify:
            verify_for_run(self.manifest, self.out, dist, group=self._ctrl_group)
        if dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.toml").write_text(self.checkpoint_config())
            if cfg.train.engine == "deepspeed":
                (self.out / "deepspeed_config.json").write_text(json.dumps(self.engine.ds_config, indent=1))

    def _condition_records(self) -> list[dict[str, Any]]:
        """The shard set's conditions; a set from before conditions existed has its redshift as the one."""
        if self.manifest.conditions:
            return self.manifest.conditions
        if self.manifest.has_redshift:
            return [{"name": self.manifest.data.get("redshift_column") or "zphot", "role": "redshift"}]
        return []

    @functools.cache  # noqa: B019  (one trainer per process)
    def _condition_index(self) -> dict[str, int]:
        return {str(r["name"]): i for i, r in enumerate(self._condition_records())}

    def _resolve_hardware(self, cfg: JobConfig, dist: DistInfo) -> JobConfig:
        """``auto`` precision and layout decided by :mod:`hpcvae.hardware`; printed once, then recorded."""
        import dataclasses

        from hpcvae import hardware

        prec, layout = hardware.resolve_training(cfg.train.precision, cfg.train.channels_last, dist.device)
        self.hardware = {"device": hardware.capabilities(dist.device).to_dict(), "precision": prec.value,
                         "precision_reason": prec.reason, "channels_last": layout.value,
                         "channels_last_reason": layout.reason}  # fmt: skip
        print0(f"precision {prec.value} ({prec.reason}); channels_last {layout.value} ({layout.reason})")
        warning = hardware.warn_line(prec)
        if warning:
            print0(warning)
        train = dataclasses.replace(cfg.train, precision=prec.value, channels_last=layout.value)
        self.cfg = dataclasses.replace(cfg, train=train)
        return self.cfg

    def _check_changed_options(self) -> None:
        from hpcvae.resume_rules import check_changed_options

        check_changed_options(self.resume_from, self.cfg, self.resume_meta)

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

    def _choose_transform(self) -> Any:
        from hpcvae.resume_rules import choose_transform

        t, self._new_data_note = choose_transform(self.cfg, self.manifest, self.resume_meta, self.resume_from,
                                                  self._expect())  # fmt: skip
        return t

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

    def train(self) -> RunResult:
        """Run every remaining epoch (``Loop.run``); the result says completed or preempted."""
        cfg = self.cfg
        # A resumed run purges TensorBoard events past its checkpoint: the replayed steps appear once.
        self.metrics.open(
            total=self.steps_per_epoch, purge_step=self.global_step if self.resume_from else None
        )
        self._write_metrics({"kind": "start", "step": self.global_step, "epoch": self.epoch,
                             "steps_per_epoch": self.steps_per_epoch, "world_size": self.dist.world_size,
                             "batch_size": cfg.data.batch_size, "dropped_per_epoch": self.data.dropped_per_epoch,
                             "train_count": self.manifest.count("train")})  # fmt: skip
        print0(
            f"{cfg.model.arch} ({cfg.model.flavour}, {self.model.image_size}px) on {self.dist.world_size} rank(s), "
            f"engine {cfg.train.engine}, {cfg.train.precision}: {self.steps_per_epoch} steps/epoch of "
            f"{self.dist.world_size}x{cfg.data.batch_size}, {self.data.dropped_per_epoch} of "
            f"{self.manifest.count('train')} train samples dropped per epoch"
        )
        self.metrics.text("config", "```toml\n" + self.checkpoint_config() + "\n```", self.global_step)
        status = self.run()
        return self._result(status, self.out / MODEL_FILE if status == "completed" else None)

    # -- the loop's hooks ---------------------------------------------------------------------------
    def epoch_batches(self) -> tuple[int, Iterator[Any]]:
        steps = self.data.epoch_steps(self.pool)
        loader = self.data.train_loader(self.epoch, start_step=self.step_in_epoch, pool=self.pool)
        self._beta_now = self.beta(self.epoch)
        self.metrics.epoch(
            f"epoch {self.epoch + 1}/{self.cfg.train.epochs}", total=steps, done=self.step_in_epoch
        )
        self._window_t0, self._wait = time.perf_counter(), 0.0
        self.engine.module.train()
        return steps, self._timed(iter(loader))

    def _timed(self, it: Iterator[Any]) -> Iterator[Any]:
        """The loader's batches, with the time spent waiting for them (the data_wait_share metric)."""
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            self._wait += time.perf_counter() - t0
            yield batch

    def end_epoch(self, batches: Iterator[Any]) -> None:
        """Let the loader finish: it checks that it gave exactly the planned batches."""
        if next(batches, None) is not None:
            raise HpcvaeError(f"epoch {self.epoch}: the loader gave more batches than planned")

    def validate_epoch(self) -> None:
        epoch = self.epoch
        if (epoch + 1) % self.cfg.train.val_every == 0 or epoch + 1 == self.cfg.train.epochs:
            self.validate(self._beta_now)

    def next_epoch(self) -> None:
        self.pool = None

    def log_train(self) -> None:
        self._log_train(self._beta_now)

    def close(self) -> None:
        self.data.close()
        super().close()

    def train_step(self, batch: dict[str, Any], beta: float | None = None) -> None:
        """One optimizer step on one batch, plus the bookkeeping (no host sync).

        ``beta`` defaults to the schedule's value for the current epoch.
        """
        beta = self._beta_now if beta is None else beta
        x, r, nv, psf = self._inputs(batch)
        losses = self.forward_backward_step(x, r, beta, nv, psf)
        self.engine.step()
        self.scheduler.step()
        self.record_step(losses["total"], list(batch.get("key", [])))
        w = 1.0 if self.model.spec.recon_reduction == "sum" else float(x.shape[0])
        zero = losses["total"].new_zeros(())
        self._acc += (
            torch.stack(
                [losses["total"], losses["recon"], losses["kl"], losses.get("redshift", zero)]
            ).detach()
            * w
        )
        self._images_seen += x.shape[0] * self.dist.world_size

    def _inputs(self, batch: dict[str, Any]) -> tuple[torch.Tensor, Any, Any, Any]:
        """(images, redshifts, noise variances, PSFs) on the device, each only where the model uses it."""
        dev, spec = self.dist.device, self.model.spec
        x = self.engine.prepare(batch["image"])
        r = self._conditions(batch).to(dev, non_blocking=True) if self.model.conditional else None
        nv = (
            batch["noise_var"].to(dev, non_blocking=True)
            if "noise_var" in self.model.likelihood.needs
            else None
        )
        psf = batch["psf"].to(dev, non_blocking=True) if spec.psf_forward else None
        return x, r, nv, psf

    def _conditions(self, batch: dict[str, Any]) -> torch.Tensor | None:
        from hpcvae.models.conditions import from_batch

        return from_batch(self.model, batch, list(self._condition_index()))

    def forward_backward_step(
        self,
        x: torch.Tensor,
        redshift: torch.Tensor | None,
        beta: float,
        noise_var: torch.Tensor | None = None,
        psf: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Forward through the distributed wrapper (its hooks all-reduce gradients), loss, backward."""
        out = self.engine.forward(x, redshift)
        losses = self.model.compute_loss(out, x, redshift, beta, noise_var=noise_var, psf=psf)
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
        shown = None  # the first real val conditions: the samples below are drawn at them
        filler = {"image": torch.zeros(1, 1, size, size), "redshift": torch.full((1,), 0.5),
                  "cond": torch.full((1, max(1, len(self._condition_index()))), 0.5),
                  "noise_var": torch.ones(1), "psf": torch.ones(1, 1, 1, 1)}  # fmt: skip
        while True:
            batch = next(it, None)
            # ZeRO-3 gathers parameters collectively, so with uneven val shares the ranks that
            # run out keep doing (discarded) forwards until every rank is done.
            if not (self.any_rank(batch is not None) if lockstep else batch is not None):
                break
            real = batch is not None
            batch = batch if real else filler
            x, r, nv, psf = self._inputs(batch)
            with self.engine.autocast():
                out = module(x, r)
            losses = module.compute_loss(out, x, r, beta, noise_var=nv, psf=psf)
            if not real:
                continue
            if shown is None and r is not None:
                shown = r[:16]
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
        self._sample_image(shown)
        print0(
            f"epoch {self.epoch + 1}: val loss {res['loss']:.6g} (recon {res['recon']:.6g}, kl {res['kl']:.6g}) on {int(n)} images"
        )
        return res

    def _sample_image(self, cond: torch.Tensor | None) -> None:
        """Up to 16 samples at the first val galaxies' conditions into TensorBoard (rank 0; not ZeRO-3).

        The val conditions, not the training medians: a shard set from before conditions were
        recorded has no medians, and sampling must not be what fails a run.
        """
        if not self.dist.is_main or (
            self.cfg.train.engine == "deepspeed" and self.cfg.deepspeed.zero_stage == 3
        ):
            return
        m = self.engine.module
        if m.conditional and cond is None:
            return  # an empty val split: nothing to condition on
        n = 16 if cond is None else int(cond.shape[0])
        from hpcvae.evaluate.plots import mosaic

        g = torch.Generator(device=self.dist.device).manual_seed(self.cfg.train.seed)
        imgs = m.sample(n, cond, generator=g, normalized=True, prior="normal", extrapolate=True)
        imgs = imgs.float().cpu().numpy()[:, 0]
        cols = 4 if n % 4 == 0 else 1
        self.metrics.image("samples/normal_prior", mosaic(imgs.reshape(n // cols, cols, *imgs.shape[-2:])),
                           self.global_step)  # fmt: skip

    def _log_train(self, beta: float) -> None:
        """One host sync: turn the accumulated device metrics into numbers and write them."""
        n = self._steps_since_log
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
        self._wait = 0.0
        self._window_t0 = time.perf_counter()

    def _write_metrics(self, rec: dict[str, Any]) -> None:
        self.metrics.write(rec)

    def _summary(self) -> dict[str, Any]:
        return {**self.summary, "epochs": self.epoch, "steps": self.global_step, "images_seen": self._images_seen,
                "train_time_s": self._train_time, "world_size": self.dist.world_size,
                "engine": self.cfg.train.engine, "precision": self.cfg.train.precision,
                "hardware": self.hardware}  # fmt: skip

    def lr_schedule_dict(self) -> dict[str, Any]:
        """The LR curve for model.json: optimizer, scheduler config and the step counts it was laid over."""
        return {"optim": to_dict(self.cfg.optim), "scheduler": to_dict(self.cfg.scheduler),
                "total_steps": self.total_steps, "steps_per_epoch": self.steps_per_epoch,
                "last_lr": self.engine.lr()}  # fmt: skip

    def checkpoint_meta(self) -> dict[str, Any]:
        return {
            "steps_per_epoch": self.steps_per_epoch, "batch_size": self.cfg.data.batch_size,
            "arch": self.cfg.model.arch, "model_config": self.model.config, "engine": self.cfg.train.engine,
            "zero_stage": self.cfg.deepspeed.zero_stage, "precision": self.cfg.train.precision,
            "manifest_digest": self.manifest.digest, "transform": self.transform.to_dict(),
            "beta": self.beta.to_dict(), "lr_schedule": self.lr_schedule_dict(), "summary": self._summary(),
            "hpcvae_version": __version__, "data_plan": self.data.inputs.to_dict(), **self.provenance,
        }  # fmt: skip

    @functools.cached_property
    def provenance(self) -> dict[str, Any]:
        """model.json's physics (what a pixel means), training data and config digest.

        Computed once: every checkpoint's meta carries it, and it reads the set's PSF file.
        """
        m = self.manifest
        data = {"source": portable(m.data.get("source")), "counts": {s: m.count(s) for s in m.splits},
                "val_fraction": m.data.get("val_fraction"), "n_skipped": m.data.get("n_skipped"),
                "image_size": m.image_size, "synthetic": m.synthetic}  # fmt: skip
        return {"physics": {**m.physics(), "psf_free": self.model.spec.psf_forward}, "data": data,
                "conditions": portable(self.model.conditioning.records) if self.model.conditional else [],
                "config_sha256": hashlib.sha256(dump_toml(self.cfg).encode()).hexdigest()}  # fmt: skip

    def checkpoint_components(self) -> dict[str, Any]:
        from hpcvae.data import DataPosition

        position = DataPosition(
            inputs=self.data.inputs, epoch=self.epoch, step=self.step_in_epoch, pool=self.pool
        )
        return {"scheduler": self.scheduler, "data": position}

    def checkpoint_config(self) -> str:
        h = self.hardware
        head = (f"# precision and channels_last as resolved on {h['device']['name']}: {h['precision_reason']}; "
                f"{h['channels_last_reason']}\n")  # fmt: skip
        return head + dump_toml(self.cfg)

    def finish(self) -> Path:
        """Consolidated fp32 model + sample grid (rank 0), from the final state."""
        from hpcvae.evaluate.plots import write_samples
        from hpcvae.model_card import write_model_card
        from hpcvae.model_files import ModelInfo, write_model

        sd = self.engine.full_state_dict(self.last_checkpoint)
        if self.dist.is_main:
            write_model(self.out, sd, ModelInfo.from_checkpoint(self.checkpoint_meta()))
            write_model_card(self.out)
            if self.cfg.train.sample_grid:
                write_samples(self.out)
        barrier()
        return self.out / MODEL_FILE

    def _result(self, status: Literal["completed", "preempted"], model_path: Path | None = None) -> RunResult:
        return RunResult(status=status, out=self.out, epoch=self.epoch, global_step=self.global_step,
                         checkpoint=self.last_checkpoint, model_path=model_path, summary=self._summary())  # fmt: skip
