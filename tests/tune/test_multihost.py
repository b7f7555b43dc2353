"""A study on a real multi-host Ray cluster: hosts are network namespaces of this machine.

One head host (no CPU: it runs the driver and the MLflow server) and two worker hosts of one
CPU each, every one with its own address in 198.18.0.0/15 and its own `ray start`, joined by
token authentication as `tune/cluster.yaml` sets it up. The study folder is on the file system
all hosts share (a cluster's NFS). The driver is `tune/run.py --address HEAD:6379` run on the
head host; the tests look at what it leaves only from outside: `optuna.db`, the MLflow server
and the trials' `reports.jsonl`.

The hosts (namespaces, links, every process in them) are removed by `netns_cluster.Hosts`,
each by name or pid; `test_closing_the_cluster_leaves_nothing` checks that, last.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import MlflowServer
from netns_cluster import Hosts, RayCluster, alive, netns_problem
from optuna.trial import TrialState
from ray_fixtures import REPO, RUN_PY, mlflow_children, study_trials

from tune.searcher import epoch_records

pytestmark = pytest.mark.slow

PYTHON = Path(sys.executable)
RAY = PYTHON.parent / "ray"
DEMO_SPACE = REPO / "search_spaces" / "demo.yaml"
MLFLOW_PORT = 5000  # on the head host's own address: no other process can hold it
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def _required(variable: str) -> bool:
    """In CI (CI=true, or .ci/run's DSANET_REQUIRE_* as root) a missing tool is a failure: CI
    runs as root with the tools installed, and a skip there would hide a break."""
    return os.environ.get("CI") == "true" or bool(os.environ.get(variable))


def _hosts_or_skip() -> None:
    """Skip with one line where namespaces cannot be made; fail instead in CI."""
    problem = netns_problem()
    if problem:
        if _required("DSANET_REQUIRE_NETNS"):
            pytest.fail(problem)
        pytest.skip(problem)


# ---------------------------------------------------------------------------- the cluster


class HeadMlflowServer(MlflowServer):
    """tests/tune/conftest.py's server, run on the head host and listening on its address."""

    def __init__(self, root: Path, hosts: Hosts, host: Any) -> None:
        super().__init__(root, port=MLFLOW_PORT)
        self.hosts, self.host = hosts, host
        self.uri = f"http://{host.ip}:{self.port}"

    def launch(self) -> HeadMlflowServer:
        self.starts += 1
        self._logname = str(self.root / f"server-{self.starts}.log")
        command = [
            str(PYTHON.parent / "mlflow"), "server",
            "--backend-store-uri", f"sqlite:///{self.db}",
            "--default-artifact-root", str(self.artifacts),
            "--host", self.host.ip, "--port", str(self.port), "--workers", "1",
            # MLflow 3.17 answers only Host headers of localhost and private networks (its DNS
            # rebinding guard), which 198.18/15 is not: name the address the clients use.
            "--allowed-hosts", f"{self.host.ip}:{self.port}",
        ]  # fmt: skip
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        with open(self._logname, "w") as logfile:
            self.process = self.hosts.popen(
                self.host, command, stdout=logfile, stderr=subprocess.STDOUT, env=env
            )
        return self


class Cluster:
    """The module's hosts, Ray cluster and MLflow server."""

    def __init__(self, base: Path) -> None:
        self.base = base
        home = base / "home"
        home.mkdir()
        self.env = {
            **os.environ,
            "HOME": str(home),  # ~/.ray/auth_token: the token every node and the driver share
            "RAY_AUTH_MODE": "token",
            "PYTHONPATH": str(REPO),  # Ray's workers import this checkout's tune and dsanet
            "RAY_USAGE_STATS_ENABLED": "0",
            # A dead host is noticed in seconds (Ray's default: 30 s or more).
            "RAY_health_check_period_ms": "1000",
            "RAY_health_check_timeout_ms": "1000",
            "RAY_health_check_failure_threshold": "3",
        }
        token = subprocess.run(
            [str(RAY), "get-auth-token", "--generate"], env=self.env, capture_output=True
        )
        assert token.returncode == 0 and (home / ".ray" / "auth_token").is_file(), token.stderr
        self.hosts = Hosts()
        self.ray = RayCluster(self.hosts, RAY, base, self.env)
        self.mlflow: HeadMlflowServer | None = None

    def start(self) -> Cluster:
        head = self.ray.start_head()
        self.mlflow = HeadMlflowServer(self.base / "mlflow", self.hosts, head).launch()
        self.ray.add_workers(2)
        self.mlflow.wait_until_up()
        return self

    def ensure_two_workers(self) -> None:
        """A test that killed a host leaves one worker: add a new host in its place."""
        missing = 2 - len(self.ray.live_workers())
        if missing > 0:
            self.ray.add_workers(missing)

    def close(self) -> None:
        try:
            if self.mlflow is not None:
                self.mlflow.stop()
        finally:
            self.hosts.close()

    # ------------------------------------------------------------------ studies

    def space(self, folder: Path, data: dict[str, Path], epochs: int, **fields: Any) -> Path:
        """search_spaces/demo.yaml on the session's small xd-mini instead of generated data,
        trials of `epochs` epochs without a scheduler, tracked by the head's MLflow server;
        `fields` replace top-level keys."""
        space = yaml.safe_load(DEMO_SPACE.read_text())
        del space["synthetic"]
        space["overrides"] = {
            **space["overrides"],
            "data.list_dir": str(data["lists"]),
            "data.feature_root": str(data["features"]),
            "data.cache_dir": str(data["cache"]),
            "train.max_steps_per_epoch": 2,
            "train.epochs": epochs,
        }
        space.update(
            name=folder.name,
            max_concurrent=2,
            final_seeds=0,
            scheduler={"kind": "none"},
            mlflow={"tracking_uri": self.mlflow.uri, "experiment": f"mh-{folder.name}"},
            storage_path=str(folder / "studies"),
            **fields,
        )
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "space.yaml"
        path.write_text(yaml.safe_dump(space, sort_keys=False))
        return path

    def driver(self, space: Path, log: Path, *more: str) -> subprocess.Popen:
        """`python tune/run.py --space SPACE --address HEAD:6379 ...` on the head host."""
        command = [str(PYTHON), str(RUN_PY), "--space", str(space), "--address", self.ray.address]
        return self.hosts.popen(
            self.ray.head,
            [*command, *more],
            cwd=REPO,
            env=self.env,
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the driver loss kills all of it
        )


@pytest.fixture(scope="module")
def cluster_once() -> Iterator[Cluster]:
    _hosts_or_skip()
    base = Path(tempfile.mkdtemp(prefix="dsa", dir="/tmp"))  # short: Ray's Unix sockets
    cluster = Cluster(base)
    try:
        yield cluster.start()
    finally:
        try:
            cluster.close()
        finally:
            subprocess.run(["rm", "-rf", str(base)], check=False)


@pytest.fixture
def cluster(cluster_once) -> Cluster:
    cluster_once.ensure_two_workers()
    return cluster_once


# ---------------------------------------------------------------------------- what a study left


def report_lines(root: Path) -> dict[str, list[dict[str, Any]]]:
    """Every trial folder's reports.jsonl lines, by folder name (whatever names the folders)."""
    found = {}
    for path in sorted(root.glob("trials/*/reports.jsonl")):
        found[path.parent.name] = [json.loads(line) for line in path.read_text().splitlines()]
    return found


def run_study(cluster: Cluster, space: Path, log: Path, *more: str, timeout: float = 300) -> None:
    proc = cluster.driver(space, log, *more)
    try:
        status = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(
            f"the study did not end in {timeout} s:\n{log.read_text()[-3000:]}"
        ) from None
    assert status == 0, log.read_text()[-4000:]


def wait_for(condition, proc: subprocess.Popen, log: Path, timeout: float = 240) -> Any:
    deadline = time.monotonic() + timeout
    while not (found := condition()):
        if proc.poll() is not None:
            raise AssertionError(
                f"the driver exited ({proc.returncode}):\n{log.read_text()[-3000:]}"
            )
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met in {timeout} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.3)
    return found


