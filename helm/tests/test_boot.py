"""The freshet.toml the chart renders is accepted by the real binaries, secure settings
included.

For a value set, the chart is rendered and each pod's /etc/freshet is laid out in a
temporary directory the way Kubernetes would: the `config` projected volume of the
coordinator's and of the worker's Deployment (freshet.toml from the ConfigMap, and every
Secret item at its path: TLS certificates, the tokens file of the chart's generated auth
Secret, source passwords, etcd client certificates and password). The Secrets the chart
only references are made at test time: a test CA and a certificate naming what the chart
expects (the coordinator Service, the workers' fixed name `[tls] worker_server_name`,
127.0.0.1), and passwords. Only what Kubernetes would differ in is changed, the way the
chart changes it: through FRESHET__SECTION__KEY environment variables (etcd endpoints,
listen and advertise addresses, the catalog URI, allowed prefixes), plus the table URIs
(object storage -> a temporary directory) and the /etc/freshet prefix of file paths. Then
a local etcd (with TLS and users when the rendered config asks for them), `freshet
coordinator --config F` and `freshet worker --config F` start as processes; both must
answer GET /readyz with 200 within 60 s; the admin API (over TLS, with the generated admin
token) must list the tables and the worker, refuse a call without a token, and a table
created at run time gets a cycle committed by the worker over mutual TLS.

The binaries come from <repo>/target/debug ($CARGO_TARGET_DIR/debug when set), or from
$FRESHET_BIN_DIR. Without binaries that have the `coordinator` and `worker` subcommands (or
without /usr/bin/etcd) the tests skip, unless FRESHET_BOOT_REQUIRED=1 makes that a failure.
A value set whose rendered config uses settings the binary does not know yet (`[auth]`,
`cluster.etcd_*`) skips naming them.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from conftest import NAMESPACE, RELEASE, REPO, VALUE_SETS, Helm, Rendered

BIN_DIR = Path(
    os.environ.get(
        "FRESHET_BIN_DIR",
        Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target")) / "debug",
    )
)
FRESHET = BIN_DIR / "freshet"
ETCD = Path(os.environ.get("FRESHET_ETCD", shutil.which("etcd") or "/usr/bin/etcd"))
READY_TIMEOUT_S = 60.0
# Value sets booted: the development opt-outs (plaintext, no tokens); the smallest secure
# install (TLS from a Secret, generated admin token); one with tables and S3 options;
# sources with passwords, client certificates required, and an external etcd with TLS
# client certificates and a user; cert-manager's Secrets (one per component) with the
# bundled etcd over TLS.
BOOT_SETS = ["insecure-dev", "default", "s3-secret", "sources", "bundled-etcd"]
ETCD_ROOT_PASSWORD = "root-pw-for-tests"


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


_KNOWN: dict[str, bool] = {}


def binary_knows(section: str, key: str, value: str, tmp: Path) -> bool:
    """Whether `freshet coordinator` accepts `[section] key = value` (the config is parsed
    before anything else: an unknown key fails at once naming it)."""
    cache = f"{section}.{key}"
    if cache not in _KNOWN:
        probe = tmp / f"probe-{section}-{key}.toml"
        cluster = f'etcd_endpoints = ["http://127.0.0.1:9"]\netcd_connect_timeout_ms = 200\n'
        extra = ""
        if section == "cluster":
            cluster += f"{key} = {value}\n"
        else:
            extra = f"[{section}]\n{key} = {value}\n"
        probe.write_text(f'[cluster]\n{cluster}[server]\nlisten = "127.0.0.1:0"\nhttp_listen = ""\n{extra}')
        env = {k: v for k, v in os.environ.items() if not k.startswith("FRESHET")}
        try:
            out = subprocess.run([str(FRESHET), "coordinator", "--config", str(probe)], capture_output=True, text=True, timeout=20, env=env)
            text = out.stdout + out.stderr
        except subprocess.TimeoutExpired as e:
            text = (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
        _KNOWN[cache] = not ("unknown field" in text and (f"`{key}`" in text or f"`{section}`" in text))
    return _KNOWN[cache]


def missing_features(config: dict[str, Any], tmp: Path) -> list[str]:
    """Settings of the rendered config the binary refuses as unknown."""
    missing = []
    for key in ("tokens_file", "reflection"):
        if key in config.get("auth", {}) and not binary_knows("auth", key, '""' if key == "tokens_file" else "false", tmp):
            missing.append(f"[auth] {key}")
    for key, value in config.get("cluster", {}).items():
        if key.startswith("etcd_") and key != "etcd_endpoints" and not binary_knows("cluster", key, json.dumps(value), tmp):
            missing.append(f"[cluster] {key}")
    return missing


def cli_has_token_support() -> bool:
    out = subprocess.run([str(FRESHET), "--help"], capture_output=True, text=True, timeout=30)
    return "FRESHET_TOKEN" in out.stdout + out.stderr


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------- test PKI


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def make_tls_secret(dns_names: list[str]) -> dict[str, bytes]:
    """A kubernetes.io/tls Secret's data: a fresh CA (ca.crt) and a certificate of it
    (tls.crt, tls.key) for `dns_names` and 127.0.0.1, serverAuth and clientAuth."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "freshet chart test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    sans.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_names[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=True, key_cert_sign=False, crl_sign=False,
                                     content_commitment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return {
        "ca.crt": ca.public_bytes(serialization.Encoding.PEM),
        "tls.crt": cert.public_bytes(serialization.Encoding.PEM),
        "tls.key": _pem_key(key),
    }


# ---------------------------------------------------------------- the pods' files


def referenced_secrets(rendered: Rendered) -> dict[str, dict[str, bytes]]:
    """Data of every Secret the pods mount: the chart's own (rendered), and made-up ones
    for those the values only name (TLS material from a test CA, passwords)."""
    data: dict[str, dict[str, bytes]] = {}
    for s in rendered.all("Secret"):
        data[s["metadata"]["name"]] = {k: base64.b64decode(v) for k, v in s.get("data", {}).items()}
    worker_name = rendered.toml.get("tls", {}).get("worker_server_name", "")
    coordinator_svc = rendered.get("Service", "coordinator")["metadata"]["name"]
    names = [f"{coordinator_svc}.{NAMESPACE}.svc", coordinator_svc, "localhost"] + ([worker_name] if worker_name else [])
    # One test CA for everything (like one tls.existingSecret): the etcd client Secret, too.
    tls = make_tls_secret(names)
    for dep in ("coordinator", "worker"):
        spec = rendered.get("Deployment", dep)["spec"]["template"]["spec"]
        for vol in spec["volumes"]:
            for src in vol.get("projected", {}).get("sources", []):
                if "secret" not in src or src["secret"]["name"] in data:
                    continue
                keys = [i["key"] for i in src["secret"]["items"]]
                if {"ca.crt"} <= set(keys) <= {"ca.crt", "tls.crt", "tls.key"}:
                    data[src["secret"]["name"]] = dict(tls)
                else:
                    data[src["secret"]["name"]] = {k: f"pw-{src['secret']['name']}-{k}\n".encode() for k in keys}
    return data


def lay_out_pod(rendered: Rendered, component: str, root: Path, toml_text: str, secrets: dict[str, dict[str, bytes]]) -> Path:
    """Writes the component's /etc/freshet (its `config` projected volume) under `root`,
    freshet.toml's /etc/freshet paths pointing there; returns the config file."""
    spec = rendered.get("Deployment", component)["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "config"]
    assert mount["mountPath"] == "/etc/freshet"
    (vol,) = [v for v in spec["volumes"] if v["name"] == "config"]
    base = root / "etc" / "freshet"
    for src in vol["projected"]["sources"]:
        if "configMap" in src:
            (item,) = src["configMap"]["items"]
            target = base / item["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(toml_text.replace('"/etc/freshet/', f'"{base}/'))
        else:
            for item in src["secret"]["items"]:
                target = base / item["path"]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(secrets[src["secret"]["name"]][item["key"]])
    args = container["args"]
    assert args[-2] == "--config" and args[-1].startswith("/etc/freshet/")
    return base / args[-1].removeprefix("/etc/freshet/")


# ---------------------------------------------------------------- processes


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
    name: str
    dir: Path
    env: dict[str, str]
    coordinator_grpc: int
    coordinator_http: int
    worker_grpc: int
    worker_http: int
    tables: list[str]
    scheme: str = "http"
    # The CLI's environment for the admin API (CA, client certificate, token).
    cli_env: dict[str, str] = field(default_factory=dict)
    token: str | None = None
    procs: list[Proc] = field(default_factory=list)

    def logs(self) -> str:
        return "\n".join(p.tail() for p in self.procs)

    def proc(self, name: str) -> Proc:
        return next(p for p in self.procs if p.name == name)

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> Proc:
        log = self.dir / f"{name}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=self.dir, start_new_session=True)
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def wait_http_ok(self, proc: Proc, url: str, timeout: float = READY_TIMEOUT_S, context: ssl.SSLContext | None = None) -> None:
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            if proc.popen.poll() is not None:
                pytest.fail(f"{proc.name} exited with {proc.popen.returncode} before {url} answered 200\n{self.logs()}")
            try:
                with urllib.request.urlopen(url, timeout=2, context=context) as resp:
                    if resp.status == 200:
                        return
                    last = f"HTTP {resp.status}"
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code}: {e.read()[:200]!r}"
            except (urllib.error.URLError, OSError) as e:
                last = str(e)
            time.sleep(0.25)
        pytest.fail(f"{url} not 200 within {timeout:.0f} s (last: {last})\n{self.logs()}")

    def wait_ready(self) -> None:
        self.wait_http_ok(self.proc("coordinator"), f"http://127.0.0.1:{self.coordinator_http}/readyz")
        self.wait_http_ok(self.proc("worker"), f"http://127.0.0.1:{self.worker_http}/readyz")

    def cli(self, *args: str, token: bool = True) -> subprocess.CompletedProcess[str]:
        env = {**self.env, **self.cli_env}
        if token and self.token:
            env["FRESHET_TOKEN"] = self.token
        else:
            env.pop("FRESHET_TOKEN", None)
        return subprocess.run(
            [str(FRESHET), "--endpoint", f"{self.scheme}://127.0.0.1:{self.coordinator_grpc}", *args],
            capture_output=True, text=True, timeout=60, env=env, cwd=self.dir,
        )

    def admin(self, *args: str, token: bool = True) -> subprocess.CompletedProcess[str]:
        return self.cli("admin", *args, token=token)

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


def rendered_toml(rendered: Rendered, data: Path) -> tuple[str, list[str]]:
    """The chart's freshet.toml, table URIs moved to file:// under `data`; and the table names."""
    text = rendered.toml_text
    names = []
    for table in rendered.toml.get("tables", []):
        local = (data / "lake" / table["name"]).as_uri()
        quoted = '"' + table["uri"] + '"'
        assert text.count(quoted) == 1, quoted
        text = text.replace(quoted, '"' + local + '"')
        names.append(table["name"])
    for source in rendered.toml.get("sources", []):
        for table in source["tables"]:
            quoted = '"' + table["uri"] + '"'
            text = text.replace(quoted, '"' + (data / "lake" / table["name"]).as_uri() + '"')
    return text, names


def etcd_json(url: str, path: str, body: dict[str, Any], context: ssl.SSLContext | None) -> dict[str, Any]:
    """One call of etcd's JSON gateway (/v3/...)."""
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10, context=context) as resp:
        return json.loads(resp.read() or b"{}")


def etcd_enable_auth(url: str, context: ssl.SSLContext | None, user: str, password: str) -> None:
    """etcd RBAC as an operator sets it up: root, a user with read-write on /freshet/."""
    b64 = lambda s: base64.b64encode(s.encode()).decode()  # noqa: E731
    etcd_json(url, "/v3/auth/role/add", {"name": "root"}, context)
    etcd_json(url, "/v3/auth/user/add", {"name": "root", "password": ETCD_ROOT_PASSWORD}, context)
    etcd_json(url, "/v3/auth/user/grant", {"user": "root", "role": "root"}, context)
    etcd_json(url, "/v3/auth/role/add", {"name": "freshet"}, context)
    etcd_json(url, "/v3/auth/role/grant", {"name": "freshet", "perm": {"permType": "READWRITE", "key": b64("/freshet/"), "range_end": b64("/freshet0")}}, context)
    etcd_json(url, "/v3/auth/user/add", {"name": user, "password": password}, context)
    etcd_json(url, "/v3/auth/user/grant", {"user": user, "role": "freshet"}, context)
    etcd_json(url, "/v3/auth/enable", {}, context)


@pytest.fixture(scope="module", params=BOOT_SETS)
def cluster(request: pytest.FixtureRequest, h: Helm, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    reason = unavailable_reason()
    if reason:
        if os.environ.get("FRESHET_BOOT_REQUIRED") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    work = tmp_path_factory.mktemp(f"boot-{request.param}")
    rendered = h.render(VALUE_SETS[request.param])
    config = rendered.toml
    missing = missing_features(config, work)
    if missing:
        pytest.skip(f"the binary does not accept {', '.join(missing)} yet (the chart renders them for value set {request.param})")
    text, tables = rendered_toml(rendered, work)
    secrets = referenced_secrets(rendered)
    tls = config.get("tls", {})
    scheme = "https" if tls else "http"
    etcd_client, etcd_peer = free_port(), free_port()
    etcd_tls = bool(config["cluster"].get("etcd_ca_file"))
    etcd_scheme = "https" if etcd_tls else "http"
    c = Cluster(request.param, work, {}, free_port(), free_port(), free_port(), free_port(), tables, scheme=scheme)
    # What the chart's pods get from Kubernetes, here on loopback.
    c.env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("FRESHET") and not k.startswith("AWS_")},
        "FRESHET__CLUSTER__ETCD_ENDPOINTS": f'["{etcd_scheme}://127.0.0.1:{etcd_client}"]',
        "FRESHET__CATALOG__URI": (work / "catalog").as_uri(),
        "FRESHET__STORAGE__ALLOWED_PREFIXES": json.dumps([(work / "lake").as_uri()]),
        "FRESHET__SERVER__LISTEN": f"127.0.0.1:{c.coordinator_grpc}",
        "FRESHET__SERVER__HTTP_LISTEN": f"127.0.0.1:{c.coordinator_http}",
        "FRESHET__SERVER__ADVERTISE": f"{scheme}://127.0.0.1:{c.coordinator_grpc}",
        "FRESHET__WORKER__LISTEN": f"127.0.0.1:{c.worker_grpc}",
        "FRESHET__WORKER__HTTP_LISTEN": f"127.0.0.1:{c.worker_http}",
        "FRESHET__WORKER__ADVERTISE": f"{scheme}://127.0.0.1:{c.worker_grpc}",
        "FRESHET__WORKER__SHUTDOWN_GRACE_MS": "5000",
        "RUST_LOG": os.environ.get("RUST_LOG", "info"),
    }
    configs = {comp: lay_out_pod(rendered, comp, work / comp, text, secrets) for comp in ("coordinator", "worker")}
    pod = work / "coordinator" / "etc" / "freshet"
    if tls:
        c.cli_env["FRESHET_TLS_CA"] = str(pod / "tls" / "ca.crt")
        if tls.get("require_client_cert"):
            c.cli_env["FRESHET_TLS_CERT"] = str(pod / "tls" / "tls.crt")
            c.cli_env["FRESHET_TLS_KEY"] = str(pod / "tls" / "tls.key")
    if "auth" in config:
        auth = rendered.find("Secret", "auth")
        assert auth is not None, "auth without the chart's Secret: the boot test needs the generated admin token"
        c.token = base64.b64decode(auth["data"]["admin-token"]).decode()
    try:
        etcd_args = [
            str(ETCD), "--name", "boot", "--data-dir", str(work / "etcd"),
            "--listen-client-urls", f"{etcd_scheme}://127.0.0.1:{etcd_client}",
            "--advertise-client-urls", f"{etcd_scheme}://127.0.0.1:{etcd_client}",
            "--listen-peer-urls", f"http://127.0.0.1:{etcd_peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{etcd_peer}",
            "--initial-cluster", f"boot=http://127.0.0.1:{etcd_peer}",
            "--listen-metrics-urls", f"http://127.0.0.1:{free_port()}",
        ]
        context = None
        if etcd_tls:
            # etcd's server certificate from the same test CA as the etcd client Secret.
            etcd_dir = work / "etcd-tls"
            etcd_dir.mkdir()
            ca = Path(config["cluster"]["etcd_ca_file"].replace("/etc/freshet/", f"{pod}/"))
            (etcd_dir / "ca.crt").write_bytes(ca.read_bytes())
            server = next(d for d in secrets.values() if d.get("ca.crt") == ca.read_bytes())
            (etcd_dir / "tls.crt").write_bytes(server["tls.crt"])
            (etcd_dir / "tls.key").write_bytes(server["tls.key"])
            etcd_args += ["--cert-file", str(etcd_dir / "tls.crt"), "--key-file", str(etcd_dir / "tls.key"), "--trusted-ca-file", str(etcd_dir / "ca.crt")]
            context = ssl.create_default_context(cafile=str(etcd_dir / "ca.crt"))
            if config["cluster"].get("etcd_cert_file"):
                etcd_args.append("--client-cert-auth")
                context.load_cert_chain(str(etcd_dir / "tls.crt"), str(etcd_dir / "tls.key"))
        etcd = c.start("etcd", etcd_args)
        etcd_url = f"{etcd_scheme}://127.0.0.1:{etcd_client}"
        c.wait_http_ok(etcd, f"{etcd_url}/health", timeout=30, context=context)
        if config["cluster"].get("etcd_user"):
            password_file = Path(config["cluster"]["etcd_password_file"].replace("/etc/freshet/", f"{pod}/"))
            etcd_enable_auth(etcd_url, context, config["cluster"]["etcd_user"], password_file.read_text().rstrip("\n"))
        c.start("coordinator", [str(FRESHET), "coordinator", "--config", str(configs["coordinator"])], env=c.env)
        c.start("worker", [str(FRESHET), "worker", "--config", str(configs["worker"])], env=c.env)
        yield c
    finally:
        c.stop()


