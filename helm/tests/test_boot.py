"""The freshet.toml the chart renders is accepted by the real binaries.

For a value set, the chart's ConfigMap is rendered and its freshet.toml written to a
file; only what Kubernetes would differ in is changed, the way the chart changes it:
through FRESHET__SECTION__KEY environment variables (etcd endpoints, listen and advertise
addresses, the catalog URI), plus the table URIs (object storage -> a temporary
directory), which have no variable. Then a local etcd, `freshet coordinator --config F`
and `freshet worker --config F` start as processes, and both must answer
GET /readyz with 200 within 60 s; the admin API must list the tables and the worker.

The binaries come from <repo>/target/debug ($CARGO_TARGET_DIR/debug when set), or from
$FRESHET_BIN_DIR. Without binaries
that have the `coordinator` and `worker` subcommands (or without /usr/bin/etcd) the tests
skip, unless FRESHET_BOOT_REQUIRED=1 makes that a failure.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from conftest import REPO, VALUE_SETS, Helm

BIN_DIR = Path(
    os.environ.get(
        "FRESHET_BIN_DIR",
        Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target")) / "debug",
    )
)
FRESHET = BIN_DIR / "freshet"
ETCD = Path(os.environ.get("FRESHET_ETCD", shutil.which("etcd") or "/usr/bin/etcd"))
READY_TIMEOUT_S = 60.0
# Value sets booted: the smallest install, and one with tables and S3 options.
BOOT_SETS = ["default", "s3-secret"]


def unavailable_reason() -> str | None:
    if not FRESHET.exists():
        return f"{FRESHET} does not exist (build with `cargo build --bins`, or set FRESHET_BIN_DIR)"
    for sub in ("coordinator", "worker"):
        try:
            probe = subprocess.run([str(FRESHET), sub, "--help"], capture_output=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"`{FRESHET} {sub} --help` failed: {e}"
        if probe.returncode != 0:
            return f"`{FRESHET} {sub} --help` exited {probe.returncode}: the binary has no `{sub}` subcommand yet"
    if not ETCD.exists():
        return f"no etcd binary at {ETCD} (apt-get install etcd-server, or set FRESHET_ETCD)"
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def tail(self, lines: int = 60) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return f"----- {self.name} (exit {self.popen.poll()}) log tail -----\n" + "\n".join(text.splitlines()[-lines:])


@dataclass
class Cluster:
    dir: Path
    config: Path
    env: dict[str, str]
    coordinator_grpc: int
    coordinator_http: int
    worker_grpc: int
    worker_http: int
    tables: list[str]
    procs: list[Proc] = field(default_factory=list)

    def logs(self) -> str:
        return "\n".join(p.tail() for p in self.procs)

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> Proc:
        log = self.dir / f"{name}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=self.dir, start_new_session=True)
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def wait_http_ok(self, proc: Proc, url: str, timeout: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            if proc.popen.poll() is not None:
                pytest.fail(f"{proc.name} exited with {proc.popen.returncode} before {url} answered 200\n{self.logs()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status == 200:
                        return
                    last = f"HTTP {resp.status}"
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code}: {e.read()[:200]!r}"
            except (urllib.error.URLError, OSError) as e:
                last = str(e)
            time.sleep(0.25)
        pytest.fail(f"{url} not 200 within {timeout:.0f} s (last: {last})\n{self.logs()}")

    def admin(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(FRESHET), "--endpoint", f"http://127.0.0.1:{self.coordinator_grpc}", "admin", *args],
            capture_output=True, text=True, timeout=30, env=self.env,
        )

    def stop(self) -> dict[str, int | None]:
        """SIGTERM in reverse start order (worker, coordinator, etcd); the exit codes."""
        codes: dict[str, int | None] = {}
        for proc in reversed(self.procs):
            if proc.popen.poll() is None:
                proc.popen.send_signal(signal.SIGTERM)
                try:
                    proc.popen.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.popen.pid, signal.SIGKILL)
                    proc.popen.wait(timeout=10)
                    codes[proc.name] = None
                    continue
            codes[proc.name] = proc.popen.returncode
        return codes


def rendered_toml(h: Helm, values: dict[str, Any], data: Path) -> tuple[str, list[str]]:
    """The chart's freshet.toml, table URIs moved to file:// under `data`; and the table names."""
    rendered = h.render(values)
    text = rendered.toml_text
    names = []
    for table in rendered.toml.get("tables", []):
        local = (data / "lake" / table["name"]).as_uri()
        quoted = '"' + table["uri"] + '"'
        assert text.count(quoted) == 1, quoted
        text = text.replace(quoted, '"' + local + '"')
        names.append(table["name"])
    return text, names


