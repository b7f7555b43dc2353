"""The MLflow UI of a finished study, as a user sees it: headless Chromium on a real server.

A small real study (`tune/run.py`: 2 trials, ASHA, 1 final seed) tracked by a real
`mlflow server` (SQLite store) is browsed there, starting from the link the driver prints.
Chromium is driven over its DevTools protocol (a minimal WebSocket client below, standard
library only): the test waits until the React app has rendered its data, reads the page's
text, clicks where a user would, and saves screenshots.

Screenshots go to $DSANET_SCREENSHOTS when it is set, else to the test's tmp_path (kept when a
test fails). Chromium is Debian's `chromium` package; without it the tests skip, unless
DSANET_REQUIRE_CHROMIUM is set (CI installs it: a skip there would hide a break).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import MlflowServer
from mlflow import MlflowClient
from mlflow.entities import Run
from ray_fixtures import (
    alive,
    descendants,
    kill_study,
    load_study,
    start_study,
    tiny_overrides,
    write_space,
)

from tune.tracking import UI_VIEW

pytestmark = pytest.mark.slow

TRIALS = 2  # trial-0 and trial-1: one complete, one ASHA stops at its first rung
WAIT_S = 60.0  # for the app to render its data; a few seconds on an idle machine
STUDY_TIMEOUT_S = 600
BODY = "(document.body ? document.body.innerText : '')"  # the page's text, '' while it loads
# The run names in the runs table, top to bottom, and a click on a row's expand button.
TABLE_TEXT = (
    "[...document.querySelectorAll('.ag-center-cols-container [role=row], "
    ".ag-pinned-left-cols-container [role=row]')].sort((a, b) => a.getBoundingClientRect().top"
    " - b.getBoundingClientRect().top).map(r => r.querySelector('a[href*=\"/runs/\"]'))"
    ".filter(Boolean).map(a => a.innerText.trim()).join('\\n')"
)
GENAI_ONLY = ("Sessions", "Judges", "Evaluation runs", "Token Usage", "Training runs")
EXPAND = (
    "[...document.querySelectorAll('[role=row]')].find(r => [...r.querySelectorAll('a')]"
    ".some(a => a.innerText.trim() === NAME)).querySelector('button').click()"
)


# ---------------------------------------------------------------------------- DevTools


class DevTools:
    """One page of a headless Chromium, over the DevTools protocol's WebSocket."""

    def __init__(self, ws_url: str) -> None:
        url = urllib.parse.urlparse(ws_url)
        self.sock = socket.create_connection((url.hostname, url.port), timeout=60)
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET {url.path} HTTP/1.1\r\nHost: {url.netloc}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        )
        self.sock.sendall(f"{request}\r\n".encode())
        self.buffer = b""
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += self._read()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        if b" 101 " not in head.split(b"\r\n")[0]:
            raise ConnectionError(f"DevTools refused the WebSocket: {head[:200]!r}")
        self.calls = 0

    def _read(self) -> bytes:
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            raise ConnectionError("Chromium closed the DevTools connection")
        return chunk

    def _take(self, n: int) -> bytes:
        while len(self.buffer) < n:
            self.buffer += self._read()
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def _send(self, text: str) -> None:  # one masked text frame, as a client must send
        data, mask = text.encode(), os.urandom(4)
        n = len(data)
        size = bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + n.to_bytes(2, "big")
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
        self.sock.sendall(b"\x81" + size + mask + masked)

    def _message(self) -> dict:
        payload = b""
        while True:
            first, second = self._take(2)
            n = second & 0x7F
            if n >= 126:
                n = int.from_bytes(self._take(2 if n == 126 else 8), "big")
            payload += self._take(n)
            if first & 0x80:  # FIN: the message is whole (the server never masks)
                return json.loads(payload)

    def call(self, method: str, **params: object) -> dict:
        self.calls += 1
        self._send(json.dumps({"id": self.calls, "method": method, "params": params}))
        while True:
            message = self._message()
            if message.get("id") == self.calls:  # events in between are dropped
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def js(self, expression: str) -> object:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def text(self) -> str:
        return self.js(BODY) or ""

    def wait_for(self, expression: str, what: str, timeout: float = WAIT_S) -> None:
        """Poll a JavaScript condition; fail naming `what` and the page's text."""
        deadline = time.monotonic() + timeout
        while not self.js(f"Boolean({expression})"):
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} after {timeout:.0f} s; page text:\n{self.text()}")
            time.sleep(0.25)

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        self.sock.close()


def chromium_binary() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    return None


@pytest.fixture(scope="module")
def chromium() -> str:
    """Chromium's path; a skip (before the study runs) when it is missing, a failure in CI."""
    binary = chromium_binary()
    if binary is None:
        problem = "chromium is missing (Debian: apt-get install chromium)"
        if os.environ.get("DSANET_REQUIRE_CHROMIUM"):  # CI installs it
            pytest.fail(problem)
        pytest.skip(problem)
    return binary