def assert_every_epoch_once(cluster: Cluster, root: Path, space: Path, samples: int) -> list:
    """No trial lost, every finished epoch recorded exactly once in Optuna and in MLflow, no
    MLflow trial run without its Optuna trial. Returns the trials."""
    from mlflow import MlflowClient

    name = yaml.safe_load(space.read_text())["name"]
    trials = study_trials(root, name)
    assert len(trials) == samples and all(t.state in FINISHED for t in trials), [
        (t.number, t.state) for t in trials
    ]
    # Optuna: each trial's epochs 1..n, each once (recorded by epochs done), and each record is
    # one epoch a worker reported: its time is that line's time in one trial folder.
    lines = report_lines(root)
    where = {line["time"]: (folder, line["epoch"]) for folder, ls in lines.items() for line in ls}
    folder_of = {}
    for t in trials:
        records = epoch_records(t)
        assert sorted(records) == list(range(1, len(records) + 1)), (t.number, sorted(records))
        assert sorted(t.intermediate_values) == sorted(records)
        homes = {where[r["time"]] for r in records.values()}
        assert {epoch + 1 for _, epoch in homes} == set(records)
        (folder_of[t.number],) = {folder for folder, _ in homes}
    assert len(set(folder_of.values())) == samples == len(lines)  # one folder per trial
    for t in trials:  # every epoch a worker finished is in Optuna (at most run twice)
        epochs = [line["epoch"] for line in lines[folder_of[t.number]]]
        assert sorted(set(epochs)) == list(range(len(epoch_records(t)))), (t.number, epochs)
    # MLflow: one run per trial, found by its run key, each epoch's metrics once.
    client = MlflowClient(tracking_uri=cluster.mlflow.uri)
    experiment = client.get_experiment_by_name(
        yaml.safe_load(space.read_text())["mlflow"]["experiment"]
    )
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    trial_runs = {}
    for run in runs:
        key = run.data.tags.get("dsanet.run_key", "")
        if key.startswith("trial/"):
            assert key not in trial_runs, f"two MLflow runs for {key}"
            trial_runs[key] = run
    assert set(trial_runs) == {f"trial/{t.number}" for t in trials}  # no orphan, none missing
    for t in trials:
        run = trial_runs[f"trial/{t.number}"]
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_ap")]
        assert sorted(steps) == list(range(len(epoch_records(t)))), (t.number, steps)
    return trials


