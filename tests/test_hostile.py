"""Hostile inputs and interruptions: each gives one line naming the file and key, never a traceback or hang.

Every case is a real file of the wrong shape, a real signal to a real process, a real damaged tar.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from train_helpers import REPO, child_env, cli, train_args

pytestmark = pytest.mark.slow


def one_line(p: subprocess.CompletedProcess, prog: str, *needles: str) -> str:
    err = p.stderr.strip()
    assert p.returncode == 2, (p.returncode, err[-3000:])
    lines = [
        ln for ln in err.splitlines() if not ln.startswith("[") and "WARNING" not in ln
    ]  # deepspeed's banner
    assert "Traceback" not in err and len(lines) == 1, err[-3000:]
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def trained(tiny_shards: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hostile") / "run"
    p = cli("-m", "hpcvae.train", *train_args(tiny_shards, out, epochs=1))
    assert p.returncode == 0, p.stderr[-2000:]
    return out


# -- JSON files of valid syntax but the wrong shape ----------------------------------------------------------


@pytest.mark.parametrize(("edit", "needle"), [
    (lambda m: [m], "not an hpcvae manifest"),
    (lambda m: {**m, "splits": {**m["splits"], "train": {"shards": "train-000000.tar"}}}, "splits.train.shards"),
    (lambda m: {**m, "image": {"size": 2000000}}, "image.size"),
    (lambda m: {**m, "splits": {**m["splits"], "train": {"shards": [{"name": "../../etc/x.tar", "count": 1}]}}},
     "splits.train.shards[0].name"),
])  # fmt: skip
def test_a_manifest_of_the_wrong_shape_is_one_line(tiny_shards: Path, tmp_path: Path, edit, needle) -> None:
    shards = tmp_path / "s"
    shutil.copytree(tiny_shards, shards)
    m = json.loads((shards / "manifest.json").read_text())
    (shards / "manifest.json").write_text(json.dumps(edit(m)))
    p = cli("-m", "hpcvae.train", *train_args(shards, tmp_path / "r", epochs=1))
    one_line(p, "hpcvae.train", "manifest.json", needle)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(("edit", "needle"), [
    (lambda m: {k: v for k, v in m.items() if k != "model_config"}, "model_config: missing"),
    (lambda m: {**m, "model_config": {**m["model_config"], "z_dim": "eight"}}, "model_config.z_dim"),
    (lambda m: {**m, "model_config": {**m["model_config"], "nf": 1000000}}, "model_config.nf"),
    (lambda m: {**m, "model_config": {**m["model_config"], "nf": 16}}, "config stored with the weights differs"),
    (lambda m: {**m, "transform": {"name": "asinh", "params": {"a": -1, "lo": 0, "hi": 1}}}, "transform"),
    (lambda m: {**m, "output": {"inverse": "noise_mean", "noise_std": -1.0}}, "output.noise_std"),
    (lambda m: {**m, "output": {"inverse": "median"}}, "output"),
])  # fmt: skip
def test_a_model_json_of_the_wrong_shape_is_one_line(trained: Path, tmp_path: Path, edit, needle) -> None:
    model = tmp_path / "m"
    model.mkdir()
    shutil.copy(trained / "model.safetensors", model)
    meta = json.loads((trained / "model.json").read_text())
    (model / "model.json").write_text(json.dumps(edit(meta)))
    t0 = time.perf_counter()
    p = cli("-m", "hpcvae.generate", str(model), "--redshift", "0.5", "--out", str(tmp_path / "g.npy"))
    one_line(p, "hpcvae.generate", "model.json", needle)
    assert time.perf_counter() - t0 < 120  # refused before allocating anything large


def test_a_checkpoint_files_json_and_launch_json_of_the_wrong_shape(trained: Path, tmp_path: Path) -> None:
    from hpcvae.checkpoint import list_checkpoints

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    ck = list_checkpoints(run)[-1]
    (ck / "files.json").write_text(json.dumps({"files": []}))
    p = cli("-m", "hpcvae.consolidate", str(ck), str(tmp_path / "out"))
    one_line(p, "hpcvae.consolidate", "files.json", "expected an object")
    (run / "launch.json").write_text(json.dumps({"jobs": 5, "events": []}))
    p = cli("-m", "hpcvae.launch", "--status", str(run))
    one_line(p, "hpcvae.launch", "launch.json", "jobs: expected a list")


def test_a_crafted_pickle_in_train_state_is_refused_without_unsafe_advice(
    trained: Path, tiny_shards: Path, tmp_path: Path
) -> None:
    import torch

    from hpcvae.checkpoint import FILES, file_list, list_checkpoints

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    ck = list_checkpoints(run)[-1]

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'PWNED'}",))

    torch.save({"scheduler": Evil()}, ck / "train_state.pt")
    (ck / FILES).write_text(json.dumps({"files": file_list(ck)}))  # consistent, as an attacker would make it
    p = cli("-m", "hpcvae.train", *train_args(tiny_shards, run, epochs=2), "--resume", str(ck))
    err = one_line(p, "hpcvae.train", "train_state.pt", "never unpickled")
    assert "weights_only=False" not in err
    assert not (tmp_path / "PWNED").exists()


# -- values that pass type checks but are wrong ----------------------------------------------------------


@pytest.mark.parametrize(("args", "needle"), [
    (["--seed", "-1"], "train.seed must be in [0, 2**63)"),
    (["--seed", "99999999999999999999"], "train.seed must be in [0, 2**63)"),
    (["--set", "=3"], "has no key before '='"),
    (["--set", "train.sync_seconds=0"], "train.sync_seconds must be in (0, 3600]"),
])  # fmt: skip
def test_bad_training_options_are_one_line(
    tiny_shards: Path, tmp_path: Path, args: list[str], needle: str
) -> None:
    p = cli("-m", "hpcvae.train", *train_args(tiny_shards, tmp_path / "r", epochs=1), *args)
    one_line(p, "hpcvae.train", needle)


def test_config_that_is_a_folder_and_out_that_is_a_file(tiny_shards: Path, tmp_path: Path) -> None:
    p = cli(
        "-m",
        "hpcvae.train",
        "--config",
        str(tmp_path),
        "--data",
        str(tiny_shards),
        "--out",
        str(tmp_path / "r"),
    )
    one_line(p, "hpcvae.train", "is a folder, not a TOML file")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    p = cli("-m", "hpcvae.train", *train_args(tiny_shards, blocker, epochs=1))
    one_line(p, "hpcvae.train", "is a file, not a folder")
    long = tmp_path / ("x" * 5000)
    p = cli("-m", "hpcvae.train", *train_args(tiny_shards, long, epochs=1))
    one_line(p, "hpcvae.train", "longer than a file system allows")


@pytest.mark.parametrize(("args", "needle"), [
    (["--size", "2000000"], "size must be <= 4096"),
    (["--conditions", "zphot,zphot"], "named twice"),
    (["--zeropoint", "nan"], "zeropoint: nan is not a finite number"),
    (["--zeropoint", "70"], "--zeropoint must be a finite magnitude in (0, 50)"),
    (["--h5-images", "x"], "--h5-images apply to --from-h5, not --catalog"),
    (["--no-redshift", "--redshift-column", "z"], "--no-redshift contradicts --redshift-column"),
])  # fmt: skip
def test_bad_shard_options_are_one_line(make_rgc, tmp_path: Path, args: list[str], needle: str) -> None:
    cat = make_rgc(tmp_path / "cat", 10)
    p = cli("-m", "hpcvae.shard", "--catalog", str(cat), "--out", str(tmp_path / "s"), *(["--size", "32"] if
             "--size" not in args else []), *args)  # fmt: skip
    one_line(p, "hpcvae.shard", needle)


def test_source_flags_belong_to_their_source(tmp_path: Path) -> None:
    """Each source in SOURCES owns its flags; another source's flag is one line naming both."""
    import h5py

    h5 = tmp_path / "seed.h5"
    with h5py.File(h5, "w") as f:
        f["images"] = np.ones((4, 8, 8), np.float32)
    out = str(tmp_path / "s")
    p = cli("-m", "hpcvae.shard", "--from-h5", str(h5), "--out", out, "--fits-catalog", "x.fits")
    one_line(p, "hpcvae.shard", "--fits-catalog apply to --catalog, not --from-h5")
    p = cli("-m", "hpcvae.shard", "--from-h5", str(h5), "--out", out, "--pad", "noise")
    one_line(p, "hpcvae.shard", "--pad noise needs each galaxy's noise variance")