def test_coordinator_and_worker_become_ready(cluster: Cluster) -> None:
    cluster.wait_ready()
    for proc, port in ((cluster.proc("coordinator"), cluster.coordinator_http), (cluster.proc("worker"), cluster.worker_http)):
        cluster.wait_http_ok(proc, f"http://127.0.0.1:{port}/livez", timeout=5)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            assert resp.status == 200


def _need_token_cli(cluster: Cluster) -> None:
    if cluster.token and not cli_has_token_support():
        pytest.skip("the freshet CLI has no FRESHET_TOKEN yet: the admin API of a release with auth cannot be called")


def test_admin_api_lists_tables_and_the_worker(cluster: Cluster) -> None:
    cluster.wait_ready()
    _need_token_cli(cluster)
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


def test_secure_sets_refuse_calls_without_token_or_tls(cluster: Cluster) -> None:
    cluster.wait_ready()
    if cluster.scheme == "http":
        pytest.skip(f"value set {cluster.name} opts out of TLS and tokens")
    # Plaintext to a TLS port fails.
    plain = subprocess.run(
        [str(FRESHET), "--endpoint", f"http://127.0.0.1:{cluster.coordinator_grpc}", "admin", "tables"],
        capture_output=True, text=True, timeout=60, env={**cluster.env, "FRESHET_TOKEN": cluster.token or ""}, cwd=cluster.dir,
    )
    assert plain.returncode != 0, plain.stdout
    if cluster.token:
        _need_token_cli(cluster)
        refused = cluster.admin("tables", token=False)
        assert refused.returncode != 0, f"admin call without a token succeeded:\n{refused.stdout}"
        # UNAUTHENTICATED ("... does not have valid authentication credentials").
        assert "authentication" in refused.stderr or "nauthenticated" in refused.stderr, refused.stderr
        # A wrong token is refused too.
        env = {**cluster.env, **cluster.cli_env, "FRESHET_TOKEN": "not-the-token"}
        wrong = subprocess.run(
            [str(FRESHET), "--endpoint", f"https://127.0.0.1:{cluster.coordinator_grpc}", "admin", "tables"],
            capture_output=True, text=True, timeout=60, env=env, cwd=cluster.dir,
        )
        assert wrong.returncode != 0, f"admin call with a wrong token succeeded:\n{wrong.stdout}"