# ---------------------------------------------------------------------------- tests


def test_trials_run_on_several_hosts(cluster, tmp_path, xd_small):
    space = cluster.space(tmp_path / "placed", xd_small, epochs=2, num_samples=2)
    log = tmp_path / "driver.log"
    run_study(cluster, space, log)
    root = tmp_path / "placed" / "studies" / "placed"
    nodes = {line["node"] for lines in report_lines(root).values() for line in lines}
    workers = {w.ip for w in cluster.ray.live_workers()}
    assert len(nodes) >= 2 and nodes <= workers, (nodes, workers)
    assert f"ray         {cluster.ray.address}" in log.read_text()  # the cluster, joined
    assert_every_epoch_once(cluster, root, space, samples=2)


def test_a_lost_host_s_trial_is_retried_on_another(cluster, tmp_path, xd_small):
    """A worker host dies mid-trial (every process SIGKILLed, its link down): Ray retries the
    trial on the other host (the space's max_failures) and the study finishes, every epoch
    recorded once."""
    epochs = 4
    space = cluster.space(tmp_path / "lost", xd_small, epochs=epochs, num_samples=2)
    root, log = tmp_path / "lost" / "studies" / "lost", tmp_path / "driver.log"
    proc = cluster.driver(space, log)
    try:

        def a_trial_past_its_first_epoch() -> str:
            """The trial folder of a trial whose first epoch the driver has recorded."""
            for folder, lines in report_lines(root).items():
                if lines:
                    recorded = [epoch_records(t) for t in study_trials(root, "lost")]
                    if any(r.get(1, {}).get("time") == lines[0]["time"] for r in recorded):
                        return folder
            return ""

        folder = wait_for(a_trial_past_its_first_epoch, proc, log)
        time.sleep(3.0)  # Ray registers that epoch's checkpoint after the result (a round trip)
        lines = report_lines(root)[folder]
        assert lines[-1]["epoch"] < epochs - 1, "the trial ended before its host could be lost"
        node = lines[-1]["node"]
        lost = cluster.ray.host_of(node)
        killed = cluster.hosts.kill(lost)
        assert killed and not cluster.hosts.pids(lost)
        status = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert status == 0, log.read_text()[-4000:]
    trials = assert_every_epoch_once(cluster, root, space, samples=2)
    assert all(len(epoch_records(t)) == epochs for t in trials)
    lines = [line for ls in report_lines(root).values() for line in ls]
    moved = [ls for ls in report_lines(root).values() if {line["node"] for line in ls} >= {node}]
    assert len(moved) == 1, "the lost host's trial"
    (before_and_after,) = moved
    assert before_and_after[-1]["node"] != node  # finished on the other host
    restart = [
        line for line in before_and_after if line["node"] != node and line["resumed_at"] >= 0
    ]
    assert restart[0]["resumed_at"] > 0, "the retried trial started again from scratch"
    assert not [
        line for line in lines if line["node"] == node and line["time"] > restart[0]["time"]
    ]


