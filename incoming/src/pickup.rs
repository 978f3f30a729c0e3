//! `qms pickup`: takes local users' messages from `SPOOL/maildrop/` into the queue.
//!
//! A drop file was written by `qms-postdrop` for a user; everything in it is untrusted
//! input. The submitter is the file's owner, never anything the file says. The arguments are
//! parsed again and checked as `sendmail` would for that user (the sender is forced to the
//! user's own address unless the user is trusted; the size limit; line ends and bare CRs),
//! then the message is enqueued as qms's own files and the drop file removed. A file that
//! cannot be read as a submission is moved to `corrupt/maildrop/` and logged.

use crate::sendmail::{self, Caller, Mode, Submission};
use qms_common::log::quote;
use qms_common::{qlog, Config};
use qms_spool::{maildrop, Spool};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

/// Half-written drop files older than this are debris of a killed `qms-postdrop`.
const STALE: Duration = Duration::from_secs(3600);

/// Runs until `stop`: every file in the drop directory is taken in, then waits for more.
pub fn run(cfg: &Config, spool: &Spool, stop: &AtomicBool) -> Result<(), String> {
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
    let dir = maildrop::dir(spool.root());
    let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
        .map_err(|e| format!("inotify: {e}"))?;
    inotify
        .add_watch(
            &dir,
            AddWatchFlags::IN_MOVED_TO | AddWatchFlags::IN_CLOSE_WRITE,
        )
        .map_err(|e| format!("cannot watch {}: {e}", dir.display()))?;
    while !stop.load(Ordering::SeqCst) {
        let _ = inotify.read_events();
        for name in waiting(&dir) {
            take(cfg, spool, &dir.join(&name), &name);
        }
        let fd = std::os::fd::AsFd::as_fd(&inotify);
        let mut fds = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLIN)];
        let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(1000u16));
    }
    Ok(())
}

/// Complete drop files, oldest first; removes stale half-written ones on the way.
fn waiting(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| SystemTime::now().duration_since(t).ok())
                .is_some_and(|age| age > STALE);
            if old && std::fs::remove_file(e.path()).is_ok() {
                qlog!(
                    "status=removed file={} reason=\"stale partial drop file\"",
                    quote(&name)
                );
            }
            continue;
        }
        names.push(name);
    }
    names.sort();
    names
}

fn take(cfg: &Config, spool: &Spool, path: &Path, name: &str) {
    let reserve = qms_spool::reserve::Reserve::of(cfg);
    let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    if let Err(why) = qms_spool::reserve::check(spool.root(), &reserve, size) {
        // The drop file already holds the message: it waits where it is.
        qlog!(
            "file={} status=deferred reason={}",
            quote(name),
            quote(&why)
        );
        std::thread::sleep(Duration::from_secs(1));
        return;
    }
    match submission(cfg, path) {
        Ok((sub, who)) => match sub.enqueue(cfg, spool) {
            Ok(id) => {
                qlog!(
                    "qid={id} file={} uid={} status=picked-up",
                    quote(name),
                    quote(&who)
                );
                if let Err(e) = std::fs::remove_file(path) {
                    qlog!(
                        "file={} status=error reason={}",
                        quote(name),
                        quote(&e.to_string())
                    );
                }
            }
            // The spool could not take it now (disk full?): the file stays for the next pass.
            Err((_, why)) => {
                qlog!(
                    "file={} status=deferred reason={}",
                    quote(name),
                    quote(&why)
                );
                std::thread::sleep(Duration::from_secs(1));
            }
        },
        Err(why) => {
            let dest = spool.root().join("corrupt/maildrop").join(name);
            qlog!(
                "file={} status=refused reason={} moved_to={}",
                quote(name),
                quote(&why),
                quote(&dest.display().to_string())
            );
            if std::fs::rename(path, &dest).is_err() {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

/// Reads and checks one drop file; returns the submission and who made it.
fn submission(cfg: &Config, path: &Path) -> Result<(Submission, String), String> {
    let dropped = maildrop::read(path, cfg.limits.message_size)?;
    let caller = Caller::for_uid(cfg, dropped.uid)?;
    let args =
        sendmail::parse_args(&dropped.header.args).map_err(|e| format!("bad arguments: {e}"))?;
    if args.mode != Mode::Deliver {
        return Err("only message submission comes through the drop directory".into());
    }
    let mut input = std::io::Cursor::new(dropped.message);
    let sub = Submission::prepare(cfg, &args, &caller, &mut input).map_err(|(_, why)| why)?;
    Ok((sub, caller.name))
}
