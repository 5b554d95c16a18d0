"""Gradient all-reduce against backward, measured on gloo here, and a model of multi-node scaling.

``python -m benchmarks.scaling --out benchmarks/results`` spawns 2 gloo ranks on this machine
and times, for cvae2 (the seed's size, nf 64, z 32) at 158², one DDP step with gradient
all-reduce against the same step under ``no_sync()`` (no communication): the difference is
what communication costs after overlap with the backward pass.  It also times a bare
all-reduce of the gradient bytes (fp32, and fp16 as the compression hook sends them).

``--model docs/scaling.md`` writes the scaling model: ring all-reduce of the gradient bytes
over N GPUs at a per-GPU network bandwidth, overlapped with the backward pass, against the
step's compute from FLOPs at a stated MFU (a GPU measurement replaces it when one exists).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks import common

GFLOP_PER_IMAGE = 6.5
"""cvae2 at 158², forward + backward (DEVELOPERS.md; the count in benchmarks.epoch_time agrees)."""
PEAK_BF16_TFLOPS = 989.0
"""H100/H200 SXM dense bf16."""


def _rank(rank: int, world: int, port: int, batch: int, steps: int, out: str) -> None:
    import torch.distributed as tdist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from hpcvae.models import build_model

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    tdist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = build_model("cvae2", "default", image_size=158)
    ddp = DDP(model, bucket_cap_mb=25)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.rand(batch, 1, 158, 158)
    z = torch.full((batch,), 0.5)
    n_params = sum(p.numel() for p in model.parameters())

    def step(sync: bool) -> float:
        tdist.barrier()
        t0 = time.perf_counter()
        ctx = ddp.no_sync() if not sync else torch.enable_grad()
        with ctx:
            loss = model.compute_loss(ddp(x, z), x, z, 0.1)["total"]
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    step(True)
    step(False)
    with_comm = [step(True) for _ in range(steps)]
    without = [step(False) for _ in range(steps)]
    grads = torch.zeros(n_params)
    times: dict[str, list[float]] = {"fp32": [], "fp16": []}
    for dtype, key in ((torch.float32, "fp32"), (torch.float16, "fp16")):
        g = grads.to(dtype)
        for _ in range(steps + 1):
            tdist.barrier()
            t0 = time.perf_counter()
            tdist.all_reduce(g)
            times[key].append(time.perf_counter() - t0)
        times[key] = times[key][1:]
    if rank == 0:
        Path(out).write_text(json.dumps({
            "n_params": n_params, "grad_mb_fp32": n_params * 4 / 1e6, "batch": batch, "world_size": world,
            "step_with_allreduce_s": common.summarise(with_comm), "step_no_sync_s": common.summarise(without),
            "allreduce_fp32_s": common.summarise(times["fp32"]), "allreduce_fp16_s": common.summarise(times["fp16"]),
        }))  # fmt: skip
    tdist.destroy_process_group()


def measure(batch: int, steps: int, workdir: Path) -> dict[str, Any]:
    """Spawn 2 gloo ranks and time DDP steps with and without the all-reduce."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = workdir / "scaling-measure.json"
    mp.spawn(_rank, args=(2, port, batch, steps, str(out)), nprocs=2, join=True)
    m = json.loads(out.read_text())
    w, nw = m["step_with_allreduce_s"]["median"], m["step_no_sync_s"]["median"]
    m["comm_after_overlap_s"] = max(0.0, w - nw)
    m["comm_share_of_step"] = m["comm_after_overlap_s"] / w
    m["allreduce_over_step_no_sync"] = m["allreduce_fp32_s"]["median"] / nw
    return m


def ring_allreduce_s(
    nbytes: float, n: int, gbit_s: float, latency_s: float = 10e-6, buckets: int = 1
) -> float:
    """Bandwidth term 2 (N-1)/N bytes / B, plus 2 (N-1) latency hops per bucket."""
    if n <= 1:
        return 0.0
    return 2 * (n - 1) / n * nbytes / (gbit_s * 1e9 / 8) + 2 * (n - 1) * latency_s * buckets


