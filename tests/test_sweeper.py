"""The optuna sweeper plugin (hydra/sweeper=optuna), dph.pruning and dph-sweep-report.

End-to-end tests run the toy app of tests/fixtures/toy_app in a subprocess with real Hydra and a
real Optuna storage (journal file or sqlite); the rest checks the pieces in-process.
"""

import csv
import shutil
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import optuna
import pytest
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from dph.pruning import PRUNER_ATTR, TrialReporter, absolute_storage, display_storage, open_storage
from dph.sweep_report import param_figure
from hydra_plugins.dph_optuna_sweeper._impl import objective_values, trial_override
from hydra_plugins.dph_optuna_sweeper._search_space import SearchSpace, SearchSpaceError, fixed_overrides, quote

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "tests" / "fixtures" / "toy_app" / "app.py"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
STUDY = "app"  # the default study name: ${hydra.job.name} of app.py

optuna.logging.set_verbosity(optuna.logging.WARNING)


def sweep_command(sweep_dir: Path, *overrides: str, preset: bool = True) -> list[str]:
    """``app.py -m [hparams_search=toy] hydra.sweep.dir=<sweep_dir> <overrides>``."""
    return [sys.executable, str(APP), "-m", *(["hparams_search=toy"] if preset else []),
            f"hydra.sweep.dir={sweep_dir}", *overrides]


def run_sweep(sweep_dir: Path, *overrides: str, preset: bool = True, expect_ok: bool = True) -> subprocess.CompletedProcess:
    """The sweep_command in a subprocess."""
    proc = subprocess.run(sweep_command(sweep_dir, *overrides, preset=preset), capture_output=True, text=True,
                          timeout=180, cwd=sweep_dir.parent)
    if expect_ok:
        assert proc.returncode == 0, f"sweep failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def load_study(storage: str | Path, name: str = STUDY) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=open_storage(str(storage)))


def read_summary(directory: Path) -> dict:
    return yaml.safe_load((directory / "summary.yaml").read_text())


def assert_png(path: Path) -> None:
    assert path.is_file(), f"{path} is missing"
    assert path.read_bytes()[:8] == PNG_SIGNATURE


@pytest.fixture(scope="module")
def toy_sweep(tmp_path_factory) -> Path:
    """The toy preset: 3 trials, random sampler, conditional divergence params, default journal."""
    sweep_dir = tmp_path_factory.mktemp("toy") / "sweep"
    run_sweep(sweep_dir)
    return sweep_dir


# ------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_sweep_leaves_study_summary_csv_and_plots(toy_sweep):
    study = load_study(toy_sweep / "optuna.journal")
    assert [t.number for t in study.trials] == [0, 1, 2]
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    assert study.metric_names == ["eval/score"]
    for t in study.trials:  # each job reported its fake evaluations to its own trial
        assert sorted(t.intermediate_values) == [0, 1, 2]
        assert Path(t.user_attrs["job_dir"]) == toy_sweep / str(t.number)
        assert (toy_sweep / str(t.number) / ".hydra" / "config.yaml").is_file()

    summary = read_summary(toy_sweep)
    assert summary["directions"] == ["maximize"] and summary["trials"]["complete"] == 3
    assert summary["best"]["number"] == study.best_trial.number
    assert summary["best"]["value"] == pytest.approx(study.best_value)
    assert summary["best"]["params"] == study.best_trial.params
    assert "hparams_search=toy" in summary["best"]["overrides"]

    rows = list(csv.DictReader((toy_sweep / "trials.csv").open()))
    assert [int(r["number"]) for r in rows] == [0, 1, 2]
    assert {r["state"] for r in rows} == {"COMPLETE"}
    assert [float(r["eval/score"]) for r in rows] == pytest.approx([t.value for t in study.trials])
    assert "params_divergence" in rows[0] and "duration_s" in rows[0]
    assert_png(toy_sweep / "history.png")
    assert_png(toy_sweep / "objective_vs_divergence.weight.png")
    assert_png(toy_sweep / "objective_vs_divergence.alpha.png")


