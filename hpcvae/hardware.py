"""What the device computes natively, and the one place that picks precision, layout and chunk sizes from it.

A precision the hardware only emulates is slower, not faster: on a CPU with AVX512 but no
AVX512-BF16, a bf16 matmul ran at 0.059 TFLOP/s against 0.296 in fp32, and bf16 training was
2.3x slower than the seed's fp32 loop.  So ``--precision auto`` (the default) asks
:func:`capabilities` what the device does natively and :func:`choose_precision` decides:

==========================================  =========  ==============================================
device                                      precision  channels_last
==========================================  =========  ==============================================
CUDA, compute capability >= 8.0 (Ampere+)   bf16       yes (tensor-core convolutions are NHWC)
CUDA, 7.x (Volta/Turing: fp16 tensor cores) fp16       yes
older CUDA                                  fp32       no
CPU with AVX512-BF16 or AMX-BF16 (or Arm    bf16       yes
BF16)
other CPUs                                  fp32       yes: oneDNN's NHWC convolutions were 1.1-1.9x
                                                       faster in fp32 on an AVX2 EPYC (cvae2 at 158,
                                                       galaxy_vae at 64) and 1.2x on an AVX512 Xeon
==========================================  =========  ==============================================

Everything that picks a precision or a kernel path asks here: training (:func:`resolve_training`),
the flow prior's fit (:func:`prior_precision`), generation (:func:`generation_chunk`,
:func:`inference_layout`; always fp32, since generated pixels are science data).  Tests fake
a device by passing a :class:`Capabilities` to the ``choose_*`` functions, the one boundary.
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")
"""/proc/cpuinfo flags of native bf16 arithmetic (x86 AVX512-BF16, AMX; ``bf16`` on Arm's Features line)."""


@dataclass(frozen=True, kw_only=True)
class Capabilities:
    """What one device computes natively; built by :func:`capabilities`, or by hand in tests."""

    kind: str
    """``cpu`` or ``cuda``."""
    name: str
    """The device as its vendor names it (GPU name, or CPU model and its widest vector unit)."""
    native_bf16: bool
    """bf16 matmuls and convolutions run in hardware, at least as fast as fp32."""
    native_fp16: bool
    """fp16 runs in hardware (tensor cores) faster than fp32."""
    avx512: bool = False
    """x86 CPU with AVX512 (wide enough for oneDNN's blocked channels-last kernels to pay off)."""
    compute_capability: tuple[int, int] | None = None
    """CUDA compute capability."""
    memory_bytes: int = 0
    """Device memory (CUDA) or 0 for host memory."""

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "native_bf16": self.native_bf16,
                "native_fp16": self.native_fp16, "avx512": self.avx512,
                "compute_capability": list(self.compute_capability) if self.compute_capability else None}  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class Choice:
    """A decision and the reason it was taken (printed once, recorded in config.toml and model.json)."""

    value: Any
    reason: str


def _cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        head, _, rest = line.partition(":")
        if head.strip() in ("flags", "Features"):
            return frozenset(rest.split())
    return frozenset()


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


