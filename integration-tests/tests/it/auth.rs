//! Tokens and roles on the coordinator's gRPC listener (docs/security.md, "Tokens and
//! roles"): missing and unknown credentials get UNAUTHENTICATED, the wrong role
//! PERMISSION_DENIED, and neither changes anything; JWTs from the JWKS file work like
//! tokens; health stays open and reflection is configurable; the CLI sends its token and
//! admin mutations are written to the audit log with who made them.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use freshet_common::auth::{AuthConfig, TokenEntry, sha256_hex};
use freshet_common::config::Config;
use freshet_integration_tests::*;
use freshet_proto::admin::v1::{
    CreateTableRequest, GetLeaderRequest, ListTablesRequest, PauseTableRequest, TableInfo,
    TriggerCycleRequest,
};
use tonic::Code;

fn token(name: &str, secret: &str, roles: &[&str]) -> TokenEntry {
    TokenEntry {
        name: name.into(),
        sha256: sha256_hex(secret.as_bytes()),
        roles: roles.iter().map(|r| r.to_string()).collect(),
    }
}

/// `r` carrying `authorization: Bearer <secret>` (none when `secret` is None).
fn authed<T>(r: T, secret: Option<&str>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(r);
    if let Some(s) = secret {
        r.metadata_mut()
            .insert("authorization", format!("Bearer {s}").parse().unwrap());
    }
    r
}

async fn tables(c: &Cluster) -> Vec<TableInfo> {
    c.admin_client()
        .await
        .list_tables(authed(ListTablesRequest {}, Some("admin-secret")))
        .await
        .unwrap()
        .into_inner()
        .tables
}

async fn auth_cluster(dir: &Path, auth: AuthConfig) -> Cluster {
    let mut config = Config::default();
    config.tables = vec![
        table_config(dir, "orders", false, 4096),
        table_config(dir, "users", false, 4096),
    ];
    config.cycle.interval_ms = 3_600_000;
    config.cycle.trigger_changes = u64::MAX;
    config.catalog.uri = Some(dir.join("_catalog").display().to_string());
    config.auth = auth;
    Cluster::start_with(config, 1).await
}