@pytest.mark.slow
def test_conditional_params_exist_only_when_the_parent_allows(toy_sweep):
    trials = load_study(toy_sweep / "optuna.journal").trials
    assert {t.params["divergence"] for t in trials} == {"none", "js", "alpha"}  # the preset's seed covers all
    for t in trials:
        divergence = t.params["divergence"]
        assert ("divergence.weight" in t.params) == (divergence in ("js", "alpha"))
        assert ("divergence.alpha" in t.params) == (divergence == "alpha")
        job_cfg = yaml.safe_load((toy_sweep / str(t.number) / ".hydra" / "config.yaml").read_text())
        assert job_cfg["divergence"]["name"] == divergence
        if "divergence.weight" in t.params:
            assert job_cfg["divergence"]["weight"] == pytest.approx(t.params["divergence.weight"])
        assert job_cfg["trial"] == {"storage": str(toy_sweep / "optuna.journal"), "study_name": STUDY,
                                    "number": t.number}


@pytest.mark.slow
def test_resume_runs_only_the_missing_trials_and_reruns_interrupted_ones(toy_sweep, tmp_path):
    sweep_dir = tmp_path / "sweep"
    shutil.copytree(toy_sweep, sweep_dir)
    journal = sweep_dir / "optuna.journal"

    run_sweep(sweep_dir, "hydra.sweeper.n_trials=4")
    trials = load_study(journal).trials
    assert [t.number for t in trials] == [0, 1, 2, 3]
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert (sweep_dir / "3" / ".hydra").is_dir()

    # A killed sweep leaves a RUNNING trial: the next sweep marks it FAIL and does not count it.
    load_study(journal).ask()
    run_sweep(sweep_dir, "hydra.sweeper.n_trials=5")
    trials = load_study(journal).trials
    assert [t.number for t in trials] == [0, 1, 2, 3, 4, 5]
    assert trials[4].state == TrialState.FAIL and trials[4].user_attrs["interrupted"] is True
    assert "earlier sweep" in trials[4].user_attrs["fail_reason"]
    assert trials[5].state == TrialState.COMPLETE
    assert read_summary(sweep_dir)["trials"] == {"total": 6, "counted": 5, "complete": 5, "fail": 1}


@pytest.mark.slow
def test_a_sweep_waits_for_a_running_trial_with_a_heartbeat_and_reruns_it_once_stale(tmp_path):
    """On an RDB storage a RUNNING trial with a fresh heartbeat belongs to a sweep still running: it
    is counted, and waited for; when its heartbeat stops for grace_period it is failed (interrupted,
    not counted) and run again here."""
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name=STUDY, storage=open_storage(storage, heartbeat_interval=1, grace_period=2),
                                direction="maximize")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Optuna: heartbeats are meant for study.optimize
        other = study.ask()  # a trial of "another sweep", whose process then dies
    other.set_user_attr("heartbeat", True)
    alive = threading.Event()
    alive.set()

    def beat():  # the other sweep's heartbeat, until the sweep under test has seen it
        while alive.is_set():
            study._storage.record_heartbeat(other._trial_id)
            time.sleep(0.2)

    beating = threading.Thread(target=beat, daemon=True)
    beating.start()
    args = sweep_command(tmp_path / "sweep", "hydra.sweeper.n_trials=1", f"hydra.sweeper.storage={storage}",
                         "hydra.sweeper.heartbeat_interval=1", "hydra.sweeper.grace_period=2")
    with subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path) as proc:
        lines = []
        for line in proc.stdout:  # the other sweep dies once this one waits for it
            lines.append(line)
            if "waiting for trials [0] of another sweep" in line:
                alive.clear()
        returncode = proc.wait(timeout=180)
    alive.clear()
    beating.join()
    output = "".join(lines)
    assert returncode == 0, output[-4000:]
    assert "waiting for trials [0] of another sweep" in output
    assert "trial 0 had no heartbeat for the grace period: marked FAIL (not counted)" in output
    trials = load_study(storage).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert trials[0].user_attrs["interrupted"] is True and "grace_period=2 s" in trials[0].user_attrs["fail_reason"]
    assert trials[1].user_attrs["heartbeat"] is True
    assert read_summary(tmp_path / "sweep")["trials"] == {"total": 2, "counted": 1, "complete": 1, "fail": 1}


