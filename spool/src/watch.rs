//! Watching a queue: which jobs are due now, which later, and which another worker holds.
//!
//! New jobs arrive by rename, so inotify's IN_MOVED_TO on the queue directory (and on its
//! `deferred/` one, where waiting jobs are rewritten) wakes the worker within milliseconds;
//! a periodic scan of both is the safety net. Deferred jobs wait in a heap in
//! memory ordered by their next attempt, so the queue directory is read once, not every pass.
//!
//! What arrives goes first: jobs named by inotify are taken before those the scan or the heap
//! give, so new mail does not wait behind a backlog (after a restart, the whole queue comes
//! from the scan). A job's file carries its next attempt as its modification time, so a job
//! not yet due is put back in the heap after a `stat`, without being opened or read.

use crate::id::QueueId;
use crate::store::{Claim, Claimed, Spool, SpoolError};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use qms_common::qlog;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

mod share;
use share::{hold_life, lives, OTHERS_AFTER};
pub use share::{Share, SHARE_ENV};

#[derive(Clone, Debug)]
pub struct WatchOptions {
    pub scan_interval: Duration,
    pub busy_retry: Duration,
    /// The most jobs one call to [`Watcher::next_batch`] hands out.
    pub batch: usize,
    /// This worker's share of the queue's new jobs, when several serve it (see [`Share`]).
    pub share: Option<Share>,
}

/// When a new job was found locked (its file taken from the pool where it lay is let go
/// just after its rename), how soon to look again, once, before the busy retry.
const RELOOK: Duration = Duration::from_millis(20);

pub struct Watcher {
    spool: Spool,
    queue: String,
    opts: WatchOptions,
    inotify: Inotify,
    /// Jobs waiting for a time, by due time in milliseconds; stale entries are skipped.
    heap: BinaryHeap<Reverse<(u64, QueueId)>>,
    due: HashMap<QueueId, u64>,
    /// Jobs inotify named: new ones, or rewritten ones (whose time may have moved).
    fresh: VecDeque<QueueId>,
    /// Jobs the scan found or the heap made due.
    ready: VecDeque<QueueId>,
    /// New jobs found locked once, looked at again after [`RELOOK`].
    relooked: HashSet<QueueId>,
    /// What the last scan found in other workers' shares, by worker, and when to take it
    /// over from those that do not live (see [`Watcher::take_over`]).
    theirs: HashMap<usize, Vec<QueueId>>,
    theirs_at: Option<Instant>,
    /// This worker's life file, held locked (see [`lives`]).
    _life: Option<std::fs::File>,
    next_scan: Instant,
}

/// When a job is due, as its file's time tells.
enum Due {
    /// Now (or the file could not be read: the claim will tell).
    Now,
    /// At this time, in milliseconds.
    At(u64),
    /// Never: the file is gone.
    Gone,
}

fn now_ms() -> u64 {
    qms_common::time::now_micros() / 1000
}

