//! `[auth_checks]`: SPF, DKIM, ARC and DMARC on mail that arrives over SMTP from clients that are
//! neither authenticated nor in mynetworks (mail-auth does the records and cryptography).
//!
//! SPF is checked at MAIL FROM (HELO first, then the sender), DKIM, ARC (RFC 8617: the chain
//! of seals of the hops that changed the message) and DMARC at the end of DATA, from the
//! message as written to the spool. ARC is told, not acted on: a forwarder's seal does not
//! make a DMARC failure pass. The results become one
//! Authentication-Results field, which the router puts on the message (with any that came
//! in claiming our name removed). DNS answers are cached for their TTL; a DNS failure is a
//! temperror, never a pass. At most `PARALLEL` messages are verified at once, however many
//! sessions end their DATA together.
//!
//! With `[arc]`, a message that an alias may forward is also sealed here, where the results
//! are at hand (RFC 8617: ARC-Authentication-Results, ARC-Message-Signature, ARC-Seal); the
//! router puts the set on the copies that leave for other domains.

use mail_auth::arc::ArcSealer;
use mail_auth::common::crypto::DkimKey;
use mail_auth::common::headers::HeaderWriter;
use mail_auth::dkim::{Canonicalization, Done};
use mail_auth::dmarc::verify::DmarcParameters;
use mail_auth::hickory_resolver::config::ResolverOpts;
use mail_auth::spf::verify::SpfParameters;
use mail_auth::{
    AuthenticatedMessage, AuthenticationResults, DmarcResult, MessageAuthenticator, Parameters,
    ResolverCache, SpfOutput, SpfResult,
};
use qms_common::config::{AuthChecks, DmarcReject};
use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// Messages verified at once; the others wait their turn.
const PARALLEL: usize = 4;
/// Entries each DNS cache keeps at most.
const CACHE_MAX: usize = 10_000;
/// How long SPF, and then DKIM with DMARC, may take in all before they are a temperror: a
/// resolver that does not answer must not hold a session for minutes.
const DEADLINE: Duration = Duration::from_secs(10);

/// A DNS cache that keeps each answer until its TTL ends.
struct Ttl<K, V>(Mutex<HashMap<K, (V, Instant)>>);

impl<K, V> Default for Ttl<K, V> {
    fn default() -> Self {
        Ttl(Mutex::new(HashMap::new()))
    }
}

impl<K: Hash + Eq, V: Clone> ResolverCache<K, V> for Ttl<K, V> {
    fn get<Q>(&self, name: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let map = self.0.lock().ok()?;
        map.get(name)
            .filter(|(_, until)| *until > Instant::now())
            .map(|(v, _)| v.clone())
    }

    fn remove<Q>(&self, name: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.0.lock().ok()?.remove(name).map(|(v, _)| v)
    }

    fn insert(&self, key: K, value: V, valid_until: Instant) {
        if let Ok(mut map) = self.0.lock() {
            if map.len() >= CACHE_MAX {
                let now = Instant::now();
                map.retain(|_, (_, until)| *until > now);
                if map.len() >= CACHE_MAX {
                    map.clear();
                }
            }
            map.insert(key, (value, valid_until));
        }
    }
}

#[derive(Default)]
struct Caches {
    txt: Ttl<Box<str>, mail_auth::Txt>,
    mx: Ttl<Box<str>, mail_auth::RecordSet<mail_auth::MX>>,
    ipv4: Ttl<Box<str>, mail_auth::RecordSet<std::net::Ipv4Addr>>,
    ipv6: Ttl<Box<str>, mail_auth::RecordSet<std::net::Ipv6Addr>>,
    ptr: Ttl<IpAddr, mail_auth::RecordSet<Box<str>>>,
}

