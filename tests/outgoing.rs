//! Outgoing SMTP delivery against real peers: Postfix's smtp-sink as the receiving server
//! and dnsmasq on a loopback port serving MX, A and null-MX records.

mod common;
use common::*;
use std::time::Duration;

#[test]
fn all_recipients_in_one_connection_with_dsn_parameters() {
    let sink_port = free_port();
    let mut inst = relay_instance(&[("sink.test", sink_port)], "");
    let sink = Sink::start(&inst, "a", "127.0.0.1", sink_port, &[]);
    inst.start();
    let rcpts = [
        "a@sink.test",
        "b@sink.test",
        "c@sink.test",
        "d@sink.test",
        "e@sink.test",
    ];
    smtp_send(
        inst.smtp_port,
        "alice@example.test",
        &rcpts,
        "Subject: five\r\n\r\nto five\r\n",
        "NOTIFY=SUCCESS,FAILURE RET=HDRS ENVID=env42",
    );
    wait_for("the message at the sink", Duration::from_secs(30), || {
        !sink.messages().is_empty()
    });
    wait_for("the queue to empty", Duration::from_secs(30), || {
        inst.queue_json().is_empty()
    });
    let msgs = sink.messages();
    assert_eq!(msgs.len(), 1, "one transaction carries all five: {msgs:?}");
    let m = &msgs[0];
    assert_eq!(m.matches("X-Rcpt-Args:").count(), 5, "{m}");
    assert!(
        m.contains("NOTIFY=SUCCESS,FAILURE"),
        "DSN parameters passed on: {m}"
    );
    assert!(m.contains("RET=HDRS") && m.contains("ENVID=env42"), "{m}");
    let log = std::fs::read_to_string(inst.dir.join("sink-a.log")).unwrap();
    // One session: one EHLO (the harness's readiness probe connects but says nothing).
    assert_eq!(log.matches("EHLO").count(), 1, "{log}");
    let qlog = inst.log();
    assert_eq!(qlog.matches("status=sent").count(), 5, "{qlog}");
    assert!(
        qlog.contains(&format!("relay=127.0.0.1[127.0.0.1]:{sink_port}"))
            && qlog.contains("delays="),
        "{qlog}"
    );
}

