//! The configuration documented where sysadmins look (issue #14): `qms.toml(5)` names every
//! key the parser takes, with the default `qms config` prints, and `qms config` (all keys)
//! and `qms config -n` (what differs) round-trip through `check-config`.

mod common;
use common::*;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

const PROBE: &str = "zz_probe";

/// What `qms check-config` says of `text`.
fn check(dir: &Path, text: &str) -> (bool, String) {
    let path = dir.join("probe.toml");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(test_bin())
        .arg("-c")
        .arg(&path)
        .arg("check-config")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// What the parser takes at a table path, learnt from its own refusal of an unknown key.
enum Shape {
    /// A table with these keys.
    Table(Vec<String>),
    /// A table of any keys (routes, mailboxes), whose values have this shape.
    Map(Box<Shape>),
    /// A plain value.
    Value,
}

fn fields(err: &str) -> Option<Vec<String>> {
    let rest = err
        .split(&format!("unknown field `{PROBE}`, expected "))
        .nth(1)?;
    Some(
        rest.split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_string)
            .collect(),
    )
}

fn shape(dir: &Path, path: &str) -> Shape {
    let text = if path.is_empty() {
        format!("{PROBE} = 1\nspool = \"s\"\n")
    } else {
        format!("spool = \"s\"\n[{path}]\n{PROBE} = 1\n")
    };
    let (_, err) = check(dir, &text);
    if let Some(f) = fields(&err) {
        return Shape::Table(f);
    }
    if !path.is_empty() && err.contains(&format!("key {path}.{PROBE}:")) {
        // Any key was taken; what goes under one?
        return Shape::Map(Box::new(shape(dir, &format!("{path}.\"x@y.test\""))));
    }
    Shape::Value
}

/// Every table path and its keys, from the top down: `queues.NAME`-like paths appear with the
/// map's key as `*`.
fn accepted(dir: &Path) -> BTreeMap<String, Vec<String>> {
    let mut out = BTreeMap::new();
    let mut todo = vec![String::new()];
    while let Some(path) = todo.pop() {
        let Shape::Table(keys) = shape(dir, &path) else {
            panic!("{path:?} is not a table");
        };
        let mut plain = Vec::new();
        for k in keys {
            let sub = if path.is_empty() {
                k.clone()
            } else {
                format!("{path}.{k}")
            };
            match shape(dir, &sub) {
                Shape::Table(_) => todo.push(sub),
                Shape::Map(inner) => {
                    out.insert(format!("{sub}.*"), Vec::new());
                    if let Shape::Table(f) = *inner {
                        out.insert(format!("{sub}.*"), f);
                    }
                }
                Shape::Value => plain.push(k),
            }
        }
        out.insert(path, plain);
    }
    out
}

/// The man page's sections and their entries: key → the default it states, if any.
fn manual() -> BTreeMap<String, BTreeMap<String, Option<String>>> {
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("dist/man/qms.toml.5"))
            .unwrap();
    let mut out: BTreeMap<String, BTreeMap<String, Option<String>>> = BTreeMap::new();
    let mut section = None;
    let mut after_tp = false;
    for line in text.lines() {
        if let Some(s) = line.strip_prefix(".SS ") {
            let name = if s == "Top level" {
                String::new()
            } else {
                s.trim_start_matches('[').trim_end_matches(']').to_string()
            };
            out.entry(name.clone()).or_default();
            section = Some(name);
        } else if let (Some(s), true, Some(entry)) = (&section, after_tp, line.strip_prefix(".B "))
        {
            let (key, default) = match entry.split_once(" = ") {
                Some((k, d)) => (k.to_string(), Some(d.to_string())),
                None => (entry.to_string(), None),
            };
            out.get_mut(s).unwrap().insert(key, default);
        }
        after_tp = line == ".TP";
    }
    out
}