@pytest.fixture(scope="module")
def browser(chromium: str) -> Iterator[DevTools]:
    """Headless Chromium with a fresh profile and a 1600x1000 viewport, writing only in a
    temporary folder; stopped by its PID, and its helpers by theirs."""
    profile = Path(tempfile.mkdtemp(prefix="dsanet-chromium-"))
    command = [
        chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--no-first-run", "--no-default-browser-check", "--disable-extensions",
        f"--user-data-dir={profile}", "--remote-debugging-port=0",
        "--remote-debugging-address=127.0.0.1", "--window-size=1600,1000", "about:blank",
    ]  # fmt: skip
    log = (profile / "chromium.log").open("w")
    # Chromium keeps crash reports and settings under $HOME whatever --user-data-dir says.
    env = {**os.environ, "HOME": str(profile), "XDG_CONFIG_HOME": str(profile / "config"),
           "XDG_CACHE_HOME": str(profile / "cache")}  # fmt: skip
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    page = None
    try:
        port_file, deadline = profile / "DevToolsActivePort", time.monotonic() + 60
        while not port_file.is_file() or not port_file.read_text().strip():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"chromium did not start:\n{Path(log.name).read_text()[-2000:]}")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as answer:
            (target,) = [t for t in json.load(answer) if t["type"] == "page"]
        page = DevTools(target["webSocketDebuggerUrl"])
        page.call("Page.enable")
        page.call("Emulation.setDeviceMetricsOverride", width=1600, height=1000,
                  deviceScaleFactor=1, mobile=False)  # fmt: skip
        yield page
    finally:
        if page is not None:
            page.close()
        stop_with_children(process)
        log.close()
        shutil.rmtree(profile, ignore_errors=True)


