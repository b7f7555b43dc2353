"""`ray up` + `ray submit` with tune/cluster.yaml, end to end, against an sshd on 127.0.0.1.

The launched cluster is the shipped config with the test's machine in it: provider IPs, SSH
key, a setup that activates this venv instead of installing into a new one (the install is
what `pip install -e .` already did here), and head start commands without `ray stop` (which
would stop every Ray on the machine) and with a Ray temp dir of the test's own. The cluster's
processes are stopped by the test, by PID, never with `ray down`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import free_port
from ray_fixtures import REPO, descendants, mlflow_children, study_trials

SSHD = Path("/usr/sbin/sshd")
RAY = Path(sys.executable).parent / "ray"
CLUSTER_YAML = REPO / "tune" / "cluster.yaml"

pytestmark = pytest.mark.slow


def _sshd_usable() -> str:
    """Why this test cannot run here ("" when it can): sshd must run as root to log in."""
    if not SSHD.is_file():
        return f"{SSHD} is missing (Debian: apt-get install openssh-server rsync)"
    if shutil.which("rsync") is None:
        return "rsync is missing (Debian: apt-get install rsync)"
    if os.geteuid() != 0:
        return "sshd needs root to start sessions"
    return ""


@pytest.fixture(name="sshd")
def sshd_fixture() -> Iterator[dict[str, Path]]:
    """An sshd on 127.0.0.1:22 that admits one fresh key and gives sessions their own HOME."""
    problem = _sshd_usable()
    if problem:
        if os.environ.get("DSANET_REQUIRE_SSHD"):  # CI installs it: a skip would hide a break
            pytest.fail(problem)
        pytest.skip(problem)
    base = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))  # short: Ray's Unix sockets
    home, local_home = base / "home", base / "local"
    for folder in (home, local_home / ".ray"):
        folder.mkdir(parents=True)
    key = base / "id_ed25519"
    for path in (base / "host_key", key):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    (base / "authorized_keys").write_text((base / "id_ed25519.pub").read_text())
    config = base / "sshd_config"
    config.write_text(
        "\n".join(
            [
                "ListenAddress 127.0.0.1",
                "Port 22",
                f"HostKey {base / 'host_key'}",
                f"AuthorizedKeysFile {base / 'authorized_keys'}",
                f"PidFile {base / 'sshd.pid'}",
                "PermitRootLogin prohibit-password",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "UsePAM no",
                "StrictModes no",
                # Sessions see the test's HOME: ~/.bashrc, ~/run.py and ~/.ray are the test's.
                f"SetEnv HOME={home}",
            ]
        )
        + "\n"
    )
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
    log = (base / "sshd.log").open("w")
    sshd = subprocess.Popen(
        [str(SSHD), "-D", "-e", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT
    )
    try:
        _wait_for_ssh(key, sshd, base / "sshd.log")
        yield {"base": base, "home": home, "local_home": local_home, "key": key}
    finally:
        sshd.send_signal(signal.SIGTERM)
        sshd.wait(timeout=30)
        shutil.rmtree(base, ignore_errors=True)


def _wait_for_ssh(key: Path, sshd: subprocess.Popen, log: Path) -> None:
    options = ["StrictHostKeyChecking=no", "UserKnownHostsFile=/dev/null", "BatchMode=yes"]
    command = ["ssh", "-i", str(key), *(f"-o{o}" for o in options), "root@127.0.0.1", "true"]
    deadline = time.monotonic() + 30
    while subprocess.run(command, capture_output=True).returncode != 0:
        if sshd.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"sshd did not come up:\n{log.read_text()[-2000:]}")
        time.sleep(0.5)


def _test_cluster_config(sshd: dict[str, Path], name: str) -> dict:
    """tune/cluster.yaml with this machine as its only node (see the module docstring)."""
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    ray_tmp, port = sshd["base"] / "r", free_port()
    venv = Path(sys.executable).parent.parent
    auth = [c for c in config["setup_commands"] if "RAY_AUTH_MODE" in c]
    assert auth, "tune/cluster.yaml no longer sets RAY_AUTH_MODE on the nodes"
    config.update(
        cluster_name=name,
        min_workers=0,
        max_workers=0,
        # `--address auto` takes RAY_ADDRESS first: with other Rays on this machine (other
        # tests, other users), auto-detection alone could join one of them.
        setup_commands=[
            f"echo 'source {venv}/bin/activate' >> ~/.bashrc",
            f"echo 'export RAY_TMPDIR={ray_tmp} RAY_ADDRESS=127.0.0.1:{port}' >> ~/.bashrc",
            *auth,  # the shipped setting, as every node gets it
        ],
        head_start_ray_commands=[
            f"ray start --head --node-ip-address=127.0.0.1 --port={port} --num-cpus=2 "
            f"--num-gpus=0 --temp-dir={ray_tmp} --include-dashboard=false "
            "--disable-usage-stats --autoscaling-config=~/ray_bootstrap_config.yaml"
        ],
    )
    config["provider"].update(head_ip="127.0.0.1", worker_ips=[])
    config["auth"] = {"ssh_user": "root", "ssh_private_key": str(sshd["key"])}
    return config


def _ray_cli(args: list[str], sshd: dict[str, Path], log: Path, timeout: float) -> str:
    """A `ray` command run from the repository root as a user whose HOME is the test's."""
    env = {
        **os.environ,
        "HOME": str(sshd["local_home"]),
        "RAY_TMPDIR": str(sshd["base"] / "local-ray"),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    done = subprocess.run(
        [str(RAY), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    output = done.stdout + done.stderr
    log.write_text(log.read_text() + output if log.exists() else output)
    assert done.returncode == 0, f"ray {args[0]} failed ({done.returncode}):\n{output[-4000:]}"
    return output


def _stop_cluster_processes(ray_tmp: Path) -> None:
    """SIGKILL every process whose command line names the cluster's Ray temp dir."""
    needle = str(ray_tmp).encode()
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if needle in cmdline.read_bytes():
                pids.append(int(cmdline.parent.name))
        except OSError:
            continue
    for victim in {p for pid in pids for p in (pid, *descendants(pid))}:
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_ray_up_then_submit_runs_the_demo_search(sshd, tmp_path):
    name = f"dsanet-test-{os.getpid()}"
    config_path = tmp_path / "cluster.yaml"
    config_path.write_text(yaml.safe_dump(_test_cluster_config(sshd, name), sort_keys=False))
    log, studies = tmp_path / "ray-cli.log", tmp_path / "studies"
    # The token every node shares (tune/cluster.yaml copies ~/.ray/auth_token to each node).
    _ray_cli(["get-auth-token", "--generate"], sshd, log, timeout=120)
    try:
        _ray_cli(["up", "-y", "--no-config-cache", str(config_path)], sshd, log, timeout=600)
        assert (sshd["home"] / "dsanet-hpo" / "tune" / "run.py").is_file()  # file_mounts
        assert not (sshd["home"] / "dsanet-hpo" / ".venv").exists()  # .gitignore filter
        output = _ray_cli(
            [
                "submit", "--no-config-cache", str(config_path), "tune/run.py", "--",
                "--space", "demo", "--address", "auto", "--num-samples", "2",
                "--final-seeds", "1", "--storage-path", str(studies),
                "train.max_steps_per_epoch=2",
            ],
            sshd, log, timeout=900,
        )  # fmt: skip
    finally:
        _stop_cluster_processes(sshd["base"] / "r")
        for leftover in Path(tempfile.gettempdir(), "ray").glob(f"cluster-{name}.*"):
            leftover.unlink()
    root = studies / "demo"
    assert (sshd["home"] / "run.py").is_file()  # what `ray submit` uploaded and ran
    trials = study_trials(root, "demo")
    assert len(trials) == 2 and all(t.state.is_finished() for t in trials), output[-3000:]
    runs = mlflow_children(root)
    search_runs = {r.data.tags.get("dsanet.trial_id") for r in runs} - {None}
    assert search_runs == {t.user_attrs["ray_trial_id"] for t in trials}
    assert sum(r.data.tags.get("dsanet.stage") == "final" for r in runs) == 1
    summary = json.loads((root / "final" / "summary.json").read_text())
    assert "auc" in json.dumps(summary)
    # The driver joined the launched cluster instead of starting a Ray of its own.
    assert "ray         auto" in output, output[-3000:]
