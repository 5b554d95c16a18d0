"""hpcvae.launch without a SLURM cluster: the sbatch script (golden file), quoting, bad input,
and real training through ``--cluster debug`` (in-process) and ``--cluster local`` (submitit's
LocalExecutor).  The cluster tests live in ``test_launch_slurm.py``.

Regenerate the golden file with ``HPCVAE_UPDATE_GOLDEN=1 pytest tests/test_launch.py``.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_helpers import cli

from hpcvae.checkpoint import latest_checkpoint
from hpcvae.errors import ConfigError, ShardError
from hpcvae.launch import (
    LaunchOptions,
    SiteProfile,
    dry_run_script,
    load_profile,
    main,
    parse_mem_gb,
    parse_time_minutes,
    resolve_train_target,
    status,
)

REPO = Path(__file__).resolve().parents[1]
LAUNCH = ("-m", "hpcvae.launch")
GOLDEN = Path(__file__).parent / "golden"
EXAMPLE_PROFILE = REPO / "slurm" / "example-site.toml"
DEV_PROFILE = REPO / "slurm" / "dev-cluster.toml"
DEBUG_TOML = REPO / "configs" / "debug.toml"


def _normalise(script: str, run: Path) -> str:
    """Replace the machine-specific parts (run folder, interpreter) by placeholders."""
    for old, new in (
        (str(run), "<RUN>"),
        (shlex.quote(sys.executable), "<PYTHON>"),
        (sys.executable, "<PYTHON>"),
    ):
        script = script.replace(old, new)
    return script


def _opts(data: Path, out: Path, **kw) -> LaunchOptions:
    train = ["--config", str(DEBUG_TOML), "--data", str(data), "--out", str(out)]
    return LaunchOptions(train_args=train + list(kw.pop("extra", [])), **kw)


# ----------------------------------------------------------------------------------------
# The sbatch script


def test_sbatch_golden_4_nodes_4_gpus(tiny_shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "runs" / "galaxy-vae"
    opts = _opts(tiny_shards, run, nodes=4, gpus_per_node=4, profile=str(EXAMPLE_PROFILE), dry_run=True)
    script = _normalise(dry_run_script(opts), run)
    golden = GOLDEN / "sbatch_4x4_example_site.sh"
    if os.environ.get("HPCVAE_UPDATE_GOLDEN"):
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(script)
    assert script == golden.read_text(), (
        f"sbatch script changed; set HPCVAE_UPDATE_GOLDEN=1 to accept:\n{script}"
    )
    # The properties the golden file pins, stated once more so a regenerated file cannot drop them.
    assert "#SBATCH --ntasks-per-node=4" in script and "#SBATCH --gpus-per-node=4" in script
    assert "#SBATCH --nodes=4" in script and "#SBATCH --signal=USR2@120" in script
    assert "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1" in script


def test_cli_dry_run_prints_the_same_script_and_submits_nothing(
    tiny_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "runs" / "galaxy-vae"
    rc = main(
        ["--nodes", "4", "--gpus-per-node", "4", "--profile", str(EXAMPLE_PROFILE), "--dry-run"]
        + ["--config", str(DEBUG_TOML), "--data", str(tiny_shards), "--out", str(run), "--epochs", "2"]
    )
    out = capsys.readouterr()
    assert rc == 0
    assert _normalise(out.out, run) == (GOLDEN / "sbatch_4x4_example_site.sh").read_text()
    assert "--epochs 2" in out.err and "--resume" not in out.err
    assert not (run / "slurm").exists() and not (run / "launch.json").exists()


def test_dry_run_works_without_slurm_installed(tiny_shards: Path, tmp_path: Path) -> None:
    """A laptop without SLURM can still print the script it would submit."""
    run = tmp_path / "runs" / "galaxy-vae"
    r = subprocess.run(
        [sys.executable, "-m", "hpcvae.launch", "--nodes", "4", "--gpus-per-node", "4", "--dry-run"]
        + ["--profile", str(EXAMPLE_PROFILE), "--data", str(tiny_shards), "--out", str(run)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env=dict(os.environ, PATH=str(Path(sys.executable).parent)),
    )
    assert r.returncode == 0, r.stderr
    assert _normalise(r.stdout, run) == (GOLDEN / "sbatch_4x4_example_site.sh").read_text()


def test_cpu_profile_requests_tasks_not_gpus(tiny_shards: Path, tmp_path: Path) -> None:
    script = dry_run_script(
        _opts(tiny_shards, tmp_path / "r", nodes=2, gpus_per_node=3, profile=str(DEV_PROFILE), dry_run=True)
    )
    assert "#SBATCH --ntasks-per-node=3" in script and "#SBATCH --nodes=2" in script
    assert "gpus" not in script and "gres" not in script
    assert "#SBATCH --partition=debug" in script and "export OMP_NUM_THREADS=1" in script


def test_cli_flags_override_profile(tiny_shards: Path, tmp_path: Path) -> None:
    script = dry_run_script(
        _opts(
            tiny_shards,
            tmp_path / "r",
            profile=str(EXAMPLE_PROFILE),
            partition="big",
            account="acc2",
            qos="high",
            time="1-00:00:00",
            cpus_per_task=4,
            mem="500M",
            dry_run=True,
        )
    )
    for line in (
        "--partition=big",
        "--account=acc2",
        "--qos=high",
        "--time=1440",
        "--cpus-per-task=4",
        "--mem=500MB",
    ):
        assert f"#SBATCH {line}\n" in script
    assert "export OMP_NUM_THREADS=4" in script


# ----------------------------------------------------------------------------------------
# Quoting


AWKWARD_NAME = """it's a "job"; $(touch INJECTED) & echo `id` | x"""