def test_a_cycle_runs_on_the_worker(cluster: Cluster) -> None:
    """A table created at run time (admin token) gets rows ingested and a cycle committed:
    the coordinator reached the worker (over mutual TLS, verifying worker_server_name)."""
    cluster.wait_ready()
    _need_token_cli(cluster)
    deadline = time.monotonic() + 30
    while str(cluster.worker_grpc) not in cluster.admin("workers").stdout and time.monotonic() < deadline:
        time.sleep(0.5)
    schema = cluster.dir / "kv.schema.json"
    schema.write_text(json.dumps({"fields": [{"name": "k", "type": "string", "nullable": False}, {"name": "v", "type": "int64", "nullable": True}]}))
    created = cluster.cli("table", "create", "boot_kv", "--uri", (cluster.dir / "lake" / "boot_kv").as_uri(), "--schema", str(schema), "--primary-key", "k")
    assert created.returncode == 0, f"{created.stdout}\n{created.stderr}\n{cluster.logs()}"
    rows = cluster.dir / "rows.ndjson"
    rows.write_text("".join(json.dumps({"k": f"key{i}", "v": i}) + "\n" for i in range(10)))
    ingested = cluster.cli("ingest", "--table", "boot_kv", str(rows))
    assert ingested.returncode == 0, f"{ingested.stdout}\n{ingested.stderr}\n{cluster.logs()}"
    deadline = time.monotonic() + 60
    cycles: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        out = cluster.admin("cycles", "--table", "boot_kv", "-o", "json")
        if out.returncode == 0:
            cycles = json.loads(out.stdout or "[]")
            if any(c["state"] == "committed" and c["changes"] >= 10 for c in cycles):
                return
        time.sleep(0.5)
    pytest.fail(f"no committed cycle of boot_kv within 60 s: {cycles}\n{cluster.logs()}")


