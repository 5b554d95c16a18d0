"""The seed research's own training loop, kept as the yardstick every benchmark is a ratio to.

The seed trained one notebook per model: an ``h5py``-backed ``Dataset`` read one image
at a time through ``DataLoader(batch_size=64, shuffle=True)``, ``.cuda()`` on each batch,
fp32, ``Adam(lr=1e-3)``, loss ``MSE(sum) + beta * KL(sum)`` and ``loss.item()`` on
every step.  This file re-implements that loop from the layer tables in
``../shared/reference/seed-models.md`` with nothing borrowed from ``hpcvae``: the
modules are the notebooks' ``nn.Sequential`` stacks, ``.cuda()`` becomes
``.to(device)``.  Keeping it independent is the point: if our package got slower,
sharing code with the baseline would hide it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

SEED_ARCHS = ("vae158", "cvae2")


def _encoder158(nf: int, nc: int = 1) -> nn.Sequential:
    """vae158 encoder trunk: 158 -> 79 -> 40 -> 20 -> 10 -> 5, one output map."""
    return nn.Sequential(
        nn.Conv2d(nc, nf, 4, 2, 1, bias=False),
        nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(nf, nf * 2, 3, 2, 1, bias=False),
        nn.BatchNorm2d(nf * 2),
        nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(nf * 2, nf * 4, 4, 2, 1, bias=False),
        nn.BatchNorm2d(nf * 4),
        nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(nf * 4, nf * 8, 4, 2, 1, bias=False),
        nn.BatchNorm2d(nf * 8),
        nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(nf * 8, 1, 4, 2, 1, bias=False),
    )


def _decoder158(nf: int, nc: int = 1) -> nn.Sequential:
    """vae158 decoder: 5 -> 10 -> 20 -> 40 -> 79 -> 158, Sigmoid output."""
    return nn.Sequential(
        nn.ConvTranspose2d(nc, nf * 8, 4, 2, 1, bias=True),
        nn.BatchNorm2d(nf * 8),
        nn.ReLU(True),
        nn.ConvTranspose2d(nf * 8, nf * 4, 4, 2, 1, bias=False),
        nn.BatchNorm2d(nf * 4),
        nn.ReLU(True),
        nn.ConvTranspose2d(nf * 4, nf * 2, 4, 2, 1, bias=False),
        nn.BatchNorm2d(nf * 2),
        nn.ReLU(True),
        nn.ConvTranspose2d(nf * 2, nf, 3, 2, 1, bias=False),
        nn.BatchNorm2d(nf),
        nn.ReLU(True),
        nn.ConvTranspose2d(nf, 1, 4, 2, 1, bias=False),
        nn.Sigmoid(),
    )


class SeedVAE158(nn.Module):
    """The seed's 158x158 beta-VAE (unconditional)."""

    conditional = False

    def __init__(self, nf: int = 64, z_dim: int = 32) -> None:
        super().__init__()
        self.z_dim = z_dim
        self.encoder = _encoder158(nf)
        self.fc_mu = nn.Linear(25, z_dim)
        self.fc_logvar = nn.Linear(25, z_dim)
        self.fc_dec = nn.Linear(z_dim, 25)
        self.decoder = _decoder158(nf)

    def forward(self, x: torch.Tensor, redshift: torch.Tensor | None = None):
        h = self.encoder(x).view(x.size(0), -1)
        mu, logvar = self.fc_mu(h), self.fc_logvar(h)
        z = mu + torch.exp(logvar / 2) * torch.randn_like(mu)
        recon = self.decoder(self.fc_dec(z).view(-1, 1, 5, 5))
        return recon, mu, logvar


class SeedCVAE2(nn.Module):
    """The seed's recommended conditional model: redshift joins the flat features and z."""

    conditional = True

    def __init__(self, nf: int = 64, z_dim: int = 32) -> None:
        super().__init__()
        self.z_dim = z_dim
        self.encoder = _encoder158(nf)
        self.fc_mu = nn.Linear(26, z_dim)
        self.fc_logvar = nn.Linear(26, z_dim)
        self.fc_dec = nn.Linear(z_dim + 1, 25)
        self.decoder = _decoder158(nf)

    def forward(self, x: torch.Tensor, redshift: torch.Tensor):
        r = redshift.view(-1, 1)
        h = torch.cat([self.encoder(x).view(x.size(0), -1), r], dim=1)
        mu, logvar = self.fc_mu(h), self.fc_logvar(h)
        z = mu + torch.exp(logvar / 2) * torch.randn_like(mu)
        recon = self.decoder(self.fc_dec(torch.cat([z, r], dim=1)).view(-1, 1, 5, 5))
        return recon, mu, logvar


