//! SMTP AUTH (PLAIN and LOGIN) against a file of hashed passwords, with failures slowed and
//! limited per client address. Passwords are never logged or kept.

use base64::Engine;
use qms_common::Config;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const WINDOW: Duration = Duration::from_secs(15 * 60);

/// Checks a user's password against the `[auth] users` file (re-read when it changes).
pub fn verify(cfg: &Config, user: &str, password: &str) -> bool {
    let Some(path) = &cfg.auth.users else {
        return false;
    };
    let Ok(text) = std::fs::read_to_string(path) else {
        return false;
    };
    let Some(hash) = text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.split_once(':'))
        .find(|(u, _)| *u == user)
        .map(|(_, h)| h.split(':').next().unwrap_or("").trim().to_string())
    else {
        // Spend the time a real check would, so a missing user cannot be told apart.
        static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        let _ = check(
            DUMMY.get_or_init(|| hash("no such user").unwrap_or_default()),
            password,
        );
        return false;
    };
    check(&hash, password)
}

fn check(hash: &str, password: &str) -> bool {
    if hash.starts_with("$argon2") {
        use argon2::password_hash::{PasswordHash, PasswordVerifier};
        return PasswordHash::new(hash).is_ok_and(|h| {
            argon2::Argon2::default()
                .verify_password(password.as_bytes(), &h)
                .is_ok()
        });
    }
    if hash.starts_with("$6$") {
        return sha_crypt::sha512_check(password, hash).is_ok();
    }
    false
}

/// A new argon2id hash for `qms passwd`.
pub fn hash(password: &str) -> Result<String, String> {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let mut seed = [0u8; 16];
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut seed))
        .map_err(|e| e.to_string())?;
    let salt = SaltString::encode_b64(&seed).map_err(|e| e.to_string())?;
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

/// Decodes `AUTH PLAIN` data: authzid NUL authcid NUL password.
pub fn decode_plain(b64: &str) -> Option<(String, String)> {
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()?;
    let mut parts = raw.split(|b| *b == 0);
    let authz = parts.next()?;
    let user = String::from_utf8(parts.next()?.to_vec()).ok()?;
    let pass = String::from_utf8(parts.next()?.to_vec()).ok()?;
    if parts.next().is_some() || user.is_empty() || (!authz.is_empty() && authz != user.as_bytes())
    {
        return None;
    }
    Some((user, pass))
}

pub fn decode_text(b64: &str) -> Option<String> {
    String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .ok()?,
    )
    .ok()
}

/// Failed attempts per client address: each failure waits longer, too many lock AUTH out.
#[derive(Default)]
pub struct Throttle {
    failures: Mutex<HashMap<IpAddr, (u32, Instant)>>,
}

impl Throttle {
    pub fn blocked(&self, ip: Option<IpAddr>, max: u32) -> bool {
        let (Some(ip), Ok(map)) = (ip, self.failures.lock()) else {
            return false;
        };
        map.get(&ip)
            .is_some_and(|(n, since)| *n >= max && since.elapsed() < WINDOW)
    }

    /// Records a failure and returns how long to wait before answering.
    pub fn fail(&self, ip: Option<IpAddr>) -> Duration {
        let (Some(ip), Ok(mut map)) = (ip, self.failures.lock()) else {
            return Duration::from_secs(1);
        };
        map.retain(|_, (_, since)| since.elapsed() < WINDOW);
        let e = map.entry(ip).or_insert((0, Instant::now()));
        e.0 += 1;
        Duration::from_millis(500 * u64::from(e.0.min(8)))
    }

    pub fn succeed(&self, ip: Option<IpAddr>) {
        if let (Some(ip), Ok(mut map)) = (ip, self.failures.lock()) {
            map.remove(&ip);
        }
    }
}

pub use qms_common::authority::may_send_as;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_verify() {
        let h = hash("s3cret").unwrap();
        assert!(check(&h, "s3cret"));
        assert!(!check(&h, "wrong"));
        assert!(
            !check("plain", "plain"),
            "plain text passwords are never accepted"
        );
        let sha =
            sha_crypt::sha512_simple("pw", &sha_crypt::Sha512Params::new(5000).unwrap()).unwrap();
        assert!(check(&sha, "pw"));
    }

    #[test]
    fn plain_decoding() {
        let b = base64::engine::general_purpose::STANDARD.encode(b"\0alice\0pw");
        assert_eq!(decode_plain(&b), Some(("alice".into(), "pw".into())));
        let b = base64::engine::general_purpose::STANDARD.encode(b"bob\0alice\0pw");
        assert_eq!(
            decode_plain(&b),
            None,
            "authorizing as another user is refused"
        );
    }
}
