"""The consolidated model: ``model.safetensors`` + ``model.json``, written by ``write_model``, read by ``load_model``.

A trained model leaves the cluster as two plain files: fp32 weights (BatchNorm running
statistics included) in safetensors, and a JSON with everything needed to rebuild and use
it: architecture and model config (likelihood included), the normalisation (so
``model.sample`` speaks flux units), the β and LR schedules, the manifest digest of the
training data, a training summary and, when fitted, the flow prior's description.  Neither
file is ever unpickled, so loading a model from someone else is safe; this module imports
neither ``torch.load`` nor DeepSpeed.  ``hpcvae.consolidate`` makes the pair from a checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from hpcvae._version import __version__
from hpcvae.errors import CheckpointError, HpcvaeError
from hpcvae.safe_io import replace_pair, signals_as_interrupt, temp_name

MODEL_FILE = "model.safetensors"

MODEL_JSON = "model.json"

FORMAT = "hpcvae-model/1"


@dataclass(kw_only=True)
class ModelInfo:
    """What model.json says of a model besides its format tag and identity; assembled here, once.

    The end of training and ``hpcvae.consolidate`` build it with :meth:`from_checkpoint` (a
    checkpoint's meta names two keys differently), ``train_prior`` with :meth:`from_model_json`
    plus its ``flow_prior``.  A new key is one field here.
    """

    model_config: dict[str, Any]
    """The architecture and its hyperparameters (``model.config``), likelihood included."""
    transform: dict[str, Any] | None = None
    """The normalisation (``Transform.to_dict()``), so that ``sample`` speaks flux units."""
    training: dict[str, Any] = field(default_factory=dict)
    """The training summary: epochs, steps, images seen, engine, precision, wall time."""
    manifest_digest: str | None = None
    """The training shard set's manifest digest."""
    beta_schedule: dict[str, Any] | None = None
    lr_schedule: dict[str, Any] | None = None
    flow_prior: dict[str, Any] | None = None
    """``hpcvae.prior.flow_meta``; its weights are then in the state dict under ``flow_prior.``."""
    physics: dict[str, Any] | None = None
    """Pixel scale, band, BUNIT, noise, PSF (``Manifest.physics``): what GalSim and FITS output need."""
    data: dict[str, Any] | None = None
    """The training set's source and counts."""
    config_sha256: str | None = None
    conditions: list[dict[str, Any]] = field(default_factory=list)
    """What the model is conditioned on, with each condition's training range."""
    output: dict[str, Any] | None = None
    """How decoder means become flux (:func:`output_record`); None: the plain inverse transform."""

    @classmethod
    def from_checkpoint(cls, meta: dict[str, Any]) -> ModelInfo:
        """From a training checkpoint's meta.json (``Trainer.checkpoint_meta``: ``summary``, ``beta``)."""
        return cls(model_config=meta["model_config"], transform=meta.get("transform"),
                   training=meta.get("summary") or {}, manifest_digest=meta.get("manifest_digest"),
                   beta_schedule=meta.get("beta"), lr_schedule=meta.get("lr_schedule"),
                   output=output_record(meta["model_config"], meta.get("transform"), meta.get("physics")),
                   **{k: meta.get(k) for k in CARRIED})  # fmt: skip

    @classmethod
    def from_model_json(cls, meta: dict[str, Any]) -> ModelInfo:
        """From a model.json (``read_model_json``): a rewrite keeps every key it does not change."""
        return cls(**{f.name: meta.get(f.name) for f in fields(cls) if meta.get(f.name) is not None})


def output_record(
    model_config: dict[str, Any], transform: dict[str, Any] | None, physics: dict[str, Any] | None
) -> dict[str, Any] | None:
    """model.json's ``output``: decoder means become flux through the noise-aware inverse.

    When the likelihood compares normalised pixels, the decoder learns the mean of the
    *transformed* noisy pixels; with the training set's pixel noise known, the inverse that
    accounts for it (``Transform.mean_inverse``) returns the noise-free mean flux.
    """
    from hpcvae.models.likelihoods import LIKELIHOODS

    sigma = (physics or {}).get("noise_std")
    lk = LIKELIHOODS.get(str(model_config.get("likelihood", "mse")))
    if not transform or lk is None or lk.physical or not isinstance(sigma, int | float) or not sigma > 0:
        return None
    return {"inverse": "noise_mean", "noise_std": float(sigma)}


CARRIED = ("physics", "data", "config_sha256", "conditions")
"""Provenance keys that pass unchanged from a checkpoint's meta into model.json."""


def write_model(out: str | Path, state_dict: dict[str, torch.Tensor], info: ModelInfo) -> Path:
    """Write the pair into folder ``out`` (atomically: temp files, then rename); returns the weights path.

    Tensors are written as contiguous fp32 on the CPU; a NaN/inf or a shape that does not fit
    ``info.model_config`` is refused before anything is written.
    """
    from safetensors.torch import save_file

    out = Path(out)
    sd = {}
    for k, v in state_dict.items():
        v = v.detach().to("cpu")
        sd[k] = (v.float() if v.is_floating_point() else v).contiguous()
    model_config = info.model_config
    check_finite(sd, where=f"{out / MODEL_FILE}: refusing to write it")
    check_shapes(
        model_config,
        {k: tuple(v.shape) for k, v in sd.items()},
        where=f"{out / MODEL_FILE}: refusing to write it",
    )
    out.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "arch": model_config["arch"], **asdict(info), "hpcvae_version": __version__,
            "conditions": info.conditions or [], "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip
    meta["write_id"] = uuid.uuid4().hex  # the pair's identity: both files carry it (load_model checks)
    tmp_w, tmp_j = temp_name(out / MODEL_FILE), temp_name(out / MODEL_JSON)
    with signals_as_interrupt(f"writing the model pair into {out}"):
        try:
            save_file(sd, str(tmp_w), metadata={"format": FORMAT, "arch": model_config["arch"], "write_id": meta["write_id"],
                                                "model_config": json.dumps(model_config, sort_keys=True)})  # fmt: skip
            tmp_j.write_text(json.dumps(meta, indent=1))
            for t in (tmp_w, tmp_j):
                shareable(t)
        except BaseException:
            tmp_w.unlink(missing_ok=True)
            tmp_j.unlink(missing_ok=True)
            raise
    replace_pair([(tmp_w, out / MODEL_FILE), (tmp_j, out / MODEL_JSON)])
    return out / MODEL_FILE


def shareable(path: Path) -> None:
    """Mode 0666 less the umask (safetensors writes 0600): group members on a cluster can read the model."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def check_finite(sd: dict[str, torch.Tensor], where: str) -> None:
    """CheckpointError naming the first tensor holding NaN or inf: such a model only produces garbage."""
    for k, v in sd.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            n = int((~torch.isfinite(v)).sum())
            raise CheckpointError(
                f"{where}: tensor {k} holds {n} non-finite value(s) (NaN/inf); the model is unusable, "
                "consolidate an earlier checkpoint or retrain"
            )


def _paths(path: str | Path) -> tuple[Path, Path]:
    p = Path(path)
    if p.is_dir():
        return p / MODEL_FILE, p / MODEL_JSON
    if p.suffix == ".json":
        return p.with_name(MODEL_FILE), p
    return p, p.with_name(MODEL_JSON)


def read_model_json(path: str | Path) -> dict[str, Any]:
    weights, meta_path = _paths(path)
    if not meta_path.is_file():
        raise CheckpointError(
            f"{meta_path}: no such file (a consolidated model is {MODEL_FILE} + {MODEL_JSON})"
        )
    from hpcvae.jsonfiles import MODEL_JSON as SCHEMA
    from hpcvae.jsonfiles import read_json

    meta = read_json(meta_path, SCHEMA, CheckpointError, "model", fmt=FORMAT)
    return meta


def load_model(path: str | Path, device: str | torch.device = "cpu", *, strict: bool = True) -> Any:
    """A ready model in eval mode with its normalisation attached (``sample`` returns flux units).

    A flow prior recorded in ``model.json`` is rebuilt and loaded too, and ``sample`` then
    draws from it by default.

    ``path`` is a run folder, ``model.safetensors`` or ``model.json``.  Weights that do not
    fit the architecture and config in ``model.json`` are refused with the first mismatch.
    """
    from safetensors import SafetensorError, safe_open

    from hpcvae.models import build_model

    if not Path(path).exists():
        path = from_hub(path)
    weights, meta_path = _paths(path)
    meta = read_model_json(meta_path)
    if not weights.is_file():
        raise CheckpointError(f"{weights}: no such file (next to {meta_path})")
    cfg = dict(meta["model_config"])
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as f:
            file_meta = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{weights}: unreadable safetensors file: {exc}") from None
    check_finite(sd, where=str(weights))
    if file_meta.get("arch") not in (None, cfg.get("arch")):
        raise CheckpointError(
            f"{weights}: weights are for arch {file_meta['arch']!r} but {meta_path} says {cfg.get('arch')!r}"
        )
    if "model_config" in file_meta and json.loads(file_meta["model_config"]) != cfg:
        raise CheckpointError(f"{weights}: model config stored with the weights differs from {meta_path}")
    if file_meta.get("write_id") and meta.get("write_id") and file_meta["write_id"] != meta["write_id"]:
        raise CheckpointError(f"{weights} and {meta_path} come from two different writes (an interrupted save?); "
                              "consolidate the run's checkpoint again")  # fmt: skip
    check_shapes(cfg, {k: tuple(v.shape) for k, v in sd.items()}, where=f"{meta_path}")
    try:
        model = build_model(**cfg)
    except (HpcvaeError, TypeError) as exc:
        raise CheckpointError(f"{meta_path}: cannot rebuild the model from model_config: {exc}") from None
    if meta.get("flow_prior"):  # weights under flow_prior.*; rebuilt from JSON, never unpickled
        from hpcvae.prior import flow_from_meta

        model.flow_prior = flow_from_meta(meta["flow_prior"], where=f"{meta_path}")
    _load_state(model, sd, strict=strict, where=f"{weights} (arch {cfg.get('arch')})")
    if meta.get("transform"):
        from hpcvae.transforms import transform_from_dict

        noise = (meta.get("output") or {}).get("noise_std")
        try:
            model.set_normalisation(transform_from_dict(meta["transform"]), noise_std=noise)
        except HpcvaeError as exc:
            raise CheckpointError(f"{meta_path}: transform: {exc}") from None
    model.set_conditions(meta.get("conditions") or None)
    from hpcvae.hardware import inference_layout

    model.to(device, memory_format=inference_layout(device))  # NHWC where its convolutions are faster
    model.eval()
    model.model_info = meta
    return model


HUB_ID = re.compile(r"^(hf://)?[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


def from_hub(path: str | Path) -> Path:
    """A Hugging Face Hub repo id (``org/name``, ``hf://org/name@revision``) as a local folder, via its cache.

    Needs ``huggingface_hub``; with ``HF_HUB_OFFLINE=1`` only the local cache is used.  A path that is
    neither a file nor a repo id is the usual one-line error.
    """
    text = str(path)
    if not HUB_ID.match(text) or text.startswith(("./", "../")):
        raise CheckpointError(
            f"{path}: no such file or folder (expected a run folder, {MODEL_FILE} or {MODEL_JSON})"
        )
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:
        raise CheckpointError(
            f"{path}: no such file or folder (a Hub repo id needs: pip install huggingface_hub)"
        ) from None
    repo, _, rev = text.removeprefix("hf://").partition("@")
    try:
        local = snapshot_download(
            repo, revision=rev or None, allow_patterns=[MODEL_FILE, MODEL_JSON, "README.md"]
        )
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a local path, and the Hub repo could not be fetched "
                              f"({str(exc).splitlines()[0][:160]})") from None  # fmt: skip
    return Path(local)


def check_shapes(model_config: dict[str, Any], shapes: dict[str, tuple[int, ...]], where: str) -> None:
    """Refuse weights whose shapes are not the recorded architecture's, before any real allocation.

    The architecture is built on the meta device (no memory), so a model.json asking for nf = 1000000
    fails here in microseconds instead of trying to allocate terabytes.
    """
    from hpcvae.models import build_model

    try:
        with torch.device("meta"):
            own = {k: tuple(v.shape) for k, v in build_model(**model_config).state_dict().items()}
    except (HpcvaeError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{where}: cannot rebuild the model from model_config: {exc}") from None
    vae = {k: v for k, v in shapes.items() if not k.startswith("flow_prior.")}
    missing = sorted(set(own) - set(vae))
    bad = next((f"{k} {vae[k]} vs {own[k]}" for k in own if k in vae and vae[k] != own[k]), None)
    if missing or bad:
        what = f"shape mismatch {bad}" if bad else f"missing {len(missing)} tensors (e.g. {missing[0]})"
        raise CheckpointError(f"{where}: the weights do not fit the architecture it records ({model_config.get('arch')}, "
                              f"nf {model_config.get('nf')}, z_dim {model_config.get('z_dim')}): {what}")  # fmt: skip


def _load_state(model: torch.nn.Module, sd: dict[str, torch.Tensor], *, strict: bool, where: str) -> None:
    """load_state_dict with the mismatches named on one line instead of PyTorch's multi-line dump."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [
        f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in sd and sd[k].shape != own[k].shape
    ]
    problems = []
    if strict and missing:
        problems.append(f"missing {len(missing)} tensors (e.g. {missing[0]})")
    if strict and unexpected:
        problems.append(f"unexpected {len(unexpected)} tensors (e.g. {unexpected[0]})")
    if shapes:
        problems.append(f"shape mismatch {shapes[0]}")
    if problems:
        raise CheckpointError(f"{where}: weights do not match the model: " + "; ".join(problems))
    model.load_state_dict(sd, strict=strict)
