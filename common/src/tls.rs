//! TLS (rustls with ring) for every gRPC server and client: certificates, keys and CA
//! bundles from PEM files, re-read when the files change (cert-manager rotates them in
//! place), so new connections get the new certificate without a restart.
//!
//! Servers serve a stream of [`ServerIo`] from [`incoming`]; clients dial through
//! [`ClientTls::channel`], a tonic channel over a rustls connector.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use rustls::RootCertStore;
use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tonic::codegen::http::Uri;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tonic::transport::{Channel, Endpoint};

use crate::config::TlsConfig;

/// A TLS setup error; each names the file and the setting it came from.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {what} file '{}': {source}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A file holds no usable PEM item or a malformed one.
    #[error("{what} file '{}': {message}", path.display())]
    Invalid {
        what: &'static str,
        path: PathBuf,
        message: String,
    },
    /// The settings do not fit together.
    #[error("tls: {0}")]
    Config(String),
}

impl From<TlsError> for crate::error::Error {
    fn from(e: TlsError) -> Self {
        crate::error::Error::Config(e.to_string())
    }
}

/// The crypto provider of every TLS config Freshet builds (explicit, because other
/// dependencies enable both ring and aws-lc-rs in rustls, and then no default is chosen).
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// What identifies a version of a file: modification time, length and inode, so an
/// in-place rewrite or an atomic symlink swap (Kubernetes Secret volumes) is noticed.
type Stamp = Option<(SystemTime, u64, u64)>;

fn stamp(path: &Path) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

