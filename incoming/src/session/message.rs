//! The message of a mail transaction: DATA and BDAT, the checks at its end, and the job it
//! becomes, committed before the 250.

use super::*;
use qms_spool::{SpoolError, Writer};

impl Session<'_> {
    pub(super) fn data(&mut self, arg: &str) -> Flow {
        if !arg.is_empty() {
            return self.error("501 5.5.4 Syntax: DATA");
        }
        match &self.tx {
            None => return self.error("503 5.5.1 Error: need MAIL command"),
            Some(t) if t.recipients.is_empty() => {
                return self.error("554 5.5.1 Error: no valid recipients")
            }
            Some(t) if t.chunks.is_some() => return self.error("503 5.5.1 Error: DATA after BDAT"),
            _ => {}
        }
        self.conn.reply("354 End data with <CR><LF>.<CR><LF>");
        if self.conn.flush().is_err() {
            return Flow::Close;
        }
        self.conn.set_timeout(self.cfg().limits.data_timeout);
        let flow = self.read_message();
        self.conn.set_timeout(self.cfg().limits.command_timeout);
        flow
    }

    pub(super) fn read_message(&mut self) -> Flow {
        let (max, line) = (self.cfg().limits.message_size, self.cfg().limits.text_line);
        let mut rx = self.receiver();
        match data::read_data(&mut self.conn, max, line, &mut |l| rx.feed(l)) {
            Err(_) | Ok(Data::Eof) => {
                drop(rx);
                qlog!(
                    "client={} status=lost reason=\"connection lost in DATA\"",
                    client_name(&self.peer)
                );
                self.tx = None;
                Flow::Close
            }
            Ok(Data::Refused(e)) => {
                drop(rx);
                self.tx = None;
                let reply = e.reply(max, line);
                self.error(&reply)
            }
            Ok(Data::Complete) => {
                self.finish(rx);
                Flow::Continue
            }
        }
    }

    /// Starts receiving the transaction's message into its spool file: in `msg/ID.QUEUE`
    /// of the queue the direct route plans for it, else of `incoming`.
    pub(super) fn receiver(&mut self) -> Receiver {
        // A checked message gets an Authentication-Results field from the router: no plan.
        let checked = self.checked().is_some();
        let plan = self.tx.as_ref().filter(|_| !checked).and_then(|t| {
            let aliases = self.shared.aliases.get();
            let (sender, rcpts) = (t.sender.as_ref(), &t.recipients[..]);
            qms_router::direct::Plan::of(
                &self.shared.cfg,
                &aliases,
                sender,
                rcpts,
                self.may_relay(),
            )
        });
        // The job as known now, for the room its file leaves before the message.
        let mut draft = match self.tx.as_ref() {
            Some(t) => self.draft(t, t.recipients.clone()),
            None => Job::new(
                "incoming",
                None,
                Vec::new(),
                Client::default(),
                "",
                &self.shared.cfg.outgoing,
            ),
        };
        if let Some(p) = &plan {
            p.apply(&mut draft);
        }
        if let Some(t) = self.tx.as_mut() {
            t.direct = plan;
        }
        let cfg = &self.shared.cfg;
        let proto = match (self.esmtp, self.tls.is_some(), self.auth_user.is_some()) {
            (false, _, _) => "SMTP",
            (true, false, false) => "ESMTP",
            (true, true, false) => "ESMTPS",
            (true, false, true) => "ESMTPA",
            (true, true, true) => "ESMTPSA",
        };
        let addr = self.peer.addr.map(|a| a.to_string());
        let for_rcpt = self
            .tx
            .as_ref()
            .filter(|t| t.recipients.len() == 1)
            .map(|t| t.recipients[0].address.to_string());
        let hop = headers::Hop {
            helo: self.helo.as_deref(),
            addr: addr.as_deref(),
            local_user: self.peer.local_user.as_deref(),
            by: &cfg.hostname,
            proto,
            tls: self.tls.as_deref(),
            for_rcpt,
        };
        let submission = matches!(
            self.kind,
            Kind::Submission | Kind::Submissions | Kind::Local
        );
        let received = |id: &QueueId| headers::received(&hop, id.as_str(), qms_common::time::now());
        Receiver::start(
            &self.shared.spool,
            &draft,
            &received,
            submission,
            &cfg.hostname,
        )
    }

    pub(super) fn bdat(&mut self, arg: &str) -> Flow {
        let Some((size, last)) = bdat_args(arg) else {
            // Without a valid size the chunk cannot be skipped: the stream is out of step.
            self.conn.reply("501 5.5.4 Syntax: BDAT size [LAST]");
            return Flow::Close;
        };
        let (max, line) = (self.cfg().limits.message_size, self.cfg().limits.text_line);
        let ok_tx = self.tx.as_ref().is_some_and(|t| !t.recipients.is_empty());
        if ok_tx && self.tx.as_ref().is_some_and(|t| t.chunks.is_none()) {
            let rx = self.receiver();
            if let Some(t) = self.tx.as_mut() {
                t.chunks = Some(rx);
            }
        }
        let room = self
            .tx
            .as_ref()
            .and_then(|t| t.chunks.as_ref())
            .map_or(0, |r| r.size)
            + size
            <= max;
        if !self.read_chunk(size, ok_tx && room) {
            self.tx = None;
            return Flow::Close;
        }
        if !ok_tx {
            return self.error(if self.tx.is_none() {
                "503 5.5.1 Error: need MAIL command"
            } else {
                "554 5.5.1 Error: no valid recipients"
            });
        }
        let Some(t) = self.tx.as_mut() else {
            return Flow::Continue;
        };
        if !room {
            t.chunk_error = Some(data::DataError::TooBig);
        }
        if !last {
            self.conn.reply(&format!("250 2.0.0 {size} bytes received"));
            return Flow::Continue;
        }
        let err = t
            .chunk_error
            .take()
            .or_else(|| t.chunk_check.finish(line).err());
        let rx = t.chunks.take();
        if let Some(e) = err {
            drop(rx);
            self.tx = None;
            let reply = e.reply(max, line);
            return self.error(&reply);
        }
        match rx {
            Some(rx) => self.finish(rx),
            None => self.tx = None,
        }
        Flow::Continue
    }

    /// Reads a chunk of `size` bytes: into the transaction's message when `keep` (and no
    /// earlier chunk failed), else read and dropped. False when the connection failed.
    fn read_chunk(&mut self, size: u64, keep: bool) -> bool {
        let line = self.cfg().limits.text_line;
        self.conn.set_timeout(self.cfg().limits.data_timeout);
        let read = match self.tx.as_mut() {
            Some(t) if keep && t.chunk_error.is_none() => {
                let (rx, check) = (&mut t.chunks, &mut t.chunk_check);
                let mut sink = |b: &[u8]| {
                    check.feed(b, line);
                    if let Some(rx) = rx.as_mut() {
                        rx.feed(b);
                    }
                };
                self.conn.read_exact_into(size, Some(&mut sink))
            }
            _ => self.conn.read_exact_into(size, None),
        };
        self.conn.set_timeout(self.cfg().limits.command_timeout);
        matches!(read, Ok(true))
    }

    /// `[auth_checks]` at the end of DATA: the results go into the job for the router to
    /// write, or the message is refused (and its file dropped; None).
    pub(super) fn verdict(
        &mut self,
        spf: Option<&mail_auth::SpfOutput>,
        job: &mut Job,
        mut w: qms_spool::Writer,
    ) -> Option<qms_spool::Writer> {
        let (Some(spf), Some((checks, ip))) = (spf, self.checked()) else {
            return Some(w);
        };
        let msg = match w.map() {
            Ok(m) => m,
            Err(e) => {
                qlog!(
                    "client={} status=warning reason={}",
                    client_name(&self.peer),
                    quote(&e.to_string())
                );
                return Some(w);
            }
        };
        let helo = self.helo.clone().unwrap_or_default();
        let from = qms_common::address::show_sender(&job.sender);
        let from = from.trim_matches(['<', '>']);
        let seal = self.may_forward(job);
        let v = checks.message(&msg, spf, ip, &helo, from, seal);
        drop(msg);
        if let Some(reply) = v.refuse {
            qlog!(
                "client={} status=reject from={} results={} reply={}",
                client_name(&self.peer),
                quote(from),
                quote(&v.results),
                quote(&reply)
            );
            self.shared.spool.discard(w);
            self.conn.reply(&reply);
            return None;
        }
        job.auth_results = Some(v.results);
        job.arc_seal = v.arc_set;
        job.quarantine = v.quarantine;
        Some(w)
    }

    /// With `[arc]`: whether a recipient is reached through an alias (which may forward it to
    /// another domain): such a message is sealed. Others are only passed on as they came.
    pub(super) fn may_forward(&self, job: &Job) -> bool {
        let cfg = &self.shared.cfg;
        if cfg.arc.is_none() {
            return false;
        }
        let aliases = self.shared.aliases.get();
        let expander = qms_common::expand::Expander::new(cfg, &aliases);
        job.recipients
            .iter()
            .any(|r| expander.direct(&r.address).is_none())
    }

    /// The incoming job a transaction to `recipients` becomes, as far as it is known before
    /// its message.
    fn draft(&self, tx: &Transaction, recipients: Vec<Recipient>) -> Job {
        let client = Client {
            addr: self.peer.addr.map(|a| a.to_string()),
            helo: self.helo.clone(),
            auth: self.auth_user.clone(),
            tls: self.tls.clone(),
            local_user: self.peer.local_user.clone(),
            trusted: self.may_relay(),
        };
        let mut job = Job::new(
            "incoming",
            tx.sender.clone(),
            recipients,
            client,
            self.kind.protocol(),
            &self.shared.cfg.outgoing,
        );
        job.ret = tx.ret;
        job.envid = tx.envid.clone();
        job.smtputf8 = tx.smtputf8;
        job.eightbit = tx.eightbit;
        job
    }

    /// Spools the message and answers 250 only once it is durable.
    pub(super) fn finish(&mut self, mut rx: Receiver) {
        let spool = &self.shared.spool;
        let Some(mut tx) = self.tx.take() else {
            drop(rx);
            return;
        };
        let cfg = self.shared.cfg.clone();
        if headers::count(rx.head(), "received") >= cfg.limits.hops {
            drop(rx);
            self.conn.reply("554 5.4.6 Too many hops (mail loop?)");
            return;
        }
        let recipients = std::mem::take(&mut tx.recipients);
        let mut job = self.draft(&tx, recipients);
        let rcpts: Vec<String> = job
            .recipients
            .iter()
            .map(|r| r.address.to_string())
            .collect();
        let sender = qms_common::address::logged_sender(&job.sender);
        job.message_id = rx
            .added_id
            .clone()
            .or_else(|| headers::message_id_of(rx.head()));
        let size = rx.size;
        let tracked = job.clone();
        // Stamped before the job can be seen: the router's "routed" must come after it.
        let received_at = qms_common::time::now_micros();
        let plain = rx
            .whole_head()
            .is_some_and(qms_router::direct::asks_nothing);
        let written = match rx.end() {
            Ok(w) => match self.verdict(tx.spf.as_ref(), &mut job, w) {
                Some(w) => Ok(w),
                None => return,
            },
            Err(e) => Err(e),
        };
        let planned = tx.direct.is_some();
        let direct = tx.direct.filter(|p| plain && p.apply(&mut job));
        // Started for an output queue, but the router must see it after all.
        let written = written.and_then(|w| match (planned, &direct) {
            (true, None) => to_router(spool, w),
            _ => Ok(w),
        });
        // `spf=pass dkim=none arc=none dmarc=pass`, when the checks ran: for the log, tracking, metrics.
        let checked = job.auth_results.as_deref().map(crate::authcheck::summary);
        let result = written
            .and_then(|w| spool.stage_written(job, w))
            .and_then(|staged| self.shared.committer.commit(staged));
        let queued = Queued {
            sender: &sender,
            rcpts: &rcpts,
            size,
            job: &tracked,
            checked: checked.as_ref(),
            received_at,
            direct: direct.as_ref(),
        };
        self.answer(result, &queued);
    }

    /// Answers the client once the message is committed (and logs it), or why it is not.
    fn answer(&mut self, result: Result<QueueId, SpoolError>, q: &Queued) {
        match result {
            Ok(id) => {
                self.log_queued(&id, q);
                self.conn.reply(&format!("250 2.0.0 Ok: queued as {id}"));
            }
            Err(e) => {
                qlog!(
                    "client={} from={} status=tempfail reason={}",
                    client_name(&self.peer),
                    q.sender,
                    quote(&e.to_string())
                );
                if e.is_no_space() {
                    self.conn.reply("452 4.3.1 Insufficient system storage");
                } else {
                    self.conn.reply("451 4.3.0 Error: queue file write error");
                }
            }
        }
    }
}

