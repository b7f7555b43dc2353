"""Hosts for multi-host tests: network namespaces of this machine, bridged on a 198.18/15 subnet.

Each host is a network namespace with its own address (RFC 2544's benchmarking range, never
routed) on a bridge in the root namespace, so the test process reaches every host directly;
the hosts share this machine's file system, which stands in for a cluster's NFS. Names carry
this process's id (`dsa<pid><letter>-...`): parallel sessions and leftovers of a crashed one never
collide, and each session picks a /24 that no interface of the root namespace uses.

`Hosts.close()` removes everything the harness made, each by name or by pid: the processes in
its namespaces (`ip netns pids`, SIGKILL), the processes it started elsewhere (by their
Popen), the namespaces, the veth links and the bridge. It never stops a process it cannot
name by pid (no `pkill`, no `ray stop`).
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import shutil
import signal
import string
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from ray_fixtures import alive

RANGE = ipaddress.ip_network("198.18.0.0/15")


def netns_problem() -> str:
    """Why network-namespace hosts cannot be made here ("" when they can)."""
    if os.geteuid() != 0:
        return "multi-host tests need root to create network namespaces"
    if shutil.which("ip") is None:
        return "multi-host tests need `ip` (Debian: apt-get install iproute2)"
    probe = f"dsa{os.getpid()}-probe"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` fails here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], check=True)
    return ""


def ip(*args: str, ns: str | None = None) -> str:
    """Run `ip ARGS` (inside namespace `ns` if given); its stdout; raise with its stderr."""
    command = ["ip", *(("-n", ns) if ns else ()), *args]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)}: {done.stderr.strip()}")
    return done.stdout


def _free_subnet() -> ipaddress.IPv4Network:
    """A /24 of 198.18/15 that no root-namespace address or route touches, chosen by pid."""
    used = ip("-4", "route", "show") + ip("-4", "addr", "show")
    subnets = list(RANGE.subnets(new_prefix=24))
    start = os.getpid() % len(subnets)
    for step in range(len(subnets)):
        subnet = subnets[(start + step) % len(subnets)]
        if str(subnet.network_address)[: -len(".0")] + "." not in used:
            return subnet
    raise RuntimeError("every /24 of 198.18.0.0/15 is in use on this machine")


_made = itertools.count()


def _new_prefix() -> str:
    """`dsa<pid><letter>-`: this process's id, and a letter per Hosts of the process (a test
    may make its own while the module's still run). Link names stay within 15 characters."""
    return f"dsa{os.getpid()}{string.ascii_lowercase[next(_made) % 26]}-"


@dataclass
class Host:
    name: str  # the network namespace
    ip: str
    link: str  # the veth end in the root namespace, on the bridge
    up: bool = True