impl Watcher {
    pub fn new(spool: Spool, queue: &str, opts: WatchOptions) -> Result<Watcher, SpoolError> {
        let dir = spool.queue_dir(queue);
        let inotify =
            Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).map_err(|e| {
                SpoolError::Io {
                    what: "watch".into(),
                    path: dir.clone(),
                    err: e.into(),
                }
            })?;
        // New jobs arrive in the queue's directory; rewritten waiting ones in `deferred/`
        // (made here if a spool from before it lacks it).
        let waiting = spool.root().join("deferred").join(queue);
        {
            use std::os::unix::fs::DirBuilderExt;
            let _ = std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&waiting);
        }
        for dir in [dir, waiting] {
            inotify
                .add_watch(&dir, AddWatchFlags::IN_MOVED_TO)
                .map_err(|e| SpoolError::Io {
                    what: "watch".into(),
                    path: dir.clone(),
                    err: e.into(),
                })?;
        }
        let mut w = Watcher {
            spool,
            queue: queue.to_string(),
            opts,
            inotify,
            heap: BinaryHeap::new(),
            due: HashMap::new(),
            fresh: VecDeque::new(),
            ready: VecDeque::new(),
            relooked: HashSet::new(),
            theirs: HashMap::new(),
            theirs_at: None,
            _life: None,
            next_scan: Instant::now(),
        };
        if let Some(share) = w.opts.share {
            w._life = hold_life(&w.spool, &w.queue, share.index);
        }
        w.scan();
        Ok(w)
    }

    /// Jobs waiting for a later attempt, as this worker knows them.
    pub fn scheduled(&self) -> usize {
        self.due.len()
    }

    fn schedule(&mut self, id: QueueId, at_ms: u64) {
        self.due.insert(id.clone(), at_ms);
        self.heap.push(Reverse((at_ms, id)));
    }

    /// Lists the queue: what is this worker's and not yet known goes to be looked at; what
    /// is another's waits [`OTHERS_AFTER`] and is then taken over only if that worker does
    /// not live. After a restart with a large backlog, each worker so reads the files of its
    /// own share only, while new mail comes in, not every worker every file.
    fn scan(&mut self) {
        let share = self.opts.share;
        let waiting = self.spool.list("deferred", &self.queue);
        for id in self
            .spool
            .list("queue", &self.queue)
            .into_iter()
            .chain(waiting)
        {
            if self.due.contains_key(&id) {
                continue;
            }
            match share {
                Some(s) if !s.mine(&id) => self.theirs.entry(s.owner(&id)).or_default().push(id),
                _ => self.ready.push_back(id),
            }
        }
        if !self.theirs.is_empty() {
            self.theirs_at = Some(Instant::now() + OTHERS_AFTER);
        }
        self.next_scan = Instant::now() + self.opts.scan_interval;
    }

    /// Takes over what the last scan found in the shares of workers that do not live (dead,
    /// or never started): they will not look at it.
    fn take_over(&mut self) {
        if self.theirs_at.is_none_or(|t| Instant::now() < t) {
            return;
        }
        self.theirs_at = None;
        for (owner, ids) in std::mem::take(&mut self.theirs) {
            if !lives(&self.spool, &self.queue, owner) {
                self.ready.extend(ids);
            }
        }
    }

    fn collect_due(&mut self) {
        let now = now_ms();
        while let Some(Reverse((at, _))) = self.heap.peek() {
            if *at > now {
                break;
            }
            let Some(Reverse((at, id))) = self.heap.pop() else {
                break;
            };
            if self.due.get(&id) == Some(&at) {
                self.due.remove(&id);
                self.ready.push_back(id);
            }
        }
    }

    fn read_events(&mut self) {
        loop {
            match self.inotify.read_events() {
                Ok(events) if !events.is_empty() => {
                    for ev in events {
                        if ev.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                            self.next_scan = Instant::now();
                        }
                        let Some(name) = ev.name.as_ref().and_then(|n| n.to_str()) else {
                            continue;
                        };
                        if let Some(id) = name.strip_suffix(".json").and_then(QueueId::parse) {
                            match self.opts.share {
                                Some(share) if !share.mine(&id) => {
                                    let at = now_ms() + OTHERS_AFTER.as_millis() as u64;
                                    self.schedule(id, at);
                                }
                                // A rewrite (retry, release) may move a job's time: look
                                // again now.
                                _ => {
                                    self.due.remove(&id);
                                    self.fresh.push_back(id);
                                }
                            }
                        }
                    }
                }
                _ => return,
            }
        }
    }

    /// Whether a job waits for a later attempt, by its file's time.
    fn waits_until(&self, id: &QueueId, now: u64) -> Due {
        let name = format!("{id}.json");
        let new = self.spool.queue_dir(&self.queue).join(&name);
        let waiting = || {
            let dir = self.spool.root().join("deferred").join(&self.queue);
            std::fs::metadata(dir.join(&name))
        };
        let meta = match std::fs::metadata(new).or_else(|_| waiting()) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Due::Gone,
            Err(_) => return Due::Now,
        };
        let at = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_millis() as u64);
        if at > now {
            Due::At(at)
        } else {
            Due::Now
        }
    }

    /// Waits until jobs are due and returns them claimed, or returns an empty batch once
    /// `stop` is set.
    pub fn next_batch(&mut self, stop: &AtomicBool) -> Vec<Claimed> {
        let mut out = Vec::new();
        loop {
            if stop.load(Ordering::Relaxed) {
                return out;
            }
            self.read_events();
            if Instant::now() >= self.next_scan {
                self.scan();
            }
            self.take_over();
            self.collect_due();
            let now = now_ms();
            let mut looked = 0;
            while out.len() < self.opts.batch {
                // A long look through the scan's list (after a restart, the whole queue,
                // mostly not due) goes in steps: jobs in hand go out, and what inotify
                // named meanwhile is read before the next step.
                if self.fresh.is_empty() && looked >= 4 * self.opts.batch {
                    break;
                }
                looked += 1;
                let (id, fresh) = match self.fresh.pop_front() {
                    Some(id) => (id, true),
                    None => match self.ready.pop_front() {
                        Some(id) => (id, false),
                        None => break,
                    },
                };
                match self.waits_until(&id, now) {
                    Due::Gone => {
                        // Taken by another worker, or delivered and gone.
                        self.due.remove(&id);
                        continue;
                    }
                    Due::At(at) => {
                        self.schedule(id, at);
                        continue;
                    }
                    Due::Now => {}
                }
                self.claim_due(id, fresh, now, &mut out);
            }
            if !out.is_empty() {
                return out;
            }
            if !self.ready.is_empty() || !self.fresh.is_empty() {
                continue;
            }
            self.sleep_until_due();
        }
    }

    /// Claims job `id`, due now: into `out`, or scheduled for when it may be tried.
    fn claim_due(&mut self, id: QueueId, fresh: bool, now: u64, out: &mut Vec<Claimed>) {
        match self.spool.claim(&self.queue, &id) {
            Ok(Claim::Got(c)) => {
                self.relooked.remove(&id);
                let at = (c.job.next_attempt.max(0) as u64).saturating_mul(1000);
                if at > now {
                    self.schedule(id, at);
                } else {
                    out.push(*c);
                }
            }
            // A new job is locked for a moment after its rename (see
            // `Pool::take_in_place`): look again very soon, once.
            Ok(Claim::Busy) if fresh && self.relooked.insert(id.clone()) => {
                self.schedule(id, now + RELOOK.as_millis() as u64)
            }
            Ok(Claim::Busy) => {
                self.relooked.remove(&id);
                self.schedule(id, now + self.opts.busy_retry.as_millis() as u64)
            }
            Ok(Claim::Gone) | Err(SpoolError::Corrupt { .. }) => {
                self.relooked.remove(&id);
                self.due.remove(&id);
            }
            Err(e) => {
                qlog!(
                    "queue={} qid={id} status=error reason={}",
                    self.queue,
                    qms_common::log::quote(&e.to_string())
                );
                self.schedule(id, now + self.opts.busy_retry.as_millis() as u64);
            }
        }
    }

    /// Sleeps until a job may be due: the next scan, the earliest scheduled job, another
    /// worker's share ending, or something named by inotify; a second at most.
    fn sleep_until_due(&self) {
        let mut wait = self
            .next_scan
            .saturating_duration_since(Instant::now())
            .min(Duration::from_secs(1));
        if let Some(Reverse((at, _))) = self.heap.peek() {
            wait = wait.min(Duration::from_millis(at.saturating_sub(now_ms())));
        }
        if let Some(t) = self.theirs_at {
            wait = wait.min(t.saturating_duration_since(Instant::now()));
        }
        let ms = u16::try_from(wait.as_millis()).unwrap_or(1000);
        let mut fds = [PollFd::new(self.inotify.as_fd(), PollFlags::POLLIN)];
        let _ = poll(&mut fds, PollTimeout::from(ms));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spool(tag: &str) -> (std::path::PathBuf, Spool) {
        let dir = std::env::temp_dir().join(format!("qms-watch-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let spool = Spool::open(&dir, &["smtp".to_string()]).unwrap();
        (dir, spool)
    }

    fn enqueue(spool: &Spool) -> QueueId {
        spool
            .enqueue(crate::inline::tests::job(), &|_| {
                b"Subject: x\r\n\r\nbody\r\n".to_vec()
            })
            .unwrap()
    }

    fn options(share: Option<Share>) -> WatchOptions {
        WatchOptions {
            scan_interval: Duration::from_secs(3600),
            busy_retry: Duration::from_secs(10),
            batch: 8,
            share,
        }
    }

    /// Claims what `w` hands out within `limit`, and lets it go again.
    fn claimed_within(w: &mut Watcher, limit: Duration) -> Vec<QueueId> {
        let stop = AtomicBool::new(false);
        let end = Instant::now() + limit;
        while Instant::now() < end {
            let stopper = std::thread::scope(|s| {
                let t = s.spawn(|| {
                    std::thread::sleep(Duration::from_millis(200));
                    stop.store(true, Ordering::Relaxed);
                });
                let got = w.next_batch(&stop);
                let _ = t.join();
                got
            });
            stop.store(false, Ordering::Relaxed);
            if !stopper.is_empty() {
                return stopper.into_iter().map(|c| c.job.id).collect();
            }
        }
        Vec::new()
    }

    /// A job deferred to later leaves the directory new mail passes through for
    /// `deferred/`, is not handed out before its time, and is handed out from there once a
    /// rewrite makes it due (as `queue retry` does); finished, it is gone from there.
    #[test]
    fn a_deferred_job_waits_in_its_own_directory_and_comes_back_when_due() {
        let (dir, spool) = spool("deferred");
        let id = enqueue(&spool);
        let new = dir.join("queue/smtp").join(format!("{id}.json"));
        let waiting = dir.join("deferred/smtp").join(format!("{id}.json"));
        let mut w = Watcher::new(spool.clone(), "smtp", options(None)).unwrap();
        assert_eq!(
            claimed_within(&mut w, Duration::from_secs(5)),
            vec![id.clone()]
        );

        let claim = |spool: &Spool| match spool.claim("smtp", &id).unwrap() {
            Claim::Got(c) => c,
            _ => panic!("{id} is not there to claim"),
        };
        let mut c = claim(&spool);
        let later = qms_common::time::now() + 3600;
        c.job.next_attempt = later;
        spool.update(&mut c).unwrap();
        assert!(!new.exists() && waiting.exists(), "moved to deferred/");
        let mtime = std::fs::metadata(&waiting).unwrap().modified().unwrap();
        let secs = mtime
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert_eq!(secs, later as u64, "its time is its next attempt");
        drop(c);
        assert!(claimed_within(&mut w, Duration::from_millis(600)).is_empty());

        let mut c = claim(&spool);
        c.job.next_attempt = qms_common::time::now();
        spool.update(&mut c).unwrap();
        assert!(
            !new.exists() && waiting.exists(),
            "a due job stays where it waits"
        );
        drop(c);
        assert_eq!(
            claimed_within(&mut w, Duration::from_secs(5)),
            vec![id.clone()]
        );

        spool.finish(*claim(&spool)).unwrap();
        assert!(!new.exists() && !waiting.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The crash window of the move: a worker that dies after moving a job to `deferred/`
    /// and before writing its new state leaves the old state there, under the later time;
    /// the job is found there and handed out when that time comes, not before.
    #[test]
    fn a_job_moved_but_not_rewritten_waits_for_its_time_where_it_lies() {
        let (dir, spool) = spool("moved");
        let id = enqueue(&spool);
        let mut c = match spool.claim("smtp", &id).unwrap() {
            Claim::Got(c) => *c,
            _ => panic!("not claimed"),
        };
        let later = qms_common::time::now() + 2;
        c.job.next_attempt = later;
        spool.park(std::slice::from_mut(&mut c)).unwrap();
        drop(c); // the worker dies here
        let waiting = dir.join("deferred/smtp").join(format!("{id}.json"));
        assert!(waiting.exists() && !dir.join("queue/smtp").join(format!("{id}.json")).exists());
        let mut w = Watcher::new(spool.clone(), "smtp", options(None)).unwrap();
        assert!(claimed_within(&mut w, Duration::from_millis(600)).is_empty());
        assert_eq!(
            claimed_within(&mut w, Duration::from_secs(6)),
            vec![id.clone()]
        );
        match spool.claim("smtp", &id).unwrap() {
            Claim::Got(c) => assert!(c.job.next_attempt < later, "the old state, whole"),
            _ => panic!("not there"),
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// After a restart with a backlog, a worker leaves what the scan finds in a living
    /// worker's share to it, and takes over the share of one that does not live.
    #[test]
    fn a_scan_leaves_a_living_workers_share_to_it_and_takes_over_a_dead_ones() {
        let (dir, spool) = spool("scan");
        let a = Share { index: 0, of: 2 };
        let mut theirs = Vec::new();
        while theirs.len() < 3 {
            let id = enqueue(&spool);
            if a.mine(&id) {
                theirs.push(id);
            } else {
                let _ = std::fs::remove_file(spool.job_path("queue", "smtp", &id));
            }
        }
        theirs.sort();
        // a lives: b's scan leaves a's jobs alone.
        let life = hold_life(&spool, "smtp", 0).unwrap();
        let mut b = Watcher::new(
            spool.clone(),
            "smtp",
            options(Some(Share { index: 1, of: 2 })),
        )
        .unwrap();
        assert!(claimed_within(&mut b, OTHERS_AFTER * 2).is_empty());
        // a is gone: the next scan's finds are b's after a moment.
        drop(life);
        b.next_scan = Instant::now();
        let mut got = claimed_within(&mut b, OTHERS_AFTER * 3);
        got.sort();
        assert_eq!(got, theirs);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A new job that is another worker's is left to it for a moment, then taken if it is
    /// still there (its worker busy or gone); one that is this worker's is taken at once.
    #[test]
    fn a_worker_takes_its_own_new_jobs_at_once_and_the_others_later() {
        let (dir, spool) = spool("share");
        let a = Share { index: 0, of: 2 };
        let mut b = Watcher::new(
            spool.clone(),
            "smtp",
            options(Some(Share { index: 1, of: 2 })),
        )
        .unwrap();
        let (mut for_a, mut for_b) = (None, None);
        while for_a.is_none() || for_b.is_none() {
            let id = enqueue(&spool);
            let slot = if a.mine(&id) { &mut for_a } else { &mut for_b };
            if slot.is_none() {
                *slot = Some(id);
            } else {
                let _ = std::fs::remove_file(spool.job_path("queue", "smtp", &id));
            }
        }
        let (for_a, for_b) = (for_a.unwrap(), for_b.unwrap());
        // Only b runs: its own job at once, a's not yet.
        let got = claimed_within(&mut b, Duration::from_millis(600));
        assert_eq!(got, vec![for_b.clone()]);
        let _ = std::fs::remove_file(spool.job_path("queue", "smtp", &for_b));
        // a's job is still there after a while: b takes it.
        let got = claimed_within(&mut b, OTHERS_AFTER * 3);
        assert_eq!(got, vec![for_a.clone()]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
