//! How the smtp agent gets a connection to a destination: a cached one made under the same
//! rule, else a new one to the first host that answers, with the TLS check that the
//! destination's level, DANE or MTA-STS asks of that host, logged in where the destination
//! wants credentials; each new session under a policy counted for the TLS report.

use crate::client::{self, Client, Failure, Settings};
use crate::peer::Peer;
use crate::policy::{self, Hop, HostRule};
use crate::{dane, tlsrpt, Dest, SmtpAgent, Target, CONNECTS_IN_FLIGHT};
use qms_common::config::TlsPolicy;
use qms_common::qlog;
use qms_spool::{LinkSecurity, Smarthost};
use std::time::Instant;

impl SmtpAgent {
    /// A connection to the first host that answers: a cached one, else a new one (logged in
    /// to a relay or smarthost that wants credentials).
    pub(crate) fn client(
        &self,
        route: &policy::Route,
        dest: &Dest,
        fresh: bool,
    ) -> Result<(Client, f64), Failure> {
        let reuse = std::time::Duration::from_secs(self.cfg.client.connection_reuse);
        let login = self.login(dest);
        let lmtp = matches!(dest.target, Target::Lmtp { .. } | Target::LmtpUnix { .. });
        // A connection is reused only under the same rule: one opened at `may` proves
        // nothing to a `verify` destination or a host that DANE covers.
        let made_for = |hop: &Hop| {
            format!(
                "{:?} {:?} {lmtp} {:?}",
                dest.tls,
                login.map(|l| &l.user),
                hop.rule
            )
        };
        if let (false, Ok(mut cache)) = (fresh || dest.private(), self.cache.lock()) {
            for hop in &route.hops {
                if let Some(list) = cache.get_mut(&hop.peer) {
                    list.retain(|c| c.idle_since.elapsed() < reuse);
                    let want = made_for(hop);
                    if let Some(i) = list.iter().rposition(|c| c.made_for == want) {
                        return Ok((list.remove(i), 0.0));
                    }
                }
            }
        }
        let mut last = Failure {
            text: "no host to try".into(),
            permanent: false,
        };
        let start = Instant::now();
        for hop in &route.hops {
            let names = self.check_names(dest, hop);
            let settings = self.settings_for(dest, hop, login.is_some(), lmtp, &names);
            self.gate(&hop.peer, true);
            let mut attempt = Client::connect(&hop.name, &hop.peer, &settings);
            self.gate(&hop.peer, false);
            self.report_session(route, hop, &attempt);
            if let Ok(c) = &mut attempt {
                self.log_in(c, dest, login)?;
            }
            match attempt {
                Ok(mut c) => {
                    c.made_for = made_for(hop);
                    return Ok((c, start.elapsed().as_secs_f64()));
                }
                Err(f) => {
                    qlog!(
                        "relay={}{} status=connect-failed reason={}",
                        hop.name,
                        hop.peer.place(),
                        qms_common::log::quote(&f.text)
                    );
                    last = f;
                }
            }
        }
        Err(last)
    }

    /// `[relay_auth]`: a relay host of the routing table that wants a login.
    fn login(&self, dest: &Dest) -> Option<&qms_common::config::RelayAuth> {
        match &dest.target {
            Target::Relay { host, .. } => self.cfg.relay_auth.get(&host.to_ascii_lowercase()),
            _ => None,
        }
    }

    /// The names a certificate may carry: for `secure`, the configured names or the next
    /// hop; for DANE-TA, the MX host and the next-hop domain (RFC 7672 3.2.2).
    fn check_names(&self, dest: &Dest, hop: &Hop) -> Vec<String> {
        let next_hop = match &dest.target {
            Target::Mx { domain } => vec![domain.to_ascii_lowercase()],
            Target::Relay { host, .. } | Target::Lmtp { host, .. } => {
                vec![host.to_ascii_lowercase()]
            }
            Target::Smarthost(_) => Vec::new(),
            Target::LmtpUnix { .. } => vec!["localhost".to_string()],
        };
        match (&hop.rule, dest.tls.level) {
            (HostRule::Dane(_), _) => std::iter::once(hop.name.to_ascii_lowercase())
                .chain(next_hop)
                .collect(),
            (_, TlsPolicy::Secure) if dest.tls.names.is_empty() => next_hop,
            (_, TlsPolicy::Secure) => dest.tls.names.clone(),
            _ => Vec::new(),
        }
    }

