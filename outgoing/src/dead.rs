//! Dead destinations: after no host of a destination would take a connection, its other
//! mail is deferred at once, without new attempts, until the destination's time is up (the
//! shortest retry delay), as Postfix's queue manager does. A backlog for a dead host then
//! costs one failed connection per retry period, not one per message, and mail for other
//! destinations is not held up behind it.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct Dead<K> {
    until: Mutex<HashMap<K, (Instant, String)>>,
}

impl<K> Default for Dead<K> {
    fn default() -> Self {
        Dead {
            until: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Hash + Eq + Clone> Dead<K> {
    /// Marks `dest` dead for `secs` seconds (at least one), with the reason its mail is told.
    pub fn mark(&self, dest: &K, why: String, secs: i64) {
        let for_ = Duration::from_secs(secs.max(1) as u64);
        if let Ok(mut m) = self.until.lock() {
            m.insert(dest.clone(), (Instant::now() + for_, why));
        }
    }

    /// Why `dest` is dead, while it is; a destination whose time is up is tried again.
    pub fn check(&self, dest: &K) -> Option<String> {
        let mut m = self.until.lock().ok()?;
        match m.get(dest) {
            Some((until, why)) if Instant::now() < *until => Some(why.clone()),
            Some(_) => {
                m.remove(dest);
                None
            }
            None => None,
        }
    }
}