def build_seed_model(arch: str, nf: int = 64, z_dim: int = 32) -> nn.Module:
    if arch == "vae158":
        return SeedVAE158(nf, z_dim)
    if arch == "cvae2":
        return SeedCVAE2(nf, z_dim)
    raise ValueError(f"seed baseline has no {arch!r}; choose from {', '.join(SEED_ARCHS)}")


def seed_loss(recon, x, mu, logvar, beta: float) -> torch.Tensor:
    """MSE(sum) + beta * KL(sum), as the notebooks computed it."""
    mse = F.mse_loss(recon, x, reduction="sum")
    kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return mse + beta * kl


class SeedH5Dataset(Dataset):
    """One galaxy per ``__getitem__`` straight from the h5 file, normalised on the fly.

    Mirrors the seed: the file holds an ``images`` (N x H x W) and a ``redshifts`` (N)
    dataset; every item is a separate h5py read.  The min-max constants are the same
    ones our loader uses so both paths hand the model identical tensors.
    """

    def __init__(self, path: str | Path, vmin: float, vmax: float) -> None:
        self.path = str(path)
        self.vmin, self.scale = float(vmin), 1.0 / float(vmax - vmin)
        with h5py.File(self.path, "r") as f:
            self.n = int(f["images"].shape[0])
        self._f: h5py.File | None = None

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if self._f is None:  # opened lazily so each DataLoader worker has its own handle
            self._f = h5py.File(self.path, "r")
        img = (self._f["images"][i] - self.vmin) * self.scale
        x = torch.from_numpy(np.clip(img, 0.0, 1.0).astype(np.float32)).unsqueeze(0)
        z = torch.tensor(self._f["redshifts"][i], dtype=torch.float32)
        return x, z


def write_seed_h5(path: str | Path, images: np.ndarray, redshifts: np.ndarray) -> Path:
    """Write images in the seed's layout: ``images`` (N x H x W float32) and ``redshifts`` (N)."""
    path = Path(path)
    with h5py.File(path, "w") as f:
        f.create_dataset("images", data=np.asarray(images, dtype=np.float32))
        f.create_dataset("redshifts", data=np.asarray(redshifts, dtype=np.float32))
    return path


def seed_loader(path: str | Path, vmin: float, vmax: float, batch_size: int = 64, num_workers: int = 0):
    """The seed's loader: ``DataLoader(batch_size=64, shuffle=True)`` over the h5 dataset."""
    return DataLoader(
        SeedH5Dataset(path, vmin, vmax), batch_size=batch_size, shuffle=True, num_workers=num_workers
    )


@dataclass(kw_only=True)
class SeedRun:
    """Timings of the seed loop: per-step wall times and the loader's share."""

    step_times: list[float]
    data_wait: list[float]
    losses: list[float]
    batch_size: int


def run_seed_loop(
    model: nn.Module,
    loader,
    device: torch.device,
    steps: int,
    warmup: int = 1,
    beta: float = 0.1,
    lr: float = 1e-3,
) -> SeedRun:
    """The notebooks' training loop, timed per step.

    ``.item()`` on every step is the seed's, and it is also what makes a wall-clock
    per step honest on a GPU without extra synchronisation.  The first ``warmup``
    steps are run but not timed.
    """
    model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    step_times: list[float] = []
    waits: list[float] = []
    losses: list[float] = []
    total = warmup + steps
    done = 0
    bs = 0
    while done < total:
        it = iter(loader)
        while done < total:
            t0 = time.perf_counter()
            try:
                x, z = next(it)
            except StopIteration:
                break
            t1 = time.perf_counter()
            x, z = x.to(device), z.to(device)
            recon, mu, logvar = model(x, z)
            loss = seed_loss(recon, x, mu, logvar, beta)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            t2 = time.perf_counter()
            if done >= warmup:
                step_times.append(t2 - t0)
                waits.append(t1 - t0)
            bs = int(x.shape[0])
            done += 1
    return SeedRun(step_times=step_times, data_wait=waits, losses=losses, batch_size=bs)
