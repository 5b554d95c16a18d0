"""hpcvae.hardware: the decision table for precision and layout, with devices faked at its one boundary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hpcvae import hardware
from hpcvae.hardware import Capabilities, choose_channels_last, choose_precision

XEON_AVX512 = Capabilities(
    kind="cpu", name="Xeon (AVX512)", native_bf16=False, native_fp16=False, avx512=True
)
SAPPHIRE_RAPIDS = Capabilities(
    kind="cpu", name="Xeon 8480 (AVX512)", native_bf16=True, native_fp16=False, avx512=True
)
EPYC_AVX2 = Capabilities(kind="cpu", name="EPYC (AVX2)", native_bf16=False, native_fp16=False)
H100 = Capabilities(kind="cuda", name="H100", native_bf16=True, native_fp16=True, compute_capability=(9, 0))
V100 = Capabilities(kind="cuda", name="V100", native_bf16=False, native_fp16=True, compute_capability=(7, 0))
P100 = Capabilities(kind="cuda", name="P100", native_bf16=False, native_fp16=False, compute_capability=(6, 0))


@pytest.mark.parametrize(
    ("caps", "precision", "channels_last"),
    [
        (XEON_AVX512, "fp32", True),
        (SAPPHIRE_RAPIDS, "bf16", True),
        (EPYC_AVX2, "fp32", True),
        (H100, "bf16", True),
        (V100, "fp16", True),
        (P100, "fp32", False),
    ],
    ids=["avx512-no-bf16", "amx", "avx2", "h100", "v100", "p100"],
)
def test_auto_decision_table(caps: Capabilities, precision: str, channels_last: bool) -> None:
    p = choose_precision("auto", caps)
    c = choose_channels_last(None, caps)
    assert (p.value, c.value) == (precision, channels_last)
    assert p.reason.startswith("auto: ") and caps.name in p.reason
    assert c.reason.startswith("auto: ")


def test_explicit_requests_win_and_emulated_bf16_is_warned() -> None:
    for caps in (XEON_AVX512, EPYC_AVX2, H100):
        assert choose_precision("fp32", caps).value == "fp32"
        assert choose_channels_last(False, caps).value is False
    slow = choose_precision("bf16", XEON_AVX512)
    assert slow.value == "bf16" and "emulated" in slow.reason
    assert hardware.warn_line(slow).startswith("warning: --precision bf16:")
    assert hardware.warn_line(choose_precision("bf16", SAPPHIRE_RAPIDS)) is None
    assert hardware.warn_line(choose_precision("bf16", H100)) is None


def test_this_machine_is_read_from_the_hardware() -> None:
    caps = hardware.capabilities("cpu")
    assert caps.kind == "cpu" and caps.name
    flags = hardware._cpu_flags()
    assert caps.native_bf16 == bool(flags & set(hardware.BF16_CPU_FLAGS))


def test_generation_chunks_follow_the_decoder_size() -> None:
    assert hardware.generation_chunk("cpu", 8, 64) == 128
    assert hardware.generation_chunk("cpu", 32, 64) == 32
    assert hardware.generation_chunk("cpu", 64, 158) == 8  # never below 8
    for n in (hardware.generation_chunk("cpu", nf, s) for nf in (1, 8, 64) for s in (16, 64, 158)):
        assert n & (n - 1) == 0 and 8 <= n <= 1024


def test_chunked_sampling_gives_each_row_the_same_galaxy() -> None:
    """sample(n) decodes in chunks: row i is the same whatever n and whatever the chunk size."""
    from hpcvae.models import build_model

    torch.manual_seed(0)
    m = build_model("galaxy_vae", "debug").eval()
    chunk = m._chunk()
    n = 2 * chunk + 3
    big = m.sample(n, redshift=0.7, generator=torch.Generator().manual_seed(5))
    small = m.sample(4, redshift=0.7, generator=torch.Generator().manual_seed(5))
    z = torch.randn(n, m.z_dim, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        whole = m.decode(z, torch.full((n,), 0.7))
    assert big.shape == (n, 1, 64, 64) and big.is_contiguous()
    torch.testing.assert_close(big, whole, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(big[:4], small, rtol=1e-5, atol=1e-6)
    rec = m.reconstruct(big, redshift=0.7)
    torch.testing.assert_close(rec[-3:], m.reconstruct(big[-3:], redshift=0.7), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_auto_is_decided_printed_and_recorded(tiny_shards: Path, tmp_path: Path) -> None:
    """A run with the defaults prints the choice once and records it in config.toml and model.json."""
    import subprocess
    import sys

    from train_helpers import child_env, train_args

    out = tmp_path / "run"
    args = train_args(tiny_shards, out, "--precision", "auto", epochs=1)
    res = subprocess.run([sys.executable, "-m", "hpcvae.train", *args], capture_output=True, text=True,
                         env=child_env(), timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr
    want = choose_precision("auto", hardware.capabilities("cpu")).value
    assert res.stdout.count(f"precision {want} (auto: ") == 1
    toml = (out / "config.toml").read_text()
    assert toml.startswith("# precision and channels_last as resolved on ")
    assert f'precision = "{want}"' in toml and "channels_last = true" in toml
    training = json.loads((out / "model.json").read_text())["training"]
    assert training["precision"] == want
    assert training["hardware"]["precision_reason"].startswith("auto: ")
    assert training["hardware"]["device"]["kind"] == "cpu"
