//! A throwaway PostgreSQL 15 cluster for tests: `initdb` into a temporary directory (as the
//! `postgres` user when the tests run as root, since initdb refuses root), started on a
//! free loopback port with `wal_level=logical`, stopped and removed on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::procs::free_port;

/// Held by the tests that each start a PostgreSQL server and a cluster, so they run one at a
/// time (the machine has two cores); shared because they live in one test binary.
pub static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A running PostgreSQL server.
pub struct Postgres {
    /// The port on 127.0.0.1.
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    bin: PathBuf,
    /// Settings beyond the defaults (`-c name=value`), from [`PgOptions`].
    settings: Vec<String>,
}

/// How [`Postgres::start_with`] sets a server up beyond [`Postgres::start`].
#[derive(Default)]
pub struct PgOptions {
    /// `ssl = on` with this certificate and key (PEM), e.g. from
    /// [`crate::ca::Ca::leaf_for`]; written as `server.crt` / `server.key` (mode 0600).
    pub ssl: Option<(String, String)>,
    /// `pg_hba.conf` host lines, replacing initdb's (which trust everything); the server
    /// keeps trusting Unix-socket connections. psql (the harness's SQL) connects over TCP
    /// as `postgres` with libpq's default `sslmode=prefer`, so a line must let it in.
    pub hba: Vec<String>,
    /// More settings, `name=value`.
    pub settings: Vec<String>,
}

fn pg_bin() -> PathBuf {
    for v in ["17", "16", "15"] {
        let p = PathBuf::from(format!("/usr/lib/postgresql/{v}/bin"));
        if p.join("initdb").exists() {
            return p;
        }
    }
    panic!("PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin")
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn as_postgres(bin: &Path, args: &[&str]) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin).args(args);
        c
    } else {
        let mut c = Command::new(bin);
        c.args(args);
        c
    }
}

impl Postgres {
    /// Initialises and starts a server; waits until it accepts connections.
    pub fn start() -> Postgres {
        Postgres::start_with(PgOptions::default())
    }

