//! One file per message: a job that carries its message in its own file (job format
//! version 2), written by smtpd's direct route.
//!
//! ```text
//! queue/QUEUE/ID.json   {"version":2,…,"message_at":1024}␠␠␠…␠\n   the job, padded to message_at
//!                       Received: from …\r\n                        the message, to the end
//! ```
//!
//! The message is written as it arrives from `message_at` on (the job is only known when it
//! ends), then the job's JSON over the space left before it. `head -1` shows the job; a
//! version-1 job's message is the file `msg/BODY` instead. Against two files, this saves the
//! message file's rename into place, its removal, and a file to open at each delivery.
//!
//! Here are the format (the header, reading a job's start, copying a message) and the
//! spool's operations on one-file jobs: the writer, staging, refiling for the router, and a
//! new version with a copy of the message. `store` calls them where the two kinds differ.

use crate::id::QueueId;
use crate::job::{Job, Seal, INLINE_VERSION};
use crate::store::{io_err, Claimed, Spool, Staged, Writer, WRITE_BUFFER};

type SpoolResult<T> = crate::store::Result<T>;
use qms_common::safeio;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;

/// Room left for a job before its message when nothing is known of the job: one block holds
/// the job of a message to a few dozen recipients; a longer job moves the message further on
/// (see [`fit`]).
pub(crate) const SPACE: u64 = 4096;
/// What a job learns after its message has started (its size, the Message-ID, the offset
/// itself), in bytes of JSON: room kept for it beyond the draft's length (see [`room`]).
const LATER: u64 = 320;
/// The step in which room is given, so that jobs alike start their messages alike.
const STEP: u64 = 128;
/// The first read of a job being claimed: the job and, for most messages, all of the
/// message (which its agent reads next anyway). Under 64 KiB, as `WRITE_BUFFER` in `store`.
pub(crate) const CLAIM_READ: usize = 32 * 1024;
/// The first read of a job only looked at (listings): the job alone, in most cases.
pub(crate) const LOOK_READ: usize = 8 * 1024;
/// The copy buffer.
const BLOCK: usize = 64 * 1024;

/// The job as the first `at` bytes of its file: the JSON, spaces, a newline. `None` when it
/// does not fit.
pub(crate) fn header(job: &Job, at: u64) -> Result<Option<Vec<u8>>, serde_json::Error> {
    let mut job = job.clone();
    job.message_at = at;
    let mut data = serde_json::to_vec(&job)?;
    let at = usize::try_from(at).unwrap_or(usize::MAX);
    if data.len() + 1 > at {
        return Ok(None);
    }
    data.resize(at - 1, b' ');
    data.push(b'\n');
    Ok(Some(data))
}

/// The room to leave before the message for the job that `draft` (the job as known when
/// the message starts) will become: its JSON, `LATER` more, in steps of `STEP`. Kept close,
/// so that a small message and its job fill one block: against 4,096 bytes every time, a
/// 2 KiB message's file is one block to write back at the sync instead of two.
pub(crate) fn room(draft: &Job) -> u64 {
    match serde_json::to_vec(draft) {
        Ok(data) => (data.len() as u64 + LATER).div_ceil(STEP) * STEP,
        Err(_) => SPACE,
    }
}

/// The smallest offset from `at` up (doubling) that the job fits before, and the header
/// written there: for a message written from `at` before its job was known.
pub(crate) fn fit(job: &Job, mut at: u64) -> Result<(u64, Vec<u8>), serde_json::Error> {
    loop {
        if let Some(h) = header(job, at)? {
            return Ok((at, h));
        }
        at *= 2;
    }
}

/// Where a sealed header's `crc32` field starts: the checksum covers the bytes before it.
const SEAL_FIELD: &[u8] = b",\"crc32\":\"";

/// Writes into `head` (a header of a job whose `crc32` is set, of any value) the checksum of
/// its JSON before that field and of the message whose own checksum is `message`. The field
/// is the JSON's last, and a string can hold no bare `"`: its last such run is the field.
pub(crate) fn seal(head: &mut [u8], message: &crc32fast::Hasher) -> io::Result<()> {
    let at = head
        .windows(SEAL_FIELD.len())
        .rposition(|w| w == SEAL_FIELD)
        .ok_or_else(|| io::Error::other("a sealed job has no crc32 field"))?;
    let mut crc = crc32fast::Hasher::new();
    crc.update(&head[..at]);
    crc.combine(message);
    let digits = format!("{:08x}", crc.finalize());
    let value = at + SEAL_FIELD.len();
    head[value..value + 8].copy_from_slice(digits.as_bytes());
    Ok(())
}