#[test]
fn replies_per_recipient_at_rcpt_and_after_data() {
    let ports: Vec<u16> = (0..5).map(|_| free_port()).collect();
    let mut inst = relay_instance(
        &[
            ("ok.test", ports[0]),
            ("soft.test", ports[1]),
            ("hard.test", ports[2]),
            ("softdata.test", ports[3]),
            ("harddata.test", ports[4]),
        ],
        "[outgoing]\nmin_backoff = 3600\nmax_backoff = 3600\n",
    );
    let _s0 = Sink::start(&inst, "ok", "127.0.0.1", ports[0], &[]);
    let _s1 = Sink::start(&inst, "soft", "127.0.0.1", ports[1], &["-r", "RCPT"]);
    let _s2 = Sink::start(&inst, "hard", "127.0.0.1", ports[2], &["-f", "RCPT"]);
    let _s3 = Sink::start(&inst, "softdata", "127.0.0.1", ports[3], &["-r", "."]);
    let _s4 = Sink::start(&inst, "harddata", "127.0.0.1", ports[4], &["-f", "."]);
    inst.start();
    smtp_send(
        inst.smtp_port,
        "alice@example.test",
        &[
            "x@ok.test",
            "x@soft.test",
            "x@hard.test",
            "x@softdata.test",
            "x@harddata.test",
        ],
        "Subject: mixed\r\n\r\nmixed\r\n",
        "",
    );
    wait_for(
        "the bounce for the two hard failures",
        Duration::from_secs(30),
        || {
            inst.read_maildir("alice")
                .iter()
                .any(|m| m.contains("x@hard.test") && m.contains("x@harddata.test"))
        },
    );
    let bounce = inst
        .read_maildir("alice")
        .into_iter()
        .find(|m| m.contains("Undelivered Mail"))
        .unwrap();
    assert_eq!(bounce.matches("Action: failed").count(), 2, "{bounce}");
    assert!(
        bounce.contains("Diagnostic-Code: smtp; 500 5.3.0"),
        "{bounce}"
    );
    assert!(!bounce.contains("x@soft.test"), "{bounce}");
    wait_for("the deferrals", Duration::from_secs(30), || {
        inst.queue_json()
            .first()
            .is_some_and(|j| j["recipients"].as_array().unwrap().len() == 2)
    });
    let q = inst.queue_json();
    let rcpts = q[0]["recipients"].as_array().unwrap();
    for r in rcpts {
        assert_eq!(r["state"], "deferred");
        assert!(r["reply"].as_str().unwrap().starts_with("450 4.3.0"), "{r}");
    }
    let addrs: Vec<&str> = rcpts
        .iter()
        .map(|r| r["address"].as_str().unwrap())
        .collect();
    assert!(addrs.contains(&"x@soft.test") && addrs.contains(&"x@softdata.test"));
    assert!(inst.log().contains("to=x@ok.test") && inst.log().contains("status=sent"));

    // `qms track` tells the whole story, per recipient.
    let qid = q[0]["id"].as_str().unwrap().to_string();
    let events = |inst: &Instance| -> Vec<serde_json::Value> {
        let out = inst.qms(&["track", &qid, "--json"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    };
    let has = |evs: &[serde_json::Value], rcpt: &str, ev: &str| {
        evs.iter()
            .any(|e| e["recipient"] == rcpt && e["event"] == ev)
    };
    wait_for(
        "the tracker to record the bounce",
        Duration::from_secs(30),
        || {
            let evs = events(&inst);
            has(&evs, "x@hard.test", "bounce-sent") && has(&evs, "x@harddata.test", "bounce-sent")
        },
    );
    let evs = events(&inst);
    for ev in ["received", "routed", "relayed"] {
        assert!(has(&evs, "x@ok.test", ev), "no {ev} for x@ok.test: {evs:?}");
    }
    assert!(
        has(&evs, "x@hard.test", "failed")
            && has(&evs, "x@soft.test", "deferred")
            && has(&evs, "x@softdata.test", "deferred")
    );
    let relayed = evs
        .iter()
        .find(|e| e["recipient"] == "x@ok.test" && e["event"] == "relayed")
        .unwrap();
    assert!(
        relayed["relay"].as_str().unwrap().contains("127.0.0.1"),
        "{relayed}"
    );
    assert!(
        relayed["reply"].as_str().unwrap().starts_with("250"),
        "{relayed}"
    );
    let text = String::from_utf8_lossy(&inst.qms(&["track", &qid]).stdout).into_owned();
    assert!(
        text.contains("x@hard.test") && text.contains("bounce-sent"),
        "{text}"
    );
}

#[test]
fn retry_after_a_temporary_failure_and_expiry_bounces() {
    let (port, dead) = (free_port(), free_port());
    let mut inst = relay_instance(
        &[("later.test", port), ("never.test", dead)],
        "[outgoing]\nmin_backoff = 1\nmax_backoff = 1\nmax_queue_lifetime = 4\ndelay_warning = 0\n",
    );
    inst.start();
    smtp_send(
        inst.smtp_port,
        "alice@example.test",
        &["x@later.test"],
        "Subject: later\r\n\r\nlater\r\n",
        "",
    );
    smtp_send(
        inst.smtp_port,
        "alice@example.test",
        &["y@never.test"],
        "Subject: never\r\n\r\nnever\r\n",
        "",
    );
    wait_for(
        "the refused connection to be visible in the queue",
        Duration::from_secs(30),
        || {
            inst.queue_json().iter().any(|j| {
                j["recipients"][0]["reply"].as_str().is_some_and(|r| {
                    r.contains(&format!(
                        "connect to 127.0.0.1[127.0.0.1]:{port}: Connection refused"
                    ))
                })
            })
        },
    );
    let sink = Sink::start(&inst, "later", "127.0.0.1", port, &[]);
    wait_for("the retried delivery", Duration::from_secs(30), || {
        sink.messages().len() == 1
    });
    // The other destination never comes up: at expiry the sender gets a report.
    wait_for("the expiry report", Duration::from_secs(60), || {
        inst.read_maildir("alice")
            .iter()
            .any(|m| m.contains("y@never.test"))
    });
    let report = inst
        .read_maildir("alice")
        .into_iter()
        .find(|m| m.contains("y@never.test"))
        .unwrap();
    let check = "import email,sys\nm=email.message_from_string(sys.argv[1])\nassert m.get_content_type()=='multipart/report', m.get_content_type()\nassert m.get_param('report-type')=='delivery-status'\nparts=[p.get_content_type() for p in m.walk()]\nassert 'message/delivery-status' in parts, parts\nprint('ok')";
    let (ok, out) = python(check, std::slice::from_ref(&report));
    assert!(ok, "{out}{report}");
    assert!(
        report.contains("Action: failed") && report.contains("expired"),
        "{report}"
    );
    wait_for("the queue to empty", Duration::from_secs(30), || {
        inst.queue_json().is_empty()
    });
}

#[test]
fn mx_preference_null_mx_and_no_mx() {
    let port = free_port();
    let probe = Instance::new("", "");
    let (mut dns, dns_port) = dnsmasq(
        &probe,
        &[
            "--mx-host=mx.test,mx1.mx.test,10".into(),
            "--mx-host=mx.test,mx2.mx.test,20".into(),
            "--host-record=mx1.mx.test,127.0.0.2".into(),
            "--host-record=mx2.mx.test,127.0.0.3".into(),
            "--host-record=amx.test,127.0.0.3".into(),
            "--dns-rr=nullmx.test,15,000000".into(),
            // Answer for .test alone (NODATA, NXDOMAIN) instead of REFUSED for want of upstream.
            "--local=/test/".into(),
        ],
    );
    let mut inst = Instance::new("", &format!("[dns]\nserver = \"127.0.0.1:{dns_port}\"\n[outgoing]\nport = {port}\nconnect_timeout = 5\n"));
    inst.edit_config("[smtp]\n", "[smtp]\nmynetworks = [\"127.0.0.0/8\"]\n");
    // Only the second MX (127.0.0.3) answers: the first (127.0.0.2) refuses connections.
    let sink = Sink::start(&inst, "mx2", "127.0.0.3", port, &[]);
    inst.start();
    smtp_send(
        inst.smtp_port,
        "alice@example.test",
        &["x@mx.test"],
        "Subject: mx\r\n\r\nvia mx2\r\n",
        "",
    );
    smtp_send(
        inst.smtp_port,
        "alice@example.test",
        &["y@amx.test"],
        "Subject: amx\r\n\r\nno mx\r\n",
        "",
    );
    smtp_send(
        inst.smtp_port,
        "alice@example.test",
        &["z@nullmx.test"],
        "Subject: null\r\n\r\nnull mx\r\n",
        "",
    );
    wait_for("both at mx2", Duration::from_secs(60), || {
        sink.messages().len() == 2
    });
    wait_for("the null MX bounce", Duration::from_secs(30), || {
        inst.read_maildir("alice")
            .iter()
            .any(|m| m.contains("z@nullmx.test"))
    });
    let bounce = inst
        .read_maildir("alice")
        .into_iter()
        .find(|m| m.contains("z@nullmx.test"))
        .unwrap();
    assert!(
        bounce.contains("null MX") && bounce.contains("Status: 5.1.10"),
        "{bounce}"
    );
    let log = inst.log();
    assert!(
        log.contains("relay=mx1.mx.test[127.0.0.2]") && log.contains("status=connect-failed"),
        "{log}"
    );
    assert!(log.contains("relay=mx2.mx.test[127.0.0.3]"), "{log}");
    let _ = dns.kill();
    let _ = dns.wait();
    drop(probe);
}

#[test]
fn a_silent_destination_does_not_delay_another() {
    let (silent, fast) = (free_port(), free_port());
    let mut inst = relay_instance(
        &[("silent.test", silent), ("fast.test", fast)],
        "[outgoing]\ncommand_timeout = 120\n",
    );
    // A server that accepts connections and never says a word.
    let listener = std::net::TcpListener::bind(("127.0.0.1", silent)).unwrap();
    let _keep = std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in listener.incoming().flatten() {
            held.push(s);
        }
    });
    let sink = Sink::start(&inst, "fast", "127.0.0.1", fast, &[]);
    inst.start();
    smtp_send(
        inst.smtp_port,
        "alice@example.test",
        &["x@silent.test"],
        "Subject: silent\r\n\r\ns\r\n",
        "",
    );
    smtp_send(
        inst.smtp_port,
        "alice@example.test",
        &["y@fast.test"],
        "Subject: fast\r\n\r\nf\r\n",
        "",
    );
    wait_for("the fast delivery", Duration::from_secs(30), || {
        sink.messages().len() == 1
    });
    wait_for("the fast job to be done", Duration::from_secs(30), || {
        inst.queue_json()
            .iter()
            .all(|j| j["recipients"][0]["address"] != "y@fast.test")
    });
    assert!(
        inst.queue_json()
            .iter()
            .any(|j| j["recipients"][0]["address"] == "x@silent.test"),
        "the silent one is still waiting"
    );
}