def test_awkward_names_and_paths_are_quoted(tiny_shards: Path, tmp_path: Path) -> None:
    """Run the generated script's shell part with a recording fake ``srun``: every path and
    the job name arrive intact, and nothing in them is executed."""
    run = tmp_path / "run dir 'q' $(touch INJECTED) ;& x"
    script = dry_run_script(
        _opts(tiny_shards, run, job_name=AWKWARD_NAME, profile=str(DEV_PROFILE), dry_run=True)
    )
    # sbatch reads #SBATCH values with shell-like quoting (checked on the cluster in test_launch_slurm).
    [name_line] = [ln for ln in script.splitlines() if ln.startswith("#SBATCH --job-name=")]
    assert shlex.split(name_line.split("=", 1)[1]) == [AWKWARD_NAME]
    [out_line] = [ln for ln in script.splitlines() if ln.startswith("#SBATCH --output=")]
    assert shlex.split(out_line.split("=", 1)[1]) == [f"{run}/slurm/%j_0_log.out"]

    bindir = tmp_path / "bin"
    bindir.mkdir()
    record = tmp_path / "srun-argv.json"
    fake = bindir / "srun"
    fake.write_text(
        f'#!{sys.executable}\nimport json, sys\njson.dump(sys.argv[1:], open({str(record)!r}, "w"))\n'
    )
    fake.chmod(0o755)
    work = tmp_path / "cwd"
    work.mkdir()
    subprocess.run(
        ["bash", "-c", script],
        check=True,
        cwd=work,
        env=dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}"),
        timeout=30,
    )
    argv = json.loads(record.read_text())
    assert argv[argv.index("--output") + 1] == f"{run}/slurm/%j_%t_log.out"
    assert argv[-1] == f"{run}/slurm" and argv[-4:-1] == ["-u", "-m", "submitit.core._submit"]
    assert not list(work.iterdir()) and not list(tmp_path.glob("INJECTED"))


# ----------------------------------------------------------------------------------------
# Bad input: clear one-line errors, nothing submitted


