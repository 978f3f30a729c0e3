//! One delivery in a child process that has fully become its user: real, effective and
//! saved ids, groups, no capability left, a clean environment and the user's home as its
//! working directory. The result comes back through the exit code and a pipe.

use crate::local::Outcome;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;
use qms_common::privs::{self, Account};
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

/// What a child says when it found the delivery already made.
const FOUND: &str = "found";

/// Wall-clock time a delivery child may take, besides its CPU time and a command's
/// `pipe_timeout`. A copy blocked on something its user controls (a lock, a FUSE mount, a
/// mailbox on a file system that hangs) would otherwise hold the agent, and with it
/// everyone's mail.
pub const CHILD_TIME: Duration = Duration::from_secs(600);

/// A pipe for the child's report that no program the child runs inherits: one that stayed
/// in the background would keep it open.
fn report_pipe() -> nix::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
}

/// Forks; the child becomes `user`, runs `work` and reports; it is killed after `time`.
/// Never runs `work` as root.
pub fn deliver(user: &Account, time: Duration, work: impl FnOnce() -> Outcome) -> Outcome {
    use nix::unistd::{fork, ForkResult};
    let (rfd, wfd) = match report_pipe() {
        Ok(p) => p,
        Err(e) => return Outcome::Temp(format!("4.3.0 pipe: {e}")),
    };
    // Safety: the delivery agents are single-threaded while they deliver.
    match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            drop(rfd);
            let (code, text) = match become_(user) {
                Err(e) => (75, format!("4.3.0 cannot become {}: {e}", user.name)),
                Ok(()) => match work() {
                    Outcome::Done | Outcome::Filtered { .. } => (0, String::new()),
                    Outcome::Found => (0, FOUND.to_string()),
                    Outcome::Temp(t) => (75, t),
                    Outcome::Perm(t) => (1, t),
                },
            };
            let _ = nix::unistd::write(&wfd, text.as_bytes());
            // Safety: _exit skips destructors and atexit handlers of the parent's state.
            unsafe { libc::_exit(code) }
        }
        Ok(ForkResult::Parent { child }) => {
            drop(wfd);
            let end = collect(child, rfd, 8192, Instant::now() + time);
            let text = String::from_utf8_lossy(&end.got).into_owned();
            if end.killed {
                return Outcome::Temp(format!(
                    "{}4.3.0 delivery as {} did not end within {} s; killed",
                    crate::local::LOOK_FIRST,
                    user.name,
                    time.as_secs()
                ));
            }
            match end.status {
                Ok(WaitStatus::Exited(_, 0)) if text == FOUND => Outcome::Found,
                Ok(WaitStatus::Exited(_, 0)) => Outcome::Done,
                Ok(WaitStatus::Exited(_, 75)) => Outcome::Temp(text),
                Ok(WaitStatus::Exited(_, _)) => Outcome::Perm(text),
                // It may have delivered before it ended: the next attempt looks first.
                other => Outcome::Temp(format!(
                    "{}delivery process ended abnormally: {other:?}",
                    crate::local::LOOK_FIRST
                )),
            }
        }
        Err(e) => Outcome::Temp(format!("4.3.0 fork: {e}")),
    }
}

/// What a child sent and how it ended.
struct Ended {
    /// At most the limit's worth of what it sent.
    got: Vec<u8>,
    /// It sent more than the limit (the rest was read and dropped, so it could finish).
    over: bool,
    /// Reading its report failed.
    failed: bool,
    /// It was still running at its deadline, and was killed.
    killed: bool,
    status: nix::Result<WaitStatus>,
}

/// Reads the child's report until it closes its end or `until` comes, when it is killed;
/// then reaps it.
fn collect(child: Pid, rfd: OwnedFd, limit: usize, until: Instant) -> Ended {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::io::Read;
    let mut from = std::fs::File::from(rfd);
    let (mut got, mut over, mut failed, mut killed) = (Vec::new(), false, false, false);
    let mut buf = [0u8; 8192];
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
            killed = true;
            break;
        }
        let wait = PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(from.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, wait) {
            Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
            Ok(_) => {}
            Err(_) => {
                failed = true;
                let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
                break;
            }
        }
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let keep = n.min(limit - got.len());
                got.extend_from_slice(&buf[..keep]);
                over |= keep < n;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => {
                failed = true;
                let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
                break;
            }
        }
    }
    Ended {
        got,
        over,
        failed,
        killed,
        status: waitpid(child, None),
    }
}

