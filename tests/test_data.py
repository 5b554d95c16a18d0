"""The loader: bit-exact pixels, exact epochs across ranks and workers, resume, errors."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_shards import ShardSet, write_shard_set

from hpcvae.config import DataConfig
from hpcvae.data import (
    GpuResidentData,
    ShardData,
    buffer_shuffle,
    make_data,
    plan_epoch,
    val_ranges,
)
from hpcvae.errors import ConfigError, ShardError
from hpcvae.shards.format import decode_npy
from hpcvae.shards.manifest import Manifest

UNEVEN = [7, 50, 3, 31, 19]


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> ShardSet:
    return write_shard_set(tmp_path_factory.mktemp("shards"), train_counts=UNEVEN, val_counts=[5, 8, 4])


def _cfg(ss: ShardSet, **kw) -> DataConfig:
    # fork: these tests are about the plan, not how workers start (tests/test_stop_signals.py uses spawn)
    base = {"path": str(ss.manifest.root), "batch_size": 8, "num_workers": 0, "shuffle_buffer": 16,
            "start_method": "fork"}  # fmt: skip
    return DataConfig(**{**base, **kw})


def _keys(loader) -> list[list[str]]:
    return [list(b["key"]) for b in loader]


def test_pixels_and_redshifts_bit_identical(shards: ShardSet) -> None:
    data = ShardData(_cfg(shards), shards.manifest, rank=0, world_size=1, seed=3)
    seen = 0
    for loader in (data.train_loader(0), data.val_loader()):
        for b in loader:
            assert b["image"].dtype == torch.float32 and b["image"].shape[1:] == (1, 16, 16)
            assert b["redshift"].dtype == torch.float32 and b["redshift"].shape == (len(b["key"]),)
            for i, k in enumerate(b["key"]):
                np.testing.assert_array_equal(b["image"][i, 0].numpy(), shards.images[k], strict=True)
                assert b["redshift"][i].item() == np.float32(shards.redshifts[k])
                seen += 1
    assert seen == data.samples_per_epoch + len(shards.val_keys)


def test_no_redshift_key_without_redshifts(tmp_path: Path) -> None:
    ss = write_shard_set(tmp_path, train_counts=[10], has_redshift=False)
    b = next(
        iter(ShardData(_cfg(ss, batch_size=4), ss.manifest, rank=0, world_size=1, seed=0).train_loader(0))
    )
    assert set(b) == {"image", "key"}


def test_transform_is_applied_per_image(shards: ShardSet) -> None:
    class Scale:
        def forward(self, x: np.ndarray) -> np.ndarray:
            return x * 10.0 + 0.5

    data = ShardData(_cfg(shards), shards.manifest, rank=0, world_size=1, seed=0, transform=Scale())
    b = next(iter(data.train_loader(0)))
    k = b["key"][0]
    np.testing.assert_allclose(b["image"][0, 0].numpy(), shards.images[k] * 10.0 + 0.5, rtol=1e-6)


@pytest.mark.parametrize(
    ("world", "workers", "batch"), [(1, 1, 7), (2, 3, 5), (3, 2, 4), (4, 4, 3), (2, 5, 30)]
)
def test_plan_epoch_covers_each_sample_at_most_once(world: int, workers: int, batch: int) -> None:
    total = sum(UNEVEN)
    for epoch in range(3):
        plans = [plan_epoch(UNEVEN, epoch, 11, r, world, batch, workers) for r in range(world)]
        steps = total // (world * batch)
        assert {p.steps for p in plans} == {steps}
        assert plans[0].dropped == total - world * steps * batch < world * batch
        covered: list[int] = []
        for p in plans:
            assert sum(p.worker_steps) == steps and max(p.worker_steps) - min(p.worker_steps) <= 1
            assert list(p.worker_steps) == sorted(p.worker_steps, reverse=True)  # round-robin safe
            for (a, e), n in zip(p.worker_ranges, p.worker_steps):
                assert e - a == n * batch
                covered += range(a, e)
                # each worker reads only the shards overlapping its range
                assert sum(b - f for _, f, b in p.spans(a, e)) == e - a
            # DataLoader worker q of a loader resumed at step k plays virtual worker (k+q) % nw;
            # round robin must hand out exactly the steps k..steps-1, in order.
            for k in (0, 1, steps // 2, steps):
                got = []
                streams = []
                for q in range(p.num_workers):
                    v = (k + q) % p.num_workers
                    j0 = p.first_local_batch(v, k)
                    streams.append([v + j * p.num_workers for j in range(j0, p.worker_steps[v])])
                while any(streams):
                    for s in streams:
                        if s:
                            got.append(s.pop(0))
                assert got == list(range(k, steps))
        assert sorted(covered) == list(range(world * steps * batch))


def test_buffer_shuffle_is_a_permutation_and_buffer_one_is_identity() -> None:
    rng = np.random.default_rng(0)
    for n, buf in [(0, 5), (1, 5), (37, 1), (37, 8), (37, 100)]:
        perm = buffer_shuffle(n, buf, rng)
        assert sorted(perm.tolist()) == list(range(n))
        if buf == 1:
            assert perm.tolist() == list(range(n))


def test_val_ranges_split_contiguously() -> None:
    for total, world in [(17, 3), (2, 4), (0, 2), (100, 7)]:
        rs = [val_ranges(total, r, world) for r in range(world)]
        assert rs[0][0] == 0 and rs[-1][1] == total
        assert all(a[1] == b[0] for a, b in zip(rs, rs[1:]))
        assert max(e - a for a, e in rs) - min(e - a for a, e in rs) <= 1


@pytest.mark.parametrize("workers", [0, 2, 3])
def test_in_process_exact_epoch_over_ranks(shards: ShardSet, workers: int) -> None:
    world, batch = 3, 6
    seen: list[str] = []
    lens = set()
    for r in range(world):
        data = ShardData(_cfg(shards, num_workers=workers, batch_size=batch), shards.manifest,
                         rank=r, world_size=world, seed=5)  # fmt: skip
        keys = _keys(data.train_loader(1))
        assert all(len(k) == batch for k in keys)
        lens.add(len(keys))
        seen += [k for b in keys for k in b]
    assert lens == {data.steps_per_epoch}
    assert len(seen) == len(set(seen)) == len(shards.train_keys) - data.dropped_per_epoch
    assert set(seen) <= set(shards.train_keys)


def test_shuffle_differs_between_epochs_and_is_deterministic(shards: ShardSet) -> None:
    def epoch_keys(seed: int, epoch: int) -> list[list[str]]:
        d = ShardData(_cfg(shards, num_workers=2), shards.manifest, rank=0, world_size=1, seed=seed)
        return _keys(d.train_loader(epoch))

    e0 = epoch_keys(1, 0)
    assert e0 == epoch_keys(1, 0)
    assert e0 != epoch_keys(1, 1)
    assert e0 != epoch_keys(2, 0)
    flat = [k for b in e0 for k in b]
    # the buffer shuffles within shards too, not just the shard order
    assert flat != sorted(flat) and any(flat[i] > flat[i + 1] for i in range(len(flat) - 1))


@pytest.mark.parametrize("workers", [0, 2, 3])
def test_resume_mid_epoch_reproduces_the_epoch(shards: ShardSet, workers: int) -> None:
    cfg = _cfg(shards, num_workers=workers, batch_size=5, shuffle_buffer=20)
    full = list(ShardData(cfg, shards.manifest, rank=1, world_size=2, seed=9).train_loader(4))
    steps = len(full)
    for k in (1, 2, steps - 1, steps):
        data = ShardData(cfg, shards.manifest, rank=1, world_size=2, seed=9)
        head = list(data.train_loader(4))[:k]
        loader = data.train_loader(4, start_step=k)
        assert len(loader) == steps - k
        tail = list(loader)
        joined = head + tail
        assert [b["key"] for b in joined] == [b["key"] for b in full]
        for a, b in zip(joined, full):
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["redshift"], b["redshift"])


def test_resume_does_not_decode_skipped_samples(shards: ShardSet) -> None:
    calls: list[int] = []

    def counting(x: np.ndarray) -> np.ndarray:
        calls.append(1)
        return x

    data = ShardData(_cfg(shards), shards.manifest, rank=0, world_size=1, seed=0, transform=counting)
    steps = data.steps_per_epoch
    list(data.train_loader(0, start_step=steps - 2))
    assert len(calls) == 2 * 8


def test_persistent_workers_follow_the_epoch(shards: ShardSet) -> None:
    cfg = _cfg(shards, num_workers=2, persistent_workers=True)
    data = ShardData(cfg, shards.manifest, rank=0, world_size=1, seed=4)
    runs = [_keys(data.train_loader(e, s)) for e, s in [(0, 0), (1, 0), (0, 3), (1, 0)]]
    fresh = [
        _keys(ShardData(cfg, shards.manifest, rank=0, world_size=1, seed=4).train_loader(e)) for e in (0, 1)
    ]
    assert runs[0] == fresh[0] and runs[1] == fresh[1] == runs[3]
    assert runs[2] == fresh[0][3:]
    assert _keys(data.val_loader()) == _keys(data.val_loader())


def test_max_steps_caps_the_epoch(shards: ShardSet) -> None:
    data = ShardData(_cfg(shards), shards.manifest, rank=0, world_size=1, seed=0, max_steps=3)
    assert data.steps_per_epoch == 3 and len(list(data.train_loader(0))) == 3
    assert data.dropped_per_epoch == len(shards.train_keys) - 24


def test_val_loader_covers_val_in_order_without_drop(shards: ShardSet) -> None:
    world = 3
    got: list[str] = []
    for r in range(world):
        data = ShardData(
            _cfg(shards, num_workers=2, batch_size=2), shards.manifest, rank=r, world_size=world, seed=0
        )
        loader = data.val_loader()
        keys = _keys(loader)
        assert len(keys) == len(loader) and all(len(b) == 2 for b in keys[:-1])
        got += [k for b in keys for k in b]
    assert got == shards.val_keys


def test_batch_too_large_is_a_config_error(shards: ShardSet) -> None:
    with pytest.raises(ConfigError, match="lower data.batch_size"):
        ShardData(_cfg(shards, batch_size=64), shards.manifest, rank=0, world_size=2, seed=0)


def test_missing_shard_names_the_file(tmp_path: Path) -> None:
    ss = write_shard_set(tmp_path, train_counts=[4, 4])
    (tmp_path / "train-000001.tar").unlink()
    with pytest.raises(ShardError, match="train-000001.tar"):
        ShardData(_cfg(ss, batch_size=2), ss.manifest, rank=0, world_size=1, seed=0)


@pytest.mark.parametrize("workers", [0, 2])
def test_truncated_shard_names_the_file_without_hanging(tmp_path: Path, workers: int) -> None:
    ss = write_shard_set(tmp_path, train_counts=[6, 6, 6])
    bad = tmp_path / "train-000001.tar"
    raw = bad.read_bytes()
    bad.write_bytes(raw[: len(raw) // 2 + 100])
    data = ShardData(_cfg(ss, batch_size=3, num_workers=workers), ss.manifest, rank=0, world_size=1, seed=0)
    with pytest.raises(ShardError, match=r"train-000001\.tar.*(truncated|corrupt)") as info:
        list(data.train_loader(0))
    assert "\n" not in str(info.value)
    with pytest.raises(ShardError, match="sha256 differs"):
        ShardData(_cfg(ss, batch_size=3), ss.manifest, rank=0, world_size=1, seed=0, verify=True)


def test_a_shard_cut_at_a_sample_boundary_is_an_error_for_every_reader(tmp_path: Path) -> None:
    """A well-formed tar that lost its last samples: the split reader (evaluate, benchmarks) read 4 of 6 silently."""
    from hpcvae.shards.format import ShardWriter, read_shard
    from hpcvae.shards.manifest import iter_samples

    ss = write_shard_set(tmp_path, train_counts=[6, 6])
    bad = tmp_path / "train-000001.tar"
    kept = list(read_shard(bad))[:4]
    with ShardWriter(str(bad)) as w:
        for key, files in kept:
            for ext, data in files.items():
                w.add(f"{key}.{ext}", data)
    with pytest.raises(
        ShardError, match=r"train-000001\.tar: truncated shard: holds 4 samples, the manifest says 6"
    ):
        list(iter_samples(ss.manifest, "train"))
    data = ShardData(_cfg(ss, batch_size=3), ss.manifest, rank=0, world_size=1, seed=0)
    with pytest.raises(ShardError, match=r"train-000001\.tar: truncated shard"):
        list(data.train_loader(0))


def test_corrupt_npy_names_the_sample(tmp_path: Path) -> None:
    ss = write_shard_set(tmp_path, train_counts=[4])
    tar = tmp_path / "train-000000.tar"
    raw = bytearray(tar.read_bytes())
    at = raw.index(b"\x93NUMPY", raw.index(b"g000000002.image.npy"))
    raw[at : at + 6] = b"XXXXXX"
    tar.write_bytes(bytes(raw))
    data = ShardData(_cfg(ss, batch_size=4), Manifest.load(tmp_path), rank=0, world_size=1, seed=0)
    with pytest.raises(ShardError, match=r"train-000000\.tar: sample g000000002: image\.npy: not a \.npy"):
        list(data.train_loader(0))


def test_decode_npy_matches_np_load() -> None:
    import io

    for arr in [np.arange(12, dtype="<f4").reshape(3, 4), np.asfortranarray(np.ones((2, 5), ">f8"))]:
        buf = io.BytesIO()
        np.save(buf, arr)
        np.testing.assert_array_equal(decode_npy(buf.getvalue()), arr, strict=True)
    with pytest.raises(ValueError, match="truncated"):
        buf = io.BytesIO()
        np.save(buf, np.zeros(10, np.float32))
        decode_npy(buf.getvalue()[:-4])


_RANK_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch, torch.distributed as dist
    from hpcvae.config import DataConfig
    from hpcvae.data import ShardData
    from hpcvae.shards.manifest import Manifest
    root, port, rank, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    cfg = DataConfig(path=root, batch_size=4, num_workers=2, shuffle_buffer=8, start_method="fork")
    data = ShardData(cfg, Manifest.load(root), rank=rank, world_size=2, seed=7)
    keys, steps = [], 0
    for batch in data.train_loader(2):
        keys.append(list(batch["key"]))
        t = torch.ones(1)
        dist.all_reduce(t)  # lock-step like DDP: a rank with an extra step would hang here
        steps += 1
    json.dump({"keys": keys, "steps": steps, "len": data.steps_per_epoch,
               "dropped": data.dropped_per_epoch}, open(out, "w"))
    dist.destroy_process_group()
    """
)


