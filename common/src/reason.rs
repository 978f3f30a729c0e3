//! Why a recipient failed, in words a sender can act on, from the enhanced status code and
//! the diagnostic text, for reports read (`qms dsn classify`, dsnproc) and for qms's own
//! failures (`qms track`). The vocabulary is documented in docs/reports.md; the phrases are
//! those the common MTAs and providers write (their documentation and their bounces).

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Reason {
    #[serde(rename = "user unknown")]
    UserUnknown,
    #[serde(rename = "mailbox full")]
    MailboxFull,
    #[serde(rename = "host unknown")]
    HostUnknown,
    /// Refused for the sending host's or domain's reputation, or by the receiver's policy.
    #[serde(rename = "blocked")]
    Blocked,
    #[serde(rename = "spam detected")]
    Spam,
    #[serde(rename = "message too big")]
    TooBig,
    /// Given up after retrying for too long.
    #[serde(rename = "expired")]
    Expired,
    #[serde(rename = "network error")]
    Network,
    #[serde(rename = "system error")]
    System,
    /// TLS, authentication of the sender (SPF, DKIM, DMARC), or a required security feature.
    #[serde(rename = "security error")]
    Security,
    #[serde(rename = "rate limited")]
    RateLimited,
    /// The mailbox exists but is disabled, suspended or inactive.
    #[serde(rename = "suspended")]
    Suspended,
    #[serde(rename = "has moved")]
    HasMoved,
    #[serde(rename = "content rejected")]
    Content,
    #[serde(rename = "other")]
    Other,
}

impl Reason {
    pub const ALL: [Reason; 15] = [
        Reason::UserUnknown,
        Reason::MailboxFull,
        Reason::HostUnknown,
        Reason::Blocked,
        Reason::Spam,
        Reason::TooBig,
        Reason::Expired,
        Reason::Network,
        Reason::System,
        Reason::Security,
        Reason::RateLimited,
        Reason::Suspended,
        Reason::HasMoved,
        Reason::Content,
        Reason::Other,
    ];

    /// The reason a word of the vocabulary names ("user unknown").
    pub fn parse(s: &str) -> Option<Reason> {
        Reason::ALL
            .into_iter()
            .find(|r| r.as_str().eq_ignore_ascii_case(s.trim()))
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::UserUnknown => "user unknown",
            Reason::MailboxFull => "mailbox full",
            Reason::HostUnknown => "host unknown",
            Reason::Blocked => "blocked",
            Reason::Spam => "spam detected",
            Reason::TooBig => "message too big",
            Reason::Expired => "expired",
            Reason::Network => "network error",
            Reason::System => "system error",
            Reason::Security => "security error",
            Reason::RateLimited => "rate limited",
            Reason::Suspended => "suspended",
            Reason::HasMoved => "has moved",
            Reason::Content => "content rejected",
            Reason::Other => "other",
        }
    }
}

/// Phrases, most specific first: the first that occurs in the diagnostic decides.
/// Words that say only that something was refused: they decide after a specific status code.
#[rustfmt::skip]
const WEAK: &[(Reason, &[&str])] = &[(
    Reason::Blocked,
    &[
        "denied", "refused", "policy", "not allowed", "relay", "reject", "poor", "ip address",
        "not accepting", "access", "not permitted", "mail from",
    ],
)];

