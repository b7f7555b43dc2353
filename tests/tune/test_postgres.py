"""The production tracking backend: `tune/run.py` against an `mlflow server` on PostgreSQL.

A small real study (3 trials of the tiny model) tracks to a server whose backend store is a
PostgreSQL started here (tests/tune/postgres.py). The server is killed by PID while the trials
train and started again on the same port and database while the study goes on; MLflow ends
up holding every trial once, with every epoch Optuna accepted exactly once. Without PostgreSQL
(no package, or root without a postgres user) the test is skipped, and fails when CI=true.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import MlflowServer
from optuna.trial import TrialState
from postgres import Postgres, unavailable
from ray_fixtures import descendants, reports, start_study, study_trials, wait_for, write_space

STUDY_TIMEOUT_S = 600


@pytest.fixture
def postgres_uri() -> Iterator[str]:
    """A new PostgreSQL server and database for MLflow, removed after the test."""
    problem = unavailable()
    if problem:
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL is required in CI: {problem}")
        pytest.skip(f"no PostgreSQL: {problem}")
    with Postgres() as server:
        yield server.create_database("mlflow")


def kill_server(server: MlflowServer) -> None:
    """SIGKILL the tracking server's process and its uvicorn worker, by PID."""
    family = [server.process.pid, *descendants(server.process.pid)]
    for pid in family:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    server.process.wait(timeout=30)
    server._wait_port_free()


def epoch_lines(root: Path) -> int:
    """Epochs the trials have reported so far (complete lines of their reports.jsonl)."""
    total = 0
    for path in root.glob("trials/*/reports.jsonl"):
        try:
            total += path.read_bytes().count(b"\n")
        except OSError:
            pass
    return total


@pytest.mark.slow
def test_study_on_postgres_survives_a_killed_tracking_server(
    tmp_path, xd_small, ray_tmp, postgres_uri
):
    from mlflow import MlflowClient

    server = MlflowServer(tmp_path / "mlflow-server", backend=postgres_uri).start()
    try:
        experiment = "pg-outage"
        space = write_space(
            tmp_path,
            xd_small,
            num_samples=3,
            mlflow={"tracking_uri": server.uri, "experiment": experiment},
        )
        root = tmp_path / "studies" / "t"
        log = tmp_path / "study.log"
        study = start_study(["--space", str(space), "--final-seeds", "0"], log, ray_tmp)
        try:
            wait_for(lambda: epoch_lines(root) >= 1, study, timeout=STUDY_TIMEOUT_S)
            kill_server(server)
            down_at = epoch_lines(root)
            # The search goes on without MLflow: two more epochs are trained and told to Optuna.
            wait_for(lambda: epoch_lines(root) >= down_at + 2, study, timeout=STUDY_TIMEOUT_S)
            server.start()  # same port, same PostgreSQL database
            code = study.wait(timeout=STUDY_TIMEOUT_S)
        finally:
            if study.poll() is None:
                os.killpg(study.pid, signal.SIGKILL)
                study.wait(timeout=30)
        output = log.read_text()
        assert code == 0, output[-3000:]
        assert "unreachable" in output  # the view saw the outage and carried on

        trials = study_trials(root)
        assert len(trials) == 3
        assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
        client = MlflowClient(tracking_uri=server.uri)
        found = client.get_experiment_by_name(experiment)
        runs = client.search_runs([found.experiment_id], max_results=100)
        parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        children = {int(r.data.tags["dsanet.optuna_trial"]): r for r in runs if r not in parents}
        assert len(parents) == 1 and parents[0].info.status == "FINISHED"
        assert len(children) == len(runs) - 1 == 3  # one run per trial
        for trial in trials:
            run = children[trial.number]
            epochs = sorted(int(step) for step in trial.user_attrs["epochs"])
            history = client.get_metric_history(run.info.run_id, "val_ap")
            assert sorted(m.step for m in history) == [e - 1 for e in epochs]  # each once
            lines = reports(root, trial.number)
            assert [line["epoch"] for line in lines] == [e - 1 for e in epochs]
            assert run.info.status == "FINISHED"
    finally:
        server.stop()
