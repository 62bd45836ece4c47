//! HTTP/1.1 on a byte stream for the Traefik plugin's callouts (host-agnostic, so it is tested
//! natively): request encoding and answer parsing with `httparse` (RFC 9112: status line,
//! headers, and a body framed by `Content-Length`, chunked coding, or the end of the
//! connection). Every limit here bounds memory whatever the server sends.

use std::io::{self, Read, Write};

use crate::exchange::Callout;

/// Largest answer head (status line and headers) read, in bytes.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Most headers parsed in an answer.
pub const MAX_HEADERS: usize = 64;

/// The answer to a callout: status, body (at most the size asked for) and `Cache-Control`.
#[derive(Debug, PartialEq, Eq)]
pub struct Answer {
    /// HTTP status code.
    pub status: u16,
    /// The body, truncated to the limit passed to [`exchange`].
    pub body: Vec<u8>,
    /// The `Cache-Control` header, if any.
    pub cache_control: Option<String>,
}

/// The request bytes for `c`: request line (`c.path` as is), `host` (`c.upstream.authority`),
/// `user-agent`, `connection: close`, `c.headers`, `content-length` (with a body or for POST),
/// then the body. The core builds every value (the OpenID token is percent-encoded in the
/// path), so no client byte reaches a header line raw.
pub fn encode_request(c: &Callout) -> Vec<u8> {
    let mut head = format!(
        "{} {} HTTP/1.1\r\nhost: {}\r\nuser-agent: {}\r\nconnection: close\r\n",
        c.method,
        c.path,
        c.upstream.authority,
        crate::USER_AGENT
    );
    for (name, value) in &c.headers {
        head.push_str(name);
        head.push_str(": ");
        head.push_str(value);
        head.push_str("\r\n");
    }
    if !c.body.is_empty() || c.method == "POST" {
        head.push_str(&format!("content-length: {}\r\n", c.body.len()));
    }
    head.push_str("\r\n");
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(&c.body);
    bytes
}

/// Writes `request` to `stream` and reads the answer: head parsed with `httparse` (at most
/// [`MAX_HEAD_BYTES`] and [`MAX_HEADERS`]), body by `Content-Length`, chunked coding, or until
/// the server closes, truncated to `max_body` bytes.
///
/// Errors with a short reason for the log: the stream's errors (`"timeout"` for
/// `io::ErrorKind::TimedOut`), a close before the answer or inside the body, a malformed or too
/// large head, bad framing.
pub fn exchange(
    stream: &mut impl ReadWrite,
    request: &[u8],
    max_body: usize,
) -> Result<Answer, String> {
    stream
        .write_all(request)
        .map_err(|e| format!("sending the request failed: {e}"))?;
    let mut buffer = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    let (status, cache_control, framing, head_len) = loop {
        let n = read_some(stream, &mut chunk)?;
        if n == 0 {
            return Err("the connection closed before an answer".to_owned());
        }
        buffer.extend_from_slice(chunk.get(..n).unwrap_or_default());
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut response = httparse::Response::new(&mut headers);
        match response.parse(&buffer) {
            Ok(httparse::Status::Complete(len)) => {
                let status = response.code.ok_or("answer without status")?;
                let header = |name: &str| {
                    response
                        .headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case(name))
                        .and_then(|h| std::str::from_utf8(h.value).ok())
                        .map(|v| v.trim().to_owned())
                };
                let framing = if header("transfer-encoding")
                    .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
                {
                    Framing::Chunked
                } else if let Some(length) = header("content-length") {
                    Framing::Length(
                        length
                            .parse::<usize>()
                            .map_err(|_| "answer with an invalid Content-Length".to_owned())?,
                    )
                } else {
                    Framing::UntilClose
                };
                break (status, header("cache-control"), framing, len);
            }
            Ok(httparse::Status::Partial) if buffer.len() <= MAX_HEAD_BYTES => continue,
            Ok(httparse::Status::Partial) => return Err("answer head too large".to_owned()),
            Err(e) => return Err(format!("malformed answer: {e}")),
        }
    };
    let mut rest = buffer.split_off(head_len.min(buffer.len()));
    let body = match framing {
        Framing::Length(length) => {
            let want = length.min(max_body);
            while rest.len() < want {
                let n = read_some(stream, &mut chunk)?;
                if n == 0 {
                    return Err("the connection closed inside the answer body".to_owned());
                }
                rest.extend_from_slice(chunk.get(..n).unwrap_or_default());
            }
            rest.truncate(want);
            rest
        }
        Framing::UntilClose => {
            while rest.len() < max_body {
                let n = read_some(stream, &mut chunk)?;
                if n == 0 {
                    break;
                }
                rest.extend_from_slice(chunk.get(..n).unwrap_or_default());
            }
            rest.truncate(max_body);
            rest
        }
        Framing::Chunked => read_chunked(stream, rest, max_body)?,
    };
    Ok(Answer {
        status,
        body,
        cache_control,
    })
}