fn roles() -> AuthConfig {
    AuthConfig {
        tokens: vec![
            token("ops", "admin-secret", &["admin"]),
            token("dashboard", "read-secret", &["read"]),
            token("orders-app", "orders-secret", &["ingest:orders"]),
        ],
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_unknown_and_wrong_role_credentials_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let c = auth_cluster(dir.path(), roles()).await;
    let mut ingest = c.ingest_client().await;
    let mut admin = c.admin_client().await;
    let batch = |table: &str| request(table, false, &[(1, Some(("a".into(), 1)))]);

    // No token, an unknown token, a malformed header: UNAUTHENTICATED, nothing staged.
    for secret in [None, Some("guess")] {
        let e = ingest
            .ingest(authed(batch("orders"), secret))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{secret:?}: {e}");
        let e = admin
            .pause_table(authed(
                PauseTableRequest {
                    table: "orders".into(),
                },
                secret,
            ))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{e}");
    }
    let mut r = tonic::Request::new(batch("orders"));
    r.metadata_mut()
        .insert("authorization", "Basic b3BzOnB3".parse().unwrap());
    let e = ingest.ingest(r).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("Bearer"), "{}", e.message());

    // The wrong role: PERMISSION_DENIED, naming who and what.
    let e = ingest
        .ingest(authed(batch("users"), Some("orders-secret")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(
        e.message()
            .contains("'orders-app' may not ingest into table 'users'"),
        "{}",
        e.message()
    );
    let e = ingest
        .ingest(authed(batch("orders"), Some("read-secret")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    let e = admin
        .list_tables(authed(ListTablesRequest {}, Some("orders-secret")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    for secret in ["read-secret", "orders-secret"] {
        let e = admin
            .pause_table(authed(
                PauseTableRequest {
                    table: "orders".into(),
                },
                Some(secret),
            ))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{e}");
        let e = admin
            .trigger_cycle(authed(
                TriggerCycleRequest {
                    table: "orders".into(),
                },
                Some(secret),
            ))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{e}");
        let e = admin
            .create_table(authed(
                CreateTableRequest {
                    name: "evil".into(),
                    uri: dir.path().join("evil").display().to_string(),
                    schema_json: r#"{"fields":[{"name":"id","type":"int64","nullable":false}]}"#
                        .into(),
                    primary_key: vec!["id".into()],
                    ..Default::default()
                },
                Some(secret),
            ))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    }

    // Nothing changed: no table created, nothing pending, nothing paused, no cycle.
    let t = tables(&c).await;
    assert_eq!(t.len(), 2);
    assert!(
        t.iter()
            .all(|t| t.pending_changes == 0 && !t.paused && t.version == 0),
        "{t:?}"
    );
    assert!(!dir.path().join("evil").exists());

    // The right roles work.
    let ok = ingest
        .ingest(authed(batch("orders"), Some("orders-secret")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.rows, 1);
    let read = admin
        .list_tables(authed(ListTablesRequest {}, Some("read-secret")))
        .await
        .unwrap()
        .into_inner()
        .tables;
    let orders = read.iter().find(|t| t.name == "orders").unwrap();
    assert_eq!(orders.pending_changes, 1);
    // Everyone authenticated may ask for the leader (clients find it so).
    admin
        .get_leader(authed(GetLeaderRequest {}, Some("orders-secret")))
        .await
        .unwrap();
    admin
        .trigger_cycle(authed(
            TriggerCycleRequest {
                table: "orders".into(),
            },
            Some("admin-secret"),
        ))
        .await
        .unwrap();
    assert_eq!(read_table(&c.config.tables[0].uri).await.len(), 1);
    c.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_stays_open_and_reflection_follows_its_setting() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    let dir = tempfile::tempdir().unwrap();
    for reflection in [true, false] {
        let auth = AuthConfig {
            reflection,
            ..roles()
        };
        let c = auth_cluster(&dir.path().join(reflection.to_string()), auth).await;
        let ch = tonic::transport::Endpoint::from_shared(c.endpoint.clone())
            .unwrap()
            .connect()
            .await
            .unwrap();
        HealthClient::new(ch.clone())
            .check(HealthCheckRequest::default())
            .await
            .expect("health needs no token");
        let mut refl =
            tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::new(ch);
        let req = tonic_reflection::pb::v1::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(
                tonic_reflection::pb::v1::server_reflection_request::MessageRequest::ListServices(
                    String::new(),
                ),
            ),
        };
        let answer = async {
            let mut s = refl
                .server_reflection_info(futures::stream::iter([req]))
                .await?
                .into_inner();
            s.message().await
        }
        .await;
        match (reflection, answer) {
            (true, Ok(Some(_))) => {}
            (false, Err(e)) => assert_eq!(e.code(), Code::Unauthenticated, "{e}"),
            (r, other) => panic!("reflection = {r}: {other:?}"),
        }
        c.stop();
    }
}

/// An ES256 key: (JWKS JSON with kid `k1`, the signing key).
fn es256() -> (String, jsonwebtoken::EncodingKey) {
    use base64::Engine;
    let key = rcgen::KeyPair::generate().unwrap();
    let raw = key.public_key_raw();
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let jwks = serde_json::json!({"keys": [{"kty": "EC", "crv": "P-256", "alg": "ES256",
        "kid": "k1", "x": b64(&raw[1..33]), "y": b64(&raw[33..65])}]});
    (
        jwks.to_string(),
        jsonwebtoken::EncodingKey::from_ec_der(&key.serialize_der()),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwt_signed_by_a_jwks_key_is_a_credential_with_its_roles() {
    let dir = tempfile::tempdir().unwrap();
    let (jwks, key) = es256();
    let jwks_file = dir.path().join("jwks.json");
    std::fs::write(&jwks_file, jwks).unwrap();
    let auth = AuthConfig {
        jwks_file: jwks_file.display().to_string(),
        jwt_audience: "freshet".into(),
        ..roles()
    };
    let c = auth_cluster(dir.path(), auth).await;
    let now = chrono::Utc::now().timestamp();
    let sign = |roles: &str, exp: i64| {
        let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        h.kid = Some("k1".into());
        let claims = serde_json::json!({"sub": "loader", "aud": "freshet", "exp": exp,
            "roles": roles});
        jsonwebtoken::encode(&h, &claims, &key).unwrap()
    };
    let mut ingest = c.ingest_client().await;
    let batch = request("users", false, &[(7, Some(("x".into(), 7)))]);
    ingest
        .ingest(authed(
            batch.clone(),
            Some(&sign("ingest:users", now + 300)),
        ))
        .await
        .unwrap();
    let e = ingest
        .ingest(authed(
            batch.clone(),
            Some(&sign("ingest:orders", now + 300)),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    let e = ingest
        .ingest(authed(batch, Some(&sign("ingest:users", now - 300))))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e}");
    assert!(e.message().contains("Expired"), "{}", e.message());
    let users = tables(&c)
        .await
        .into_iter()
        .find(|t| t.name == "users")
        .unwrap();
    assert_eq!(users.pending_changes, 1);
    c.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_sends_its_token_and_admin_mutations_are_audited() {
    let dir = tempfile::tempdir().unwrap();
    let port = freshet_integration_tests::procs::free_port();
    let tokens = dir.path().join("tokens.toml");
    std::fs::write(
        &tokens,
        format!(
            "[[tokens]]\nname = \"ops\"\nsha256 = \"{}\"\nroles = [\"admin\"]\n\n\
             [[tokens]]\nname = \"dashboard\"\nsha256 = \"{}\"\nroles = [\"read\"]\n",
            sha256_hex(b"admin-secret"),
            sha256_hex(b"read-secret")
        ),
    )
    .unwrap();
    let table = table_config(dir.path(), "t", false, 4096);
    let config = dir.path().join("freshet.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nhttp_listen = \"\"\n\n\
             [cycle]\ninterval_ms = 3600000\nworkers = [\"http://127.0.0.1:1\"]\n\n\
             [auth]\ntokens_file = \"{}\"\n\n\
             [[tables]]\nname = \"t\"\nuri = \"{}\"\nprimary_key = [\"id\"]\n\
             columns = [{{ name = \"id\", type = \"int64\", nullable = false }}, \
             {{ name = \"v\", type = \"string\" }}]\n",
            tokens.display(),
            table.uri
        ),
    )
    .unwrap();
    let log = dir.path().join("coordinator.log");
    let f = std::fs::File::create(&log).unwrap();
    let mut proc = Command::new(freshet_bin())
        .args(["coordinator", "--config"])
        .arg(&config)
        .stdout(f.try_clone().unwrap())
        .stderr(f)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let endpoint = format!("http://127.0.0.1:{port}");
    let cli = |args: &[&str], env: &[(&str, &str)]| {
        Command::new(freshet_bin())
            .arg("--endpoint")
            .arg(&endpoint)
            .args(args)
            .env_remove("FRESHET_TOKEN")
            .env_remove("FRESHET_TOKEN_FILE")
            .envs(env.iter().copied())
            .output()
            .unwrap()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let o = cli(&["admin", "tables"], &[("FRESHET_TOKEN", "read-secret")]);
        if o.status.success() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "coordinator did not answer: {}\n{}",
            String::from_utf8_lossy(&o.stderr),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    // Without a token: refused, and the message says how to send one.
    let o = cli(&["admin", "pause", "t"], &[]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("no credentials") && err.contains("--token"),
        "{err}"
    );
    // A read token cannot pause.
    let o = cli(
        &["admin", "pause", "t"],
        &[("FRESHET_TOKEN", "read-secret")],
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("'dashboard' may not administer"), "{err}");
    // The admin token from a file can.
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "admin-secret\n").unwrap();
    let o = cli(
        &[
            "--token-file",
            token_file.to_str().unwrap(),
            "admin",
            "pause",
            "t",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let _ = Command::new("kill")
        .args(["-TERM", &proc.id().to_string()])
        .status();
    let _ = proc.wait();
    let text = std::fs::read_to_string(&log).unwrap();
    let audit: Vec<&str> = text.lines().filter(|l| l.contains("audit:")).collect();
    assert!(
        audit.iter().any(|l| l.contains("principal=ops")
            && l.contains("PauseTable")
            && l.contains("outcome=\"ok\"")),
        "{audit:#?}"
    );
    assert!(
        audit
            .iter()
            .any(|l| l.contains("refused") && l.contains("'dashboard' may not administer")),
        "{audit:#?}"
    );
    // The token itself never reaches the log.
    assert!(!text.contains("admin-secret") && !text.contains("read-secret"));
}
