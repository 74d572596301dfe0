//! The PostgreSQL source's connections over TLS (`sslmode`, `sslrootcert`) and its refusal
//! of cleartext passwords on unencrypted connections, against a real PostgreSQL 15 with
//! `ssl = on` (certificates of a test CA) and `pg_hba.conf` rules per test.

use std::path::Path;
use std::time::{Duration, Instant};

use arrow::array::AsArray;
use arrow::datatypes::Int64Type;
use freshet_common::source::SourceState;
use freshet_integration_tests::ca::Ca;
use freshet_integration_tests::pg::{PgOptions, Postgres};
use freshet_integration_tests::*;
use freshet_source_postgres::SourceConfig;

use freshet_integration_tests::pg::SERIAL;

/// A source of table `items`, defined as in a configuration file; `extra` adds keys.
fn source(connection: &str, dir: &Path, extra: &str) -> SourceConfig {
    let uri = dir.join("items").display().to_string();
    SourceConfig::parse(&format!(
        "name = \"pg\"\nconnection = \"{connection}\"\npublication = \"freshet_pub\"\nslot = \"freshet_slot\"\npoll_ms = 100\nheartbeat_ms = 300\n{extra}\n[[tables]]\nsource = \"public.items\"\nname = \"items\"\nuri = \"{uri}\"\n"
    ))
    .unwrap()
}

async fn cluster(dir: &Path) -> Cluster {
    let mut config = freshet_common::config::Config::default();
    config.cycle.interval_ms = 200;
    config.catalog.uri = Some(dir.join("_catalog").display().to_string());
    Cluster::start_with(config, 2).await
}

fn items(pg: &Postgres) {
    pg.psql(
        "CREATE TABLE items (id bigint PRIMARY KEY, v text); INSERT INTO items SELECT g, 'v' || g FROM generate_series(1, 3) g;",
    );
}

/// Waits until the Delta table of `items` holds `n` rows.
async fn rows_reach(dir: &Path, src: &freshet_source_postgres::PostgresSource, n: i64) {
    let uri = dir.join("items").display().to_string();
    let end = Instant::now() + Duration::from_secs(90);
    loop {
        let s = src.status();
        assert_ne!(s.state, SourceState::Error, "source failed: {}", s.error);
        if Path::new(&uri)
            .join("_delta_log/00000000000000000000.json")
            .exists()
        {
            let b = query(&uri, "SELECT count(*) FROM t").await;
            if b[0].column(0).as_primitive::<Int64Type>().value(0) == n {
                return;
            }
        }
        assert!(
            Instant::now() < end,
            "the table did not reach {n} rows: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The error of `check` (which connects and reads the tables' shapes).
async fn check_error(s: &SourceConfig) -> String {
    let e = tokio::time::timeout(Duration::from_secs(30), freshet_source_postgres::check(s))
        .await
        .expect("check ends")
        .expect_err("the connection must be refused")
        .to_string();
    eprintln!("refused as expected: {e}");
    e
}

/// (a) `verify-full` with the right CA: the source snapshots and streams, and both of its
/// connections are encrypted (the server only takes `hostssl` connections and
/// `pg_stat_ssl` shows the walsender's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_with_the_right_ca_snapshots_and_streams() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("freshet-pg-test-ca");
    let pg = Postgres::start_with(PgOptions {
        ssl: Some(ca.leaf_for(&["localhost", "127.0.0.1"], 1, false)),
        hba: vec!["hostssl all all 127.0.0.1/32 trust".into()],
        ..Default::default()
    });
    items(&pg);
    let ca_file = ca.write(dir.path(), "pg");
    let c = cluster(dir.path()).await;
    // host=127.0.0.1: the certificate's IP address names it.
    let s = source(
        &pg.conninfo(),
        dir.path(),
        &format!(
            "sslmode = \"verify-full\"\nsslrootcert = \"{}\"",
            ca_file.display()
        ),
    );
    let src = freshet_source_postgres::start(s, c.coordinator.clone())
        .await
        .unwrap();
    rows_reach(dir.path(), &src, 3).await;
    pg.psql("INSERT INTO items VALUES (4, 'streamed')");
    rows_reach(dir.path(), &src, 4).await;
    let encrypted = pg.psql(
        "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) WHERE ssl AND backend_type = 'walsender' AND application_name = 'freshet-pg'",
    );
    assert_eq!(encrypted.trim(), "1", "the replication connection is TLS");
    src.stop();
    c.stop();
}

/// (b) A certificate from another CA and a certificate for another name fail with errors
/// naming the source, the host and the cause; `verify-ca` does not check the name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_ca_or_name_fails_clearly() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("freshet-pg-test-ca");
    let other = Ca::new("some-other-ca");
    // The server's certificate names db.example only.
    let pg = Postgres::start_with(PgOptions {
        ssl: Some(ca.leaf_for(&["db.example"], 2, false)),
        ..Default::default()
    });
    items(&pg);
    let (ca_file, other_file) = (ca.write(dir.path(), "pg"), other.write(dir.path(), "other"));
    let host = format!("127.0.0.1:{}", pg.port);
    let with = |mode: &str, file: &Path| {
        source(
            &pg.conninfo(),
            dir.path(),
            &format!("sslmode = \"{mode}\"\nsslrootcert = \"{}\"", file.display()),
        )
    };

    let e = check_error(&with("verify-ca", &other_file)).await;
    assert!(
        e.contains("source 'pg'")
            && e.contains(&host)
            && e.contains("not signed by a CA in sslrootcert")
            && e.contains("other-ca.pem"),
        "{e}"
    );
    let e = check_error(&with("verify-full", &other_file)).await;
    assert!(e.contains("not signed by a CA in sslrootcert"), "{e}");

    let e = check_error(&with("verify-full", &ca_file)).await;
    assert!(
        e.contains("source 'pg'")
            && e.contains(&host)
            && e.contains("is not for '127.0.0.1'")
            && e.contains("db.example"),
        "{e}"
    );
    // The connection string's own sslmode/sslrootcert are honoured the same way.
    let mut s = source(
        &format!(
            "{} sslmode=verify-full sslrootcert={}",
            pg.conninfo(),
            ca_file.display()
        ),
        dir.path(),
        "",
    );
    let e = check_error(&s).await;
    assert!(e.contains("is not for '127.0.0.1'"), "{e}");

    // verify-ca: the chain is right, the name is not checked.
    freshet_source_postgres::check(&with("verify-ca", &ca_file))
        .await
        .unwrap();
    // An unreadable CA file is named.
    s = with("verify-ca", &dir.path().join("missing.pem"));
    let e = check_error(&s).await;
    assert!(
        e.contains("sslrootcert") && e.contains("missing.pem"),
        "{e}"
    );
}

/// (c) A server that only takes `hostssl` connections: `require` works (encrypted, nothing
/// verified), `disable` is refused by the server, and the error names the source, host and
/// cause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_works_where_only_tls_is_allowed_and_disable_fails_clearly() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("freshet-pg-test-ca");
    let pg = Postgres::start_with(PgOptions {
        ssl: Some(ca.leaf_for(&["localhost", "127.0.0.1"], 3, false)),
        hba: vec!["hostssl all all 127.0.0.1/32 trust".into()],
        ..Default::default()
    });
    items(&pg);
    let with = |mode: &str| source(&pg.conninfo(), dir.path(), &format!("sslmode = \"{mode}\""));
    freshet_source_postgres::check(&with("require"))
        .await
        .unwrap();
    // The default (prefer) takes TLS when the server offers it.
    freshet_source_postgres::check(&with("prefer"))
        .await
        .unwrap();
    let e = check_error(&with("disable")).await;
    assert!(
        e.contains("source 'pg'")
            && e.contains(&format!("127.0.0.1:{}", pg.port))
            && e.contains("no pg_hba.conf entry")
            && e.contains("no encryption"),
        "{e}"
    );
}

