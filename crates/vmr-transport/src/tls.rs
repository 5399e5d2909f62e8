//! TLS configuration for agent-to-agent connections: certificate pinning on the client side and
//! "any certificate, authorized later by fingerprint" on the server side. Both sides still verify
//! the handshake signature with the presented certificate's key, so a peer must hold the private
//! key of the certificate it presents.

use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, ServerConfig,
    SignatureScheme,
};

use crate::error::TransportError;
use crate::identity::{Identity, fingerprint};

/// ALPN protocol id: HTTP/2 only.
pub(crate) const ALPN_H2: &[u8] = b"h2";

/// ring's provider, AES-128-GCM first. Both ends are our agents and negotiate TLS 1.3, whose
/// suites are all AEADs; AES-128-GCM is TLS 1.3's mandatory suite, and its 10 rounds against
/// AES-256's 14 make the bulk encryption of replicated data cheaper (the agents' largest CPU
/// cost after hashing: BENCHMARKS.md, row 4).
fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(p)
}

/// Client-side verifier: accepts exactly one certificate, identified by its fingerprint.
#[derive(Debug)]
pub(crate) struct PinnedServerVerifier {
    expected: String,
    /// Fingerprint the server actually presented (for the typed mismatch error).
    pub(crate) seen: Mutex<Option<String>>,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got = fingerprint(end_entity);
        if let Ok(mut seen) = self.seen.lock() {
            *seen = Some(got.clone());
        }
        if got == self.expected {
            Ok(ServerCertVerified::assertion())
        } else {
            tracing::warn!(expected = %self.expected, got = %got, "server certificate refused: fingerprint mismatch");
            Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Server-side verifier: requires a client certificate, accepts any at the TLS layer; the
/// application authorizes the fingerprint after the handshake.
#[derive(Debug)]
struct AnyClientCertVerifier {
    algs: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for AnyClientCertVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Server TLS config: our identity, mandatory client certificates, ALPN h2.
pub(crate) fn server_config(identity: &Identity) -> Result<ServerConfig, TransportError> {
    let provider = provider();
    let verifier = Arc::new(AnyClientCertVerifier {
        algs: provider.signature_verification_algorithms,
    });
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TransportError::Tls)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![identity.cert_der().clone()], identity.key_der())
        .map_err(TransportError::Tls)?;
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(cfg)
}

/// Client TLS config pinned to `expected` fingerprint; returns the verifier too so the caller can
/// report the fingerprint actually seen.
pub(crate) fn client_config(
    identity: &Identity,
    expected: &str,
) -> Result<(ClientConfig, Arc<PinnedServerVerifier>), TransportError> {
    let provider = provider();
    let verifier = Arc::new(PinnedServerVerifier {
        expected: expected.to_string(),
        seen: Mutex::new(None),
        algs: provider.signature_verification_algorithms,
    });
    let mut cfg = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TransportError::Tls)?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_client_auth_cert(vec![identity.cert_der().clone()], identity.key_der())
        .map_err(TransportError::Tls)?;
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok((cfg, verifier))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two agents' configurations negotiate TLS 1.3 with AES-128-GCM (a handshake in memory).
    #[test]
    fn agents_negotiate_tls13_aes_128_gcm() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = Identity::generate(&dir.path().join("a"), "a").expect("identity a");
        let b = Identity::generate(&dir.path().join("b"), "b").expect("identity b");
        let (ccfg, _) = client_config(&a, b.fingerprint()).expect("client config");
        let scfg = server_config(&b).expect("server config");
        let name = ServerName::try_from("b").expect("name");
        let mut client = rustls::Connection::Client(
            rustls::ClientConnection::new(Arc::new(ccfg), name).expect("client connection"),
        );
        let mut server = rustls::Connection::Server(
            rustls::ServerConnection::new(Arc::new(scfg)).expect("server connection"),
        );
        // Carry what one side has to send to the other, which then processes it.
        fn pass(from: &mut rustls::Connection, to: &mut rustls::Connection) {
            let mut buf = Vec::new();
            while from.wants_write() {
                from.write_tls(&mut buf).expect("write_tls");
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                to.read_tls(&mut rd).expect("read_tls");
            }
            to.process_new_packets().expect("process_new_packets");
        }
        for _ in 0..10 {
            pass(&mut client, &mut server);
            pass(&mut server, &mut client);
            if !client.is_handshaking() && !server.is_handshaking() {
                break;
            }
        }
        assert!(!client.is_handshaking() && !server.is_handshaking());
        assert_eq!(
            client.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_3)
        );
        for suite in [
            client.negotiated_cipher_suite(),
            server.negotiated_cipher_suite(),
        ] {
            assert_eq!(
                suite.map(|s| s.suite()),
                Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
            );
        }
    }
}
