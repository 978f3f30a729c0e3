//! The free-space reserve (Postfix's `queue_minfree`, OpenSMTPD's check before accepting):
//! new mail is refused while the spool's file system has less than the reserve free, in
//! bytes or in inodes, so that mail already accepted can always be routed and delivered.

use std::path::Path;

/// What the spool must keep free: `[limits] spool_min_free` and `spool_min_free_inodes`,
/// else the larger of 5% of the file system and 1.5 times the message size limit (bytes),
/// and the larger of 5% and 1,000 inodes.
#[derive(Clone, Copy, Debug)]
pub struct Reserve {
    pub bytes: Option<u64>,
    pub inodes: Option<u64>,
    pub message_size: u64,
}

impl Reserve {
    pub fn of(cfg: &qms_common::Config) -> Reserve {
        let (bytes, inodes, message_size) = cfg.reserve();
        Reserve {
            bytes,
            inodes,
            message_size,
        }
    }
}

/// Ok when a message of `size` bytes still leaves the reserve free; else why not, in words
/// for the log (the client gets 452 4.3.1).
pub fn check(spool: &Path, r: &Reserve, size: u64) -> Result<(), String> {
    let Ok(st) = nix::sys::statvfs::statvfs(spool) else {
        return Ok(()); // cannot tell: let the write itself find out
    };
    let frag = st.fragment_size().max(1);
    let (total, avail) = (st.blocks() * frag, st.blocks_available() * frag);
    let want = r
        .bytes
        .unwrap_or_else(|| (total / 20).max(r.message_size.saturating_mul(3) / 2));
    if avail < want.saturating_add(size) {
        return Err(format!(
            "{} bytes free on the spool's file system, {want} kept in reserve",
            avail
        ));
    }
    let (files, ffree) = (st.files(), st.files_available());
    if files > 0 {
        let want = r
            .inodes
            .unwrap_or_else(|| (files / 20).max(1000).min(files / 2));
        if ffree < want {
            return Err(format!(
                "{ffree} inodes free on the spool's file system, {want} kept in reserve"
            ));
        }
    }
    Ok(())
}
