//! Showing an error with its causes, for the command lines of both sides,
//! and text from the other end of a connection made safe to show.

/// An error and every cause, on one line: `a: b: c`.
pub fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut line = error.to_string();
    let mut cause = error.source();
    while let Some(error) = cause {
        line.push_str(": ");
        line.push_str(&error.to_string());
        cause = error.source();
    }
    line
}

/// Some work and the error that stopped it: keeps the error as the cause.
#[derive(Debug)]
pub struct Context {
    pub what: String,
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

impl Context {
    /// Wraps an error with what was being done, for `map_err`.
    pub fn of<E: Into<Box<dyn std::error::Error + Send + Sync>>>(what: impl Into<String>) -> impl FnOnce(E) -> Context {
        let what = what.into();
        move |error| Context { what, source: error.into() }
    }
}

impl std::fmt::Display for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.what)
    }
}

impl std::error::Error for Context {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(self.source.as_ref())
    }
}

/// How much of a remote text [`remote_text`] keeps.
pub const REMOTE_TEXT_MAX_CHARS: usize = 300;

/// Text that came from the other end (an HTTP error body, a gRPC status
/// message, a header), made safe for one line of a log or a report: control
/// characters (newlines, terminal escapes) are shown escaped, so a peer
/// cannot start a line of its own or repaint the terminal, and anything past
/// [`REMOTE_TEXT_MAX_CHARS`] characters is cut, saying so.
pub fn remote_text(text: &str) -> String {
    let mut shown = String::with_capacity(text.len().min(REMOTE_TEXT_MAX_CHARS + 16));
    for (count, c) in text.chars().enumerate() {
        if count == REMOTE_TEXT_MAX_CHARS {
            shown.push_str("...(cut)");
            break;
        }
        if c.is_control() || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}') {
            shown.extend(c.escape_default());
        } else {
            shown.push(c);
        }
    }
    shown
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chain_shows_every_cause_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let error = Context::of::<std::io::Error>("reading the CA certificate ca.pem")(io);
        let outer = Context::of::<Context>("connecting to Central")(error);
        assert_eq!(chain(&outer), "connecting to Central: reading the CA certificate ca.pem: no such file");
    }

    #[test]
    fn remote_text_cannot_start_a_line_or_send_escapes() {
        let hostile = "not found\nWhat an admin can do:\r\n  - nothing\u{1b}[2J\u{202e}";
        let shown = remote_text(hostile);
        assert!(!shown.chars().any(|c| c.is_control()), "{shown:?}");
        assert_eq!(shown, "not found\\nWhat an admin can do:\\r\\n  - nothing\\u{1b}[2J\\u{202e}");
        let long = "x".repeat(1000);
        assert_eq!(remote_text(&long).len(), REMOTE_TEXT_MAX_CHARS + "...(cut)".len());
        assert_eq!(remote_text("plain text, ünïcode"), "plain text, ünïcode");
    }
}
