//! Tracked sending (X822-MSP, the MARMEE mail submission pipeline): `BX-` header fields are
//! local requests, acted on and stripped here; `X-B-` fields are global, acted on and kept.
//! Only trusted submitters (authenticated, local `sendmail`, `mynetworks`) may use them; from
//! anyone else every such field is removed, and the removal logged.
//!
//! The values, as qms reads them (the seed names the fields, not their syntax):
//! - `X-B-Envelope-Addr: ADDR` sets the envelope sender.
//! - `BX-Delivery-Notification-Req-To: ADDR` and `BX-Non-Delivery-Notification-Req-To: ADDR`
//!   name where reports go; reports go to the envelope sender, so without `X-B-Envelope-Addr`
//!   the non-delivery address (else the delivery one) becomes the envelope sender.
//! - `…-Req-For: ADDR, ADDR` lists the recipients a request covers (absent or `all`: all).
//!   Delivery requests add NOTIFY=SUCCESS, non-delivery requests NOTIFY=FAILURE,DELAY.
//!   `…-Req-PerRecipient: yes|no` is accepted (reports are per recipient in any case).
//! - A request also sets ENVID (to `X-B-CrossRef`, else the Message-ID) and RET=HDRS unless
//!   the client gave them.
//! - `BX-Disposition-Notification-Req-To: ADDR` adds `Disposition-Notification-To:` and
//!   `Return-Receipt-To:` (RFC 8098).
//! - `X-B-CrossRef` and `X-B-Non-Delivery-Notification-Actions` are stored in the job.
//! - `BX-Sending-Method: inject` routes the message by qms's own tables (smarthost fields are
//!   stripped and not used); `submit` sends it through the `BX-MTA-Rem-*` smarthost, which
//!   must then be given; absent, a smarthost is used when one is named.
//! - `BX-Sending-Run-Control: dryrun` routes,
//!   logs and tracks but delivers nothing; `debug` logs the whole SMTP dialogue of the
//!   message (credentials hidden); `ignore-suppression` sends to recipients on the
//!   suppression list too (`qms suppress`). Any of them may be given, comma-separated.
//! - `BX-MTA-Rem-*` (see `smarthost`) sends the message's SMTP recipients through a smarthost
//!   of its own; only for `[msp] smarthost_users`. Their values never reach a log.
//! - `BX-MTA-Submission-Pre-Plugins: NAME, NAME` and `-Post-Plugins:` name programs of the
//!   `[msp] plugin_dir` allow-list (see `qms_delivery::plugin`).
//! - A request that cannot be met (a smarthost from someone not allowed, a bad smarthost
//!   field, a plugin not on the allow-list) fails the message, with error mail saying why,
//!   rather than sending it some other way than asked.

use crate::smarthost;
use qms_common::headers;
use qms_common::log::quote;
use qms_common::{qlog, Address, Config};
use qms_delivery::plugin;
use qms_spool::{DsnRet, Job, Notify};

/// What the tracked-sending fields asked for beyond the job's own fields.
#[derive(Default)]
pub struct Applied {
    /// The message with fields stripped or added; None when it stays as it is.
    pub message: Option<Vec<u8>>,
    /// Pre-plugins to run, in order, before the message is routed.
    pub pre_plugins: Vec<String>,
    /// Why the message cannot be sent as it asks: every recipient fails with this.
    pub refusal: Option<String>,
}

pub(crate) fn is_msp(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    n.starts_with("bx-") || n.starts_with("x-b-")
}

fn addresses(v: &str) -> Vec<Address> {
    v.split([',', ' ', ';'])
        .filter_map(|a| Address::parse(a.trim().trim_start_matches('<').trim_end_matches('>')).ok())
        .collect()
}

/// True when the submitter of `client` may use `addr` as a sender: an authenticated user
/// by `[auth] senders`, a local user by `trusted_users`; a `mynetworks` client chooses its
/// MAIL FROM anyway.
fn may_use(cfg: &Config, client: &qms_spool::Client, addr: &Address) -> bool {
    use qms_common::authority::{local_user_may_send_as, may_send_as};
    match (&client.auth, &client.local_user) {
        (Some(user), _) => may_send_as(cfg, user, addr),
        (None, Some(user)) => local_user_may_send_as(cfg, user, addr),
        (None, None) => true,
    }
}

/// The tracked-sending fields of one message, in order.
struct Fields(Vec<(String, String)>);

impl Fields {
    /// The trimmed value of field `name`, if present.
    fn get(&self, name: &str) -> Option<String> {
        self.0
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_string())
    }

    /// True when a field's name starts with `prefix`.
    fn any_prefixed(&self, prefix: &str) -> bool {
        self.0
            .iter()
            .any(|(n, _)| n.len() >= prefix.len() && n[..prefix.len()].eq_ignore_ascii_case(prefix))
    }

    fn names(&self) -> Vec<&str> {
        self.0.iter().map(|(n, _)| n.as_str()).collect()
    }
}