def test_sigterm_stops_worker_and_coordinator(cluster: Cluster) -> None:
    cluster.wait_http_ok(cluster.proc("coordinator"), f"http://127.0.0.1:{cluster.coordinator_http}/readyz")
    codes = cluster.stop()
    logs = cluster.logs()
    assert codes["worker"] is not None, f"worker ignored SIGTERM for 20 s\n{logs}"
    assert codes["coordinator"] is not None, f"coordinator ignored SIGTERM for 20 s\n{logs}"
    assert codes["worker"] == 0, f"worker exit code {codes['worker']} after SIGTERM\n{logs}"


def test_boot_sets_cover_the_secure_defaults(h: Helm) -> None:
    """The booted sets include TLS with tokens, client certificates, sources and etcd TLS."""
    configs = {name: h.render(VALUE_SETS[name]).toml for name in BOOT_SETS}
    assert "tls" not in configs["insecure-dev"] and "auth" not in configs["insecure-dev"]
    assert configs["default"]["tls"]["worker_server_name"] == f"{RELEASE}-freshet-worker"
    assert configs["default"]["auth"]["tokens_file"] == "/etc/freshet/auth/tokens.toml"
    assert configs["sources"]["tls"]["require_client_cert"] is True
    assert configs["sources"]["sources"] and configs["sources"]["secrets"]
    assert configs["sources"]["cluster"]["etcd_user"] and configs["sources"]["cluster"]["etcd_cert_file"]
    assert configs["bundled-etcd"]["cluster"]["etcd_cert_file"] == configs["bundled-etcd"]["tls"]["cert_file"]
