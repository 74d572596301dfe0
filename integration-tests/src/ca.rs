//! A test certificate authority made at test time (rcgen): CA and leaf certificates as PEM
//! files, for real TLS handshakes (gRPC, PostgreSQL, etcd).

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// A test certificate authority.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().unwrap();
        let pem = params.self_signed(&key).unwrap().pem();
        Ca {
            issuer: Issuer::new(params, key),
            pem,
        }
    }

    /// Writes `<dir>/<name>-ca.pem`.
    pub fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let p = dir.join(format!("{name}-ca.pem"));
        std::fs::write(&p, &self.pem).unwrap();
        p
    }

    /// A leaf certificate for localhost / 127.0.0.1 (server and client use), as PEM
    /// (certificate, key); `expired` makes one whose validity ended in 2001.
    pub fn leaf(&self, serial: u64, expired: bool) -> (String, String) {
        self.leaf_for(&["localhost", "127.0.0.1"], serial, expired)
    }

    /// A leaf certificate for the names `sans` (DNS names or IPs), as PEM (certificate, key).
    pub fn leaf_for(&self, sans: &[&str], serial: u64, expired: bool) -> (String, String) {
        let names: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("freshet-{serial}"));
        params.serial_number = Some(serial.into());
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        if expired {
            params.not_before = rcgen::date_time_ymd(2000, 1, 1);
            params.not_after = rcgen::date_time_ymd(2001, 1, 1);
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// Writes a leaf as `<dir>/<name>.pem` and `<dir>/<name>-key.pem`.
    pub fn write_leaf(
        &self,
        dir: &Path,
        name: &str,
        serial: u64,
        expired: bool,
    ) -> (PathBuf, PathBuf) {
        let (cert, key) = self.leaf(serial, expired);
        let (c, k) = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}-key.pem")),
        );
        std::fs::write(&c, cert).unwrap();
        std::fs::write(&k, key).unwrap();
        (c, k)
    }
}
