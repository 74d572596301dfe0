//! Credentials of sources come only from an allowlist on the coordinator: named secrets in
//! its own configuration file (`[secrets.<name>]` with `password_file` or `password_env`,
//! optionally tied to `hosts`), which a source names with `password_secret = "<name>"`.
//! A source added at run time (`source add`, the catalog) may only name a listed secret:
//! `password_env` and `password_file` directly on it are refused before any connection is
//! opened, because they would let whoever can call the admin API make the leader read any
//! variable or file and send it to a host of the caller's choice. Sources of the
//! configuration file may keep `password_env`/`password_file`: the operator wrote them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::source::SourceConfig;

/// One named secret of the coordinator's configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecretConfig {
    /// File holding the password (trailing newlines dropped).
    pub password_file: Option<String>,
    /// Environment variable holding the password.
    pub password_env: Option<String>,
    /// Hosts (`host=` / `hostaddr=` of the connection string) the password may be sent to;
    /// empty: any.
    pub hosts: Vec<String>,
}

/// The named secrets (`[secrets.<name>]`).
pub type Secrets = BTreeMap<String, SecretConfig>;

/// Where a source's definition comes from, which decides what credentials it may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The coordinator's configuration file (written by the operator).
    ConfigFile,
    /// `source add` or the catalog (written by whoever can call the admin API).
    RunTime,
}

/// Checks the configured secrets: each names exactly one of `password_file`/`password_env`.
pub fn validate(secrets: &Secrets) -> Result<()> {
    for (name, s) in secrets {
        if s.password_file.is_some() == s.password_env.is_some() {
            return Err(Error::Config(format!(
                "secrets.{name}: set exactly one of password_file and password_env"
            )));
        }
    }
    Ok(())
}

/// The hosts a libpq-style connection string connects to (`host=`, `hostaddr=`, comma
/// lists included).
fn hosts_of(connection: &str) -> Vec<String> {
    connection
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .filter(|(k, _)| matches!(k.trim(), "host" | "hostaddr"))
        .flat_map(|(_, v)| v.trim_matches('\'').split(',').map(str::to_string))
        .filter(|h| !h.is_empty())
        .collect()
}

/// Checks a source's credentials against the allowlist and returns the definition the
/// source runs with: a named secret's file or variable filled in. Run-time sources naming
/// `password_env`/`password_file`, a secret that is not listed, or a host the secret is not
/// for are refused with an error naming the field. The definition to record (catalog)
/// stays the one given: it names the secret only.
pub fn bind(source: &SourceConfig, secrets: &Secrets, origin: Origin) -> Result<SourceConfig> {
    let refuse = |message: String| Error::InvalidSource {
        name: source.name.clone(),
        message,
    };
    if origin == Origin::RunTime {
        for (field, set) in [
            ("password_env", source.password_env.is_some()),
            ("password_file", source.password_file.is_some()),
        ] {
            if set {
                return Err(refuse(format!(
                    "{field} is not allowed on a source added at run time: name one of the \
                     coordinator's [secrets.*] with password_secret"
                )));
            }
        }
    }
    let mut bound = source.clone();
    if let Some(name) = &source.password_secret {
        if source.password_env.is_some() || source.password_file.is_some() {
            return Err(refuse(
                "password_secret cannot be combined with password_env or password_file".into(),
            ));
        }
        let s = secrets.get(name).ok_or_else(|| {
            refuse(format!(
                "password_secret '{name}' is not one of the coordinator's [secrets.*]"
            ))
        })?;
        if !s.hosts.is_empty() {
            let hosts = hosts_of(&source.connection);
            if hosts.is_empty() || !hosts.iter().all(|h| s.hosts.contains(h)) {
                return Err(refuse(format!(
                    "password_secret '{name}' may be sent only to {:?}; the connection names {hosts:?}",
                    s.hosts
                )));
            }
        }
        bound.password_env = s.password_env.clone();
        bound.password_file = s.password_file.clone();
    }
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(connection: &str, extra: &str) -> SourceConfig {
        SourceConfig::parse(&format!(
            "name = \"shop\"\nconnection = \"{connection}\"\npublication = \"p\"\nslot = \"s\"\n{extra}\n[[tables]]\nsource = \"t\"\nname = \"t\"\nuri = \"/l/t\"\n"
        ))
        .unwrap()
    }

    #[test]
    fn run_time_sources_only_name_listed_secrets_for_their_hosts() {
        let mut secrets = Secrets::new();
        secrets.insert(
            "pg_shop".into(),
            SecretConfig {
                password_file: Some("/run/secrets/pg".into()),
                hosts: vec!["db.internal".into()],
                ..Default::default()
            },
        );
        let conn = "host=db.internal user=u";
        for (extra, field) in [
            ("password_env = \"AWS_SECRET_ACCESS_KEY\"", "password_env"),
            ("password_file = \"/etc/shadow\"", "password_file"),
            ("password_secret = \"other\"", "password_secret 'other'"),
        ] {
            let e = bind(&source(conn, extra), &secrets, Origin::RunTime).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert!(e.to_string().contains(field), "{e}");
        }
        // A listed secret, but to another host.
        let e = bind(
            &source(
                "host=attacker.example user=u",
                "password_secret = \"pg_shop\"",
            ),
            &secrets,
            Origin::RunTime,
        )
        .unwrap_err();
        assert!(e.to_string().contains("attacker.example"), "{e}");
        let given = source(conn, "password_secret = \"pg_shop\"");
        let b = bind(&given, &secrets, Origin::RunTime).unwrap();
        assert_eq!(b.password_file.as_deref(), Some("/run/secrets/pg"));
        assert!(
            given.password_file.is_none(),
            "what is recorded names the secret only"
        );
        // The operator's own file may name a variable directly.
        let b = bind(
            &source(conn, "password_env = \"PG\""),
            &secrets,
            Origin::ConfigFile,
        )
        .unwrap();
        assert_eq!(b.password_env.as_deref(), Some("PG"));
        assert!(
            validate(&BTreeMap::from([(
                "x".to_string(),
                SecretConfig::default()
            )]))
            .unwrap_err()
            .to_string()
            .contains("secrets.x")
        );
        assert_eq!(
            hosts_of("host=a,b port=5432 hostaddr=10.0.0.1"),
            vec!["a", "b", "10.0.0.1"]
        );
    }
}