/// What the log line and tracking events of a message just queued say.
struct Queued<'a> {
    /// The envelope sender as a log value.
    sender: &'a str,
    rcpts: &'a [String],
    size: u64,
    /// The job as it was before the direct route or the checks changed it.
    job: &'a Job,
    checked: Option<&'a crate::authcheck::Summary>,
    /// When the message was received (µs), stamped before its job could be seen.
    received_at: u64,
    direct: Option<&'a qms_router::direct::Plan>,
}

impl Session<'_> {
    /// Logs and tracks a message queued as `id`: the `queued` line and, by the direct route,
    /// the `routed` line go out in one write.
    fn log_queued(&self, id: &QueueId, q: &Queued) {
        qms_common::log::together(|| {
            qlog!(
                "qid={id} client={} helo={} from={} to={} size={} nrcpt={} msgid={} tls={} sasl_user={} {}status=queued",
                client_name(&self.peer),
                quote(self.helo.as_deref().unwrap_or("")),
                q.sender,
                quote(&q.rcpts.join(",")),
                q.size,
                q.rcpts.len(),
                quote(q.job.message_id.as_deref().unwrap_or("")),
                quote(self.tls.as_deref().unwrap_or("none")),
                quote(self.auth_user.as_deref().unwrap_or("-")),
                // One line per message, so log readers count it once.
                q.checked.map(|c| format!("{} ", c.line())).unwrap_or_default()
            );
            if let Some(c) = q.checked {
                c.count();
            }
            let protocol = [("protocol", self.kind.protocol())];
            qms_common::metrics::count("qms_messages_received_total", &protocol, 1.0);
            let mut events: Vec<_> = q
                .job
                .recipients
                .iter()
                .map(|r| {
                    let mut ev = q.job.track(&r.address, "received", "", "queued");
                    ev.qid = id.to_string();
                    ev.time = q.received_at;
                    ev.reply = q.checked.map(|c| c.line());
                    ev
                })
                .collect();
            if let Some(plan) = q.direct {
                events.extend(plan.announce(id.as_str(), q.job, q.received_at + 1));
            }
            qms_common::track::emit_all(events);
        });
    }
}

/// `BDAT size [LAST]`: the chunk's size, and whether it is the last.
fn bdat_args(arg: &str) -> Option<(u64, bool)> {
    let mut words = arg.split_whitespace();
    let size = words.next()?.parse::<u64>().ok()?;
    match words.next() {
        None => Some((size, false)),
        Some(w) if w.eq_ignore_ascii_case("LAST") => Some((size, true)),
        Some(_) => None,
    }
}

/// Moves a message started for an output queue to the router's queue; dropped if it cannot.
fn to_router(spool: &Spool, mut w: Writer) -> Result<Writer, SpoolError> {
    match spool.refile(&mut w, "incoming") {
        Ok(()) => Ok(w),
        Err(e) => {
            spool.discard(w);
            Err(e)
        }
    }
}
