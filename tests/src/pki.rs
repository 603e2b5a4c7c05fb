//! A throwaway CA for tests, made with the product's own `pki` module: certificates per role
//! and host, and the TLS settings a wrapper needs to run a service over mutual TLS.
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use vncdispatch_proto::pki::{self, IssueRequest};
use vncdispatch_proto::roles::Role;
use vncdispatch_proto::tls::{Credentials, TlsFiles};

/// A CA in a temporary directory.
#[derive(Debug)]
pub struct TestPki {
    /// Holds ca.pem, ca.key and every issued pair.
    pub dir: tempfile::TempDir,
    next: AtomicU32,
}

/// What a wrapper needs to run a service over mutual TLS: its own files, and a client
/// identity the wrapper uses for readiness checks and its helper calls.
#[derive(Debug, Clone)]
pub struct ServiceTls {
    /// `--ca`, `--cert`, `--key` of the service.
    pub files: TlsFiles,
    /// A client identity (role admin for a dispatcher, dispatcher for an agent).
    pub client: Credentials,
}

impl ServiceTls {
    /// `--ca`, `--cert`, `--key` as arguments.
    pub fn args(&self) -> Vec<String> {
        vec![
            "--ca".into(),
            self.files.ca.display().to_string(),
            "--cert".into(),
            self.files.cert.display().to_string(),
            "--key".into(),
            self.files.key.display().to_string(),
        ]
    }
}

impl TestPki {
    /// A fresh CA.
    pub fn new() -> TestPki {
        let dir = tempfile::tempdir().expect("pki dir");
        pki::init_ca(dir.path(), "test CA", pki::CA_VALIDITY).expect("CA");
        TestPki {
            dir,
            next: AtomicU32::new(0),
        }
    }

    /// The CA certificate.
    pub fn ca(&self) -> std::path::PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// Issues a certificate with `role` valid for `hosts` (a fresh file name each call).
    pub fn files(&self, role: Role, hosts: &[&str]) -> TlsFiles {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        self.named(role, &format!("{}-{n}", role.name()), hosts)
    }

    /// Issues a certificate named `name` (its common name: what the audit trail shows) with
    /// `role`, valid for `hosts`.
    pub fn named(&self, role: Role, name: &str, hosts: &[&str]) -> TlsFiles {
        let (cert, key) = pki::issue(
            self.dir.path(),
            &IssueRequest {
                name: name.to_owned(),
                role,
                hosts: hosts.iter().map(|h| h.to_string()).collect(),
                valid_for: pki::CERT_VALIDITY,
            },
        )
        .expect("issue");
        TlsFiles {
            ca: self.ca(),
            cert,
            key,
        }
    }

    /// Loaded credentials for `role`, valid for 127.0.0.1.
    pub fn creds(&self, role: Role) -> Credentials {
        Credentials::load(&self.files(role, &["127.0.0.1", "localhost"])).expect("load")
    }

    /// Settings for a service of `role` on `host`, checked by a client of `client_role`.
    pub fn service(&self, role: Role, host: &str, client_role: Role) -> ServiceTls {
        ServiceTls {
            files: self.files(role, &[host]),
            client: self.creds(client_role),
        }
    }
}

impl Default for TestPki {
    fn default() -> Self {
        TestPki::new()
    }
}

/// Whether `dir` holds a CA (for assertions on `dispatcher pki`).
pub fn has_ca(dir: &Path) -> bool {
    dir.join("ca.pem").is_file() && dir.join("ca.key").is_file()
}