    /// [`Postgres::start`] with TLS, client authentication rules or other settings.
    pub fn start_with(options: PgOptions) -> Postgres {
        let bin = pg_bin();
        let dir = tempfile::Builder::new()
            .prefix("freshet-pg")
            .tempdir()
            .unwrap();
        let data = dir.path().join("data");
        if is_root() {
            let ok = Command::new("chown")
                .args(["-R", "postgres", &dir.path().display().to_string()])
                .status()
                .unwrap()
                .success();
            assert!(ok, "chown of the PostgreSQL directory failed");
        }
        let data_s = data.display().to_string();
        let out = as_postgres(
            &bin.join("initdb"),
            &[
                "-D",
                &data_s,
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        )
        .output()
        .unwrap();
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut settings = options.settings;
        let mut own = Vec::new();
        if let Some((cert, key)) = &options.ssl {
            let (c, k) = (dir.path().join("server.crt"), dir.path().join("server.key"));
            std::fs::write(&c, cert).unwrap();
            std::fs::write(&k, key).unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o600)).unwrap();
            settings.push("ssl=on".into());
            settings.push(format!("ssl_cert_file={}", c.display()));
            settings.push(format!("ssl_key_file={}", k.display()));
            own.extend([c, k]);
        }
        if !options.hba.is_empty() {
            let hba = data.join("pg_hba.conf");
            let mut text = "local all all trust\nlocal replication all trust\n".to_string();
            for line in &options.hba {
                text.push_str(line);
                text.push('\n');
            }
            std::fs::write(&hba, text).unwrap();
            own.push(hba);
        }
        if is_root() {
            for f in &own {
                let ok = Command::new("chown")
                    .args(["postgres", &f.display().to_string()])
                    .status()
                    .unwrap()
                    .success();
                assert!(ok, "chown of {} failed", f.display());
            }
        }
        let mut pg = Postgres {
            port: free_port(),
            dir,
            child: None,
            bin,
            settings,
        };
        pg.run_server();
        pg
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Starts the server process on the data directory and port; waits until it accepts
    /// connections.
    fn run_server(&mut self) {
        let data_s = self.data_dir().display().to_string();
        let log = self.dir.path().join("postgres.log");
        let sock = self.dir.path().display().to_string();
        let port_s = self.port.to_string();
        let mut args: Vec<String> = Vec::new();
        for s in &self.settings {
            args.extend(["-c".to_string(), s.clone()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let child = as_postgres(
            &self.bin.join("postgres"),
            &[
                &args[..],
                &[
                    "-D",
                    &data_s,
                    "-p",
                    &port_s,
                    "-c",
                    "listen_addresses=127.0.0.1",
                    "-c",
                    &format!("unix_socket_directories={sock}"),
                    "-c",
                    "wal_level=logical",
                    "-c",
                    "max_replication_slots=10",
                    "-c",
                    "max_wal_senders=10",
                    "-c",
                    "fsync=off",
                    "-c",
                    "synchronous_commit=off",
                ],
            ]
            .concat(),
        )
        .stdout(Stdio::null())
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)
                .unwrap(),
        )
        .spawn()
        .unwrap();
        self.child = Some(child);
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            let ok = Command::new(self.bin.join("pg_isready"))
                .args(["-h", "127.0.0.1", "-p", &port_s, "-U", "postgres"])
                .stdout(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok {
                break;
            }
            assert!(
                Instant::now() < end,
                "PostgreSQL did not start:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops the server (fast shutdown, so the data directory is cleanly shut down).
    fn stop_server(&mut self) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        // The child may be `runuser`, which does not pass SIGINT on: pg_ctl signals the
        // postmaster itself and waits until it is gone.
        let data_s = self.data_dir().display().to_string();
        let _ = as_postgres(
            &self.bin.join("pg_ctl"),
            &["stop", "-D", &data_s, "-m", "fast", "-w", "-t", "30"],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            if let Ok(Some(_)) = c.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
    }

    /// Moves the server's next transaction id to `epoch:xid` (64-bit `epoch << 32 | xid`)
    /// with `pg_resetwal -e -x`, so a test can reach an xid wraparound quickly. Every
    /// existing row is frozen first (a jump of more than 2^31 xids would otherwise make
    /// rows written since initdb look like they are from the future), the server is
    /// stopped, the `pg_xact` and `pg_subtrans` segments that `xid` falls in are created
    /// (zero-filled, as the pg_resetwal documentation asks), and the server is started
    /// again on the same port. Call it before any slot exists.
    pub fn set_next_xid(&mut self, epoch: u32, xid: u32) {
        for db in ["template1", "postgres"] {
            run_sql_in(&self.bin.join("psql"), self.port, db, "VACUUM FREEZE");
        }
        self.stop_server();
        let data = self.data_dir();
        // pg_xact: 2 bits per xid, 32 pages of 8 KiB per segment; pg_subtrans: 4 bytes per xid.
        for (sub, per_segment) in [("pg_xact", 32 * 8192 * 4), ("pg_subtrans", 32 * 8192 / 4)] {
            let file = data.join(sub).join(format!("{:04X}", xid / per_segment));
            if !file.exists() {
                std::fs::write(&file, vec![0u8; 32 * 8192]).unwrap();
                if is_root() {
                    let ok = Command::new("chown")
                        .args(["postgres", &file.display().to_string()])
                        .status()
                        .unwrap()
                        .success();
                    assert!(ok, "chown of {} failed", file.display());
                }
            }
        }
        let data_s = data.display().to_string();
        let out = as_postgres(
            &self.bin.join("pg_resetwal"),
            &[
                "-e",
                &epoch.to_string(),
                "-x",
                &xid.to_string(),
                "-D",
                &data_s,
            ],
        )
        .output()
        .unwrap();
        assert!(
            out.status.success(),
            "pg_resetwal failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        self.run_server();
    }

    /// Makes commits that ask for synchronous replication (`synchronous_commit = on`; the
    /// server's default here is `off`) wait for a standby that never connects: such a
    /// transaction writes its commit record and then hangs, still running (in the proc
    /// array, invisible to new snapshots), until [`Postgres::release_held_commits`].
    pub fn hold_synchronous_commits(&self) {
        self.psql("ALTER SYSTEM SET synchronous_standby_names = 'freshet_absent_standby'");
        self.psql("SELECT pg_reload_conf()");
    }

    /// Runs `sql` in its own session with `synchronous_commit = on`, on a thread (it hangs
    /// while commits are held); the thread returns psql's output.
    pub fn spawn_synchronous(&self, sql: &str) -> std::thread::JoinHandle<String> {
        let (psql, port) = (self.psql_bin(), self.port);
        let sql = format!("SET synchronous_commit = on; {sql}");
        std::thread::spawn(move || run_sql(&psql, port, &sql))
    }

    /// How many committed transactions are waiting for the absent standby.
    pub fn held_commits(&self) -> usize {
        self.psql("SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep'")
            .trim()
            .parse()
            .unwrap()
    }

    /// Cancels the waits of held commits (their transactions stay committed: PostgreSQL
    /// warns that they already committed locally, then ends them) and holds no more.
    pub fn release_held_commits(&self) {
        self.psql(
            "SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE wait_event = 'SyncRep'",
        );
        self.psql("ALTER SYSTEM RESET synchronous_standby_names");
        self.psql("SELECT pg_reload_conf()");
    }

    /// A libpq connection string for database `postgres` as user `postgres`.
    pub fn conninfo(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            self.port
        )
    }

    /// Runs SQL through psql (for setup and workloads); panics on error.
    pub fn psql(&self, sql: &str) -> String {
        run_sql(&self.bin.join("psql"), self.port, sql)
    }

    /// The `psql` binary beside the server.
    pub fn psql_bin(&self) -> PathBuf {
        self.bin.join("psql")
    }

    /// The server's directory (its log is `postgres.log` there).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop_server();
    }
}

/// Runs SQL with `psql` against the server on `port` (usable from workload threads);
/// panics with psql's error on failure.
pub fn run_sql(psql: &Path, port: u16, sql: &str) -> String {
    run_sql_in(psql, port, "postgres", sql)
}

/// [`run_sql`] in database `db`.
fn run_sql_in(psql: &Path, port: u16, db: &str, sql: &str) -> String {
    let out = Command::new(psql)
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-U",
            "postgres",
            "-d",
            db,
            "-v",
            "ON_ERROR_STOP=1",
            "-qAt",
            "-c",
            sql,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "psql failed: {}\n{sql}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}
