//! Crashes while mail flows: roles SIGKILLed one at a time, and the whole instance killed
//! and started again. Nothing acknowledged is lost; a local recipient gets at most one copy;
//! an SMTP copy is repeated only for a transaction in flight at a kill.

mod common;
use common::*;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Message `i` goes to the local Maildir when even, to the sink when odd.
fn recipient(i: usize) -> String {
    if i.is_multiple_of(2) {
        "alice@example.test".into()
    } else {
        format!("r{i}@sink.test")
    }
}

fn text(i: usize) -> String {
    format!("From: load@client.test\nSubject: storm {i}\n\nthe token tok-{i}- once\n")
}

/// How many copies of each token the files of `dirs` hold.
fn copies(dirs: &[std::path::PathBuf]) -> HashMap<usize, usize> {
    let mut n = HashMap::new();
    for d in dirs {
        for e in std::fs::read_dir(d).into_iter().flatten().flatten() {
            let Ok(body) = std::fs::read_to_string(e.path()) else {
                continue;
            };
            for part in body.split("tok-").skip(1) {
                if let Some(i) = part.split('-').next().and_then(|t| t.parse().ok()) {
                    *n.entry(i).or_insert(0) += 1;
                }
            }
        }
    }
    n
}

/// Sends messages `from..from + n` from `threads` sessions; returns the acknowledged ones.
fn send_all(port: u16, from: usize, n: usize, threads: usize) -> Vec<usize> {
    let accepted = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for t in 0..threads {
            let accepted = &accepted;
            s.spawn(move || {
                let mut client = None;
                for i in (from + t..from + n).step_by(threads) {
                    if client.is_none() {
                        client = SmtpClient::connect(port).ok();
                    }
                    let Some(c) = client.as_mut() else { continue };
                    match c.send("load@client.test", &recipient(i), &text(i)) {
                        Ok(()) => accepted.lock().unwrap().push(i),
                        Err(_) => client = None,
                    }
                }
            });
        }
    });
    let mut v = accepted.into_inner().unwrap();
    v.sort_unstable();
    v
}

struct Counts {
    local_extra: usize,
    smtp_extra: usize,
}

impl Counts {
    /// No local copy twice; an SMTP copy repeated only for a transaction in flight at one of
    /// `smtp_kills` kills of the smtp agent: one per connection, and it keeps at most
    /// destination_concurrency (2) to the sink.
    fn assert_within(&self, smtp_kills: usize) {
        assert_eq!(self.local_extra, 0, "local recipients got a message twice");
        assert!(
            self.smtp_extra <= 2 * smtp_kills,
            "{} extra SMTP copies for {smtp_kills} kills of the smtp agent",
            self.smtp_extra
        );
    }
}

/// Checks that every acknowledged message arrived, and counts the extra copies.
fn tally(inst: &Instance, sink: &Sink, accepted: &[usize]) -> Counts {
    let local = copies(&[
        inst.maildir("alice").join("new"),
        inst.maildir("alice").join("cur"),
    ]);
    let remote = copies(std::slice::from_ref(&sink.dir));
    let (mut local_extra, mut smtp_extra) = (0, 0);
    for &i in accepted {
        let (map, extra) = if i.is_multiple_of(2) {
            (&local, &mut local_extra)
        } else {
            (&remote, &mut smtp_extra)
        };
        let got = map.get(&i).copied().unwrap_or(0);
        assert!(got >= 1, "acknowledged message {i} was lost");
        *extra += got - 1;
    }
    Counts {
        local_extra,
        smtp_extra,
    }
}

fn storm_instance(sink_port: u16) -> Instance {
    relay_instance(
        &[("sink.test", sink_port)],
        "[queues.local]\nworkers = 2\n[queues.smtp]\nworkers = 1\n\
         [outgoing]\ndestination_concurrency = 2\nmin_backoff = 1\nmax_backoff = 2\n",
    )
}

fn wait_drained(inst: &Instance, sink: &Sink, accepted: &[usize]) {
    let want_local = accepted.iter().filter(|i| *i % 2 == 0).count();
    let want_remote = accepted.len() - want_local;
    wait_for(
        "every acknowledged message delivered",
        Duration::from_secs(180),
        || {
            let local = copies(&[
                inst.maildir("alice").join("new"),
                inst.maildir("alice").join("cur"),
            ]);
            let remote = copies(std::slice::from_ref(&sink.dir));
            local.len() >= want_local && remote.len() >= want_remote && inst.queue_json().is_empty()
        },
    );
}

/// Waits until every acknowledged message arrived, then counts the copies and says so.
fn drain_and_tally(inst: &Instance, sink: &Sink, accepted: &[usize], what: &str) -> Counts {
    wait_drained(inst, sink, accepted);
    let c = tally(inst, sink, accepted);
    eprintln!(
        "{what}: accepted {}, extra local copies {}, extra smtp copies {}",
        accepted.len(),
        c.local_extra,
        c.smtp_extra
    );
    c
}

