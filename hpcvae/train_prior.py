"""``python -m hpcvae.train_prior MODEL --data shards/NAME``: fit a flow prior to a trained VAE.

Two phases, on every rank:

1. encode this rank's share of the train split (one exact epoch of ``ShardData``, model
   in eval mode, encoder means) and of the val split into in-memory tensors;
2. train a ``zuko`` flow on those latents (conditioned on zphot for the conditional
   models) through the same DDP engine, checkpointer and LR schedules as VAE training:
   seeded per-epoch shuffles of each rank's fixed share, the same number of steps on every
   rank, atomic keep-last-K checkpoints with ``--resume auto``, SIGUSR2/SIGTERM -> save and
   exit 3, tqdm on rank 0, ``metrics.jsonl``.

The fitted flow is written into the model files themselves (``model.safetensors`` under
``flow_prior.``, its description in ``model.json``), so ``load_model(...).sample(n)`` draws
from it by default.  Work files (checkpoints, metrics) go to ``OUT/prior/``.

    python -m hpcvae.train_prior runs/debug --data shards/synth-debug --epochs 50
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as tdist

from hpcvae.checkpoint import CHECKPOINT_DIR, resolve_resume, resume_position
from hpcvae.cli import EXIT_COMPLETED, EXIT_PREEMPTED, run_cli
from hpcvae.config import (
    CheckpointConfig,
    DataConfig,
    EngineConfig,
    OptimConfig,
    SchedulerConfig,
    add_options,
    options_from_args,
    to_dict,
)
from hpcvae.dist import DistInfo, barrier, cleanup, init_distributed, print0
from hpcvae.errors import CheckpointError, ConfigError
from hpcvae.loop import Loop, LoopConfig
from hpcvae.metrics import Metrics
from hpcvae.models.conditions import from_batch
from hpcvae.prior import PREFIX, FlowKind, FlowSpec, build_flow, flow_meta, gaussian_nll, vae_digest

WORK_DIR = "prior"


@dataclass(kw_only=True)
class PriorConfig:
    model: str
    """The trained VAE: a run folder, ``model.safetensors`` or ``model.json``."""
    data: str
    """Shard set whose train split the flow is fitted on (normally the VAE's own)."""
    out: str | None = None
    """Folder for the model files with the flow; ``None`` = the model's own folder (updated in place)."""
    epochs: int = 100
    """Passes over the train latents."""
    lr: float = 1e-3
    """Adam learning rate."""
    schedule: Literal["constant", "cosine"] = "cosine"
    """LR decay over the whole fit."""
    batch_size: int = 256
    """Latents per rank per step."""
    encode_batch_size: int = 64
    """Images per encoder batch; also the loader's drop granularity (< world_size * this per epoch)."""
    latents: Literal["mean", "posterior"] = "posterior"
    """Fit target: ``posterior`` (default) = draws z ~ q(z|x), fresh each epoch: the aggregate posterior the
    decoder was trained on, which keeps the spread the means lack; ``mean`` = the encoder means, which are
    under-dispersed and give rounder, smaller galaxies (benchmarks/results/science-*.md)."""
    kind: FlowKind = "nsf"
    """zuko flow: ``nsf`` (rational-quadratic splines, default) or ``maf`` (affine)."""
    transforms: int = 4
    """Autoregressive transforms in the flow."""
    passes: int | None = 2
    """Passes of each transform's inverse: 2 (default) makes coupling transforms, which sample in two passes
    instead of z_dim; ``none`` is the fully autoregressive flow of hpcvae 0.1 (slow to sample)."""
    hidden_features: tuple[int, ...] = (64, 64)
    """Hidden widths of each transform's MLP."""
    seed: int = 0
    """Seeds the flow's initial weights and the per-epoch shuffles."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """``auto`` uses CUDA when present."""
    num_workers: int = 0
    """DataLoader workers for the encoding pass."""
    max_steps_per_epoch: int = 0
    """Cap steps per epoch (0 = none); for smoke runs."""
    log_every: int = 20
    """Steps between train-metric records."""
    sinks: list[str] = field(default_factory=lambda: ["jsonl", "tensorboard"])
    """Metric sinks (``hpcvae.metrics.SINKS``), as ``[metrics] sinks`` of training."""
    sync_every: int = 50
    """Steps between the ranks' agreement on stopping and on numerical health (as for VAE training)."""
    checkpoint: CheckpointConfig = field(
        default_factory=lambda: CheckpointConfig(every_steps=500, keep_last=2)
    )
    """every_steps / keep_last / resume, as for VAE training."""

    def __post_init__(self) -> None:
        from hpcvae.metrics import SINKS

        bad = [x for x in self.sinks if x not in SINKS]
        if bad:
            raise ConfigError(
                f"train_prior: unknown metric sink {bad[0]!r} (choices: {', '.join(SINKS)})", key="sinks"
            )
        for name in ("epochs", "batch_size", "encode_batch_size", "transforms", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train_prior: {name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"train_prior: lr must be > 0, got {self.lr}")
        if self.max_steps_per_epoch < 0 or self.num_workers < 0:
            raise ConfigError("train_prior: max_steps_per_epoch and num_workers must be >= 0")
        if self.latents not in ("mean", "posterior"):
            raise ConfigError(f"train_prior: latents must be 'mean' or 'posterior', got {self.latents!r}")
        if self.kind not in ("maf", "nsf"):
            raise ConfigError(f"train_prior: kind must be 'maf' or 'nsf', got {self.kind!r}")
        if self.schedule not in ("constant", "cosine"):
            raise ConfigError(f"train_prior: schedule must be 'constant' or 'cosine', got {self.schedule!r}")
        if not self.hidden_features or min(self.hidden_features) < 1:
            raise ConfigError(f"train_prior: hidden_features must be positive, got {self.hidden_features}")


@dataclass(kw_only=True)
class PriorResult:
    status: Literal["completed", "preempted"]
    model_dir: Path
    """Folder holding model.safetensors + model.json (with the flow once completed)."""
    checkpoint: Path | None
    summary: dict[str, Any]


def _model_dir(path: Path) -> Path:
    return path if path.is_dir() else path.parent


def _shuffle_seed(seed: int, epoch: int, rank: int, stream: int = 0xF10) -> int:
    """Independent seeded streams per (purpose, epoch, rank): shuffles and posterior draws."""
    return int(np.random.SeedSequence([seed, stream, epoch, rank]).generate_state(1)[0])


class PriorTrainer(Loop):
    """Encode once, then fit the flow through the shared loop; every method runs on all ranks together."""

    log_prefix = "train_prior: "

    def __init__(self, cfg: PriorConfig, dist: DistInfo) -> None:
        from hpcvae.model_files import load_model

        self.cfg, self.dist = cfg, dist
        src = Path(cfg.model)
        if not src.exists():
            raise CheckpointError(f"{src}: no such model file or run folder")
        self.vae = load_model(src, device=dist.device)
        self.meta = self.vae.model_info
        self.vae_sd = {k: v for k, v in self.vae.state_dict().items() if not k.startswith(PREFIX)}
        self.digest = vae_digest(self.vae_sd)
        self.out = Path(cfg.out) if cfg.out else _model_dir(src)
        self.work = self.out / WORK_DIR
        # It rewrites the model files in place: never while a training (or another fit) uses the folder.
        self._open_run(self.out, lambda: self._build(cfg, dist, src), what="hpcvae.train_prior")
        self._announce_run()

    def _build(self, cfg: PriorConfig, dist: DistInfo, src: Path) -> None:
        from hpcvae.data import ShardData
        from hpcvae.engines import DDPEngine
        from hpcvae.models.data_fit import check_model_fits
        from hpcvae.schedules import lr_scheduler
        from hpcvae.shards.manifest import Manifest

        self.manifest = Manifest.load(cfg.data)
        check_model_fits(self.vae, self.manifest, where=str(src))
        if self.vae.transform is None:
            raise CheckpointError(f"{src}: model.json records no normalisation; cannot encode raw shards")
        if self.meta.get("manifest_digest") not in (None, self.manifest.digest):
            print0(f"train_prior: note: {self.manifest.path} is not the shard set the VAE was trained on")

        # -- phase 1: latents of this rank's share ---------------------------------------------
        dcfg = DataConfig(path=cfg.data, batch_size=cfg.encode_batch_size, num_workers=cfg.num_workers,
                          persistent_workers=False)  # fmt: skip
        data = ShardData(dcfg, self.manifest, rank=dist.rank, world_size=dist.world_size, seed=cfg.seed,
                         transform=self.vae.transform)  # fmt: skip
        t0 = time.perf_counter()
        self.z_train, self.s_train, self.c_train = self._encode(data.train_loader(0))
        mu_val, s_val, self.c_val = self._encode(data.val_loader())
        self.posterior = cfg.latents == "posterior"
        # Val target: the means, or one fixed draw from q(z|x) per galaxy (the same on every call).
        g = torch.Generator().manual_seed(_shuffle_seed(cfg.seed, 0, dist.rank, stream=0x7A1))
        self.z_val = mu_val + s_val * torch.randn(mu_val.shape, generator=g) if self.posterior else mu_val
        self.encode_s = time.perf_counter() - t0
        self.encode_dropped = data.dropped_per_epoch

        stats = self._global_stats()
        self.n_train = int(stats["n"])
        spec = FlowSpec(z_dim=self.vae.z_dim, conditional=bool(self.vae.conditional), kind=cfg.kind,
                        transforms=cfg.transforms, hidden_features=cfg.hidden_features,
                        context_features=self.spec_context(), passes=cfg.passes)  # fmt: skip
        self.spec = spec
        torch.manual_seed(cfg.seed)  # identical initial flow on every rank
        self.flow = build_flow(spec)
        target_var = stats["mu_var"] + (stats["post_var"] if self.posterior else 0.0)
        self.flow.set_standardisation(stats["mu_mean"], target_var.sqrt(), stats["c_mean"], stats["c_std"])
        self.target_var = target_var
        self.agg = {"mu_mean": stats["mu_mean"].tolist(), "mu_var": stats["mu_var"].tolist(),
                    "posterior_var_mean": stats["post_var"].tolist()}  # fmt: skip

        # -- phase 2 set-up: the training engine and schedule ----------------------------------
        n_local = self.z_train.shape[0]
        steps = torch.tensor([n_local // cfg.batch_size], dtype=torch.int64)
        if dist.distributed:  # every rank must run the same number of steps
            tdist.all_reduce(steps, op=tdist.ReduceOp.MIN)
        self.steps_per_epoch = int(steps.item())
        if cfg.max_steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, cfg.max_steps_per_epoch)
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"{self.manifest.path}: {n_local} train latents on rank {dist.rank}, fewer than "
                f"--batch-size {cfg.batch_size}; lower it"
            )
        from hpcvae.hardware import prior_precision

        engine = DDPEngine(EngineConfig(precision=prior_precision().value, optim=OptimConfig(lr=cfg.lr)), self.flow,
                           dist)  # fmt: skip
        c = cfg.checkpoint
        loop = LoopConfig(epochs=cfg.epochs, every_steps=c.every_steps, keep_last=c.keep_last,
                          sync_every=cfg.sync_every, log_every=cfg.log_every)  # fmt: skip
        Loop.__init__(self, loop=loop, dist=dist, engine=engine, checkpoint_dir=self.work,
                      metrics=Metrics(self.work, enabled=dist.is_main, prog="hpcvae.train_prior",
                                      sinks=cfg.sinks))  # fmt: skip
        self.sched_cfg = SchedulerConfig(kind=cfg.schedule)
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.scheduler = lr_scheduler(self.engine.optimizer, self.sched_cfg, total_steps=self.total_steps,
                                      steps_per_epoch=self.steps_per_epoch)  # fmt: skip
        self.history: dict[str, Any] = {"train_nll": None, "val_nll": None, "train_time_s": 0.0}
        self._acc = torch.zeros((), device=dist.device)
        self._t0 = time.perf_counter()
        if dist.is_main:
            self.work.mkdir(parents=True, exist_ok=True)
            (self.work / "prior_config.json").write_text(json.dumps(to_dict(cfg), indent=1))
        self._resume()

    # -- phase 1 ---------------------------------------------------------------------------------
    @torch.no_grad()
    def _encode(self, loader: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(means, posterior std devs, redshifts) of a loader's images, on the CPU."""
        self.vae.eval()
        zs, ss, cs = [], [], []
        for batch in loader:
            x = batch["image"].to(self.dist.device)
            r = from_batch(
                self.vae, batch, self.manifest.condition_names or [self.manifest.data.get("redshift_column")]
            )
            r = r.to(self.dist.device) if r is not None else None
            mu, logvar = self.vae.encode(x, r)
            zs.append(mu.float().cpu())
            ss.append(torch.exp(0.5 * logvar.float()).cpu())
            if r is not None:
                cs.append(r.float().cpu())
        zd = self.vae.z_dim
        z = torch.cat(zs) if zs else torch.zeros(0, zd)
        s = torch.cat(ss) if ss else torch.zeros(0, zd)
        k = self.spec_context()
        c = (
            (torch.cat([x.reshape(-1, k) for x in cs]) if cs else torch.zeros(0, k))
            if self.vae.conditional
            else None
        )
        return z, s, c

    def spec_context(self) -> int:
        """Number of conditions the VAE (and so the flow) takes."""
        return len(self.vae.spec.conditions) if self.vae.multi_condition else 1

    def _global_stats(self) -> dict[str, Any]:
        """Moments of the train latents (and zphot) over all ranks: the flow's fixed standardisation.

        mu_var is the spread of the means; post_var the mean posterior variance E[σ²]; the
        aggregate posterior's variance is their sum.
        """
        z, c = self.z_train.double(), self.c_train
        zd, k = z.shape[1], self.spec_context()
        cs = c.double() if c is not None else torch.zeros(0, k, dtype=torch.float64)
        v = torch.cat([torch.tensor([float(z.shape[0])], dtype=torch.float64), z.sum(0), (z**2).sum(0),
                       (self.s_train.double() ** 2).sum(0), cs.sum(0), (cs**2).sum(0)])  # fmt: skip
        if self.dist.distributed:
            dev = self.dist.device if self.dist.backend == "nccl" else torch.device("cpu")
            t = v.to(dev)
            tdist.all_reduce(t)
            v = t.cpu()
        n = v[0].item()
        if n < 2:
            raise ConfigError(f"{self.manifest.path}: only {int(n)} train galaxies were encoded; need >= 2")
        mean = v[1 : 1 + zd] / n
        var = (v[1 + zd : 1 + 2 * zd] / n - mean**2).clamp_min(0)
        post_var = v[1 + 2 * zd : 1 + 3 * zd] / n
        c_mean = v[1 + 3 * zd : 1 + 3 * zd + k] / n
        c_std = (v[1 + 3 * zd + k :] / n - c_mean**2).clamp_min(0).sqrt()
        if c is None:
            c_mean, c_std = torch.zeros(k), torch.ones(k)
        return {"n": n, "mu_mean": mean.float(), "mu_var": var.float(), "post_var": post_var.float(),
                "c_mean": c_mean.float(), "c_std": c_std.float()}  # fmt: skip

    # -- checkpoints -----------------------------------------------------------------------------
    def _expect(self) -> dict[str, Any]:
        return {"checkpoint_of": "flow_prior", "vae_digest": self.digest, "flow": self.spec.to_dict(),
                "latents": self.cfg.latents}  # fmt: skip

    def _resume(self) -> None:
        if self.cfg.checkpoint.resume == "none":
            # A fresh fit must not find an old fit's step-N (the checkpointer keeps complete ones).
            old = self.work / CHECKPOINT_DIR
            if self.dist.is_main and old.is_dir():
                print0(f"train_prior: --resume none: removing the previous fit's checkpoints in {old}")
                shutil.rmtree(old)
            barrier()
        folder = resolve_resume(self.cfg.checkpoint.resume, self.work)
        if folder is None:
            return
        meta = self.checkpointer.load(folder, engine=self.engine, components={"scheduler": self.scheduler},
                                      expect=self._expect())  # fmt: skip
        self.global_step = int(meta["global_step"])
        self.history = meta.get("history", self.history)
        self.epoch, self.step_in_epoch, _ = resume_position(
            meta, world_size=self.dist.world_size, batch_size=self.cfg.batch_size,
            steps_per_epoch=self.steps_per_epoch)  # fmt: skip
        self.last_checkpoint = folder
        print0(f"train_prior: resumed from {folder} at epoch {self.epoch}, step {self.step_in_epoch}")

    def checkpoint_meta(self) -> dict[str, Any]:
        return {**self._expect(), "steps_per_epoch": self.steps_per_epoch, "batch_size": self.cfg.batch_size,
                "history": self.history}  # fmt: skip

    def checkpoint_components(self) -> dict[str, Any]:
        return {"scheduler": self.scheduler}

    def checkpoint_config(self) -> str:
        return f"# hpcvae.train_prior\n# {json.dumps(to_dict(self.cfg))}\n"

    # -- phase 2: the loop's hooks ------------------------------------------------------------------
    def train(self) -> PriorResult:
        self._open_logs()
        print0(
            f"train_prior: {self.spec.kind} flow ({self.spec.transforms} transforms, hidden "
            f"{list(self.spec.hidden_features)}, context {'zphot' if self.spec.conditional else 'none'}) on "
            f"{self.n_train} train latents ({self.encode_dropped} dropped by the loader), "
            f"{self.dist.world_size} rank(s), {self.steps_per_epoch} steps/epoch of {self.cfg.batch_size}; "
            f"encoding took {self.encode_s:.1f} s"
        )
        status = self.run()
        summary = self.fit_summary if status == "completed" else self.history
        return PriorResult(
            status=status, model_dir=self.out, checkpoint=self.last_checkpoint, summary=summary
        )

    def epoch_batches(self) -> tuple[int, Iterator[Any]]:
        """This rank's share of the train latents in a seeded per-(epoch, rank) order, from step_in_epoch."""
        cfg, dev = self.cfg, self.dist.device
        g = torch.Generator().manual_seed(_shuffle_seed(cfg.seed, self.epoch, self.dist.rank))
        perm = torch.randperm(self.z_train.shape[0], generator=g)
        # The epoch's posterior draws, made up front so a resumed epoch sees the same ones.
        eps = torch.randn(self.z_train.shape, generator=g) if self.posterior else None
        self.metrics.epoch(f"prior epoch {self.epoch + 1}/{cfg.epochs}", total=self.steps_per_epoch,
                           done=self.step_in_epoch)  # fmt: skip
        self.engine.module.train()
        self._t0 = time.perf_counter()

        def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
            b = cfg.batch_size
            for step in range(self.step_in_epoch, self.steps_per_epoch):
                idx = perm[step * b : (step + 1) * b]
                z = self.z_train[idx] if eps is None else self.z_train[idx] + self.s_train[idx] * eps[idx]
                c = self.c_train[idx].to(dev, non_blocking=True) if self.c_train is not None else None
                yield z.to(dev, non_blocking=True), c

        return self.steps_per_epoch, batches()

    def train_step(self, batch: tuple[torch.Tensor, torch.Tensor | None]) -> None:
        z, c = batch
        loss = self.engine.forward(z, c)
        self.engine.backward(loss)
        self.engine.step()
        self.scheduler.step()
        self.record_step(loss, [])
        self._acc += loss.detach()

    def log_train(self) -> None:
        dt = time.perf_counter() - self._t0
        self._log_train(self._acc, self._steps_since_log, dt)
        self._acc.zero_()
        self._t0 = time.perf_counter()

    def validate_epoch(self) -> None:
        self.validate()

    def finish(self) -> dict[str, Any]:
        self.fit_summary = self._finish()
        return self.fit_summary

    def _reduce(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        if self.dist.distributed:
            dev = self.dist.device if self.dist.backend == "nccl" else torch.device("cpu")
            t = t.to(dev)
            tdist.all_reduce(t)
        return t.cpu().tolist()

    @torch.no_grad()
    def _nll_sum(self, z: torch.Tensor, c: torch.Tensor | None) -> float:
        module = self.engine.module
        module.eval()
        total = 0.0
        for s in range(0, z.shape[0], 4096):
            zz = z[s : s + 4096].to(self.dist.device)
            cc = c[s : s + 4096].to(self.dist.device) if c is not None else None
            total += float(-module.log_prob(zz, cc).double().sum())
        module.train()
        return total

    def validate(self) -> dict[str, float | None]:
        """Mean NLL per galaxy of the val latents: the flow against N(0, I) and a fitted diagonal Gaussian."""
        mean = torch.tensor(self.agg["mu_mean"])
        var = self.target_var.clamp_min(1e-12)
        zv = self.z_val
        s_flow, s_std, s_diag, n = self._reduce([
            self._nll_sum(zv, self.c_val), float(gaussian_nll(zv).double().sum()),
            float(gaussian_nll(zv, mean, var).double().sum()), float(zv.shape[0])])  # fmt: skip
        res = {"nll": s_flow / n if n else None, "nll_standard_normal": s_std / n if n else None,
               "nll_diag_gaussian": s_diag / n if n else None, "count": int(n)}  # fmt: skip
        self.history["val_nll"] = res["nll"]
        self.history["val"] = res
        self._write({"kind": "val", "epoch": self.epoch, "step": self.global_step, **res})
        return res

    # -- logging ---------------------------------------------------------------------------------
    def _open_logs(self) -> None:
        self.metrics.open(total=self.steps_per_epoch)
        self._write({"kind": "start", "epoch": self.epoch, "step": self.global_step,
                     "steps_per_epoch": self.steps_per_epoch, "world_size": self.dist.world_size,
                     "batch_size": self.cfg.batch_size, "n_train_latents": self.n_train,
                     "encode_dropped": self.encode_dropped, "encode_s": self.encode_s})  # fmt: skip

    def _write(self, rec: dict[str, Any]) -> None:
        self.metrics.write(rec)

    def _log_train(self, acc: torch.Tensor, n: int, dt: float) -> None:
        nll = self._reduce([float(acc) / n])[0] / self.dist.world_size
        self.history["train_nll"] = nll
        self.history["train_time_s"] = float(self.history.get("train_time_s", 0.0)) + dt
        self._write({"kind": "train", "epoch": self.epoch, "step": self.global_step, "nll": nll,
                     "lr": self.engine.lr(), "step_time_s": dt / n})  # fmt: skip
        self.metrics.postfix(nll=f"{nll:.4g}")

    # -- the end ---------------------------------------------------------------------------------
    def _fitted_on(self) -> str:
        if self.posterior:
            return "draws z ~ q(z|x) (the aggregate posterior), fresh each epoch, of the train split"
        return "encoder means (model in eval mode) of the train split"

    def _finish(self) -> dict[str, Any]:
        """Write VAE + flow into the model files (rank 0), with the flow's description in model.json."""
        from hpcvae.model_files import ModelInfo, write_model

        val = self.history.get("val") or self.validate()
        training = {
            "epochs": self.cfg.epochs, "steps": self.global_step, "steps_per_epoch": self.steps_per_epoch,
            "batch_size_per_rank": self.cfg.batch_size, "world_size": self.dist.world_size,
            "latents": self.cfg.latents, "optimizer": "Adam", "lr": self.cfg.lr, "lr_schedule": to_dict(self.sched_cfg),
            "seed": self.cfg.seed, "n_train_latents": self.n_train,
            "encode_dropped_per_rank_layout": self.encode_dropped,
            "data": str(self.manifest.root), "manifest_digest": self.manifest.digest,
            "vae_digest": self.digest, "train_nll_last": self.history.get("train_nll"),
            "train_time_s": self.history.get("train_time_s"),
        }  # fmt: skip
        evaluation = {
            "val_nll": val["nll"], "val_nll_standard_normal": val["nll_standard_normal"],
            "val_nll_diag_gaussian": val["nll_diag_gaussian"], "val_count": val["count"],
            "nll_unit": "nats per galaxy, raw latent space",
            "val_target": self._fitted_on().replace("train split", "val split"),
            "latent_moments": {"of": "train split; mu = encoder means, posterior_var_mean = E[sigma^2]", **self.agg},
        }  # fmt: skip
        block = flow_meta(self.spec, self.flow, training=training, evaluation=evaluation,
                          fitted_on=self._fitted_on())  # fmt: skip
        if self.dist.is_main:
            sd = {**self.vae_sd, **{PREFIX + k: v for k, v in self.flow.state_dict().items()}}
            info = dataclasses.replace(ModelInfo.from_model_json(self.meta), flow_prior=block)
            write_model(self.out, sd, info)
            print0(
                f"train_prior: val NLL {val['nll']:.4g} nats/galaxy (N(0, I): {val['nll_standard_normal']:.4g}, "
                f"diagonal Gaussian: {val['nll_diag_gaussian']:.4g}) on {val['count']} galaxies; "
                f"wrote the flow into {self.out / 'model.safetensors'}"
            )
            from hpcvae.evaluate.plots import write_samples
            from hpcvae.model_card import write_model_card

            write_samples(self.out)  # now from the flow: the prior sample() will use
            write_model_card(self.out)
        barrier()
        return block


def run(cfg: PriorConfig) -> PriorResult:
    """Fit the prior in this process (one rank of however many the environment says)."""
    dist = init_distributed(device=None if cfg.device == "auto" else cfg.device)
    try:
        return PriorTrainer(cfg, dist).train()
    finally:
        cleanup()


_FLAGS = {
    "workers": "num_workers",
    "hidden": "hidden_features",
    "resume": "checkpoint.resume",
    "every_steps": "checkpoint.every_steps",
    "keep_last": "checkpoint.keep_last",
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hpcvae.train_prior", description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="trained VAE: run folder, model.safetensors or model.json")
    p.set_defaults(_table=add_options(p, PriorConfig, flags=_FLAGS, skip=("model",)))
    return p


def config_from_args(a: argparse.Namespace) -> PriorConfig:
    """``--config`` (TOML), ``--set``, then the named flags, as for every hpcvae command."""
    return options_from_args(PriorConfig, a, a._table, model=a.model)


def main(argv: Sequence[str] | None = None) -> int:
    result = run(config_from_args(parser().parse_args(argv)))
    return EXIT_COMPLETED if result.status == "completed" else EXIT_PREEMPTED


if __name__ == "__main__":
    run_cli(main, "hpcvae.train_prior")
