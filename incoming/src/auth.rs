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

/// Password checks that may run at once in the whole server: each argon2 check takes 19 MiB
/// and a core's worth of time, so parallel clients queue here instead of multiplying them.
const CHECKS_AT_ONCE: usize = 2;
/// How long an attempt waits for a free check before it is answered 454.
const CHECK_WAIT: Duration = Duration::from_secs(5);
/// A network (/24, /64) may fail this many times the per-address limit.
const NETWORK_FACTOR: u32 = 4;

/// AUTH attempts per client address and per network: an attempt counts from the moment it
/// starts (so parallel attempts cannot all slip under the limit), each failure waits longer,
/// too many lock AUTH out; and the number of password checks running at once is bounded.
#[derive(Default)]
pub struct Throttle {
    /// (attempts failed or under way, since) per address and per network.
    failures: Mutex<HashMap<IpAddr, (u32, Instant)>>,
    checks: Mutex<usize>,
    freed: std::sync::Condvar,
}

/// Why an attempt is not checked.
pub enum Refused {
    /// Too many failures from the address or its network: 421 4.7.0.
    LockedOut,
    /// Every password check is busy: 454 4.7.0, try again.
    Busy,
}

/// One counted attempt; give it back with [`Throttle::succeed`] or [`Throttle::fail`].
pub struct Attempt {
    ip: Option<IpAddr>,
}

impl Throttle {
    /// Counts an attempt before anything is checked, then waits for a free password check.
    pub fn begin(&self, ip: Option<IpAddr>, max: u32) -> Result<Attempt, Refused> {
        if let (Some(ip), Ok(mut map)) = (ip, self.failures.lock()) {
            map.retain(|_, (_, since)| since.elapsed() < WINDOW);
            let net = qms_common::config::network_of(ip);
            let over = |k: &IpAddr, limit: u32| map.get(k).is_some_and(|(n, _)| *n >= limit);
            if over(&ip, max) || (net != ip && over(&net, max * NETWORK_FACTOR)) {
                return Err(Refused::LockedOut);
            }
            for k in [ip, net] {
                map.entry(k).or_insert((0, Instant::now())).0 += 1;
                if net == ip {
                    break;
                }
            }
        }
        let attempt = Attempt { ip };
        let Ok(mut busy) = self.checks.lock() else {
            return Ok(attempt);
        };
        let end = Instant::now() + CHECK_WAIT;
        while *busy >= CHECKS_AT_ONCE {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                drop(busy);
                // Not a failure of the client's: the count goes back.
                self.uncount(ip);
                return Err(Refused::Busy);
            }
            busy = match self.freed.wait_timeout(busy, left) {
                Ok((b, _)) => b,
                Err(_) => return Ok(attempt),
            };
        }
        *busy += 1;
        Ok(attempt)
    }

    fn release_check(&self) {
        if let Ok(mut busy) = self.checks.lock() {
            *busy = busy.saturating_sub(1);
        }
        self.freed.notify_one();
        // The 19 MiB an argon2 check took goes back to the system, not to a thread's arena.
        // Safety: malloc_trim only returns free memory; it touches nothing in use.
        unsafe { libc::malloc_trim(0) };
    }

    fn uncount(&self, ip: Option<IpAddr>) {
        if let (Some(ip), Ok(mut map)) = (ip, self.failures.lock()) {
            let net = qms_common::config::network_of(ip);
            for k in [ip, net] {
                if let Some(e) = map.get_mut(&k) {
                    e.0 = e.0.saturating_sub(1);
                }
                if net == ip {
                    break;
                }
            }
        }
    }

    /// Ends a failed attempt (it stays counted) and returns how long to wait before answering.
    pub fn fail(&self, a: Attempt) -> Duration {
        self.release_check();
        let n =
            a.ip.and_then(|ip| self.failures.lock().ok()?.get(&ip).map(|e| e.0))
                .unwrap_or(1);
        Duration::from_millis(500 * u64::from(n.min(8)))
    }

    /// Ends a successful attempt: the address starts again from nothing.
    pub fn succeed(&self, a: Attempt) {
        self.release_check();
        self.uncount(a.ip);
        if let (Some(ip), Ok(mut map)) = (a.ip, self.failures.lock()) {
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
