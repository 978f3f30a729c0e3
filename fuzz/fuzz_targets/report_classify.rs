//! Fuzzes the reader of reports that come back (DSNs, bounces in any shape, MDNs, ARF
//! complaints): mail from anyone, read by dsnproc as untrusted bytes.
//!   RUSTC_BOOTSTRAP=1 cargo fuzz run report_classify SEEDS -- -max_total_time=600
//! with SEEDS a copy of ../shared/corpora/bounces/maildir's messages.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(report) = qms_delivery::report::classify(data) {
        let _ = report.to_json();
    }
});
