//! The process harness: a real etcd (Debian's `etcd-server`, temporary data dir, free
//! loopback ports) and coordinators and workers as processes of the built `freshet`
//! binary, each logging to its own file. Processes are killed by pid; on a failing test
//! the last lines of every log are printed and the directory is kept.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use freshet_common::schema::SchemaSpec;
use freshet_common::table::TableConfig;
use freshet_proto::admin::v1::admin_service_client::AdminServiceClient;
use freshet_proto::admin::v1::{CreateTableRequest, GetLeaderRequest, ListWorkersRequest};
use freshet_proto::ingest::v1::IngestRequest;
use freshet_proto::ingest::v1::ingest_service_client::IngestServiceClient;
use tonic::transport::Channel;

use crate::freshet_bin;

/// A free loopback port (bound and released; good enough for tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process with its log.
pub struct Proc {
    /// A name for messages.
    pub name: String,
    /// Its log file (stdout and stderr).
    pub log: PathBuf,
    child: Child,
}

impl Proc {
    /// Starts `cmd` logging to `log`; with `append` the log is continued (a restart), not
    /// truncated.
    fn spawn_log(name: &str, cmd: &mut Command, log: PathBuf, append: bool) -> Proc {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(&log)
            .unwrap();
        let child = cmd
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc {
            name: name.into(),
            log,
            child,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.pid().to_string()])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "kill {sig} {} ({}) failed", self.pid(), self.name);
    }

    /// SIGKILL, and reap.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGSTOP: the process freezes (a long GC pause, a stalled VM).
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT.
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    /// SIGTERM (graceful stop).
    pub fn term(&self) {
        self.signal("-TERM");
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// The exit status when the process has exited (reaped), else None; never waits.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running etcd.
pub struct Etcd {
    /// `http://127.0.0.1:port` (`https://` when secure).
    pub endpoint: String,
    proc: Proc,
    dir: PathBuf,
    client: u16,
    peer: u16,
    secure: Option<(EtcdSecurity, u16)>,
}

/// The password of etcd's `root` user in a secure etcd with auth enabled.
pub const ETCD_ROOT_PASSWORD: &str = "root-secret";

/// TLS and authentication of a secure etcd ([`Etcd::start_secure`]).
#[derive(Debug, Clone)]
pub struct EtcdSecurity {
    /// CA bundle: etcd verifies client certificates with it (`--trusted-ca-file`).
    pub ca_file: PathBuf,
    /// etcd's server certificate (for 127.0.0.1) and key; the harness also presents it as
    /// its own client certificate while it sets up users.
    pub cert_file: PathBuf,
    /// Key of `cert_file`.
    pub key_file: PathBuf,
    /// `--client-cert-auth`: clients without a certificate of `ca_file` are refused.
    pub client_cert_auth: bool,
    /// A user (name, password) granted readwrite on the prefix `/freshet/` (role
    /// `freshet`); with it, a `root` user ([`ETCD_ROOT_PASSWORD`]) is made and auth enabled.
    pub user: Option<(String, String)>,
    /// `--auth-token-ttl` in seconds: how long etcd's simple tokens live *without use*
    /// (etcd's default is 300; each use extends them).
    pub auth_token_ttl_s: Option<u64>,
    /// JWT tokens (`--auth-token jwt,...,sign-method=ES256,ttl=<n>s`, key pair made in the
    /// data directory's parent) that expire `n` seconds after issue, used or not.
    pub jwt_ttl_s: Option<u64>,
}

impl Etcd {
    /// Starts etcd with its data under `dir`; waits until it reports healthy.
    pub fn start(dir: &Path) -> Etcd {
        let (client, peer) = (free_port(), free_port());
        let proc = Self::spawn_on(dir, client, peer, None, false);
        Etcd {
            endpoint: format!("http://127.0.0.1:{client}"),
            proc,
            dir: dir.to_path_buf(),
            client,
            peer,
            secure: None,
        }
    }

    /// Starts etcd serving clients over TLS only (`https://127.0.0.1:port`), health on a
    /// plaintext metrics port; with `security.user`, makes the users and role and enables
    /// auth before returning.
    pub fn start_secure(dir: &Path, security: EtcdSecurity) -> Etcd {
        let (client, peer, metrics) = (free_port(), free_port(), free_port());
        let proc = Self::spawn_on(dir, client, peer, Some((&security, metrics)), false);
        let endpoint = format!("https://127.0.0.1:{client}");
        if let Some((user, password)) = security.user.clone() {
            let (ep, sec) = (endpoint.clone(), security.clone());
            let setup = std::thread::spawn(move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap()
                    .block_on(enable_auth(&ep, &sec, &user, &password))
            })
            .join()
            .unwrap();
            if let Err(e) = setup {
                panic!("etcd auth setup failed: {e}\n{}", proc.log_text());
            }
        }
        Etcd {
            endpoint,
            proc,
            dir: dir.to_path_buf(),
            client,
            peer,
            secure: Some((security, metrics)),
        }
    }

    /// SIGKILL (and reap) the etcd process; its data directory stays.
    pub fn kill9(&mut self) {
        self.proc.kill9();
    }

    /// Starts etcd again on the same data directory and ports (after [`Etcd::kill9`]; the
    /// log is continued); waits until it reports healthy.
    pub fn restart(&mut self) {
        self.proc.kill9();
        let secure = self.secure.as_ref().map(|(s, m)| (s, *m));
        self.proc = Self::spawn_on(&self.dir, self.client, self.peer, secure, true);
    }

    /// The etcd process id.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// The etcd log so far.
    pub fn log_text(&self) -> String {
        self.proc.log_text()
    }

    fn spawn_on(
        dir: &Path,
        client: u16,
        peer: u16,
        secure: Option<(&EtcdSecurity, u16)>,
        append: bool,
    ) -> Proc {
        let bin = which("etcd")
            .expect("etcd is not installed: `apt-get install -y etcd-server` (.ci/run does this)");
        let scheme = if secure.is_some() { "https" } else { "http" };
        let endpoint = format!("{scheme}://127.0.0.1:{client}");
        let mut cmd = Command::new(bin);
        cmd.args([
            "--name",
            "test",
            "--data-dir",
            &dir.join("etcd-data").display().to_string(),
            "--listen-client-urls",
            &endpoint,
            "--advertise-client-urls",
            &endpoint,
            "--listen-peer-urls",
            &format!("http://127.0.0.1:{peer}"),
            "--initial-advertise-peer-urls",
            &format!("http://127.0.0.1:{peer}"),
            "--initial-cluster",
            &format!("test=http://127.0.0.1:{peer}"),
        ]);
        // Health of a secure etcd is asked on a plaintext metrics port.
        let health_port = match secure {
            None => client,
            Some((s, metrics)) => {
                cmd.args([
                    "--cert-file",
                    &s.cert_file.display().to_string(),
                    "--key-file",
                    &s.key_file.display().to_string(),
                    "--trusted-ca-file",
                    &s.ca_file.display().to_string(),
                    "--listen-metrics-urls",
                    &format!("http://127.0.0.1:{metrics}"),
                ]);
                if s.client_cert_auth {
                    cmd.arg("--client-cert-auth");
                }
                if let Some(ttl) = s.auth_token_ttl_s {
                    cmd.arg(format!("--auth-token-ttl={ttl}"));
                }
                if let Some(ttl) = s.jwt_ttl_s {
                    let (private, public) = (dir.join("jwt-key.pem"), dir.join("jwt-pub.pem"));
                    if !private.exists() {
                        let key = rcgen::KeyPair::generate().unwrap();
                        std::fs::write(&private, key.serialize_pem()).unwrap();
                        std::fs::write(&public, key.public_key_pem()).unwrap();
                    }
                    cmd.arg(format!(
                        "--auth-token=jwt,pub-key={},priv-key={},sign-method=ES256,ttl={ttl}s",
                        public.display(),
                        private.display()
                    ));
                }
                metrics
            }
        };
        let proc = Proc::spawn_log("etcd", &mut cmd, dir.join("etcd.log"), append);
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            if http_get(health_port, "/health").is_some_and(|b| b.contains("true")) {
                break;
            }
            assert!(
                Instant::now() < end,
                "etcd did not become healthy:\n{}",
                proc.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        proc
    }
}

/// A client of a secure etcd as the harness (its certificate; `user` when auth is on).
pub async fn etcd_admin_client(
    endpoint: &str,
    security: &EtcdSecurity,
    user: Option<(&str, &str)>,
) -> Result<etcd_client::Client, etcd_client::Error> {
    use etcd_client::{Certificate, ConnectOptions, Identity, TlsOptions};
    let read = |p: &Path| std::fs::read(p).unwrap();
    let tls = TlsOptions::new()
        .ca_certificate(Certificate::from_pem(read(&security.ca_file)))
        .identity(Identity::from_pem(
            read(&security.cert_file),
            read(&security.key_file),
        ));
    let mut options = ConnectOptions::new()
        .with_tls(tls)
        .with_connect_timeout(Duration::from_secs(5))
        .with_timeout(Duration::from_secs(10));
    if let Some((u, p)) = user {
        options = options.with_user(u, p);
    }
    etcd_client::Client::connect([endpoint], Some(options)).await
}

/// Makes `root` (root role), the role `freshet` (readwrite on `/freshet/`), `user` with that
/// role, and enables auth.
async fn enable_auth(
    endpoint: &str,
    security: &EtcdSecurity,
    user: &str,
    password: &str,
) -> Result<(), etcd_client::Error> {
    use etcd_client::Permission;
    let mut c = etcd_admin_client(endpoint, security, None).await?;
    c.user_add("root", ETCD_ROOT_PASSWORD, None).await?;
    c.user_grant_role("root", "root").await?;
    c.role_add("freshet").await?;
    c.role_grant_permission("freshet", Permission::read_write("/freshet/").with_prefix())
        .await?;
    c.user_add(user, password, None).await?;
    c.user_grant_role(user, "freshet").await?;
    c.auth_enable().await?;
    Ok(())
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists())
}

