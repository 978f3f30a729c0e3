//! SRS, the Sender Rewriting Scheme: mail an alias forwards to another domain leaves with
//! `SRS0=HASH=TT=domain=local@DOMAIN` as its envelope sender, so the next hop's SPF check asks
//! about our address, not the original sender's (whose SPF does not name us). A bounce sent
//! back to that address is checked (an HMAC under the `[srs]` secret, and an age of at most
//! `MAX_AGE_DAYS`) and goes on to the original sender; a forged or stale one is refused at RCPT,
//! so the address cannot be used to relay.
//!
//! Mail whose sender is already another forwarder's SRS address is wrapped once more as SRS1
//! (`SRS1=HASH=forwarder==HASH=TT=domain=local@DOMAIN`), so that the address does not grow
//! with every hop; its bounce goes back to that forwarder, which checks its own part.
//!
//! The secret file holds one secret per line: the first signs, every one is accepted, so a
//! secret can be changed without refusing the bounces of mail sent just before.

use crate::Address;
use std::path::Path;

const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
const HASH_LEN: usize = 6;
/// How long a rewritten address is good for (as postsrsd).
const MAX_AGE_DAYS: u64 = 21;

/// `[srs]`: the domain of the rewritten addresses and the secrets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Srs {
    pub domain: String,
    pub secret_file: std::path::PathBuf,
    secrets: Vec<Vec<u8>>,
}

impl Srs {
    /// Reads the secrets (one a line, at least 16 bytes each) from `file`.
    pub fn load(domain: &str, file: &Path) -> Result<Srs, String> {
        let text = std::fs::read_to_string(file)
            .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
        let secrets: Vec<Vec<u8>> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(|l| l.as_bytes().to_vec())
            .collect();
        if secrets.is_empty() || secrets.iter().any(|s| s.len() < 16) {
            return Err(format!(
                "{} must hold secrets of at least 16 characters, one a line",
                file.display()
            ));
        }
        Ok(Srs {
            domain: domain.to_ascii_lowercase(),
            secret_file: file.to_path_buf(),
            secrets,
        })
    }

    /// The HMAC part of an address; case does not count (hops may change it).
    fn hash(secret: &[u8], tt: &str, domain: &str, local: &str) -> String {
        let parts = [tt, domain, local].map(str::to_ascii_lowercase);
        let parts = parts.each_ref().map(String::as_str);
        crate::verp::keyed_text(secret, &parts, ALPHABET, HASH_LEN)
    }

    fn today() -> u64 {
        crate::time::now().max(0) as u64 / 86_400
    }

    fn timestamp(day: u64) -> String {
        let t = day % 1024;
        [t / 32, t % 32]
            .iter()
            .map(|&d| ALPHABET[d as usize] as char)
            .collect()
    }

    /// The envelope sender for `sender`'s mail forwarded elsewhere; None for an address that
    /// is already ours, or one too long to wrap (the local part is at most 64 octets).
    pub fn forward(&self, sender: &Address) -> Option<Address> {
        if sender.domain().eq_ignore_ascii_case(&self.domain) {
            return None;
        }
        let key = &self.secrets[0];
        let (tag, rest) = split_tag(sender.local());
        let local = match tag.as_deref() {
            // Another forwarder's SRS0: name that forwarder and keep its part as it is.
            Some("SRS0") => {
                let hop = sender.domain();
                format!("SRS1={}={hop}=={rest}", Self::hash(key, "SRS1", hop, rest))
            }
            // Already SRS1: the first forwarder stays, re-signed by us.
            Some("SRS1") => {
                let (_, inner) = rest.split_once('=')?;
                let (hop, rest) = inner.split_once("==")?;
                format!("SRS1={}={hop}=={rest}", Self::hash(key, "SRS1", hop, rest))
            }
            _ => {
                let tt = Self::timestamp(Self::today());
                let hash = Self::hash(key, &tt, sender.domain(), sender.local());
                format!("SRS0={hash}={tt}={}={}", sender.domain(), sender.local())
            }
        };
        if local.len() > 64 {
            return None;
        }
        Address::new(&local, &self.domain).ok()
    }

