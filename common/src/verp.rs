//! VERP envelopes for tracked mail: `envelope+QID-SIG@domain`, one per recipient, where SIG
//! is an HMAC-SHA256 of the queue id and the recipient under the `[tracking] key`. A report
//! sent back to that address names its message, and its recipient is checked against the
//! signature, so a forged bounce is recognised.

use crate::Address;
use hmac::{Hmac, Mac};
use sha2::Sha256;

const ALPHABET: &[u8; 32] = b"0123456789bcdfghjklmnpqrstvwxyza";
const SIG_LEN: usize = 13;

fn sig(key: &[u8], qid: &str, recipient: &str) -> String {
    keyed_text(key, &[qid, &recipient.to_lowercase()], ALPHABET, SIG_LEN)
}

/// `len` characters (at most 25) of `alphabet` from an HMAC-SHA256 under `key` of `parts`
/// joined by NULs: the signatures of VERP envelopes and SRS addresses.
pub(crate) fn keyed_text(key: &[u8], parts: &[&str], alphabet: &[u8; 32], len: usize) -> String {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else {
        return String::new();
    };
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            mac.update(b"\0");
        }
        mac.update(part.as_bytes());
    }
    let bytes = mac.finalize().into_bytes();
    // 5 bits a character, from the first bytes that hold them (13 characters: 9 bytes).
    let mut v: u128 = 0;
    for b in &bytes[..(len * 5).div_ceil(8).min(16)] {
        v = (v << 8) | u128::from(*b);
    }
    (0..len)
        .map(|i| alphabet[((v >> (5 * i)) & 31) as usize] as char)
        .collect()
}

/// The envelope sender for one recipient of message `qid`.
pub fn envelope(base: &Address, key: &[u8], qid: &str, recipient: &str) -> Option<Address> {
    Address::new(
        &format!("{}+{qid}-{}", base.local(), sig(key, qid, recipient)),
        base.domain(),
    )
    .ok()
}

/// What a VERP address says, once checked.
#[derive(Debug, PartialEq, Eq)]
pub enum Token {
    /// The address is not a VERP address of `base`.
    None,
    /// Signed by us for this message and recipient.
    Valid { qid: String },
    /// Looks like ours, but the signature does not match the recipient: not believed.
    Forged { qid: String },
}

/// Checks the VERP address a report came to, for the recipient the report names.
pub fn check(base: &Address, key: &[u8], to: &str, recipient: &str) -> Token {
    let Ok(addr) = Address::parse(to.trim().trim_start_matches('<').trim_end_matches('>')) else {
        return Token::None;
    };
    let prefix = format!("{}+", base.local());
    let Some(token) = addr.local().strip_prefix(&prefix) else {
        return Token::None;
    };
    if !addr.domain().eq_ignore_ascii_case(base.domain()) {
        return Token::None;
    }
    let Some((qid, got)) = token.rsplit_once('-') else {
        return Token::None;
    };
    let want = sig(key, qid, recipient);
    // Compared in full whatever the content, so timing says nothing about the signature.
    let same = want.len() == got.len()
        && want
            .bytes()
            .zip(got.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if same && !want.is_empty() {
        Token::Valid {
            qid: qid.to_string(),
        }
    } else {
        Token::Forged {
            qid: qid.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_stays_the_same_across_versions() {
        // Reports to envelopes made before an upgrade must still be believed after it.
        assert_eq!(
            sig(b"a key of sixteen+", "1M0X8PKFBYXYC0Za", "Bob@Example.test"),
            "blvpdw3pzh1wg"
        );
    }

    #[test]
    fn signs_and_checks() {
        let base = Address::parse("envelope@example.test").unwrap();
        let e = envelope(&base, b"k", "1M0XFQZDYP0557KK", "Bob@far.test").unwrap();
        assert!(e.local().starts_with("envelope+1M0XFQZDYP0557KK-"));
        assert_eq!(
            check(&base, b"k", &e.to_string(), "bob@far.test"),
            Token::Valid {
                qid: "1M0XFQZDYP0557KK".into()
            }
        );
        assert!(matches!(
            check(&base, b"k", &e.to_string(), "carol@far.test"),
            Token::Forged { .. }
        ));
        assert!(matches!(
            check(&base, b"other", &e.to_string(), "bob@far.test"),
            Token::Forged { .. }
        ));
        assert_eq!(
            check(&base, b"k", "someone@example.test", "bob@far.test"),
            Token::None
        );
    }
}
