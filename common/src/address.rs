//! Mail addresses as they appear in the SMTP envelope (RFC 5321 Mailbox).

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// A mailbox `local@domain`. The domain is kept lower-case; the local part as given,
/// since RFC 5321 leaves its case to the receiving host.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Address {
    local: String,
    domain: String,
}

#[derive(Debug, PartialEq, Eq)]
pub enum AddressError {
    Empty,
    NoDomain(String),
    BadLocal(String),
    BadDomain(String),
    TooLong(String),
}

impl fmt::Display for AddressError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            AddressError::Empty => write!(f, "empty address"),
            AddressError::NoDomain(a) => write!(f, "address {a:?} has no domain"),
            AddressError::BadLocal(a) => write!(f, "address {a:?} has an invalid local part"),
            AddressError::BadDomain(a) => write!(f, "address {a:?} has an invalid domain"),
            AddressError::TooLong(a) => write!(f, "address {a:?} is too long"),
        }
    }
}

impl std::error::Error for AddressError {}

fn atext(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c) || (c as u32) >= 0x80
}

fn valid_local(local: &str) -> bool {
    if local.is_empty() || local.len() > 64 {
        return false;
    }
    if local.starts_with('"') {
        // Quoted string: printable ASCII, with backslash escapes, no bare quote inside.
        if local.len() < 2 || !local.ends_with('"') {
            return false;
        }
        let inner = &local[1..local.len() - 1];
        let mut esc = false;
        for c in inner.chars() {
            if esc {
                esc = false;
            } else if c == '\\' {
                esc = true;
            } else if c == '"' || c.is_control() {
                return false;
            }
        }
        return !esc;
    }
    local
        .split('.')
        .all(|atom| !atom.is_empty() && atom.chars().all(atext))
}

fn valid_domain(domain: &str) -> bool {
    if domain.is_empty() || domain.len() > 255 {
        return false;
    }
    if domain.starts_with('[') {
        // Address literal: [1.2.3.4] or [IPv6:...]
        let inner = domain.trim_start_matches('[').trim_end_matches(']');
        return domain.ends_with(']')
            && (inner.parse::<std::net::Ipv4Addr>().is_ok()
                || inner
                    .strip_prefix("IPv6:")
                    .or_else(|| inner.strip_prefix("ipv6:"))
                    .is_some_and(|v6| v6.parse::<std::net::Ipv6Addr>().is_ok()));
    }
    domain.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || (c as u32) >= 0x80)
    })
}

impl Address {
    /// Parses `local@domain` (no angle brackets, no comments).
    pub fn parse(s: &str) -> Result<Address, AddressError> {
        let s = s.trim();
        if s.is_empty() {
            return Err(AddressError::Empty);
        }
        if s.len() > 320 {
            return Err(AddressError::TooLong(s.into()));
        }
        let at = s
            .rfind('@')
            .ok_or_else(|| AddressError::NoDomain(s.into()))?;
        let (local, domain) = (&s[..at], &s[at + 1..]);
        if !valid_local(local) {
            return Err(AddressError::BadLocal(s.into()));
        }
        if !valid_domain(domain) {
            return Err(AddressError::BadDomain(s.into()));
        }
        Ok(Address {
            local: local.to_string(),
            domain: domain.to_ascii_lowercase(),
        })
    }

    /// Builds an address from parts already known to be valid (a user name and our host name).
    pub fn new(local: &str, domain: &str) -> Result<Address, AddressError> {
        Address::parse(&format!("{local}@{domain}"))
    }

    pub fn local(&self) -> &str {
        &self.local
    }

    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// Splits `user+tag` at the first `sep`: the user and the tag, if any.
    pub fn split_extension(&self, sep: char) -> (&str, Option<&str>) {
        match self.local.split_once(sep) {
            Some((user, tag)) if !user.is_empty() => (user, Some(tag)),
            _ => (&self.local, None),
        }
    }

    /// The address with the local part lower-cased: the key for table lookups.
    pub fn lookup_key(&self) -> String {
        format!("{}@{}", self.local.to_lowercase(), self.domain)
    }

    /// True when the address needs SMTPUTF8 to be sent.
    pub fn is_utf8(&self) -> bool {
        !self.local.is_ascii() || !self.domain.is_ascii()
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}@{}", self.local, self.domain)
    }
}

impl std::str::FromStr for Address {
    type Err = AddressError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Address::parse(s)
    }
}

impl Serialize for Address {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Address {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Address::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Serde helper for an envelope sender: `None` is the null sender `<>`, stored as "".
pub mod reverse_path {
    use super::Address;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(a: &Option<Address>, s: S) -> Result<S::Ok, S::Error> {
        match a {
            Some(a) => s.collect_str(a),
            None => s.serialize_str(""),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Address>, D::Error> {
        let s = String::deserialize(d)?;
        if s.is_empty() {
            Ok(None)
        } else {
            Address::parse(&s)
                .map(Some)
                .map_err(serde::de::Error::custom)
        }
    }
}

/// Shows an envelope sender the way logs and mailq do: `<>` for the null sender.
pub fn show_sender(a: &Option<Address>) -> String {
    match a {
        Some(a) => a.to_string(),
        None => "<>".into(),
    }
}

/// An address as a log value: quoted when its local part holds a space, `=` or `"`.
pub fn logged(a: &Address) -> String {
    crate::log::quote_owned(a.to_string())
}

/// The envelope sender as a log value (`<>` for none).
pub fn logged_sender(a: &Option<Address>) -> String {
    crate::log::quote_owned(show_sender(a))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_quoted() {
        let a = Address::parse("Alice.B+tag@Example.TEST").unwrap();
        assert_eq!(a.local(), "Alice.B+tag");
        assert_eq!(a.domain(), "example.test");
        assert_eq!(a.split_extension('+'), ("Alice.B", Some("tag")));
        assert!(Address::parse("\"a b\"@x.test").is_ok());
        assert!(Address::parse("a@[127.0.0.1]").is_ok());
    }

    #[test]
    fn refuses_garbage() {
        for bad in [
            "",
            "a",
            "@x.test",
            "a@",
            "a..b@x.test",
            "a@x..test",
            "a b@x.test",
            "a@-x.test",
            "\"a@x.test",
        ] {
            assert!(Address::parse(bad).is_err(), "{bad} accepted");
        }
    }
}