def test_every_registered_source_has_the_whole_interface() -> None:
    from hpcvae.shards.ingest import SOURCES, source_module

    for kind in SOURCES:
        mod = source_module(kind)
        for name in ("iter_images", "header_info", "close_readers", "SELECT", "add_arguments", "from_args"):
            assert hasattr(mod, name), f"source {kind} ({SOURCES[kind]}) lacks {name}"


def test_negative_pixel_scale_and_a_blank_stamp_are_row_errors(make_rgc, tmp_path: Path) -> None:
    import fitsio

    cat = make_rgc(tmp_path / "cat", 12)
    rows = fitsio.read(str(cat))
    rows["PIXEL_SCALE"][3] = -0.03
    fitsio.write(str(cat), rows, clobber=True)
    p = cli("-m", "hpcvae.shard", "--catalog", str(cat), "--out", str(tmp_path / "a"), "--size", "32")
    one_line(p, "hpcvae.shard", "row 3", "PIXEL_SCALE is -0.03")
    rows["PIXEL_SCALE"][3] = 0.03
    fitsio.write(str(cat), rows, clobber=True)
    gal = cat.parent / str(rows["GAL_FILENAME"][5]).strip()
    with fitsio.FITS(str(gal), "rw") as f:
        hdu = int(rows["GAL_HDU"][5])
        f[hdu].write(np.zeros_like(f[hdu].read()))
    p = cli("-m", "hpcvae.shard", "--catalog", str(cat), "--out", str(tmp_path / "b"), "--size", "32")
    one_line(p, "hpcvae.shard", "row 5", "all zeros")
    p = cli(
        "-m",
        "hpcvae.shard",
        "--catalog",
        str(cat),
        "--out",
        str(tmp_path / "c"),
        "--size",
        "32",
        "--skip-bad",
    )
    assert p.returncode == 0 and json.loads((tmp_path / "c" / "manifest.json").read_text())["n_skipped"] == 1