/// Kills `role` unless it was killed four times already (the supervisor's restart backoff
/// doubles each time), counting the kills.
fn kill_counted(inst: &Instance, role: &'static str, kills: &mut HashMap<&'static str, usize>) {
    if kills.get(role).copied().unwrap_or(0) < 4 && kill_role(inst, role) > 0 {
        *kills.entry(role).or_insert(0) += 1;
    }
}

#[test]
fn killed_roles_repeat_no_local_delivery() {
    let port = free_port();
    let mut inst = storm_instance(port);
    let sink = Sink::start(&inst, "storm", "127.0.0.1", port, &[]);
    inst.start();
    let done = AtomicBool::new(false);
    let roles = ["deliver --queue local", "deliver --queue smtp", "router"];
    let mut kills = HashMap::new();
    let accepted = std::thread::scope(|s| {
        let sender = s.spawn(|| {
            let mut all = Vec::new();
            // Rounds of sending, so the storm lasts while mail flows.
            for round in 0..6 {
                all.extend(send_all(inst.smtp_port, round * 400, 400, 16));
            }
            done.store(true, Ordering::SeqCst);
            all
        });
        // A mail reader at work: what arrives is moved to cur/ and flagged seen, so a
        // delivery made again would show as a second copy instead of replacing the first.
        s.spawn(|| {
            let (new, cur) = (
                inst.maildir("alice").join("new"),
                inst.maildir("alice").join("cur"),
            );
            while !done.load(Ordering::SeqCst) {
                for e in std::fs::read_dir(&new).into_iter().flatten().flatten() {
                    let to = cur.join(format!("{}:2,S", e.file_name().to_string_lossy()));
                    let _ = std::fs::rename(e.path(), to);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let mut k = 0;
        while !done.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(150));
            kill_counted(&inst, roles[k % roles.len()], &mut kills);
            k += 1;
        }
        sender.join().unwrap()
    });
    let total: usize = kills.values().sum();
    eprintln!("kills: {kills:?}");
    assert!(
        total >= 6,
        "the storm killed too little to show anything: {kills:?}"
    );
    wait_drained(&inst, &sink, &accepted);
    let c = tally(&inst, &sink, &accepted);
    let found = inst.log().matches("found in the mailbox").count();
    eprintln!(
        "accepted {}, extra local copies {}, extra smtp copies {}, deliveries found made after a kill {found}",
        accepted.len(),
        c.local_extra,
        c.smtp_extra
    );
    let smtp_kills = kills.get("deliver --queue smtp").copied().unwrap_or(0);
    c.assert_within(smtp_kills);
}

/// Remote mail waits while its host is down: each job moves to `deferred/smtp/` at its first
/// deferral and is rewritten there at every retry (one a second here), while the smtp agent
/// and the router are killed. Once the host is back, every acknowledged message arrives,
/// an SMTP copy is repeated at most for a transaction on the wire at a kill, and nothing is
/// left waiting.
#[test]
fn mail_deferred_while_roles_are_killed_arrives_once_its_host_is_back() {
    let port = free_port();
    let mut inst = storm_instance(port);
    inst.start();
    let roles = ["deliver --queue smtp", "router", "deliver --queue local"];
    let mut kills = HashMap::new();
    let mut kill = |k: usize| kill_counted(&inst, roles[k % roles.len()], &mut kills);
    let done = AtomicBool::new(false);
    let mut k = 0;
    let accepted = std::thread::scope(|s| {
        let sender = s.spawn(|| {
            let v = send_all(inst.smtp_port, 0, 400, 16);
            done.store(true, Ordering::SeqCst);
            v
        });
        while !done.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(150));
            kill(k);
            k += 1;
        }
        sender.join().unwrap()
    });
    // Kills go on while the deferred mail is retried where it waits.
    wait_for(
        "remote mail waiting in deferred/",
        Duration::from_secs(60),
        || inst.files("deferred/smtp").len() >= 20,
    );
    // Each kill comes after the waiting mail was tried again since the one before.
    let deferrals = || inst.log().matches("status=deferred").count();
    for _ in 0..6 {
        let before = deferrals();
        wait_for(
            "a retry of the waiting mail",
            Duration::from_secs(30),
            || deferrals() > before,
        );
        kill(k);
        k += 1;
    }
    assert!(
        inst.files("queue/smtp").len() < inst.files("deferred/smtp").len(),
        "the waiting mail is out of the way of new mail"
    );
    let sink = Sink::start(&inst, "back", "127.0.0.1", port, &[]);
    let c = drain_and_tally(&inst, &sink, &accepted, &format!("kills {kills:?}"));
    assert!(
        kills.values().sum::<usize>() >= 6,
        "too few kills: {kills:?}"
    );
    c.assert_within(kills.get("deliver --queue smtp").copied().unwrap_or(0));
    assert!(inst.files("deferred/smtp").is_empty() && inst.files("queue/smtp").is_empty());
}

