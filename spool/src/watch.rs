//! Watching a queue: which jobs are due now, which later, and which another worker holds.
//!
//! New jobs arrive by rename, so inotify's IN_MOVED_TO on the queue directory wakes the worker
//! within milliseconds; a periodic scan is the safety net. Deferred jobs wait in a heap in
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
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct WatchOptions {
    pub scan_interval: Duration,
    pub busy_retry: Duration,
    /// The most jobs one call to [`Watcher::next_batch`] hands out.
    pub batch: usize,
}

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
    next_scan: Instant,
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
        inotify
            .add_watch(&dir, AddWatchFlags::IN_MOVED_TO)
            .map_err(|e| SpoolError::Io {
                what: "watch".into(),
                path: dir.clone(),
                err: e.into(),
            })?;
        let mut w = Watcher {
            spool,
            queue: queue.to_string(),
            opts,
            inotify,
            heap: BinaryHeap::new(),
            due: HashMap::new(),
            fresh: VecDeque::new(),
            ready: VecDeque::new(),
            next_scan: Instant::now(),
        };
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

    fn scan(&mut self) {
        for id in self.spool.list("queue", &self.queue) {
            if !self.due.contains_key(&id) {
                self.ready.push_back(id);
            }
        }
        self.next_scan = Instant::now() + self.opts.scan_interval;
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
                            // A rewrite (retry, release) may move a job's time: look again now.
                            self.due.remove(&id);
                            self.fresh.push_back(id);
                        }
                    }
                }
                _ => return,
            }
        }
    }

    /// When a job waits for a later attempt, by its file's time: None when it is due (or
    /// gone, or unreadable: the claim will tell).
    fn waits_until(&self, id: &QueueId, now: u64) -> Option<u64> {
        let path = self.spool.queue_dir(&self.queue).join(format!("{id}.json"));
        let t = std::fs::metadata(path).ok()?.modified().ok()?;
        let at = t.duration_since(std::time::UNIX_EPOCH).ok()?.as_millis() as u64;
        (at > now).then_some(at)
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
                let Some(id) = self.fresh.pop_front().or_else(|| self.ready.pop_front()) else {
                    break;
                };
                if let Some(at) = self.waits_until(&id, now) {
                    self.schedule(id, at);
                    continue;
                }
                match self.spool.claim(&self.queue, &id) {
                    Ok(Claim::Got(c)) => {
                        let at = (c.job.next_attempt.max(0) as u64).saturating_mul(1000);
                        if at > now {
                            self.schedule(id, at);
                        } else {
                            out.push(*c);
                        }
                    }
                    Ok(Claim::Busy) => {
                        self.schedule(id, now + self.opts.busy_retry.as_millis() as u64)
                    }
                    Ok(Claim::Gone) | Err(SpoolError::Corrupt { .. }) => {
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
            if !out.is_empty() {
                return out;
            }
            if !self.ready.is_empty() || !self.fresh.is_empty() {
                continue;
            }
            let mut wait = self
                .next_scan
                .saturating_duration_since(Instant::now())
                .min(Duration::from_secs(1));
            if let Some(Reverse((at, _))) = self.heap.peek() {
                wait = wait.min(Duration::from_millis(at.saturating_sub(now_ms())));
            }
            let ms = u16::try_from(wait.as_millis()).unwrap_or(1000);
            let mut fds = [PollFd::new(self.inotify.as_fd(), PollFlags::POLLIN)];
            let _ = poll(&mut fds, PollTimeout::from(ms));
        }
    }
}