@dataclass
class Hosts:
    """Network-namespace hosts of one test session; `close()` removes all of them."""

    prefix: str = field(default_factory=lambda: _new_prefix())
    subnet: ipaddress.IPv4Network = field(default_factory=_free_subnet)
    hosts: list[Host] = field(default_factory=list)
    started: list[subprocess.Popen] = field(default_factory=list)
    bridge: str = ""

    def __post_init__(self) -> None:
        addresses = list(self.subnet.hosts())  # .1 for the bridge, then one per host
        self._bridge_ip = str(addresses[0])
        self._next = 1
        self._addresses = addresses

    # ------------------------------------------------------------------ making hosts

    def _make_bridge(self) -> None:
        self.bridge = f"{self.prefix}br"
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{self._bridge_ip}/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")

    def add(self) -> Host:
        """A new host: a namespace with loopback and one veth end at the next address."""
        if not self.bridge:
            self._make_bridge()
        index, address = self._next, str(self._addresses[self._next])
        self._next += 1
        host = Host(f"{self.prefix}h{index}", address, f"{self.prefix}v{index}")
        ip("netns", "add", host.name)
        self.hosts.append(host)
        ip("link", "add", host.link, "type", "veth", "peer", "name", "eth0", "netns", host.name)
        ip("link", "set", host.link, "master", self.bridge, "up")
        ip("addr", "add", f"{address}/24", "dev", "eth0", ns=host.name)
        ip("link", "set", "lo", "up", ns=host.name)
        ip("link", "set", "eth0", "up", ns=host.name)
        return host

    # ------------------------------------------------------------------ processes

    def popen(self, host: Host, argv: list[str], **kwargs) -> subprocess.Popen:
        """Start `argv` inside `host`; the harness keeps its Popen and stops it in close()."""
        proc = subprocess.Popen(["ip", "netns", "exec", host.name, *argv], **kwargs)
        self.started.append(proc)
        return proc

    def run(self, host: Host, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        """Run `argv` inside `host` to its end (e.g. `ray start`, which leaves daemons there)."""
        return subprocess.run(["ip", "netns", "exec", host.name, *argv], **kwargs)

    def pids(self, host: Host) -> list[int]:
        """The live processes in the host's namespace."""
        done = subprocess.run(["ip", "netns", "pids", host.name], capture_output=True, text=True)
        return [int(p) for p in done.stdout.split() if alive(int(p))]

    def kill(self, host: Host) -> list[int]:
        """The host dies: SIGKILL every process in its namespace, then its link goes down."""
        victims = self._kill_all(host)
        if host.up:
            ip("link", "set", host.link, "down")
            host.up = False
        return victims

    def _kill_all(self, host: Host, timeout: float = 30) -> list[int]:
        victims: list[int] = []
        deadline = time.monotonic() + timeout
        while pids := self.pids(host):  # a dying parent may still fork: repeat until none
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            victims += pids
            if time.monotonic() > deadline:
                raise RuntimeError(f"processes of {host.name} survive SIGKILL: {pids}")
            time.sleep(0.1)
        return victims

    # ------------------------------------------------------------------ removing

    def close(self) -> None:
        """Remove every process, namespace and link of this session; raise if any is left."""
        problems = []
        for host in self.hosts:
            try:
                self._kill_all(host)
            except RuntimeError as exc:
                problems.append(str(exc))
        for proc in self.started:
            if proc.poll() is None:
                proc.kill()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                problems.append(f"pid {proc.pid} ({proc.args[3:5]}) survives SIGKILL")
        for host in self.hosts:
            for command in (("link", "del", host.link), ("netns", "del", host.name)):
                try:
                    ip(*command)
                except RuntimeError as exc:
                    if "Cannot find device" not in str(exc) and "No such file" not in str(exc):
                        problems.append(str(exc))
        if self.bridge:
            try:
                ip("link", "del", self.bridge)
            except RuntimeError as exc:
                problems.append(str(exc))
        left = self.leftovers()
        self.hosts, self.bridge = [], ""  # closing again finds nothing to do
        if problems or left:
            raise RuntimeError(f"hosts not removed cleanly: {problems + left}")

    def leftovers(self) -> list[str]:
        """What of this session still exists: namespaces, links, processes (empty once closed)."""
        namespaces = [n.split()[0] for n in ip("netns", "list").splitlines() if n.strip()]
        links = [
            line.split(":")[1].strip().split("@")[0]
            for line in ip("-o", "link", "show").splitlines()
        ]
        found = [f"namespace {n}" for n in namespaces if n.startswith(self.prefix)]
        found += [f"link {n}" for n in links if n.startswith(self.prefix)]
        found += [f"pid {p.pid}" for p in self.started if alive(p.pid)]
        return found


# ---------------------------------------------------------------------------- a Ray cluster


@dataclass
class RayCluster:
    """`ray start` on network-namespace hosts: a head without CPUs, workers of 1 CPU each.

    Every Ray process runs with `env` (the test's HOME, whose ~/.ray/auth_token every node and
    the driver share, RAY_AUTH_MODE=token, PYTHONPATH of this checkout) and a short temp dir of
    its own under `base` (Ray's Unix socket paths must stay under 107 characters).
    """

    hosts: Hosts
    ray: Path
    base: Path
    env: dict[str, str]
    head: Host | None = None
    workers: list[Host] = field(default_factory=list)
    PORT = 6379  # each host has its own network stack: Ray's default port never collides

    @property
    def address(self) -> str:
        return f"{self.head.ip}:{self.PORT}"

    def _start(self, host: Host, *args: str, timeout: float = 300, tries: int = 3) -> None:
        """`ray start` on `host`. Ray gives a new node 30 s (fixed) to register with the GCS;
        on a shared, busy machine that can pass, so a failed start is cleared (every process
        in the host, its temp dir) and tried again."""
        temp = self.base / host.name.rsplit("-", 1)[1]  # /tmp/dsaXXXX/h1
        command = [
            str(self.ray), "start", "--node-ip-address", host.ip, "--temp-dir", str(temp),
            "--disable-usage-stats", "--object-store-memory", str(200 << 20), *args,
        ]  # fmt: skip
        for attempt in range(1, tries + 1):
            done = self.hosts.run(
                host, command, env=self.env, capture_output=True, text=True, timeout=timeout
            )
            if done.returncode == 0:
                return
            if attempt == tries:
                raise RuntimeError(f"ray start on {host.name} failed:\n{done.stderr[-3000:]}")
            self.hosts._kill_all(host)
            shutil.rmtree(temp, ignore_errors=True)

    def start_head(self) -> Host:
        self.head = self.hosts.add()
        self._start(
            self.head, "--head", "--port", str(self.PORT), "--num-cpus", "0", "--num-gpus", "0",
            "--include-dashboard", "false",
        )  # fmt: skip
        return self.head

    def add_workers(self, count: int) -> list[Host]:
        """`count` new worker hosts of 1 CPU each (one after the other: on 2 busy cores, side
        by side starts ran past Ray's 30 s registration limit)."""
        new = []
        for _ in range(count):
            host = self.hosts.add()
            self._start(host, "--address", self.address, "--num-cpus", "1", "--num-gpus", "0")
            self.workers.append(host)
            new.append(host)
        return new

    def live_workers(self) -> list[Host]:
        return [w for w in self.workers if w.up]

    def host_of(self, address: str) -> Host:
        (host,) = [h for h in self.hosts.hosts if h.ip == address]
        return host
