"""The evaluation report: run a trained model over a shard split, write PNGs + numbers.

Everything streams in batches (real galaxies are read, encoded, decoded and measured one
batch at a time), so ``--n`` can be large without holding every stamp in memory.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from hpcvae.errors import ConfigError, ModelError, ShardError
from hpcvae.evaluate import plots
from hpcvae.evaluate.markdown import render_markdown
from hpcvae.evaluate.moments import (
    LANUSSE2021,
    STATS,
    border_median,
    compare,
    merge_moments,
    moments,
    orientation_agreement,
    redshift_trends,
    summary,
)
from hpcvae.evaluate.verdict import background, verdict
from hpcvae.metrics import json_safe
from hpcvae.shards.format import iter_samples
from hpcvae.shards.manifest import Manifest

DEFAULT_PIXEL_SCALE = 0.03


@dataclass(kw_only=True)
class EvalConfig:
    split: str = "val"
    """Shard split to compare against (held-out galaxies by default)."""
    n: int = 2048
    """Real galaxies read (and as many generated) for the population statistics."""
    device: str = "cpu"
    """Torch device for inference."""
    seed: int = 0
    """Seeds the latents of every generated image."""
    batch_size: int = 256
    """Inference batch size."""
    grid_redshifts: tuple[float, ...] = (0.3, 0.7, 1.5, 2.5)
    """Redshifts of the 8x8 generation grids of conditional models."""
    sweep_redshifts: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8, 1.0, 1.3, 1.6, 2.0, 2.5, 3.0)
    """Columns of the redshift sweep."""
    sweep_rows: int = 6
    """Latents (rows) in the redshift sweep."""
    n_recon: int = 8
    """Real/reconstruction pairs shown."""
    latent_dims: int = 6
    """Latent dimensions in the corner plot."""
    grid_size: int = 8
    """Side of the generation grids."""
    dpi: int = 110
    """PNG resolution."""
    prior: Literal["flow", "normal"] | None = None
    """Latent prior of generated galaxies: ``flow``, ``normal``, or ``None`` = the model's default (its flow if fitted)."""

    def __post_init__(self) -> None:
        if self.n < 2:
            raise ConfigError(f"evaluate: n must be >= 2, got {self.n}")
        if self.batch_size < 1:
            raise ConfigError(f"evaluate: batch_size must be >= 1, got {self.batch_size}")
        if self.sweep_rows < 1 or self.n_recon < 1 or self.latent_dims < 1 or self.grid_size < 1:
            raise ConfigError("evaluate: sweep_rows, n_recon, latent_dims and grid_size must be >= 1")
        if not self.grid_redshifts or not self.sweep_redshifts:
            raise ConfigError("evaluate: grid_redshifts and sweep_redshifts must not be empty")
        if self.prior not in (None, "flow", "normal"):
            raise ConfigError(f"evaluate: prior must be 'flow' or 'normal', got {self.prior!r}")


@dataclass(kw_only=True)
class _Accum:
    """Per-galaxy numbers gathered while streaming the real split."""

    keys: list[str] = field(default_factory=list)
    redshift: list[np.ndarray] = field(default_factory=list)
    mu: list[np.ndarray] = field(default_factory=list)
    mse: list[np.ndarray] = field(default_factory=list)
    kl: list[np.ndarray] = field(default_factory=list)
    z_pred: list[np.ndarray] = field(default_factory=list)
    stats: list[dict[str, np.ndarray]] = field(default_factory=list)
    recon_stats: list[dict[str, np.ndarray]] = field(default_factory=list)
    border: list[np.ndarray] = field(default_factory=list)
    show_real: list[np.ndarray] = field(default_factory=list)
    show_recon: list[np.ndarray] = field(default_factory=list)