def test_cli_nodes_zero_is_a_one_line_error(tiny_shards: Path, tmp_path: Path) -> None:
    opts = ["--nodes", "0", "--data", str(tiny_shards), "--out", str(tmp_path / "r"), "--dry-run"]
    r = cli(*LAUNCH, *opts, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip() == "hpcvae.launch: error: --nodes must be >= 1, got 0"


def test_cli_missing_data_folder_is_a_one_line_error(tmp_path: Path) -> None:
    missing = tmp_path / "no such shards"
    opts = ["--nodes", "2", "--data", str(missing), "--out", str(tmp_path / "r"), "--cluster", "slurm"]
    r = cli(*LAUNCH, *opts, timeout=60)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert f"shard set folder {missing} (from --data) does not exist" in r.stderr
    assert not (tmp_path / "r").exists()


def test_in_process_bad_inputs(tiny_shards: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardError, match="has no manifest.json"):  # a dry run only warns (test below)
        resolve_train_target(_opts(tmp_path / "empty", tmp_path / "r").train_args)
    with pytest.raises(ConfigError, match="unknown option.*--no-such-flag"):
        dry_run_script(_opts(tiny_shards, tmp_path / "r", dry_run=True, extra=["--no-such-flag", "3"]))
    with pytest.raises(ConfigError, match="--gpus-per-node must be >= 1"):
        LaunchOptions(gpus_per_node=0)
    with pytest.raises(ConfigError, match="--max-requeues must be >= 0"):
        LaunchOptions(max_requeues=-1)
    with pytest.raises(ConfigError, match="--cluster local runs on this machine only"):
        main(["--cluster", "local", "--nodes", "2", "--data", str(tiny_shards), "--out", str(tmp_path / "r")])
    bad = tmp_path / "bad.toml"
    bad.write_text('partition = "gpu"\npartitoin = "x"\n')
    with pytest.raises(ConfigError, match=r"bad.toml: unknown config key partitoin"):
        load_profile(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_profile(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="not a valid environment variable"):
        SiteProfile(env={"BAD-NAME": "1"})


@pytest.mark.parametrize(
    ("text", "minutes"),
    [("90", 90), ("01:30", 2), ("02:00:00", 120), ("1-00:00:00", 1440), ("2-3", 3060), ("0:00:30", 1)],
)
def test_parse_time(text: str, minutes: int) -> None:
    assert parse_time_minutes(text) == minutes


@pytest.mark.parametrize("text", ["", "abc", "1:2:3:4", "00:00:00", "-5"])
def test_parse_time_rejects(text: str) -> None:
    with pytest.raises(ConfigError, match="--time"):
        parse_time_minutes(text)


def test_parse_mem() -> None:
    assert parse_mem_gb("64G") == 64 and parse_mem_gb("512M") == 0.5 and parse_mem_gb("1T") == 1024
    assert parse_mem_gb("3") == 3 and parse_mem_gb("200GB") == 200
    with pytest.raises(ConfigError, match="--mem"):
        parse_mem_gb("lots")


def test_shipped_profiles_load() -> None:
    site = load_profile(EXAMPLE_PROFILE)
    assert site.gpus and site.partition == "gpu" and site.setup
    dev = load_profile(DEV_PROFILE)
    assert not dev.gpus and dev.partition == "debug"


# ----------------------------------------------------------------------------------------
# Real training without SLURM


@pytest.mark.slow
def test_debug_cluster_trains_in_process_and_status_reads_it(
    tiny_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "debug-run"
    env_before = dict(os.environ)
    rc = main(
        ["--cluster", "debug", "--config", str(DEBUG_TOML), "--data", str(tiny_shards), "--out", str(run)]
        + ["--epochs", "1", "--batch-size", "8", "--device", "cpu", "--set", "train.log_every=2"]
        + ["--set", "train.sample_grid=false"]
    )
    assert rc == 0
    assert dict(os.environ) == env_before, "the in-process run leaked environment variables"
    assert (run / "model.safetensors").is_file()
    events = [e["event"] for e in json.loads((run / "launch.json").read_text())["events"]]
    assert events == ["start", "completed"]
    info = status(run)
    assert info["cluster"] == "debug" and info["state"] == "COMPLETED" and info["requeues"] == 0
    assert info["last_checkpoint"] == latest_checkpoint(run).name
    assert isinstance(info["images_per_s"], float) and info["images_per_s"] > 0
    capsys.readouterr()
    assert main(["--status", str(run)]) == 0
    assert f"last_checkpoint: {info['last_checkpoint']}" in capsys.readouterr().out


@pytest.mark.slow
def test_local_cluster_runs_two_tasks_through_submitit(tiny_shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "local run"
    t0 = time.monotonic()
    r = cli(*LAUNCH,
        "--cluster", "local", "--gpus-per-node", "2", "--time", "00:20:00", "--follow", "--follow-timeout", "150",
        "--config", str(DEBUG_TOML), "--data", str(tiny_shards), "--out", str(run), "--epochs", "1",
        "--batch-size", "8", "--device", "cpu", "--set", "train.sample_grid=false",
        timeout=200,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "2 rank(s)" in r.stdout and "COMPLETED" in r.stdout
    assert (run / "model.safetensors").is_file()
    hist = json.loads((run / "launch.json").read_text())
    assert hist["jobs"][0]["cluster"] == "local" and hist["jobs"][0]["tasks_per_node"] == 2
    assert [e["world_size"] for e in hist["events"] if e["event"] == "start"] == [2]
    assert time.monotonic() - t0 < 200


# ----------------------------------------------------------------------------------------
# No line injection into the batch script


@pytest.mark.parametrize(
    ("where", "flags"),
    [
        ("--job-name", ["--job-name", "vae\nrm -rf $HOME"]),
        ("--out", ["--out", "/tmp/run\n#SBATCH --wrap=evil"]),
        ("--partition", ["--partition", "gpu\rx"]),
        ("--account", ["--account", "abc\x1b[2J"]),
    ],
)
def test_control_characters_never_reach_the_script(
    tiny_shards: Path, tmp_path: Path, where: str, flags: list[str]
) -> None:
    base = {"--out": str(tmp_path / "r"), "--job-name": "ok"}
    base[flags[0]] = flags[1]
    args = ["--dry-run", "--profile", str(DEV_PROFILE), "--data", str(tiny_shards)]
    for k, v in base.items():
        args += [k, v]
    if where in ("--partition", "--account"):
        args += flags
    r = cli(*LAUNCH, *args, timeout=60)
    assert r.returncode == 2, r.stdout
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert where in r.stderr and "control character" in r.stderr, r.stderr
    assert "#SBATCH" not in r.stdout


def test_control_characters_in_a_profile_are_refused(tmp_path: Path) -> None:
    prof = tmp_path / "site.toml"
    prof.write_text('partition = "gpu"\n[env]\nNCCL_DEBUG = "WARN\\nrm -rf /"\n')
    with pytest.raises(ConfigError, match=r"env\.NCCL_DEBUG.*control character"):
        load_profile(prof)
    prof.write_text('setup = ["module load cuda\\nsource ~/env/bin/activate"]\n[sbatch]\nmail-type = "END"\n')
    assert load_profile(prof).setup  # setup lines are shell by design: exempt


def test_dry_run_without_the_data_folder_warns_and_prints_the_script(tmp_path: Path) -> None:
    """A fresh checkout has no shards/ yet: the dry run still shows what would be submitted."""
    r = cli(*LAUNCH, "--nodes", "4", "--dry-run", "--profile", str(EXAMPLE_PROFILE), "--data", str(tmp_path / "none"),
             "--out", str(tmp_path / "r"), timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "#SBATCH --nodes=4" in r.stdout
    assert "warning" in r.stderr and "does not exist" in r.stderr and str(tmp_path / "none") in r.stderr


def test_submitit_is_in_the_tested_range() -> None:
    """hpcvae/launch/submitit_compat.py uses submitit internals: recheck them before widening the range."""
    import submitit

    from hpcvae.launch.submitit_compat import TESTED_SUBMITIT, preempt_signal

    have = tuple(int(x) for x in submitit.__version__.split(".")[:3])
    lo, hi = (tuple(int(x) for x in v.lstrip("<>=").split(".")) for v in TESTED_SUBMITIT)
    assert lo <= have < hi, f"submitit {submitit.__version__} is outside {TESTED_SUBMITIT}"
    assert preempt_signal().name == "SIGUSR2"


def test_backends_table_matches_the_cluster_choices() -> None:
    """A backend is a class plus its line in BACKENDS; ``--cluster`` offers exactly those."""
    import typing

    from hpcvae.launch.backends import BACKENDS
    from hpcvae.launch.profile import ClusterKind

    assert set(typing.get_args(ClusterKind)) == set(BACKENDS)
    assert all(cls.name == name for name, cls in BACKENDS.items())
    with pytest.raises(ConfigError, match="--cluster must be one of slurm, local, debug, got 'pbs'"):
        LaunchOptions(cluster="pbs")
