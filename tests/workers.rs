//! Several workers on one queue, workers killed mid-job, and the queue tools acting while
//! workers run.

mod common;
use common::*;
use std::collections::HashSet;
use std::time::Duration;

#[test]
fn two_workers_never_deliver_a_job_twice() {
    let mut inst = Instance::new("", "[queues.local]\nworkers = 2\n");
    inst.start();
    let n = 200;
    send_many(&inst, n, 4, |i| {
        (
            "alice@example.test".into(),
            message(&format!("m{i}"), &format!("token-{i}")),
        )
    });
    wait_for("all delivered", Duration::from_secs(60), || {
        inst.count_new("alice") >= n
    });
    wait_for("queues empty", Duration::from_secs(30), || {
        inst.queue_json().is_empty()
    });
    let msgs = inst.read_maildir("alice");
    assert_eq!(
        msgs.len(),
        n,
        "messages delivered more or fewer times than sent"
    );
    let tokens: HashSet<String> = msgs
        .iter()
        .filter_map(|m| m.split("token-").nth(1).map(|t| t.trim().to_string()))
        .collect();
    assert_eq!(tokens.len(), n);
    let log = inst.log();
    let pids: HashSet<&str> = log
        .lines()
        .filter(|l| l.contains("deliver/local[") && l.contains("status=sent"))
        .filter_map(|l| l.split("deliver/local[").nth(1)?.split(']').next())
        .collect();
    eprintln!("deliveries made by {} worker processes", pids.len());
}

fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit(')')
        .next()?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn cmdline(pid: i32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

#[test]
fn a_killed_worker_releases_its_job_to_another() {
    let mut inst = Instance::new(
        "",
        "[queues.pipe]\nworkers = 2\n[routes]\n\"slow.test\" = \"pipe:SCRIPT\"\n",
    );
    let dir = inst.dir.clone();
    let script = inst.script(
        "slow.sh",
        &format!(
            "d={}\nif [ ! -e $d/started ]; then echo $$ > $d/started; exec sleep 120; fi\ncat > $d/delivered.$$\n",
            dir.display()
        ),
    );
    inst.edit_config("SCRIPT", &script.display().to_string());
    inst.start();
    let out = inst.sendmail(&["someone@slow.test"], &message("slow", "the-slow-one"));
    assert!(out.status.success());
    wait_for(
        "the first attempt to start",
        Duration::from_secs(30),
        || dir.join("started").exists(),
    );
    let sleeper: i32 = std::fs::read_to_string(dir.join("started"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // Walk up from the hung program to the worker that runs it (as root a forked child of
    // the worker, with the same command line, sits in between).
    let mut worker = parent_of(sleeper).unwrap();
    while !cmdline(worker).contains("deliver") {
        worker = parent_of(worker).expect("a deliver worker above the program");
    }
    while let Some(p) = parent_of(worker).filter(|p| cmdline(*p).contains("deliver")) {
        worker = p;
    }
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    kill(Pid::from_raw(worker), Signal::SIGKILL).unwrap();
    kill(Pid::from_raw(sleeper), Signal::SIGKILL).unwrap();
    let delivered = || {
        std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("delivered."))
            .count()
    };
    wait_for(
        "another worker to deliver the job",
        Duration::from_secs(60),
        || delivered() >= 1,
    );
    wait_for("queues empty", Duration::from_secs(30), || {
        inst.queue_json().is_empty()
    });
    assert_eq!(delivered(), 1);
    assert!(
        inst.log().contains("event=died process=deliver/pipe"),
        "{}",
        inst.log()
    );
}

#[test]
fn queue_tools_act_while_workers_run() {
    let mut inst = Instance::new(
        "",
        "[routes]\n\"later.test\" = \"pipe:SCRIPT\"\n[outgoing]\nmin_backoff = 3600\nmax_backoff = 3600\n",
    );
    let dir = inst.dir.clone();
    let script = inst.script(
        "later.sh",
        &format!(
            "if [ -e {0}/ok ]; then cat > {0}/got.$$; exit 0; fi\necho 'not now' >&2\nexit 75",
            dir.display()
        ),
    );
    inst.edit_config("SCRIPT", &script.display().to_string());
    inst.start();
    for who in ["a@later.test", "b@later.test"] {
        assert!(inst
            .sendmail(&[who], &message("later", who))
            .status
            .success());
    }
    wait_for("both deferred", Duration::from_secs(30), || {
        let q = inst.queue_json();
        q.len() == 2 && q.iter().all(|j| j["recipients"][0]["state"] == "deferred")
    });
    let q = inst.queue_json();
    let reply = q[0]["recipients"][0]["reply"].as_str().unwrap();
    assert!(reply.contains("exit 75"), "{reply}");
    let id_of = |who: &str| -> String {
        inst.queue_json()
            .iter()
            .find(|j| j["recipients"][0]["address"] == who)
            .unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let (a, b) = (id_of("a@later.test"), id_of("b@later.test"));

    let out = inst.qms(&["queue", "hold", &a]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(inst.files("hold/pipe"), vec![format!("{a}.json")]);
    assert!(inst
        .queue_json()
        .iter()
        .any(|j| j["id"] == a.as_str() && j["held"] == true));

    // Issue #14: retry on a held message says so; an unknown --queue is an error, not
    // "Mail queue is empty"; postqueue -j's fields are there for its scripts.
    let out = inst.qms(&["queue", "retry", &a]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success() && err.contains("on hold"), "{err}");
    let out = inst.qms(&["queue", "list", "--queue", "nosuch"]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success() && err.contains("no queue \"nosuch\""),
        "{err}"
    );
    let listed = inst.queue_json();
    let held = listed.iter().find(|j| j["id"] == a.as_str()).unwrap();
    assert_eq!(held["queue_name"], "hold");
    assert_eq!(held["queue_id"], a.as_str());
    assert!(held["arrival_time"].is_i64() && held["message_size"].is_u64());
    let other = listed.iter().find(|j| j["id"] == b.as_str()).unwrap();
    assert_eq!(other["queue_name"], "deferred");
    assert!(other["recipients"][0]["delay_reason"]
        .as_str()
        .is_some_and(|r| r.contains("exit 75")));

    // queue shape: by recipient or sender domain, parents, and what it leaves out.
    let shape = |args: &[&str]| {
        let mut all = vec!["queue", "shape"];
        all.extend_from_slice(args);
        String::from_utf8_lossy(&inst.qms(&all).stdout).into_owned()
    };
    let by_rcpt = shape(&[]);
    assert!(
        by_rcpt
            .lines()
            .any(|l| l.starts_with("later.test ") && l.split_whitespace().nth(1) == Some("1"))
            && by_rcpt.contains("(1 held)"),
        "{by_rcpt}"
    );
    let by_sender = shape(&["-s", "-p"]);
    assert!(
        by_sender.lines().any(|l| l.starts_with("example.test "))
            && by_sender.lines().any(|l| l.starts_with(".test ")),
        "{by_sender}"
    );

    let out = inst.qms(&["queue", "release", &a]);
    assert!(out.status.success());
    assert!(inst.files("hold/pipe").is_empty());

    let out = inst.qms(&["queue", "delete", &b]);
    assert!(out.status.success());
    assert!(inst.queue_json().iter().all(|j| j["id"] != b.as_str()));
    assert!(
        !inst.files("msg").iter().any(|f| f.starts_with(&b)),
        "deleted job left its message file"
    );

    std::fs::write(dir.join("ok"), "").unwrap();
    let out = inst.qms(&["queue", "retry", &a]);
    assert!(out.status.success());
    wait_for(
        "the retried job to be delivered",
        Duration::from_secs(30),
        || inst.queue_json().is_empty(),
    );
    let got: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("got."))
        .collect();
    assert_eq!(got.len(), 1);
    assert!(std::fs::read_to_string(got[0].path())
        .unwrap()
        .contains("a@later.test"));
}

#[test]
fn a_corrupt_job_is_moved_aside_and_the_queue_flows() {
    let mut inst = Instance::new("", "");
    inst.start();
    let bad = inst.spool().join("queue/local/1M0000000000ZZZZ.json");
    let tmp = inst.spool().join("bad.tmp");
    std::fs::write(&tmp, b"{ this is not a job").unwrap();
    inst.own();
    std::fs::rename(&tmp, &bad).unwrap();
    assert!(inst
        .sendmail(&["alice@example.test"], &message("after", "good one"))
        .status
        .success());
    wait_for("the good message", Duration::from_secs(30), || {
        inst.count_new("alice") == 1
    });
    wait_for(
        "the bad job moved to corrupt/",
        Duration::from_secs(30),
        || inst.files("corrupt/local") == vec!["1M0000000000ZZZZ.json".to_string()],
    );
    assert!(!bad.exists());
    assert!(inst.log().contains("status=corrupt"), "{}", inst.log());
}

#[test]
fn sighup_scales_workers_without_losing_or_doubling_jobs() {
    let mut inst = Instance::new("", "[queues.local]\nworkers = 1\n");
    inst.start();
    let n = 120;
    let status_count = |inst: &Instance| -> usize {
        let out = inst.qms(&["status"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with("deliver/local#") && !l.contains("restarting"))
            .count()
    };
    assert_eq!(status_count(&inst), 1);
    std::thread::scope(|s| {
        let inst = &inst;
        s.spawn(move || {
            send_many(inst, n, 1, |i| {
                (
                    "alice@example.test".into(),
                    message(&format!("h{i}"), &format!("tok-{i}-")),
                )
            })
        });
        // Mid-flow: three local workers instead of one.
        wait_for("some deliveries", Duration::from_secs(30), || {
            inst.count_new("alice") >= 10
        });
        inst.edit_config("[queues.local]\nworkers = 1", "[queues.local]\nworkers = 3");
        inst.reload();
        wait_for("three local workers", Duration::from_secs(30), || {
            status_count(inst) == 3
        });
    });
    wait_for("all delivered", Duration::from_secs(60), || {
        inst.count_new("alice") >= n
    });
    wait_for("queues empty", Duration::from_secs(30), || {
        inst.queue_json().is_empty()
    });
    let msgs = inst.read_maildir("alice");
    assert_eq!(msgs.len(), n, "a job was lost or delivered twice");
    assert_each_once(&msgs, n);
    assert!(inst.log().contains("event=reload"));
    // `qms stop` ends the instance.
    let out = inst.qms(&["stop"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = inst.qms(&["status"]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Issue #14.4: a listener added before a reload cannot be bound by a supervisor that is no
/// longer root; the reload says so, naming it, instead of leaving it silently unbound.
#[test]
fn a_listener_added_at_reload_is_named_as_needing_a_restart() {
    let mut inst = Instance::new("", "");
    inst.start();
    let port = free_port();
    inst.edit_config(
        "[submission]\nlisten = [",
        &format!("[submissions]\nlisten = [\"127.0.0.1:{port}\"]\n[submission]\nlisten = ["),
    );
    inst.edit_config(
        "[submissions]\n",
        "[tls]\ncert = \"cert.pem\"\nkey = \"key.pem\"\n[submissions]\n",
    );
    make_cert(&inst.dir, "mx.example.test");
    inst.own();
    inst.reload();
    wait_for("the reload", Duration::from_secs(30), || {
        inst.log().contains("event=reload")
    });
    let log = inst.log();
    assert!(
        log.contains(&format!("+127.0.0.1:{port} (submissions)")) && log.contains("restarted"),
        "{log}"
    );
}

/// Issue #14.7: a route names its queue, the queue gets workers of its own that receive
/// exactly the mail routed there, SIGHUP scales them, and a queue no route names (or a route
/// naming a queue that is not defined) is a configuration error.
#[test]
fn named_queues_receive_their_routes_mail() {
    let (bulk_port, other_port) = (free_port(), free_port());
    let mut inst = relay_instance(
        &[("other.test", other_port)],
        "[queues.bulk]\nworkers = 2\nrecipient_limit = 1\nmin_backoff = \"1h\"\n[queues.lists]\nworkers = 1\n",
    );
    inst.edit_config(
        "[routes]\n",
        &format!(
            "[routes]\n\"bulk.test\" = \"smtp:[127.0.0.1]:{bulk_port}@bulk\"\n\"lists.test\" = \"pipe:cat >/dev/null@lists\"\n"
        ),
    );
    inst.edit_config(
        "relay = [\"other.test\"]",
        "relay = [\"other.test\", \"bulk.test\", \"lists.test\"]",
    );
    let bulk = Sink::start(&inst, "bulk", "127.0.0.1", bulk_port, &[]);
    let other = Sink::start(&inst, "other", "127.0.0.1", other_port, &[]);
    inst.start();
    let count = |name: &str| -> usize {
        String::from_utf8_lossy(&inst.qms(&["status"]).stdout)
            .lines()
            .filter(|l| l.starts_with(&format!("deliver/{name}#")) && !l.contains("restarting"))
            .count()
    };
    wait_for(
        "the bulk and lists workers",
        Duration::from_secs(30),
        || count("bulk") == 2 && count("lists") == 1,
    );
    for i in 0..10 {
        let to = match i % 3 {
            0 => "x@bulk.test",
            1 => "y@other.test",
            _ => "z@lists.test",
        };
        let out = inst.sendmail(&[to], format!("Subject: n{i}\n\nbody\n").as_bytes());
        assert!(out.status.success());
    }
    wait_for("every message delivered", Duration::from_secs(60), || {
        bulk.messages().len() == 4 && other.messages().len() == 3 && inst.queue_json().is_empty()
    });
    // The queue's own recipient_limit: three recipients, three transactions.
    let out = inst.sendmail(
        &["p@bulk.test", "q@bulk.test", "r@bulk.test"],
        b"Subject: three\n\nx\n",
    );
    assert!(out.status.success());
    wait_for("three transactions", Duration::from_secs(30), || {
        bulk.messages()
            .iter()
            .filter(|m| m.contains("Subject: three"))
            .count()
            == 3
    });
    let log = inst.log();
    let sent_by = |who: &str, to: &str| {
        log.lines()
            .filter(|l| {
                l.contains(&format!("qms/deliver/{who}["))
                    && l.contains(&format!(" to={to} "))
                    && l.contains("status=sent")
            })
            .count()
    };
    assert_eq!(sent_by("bulk", "x@bulk.test"), 4, "{log}");
    assert_eq!(sent_by("smtp", "x@bulk.test"), 0);
    assert_eq!(sent_by("smtp", "y@other.test"), 3);
    assert_eq!(sent_by("lists", "z@lists.test"), 3);
    assert!(
        log.contains("queue=bulk"),
        "the router names the queue: {log}"
    );
    // SIGHUP scales the named queue.
    inst.edit_config("[queues.bulk]\nworkers = 2", "[queues.bulk]\nworkers = 3");
    inst.reload();
    wait_for("three bulk workers", Duration::from_secs(30), || {
        count("bulk") == 3
    });
    // Privileges follow the agent, not the name: the smtp agent of a named queue may not
    // change user; the local agent of a named pipe queue keeps that right.
    if is_root() {
        let permitted = |queue: &str| -> Vec<u64> {
            let out = std::process::Command::new("pgrep")
                .args([
                    "-f",
                    &format!("{} deliver --queue {queue}", inst.config.display()),
                ])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
                .filter_map(|st| {
                    st.lines()
                        .find_map(|l| l.strip_prefix("CapPrm:"))
                        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
                })
                .collect()
        };
        // The reload recycles every worker: wait for both kinds to be back.
        wait_for(
            "the workers after the reload",
            Duration::from_secs(30),
            || permitted("bulk").len() == 3 && permitted("lists").len() == 1,
        );
        let (bulk, lists) = (permitted("bulk"), permitted("lists"));
        assert!(
            !bulk.is_empty() && bulk.iter().all(|c| *c == 0),
            "bulk: {bulk:x?}"
        );
        assert!(
            !lists.is_empty() && lists.iter().all(|c| *c != 0),
            "lists: {lists:x?}"
        );
    }
    // Mistakes check-config names.
    inst.edit_config(
        "[queues.lists]\n",
        "[queues.orphan]\nworkers = 1\n[queues.lists]\n",
    );
    let out = inst.qms(&["check-config"]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success() && err.contains("queues.orphan"),
        "{err}"
    );
    inst.edit_config("[queues.orphan]\nworkers = 1\n", "");
    inst.edit_config("pipe:cat >/dev/null@lists", "pipe:cat >/dev/null@nosuch");
    let out = inst.qms(&["check-config"]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success() && err.contains("lists.test") && err.contains("\"nosuch\""),
        "{err}"
    );
}

/// Issue #14: `qms queue requeue` (postsuper -r) routes waiting mail again with the config in
/// force: mail deferred at a dead next hop goes to the new route and its named queue.
#[test]
fn requeue_routes_waiting_mail_again_after_a_config_change() {
    let (dead_port, live_port) = (free_port(), free_port());
    let mut inst = relay_instance(
        &[("moved.test", dead_port)],
        "[outgoing]\nmin_backoff = \"1h\"\nmax_backoff = \"1h\"\n[queues.fresh]\nworkers = 1\n\
         [log]\ntarget = \"./mail.log\"\n",
    );
    // The queue command logs where the daemon does: here a file both write.
    let log_of =
        |inst: &Instance| std::fs::read_to_string(inst.dir.join("mail.log")).unwrap_or_default();
    inst.edit_config(
        "[routes]\n",
        &format!("[routes]\n\"unused.test\" = \"smtp:[127.0.0.1]:{live_port}@fresh\"\n"),
    );
    let live = Sink::start(&inst, "live", "127.0.0.1", live_port, &[]);
    inst.start();
    for i in 0..3 {
        let out = inst.sendmail(
            &["x@moved.test"],
            format!("Subject: r{i}\n\nbody\n").as_bytes(),
        );
        assert!(out.status.success());
    }
    wait_for("three deferred", Duration::from_secs(30), || {
        let q = inst.queue_json();
        q.len() == 3 && q.iter().all(|j| j["recipients"][0]["state"] == "deferred")
    });
    let old: Vec<String> = inst
        .queue_json()
        .iter()
        .map(|j| j["id"].as_str().unwrap().to_string())
        .collect();
    inst.edit_config(
        &format!("\"moved.test\" = \"smtp:[127.0.0.1]:{dead_port}\""),
        &format!("\"moved.test\" = \"smtp:[127.0.0.1]:{live_port}@fresh\""),
    );
    inst.reload();
    // Requeue is for after the router has read the new config, as with Postfix.
    wait_for(
        "a router with the new config",
        Duration::from_secs(30),
        || {
            let log = log_of(&inst);
            log.split("event=reload")
                .nth(1)
                .is_some_and(|after| after.contains("event=spawn process=router"))
        },
    );
    // One by id, the rest with --all of the queue they wait in.
    let out = inst.qms(&["queue", "requeue", &old[0]]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 message(s) requeued"));
    let out = inst.qms(&["queue", "requeue", "--all", "--queue", "smtp"]);
    assert!(out.status.success(), "{out:?}");
    wait_for(
        "the three at the new route",
        Duration::from_secs(60),
        || live.messages().len() == 3 && inst.queue_json().is_empty(),
    );
    let log = log_of(&inst);
    for id in &old {
        assert!(
            log.contains(&format!("qid={id} queue=smtp status=requeued new_qid=")),
            "{id} requeued in the log: {log}"
        );
    }
    assert_eq!(
        log.lines()
            .filter(|l| l.contains("qms/deliver/fresh[") && l.contains("status=sent"))
            .count(),
        3,
        "delivered by the new route's queue: {log}"
    );
    let out = inst.qms(&["queue", "requeue", &old[0]]);
    assert!(!out.status.success(), "a job requeued already is gone");
}
