//! The durability audit: a command line that runs a program under strace, and the checker
//! that reads the trace (tests/fixtures/strace_audit.py).

use std::path::Path;
use std::process::Command;

const SYSCALLS: &str = "trace=openat,open,creat,mkdir,mkdirat,write,pwrite64,writev,pwritev,\
sendto,sendmsg,ftruncate,rename,renameat,renameat2,link,linkat,unlink,unlinkat,fsync,\
fdatasync,syncfs,clone,clone3,fork,vfork,execve,exit_group";

/// `strace` and its options, writing the trace of a program and its children to `out`.
pub fn strace_args(out: &Path) -> Vec<String> {
    [
        "strace", "-f", "-q", "-yy", "-s", "64", "-e", SYSCALLS, "-o",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([out.display().to_string()])
    .collect()
}

/// Audits `trace` for the files under `roots`; the test fails on a violation. Returns what
/// the checker says it checked.
pub fn audit(trace: &Path, roots: &[&Path]) -> String {
    let checker = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/strace_audit.py"
    );
    let out = Command::new("python3")
        .arg(checker)
        .arg(trace)
        .args(roots)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("{}:\n{text}", trace.display());
    assert!(
        out.status.success(),
        "the audit of {} failed:\n{text}",
        trace.display()
    );
    text
}