@pytest.fixture(scope="module", params=BOOT_SETS)
def cluster(request: pytest.FixtureRequest, h: Helm, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    reason = unavailable_reason()
    if reason:
        if os.environ.get("FRESHET_BOOT_REQUIRED") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    work = tmp_path_factory.mktemp(f"boot-{request.param}")
    text, tables = rendered_toml(h, VALUE_SETS[request.param], work)
    config = work / "freshet.toml"
    config.write_text(text)
    etcd_client, etcd_peer = free_port(), free_port()
    c = Cluster(work, config, {}, free_port(), free_port(), free_port(), free_port(), tables)
    # What the chart's pods get from Kubernetes, here on loopback.
    c.env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("FRESHET__") and not k.startswith("AWS_")},
        "FRESHET__CLUSTER__ETCD_ENDPOINTS": f'["http://127.0.0.1:{etcd_client}"]',
        "FRESHET__CATALOG__URI": (work / "catalog").as_uri(),
        "FRESHET__SERVER__LISTEN": f"127.0.0.1:{c.coordinator_grpc}",
        "FRESHET__SERVER__HTTP_LISTEN": f"127.0.0.1:{c.coordinator_http}",
        "FRESHET__SERVER__ADVERTISE": f"http://127.0.0.1:{c.coordinator_grpc}",
        "FRESHET__WORKER__LISTEN": f"127.0.0.1:{c.worker_grpc}",
        "FRESHET__WORKER__HTTP_LISTEN": f"127.0.0.1:{c.worker_http}",
        "FRESHET__WORKER__ADVERTISE": f"http://127.0.0.1:{c.worker_grpc}",
        "FRESHET__WORKER__SHUTDOWN_GRACE_MS": "5000",
        "RUST_LOG": os.environ.get("RUST_LOG", "info"),
    }
    try:
        etcd = c.start("etcd", [
            str(ETCD), "--name", "boot", "--data-dir", str(work / "etcd"),
            "--listen-client-urls", f"http://127.0.0.1:{etcd_client}",
            "--advertise-client-urls", f"http://127.0.0.1:{etcd_client}",
            "--listen-peer-urls", f"http://127.0.0.1:{etcd_peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{etcd_peer}",
            "--initial-cluster", f"boot=http://127.0.0.1:{etcd_peer}",
        ])
        c.wait_http_ok(etcd, f"http://127.0.0.1:{etcd_client}/health", timeout=30)
        c.start("coordinator", [str(FRESHET), "coordinator", "--config", str(config)], env=c.env)
        c.start("worker", [str(FRESHET), "worker", "--config", str(config)], env=c.env)
        yield c
    finally:
        c.stop()


def test_coordinator_and_worker_become_ready(cluster: Cluster) -> None:
    coordinator = next(p for p in cluster.procs if p.name == "coordinator")
    worker = next(p for p in cluster.procs if p.name == "worker")
    cluster.wait_http_ok(coordinator, f"http://127.0.0.1:{cluster.coordinator_http}/readyz")
    cluster.wait_http_ok(worker, f"http://127.0.0.1:{cluster.worker_http}/readyz")
    for proc, port in ((coordinator, cluster.coordinator_http), (worker, cluster.worker_http)):
        cluster.wait_http_ok(proc, f"http://127.0.0.1:{port}/livez", timeout=5)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            assert resp.status == 200


def test_admin_api_lists_tables_and_the_worker(cluster: Cluster) -> None:
    coordinator = next(p for p in cluster.procs if p.name == "coordinator")
    cluster.wait_http_ok(coordinator, f"http://127.0.0.1:{cluster.coordinator_http}/readyz")
    tables = cluster.admin("tables")
    assert tables.returncode == 0, f"{tables.stdout}\n{tables.stderr}\n{cluster.logs()}"
    for name in cluster.tables:
        assert name in tables.stdout, f"table {name} missing from `admin tables`:\n{tables.stdout}"
    # The worker registers in etcd; the coordinator lists it by its advertise URL.
    deadline = time.monotonic() + 30
    workers = cluster.admin("workers")
    while str(cluster.worker_grpc) not in workers.stdout and time.monotonic() < deadline:
        time.sleep(0.5)
        workers = cluster.admin("workers")
    assert str(cluster.worker_grpc) in workers.stdout, f"worker not listed:\n{workers.stdout}\n{workers.stderr}\n{cluster.logs()}"


def test_sigterm_stops_worker_and_coordinator(cluster: Cluster) -> None:
    coordinator = next(p for p in cluster.procs if p.name == "coordinator")
    cluster.wait_http_ok(coordinator, f"http://127.0.0.1:{cluster.coordinator_http}/readyz")
    codes = cluster.stop()
    logs = cluster.logs()
    assert codes["worker"] is not None, f"worker ignored SIGTERM for 20 s\n{logs}"
    assert codes["coordinator"] is not None, f"coordinator ignored SIGTERM for 20 s\n{logs}"
    assert codes["worker"] == 0, f"worker exit code {codes['worker']} after SIGTERM\n{logs}"
