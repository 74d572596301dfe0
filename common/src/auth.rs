//! Who may call what on a coordinator (docs/security.md, "Tokens and roles"): bearer
//! tokens stored as SHA-256 hashes (in the configuration or a tokens file re-read when it
//! changes) and, optionally, JWTs verified against a JWKS file; each maps to roles.
//!
//! Roles: `admin` (everything), `read` (list and inspect), `ingest` (ingest into any
//! table), `ingest:<table>` (ingest into that table only). Auth is on as soon as any token
//! source is configured; with none, every caller is [`Principal::anonymous`] (the
//! explicit opt-out for local development, logged as a warning at start).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

/// The `[auth]` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Tokens listed in the configuration (hashes, never the tokens themselves).
    pub tokens: Vec<TokenEntry>,
    /// A TOML file of `[[tokens]]` entries (same fields), re-read when it changes, so tokens
    /// are added and revoked without a restart (a Kubernetes Secret mounted as a file).
    pub tokens_file: String,
    /// A JWKS file (JSON `{"keys": [...]}`, RSA or EC keys with `kid`): JWTs signed by one
    /// of its keys are accepted; re-read when it changes.
    pub jwks_file: String,
    /// Required `iss` of JWTs (empty: not checked).
    pub jwt_issuer: String,
    /// Required `aud` of JWTs (empty: not checked).
    pub jwt_audience: String,
    /// The JWT claim holding the roles (a list of strings, or a space-separated string).
    pub jwt_roles_claim: String,
    /// Whether gRPC reflection is served without a token (it reveals only the API's shape).
    pub reflection: bool,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            tokens: Vec::new(),
            tokens_file: String::new(),
            jwks_file: String::new(),
            jwt_issuer: String::new(),
            jwt_audience: String::new(),
            jwt_roles_claim: "roles".into(),
            reflection: true,
        }
    }
}

impl AuthConfig {
    /// Whether callers must authenticate (a token source is configured).
    pub fn enabled(&self) -> bool {
        !self.tokens.is_empty() || !self.tokens_file.is_empty() || !self.jwks_file.is_empty()
    }
}

/// One bearer token: its name (who, in the audit log), the SHA-256 of the token (hex) and
/// its roles.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenEntry {
    /// Who holds it (named in the audit log and in errors).
    pub name: String,
    /// Lower- or upper-case hex SHA-256 of the token (`printf %s "$TOKEN" | sha256sum`).
    pub sha256: String,
    /// Its roles: `admin`, `read`, `ingest`, `ingest:<table>`.
    pub roles: Vec<String>,
}

/// What a caller is allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// Everything: create/adopt tables, pause/resume/trigger, add sources, plus read and
    /// ingest.
    Admin,
    /// List and inspect tables, cycles, workers, sources, the leader.
    Read,
    /// Ingest into one table (`Some`) or every table (`None`).
    Ingest(Option<String>),
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "admin" => Ok(Role::Admin),
            "read" => Ok(Role::Read),
            "ingest" => Ok(Role::Ingest(None)),
            _ => match s.strip_prefix("ingest:") {
                Some(t) if !t.is_empty() => Ok(Role::Ingest(Some(t.to_string()))),
                _ => Err(format!(
                    "unknown role '{s}' (roles: admin, read, ingest, ingest:<table>)"
                )),
            },
        }
    }
}

/// What a call does, for authorization.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action<'a> {
    /// Ingest into a table.
    Ingest(&'a str),
    /// Read-only admin calls.
    Read,
    /// Admin mutations.
    Admin,
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The token's name or the JWT's `sub`; `anonymous` when auth is off.
    pub name: String,
    /// How it authenticated: `token`, `jwt` or `none`.
    pub via: &'static str,
    /// Its roles.
    pub roles: Vec<Role>,
}

impl Principal {
    /// The caller when auth is off: may do everything.
    pub fn anonymous() -> Self {
        Principal {
            name: "anonymous".into(),
            via: "none",
            roles: vec![Role::Admin],
        }
    }