#[test]
fn two_smtp_workers_never_deliver_a_job_twice() {
    let port = free_port();
    let mut inst = relay_instance(&[("sink.test", port)], "[queues.smtp]\nworkers = 2\n");
    let sink = Sink::start(&inst, "w", "127.0.0.1", port, &[]);
    inst.start();
    let n = 150;
    send_many(&inst, n, 3, |i| {
        (
            format!("r{i}@sink.test"),
            message(&format!("w{i}"), &format!("tok-{i}-")),
        )
    });
    wait_for("all at the sink", Duration::from_secs(60), || {
        sink.messages().len() >= n
    });
    wait_for("the queue to empty", Duration::from_secs(30), || {
        inst.queue_json().is_empty()
    });
    let msgs = sink.messages();
    assert_eq!(msgs.len(), n);
    assert_each_once(&msgs, n);
}

#[test]
fn a_cached_connection_closed_by_the_server_is_replaced() {
    let port = free_port();
    let mut inst = relay_instance(
        &[("sink.test", port)],
        "[outgoing]\nconnection_reuse = 300\nmin_backoff = 3600\nmax_backoff = 3600\nrecipient_limit = 1\n[queues.smtp]\nworkers = 1\n",
    );
    let first = Sink::start(&inst, "first", "127.0.0.1", port, &[]);
    inst.start();
    // Four transactions over two connections, which stay cached afterwards.
    let rcpts = ["a@sink.test", "b@sink.test", "c@sink.test", "d@sink.test"];
    assert!(inst
        .sendmail(&rcpts, &message("one", "first round"))
        .status
        .success());
    wait_for("the first round", Duration::from_secs(30), || {
        first.messages().len() == 4
    });
    wait_for("the queue to empty", Duration::from_secs(30), || {
        inst.queue_json().is_empty()
    });
    // The server goes away with qms's idle connections; a new one takes its place.
    drop(first);
    let second = Sink::start(&inst, "second", "127.0.0.1", port, &[]);
    assert!(inst
        .sendmail(&["e@sink.test"], &message("two", "second round"))
        .status
        .success());
    // With a one-hour backoff, only delivery without a deferral gets here in time.
    wait_for("the second round", Duration::from_secs(30), || {
        second.messages().len() == 1
    });
    assert!(!inst.log().contains("status=deferred"), "{}", inst.log());
}

