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
