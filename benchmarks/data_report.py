"""data_throughput's printing and its markdown results page (measuring is in :mod:`benchmarks.data_throughput`)."""

from __future__ import annotations

from typing import Any

from benchmarks import common

LOADER_COLS = [
    ("loader", "loader"),
    ("images_per_s", "img/s (last epoch)"),
    ("first_epoch_images_per_s", "img/s (epoch 0, incl. start-up)"),
    ("speedup_vs_seed", "× seed"),
    ("setup_s", "set-up s"),
]
SHARD_COLS = [
    ("source", "input"),
    ("workers", "workers"),
    ("galaxies", "galaxies"),
    ("galaxies_per_s", "galaxies/s"),
]
RSS_COLS = [
    ("image_size", "side"),
    ("n_train", "train galaxies"),
    ("n_shards", "shards"),
    ("workers", "workers"),
    ("rss_base_mb", "RSS after imports MB"),
    ("rss_after_setup_mb", "RSS after set-up MB"),
    ("rss_peak_tree_mb", "peak RSS, main+workers MB"),
    ("rss_peak_over_base_mb", "peak − imports MB"),
    ("images_per_s", "img/s"),
]


def print_rss(r: dict[str, Any]) -> None:
    if "error" in r:
        print(f"  rss {r.get('image_size')}² n={r.get('n_requested')} w={r['workers']}: FAILED {r['error']}")
        return
    print(
        f"  rss {r['image_size']}² n={r['n_train']:>7} ({r['n_shards']} shards) workers={r['workers']}: "
        f"peak tree RSS {r['rss_peak_tree_mb']:.0f} MB (+{r['rss_peak_over_base_mb']:.0f} over imports), "
        f"{r['images_per_s']:,.0f} img/s",
        flush=True,
    )


def print_loader(r: dict[str, Any]) -> None:
    if "error" in r:
        print(f"  {r['loader']}: {r['error']}")
        return
    rates = ", ".join(f"{e['images_per_s']:,.0f}" for e in r["epochs"])
    print(f"  {r['loader']:70s} img/s per epoch: {rates} (setup {r['setup_s']:.2f} s)", flush=True)


def verify_md(v: dict[str, Any] | None) -> str:
    if not v:
        return "not measured"
    rel = v.get("first_check_over_epoch")
    return (
        f"First check of {v['bytes'] / 1e9:.3f} GB: {v['first_check_s']:.2f} s ({v['first_check_gb_per_s']:.2f} GB/s, "
        + (
            f"{rel:.0%} of one epoch of the fastest loader above"
            if rel is not None
            else "no loader epoch to compare"
        )
        + f"); a resume over unchanged shards (cache by size and mtime): {v['cached_check_s'] * 1e3:.1f} ms."
    )


def render_md(p: dict[str, Any]) -> str:
    env, cfg = p["environment"], p["config"]
    ls = p["loader_set"]
    verdict = p["rss_verdict"]
    vrows = [{"group": k, **v} for k, v in verdict.items()]
    lines = [
        f"# Data throughput — {env['device']} — {env['date'][:10]}",
        "",
        common.env_md(env),
        f"- config: batch {cfg['batch_size']}, {cfg['epochs']} epochs per loader, loader set {ls['n_train']} train "
        f"images at {ls['image_size']}² (hpcvae.synth pool of {cfg['pool']}, rotations/flips/noise re-draws), "
        f"{cfg['per_shard']} galaxies per shard",
        "",
        "## Loader: images/s, ours against the seed's h5py loader on the same images",
        "",
        "Both read from the page cache and yield normalised float32 batches. `× seed` is against the seed's own "
        "configuration (single-process DataLoader).",
        "",
        common.md_table(p["loaders"], LOADER_COLS),
        "",
        "## `data.verify`: the sha256 check of every shard before training",
        "",
        verify_md(p.get("verify")),
        "",
        "## Sharding: galaxies/s of `hpcvae.shard`",
        "",
        common.md_table(p["sharding"], SHARD_COLS),
        "",
        "## Loader peak RSS against the number of galaxies",
        "",
        f"One full epoch in a fresh process per row; RSS of main + workers sampled every 50 ms (summing RSS counts "
        f"shared library pages once per worker, so rows with workers are higher by a constant). 314,000 × 158² float32 "
        f"is 31 GB, beyond this disk budget, so the 314k set uses {cfg['rss_image_size']}² images; the 158² rows check "
        "the real image side at smaller N. Shards hold the same number of galaxies in every set: only N changes. What "
        "bounds the peak is each worker's shuffle buffer (data.shuffle_buffer = 1000 samples, 100 KB each at 158²), so "
        "rows with 2 workers sit higher by about that much per worker, at any N.",
        "",
        common.md_table(p["rss"], RSS_COLS),
        "",
        common.md_table(
            vrows,
            [
                ("group", "set"),
                ("n_small", "N small"),
                ("n_large", "N large"),
                ("n_ratio", "N ratio"),
                ("peak_small_mb", "peak MB small"),
                ("peak_large_mb", "peak MB large"),
                ("growth_mb", "growth MB"),
            ],
        ),
        "",
        "Make-set costs: "
        + "; ".join(
            f"{k}: {v['galaxies_per_s']:,.0f} galaxies/s, {v['disk_mb']:,.0f} MB"
            for k, v in p["rss_sets"].items()
        ),
    ]
    return "\n".join(lines)