@pytest.mark.slow
def test_parallel_trials_with_the_joblib_launcher(tmp_path):
    sweep_dir = tmp_path / "sweep"
    proc = run_sweep(sweep_dir, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "hydra.sweeper.n_jobs=2",
                     "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.name=tpe")
    assert "Joblib" in proc.stdout + proc.stderr
    trials = load_study(sweep_dir / "optuna.journal").trials
    assert sorted(t.number for t in trials) == [0, 1]
    assert all(t.state == TrialState.COMPLETE for t in trials)
    for t in trials:  # reported from the worker processes through the journal file
        assert sorted(t.intermediate_values) == [0, 1, 2]
        assert (sweep_dir / str(t.number) / ".hydra").is_dir()


@pytest.mark.slow
def test_multi_objective_sweep_gives_a_pareto_front(tmp_path):
    sweep_dir = tmp_path / "sweep"
    storage = f"sqlite:///{tmp_path / 'db' / 'study.db'}"
    run_sweep(sweep_dir, "hydra/sweeper=optuna", "divergence=js", "divergence.weight=tag(log,interval(0.001,1.0))",
              "optimized_metric=[eval/score,eval/diversity]", "hydra.sweeper.directions=[maximize,maximize]",
              "hydra.sweeper.sampler.name=nsgaii", "hydra.sweeper.n_trials=3", f"hydra.sweeper.storage={storage}",
              "hydra.sweeper.study_name=pareto", preset=False)
    study = load_study(storage, "pareto")
    assert len(study.trials) == 3 and all(t.state == TrialState.COMPLETE for t in study.trials)
    assert all(len(t.values) == 2 and not t.intermediate_values for t in study.trials)  # no reports: multi-objective
    summary = read_summary(sweep_dir)
    assert summary["objectives"] == ["eval/score", "eval/diversity"]
    front = summary["pareto_front"]
    assert [entry["number"] for entry in front] == sorted(t.number for t in study.best_trials)
    assert set(front[0]["values"]) == {"eval/score", "eval/diversity"}
    assert_png(sweep_dir / "pareto_front.png")


@pytest.mark.slow
def test_pruned_and_failed_trials_are_recorded_while_the_sweep_goes_on(tmp_path):
    sweep_dir = tmp_path / "sweep"
    run_sweep(sweep_dir, "hydra.sweeper.n_trials=4", "hydra.sweeper.pruner.name=median",
              "hydra.sweeper.pruner.n_startup_trials=1", "worse_trials=[1]", "fail_trials=[2]",
              "hydra.sweeper.max_failure_rate=0.5")
    trials = load_study(sweep_dir / "optuna.journal").trials
    assert len(trials) == 4
    assert trials[0].state == TrialState.COMPLETE
    assert trials[1].state == TrialState.PRUNED and trials[1].value < -90  # its last reported value
    assert trials[2].state == TrialState.FAIL
    assert "toy failure in trial 2" in trials[2].user_attrs["fail_reason"]
    assert "toy failure in trial 2" in trials[2].system_attrs["fail_reason"]
    assert trials[3].state.is_finished()
    rows = {int(r["number"]): r for r in csv.DictReader((sweep_dir / "trials.csv").open())}
    assert rows[1]["state"] == "PRUNED" and "toy failure" in rows[2]["fail_reason"]


@pytest.mark.slow
def test_grid_sampler_runs_each_point_once_with_sweeps_from_the_command_line(tmp_path):
    sweep_dir = tmp_path / "sweep"
    proc = run_sweep(sweep_dir, "hydra/sweeper=optuna", "hydra.sweeper.sampler.name=grid", "divergence=none,js",
                     "steps=range(1,3)", preset=False)
    assert "the grid has 4 points" in proc.stdout + proc.stderr
    trials = load_study(sweep_dir / "optuna.journal").trials
    assert sorted((t.params["divergence"], t.params["steps"]) for t in trials) == [
        ("js", 1), ("js", 2), ("none", 1), ("none", 2)]
    assert_png(sweep_dir / "objective_vs_steps.png")


