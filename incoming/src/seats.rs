//! smtpd's session threads: every idle thread waits in accept(2) on its listener itself, so a
//! new connection wakes one thread, which serves it; a thread that takes the last waiting
//! place starts another first, and a thread left waiting for a while ends.
//!
//! Before, one thread polled the listeners and handed each connection to an idle thread: per
//! connection a poll, an accept that found nothing more, three socket options, a futex wake
//! and two context switches more than now. The kernel wakes one waiter of accept(2) per
//! connection (an exclusive wait), so the waiting threads do not stampede. The listener
//! carries the options every session wants (`TCP_NODELAY`, the send timeout), which accepted
//! sockets inherit; its receive timeout is the tick at which a waiting thread looks at `stop`
//! and at how long it has waited.

use std::net::{IpAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often a thread waiting in accept(2) looks at `stop`.
pub const TICK: Duration = Duration::from_secs(1);

/// Serves one accepted connection, on the thread that accepted it.
pub type Handler = Box<dyn Fn(TcpStream, IpAddr) + Send + Sync>;

/// One listener and the threads that wait on it.
pub struct Seats {
    listener: TcpListener,
    handle: Handler,
    /// Threads in (or about to enter) accept(2) now.
    waiting: AtomicUsize,
    idle_for: Duration,
    stop: &'static AtomicBool,
}

impl Seats {
    /// Starts the first thread on `listener`, which must be blocking with [`TICK`] as its
    /// receive timeout (see [`prepare`]).
    pub fn start(
        listener: TcpListener,
        handle: Handler,
        idle_for: Duration,
        stop: &'static AtomicBool,
    ) -> std::io::Result<Arc<Seats>> {
        let seats = Arc::new(Seats {
            listener,
            handle,
            waiting: AtomicUsize::new(0),
            idle_for,
            stop,
        });
        spawn(&seats)?;
        Ok(seats)
    }

    /// How many threads wait for a connection now.
    #[cfg(test)]
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }
}

/// Makes `listener` ready for waiting threads: blocking, woken every [`TICK`], and handing
/// `TCP_NODELAY` and `send_timeout` down to the sockets it accepts.
pub fn prepare(listener: &TcpListener, send_timeout: Duration) -> nix::Result<()> {
    use nix::sys::socket::{setsockopt, sockopt};
    use nix::sys::time::{TimeVal, TimeValLike};
    listener
        .set_nonblocking(false)
        .map_err(|e| nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(0)))?;
    let tick = TimeVal::milliseconds(TICK.as_millis() as i64);
    setsockopt(listener, sockopt::ReceiveTimeout, &tick)?;
    let send = TimeVal::milliseconds(send_timeout.as_millis().min(i64::MAX as u128) as i64);
    setsockopt(listener, sockopt::SendTimeout, &send)?;
    setsockopt(listener, sockopt::TcpNoDelay, &true)
}

/// Starts one more waiting thread; it is counted as waiting from now, so that two threads
/// taking connections at once do not both think they were the last.
fn spawn(seats: &Arc<Seats>) -> std::io::Result<()> {
    seats.waiting.fetch_add(1, Ordering::SeqCst);
    let s = seats.clone();
    let spawned = std::thread::Builder::new()
        .stack_size(256 * 1024)
        .spawn(move || wait_and_serve(&s));
    if spawned.is_err() {
        seats.waiting.fetch_sub(1, Ordering::SeqCst);
    }
    spawned.map(|_| ())
}