/// What every lookup is given: the parameters and the process's caches.
type Params<'x, P> = Parameters<
    'x,
    P,
    Ttl<Box<str>, mail_auth::Txt>,
    Ttl<Box<str>, mail_auth::RecordSet<mail_auth::MX>>,
    Ttl<Box<str>, mail_auth::RecordSet<std::net::Ipv4Addr>>,
    Ttl<Box<str>, mail_auth::RecordSet<std::net::Ipv6Addr>>,
    Ttl<IpAddr, mail_auth::RecordSet<Box<str>>>,
>;

/// The checks of one smtpd process: a resolver, its caches and a gate.
pub struct Checker {
    rt: tokio::runtime::Runtime,
    auth: MessageAuthenticator,
    caches: Caches,
    hostname: String,
    policy: AuthChecks,
    busy: (Mutex<usize>, Condvar),
    /// `[arc]`: seals messages an alias may forward.
    sealer: Option<ArcSealer<DkimKey, Done>>,
}

/// What the end of DATA does with a message.
pub struct Verdict {
    /// The Authentication-Results field's value.
    pub results: String,
    /// A refusal to send instead of 250, with a line for the log.
    pub refuse: Option<String>,
    /// With `quarantine = "hold"`: why DMARC quarantines the message.
    pub quarantine: Option<String>,
    /// The ARC set sealing the message, when one was asked for and the chain that came in
    /// can be sealed (a chain that failed is not).
    pub arc_set: Option<String>,
}

