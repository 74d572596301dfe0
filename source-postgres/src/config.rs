//! Building a PostgreSQL connection from a source's configuration (the configuration
//! types live in `freshet_common::source`, so the coordinator's config file can hold them).

pub use freshet_common::source::{PostgresTls, SourceConfig, SourceTable, SslMode};

use crate::error::{Result, SourceError};

/// The port in the relay socket's name (`.s.PGSQL.<port>`, as libpq names sockets).
pub const RELAY_PORT: u16 = 5432;

/// Checks a source's names and builds its tokio-postgres configuration (with the password;
/// without `sslmode`/`sslrootcert`, see [`tls`]).
pub fn pg_config(source: &SourceConfig) -> Result<tokio_postgres::Config> {
    source.pg_config_inner()
}

/// The source's TLS settings, for both of its connections (see the `transport` module).
pub fn tls(source: &SourceConfig) -> Result<PostgresTls> {
    source
        .postgres_tls()
        .map(|(tls, _)| tls)
        .map_err(SourceError::Config)
}

/// The replication connection's settings (`START_REPLICATION ... LOGICAL`, pgoutput), from
/// the same connection string and password as [`pg_config`]: the user (default: `$USER`)
/// and the database (default: the user). It connects to the relay socket in `relay_dir`
/// (the `transport` module's relay), which carries it over the connection opened with the
/// source's TLS settings. The walsender formats the text values pgoutput sends with its
/// session settings, so they are pinned to what the snapshot's connection uses (UTC, ISO
/// dates, exact floats).
pub fn replication_config(
    source: &SourceConfig,
    start_lsn: u64,
    relay_dir: &std::path::Path,
) -> Result<pgwire_replication::ReplicationConfig> {
    let pg = pg_config(source)?;
    let user = match pg.get_user() {
        Some(u) => u.to_string(),
        None => std::env::var("USER").map_err(|_| {
            SourceError::Config(format!(
                "source '{}': the connection string needs user=",
                source.name
            ))
        })?,
    };
    let dbname = pg.get_dbname().unwrap_or(&user).to_string();
    let password = pg
        .get_password()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .unwrap_or_default();
    let publication = source.publication.as_str();
    let slot = source.slot.as_str();
    let mut c = pgwire_replication::ReplicationConfig::unix(
        relay_dir.display().to_string(),
        RELAY_PORT,
        user,
        password,
        dbname,
        slot,
        publication,
    );
    c.start_lsn = pgwire_replication::Lsn(start_lsn);
    c.status_interval = std::time::Duration::from_millis(source.poll_ms.max(10));
    c.idle_wakeup_interval = std::time::Duration::from_secs(10);
    c.application_name = Some(format!("freshet-{}", source.name));
    c.options = Some("-c TimeZone=UTC -c extra_float_digits=3 -c DateStyle=ISO,YMD".into());
    Ok(c)
}

trait PgConfig {
    fn pg_config_inner(&self) -> Result<tokio_postgres::Config>;
}