    /// Whether the roles allow `action`.
    pub fn may(&self, action: Action<'_>) -> bool {
        self.roles.iter().any(|r| match (r, action) {
            (Role::Admin, _) => true,
            (Role::Read, Action::Read) => true,
            (Role::Ingest(None), Action::Ingest(_)) => true,
            (Role::Ingest(Some(t)), Action::Ingest(table)) => t == table,
            _ => false,
        })
    }

    /// Whether any role allows some ingest (the coarse check before the table is known).
    pub fn may_ingest_somewhere(&self) -> bool {
        self.roles
            .iter()
            .any(|r| matches!(r, Role::Admin | Role::Ingest(_)))
    }

    /// `Ok` if the roles allow `action`, else PERMISSION_DENIED naming who and what.
    pub fn check(&self, action: Action<'_>) -> Result<(), AuthError> {
        if self.may(action) {
            return Ok(());
        }
        let what = match action {
            Action::Ingest(t) => format!("ingest into table '{t}' (role ingest or ingest:{t})"),
            Action::Read => "read (role read or admin)".to_string(),
            Action::Admin => "administer (role admin)".to_string(),
        };
        Err(AuthError::PermissionDenied(format!(
            "'{}' may not {what}",
            self.name
        )))
    }
}

/// Why a caller was refused, or why the auth settings are unusable.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No credentials, or credentials that prove nothing (→ UNAUTHENTICATED).
    #[error("{0}")]
    Unauthenticated(String),
    /// Authenticated, but the roles do not allow the call (→ PERMISSION_DENIED).
    #[error("{0}")]
    PermissionDenied(String),
    /// The `[auth]` settings or files are unusable (at start: the process does not start).
    #[error("auth: {0}")]
    Config(String),
}

impl From<AuthError> for crate::error::Error {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Unauthenticated(m) => crate::error::Error::Unauthenticated(m),
            AuthError::PermissionDenied(m) => crate::error::Error::PermissionDenied(m),
            AuthError::Config(m) => crate::error::Error::Config(format!("auth: {m}")),
        }
    }
}

/// A token entry checked and ready: hash bytes and parsed roles.
#[derive(Debug, Clone)]
struct Token {
    name: String,
    hash: [u8; 32],
    roles: Vec<Role>,
}

fn parse_entries(entries: &[TokenEntry], origin: &str) -> Result<Vec<Token>, AuthError> {
    let mut out = Vec::with_capacity(entries.len());
    for e in entries {
        let what = format!("{origin}: token '{}'", e.name);
        if e.name.is_empty() {
            return Err(AuthError::Config(format!("{origin}: a token has no name")));
        }
        let hex = e.sha256.trim().to_ascii_lowercase();
        let mut hash = [0u8; 32];
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(AuthError::Config(format!(
                "{what}: sha256 must be 64 hex digits (the SHA-256 of the token, not the token)"
            )));
        }
        for (i, b) in hash.iter_mut().enumerate() {
            *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("hex checked");
        }
        if e.roles.is_empty() {
            return Err(AuthError::Config(format!("{what}: no roles")));
        }
        let roles = e
            .roles
            .iter()
            .map(|r| {
                r.parse()
                    .map_err(|m| AuthError::Config(format!("{what}: {m}")))
            })
            .collect::<Result<Vec<Role>, _>>()?;
        if out.iter().any(|t: &Token| t.name == e.name) {
            return Err(AuthError::Config(format!("{what}: the name is used twice")));
        }
        out.push(Token {
            name: e.name.clone(),
            hash,
            roles,
        });
    }
    Ok(out)
}

/// The tokens file's format.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokensFile {
    #[serde(default)]
    tokens: Vec<TokenEntry>,
}

type Stamp = Option<(SystemTime, u64, u64)>;

fn stamp(path: &Path) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

/// A value parsed from a file, re-parsed when the file changes; a new version that does
/// not parse is ignored (logged) and the previous one stays, as for TLS certificates.
struct Reloading<T> {
    path: PathBuf,
    what: &'static str,
    parse: fn(&Path, &str) -> Result<T, AuthError>,
    cached: Mutex<(Stamp, Arc<T>)>,
}