@pytest.mark.slow
def test_two_gloo_ranks_two_workers_exact_epoch(shards: ShardSet, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    outs = [tmp_path / f"rank{r}.json" for r in range(2)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RANK_SCRIPT, str(shards.manifest.root), str(port), str(r), str(outs[r])],
            env=env,
        )
        for r in range(2)
    ]
    for p in procs:
        assert p.wait(timeout=120) == 0
    res = [json.loads(o.read_text()) for o in outs]
    total = len(shards.train_keys)  # 110 samples, 2 ranks x batch 4 -> 13 steps, 6 dropped
    assert res[0]["steps"] == res[1]["steps"] == res[0]["len"] == total // 8
    assert res[0]["dropped"] == total - 8 * res[0]["steps"] == 6
    flat = [k for r in res for b in r["keys"] for k in b]
    assert all(len(b) == 4 for r in res for b in r["keys"])
    assert len(flat) == len(set(flat)) == total - res[0]["dropped"]
    assert set(flat) <= set(shards.train_keys)


def test_gpu_resident_exact_epoch_resume_and_pixels(shards: ShardSet) -> None:
    world, cfg = 3, _cfg(shards, batch_size=6, gpu_resident=True)
    ranks = [
        GpuResidentData(
            cfg, shards.manifest, rank=r, world_size=world, seed=2, device="cpu", dtype=torch.float32
        )
        for r in range(world)
    ]
    epochs = []
    for epoch in (0, 1):
        seen: list[str] = []
        for data in ranks:
            batches = list(data.train_loader(epoch))
            assert len(batches) == data.steps_per_epoch == len(shards.train_keys) // 18
            for b in batches:
                for i, k in enumerate(b["key"]):
                    np.testing.assert_array_equal(b["image"][i, 0].numpy(), shards.images[k], strict=True)
                    assert b["redshift"][i].item() == np.float32(shards.redshifts[k])
                seen += b["key"]
        assert len(seen) == len(set(seen)) == len(shards.train_keys) - ranks[0].dropped_per_epoch
        epochs.append(seen)
    assert epochs[0] != epochs[1]
    full = _keys(ranks[1].train_loader(1))
    assert _keys(ranks[1].train_loader(1, start_step=4)) == full[4:]
    assert [k for r in ranks for b in _keys(r.val_loader()) for k in b] == shards.val_keys