impl PgConfig for SourceConfig {
    fn pg_config_inner(&self) -> Result<tokio_postgres::Config> {
        let ident = |what: &str, v: &str| {
            if v.is_empty() || !v.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                Err(SourceError::Config(format!(
                    "source '{}': {what} '{v}' must be letters, digits and _",
                    self.name
                )))
            } else {
                Ok(())
            }
        };
        if self.kind != "postgres" {
            return Err(SourceError::Config(format!(
                "source '{}': unknown kind '{}' (only postgres)",
                self.name, self.kind
            )));
        }
        ident("slot", &self.slot)?;
        ident("publication", &self.publication)?;
        if self.tables.is_empty() {
            return Err(SourceError::Config(format!(
                "source '{}' has no tables",
                self.name
            )));
        }
        if self.connection.to_ascii_lowercase().contains("password=") {
            return Err(SourceError::Config(format!(
                "source '{}': put the password in password_env or password_file, not in the connection string",
                self.name
            )));
        }
        let (_, connection) = self.postgres_tls().map_err(SourceError::Config)?;
        let mut c: tokio_postgres::Config = connection.parse().map_err(|e| {
            SourceError::Config(format!(
                "source '{}': bad connection string: {e}",
                self.name
            ))
        })?;
        if let Some(var) = &self.password_env {
            let p = std::env::var(var).map_err(|_| {
                SourceError::Config(format!(
                    "source '{}': password_env names {var}, which is not set",
                    self.name
                ))
            })?;
            c.password(p);
        } else if let Some(file) = &self.password_file {
            let p = std::fs::read_to_string(file).map_err(|e| {
                SourceError::Config(format!("source '{}': password_file {file}: {e}", self.name))
            })?;
            c.password(p.trim_end_matches(['\n', '\r']));
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A one-table source on `connection`.
    fn source(connection: &str, poll_ms: u64) -> SourceConfig {
        SourceConfig {
            name: "pg".into(),
            kind: "postgres".into(),
            connection: connection.into(),
            password_env: None,
            password_file: None,
            password_secret: None,
            publication: "pub".into(),
            slot: "slot".into(),
            poll_ms,
            snapshot_batch_rows: 10,
            heartbeat_ms: 10_000,
            sslmode: None,
            sslrootcert: None,
            allow_cleartext_password: false,
            tables: vec![SourceTable {
                source: "public.t".into(),
                name: "t".into(),
                uri: "/tmp/t".into(),
                partition_by: vec![],
                target_file_size: None,
            }],
        }
    }

    #[test]
    fn passwords_never_show_and_names_are_checked() {
        let mut c = source("host=h user=u dbname=d", 100);
        c.password_env = Some("FRESHET_TEST_NO_SUCH_VAR".into());
        let e = pg_config(&c).unwrap_err().to_string();
        assert!(e.contains("FRESHET_TEST_NO_SUCH_VAR"), "{e}");
        c.connection = "host=h password=hunter2".into();
        assert!(!format!("{c:?}").contains("hunter2"));
        assert!(
            pg_config(&c)
                .unwrap_err()
                .to_string()
                .contains("password_env")
        );
        c.connection = "host=h".into();
        c.slot = "bad-slot;".into();
        assert!(pg_config(&c).unwrap_err().to_string().contains("slot"));
        assert_eq!(c.tables[0].qualified(), ("public".into(), "t".into()));
    }

    #[test]
    fn the_replication_connection_goes_through_the_relay_as_the_connection_string_says() {
        let mut c = source("host=db.example port=5433 user=u dbname=d", 250);
        let relay = std::path::Path::new("/tmp/freshet-repl-x");
        let r = replication_config(&c, 0x16_B374_D848, relay).unwrap();
        assert_eq!((r.user.as_str(), r.database.as_str()), ("u", "d"));
        assert!(r.is_unix_socket());
        assert_eq!(r.unix_socket_path(), relay.join(".s.PGSQL.5432"));
        assert_eq!(
            (r.slot.as_str(), r.publication.to_string()),
            ("slot", "pub".to_string())
        );
        assert_eq!(r.start_lsn.as_u64(), 0x16_B374_D848);
        assert_eq!(r.status_interval, std::time::Duration::from_millis(250));
        // TLS is the relay's upstream connection's (the transport module), not pgwire's.
        assert_eq!(r.tls.mode, pgwire_replication::SslMode::Disable);
        assert!(r.options.as_deref().unwrap().contains("TimeZone=UTC"));
        c.connection = "host=/var/run/postgresql port=5999 user=u".into();
        let r = replication_config(&c, 0, relay).unwrap();
        assert_eq!(r.database.as_str(), "u");
    }

    #[test]
    fn tls_settings_are_taken_out_of_the_connection_string() {
        let mut c = source(
            "host=db.example sslmode=verify-full sslrootcert=/etc/ca.pem user=u",
            100,
        );
        let t = tls(&c).unwrap();
        assert_eq!(
            (t.mode, t.root_cert.as_deref()),
            (SslMode::VerifyFull, Some("/etc/ca.pem"))
        );
        // tokio-postgres would refuse sslrootcert and knows no verify-full.
        let pg = pg_config(&c).unwrap();
        assert_eq!(pg.get_user(), Some("u"));
        c.connection = "host=db.example sslmode=verify-full user=u".into();
        let e = pg_config(&c).unwrap_err().to_string();
        assert!(e.contains("sslrootcert"), "{e}");
        c.connection = "host=db.example user=u".into();
        c.sslmode = Some("bogus".into());
        let e = tls(&c).unwrap_err().to_string();
        assert!(e.contains("sslmode 'bogus'"), "{e}");
    }
}
