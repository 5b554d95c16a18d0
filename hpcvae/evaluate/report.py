"""The evaluation report: run a trained model over a shard split, measure, write PNGs + numbers.

Everything streams in batches (real galaxies are read, encoded, decoded and measured one batch at
a time, generated ones drawn and measured likewise), so ``--n`` can be large without holding every
stamp in memory.  This module gathers the measurements (:class:`Run`); each report section is one
function of :mod:`hpcvae.evaluate.sections` that turns them into numbers and a figure.
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
from hpcvae.evaluate.bootstrap import Resampler
from hpcvae.evaluate.collect import StampSet
from hpcvae.evaluate.markdown import render_markdown
from hpcvae.evaluate.noise import NoiseModel
from hpcvae.metrics import json_safe
from hpcvae.models.data_fit import check_model_fits
from hpcvae.shards.manifest import Manifest, iter_samples

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
    """Seeds the latents of every generated image and the bootstrap."""
    batch_size: int = 256
    """Inference batch size."""
    grid_redshifts: tuple[float, ...] | None = None
    """Redshifts of the 8x8 generation grids of conditional models; ``None``: the 10th, 50th and 90th percentile
    of the training redshifts (values beyond the training range are drawn anyway and noted)."""
    sweep_redshifts: tuple[float, ...] | None = None
    """Columns of the redshift sweep; ``None``: 8 steps from the 5th to the 95th training percentile."""
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
    morph_n: int = 256
    """Real and generated stamps measured with statmorph (0.3-0.5 s each on one core, so a subset)."""
    workers: int = 0
    """Processes for statmorph; 0 = every core this process may use."""
    n_boot: int = 200
    """Bootstrap replicates behind every 95% interval."""
    response_latents: int = 32
    """Fixed latents decoded across each condition's range (the conditional-response section)."""

    def __post_init__(self) -> None:
        if self.n < 2:
            raise ConfigError(f"evaluate: n must be >= 2, got {self.n}")
        if self.batch_size < 1:
            raise ConfigError(f"evaluate: batch_size must be >= 1, got {self.batch_size}")
        if self.sweep_rows < 1 or self.n_recon < 1 or self.latent_dims < 1 or self.grid_size < 1:
            raise ConfigError("evaluate: sweep_rows, n_recon, latent_dims and grid_size must be >= 1")
        if (
            self.grid_redshifts is not None
            and not self.grid_redshifts
            or (self.sweep_redshifts is not None and not self.sweep_redshifts)
        ):
            raise ConfigError("evaluate: grid_redshifts and sweep_redshifts must not be empty")
        if self.prior not in (None, "flow", "normal"):
            raise ConfigError(f"evaluate: prior must be 'flow' or 'normal', got {self.prior!r}")
        if self.morph_n < 0 or self.workers < 0 or self.n_boot < 0 or self.response_latents < 2:
            raise ConfigError("evaluate: morph_n, workers and n_boot must be >= 0, response_latents >= 2")
        if self.seed < 0 or self.seed >= 2**63:
            raise ConfigError(f"evaluate: seed must be in [0, 2**63), got {self.seed}")


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
    from hpcvae.evaluate.sections import SECTIONS
    from hpcvae.evaluate.verdict import verdict

    cfg = config or EvalConfig(split=split, n=n, device=device, seed=seed)
    _check_device(cfg.device)
    run = Run.open(model, data_dir, Path(out), cfg, metrics)
    run.stream_real()
    run.generate()
    report: dict[str, Any] = {"hpcvae_evaluate": 2, "model": run.model_section(), "data": run.data_section(),
                              "seed": cfg.seed, "device": cfg.device}  # fmt: skip
    for name, section in SECTIONS.items():
        report[name] = section(run)
    report["verdict"] = verdict(report, run.model_facts())
    report |= {"figures": run.figures, "notes": run.notes, "seconds": round(time.time() - run.t0, 2)}
    report = json_safe(report)
    run.out.joinpath("report.json").write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
    run.out.joinpath("report.md").write_text(render_markdown(report))
    _update_model_card(run, report)
    return report


