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
                    Outcome::Done => (0, String::new()),
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
                other => Outcome::Temp(format!(
                    "4.3.0 delivery process ended abnormally: {other:?}"
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
