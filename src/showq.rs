//! `qms showq` and the `mailq` of ordinary users: the envelope view of the queue through a
//! socket, as Postfix's showq gives it, so that no user needs to read the spool.
//!
//! The server runs as the qms user and listens on `SPOOL/public/showq` (mode 0666 in a
//! directory anyone may pass through). Each connection gets one JSON line per message, the
//! fields of `qms queue list --json`: ids, sizes, times, addresses and states, never a body
//! or a header, then the connection closes. Anyone may connect, so a few clients are served
//! at once, each for a bounded time.

use crate::queuetool;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use qms_common::log::quote;
use qms_common::{qlog, Config};
use qms_spool::Spool;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub fn socket_path(cfg: &Config) -> PathBuf {
    cfg.spool.join("public/showq")
}

/// Clients served at once. Each listing reads the whole queue, so they are few; the next
/// client waits in the socket's backlog until one ends.
const CLIENTS: usize = 4;

/// The most time a client gets to take its listing, however slowly it reads.
const CLIENT_TIME: Duration = Duration::from_secs(30);

/// Serves listings until `stop`: up to [`CLIENTS`] at once, each for [`CLIENT_TIME`] at most,
/// so a client that does not read keeps no one else waiting for long.
pub fn serve(cfg: &Config, spool: &Spool, stop: &AtomicBool) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let path = socket_path(cfg);
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)
        .map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666))
        .map_err(|e| format!("chmod {}: {e}", path.display()))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let busy = Arc::new(AtomicUsize::new(0));
    while !stop.load(Ordering::SeqCst) {
        if busy.load(Ordering::SeqCst) >= CLIENTS {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        // Wait for a client, or a second to look at `stop` again.
        let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
        if poll(&mut fds, PollTimeout::from(1000u16)).unwrap_or(0) == 0 {
            continue;
        }
        match listener.accept() {
            Ok((conn, _)) => {
                let (spool, seat) = (spool.clone(), Seat::take(&busy));
                let served = std::thread::Builder::new()
                    .name("showq client".into())
                    .spawn(move || {
                        let _seat = seat;
                        if let Err(e) = answer(&spool, conn) {
                            qlog!(
                                "status=warning reason={}",
                                quote(&format!("showq client: {e}"))
                            );
                        }
                    });
                if let Err(e) = served {
                    qlog!("status=warning reason={}", quote(&format!("showq: {e}")));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => {
                qlog!("status=warning reason={}", quote(&e.to_string()));
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
    let _ = std::fs::remove_file(&path);
    Ok(())
}

/// One of the [`CLIENTS`] served at once, given back however its thread ends.
struct Seat(Arc<AtomicUsize>);

impl Seat {
    fn take(busy: &Arc<AtomicUsize>) -> Seat {
        busy.fetch_add(1, Ordering::SeqCst);
        Seat(busy.clone())
    }
}

impl Drop for Seat {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn answer(spool: &Spool, conn: UnixStream) -> std::io::Result<()> {
    conn.set_nonblocking(false)?;
    let until = Instant::now() + CLIENT_TIME;
    let mut out = std::io::BufWriter::new(Timed { conn, until });
    for doc in queuetool::envelope_docs(spool, None) {
        writeln!(out, "{doc}")?;
    }
    out.flush()
}

/// A client's end of the socket, writable until its time is up.
struct Timed {
    conn: UnixStream,
    until: Instant,
}

impl Write for Timed {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let left = self.until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("listing not taken within {} s", CLIENT_TIME.as_secs()),
            ));
        }
        self.conn.set_write_timeout(Some(left))?;
        self.conn.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.conn.flush()
    }
}

/// The listing as the server gives it, for a caller who cannot read the spool.
pub fn fetch(cfg: &Config) -> Result<Vec<serde_json::Value>, String> {
    let path = socket_path(cfg);
    let conn = UnixStream::connect(&path).map_err(|e| {
        format!(
            "the queue is readable only by root and the mail system, and the queue server is not answering ({}: {e}); is qms running?",
            path.display()
        )
    })?;
    conn.set_read_timeout(Some(Duration::from_secs(120)))
        .map_err(|e| e.to_string())?;
    let mut docs = Vec::new();
    for line in BufReader::new(conn).lines() {
        let line = line.map_err(|e| format!("reading from {}: {e}", path.display()))?;
        docs.push(serde_json::from_str(&line).map_err(|e| format!("bad line from showq: {e}"))?);
    }
    Ok(docs)
}