impl<T> Reloading<T> {
    fn load(
        path: &str,
        what: &'static str,
        parse: fn(&Path, &str) -> Result<T, AuthError>,
    ) -> Result<Self, AuthError> {
        let path = PathBuf::from(path);
        let s = stamp(&path);
        let v = Self::read(&path, what, parse)?;
        Ok(Reloading {
            path,
            what,
            parse,
            cached: Mutex::new((s, Arc::new(v))),
        })
    }

    fn read(
        path: &Path,
        what: &'static str,
        parse: fn(&Path, &str) -> Result<T, AuthError>,
    ) -> Result<T, AuthError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            AuthError::Config(format!("cannot read {what} '{}': {e}", path.display()))
        })?;
        parse(path, &text)
    }

    fn current(&self) -> Arc<T> {
        let s = stamp(&self.path);
        let mut cached = self.cached.lock().expect("lock");
        if s != cached.0 {
            match Self::read(&self.path, self.what, self.parse) {
                Ok(v) => {
                    tracing::info!(file = %self.path.display(), "{} reloaded", self.what);
                    *cached = (s, Arc::new(v));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "{} not reloaded; keeping the previous one", self.what)
                }
            }
        }
        cached.1.clone()
    }
}

fn parse_tokens_file(path: &Path, text: &str) -> Result<Vec<Token>, AuthError> {
    let f: TokensFile = toml::from_str(text).map_err(|e| {
        AuthError::Config(format!(
            "auth.tokens_file '{}': {}",
            path.display(),
            e.message()
        ))
    })?;
    parse_entries(&f.tokens, &format!("auth.tokens_file '{}'", path.display()))
}

fn parse_jwks(path: &Path, text: &str) -> Result<jsonwebtoken::jwk::JwkSet, AuthError> {
    let set: jsonwebtoken::jwk::JwkSet = serde_json::from_str(text)
        .map_err(|e| AuthError::Config(format!("auth.jwks_file '{}': {e}", path.display())))?;
    for k in &set.keys {
        jsonwebtoken::DecodingKey::from_jwk(k).map_err(|e| {
            AuthError::Config(format!(
                "auth.jwks_file '{}': key {:?}: {e}",
                path.display(),
                k.common.key_id
            ))
        })?;
    }
    Ok(set)
}

/// Checks credentials against the configured tokens and keys.
pub struct Authenticator {
    inline: Vec<Token>,
    file: Option<Reloading<Vec<Token>>>,
    jwks: Option<Reloading<jsonwebtoken::jwk::JwkSet>>,
    config: AuthConfig,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("inline_tokens", &self.inline.len())
            .field("tokens_file", &self.config.tokens_file)
            .field("jwks_file", &self.config.jwks_file)
            .finish()
    }
}

impl Authenticator {
    /// Builds the authenticator of `[auth]`; `None` when auth is off. Every file is read
    /// and checked now, so a bad setting stops the process at start, naming it.
    pub fn new(config: &AuthConfig) -> Result<Option<Arc<Self>>, AuthError> {
        if !config.enabled() {
            return Ok(None);
        }
        let inline = parse_entries(&config.tokens, "auth.tokens")?;
        let file = (!config.tokens_file.is_empty())
            .then(|| Reloading::load(&config.tokens_file, "auth.tokens_file", parse_tokens_file))
            .transpose()?;
        let jwks = (!config.jwks_file.is_empty())
            .then(|| Reloading::load(&config.jwks_file, "auth.jwks_file", parse_jwks))
            .transpose()?;
        if config.jwt_roles_claim.is_empty() {
            return Err(AuthError::Config("auth.jwt_roles_claim is empty".into()));
        }
        Ok(Some(Arc::new(Authenticator {
            inline,
            file,
            jwks,
            config: config.clone(),
        })))
    }

    /// Whether reflection is open without credentials.
    pub fn reflection_open(&self) -> bool {
        self.config.reflection
    }

