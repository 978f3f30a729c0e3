//! `BX-MTA-Rem-*`: a smarthost named by the message, for submitters `[msp] smarthost_users`
//! allows. Values are checked here; none of them is ever logged (they carry credentials).
//!
//! - `BX-MTA-Rem-Protocol: smtp | esmtp | submission` (absent: smtp)
//! - `BX-MTA-Rem-Host: name or IP` (required once any other field is present)
//! - `BX-MTA-Rem-Port: N` (absent: 465 for `ssl`, 587 for `tls`, else 25)
//! - `BX-MTA-Rem-User:` and `BX-MTA-Rem-Passwd:` (both or neither)
//! - `BX-MTA-Rem-LinkConfidentiality: ssl | tls` (TLS from the first byte, or STARTTLS
//!   required; absent: STARTTLS when offered, and credentials only under TLS)
//! - `BX-MTA-Rem-CertFile:` and `BX-MTA-Rem-KeyFile:` (absolute paths, both or neither)

use qms_common::Config;
use qms_spool::{Client, LinkSecurity, Smarthost};
use std::path::PathBuf;

const PREFIX: &str = "bx-mta-rem-";

/// True for the `BX-MTA-Rem-*` field names.
pub fn is_field(name: &str) -> bool {
    name.len() > PREFIX.len() && name[..PREFIX.len()].eq_ignore_ascii_case(PREFIX)
}

/// May this client name a smarthost? Only a SASL user or local login on the allow-list.
pub fn allowed(cfg: &Config, client: &Client) -> bool {
    [&client.auth, &client.local_user]
        .into_iter()
        .flatten()
        .any(|u| cfg.msp.smarthost_users.iter().any(|a| a == u))
}

/// The smarthost the fields describe. `fields` are the message's (name, value) pairs; an
/// error says which field is wrong, never its value.
pub fn parse(fields: &[(String, String)]) -> Result<Option<Smarthost>, String> {
    let get = |suffix: &str| {
        fields
            .iter()
            .find(|(n, _)| is_field(n) && n[PREFIX.len()..].eq_ignore_ascii_case(suffix))
            .map(|(_, v)| v.trim().to_string())
            .filter(|v| !v.is_empty())
    };
    if !fields.iter().any(|(n, _)| is_field(n)) {
        return Ok(None);
    }
    match get("Protocol").map(|p| p.to_ascii_lowercase()).as_deref() {
        None | Some("smtp" | "esmtp" | "submission") => {}
        Some(_) => return Err("BX-MTA-Rem-Protocol is not smtp, esmtp or submission".into()),
    }
    let host = get("Host").ok_or("BX-MTA-Rem-Host is missing")?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let host_ok = host.len() <= 253
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':'));
    if !host_ok {
        return Err("BX-MTA-Rem-Host is not a host name or address".into());
    }
    let security = match get("LinkConfidentiality")
        .map(|v| v.to_ascii_lowercase())
        .as_deref()
    {
        None | Some("none") => LinkSecurity::May,
        Some("tls" | "starttls") => LinkSecurity::Tls,
        Some("ssl") => LinkSecurity::Ssl,
        Some(_) => return Err("BX-MTA-Rem-LinkConfidentiality is not ssl or tls".into()),
    };
    let port = match get("Port") {
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or("BX-MTA-Rem-Port is not a port number")?,
        None => match security {
            LinkSecurity::Ssl => 465,
            LinkSecurity::Tls => 587,
            LinkSecurity::May => 25,
        },
    };
    let (user, password) = match (get("User"), get("Passwd")) {
        (Some(u), Some(p)) => (Some(u), Some(p)),
        (None, None) => (None, None),
        _ => return Err("BX-MTA-Rem-User and BX-MTA-Rem-Passwd go together".into()),
    };
    let path = |name: &str| -> Result<Option<PathBuf>, String> {
        match get(name) {
            Some(p) if p.starts_with('/') => Ok(Some(PathBuf::from(p))),
            Some(_) => Err(format!("BX-MTA-Rem-{name} is not an absolute path")),
            None => Ok(None),
        }
    };
    let (cert_file, key_file) = match (path("CertFile")?, path("KeyFile")?) {
        (c @ Some(_), k @ Some(_)) | (c @ None, k @ None) => (c, k),
        _ => return Err("BX-MTA-Rem-CertFile and BX-MTA-Rem-KeyFile go together".into()),
    };
    Ok(Some(Smarthost {
        host,
        port,
        security,
        user,
        password,
        cert_file,
        key_file,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn reads_fields_and_defaults() {
        assert_eq!(parse(&f(&[("Subject", "x")])), Ok(None));
        let h = parse(&f(&[
            ("BX-MTA-Rem-Host", "[192.0.2.1]"),
            ("bx-mta-rem-linkconfidentiality", "SSL"),
            ("BX-MTA-Rem-User", "app"),
            ("BX-MTA-Rem-Passwd", "s3cret"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(
            (h.host.as_str(), h.port, h.security),
            ("192.0.2.1", 465, LinkSecurity::Ssl)
        );
        assert_eq!(h.password.as_deref(), Some("s3cret"));
        assert!(!format!("{h:?} {h}").contains("s3cret"));
    }

    #[test]
    fn refuses_bad_fields_without_echoing_them() {
        for bad in [
            vec![("BX-MTA-Rem-Port", "25")],
            vec![("BX-MTA-Rem-Host", "a b"), ("BX-MTA-Rem-Port", "25")],
            vec![("BX-MTA-Rem-Host", "h"), ("BX-MTA-Rem-Port", "70000")],
            vec![("BX-MTA-Rem-Host", "h"), ("BX-MTA-Rem-Passwd", "pw-xyz")],
            vec![("BX-MTA-Rem-Host", "h"), ("BX-MTA-Rem-Protocol", "uucp")],
            vec![("BX-MTA-Rem-Host", "h"), ("BX-MTA-Rem-CertFile", "/c")],
            vec![
                ("BX-MTA-Rem-Host", "h"),
                ("BX-MTA-Rem-CertFile", "c"),
                ("BX-MTA-Rem-KeyFile", "k"),
            ],
        ] {
            let e = parse(&f(&bad)).unwrap_err();
            assert!(!e.contains("pw-xyz"), "{e}");
        }
    }
}
