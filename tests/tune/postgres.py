"""A throw-away PostgreSQL server for MLflow's backend store (tests and bench/bench_scale.py).

Debian's PostgreSQL binaries (`/usr/lib/postgresql/<version>/bin`) refuse to run as root, so as root
the server runs as the `postgres` user (`runuser -u postgres --`); as any other user it runs as
that user. Its data folder and socket folder are new temporary folders, it listens on 127.0.0.1
on a free port with trust authentication (nothing else can reach it), and `stop()` ends it by
the PID in its `postmaster.pid` and removes both folders.

    with Postgres() as pg:
        uri = pg.create_database("mlflow")  # postgresql+psycopg2://postgres@127.0.0.1:PORT/mlflow
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def _binaries() -> Path:
    """DSANET_PG_BIN, else Debian's newest /usr/lib/postgresql/<version>/bin."""
    if os.environ.get("DSANET_PG_BIN"):
        return Path(os.environ["DSANET_PG_BIN"])
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    return found[-1] if found else Path("/usr/lib/postgresql/15/bin")


BIN = _binaries()
START_TIMEOUT_S = 120.0


class PostgresUnavailable(RuntimeError):
    """PostgreSQL cannot be started here; the message says why in one line."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def unavailable() -> str:
    """'' if a server can be started here, else why not (one line)."""
    missing = [name for name in ("initdb", "postgres", "createdb") if not (BIN / name).is_file()]
    if missing:
        names = ", ".join(missing)
        return f"PostgreSQL's {names} not found in {BIN} (apt-get install postgresql)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root, and there is no postgres user to run PostgreSQL as"
        if not shutil.which("runuser"):
            return "running as root, and runuser (util-linux) is missing"
    try:
        import psycopg2  # noqa: F401  (MLflow's driver for postgresql:// URIs)
    except ImportError:
        return "the psycopg2 driver is not installed (pip install psycopg2-binary)"
    return ""


class Postgres:
    """One PostgreSQL server: `start()`, `create_database(name)`, `stop()`; a context manager."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or _free_port()
        self.root: Path | None = None
        self.pid: int | None = None

    # ------------------------------------------------------------------ public
    def __enter__(self) -> Postgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> Postgres:
        problem = unavailable()
        if problem:
            raise PostgresUnavailable(problem)
        # Under /tmp: the socket path must stay short, and the postgres user must reach it.
        self.root = Path(tempfile.mkdtemp(prefix="pg", dir="/tmp"))
        self.data, self.sockets = self.root / "data", self.root / "run"
        self.data.mkdir()
        self.sockets.mkdir()
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            for path in (self.root, self.data, self.sockets):
                os.chown(path, user.pw_uid, user.pw_gid)
        self.log = self.root / "server.log"
        try:
            self._run("initdb", "-D", str(self.data), "--auth=trust", "-U", "postgres",
                      "--encoding=UTF8", "--no-sync")  # fmt: skip
            self._launch()
        except BaseException:
            self.stop()
            raise
        return self

    def create_database(self, name: str) -> str:
        """Create database `name`; its SQLAlchemy URI (MLflow's --backend-store-uri)."""
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", name)
        return self.uri(name)

    def uri(self, name: str) -> str:
        # SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3; MLflow is tested with psycopg2.
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        """A fast shutdown (SIGINT to the postmaster's PID), then remove its folders."""
        self._signal(signal.SIGINT, wait_s=60)
        if self.pid is not None and _alive(self.pid):
            self._signal(signal.SIGKILL, wait_s=30)
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def size_bytes(self, database: str) -> int:
        """The on-disk size of `database` (pg_database_size)."""
        import psycopg2

        dsn = f"host=127.0.0.1 port={self.port} user=postgres dbname={database}"
        with psycopg2.connect(dsn) as conn, conn.cursor() as cursor:
            cursor.execute("SELECT pg_database_size(%s)", (database,))
            return int(cursor.fetchone()[0])

    # ------------------------------------------------------------------ internals
    def _command(self, name: str, *args: str) -> list[str]:
        command = [str(BIN / name), *args]
        return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command

    def _run(self, name: str, *args: str) -> None:
        done = subprocess.run(
            self._command(name, *args), capture_output=True, text=True, timeout=300, cwd="/"
        )
        if done.returncode != 0:
            raise PostgresUnavailable(f"{name} failed ({done.returncode}): {done.stderr[-500:]}")

    def _launch(self) -> None:
        """Start the postmaster (its own process, not a daemon) and wait until it accepts."""
        options = ["-D", str(self.data), "-p", str(self.port), "-h", "127.0.0.1",
                   "-k", str(self.sockets), "-c", "fsync=off",
                   "-c", "max_connections=200"]  # fmt: skip
        with open(self.log, "a") as logfile:
            process = subprocess.Popen(
                self._command("postgres", *options),
                stdout=logfile,
                stderr=subprocess.STDOUT,
                cwd="/",
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise PostgresUnavailable(f"postgres exited: {self.log.read_text()[-800:]}")
            pid_file = self.data / "postmaster.pid"
            if pid_file.is_file():
                lines = pid_file.read_text().splitlines()
                # The 8th line says "ready" once the server accepts connections.
                if len(lines) >= 8 and lines[7].strip() == "ready":
                    self.pid = int(lines[0])
                    self._process = process
                    return
            time.sleep(0.1)
        process.kill()
        raise PostgresUnavailable(f"postgres did not start in {START_TIMEOUT_S:.0f} s")

    def _signal(self, sig: int, wait_s: float) -> None:
        if self.pid is None or not _alive(self.pid):
            return
        os.kill(self.pid, sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and _alive(self.pid):
            time.sleep(0.05)
        process = getattr(self, "_process", None)
        if process is not None:  # runuser, or the postmaster itself: reap it
            try:
                process.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped) counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