/// A plain HTTP/1.0 GET on loopback; the body when the status is 200.
pub fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(
        &format!("127.0.0.1:{port}").parse().unwrap(),
        Duration::from_secs(1),
    )
    .ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200")
        .then(|| body.to_string())
        .or_else(|| head.starts_with("HTTP/1.0 200").then(|| body.to_string()))
}

/// One coordinator or worker process and its addresses.
pub struct Node {
    /// The process.
    pub proc: Proc,
    /// gRPC URL.
    pub endpoint: String,
    /// HTTP port of `/metrics`, `/readyz`.
    pub http_port: u16,
    role: String,
    env: Vec<(String, String)>,
}

/// Etcd, coordinators and workers as processes, sharing one config file.
pub struct ProcCluster {
    /// The temporary directory (data, catalog, logs).
    pub dir: PathBuf,
    /// etcd.
    pub etcd: Etcd,
    /// The shared configuration file.
    pub config: PathBuf,
    /// Coordinators (killed ones stay in place).
    pub coordinators: Vec<Node>,
    /// Workers (killed ones stay in place).
    pub workers: Vec<Node>,
    _tmp: Option<tempfile::TempDir>,
}

impl ProcCluster {
    /// Starts etcd; writes the config (cluster, catalog, plus `extra` TOML). No processes yet.
    pub fn new(extra: &str) -> ProcCluster {
        Self::with_etcd(extra, |dir| (Etcd::start(dir), String::new()))
    }

