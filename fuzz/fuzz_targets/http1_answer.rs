//! Fuzzes the Traefik plugin's HTTP/1.1 answer reader (src/http1.rs) with arbitrary server
//! bytes, handed out in pieces of a fuzzed size: never a panic, never more than `max_body`
//! bytes of body.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::io::{Read, Write};

struct Peer<'a> {
    answer: &'a [u8],
    step: usize,
}

impl Read for Peer<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.answer.len().min(buf.len()).min(self.step);
        buf[..n].copy_from_slice(&self.answer[..n]);
        self.answer = &self.answer[n..];
        Ok(n)
    }
}

impl Write for Peer<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let (head, answer) = data.split_at(data.len().min(2));
    let step = usize::from(head.first().copied().unwrap_or(1)).max(1);
    let max_body = usize::from(head.get(1).copied().unwrap_or(0)) * 64;
    let mut peer = Peer { answer, step };
    if let Ok(a) = matrixrtc_livekit_auth::http1::exchange(&mut peer, b"GET / HTTP/1.1\r\n\r\n", max_body) {
        assert!(a.body.len() <= max_body);
    }
});
