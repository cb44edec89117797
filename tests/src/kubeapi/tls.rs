//! HTTPS for the fake API server, as an in-cluster client meets a real one: a CA made for
//! this server alone (its certificate is what the kubelet puts in the service account's
//! `ca.crt`), a server certificate it signed for the address the server listens on, and the
//! connection type the server reads and writes, plain or TLS.

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::{ServerConfig, ServerConnection, StreamOwned};
use std::io::{Read, Write};
use std::net::{IpAddr, TcpStream};
use std::sync::Arc;

/// The server's TLS identity and the CA that vouches for it.
pub(super) struct Tls {
    /// The CA certificate, PEM: the client's only trust anchor.
    pub ca_pem: String,
    config: Arc<ServerConfig>,
}

impl Tls {
    /// A fresh CA and a certificate for `ip` (and the in-cluster DNS name) signed by it.
    pub fn new(ip: IpAddr) -> Result<Tls> {
        let ca_key = KeyPair::generate().context("CA key")?;
        let mut ca = CertificateParams::new(Vec::<String>::new()).context("CA params")?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "sockmesh test cluster CA");
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca.self_signed(&ca_key).context("self-sign the CA")?;

        let key = KeyPair::generate().context("server key")?;
        let mut server =
            CertificateParams::new(vec![ip.to_string(), "kubernetes.default.svc".to_string()])
                .context("server certificate params")?;
        server
            .distinguished_name
            .push(DnType::CommonName, "kube-apiserver");
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = server
            .signed_by(&key, &ca_cert, &ca_key)
            .context("sign the server certificate")?;

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("TLS versions")?
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .context("server TLS config")?;
        Ok(Tls {
            ca_pem: ca_cert.pem(),
            config: Arc::new(config),
        })
    }

    /// Wraps an accepted connection; the handshake happens on its first read.
    pub fn accept(&self, tcp: TcpStream) -> Result<Conn> {
        let tls = ServerConnection::new(self.config.clone()).context("TLS session")?;
        Ok(Conn::Tls(Box::new(StreamOwned::new(tls, tcp))))
    }
}

/// One client connection of the fake server.
pub(super) enum Conn {
    Plain(TcpStream),
    Tls(Box<StreamOwned<ServerConnection, TcpStream>>),
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Plain(s) => s.read(buf),
            Conn::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Conn::Plain(s) => s.write(buf),
            Conn::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Conn::Plain(s) => s.flush(),
            Conn::Tls(s) => s.flush(),
        }
    }
}