    /// [`ProcCluster::new`] with the etcd `start` makes in the cluster's directory (say
    /// [`Etcd::start_secure`]) and the extra `[cluster]` lines it returns (say
    /// `etcd_ca_file = ...`).
    pub fn with_etcd(extra: &str, start: impl FnOnce(&Path) -> (Etcd, String)) -> ProcCluster {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let (etcd, cluster_lines) = start(&dir);
        let config = dir.join("freshet.toml");
        std::fs::write(
            &config,
            format!(
                "[cluster]\nname = \"test\"\netcd_endpoints = [\"{}\"]\nlease_ttl_s = 3\n{cluster_lines}\n[catalog]\nuri = \"{}\"\n\n{extra}\n",
                etcd.endpoint,
                dir.join("catalog").display()
            ),
        )
        .unwrap();
        ProcCluster {
            dir,
            etcd,
            config,
            coordinators: Vec::new(),
            workers: Vec::new(),
            _tmp: Some(tmp),
        }
    }

    fn spawn(&self, role: &str, name: &str, env: &[(&str, &str)]) -> Node {
        let (grpc, http) = (free_port(), free_port());
        self.spawn_on(role, name, &self.config, &[], env, (grpc, http), false)
    }

    /// Starts `role` as `name` with config file `config`, extra flags `args` and extra
    /// environment, on the given (gRPC, HTTP) ports; `append` continues an existing log.
    #[allow(clippy::too_many_arguments)]
    fn spawn_on(
        &self,
        role: &str,
        name: &str,
        config: &Path,
        args: &[&str],
        env: &[(&str, &str)],
        (grpc, http): (u16, u16),
        append: bool,
    ) -> Node {
        let mut cmd = Command::new(freshet_bin());
        cmd.args([
            role,
            "--config",
            &config.display().to_string(),
            "--listen",
            &format!("127.0.0.1:{grpc}"),
            "--http-listen",
            &format!("127.0.0.1:{http}"),
        ])
        .args(args)
        .env("RUST_LOG", "info,deltalake_core=off,buoyant_kernel=off")
        .env("FRESHET_NODE_ID", name)
        .env_remove("RUST_BACKTRACE");
        for (k, v) in env {
            cmd.env(k, v);
        }
        if role == "worker" {
            cmd.env("FRESHET__WORKER__ID", name);
        }
        let proc = Proc::spawn_log(name, &mut cmd, self.dir.join(format!("{name}.log")), append);
        Node {
            proc,
            endpoint: format!("http://127.0.0.1:{grpc}"),
            http_port: http,
            role: role.to_string(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    /// Starts a coordinator; returns its index.
    pub fn add_coordinator(&mut self) -> usize {
        let name = format!("coordinator-{}", self.coordinators.len());
        let n = self.spawn("coordinator", &name, &[]);
        self.coordinators.push(n);
        self.coordinators.len() - 1
    }

    /// Starts a worker with extra environment; returns its index.
    pub fn add_worker(&mut self, env: &[(&str, &str)]) -> usize {
        let name = format!("worker-{}", self.workers.len());
        let n = self.spawn("worker", &name, env);
        self.workers.push(n);
        self.workers.len() - 1
    }

    /// Starts a coordinator with its own config file, extra flags (say
    /// `--allow-fault-injection`) and extra environment; returns its index.
    pub fn add_coordinator_with(
        &mut self,
        config: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> usize {
        let name = format!("coordinator-{}", self.coordinators.len());
        let ports = (free_port(), free_port());
        let n = self.spawn_on("coordinator", &name, config, args, env, ports, false);
        self.coordinators.push(n);
        self.coordinators.len() - 1
    }

    /// Starts a worker with its own config file, extra flags and extra environment; returns
    /// its index.
    pub fn add_worker_with(&mut self, config: &Path, args: &[&str], env: &[(&str, &str)]) -> usize {
        let name = format!("worker-{}", self.workers.len());
        let ports = (free_port(), free_port());
        let n = self.spawn_on("worker", &name, config, args, env, ports, false);
        self.workers.push(n);
        self.workers.len() - 1
    }

    /// Kills coordinator `i` (SIGKILL, when still running) and starts it again under the
    /// same name, on the same ports, with its original environment, config file `config`
    /// and flags `args`; its log is continued.
    pub fn restart_coordinator(&mut self, i: usize, config: &Path, args: &[&str]) {
        self.coordinators[i].proc.kill9();
        let node = self.respawn(&self.coordinators[i], config, args);
        self.coordinators[i] = node;
    }

    /// [`ProcCluster::restart_coordinator`] for worker `i`.
    pub fn restart_worker(&mut self, i: usize, config: &Path, args: &[&str]) {
        self.workers[i].proc.kill9();
        let node = self.respawn(&self.workers[i], config, args);
        self.workers[i] = node;
    }

    /// Starts a killed (and reaped) node again on its ports.
    fn respawn(&self, old: &Node, config: &Path, args: &[&str]) -> Node {
        let grpc: u16 = old
            .endpoint
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("endpoint port");
        let env: Vec<(&str, &str)> = old
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        self.spawn_on(
            &old.role,
            &old.proc.name,
            config,
            args,
            &env,
            (grpc, old.http_port),
            true,
        )
    }

    /// Waits until a process's `/readyz` answers 200.
    pub fn wait_ready(&self, node: &Node, timeout: Duration) {
        let end = Instant::now() + timeout;
        while http_get(node.http_port, "/readyz").is_none() {
            assert!(
                Instant::now() < end,
                "{} not ready within {timeout:?}:\n{}",
                node.proc.name,
                node.proc.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// An admin client of coordinator `i`.
    pub async fn admin(&self, i: usize) -> AdminServiceClient<Channel> {
        AdminServiceClient::connect(self.coordinators[i].endpoint.clone())
            .await
            .unwrap()
    }

    /// Waits until one of the live coordinators (not in `exclude`) says it leads.
    pub async fn wait_leader(&self, exclude: &[usize], timeout: Duration) -> usize {
        let end = Instant::now() + timeout;
        loop {
            for (i, c) in self.coordinators.iter().enumerate() {
                if exclude.contains(&i) {
                    continue;
                }
                if let Ok(mut a) = AdminServiceClient::connect(c.endpoint.clone()).await {
                    if let Ok(r) = a.get_leader(GetLeaderRequest {}).await {
                        let r = r.into_inner();
                        if r.is_leader {
                            // Elected and done recovering: admin calls answer.
                            if a.list_tables(freshet_proto::admin::v1::ListTablesRequest {})
                                .await
                                .is_ok()
                            {
                                return i;
                            }
                        }
                    }
                }
            }
            assert!(Instant::now() < end, "no leader within {timeout:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the leader lists exactly `n` workers; returns their addresses.
    pub async fn wait_workers(&self, leader: usize, n: usize, timeout: Duration) -> Vec<String> {
        let end = Instant::now() + timeout;
        loop {
            if let Ok(r) = self
                .admin(leader)
                .await
                .list_workers(ListWorkersRequest {})
                .await
            {
                let w: Vec<String> = r
                    .into_inner()
                    .workers
                    .into_iter()
                    .map(|w| w.address)
                    .collect();
                if w.len() == n {
                    return w;
                }
            }
            assert!(
                Instant::now() < end,
                "the leader did not list {n} workers within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Creates a test table through the leader.
    pub async fn create_table(&self, leader: usize, cfg: &TableConfig) {
        let def = cfg.to_def().unwrap();
        self.admin(leader)
            .await
            .create_table(CreateTableRequest {
                name: cfg.name.clone(),
                uri: cfg.uri.clone(),
                schema_json: SchemaSpec::from_arrow(&def.schema).to_json(),
                primary_key: cfg.primary_key.clone(),
                partition_by: cfg.partition_by.clone(),
                target_file_size: cfg.target_file_size.unwrap_or(0),
                merge_mode: Default::default(),
            })
            .await
            .unwrap();
    }

    /// Sends a batch until some coordinator acknowledges it, following leader hints and
    /// trying every coordinator in turn; returns the acknowledged sequence.
    pub async fn ingest_acked(&self, req: &IngestRequest, timeout: Duration) -> u64 {
        let end = Instant::now() + timeout;
        let mut i = 0usize;
        loop {
            let ep = self.coordinators[i % self.coordinators.len()]
                .endpoint
                .clone();
            let r = async {
                let mut c = IngestServiceClient::connect(ep)
                    .await
                    .map_err(|e| e.to_string())?;
                c.ingest(req.clone())
                    .await
                    .map_err(|s| s.message().to_string())
            };
            match tokio::time::timeout(Duration::from_secs(10), r).await {
                Ok(Ok(resp)) => return resp.into_inner().sequence,
                _ => i += 1,
            }
            assert!(
                Instant::now() < end,
                "batch not acknowledged within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Keeps the directory and logs for inspection.
    pub fn keep(&mut self) -> PathBuf {
        if let Some(t) = self._tmp.take() {
            let _ = t.keep();
        }
        self.dir.clone()
    }
}

impl Drop for ProcCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let dir = self.keep();
            eprintln!("==== test failed; logs kept in {}", dir.display());
            for n in self.coordinators.iter().chain(&self.workers) {
                let log = n.proc.log_text();
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                eprintln!("---- {} (last {} lines)", n.proc.name, tail.len());
                for l in tail.iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
        let _ = &self.etcd.proc;
    }
}