def test_a_killed_driver_is_resumed_from_the_head(cluster, tmp_path, xd_small):
    """The driver on the head host is SIGKILLed mid-study; the same command with --resume,
    from the head host, finishes it: no trial lost, no epoch recorded twice, and the trials
    that had finished are left as they were."""
    epochs = 4
    space = cluster.space(tmp_path / "resumed", xd_small, epochs=epochs, num_samples=2)
    root = tmp_path / "resumed" / "studies" / "resumed"
    first, second = tmp_path / "driver-1.log", tmp_path / "driver-2.log"
    proc = cluster.driver(space, first)
    try:

        def mid_study() -> list:
            """The trials, once one has an epoch recorded and more epochs to run."""
            trials = study_trials(root, "resumed")
            going = [t for t in trials if t.state == TrialState.RUNNING and epoch_records(t)]
            return trials if any(len(epoch_records(t)) < epochs - 1 for t in going) else []

        wait_for(mid_study, proc, first)
        time.sleep(2.0)  # Ray registers the epoch's checkpoint after its result
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver's process group, on the head host
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, first.read_text()[-3000:]
    before = {t.number: t for t in study_trials(root, "resumed")}
    assert not all(t.state in FINISHED for t in before.values()), "killed after the study"
    run_study(cluster, space, second, "--resume")
    trials = assert_every_epoch_once(cluster, root, space, samples=2)
    for t in trials:
        assert len(epoch_records(t)) == epochs
        if before.get(t.number) is not None and before[t.number].state in FINISHED:
            assert epoch_records(t) == epoch_records(before[t.number])  # untouched
        else:  # its records before the kill are kept as they were
            old = epoch_records(before[t.number]) if t.number in before else {}
            assert old.items() <= epoch_records(t).items()


# ---------------------------------------------------------------------------- ray up, ray submit

