//! Several workers serving one queue: which new jobs are whose ([`Share`]), and the life
//! files by which each tells the others that it still looks after its share.

use crate::id::QueueId;
use crate::store::Spool;
use std::time::Duration;

/// Worker `index` of `of` serving one queue. Every worker hears of every new job; each
/// takes at once only the jobs whose id hashes to it, and the others' a moment later if
/// they are still there (their worker busy with a long batch, or gone). Without shares,
/// every worker tried to claim every new job, and all but one found it taken: an open, a
/// lock and a stat each, and again at the busy retry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Share {
    pub index: usize,
    pub of: usize,
}

/// How long a worker leaves another's new job to it.
pub(super) const OTHERS_AFTER: Duration = Duration::from_secs(2);

/// The environment variable by which the supervisor tells a worker its share: `INDEX/OF`.
pub const SHARE_ENV: &str = "QMS_WORKER_SHARE";

impl Share {
    /// The share in [`SHARE_ENV`], if it is set and sound.
    pub fn from_env() -> Option<Share> {
        let v = std::env::var(SHARE_ENV).ok()?;
        let (i, n) = v.split_once('/')?;
        let (index, of) = (i.parse().ok()?, n.parse().ok()?);
        (index < of).then_some(Share { index, of })
    }

    /// The worker whose share `id` is in. FNV-1a of the id: ids are random enough, and
    /// every worker must agree.
    pub(super) fn owner(&self, id: &QueueId) -> usize {
        let h = id.as_str().bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        (h % self.of as u64) as usize
    }

    /// Whether this worker takes `id` at once.
    pub(super) fn mine(&self, id: &QueueId) -> bool {
        self.owner(id) == self.index
    }
}

/// The file a worker holds locked while it lives, so the others can tell whether its share
/// of what a scan finds is looked after: `run/QUEUE.worker.INDEX`.
fn life_file(spool: &Spool, queue: &str, index: usize) -> std::path::PathBuf {
    spool
        .root()
        .join("run")
        .join(format!("{queue}.worker.{index}"))
}

/// Locks this worker's life file for as long as it is kept open; None when it cannot (an
/// older worker of the same index still ending: the others will see that one).
pub(super) fn hold_life(spool: &Spool, queue: &str, index: usize) -> Option<std::fs::File> {
    use fs2::FileExt;
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(life_file(spool, queue, index))
        .ok()?;
    f.try_lock_exclusive().ok().map(|()| f)
}

/// Whether worker `index` of `queue` lives (holds its life file).
pub(super) fn lives(spool: &Spool, queue: &str, index: usize) -> bool {
    match std::fs::File::open(life_file(spool, queue, index)) {
        Ok(f) => f.try_lock_shared().is_err(),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_id_belongs_to_exactly_one_share() {
        let shares: Vec<Share> = (0..3).map(|index| Share { index, of: 3 }).collect();
        let mut counts = [0; 3];
        for _ in 0..300 {
            let id = QueueId::generate();
            let owners: Vec<usize> = shares
                .iter()
                .filter(|s| s.mine(&id))
                .map(|s| s.index)
                .collect();
            assert_eq!(owners.len(), 1, "{id}: {owners:?}");
            counts[owners[0]] += 1;
        }
        assert!(counts.iter().all(|&c| c > 50), "{counts:?}");
    }
}
