//! Log lines of both adapters: every line written while a request is handled starts with
//! `request <x-request-id>: `, so one failure is one line that can be joined with the proxy's
//! access log. The adapters install their own `log::Log` that writes [`line()`] to the host.

use std::cell::RefCell;

thread_local! {
    /// The `x-request-id` of the request being handled (wasm instances are single-threaded).
    static REQUEST_ID: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Most characters of a client-sent request id that appear in a log line.
pub const MAX_REQUEST_ID_CHARS: usize = 64;

/// Sets (or, with `None`, clears) the request id that prefixes the following log lines.
pub fn set_request_id(id: Option<String>) {
    REQUEST_ID.with(|r| *r.borrow_mut() = id);
}

/// The request id as it may appear in a log line: at most [`MAX_REQUEST_ID_CHARS`] visible
/// ASCII characters, `None` when nothing is left (a client may send its own `x-request-id`; it
/// must not forge or flood log lines).
pub fn loggable_request_id(raw: Option<String>) -> Option<String> {
    raw.map(|id| {
        id.chars()
            .filter(|c| c.is_ascii_graphic())
            .take(MAX_REQUEST_ID_CHARS)
            .collect::<String>()
    })
    .filter(|id| !id.is_empty())
}

/// The text of a log record, prefixed with `request <id>: ` when a request id is set.
pub fn line(record: &log::Record<'_>) -> String {
    REQUEST_ID.with(|r| match r.borrow().as_deref() {
        Some(id) => format!("request {id}: {}", record.args()),
        None => record.args().to_string(),
    })
}

/// A `log::Log` that writes each enabled record, as [`line()`], with the adapter's host function
/// (which maps the `log` level to the host's).
pub struct HostLog(pub fn(log::Level, &str));

impl log::Log for HostLog {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            (self.0)(record.level(), &line(record));
        }
    }

    fn flush(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_id_is_bounded_and_visible_ascii_only() {
        let raw = format!("{}\n forged é", "A".repeat(100));
        assert_eq!(loggable_request_id(Some(raw)), Some("A".repeat(64)));
        assert_eq!(loggable_request_id(Some(" \n".to_owned())), None);
        assert_eq!(loggable_request_id(None), None);
    }

    #[test]
    fn lines_carry_the_request_id_while_it_is_set() {
        let record = |f: &dyn Fn(&log::Record<'_>) -> String| {
            f(&log::Record::builder()
                .args(format_args!("callout failed"))
                .build())
        };
        set_request_id(Some("req-1".to_owned()));
        assert_eq!(record(&line), "request req-1: callout failed");
        set_request_id(None);
        assert_eq!(record(&line), "callout failed");
    }
}
