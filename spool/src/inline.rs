//! One file per message: a job that carries its message in its own file (job format
//! version 2), written by smtpd's direct route.
//!
//! ```text
//! queue/QUEUE/ID.json   {"version":2,…,"message_at":4096}␠␠␠…␠\n   the job, padded to message_at
//!                       Received: from …\r\n                        the message, to the end
//! ```
//!
//! The message is written as it arrives from `message_at` on (the job is only known when it
//! ends), then the job's JSON over the space left before it. `head -1` shows the job; a
//! version-1 job's message is the file `msg/BODY` instead. Against two files, this saves the
//! message file's rename into place, its removal, and a file to open at each delivery.

use crate::job::Job;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// Room left for the job before the message: one block holds the job of a message to a few
/// dozen recipients; a longer job moves the message further on (see [`header`]).
pub(crate) const SPACE: u64 = 4096;
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

/// The smallest offset from `SPACE` up (doubling) that the job fits before, and the header
/// written there: for a message written before its job was known.
pub(crate) fn fit(job: &Job) -> Result<(u64, Vec<u8>), serde_json::Error> {
    let mut at = SPACE;
    loop {
        if let Some(h) = header(job, at)? {
            return Ok((at, h));
        }
        at *= 2;
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> Job {
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
        f.write_all_at(msg, SPACE).unwrap();
        let (at, head) = fit(&job()).unwrap();
        assert_eq!(at, SPACE);
        f.write_all_at(&head, 0).unwrap();
        let (data, whole) = read_head(&f, CLAIM_READ).unwrap();
        assert!(whole);
        let j = parse(&data).unwrap();
        assert_eq!(j.message_at, SPACE);
        assert_eq!(message(&f, j.message_at).unwrap(), msg);
        // The job is the first line, for `head -1`.
        let text = std::fs::read(&path).unwrap();
        let line = text.split(|&b| b == b'\n').next().unwrap();
        let v: serde_json::Value = serde_json::from_slice(line).unwrap();
        assert_eq!(v["message_at"], SPACE);

        // A job too long for the space: the message moves on, whole.
        let mut big = job();
        for i in 0..100 {
            let a = format!("r{i}@example.test").parse().unwrap();
            big.recipients.push(crate::job::Recipient::new(a));
        }
        let (at, head) = fit(&big).unwrap();
        assert!(at > SPACE && head.len() as u64 == at);
        copy(&f, SPACE, msg.len() as u64, &f, at).unwrap();
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
        let (_, head) = fit(&job()).unwrap();
        let json = serde_json::to_vec(&job()).unwrap().len();
        assert!(parse(&head[..json / 2]).is_err());
        assert!(parse(&head).is_ok());
    }
}
