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
    /// not yet emptied). Files still locked by a running enqueue are left alone. After the
    /// machine restarted, it also sets aside the one-file jobs a crash tore. Returns how
    /// many files it removed, emptied or set aside.
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
        if self.rebooted() {
            removed += self.set_aside_torn();
        }
        removed
    }

    /// Whether the machine started again since the spool was last recovered (its boot id
    /// differs from the one `run/boot_id` kept; recorded anew). Only a machine's crash loses
    /// what was written and not synced: a process's death leaves its files whole in memory,
    /// and a job edited by hand between two starts is not taken for a torn one.
    fn rebooted(&self) -> bool {
        let now = fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
        let kept = self.root().join("run").join("boot_id");
        let before = fs::read_to_string(&kept).unwrap_or_default();
        if before != now {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let file = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&kept);
            let _ = file.and_then(|mut f| f.write_all(now.as_bytes()));
        }
        before != now || now.is_empty()
    }

    /// Moves to `corrupt/QUEUE/` the one-file jobs in `queue/QUEUE/` that a machine crash
    /// tore: made visible before their sync (see `Spool::commit`), and never acknowledged.
    /// Jobs elsewhere were synced before they were renamed where they lie. Reads every job
    /// in those directories once: new mail, in most spools a few files.
    fn set_aside_torn(&self) -> usize {
        let mut moved = 0;
        let Ok(queues) = fs::read_dir(self.root().join("queue")) else {
            return 0;
        };
        for q in queues.flatten() {
            let queue = q.file_name().to_string_lossy().into_owned();
            let Ok(jobs) = fs::read_dir(q.path()) else {
                continue;
            };
            for e in jobs.flatten() {
                let path = e.path();
                let name = e.file_name().to_string_lossy().into_owned();
                if queue == "incoming" || name.starts_with('.') || !name.ends_with(".json") {
                    continue;
                }
                let id = name.trim_end_matches(".json");
                let whole = fs::File::open(&path).and_then(|f| crate::inline::intact(&f, id));
                if !matches!(whole, Ok(false)) {
                    continue;
                }
                let dest = self.root().join("corrupt").join(&queue).join(&name);
                if fs::create_dir_all(self.root().join("corrupt").join(&queue)).is_ok()
                    && fs::rename(&path, &dest).is_ok()
                {
                    moved += 1;
                    qms_common::qlog!(
                        "queue={queue} file={} status=corrupt reason={} moved_to={}",
                        path.display(),
                        qms_common::log::quote(
                            "torn by a crash before its sync; never acknowledged"
                        ),
                        dest.display()
                    );
                }
            }
        }
        moved
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

    /// smtpd's group commit renames one-file jobs into place before their sync; a machine
    /// crash in between can leave one torn under its final name. The next start moves
    /// those to `corrupt/` (none was acknowledged) and leaves whole ones.
    #[test]
    fn a_start_sets_aside_one_file_jobs_a_crash_tore() {
        use std::os::unix::fs::FileExt as _;
        let dir = std::env::temp_dir().join(format!("qms-recover-torn-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let spool = Spool::open(&dir, &["smtp".to_string()]).unwrap();
        let stage = |text: &'static str| {
            let job = crate::inline::tests::job();
            spool.stage(job, &|_| text.as_bytes().to_vec()).unwrap()
        };
        let batch = vec![
            stage("Subject: a\r\n\r\nwhole\r\n"),
            stage("Subject: b\r\n\r\npart of it never written\r\n"),
            stage("Subject: c\r\n\r\nstill the file it reused\r\n"),
        ];
        let ids: Vec<QueueId> = spool
            .commit(batch)
            .unwrap()
            .into_iter()
            .map(Result::unwrap)
            .collect();
        let path = |area: &str, id: &QueueId| spool.job_path(area, "smtp", id);
        let head = fs::read(path("queue", &ids[0])).unwrap();
        assert!(String::from_utf8_lossy(&head).contains("\"crc32\":\""));
        let boot = dir.join("run/boot_id");
        fs::write(&boot, "another boot").unwrap();
        assert_eq!(spool.recover(), 0, "whole jobs are left where they are");
        // b: the end of its message still zeros; c: the content of the file it reused.
        let b = fs::OpenOptions::new()
            .write(true)
            .open(path("queue", &ids[1]))
            .unwrap();
        let len = b.metadata().unwrap().len();
        b.write_all_at(&[0; 6], len - 8).unwrap();
        fs::copy(path("queue", &ids[0]), path("queue", &ids[2])).unwrap();
        // The same boot: what changed since was not a crash (an edit by hand, say).
        assert_eq!(spool.recover(), 0);
        assert!(path("queue", &ids[1]).exists());
        // After the machine started again.
        fs::write(&boot, "another boot").unwrap();
        assert_eq!(spool.recover(), 2);
        assert!(path("queue", &ids[0]).exists());
        for id in &ids[1..] {
            assert!(!path("queue", id).exists(), "{id} is still queued");
            assert!(path("corrupt", id).exists(), "{id} is not in corrupt/");
        }
        let _ = fs::remove_dir_all(&dir);
    }
}