def test_h5_redshifts_as_strings_are_one_line(tmp_path: Path) -> None:
    import h5py

    with h5py.File(tmp_path / "g.h5", "w") as f:
        f["images"] = np.random.default_rng(0).random((6, 32, 32)).astype("f4")
        f["redshifts"] = np.array([b"0.1"] * 6)
    p = cli("-m", "hpcvae.shard", "--from-h5", str(tmp_path / "g.h5"), "--out", str(tmp_path / "s"), "--size", "32",
             "--h5-redshifts", "redshifts")  # fmt: skip
    one_line(p, "hpcvae.shard", "g.h5", "holds", "not numbers")


def test_a_manifest_that_undercounts_a_shard_is_refused(tiny_shards: Path, tmp_path: Path) -> None:
    shards = tmp_path / "s"
    shutil.copytree(tiny_shards, shards)
    m = json.loads((shards / "manifest.json").read_text())
    m["splits"]["train"]["shards"][0]["count"] -= 2  # the rest of that shard would be dropped quietly
    (shards / "manifest.json").write_text(json.dumps(m))
    p = cli("-m", "hpcvae.train", *train_args(shards, tmp_path / "r", epochs=1))
    one_line(p, "hpcvae.train", "train-000000.tar", "samples but", "says")


def test_a_zero_length_pax_record_is_damage_not_a_hang(tiny_shards: Path, tmp_path: Path) -> None:
    from hpcvae.shards.format import tar_members

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("g000000001.image.npy")
        info.size = 4
        info.pax_headers = {"comment": "x"}
        tar.addfile(info, io.BytesIO(b"abcd"))
    data = bytearray(buf.getvalue())
    start = data.index(b" comment=")  # the pax payload: "<len> comment=x\n"
    length = data.index(b" ", start - 4)
    data[length - 2 : start] = b"00"[: start - (length - 2)]
    with pytest.raises(ValueError):
        list(tar_members(io.BytesIO(bytes(data))))
    shards = tmp_path / "s"
    shutil.copytree(tiny_shards, shards)
    (shards / "train-000000.tar").write_bytes(bytes(data))
    p = cli("-m", "hpcvae.train", *train_args(shards, tmp_path / "r", epochs=1), "--set", "data.verify=false",
             timeout=240)  # fmt: skip
    one_line(p, "hpcvae.train", "train-000000.tar")


def test_a_profile_cannot_inject_into_the_batch_script(tmp_path: Path) -> None:
    for body, needle in (('python = "python3 $(touch X)"', "may hold only a program path"),
                         ('[sbatch]\n"mail-type=END --bogus=1" = "x"', "not an sbatch option name"),
                         ('[sbatch]\nmail-type = "END --bogus=1"', "must be one word")):  # fmt: skip
        prof = tmp_path / "site.toml"
        prof.write_text(body + "\n")
        p = cli("-m", "hpcvae.launch", "--cluster", "slurm", "--profile", str(prof), "--dry-run", "--data",
                 str(tmp_path), "--out", str(tmp_path / "r"))  # fmt: skip
        one_line(p, "hpcvae.launch", needle)
    assert not (REPO / "X").exists()


