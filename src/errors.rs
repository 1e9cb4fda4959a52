//! Showing an error with its causes, for the command lines of both sides.

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
}