impl Checker {
    pub fn new(cfg: &qms_common::Config) -> Result<Checker, String> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("dns")
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let mut opts = ResolverOpts::default();
        opts.timeout = Duration::from_secs(3);
        opts.attempts = 1;
        let auth = {
            let _guard = rt.enter();
            match cfg.client.dns_server {
                Some(addr) => MessageAuthenticator::new(qms_common::dns::server_config(addr), opts),
                None => MessageAuthenticator::new_system_conf(),
            }
            .map_err(|e| format!("cannot set up DNS for the checks: {e}"))?
        };
        let sealer = match &cfg.arc {
            Some(a) => {
                let key =
                    qms_router::dkim::read_key(&a.key).map_err(|e| format!("[arc] key: {e}"))?;
                let sealer = ArcSealer::from_key(key)
                    .domain(a.domain.clone())
                    .selector(a.selector.clone())
                    .headers(qms_router::dkim::SIGNED.iter().copied())
                    .header_canonicalization(Canonicalization::Relaxed)
                    .body_canonicalization(Canonicalization::Relaxed);
                Some(sealer)
            }
            None => None,
        };
        Ok(Checker {
            rt,
            auth,
            caches: Caches::default(),
            hostname: cfg.hostname.clone(),
            policy: cfg.auth_checks.clone(),
            busy: (Mutex::new(0), Condvar::new()),
            sealer,
        })
    }

    fn params<P>(&self, p: P) -> Params<'_, P> {
        Parameters::new(p)
            .with_txt_cache(&self.caches.txt)
            .with_mx_cache(&self.caches.mx)
            .with_ipv4_cache(&self.caches.ipv4)
            .with_ipv6_cache(&self.caches.ipv6)
            .with_ptr_cache(&self.caches.ptr)
    }

    /// SPF of the HELO name and the envelope sender (RFC 7208 2.3, 2.4); with `spf_reject`,
    /// the refusal of a fail (or of a temperror, for now).
    pub fn spf(&self, ip: IpAddr, helo: &str, sender: &str) -> (SpfOutput, Option<String>) {
        let params = if sender.is_empty() {
            SpfParameters::verify_ehlo(ip, helo, &self.hostname)
        } else {
            SpfParameters::verify(ip, helo, &self.hostname, sender)
        };
        let domain = sender.rsplit_once('@').map_or(helo, |(_, d)| d).to_string();
        let out = self
            .rt
            .block_on(async {
                tokio::time::timeout(DEADLINE, self.auth.verify_spf(self.params(params))).await
            })
            .unwrap_or_else(|_| SpfOutput::new(domain).with_result(SpfResult::TempError));
        let refuse = match (self.policy.spf_reject, out.result()) {
            (true, SpfResult::Fail) => Some(format!(
                "550 5.7.23 SPF of {} does not allow {ip} to send its mail",
                out.domain()
            )),
            (true, SpfResult::TempError) => {
                Some("451 4.7.24 SPF could not be checked (DNS); try again later".into())
            }
            _ => None,
        };
        (out, refuse)
    }

    /// DKIM and DMARC of a whole message; `spf` is what MAIL FROM found.
    pub fn message(
        &self,
        msg: &[u8],
        spf: &SpfOutput,
        ip: IpAddr,
        helo: &str,
        sender: &str,
        seal: bool,
    ) -> Verdict {
        let _turn = self.turn();
        let mut ar = AuthenticationResults::new(&self.hostname);
        ar = if sender.is_empty() {
            ar.with_spf_ehlo_result(spf, ip, helo)
        } else {
            ar.with_spf_mailfrom_result(spf, ip, sender, helo)
        };
        let Some(parsed) = AuthenticatedMessage::parse(msg) else {
            return Verdict {
                results: ar.to_string(),
                refuse: None,
                quarantine: None,
                arc_set: None,
            };
        };
        let from_domain = sender.rsplit_once('@').map_or(helo, |(_, d)| d);
        let checked = self.rt.block_on(async {
            tokio::time::timeout(DEADLINE, async {
                let dkim = self.auth.verify_dkim(self.params(&parsed)).await;
                let arc = self.auth.verify_arc(self.params(&parsed)).await;
                let dmarc = self
                    .auth
                    .verify_dmarc(self.params(DmarcParameters::new(
                        &parsed,
                        &dkim,
                        from_domain,
                        spf,
                    )))
                    .await;
                (dkim, arc, dmarc)
            })
            .await
        });
        let Ok((dkim, arc, dmarc)) = checked else {
            let refuse = (self.policy.dmarc_reject == DmarcReject::Honour).then(|| {
                "451 4.7.0 DKIM and DMARC could not be checked (DNS); try again later".to_string()
            });
            return Verdict {
                results: format!(
                    "{ar}; dkim=temperror (dns timeout); arc=temperror (dns timeout); dmarc=temperror (dns timeout)"
                ),
                refuse,
                quarantine: None,
                arc_set: None,
            };
        };
        ar = ar
            .with_dkim_results(&dkim, parsed.from())
            .with_arc_result(&arc, ip)
            .with_dmarc_result(&dmarc);
        let refuse = self.dmarc_refusal(&dmarc);
        let arc_set = match seal && refuse.is_none() {
            true => self.arc_seal(&parsed, &ar, &arc),
            false => None,
        };
        Verdict {
            results: ar.to_string(),
            quarantine: refuse.is_none().then(|| self.quarantine(&dmarc)).flatten(),
            refuse,
            arc_set,
        }
    }

    /// The refusal DMARC asks for, when `dmarc_reject = "honour"`: the domain's p=reject on a
    /// failure, a try-again-later when its record could not be read.
    fn dmarc_refusal(&self, dmarc: &mail_auth::DmarcOutput) -> Option<String> {
        let rejects = dmarc.policy() == mail_auth::dmarc::Policy::Reject;
        match (self.policy.dmarc_reject, dmarc.result()) {
            (DmarcReject::Honour, DmarcResult::Fail(_)) if rejects => Some(format!(
                "550 5.7.1 Message refused: DMARC policy of {} says reject, and it fails",
                dmarc.domain()
            )),
            (DmarcReject::Honour, DmarcResult::TempError(_)) => {
                Some("451 4.7.0 DMARC could not be checked (DNS); try again later".into())
            }
            _ => None,
        }
    }

    /// Our ARC set for an accepted message whose chain may be sealed, when a sealer is set.
    fn arc_seal(
        &self,
        parsed: &AuthenticatedMessage<'_>,
        ar: &AuthenticationResults<'_>,
        arc: &mail_auth::ArcOutput<'_>,
    ) -> Option<String> {
        let sealer = self.sealer.as_ref().filter(|_| arc.can_be_sealed())?;
        match sealer.seal(parsed, ar, arc) {
            Ok(set) => Some(set.to_header()),
            Err(e) => {
                qms_common::qlog!(
                    "status=warning reason={}",
                    qms_common::log::quote(&format!("ARC seal: {e}"))
                );
                None
            }
        }
    }

    /// Why a message is put on hold, when `quarantine = "hold"` and DMARC quarantines it: it
    /// fails, and its domain says p=quarantine (or p=reject, with `dmarc_reject = "quarantine"`).
    fn quarantine(&self, dmarc: &mail_auth::DmarcOutput) -> Option<String> {
        use mail_auth::dmarc::Policy;
        let fails = matches!(dmarc.result(), DmarcResult::Fail(_));
        let says = match dmarc.policy() {
            Policy::Quarantine => "quarantine",
            Policy::Reject if self.policy.dmarc_reject == DmarcReject::Quarantine => "reject",
            _ => return None,
        };
        (fails && self.policy.quarantine_hold).then(|| {
            format!(
                "DMARC policy of {} says {says}, and the message fails it",
                dmarc.domain()
            )
        })
    }

    /// Waits for one of the `PARALLEL` turns; given back when dropped.
    fn turn(&self) -> Turn<'_> {
        let (lock, cv) = &self.busy;
        let mut n = lock.lock().unwrap_or_else(|e| e.into_inner());
        while *n >= PARALLEL {
            n = cv.wait(n).unwrap_or_else(|e| e.into_inner());
        }
        *n += 1;
        Turn(&self.busy)
    }
}

