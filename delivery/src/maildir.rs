//! Maildir delivery: a uniquely named file in `tmp/`, synced, renamed into `new/`. Many
//! deliveries of one batch share one sync (see `safeio::commit`).

use qms_common::safeio;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// Makes `tmp`, `new` and `cur` (mode 0700) when `create` is set; otherwise a missing
/// Maildir is an error for the caller to treat as temporary.
pub fn ensure(dir: &Path, create: bool) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    for sub in ["tmp", "new", "cur"] {
        let p = dir.join(sub);
        if !p.is_dir() {
            if !create {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("Maildir {} does not exist", dir.display()),
                ));
            }
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&p)?;
        }
    }
    Ok(())
}

/// Writes the message into `dir/tmp` under a unique name; commit moves it to `new/`.
pub fn stage(dir: &Path, host: &str, message: &[u8]) -> io::Result<safeio::Staged> {
    let now = qms_common::time::now_micros();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let host = host.replace(['/', ':'], "_");
    let name = format!(
        "{}.M{}P{}Q{n}.{host},S={}",
        now / 1_000_000,
        now % 1_000_000,
        qms_common::pid(),
        message.len()
    );
    safeio::stage(
        dir.join("tmp").join(&name),
        dir.join("new").join(&name),
        message,
    )
}

/// The message as a local mailbox stores it: Return-Path and Delivered-To first, LF line ends.
pub fn local_copy(sender: &str, recipient: &str, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 128);
    out.extend_from_slice(
        format!("Return-Path: <{sender}>\nDelivered-To: {recipient}\n").as_bytes(),
    );
    let mut i = 0;
    while i < body.len() {
        if body[i] == b'\r' && body.get(i + 1) == Some(&b'\n') {
            i += 1;
            continue;
        }
        out.push(body[i]);
        i += 1;
    }
    out
}
