//! TLS for the stores reached over the network (the HTTP source and the S3 source's transport):
//! rustls with aws-lc, trusting the CA certificates of a PEM bundle (`--ca-bundle`) only, or else
//! the system's roots (`SSL_CERT_FILE` and `SSL_CERT_DIR` honoured).
//!
//! The system's roots are read at the first certificate to verify, not when a client is set up:
//! reading them (a folder of a hundred or more PEM files on Linux) took 3-6 ms of every command's
//! start (docs/performance.md "Start-up"), and a plain `http://` store never needs them. A system
//! without any still reaches `http://` stores; an `https://` one then fails to verify, and the
//! error says the certificate is not trusted (as with roots that do not hold its CA).

use std::path::Path;
use std::sync::{Arc, OnceLock};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};

use super::SourceError;

/// A client configuration trusting the CA certificates of `ca_bundle` only (read now, so that a
/// bad file is said before any request), or else the system's roots (read when first needed).
/// `alpn` names the protocols offered (empty: none).
pub fn client_config(
    ca_bundle: Option<&Path>,
    alpn: &[&str],
) -> Result<rustls::ClientConfig, SourceError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| SourceError::Config(format!("TLS: {e}")))?;
    let mut config = match ca_bundle {
        Some(path) => builder.with_root_certificates(bundle_roots(path)?),
        None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SystemRoots::new(provider))),
    }
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Ok(config)
}

/// The CA certificates of a PEM file, which must hold at least one.
fn bundle_roots(path: &Path) -> Result<RootCertStore, SourceError> {
    let unreadable = |detail: String| {
        SourceError::Config(format!(
            "cannot read the CA bundle {}: {detail}",
            path.display()
        ))
    };
    let pem = std::fs::read(path).map_err(|e| SourceError::Io {
        path: path.display().to_string(),
        source: e,
    })?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| unreadable(e.to_string()))?;
        roots.add(cert).map_err(|e| unreadable(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(SourceError::Config(format!(
            "the CA bundle {} holds no PEM certificate",
            path.display()
        )));
    }
    Ok(roots)
}

/// The system's roots.
fn system_roots() -> RootCertStore {
    let mut roots = RootCertStore::empty();
    let found = rustls_native_certs::load_native_certs();
    for e in &found.errors {
        tracing::debug!("system certificates: {e}");
    }
    let (added, ignored) = roots.add_parsable_certificates(found.certs);
    tracing::debug!("system certificates: {added} trusted, {ignored} unreadable");
    roots
}

/// Verifies server certificates against the system's roots, read at the first certificate to
/// verify. Signatures are checked with the provider's algorithms, which need no roots.
#[derive(Debug)]
struct SystemRoots {
    provider: Arc<CryptoProvider>,
    /// Set at the first certificate to verify; `None` when the system has no roots.
    verifier: OnceLock<Option<Arc<WebPkiServerVerifier>>>,
}

impl SystemRoots {
    fn new(provider: Arc<CryptoProvider>) -> SystemRoots {
        SystemRoots {
            provider,
            verifier: OnceLock::new(),
        }
    }

    /// The verifier of the system's roots, read on the first call; none when there are none
    /// (the builder refuses an empty set, which would trust nothing).
    fn verifier(&self) -> Option<&Arc<WebPkiServerVerifier>> {
        self.verifier
            .get_or_init(|| {
                let roots = Arc::new(system_roots());
                WebPkiServerVerifier::builder_with_provider(roots, self.provider.clone())
                    .build()
                    .ok()
            })
            .as_ref()
    }
}

impl ServerCertVerifier for SystemRoots {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.verifier() {
            Some(v) => {
                v.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            }
            None => Err(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer,
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
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
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
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