def _update_model_card(run: Run, report: dict[str, Any]) -> None:
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
class Run:
    """One evaluation: the model, the data and the measurements the sections read."""

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
    t0: float = field(default_factory=time.time)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    # per real galaxy, in stream order
    keys: list[str] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)
    metas: list[dict[str, Any]] = field(default_factory=list)
    z_parts: list[np.ndarray] = field(default_factory=list)
    mu_parts: list[np.ndarray] = field(default_factory=list)
    mse_parts: list[np.ndarray] = field(default_factory=list)
    kl_parts: list[np.ndarray] = field(default_factory=list)
    chi2_parts: list[np.ndarray] = field(default_factory=list)
    z_pred_parts: list[np.ndarray] = field(default_factory=list)
    cond_parts: list[np.ndarray] = field(default_factory=list)
    show_real: list[np.ndarray] = field(default_factory=list)
    show_recon: list[np.ndarray] = field(default_factory=list)
    _psf: Any = None

    @classmethod
    def open(cls, model: Any, data_dir: str | Path, out: Path, cfg: EvalConfig, metrics: Any) -> Run:
        """Load and check the model against the data: sizes, and a redshift for a conditional model."""
        model_path = Path(model) if isinstance(model, (str, Path)) else None
        m, run_dir = _resolve_model(model, cfg.device)
        m.eval()
        manifest = Manifest.load(data_dir)
        if cfg.split not in manifest.splits:
            raise ShardError(f"{manifest.path}: no split {cfg.split!r} (have {', '.join(manifest.splits)})")
        where = model_path or f"model {m.config.get('arch')}"
        check_model_fits(m, manifest, where=str(where))
        notes: list[str] = []
        transform = _transform(m, manifest, notes)
        out.mkdir(parents=True, exist_ok=True)
        metrics_path = (
            Path(metrics) if metrics is not None else (run_dir / "metrics.jsonl" if run_dir else None)
        )
        return cls(cfg=cfg, m=m, manifest=manifest, transform=transform, out=out, model_path=model_path,
                   run_dir=run_dir, metrics=metrics_path, notes=notes)  # fmt: skip

    # -- small helpers the sections use -------------------------------------------------------
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

    @property
    def workers(self) -> int:
        from hpcvae.synth import _available_cores

        return self.cfg.workers or _available_cores()

    def save(self, fig: Any, name: str) -> str:
        import matplotlib.pyplot as plt

        fig.savefig(self.out / name, dpi=self.cfg.dpi)
        plt.close(fig)
        self.figures[name.removesuffix(".png")] = name
        return name

    def redshifts(self, given: tuple[float, ...] | None, percentiles: tuple[int, ...]) -> list[float]:
        """``given``, or the training redshifts' ``percentiles`` (the model's record, else the evaluated galaxies')."""
        if given is not None:
            return [float(z) for z in given]
        cond = self.m.conditioning
        rec = (cond.train(cond.redshift_name or "").get("percentiles") or {}) if self.conditional else {}
        pts = {int(float(k)): float(v) for k, v in rec.items()} if isinstance(rec, dict) else {}
        lo_q, hi_q = percentiles[0], percentiles[-1]
        if lo_q in pts and hi_q in pts and len(percentiles) == 2:
            return [float(z) for z in np.linspace(pts[lo_q], pts[hi_q], 8)]
        if all(q in pts for q in percentiles):
            return [pts[q] for q in percentiles]
        z = self.z_real[np.isfinite(self.z_real)]
        if len(percentiles) == 2:
            return [float(v) for v in np.linspace(*np.percentile(z, percentiles), 8)]
        return [float(v) for v in np.percentile(z, percentiles)]

    def model_facts(self) -> dict[str, Any]:
        """What the verdict needs to give advice that was not already followed."""
        info = getattr(self.m, "model_info", None) or {}
        flow = info.get("flow_prior") or {}
        return {"has_flow": getattr(self.m, "flow_prior", None) is not None, "prior": self.prior,
                "flow_latents": (flow.get("training") or {}).get("latents") or flow.get("latents"),
                "likelihood": self.m.config.get("likelihood"), "arch": self.m.config.get("arch"),
                "redshift_condition": self.m.conditioning.redshift_name if self.conditional else None}  # fmt: skip

    # -- streaming ----------------------------------------------------------------------------
    @property
    def condition_names(self) -> tuple[str, ...]:
        return tuple(self.m.conditioning.names) if self.conditional else ()

    def batch_conditions(self, zs: np.ndarray, metas: list[dict[str, Any]]) -> np.ndarray:
        """The model's conditions of a batch of real galaxies: (B,) redshifts, or (B, k) from their meta."""
        if not getattr(self.m, "multi_condition", False):
            return zs
        z_name = self.m.conditioning.redshift_name
        rows = []
        for meta, z in zip(metas, zs):
            given = meta.get("conditions") or {}
            rows.append([float(given.get(c, z if c == z_name else np.nan)) for c in self.condition_names])
        out = np.asarray(rows, dtype=np.float32)
        if not np.isfinite(out).all():
            raise ShardError(f"{self.manifest.path}: the shards do not carry the model's conditions "
                             f"{', '.join(self.condition_names)} (re-shard with --conditions)")  # fmt: skip
        return out

    def noise_sigma(self, metas: list[dict[str, Any]]) -> np.ndarray:
        """Each galaxy's sky-noise sigma: its catalog NOISE_VARIANCE, else the set's noise level."""
        default = self.manifest.stats("train").get("noise_std") or float("nan")
        out = []
        for meta in metas:
            v = meta.get("noise_variance")
            out.append(math.sqrt(v) if isinstance(v, (int, float)) and v > 0 else default)
        return np.asarray(out, dtype=np.float64)

    def stream_real(self) -> None:
        """Read, reconstruct, encode and measure the real split batch by batch."""
        import torch

        from hpcvae.evaluate.spectra import reduced_chi2

        m, cfg = self.m, self.cfg
        dtype = next(m.parameters()).dtype
        keep = cfg.morph_n
        self.real = StampSet(name="real", keep=max(keep, 256))
        self.recon = StampSet(name="reconstructed", keep=keep)
        self.resid = StampSet(name="residual", hsm=False)
        self.truth = StampSet(name="real, noise-free", keep=keep)
        self.baseline_parts: list[np.ndarray] | None = []
        truth_ok = True
        pixel_scales: set[float] = set()
        with torch.no_grad():
            for keys, phys, zs, metas in _batches(self.manifest, cfg.split, cfg.n, cfg.batch_size,
                                                  self.conditional, self.skipped):  # fmt: skip
                for meta in metas:
                    if meta.get("pixel_scale") is not None:
                        pixel_scales.add(round(float(meta["pixel_scale"]), 9))
                x = torch.as_tensor(phys, dtype=torch.float32).unsqueeze(1)
                xn = self.transform.forward(x).to(self.dev, dtype)
                cond = self.batch_conditions(zs, metas)
                self.cond_parts.append(cond)
                r = torch.as_tensor(cond, device=self.dev) if self.conditional else None
                o = m(xn, r, sample_latent=False)
                recon = o.recon.float()
                recon_phys = self.observed(self.physical(recon.cpu())).numpy()[:, 0]
                sig = self.noise_sigma(metas)
                self.real.add(phys, sig)
                self.recon.add(recon_phys, sig)
                self.resid.add(phys - recon_phys, sig)
                if truth_ok:
                    truth_ok = self._add_truth(metas)
                self.keys += keys
                self.groups += [str(mt.get("group", mt.get("ident", k))) for k, mt in zip(keys, metas)]
                self.metas += [{k: mt.get(k) for k in ("ident", "row", "mag")} for mt in metas]
                self.z_parts.append(zs)
                self.mu_parts.append(o.mu.float().cpu().numpy())
                self.mse_parts.append(((recon - xn.float()) ** 2).mean(dim=(1, 2, 3)).cpu().numpy())
                self.chi2_parts.append(reduced_chi2(phys, recon_phys, sig**2))
                lv = o.logvar.float()
                self.kl_parts.append(
                    (-0.5 * (1 + lv - o.mu.float() ** 2 - lv.exp()).sum(dim=1)).cpu().numpy()
                )
                if o.z_pred is not None:
                    self.z_pred_parts.append(o.z_pred.float().reshape(-1).cpu().numpy())
                shown = sum(len(a) for a in self.show_real)
                if shown < cfg.n_recon:
                    k = cfg.n_recon - shown
                    self.show_real.append(phys[:k])
                    self.show_recon.append(recon_phys[:k])
        self.n_real = len(self.keys)
        if self.n_real < 2:
            raise ShardError(
                f"{self.manifest.path}: split {cfg.split!r} has {self.n_real} usable galaxies; need at least 2"
            )
        if self.n_real < cfg.n:
            self.notes.append(
                f"split {cfg.split!r} has {self.n_real} usable galaxies, fewer than the {cfg.n} asked for"
            )
        if self.skipped:
            self.notes.append(
                f"{len(self.skipped)} galaxies of split {cfg.split!r} skipped (see report.json data.skipped)"
            )
        self.pixel_scale, self.ps_source = _pixel_scale(pixel_scales, self.manifest, self.notes)
        self.z_real = np.concatenate(self.z_parts)
        self.cond_real = np.concatenate(self.cond_parts)
        """Each real galaxy's conditions as the model takes them: (N,) redshifts or (N, k)."""
        self.mu = np.concatenate(self.mu_parts)
        self.R = self.real.finish(self.pixel_scale)
        self.RC = self.recon.finish(self.pixel_scale)
        self.RS = self.resid.finish(self.pixel_scale)
        self.T = self.truth.finish(self.pixel_scale) if truth_ok and self.truth.n == self.n_real else None
        self.B = np.concatenate(self.baseline_parts) if self.T is not None and self.baseline_parts else None
        """The first ``morph_n`` real galaxies' best-fit single Sérsic profiles, noise-free (synthetic sets)."""
        self.noise = self._noise_model()
        """The real stamps' sky noise, added to noise-free stamps before statistics that noise biases."""
        self.real_stats, self.recon_stats = self.R["hsm"], self.RC["hsm"]
        self.rs = (
            Resampler(self.groups, self.n_real, n_boot=self.cfg.n_boot, seed=self.cfg.seed)
            if self.cfg.n_boot
            else None
        )

    def _noise_model(self) -> NoiseModel:
        """Exactly from real minus noise-free truth on synthetic sets; else from blank corner patches."""
        if self.T is not None and len(self.T["kept"]):
            n = min(len(self.T["kept"]), len(self.R["kept"]))
            fields = self.R["kept"][:n].astype(np.float64) - self.T["kept"][:n]
            return NoiseModel.from_noise(fields, self.R["sigma"][:n])
        kept = len(self.R["kept"])
        return NoiseModel.from_stamps(self.R["kept"], self.R["sigma"][:kept])

    def _add_truth(self, metas: list[dict[str, Any]]) -> bool:
        """The real galaxies without noise, where the set is synthetic and its truth can be redrawn."""
        if not self.manifest.synthetic:
            return False
        from hpcvae.synth import noiseless_stamps

        try:
            clean = noiseless_stamps(self.manifest, metas)
        except (OSError, KeyError, ValueError) as exc:
            self.notes.append(
                f"noise-free real galaxies unavailable ({exc}); artefacts are judged against real stamps"
            )
            return False
        if clean is None:
            return False
        self.truth.add(clean, self.noise_sigma(metas))
        if self.baseline_parts is None:  # this family has no single-Sérsic fits (known from the first batch)
            return True
        need = self.cfg.morph_n - sum(len(b) for b in self.baseline_parts)
        if need > 0:
            base = noiseless_stamps(self.manifest, metas[:need], baseline=True)
            if base is None:
                self.baseline_parts = None  # this family has no single-Sérsic fits
            else:
                self.baseline_parts.append(base)
        return True

    def physical(self, out: Any) -> Any:
        """Model outputs (normalised) in flux units: the model's own (noise-aware) inverse when it has one."""
        if self.transform is getattr(self.m, "transform", None):
            return self.m.to_physical(out)
        return self.transform.inverse(out)

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

        cfg = self.cfg
        self.gen = StampSet(name="generated", keep=cfg.morph_n)
        gen = torch.Generator().manual_seed(cfg.seed)  # through model.sample: its flow prior if fitted
        with torch.no_grad():
            for start in range(0, self.n_real, cfg.batch_size):
                b = min(cfg.batch_size, self.n_real - start)
                cond = self.cond_real[start : start + b]
                r = torch.as_tensor(cond, device=self.dev) if self.conditional else None
                imgs = self.m.sample(
                    b, conditions=r, generator=gen, normalized=True, prior=self.prior, extrapolate=True
                )
                # generated galaxy i has real galaxy i's conditions, and its noise level
                sigma = self.R["sigma"][start : start + b]
                self.gen.add(self.observed(self.physical(imgs.float().cpu())).numpy()[:, 0], sigma)
        self.G = self.gen.finish(self.pixel_scale)
        self.gen_stats = self.G["hsm"]

    # -- the report's header sections ---------------------------------------------------------
    def model_section(self) -> dict[str, Any]:
        m, t = self.m, self.transform
        return {"path": self.model_path, "config": m.config, "conditional": self.conditional,
                "predicts_redshift": bool(m.predicts_redshift),
                "normalisation": t.to_dict() if hasattr(t, "to_dict") else repr(t)}  # fmt: skip

    def data_section(self) -> dict[str, Any]:
        from hpcvae.evaluate.moments import summary

        mf = self.manifest
        return {
            "path": mf.root, "manifest_sha256": mf.digest, "split": self.cfg.split, "n_requested": self.cfg.n,
            "n_used": self.n_real, "n_galaxies": len(set(self.groups)), "image_size": mf.image_size,
            "has_redshift": mf.has_redshift, "synthetic": mf.synthetic, "pixel_scale_arcsec": self.pixel_scale,
            "pixel_scale_source": self.ps_source, "n_skipped": len(self.skipped), "skipped": self.skipped[:50],
            "redshift": summary(self.z_real) if mf.has_redshift else None,
            "noise_free_truth": self.T is not None,
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
