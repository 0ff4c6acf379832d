//! [`Secrets`]: a release's secret values, kept apart from its plain environment. The type
//! never shows a value: `Debug` prints `KEY=***`, so a secret cannot reach a log line or an
//! error through `{:?}`. Serde sees the map itself (the store and the agent's state file keep
//! the values; both are private to their user).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secrets(pub BTreeMap<String, String>);

impl Secrets {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `text` with every value of these secrets (of 4 bytes or more: shorter ones would mask
    /// ordinary words) replaced by `***`.
    pub fn redact(&self, text: &str) -> String {
        let mut out = text.to_string();
        for value in self.0.values().filter(|v| v.len() >= 4) {
            if out.contains(value.as_str()) {
                out = out.replace(value.as_str(), "***");
            }
        }
        out
    }

    /// The secrets' names, each with `***` for its value: what any read of a release shows.
    pub fn masked(&self) -> BTreeMap<String, String> {
        self.0
            .keys()
            .map(|k| (k.clone(), "***".to_string()))
            .collect()
    }
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map()
            .entries(self.0.keys().map(|k| (k, "***")))
            .finish()
    }
}

impl FromIterator<(String, String)> for Secrets {
    fn from_iter<I: IntoIterator<Item = (String, String)>>(iter: I) -> Secrets {
        Secrets(iter.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_a_value() {
        let secrets: Secrets = [("API_KEY".to_string(), "hunter2".to_string())]
            .into_iter()
            .collect();
        let shown = format!("{secrets:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("API_KEY"), "{shown}");
        assert_eq!(secrets.masked()["API_KEY"], "***");
        assert_eq!(
            secrets.redact("curl -H key:hunter2 failed: hunter2!"),
            "curl -H key:*** failed: ***!"
        );
        let json = serde_json::to_string(&secrets).unwrap();
        assert_eq!(serde_json::from_str::<Secrets>(&json).unwrap(), secrets);
    }
}
