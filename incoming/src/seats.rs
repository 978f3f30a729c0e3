//! smtpd's session threads: a new connection goes to the thread that became idle last, else
//! to a new thread; a thread left idle for a while ends.
//!
//! An idle thread waits on a seat of its own, so handing it a connection is one wake-up of
//! one thread (a rendezvous channel's receivers spun and yielded before they slept, and its
//! sender woke through them: about three futex or yield calls a connection).

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

pub type Job = Box<dyn FnOnce() + Send>;

/// Where one idle thread waits for its next job.
struct Seat {
    job: Mutex<Option<Job>>,
    handed: Condvar,
}

/// The idle threads, the last to become idle at the end.
type Idle = Mutex<Vec<Arc<Seat>>>;

pub struct Threads {
    idle: Arc<Idle>,
    idle_for: Duration,
}

impl Threads {
    /// Threads that end after `idle_for` without a job.
    pub fn new(idle_for: Duration) -> Threads {
        Threads {
            idle: Arc::new(Mutex::new(Vec::new())),
            idle_for,
        }
    }

    /// Runs `job` on an idle thread at once, or on a new one; never queues it behind another.
    pub fn run(&self, job: Job) -> std::io::Result<()> {
        let seat = self.idle.lock().ok().and_then(|mut idle| idle.pop());
        // A seat that cannot be handed the job (its lock poisoned) is dropped, and the job
        // goes to a new thread: a job dropped unrun would leave its connection counted.
        if let Some(seat) = seat {
            if let Ok(mut slot) = seat.job.lock() {
                *slot = Some(job);
                drop(slot);
                seat.handed.notify_one();
                return Ok(());
            }
        }
        let idle = self.idle.clone();
        let idle_for = self.idle_for;
        std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(move || {
                let seat = Arc::new(Seat {
                    job: Mutex::new(None),
                    handed: Condvar::new(),
                });
                let mut job = job;
                loop {
                    job();
                    match next(&seat, &idle, idle_for) {
                        Some(j) => job = j,
                        None => return,
                    }
                }
            })
            .map(|_| ())
    }

    /// How many threads wait for a connection now.
    #[cfg(test)]
    fn idle_count(&self) -> usize {
        self.idle.lock().map(|idle| idle.len()).unwrap_or(0)
    }
}

/// Sits idle until a job is handed over, or returns None once `idle_for` has passed and the
/// seat was still free to leave.
fn next(seat: &Arc<Seat>, idle: &Idle, idle_for: Duration) -> Option<Job> {
    idle.lock().ok()?.push(seat.clone());
    let end = Instant::now() + idle_for;
    let mut slot = seat.job.lock().ok()?;
    loop {
        if let Some(job) = slot.take() {
            return Some(job);
        }
        let now = Instant::now();
        if now < end {
            slot = seat.handed.wait_timeout(slot, end - now).ok()?.0;
            continue;
        }
        // Time to end, unless `run` took the seat meanwhile: then its job is on the way.
        drop(slot);
        {
            let mut list = idle.lock().ok()?;
            if let Some(i) = list.iter().position(|s| Arc::ptr_eq(s, seat)) {
                list.remove(i);
                return None;
            }
        }
        slot = seat.job.lock().ok()?;
        while slot.is_none() {
            slot = seat.handed.wait(slot).ok()?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
        let end = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < end, "timed out waiting until {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_job_goes_to_the_thread_that_became_idle_and_idle_threads_end() {
        let threads = Threads::new(Duration::from_millis(300));
        let (tx, rx) = mpsc::channel();
        let t = tx.clone();
        threads
            .run(Box::new(move || {
                t.send(std::thread::current().id()).unwrap()
            }))
            .unwrap();
        let first = rx.recv().unwrap();
        wait_until("the thread is idle", || threads.idle_count() == 1);
        let t = tx.clone();
        threads
            .run(Box::new(move || {
                t.send(std::thread::current().id()).unwrap()
            }))
            .unwrap();
        assert_eq!(rx.recv().unwrap(), first, "the idle thread took the job");
        wait_until("the idle thread ended", || threads.idle_count() == 0);
    }

    #[test]
    fn jobs_never_wait_for_a_busy_thread() {
        let threads = Threads::new(Duration::from_secs(5));
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let release_rx = Arc::new(Mutex::new(release_rx));
        let (done_tx, done_rx) = mpsc::channel();
        for _ in 0..8 {
            let (r, d) = (release_rx.clone(), done_tx.clone());
            threads
                .run(Box::new(move || {
                    d.send("started").unwrap();
                    let _ = r.lock().unwrap().recv();
                }))
                .unwrap();
        }
        for _ in 0..8 {
            let got = done_rx.recv_timeout(Duration::from_secs(10));
            assert_eq!(got, Ok("started"), "every job runs while the others block");
        }
        for _ in 0..8 {
            release_tx.send(()).unwrap();
        }
        wait_until("all eight are idle", || threads.idle_count() == 8);
    }
}
