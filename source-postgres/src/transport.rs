//! The byte stream under both of a source's PostgreSQL connections (the query connection
//! of tokio-postgres and the replication connection of pgwire-replication), opened here so
//! the two get the same TLS and the same refusal of cleartext passwords:
//!
//! * TLS as libpq's `sslmode` asks (see [`freshet_common::source::SslMode`]), with rustls
//!   and ring: the SSLRequest (or, with `sslnegotiation=direct`, a direct handshake), then
//!   the server's certificate verified against `sslrootcert` (`verify-ca`: the chain;
//!   `verify-full`: the chain and the host name; `prefer`/`require`: nothing).
//! * On TCP without TLS, the server's messages are read until authentication ends, and a
//!   request for the password in cleartext (`AuthenticationCleartextPassword`) ends the
//!   connection before the client sees it, so the password is never sent, unless the
//!   source allows it. MD5 is answered (the password does not travel in clear; an
//!   eavesdropper can still replay nothing but may guess offline). Unix-domain sockets do
//!   not leave the machine and are not checked; libpq does not use TLS on them either.
//!
//! tokio-postgres takes the stream through `Config::connect_raw`. pgwire-replication opens
//! its own socket, so it is pointed at a relay: a Unix-domain socket in a fresh directory
//! only this user can enter, accepting one connection and copying it to the stream opened
//! here.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use freshet_common::source::{PostgresTls, SslMode};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio_postgres::config::{Host, SslNegotiation};

use crate::config::SourceConfig;
use crate::error::{Result, SourceError};

/// The socket, encrypted or not.
enum Transport {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    Unix(UnixStream),
}

/// A connection to PostgreSQL, before the startup message: see the module documentation.
pub struct PgStream {
    inner: Transport,
    /// Reads the server's authentication messages (TCP without TLS, cleartext not allowed).
    scan: Option<AuthScan>,
    refused: Arc<AtomicBool>,
}

/// An opened stream and what the errors of the session on it name.
pub struct Opened {
    pub stream: PgStream,
    /// `host:port` (or the socket path) it is connected to.
    pub peer: String,
    /// Set when the server asked for a cleartext password and the stream refused it.
    pub refused: Arc<AtomicBool>,
}

impl Opened {
    /// The error for a session on this stream that failed: the cleartext refusal when
    /// that is why, else `other`.
    pub fn refusal(
        source: &str,
        peer: &str,
        refused: &AtomicBool,
        other: SourceError,
    ) -> SourceError {
        if refused.load(Ordering::SeqCst) {
            SourceError::Connect {
                name: source.to_string(),
                host: peer.to_string(),
                message: "the server asks for the password in cleartext on a connection \
                          that is not encrypted; refused before sending it (use TLS: sslmode \
                          = \"require\" or stronger, have the server ask for scram-sha-256, or \
                          set allow_cleartext_password = true)"
                    .into(),
            }
        } else {
            other
        }
    }
}

/// Opens a connection to the first host of `pg` (tokio-postgres's parsed connection
/// string, `sslmode` taken out) that answers, with `tls`.
pub async fn open(
    source: &SourceConfig,
    pg: &tokio_postgres::Config,
    tls: &PostgresTls,
) -> Result<Opened> {
    let hosts = pg.get_hosts();
    let addrs = pg.get_hostaddrs();
    let n = hosts.len().max(addrs.len());
    let config_error = |m: String| SourceError::Config(format!("source '{}': {m}", source.name));
    if n == 0 {
        return Err(config_error("the connection string needs host=".into()));
    }
    if !hosts.is_empty() && !addrs.is_empty() && hosts.len() != addrs.len() {
        return Err(config_error(
            "as many hostaddr= as host= values, please".into(),
        ));
    }
    let ports = pg.get_ports();
    let mut last = None;
    for i in 0..n {
        let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
        let (target, name) = match (hosts.get(i), addrs.get(i)) {
            #[cfg(unix)]
            (Some(Host::Unix(dir)), _) => {
                (Target::Unix(dir.join(format!(".s.PGSQL.{port}"))), None)
            }
            (Some(Host::Tcp(h)), Some(a)) => (Target::Tcp(a.to_string()), Some(h.clone())),
            (Some(Host::Tcp(h)), None) => (Target::Tcp(h.clone()), Some(h.clone())),
            (None, Some(a)) => (Target::Tcp(a.to_string()), Some(a.to_string())),
            (None, None) => unreachable!("i < max(hosts, hostaddrs)"),
        };
        let peer = match &target {
            Target::Tcp(_) => format!("{}:{port}", name.as_deref().unwrap_or_default()),
            #[cfg(unix)]
            Target::Unix(p) => p.display().to_string(),
        };
        let attempt = open_one(pg, tls, &target, name.as_deref(), port);
        let r = match pg.get_connect_timeout() {
            Some(t) => tokio::time::timeout(*t, attempt)
                .await
                .unwrap_or_else(|_| Err(format!("no connection within {t:?} (connect_timeout)"))),
            None => attempt.await,
        };
        match r {
            Ok(inner) => {
                let refused = Arc::new(AtomicBool::new(false));
                let guard = matches!(inner, Transport::Plain(_)) && !tls.allow_cleartext_password;
                return Ok(Opened {
                    stream: PgStream {
                        inner,
                        scan: guard.then(AuthScan::default),
                        refused: refused.clone(),
                    },
                    peer,
                    refused,
                });
            }
            Err(message) => {
                last = Some(SourceError::Connect {
                    name: source.name.clone(),
                    host: peer,
                    message,
                })
            }
        }
    }
    Err(last.expect("at least one host"))
}