struct Turn<'a>(&'a (Mutex<usize>, Condvar));

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        let (lock, cv) = self.0;
        let mut n = lock.lock().unwrap_or_else(|e| e.into_inner());
        *n = n.saturating_sub(1);
        cv.notify_one();
    }
}

/// The verdict of each method in an Authentication-Results value: `spf`, `dkim`, `arc`,
/// `dmarc`.
pub struct Summary(Vec<(&'static str, String)>);

/// Reads the results back out of the field's value (`spf=pass (…) …; dkim=none`); a method
/// that did not run is `none`.
pub fn summary(results: &str) -> Summary {
    let words: Vec<&str> = results
        .split(|c: char| c == ';' || c.is_whitespace())
        .collect();
    let of = |method: &str| {
        words
            .iter()
            .find_map(|w| w.strip_prefix(method)?.strip_prefix('='))
            .unwrap_or("none")
            .to_ascii_lowercase()
    };
    Summary(
        ["spf", "dkim", "arc", "dmarc"]
            .into_iter()
            .map(|m| (m, of(m)))
            .collect(),
    )
}

impl Summary {
    /// `spf=pass dkim=none arc=none dmarc=pass`, for the log and tracking.
    pub fn line(&self) -> String {
        let parts: Vec<String> = self.0.iter().map(|(m, r)| format!("{m}={r}")).collect();
        parts.join(" ")
    }

    /// One count per method and result for `[metrics]`.
    pub fn count(&self) {
        for (m, r) in &self.0 {
            qms_common::metrics::count(
                "qms_auth_results_total",
                &[("method", m), ("result", r)],
                1.0,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_summary_reads_each_methods_result() {
        let ar = "mx.example.test;\r\n\tspf=pass (mx: domain of a@b designates 1.2.3.4) smtp.mailfrom=a@b;\r\n\tdmarc=fail header.from=b policy.dmarc=none";
        assert_eq!(
            super::summary(ar).line(),
            "spf=pass dkim=none arc=none dmarc=fail"
        );
    }
}