SSHD = Path("/usr/sbin/sshd")
CLUSTER_YAML = REPO / "tune" / "cluster.yaml"
SSH_OPTIONS = ["StrictHostKeyChecking=no", "UserKnownHostsFile=/dev/null", "BatchMode=yes"]
# Run on the head by `ray exec`: the addresses of the nodes alive in the launched cluster.
ALIVE_NODES = (
    "python -c \"import json, ray; ray.init(); print('alive nodes:', json.dumps(sorted("
    "n['NodeManagerAddress'] for n in ray.nodes() if n['Alive'])))\""
)


def _sshd_problem() -> str:
    if not SSHD.is_file():
        return f"{SSHD} is missing (Debian: apt-get install openssh-server rsync)"
    if subprocess.run(["which", "rsync"], capture_output=True).returncode != 0:
        return "rsync is missing (Debian: apt-get install rsync)"
    return ""


class SshHosts:
    """Network-namespace machines, each with an sshd on its own address and its own home
    (what `ray up` copies and sets up there), admitting one fresh key as root."""

    def __init__(self, base: Path) -> None:
        self.base, self.hosts = base, Hosts()
        self.key = base / "id_ed25519"
        for path in (base / "host_key", self.key):
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True
            )
        (base / "authorized_keys").write_text((base / "id_ed25519.pub").read_text())
        self.local_home = base / "local"  # the user's machine: the root namespace
        (self.local_home / ".ray").mkdir(parents=True)
        self.machines = []

    def add(self) -> Any:
        host = self.hosts.add()
        short = host.name.rsplit("-", 1)[1]
        home = self.base / short
        home.mkdir()
        config = self.base / f"sshd-{short}"
        config.write_text(
            "\n".join(
                [
                    f"ListenAddress {host.ip}",
                    "Port 22",
                    f"HostKey {self.base / 'host_key'}",
                    f"AuthorizedKeysFile {self.base / 'authorized_keys'}",
                    f"PidFile {self.base / f'sshd-{short}.pid'}",
                    "PermitRootLogin prohibit-password",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "UsePAM no",
                    "StrictModes no",
                ]
            )
            + "\n"
        )
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
        log = (self.base / f"sshd-{short}.log").open("w")
        # Each machine its own home, a folder of the shared disk: root's passwd entry names it
        # in the mount namespace that `ip netns exec` gives the host (sshd takes HOME from it,
        # and ssh expands ~ by it, so HOME alone is not enough).
        passwd = self.base / f"passwd-{short}"
        passwd.write_text(
            "".join(
                ":".join([*f[:5], str(home), *f[6:]]) if f[0] == "root" else ":".join(f)
                for f in (
                    line.split(":") for line in Path("/etc/passwd").read_text().splitlines(True)
                )
            )
        )
        sshd = f"mount --bind {passwd} /etc/passwd && exec {SSHD} -D -e -f {config}"
        self.hosts.popen(host, ["sh", "-c", sshd], stdout=log, stderr=subprocess.STDOUT)
        self.machines.append((host, home))
        return host, home

    def wait_for_ssh(self, host: Any) -> None:
        command = ["ssh", "-i", str(self.key), *(f"-o{o}" for o in SSH_OPTIONS), f"root@{host.ip}"]
        deadline = time.monotonic() + 60
        while subprocess.run([*command, "true"], capture_output=True).returncode != 0:
            assert time.monotonic() < deadline, f"no sshd answers on {host.ip}"
            time.sleep(0.3)

    def close(self) -> None:
        try:
            self.hosts.close()
        finally:  # ssh clients that `ray up` left in this namespace (ControlPersist masters)
            needle = str(self.key).encode()
            for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
                try:
                    if needle in cmdline.read_bytes() and alive(int(cmdline.parent.name)):
                        os.kill(int(cmdline.parent.name), signal.SIGKILL)
                except (OSError, ValueError):
                    continue