enum Framing {
    Length(usize),
    Chunked,
    UntilClose,
}

/// Longest chunk-size line (size, extensions, CRLF) accepted, in bytes.
const MAX_CHUNK_LINE_BYTES: usize = 256;

/// Decodes a chunked body (sizes parsed with `httparse::parse_chunk_size`), stopping once
/// `max_body` bytes are collected. At most `max_body` + 16 KiB of raw bytes are read in all,
/// and consumed bytes are dropped as it goes, so framing overhead (one-byte chunks with long
/// extensions) cannot grow memory.
fn read_chunked(
    stream: &mut impl ReadWrite,
    mut raw: Vec<u8>,
    max_body: usize,
) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    // `raw` always starts at the next chunk-size line: consumed chunks are drained.
    let mut raw_total = raw.len();
    let raw_limit = max_body.saturating_add(16 * 1024);
    let mut pull = |raw: &mut Vec<u8>, closed: &str| -> Result<(), String> {
        let mut chunk = [0u8; 4096];
        let n = read_some(stream, &mut chunk)?;
        if n == 0 {
            return Err(closed.to_owned());
        }
        raw_total += n;
        if raw_total > raw_limit {
            return Err("chunked answer with too much framing".to_owned());
        }
        raw.extend_from_slice(chunk.get(..n).unwrap_or_default());
        Ok(())
    };
    loop {
        match httparse::parse_chunk_size(&raw) {
            Ok(httparse::Status::Complete((line, _))) if line > MAX_CHUNK_LINE_BYTES => {
                return Err("chunk-size line too long".to_owned());
            }
            Ok(httparse::Status::Complete((_, 0))) => return Ok(body),
            Ok(httparse::Status::Complete((line, size))) => {
                let size = usize::try_from(size).map_err(|_| "chunk too large".to_owned())?;
                let end = line.saturating_add(size);
                // The chunk's data and its CRLF, or as much data as completes the body.
                while raw.len() < end.saturating_add(2)
                    && body.len() + raw.len().min(end).saturating_sub(line) < max_body
                {
                    pull(&mut raw, "the connection closed inside a chunk")?;
                }
                body.extend_from_slice(raw.get(line..end.min(raw.len())).unwrap_or_default());
                if body.len() >= max_body {
                    body.truncate(max_body);
                    return Ok(body);
                }
                raw.drain(..end.saturating_add(2).min(raw.len()));
            }
            Ok(httparse::Status::Partial) if raw.len() > MAX_CHUNK_LINE_BYTES => {
                return Err("chunk-size line too long".to_owned());
            }
            Ok(httparse::Status::Partial) => {
                pull(&mut raw, "the connection closed inside a chunked body")?;
            }
            Err(_) => return Err("malformed chunk size".to_owned()),
        }
    }
}

/// Reads once; a TLS peer that closes without `close_notify` counts as the end.
fn read_some(stream: &mut impl ReadWrite, buf: &mut [u8]) -> Result<usize, String> {
    match stream.read(buf) {
        Ok(n) => Ok(n),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(0),
        Err(e) if e.kind() == io::ErrorKind::TimedOut => Err("timeout".to_owned()),
        Err(e) => Err(format!("reading the answer failed: {e}")),
    }
}

