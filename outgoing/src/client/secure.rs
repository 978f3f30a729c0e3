//! How a session to a server becomes TLS: STARTTLS, or TLS from the first byte, the
//! server's certificate checked as the session's rule says (a report only, DANE, roots).

use super::{io_fail, split, Client, Failure, Settings};
use crate::peer::Peer;
use crate::tls::Check;
use qms_common::config::TlsPolicy;

impl Client {
    /// Asks for STARTTLS: true when the server agreed. Where it is not offered or refused,
    /// the session goes on in plain text unless `tls` requires it.
    pub(super) fn ask_starttls(&mut self, tls: TlsPolicy) -> Result<bool, Failure> {
        let (name, at) = (self.name.clone(), self.peer.at());
        if !self.ext.starttls {
            if tls == TlsPolicy::Encrypt {
                return Err(Failure {
                    text: format!("TLS is required, but {name}{at} does not offer STARTTLS"),
                    permanent: false,
                });
            }
            return Ok(false);
        }
        let r = self
            .command("STARTTLS")
            .map_err(|e| io_fail(&name, &self.peer, "lost connection with", e))?;
        if !r.is_ok() {
            if tls == TlsPolicy::Encrypt {
                return Err(Failure {
                    text: format!("TLS is required, but {name}{at} said: {r}"),
                    permanent: false,
                });
            }
            return Ok(false);
        }
        Ok(true)
    }

    /// The TLS handshake, its certificate checked as `check` says; `what` for the trace.
    pub(super) fn start_tls(
        &mut self,
        server: rustls::pki_types::ServerName<'static>,
        s: &Settings,
        check: Check,
        what: &str,
    ) -> Result<(), Failure> {
        let info = self
            .conn
            .upgrade(|stream| crate::tls::connect(server, stream, s.client_cert, check).map(split))
            .map_err(|e| {
                let why = unverified(s, &self.name, &self.peer, e.to_string());
                io_fail(&self.name, &self.peer, "TLS handshake with", why)
            })?;
        self.trace("", &format!("{what}: {}", info.0));
        self.secured(info, s);
        Ok(())
    }
}

/// How the server's certificate is checked: as a report only, by DANE, against roots, or
/// not at all.
pub(super) fn tls_check<'a>(s: &Settings<'a>) -> Check<'a> {
    match s.verify {
        Some(v) if v.report_only => Check::Observe {
            ca: v.ca,
            names: v.names,
        },
        Some(v) if !v.tlsa.is_empty() => Check::Dane {
            records: v.tlsa,
            names: v.names,
        },
        Some(v) => Check::Verify {
            ca: v.ca,
            names: v.names,
        },
        None => Check::None,
    }
}

/// Why a handshake failed, said for the rule that asked for the check.
fn unverified(s: &Settings, name: &str, peer: &Peer, e: String) -> String {
    match s.verify {
        Some(v) if v.why == "credentials" => format!("4.7.5 certificate not verified ({e}); credentials are sent only to a verified server (set [msp.ca_files] for a private CA)"),
        Some(v) => format!("4.7.5 TLS level {}: certificate of {name}{} not verified ({e})", v.why, peer.at()),
        None => e,
    }
}
