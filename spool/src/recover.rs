//! Start-up recovery: the debris of writes a crash interrupted, removed before the roles
//! start (see docs/architecture.md, the table of crash states).

use crate::id::QueueId;
use crate::store::Spool;
use fs2::FileExt;
use std::fs;
use std::path::Path;

impl Spool {
    /// Removes the debris of interrupted writes: files in `tmp/` and message files that no job
    /// refers to. Files still locked by a running enqueue are left alone. Returns the count.
    pub fn recover(&self) -> usize {
        let mut removed = 0;
        let unlocked = |p: &Path| fs::File::open(p).is_ok_and(|f| f.try_lock_exclusive().is_ok());
        // Staged jobs that were never renamed into place: `.ID.PID.tmp` beside their queue's
        // jobs (and anything in tmp/, where older versions staged them).
        let mut dirs = vec![self.root().join("tmp")];
        for area in ["queue", "hold"] {
            if let Ok(rd) = fs::read_dir(self.root().join(area)) {
                dirs.extend(rd.flatten().map(|e| e.path()));
            }
        }
        for dir in dirs {
            let Ok(rd) = fs::read_dir(&dir) else { continue };
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let debris =
                    dir.ends_with("tmp") || (name.starts_with('.') && name.ends_with(".tmp"));
                if debris && unlocked(&e.path()) && fs::remove_file(e.path()).is_ok() {
                    removed += 1;
                }
            }
        }
        if let Ok(rd) = fs::read_dir(self.root().join("msg")) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let Some((id, queue)) = name.split_once('.') else {
                    continue;
                };
                let Some(id) = QueueId::parse(id) else {
                    continue;
                };
                let referenced = ["queue", "hold", "corrupt"]
                    .iter()
                    .any(|a| self.job_path(a, queue, &id).exists());
                if !referenced && unlocked(&e.path()) && fs::remove_file(e.path()).is_ok() {
                    removed += 1;
                }
            }
        }
        removed
    }
}
