//! What logs and Received: headers say about a TLS session, for the server and the client.

/// `TLSv1.3 with cipher TLS13_AES_256_GCM_SHA384`
pub fn describe(state: &rustls::CommonState) -> String {
    let version = state
        .protocol_version()
        .map(|v| format!("{v:?}").replace('_', "."))
        .unwrap_or_default();
    let cipher = state
        .negotiated_cipher_suite()
        .map(|c| format!("{:?}", c.suite()))
        .unwrap_or_default();
    let mut s = format!("{version} with cipher {cipher}");
    // The peer's certificate, when it showed one: who it says it is, and who says so.
    if let Some((subject, issuer)) = state
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|c| cert_names(c.as_ref()))
    {
        s.push_str(&format!(", subject {subject}, issuer {issuer}"));
    }
    s
}

/// One DER element at the start of `d`: its tag, its content, and what follows it.
fn der(d: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = d.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |l, b| (l << 8) | *b as usize);
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// A certificate's subject and issuer, as `CN=…, O=…` (RFC 5280 4.1: the issuer is the
/// fourth field of the TBSCertificate, the subject the sixth, after an optional version).
pub fn cert_names(cert: &[u8]) -> Option<(String, String)> {
    let (_, cert, _) = der(cert)?;
    let (_, mut tbs, _) = der(cert)?;
    let mut fields = Vec::new();
    while let Some((tag, content, rest)) = der(tbs) {
        if tag != 0xa0 {
            fields.push(content);
        }
        tbs = rest;
    }
    // serialNumber, signature, issuer, validity, subject
    Some((name(fields.get(4)?), name(fields.get(2)?)))
}

/// A Name's CN, O and C attributes, most specific first.
fn name(mut rdns: &[u8]) -> String {
    let mut parts = Vec::new();
    while let Some((_, set, rest)) = der(rdns) {
        if let Some((_, atv, _)) = der(set) {
            if let Some((_, oid, value)) = der(atv) {
                let label = match oid {
                    [0x55, 0x04, 0x03] => Some("CN"),
                    [0x55, 0x04, 0x0a] => Some("O"),
                    [0x55, 0x04, 0x06] => Some("C"),
                    _ => None,
                };
                if let (Some(l), Some((_, v, _))) = (label, der(value)) {
                    let text: String = String::from_utf8_lossy(v)
                        .chars()
                        .filter(|c| !c.is_control())
                        .take(100)
                        .collect();
                    parts.push(format!("{l}={text}"));
                }
            }
        }
        rdns = rest;
    }
    parts.reverse();
    if parts.is_empty() {
        "(none)".into()
    } else {
        parts.join(", ")
    }
}

/// The certificates to check a server against: those in `ca_file` (PEM) when given, else
/// the system's roots.
/// The system's trusted certificates and those of `ca_file`: what a policy server (MTA-STS)
/// or an MX host under an MTA-STS policy must chain to.
pub fn trusted_certs(
    ca_file: Option<&std::path::Path>,
) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let mut certs = rustls_native_certs::load_native_certs().certs;
    if let Some(f) = ca_file {
        if let Ok(extra) = CertificateDer::pem_file_iter(f) {
            certs.extend(extra.flatten());
        }
    }
    certs
}

/// The system's roots and `ca_file`'s: what a server's certificate must chain to.
pub fn roots(ca_file: Option<&std::path::Path>) -> Result<rustls::RootCertStore, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let mut store = rustls::RootCertStore::empty();
    // A CA file is trusted besides the system's roots, as its documentation says.
    let mut certs = rustls_native_certs::load_native_certs().certs;
    if let Some(f) = ca_file {
        let extra: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(f)
            .and_then(|i| i.collect::<Result<_, _>>())
            .map_err(|e| format!("cannot read {}: {e}", f.display()))?;
        certs.extend(extra);
    }
    let (added, _) = store.add_parsable_certificates(certs);
    if added == 0 {
        return Err("no trusted certificates to check the server against".into());
    }
    Ok(store)
}

/// The certificates of `ca_file` alone: the CAs whose client certificates smtpd accepts.
pub fn roots_only(ca_file: &std::path::Path) -> Result<rustls::RootCertStore, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(ca_file)
        .and_then(|i| i.collect::<Result<_, _>>())
        .map_err(|e| format!("cannot read {}: {e}", ca_file.display()))?;
    let mut store = rustls::RootCertStore::empty();
    let (added, _) = store.add_parsable_certificates(certs);
    if added == 0 {
        return Err(format!("no certificate in {}", ca_file.display()));
    }
    Ok(store)
}
