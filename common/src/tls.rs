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
    format!("{version} with cipher {cipher}")
}

/// The certificates to check a server against: those in `ca_file` (PEM) when given, else
/// the system's roots.
pub fn roots(ca_file: Option<&std::path::Path>) -> Result<rustls::RootCertStore, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let mut store = rustls::RootCertStore::empty();
    let certs: Vec<CertificateDer<'static>> = match ca_file {
        Some(f) => CertificateDer::pem_file_iter(f)
            .and_then(|i| i.collect::<Result<_, _>>())
            .map_err(|e| format!("cannot read {}: {e}", f.display()))?,
        None => rustls_native_certs::load_native_certs().certs,
    };
    let (added, _) = store.add_parsable_certificates(certs);
    if added == 0 {
        return Err("no trusted certificates to check the server against".into());
    }
    Ok(store)
}