enum Target {
    Tcp(String),
    #[cfg(unix)]
    Unix(PathBuf),
}

/// PostgreSQL's SSLRequest: length 8, code 80877103.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

async fn open_one(
    pg: &tokio_postgres::Config,
    tls: &PostgresTls,
    target: &Target,
    name: Option<&str>,
    port: u16,
) -> std::result::Result<Transport, String> {
    let addr = match target {
        #[cfg(unix)]
        Target::Unix(path) => {
            return UnixStream::connect(path)
                .await
                .map(Transport::Unix)
                .map_err(|e| format!("cannot connect: {e}"));
        }
        Target::Tcp(addr) => addr,
    };
    let mut tcp = TcpStream::connect((addr.as_str(), port))
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    if pg.get_keepalives() {
        let mut k = socket2::TcpKeepalive::new().with_time(pg.get_keepalives_idle());
        #[cfg(any(target_os = "linux", target_os = "macos"))]
        {
            if let Some(i) = pg.get_keepalives_interval() {
                k = k.with_interval(i);
            }
            if let Some(r) = pg.get_keepalives_retries() {
                k = k.with_retries(r);
            }
        }
        let _ = socket2::SockRef::from(&tcp).set_tcp_keepalive(&k);
    }
    #[cfg(target_os = "linux")]
    if let Some(t) = pg.get_tcp_user_timeout() {
        let _ = socket2::SockRef::from(&tcp).set_tcp_user_timeout(Some(*t));
    }
    if tls.mode == SslMode::Disable {
        return Ok(Transport::Plain(tcp));
    }
    let direct = pg.get_ssl_negotiation() == SslNegotiation::Direct;
    if direct && tls.mode == SslMode::Prefer {
        return Err("sslnegotiation=direct needs sslmode require or stronger".into());
    }
    if !direct {
        let io = |e: io::Error| format!("asking for TLS: {e}");
        tcp.write_all(&SSL_REQUEST).await.map_err(io)?;
        let answer = tcp.read_u8().await.map_err(io)?;
        match answer {
            b'S' => {}
            b'N' if tls.mode == SslMode::Prefer => return Ok(Transport::Plain(tcp)),
            b'N' => {
                return Err(format!(
                    "the server does not accept TLS connections (ssl = off), and sslmode is {}",
                    tls.mode.as_str()
                ));
            }
            other => {
                return Err(format!(
                    "unexpected answer {other:#04x} to the request for TLS"
                ));
            }
        }
    }
    let name = name.unwrap_or(addr);
    let server_name = ServerName::try_from(name.to_string())
        .map_err(|e| format!("'{name}' cannot be a TLS server name: {e}"))?;
    let config = client_config(tls)?;
    let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(server_name, tcp)
        .await
        .map_err(|e| handshake_error(e, tls, name))?;
    Ok(Transport::Tls(Box::new(stream)))
}

