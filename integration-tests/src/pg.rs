//! A throwaway PostgreSQL 15 cluster for tests: `initdb` into a temporary directory (as the
//! `postgres` user when the tests run as root, since initdb refuses root), started on a
//! free loopback port with `wal_level=logical`, stopped and removed on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::procs::free_port;

/// A running PostgreSQL server.
pub struct Postgres {
    /// The port on 127.0.0.1.
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    bin: PathBuf,
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
        let port = free_port();
        let log = dir.path().join("postgres.log");
        let sock = dir.path().display().to_string();
        let port_s = port.to_string();
        let child = as_postgres(
            &bin.join("postgres"),
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
        )
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
        let pg = Postgres {
            port,
            dir,
            child: Some(child),
            bin,
        };
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            let ok = Command::new(pg.bin.join("pg_isready"))
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
        pg
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
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SIGINT: fast shutdown.
            let _ = Command::new("kill")
                .args(["-INT", &c.id().to_string()])
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
    }
}

/// Runs SQL with `psql` against the server on `port` (usable from workload threads);
/// panics with psql's error on failure.
pub fn run_sql(psql: &Path, port: u16, sql: &str) -> String {
    let out = Command::new(psql)
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-U",
            "postgres",
            "-d",
            "postgres",
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
