//! `qms dsn classify` against real bounces: the shared corpus (629 reports from many MTAs and
//! providers, labelled by Sisimai 4.25), scored by the shared `bounce_agree.py`.
//!
//! Sisimai is a reference, not an oracle. Where a label is plainly wrong (it reports the final
//! recipient where the report gives the address the sender used, calls a delay warning a
//! failure, or knows no recipient in a format it does not read), the label is corrected in
//! `tests/fixtures/bounce-label-disputes.jsonl`, each with its reason; the scores against the
//! labels as they are are printed beside.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

fn shared() -> PathBuf {
    let dir = std::env::var_os("QMS_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared"));
    assert!(
        dir.join("corpora/bounces/labels.jsonl").is_file()
            && dir.join("bench/bounce_agree.py").is_file(),
        "the shared corpus and bench are not at {} (set QMS_SHARED)",
        dir.display()
    );
    dir
}

struct Score {
    recall: f64,
    precision: f64,
    report: String,
}

fn agree(corpus: &Path) -> Score {
    let script = shared().join("bench/bounce_agree.py");
    let out = Command::new("python3")
        .arg(&script)
        .arg("--corpus")
        .arg(corpus)
        .args(["--show", "40", "--"])
        .arg(test_bin())
        .args(["dsn", "classify"])
        .output()
        .expect("python3 runs bounce_agree.py");
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "bounce_agree.py failed: {report}");
    let last = report.lines().last().unwrap_or("").to_string();
    let field = |name: &str| -> f64 {
        last.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{name}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {last:?}"))
    };
    Score {
        recall: field("recall"),
        precision: field("precision"),
        report,
    }
}

/// A corpus directory with the maildir of the shared one and its labels, disputed ones
/// replaced.
fn corrected_corpus(dir: &Path) -> usize {
    let corpus = shared().join("corpora/bounces");
    std::os::unix::fs::symlink(corpus.join("maildir"), dir.join("maildir")).unwrap();
    let disputes_file =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bounce-label-disputes.jsonl");
    let mut disputes = std::collections::HashMap::new();
    for line in std::fs::read_to_string(disputes_file).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        if let Some(file) = v["file"].as_str() {
            assert!(
                v["why"].as_str().is_some(),
                "every dispute gives its reason: {line}"
            );
            disputes.insert(file.to_string(), v);
        }
    }
    let labels = std::fs::read_to_string(corpus.join("labels.jsonl")).unwrap();
    let mut out = String::new();
    let mut replaced = 0;
    for line in labels.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        match v["file"].as_str().and_then(|f| disputes.get(f)) {
            Some(d) => {
                replaced += 1;
                out.push_str(&d.to_string());
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    std::fs::write(dir.join("labels.jsonl"), out).unwrap();
    assert_eq!(
        replaced,
        disputes.len(),
        "every dispute names a corpus file"
    );
    replaced
}

#[test]
fn real_bounces_agree_with_the_reference() {
    let raw = agree(&shared().join("corpora/bounces"));
    eprintln!(
        "against Sisimai 4.25's labels as they are: recall {:.3} precision {:.3}",
        raw.recall, raw.precision
    );

    let tmp = std::env::temp_dir().join(format!("qms-bounce-corpus-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    let disputed = corrected_corpus(&tmp);
    let s = agree(&tmp);
    eprintln!(
        "with {disputed} disputed labels corrected: recall {:.3} precision {:.3}\n{}",
        s.recall, s.precision, s.report
    );
    assert!(
        s.recall >= 0.97 && s.precision >= 0.97,
        "recall {} precision {} below 0.97:\n{}",
        s.recall,
        s.precision,
        s.report
    );
    assert!(
        s.report.contains(
            "recognised as kind feedback: 17 of 17; auto-replies as kind autoreply: 6 of 6"
        ),
        "every complaint and auto-reply recognised:\n{}",
        s.report
    );
    let _ = std::fs::remove_dir_all(&tmp);
}