@pytest.fixture
def ssh_hosts() -> Iterator[SshHosts]:
    _hosts_or_skip()
    problem = _sshd_problem()
    if problem:
        if _required("DSANET_REQUIRE_SSHD"):
            pytest.fail(problem)
        pytest.skip(problem)
    base = Path(tempfile.mkdtemp(prefix="dsa", dir="/tmp"))
    machines = SshHosts(base)
    try:
        yield machines
    finally:
        try:
            machines.close()
        finally:
            subprocess.run(["rm", "-rf", str(base)], check=False)


def _launched_config(machines: SshHosts, name: str) -> dict:
    """tune/cluster.yaml with the test's machines, key and short Ray temp dirs: its setup runs
    this checkout's copy on each machine with this venv (instead of installing a new one), and
    its start commands name each machine's address (Ray cannot find it in a namespace without a
    default route) and leave out `ray stop` (it stops every Ray on this one real machine)."""
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    (head, _), *workers = machines.machines
    auth = [c for c in config["setup_commands"] if "RAY_AUTH_MODE" in c]
    assert auth, "tune/cluster.yaml no longer sets RAY_AUTH_MODE on the nodes"
    own_ip = "$(hostname -I)"  # the addresses of this machine's (namespace's) interfaces
    venv = PYTHON.parent.parent
    config.update(
        cluster_name=name,
        setup_commands=[
            f"echo 'source {venv}/bin/activate' >> ~/.bashrc",
            "echo 'export PYTHONPATH=~/dsanet-hpo RAY_USAGE_STATS_ENABLED=0' >> ~/.bashrc",
            # `--address auto` on the head: the launched cluster, not another Ray of this machine
            f"echo 'export RAY_ADDRESS={head.ip}:6379' >> ~/.bashrc",
            *auth,
        ],
        head_start_ray_commands=[
            c + f" --node-ip-address={head.ip} --temp-dir={machines.base}/r{i}"
            " --disable-usage-stats --object-store-memory=209715200"
            for i, c in enumerate(config["head_start_ray_commands"])
            if c.strip() != "ray stop"
        ],
        worker_start_ray_commands=[
            c + f" --node-ip-address={own_ip} --num-cpus=1 --temp-dir=$HOME/r"
            " --disable-usage-stats --object-store-memory=209715200"
            for c in config["worker_start_ray_commands"]
            if c.strip() != "ray stop"
        ],
    )
    config["provider"].update(head_ip=head.ip, worker_ips=[w.ip for w, _ in workers])
    config["auth"] = {"ssh_user": "root", "ssh_private_key": str(machines.key)}
    return config