def efficiency(
    n: int,
    per_gpu_batch: int,
    gbit_s: float,
    mfu: float,
    grad_bytes: float,
    gpus_per_node: int = 8,
    nvlink_gb_s: float = 450.0,
    overlap: float = 2 / 3,
) -> dict[str, float]:
    """Weak-scaling efficiency of N GPUs: compute / (compute + the communication not hidden by backward).

    Inside a node (N <= gpus_per_node) the ring runs over NVLink; across nodes NCCL's ring is
    limited by the slowest link, each GPU's share of the network.  The backward pass (about
    ``overlap`` of the step) hides communication that starts with the first full bucket.
    """
    compute = per_gpu_batch * GFLOP_PER_IMAGE * 1e9 / (mfu * PEAK_BF16_TFLOPS * 1e12)
    buckets = max(1, round(grad_bytes / 25e6))
    link = nvlink_gb_s * 8 if n <= gpus_per_node else gbit_s
    comm = ring_allreduce_s(grad_bytes, n, link, buckets=buckets)
    exposed = max(0.0, comm - overlap * compute)
    return {"compute_ms": compute * 1e3, "comm_ms": comm * 1e3, "efficiency": compute / (compute + exposed)}


def model_md(measured: dict[str, Any] | None, mfu: float = 0.3) -> str:
    grad_fp32 = 5.4e6 * 4 if not measured else measured["n_params"] * 4
    lines = [
        "# Multi-node scaling of cvae2 at 158² (model)",
        "",
        "Generated by `python -m benchmarks.scaling --model docs/scaling.md`. No GPU has run this code yet, so",
        f"per-step compute comes from FLOPs: {GFLOP_PER_IMAGE} GFLOP per image (forward + backward) at "
        f"{mfu:.0%} MFU of {PEAK_BF16_TFLOPS:.0f} TFLOP/s (dense bf16, H100/H200); replace it with "
        "`benchmarks/gpu_check.sh`'s measured step when one exists.",
        f"Gradients: {grad_fp32 / 1e6:.1f} MB a step in fp32, half with `ddp.comm_hook` = `bf16`. Ring all-reduce: "
        "2 (N-1)/N of the bytes over the slowest link plus 10 µs per hop and bucket; 8 GPUs per node on NVLink "
        "(450 GB/s); across nodes each GPU's share of the network at 100/200/400 Gb/s. The backward pass "
        "(2/3 of the step) hides communication; efficiency = compute / (compute + exposed communication).",
        "",
    ]
    for label, gb in (("fp32 gradients", grad_fp32), ("bf16-compressed gradients", grad_fp32 / 2)):
        lines += [f"## Weak-scaling efficiency, {label}", "",
                  "| per-GPU batch | network | step compute | 1 | 8 | 16 | 32 | 64 GPUs |",
                  "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for b in (64, 256):
            for bw in (100, 200, 400):
                effs = [efficiency(n, b, bw, mfu, gb) for n in (1, 8, 16, 32, 64)]
                lines.append(
                    f"| {b} | {bw} Gb/s | {effs[0]['compute_ms']:.2f} ms | "
                    + " | ".join(f"{e['efficiency']:.0%}" for e in effs)
                    + " |"
                )
        lines.append("")
    need = {}
    for bw in (100, 200, 400):
        for gb, label in ((grad_fp32, "fp32"), (grad_fp32 / 2, "bf16")):
            b = next(
                (
                    b
                    for b in (16, 32, 64, 128, 256, 512, 1024)
                    if efficiency(16, b, bw, mfu, gb)["efficiency"] >= 0.9
                ),
                None,
            )
            need[(bw, label)] = b
    lines += ["## The per-GPU batch that keeps 16 GPUs (2 nodes) at ≥ 90%", "",
              "| network | fp32 gradients | bf16-compressed |", "|---|---|---|"]  # fmt: skip
    for bw in (100, 200, 400):
        lines.append(f"| {bw} Gb/s | {need[(bw, 'fp32')] or '> 1024'} | {need[(bw, 'bf16')] or '> 1024'} |")
    e64 = {(bw, lab): efficiency(16, 64, bw, mfu, g)["efficiency"]
           for bw in (100, 200, 400) for g, lab in ((grad_fp32, "fp32"), (grad_fp32 / 2, "bf16"))}  # fmt: skip
    ok = [f"{bw} Gb/s with {lab} gradients" for (bw, lab), e in e64.items() if e >= 0.9]
    step64 = efficiency(1, 64, 400, mfu, grad_fp32)["compute_ms"]
    lines += [
        "",
        f"**The seed's batch 64** is a {step64:.1f} ms step: at 16 GPUs it reaches "
        + ", ".join(f"{e:.0%} ({bw} Gb/s, {lab})" for (bw, lab), e in e64.items())
        + ". "
        + (f"It keeps ≥ 90% only at {' and '.join(ok)}." if ok else "It never keeps 90%.")
        + " A small model scales out by a bigger per-GPU batch (with the learning rate scaled to the global "
        "batch) or by compressing its gradients (`--set ddp.comm_hook=bf16`), or stays on one node, where "
        "NVLink makes the all-reduce nearly free.",
        "",
    ]
    if measured:
        lines += [
            "## Measured here: all-reduce against backward on gloo (2 ranks, 1 thread each)",
            "",
            f"cvae2 at 158², batch {measured['batch']} per rank: a DDP step takes "
            f"{measured['step_with_allreduce_s']['median']:.3f} s, {measured['step_no_sync_s']['median']:.3f} s "
            f"without the all-reduce (`no_sync`), so communication costs {measured['comm_after_overlap_s'] * 1e3:.0f} ms "
            f"({measured['comm_share_of_step']:.0%} of the step) after overlap. A bare all-reduce of the "
            f"{measured['grad_mb_fp32']:.1f} MB of gradients takes {measured['allreduce_fp32_s']['median'] * 1e3:.0f} ms "
            f"in fp32 and {measured['allreduce_fp16_s']['median'] * 1e3:.0f} ms in fp16 over loopback TCP. The two ranks "
            "share this machine's two cores, so gloo's reduction competes with the backward pass instead of "
            "overlapping it, and the DDP step also pays its bucket copies: the step difference is larger than the "
            "bare all-reduce. These CPU numbers check the method; the GPU model above uses the gradient bytes.",
            "",
        ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="results folder for the gloo measurement (e.g. benchmarks/results)")
    ap.add_argument("--model", help="write the scaling model to this Markdown file (e.g. docs/scaling.md)")
    ap.add_argument("--batch", type=int, default=4, help="per-rank batch of the gloo measurement")
    ap.add_argument("--steps", type=int, default=3, help="timed steps of each kind")
    ap.add_argument("--mfu", type=float, default=0.3, help="model FLOP utilisation assumed for the GPU step")
    ap.add_argument("--no-measure", action="store_true", help="only the model (no gloo run)")
    a = ap.parse_args(argv)
    measured = None
    if not a.no_measure:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            measured = measure(a.batch, a.steps, Path(tmp))
        env = common.environment(torch.device("cpu"))
        print(
            f"scaling: DDP step {measured['step_with_allreduce_s']['median']:.3f} s, no_sync "
            f"{measured['step_no_sync_s']['median']:.3f} s, all-reduce fp32 "
            f"{measured['allreduce_fp32_s']['median'] * 1e3:.0f} ms of {measured['grad_mb_fp32']:.1f} MB"
        )
        if a.out:
            stem = common.result_stem("allreduce", torch.device("cpu"))
            common.write_results(a.out, stem, {"benchmark": "allreduce", "environment": env, **measured},
                                 model_md(measured, a.mfu))  # fmt: skip
            if Path(a.out).resolve() == common.RESULTS_DIR.resolve():
                common.update_index(a.out)
    if a.model:
        Path(a.model).write_text(model_md(measured, a.mfu))
        print(f"scaling: wrote {a.model}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
