//! Native TLS (`--tls-cert`, `--tls-key`): HTTPS and `wss://` on the same port
//! with rustls (ring; TLS 1.2 and 1.3; ALPN `http/1.1`). The certificate is
//! re-read when its files change (a Kubernetes Secret mounted as a volume is
//! updated in place; cert-manager renews every few weeks): new handshakes get the
//! new pair, open connections keep theirs, and a bad new pair is logged while
//! the old one stays.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;
use tracing::{error, info};

use contract::config::TlsFiles;

/// Why a certificate and key cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// A file cannot be read.
    #[error("cannot read {}: {source}", path.display())]
    Unreadable {
        /// The certificate or key file.
        path: PathBuf,
        /// What reading it said.
        source: std::io::Error,
    },
    /// The certificate file has no PEM certificate, or a section that does not
    /// parse (a chain cut short).
    #[error("{} holds no PEM certificate", .0.display())]
    NoCertificate(PathBuf),
    /// The key file has no PEM private key.
    #[error("{} holds no PEM private key", .0.display())]
    NoKey(PathBuf),
    /// A private key that ring cannot sign with.
    #[error("{}: unsupported private key: {reason}", path.display())]
    BadKey {
        /// The key file.
        path: PathBuf,
        /// Why rustls refused it.
        reason: rustls::Error,
    },
    /// The key is not the certificate's.
    #[error("{} does not match the certificate in {}", key.display(), cert.display())]
    Mismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// The leaf certificate is not valid X.509.
    #[error("{}: the certificate cannot be parsed", .0.display())]
    Unparsable(PathBuf),
    /// The leaf certificate's `notAfter` has passed.
    #[error("{}: the certificate expired ({not_after})", path.display())]
    Expired {
        /// The certificate file.
        path: PathBuf,
        /// When it expired, as X.509 prints it.
        not_after: String,
    },
}

/// Loads and checks a certificate chain and its key: they must match, and the
/// certificate must not have expired.
pub fn load(files: &TlsFiles) -> Result<Arc<CertifiedKey>, CertError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| CertError::Unreadable {
            path: path.to_owned(),
            source,
        })
    };
    let cert_pem = read(&files.cert)?;
    let key_pem = read(&files.key)?;
    // Any unreadable PEM section fails the whole file: a chain cut short (a file
    // read half-written) must not be served.
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|_| CertError::NoCertificate(files.cert.clone()))?;
    let Some(leaf) = chain.first() else {
        return Err(CertError::NoCertificate(files.cert.clone()));
    };
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|_| CertError::Unparsable(files.cert.clone()))?;
    let not_after = parsed.validity().not_after;
    if not_after.timestamp() < unix_now() {
        return Err(CertError::Expired {
            path: files.cert.clone(),
            not_after: not_after.to_string(),
        });
    }
    let key =
        PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| CertError::NoKey(files.key.clone()))?;
    let provider = rustls::crypto::ring::default_provider();
    let signing_key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|reason| CertError::BadKey {
            path: files.key.clone(),
            reason,
        })?;
    let certified = CertifiedKey::new(chain, signing_key);
    certified.keys_match().map_err(|_| CertError::Mismatch {
        cert: files.cert.clone(),
        key: files.key.clone(),
    })?;
    Ok(Arc::new(certified))
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// The certificate new handshakes get: swapped when the files change.
pub struct RotatingCert {
    current: RwLock<Arc<CertifiedKey>>,
}

impl fmt::Debug for RotatingCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RotatingCert")
    }
}

impl ResolvesServerCert for RotatingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }
}

/// The server's TLS side: the acceptor, and the certificate it serves.
pub struct Tls {
    /// Wraps each accepted TCP connection in TLS; its certificate is the
    /// current one.
    pub acceptor: TlsAcceptor,
    cert: Arc<RotatingCert>,
}

impl Tls {
    /// Fails (for a clear start-up error) if the files cannot be used.
    pub fn new(files: &TlsFiles) -> Result<Tls, CertError> {
        let cert = Arc::new(RotatingCert {
            current: RwLock::new(load(files)?),
        });
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .expect("ring supports TLS 1.2 and 1.3")
            .with_no_client_auth()
            .with_cert_resolver(cert.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Tls {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            cert,
        })
    }

    /// Re-reads the files whenever they change (checked every `every`); runs for
    /// the life of the server.
    pub async fn watch(
        self: Arc<Tls>,
        files: TlsFiles,
        every: Duration,
        metrics: Arc<super::metrics::Metrics>,
    ) {
        let mut seen = stamp(&files);
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let now = stamp(&files);
            if now == seen {
                continue;
            }
            seen = now;
            match load(&files) {
                Ok(new) => {
                    *self.cert.current.write().unwrap_or_else(|e| e.into_inner()) = new;
                    metrics.tls_reload(true);
                    info!(cert = %files.cert.display(), "TLS certificate reloaded; new handshakes use it");
                }
                Err(e) => {
                    metrics.tls_reload(false);
                    error!(error = %e, "TLS certificate files changed but cannot be used; keeping the previous certificate");
                }
            }
        }
    }
}

/// What tells that a file changed: the contents of both (a few KB, read every
/// check; a copy that keeps the modification time and length is still seen).
type Stamp = [Option<Vec<u8>>; 2];

fn stamp(files: &TlsFiles) -> Stamp {
    [
        std::fs::read(&files.cert).ok(),
        std::fs::read(&files.key).ok(),
    ]
}

/// Label for a failed handshake (`tls_handshake_failures_total{reason}`).
pub fn failure_reason(error: &std::io::Error) -> &'static str {
    let Some(tls) = error
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    else {
        return "io";
    };
    match tls {
        // Plain HTTP (or anything not TLS) sent to the TLS port.
        rustls::Error::InvalidMessage(_) => "not_tls",
        rustls::Error::AlertReceived(_) => "alert_from_client",
        rustls::Error::PeerIncompatible(_) => "incompatible",
        rustls::Error::NoApplicationProtocol => "no_common_alpn",
        _ => "other",
    }
}
