//! Threads kept for destinations and lanes: a scoped pool that grows on demand.
//!
//! Every task gets a thread at once (an idle one, or a new one), so a task that waits for
//! others it spawned can never wait for a thread; a thread idle for a minute ends. Making
//! and ending a thread per lane cost the smtp agent about a tenth of its CPU (half a thread
//! a message: clone, stack, signal masks). Idle threads sleep on a condition variable and
//! do not spin (a work-stealing pool's spinning cost more than the threads it saved).

use std::collections::VecDeque;
use std::marker::PhantomData;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

/// A thread with nothing to do for this long ends.
const IDLE: Duration = Duration::from_secs(60);

type Task = Box<dyn FnOnce() + Send + 'static>;

#[derive(Default)]
pub(crate) struct Threads {
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    wake: Condvar,
}

#[derive(Default)]
struct State {
    tasks: VecDeque<Task>,
    /// Threads asleep that no task was promised to.
    waiting: usize,
    /// Tasks promised to sleeping threads, not yet taken up.
    promised: usize,
    /// Threads alive.
    threads: usize,
}

impl Threads {
    fn submit(&self, task: Task) {
        let mut st = self
            .shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        st.tasks.push_back(task);
        if st.waiting > 0 {
            st.waiting -= 1;
            st.promised += 1;
            self.shared.wake.notify_one();
            return;
        }
        st.threads += 1;
        drop(st);
        let shared = self.shared.clone();
        let started = std::thread::Builder::new()
            .name("lane".into())
            .spawn(move || work(&shared));
        if let Err(e) = started {
            // No thread to be had: the task runs here, late rather than never.
            qms_common::qlog!(
                "status=warning reason={}",
                qms_common::log::quote(&e.to_string())
            );
            let mut st = self
                .shared
                .state
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            st.threads -= 1;
            let task = st.tasks.pop_back();
            drop(st);
            if let Some(task) = task {
                task();
            }
        }
    }

    /// Runs `f`, which may spawn tasks borrowing from the caller's stack, and returns once
    /// all of them have ended (as `std::thread::scope`). A task that panics is caught and
    /// counted as ended.
    pub(crate) fn scope<'env, R>(&self, f: impl FnOnce(&Scope<'_, 'env>) -> R) -> R {
        let scope = Scope {
            threads: self,
            pending: Arc::new((Mutex::new(0), Condvar::new())),
            _env: PhantomData,
        };
        // Waits even when `f` panics: no task may outlive what it borrows.
        struct Wait<'a>(&'a (Mutex<usize>, Condvar));
        impl Drop for Wait<'_> {
            fn drop(&mut self) {
                let (count, done) = self.0;
                let mut n = count.lock().unwrap_or_else(PoisonError::into_inner);
                while *n > 0 {
                    n = done.wait(n).unwrap_or_else(PoisonError::into_inner);
                }
            }
        }
        let _wait = Wait(&scope.pending);
        f(&scope)
    }
}

fn work(shared: &Shared) {
    let mut st = shared.state.lock().unwrap_or_else(PoisonError::into_inner);
    loop {
        if let Some(task) = st.tasks.pop_front() {
            drop(st);
            task();
            st = shared.state.lock().unwrap_or_else(PoisonError::into_inner);
            continue;
        }
        st.waiting += 1;
        loop {
            let (g, woke) = shared
                .wake
                .wait_timeout(st, IDLE)
                .unwrap_or_else(PoisonError::into_inner);
            st = g;
            if st.promised > 0 {
                st.promised -= 1;
                break;
            }
            if woke.timed_out() {
                st.waiting -= 1;
                st.threads -= 1;
                return;
            }
        }
    }
}

pub(crate) struct Scope<'p, 'env> {
    threads: &'p Threads,
    pending: Arc<(Mutex<usize>, Condvar)>,
    /// Invariant in 'env, as `std::thread::Scope`.
    _env: PhantomData<&'env mut &'env ()>,
}

impl<'env> Scope<'_, 'env> {
    /// Runs `f` on a pool thread; the scope waits for it.
    pub(crate) fn spawn<F: FnOnce() + Send + 'env>(&self, f: F) {
        *self
            .pending
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner) += 1;
        let pending = self.pending.clone();
        let task: Box<dyn FnOnce() + Send + 'env> = Box::new(move || {
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
            let (count, done) = &*pending;
            let mut n = count.lock().unwrap_or_else(PoisonError::into_inner);
            *n -= 1;
            if *n == 0 {
                done.notify_all();
            }
        });
        // Safety: the task borrows only what lives for 'env, and `Threads::scope` does not
        // return (nor unwind past its frame) before the task has ended: its `Wait` guard
        // blocks until the count this task decrements, last thing, is back at zero. The
        // lifetime is erased only to pass the task to a thread that outlives the scope.
        let task: Task = unsafe {
            std::mem::transmute::<Box<dyn FnOnce() + Send + 'env>, Box<dyn FnOnce() + Send + 'static>>(
                task,
            )
        };
        self.threads.submit(task);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn a_scope_waits_for_its_tasks_and_threads_are_reused() {
        let threads = Threads::default();
        let ids = Mutex::new(std::collections::HashSet::new());
        let count = AtomicUsize::new(0);
        for _ in 0..20 {
            threads.scope(|s| {
                for _ in 0..4 {
                    s.spawn(|| {
                        std::thread::sleep(Duration::from_millis(2));
                        count.fetch_add(1, Ordering::SeqCst);
                        ids.lock().unwrap().insert(std::thread::current().id());
                    });
                }
            });
            // A task's scope ends before its thread is back asleep: wait for that, so the
            // next scope finds the threads idle however the machine schedules them.
            let end = std::time::Instant::now() + Duration::from_secs(10);
            loop {
                let st = threads.shared.state.lock().unwrap();
                if st.waiting == st.threads {
                    break;
                }
                drop(st);
                assert!(std::time::Instant::now() < end, "threads never went idle");
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        assert_eq!(
            count.load(Ordering::SeqCst),
            80,
            "every task ended inside its scope"
        );
        let made = threads.shared.state.lock().unwrap().threads;
        assert!(made <= 4, "{made} threads for 4 tasks at a time");
        assert!(ids.lock().unwrap().len() <= made);
    }

    /// A task that waits for tasks of its own never waits for a thread.
    #[test]
    fn nested_scopes_do_not_wait_for_threads() {
        let threads = Threads::default();
        let count = AtomicUsize::new(0);
        threads.scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    threads.scope(|inner| {
                        for _ in 0..8 {
                            inner.spawn(|| {
                                count.fetch_add(1, Ordering::SeqCst);
                            });
                        }
                    });
                });
            }
        });
        assert_eq!(count.load(Ordering::SeqCst), 64);
    }

    #[test]
    fn a_task_that_panics_ends_its_scope_all_the_same() {
        let threads = Threads::default();
        let after = AtomicUsize::new(0);
        threads.scope(|s| {
            s.spawn(|| panic!("a lane that should not panic"));
            s.spawn(|| {
                after.fetch_add(1, Ordering::SeqCst);
            });
        });
        assert_eq!(after.load(Ordering::SeqCst), 1);
    }
}
