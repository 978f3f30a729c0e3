//! The direct route (`[scheduler] direct_routing`): smtpd files a message straight into its
//! output queue only when the router would pass it on unchanged; everything that asks more of
//! the router (an alias, two queues, tracked-sending fields) still goes through it.

mod common;
use common::*;
use std::time::Duration;

/// The role that logged `status=routed` for the recipient `to`.
fn router_of(inst: &Instance, to: &str) -> Option<String> {
    let needle = format!("to={to} ");
    inst.log()
        .lines()
        .find(|l| l.contains("status=routed") && l.contains(&needle))
        .and_then(|l| l.split("qms/").nth(1))
        .and_then(|l| l.split('[').next())
        .map(str::to_string)
}

fn routed_events(inst: &Instance) -> usize {
    let out = inst.qms(&["track", "--state", "routed", "--json"]);
    String::from_utf8_lossy(&out.stdout).lines().count()
}

#[test]
fn smtpd_files_plain_mail_itself_and_leaves_the_rest_to_the_router() {
    let port = free_port();
    let mut inst = relay_instance(&[("sink.test", port)], "");
    let sink = Sink::start(&inst, "direct", "127.0.0.1", port, &[]);
    std::fs::write(
        inst.dir.join("aliases"),
        "postmaster: alice\nteam: alice, bob\n",
    )
    .unwrap();
    inst.start();
    let send = |to: &[&str], head: &str| {
        let body = format!("{head}Subject: direct\r\n\r\nbody\r\n");
        smtp_send(inst.smtp_port, "a@remote.test", to, &body, "");
    };
    send(&["x1@sink.test"], "");
    send(&["alice@example.test"], "");
    send(&["team@example.test"], "");
    send(&["bob@example.test", "x2@sink.test"], "");
    // From a client that may not use them, the router removes tracked-sending fields.
    send(&["x3@sink.test"], "X-B-CrossRef: forged\r\n");
    wait_for("every delivery", Duration::from_secs(60), || {
        sink.messages().len() == 3
            && inst.count_new("alice") == 2
            && inst.count_new("bob") == 2
            && inst.queue_json().is_empty()
    });
    let smtpd = Some("smtpd".to_string());
    let router = Some("router".to_string());
    assert_eq!(router_of(&inst, "x1@sink.test"), smtpd, "{}", inst.log());
    assert_eq!(router_of(&inst, "alice@example.test"), smtpd);
    assert_eq!(router_of(&inst, "bob@example.test"), router, "two queues");
    assert_eq!(router_of(&inst, "x2@sink.test"), router, "two queues");
    assert_eq!(router_of(&inst, "x3@sink.test"), router, "an X-B- field");
    assert!(
        sink.messages().iter().all(|m| !m.contains("X-B-CrossRef")),
        "the router removed the field"
    );
    assert!(inst.log().contains("status=msp-removed"));
    // The alias went through the router, which expanded it.
    assert!(inst
        .log()
        .lines()
        .any(|l| l.contains("qms/router[") && l.contains("orig_to=team@example.test")));
    // A routed event for every recipient, whoever routed it: x1, alice, team's two, bob, x2, x3.
    wait_for("the routed events", Duration::from_secs(30), || {
        routed_events(&inst) == 7
    });
    // Nothing left behind in the message directory but files kept for reuse.
    assert!(inst.files("msg").iter().all(|f| f.starts_with(".free.")));

    // Switched off, the router routes everything.
    inst.edit_config("busy_retry = 1", "busy_retry = 1\ndirect_routing = false");
    inst.reload();
    let log_len = inst.log().len();
    wait_for("smtpd started again", Duration::from_secs(30), || {
        inst.log()[log_len..].contains("event=recycled process=smtpd")
    });
    send(&["x4@sink.test"], "");
    wait_for("x4 delivered", Duration::from_secs(60), || {
        sink.messages().len() == 4
    });
    assert_eq!(router_of(&inst, "x4@sink.test"), router);
}

/// One file per message: mail filed by smtpd straight into an output queue carries its
/// message in its job's own file (job format 2), through a deferral that rewrites the job,
/// and a delivered one leaves nothing of its text behind (issue #12).
#[test]
fn a_message_filed_by_smtpd_is_one_file_through_a_deferral() {
    let port = free_port();
    let mut inst = relay_instance(
        &[("sink.test", port)],
        "[outgoing]\nmin_backoff = 1\nmax_backoff = 2\n",
    );
    inst.start();
    // Nothing listens yet: both are deferred. One message fits the job's first read, one
    // does not.
    let big: String = (0..3000)
        .map(|i| format!("line {i:05} of the long one\r\n"))
        .collect();
    smtp_send(
        inst.smtp_port,
        "a@remote.test",
        &["s@sink.test"],
        "Subject: small\r\n\r\nSMALL-END\r\n",
        "",
    );
    let long = format!("Subject: long\r\n\r\n{big}LONG-END\r\n");
    smtp_send(inst.smtp_port, "a@remote.test", &["l@sink.test"], &long, "");
    wait_for("both deferred", Duration::from_secs(30), || {
        let jobs = inst.queue_json();
        jobs.len() == 2
            && jobs
                .iter()
                .all(|j| j["recipients"][0]["state"] == "deferred")
    });
    // Deferred, they wait in deferred/smtp, out of the directory new mail passes through.
    let new: Vec<String> = inst.files("queue/smtp");
    assert!(new.iter().all(|n| !n.ends_with(".json")), "{new:?}");
    let queued = inst.files("deferred/smtp");
    assert_eq!(queued.len(), 2, "{queued:?}");
    for name in &queued {
        let (job, message) = read_job_file(&inst.spool().join("deferred/smtp").join(name));
        assert_eq!(job["version"], 2, "{job}");
        assert_eq!(job["body"], "", "no message file named");
        let message = String::from_utf8(message.expect("the message follows the job")).unwrap();
        assert!(message.starts_with("Received: "), "{message:.200}");
        assert!(message.ends_with("SMALL-END\r\n") || message.ends_with("LONG-END\r\n"));
        assert_eq!(job["size"], message.len(), "the size is the message's");
        let id = job["id"].as_str().unwrap();
        assert!(
            !inst.all_files("msg").iter().any(|f| f.starts_with(id)),
            "a message file"
        );
    }
    // `qms queue show` finds the message in the job's file.
    let id = inst.queue_json()[0]["id"].as_str().unwrap().to_string();
    let out = inst.qms(&["queue", "show", "--body", &id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("-END\n"));

    let sink = Sink::start(&inst, "one-file", "127.0.0.1", port, &[]);
    wait_for("both delivered", Duration::from_secs(60), || {
        sink.messages().len() == 2 && inst.queue_json().is_empty()
    });
    let got = sink.messages();
    assert!(got.iter().any(|m| m.contains("SMALL-END")));
    let l = got
        .iter()
        .find(|m| m.contains("LONG-END"))
        .expect("the long one");
    assert!(l.contains("line 02999 of the long one") && l.contains("line 00000 of"));
    // The files kept for reuse hold nothing of either message.
    wait_for("the reused files emptied", Duration::from_secs(30), || {
        ["queue/smtp", "deferred/smtp"].iter().all(|d| {
            inst.all_files(d).iter().all(|f| {
                std::fs::metadata(inst.spool().join(d).join(f)).map_or(true, |m| m.len() < 1000)
            })
        })
    });
}
