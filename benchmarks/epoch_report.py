"""The markdown twin of an ``epoch_time`` results file."""

from __future__ import annotations

from typing import Any

from benchmarks import common


def _x(r: dict[str, Any], peer: str) -> str:
    """``1.23 (1.18-1.27)``: the pooled ratio and its range over the paired rounds."""
    v = r.get(f"x_{peer}")
    if v is None:
        return "–"
    rounds = r.get(f"x_{peer}_rounds") or []
    rng = f" ({min(rounds):.2f}–{max(rounds):.2f})" if len(rounds) > 1 else ""
    return f"{v:.2f}{rng}"


COLUMNS = [
    ("name", "row"),
    ("precision", "precision"),
    ("step_s", "s/step"),
    ("spread", "spread over rounds"),
    ("images_per_s", "img/s"),
    ("epoch_s_81k", "s/epoch 81,499"),
    ("epoch_s_314k", "s/epoch 314,000"),
    ("x_seed_text", "× seed"),
    ("x_bare_text", "× bare loop"),
    ("x_lightning_text", "× Lightning"),
    ("gflop_per_image", "GFLOP/img f+b"),
    ("achieved_tflops", "TFLOP/s"),
    ("mfu_vs_matmul", "MFU vs matmul"),
    ("mfu_vs_bf16_peak", "MFU vs bf16 peak"),
    ("data_wait_share", "data wait"),
    ("compile_s", "compile s"),
    ("peak_memory_mb", "peak MB"),
]
PROFILE_COLUMNS = [("op", "op"), ("shapes", "input shapes"), ("calls", "calls"), ("self_ms", "self ms"),
                   ("share", "share")]  # fmt: skip


def render_md(p: dict[str, Any]) -> str:
    env, cfg = p["environment"], p["config"]
    rows = [r for r in p["results"] if "error" not in r]
    for r in rows:
        r.update({f"x_{k}_text": _x(r, k) for k in ("seed", "bare", "lightning")})
    failed = [r for r in p["results"] if "error" in r]
    fc, mm, caps, auto = p["flop_check"], env["matmul_tflops"], env["capabilities"], env["auto"]
    mem_kind = next((r.get("peak_memory_kind") for r in rows if r.get("peak_memory_kind")), "")
    fastest = p.get("fastest", {})
    lines = [
        f"# Epoch time — {env['device']} — {env['date'][:10]}",
        "",
        common.env_md(env),
        f"- native precisions (`hpcvae.hardware`): bf16 {'yes' if caps['native_bf16'] else 'no'}, fp16 "
        f"{'yes' if caps['native_fp16'] else 'no'} on {caps['name']}; `--precision auto` picks **{auto['precision']}**, "
        f"channels_last {str(auto['channels_last']).lower()} ({auto['reason']})",
        f"- measured matmul: {mm['fp32']:.3f} TFLOP/s fp32, {mm['bf16']:.3f} TFLOP/s bf16; data-sheet bf16 peak: "
        + (
            f"{env['bf16_peak_tflops']} TFLOP/s"
            if env["bf16_peak_tflops"]
            else "none (CPU: no published peak, MFU is vs the measured matmul only)"
        ),  # fmt: skip
        f"- config: batch {cfg['batch_size']}, {cfg['steps']} timed steps after {cfg['warmup']} warm-up, "
        f"{cfg['rounds']} rounds in alternating order (rows in an emulated precision: round 1 only, "
        f"{cfg['emulated_steps']} steps), flavour {cfg['flavour']}, nf {cfg['nf'] or 'arch default'}, "
        f"loader workers {cfg['num_workers']}",
        "- data: " + ", ".join(f"{d['n_train']} train images at {s}²" for s, d in p["data"].items()) + ", "
        "from hpcvae.synth galaxies (rotations, flips, noise re-draws) in our shard format; the seed reads the same "
        "train images from an h5 file in its layout",
        "",
        "## Which precision is fastest here",
        "",
    ]
    for kind, what in (("bare", "the bare loop"), ("ours", "ours"), ("lightning", "Lightning")):
        if kind in fastest:
            f = fastest[kind]
            lines.append(f"- {what}: **{f['precision']}** (`{f['name']}`, {f['step_s']:.3f} s/step)")
    lines += [
        "",
        "## Results",
        "",
        "`× peer` is the peer's mean step time over ours (> 1: ours is faster), pooled over the rounds, with the "
        "range of the same ratio taken round by round (each round runs both at the same moment's load). The seed "
        "row is the seed's loop and h5 loader (cvae and fancy_cvae against its cvae2, vae128 against its vae158); "
        "the bare loop is the seed's model on one fixed batch, in the same precision and layout as the row; "
        "Lightning is a plain LightningModule in the same precision on our loader. `spread over rounds`: "
        "(max − min) / mean of the rounds' mean step times. MFU vs matmul: achieved FLOP/s over a big matmul "
        f"timed in the same process just before the row's steps, in the row's precision. Peak memory: {mem_kind}.",
        "",
        common.md_table(rows, COLUMNS),
        "",
        "## FLOPs check (cvae2, 158², forward+backward per image)",
        "",
        f"stated {fc['stated_gflop_per_image']} GFLOP; FlopCounterMode: seed cvae2 "
        f"{common.fmt(fc['flopcounter_seed_cvae2_gflop_per_image'], 4)} GFLOP, ours "
        f"{common.fmt(fc['flopcounter_ours_cvae2_gflop_per_image'], 4)} GFLOP"
        + (
            ""
            if cfg["flavour"] == "default" and not cfg["nf"]
            else " (this run used a reduced width, so the counts differ from 6.5)"
        ),  # fmt: skip
        "",
        "Round means (s/step): "
        + "; ".join(
            f"{r['name']}: {', '.join(f'{t:.3f}' for t in r.get('round_means_s', {}).values())}" for r in rows
        ),
    ]
    if failed:
        lines += ["", "## Rows that failed", ""]
        lines += [f"- `{r['name']}`: {r['error']}" for r in failed]
    profiled = [r for r in rows if r.get("profile")]
    if profiled:
        lines += ["", "## Where the step's time goes (torch.profiler, one step after the timed ones)"]
        for r in profiled:
            lines += ["", f"### {r['name']}", "", common.md_table(r["profile"], PROFILE_COLUMNS)]
    lines += ["", "Raw per-step times are in the JSON twin of this file."]
    return "\n".join(lines)