/// (d) A server that asks for the password in cleartext (`password` in pg_hba.conf) over
/// plain TCP: the source refuses before sending the password (the password is right, so
/// the server would have let it in; the server logs no authorized connection), `require`
/// against this server without TLS fails clearly, and `allow_cleartext_password = true`
/// connects and streams (through the replication relay too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cleartext_password_request_is_refused_before_the_password_is_sent() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let pg = Postgres::start_with(PgOptions {
        hba: vec![
            "host all freshet_clear 127.0.0.1/32 password".into(),
            "host all all 127.0.0.1/32 trust".into(),
        ],
        settings: vec!["log_connections=on".into()],
        ..Default::default()
    });
    items(&pg);
    pg.psql("CREATE ROLE freshet_clear LOGIN SUPERUSER PASSWORD 'right-password'");
    let password = dir.path().join("password");
    std::fs::write(&password, "right-password\n").unwrap();
    let conn = format!(
        "host=127.0.0.1 port={} user=freshet_clear dbname=postgres",
        pg.port
    );
    let with = |extra: &str| {
        source(
            &conn,
            dir.path(),
            &format!("password_file = \"{}\"\n{extra}", password.display()),
        )
    };
    let authorized = |pg: &Postgres| {
        pg.log()
            .lines()
            .filter(|l| l.contains("connection authorized: user=freshet_clear"))
            .count()
    };

    // The default (prefer: this server has no TLS) and disable.
    for extra in ["", "sslmode = \"disable\""] {
        let e = check_error(&with(extra)).await;
        assert!(
            e.contains("source 'pg'")
                && e.contains(&format!("127.0.0.1:{}", pg.port))
                && e.contains("cleartext")
                && e.contains("refused before sending it"),
            "{e}"
        );
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = pg.log();
    assert!(
        log.contains("connection received: host=127.0.0.1"),
        "the server saw the connections:\n{log}"
    );
    assert_eq!(authorized(&pg), 0, "no connection got in:\n{log}");
    assert!(!log.contains("password authentication failed"), "{log}");

    // require against a server without TLS.
    let e = check_error(&with("sslmode = \"require\"")).await;
    assert!(
        e.contains("source 'pg'") && e.contains("does not accept TLS"),
        "{e}"
    );

    // Allowed: the query and the replication connections answer with the password.
    let c = cluster(dir.path()).await;
    let src = freshet_source_postgres::start(
        with("allow_cleartext_password = true"),
        c.coordinator.clone(),
    )
    .await
    .unwrap();
    rows_reach(dir.path(), &src, 3).await;
    pg.psql("INSERT INTO items VALUES (4, 'streamed')");
    rows_reach(dir.path(), &src, 4).await;
    assert!(authorized(&pg) >= 2, "{}", pg.log());
    src.stop();
    c.stop();
}
