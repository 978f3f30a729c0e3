//! Shared pieces of qms: configuration, addresses, logging, time and durable file writes.
//!
//! Everything here is used by more than one process role; nothing here knows about queues.

pub mod address;
pub mod aliases;
pub mod authority;
pub mod config;
pub mod conn;
pub mod dns;
pub mod expand;
pub mod headers;
pub mod log;
pub mod metrics;
pub mod privs;
pub mod reason;
pub mod safeio;
pub mod srs;
pub mod time;
pub mod tls;
pub mod track;
pub mod verp;

pub use address::Address;
pub use config::Config;

static PID: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

extern "C" fn forget_pid() {
    PID.store(0, std::sync::atomic::Ordering::Relaxed);
}

/// This process's id, without a system call each time: log lines, tracking events and spool
/// file names ask for it several times per message. A forked child asks the kernel again.
pub fn pid() -> u32 {
    static AT_FORK: std::sync::Once = std::sync::Once::new();
    // Safety: registers a handler that only stores to an atomic, as a fork child may.
    AT_FORK.call_once(|| unsafe {
        libc::pthread_atfork(None, None, Some(forget_pid));
    });
    match PID.load(std::sync::atomic::Ordering::Relaxed) {
        0 => {
            let p = std::process::id();
            PID.store(p, std::sync::atomic::Ordering::Relaxed);
            p
        }
        p => p,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn pid_is_right_in_a_forked_child() {
        let parent = super::pid();
        assert_eq!(parent, std::process::id());
        // Safety: the child only compares two numbers and exits.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                let ok = super::pid() == std::process::id() && super::pid() != parent;
                unsafe { libc::_exit(if ok { 0 } else { 1 }) }
            }
            nix::unistd::ForkResult::Parent { child } => {
                let st = nix::sys::wait::waitpid(child, None).unwrap();
                assert_eq!(st, nix::sys::wait::WaitStatus::Exited(child, 0));
            }
        }
    }
}