#[test]
fn success_report_when_the_next_hop_has_no_dsn_and_8bit_refusal() {
    let (nodsn, no8) = (free_port(), free_port());
    let mut inst = relay_instance(&[("nodsn.test", nodsn), ("no8bit.test", no8)], "");
    let _a = Sink::start(&inst, "nodsn", "127.0.0.1", nodsn, &["-N"]);
    let _b = Sink::start(&inst, "no8bit", "127.0.0.1", no8, &["-8"]);
    inst.start();
    smtp_send(
        inst.smtp_port,
        "alice@example.test",
        &["x@nodsn.test"],
        "Subject: tell me\r\n\r\nplease\r\n",
        "NOTIFY=SUCCESS",
    );
    wait_for("the relayed report", Duration::from_secs(30), || {
        inst.read_maildir("alice")
            .iter()
            .any(|m| m.contains("Action: relayed"))
    });
    let report = inst
        .read_maildir("alice")
        .into_iter()
        .find(|m| m.contains("Action: relayed"))
        .unwrap();
    assert!(
        report.contains("Final-Recipient: rfc822; x@nodsn.test")
            && report.contains("Status: 2.0.0"),
        "{report}"
    );
    // 8-bit mail to a peer without 8BITMIME: that recipient fails with a clear reason.
    let script = "import smtplib,sys\ns=smtplib.SMTP('127.0.0.1',int(sys.argv[1]),timeout=30)\ns.ehlo()\ns.sendmail('alice@example.test',['y@no8bit.test'],'Subject: caf\\xe9\\r\\n\\r\\nna\\xefve\\r\\n'.encode('latin-1'),mail_options=['BODY=8BITMIME'])\ns.quit()";
    let (ok, out) = python(script, &[inst.smtp_port.to_string()]);
    assert!(ok, "{out}");
    wait_for("the 8-bit failure report", Duration::from_secs(30), || {
        inst.read_maildir("alice")
            .iter()
            .any(|m| m.contains("y@no8bit.test"))
    });
    let bounce = inst
        .read_maildir("alice")
        .into_iter()
        .find(|m| m.contains("y@no8bit.test"))
        .unwrap();
    assert!(
        bounce.contains("Status: 5.6.3") && bounce.contains("8BITMIME"),
        "{bounce}"
    );
}

