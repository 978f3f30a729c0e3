//! One delivery in a child process that has fully become its user: real, effective and
//! saved ids, groups, no capability left, a clean environment and the user's home as its
//! working directory. The result comes back through the exit code and a pipe.

use crate::local::Outcome;
use qms_common::privs::{self, Account};

/// What a child says when it found the delivery already made.
const FOUND: &str = "found";

/// Forks; the child becomes `user`, runs `work` and reports. Never runs `work` as root.
pub fn deliver(user: &Account, work: impl FnOnce() -> Outcome) -> Outcome {
    use nix::sys::wait::{waitpid, WaitStatus};
    use nix::unistd::{fork, ForkResult};
    let (rfd, wfd) = match nix::unistd::pipe() {
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
            let mut text = Vec::new();
            let _ = std::io::Read::read_to_end(
                &mut std::io::Read::take(std::fs::File::from(rfd), 8192),
                &mut text,
            );
            let text = String::from_utf8_lossy(&text).into_owned();
            match waitpid(child, None) {
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
/// `cpu_secs` of CPU time (`RLIMIT_CPU`), runs `work` and sends back what it returns (at
/// most `limit` bytes are read). An error names what went wrong, for a temporary failure.
pub fn run_bounded(
    user: Option<&Account>,
    cpu_secs: u64,
    limit: usize,
    work: impl FnOnce() -> Vec<u8>,
) -> Result<Vec<u8>, String> {
    use nix::sys::resource::{setrlimit, Resource};
    use nix::sys::wait::{waitpid, WaitStatus};
    use nix::unistd::{fork, ForkResult};
    use std::io::{Read, Write};
    let (rfd, wfd) = nix::unistd::pipe().map_err(|e| format!("pipe: {e}"))?;
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
            let mut got = Vec::new();
            let mut from = std::fs::File::from(rfd);
            let read = (&mut from).take(limit as u64).read_to_end(&mut got);
            // More than the limit is drained, so the child can finish, and refused.
            let over = std::io::copy(&mut from, &mut std::io::sink()).unwrap_or(0) > 0;
            let status = waitpid(child, None);
            match (status, read) {
                (Ok(WaitStatus::Exited(_, 0)), Ok(_)) if over => {
                    Err(format!("the process sent more than {limit} bytes"))
                }
                (Ok(WaitStatus::Exited(_, 0)), Ok(_)) => Ok(got),
                (Ok(WaitStatus::Exited(_, 75)), _) => Err(String::from_utf8_lossy(&got).into()),
                (Ok(WaitStatus::Signaled(_, sig, _)), _) => Err(format!(
                    "the process ended by signal {sig} (SIGXCPU: over its CPU time)"
                )),
                (other, _) => Err(format!("the process ended abnormally: {other:?}")),
            }
        }
        Err(e) => Err(format!("fork: {e}")),
    }
}