/// A thread's life: wait in accept(2), serve what comes, wait again; end at `stop`, or when
/// it has waited `idle_for` and another thread waits too.
fn wait_and_serve(seats: &Arc<Seats>) {
    let mut since = Instant::now();
    loop {
        if seats.stop.load(Ordering::Relaxed) {
            seats.waiting.fetch_sub(1, Ordering::SeqCst);
            return;
        }
        match seats.listener.accept() {
            Ok((stream, addr)) => {
                if seats.waiting.fetch_sub(1, Ordering::SeqCst) == 1 {
                    // The last waiting thread: another waits while this one serves. If none
                    // can be started, clients wait in the backlog until a session ends.
                    if let Err(e) = spawn(seats) {
                        qms_common::qlog!(
                            "event=thread-error reason={}",
                            qms_common::log::quote(&e.to_string())
                        );
                    }
                }
                (seats.handle)(stream, addr.ip());
                seats.waiting.fetch_add(1, Ordering::SeqCst);
                since = Instant::now();
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if since.elapsed() >= seats.idle_for {
                    let others_wait =
                        seats
                            .waiting
                            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                                (n > 1).then(|| n - 1)
                            });
                    if others_wait.is_ok() {
                        return;
                    }
                    since = Instant::now();
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                // Out of descriptors or memory: the listener stays readable, so wait a
                // little instead of spinning; the client waits in the backlog.
                qms_common::qlog!(
                    "event=accept-error reason={}",
                    qms_common::log::quote(&e.to_string())
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::sync::Mutex;

    fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
        let end = Instant::now() + Duration::from_secs(20);
        while !cond() {
            assert!(Instant::now() < end, "timed out waiting until {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn listener() -> TcpListener {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        prepare(&l, Duration::from_secs(300)).unwrap();
        l
    }

    fn leak_flag() -> &'static AtomicBool {
        Box::leak(Box::new(AtomicBool::new(false)))
    }

    #[test]
    fn connections_never_wait_for_a_busy_thread_and_inherit_the_session_options() {
        let l = listener();
        let addr = l.local_addr().unwrap();
        let (started, got) = mpsc::channel();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let release = Arc::new(Mutex::new(release_rx));
        let stop = leak_flag();
        let seats = Seats::start(
            l,
            Box::new(move |s: TcpStream, _| {
                let nodelay = s.nodelay().unwrap();
                let send = s.write_timeout().unwrap();
                started.send((nodelay, send)).unwrap();
                let _ = release.lock().unwrap().recv();
            }),
            Duration::from_secs(60),
            stop,
        )
        .unwrap();
        let clients: Vec<_> = (0..8)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect();
        for _ in 0..8 {
            let got = got.recv_timeout(Duration::from_secs(20));
            assert_eq!(
                got,
                Ok((true, Some(Duration::from_secs(300)))),
                "every connection is served while the others are busy, with the listener's options"
            );
        }
        assert!(
            seats.waiting() >= 1,
            "a thread still waits for the next connection"
        );
        for _ in 0..8 {
            release_tx.send(()).unwrap();
        }
        wait_until("all nine wait", || seats.waiting() == 9);
        drop(clients);
        stop.store(true, Ordering::SeqCst);
        wait_until("every thread saw stop", || seats.waiting() == 0);
    }

    #[test]
    fn threads_left_waiting_end_but_one() {
        let l = listener();
        let addr = l.local_addr().unwrap();
        let (tx, rx) = mpsc::channel();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let release = Arc::new(Mutex::new(release_rx));
        let seats = Seats::start(
            l,
            Box::new(move |_, _| {
                tx.send(()).unwrap();
                let _ = release.lock().unwrap().recv();
            }),
            Duration::from_millis(1500),
            leak_flag(),
        )
        .unwrap();
        let _a = std::net::TcpStream::connect(addr).unwrap();
        let _b = std::net::TcpStream::connect(addr).unwrap();
        rx.recv_timeout(Duration::from_secs(20)).unwrap();
        rx.recv_timeout(Duration::from_secs(20)).unwrap();
        release_tx.send(()).unwrap();
        release_tx.send(()).unwrap();
        wait_until("three threads wait", || seats.waiting() == 3);
        wait_until("the idle ones ended", || seats.waiting() == 1);
        let _c = std::net::TcpStream::connect(addr).unwrap();
        assert!(
            rx.recv_timeout(Duration::from_secs(20)).is_ok(),
            "the one left still takes connections"
        );
        release_tx.send(()).unwrap();
    }
}
