//! Agent identity: a self-signed certificate and its private key on disk, and the certificate
//! fingerprint by which peers pin each other.

use std::fs;
use std::path::Path;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

use crate::error::{IdentityError, IdentityFault};

/// File name of the PEM certificate inside an identity directory.
pub const CERT_FILE: &str = "agent.crt";
/// File name of the PEM private key inside an identity directory (mode 0600).
pub const KEY_FILE: &str = "agent.key";

/// Fingerprint of a DER certificate: `"SHA256:"` + lowercase hex SHA-256 of the DER bytes.
pub fn fingerprint(cert_der: &[u8]) -> String {
    format!("SHA256:{}", hex::encode(Sha256::digest(cert_der)))
}

/// An agent's certificate and private key.
#[derive(Debug)]
pub struct Identity {
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
    fingerprint: String,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            cert: self.cert.clone(),
            key: self.key.clone_key(),
            fingerprint: self.fingerprint.clone(),
        }
    }
}

impl Identity {
    /// Generates a new self-signed certificate (ECDSA P-256) for `name`, writes `agent.crt` and
    /// `agent.key` (mode 0600) into `dir` (created if needed) and returns the identity. Existing
    /// files are replaced.
    pub fn generate(dir: &Path, name: &str) -> Result<Identity, IdentityError> {
        fs::create_dir_all(dir).map_err(|source| IdentityError::Io {
            path: dir.into(),
            source,
        })?;
        let mut params = rcgen::CertificateParams::new(vec![name.to_string()])
            .map_err(IdentityError::Generate)?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2120, 1, 1);
        let key = rcgen::KeyPair::generate().map_err(IdentityError::Generate)?;
        let cert = params.self_signed(&key).map_err(IdentityError::Generate)?;
        write_file(&dir.join(KEY_FILE), key.serialize_pem().as_bytes(), 0o600)?;
        write_file(&dir.join(CERT_FILE), cert.pem().as_bytes(), 0o644)?;
        let cert_der = CertificateDer::from(cert.der().to_vec());
        let key_der =
            PrivateKeyDer::try_from(key.serialize_der()).map_err(|m| IdentityError::Invalid {
                path: dir.join(KEY_FILE),
                what: IdentityFault::KeyDer(m),
            })?;
        Ok(Identity::from_der(cert_der, key_der))
    }

    /// Loads `agent.crt` and `agent.key` from `dir`.
    pub fn load(dir: &Path) -> Result<Identity, IdentityError> {
        let cert_path = dir.join(CERT_FILE);
        let key_path = dir.join(KEY_FILE);
        let cert_pem = read_file(&cert_path)?;
        let key_pem = read_file(&key_path)?;
        // The first certificate and the first private key (PKCS#8, PKCS#1 or SEC1) of the files.
        let cert = CertificateDer::from_pem_slice(&cert_pem).map_err(|e| invalid(&cert_path, e))?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| invalid(&key_path, e))?;
        Ok(Identity::from_der(cert, key))
    }

    /// Builds an identity from DER certificate and key.
    pub fn from_der(cert: CertificateDer<'static>, key: PrivateKeyDer<'static>) -> Identity {
        let fingerprint = fingerprint(&cert);
        Identity {
            cert,
            key,
            fingerprint,
        }
    }

    /// This identity's certificate fingerprint (what peers pin).
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The DER certificate.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    pub(crate) fn key_der(&self) -> PrivateKeyDer<'static> {
        self.key.clone_key()
    }
}

fn invalid(path: &Path, e: rustls::pki_types::pem::Error) -> IdentityError {
    IdentityError::Invalid {
        path: path.into(),
        what: IdentityFault::Pem(e),
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, IdentityError> {
    fs::read(path).map_err(|source| IdentityError::Io {
        path: path.into(),
        source,
    })
}

/// Writes `data` to `path` atomically and durably with file mode `mode`.
fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), IdentityError> {
    // `write_atomic_mode` sets the mode before writing, also on a temporary file a crash left.
    vmr_durable::write_atomic_mode(path, data, mode).map_err(IdentityError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn generate_then_load_gives_same_identity() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = Identity::generate(dir.path(), "agent-a").expect("generate");
        let mode = fs::metadata(dir.path().join(KEY_FILE))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let b = Identity::load(dir.path()).expect("load");
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert!(a.fingerprint().starts_with("SHA256:"));
        assert_eq!(a.fingerprint().len(), 7 + 64);
        let other = tempfile::tempdir().expect("tempdir");
        let c = Identity::generate(other.path(), "agent-a").expect("generate");
        assert_ne!(a.fingerprint(), c.fingerprint());
    }

    #[test]
    fn key_is_private_even_over_a_stale_temporary_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tmp = vmr_durable::tmp_path(&dir.path().join(KEY_FILE));
        fs::write(&tmp, b"left by a crash").expect("write");
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o644)).expect("chmod");
        Identity::generate(dir.path(), "agent-a").expect("generate");
        let mode = fs::metadata(dir.path().join(KEY_FILE))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!tmp.exists());
        Identity::load(dir.path()).expect("load");
    }

    #[test]
    fn load_rejects_garbage() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(matches!(
            Identity::load(dir.path()),
            Err(IdentityError::Io { .. })
        ));
        fs::write(dir.path().join(CERT_FILE), b"nonsense").expect("write");
        fs::write(dir.path().join(KEY_FILE), b"nonsense").expect("write");
        assert!(matches!(
            Identity::load(dir.path()),
            Err(IdentityError::Invalid {
                what: IdentityFault::Pem(_),
                ..
            })
        ));
    }
}
