//! How an error is told to a person: the error and its sources, joined with ": ". A transport
//! error (tonic, hyper, rustls) hides the useful part ("connection refused", "invalid peer
//! certificate") in its sources; fleetctl, the agent and the tests all say it this way.

/// `error` and its sources, joined with ": ", a source left out when the text so far already
/// says it, and at most 8 deep.
pub fn with_sources(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    for _ in 0..8 {
        let Some(inner) = source else { break };
        let inner_text = inner.to_string();
        if !text.contains(&inner_text) {
            text.push_str(": ");
            text.push_str(&inner_text);
        }
        source = inner.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Layer(&'static str, Option<Box<Layer>>);

    impl std::fmt::Display for Layer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Layer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|e| e as _)
        }
    }

    #[test]
    fn sources_are_joined_once_each() {
        let error = Layer(
            "transport error",
            Some(Box::new(Layer(
                "connection refused",
                Some(Box::new(Layer("connection refused", None))),
            ))),
        );
        assert_eq!(with_sources(&error), "transport error: connection refused");
        assert_eq!(with_sources(&Layer("alone", None)), "alone");
    }
}
