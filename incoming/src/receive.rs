//! A message received straight into its spool file, so that a session's memory does not
//! grow with the message. The file is made (and the queue id claimed) when DATA or the
//! first BDAT chunk starts, the Received: field written first; the header section is held
//! (up to `HEAD_MAX`) until it ends, so that the fields a submission lacks (Date:,
//! Message-ID:) can go before it; everything after goes through to the file.

use qms_common::headers;
use qms_spool::{Job, QueueId, Spool, SpoolError, Writer};
use std::io::Write;

/// The most of a header section held in memory; a longer one is written as it is.
const HEAD_MAX: usize = 256 * 1024;

/// Dropped before [`Receiver::end`] (a refused or abandoned transaction, a lost client),
/// it removes the message file.
pub struct Receiver {
    spool: Spool,
    writer: Option<Writer>,
    /// The header section (and what came with its last piece), up to `HEAD_MAX`.
    head: Vec<u8>,
    head_done: bool,
    /// The header section ended within what is held (it is all in `head`).
    head_whole: bool,
    /// Bytes of the message as the client sent it.
    pub size: u64,
    failed: Option<SpoolError>,
    /// Add Date: and Message-ID: when the header section has none (submission).
    complete: bool,
    hostname: String,
    /// The Message-ID added, if one was.
    pub added_id: Option<String>,
}

impl Receiver {
    /// Starts the message file for the job `draft` will become (see [`Spool::writer`]);
    /// `received` makes the Received: field for the id. A failure is kept and reported by
    /// [`Receiver::end`], after the client has sent everything.
    pub fn start(
        spool: &Spool,
        draft: &Job,
        received: &dyn Fn(&QueueId) -> String,
        complete: bool,
        hostname: &str,
    ) -> Receiver {
        let mut r = Receiver {
            spool: spool.clone(),
            writer: None,
            head: Vec::new(),
            head_done: false,
            head_whole: false,
            size: 0,
            failed: None,
            complete,
            hostname: hostname.to_string(),
            added_id: None,
        };
        match spool.writer(draft) {
            Ok(w) => {
                let line = received(w.id());
                r.writer = Some(w);
                r.write(line.as_bytes());
            }
            Err(e) => r.failed = Some(e),
        }
        r
    }

    fn write(&mut self, data: &[u8]) {
        if self.failed.is_some() {
            return;
        }
        if let Some(w) = self.writer.as_mut() {
            if let Err(e) = w.write_all(data) {
                self.failed = Some(SpoolError::Io {
                    what: "write".into(),
                    path: "msg".into(),
                    err: e,
                });
            }
        }
    }

    /// Takes the next piece of the message (a line, or part of a BDAT chunk).
    pub fn feed(&mut self, data: &[u8]) {
        self.size += data.len() as u64;
        if self.head_done {
            self.write(data);
            return;
        }
        let from = self.head.len().saturating_sub(3);
        self.head.extend_from_slice(data);
        let ended = self.head.starts_with(b"\r\n")
            || self.head[from..].windows(4).any(|w| w == b"\r\n\r\n");
        if ended || self.head.len() > HEAD_MAX {
            self.head_whole = ended;
            self.end_head();
        }
    }

    fn end_head(&mut self) {
        self.head_done = true;
        let mut extra = String::new();
        if self.complete {
            if !headers::has(&self.head, "date") {
                extra.push_str(&headers::date(qms_common::time::now()));
            }
            if !headers::has(&self.head, "message-id") {
                let id = headers::new_message_id(&self.hostname);
                extra.push_str(&format!("Message-ID: <{id}>\r\n"));
                self.added_id = Some(id);
            }
        }
        self.write(extra.as_bytes());
        let head = std::mem::take(&mut self.head);
        self.write(&head);
        self.head = head;
    }

    /// The header section (for hop counts and the Message-ID), as far as it was held.
    pub fn head(&mut self) -> &[u8] {
        if !self.head_done {
            // The message ended within the held part: all of it is here.
            self.head_whole = true;
            self.end_head();
        }
        &self.head
    }

    /// The header section, when all of it was held (not cut at `HEAD_MAX`).
    pub fn whole_head(&mut self) -> Option<&[u8]> {
        self.head();
        self.head_whole.then_some(self.head.as_slice())
    }

    /// The written message, ready to stage; or why it could not be written (the file is
    /// then removed).
    pub fn end(mut self) -> Result<Writer, SpoolError> {
        if !self.head_done {
            self.end_head();
        }
        match (self.failed.take(), self.writer.take()) {
            (None, Some(w)) => Ok(w),
            (Some(e), w) => {
                if let Some(w) = w {
                    self.spool.discard(w);
                }
                Err(e)
            }
            (None, None) => Err(SpoolError::NotFound("message file".into())),
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(w) = self.writer.take() {
            self.spool.discard(w);
        }
    }
}