    /// Where a bounce to `addr` goes: None when `addr` is no SRS address of ours, the
    /// original sender when it checks out, else why it is refused.
    pub fn reverse(&self, addr: &Address) -> Option<Result<Address, String>> {
        if !addr.domain().eq_ignore_ascii_case(&self.domain) {
            return None;
        }
        let (tag, rest) = split_tag(addr.local());
        match tag.as_deref() {
            Some("SRS0") => {}
            Some("SRS1") => return Some(self.reverse_srs1(rest)),
            _ => return None,
        }
        let mut parts = addr.local().splitn(5, '=');
        parts.next()?;
        let (Some(hash), Some(tt), Some(domain), Some(local)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Some(Err("not a valid SRS address".into()));
        };
        let signed = self
            .secrets
            .iter()
            .any(|s| Self::hash(s, tt, domain, local).eq_ignore_ascii_case(hash));
        if !signed {
            return Some(Err("SRS address not signed by us".into()));
        }
        let fresh = (0..=MAX_AGE_DAYS)
            .any(|age| Self::timestamp(Self::today().saturating_sub(age)).eq_ignore_ascii_case(tt));
        if !fresh {
            return Some(Err("SRS address too old".into()));
        }
        Some(Address::new(local, domain).map_err(|e| format!("SRS address holds no address: {e}")))
    }

    /// `HASH=forwarder==rest` of an SRS1 address: the SRS0 address of the first forwarder.
    fn reverse_srs1(&self, rest: &str) -> Result<Address, String> {
        let bad = || "not a valid SRS address".to_string();
        let (hash, inner) = rest.split_once('=').ok_or_else(bad)?;
        let (hop, rest) = inner.split_once("==").ok_or_else(bad)?;
        let signed = self
            .secrets
            .iter()
            .any(|s| Self::hash(s, "SRS1", hop, rest).eq_ignore_ascii_case(hash));
        if !signed {
            return Err("SRS address not signed by us".into());
        }
        Address::new(&format!("SRS0={rest}"), hop)
            .map_err(|e| format!("SRS address holds no address: {e}"))
    }
}

/// `SRS0=…` → (Some("SRS0"), "…"); the tag in upper case, None for an ordinary local part.
fn split_tag(local: &str) -> (Option<String>, &str) {
    match local.split_once('=') {
        Some((tag, rest))
            if tag.eq_ignore_ascii_case("SRS0") || tag.eq_ignore_ascii_case("SRS1") =>
        {
            (Some(tag.to_ascii_uppercase()), rest)
        }
        _ => (None, local),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn srs() -> Srs {
        Srs {
            domain: "fwd.example".into(),
            secret_file: "/dev/null".into(),
            secrets: vec![b"a secret of some length".to_vec()],
        }
    }

    #[test]
    fn a_forwarded_sender_comes_back_and_a_forged_one_does_not() {
        let s = srs();
        let orig = Address::parse("Ann.Smith@sender.example").unwrap();
        let wrapped = s.forward(&orig).unwrap();
        assert!(wrapped.local().starts_with("SRS0="), "{wrapped}");
        assert_eq!(wrapped.domain(), "fwd.example");
        assert_eq!(s.reverse(&wrapped), Some(Ok(orig.clone())));
        // Another secret first (a rotation): the old address still comes back.
        let mut rotated = srs();
        rotated
            .secrets
            .insert(0, b"the new secret, also long".to_vec());
        assert_eq!(rotated.reverse(&wrapped), Some(Ok(orig)));
        let forged = Address::new(
            &wrapped
                .local()
                .replacen("sender.example", "victim.example", 1),
            "fwd.example",
        )
        .unwrap();
        assert!(matches!(s.reverse(&forged), Some(Err(_))));
        assert_eq!(s.reverse(&Address::parse("bob@fwd.example").unwrap()), None);
        assert_eq!(s.forward(&Address::parse("x@fwd.example").unwrap()), None);
    }

    #[test]
    fn another_forwarders_srs0_becomes_srs1_and_goes_back_to_that_forwarder() {
        let s = srs();
        let theirs = Address::parse("SRS0=ab12=cd=orig.example=joe@first.example").unwrap();
        let ours = s.forward(&theirs).unwrap();
        assert!(
            ours.local().starts_with("SRS1=")
                && ours
                    .local()
                    .ends_with("=first.example==ab12=cd=orig.example=joe"),
            "{ours}"
        );
        assert_eq!(s.reverse(&ours), Some(Ok(theirs)));
        // A third forwarder keeps the first one's name, not ours.
        let again = Srs {
            domain: "third.example".into(),
            ..srs()
        }
        .forward(&ours)
        .unwrap();
        assert!(again.local().contains("=first.example=="), "{again}");
        let forged = Address::new(
            &ours.local().replace("first.example", "victim.example"),
            "fwd.example",
        )
        .unwrap();
        assert!(matches!(s.reverse(&forged), Some(Err(_))));
    }
}