/// Applies the tracked-sending fields of `msg` to `job`.
pub fn apply(cfg: &Config, job: &mut Job, msg: &[u8]) -> Applied {
    let fields = Fields(
        headers::named_fields(msg)
            .into_iter()
            .filter(|(n, _)| is_msp(n))
            .collect(),
    );
    if fields.0.is_empty() {
        return Applied::default();
    }
    if !job.client.trusted {
        return untrusted(job, &fields, msg);
    }
    // Addresses that become the envelope sender or receive notifications: only those the
    // submitter may use; the others are dropped and logged.
    let owned = |field: &str| -> Option<Address> {
        let a = fields
            .get(field)
            .and_then(|v| addresses(&v).into_iter().next())?;
        if may_use(cfg, &job.client, &a) {
            return Some(a);
        }
        qlog!(
            "qid={} status=msp-refused field={field} address={} reason=\"not an address the submitter may use\"",
            job.id,
            quote(&a.to_string())
        );
        None
    };
    let mut sender = owned("X-B-Envelope-Addr");
    let nd_to = owned("BX-Non-Delivery-Notification-Req-To");
    let d_to = owned("BX-Delivery-Notification-Req-To");
    let disposition_to = owned("BX-Disposition-Notification-Req-To");
    if sender.is_none() {
        sender = nd_to.or(d_to);
    }
    let requested = request_notifications(&fields, job);
    let added = disposition_to.map_or_else(String::new, |to| disposition_fields(msg, &to));
    job.crossref = fields.get("X-B-CrossRef");
    job.nd_actions = fields
        .get("X-B-Non-Delivery-Notification-Actions")
        .map(|v| {
            v.split([',', ' '])
                .filter(|a| !a.is_empty())
                .map(|a| a.to_ascii_lowercase())
                .collect()
        })
        .unwrap_or_default();
    run_control(&fields, job);
    let refusal = sending_method(cfg, &fields, job);
    let (pre_plugins, refusal) = plugins(cfg, &fields, job, refusal);
    if requested {
        job.envid = job
            .envid
            .take()
            .or_else(|| job.crossref.clone())
            .or_else(|| job.message_id.clone());
        job.ret = job.ret.or(Some(DsnRet::Hdrs));
    }
    if let Some(s) = sender {
        job.sender = Some(s);
    }
    log_applied(job, &fields.names(), &pre_plugins, refusal.as_deref());
    let mut out = headers::remove_prefixed(msg, "BX-");
    if !added.is_empty() {
        let mut with = added.into_bytes();
        with.extend_from_slice(&out);
        out = with;
    }
    Applied {
        message: Some(out),
        pre_plugins,
        refusal,
    }
}

/// An untrusted submitter's message: every tracked-sending field removed, none applied.
fn untrusted(job: &Job, fields: &Fields, msg: &[u8]) -> Applied {
    qlog!(
        "qid={} status=msp-removed reason=\"untrusted submitter\" headers={}",
        job.id,
        quote(&fields.names().join(","))
    );
    let out = headers::remove_prefixed(&headers::remove_prefixed(msg, "BX-"), "X-B-");
    Applied {
        message: Some(out),
        ..Applied::default()
    }
}

/// The submission plugins the fields name: the pre-plugins returned, the post-plugins put
/// in the job. A name that resolves to no plugin refuses the message, unless it is refused
/// already.
fn plugins(
    cfg: &Config,
    fields: &Fields,
    job: &mut Job,
    mut refusal: Option<String>,
) -> (Vec<String>, Option<String>) {
    let mut pre_plugins = Vec::new();
    for (field, stage) in [
        ("BX-MTA-Submission-Pre-Plugins", &mut pre_plugins),
        ("BX-MTA-Submission-Post-Plugins", &mut job.post_plugins),
    ] {
        for name in plugin::names(&fields.get(field).unwrap_or_default()) {
            match plugin::resolve(cfg, &name) {
                Ok(_) => stage.push(name),
                Err(e) => refusal = refusal.or(Some(format!("5.7.0 {e}"))),
            }
        }
    }
    (pre_plugins, refusal)
}

/// Delivery and non-delivery requests: NOTIFY for the recipients each covers. True when
/// any was made.
fn request_notifications(fields: &Fields, job: &mut Job) -> bool {
    let mut requested = false;
    for (prefix, flags) in [
        ("BX-Delivery-Notification", &[Notify::Success][..]),
        (
            "BX-Non-Delivery-Notification",
            &[Notify::Failure, Notify::Delay][..],
        ),
    ] {
        if !fields.any_prefixed(prefix) {
            continue;
        }
        requested = true;
        let for_list = fields
            .get(&format!("{prefix}-Req-For"))
            .filter(|v| !v.eq_ignore_ascii_case("all"))
            .map(|v| addresses(&v));
        for r in job.recipients.iter_mut() {
            let covered = for_list
                .as_ref()
                .is_none_or(|l| l.iter().any(|a| a.lookup_key() == r.address.lookup_key()));
            if covered {
                r.notify.retain(|n| *n != Notify::Never);
                for f in flags {
                    if !r.notify.contains(f) {
                        r.notify.push(*f);
                    }
                }
            }
        }
    }
    requested
}

