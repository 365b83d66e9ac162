//! Test support for the TLS tests of the client crates: a private CA, a
//! server certificate for 127.0.0.1 and the name `broker.test`, and a
//! client certificate, made with
//! rcgen at test time and written as PEM files to a directory of their own,
//! removed when dropped. Panics on failure: it is only ever used by tests.

#![warn(missing_docs)]

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use std::path::PathBuf;

/// `ca.pem`, `server.pem` + `server.key` (for 127.0.0.1 and `broker.test`),
/// `client.pem` + `client.key`, and `expired-client.pem` +
/// `expired-client.key` (valid in 2020 only), in one directory.
pub struct Pki {
    dir: PathBuf,
}

impl Pki {
    /// Makes the certificates in a temporary directory named after `name`
    /// (unique per test process).
    pub fn new(name: &str) -> Pki {
        let dir = std::env::temp_dir().join(format!("testpki-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        for (file, sans, usage, expired) in [
            (
                "server",
                &["127.0.0.1", "broker.test"][..],
                ExtendedKeyUsagePurpose::ServerAuth,
                false,
            ),
            (
                "client",
                &["ingest-1"][..],
                ExtendedKeyUsagePurpose::ClientAuth,
                false,
            ),
            (
                "expired-client",
                &["ingest-1"][..],
                ExtendedKeyUsagePurpose::ClientAuth,
                true,
            ),
        ] {
            let key = KeyPair::generate().unwrap();
            let sans: Vec<String> = sans.iter().map(|s| (*s).to_owned()).collect();
            let mut params = CertificateParams::new(sans).unwrap();
            params.extended_key_usages = vec![usage];
            if expired {
                params.not_before = rcgen::date_time_ymd(2020, 1, 1);
                params.not_after = rcgen::date_time_ymd(2021, 1, 1);
            }
            let cert = params.signed_by(&key, &*ca).unwrap();
            std::fs::write(dir.join(format!("{file}.pem")), cert.pem()).unwrap();
            std::fs::write(dir.join(format!("{file}.key")), key.serialize_pem()).unwrap();
        }
        Pki { dir }
    }

    /// The path of one of the files.
    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// The path of one of the files, as a command-line argument.
    pub fn arg(&self, file: &str) -> String {
        self.path(file).display().to_string()
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