/// Whether the file of job `id` is whole as written: a job of that id, and when it is a
/// sealed one-file job, one whose JSON and message still give its checksum. A job with no
/// seal was synced before it was renamed into place. A file torn by a machine crash before
/// its sync (parts not yet written, or still those of the older file it reused) fails.
pub(crate) fn intact(file: &File, id: &str) -> io::Result<bool> {
    let (head, _) = read_head(file, LOOK_READ)?;
    let Ok(job) = parse(&head) else {
        return Ok(false);
    };
    if job.id.as_str() != id {
        return Ok(false);
    }
    let Some(want) = job.crc32.filter(|_| job.version == INLINE_VERSION) else {
        return Ok(true);
    };
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let Some(at) = line
        .windows(SEAL_FIELD.len())
        .rposition(|w| w == SEAL_FIELD)
    else {
        return Ok(false);
    };
    let mut crc = crc32fast::Hasher::new();
    crc.update(&line[..at]);
    let len = file.metadata()?.len();
    let mut buf = vec![0u8; BLOCK];
    let mut from = job.message_at;
    while from < len {
        let n = (len - from).min(BLOCK as u64) as usize;
        file.read_exact_at(&mut buf[..n], from)?;
        crc.update(&buf[..n]);
        from += n as u64;
    }
    Ok(crc.finalize() == want.0)
}

/// The header of a job written together with a copy of its message (a new version of the
/// job): the message follows the JSON closely, so a deferral rewrites little more than the
/// job and its message.
pub(crate) fn fit_tight(job: &Job) -> Result<(u64, Vec<u8>), serde_json::Error> {
    let mut probe = job.clone();
    probe.message_at = SPACE;
    let mut at = serde_json::to_vec(&probe)?.len() as u64 + 1;
    loop {
        if let Some(h) = header(job, at)? {
            return Ok((at, h));
        }
        at += 16;
    }
}

/// The start of a job file: all of it when it is shorter than `first`, else at least its
/// whole JSON. Returns the bytes and whether they are the whole file.
pub(crate) fn read_head(file: &File, first: usize) -> io::Result<(Vec<u8>, bool)> {
    read_head_of(file, first, None)
}

