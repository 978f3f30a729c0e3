//! Start-up recovery: the debris of writes a crash interrupted, removed before the roles
//! start (see docs/architecture.md, the table of crash states).

use crate::id::QueueId;
use crate::store::Spool;
use fs2::FileExt;
use std::fs;
use std::path::Path;

impl Spool {
    /// Removes the debris of interrupted writes: files in `tmp/` and message files that no job
    /// refers to; and empties free files that still hold something (a message being written
    /// where it lay in the pool when its writer died, or one retired just before a crash and
    /// not yet emptied). Files still locked by a running enqueue are left alone. Returns how
    /// many files it removed or emptied.
    pub fn recover(&self) -> usize {
        let mut removed = 0;
        let unlocked = |p: &Path| fs::File::open(p).is_ok_and(|f| f.try_lock_exclusive().is_ok());
        // Staged jobs that were never renamed into place: `.ID.PID.tmp` beside their queue's
        // jobs (and anything in tmp/, where older versions staged them).
        let mut dirs = vec![self.root().join("tmp")];
        for area in crate::store::JOB_AREAS {
            if let Ok(rd) = fs::read_dir(self.root().join(area)) {
                dirs.extend(rd.flatten().map(|e| e.path()));
            }
        }
        for dir in dirs.iter().chain([&self.root().join("msg")]) {
            let Ok(rd) = fs::read_dir(dir) else { continue };
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with(crate::free::PREFIX) {
                    if e.metadata().is_ok_and(|m| m.len() > 0)
                        && crate::free::empty_if_free(&e.path())
                    {
                        removed += 1;
                    }
                    continue;
                }
                if dir.ends_with("msg") {
                    continue;
                }
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
                let referenced = ["queue", "deferred", "hold", "corrupt"]
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A message being written where it lay in the pool when its writer died is emptied at
    /// the next start; one a live writer holds is left alone.
    #[test]
    fn a_start_empties_free_files_that_hold_something_unless_held() {
        let dir = std::env::temp_dir().join(format!("qms-recover-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let spool = Spool::open(&dir, &["smtp".to_string()]).unwrap();
        let q = spool.queue_dir("smtp");
        let dead = q.join(format!("{}1.1", crate::free::PREFIX));
        let live = q.join(format!("{}1.2", crate::free::PREFIX));
        let empty = q.join(format!("{}1.3", crate::free::PREFIX));
        fs::write(&dead, "Subject: half a message").unwrap();
        fs::write(&live, "Subject: being written").unwrap();
        fs::write(&empty, "").unwrap();
        let held = fs::OpenOptions::new().write(true).open(&live).unwrap();
        held.lock_exclusive().unwrap();
        assert_eq!(spool.recover(), 1);
        assert_eq!(fs::metadata(&dead).unwrap().len(), 0);
        assert_eq!(fs::read(&live).unwrap(), b"Subject: being written");
        assert!(empty.exists(), "a free file stays in the pool");
        drop(held);
        let _ = fs::remove_dir_all(&dir);
    }
}