    /// How to connect to one host: the destination's level, then what DANE or MTA-STS
    /// says of the host, then a smarthost's own TLS and client certificate.
    fn settings_for<'a>(
        &'a self,
        dest: &'a Dest,
        hop: &'a Hop,
        login: bool,
        lmtp: bool,
        names: &'a [String],
    ) -> Settings<'a> {
        let mut s = self.settings();
        s.tls = match dest.tls.level {
            TlsPolicy::Dane | TlsPolicy::DaneOnly => TlsPolicy::May,
            level => level,
        };
        s.debug = dest.debug.as_deref();
        s.lmtp = lmtp;
        let check = |why, ca, names, tlsa: &'a [dane::Tlsa], report_only| {
            Some(client::Verify {
                ca,
                names,
                why,
                tlsa,
                report_only,
            })
        };
        let level = dest.tls.level;
        if level.authenticates() {
            s.verify = check(
                level.as_str(),
                dest.tls.ca_file.as_deref(),
                names,
                &[],
                false,
            );
        } else if login {
            // A password goes only to a server whose certificate is verified.
            s.verify = check("credentials", dest.tls.ca_file.as_deref(), &[], &[], false);
        }
        let ca = self.cfg.client.ca_file.as_deref();
        match &hop.rule {
            HostRule::Level => {}
            HostRule::Dane(records) => {
                s.verify = check(level.as_str(), None, names, records, false)
            }
            HostRule::Encrypt => s.tls = TlsPolicy::Encrypt,
            HostRule::StsEnforce => s.verify = check("mta-sts", ca, &[], &[], false),
            HostRule::StsTesting if s.verify.is_none() => {
                s.verify = check("mta-sts", ca, &[], &[], true)
            }
            HostRule::StsTesting => {}
        }
        if let Some(h) = dest.smarthost() {
            s.implicit_tls = h.security == LinkSecurity::Ssl;
            s.client_cert = h.cert_file.as_deref().zip(h.key_file.as_deref());
            if h.user.is_some() || h.password.is_some() {
                let ca = self.cfg.msp.ca_files.get(&h.host.to_ascii_lowercase());
                s.verify = check("credentials", ca.map(|p| p.as_path()), &[], &[], false);
            }
        }
        s
    }

    /// Logs in where the destination wants it: the message's smarthost, or `[relay_auth]`.
    fn log_in(
        &self,
        c: &mut Client,
        dest: &Dest,
        login: Option<&qms_common::config::RelayAuth>,
    ) -> Result<(), Failure> {
        let done = match (dest.smarthost(), login) {
            (
                Some(Smarthost {
                    user: Some(u),
                    password: Some(p),
                    ..
                }),
                _,
            ) => c.authenticate(u, p),
            (_, Some(l)) => relay_login(c, l),
            _ => Ok(()),
        };
        if let Err(f) = &done {
            qlog!(
                "relay={}{} status=auth-failed reason={}",
                c.name,
                c.peer.place(),
                qms_common::log::quote(&f.text)
            );
        }
        done
    }

    /// Counts a new session under a DANE or MTA-STS policy for the TLS report.
    fn report_session(&self, route: &policy::Route, hop: &Hop, attempt: &Result<Client, Failure>) {
        if route.applied.kind.is_empty() || hop.rule == HostRule::Level {
            return;
        }
        let dane = matches!(hop.rule, HostRule::Dane(_) | HostRule::Encrypt);
        let result = match attempt {
            Ok(c) if c.tls.is_none() => ("starttls-not-supported".to_string(), String::new()),
            Ok(c) if c.verified || hop.rule == HostRule::Encrypt => {
                ("success".to_string(), String::new())
            }
            Ok(c) => {
                let why = c.tls_problem.clone().unwrap_or_default();
                (tlsrpt::result_type(&why, dane).to_string(), why)
            }
            Err(f) if f.text.contains("TLS") || f.text.contains("certificate") => (
                tlsrpt::result_type(&f.text, dane).to_string(),
                f.text.clone(),
            ),
            Err(_) => return,
        };
        let ip = match &hop.peer {
            Peer::Inet(a) => a.ip().to_string(),
            Peer::Unix(_) => String::new(),
        };
        self.reports.record(tlsrpt::Line {
            time: qms_common::time::now(),
            policy: route.applied.clone(),
            result: result.0,
            mx_host: hop.name.clone(),
            ip,
            detail: result.1,
        });
    }

    /// Waits for a free connection slot to `peer` (enter) or gives one back (leave).
    fn gate(&self, peer: &Peer, enter: bool) {
        let (lock, cv) = &self.connecting;
        let Ok(mut map) = lock.lock() else { return };
        if enter {
            while map.get(peer).copied().unwrap_or(0) >= CONNECTS_IN_FLIGHT {
                map = match cv.wait(map) {
                    Ok(m) => m,
                    Err(_) => return,
                };
            }
            *map.entry(peer.clone()).or_insert(0) += 1;
        } else {
            if let Some(n) = map.get_mut(peer) {
                *n = n.saturating_sub(1);
            }
            cv.notify_all();
        }
    }

    pub(crate) fn keep(&self, c: Client) {
        if let Ok(mut cache) = self.cache.lock() {
            let list = cache.entry(c.peer.clone()).or_default();
            if list.len() < self.cfg.destination_concurrency(&self.queue) {
                list.push(c);
                return;
            }
        }
        c.quit();
    }
}

/// Logs in to a relay host with its `[relay_auth]` login; the password is read from its file
/// now, so a changed password needs no restart.
fn relay_login(c: &mut Client, l: &qms_common::config::RelayAuth) -> Result<(), Failure> {
    let password = std::fs::read_to_string(&l.password_file).map_err(|e| Failure {
        text: format!("cannot read {}: {e}", l.password_file.display()),
        permanent: false,
    })?;
    let password = password.lines().next().unwrap_or("");
    c.authenticate(&l.user, password)
}