#[test]
fn whole_instance_kills_lose_nothing_and_repeat_no_local_delivery() {
    let port = free_port();
    let mut inst = storm_instance(port);
    let sink = Sink::start(&inst, "whole", "127.0.0.1", port, &[]);
    let mut accepted = Vec::new();
    let rounds = 5;
    for round in 0..rounds {
        inst.start();
        let started = Instant::now();
        let done = AtomicBool::new(false);
        let smtp_port = inst.smtp_port;
        std::thread::scope(|s| {
            let sender = s.spawn(|| {
                let v = send_all(smtp_port, round * 400, 400, 16);
                done.store(true, Ordering::SeqCst);
                v
            });
            // Kill while the mail of this round is in flight: part-way through the sending.
            wait_for("some mail accepted", Duration::from_secs(30), || {
                done.load(Ordering::SeqCst) || started.elapsed() > Duration::from_millis(1000)
            });
            inst.kill_all();
            accepted.extend(sender.join().unwrap());
        });
    }
    inst.start();
    let c = drain_and_tally(
        &inst,
        &sink,
        &accepted,
        &format!("{rounds} whole-instance kills"),
    );
    c.assert_within(rounds);
}

#[test]
fn a_killed_smtp_agent_repeats_only_the_transactions_in_flight() {
    let port = free_port();
    let mut inst = storm_instance(port);
    // Each DATA takes the sink a second: a batch takes many seconds, a transaction one.
    let sink = Sink::start(&inst, "slow", "127.0.0.1", port, &["-w", "1"]);
    inst.start();
    let accepted: Vec<usize> = send_all(inst.smtp_port, 0, 40, 8)
        .into_iter()
        .filter(|i| i % 2 == 1)
        .collect();
    // Transactions done, more to go: the moment a kill costs the most.
    wait_for("some messages at the sink", Duration::from_secs(60), || {
        copies(std::slice::from_ref(&sink.dir)).len() >= 6
    });
    assert_eq!(kill_role(&inst, "deliver --queue smtp"), 1);
    wait_drained(&inst, &sink, &accepted);
    let c = tally(&inst, &sink, &accepted);
    eprintln!(
        "one kill of the smtp agent: extra smtp copies {}",
        c.smtp_extra
    );
    // Two connections to the sink, so at most two transactions were in flight.
    c.assert_within(1);
}

/// Copies every file of `from` into `to` (both spool directories), keeping the modes.
fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let name = e.file_name();
        if !name.to_string_lossy().starts_with('.') {
            std::fs::copy(e.path(), to.join(&name)).unwrap();
        }
    }
}

#[test]
fn an_interrupted_attempt_finds_its_delivery_read_and_moved() {
    use std::os::unix::fs::PermissionsExt;
    // No local worker: the job waits in queue/local to be copied.
    let mut inst = Instance::new("", "[queues.local]\nworkers = 0\n");
    inst.start();
    let out = inst.sendmail(&["alice@example.test"], &message("once", "tok-7- only"));
    assert!(out.status.success());
    let spool = inst.spool();
    wait_for("the job in queue/local", Duration::from_secs(30), || {
        !inst.files("queue/local").is_empty()
    });
    inst.stop();
    let saved = inst.dir.join("saved");
    copy_dir(&spool.join("queue/local"), &saved.join("queue"));
    copy_dir(&spool.join("msg"), &saved.join("msg"));
    // Delivered once, then read: the mail reader moved it to cur/ with a flag.
    inst.edit_config("workers = 0", "workers = 1");
    inst.start();
    wait_for("the delivery", Duration::from_secs(30), || {
        inst.count_new("alice") == 1
    });
    wait_for("the queue empty", Duration::from_secs(30), || {
        inst.queue_json().is_empty()
    });
    inst.stop();
    let new = inst.maildir("alice").join("new");
    let name = std::fs::read_dir(&new)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .file_name();
    let cur = inst.maildir("alice").join("cur");
    std::fs::rename(
        new.join(&name),
        cur.join(format!("{}:2,S", name.to_string_lossy())),
    )
    .unwrap();
    // The state a worker killed after the delivery and before recording it leaves: the
    // job and its message in place, the job file with the attempt mark.
    for e in std::fs::read_dir(saved.join("queue")).unwrap().flatten() {
        let to = spool.join("queue/local").join(e.file_name());
        std::fs::copy(e.path(), &to).unwrap();
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o700)).unwrap();
    }
    for e in std::fs::read_dir(saved.join("msg")).unwrap().flatten() {
        std::fs::copy(e.path(), spool.join("msg").join(e.file_name())).unwrap();
    }
    inst.own();
    inst.start();
    wait_for("the job settled", Duration::from_secs(30), || {
        inst.queue_json().is_empty()
    });
    let copies = copies(&[new.clone(), cur.clone()]);
    assert_eq!(copies.get(&7), Some(&1), "the message was delivered again");
    assert!(
        inst.log().contains("found in the mailbox"),
        "the log does not say the delivery was found:\n{}",
        inst.log()
    );
}
