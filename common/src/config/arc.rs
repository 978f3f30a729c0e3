//! `[arc]`: the key qms seals forwarded mail with (ARC, RFC 8617), so that the next hop can
//! trust the Authentication-Results it wrote about the mail as it arrived.
//!
//! ```toml
//! [arc]
//! domain = "example.com"
//! selector = "arc2026"
//! key = "/etc/qms/dkim/arc.key"   # RSA or Ed25519, as `qms dkim keygen` makes it
//! ```

use serde::Deserialize;
use std::path::PathBuf;

#[derive(Clone, Debug)]
pub struct Arc {
    /// The `d=` of the seal: a domain whose DNS publishes the key.
    pub domain: String,
    pub selector: String,
    pub key: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawArc {
    domain: String,
    selector: String,
    key: String,
}

impl RawArc {
    pub(super) fn build(self, resolve: &dyn Fn(&str) -> PathBuf) -> Result<Arc, (String, String)> {
        let domain = self.domain.trim().to_ascii_lowercase();
        if domain.is_empty() || self.selector.trim().is_empty() {
            return Err(("arc".into(), "domain and selector must not be empty".into()));
        }
        Ok(Arc {
            domain,
            selector: self.selector.trim().to_string(),
            key: resolve(&self.key),
        })
    }
}