def test_ray_up_then_ray_submit_on_three_hosts(ssh_hosts, tmp_path, xd_small):
    machines = ssh_hosts
    for _ in range(3):
        machines.add()
    for host, _ in machines.machines:
        machines.wait_for_ssh(host)
    name = f"dsanet-mh-{os.getpid()}"
    config = tmp_path / "cluster.yaml"
    config.write_text(yaml.safe_dump(_launched_config(machines, name), sort_keys=False))
    env = {
        **os.environ,
        "HOME": str(machines.local_home),
        "RAY_TMPDIR": str(machines.base / "local-ray"),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    log = tmp_path / "ray-cli.log"

    def ray_cli(*args: str, timeout: float) -> str:
        with log.open("a") as out:
            out.write(f"$ ray {' '.join(args)}\n")
            out.flush()
            done = subprocess.run(
                [str(RAY), *args],
                cwd=REPO,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=timeout,
            )
        output = log.read_text()
        assert done.returncode == 0, f"ray {args[0]}: {output[-4000:]}"
        return output

    space = tmp_path / "launched" / "space.yaml"
    space.parent.mkdir()
    tree = yaml.safe_load(DEMO_SPACE.read_text())
    del tree["synthetic"]
    tree["overrides"].update(
        {
            "data.list_dir": str(xd_small["lists"]),
            "data.feature_root": str(xd_small["features"]),
            "data.cache_dir": str(xd_small["cache"]),
            "train.max_steps_per_epoch": 2,
            "train.epochs": 2,
        }
    )
    tree.update(name="launched", scheduler={"kind": "none"}, max_concurrent=2)
    tree["mlflow"]["experiment"] = "mh-launched"
    space.write_text(yaml.safe_dump(tree, sort_keys=False))
    studies = tmp_path / "launched" / "studies"
    ray_cli("get-auth-token", "--generate", timeout=120)
    try:
        try:
            ray_cli("up", "-y", "--no-config-cache", str(config), timeout=600)
        except AssertionError:  # Ray gives a node 30 s to register: a busy machine can pass it
            ray_cli("up", "-y", "--no-config-cache", str(config), timeout=600)
        # `ray up` returns once the head runs; its autoscaler then starts every worker IP.
        workers = {host.ip: home for host, home in machines.machines[1:]}
        alive: list[str] = []
        deadline = time.monotonic() + 300
        while set(alive) != set(workers) and time.monotonic() < deadline:
            time.sleep(5)
            output = ray_cli("exec", "--no-config-cache", str(config), ALIVE_NODES, timeout=120)
            alive = json.loads(output.rsplit("alive nodes: ", 1)[1].splitlines()[0])
            alive = [ip for ip in alive if ip != machines.machines[0][0].ip]
        assert set(alive) == set(workers), (alive, workers, output[-3000:])
        output = ray_cli(
            "submit", "--no-config-cache", str(config), "tune/run.py", "--",
            "--space", str(space), "--address", "auto", "--num-samples", "2",
            "--final-seeds", "1", "--storage-path", str(studies),
            timeout=540,
        )  # fmt: skip
    finally:
        for leftover in Path(tempfile.gettempdir(), "ray").glob(f"cluster-{name}.*"):
            leftover.unlink()
    root = studies / "launched"
    trials = study_trials(root, "launched")
    assert len(trials) == 2 and all(t.state in FINISHED for t in trials), output[-3000:]
    assert "ray         auto" in output, output[-3000:]  # the driver joined the launched cluster
    nodes = {line["node"] for lines in report_lines(root).values() for line in lines}
    assert nodes and nodes <= set(workers), (nodes, workers)  # trials on launched workers
    head_home = machines.machines[0][1]
    assert (head_home / "run.py").is_file()  # what `ray submit` uploaded and ran
    token = (machines.local_home / ".ray" / "auth_token").read_text()
    for home in [head_home, *workers.values()]:  # file_mounts, setup
        assert (home / "dsanet-hpo" / "tune" / "run.py").is_file()
        assert not (home / "dsanet-hpo" / ".venv").exists()  # .gitignore filter
        assert (home / ".ray" / "auth_token").read_text() == token
        assert "export RAY_AUTH_MODE=token" in (home / ".bashrc").read_text()
    summary = json.loads((root / "final" / "summary.json").read_text())
    assert "auc" in json.dumps(summary)
    keys = sorted(r.data.tags["dsanet.run_key"] for r in mlflow_children(root))  # one run each
    finals = [k for k in keys if k.startswith("final/seed_")]
    assert len(finals) == 1 and sorted(set(keys) - set(finals)) == sorted(
        f"trial/{t.number}" for t in trials
    ), keys


# ---------------------------------------------------------------------------- leftovers


def test_closing_the_cluster_leaves_nothing(cluster_once):
    """Last: the module's cluster, after the kills above, is removed completely."""
    hosts = cluster_once.hosts
    names = [h.name for h in hosts.hosts]
    links = [h.link for h in hosts.hosts] + [hosts.bridge]
    pids = [pid for host in hosts.hosts for pid in hosts.pids(host)]
    pids += [p.pid for p in hosts.started if p.poll() is None]
    assert names and pids, "nothing was running"
    cluster_once.close()
    assert hosts.leftovers() == []
    assert not [pid for pid in pids if alive(pid)]
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not [n for n in names if n in namespaces.split()]
    shown = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    assert not [link for link in links if f" {link}:" in shown or f" {link}@" in shown]