@pytest.mark.slow
def test_sweep_stops_when_the_failure_rate_exceeds_the_limit(tmp_path):
    sweep_dir = tmp_path / "sweep"
    proc = run_sweep(sweep_dir, "fail_trials=[0]", expect_ok=False)  # max_failure_rate defaults to 0
    assert proc.returncode != 0
    assert "max_failure_rate" in proc.stderr
    trials = load_study(sweep_dir / "optuna.journal").trials
    assert [t.state for t in trials] == [TrialState.FAIL]
    assert read_summary(sweep_dir)["trials"]["fail"] == 1


@pytest.mark.slow
def test_sweep_report_rebuilds_the_files_from_storage_alone(toy_sweep, tmp_path):
    journal = tmp_path / "copy" / "optuna.journal"
    journal.parent.mkdir()
    shutil.copy(toy_sweep / "optuna.journal", journal)
    exe = Path(sys.executable).parent / "dph-sweep-report"
    proc = subprocess.run([str(exe), str(journal), STUDY, "--out", str(tmp_path / "report")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = tmp_path / "report"
    rebuilt, original = read_summary(report), read_summary(toy_sweep)
    assert rebuilt["best"] == original["best"] and rebuilt["trials"] == original["trials"]
    assert (report / "trials.csv").read_text() == (toy_sweep / "trials.csv").read_text()
    for name in ("history.png", "objective_vs_divergence.weight.png", "objective_vs_divergence.alpha.png"):
        assert_png(report / name)

    # The study name may be left out when the storage holds one; the default output is beside it.
    proc = subprocess.run([str(exe), str(journal)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert read_summary(journal.parent)["best"] == original["best"]
    proc = subprocess.run([str(exe), str(tmp_path / "missing.journal")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "is not a file" in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("overrides, line", [
    (["hydra.sweeper.n_trials=0"], "app: error: hydra.sweeper.n_trials=0 is not allowed: use an integer >= 1"),
    (["hydra.sweeper.sampler.name=cmaes"], "app: error: hydra.sweeper.sampler.name='cmaes' is not a known sampler"),
    (["hydra.sweeper.heartbeat_interval=60", "hydra.sweeper.grace_period=30"],
     "app: error: hydra.sweeper.grace_period=30 must exceed hydra.sweeper.heartbeat_interval=60"),
    (["divergence.weight=interval(1, 0)"], "app: error: hydra.sweeper.params: divergence.weight=interval(1, 0): the "
                                           "interval is empty"),
])
def test_impossible_sweeper_settings_fail_in_one_line_before_any_trial(tmp_path, overrides, line):
    sweep_dir = tmp_path / "sweep"
    proc = run_sweep(sweep_dir, *overrides, expect_ok=False)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith(line), proc.stderr
    assert not (sweep_dir / "optuna.journal").exists() and not (sweep_dir / "0").exists()


@pytest.mark.slow
def test_a_study_refuses_to_resume_with_other_fixed_overrides(tmp_path):
    sweep_dir = tmp_path / "sweep"
    journal = sweep_dir / "optuna.journal"
    run_sweep(sweep_dir, "steps=2", "hydra.sweeper.n_trials=1")
    assert load_study(journal).user_attrs["fixed_overrides"] == {"hparams_search": "hparams_search=toy",
                                                                 "steps": "steps=2"}

    # Another fixed value (or a missing one) is refused in one line, naming the key and both ways on.
    for overrides, change in ((["steps=3"], "steps: 2 -> 3"), ([], "steps: 2 -> (not set)")):
        proc = run_sweep(sweep_dir, *overrides, "hydra.sweeper.n_trials=2", expect_ok=False)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert proc.stderr.startswith(f"app: error: study {STUDY} in {journal} was started with other fixed "
                                      f"overrides ({change}): start a new study with another hydra.sweeper.study_name")
        assert "hydra.sweep.dir" in proc.stderr and "hydra.sweeper.resume_with_changed_overrides=true" in proc.stderr
        assert len(load_study(journal).trials) == 1 and not (sweep_dir / "1").exists()

    # A narrower interval is not a fixed override: the study goes on. Other choices are refused
    # (Optuna keeps a categorical's choices for the whole study), also in one line.
    proc = run_sweep(sweep_dir, "steps=2", "hydra.sweeper.n_trials=2", "divergence=choice(js,alpha)", expect_ok=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("app: error: hydra.sweeper.params: divergence was choice(none, js, alpha) in study "
                                  "app, this sweep asks for choice(js, alpha)")
    run_sweep(sweep_dir, "steps=2", "hydra.sweeper.n_trials=2", "divergence.weight=tag(log, interval(0.01, 0.1))")
    assert len(load_study(journal).trials) == 2

    # Asked to, it continues with the new value; the trials that ran with it say so.
    run_sweep(sweep_dir, "steps=3", "hydra.sweeper.n_trials=3", "hydra.sweeper.resume_with_changed_overrides=true")
    study = load_study(journal)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    assert study.user_attrs["fixed_overrides"]["steps"] == "steps=2"  # what the study was started with
    assert [t.user_attrs.get("fixed_overrides", {}).get("steps") for t in study.trials] == [None, None, "steps=3"]
    assert sorted(study.trials[2].intermediate_values) == [0, 1, 2]


@pytest.mark.slow
def test_a_postgresql_storage_without_its_driver_fails_in_one_line(tmp_path):
    """With the drivers made unimportable (as where the postgres extra is not installed), the sweep
    and dph-sweep-report stop before any work, naming the extra; nothing is contacted."""
    url = "postgresql://nobody@127.0.0.1:9/nowhere"
    hide = "import runpy, sys; sys.modules['psycopg'] = sys.modules['psycopg2'] = None; "
    sweep_dir = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, "-c", hide + "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], "
                           "run_name='__main__')", str(APP), "-m", "hparams_search=toy", f"hydra.sweep.dir={sweep_dir}",
                           f"hydra.sweeper.storage={url}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith(f"app: error: hydra.sweeper.storage={url} needs the database driver psycopg, "
                                  'which is not installed: pip install -e ".[postgres]"')
    assert not (sweep_dir / "0").exists()

    proc = subprocess.run([sys.executable, "-c", hide + "from dph.sweep_report import main; sys.exit(main())", url],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and 'pip install -e ".[postgres]"' in proc.stderr.splitlines()[-1]


def test_fixed_overrides_leave_out_the_search_space_hydra_keys_and_the_trial():
    overrides = OverridesParser.create().parse_overrides(
        ["trainer.steps=2", "divergence=choice(js, alpha)", "divergence.weight=0.1", "~task.splits.ood",
         "+extra.key=[1,2]", "hydra.sweeper.n_trials=3", "++trial={number:1}", "sweep=divergence_tpe"])
    assert fixed_overrides(overrides, exclude=["divergence", "divergence.weight"]) == {
        "extra.key": "+extra.key=[1,2]", "sweep": "sweep=divergence_tpe", "task.splits.ood": "~task.splits.ood",
        "trainer.steps": "trainer.steps=2"}


@pytest.mark.parametrize("weights", [(0.012, 0.03, 0.045, 0.07), (0.011, 0.013, 0.018), (0.05,), (0.002, 0.04, 0.9)])
def test_the_log_axis_of_a_sweep_has_labelled_major_ticks_and_the_titles_fit(weights):
    """Weights within one decade (or less, or a single one) still get at least two labelled major
    ticks on the log x axis; the long title is wrapped inside the figure."""
    study = optuna.create_study(direction="maximize", study_name="divergence_tpe_with_a_long_study_name")
    choices = CategoricalDistribution(["none", "js", "alpha"])
    weight = FloatDistribution(0.001, 1.0, log=True)
    for i, w in enumerate(weights):
        study.add_trial(optuna.trial.create_trial(params={"divergence": ["js", "alpha"][i % 2], "divergence.weight": w},
                                                  distributions={"divergence": choices, "divergence.weight": weight},
                                                  value=0.5 + 0.01 * i))
    figure = param_figure(study, study.trials, ["eval/test/pass@8"], "divergence.weight", ["divergence"], log_x=True)
    renderer = figure.canvas.get_renderer()
    figure.canvas.draw()
    ax = figure.axes[0]
    assert ax.get_xscale() == "log"
    low, high = ax.get_xlim()
    assert low <= min(weights) and max(weights) <= high
    labelled = [tick.label1.get_text() for tick in ax.xaxis.get_major_ticks()
                if low <= tick.get_loc() <= high and tick.label1.get_visible() and tick.label1.get_text()]
    assert len(labelled) >= 2, labelled
    width = figure.bbox.width
    for text in [figure._suptitle, ax.title, ax.xaxis.label, *ax.get_legend().get_texts()]:
        box = text.get_window_extent(renderer)
        assert 0 <= box.x0 and box.x1 <= width, text.get_text()


# ------------------------------------------------------------------ search space
def space(*lines: str, conditional: dict | None = None) -> SearchSpace:
    return SearchSpace.from_overrides(OverridesParser.create().parse_overrides(list(lines)), conditional)


def test_override_grammar_maps_to_optuna_distributions():
    params = {p.name: p for p in space("a=choice(x, y, 'true')", "b=range(1, 9, 2)", "c=interval(0.1, 1)",
                                       "d=tag(log, interval(1e-4, 1e-1))", "e=int(interval(1, 8))",
                                       "f=tag(log, int(interval(1, 64)))", "g=range(0.0, 1.0, 0.25)", "k=range(5, 0, -2)",
                                       "h=0.5", "i=[1,2]", "j=p,q").params}
    assert params["a"].distribution == CategoricalDistribution(["x", "y", "true"])
    assert params["b"].distribution == IntDistribution(1, 7, step=2)  # stop excluded, as in Hydra
    assert params["c"].distribution == FloatDistribution(0.1, 1.0)
    assert params["d"].distribution == FloatDistribution(1e-4, 1e-1, log=True)
    assert params["e"].distribution == IntDistribution(1, 8)
    assert params["f"].distribution == IntDistribution(1, 64, log=True)
    assert params["g"].distribution == FloatDistribution(0.0, 0.75, step=0.25)
    assert params["k"].distribution == IntDistribution(1, 5, step=2)
    assert params["j"].distribution == CategoricalDistribution(["p", "q"])
    assert not params["h"].sampled and params["h"].fixed_override == "h=0.5"
    assert params["i"].fixed_override == "i=[1,2]"
    # Override texts parse back to the sampled value (the string 'true' stays a string).
    parser = OverridesParser.create()
    assert parser.parse_override(params["a"].override("true")).value() == "true"
    assert parser.parse_override(params["d"].override(1.2345678901234e-4)).value() == 1.2345678901234e-4


def test_conditional_params_are_sampled_after_their_parents():
    s = space("divergence.alpha=interval(0, 1)", "divergence.weight=interval(0.01, 0.1)",
              "divergence=choice(none, js, alpha)", "steps=3",
              conditional={"divergence.alpha": {"divergence": ["alpha"]},
                           "divergence.weight": {"divergence": ["js", "alpha"]}})
    assert [p.name for p in s.params] == ["divergence", "divergence.alpha", "divergence.weight", "steps"]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(12):
        trial = study.ask()
        values = s.suggest(trial)
        seen.add(values["divergence"])
        assert ("divergence.weight" in values) == (values["divergence"] != "none")
        assert ("divergence.alpha" in values) == (values["divergence"] == "alpha")
        overrides = s.overrides(values)
        assert overrides[0] == f"divergence={values['divergence']}" and overrides[-1] == "steps=3"
        study.tell(trial, 0.0)
    assert seen == {"none", "js", "alpha"}


@pytest.mark.parametrize("lines, conditional, message", [
    (["a=interval(0, 1)"], {"b": {"a": [1]}}, "b is not in hydra.sweeper.params"),
    (["a=interval(0, 1)"], {"a": {"c": [1]}}, "parent c is not in hydra.sweeper.params"),
    (["a=choice(1, 2)", "b=choice(1, 2)"], {"a": {"b": [1]}, "b": {"a": [1]}}, "cycle"),
    (["a=range(3, 3)"], None, "empty"),
    (["a=tag(log, interval(0, 1))"], None, "positive lower end"),
])
def test_impossible_search_spaces_name_the_key_and_the_fix(lines, conditional, message):
    with pytest.raises(SearchSpaceError, match=message):
        space(*lines, conditional=conditional)


def test_grid_needs_finite_unconditional_params():
    assert space("a=choice(1, 2)", "b=range(0, 3)").grid() == {"a": [1, 2], "b": [0, 1, 2]}
    with pytest.raises(SearchSpaceError, match="finite values"):
        space("a=interval(0, 1)").grid()
    with pytest.raises(SearchSpaceError, match="conditional"):
        space("a=choice(1, 2)", "b=choice(3, 4)", conditional={"b": {"a": [1]}}).grid()


@pytest.mark.parametrize("text", ["/tmp/a b/optuna.journal", "it's", "C:\\runs\\", "a\\'b", "x,y=z"])
def test_quoted_strings_survive_hydra_parsing(text):
    assert OverridesParser.create().parse_override(f"k={quote(text)}").value() == text


def test_trial_override_parses_to_the_trial_config():
    override = trial_override("/tmp/it's here/optuna.journal", "my study", 7)
    parsed = OverridesParser.create().parse_override(override)
    assert parsed.get_key_element() == "++trial"
    assert parsed.value() == {"storage": "/tmp/it's here/optuna.journal", "study_name": "my study", "number": 7}


def test_objective_values_accepts_numbers_and_rejects_the_rest():
    assert objective_values(0.5, 1) == ([0.5], None)
    assert objective_values((1, 2.5), 2) == ([1.0, 2.5], None)
    for bad, n in [(None, 1), ([1.0], 2), ("x", 1), (float("nan"), 1), (True, 1)]:
        values, problem = objective_values(bad, n)
        assert values is None and problem


# ------------------------------------------------------------------ pruning and storage
def test_storage_strings():
    assert absolute_storage("sqlite:///rel/study.db") == f"sqlite:///{Path.cwd() / 'rel' / 'study.db'}"
    assert absolute_storage("sqlite:////abs/study.db") == "sqlite:////abs/study.db"
    assert absolute_storage("rel.journal") == str(Path.cwd() / "rel.journal")
    assert display_storage("postgresql://me:secret@host/db") == "postgresql://me:***@host/db"
    assert display_storage("postgresql://me@host/db") == "postgresql://me@host/db"


def test_trial_reporter_reports_and_prunes_through_the_storage(tmp_path):
    journal = str(tmp_path / "optuna.journal")
    study = optuna.create_study(study_name="s", storage=open_storage(journal), direction="maximize")
    study.set_user_attr(PRUNER_ATTR, {"name": "median", "n_startup_trials": 1})
    first = study.ask()
    reporter = TrialReporter.from_config({"storage": journal, "study_name": "s", "number": first.number}, "eval/x")
    for step in range(3):
        reporter.report(step, {"eval/x": 1.0 + step, "eval/other": 0.0})
    study.tell(first, 3.0)
    assert load_study(journal, "s").trials[0].intermediate_values == {0: 1.0, 1: 2.0, 2: 3.0}

    second = study.ask()
    reporter = TrialReporter.from_config({"storage": journal, "study_name": "s", "number": second.number}, ["eval/x"])
    with pytest.raises(KeyError, match="eval/x"):
        reporter.report(0, {"eval/y": 1.0})
    with pytest.raises(optuna.TrialPruned):
        reporter.report(0, {"eval/x": 0.0})  # worse than the median of finished trials at step 0


def test_trial_reporter_is_none_outside_a_sweep_and_for_several_objectives(tmp_path):
    assert TrialReporter.from_config(None, "eval/x") is None
    journal = str(tmp_path / "optuna.journal")
    study = optuna.create_study(study_name="m", storage=open_storage(journal), directions=["maximize", "minimize"])
    trial_cfg = {"storage": journal, "study_name": "m", "number": study.ask().number}
    assert TrialReporter.from_config(trial_cfg, "eval/x") is None
    assert TrialReporter.from_config(trial_cfg, ["eval/x", "eval/y"]) is None
    with pytest.raises(ValueError, match="number"):
        TrialReporter.from_config({"storage": journal, "study_name": "m"}, "eval/x")