@functools.lru_cache(maxsize=8)
def capabilities(device: str | torch.device = "cpu") -> Capabilities:
    """Ask the hardware (CUDA properties, /proc/cpuinfo flags and torch's CPU capability)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        idx = dev.index if dev.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        cc = (int(props.major), int(props.minor))
        return Capabilities(kind="cuda", name=props.name, native_bf16=cc >= (8, 0), native_fp16=cc >= (7, 0),
                            compute_capability=cc, memory_bytes=int(props.total_memory))  # fmt: skip
    flags = _cpu_flags()
    simd = torch.backends.cpu.get_cpu_capability()  # "AVX512", "AVX2", "DEFAULT", "SVE256", ...
    return Capabilities(kind="cpu", name=f"{_cpu_name()} ({simd})", native_bf16=bool(flags & set(BF16_CPU_FLAGS)),
                        native_fp16=False, avx512="avx512f" in flags or simd.startswith("AVX512"))  # fmt: skip


def choose_precision(requested: str, caps: Capabilities) -> Choice:
    """``auto``: bf16 where native, else fp16 on a GPU that has it natively, else fp32; explicit wins."""
    if requested != "auto":
        if requested == "bf16" and not caps.native_bf16:
            return Choice(value="bf16", reason=f"asked for; {caps.name} has no native bf16, so it is emulated and "
                                               "slower than fp32 (--precision auto picks fp32 here)")  # fmt: skip
        if requested == "fp16" and caps.kind == "cpu":
            return Choice(
                value="fp16", reason="asked for; CPUs have no fast fp16 (--precision auto picks fp32)"
            )
        return Choice(value=requested, reason="asked for")
    if caps.native_bf16:
        return Choice(value="bf16", reason=f"auto: {caps.name} computes bf16 natively")
    if caps.kind == "cuda" and caps.native_fp16:
        return Choice(
            value="fp16", reason=f"auto: {caps.name} has fp16 tensor cores but no bf16 (loss scaling on)"
        )
    return Choice(value="fp32", reason=f"auto: {caps.name} has no native bf16 or fp16, so fp32 is fastest")


def choose_channels_last(requested: bool | None, caps: Capabilities) -> Choice:
    """``None`` (auto): NHWC on CPUs and on tensor-core GPUs; explicit wins."""
    if requested is not None:
        return Choice(value=bool(requested), reason="asked for")
    if caps.kind == "cuda":
        ok = caps.native_fp16 or caps.native_bf16
        why = "tensor-core convolutions are NHWC" if ok else "no tensor cores, NCHW kernels"
    else:
        ok, why = True, "oneDNN's NHWC convolutions are faster on CPUs (1.1-1.9x measured)"
    return Choice(value=ok, reason=f"auto: {why}")


def warn_line(choice: Choice) -> str | None:
    """The one line to print when an explicit request will be slower than ``auto``."""
    return f"warning: --precision {choice.value}: {choice.reason}" if "emulated" in choice.reason else None


def resolve_training(
    precision: str, channels_last: bool | None, device: torch.device
) -> tuple[Choice, Choice]:
    """(precision, channels_last) for a training run on ``device``."""
    caps = capabilities(device)
    return choose_precision(precision, caps), choose_channels_last(channels_last, caps)


def prior_precision() -> Choice:
    """The flow prior always fits in fp32: its spline log-densities need the mantissa, and it is tiny."""
    return Choice(value="fp32", reason="the flow's log-density sums lose accuracy in 16-bit")


GENERATION_BUDGET = {"cpu": 1 << 22, "cuda": 1 << 28}
"""Decoder activation units (channels x pixels of the widest layer) per call.  On a 2-core CPU one decode of
1024 galaxy_vae images at 64 px took 3-6x longer than chunks of 32-64 (the upsampling's memory traffic
outgrows the caches): 4M units is 32 images at nf = 32 and 128 at nf = 8, the measured optimum.  A GPU
wants large batches to fill its SMs."""


def generation_chunk(device: str | torch.device, nf: int, image_size: int) -> int:
    """Images per decoder call on ``device``: a power of two in [8, 1024] sized by :data:`GENERATION_BUDGET`."""
    caps = capabilities(device)
    per_image = max(1, nf * image_size * image_size)
    n = max(8, min(1024, GENERATION_BUDGET[caps.kind] // per_image))
    return 1 << (n.bit_length() - 1)


def inference_layout(device: str | torch.device) -> torch.memory_format:
    """The memory format a loaded model runs in on ``device`` (the training rule: NHWC where faster)."""
    return (
        torch.channels_last
        if choose_channels_last(None, capabilities(device)).value
        else torch.contiguous_format
    )


def choose_device(requested: str, what: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; an unavailable device is a one-line error naming it."""
    from hpcvae.errors import ConfigError

    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(requested)
    except (RuntimeError, ValueError):
        raise ConfigError(f"{what}: --device {requested!r} is not a device (cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and (
        not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()
    ):
        raise ConfigError(f"{what}: --device {requested} asked for, but this machine has no such CUDA device")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"{what}: --device {requested}: only cpu and cuda are supported")
    return dev