# -- the resume rule ---------------------------------------------------------------------------------------


def test_a_resume_refuses_what_would_change_the_model_and_applies_more_epochs(
    tiny_shards: Path, tmp_path: Path
):
    run = tmp_path / "r"
    assert cli("-m", "hpcvae.train", *train_args(tiny_shards, run, epochs=1)).returncode == 0
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    p = cli("-m", "hpcvae.train", *train_args(tiny_shards, run, epochs=1), "--lr", "0.01")
    one_line(p, "hpcvae.train", "optim.lr was 0.001", "is 0.01 now")
    assert {
        p.name: p.read_bytes() for p in run.iterdir() if p.is_file()
    } == before  # the records still tell the truth
    p = cli("-m", "hpcvae.train", *train_args(tiny_shards, run, epochs=2))
    assert p.returncode == 0 and "applying changed options: train.epochs 1 -> 2" in p.stdout
    info = json.loads((run / "model.json").read_text())
    assert info["training"]["epochs"] == 2 and "epochs = 2" in (run / "config.toml").read_text()


def test_consolidate_refuses_a_checkpoint_whose_meta_says_another_architecture(trained: Path, tmp_path: Path):
    from hpcvae.checkpoint import FILES, file_list, list_checkpoints

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    ck = list_checkpoints(run)[-1]
    meta = json.loads((ck / "meta.json").read_text())
    meta["model_config"]["z_dim"] += 4
    (ck / "meta.json").write_text(json.dumps(meta))
    (ck / FILES).write_text(json.dumps({"files": file_list(ck)}))
    p = cli("-m", "hpcvae.consolidate", str(ck), str(tmp_path / "out"))
    one_line(p, "hpcvae.consolidate", "refusing to write it", "do not fit the architecture")
    assert not (tmp_path / "out" / "model.safetensors").exists()


# -- interruptions -----------------------------------------------------------------------------------------


