"""epoch_time's results: repeats merged, paired ratios, the fastest precision, the FLOP check, printing.

Kept apart from the timing code so that what is measured and how it is summarised read separately.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from benchmarks import common

if TYPE_CHECKING:
    from benchmarks.epoch_time import Row


SEED_REF = {"vae158": "vae158", "vae128": "vae158", "cvae2": "cvae2", "cvae": "cvae2", "fancy_cvae": "cvae2"}
"""The seed model each architecture's ratio is taken against (the baseline copies only the seed's cvae2 and vae158)."""
PEER_ARCH = "cvae2"
"""The bare loop and Lightning run the seed's pick, the model every ratio of the issue is about."""


def derive(res: dict[str, Any], batch: int, env: dict[str, Any], precision: str) -> dict[str, Any]:
    """Per-step times -> images/s, epoch seconds, MFU, data-wait share."""
    steps = np.asarray(res.get("step_times_s") or [], dtype=np.float64)
    waits = np.asarray(res.get("wait_times_s") or [], dtype=np.float64)
    if steps.size == 0:
        return {}
    mean = float(steps.mean())
    flops = res.get("flops_per_batch") or 0
    start_mm = env["matmul_tflops"]["bf16" if precision in ("bf16", "fp16") else "fp32"]
    mm = res.get("matmul_tflops") or start_mm
    rates = [r for r in (res.get("matmul_tflops"), res.get("matmul_tflops_after")) if r]
    peak = env.get("bf16_peak_tflops")
    first = res.get("warmup_times_s") or []
    d = {
        "step_s": mean,
        "step_s_median": float(np.median(steps)),
        "step_s_min": float(steps.min()),
        "step_s_max": float(steps.max()),
        "images_per_s": batch / mean,
        "epoch_s_81k": (common.COSMOS_EPOCH // batch) * mean,
        "epoch_s_314k": (common.BIG_EPOCH // batch) * mean,
        "data_wait_share": float(waits.sum() / steps.sum()) if waits.size else None,
        "compute_step_s": float((steps - waits).mean()) if waits.size else mean,
        "gflop_per_image": flops / batch / 1e9,
        "achieved_tflops": flops / mean / 1e12,
        "mfu_vs_matmul": flops / mean / 1e12 / mm if mm else None,
        "mfu_vs_bf16_peak": flops / mean / 1e12 / peak if peak else None,
        "cpu_share": min(rates) / start_mm if rates and start_mm else None,
        "warmup_overhead_s": max(0.0, first[0] - mean) if first else None,
        "compile_s": max(0.0, first[0] - mean)
        if first and res.get("variant", {}).get("option", "").endswith("compile")
        else None,
        "first_step_s": first[0] if first else None,
    }
    return d


def merge_runs(row: Row, runs: list[dict[str, Any]], batch: int, env: dict[str, Any]) -> dict[str, Any]:
    """One row from its rounds: the timed steps pooled, each round's mean kept for pairing."""
    ok = [r for r in runs if "error" not in r]
    head = {"name": row.label, "kind": row.kind, "arch": row.arch, "engine": row.kind if row.kind != "ours"
            else row.variant.engine, "option": row.variant.option if row.variant else
            ("channels_last" if row.channels_last else "none")}  # fmt: skip
    if not ok:
        return {**head, "precision": row.precision, "error": runs[0].get("error") if runs else "not run"}
    merged = dict(ok[0])
    for key in ("step_times_s", "wait_times_s"):
        merged[key] = [t for r in ok for t in r.get(key, [])]
    merged["matmul_tflops"] = float(np.mean([r["matmul_tflops"] for r in ok]))
    merged["matmul_tflops_after"] = min(r.get("matmul_tflops_after") or r["matmul_tflops"] for r in ok)
    merged["peak_memory_mb"] = max(r["peak_memory_mb"] for r in ok)
    merged["round_means_s"] = {int(r["round"]) if "round" in r else i: float(np.mean(r["step_times_s"]))
                               for i, r in enumerate(runs) if "error" not in r}  # fmt: skip
    resolved = merged.get("resolved") or {}
    precision = resolved.get("precision", row.precision)
    merged.update(derive(merged, batch, env, precision))
    means = list(merged["round_means_s"].values())
    merged.update(head, precision=precision, requested_precision=row.precision,
                  channels_last=resolved.get("channels_last", row.channels_last), rounds=len(means),
                  spread=(max(means) - min(means)) / float(np.mean(means)) if len(means) > 1 else None)  # fmt: skip
    return merged


def pair_ratios(results: list[dict[str, Any]]) -> None:
    """Each of our rows against the seed, the bare loop (same precision and layout) and Lightning (same precision).

    ``x_<peer>`` is the peer's step time over ours (> 1: ours is faster), from the pooled means;
    ``x_<peer>_rounds`` the same ratio in each round both ran (paired: the same moment's load).
    """

    def find(kind: str, **want: Any) -> dict[str, Any] | None:
        return next((r for r in results if r["kind"] == kind and "error" not in r
                     and all(r.get(k) == v for k, v in want.items())), None)  # fmt: skip

    for r in results:
        if r["kind"] != "ours" or "error" in r:
            continue
        peers_of = {"seed": find("seed", arch=SEED_REF[r["arch"]]),
                    "bare": find("bare", precision=r["precision"], channels_last=bool(r["channels_last"])),
                    "lightning": find("lightning", precision=r["precision"])}  # fmt: skip
        for name, peer in peers_of.items():
            if peer is None:
                continue
            r[f"x_{name}"] = peer["step_s"] / r["step_s"]
            both = sorted(set(peer["round_means_s"]) & set(r["round_means_s"]))
            r[f"x_{name}_rounds"] = [peer["round_means_s"][k] / r["round_means_s"][k] for k in both]
        if peers_of["seed"] is not None:
            r["speedup_vs_seed"] = r["images_per_s"] / peers_of["seed"]["images_per_s"]


def fastest_precision(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Which precision the bare loop (and ours) ran fastest in on this machine."""
    out: dict[str, Any] = {}
    for kind in ("bare", "ours", "lightning"):
        rows = [r for r in results if r["kind"] == kind and "error" not in r and r.get("arch") == PEER_ARCH]
        if rows:
            best = min(rows, key=lambda r: r["step_s"])
            out[kind] = {"name": best["name"], "precision": best["precision"], "step_s": best["step_s"]}
    return out


def flop_check(results: list[dict[str, Any]]) -> dict[str, Any]:
    def gflop(kind: str) -> float | None:
        return next((r.get("gflop_per_image") for r in results
                     if r["kind"] == kind and r.get("arch") == "cvae2" and r.get("gflop_per_image")), None)  # fmt: skip

    return {"stated_gflop_per_image": common.SEED_CVAE2_GFLOP_PER_IMAGE,
            "flopcounter_seed_cvae2_gflop_per_image": gflop("seed"),
            "flopcounter_ours_cvae2_gflop_per_image": gflop("ours")}  # fmt: skip


def print_row(name: str, r: dict[str, Any]) -> None:
    if "error" in r:
        print(f"  {name:60s} FAILED: {r['error']}")
        return
    print(f"  {name:60s} {r['step_s']:.3f} s/step  {r['images_per_s']:8.1f} img/s  "
          f"wait {100 * (r['data_wait_share'] or 0):4.1f}%", flush=True)  # fmt: skip


# ----------------------------------------------------------------------------------------
# CLI
