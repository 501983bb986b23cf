//! How the command line reports an error: the chain of causes, each said once, as text or
//! (with `--json`) as one JSON object on stderr.

use serde::Serialize;

/// The messages of an error's chain, each once ([`khub::error_kind::messages`]).
pub fn causes(e: &anyhow::Error) -> Vec<String> {
    khub::error_kind::messages(e.as_ref())
}

/// What the user reads: the causes, the error's kind, and at most one hint.
pub struct Report {
    causes: Vec<String>,
    kind: Option<khub::error_kind::ErrorKind>,
    hint: Option<String>,
}

impl Report {
    /// The report of `e`; `hint` is the command's own suggestion, used when the message
    /// carries none. A `; hint: …` inside the last cause moves to the hint line.
    pub fn new(e: &anyhow::Error, hint: Option<String>) -> Report {
        let mut causes = causes(e);
        let mut own = None;
        if let Some(last) = causes.last_mut()
            && let Some(at) = last.find("; hint: ")
        {
            own = Some(last[at + "; hint: ".len()..].to_owned());
            last.truncate(at);
        }
        Report {
            causes,
            kind: e.chain().find_map(khub::error_kind::ErrorKind::of),
            hint: own.or(hint),
        }
    }

    /// `error: outer: cause: root`, then `hint: …` on its own line.
    pub fn text(&self) -> String {
        let mut out = format!("error: {}", self.causes.join(": "));
        if let Some(h) = &self.hint {
            out.push_str("\nhint: ");
            out.push_str(h);
        }
        out
    }

    /// One JSON object: `{"error": {"code", "message", "hint", "causes", "exit-code"}}`;
    /// `code` is the error's kind (`not-found`, `registry`, … as the C API's `KHUB_E_*`),
    /// or `other` for a usage error of the command line itself.
    pub fn json(&self, exit_code: u8) -> String {
        #[derive(Serialize)]
        #[serde(rename_all = "kebab-case")]
        struct Doc<'a> {
            error: Inner<'a>,
        }
        #[derive(Serialize)]
        #[serde(rename_all = "kebab-case")]
        struct Inner<'a> {
            code: &'static str,
            message: String,
            hint: Option<&'a str>,
            causes: &'a [String],
            exit_code: u8,
        }
        let doc = Doc {
            error: Inner {
                code: self.kind.map_or("other", |k| k.name()),
                message: self.causes.join(": "),
                hint: self.hint.as_deref(),
                causes: &self.causes,
                exit_code,
            },
        };
        serde_json::to_string(&doc).unwrap_or_else(|_| format!("{{\"error\":{{\"message\":{:?}}}}}", doc.error.message))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot read x.toml: {0}")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn a_cause_the_message_already_says_is_said_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file or directory (os error 2)");
        let e = anyhow::Error::new(Outer(io));
        assert_eq!(
            Report::new(&e, None).text(),
            "error: cannot read x.toml: No such file or directory (os error 2)"
        );
        let e = e.context("loading the app");
        assert_eq!(
            causes(&e),
            ["loading the app", "cannot read x.toml: No such file or directory (os error 2)"]
        );
        let doc: serde_json::Value = serde_json::from_str(&Report::new(&e, None).json(2)).unwrap();
        assert_eq!(doc["error"]["exit-code"], 2);
        assert_eq!(doc["error"]["code"], "other");
        assert!(doc["error"]["hint"].is_null());
        assert_eq!(doc["error"]["causes"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn a_hint_in_the_message_gets_its_own_line() {
        let e = anyhow::anyhow!("no variant runs here; closest: `v4`; hint: ask for a baseline build");
        let r = Report::new(&e, Some("unused".into()));
        assert_eq!(
            r.text(),
            "error: no variant runs here; closest: `v4`\nhint: ask for a baseline build"
        );
        let r = Report::new(&anyhow::anyhow!("plain"), Some("try --offline".into()));
        assert_eq!(r.text(), "error: plain\nhint: try --offline");
    }
}