def stop_with_children(process: subprocess.Popen) -> None:
    """SIGTERM to Chromium (it ends its own helpers), then SIGKILL to any helper left, by PID."""
    family = descendants(process.pid)
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)
    deadline = time.monotonic() + 10
    while (living := [pid for pid in family if alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in living:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# ---------------------------------------------------------------------------- the study


@dataclass
class ServedStudy:
    server: MlflowServer
    root: Path  # the study folder
    link: str  # what the driver printed to browse the study
    experiment_id: str
    parent: Run
    trials: list[Run]  # nested runs of the search, by Optuna number
    finals: list[Run]  # nested runs of the final stage
    best_trial: int  # Optuna's best trial number

    def url(self, route: str) -> str:
        """A page of the experiment, in the view the printed link asks for."""
        return f"{self.server.uri}/#/experiments/{self.experiment_id}{route}{UI_VIEW}"


@pytest.fixture(scope="module")
def study(chromium, tmp_path_factory, xd_small) -> Iterator[ServedStudy]:
    """A finished small study, tracked by a real `mlflow server`, as `tune/run.py` runs it:
    2 trials of 2 epochs (ASHA stops one at epoch 1), then 1 final seed."""
    folder = tmp_path_factory.mktemp("ui-study")
    server = MlflowServer(folder / "mlflow-server").start()
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # Unix sockets: a short path
    try:
        epochs = 2
        space = write_space(
            folder,
            xd_small,
            overrides=tiny_overrides(xd_small, **{"train.epochs": epochs}),
            scheduler={"kind": "asha", "max_t": epochs, "grace_period": 1, "reduction_factor": 2},
            num_samples=TRIALS,
            max_concurrent=TRIALS,
            mlflow={"tracking_uri": server.uri, "experiment": "ui-check"},
        )
        log = folder / "study.log"
        proc = start_study(["--space", str(space), "--final-seeds", "1"], log, ray_tmp)
        try:
            status = proc.wait(timeout=STUDY_TIMEOUT_S)
        except subprocess.TimeoutExpired as late:
            kill_study(proc)
            tail = log.read_text()[-3000:]
            raise AssertionError(f"the study ran past {STUDY_TIMEOUT_S} s:\n{tail}") from late
        output = log.read_text()
        assert status == 0, f"the study failed ({status}):\n{output[-3000:]}"
        links = re.findall(r"browse the study with: (\S+)", output)
        assert links, f"the driver printed no link to the study:\n{output[-3000:]}"

        root = folder / "studies" / "t"
        client = MlflowClient(server.uri)
        (experiment,) = [e for e in client.search_experiments() if e.name == "ui-check"]
        runs = client.search_runs([experiment.experiment_id], max_results=100)
        (parent,) = [r for r in runs if r.data.tags.get("dsanet.run_key") == "study"]
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        trials = sorted(
            (r for r in children if r.data.tags["dsanet.run_key"].startswith("trial/")),
            key=lambda r: int(r.data.tags["dsanet.run_key"].split("/")[1]),
        )
        finals = [r for r in children if r.data.tags.get("dsanet.stage") == "final"]
        best = load_study(root).best_trial.number
        assert len(trials) == TRIALS and len(finals) == 1, [r.info.run_name for r in children]
        yield ServedStudy(server, root, links[-1], experiment.experiment_id, parent, trials,
                          finals, best)  # fmt: skip
    finally:
        server.stop()
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    """Where screenshots go: $DSANET_SCREENSHOTS, else a pytest temporary folder."""
    chosen = os.environ.get("DSANET_SCREENSHOTS")
    folder = Path(chosen) if chosen else tmp_path_factory.mktemp("screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def visit(page: DevTools, url: str, ready: str, what: str) -> str:
    """Open `url` and wait until the JavaScript condition `ready` holds; the page's text."""
    page.open("about:blank")  # a hash change alone would keep the previous page's state
    page.open(url)
    page.wait_for(ready, what)
    time.sleep(1.0)  # let the last fetches paint before a screenshot
    return page.text()


def includes(*texts: str) -> str:
    """JavaScript: the page's text holds every one of `texts`."""
    return " && ".join(f"{BODY}.includes({json.dumps(t)})" for t in texts)


# ---------------------------------------------------------------------------- the checks


def test_the_printed_link_opens_the_model_training_view(study, browser, shots):
    """The link the driver prints opens the model-training view: its runs table, with the
    sidebar of that view (Runs, Models, Model registry). MLflow 3's default is the GenAI view:
    an overview of traces, token usage and cost, and a sidebar of GenAI pages (Sessions,
    Judges, ...), where the runs table is a "Training runs" page."""
    runs = f"document.title.startsWith('Runs - ') && {includes(study.parent.info.run_name)}"
    ready = f"({runs}) || document.title.startsWith('Overview - ') && {includes('Token Usage')}"
    lines = visit(browser, study.link, ready, "experiment page").splitlines()
    shot = browser.screenshot(shots / "experiment.png")
    href, heading = browser.js("location.href"), browser.js("document.title")
    print(f"experiment page: {href} ({heading}); screenshot {shot}")
    genai = [item for item in GENAI_ONLY if item in lines]
    assert heading.startswith("Runs - ") and not genai and "Model registry" in lines, (
        f"the printed link {study.link} opened {heading!r} at {href}, in the GenAI view "
        f"(sidebar: {', '.join(genai)}), not the model-training view's runs table. MLflow "
        "3.17.2 picks the view from the UI's workflow type (?workflowType=machine_learning in "
        "the link, or the GenAI / Model training switch in the sidebar), not from the "
        f"experiment's mlflow.experimentKind tag; screenshot {shot}"
    )
    assert "Runs" in lines and study.parent.info.run_name in lines


def test_the_runs_table_nests_the_trials_under_the_study(study, browser, shots):
    parent = study.parent.info.run_name
    children = [r.info.run_name for r in study.trials + study.finals]
    assert parent == f"study-{study.root.name}"
    for n, run in enumerate(study.trials):  # a pruned trial's name says so: "trial-1 (pruned@1)"
        assert re.fullmatch(rf"trial-{n}( \(pruned@\d+\))?", run.info.run_name), run.info.run_name
    visit(browser, study.url("/runs"), includes(parent, "matching runs"), "runs table")
    assert browser.js(TABLE_TEXT).split("\n") == [parent], "the nested runs should start collapsed"
    browser.js(EXPAND.replace("NAME", json.dumps(parent)))
    browser.wait_for(" && ".join(f"{TABLE_TEXT}.includes({json.dumps(c)})" for c in children),
                     "nested runs after expanding the study's row")  # fmt: skip
    time.sleep(1.0)
    shot = browser.screenshot(shots / "runs-expanded.png")
    print(f"runs table: {browser.js('location.href')}; screenshot {shot}")
    rows = browser.js(TABLE_TEXT).split("\n")
    assert rows[0] == parent and sorted(rows[1:]) == sorted(children), rows


def test_the_study_run_shows_its_trials_and_the_best_trial(study, browser, shots):
    parent = study.parent.info
    children = [r.info.run_name for r in study.trials + study.finals]
    text = visit(browser, study.url(f"/runs/{parent.run_id}"),
                 includes(parent.run_name, "Child runs", "dsanet.run_key", *children),
                 "the study's run page with its child runs and tags")  # fmt: skip
    shot = browser.screenshot(shots / "parent-run.png")
    print(f"study run page: {browser.js('location.href')}; screenshot {shot}")
    assert "Finished" in text and "dsanet.study" in text
    found = re.search(r"dsanet\.best_trial\s*:\s*(\S+)", text)
    assert found, (
        "the study's run page shows no dsanet.best_trial tag (expected the Optuna number "
        f"{study.best_trial}); screenshot {shot}"
    )
    assert found.group(1) == str(study.best_trial), (
        f"dsanet.best_trial shows {found.group(1)!r}, Optuna's best trial is {study.best_trial}"
    )