/// The man page's name for a parser path: `queues.*` is `queues.NAME`, `mailboxes.*`
/// is `mailboxes` (its entries are inline tables).
fn doc_section(path: &str, man: &BTreeMap<String, BTreeMap<String, Option<String>>>) -> String {
    if let Some(base) = path.strip_suffix(".*") {
        let named = format!("{base}.NAME");
        return if man.contains_key(&named) {
            named
        } else {
            base.to_string()
        };
    }
    path.to_string()
}

/// `qms config` (or `config -n`) of a file, without its first line (the file's name).
fn show(file: &Path, extra: &[&str]) -> String {
    let out = Command::new(test_bin())
        .arg("-c")
        .arg(file)
        .arg("config")
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .split_once('\n')
        .unwrap()
        .1
        .to_string()
}

/// `section → key → value` of `qms config`'s output; keys written `# key (not set)` have none.
fn entries(text: &str) -> BTreeMap<String, BTreeMap<String, Option<String>>> {
    let mut out: BTreeMap<String, BTreeMap<String, Option<String>>> = BTreeMap::new();
    let mut section = String::new();
    for line in text.lines() {
        let l = line.trim_start_matches("# ");
        if l.starts_with('[') {
            section = l.trim_matches(['[', ']']).to_string();
            continue;
        }
        if let Some((k, v)) = line.split_once(" = ") {
            if !line.starts_with('#') {
                out.entry(section.clone())
                    .or_default()
                    .insert(k.trim_matches('"').to_string(), Some(v.to_string()));
            }
        } else if let Some(k) = l.strip_suffix(" (not set)") {
            out.entry(section.clone())
                .or_default()
                .insert(k.to_string(), None);
        }
    }
    out
}