def test_gpu_resident_fp16_is_close_and_make_data_dispatches(shards: ShardSet) -> None:
    cfg = _cfg(shards, gpu_resident=True)
    data = make_data(cfg, shards.manifest, rank=0, world_size=1, seed=0, device="cpu")
    assert isinstance(data, GpuResidentData)
    b = next(iter(data.train_loader(0)))
    assert b["image"].dtype == torch.float32
    ref = np.stack([shards.images[k] for k in b["key"]])
    np.testing.assert_allclose(b["image"][:, 0].numpy(), ref, rtol=1e-3, atol=1e-7)
    assert isinstance(make_data(_cfg(shards), shards.manifest, rank=0, world_size=1, seed=0), ShardData)


def test_the_split_is_gpu_resident_by_default_when_it_fits_in_half_the_device(shards: ShardSet) -> None:
    from hpcvae.data import resident_fits

    m = shards.manifest
    need = sum(m.count(s) for s in m.splits) * m.image_size**2 * 2  # fp16 bytes of both splits
    assert not resident_fits(m, "cpu")  # never on a CPU: there is no device memory to save copies to
    assert resident_fits(m, torch.device("cuda"), total_bytes=2 * need)
    assert not resident_fits(m, torch.device("cuda"), total_bytes=2 * need - 2)