/// A byte stream both ways: the plain connection or TLS over it.
pub trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server answer fed `step` bytes per read; what the client writes is kept.
    struct Peer {
        answer: Vec<u8>,
        at: usize,
        step: usize,
        written: Vec<u8>,
    }

    impl Peer {
        fn new(answer: &[u8], step: usize) -> Self {
            Self {
                answer: answer.to_vec(),
                at: 0,
                step,
                written: Vec::new(),
            }
        }
    }

    impl Read for Peer {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let rest = &self.answer[self.at..];
            let n = rest.len().min(buf.len()).min(self.step);
            buf[..n].copy_from_slice(&rest[..n]);
            self.at += n;
            Ok(n)
        }
    }

    impl Write for Peer {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.written.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn answer(raw: &[u8], step: usize, max_body: usize) -> Result<Answer, String> {
        exchange(
            &mut Peer::new(raw, step),
            b"GET / HTTP/1.1\r\n\r\n",
            max_body,
        )
    }

    fn chunked(body: &[u8], size: usize, extension: &str) -> Vec<u8> {
        let mut out = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        for part in body.chunks(size) {
            out.extend_from_slice(format!("{:x}{extension}\r\n", part.len()).as_bytes());
            out.extend_from_slice(part);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"0\r\n\r\n");
        out
    }

    #[test]
    fn content_length_body_and_cache_control() {
        let raw =
            b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nContent-Length: 5\r\n\r\nhelloEXTRA";
        for step in [1, 3, 4096] {
            let a = answer(raw, step, 100).unwrap();
            assert_eq!(a.status, 200);
            assert_eq!(a.body, b"hello");
            assert_eq!(a.cache_control.as_deref(), Some("max-age=60"));
        }
        let a = answer(raw, 4096, 2).unwrap();
        assert_eq!(a.body, b"he", "truncated to max_body");
    }

    #[test]
    fn chunked_bodies_in_any_read_sizes() {
        let body = br#"{"sub":"@alice:example.org"}"#;
        for (size, ext) in [(1, ""), (5, ";x=1"), (64, "")] {
            for step in [1, 2, 7, 4096] {
                let a = answer(&chunked(body, size, ext), step, 1000)
                    .unwrap_or_else(|e| panic!("chunks of {size}{ext}, reads of {step}: {e}"));
                assert_eq!(a.body, body, "chunks of {size}, reads of {step}");
            }
        }
        let a = answer(&chunked(body, 3, ""), 5, 10).unwrap();
        assert_eq!(a.body, &body[..10]);
    }

    #[test]
    fn chunk_framing_is_bounded() {
        let long_extension = format!(";{}", "e".repeat(300));
        let err = answer(&chunked(b"abc", 1, &long_extension), 4096, 1000).unwrap_err();
        assert_eq!(err, "chunk-size line too long");
        // Extensions within the line limit, but framing far beyond the body limit.
        let heavy = format!(";{}", "e".repeat(200));
        let err = answer(&chunked(&[b'x'; 200], 1, &heavy), 4096, 1000).unwrap_err();
        assert_eq!(err, "chunked answer with too much framing");
        assert!(answer(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            4096,
            10
        )
        .unwrap_err()
        .contains("malformed chunk size"));
    }

    #[test]
    fn until_close_and_closed_early() {
        let a = answer(b"HTTP/1.0 200 OK\r\n\r\nall of it", 2, 100).unwrap();
        assert_eq!(a.body, b"all of it");
        assert_eq!(
            answer(b"", 10, 10).unwrap_err(),
            "the connection closed before an answer"
        );
        assert_eq!(
            answer(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", 10, 100).unwrap_err(),
            "the connection closed inside the answer body"
        );
    }

    #[test]
    fn bad_heads_are_errors() {
        assert!(answer(b"NOT HTTP\r\n\r\n", 100, 10)
            .unwrap_err()
            .starts_with("malformed answer"));
        let mut huge = b"HTTP/1.1 200 OK\r\n".to_vec();
        huge.extend(std::iter::repeat_n(b'a', MAX_HEAD_BYTES + 10));
        assert_eq!(
            answer(&huge, 4096, 10).unwrap_err(),
            "answer head too large"
        );
        assert!(
            answer(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", 100, 10)
                .unwrap_err()
                .contains("invalid Content-Length")
        );
    }

    #[test]
    fn request_encoding() {
        let callout = Callout {
            target: crate::exchange::CalloutTarget::LiveKit,
            upstream: crate::config::Upstream {
                tls: false,
                authority: "sfu.example.org:7880".to_owned(),
                base_path: String::new(),
            },
            method: "POST",
            path: "/twirp/livekit.RoomService/CreateRoom".to_owned(),
            headers: vec![("content-type", "application/protobuf".to_owned())],
            body: b"\x0a\x01r".to_vec(),
            timeout_ms: 1000,
        };
        let bytes = encode_request(&callout);
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.starts_with(
            "POST /twirp/livekit.RoomService/CreateRoom HTTP/1.1\r\nhost: sfu.example.org:7880\r\n"
        ));
        assert!(text.contains("\r\nconnection: close\r\ncontent-type: application/protobuf\r\ncontent-length: 3\r\n\r\n"));
        assert!(bytes.ends_with(b"\r\n\r\n\x0a\x01r"));
    }
}