    /// The caller named by an `authorization` header value (`Bearer <token or JWT>`).
    pub fn authenticate(&self, header: Option<&str>) -> Result<Principal, AuthError> {
        let header = header.ok_or_else(|| {
            AuthError::Unauthenticated(
                "no credentials: send 'authorization: Bearer <token>' (freshet --token or FRESHET_TOKEN)".into(),
            )
        })?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                AuthError::Unauthenticated(
                    "the authorization header is not 'Bearer <token>'".into(),
                )
            })?;
        let hash = sha256(token.as_bytes());
        let file = self.file.as_ref().map(|f| f.current());
        let listed = self.inline.iter().chain(file.iter().flat_map(|f| f.iter()));
        // Every entry is compared (constant time per entry), so timing tells nothing about
        // which entry or how many bytes matched.
        let mut found: Option<&Token> = None;
        for t in listed {
            if constant_time_eq(&t.hash, &hash) {
                found = Some(t);
            }
        }
        if let Some(t) = found {
            return Ok(Principal {
                name: t.name.clone(),
                via: "token",
                roles: t.roles.clone(),
            });
        }
        if token.matches('.').count() == 2
            && let Some(jwks) = &self.jwks
        {
            return self.verify_jwt(&jwks.current(), token);
        }
        Err(AuthError::Unauthenticated(
            "the token is not known (revoked, mistyped, or for another cluster)".into(),
        ))
    }

    fn verify_jwt(
        &self,
        jwks: &jsonwebtoken::jwk::JwkSet,
        token: &str,
    ) -> Result<Principal, AuthError> {
        use jsonwebtoken::{Algorithm, DecodingKey, Validation};
        let bad = |m: String| AuthError::Unauthenticated(format!("JWT refused: {m}"));
        let header = jsonwebtoken::decode_header(token).map_err(|e| bad(e.to_string()))?;
        // Asymmetric algorithms only: a JWKS holds public keys, and accepting HS* would let
        // a public key be used as an HMAC secret.
        if !matches!(
            header.alg,
            Algorithm::RS256
                | Algorithm::RS384
                | Algorithm::RS512
                | Algorithm::PS256
                | Algorithm::PS384
                | Algorithm::PS512
                | Algorithm::ES256
                | Algorithm::ES384
                | Algorithm::EdDSA
        ) {
            return Err(bad(format!("algorithm {:?} is not accepted", header.alg)));
        }
        let kid = header
            .kid
            .ok_or_else(|| bad("no 'kid' in the header".into()))?;
        let jwk = jwks
            .find(&kid)
            .ok_or_else(|| bad(format!("no key '{kid}' in auth.jwks_file")))?;
        let key = DecodingKey::from_jwk(jwk).map_err(|e| bad(e.to_string()))?;
        let mut v = Validation::new(header.alg);
        v.leeway = 30;
        v.validate_nbf = true;
        v.set_required_spec_claims(&["exp", "sub"]);
        if self.config.jwt_audience.is_empty() {
            v.validate_aud = false;
        } else {
            v.set_audience(&[&self.config.jwt_audience]);
        }
        if !self.config.jwt_issuer.is_empty() {
            v.set_issuer(&[&self.config.jwt_issuer]);
        }
        let data =
            jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(token, &key, &v)
                .map_err(|e| bad(e.to_string()))?;
        let claims = data.claims;
        let sub = claims
            .get("sub")
            .and_then(|s| s.as_str())
            .unwrap_or_default()
            .to_string();
        let names: Vec<String> = match claims.get(&self.config.jwt_roles_claim) {
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect(),
            Some(serde_json::Value::String(s)) => {
                s.split_whitespace().map(str::to_string).collect()
            }
            _ => Vec::new(),
        };
        // Unknown role names in a JWT are skipped (the issuer may carry roles of other
        // services); a JWT with no role of ours authenticates but may do nothing.
        let roles = names.iter().filter_map(|n| n.parse().ok()).collect();
        Ok(Principal {
            name: format!("jwt:{sub}"),
            via: "jwt",
            roles,
        })
    }
}

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// SHA-256 of `data` as lower-case hex (what `sha256` of a [`TokenEntry`] holds).
pub fn sha256_hex(data: &[u8]) -> String {
    sha256(data).iter().map(|b| format!("{b:02x}")).collect()
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, token: &str, roles: &[&str]) -> TokenEntry {
        TokenEntry {
            name: name.into(),
            sha256: sha256_hex(token.as_bytes()),
            roles: roles.iter().map(|r| r.to_string()).collect(),
        }
    }

    fn auth(tokens: Vec<TokenEntry>) -> Arc<Authenticator> {
        Authenticator::new(&AuthConfig {
            tokens,
            ..Default::default()
        })
        .unwrap()
        .unwrap()
    }

    #[test]
    fn roles_allow_exactly_their_actions() {
        let a = auth(vec![
            entry("ops", "t-admin", &["admin"]),
            entry("dash", "t-read", &["read"]),
            entry("orders-app", "t-orders", &["ingest:orders"]),
            entry("loader", "t-all", &["ingest", "read"]),
        ]);
        let p = |t: &str| a.authenticate(Some(&format!("Bearer {t}"))).unwrap();
        let admin = p("t-admin");
        assert!(admin.may(Action::Admin) && admin.may(Action::Read));
        assert!(admin.may(Action::Ingest("x")));
        let read = p("t-read");
        assert!(read.may(Action::Read));
        assert!(!read.may(Action::Admin) && !read.may(Action::Ingest("orders")));
        let orders = p("t-orders");
        assert!(orders.may(Action::Ingest("orders")));
        assert!(!orders.may(Action::Ingest("users")));
        assert!(!orders.may(Action::Read) && !orders.may(Action::Admin));
        let e = orders
            .check(Action::Ingest("users"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("'orders-app' may not ingest into table 'users'"),
            "{e}"
        );
        let loader = p("t-all");
        assert!(loader.may(Action::Ingest("users")) && loader.may(Action::Read));
        assert!(!loader.may(Action::Admin));
    }

    #[test]
    fn missing_malformed_and_unknown_credentials_are_unauthenticated() {
        let a = auth(vec![entry("ops", "secret", &["admin"])]);
        for h in [None, Some("secret"), Some("Bearer "), Some("Basic abc")] {
            assert!(
                matches!(a.authenticate(h), Err(AuthError::Unauthenticated(_))),
                "{h:?}"
            );
        }
        assert!(matches!(
            a.authenticate(Some("Bearer secreT")),
            Err(AuthError::Unauthenticated(_))
        ));
        assert_eq!(a.authenticate(Some("Bearer secret")).unwrap().name, "ops");
    }

    #[test]
    fn bad_settings_are_refused_naming_the_token() {
        let bad = |e: TokenEntry| {
            Authenticator::new(&AuthConfig {
                tokens: vec![e],
                ..Default::default()
            })
            .unwrap_err()
            .to_string()
        };
        let mut e = entry("ci", "x", &["admin"]);
        e.sha256 = "not-a-hash".into();
        assert!(bad(e).contains("token 'ci': sha256 must be 64 hex digits"));
        let e = entry("ci", "x", &["root"]);
        assert!(bad(e).contains("token 'ci': unknown role 'root'"));
        let e = entry("ci", "x", &[]);
        assert!(bad(e).contains("token 'ci': no roles"));
        let e = Authenticator::new(&AuthConfig {
            tokens_file: "/nonexistent/tokens.toml".into(),
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("cannot read auth.tokens_file '/nonexistent/tokens.toml'"),
            "{e}"
        );
        assert!(
            Authenticator::new(&AuthConfig::default())
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn the_tokens_file_is_reread_when_it_changes_and_a_broken_version_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.toml");
        let write = |entries: &[TokenEntry]| {
            let text = toml::to_string(&serde_json::json!({ "tokens": entries })).unwrap();
            // A new inode, as a Kubernetes Secret volume's symlink swap gives.
            let tmp = dir.path().join("tokens.tmp");
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, &path).unwrap();
        };
        write(&[entry("a", "token-a", &["read"])]);
        let a = Authenticator::new(&AuthConfig {
            tokens_file: path.display().to_string(),
            ..Default::default()
        })
        .unwrap()
        .unwrap();
        assert!(a.authenticate(Some("Bearer token-a")).is_ok());
        // Rotation: b added, a revoked.
        write(&[entry("b", "token-b", &["read"])]);
        assert!(a.authenticate(Some("Bearer token-a")).is_err());
        assert_eq!(a.authenticate(Some("Bearer token-b")).unwrap().name, "b");
        // A broken version keeps the last good one.
        std::fs::write(&path, "tokens = 7").unwrap();
        assert_eq!(a.authenticate(Some("Bearer token-b")).unwrap().name, "b");
    }

    /// An ES256 key pair as (JWKS JSON with kid `kid`, encoding key).
    fn es256(kid: &str) -> (String, jsonwebtoken::EncodingKey) {
        use base64::Engine;
        let key = rcgen::KeyPair::generate().unwrap();
        let raw = key.public_key_raw();
        assert_eq!(raw.len(), 65);
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let jwks = serde_json::json!({"keys": [{
            "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": kid,
            "x": b64(&raw[1..33]), "y": b64(&raw[33..65]),
        }]});
        (
            jwks.to_string(),
            jsonwebtoken::EncodingKey::from_ec_der(&key.serialize_der()),
        )
    }

    fn jwt(key: &jsonwebtoken::EncodingKey, kid: &str, claims: serde_json::Value) -> String {
        let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        h.kid = Some(kid.into());
        jsonwebtoken::encode(&h, &claims, key).unwrap()
    }

    #[test]
    fn jwts_signed_by_a_jwks_key_carry_their_roles_and_others_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (jwks, key) = es256("k1");
        let (_, stranger) = es256("k1");
        let path = dir.path().join("jwks.json");
        std::fs::write(&path, jwks).unwrap();
        let a = Authenticator::new(&AuthConfig {
            jwks_file: path.display().to_string(),
            jwt_issuer: "https://idp.example".into(),
            jwt_audience: "freshet".into(),
            ..Default::default()
        })
        .unwrap()
        .unwrap();
        let now = chrono::Utc::now().timestamp();
        let claims = |exp: i64, aud: &str, roles: serde_json::Value| {
            serde_json::json!({"sub": "svc-orders", "iss": "https://idp.example",
                "aud": aud, "exp": exp, "roles": roles})
        };
        let bearer = |t: String| a.authenticate(Some(&format!("Bearer {t}")));
        let ok = bearer(jwt(
            &key,
            "k1",
            claims(
                now + 600,
                "freshet",
                serde_json::json!(["ingest:orders", "other-app:x"]),
            ),
        ))
        .unwrap();
        assert_eq!(ok.name, "jwt:svc-orders");
        assert!(ok.may(Action::Ingest("orders")) && !ok.may(Action::Admin));
        // Roles as a space-separated string.
        let ok = bearer(jwt(
            &key,
            "k1",
            claims(now + 600, "freshet", "read admin".into()),
        ))
        .unwrap();
        assert!(ok.may(Action::Admin));
        // Expired, wrong audience, wrong signer, unknown kid: refused, saying why.
        let refused = |t: String| match bearer(t) {
            Err(AuthError::Unauthenticated(m)) => m,
            other => panic!("{other:?}"),
        };
        assert!(
            refused(jwt(
                &key,
                "k1",
                claims(now - 600, "freshet", "admin".into())
            ))
            .contains("Expired")
        );
        assert!(
            refused(jwt(&key, "k1", claims(now + 600, "other", "admin".into())))
                .contains("Audience")
        );
        assert!(
            refused(jwt(
                &stranger,
                "k1",
                claims(now + 600, "freshet", "admin".into())
            ))
            .contains("Signature")
        );
        assert!(
            refused(jwt(
                &key,
                "k9",
                claims(now + 600, "freshet", "admin".into())
            ))
            .contains("no key 'k9'")
        );
        // An HMAC token whose secret is the public key's text: refused by algorithm.
        let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
        h.kid = Some("k1".into());
        let hs = jsonwebtoken::encode(
            &h,
            &claims(now + 600, "freshet", "admin".into()),
            &jsonwebtoken::EncodingKey::from_secret(b"k"),
        )
        .unwrap();
        assert!(refused(hs).contains("not accepted"));
    }
}
