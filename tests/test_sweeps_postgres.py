"""dph sweeps on a real PostgreSQL server: parallel trials, resuming, and a killed sweep's trials.

A server is started for this module in a temporary directory (Debian's ``postgresql`` package:
initdb / pg_ctl, run as the ``postgres`` system user when the tests run as root, since the server
refuses root), on a free port of 127.0.0.1 with trust authentication. Trials are tiny dph-train
runs (conftest.TINY_OVERRIDES, no divergence term) launched two at a time by the joblib launcher.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from conftest import TINY_OVERRIDES, with_overrides

pytestmark = pytest.mark.slow

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _server_program(name: str) -> str | None:
    """A PostgreSQL server program: on PATH, else the newest /usr/lib/postgresql/<version>/bin."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(p.split("/")[4]))
    return candidates[-1] if candidates else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    """postgresql://postgres@127.0.0.1:<port>/postgres of a server that lives as long as the module."""
    initdb, pg_ctl = _server_program("initdb"), _server_program("pg_ctl")
    if initdb is None or pg_ctl is None:
        pytest.skip("no PostgreSQL server programs (initdb, pg_ctl): apt-get install postgresql")
    pytest.importorskip("psycopg", reason='the PostgreSQL driver is missing: pip install -e ".[postgres]"')
    root = Path(tempfile.mkdtemp(prefix="dph-postgres-"))
    as_server_user: list[str] = []
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and no postgres system user to run the server as")
        os.chown(root, user.pw_uid, user.pw_gid)
        as_server_user = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", _free_port()
    subprocess.run([*as_server_user, initdb, "-D", str(data), "--auth=trust", "-U", "postgres", "-E", "UTF8"],
                   check=True, capture_output=True, timeout=120)
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=50"
    subprocess.run([*as_server_user, pg_ctl, "-D", str(data), "-o", options, "-l", str(root / "server.log"), "-w",
                    "start"], check=True, capture_output=True, timeout=120)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_server_user, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True,
                       timeout=120)
        shutil.rmtree(root, ignore_errors=True)


def sweep_args(cache_dir: Path, sweep_dir: Path, url: str, study: str, *overrides: str) -> list[str]:
    """dph-train -m: 2 trials at a time (joblib), learning rate sampled, on the PostgreSQL storage."""
    exe = Path(sys.executable).parent / "dph-train"
    base = with_overrides(TINY_OVERRIDES, "device=cpu", "logger=none", "divergence=none",
                          f"paths.cache_dir={cache_dir}")
    return [str(exe), "-m", *base, f"hydra.sweep.dir={sweep_dir}", "hydra/sweeper=optuna",
            f"hydra.sweeper.storage={url}", f"hydra.sweeper.study_name={study}", "hydra.sweeper.sampler.name=random",
            "optimizer.lr=tag(log, interval(1e-5, 1e-3))", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
            "hydra.sweeper.n_jobs=2", *overrides]


def run_sweep(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"sweep failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"
    return proc


def load(url: str, study: str) -> optuna.Study:
    return optuna.load_study(study_name=study, storage=url)


@pytest.fixture(scope="module")
def parallel_sweep(postgres_url, cache_dir, tiny_model, tmp_path_factory):
    """4 trials, 2 at a time, on the server."""
    sweep_dir = tmp_path_factory.mktemp("pg") / "sweep"
    sweep_dir.parent.mkdir(exist_ok=True)
    args = sweep_args(cache_dir, sweep_dir, postgres_url, "parallel", "hydra.sweeper.n_trials=4")
    run_sweep(args, sweep_dir.parent)
    return sweep_dir, args


def test_four_trials_two_at_a_time_on_postgresql(parallel_sweep, postgres_url):
    sweep_dir, _ = parallel_sweep
    study = load(postgres_url, "parallel")
    assert sorted(t.number for t in study.trials) == [0, 1, 2, 3]
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    for t in study.trials:  # each job reported to its own trial from its joblib worker
        assert sorted(t.intermediate_values) == [0, 2]
        assert t.value == pytest.approx(t.intermediate_values[2])
        assert "Training on cpu with 1 process(es)" in (sweep_dir / str(t.number) / "train.log").read_text()
    summary = yaml.safe_load((sweep_dir / "summary.yaml").read_text())
    assert summary["storage"] == postgres_url and summary["trials"]["complete"] == 4


def test_the_same_command_resumes_the_postgresql_study(parallel_sweep, postgres_url):
    sweep_dir, args = parallel_sweep
    run_sweep(args, sweep_dir.parent)  # n_trials reached: nothing to run
    assert len(load(postgres_url, "parallel").trials) == 4
    assert not (sweep_dir / "4").exists()

    run_sweep([*args, "hydra.sweeper.n_trials=5"], sweep_dir.parent)
    trials = load(postgres_url, "parallel").trials
    assert sorted(t.number for t in trials) == [0, 1, 2, 3, 4]
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert (sweep_dir / "4" / "metrics.jsonl").is_file()


def test_trials_of_a_killed_sweep_fail_after_the_grace_period_and_run_again(postgres_url, cache_dir, tiny_model,
                                                                            tmp_path):
    """SIGKILL of the sweep and of the joblib workers running its two trials, once both jobs have
    started: their heartbeats stop, so the rerun (started at once) waits out the grace period, fails
    them (interrupted, not counted) and runs their parameters again as two new trials, each in the
    interrupted trial's directory. (A rerun that opens the study within the grace period waits for
    them first: test_sweeper checks that on sqlite.)"""
    sweep_dir = tmp_path / "sweep"
    args = sweep_args(cache_dir, sweep_dir, postgres_url, "killed", "hydra.sweeper.n_trials=2",
                      "hydra.sweeper.heartbeat_interval=1", "hydra.sweeper.grace_period=3")
    sweep = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not all((sweep_dir / str(n) / ".hydra" / "config.yaml").is_file() for n in (0, 1)):
            assert sweep.poll() is None and time.monotonic() < deadline, "the trials' jobs did not start"
            time.sleep(0.2)
    finally:
        os.killpg(sweep.pid, signal.SIGKILL)  # the sweep and the workers running the trials
        sweep.wait(timeout=60)
    assert [t.state for t in load(postgres_url, "killed").trials] == [TrialState.RUNNING] * 2
    assert not (sweep_dir / "0" / "metrics.jsonl").exists()  # killed before the first evaluation

    proc = run_sweep(args, tmp_path)
    for n in (0, 1):  # failed when the rerun opened the study, or while it waited for them
        assert f"trial {n} had no heartbeat for the grace period: marked FAIL" in proc.stdout + proc.stderr
    trials = sorted(load(postgres_url, "killed").trials, key=lambda t: t.number)
    assert [t.state for t in trials] == [TrialState.FAIL] * 2 + [TrialState.COMPLETE] * 2
    for t in trials[:2]:
        assert t.user_attrs["interrupted"] is True
        assert "no heartbeat for more than hydra.sweeper.grace_period=3 s" in t.user_attrs["fail_reason"]
    for retry in trials[2:]:  # each interrupted trial's parameters again, in its directory
        interrupted = retry.user_attrs["resumes_trial"]
        assert retry.params == trials[interrupted].params
        assert (sweep_dir / str(interrupted) / "metrics.jsonl").is_file()
    assert sorted(t.user_attrs["resumes_trial"] for t in trials[2:]) == [0, 1]
    assert not (sweep_dir / "2").exists() and not (sweep_dir / "3").exists()
    summary = yaml.safe_load((sweep_dir / "summary.yaml").read_text())
    assert summary["trials"] == {"total": 4, "counted": 2, "complete": 2, "fail": 2}
