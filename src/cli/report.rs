//! How the command line reports an error: the chain of causes, each said once, as text or
//! (with `--json`) as one JSON object on stderr.

use serde::Serialize;

/// The messages of an error's chain, outermost first, each once: a cause whose text a
/// message before it already contains is dropped (libraries often repeat their source in
/// their own message), and so is a group repeated back to back (`(URL) (URL)`).
pub fn causes(e: &anyhow::Error) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for c in e.chain() {
        let text = collapse_repeats(c.to_string().trim());
        if text.is_empty() || out.iter().any(|kept| kept.contains(&text)) {
            continue;
        }
        out.push(text);
    }
    out
}

/// `a (x) (x)` → `a (x)`: a parenthesized group said twice in a row, once.
fn collapse_repeats(s: &str) -> String {
    let mut out = s.to_owned();
    let mut from = 0;
    while let Some(open) = out[from..].find('(').map(|i| i + from) {
        let Some(close) = out[open..].find(')').map(|i| i + open) else {
            break;
        };
        let group = out[open..=close].to_owned();
        let repeat = format!(" {group}");
        if out[close + 1..].starts_with(&repeat) {
            out.replace_range(close + 1..close + 1 + repeat.len(), "");
        } else {
            from = close + 1;
        }
    }
    out
}

/// The text report: `error: outer: cause: root`.
pub fn text(e: &anyhow::Error) -> String {
    format!("error: {}", causes(e).join(": "))
}

/// The `--json` report: `{"error": {"message", "causes", "exit-code"}}`.
pub fn json(e: &anyhow::Error, exit_code: u8) -> String {
    #[derive(Serialize)]
    #[serde(rename_all = "kebab-case")]
    struct Doc {
        error: Inner,
    }
    #[derive(Serialize)]
    #[serde(rename_all = "kebab-case")]
    struct Inner {
        message: String,
        causes: Vec<String>,
        exit_code: u8,
    }
    let causes = causes(e);
    let doc = Doc {
        error: Inner {
            message: causes.join(": "),
            causes,
            exit_code,
        },
    };
    serde_json::to_string(&doc).unwrap_or_else(|_| format!("{{\"error\":{{\"message\":{:?}}}}}", e.to_string()))
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
        assert_eq!(text(&e), "error: cannot read x.toml: No such file or directory (os error 2)");
        let e = e.context("loading the app");
        assert_eq!(
            causes(&e),
            ["loading the app", "cannot read x.toml: No such file or directory (os error 2)"]
        );
        let doc: serde_json::Value = serde_json::from_str(&json(&e, 2)).unwrap();
        assert_eq!(doc["error"]["exit-code"], 2);
        assert_eq!(doc["error"]["causes"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn a_group_repeated_back_to_back_is_said_once() {
        assert_eq!(
            collapse_repeats("error sending request for url (http://h:9/x) (http://h:9/x)"),
            "error sending request for url (http://h:9/x)"
        );
        assert_eq!(collapse_repeats("a (b) (c) (c) d"), "a (b) (c) d");
        assert_eq!(collapse_repeats("unbalanced (x"), "unbalanced (x");
    }
}