def _running(pid: int) -> bool:
    """Alive and not a zombie (an exited child whose parent is gone waits for init to reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def _children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def test_sigterm_to_a_parallel_shard_build_stops_its_workers_and_leaves_nothing(make_rgc, tmp_path: Path):
    cat = make_rgc(tmp_path / "cat", 6000, min_size=60, max_size=120)
    out = tmp_path / "s"
    proc = subprocess.Popen([sys.executable, "-m", "hpcvae.shard", "--catalog", str(cat), "--out", str(out), "--size",
                             "64", "--workers", "2", "--shard-size", "20"], cwd=REPO, env=child_env(),
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.time() + 60
    while time.time() < deadline and len(_children(proc.pid)) < 2:
        time.sleep(0.1)
    workers = _children(proc.pid)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode != 0 and "Traceback" not in err
    # the pool's helpers (resource tracker) see the parent's pipe close; give a loaded machine 15 s
    deadline = time.time() + 15
    while time.time() < deadline and any(_running(w) for w in workers):
        time.sleep(0.2)
    alive = [w for w in workers if _running(w)]
    assert not alive, f"a pool worker outlived the build: {alive}"
    assert not out.exists() or not [p for p in out.iterdir() if p.name.startswith(".tmp-")]
    p = cli("-m", "hpcvae.shard", "--catalog", str(cat), "--out", str(out), "--size", "64")
    assert p.returncode == 0, p.stderr  # the next build is not refused


def test_sigterm_to_consolidate_never_leaves_a_mixed_or_partial_model(trained: Path, tmp_path: Path):
    from hpcvae.checkpoint import list_checkpoints

    ck = list_checkpoints(trained)[-1]
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(trained / "model.safetensors", out)
    shutil.copy(trained / "model.json", out)
    old = json.loads((out / "model.json").read_text())["write_id"]
    for delay in (0.5, 1.0, 1.5, 2.0, 3.0):
        proc = subprocess.Popen([sys.executable, "-m", "hpcvae.consolidate", str(ck), str(out)], cwd=REPO,
                                env=child_env(), stderr=subprocess.PIPE, text=True)  # fmt: skip
        time.sleep(delay)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
        assert not [p.name for p in out.iterdir() if ".tmp" in p.name]
        import hpcvae

        hpcvae.load_model(out)  # whatever happened, the pair in the folder is one write
        assert json.loads((out / "model.json").read_text())["write_id"] is not None
    assert old


def test_ctrl_c_to_training_with_loader_workers_checkpoints_in_one_line(tiny_shards: Path, tmp_path: Path):
    out = tmp_path / "r"
    args = [*train_args(tiny_shards, out, epochs=50), "--set", "data.num_workers=2",
            "--set", "data.persistent_workers=true", "--set", "train.sync_every=5"]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "hpcvae.train", *args], cwd=REPO, env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "metrics.jsonl").exists():
        time.sleep(0.2)
    time.sleep(2.0)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 3, stderr[-2000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert "Ctrl-C: saving a checkpoint" in stdout and "checkpoint" in stdout
    from hpcvae.checkpoint import list_checkpoints

    assert list_checkpoints(out)


def test_a_stop_lands_within_seconds_even_when_steps_are_slow(tiny_shards: Path, tmp_path: Path):
    """2 ranks, each step made to take 2 s; sync_every = 50 would mean 100 s; the bound is ~10 s."""
    from train_helpers import launch, logs, wait

    out = tmp_path / "r"
    slow = "import time\nfrom hpcvae import trainer as T\n_orig = T.Trainer.train_step\n" \
           "def train_step(self, batch, *a):\n    time.sleep(2.0)\n    return _orig(self, batch, *a)\n" \
           "T.Trainer.train_step = train_step\n"  # fmt: skip
    args = [*train_args(tiny_shards, out, epochs=20, batch=4), "--set", "train.sync_every=50",
            "--set", "train.sync_seconds=6"]  # fmt: skip
    log_dir = tmp_path / "logs"
    procs = launch(args, world=2, log_dir=log_dir, script=slow + "import sys\nfrom hpcvae.cli import run_cli\n"
                   "from hpcvae.train import main\nsys.argv = ['hpcvae.train', *sys.argv[1:]]\n"
                   "run_cli(main, 'hpcvae.train')\n")  # fmt: skip
    deadline = time.time() + 180
    while time.time() < deadline and not (out / "metrics.jsonl").exists():
        time.sleep(0.2)
    time.sleep(8.0)
    t0 = time.time()
    for p in procs:
        p.send_signal(signal.SIGTERM)
    rcs = wait(procs, log_dir, timeout=120)
    took = time.time() - t0
    assert rcs == [3, 3], logs(log_dir)[-3000:]
    assert took < 15, f"the stop checkpoint took {took:.1f} s"


def test_a_killed_run_resumed_logs_each_step_once(tiny_shards: Path, tmp_path: Path):
    """SIGKILL after a checkpoint: the resume replays steps past it and cuts their first records away."""
    out = tmp_path / "r"
    args = [*train_args(tiny_shards, out, epochs=4, batch=4), "--set", "checkpoint.every_steps=4"]
    proc = subprocess.Popen([sys.executable, "-m", "hpcvae.train", *args], cwd=REPO, env=child_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 180

    def train_steps() -> list[int]:
        if not metrics.exists():
            return []
        lines = [json.loads(x) for x in metrics.read_text().splitlines() if x.endswith("}")]
        return [r["step"] for r in lines if r.get("kind") == "train"]

    from hpcvae.checkpoint import list_checkpoints, read_meta

    def last_checkpoint() -> int:
        return max((read_meta(c)["global_step"] for c in list_checkpoints(out)), default=-1)

    # Freeze the run (SIGSTOP is immediate) once it has logged steps past its last checkpoint, and kill it
    # only if that still holds when frozen: on a loaded machine it may have saved again in between.
    while time.time() < deadline:
        steps = train_steps()
        if steps and max(steps) > 10 and max(steps) > last_checkpoint() >= 0:
            proc.send_signal(signal.SIGSTOP)
            if max(train_steps()) > last_checkpoint():
                break
            proc.send_signal(signal.SIGCONT)
        time.sleep(0.05)
    proc.kill()  # no handler runs: records past the last checkpoint stay in the file
    proc.communicate(timeout=60)
    before = train_steps()
    last = last_checkpoint()
    assert max(before) > last, (before, last)
    resumed = subprocess.run([sys.executable, "-m", "hpcvae.train", *args], cwd=REPO, env=child_env(),
                             capture_output=True, text=True, timeout=600)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    records = [json.loads(x) for x in metrics.read_text().splitlines()]
    steps = [r["step"] for r in records if r.get("kind") == "train"]
    assert steps == sorted(set(steps)), "a step logged twice or out of order"
    assert all(isinstance(r.get("time"), str) and r["time"].endswith("Z") for r in records)