#[rustfmt::skip]
const PHRASES: &[(Reason, &[&str])] = &[
    (
        Reason::Security,
        &[
            "tls", "certificate", "encryption required", "must issue a starttls",
            "authentication", "dmarc", "spf check", "spf fail", "dkim",
            "sender policy framework", "not authorized to send", "unauthenticated",
            "spf record", "purported responsible address",
        ],
    ),
    (
        Reason::HasMoved,
        &[
            "has moved", "address changed", "changed its address", "no longer at",
        ],
    ),
    (
        Reason::Expired,
        &[
            "retry timeout exceeded", "in the queue too long", "too long in queue",
            "delivery time expired", "message expired", "expired after", "gave up",
            "has been delayed for", "could not be delivered within", "cannot send message for",
            "retry time", "timeout exceeded", "lifetime exceeded", "maximum time", "giving up",
            "could not deliver for the last", "envelope expired",
        ],
    ),
    (
        Reason::MailboxFull,
        &[
            "mailbox full", "mailbox is full", "over quota", "quota exceeded",
            "exceeded storage", "exceeds the quota", "mailbox exceeded", "full mailbox",
            "is over its quota", "user is over", "insufficient disk space for user",
            "mailbox size limit", "exceeded the local limit", "too many messages in",
            "mail box full", "mailfolder is full",
        ],
    ),
    (
        Reason::TooBig,
        &[
            "message size exceeds", "message too large", "message is too large", "too big",
            "size limit exceeded", "exceeds size limit", "message length exceeds",
            "message size limit", "maximum message size", "exceeded the maximum size",
            "size exceeds", "mail size limit",
        ],
    ),
    (
        Reason::Suspended,
        &[
            "suspended", "disabled", "inactive", "deactivated", "account expired",
            "mailbox unavailable: the account", "account has been locked", "is frozen",
            "not active", "temporarily unavailable mailbox",
        ],
    ),
    (
        Reason::HostUnknown,
        &[
            "host unknown", "unknown host", "domain not found", "host not found", "no mx",
            "name or service not known", "domain does not exist", "unrouteable mail domain",
            "nxdomain", "no such domain", "host or domain name not found",
            "domain name not found", "unknown domain", "unresolvable", "hostname not found",
            "dns error", "bad destination system address",
        ],
    ),
    (
        Reason::UserUnknown,
        &[
            "user unknown", "unknown user", "no such user", "unknown recipient",
            "recipient unknown", "no such recipient", "recipient not found", "user not found",
            "mailbox not found", "no mailbox", "mailbox unavailable", "does not exist",
            "doesn't exist", "not exist", "invalid recipient", "invalid mailbox",
            "no such mailbox", "unknown address", "address unknown", "unrouteable address",
            "not a valid mailbox", "addressee unknown", "no such address", "user doesn't have",
            "account that you tried to reach", "recipient name is not recognized",
            "not our customer", "mailbox is unavailable", "unknown local part",
            "invalid address", "bad destination mailbox", "user invalid", "mailbox does not",
            "address not found", "no valid recipients", "not listed in", "invalid user",
            "user account is unavailable", "no mailbox here", "not found", "not a member",
            "couldn't be found", "could not be found", "no longer valid", "not recognized",
            "unknown or illegal alias", "no valid recipients",
        ],
    ),
    (
        Reason::RateLimited,
        &[
            "rate limit", "ratelimit", "too many", "throttl", "try again later",
            "sending rate", "exceeded the rate", "temporarily deferred", "slow down",
        ],
    ),
    (
        Reason::Spam,
        &[
            "as spam", "is spam", "spam detected", "spam message", "spam content",
            "likely spam", "spam score", "spammy", "spam filter", "junk", "bulk mail",
            "unsolicited", "looks suspicious", "message has been blocked as", "phishing",
            "spam-like", "considered spam", "appears to be spam", "spam rejected",
            "suspected spam",
        ],
    ),
    (
        Reason::Content,
        &[
            "virus", "malware", "attachment", "content", "prohibited",
            "message rejected due to", "header",
        ],
    ),
    (
        Reason::Network,
        &[
            "connection refused", "connection timed out", "timed out",
            "network is unreachable", "no route to host", "could not connect",
            "unable to connect", "lost connection", "connection reset", "connection closed",
            "establish an smtp connection", "connection dropped", "can't connect",
            "failed to connect",
        ],
    ),
    (
        Reason::Blocked,
        &[
            "blocked", "blacklist", "blocklist", "block list", "black list", "listed", "rbl",
            "dnsbl", "spamhaus", "reputation", "banned", "reverse dns", "ptr record",
            "ptr resource", "client ip", "invalid ip", "unroutable sender", "権限",
        ],
    ),
    (
        Reason::System,
        &[
            "system error", "local configuration", "internal error", "mail loop",
            "forwarding loop", "loops back", "too many hops", "system not accepting",
            "mailer error", "i/o error", "server error", "temporary failure", "resources",
            "internal system error",
        ],
    ),
];