/// [`read_head`] of a file whose length is known and cannot change (a job held locked: a
/// job is rewritten into a new file, never in place): a file shorter than `first` is read
/// in one call into a buffer of its size.
pub(crate) fn read_head_of(
    file: &File,
    first: usize,
    len: Option<u64>,
) -> io::Result<(Vec<u8>, bool)> {
    let known = len.and_then(|l| usize::try_from(l).ok());
    if let Some(l) = known.filter(|&l| l < first) {
        let mut buf = vec![0u8; l];
        let mut at = 0;
        while at < l {
            match file.read_at(&mut buf[at..], at as u64) {
                Ok(0) => break,
                Ok(n) => at += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        buf.truncate(at);
        return Ok((buf, true));
    }
    let mut buf = vec![0u8; first.max(1)];
    let mut len = 0;
    loop {
        while len < buf.len() {
            match file.read_at(&mut buf[len..], len as u64) {
                Ok(0) => {
                    buf.truncate(len);
                    return Ok((buf, true));
                }
                Ok(n) => len += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        // A long file: the JSON ends at its first newline (serde_json escapes those in
        // strings); a version-1 job has none, and is read whole.
        if buf.contains(&b'\n') {
            return Ok((buf, false));
        }
        buf.resize(len * 2, 0);
    }
}

/// Reads a job from the start of its file; anything after the JSON (the padding and
/// message of a version-2 job) is left.
pub(crate) fn parse(data: &[u8]) -> Result<Job, String> {
    #[derive(serde::Deserialize)]
    struct Version {
        version: u32,
    }
    let first = |data| {
        serde_json::Deserializer::from_slice(data)
            .into_iter::<Version>()
            .next()
    };
    let v = match first(data) {
        Some(Ok(v)) => v,
        Some(Err(e)) => return Err(e.to_string()),
        None => return Err("empty job file".into()),
    };
    if v.version > crate::job::JOB_VERSION {
        return Err(format!(
            "job format version {} is newer than this qms ({})",
            v.version,
            crate::job::JOB_VERSION
        ));
    }
    let job: Job = match serde_json::Deserializer::from_slice(data)
        .into_iter::<Job>()
        .next()
    {
        Some(Ok(j)) => j,
        Some(Err(e)) => return Err(e.to_string()),
        None => return Err("empty job file".into()),
    };
    Ok(job)
}

/// The message of a version-2 job: its file from `at` to the end.
pub(crate) fn message(file: &File, at: u64) -> io::Result<Vec<u8>> {
    let len = file.metadata()?.len();
    let n = usize::try_from(len.saturating_sub(at)).map_err(io::Error::other)?;
    let mut buf = vec![0u8; n];
    file.read_exact_at(&mut buf, at)?;
    Ok(buf)
}

/// Copies `len` bytes of `src` from `from` into `dst` at `to`, a block at a time (a message
/// of any size, in bounded memory). Backwards, so that it may move a message further on in
/// its own file. Returns the bytes copied.
pub(crate) fn copy(src: &File, from: u64, len: u64, dst: &File, to: u64) -> io::Result<u64> {
    let mut buf = vec![0u8; BLOCK];
    let mut end = len;
    while end > 0 {
        let n = end.min(buf.len() as u64);
        let start = end - n;
        let chunk = &mut buf[..n as usize];
        src.read_exact_at(chunk, from + start)?;
        dst.write_all_at(chunk, to + start)?;
        end = start;
    }
    Ok(len)
}

// ---- the spool's side: writing, refiling and rewriting one-file jobs ----------------------

impl Spool {
    /// A writer for a one-file job in `queue`, its message from `at` on.
    pub(crate) fn inline_writer(&self, queue: &str, at: u64) -> SpoolResult<Writer> {
        use std::io::{Seek, SeekFrom};
        // A free file keeps its blocks (written over, then cut to length at the end), and
        // is written where it lies, under its free name, locked until the commit has renamed
        // it into place: one rename a message, not two.
        let dir = self.queue_dir(queue);
        if let Some((mut file, path)) = self.pool(&dir.join(crate::free::PREFIX)).take_in_place() {
            if let Err(e) = file.seek(SeekFrom::Start(at)) {
                let _ = fs::remove_file(&path);
                return Err(io_err("write", &path)(e));
            }
            return Ok(Writer {
                id: QueueId::generate(),
                body_name: String::new(),
                out: std::io::BufWriter::with_capacity(WRITE_BUFFER, file),
                path,
                size: 0,
                at,
                crc: crc32fast::Hasher::new(),
                queue: queue.to_string(),
                in_place: true,
            });
        }
        // None free: a new file beside the queue's jobs, locked, so start-up clean-up can
        // tell debris from work.
        let (mut id, mut tmp);
        let mut tries = 0;
        let mut file = loop {
            id = QueueId::generate();
            tmp = self
                .queue_dir(queue)
                .join(format!(".{id}.{}.tmp", qms_common::pid()));
            match self.pool(&tmp).overwrite(&tmp) {
                Ok(f) => break f,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && tries < 8 => tries += 1,
                Err(e) => return Err(io_err("create", &tmp)(e)),
            }
        };
        let ready = file.seek(SeekFrom::Start(at));
        if let Err(e) = ready {
            let _ = fs::remove_file(&tmp);
            return Err(io_err("write", &tmp)(e));
        }
        Ok(Writer {
            id,
            body_name: String::new(),
            out: std::io::BufWriter::with_capacity(WRITE_BUFFER, file),
            path: tmp,
            size: 0,
            at,
            crc: crc32fast::Hasher::new(),
            queue: queue.to_string(),
            in_place: false,
        })
    }

    /// Writes the job of a one-file message over the room left before the message (moving
    /// the message on when the job needs more) and stages it beside its queue's jobs.
    pub(crate) fn stage_inline(&self, mut job: Job, w: Writer) -> SpoolResult<Staged> {
        use std::os::unix::fs::FileExt;
        let Writer {
            id,
            out,
            path,
            size,
            at,
            queue,
            in_place,
            crc,
            ..
        } = w;
        let done = (|| {
            let file = out.into_inner().map_err(|e| e.into_error())?;
            if job.queue != queue {
                return Err(io::Error::other(format!(
                    "a message started for queue {queue} cannot go to {}",
                    job.queue
                )));
            }
            job.id = id.clone();
            job.version = INLINE_VERSION;
            job.body = String::new();
            job.size = size;
            // Sealed: the group commit makes it visible before its sync (see `commit`).
            job.crc32 = Some(Seal(0));
            let (to, mut head) = fit(&job, at).map_err(io::Error::other)?;
            seal(&mut head, &crc)?;
            if to != at {
                copy(&file, at, size, &file, to)?;
            }
            file.write_all_at(&head, 0)?;
            // What a reused file held past the end of this message goes before the sync.
            file.set_len(to + size)?;
            Ok(file)
        })();
        match done {
            Ok(file) => {
                let dest = self.job_path("queue", &job.queue, &id);
                Ok(Staged {
                    id,
                    body: None,
                    inline: true,
                    in_place,
                    job: safeio::Staged::new_at(file, path, dest),
                })
            }
            Err(e) => {
                let _ = fs::remove_file(&path);
                Err(io_err("write", &path)(e))
            }
        }
    }

    pub(crate) fn refile_inline(&self, w: &mut Writer, queue: &str) -> SpoolResult<()> {
        use std::io::{Seek, SeekFrom, Write};
        let body_name = format!("{}.{queue}", w.id);
        let path = self.root().join("msg").join(&body_name);
        let mut file = self
            .pool(&path)
            .create(&path)
            .map_err(io_err("create", &path))?;
        let copied = w
            .out
            .flush()
            .and_then(|()| copy(w.out.get_ref(), w.at, w.size, &file, 0))
            .and_then(|n| file.seek(SeekFrom::Start(n)));
        if let Err(e) = copied {
            let _ = fs::remove_file(&path);
            return Err(io_err("write", &path)(e));
        }
        let old = std::mem::replace(
            &mut w.out,
            std::io::BufWriter::with_capacity(WRITE_BUFFER, file),
        );
        drop(old);
        let _ = fs::remove_file(&w.path);
        w.out.flush().map_err(io_err("write", &path))?;
        w.body_name = body_name;
        w.path = path;
        w.at = 0;
        w.queue = queue.to_string();
        w.in_place = false;
        Ok(())
    }

    /// A one-file job's new version, with a copy of its message right after the JSON.
    pub(crate) fn stage_update_inline(&self, c: &Claimed) -> SpoolResult<(safeio::Staged, u64)> {
        use std::os::unix::fs::FileExt;
        let tmp = c
            .path
            .with_file_name(format!(".{}.{}.tmp", c.job.id, qms_common::pid()));
        let file = self
            .pool(&tmp)
            .overwrite(&tmp)
            .map_err(io_err("create", &tmp))?;
        // Written and synced before it replaces the old version: no seal.
        let mut job = c.job.clone();
        job.crc32 = None;
        let written = (|| {
            let (to, head) = fit_tight(&job).map_err(io::Error::other)?;
            let len = c.file.metadata()?.len().saturating_sub(c.job.message_at);
            copy(&c.file, c.job.message_at, len, &file, to)?;
            file.write_all_at(&head, 0)?;
            file.set_len(to + len)?;
            Ok::<u64, io::Error>(to)
        })();
        match written {
            Ok(to) => {
                let s = safeio::Staged::replacing(file, tmp, c.path.clone());
                job.message_at = to;
                Ok((self.ready(s, &job)?, to))
            }
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                Err(io_err("write", &tmp)(e))
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A job for one recipient at example.test in the smtp queue.
    pub(crate) fn job() -> Job {
        let cfg = qms_common::config::Outgoing {
            min_backoff: 60,
            max_backoff: 600,
            delay_warning: 3600,
            max_queue_lifetime: 86400,
        };
        let r = crate::job::Recipient::new("a@example.test".parse().unwrap());
        Job::new(
            "smtp",
            None,
            vec![r],
            crate::job::Client::default(),
            "smtp",
            &cfg,
        )
    }

    #[test]
    fn a_job_and_its_message_share_a_file() {
        let dir = std::env::temp_dir().join(format!("qms-inline-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("j");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let msg = b"Subject: x\r\n\r\n{\"version\":9}\n\r\n";
        let room = room(&job());
        f.write_all_at(msg, room).unwrap();
        let (at, head) = fit(&job(), room).unwrap();
        assert_eq!(at, room);
        f.write_all_at(&head, 0).unwrap();
        let (data, whole) = read_head(&f, CLAIM_READ).unwrap();
        assert!(whole);
        let j = parse(&data).unwrap();
        assert_eq!(j.message_at, room);
        assert_eq!(message(&f, j.message_at).unwrap(), msg);
        // The job is the first line, for `head -1`.
        let text = std::fs::read(&path).unwrap();
        let line = text.split(|&b| b == b'\n').next().unwrap();
        let v: serde_json::Value = serde_json::from_slice(line).unwrap();
        assert_eq!(v["message_at"], room);

        // A job too long for the space: the message moves on, whole.
        let mut big = job();
        for i in 0..100 {
            let a = format!("r{i}@example.test").parse().unwrap();
            big.recipients.push(crate::job::Recipient::new(a));
        }
        let (at, head) = fit(&big, room).unwrap();
        assert!(at > room && head.len() as u64 == at);
        copy(&f, room, msg.len() as u64, &f, at).unwrap();
        f.write_all_at(&head, 0).unwrap();
        f.set_len(at + msg.len() as u64).unwrap();
        let (data, _) = read_head(&f, LOOK_READ).unwrap();
        let j = parse(&data).unwrap();
        assert_eq!(j.recipients.len(), 101);
        // A new version of a job leaves no more room than it needs.
        let (tight, head) = fit_tight(&j).unwrap();
        assert!(tight < at && head.len() as u64 == tight && head.ends_with(b"}\n"));
        assert_eq!(message(&f, j.message_at).unwrap(), msg);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_cut_file_is_refused() {
        let (_, head) = fit(&job(), SPACE).unwrap();
        let json = serde_json::to_vec(&job()).unwrap().len();
        assert!(parse(&head[..json / 2]).is_err());
        assert!(parse(&head).is_ok());
    }

    /// A sealed header: whole, it checks; a changed byte of the message, or of the JSON
    /// before the seal, and it does not.
    #[test]
    fn a_seal_covers_the_job_and_its_message() {
        let dir = std::env::temp_dir().join(format!("qms-seal-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(dir.join("j"))
            .unwrap();
        let mut j = job();
        let msg = b"Subject: x\r\n\r\nbody\r\n";
        let mut crc = crc32fast::Hasher::new();
        crc.update(msg);
        j.version = INLINE_VERSION;
        j.crc32 = Some(Seal(0));
        let (at, mut head) = fit(&j, room(&j)).unwrap();
        seal(&mut head, &crc).unwrap();
        f.write_all_at(&head, 0).unwrap();
        f.write_all_at(msg, at).unwrap();
        let id = j.id.to_string();
        assert!(intact(&f, &id).unwrap());
        assert!(
            !intact(&f, "1M0X8PKFBYXYC0Za").unwrap(),
            "another job's file"
        );
        let parsed = parse(&head).unwrap();
        assert!(parsed.crc32.is_some_and(|s| s.0 != 0));
        f.write_all_at(b"D", at + 16).unwrap();
        assert!(!intact(&f, &id).unwrap(), "a byte of the message changed");
        f.write_all_at(b"d", at + 16).unwrap();
        assert!(intact(&f, &id).unwrap());
        // "attempts":0 → "attempts":1, still valid JSON
        let pos = head
            .windows(12)
            .position(|w| w == b"\"attempts\":0")
            .unwrap();
        f.write_all_at(b"1", (pos + 11) as u64).unwrap();
        assert!(parse(&read_head(&f, LOOK_READ).unwrap().0).is_ok());
        assert!(!intact(&f, &id).unwrap(), "a byte of the job changed");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_room_left_fits_what_the_job_learns_later_and_no_more() {
        let draft = job();
        let at = room(&draft);
        // A 2 KiB message, its Received: field and its job fill one block.
        assert!(at + 2048 + 300 <= 4096, "room {at}");
        // What is learnt at the end of the message fits the room: a long Message-ID, the
        // size, and the offset itself.
        let mut done = draft.clone();
        done.size = 9_999_999_999;
        done.message_id = Some(format!("{}@{}", "i".repeat(100), "h".repeat(100)));
        let (fitted, head) = fit(&done, at).unwrap();
        assert_eq!(fitted, at);
        assert_eq!(head.len() as u64, at);
        // A Message-ID beyond that: the message moves on, and the job still fits.
        done.message_id = Some("x".repeat(900));
        let (moved, _) = fit(&done, at).unwrap();
        assert!(moved > at);
    }
}