def _batches(
    manifest: Manifest, split: str, n: int, bs: int, need_redshift: bool, skipped: list[dict[str, Any]]
) -> Iterator[tuple[list[str], np.ndarray, np.ndarray, list[dict[str, Any]]]]:
    keys: list[str] = []
    imgs: list[np.ndarray] = []
    zs: list[float] = []
    metas: list[dict[str, Any]] = []
    taken = 0
    for key, img, meta in iter_samples(manifest, split):
        if taken >= n:
            break
        z = meta.get("zphot")
        if need_redshift and (z is None or not math.isfinite(float(z))):
            skipped.append({"key": key, "reason": "no zphot (conditional model needs one)"})
            continue
        if not np.all(np.isfinite(img)):
            skipped.append({"key": key, "reason": "non-finite pixels"})
            continue
        keys.append(key)
        imgs.append(img)
        zs.append(float(z) if z is not None else float("nan"))
        metas.append(meta)
        taken += 1
        if len(keys) == bs:
            yield keys, np.stack(imgs), np.asarray(zs, dtype=np.float32), metas
            keys, imgs, zs, metas = [], [], [], []
    if keys:
        yield keys, np.stack(imgs), np.asarray(zs, dtype=np.float32), metas


def _resolve_model(model: Any, device: str) -> tuple[Any, Path | None]:
    """A loaded model and the folder its run lives in (for metrics.jsonl), if any."""
    if isinstance(model, (str, Path)):
        from hpcvae import load_model

        path = Path(model)
        if not path.exists():
            raise ModelError(f"{path}: no such model file or run folder")
        m = load_model(path, device=device)  # refuses non-finite weights
        return m, (path if path.is_dir() else path.parent)
    from hpcvae.model_files import check_finite

    check_finite(model.state_dict(), where=f"model {model.config.get('arch')}")
    return model.to(device), None


def _transform(model: Any, manifest: Manifest, notes: list[str]) -> Any:
    """The normalisation the model was trained with; the manifest's minmax only as a noted fallback."""
    t = getattr(model, "transform", None)
    if t is not None:
        return t
    from hpcvae.transforms import get_transform

    notes.append(
        "model carries no normalisation; used minmax with the shard set's train stats "
        "(flux-unit numbers are only right if the model was trained that way)"
    )
    return get_transform("minmax", manifest.stats("train"))


def _check_device(device: str) -> str:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"evaluate: --device {device} requested but CUDA is not available")
    return device


def evaluate(
    model: Any,
    data_dir: str | Path,
    out: str | Path,
    split: str = "val",
    n: int = 2048,
    *,
    device: str = "cpu",
    seed: int = 0,
    config: EvalConfig | None = None,
    metrics: str | Path | None = None,
) -> dict[str, Any]:
    """Write the report's PNGs, ``report.json`` and ``report.md`` under ``out``; return the numbers.

    ``model`` is a loaded model or a path (consolidated model or run folder). ``metrics``
    overrides where the loss curves come from (default: the run folder's metrics.jsonl).
    """
    cfg = config or EvalConfig(split=split, n=n, device=device, seed=seed)
    _check_device(cfg.device)
    run = _Run.open(model, data_dir, Path(out), cfg, metrics)
    run.stream_real()
    run.generate()
    report: dict[str, Any] = {
        "hpcvae_evaluate": 1,
        "model": run.model_section(),
        "data": run.data_section(),
        "seed": cfg.seed,
        "device": cfg.device,
        "losses": run.losses(),
        "reconstruction": run.reconstruction(),
        "generation": run.grids(),
        "redshift_sweep": run.sweep(),
        "latent": run.latent(),
        "population": run.population(),
        "background": background(
            np.concatenate(run.acc.border), np.concatenate(run.gen_border), run.manifest
        ),
        "redshift_trends": run.trends(),
    }
    report["verdict"] = verdict(report["population"]["stats"], report["reconstruction"], report["background"],
                                report["redshift_trends"])  # fmt: skip
    report |= {"figures": run.figures, "notes": run.notes, "seconds": round(time.time() - run.t0, 2)}
    report = json_safe(report)
    run.out.joinpath("report.json").write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
    run.out.joinpath("report.md").write_text(render_markdown(report))
    _update_model_card(run, report)
    return report