#[test]
fn every_key_the_parser_takes_is_in_the_manual_with_its_default() {
    let dir = std::env::temp_dir().join(format!("qms-manual-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let parser = accepted(&dir);
    let man = manual();
    // The parser's tables, found from its own error messages: a sanity check of the probe.
    for t in [
        "",
        "limits",
        "queues.*",
        "mailboxes.*",
        "tracking.imap",
        "routes.*",
        "log",
    ] {
        assert!(parser.contains_key(t), "{t:?} in {:?}", parser.keys());
    }
    let mut missing = Vec::new();
    for (path, keys) in &parser {
        let doc = doc_section(path, &man);
        let Some(entries) = man.get(&doc) else {
            missing.push(format!("section [{doc}]"));
            continue;
        };
        for k in keys {
            if !entries.contains_key(k) {
                missing.push(format!("[{doc}] {k}"));
            }
        }
    }
    assert!(missing.is_empty(), "not in qms.toml(5): {missing:?}");

    // The defaults the manual states are what `qms config` prints for a config with only
    // `spool`; a key printed with a value has its default in the manual.
    let bare = dir.join("bare.toml");
    std::fs::write(&bare, "spool = \"spool\"\n").unwrap();
    let shown = entries(&show(&bare, &[]));
    let mut wrong = Vec::new();
    for (section, keys) in &shown {
        let doc = if section.starts_with("queues.") {
            "queues.NAME".to_string()
        } else {
            section.clone()
        };
        let Some(entries) = man.get(&doc) else {
            wrong.push(format!(
                "[{section}] printed by qms config but not in the manual"
            ));
            continue;
        };
        for (k, v) in keys {
            match (entries.get(k), v) {
                (None, _) => wrong.push(format!("[{section}] {k} printed but not documented")),
                (Some(Some(d)), Some(v)) if !d.starts_with('(') && d != v => {
                    wrong.push(format!("[{section}] {k}: manual says {d}, qms config {v}"))
                }
                (Some(None), Some(v)) if k != "spool" => wrong.push(format!(
                    "[{section}] {k} = {v} has no default in the manual"
                )),
                (Some(Some(d)), None) if !d.starts_with('(') => wrong.push(format!(
                    "[{section}] {k}: manual says {d}, qms config: not set"
                )),
                _ => {}
            }
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
    // And `qms config` names every key of every fixed table.
    for (path, keys) in parser.iter().filter(|(p, _)| !p.ends_with(".*")) {
        for k in keys {
            assert!(
                shown.get(path).is_some_and(|s| s.contains_key(k)),
                "qms config does not name [{path}] {k}"
            );
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn qms_config_and_config_n_round_trip_through_check_config() {
    let inst = Instance::new(
        "",
        "[routes]\n\"bulk.test\" = \"smtp:[127.0.0.1]:2626@bulk\"\n[queues.bulk]\nworkers = 3\n\
         min_backoff = \"10m\"\n[limits]\nmessage_size = 1000000\n[outgoing]\ntls = \"encrypt\"\n\
         delay_warning = \"2h\"\n[outgoing.tls_routes]\n\"plain.test\" = \"none\"\n\
         \"ver.test\" = { level = \"secure\", match = [\"mx.ver.test\"] }\n\
         [auth.senders]\napp = [\"@example.test\"]\n[log]\nformat = \"postfix\"\n\
         [tracking]\nkeep = \"90d\"\nsuppress = [\"complaint\"]\n[metrics]\nlisten = \"127.0.0.1:9725\"\n",
    );
    let all = show(&inst.config, &[]);
    let changed = show(&inst.config, &["-n"]);
    for (text, name) in [(&all, "all.toml"), (&changed, "changed.toml")] {
        let file = inst.dir.join(name);
        std::fs::write(&file, text).unwrap();
        let out = Command::new(test_bin())
            .arg("-c")
            .arg(&file)
            .arg("check-config")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{name}: {}\n{text}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Read back, it is the same configuration, key for key.
        assert_eq!(show(&file, &[]), all, "{name}");
    }
    let n = entries(&changed);
    let set: BTreeSet<String> = n
        .iter()
        .flat_map(|(s, keys)| keys.keys().map(move |k| format!("{s}.{k}")))
        .collect();
    for k in [
        ".spool",
        ".hostname",
        "limits.message_size",
        "outgoing.tls",
        "outgoing.delay_warning",
        "queues.bulk.workers",
        "queues.bulk.min_backoff",
        "log.format",
        "tracking.keep",
        "metrics.listen",
        "routes.bulk.test",
        "outgoing.tls_routes.ver.test",
        "auth.senders.app",
    ] {
        assert!(set.contains(k), "config -n shows {k}: {changed}");
    }
    for k in [
        "limits.recipients",
        "outgoing.port",
        "queues.smtp.workers",
        "log.target",
    ] {
        assert!(
            !set.contains(k),
            "config -n leaves out the default {k}: {changed}"
        );
    }
    assert_eq!(n["limits"]["message_size"].as_deref(), Some("1000000"));
    assert_eq!(n["queues.bulk"]["min_backoff"].as_deref(), Some("\"10m\""));
}

/// The commands of `qms --help` and `qms queue --help`, from clap's own listing.
fn commands(args: &[&str]) -> Vec<String> {
    let out = Command::new(test_bin()).args(args).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.split("Commands:")
        .nth(1)
        .unwrap()
        .split("\n\n")
        .next()
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .filter(|c| c != "help")
        .collect()
}

#[test]
fn every_command_is_in_qms_8() {
    let man = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("dist/man/qms.8"))
        .unwrap();
    let entries: Vec<&str> = man
        .lines()
        .filter_map(|l| l.strip_prefix(".B qms "))
        .collect();
    let top = commands(&["--help"]);
    assert!(top.len() > 15, "{top:?}");
    for c in &top {
        assert!(
            entries
                .iter()
                .any(|e| e.split_whitespace().next() == Some(c.as_str())),
            "qms {c} is not in qms(8)"
        );
    }
    for c in commands(&["queue", "--help"]) {
        assert!(
            entries
                .iter()
                .any(|e| e.starts_with("queue ") && e.contains(c.as_str())),
            "qms queue {c} is not in qms(8)"
        );
    }
}
