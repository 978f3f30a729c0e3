//! Queue ids: 11 characters of arrival time in microseconds and 5 of a counter from a random
//! start (see `random_bits`), in an alphabet whose byte order is its numeric order, so `ls`
//! sorts a queue by arrival.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::io::Read;

const ALPHABET: &[u8; 32] = b"0123456789BCDFGHJKLMNPQRSTVWXYZa";
pub const LEN: usize = 16;

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct QueueId(String);

impl QueueId {
    /// A fresh id. Uniqueness within a process comes from the counter, across processes from
    /// its random start and, in the end, from the exclusive create or rename that claims it.
    pub fn generate() -> QueueId {
        let t = qms_common::time::now_micros();
        let r = random_bits();
        let mut s = String::with_capacity(LEN);
        for i in (0..11).rev() {
            s.push(ALPHABET[((t >> (5 * i)) & 31) as usize] as char);
        }
        for i in (0..5).rev() {
            s.push(ALPHABET[((r >> (5 * i)) & 31) as usize] as char);
        }
        QueueId(s)
    }

    /// A second id for the same arrival (a list's own job, split off by the router): the
    /// time part is kept, the random part is a hash of this id and `salt`, so routing the
    /// same job again after a crash derives the same id.
    pub fn derive(&self, salt: &str) -> QueueId {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in self.0.bytes().chain(salt.bytes()) {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        let mut s = self.0[..11].to_string();
        for i in (0..5).rev() {
            s.push(ALPHABET[((h >> (5 * i)) & 31) as usize] as char);
        }
        QueueId(s)
    }

    pub fn parse(s: &str) -> Option<QueueId> {
        (s.len() == LEN && s.bytes().all(|b| ALPHABET.contains(&b))).then(|| QueueId(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The arrival time the id was made at, in microseconds since 1970.
    pub fn arrival_micros(&self) -> u64 {
        self.0.bytes().take(11).fold(0, |t, b| {
            let digit = ALPHABET.iter().position(|a| *a == b).unwrap_or(0) as u64;
            (t << 5) | digit
        })
    }
}

/// The id's last 25 bits: a counter of this process's ids, from a random start. Ids made in
/// the same microsecond differ by construction within a process (until 2^25 of them), and
/// between processes unless their counters meet, one chance in 2^25 an id; the exclusive
/// create or rename that claims an id catches that. (Random bits for every id, as before,
/// collided within one process: eight threads making 50,000 ids each under CPU load made
/// the same id twice in one run of ten.)
fn random_bits() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    static SEEDED: std::sync::Once = std::sync::Once::new();
    SEEDED.call_once(|| {
        let mut b = [0u8; 8];
        let seeded = std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut b))
            .is_ok();
        let x = if seeded {
            u64::from_le_bytes(b)
        } else {
            qms_common::time::now_micros() ^ (u64::from(std::process::id()) << 20)
        };
        NEXT.store(x, SeqCst);
    });
    NEXT.fetch_add(1, SeqCst) & ((1 << 25) - 1)
}

impl fmt::Display for QueueId {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for QueueId {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        QueueId::parse(&s).ok_or_else(|| format!("{s:?} is not a queue id"))
    }
}

impl From<QueueId> for String {
    fn from(id: QueueId) -> String {
        id.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_tells_its_arrival() {
        let before = qms_common::time::now_micros();
        let id = QueueId::generate();
        let t = id.arrival_micros();
        assert!(
            t >= before && t <= qms_common::time::now_micros(),
            "{t} {before}"
        );
        assert_eq!(id.derive("x").arrival_micros(), t);
    }

    #[test]
    fn ids_sort_by_time_and_differ() {
        let a = QueueId::generate();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = QueueId::generate();
        assert!(a < b);
        assert_eq!(a.as_str().len(), LEN);
        assert!(QueueId::parse(a.as_str()).is_some());
        let set: std::collections::HashSet<_> = (0..10_000).map(|_| QueueId::generate()).collect();
        assert_eq!(set.len(), 10_000);
    }

    /// Sessions of one process made ids at once from one generator state: two could read
    /// the same state in the same microsecond and make the same id (issue #12, seen as
    /// `entity already exists` refusals under load).
    #[test]
    fn threads_making_ids_at_once_never_make_the_same_one() {
        let make = || (0..50_000).map(|_| QueueId::generate()).collect::<Vec<_>>();
        let threads: Vec<_> = (0..8).map(|_| std::thread::spawn(make)).collect();
        let mut all: Vec<QueueId> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        let n = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), n, "{} ids made twice", n - all.len());
    }
}