def _update_model_card(run: _Run, report: dict[str, Any]) -> None:
    """The run's MODEL_CARD.md gains these numbers when the model is a run's (on the val split only)."""
    from hpcvae.model_card import write_model_card
    from hpcvae.model_files import MODEL_JSON

    if run.run_dir is None or not (run.run_dir / MODEL_JSON).is_file() or run.cfg.split != "val":
        return
    try:
        write_model_card(run.run_dir, report)
    except OSError as exc:  # a read-only model folder: the report stands on its own
        print(
            f"hpcvae.evaluate: warning: MODEL_CARD.md not updated in {run.run_dir}: {exc.strerror}",
            file=sys.stderr,
        )


@dataclass(kw_only=True)
class _Run:
    """One evaluation: the model, the data and what the sections have measured so far."""

    cfg: EvalConfig
    m: Any
    manifest: Manifest
    transform: Any
    out: Path
    model_path: Path | None
    run_dir: Path | None
    metrics: Path | None
    notes: list[str] = field(default_factory=list)
    figures: dict[str, str] = field(default_factory=dict)
    _psf: Any = None
    """The set's mean PSF as a (1, 1, P, P) tensor, for a PSF-free model (see :meth:`observed`)."""
    t0: float = field(default_factory=time.time)
    acc: _Accum = field(default_factory=_Accum)
    skipped: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def open(cls, model: Any, data_dir: str | Path, out: Path, cfg: EvalConfig, metrics: Any) -> _Run:
        """Load and check the model against the data: sizes, and a redshift for a conditional model."""
        model_path = Path(model) if isinstance(model, (str, Path)) else None
        m, run_dir = _resolve_model(model, cfg.device)
        m.eval()
        manifest = Manifest.load(data_dir)
        if cfg.split not in manifest.splits:
            raise ShardError(f"{manifest.path}: no split {cfg.split!r} (have {', '.join(manifest.splits)})")
        where = model_path or f"model {m.config.get('arch')}"
        if int(m.image_size) != manifest.image_size:
            raise ModelError(
                f"{where}: model expects {m.image_size}x{m.image_size} images but shard set {manifest.path} "
                f"holds {manifest.image_size}x{manifest.image_size}; evaluate on shards made at the model's size"
            )
        if m.conditional and not manifest.has_redshift:
            raise ModelError(
                f"{where}: {m.config.get('arch')} is conditional on redshift but shard set {manifest.path} has none"
            )
        notes: list[str] = []
        transform = _transform(m, manifest, notes)
        out.mkdir(parents=True, exist_ok=True)
        metrics_path = (
            Path(metrics) if metrics is not None else (run_dir / "metrics.jsonl" if run_dir else None)
        )
        return cls(cfg=cfg, m=m, manifest=manifest, transform=transform, out=out, model_path=model_path,
                   run_dir=run_dir, metrics=metrics_path, notes=notes)  # fmt: skip

    @property
    def conditional(self) -> bool:
        return bool(self.m.conditional)

    @property
    def dev(self) -> Any:
        import torch

        return torch.device(self.cfg.device)

    @property
    def prior(self) -> str:
        """Generated galaxies come through model.sample: its flow prior unless cfg.prior says otherwise."""
        return self.cfg.prior or getattr(self.m, "default_prior", "normal")

    def save(self, fig: Any, name: str) -> str:
        import matplotlib.pyplot as plt

        fig.savefig(self.out / name, dpi=self.cfg.dpi)
        plt.close(fig)
        self.figures[name.removesuffix(".png")] = name
        return name

    def stream_real(self) -> None:
        """Read, reconstruct, encode and measure the real split batch by batch."""
        import torch

        m = self.m
        cfg = self.cfg
        manifest = self.manifest
        transform = self.transform
        acc = self.acc
        notes = self.notes
        skipped = self.skipped
        dev = self.dev
        conditional = self.conditional
        dtype = next(m.parameters()).dtype
        pixel_scales: set[float] = set()
        with torch.no_grad():
            for keys, phys, zs, metas in _batches(
                manifest, cfg.split, cfg.n, cfg.batch_size, conditional, skipped
            ):
                for meta in metas:
                    if meta.get("pixel_scale") is not None:
                        pixel_scales.add(round(float(meta["pixel_scale"]), 9))
                x = torch.as_tensor(phys, dtype=torch.float32).unsqueeze(1)
                xn = transform.forward(x).to(dev, dtype)
                r = torch.as_tensor(zs, device=dev) if conditional else None
                o = m(xn, r, sample_latent=False)
                recon = o.recon.float()
                xn32 = xn.float()
                acc.keys += keys
                acc.redshift.append(zs)
                acc.mu.append(o.mu.float().cpu().numpy())
                acc.mse.append(((recon - xn32) ** 2).mean(dim=(1, 2, 3)).cpu().numpy())
                lv = o.logvar.float()
                acc.kl.append((-0.5 * (1 + lv - o.mu.float() ** 2 - lv.exp()).sum(dim=1)).cpu().numpy())
                if o.z_pred is not None:
                    acc.z_pred.append(o.z_pred.float().reshape(-1).cpu().numpy())
                acc.stats.append(moments(phys, 1.0))  # pixels now; scaled to arcsec below
                acc.recon_stats.append(moments(self.observed(transform.inverse(recon.cpu())).numpy(), 1.0))
                acc.border.append(border_median(phys))
                shown = sum(len(a) for a in acc.show_real)
                if shown < cfg.n_recon:
                    k = cfg.n_recon - shown
                    acc.show_real.append(xn32[:k, 0].cpu().numpy())
                    acc.show_recon.append(recon[:k, 0].cpu().numpy())
        n_real = len(acc.keys)
        if n_real < 2:
            raise ShardError(
                f"{manifest.path}: split {cfg.split!r} has {n_real} usable galaxies; need at least 2"
            )
        if n_real < cfg.n:
            notes.append(
                f"split {cfg.split!r} has {n_real} usable galaxies, fewer than the {cfg.n} asked for"
            )
        if skipped:
            notes.append(
                f"{len(skipped)} galaxies of split {cfg.split!r} skipped (see report.json data.skipped)"
            )
        pixel_scale, ps_source = _pixel_scale(pixel_scales, manifest, notes)
        z_real = np.concatenate(acc.redshift)
        mu = np.concatenate(acc.mu)
        real_stats = merge_moments(acc.stats, pixel_scale)
        self.n_real, self.pixel_scale, self.ps_source = n_real, pixel_scale, ps_source
        self.z_real, self.mu, self.real_stats = z_real, mu, real_stats

    def observed(self, phys: Any) -> Any:
        """A PSF-free model's images through the set's mean PSF, so they compare with observed galaxies."""
        if not self.m.spec.psf_forward:
            return phys
        import torch

        from hpcvae.psf import psf_convolve

        if self._psf is None:
            image = (self.manifest.physics().get("psf") or {}).get("image")
            if image is None:
                raise ShardError(
                    f"{self.manifest.path}: a PSF-free model needs the set's PSF (psf_mean.npy) to be compared"
                )
            self._psf = torch.as_tensor(image, dtype=torch.float32)[None, None]
            self.notes.append("PSF-free model: generated and reconstructed galaxies are convolved with the set's "
                              "mean PSF before they are measured against the observed ones")  # fmt: skip
        return psf_convolve(phys, self._psf)

    def generate(self) -> None:
        """As many generated galaxies as real ones, at the real galaxies' redshifts."""
        import torch

        m = self.m
        cfg = self.cfg
        transform = self.transform
        dev = self.dev
        conditional = self.conditional
        prior = self.prior
        n_real = self.n_real
        z_real = self.z_real
        pixel_scale = self.pixel_scale
        acc = self.acc
        # Through model.sample, so a fitted flow prior is used unless cfg.prior says otherwise.
        gen = torch.Generator().manual_seed(cfg.seed)
        gen_stats_parts, gen_border = [], []
        with torch.no_grad():
            for start in range(0, n_real, cfg.batch_size):
                b = min(cfg.batch_size, n_real - start)
                r = torch.as_tensor(z_real[start : start + b], device=dev) if conditional else None
                imgs = m.sample(b, redshift=r, generator=gen, normalized=True, prior=prior)
                img = self.observed(transform.inverse(imgs.float().cpu()))
                gen_stats_parts.append(moments(img.numpy(), 1.0))
                gen_border.append(border_median(img.numpy()))
        gen_stats = merge_moments(gen_stats_parts, pixel_scale)
        recon_stats = merge_moments(acc.recon_stats, pixel_scale)
        self.gen_stats, self.recon_stats, self.gen_border = gen_stats, recon_stats, gen_border

    def population(self) -> dict[str, Any]:
        """HSM statistics of real against generated galaxies."""
        cfg = self.cfg
        acc = self.acc
        conditional = self.conditional
        prior = self.prior
        n_real = self.n_real
        real_stats = self.real_stats
        gen_stats = self.gen_stats
        save = self.save
        comparison = {k: compare(real_stats[k], gen_stats[k]) for k in STATS}
        population = {
            "n_real": n_real,
            "n_generated": n_real,
            "generated_redshifts": "the real galaxies' zphot, one each" if conditional else None,
            "latent_seed": cfg.seed,
            "prior": prior,
            "hsm_failures": {
                "real": int((~real_stats["ok"]).sum()),
                "generated": int((~gen_stats["ok"]).sum()),
                "real_examples": [
                    f"{acc.keys[int(e.split(':')[0])]}:{e.split(':', 1)[1]}" for e in real_stats["errors"][:5]
                ],
                "generated_examples": list(gen_stats["errors"][:5]),
            },
            "measured_in": "flux units (model normalisation inverted); sizes in arcsec",
            "stats": comparison,
            "reference_lanusse2021": LANUSSE2021,
        }
        save(plots.plot_population(real_stats, gen_stats, comparison), "population.png")
        return population

    def losses(self) -> dict[str, Any]:
        """Loss curves from the run's metrics.jsonl."""
        notes = self.notes
        save = self.save
        metrics_path = self.metrics
        losses: dict[str, Any] = {"metrics_file": metrics_path}
        if metrics_path is not None and metrics_path.is_file():
            records = plots.read_metrics(metrics_path)
            series = plots.loss_series(records)
            losses["records"] = len(records)
            losses["final"] = {
                kind: {k: s[k][-1] for k in ("loss", "recon", "kl")} | {"step": s["x"][-1]}
                for kind, s in series.items()
                if s["x"]
            }
            save(plots.plot_losses(records), "losses.png")
        else:
            why = "no metrics.jsonl next to the model (a bare model file or a model object)"
            losses["skipped"] = why
            notes.append(f"loss curves skipped: {why}")
        return losses

    def reconstruction(self) -> dict[str, Any]:
        """Reconstructions: errors, HSM of real against reconstructed, orientation."""
        acc = self.acc
        manifest = self.manifest
        n_real = self.n_real
        real_stats = self.real_stats
        recon_stats = self.recon_stats
        z_real = self.z_real
        save = self.save
        mse = np.concatenate(acc.mse)
        kl = np.concatenate(acc.kl)
        orient = orientation_agreement(real_stats, recon_stats)
        reconstruction: dict[str, Any] = {
            "n": n_real,
            "mse_per_pixel_mean": float(mse.mean()),
            "mse_per_pixel_median": float(np.median(mse)),
            "kl_per_galaxy_mean": float(kl.mean()),
            "space": "normalised [0, 1]",
            "hsm": {k: compare(real_stats[k], recon_stats[k]) for k in ("sigma_arcsec", "g")},
            "hsm_failures": int((~recon_stats["ok"]).sum()),
            "orientation_cos2dphi": orient["mean"],
            "orientation": {**orient, "of": "mean cos 2(phi_real - phi_reconstructed); 1 = kept, 0 = lost"},
        }
        z_pred = np.concatenate(acc.z_pred) if acc.z_pred else None
        if z_pred is not None:
            d = z_pred - z_real
            reconstruction["redshift_prediction"] = {
                "rmse": float(np.sqrt(np.mean(d**2))),
                "bias": float(d.mean()),
                "nmad": float(1.4826 * np.median(np.abs(d - np.median(d)) / (1 + z_real))),
            }
        n_show = sum(len(a) for a in acc.show_real)
        save(
            plots.plot_reconstructions(
                np.concatenate(acc.show_real),
                np.concatenate(acc.show_recon),
                redshift=z_real[:n_show] if manifest.has_redshift else None,
                z_pred=z_pred[:n_show] if z_pred is not None else None,
                keys=acc.keys[:n_show],
            ),
            "reconstructions.png",
        )
        return reconstruction

    def grids(self) -> dict[str, Any]:
        """Generation grids, the same base noise in each."""
        import torch

        m = self.m
        cfg = self.cfg
        prior = self.prior
        conditional = self.conditional
        save = self.save
        n_grid = cfg.grid_size * cfg.grid_size

        def grid_sample(redshift: float | None) -> Any:
            g = torch.Generator().manual_seed(cfg.seed + 1)  # the same base noise in every grid
            return (
                m.sample(n_grid, redshift=redshift, generator=g, normalized=True, prior=prior).float().cpu()
            )

        generation: dict[str, Any] = {
            "n_per_grid": n_grid,
            "prior": prior,
            "latents": "N(0, I), the same latents in every grid"
            if prior == "normal"
            else "flow prior: the same base noise in every grid, mapped through the flow",
        }
        with torch.no_grad():
            if conditional:
                generation["grids"] = {}
                for zval in cfg.grid_redshifts:
                    imgs = grid_sample(float(zval))
                    name = save(
                        plots.plot_generation_grid(
                            imgs, title=f"generated at z = {zval:g}", nrow=cfg.grid_size
                        ),
                        f"generations_z{zval:g}.png",
                    )
                    generation["grids"][f"{zval:g}"] = name
            else:
                imgs = grid_sample(None)
                generation["grids"] = {
                    "unconditional": save(
                        plots.plot_generation_grid(imgs, title="generated", nrow=cfg.grid_size),
                        "generations.png",
                    )
                }
        return generation

    def sweep(self) -> dict[str, Any]:
        """One latent per row decoded across redshifts."""
        import torch

        m = self.m
        cfg = self.cfg
        prior = self.prior
        conditional = self.conditional
        transform = self.transform
        dev = self.dev
        notes = self.notes
        save = self.save
        dtype = next(m.parameters()).dtype
        sweep: dict[str, Any]
        if conditional:
            zs_sweep = torch.as_tensor(cfg.sweep_redshifts, dtype=torch.float32)
            g = torch.Generator().manual_seed(cfg.seed + 2)
            lat = m.sample_latent(cfg.sweep_rows, generator=g, prior=prior).float().cpu()  # flow if fitted
            ncol = len(zs_sweep)
            zz = lat.repeat_interleave(ncol, 0).to(dev, dtype)
            rr = zs_sweep.repeat(cfg.sweep_rows).to(dev)
            with torch.no_grad():
                imgs = (
                    m.decode(zz, rr).float().cpu().reshape(cfg.sweep_rows, ncol, m.image_size, m.image_size)
                )
            phys = transform.inverse(imgs).numpy()
            flux = phys.reshape(cfg.sweep_rows, ncol, -1).sum(-1)
            sweep = {
                "redshifts": list(cfg.sweep_redshifts),
                "rows": cfg.sweep_rows,
                "prior": prior,
                "mean_pixel_sum_flux_per_column": flux.mean(0),
                "figure": save(plots.plot_redshift_sweep(imgs, cfg.sweep_redshifts), "redshift_sweep.png"),
            }
        else:
            sweep = {"skipped": f"{m.config.get('arch')} is unconditional: no redshift to sweep"}
            notes.append("redshift sweep skipped: the model does not take a redshift")
        return sweep

    def latent(self) -> dict[str, Any]:
        """The latent means: spread per dimension and a corner plot."""
        m = self.m
        cfg = self.cfg
        mu = self.mu
        save = self.save
        latent = {
            "z_dim": int(m.z_dim),
            "dims_shown": int(min(cfg.latent_dims, m.z_dim)),
            "mu_mean": mu.mean(0),
            "mu_std": mu.std(0),
            "active_dims": int((mu.std(0) > 0.1).sum()),
            "active_threshold": "std of mu over galaxies > 0.1",
        }
        save(plots.plot_latent_corner(mu, dims=cfg.latent_dims), "latent_corner.png")
        return latent

    def trends(self) -> dict[str, Any]:
        """Size and flux against redshift, against the synthetic truth."""
        manifest = self.manifest
        conditional = self.conditional
        z_real = self.z_real
        real_stats = self.real_stats
        gen_stats = self.gen_stats
        notes = self.notes
        save = self.save
        synthetic = manifest.synthetic
        trends: dict[str, Any]
        if not conditional:
            trends = {"skipped": "model does not take a redshift"}
        elif not synthetic:
            trends = {"skipped": "data is not synthetic: the true size/flux-redshift relation is unknown"}
        else:
            trends = redshift_trends(z_real, real_stats, gen_stats)
            truth = {"z": np.sort(z_real)}
            from hpcvae import cosmology

            truth["sigma_arcsec"] = cosmology.expected_hlr_arcsec(truth["z"])
            truth["flux"] = cosmology.expected_flux(truth["z"])
            save(
                plots.plot_redshift_trends(
                    z_real, real_stats, z_real, gen_stats, truth, trends["slopes_vs_z"]
                ),
                "redshift_trends.png",
            )
        if "skipped" in trends:
            notes.append(f"redshift trends skipped: {trends['skipped']}")
        return trends

    def model_section(self) -> dict[str, Any]:
        m, t = self.m, self.transform
        return {"path": self.model_path, "config": m.config, "conditional": self.conditional,
                "predicts_redshift": bool(m.predicts_redshift),
                "normalisation": t.to_dict() if hasattr(t, "to_dict") else repr(t)}  # fmt: skip

    def data_section(self) -> dict[str, Any]:
        mf = self.manifest
        return {
            "path": mf.root, "manifest_sha256": mf.digest, "split": self.cfg.split, "n_requested": self.cfg.n,
            "n_used": self.n_real, "image_size": mf.image_size, "has_redshift": mf.has_redshift,
            "synthetic": mf.synthetic, "pixel_scale_arcsec": self.pixel_scale,
            "pixel_scale_source": self.ps_source, "n_skipped": len(self.skipped), "skipped": self.skipped[:50],
            "redshift": summary(self.z_real) if mf.has_redshift else None,
        }  # fmt: skip


def _pixel_scale(seen: set[float], manifest: Manifest, notes: list[str]) -> tuple[float, str]:
    """(arcsec/pixel, where it came from): the shards' meta, else the manifest, else HST ACS's 0.03."""
    if len(seen) == 1:
        return next(iter(seen)), "shard meta.json"
    if len(seen) > 1:
        notes.append(f"shard meta holds several pixel scales {sorted(seen)}; used their median")
        return float(np.median(sorted(seen))), "median of differing shard meta values"
    if manifest.data.get("pixel_scale") is not None:
        return float(manifest.data["pixel_scale"]), "manifest"
    notes.append(f"no pixel scale recorded in the shards; assumed {DEFAULT_PIXEL_SCALE} arcsec/pixel")
    return DEFAULT_PIXEL_SCALE, "default (not recorded in the shards)"