fn handshake_error(e: io::Error, tls: &PostgresTls, name: &str) -> String {
    use rustls::CertificateError as C;
    let mode = tls.mode.as_str();
    let ca = tls.root_cert.as_deref().unwrap_or_default();
    let why = match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::InvalidCertificate(C::UnknownIssuer)) => {
            format!("the server's certificate is not signed by a CA in sslrootcert '{ca}' ({e})")
        }
        Some(rustls::Error::InvalidCertificate(
            C::NotValidForName | C::NotValidForNameContext { .. },
        )) => format!(
            "the server's certificate is not for '{name}' (verify-full checks the host name, verify-ca does not): {e}"
        ),
        Some(rustls::Error::InvalidCertificate(C::Expired | C::ExpiredContext { .. })) => {
            format!("the server's certificate has expired: {e}")
        }
        _ => e.to_string(),
    };
    format!("TLS handshake failed (sslmode={mode}): {why}")
}

/// The rustls client configuration for `tls` (read now, so a replaced CA file counts at
/// the next connection).
fn client_config(tls: &PostgresTls) -> std::result::Result<rustls::ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier: Arc<dyn ServerCertVerifier> = match (tls.mode, &tls.root_cert) {
        (SslMode::VerifyCa | SslMode::VerifyFull, Some(file)) => {
            let path = Path::new(file);
            let mut roots = RootCertStore::empty();
            for c in
                freshet_common::tls::read_certs("sslrootcert", path).map_err(|e| e.to_string())?
            {
                roots.add(c).map_err(|e| {
                    format!("sslrootcert file '{file}': not a usable CA certificate: {e}")
                })?;
            }
            let roots = Arc::new(roots);
            if tls.mode == SslMode::VerifyFull {
                rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                    .build()
                    .map_err(|e| format!("sslrootcert file '{file}': {e}"))?
            } else {
                Arc::new(ChainOnly {
                    roots,
                    provider: provider.clone(),
                })
            }
        }
        (SslMode::VerifyCa | SslMode::VerifyFull, None) => {
            return Err(format!("sslmode={} needs sslrootcert", tls.mode.as_str()));
        }
        _ => Arc::new(Unverified(provider.clone())),
    };
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth())
}