fn invalid(what: &'static str, path: &Path, message: impl Into<String>) -> TlsError {
    TlsError::Invalid {
        what,
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// Reads every PEM certificate of a file (at least one).
pub fn read_certs(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(what, path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(what, path, format!("bad PEM: {e}")))?;
    if certs.is_empty() {
        return Err(invalid(what, path, "no PEM certificate in it"));
    }
    Ok(certs)
}

fn read_roots(path: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in read_certs("tls.ca_file", path)? {
        roots.add(c).map_err(|e| {
            invalid(
                "tls.ca_file",
                path,
                format!("not a usable CA certificate: {e}"),
            )
        })?;
    }
    Ok(Arc::new(roots))
}

fn read_certified_key(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, TlsError> {
    let chain = read_certs("tls.cert_file", cert)?;
    let key_bytes = read("tls.key_file", key)?;
    let key_der = PrivateKeyDer::from_pem_slice(&key_bytes).map_err(|e| {
        invalid(
            "tls.key_file",
            key,
            format!("no usable PEM private key: {e}"),
        )
    })?;
    let ck = CertifiedKey::from_der(chain, key_der, &provider()).map_err(|e| {
        invalid(
            "tls.key_file",
            key,
            format!("does not fit the certificate in '{}': {e}", cert.display()),
        )
    })?;
    Ok(Arc::new(ck))
}

/// A certificate and key from files, re-read on the next handshake after either changes.
/// A half-written pair (key not matching the certificate yet) keeps the previous one.
#[derive(Debug)]
pub struct CertSource {
    cert: PathBuf,
    key: PathBuf,
    current: Mutex<((Stamp, Stamp), Arc<CertifiedKey>)>,
}

impl CertSource {
    /// Loads the pair now (errors name the file).
    pub fn load(cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Result<Self, TlsError> {
        let (cert, key) = (cert.into(), key.into());
        let stamps = (stamp(&cert), stamp(&key));
        let ck = read_certified_key(&cert, &key)?;
        Ok(CertSource {
            cert,
            key,
            current: Mutex::new((stamps, ck)),
        })
    }

    /// The current pair, re-read first if a file changed.
    pub fn current(&self) -> Arc<CertifiedKey> {
        let stamps = (stamp(&self.cert), stamp(&self.key));
        let mut cur = self.current.lock().expect("lock");
        if cur.0 != stamps {
            match read_certified_key(&self.cert, &self.key) {
                Ok(ck) => {
                    tracing::info!(cert = %self.cert.display(), "TLS certificate reloaded");
                    *cur = (stamps, ck);
                }
                // Not recorded as seen: the next handshake tries again (the other file of
                // the pair is probably about to be replaced too).
                Err(e) => {
                    tracing::warn!(error = %e, "TLS certificate not reloaded; keeping the previous one")
                }
            }
        }
        cur.1.clone()
    }
}

impl ResolvesServerCert for CertSource {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

impl ResolvesClientCert for CertSource {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// A value built from the CA file, rebuilt when the file changes (a rotated CA bundle).
#[derive(Debug)]
struct ByCa<T> {
    ca: Option<PathBuf>,
    cached: Mutex<(Stamp, Arc<T>)>,
}

impl<T> ByCa<T> {
    fn new(
        ca: Option<PathBuf>,
        build: impl Fn(Option<Arc<RootCertStore>>) -> Result<T, TlsError>,
    ) -> Result<Self, TlsError> {
        let s = ca.as_deref().and_then(stamp);
        let roots = ca.as_deref().map(read_roots).transpose()?;
        Ok(ByCa {
            cached: Mutex::new((s, Arc::new(build(roots)?))),
            ca,
        })
    }

    fn get(&self, build: impl Fn(Option<Arc<RootCertStore>>) -> Result<T, TlsError>) -> Arc<T> {
        let mut cached = self.cached.lock().expect("lock");
        if let Some(ca) = &self.ca {
            let s = stamp(ca);
            if s != cached.0 {
                match read_roots(ca).and_then(|r| build(Some(r))) {
                    Ok(v) => {
                        tracing::info!(ca = %ca.display(), "TLS CA bundle reloaded");
                        *cached = (s, Arc::new(v));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "TLS CA bundle not reloaded; keeping the previous one")
                    }
                }
            }
        }
        cached.1.clone()
    }
}

/// Whether a server asks clients for a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// No client certificates.
    None,
    /// Verified against the CA when presented; clients without one are let in.
    Optional,
    /// Required and verified against the CA.
    Required,
}

/// A server's TLS: its certificate (reloaded) and how it verifies clients.
#[derive(Debug)]
pub struct ServerTls {
    certs: Arc<CertSource>,
    auth: ClientAuth,
    alpn: &'static [u8],
    config: ByCa<rustls::ServerConfig>,
}

impl ServerTls {
    /// Loads `cert`/`key` and, for client authentication, the CA bundle `ca`.
    pub fn new(
        cert: &Path,
        key: &Path,
        ca: Option<&Path>,
        auth: ClientAuth,
    ) -> Result<Self, TlsError> {
        if auth != ClientAuth::None && ca.is_none() {
            return Err(TlsError::Config(
                "client certificates need tls.ca_file to verify them with".into(),
            ));
        }
        Self::with_alpn(cert, key, ca, auth, b"h2")
    }

    /// [`ServerTls::new`] for another application protocol than gRPC's HTTP/2.
    fn with_alpn(
        cert: &Path,
        key: &Path,
        ca: Option<&Path>,
        auth: ClientAuth,
        alpn: &'static [u8],
    ) -> Result<Self, TlsError> {
        let certs = Arc::new(CertSource::load(cert, key)?);
        let config = ByCa::new(ca.map(Path::to_path_buf), |roots| {
            server_config(&certs, auth, roots, alpn)
        })?;
        Ok(ServerTls {
            certs,
            auth,
            alpn,
            config,
        })
    }

    /// The TLS of the HTTP port (`/metrics`, `/livez`, `/readyz`) when `tls.http` is set:
    /// the process's certificate, HTTP/1.1, no client certificates (kubelet probes and
    /// Prometheus present none).
    pub fn http(cfg: &TlsConfig) -> Result<Option<Arc<Self>>, TlsError> {
        if !cfg.http {
            return Ok(None);
        }
        if !check(cfg)? {
            return Err(TlsError::Config(
                "tls.http needs tls.cert_file and tls.key_file".into(),
            ));
        }
        Self::with_alpn(
            cfg.cert_file.as_ref(),
            cfg.key_file.as_ref(),
            None,
            ClientAuth::None,
            b"http/1.1",
        )
        .map(|t| Some(Arc::new(t)))
    }

    /// A coordinator's server TLS from `[tls]` (None: plaintext). Client certificates are
    /// verified when presented and required with `require_client_cert`.
    pub fn coordinator(cfg: &TlsConfig) -> Result<Option<Arc<Self>>, TlsError> {
        if !check(cfg)? {
            return Ok(None);
        }
        let auth = match (cfg.ca_file.is_empty(), cfg.require_client_cert) {
            (_, true) => ClientAuth::Required,
            (false, false) => ClientAuth::Optional,
            (true, false) => ClientAuth::None,
        };
        let ca = (!cfg.ca_file.is_empty()).then(|| Path::new(&cfg.ca_file));
        Self::new(cfg.cert_file.as_ref(), cfg.key_file.as_ref(), ca, auth)
            .map(|t| Some(Arc::new(t)))
    }

    /// A worker's server TLS from `[tls]` (None: plaintext). In TLS mode a worker always
    /// requires a client certificate of the CA: it takes work only from coordinators.
    pub fn worker(cfg: &TlsConfig) -> Result<Option<Arc<Self>>, TlsError> {
        if !check(cfg)? {
            return Ok(None);
        }
        if cfg.ca_file.is_empty() {
            return Err(TlsError::Config(
                "a worker with TLS needs tls.ca_file: it accepts only coordinators' client certificates of that CA"
                    .into(),
            ));
        }
        Self::new(
            cfg.cert_file.as_ref(),
            cfg.key_file.as_ref(),
            Some(Path::new(&cfg.ca_file)),
            ClientAuth::Required,
        )
        .map(|t| Some(Arc::new(t)))
    }

    /// The rustls config for the next connection (rebuilt if the CA file changed).
    pub fn config(&self) -> Arc<rustls::ServerConfig> {
        self.config
            .get(|roots| server_config(&self.certs, self.auth, roots, self.alpn))
    }
}

/// Whether TLS is on; refuses a half-configured section.
fn check(cfg: &TlsConfig) -> Result<bool, TlsError> {
    match (cfg.cert_file.is_empty(), cfg.key_file.is_empty()) {
        (true, true) => {
            if cfg.require_client_cert {
                return Err(TlsError::Config(
                    "tls.require_client_cert needs tls.cert_file and tls.key_file".into(),
                ));
            }
            Ok(false)
        }
        (false, false) => Ok(true),
        (false, true) => Err(TlsError::Config(
            "tls.cert_file is set but tls.key_file is not".into(),
        )),
        (true, false) => Err(TlsError::Config(
            "tls.key_file is set but tls.cert_file is not".into(),
        )),
    }
}

fn server_config(
    certs: &Arc<CertSource>,
    auth: ClientAuth,
    roots: Option<Arc<RootCertStore>>,
    alpn: &'static [u8],
) -> Result<rustls::ServerConfig, TlsError> {
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match (auth, roots) {
        (ClientAuth::None, _) | (_, None) => builder.with_no_client_auth(),
        (auth, Some(roots)) => {
            let v = WebPkiClientVerifier::builder_with_provider(roots, provider());
            let v = if auth == ClientAuth::Optional {
                v.allow_unauthenticated()
            } else {
                v
            };
            builder.with_client_cert_verifier(
                v.build()
                    .map_err(|e| TlsError::Config(format!("client verifier: {e}")))?,
            )
        }
    };
    let mut config = builder.with_cert_resolver(certs.clone());
    // gRPC is HTTP/2: clients (grpcurl, grpc-go) insist on ALPN h2; the HTTP port speaks
    // HTTP/1.1.
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(config)
}

/// A client's TLS: the CA bundle servers are verified with and, for mutual TLS, the
/// client's own certificate (reloaded).
#[derive(Debug)]
pub struct ClientTls {
    certs: Option<Arc<CertSource>>,
    config: ByCa<rustls::ClientConfig>,
    /// Verify this name in the server's certificate instead of the dialled host.
    server_name: Option<String>,
}

impl ClientTls {
    /// Verifies servers with the CA bundle `ca`; presents `cert`/`key` when given.
    pub fn new(ca: &Path, identity: Option<(&Path, &Path)>) -> Result<Self, TlsError> {
        let certs = identity
            .map(|(c, k)| CertSource::load(c, k).map(Arc::new))
            .transpose()?;
        let config = ByCa::new(Some(ca.to_path_buf()), |roots| {
            client_config(certs.as_ref(), roots)
        })?;
        Ok(ClientTls {
            certs,
            config,
            server_name: None,
        })
    }

    /// Verifies `name` in every server's certificate instead of the host dialled.
    pub fn with_server_name(mut self, name: impl Into<String>) -> Self {
        let name = name.into();
        self.server_name = (!name.is_empty()).then_some(name);
        self
    }

    /// The coordinator's worker-client TLS from `[tls]` (None: plaintext): verifies
    /// workers with `ca_file` and presents the coordinator's own certificate.
    pub fn from_config(cfg: &TlsConfig) -> Result<Option<Arc<Self>>, TlsError> {
        if !check(cfg)? {
            return Ok(None);
        }
        if cfg.ca_file.is_empty() {
            return Err(TlsError::Config(
                "tls.ca_file is needed to verify workers' certificates".into(),
            ));
        }
        Self::new(
            Path::new(&cfg.ca_file),
            Some((cfg.cert_file.as_ref(), cfg.key_file.as_ref())),
        )
        .map(|t| Some(Arc::new(t.with_server_name(cfg.worker_server_name.clone()))))
    }

    /// The rustls config for the next connection (rebuilt if the CA file changed).
    pub fn config(&self) -> Arc<rustls::ClientConfig> {
        self.config
            .get(|roots| client_config(self.certs.as_ref(), roots))
    }

    /// A lazily connecting channel to `endpoint` (`https://host:port`) over TLS.
    pub fn channel(self: &Arc<Self>, endpoint: Endpoint) -> Channel {
        for_connector(endpoint).connect_with_connector_lazy(TlsConnector(self.clone()))
    }

    /// A channel to `endpoint` over TLS, connected now.
    pub async fn connect(
        self: &Arc<Self>,
        endpoint: Endpoint,
    ) -> Result<Channel, tonic::transport::Error> {
        for_connector(endpoint)
            .connect_with_connector(TlsConnector(self.clone()))
            .await
    }
}

/// The endpoint tonic is given for [`TlsConnector`]: when any crate enables one of tonic's
/// own TLS features (etcd-client's `tls` does), tonic refuses an `https://` URI on a custom
/// connector. The TLS is ours, so tonic dials `http://` with the same host and port while
/// requests keep the `https` origin; the endpoint's connection settings are carried over.
fn for_connector(endpoint: Endpoint) -> Endpoint {
    let uri = endpoint.uri().clone();
    if uri.scheme_str() != Some("https") {
        return endpoint;
    }
    let mut parts = uri.clone().into_parts();
    parts.scheme = Some(tonic::codegen::http::uri::Scheme::HTTP);
    let Ok(plain) = Uri::from_parts(parts) else {
        return endpoint;
    };
    let mut e = Endpoint::from(plain)
        .origin(uri)
        .tcp_nodelay(endpoint.get_tcp_nodelay())
        .tcp_keepalive(endpoint.get_tcp_keepalive());
    if let Some(t) = endpoint.get_connect_timeout() {
        e = e.connect_timeout(t);
    }
    e
}

fn client_config(
    certs: Option<&Arc<CertSource>>,
    roots: Option<Arc<RootCertStore>>,
) -> Result<rustls::ClientConfig, TlsError> {
    let roots = roots.ok_or_else(|| TlsError::Config("a client needs a CA bundle".into()))?;
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots);
    let mut config = match certs {
        Some(c) => builder.with_client_cert_resolver(c.clone()),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// Connects TCP, then TLS, verifying the server against the URI's host name or IP.
#[derive(Clone)]
struct TlsConnector(Arc<ClientTls>);

type ClientIo = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;

impl tonic::codegen::Service<Uri> for TlsConnector {
    type Response = ClientIo;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<ClientIo>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let config = self.0.config();
        let server_name = self.0.server_name.clone();
        Box::pin(async move {
            let host = uri
                .host()
                .ok_or_else(|| io::Error::other(format!("no host in '{uri}'")))?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let port = uri.port_u16().unwrap_or(443);
            let verify = server_name.unwrap_or_else(|| host.clone());
            let name = ServerName::try_from(verify.clone()).map_err(|e| {
                io::Error::other(format!("'{verify}' is not a TLS server name: {e}"))
            })?;
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            let _ = tcp.set_nodelay(true);
            tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .map(hyper_util::rt::TokioIo::new)
                .map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!("TLS handshake with {host}:{port} failed: {e}"),
                    )
                })
        })
    }
}

/// A connection a server accepted: plaintext or TLS.
pub enum ServerIo {
    /// Plaintext (no `[tls]`).
    Plain(TcpStream),
    /// After a completed TLS handshake.
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl ServerIo {
    /// The client's certificate chain, if it presented one (verified against the CA).
    pub fn peer_certificates(&self) -> Option<&[CertificateDer<'static>]> {
        match self {
            ServerIo::Plain(_) => None,
            ServerIo::Tls(s) => s.get_ref().1.peer_certificates(),
        }
    }

    /// The client's address.
    pub fn peer_addr(&self) -> io::Result<std::net::SocketAddr> {
        match self {
            ServerIo::Plain(t) => t.peer_addr(),
            ServerIo::Tls(s) => s.get_ref().0.peer_addr(),
        }
    }
}

impl Connected for ServerIo {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        match self {
            ServerIo::Plain(s) => s.connect_info(),
            ServerIo::Tls(s) => s.get_ref().0.connect_info(),
        }
    }
}

impl AsyncRead for ServerIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ServerIo::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ServerIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ServerIo::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ServerIo::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ServerIo::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            ServerIo::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            ServerIo::Plain(s) => s.is_write_vectored(),
            ServerIo::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerIo::Plain(s) => Pin::new(s).poll_flush(cx),
            ServerIo::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ServerIo::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Longest a client may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The connections of `listener` for tonic's `serve_with_incoming`: plaintext without
/// `tls`, else each after its TLS handshake. Handshakes run in their own tasks, so a slow
/// or hostile client delays nobody else; failed handshakes are logged and dropped.
pub fn incoming(
    listener: TcpListener,
    tls: Option<Arc<ServerTls>>,
) -> impl futures::Stream<Item = io::Result<ServerIo>> + Send + 'static {
    let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<ServerIo>>(64);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                // The server stopped: stop accepting (and free the port).
                _ = tx.closed() => return,
                a = listener.accept() => a,
            };
            let (tcp, peer) = match accepted {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let Some(tls) = &tls else {
                if tx.send(Ok(ServerIo::Plain(tcp))).await.is_err() {
                    return;
                }
                continue;
            };
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.config());
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => {
                        let _ = tx.send(Ok(ServerIo::Tls(Box::new(s)))).await;
                    }
                    Ok(Err(e)) => tracing::info!(%peer, error = %e, "TLS handshake refused"),
                    Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_configured_tls_is_refused_and_files_are_named() {
        let mut cfg = TlsConfig {
            cert_file: "/nonexistent/cert.pem".into(),
            ..Default::default()
        };
        let e = ServerTls::coordinator(&cfg).unwrap_err().to_string();
        assert!(
            e.contains("tls.key_file is set") || e.contains("key_file"),
            "{e}"
        );
        cfg.key_file = "/nonexistent/key.pem".into();
        let e = ServerTls::coordinator(&cfg).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/cert.pem"), "{e}");
        let e = ServerTls::worker(&cfg).unwrap_err().to_string();
        assert!(e.contains("tls.ca_file"), "{e}");
        assert!(
            ServerTls::coordinator(&TlsConfig::default())
                .unwrap()
                .is_none()
        );
        assert!(
            ClientTls::from_config(&TlsConfig::default())
                .unwrap()
                .is_none()
        );
    }
}