#[test]
fn delay_warning_at_the_warning_time() {
    let dead = free_port();
    let mut inst = relay_instance(
        &[("slow.test", dead)],
        "[outgoing]\nmin_backoff = 1\nmax_backoff = 1\ndelay_warning = 1\n",
    );
    inst.start();
    smtp_send(
        inst.smtp_port,
        "alice@example.test",
        &["x@slow.test"],
        "Subject: slow\r\n\r\nslow\r\n",
        "",
    );
    wait_for("the delay warning", Duration::from_secs(30), || {
        inst.read_maildir("alice")
            .iter()
            .any(|m| m.contains("Action: delayed"))
    });
    let warning = inst
        .read_maildir("alice")
        .into_iter()
        .find(|m| m.contains("Action: delayed"))
        .unwrap();
    assert!(
        warning.contains("Delayed Mail")
            && warning.contains("Will-Retry-Until:")
            && warning.contains("Connection refused"),
        "{warning}"
    );
    // Only one warning, however many attempts follow.
    let attempts = |inst: &Instance| {
        inst.queue_json()
            .first()
            .map(|j| j["recipients"][0]["attempts"].as_u64().unwrap_or(0))
            .unwrap_or(0)
    };
    wait_for("two more attempts", Duration::from_secs(30), || {
        attempts(&inst) >= 3
    });
    assert_eq!(
        inst.read_maildir("alice")
            .iter()
            .filter(|m| m.contains("Action: delayed"))
            .count(),
        1
    );
}
