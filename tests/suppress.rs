//! The suppression list end to end: a hard bounce ("user unknown") and a complaint (an ARF
//! report read by dsnproc) put their recipients on it by themselves; tracked sending then
//! fails them at once, saying why, unless the message asks to ignore the list; `qms suppress`
//! lists, adds and removes entries; `qms track` shows each failure's reason.

mod common;
use common::*;
use std::time::Duration;

fn tracked(crossref: &str, to: &str, extra: &str) -> String {
    format!(
        "From: app@example.test\nTo: {to}\nMessage-ID: <{crossref}@example.test>\n\
X-B-CrossRef: {crossref}\n{extra}Subject: offer {crossref}\n\nbody\n"
    )
}

fn track(inst: &Instance, id: &str) -> String {
    String::from_utf8_lossy(&inst.qms(&["track", id]).stdout).into_owned()
}

fn list(inst: &Instance) -> String {
    String::from_utf8_lossy(&inst.qms(&["suppress", "list"]).stdout).into_owned()
}

#[test]
fn hard_bounces_and_complaints_are_not_sent_to_again() {
    let ok_port = free_port();
    let mut inst = relay_instance(
        &[("ok.test", ok_port)],
        "[tracking]\nenvelope_maildir = \"mail/bounces\"\n",
    );
    inst.edit_config(
        "[routes]\n",
        "[routes]\n\"gone@far.test\" = \"error:550 5.1.1 <gone@far.test>: user unknown\"\n",
    );
    inst.edit_config(
        "[mailboxes]\n",
        "[mailboxes]\n\"bounces@example.test\" = { maildir = \"mail/bounces\" }\n",
    );
    let ok = Sink::start(&inst, "ok", "127.0.0.1", ok_port, &[]);
    inst.start();

    // A hard bounce: the recipient goes on the list with its reason, by itself.
    let send = |m: String| assert!(inst.sendmail(&["-t"], m.as_bytes()).status.success());
    send(tracked("s-1", "gone@far.test", ""));
    wait_for("gone@far.test on the list", Duration::from_secs(30), || {
        list(&inst).contains("gone@far.test")
    });
    let l = list(&inst);
    assert!(
        l.contains("reason=\"user unknown\"") && l.contains("auto"),
        "{l}"
    );
    let t = track(&inst, "s-1");
    assert!(
        t.contains("reason=\"user unknown\""),
        "the failure's reason: {t}"
    );

    // Tracked sending fails it at once, saying why.
    send(tracked("s-2", "gone@far.test", ""));
    wait_for("s-2 suppressed", Duration::from_secs(30), || {
        track(&inst, "s-2").contains("suppressed")
    });
    let t = track(&inst, "s-2");
    assert!(
        t.contains("-> failed") && t.contains("reason=\"user unknown\""),
        "{t}"
    );
    assert!(inst
        .log()
        .contains("status=suppressed (5.7.1 not sent: <gone@far.test> is on the suppression list"));

    // The sender may override per message: then it is routed (and fails) as before.
    send(tracked(
        "s-3",
        "gone@far.test",
        "BX-Sending-Run-Control: ignore-suppression\n",
    ));
    wait_for("s-3 routed", Duration::from_secs(30), || {
        track(&inst, "s-3").contains("failed")
    });
    assert!(
        !track(&inst, "s-3").contains("suppressed"),
        "{}",
        track(&inst, "s-3")
    );

    // By hand: remove, add with a reason of one's own.
    assert!(inst
        .qms(&["suppress", "remove", "gone@far.test"])
        .status
        .success());
    assert!(!inst
        .qms(&["suppress", "remove", "gone@far.test"])
        .status
        .success());
    assert!(inst
        .qms(&[
            "suppress",
            "add",
            "Quiet@OK.test",
            "--reason",
            "asked to stop"
        ])
        .status
        .success());
    let l = list(&inst);
    assert!(
        !l.contains("gone@far.test") && l.contains("quiet@ok.test"),
        "{l}"
    );
    send(tracked("s-4", "quiet@ok.test, b@ok.test", ""));
    wait_for("b@ok.test delivered", Duration::from_secs(30), || {
        ok.messages().iter().any(|m| m.contains("offer s-4"))
    });
    wait_for("s-4 quiet suppressed", Duration::from_secs(30), || {
        track(&inst, "s-4").contains("suppressed")
    });
    let sent = ok.messages();
    let s4 = sent.iter().find(|m| m.contains("offer s-4")).unwrap();
    assert!(!s4.contains("X-Rcpt-Args: <quiet@ok.test>"), "{s4}");
    assert!(track(&inst, "s-4").contains("reason=\"asked to stop\""));

    // A complaint about s-5, read by dsnproc, suppresses its complainant.
    send(tracked("s-5", "carl@ok.test", ""));
    wait_for("s-5 delivered", Duration::from_secs(30), || {
        ok.messages().iter().any(|m| m.contains("offer s-5"))
    });
    let arf = |who: &str| {
        format!(
            "From: fbl@isp.test\nTo: bounces@example.test\nSubject: complaint\nMIME-Version: 1.0\n\
Content-Type: multipart/report; report-type=feedback-report; boundary=\"F\"\n\n--F\nContent-Type: text/plain\n\n\
A complaint.\n\n--F\nContent-Type: message/feedback-report\n\nFeedback-Type: abuse\nUser-Agent: FBL/1\nVersion: 1\n\
Original-Rcpt-To: <{who}>\n\n--F\nContent-Type: message/rfc822\n\nFrom: app@example.test\nTo: {who}\n\
Message-ID: <s-5@example.test>\nSubject: offer s-5\n\nbody\n--F--\n"
        )
    };
    let drop = |name: &str, text: String| {
        let tmp = inst.maildir("bounces").join("tmp").join(name);
        std::fs::create_dir_all(tmp.parent().unwrap()).unwrap();
        std::fs::create_dir_all(inst.maildir("bounces").join("new")).unwrap();
        std::fs::write(&tmp, text).unwrap();
        inst.own();
        std::fs::rename(&tmp, inst.maildir("bounces").join("new").join(name)).unwrap();
    };
    // A forged complaint about s-5 naming someone it was never sent to suppresses no one.
    drop("forged", arf("boss@ok.test"));
    drop("arf", arf("carl@ok.test"));
    wait_for("carl@ok.test on the list", Duration::from_secs(60), || {
        list(&inst).contains("carl@ok.test")
    });
    // Its event is stored in the transaction that would have suppressed it.
    wait_for(
        "the forged complaint recorded",
        Duration::from_secs(30),
        || track(&inst, "s-5").contains("boss@ok.test"),
    );
    assert!(!list(&inst).contains("boss@ok.test"), "{}", list(&inst));
    assert!(
        list(&inst).contains("reason=\"complaint\""),
        "{}",
        list(&inst)
    );
    assert!(
        track(&inst, "s-5").contains("complained"),
        "{}",
        track(&inst, "s-5")
    );
}
