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