/// The reason for a recipient's failure or delay.
pub fn of(status: Option<&str>, diagnostic: Option<&str>) -> Reason {
    // The reply's own enhanced code is often more precise than the report's Status field.
    let in_reply = diagnostic.and_then(status_in);
    let status = match (status, in_reply.as_deref()) {
        (Some(s), Some(r)) if s.ends_with(".0.0") && !r.ends_with(".0.0") => Some(r),
        (None, r) => r,
        (s, _) => s,
    };
    // Codes that mean one thing whatever the words around them.
    if let Some(r) = status.and_then(|s| match s.get(2..) {
        Some("4.7") => Some(Reason::Expired),
        Some("2.2") => Some(Reason::MailboxFull),
        Some("1.1") => Some(Reason::UserUnknown),
        Some("2.3") | Some("3.4") => Some(Reason::TooBig),
        Some("1.6") => Some(Reason::HasMoved),
        _ => None,
    }) {
        return r;
    }
    let d = diagnostic.unwrap_or("").to_ascii_lowercase();
    let said = |table: &[(Reason, &[&str])]| {
        table
            .iter()
            .find(|(_, phrases)| phrases.iter().any(|p| d.contains(p)))
            .map(|(r, _)| *r)
    };
    let coded = status
        .filter(|s| !s.ends_with(".0.0"))
        .map(by_status)
        .filter(|r| *r != Reason::Other);
    said(PHRASES)
        .or(coded)
        .or_else(|| said(WEAK))
        .or(status.map(by_status))
        .unwrap_or(Reason::Other)
}

/// RFC 3463 and the IANA registry of enhanced status codes.
fn by_status(s: &str) -> Reason {
    let rest = s.get(2..).unwrap_or("");
    match rest {
        "1.1" | "1.0" | "1.3" => Reason::UserUnknown,
        "1.2" => Reason::HostUnknown,
        "1.6" => Reason::HasMoved,
        "2.1" => Reason::Suspended,
        "2.2" | "3.1" => Reason::MailboxFull,
        "2.3" | "3.4" => Reason::TooBig,
        "4.7" => Reason::Expired,
        "4.6" | "3.5" | "3.0" | "3.2" | "3.3" => Reason::System,
        "7.1" | "7.0" | "7.25" | "7.27" => Reason::Blocked,
        "7.26" | "7.23" | "7.20" | "7.21" | "7.22" | "7.24" | "7.10" | "7.11" | "7.8" | "7.5"
        | "7.7" | "7.9" => Reason::Security,
        "7.28" => Reason::Spam,
        "7.13" | "7.14" => Reason::Suspended,
        _ if rest.starts_with("4.") => Reason::Network,
        _ if rest.starts_with("6.") => Reason::Content,
        _ if rest.starts_with("2.") => Reason::MailboxFull,
        _ => Reason::Other,
    }
}

/// An enhanced status code in text (`5.1.1`), or the class of an SMTP reply code.
pub fn status_in(text: &str) -> Option<String> {
    for w in text.split(|c: char| c.is_whitespace() || "()[],;#<>".contains(c)) {
        let parts: Vec<&str> = w.trim_end_matches('.').split('.').collect();
        if parts.len() == 3
            && matches!(parts[0], "2" | "4" | "5")
            && parts[1..]
                .iter()
                .all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()))
        {
            return Some(parts.join("."));
        }
    }
    text.split_whitespace()
        .find_map(|w| match w.trim_end_matches(['-', ':']) {
            c if c.len() == 3
                && c.starts_with(['4', '5'])
                && c.bytes().all(|b| b.is_ascii_digit()) =>
            {
                Some(format!("{}.0.0", &c[..1]))
            }
            _ => None,
        })
}

/// The class digit of the SMTP reply at the start of a diagnostic, if it has one.
pub fn reply_class(diagnostic: &str) -> Option<char> {
    let d = diagnostic.trim_start();
    let code = d.get(..3)?;
    (code.bytes().all(|b| b.is_ascii_digit()) && matches!(&code[..1], "2" | "4" | "5"))
        .then(|| code.chars().next().unwrap_or('5'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_before_codes() {
        assert_eq!(
            of(
                Some("5.1.1"),
                Some("550 5.1.1 <a@b>: Recipient address rejected: User unknown")
            ),
            Reason::UserUnknown
        );
        assert_eq!(of(Some("5.2.2"), None), Reason::MailboxFull);
        assert_eq!(
            of(
                Some("5.7.1"),
                Some("550 5.7.1 Service unavailable; client host blocked using zen.spamhaus.org")
            ),
            Reason::Blocked
        );
        assert_eq!(
            of(
                Some("4.4.1"),
                Some("connect to mx.example.net[192.0.2.1]:25: Connection refused")
            ),
            Reason::Network
        );
        assert_eq!(of(None, Some("retry timeout exceeded")), Reason::Expired);
        assert_eq!(
            of(
                Some("5.7.1"),
                Some("550 5.7.1 Message rejected as spam by Content Filtering")
            ),
            Reason::Spam
        );
        assert_eq!(of(Some("5.1.6"), None), Reason::HasMoved);
        assert_eq!(of(None, None), Reason::Other);
        assert_eq!(reply_class("452 4.2.2 over quota"), Some('4'));
    }
}
