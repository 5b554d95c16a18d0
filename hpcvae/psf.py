"""PSF convolution on the device: galaxy2galaxy's forward model, batched with FFTs.

A PSF-free model's decoder draws the galaxy as it would look without the telescope; the
likelihood compares that image, convolved with each galaxy's own PSF, with the observed
pixels.  The FFTs run in float32 even under autocast (cuFFT has no bf16 path for these
sizes, and the PSF's faint wings need the precision).
"""

from __future__ import annotations

import torch


def psf_convolve(images: torch.Tensor, psf: torch.Tensor) -> torch.Tensor:
    """Linear ("same") convolution of (B, 1, H, W) images with (B, 1, P, P) or (1, 1, P, P) PSFs.

    Zero-padded to H + P - 1 so nothing wraps around; the output is centred like
    ``scipy.signal.fftconvolve(mode="same")`` for an odd P.  PSFs are expected to sum to 1
    (the shards store them so), which conserves flux.
    """
    if images.dim() != 4 or psf.dim() != 4 or psf.shape[-1] != psf.shape[-2]:
        raise ValueError(
            f"psf_convolve: images (B,1,H,W) and psf (B,1,P,P), got {tuple(images.shape)}, {tuple(psf.shape)}"
        )
    h, w = images.shape[-2:]
    p = psf.shape[-1]
    s = (h + p - 1, w + p - 1)
    with torch.autocast(device_type=images.device.type, enabled=False):
        x = images.float()
        k = psf.to(x.device, torch.float32)
        full = torch.fft.irfft2(torch.fft.rfft2(x, s=s) * torch.fft.rfft2(k, s=s), s=s)
    o = (p - 1) // 2
    return full[..., o : o + h, o : o + w]
