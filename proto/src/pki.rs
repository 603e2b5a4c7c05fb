//! A small CA for operators who have none: `dispatcher pki init` makes one, `dispatcher pki
//! issue` a certificate per role and host (rcgen; ECDSA P-256).
//!
//! Layout of a PKI directory: `ca.pem` (the CA certificate, give it to every service as
//! `--ca`), `ca.key` (0600; keep it off the servers once everything is issued), and for each
//! issued name `NAME.pem` / `NAME.key` (0600). Nothing is ever overwritten: an existing file
//! is an error, so a second `init` cannot orphan the certificates already issued.
//!
//! Issued certificates carry the role as a URI SAN ([`crate::roles::ROLE_URI_PREFIX`]), the
//! host names and IP addresses given as DNS/IP SANs (what clients verify a server against),
//! both the server and client auth key purposes (the dispatcher is a server to portals and a
//! client of agents with one identity), and the name as CN.
use crate::roles::Role;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long a CA is valid by default.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How long an issued certificate is valid by default: a year, renewed by issuing again.
pub const CERT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);

/// Why a PKI step failed.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A file to write exists already.
    #[error("{0} exists; refusing to overwrite it (remove it first if you mean to replace it)")]
    Exists(PathBuf),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// A name, SAN or the CA could not be used.
    #[error("{0}")]
    Invalid(String),
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_owned(),
        source,
    }
}

fn invalid(what: &str) -> impl FnOnce(rcgen::Error) -> PkiError + '_ {
    move |e| PkiError::Invalid(format!("{what}: {e}"))
}

/// Writes a new file with `mode`; never replaces one.
fn write_new(path: &Path, contents: &str, mode: u32) -> Result<(), PkiError> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                PkiError::Exists(path.to_owned())
            } else {
                PkiError::Io {
                    path: path.to_owned(),
                    source: e,
                }
            }
        })?;
    f.write_all(contents.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(io_error(path))
}

fn validity(params: &mut CertificateParams, valid_for: Duration) {
    // A little slack backwards for clocks that are slightly behind.
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + valid_for;
}

/// Makes a CA in `dir` (created if missing): `ca.pem` and `ca.key`.
pub fn init_ca(dir: &Path, name: &str, valid_for: Duration) -> Result<PathBuf, PkiError> {
    std::fs::create_dir_all(dir).map_err(io_error(dir))?;
    let (cert_path, key_path) = (dir.join("ca.pem"), dir.join("ca.key"));
    for p in [&cert_path, &key_path] {
        if p.exists() {
            return Err(PkiError::Exists(p.clone()));
        }
    }
    let key = KeyPair::generate().map_err(invalid("generating the CA key"))?;
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut params, valid_for);
    let cert = params.self_signed(&key).map_err(invalid("the CA"))?;
    write_new(&key_path, &key.serialize_pem(), 0o600)?;
    write_new(&cert_path, &cert.pem(), 0o644)?;
    Ok(cert_path)
}

/// What to issue.
#[derive(Debug, Clone)]
pub struct IssueRequest {
    /// File stem and CN, e.g. `dispatcher-1` or `blade-7`.
    pub name: String,
    /// The role the certificate names.
    pub role: Role,
    /// Host names and IP addresses it is valid for (servers: what clients dial).
    pub hosts: Vec<String>,
    /// How long it is valid.
    pub valid_for: Duration,
}

/// Issues a certificate signed by the CA in `dir`: `NAME.pem` and `NAME.key`. Returns their
/// paths.
pub fn issue(dir: &Path, req: &IssueRequest) -> Result<(PathBuf, PathBuf), PkiError> {
    if req.name.is_empty()
        || !req
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        || req.name.starts_with('.')
    {
        return Err(PkiError::Invalid(format!(
            "name `{}`: use letters, digits, `.`, `_` and `-` (it becomes a file name)",
            req.name
        )));
    }
    let (ca_cert, ca_key) = (dir.join("ca.pem"), dir.join("ca.key"));
    let ca_pem = std::fs::read_to_string(&ca_cert).map_err(io_error(&ca_cert))?;
    let ca_key_pem = std::fs::read_to_string(&ca_key).map_err(io_error(&ca_key))?;
    let signer = KeyPair::from_pem(&ca_key_pem).map_err(invalid("ca.key"))?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, signer).map_err(invalid("ca.pem"))?;

    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, req.name.as_str());
    let mut sans = vec![SanType::URI(
        req.role.uri().try_into().map_err(invalid("the role URI"))?,
    )];
    for host in &req.hosts {
        sans.push(match host.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(
                host.as_str()
                    .try_into()
                    .map_err(invalid(&format!("host `{host}`")))?,
            ),
        });
    }
    params.subject_alt_names = sans;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    validity(&mut params, req.valid_for);
    let key = KeyPair::generate().map_err(invalid("generating the key"))?;
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(invalid("signing"))?;
    let (cert_path, key_path) = (
        dir.join(format!("{}.pem", req.name)),
        dir.join(format!("{}.key", req.name)),
    );
    if cert_path.exists() {
        return Err(PkiError::Exists(cert_path));
    }
    write_new(&key_path, &key.serialize_pem(), 0o600)?;
    write_new(&cert_path, &cert.pem(), 0o644)?;
    Ok((cert_path, key_path))
}