/// The RFC 8098 fields a disposition request adds, unless the message has them.
fn disposition_fields(msg: &[u8], to: &Address) -> String {
    let mut added = String::new();
    if !headers::has(msg, "disposition-notification-to") {
        added.push_str(&format!("Disposition-Notification-To: <{to}>\r\n"));
    }
    if !headers::has(msg, "return-receipt-to") {
        added.push_str(&format!("Return-Receipt-To: <{to}>\r\n"));
    }
    added
}

/// `BX-Sending-Run-Control`: dryrun, ignore-suppression, debug.
fn run_control(fields: &Fields, job: &mut Job) {
    let control = fields
        .get("BX-Sending-Run-Control")
        .unwrap_or_default()
        .to_ascii_lowercase();
    let words: Vec<&str> = control.split([',', ' ']).collect();
    job.dryrun = words.contains(&"dryrun");
    job.ignore_suppression = words.contains(&"ignore-suppression");
    job.debug = words.contains(&"debug");
}

/// `BX-Sending-Method` and the smarthost fields: the job's smarthost, or why the message
/// cannot be sent as it asks.
fn sending_method(cfg: &Config, fields: &Fields, job: &mut Job) -> Option<String> {
    let method = fields
        .get("BX-Sending-Method")
        .map(|m| m.to_ascii_lowercase());
    let rem = match method.as_deref() {
        // Injection: qms's own routes; smarthost fields do not apply.
        Some("inject") => Ok(None),
        Some("submit") => smarthost::parse(&fields.0).and_then(|h| {
            h.map(Some)
                .ok_or_else(|| "BX-Sending-Method: submit needs BX-MTA-Rem-Host".to_string())
        }),
        None => smarthost::parse(&fields.0),
        Some(_) => Err("BX-Sending-Method is not inject or submit".to_string()),
    };
    match rem {
        Ok(Some(_)) if !smarthost::allowed(cfg, &job.client) => {
            Some("5.7.1 this submitter may not choose a smarthost (BX-MTA-Rem-*)".into())
        }
        Ok(h) => {
            job.smarthost = h;
            None
        }
        Err(e) => Some(format!("5.5.4 {e}")),
    }
}

/// The `BX-` fields qms acts on; others are stripped unread (and logged by name).
const KNOWN: [&str; 14] = [
    "bx-delivery-notification-req-to",
    "bx-delivery-notification-req-for",
    "bx-delivery-notification-req-perrecipient",
    "bx-non-delivery-notification-req-to",
    "bx-non-delivery-notification-req-for",
    "bx-non-delivery-notification-req-perrecipient",
    "bx-disposition-notification-req-to",
    "bx-disposition-notification-req-for",
    "bx-disposition-notification-req-perrecipient",
    "bx-sending-method",
    "bx-sending-run-control",
    "bx-delivery-notification",
    "bx-mta-submission-pre-plugins",
    "bx-mta-submission-post-plugins",
];

/// Logs what was applied, the fields stripped unknown (by name only), and a refusal.
fn log_applied(job: &Job, names: &[&str], pre_plugins: &[String], refusal: Option<&str>) {
    let stripped: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| n.to_ascii_lowercase().starts_with("bx-"))
        .collect();
    let ignored: Vec<&str> = stripped
        .iter()
        .copied()
        .filter(|n| !KNOWN.contains(&n.to_ascii_lowercase().as_str()) && !smarthost::is_field(n))
        .collect();
    if !ignored.is_empty() {
        // Names only: these fields can carry credentials (BX-MTA-Rem-Passwd).
        qlog!(
            "qid={} status=msp-ignored reason=\"unknown; stripped\" headers={}",
            job.id,
            quote(&ignored.join(","))
        );
    }
    // The smarthost is shown as host, port and user: never its password.
    qlog!(
        "qid={} status=msp from={} crossref={} envid={} dryrun={} debug={} smarthost={} plugins={} stripped={}",
        job.id,
        qms_common::address::show_sender(&job.sender),
        quote(job.crossref.as_deref().unwrap_or("-")),
        quote(job.envid.as_deref().unwrap_or("-")),
        job.dryrun,
        job.debug,
        quote(&job.smarthost.as_ref().map_or("-".into(), |h| h.to_string())),
        quote(&format!("pre:{} post:{}", pre_plugins.join(","), job.post_plugins.join(","))),
        stripped.len()
    );
    if let Some(r) = refusal {
        qlog!("qid={} status=msp-refused reason={}", job.id, quote(r));
    }
}