/// `verify-ca`: the certificate chains to a root of `sslrootcert` and is valid now; the
/// names in it are not compared with the host.
#[derive(Debug)]
struct ChainOnly {
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// `prefer` and `require` (as libpq): any certificate; the handshake's signatures are
/// still checked against the certificate's key.
#[derive(Debug)]
struct Unverified(Arc<CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Follows the server's messages (tag, 4-byte length, body) until `AuthenticationOk`.
#[derive(Debug, Default)]
struct AuthScan {
    header: [u8; 5],
    header_len: usize,
    /// Body bytes of the current message not read yet.
    body_left: usize,
    /// The first four body bytes of an `R` message: the authentication request's code.
    code: [u8; 4],
    code_len: usize,
    done: bool,
}

/// `AuthenticationCleartextPassword`.
const AUTH_CLEARTEXT: i32 = 3;

impl AuthScan {
    /// Reads `bytes`; `Err` when the server asks for a cleartext password.
    fn feed(&mut self, mut bytes: &[u8]) -> std::result::Result<(), ()> {
        while !bytes.is_empty() && !self.done {
            if self.header_len < 5 {
                self.header[self.header_len] = bytes[0];
                self.header_len += 1;
                bytes = &bytes[1..];
                if self.header_len == 5 {
                    let len = u32::from_be_bytes(self.header[1..5].try_into().expect("4 bytes"));
                    // A malformed length is the client's to report.
                    self.body_left = (len as usize).saturating_sub(4);
                    self.code_len = 0;
                    if self.body_left == 0 {
                        self.header_len = 0;
                    }
                }
                continue;
            }
            let take = self.body_left.min(bytes.len());
            if self.header[0] == b'R' && self.code_len < 4 {
                let n = (4 - self.code_len).min(take);
                self.code[self.code_len..self.code_len + n].copy_from_slice(&bytes[..n]);
                self.code_len += n;
                if self.code_len == 4 {
                    match i32::from_be_bytes(self.code) {
                        AUTH_CLEARTEXT => return Err(()),
                        0 => self.done = true,
                        _ => {}
                    }
                }
            }
            bytes = &bytes[take..];
            self.body_left -= take;
            if self.body_left == 0 {
                self.header_len = 0;
            }
        }
        Ok(())
    }
}

impl AsyncRead for PgStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        ready!(match &mut this.inner {
            Transport::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Transport::Unix(s) => Pin::new(s).poll_read(cx, buf),
        })?;
        if let Some(scan) = &mut this.scan {
            if scan.feed(&buf.filled()[before..]).is_err() {
                // The request is not handed on: the client never answers it.
                buf.set_filled(before);
                this.refused.store(true, Ordering::SeqCst);
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    "the server asks for a cleartext password on an unencrypted connection (refused)",
                )));
            }
            if scan.done {
                this.scan = None;
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for PgStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.refused.load(Ordering::SeqCst) {
            return Poll::Ready(Err(io::ErrorKind::PermissionDenied.into()));
        }
        match &mut self.get_mut().inner {
            Transport::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Transport::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().inner {
            Transport::Plain(s) => Pin::new(s).poll_flush(cx),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Transport::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().inner {
            Transport::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Transport::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

pub use crate::config::RELAY_PORT;

/// Serves `stream` to one client on a Unix-domain socket `<dir>/.s.PGSQL.5432` in a new
/// directory of mode 0700 (so only this user can connect); returns the directory. The
/// socket and directory are removed once the client connects (or after a minute without
/// one); the copying ends when either side closes.
pub fn relay(stream: PgStream) -> io::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    let mut dir = PathBuf::new();
    for attempt in 0.. {
        dir = std::env::temp_dir().join(format!(
            "freshet-repl-{}-{}-{nanos:x}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => break,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempt < 10 => continue,
            Err(e) => return Err(e),
        }
    }
    let guard = RemoveDir(dir.clone());
    let listener = tokio::net::UnixListener::bind(dir.join(format!(".s.PGSQL.{RELAY_PORT}")))?;
    tokio::spawn(async move {
        let accepted = tokio::time::timeout(Duration::from_secs(60), listener.accept()).await;
        drop(listener);
        drop(guard);
        if let Ok(Ok((mut client, _))) = accepted {
            let mut upstream = stream;
            let _ = tokio::io::copy_bidirectional_with_sizes(
                &mut client,
                &mut upstream,
                64 << 10,
                64 << 10,
            )
            .await;
        }
    });
    Ok(dir)
}

struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![tag];
        m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    #[test]
    fn the_scan_stops_at_a_cleartext_request_in_any_split_and_not_after_auth_ok() {
        let sasl = msg(b'R', &[0, 0, 0, 10, b'S', b'C', b'R', b'A', b'M', 0, 0]);
        let notice = msg(b'N', b"Shello\0\0");
        let clear = msg(b'R', &3i32.to_be_bytes());
        let ok = msg(b'R', &0i32.to_be_bytes());
        let stream: Vec<u8> = [notice.clone(), sasl.clone(), clear.clone()].concat();
        for chunk in 1..stream.len() {
            let mut s = AuthScan::default();
            let refused = stream.chunks(chunk).any(|c| s.feed(c).is_err());
            assert!(refused, "chunks of {chunk}");
        }
        // SCRAM then AuthenticationOk: never refused; what follows is not read.
        let fine: Vec<u8> = [sasl, ok, clear.clone(), notice].concat();
        for chunk in 1..fine.len() {
            let mut s = AuthScan::default();
            assert!(
                fine.chunks(chunk).all(|c| s.feed(c).is_ok()),
                "chunks of {chunk}"
            );
            assert!(s.done);
        }
        // A server error (e.g. no pg_hba.conf entry) passes.
        let mut s = AuthScan::default();
        assert!(s.feed(&msg(b'E', b"SFATAL\0\0")).is_ok());
        // MD5 (code 5) is answered.
        assert!(s.feed(&msg(b'R', &[0, 0, 0, 5, 1, 2, 3, 4])).is_ok());
        assert!(s.feed(&clear).is_err());
    }

    #[test]
    fn verify_modes_need_a_readable_ca() {
        let tls = PostgresTls {
            mode: SslMode::VerifyFull,
            root_cert: Some("/nonexistent/ca.pem".into()),
            allow_cleartext_password: false,
        };
        let e = client_config(&tls).unwrap_err();
        assert!(
            e.contains("sslrootcert") && e.contains("/nonexistent/ca.pem"),
            "{e}"
        );
        let tls = PostgresTls {
            mode: SslMode::Require,
            root_cert: None,
            allow_cleartext_password: false,
        };
        assert!(client_config(&tls).is_ok());
    }
}