fn become_(user: &Account) -> Result<(), String> {
    privs::become_user(user)?;
    let home = if user.home.is_dir() {
        user.home.as_path()
    } else {
        std::path::Path::new("/")
    };
    std::env::set_current_dir(home).map_err(|e| format!("chdir {}: {e}", home.display()))
}

/// Forks; the child becomes `user` (when given; else stays this process's user), may use
/// `cpu_secs` of CPU time (`RLIMIT_CPU`) and [`CHILD_TIME`] more of wall-clock time, runs
/// `work` and sends back what it returns (at most `limit` bytes are read). An error names
/// what went wrong, for a temporary failure.
pub fn run_bounded(
    user: Option<&Account>,
    cpu_secs: u64,
    limit: usize,
    work: impl FnOnce() -> Vec<u8>,
) -> Result<Vec<u8>, String> {
    let time = CHILD_TIME + Duration::from_secs(cpu_secs);
    run_timed(user, cpu_secs, limit, time, work)
}

fn run_timed(
    user: Option<&Account>,
    cpu_secs: u64,
    limit: usize,
    time: Duration,
    work: impl FnOnce() -> Vec<u8>,
) -> Result<Vec<u8>, String> {
    use nix::sys::resource::{setrlimit, Resource};
    use nix::unistd::{fork, ForkResult};
    use std::io::Write;
    let (rfd, wfd) = report_pipe().map_err(|e| format!("pipe: {e}"))?;
    // Safety: the delivery agents are single-threaded while they deliver.
    match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            drop(rfd);
            let mut out = std::fs::File::from(wfd);
            let ready = match user {
                Some(u) => become_(u).map_err(|e| format!("cannot become {}: {e}", u.name)),
                None => Ok(()),
            }
            .and_then(|()| {
                setrlimit(Resource::RLIMIT_CPU, cpu_secs, cpu_secs.saturating_add(1))
                    .map_err(|e| format!("setrlimit: {e}"))
            });
            let code = match ready {
                Err(e) => {
                    let _ = out.write_all(e.as_bytes());
                    75
                }
                Ok(()) => match out.write_all(&work()) {
                    Ok(()) => 0,
                    Err(_) => 75,
                },
            };
            drop(out);
            // Safety: _exit skips destructors and atexit handlers of the parent's state.
            unsafe { libc::_exit(code) }
        }
        Ok(ForkResult::Parent { child }) => {
            drop(wfd);
            let end = collect(child, rfd, limit, Instant::now() + time);
            match end.status {
                _ if end.killed => Err(format!(
                    "the process did not end within {} s; killed",
                    time.as_secs()
                )),
                Ok(WaitStatus::Exited(_, 0)) if end.over => {
                    Err(format!("the process sent more than {limit} bytes"))
                }
                Ok(WaitStatus::Exited(_, 0)) if end.failed => {
                    Err("the process's report could not be read".into())
                }
                Ok(WaitStatus::Exited(_, 0)) => Ok(end.got),
                Ok(WaitStatus::Exited(_, 75)) => Err(String::from_utf8_lossy(&end.got).into()),
                Ok(WaitStatus::Signaled(_, sig, _)) => Err(format!(
                    "the process ended by signal {sig} (SIGXCPU: over its CPU time)"
                )),
                other => Err(format!("the process ended abnormally: {other:?}")),
            }
        }
        Err(e) => Err(format!("fork: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A child that blocks (as on a lock or a hung file system its user controls) is killed
    /// at its time, and the agent goes on.
    #[test]
    fn a_child_past_its_time_is_killed() {
        let r = run_timed(None, 5, 1024, Duration::from_secs(1), || {
            std::thread::sleep(Duration::from_secs(60));
            b"late".to_vec()
        });
        let e = r.expect_err("a child past its time");
        assert!(e.contains("did not end within 1 s; killed"), "{e}");
    }

    /// What a child sends past the limit is read and dropped, so it can end, and refused.
    #[test]
    fn a_report_over_the_limit_is_refused() {
        let r = run_timed(None, 5, 1024, Duration::from_secs(60), || {
            vec![b'x'; 100_000]
        });
        let e = r.expect_err("a report over the limit");
        assert!(e.contains("more than 1024 bytes"), "{e}");
        let ok = run_timed(None, 5, 1024, Duration::from_secs(60), || b"fine".to_vec());
        assert_eq!(ok.as_deref(), Ok(&b"fine"[..]));
    }
}
