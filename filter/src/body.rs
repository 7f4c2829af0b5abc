//! Request body accumulation: the size limit, and gzip decoding as the chunks arrive so an
//! oversized or bomb-like body is refused as soon as it crosses the limit.

use flate2::write::MultiGzDecoder;
use std::io::{self, Write};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyError {
    /// More than the configured limit (on the wire or after decoding).
    TooLarge,
    /// `content-encoding: gzip` but not a gzip stream.
    BadGzip(String),
}

/// A `Vec` that refuses to grow past a limit.
struct Limited {
    buf: Vec<u8>,
    limit: u64,
    exceeded: bool,
}

impl Write for Limited {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if (self.buf.len() + data.len()) as u64 > self.limit {
            self.exceeded = true;
            return Err(io::Error::other("body limit exceeded"));
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

enum Sink {
    Plain(Limited),
    Gzip(Box<MultiGzDecoder<Limited>>),
}

/// Collects a request body chunk by chunk.
pub struct BodyBuffer {
    sink: Sink,
    wire_len: u64,
    limit: u64,
}

impl BodyBuffer {
    /// `expected` is the `content-length`, if any: a plain body's buffer is sized for it once.
    pub fn new(limit: u64, gzip: bool, expected: Option<u64>) -> Self {
        let capacity = if gzip { 0 } else { expected.unwrap_or(0).min(limit) };
        let buf = Vec::with_capacity(usize::try_from(capacity).unwrap_or(0));
        let out = Limited {
            buf,
            limit,
            exceeded: false,
        };
        let sink = if gzip {
            Sink::Gzip(Box::new(MultiGzDecoder::new(out)))
        } else {
            Sink::Plain(out)
        };
        BodyBuffer {
            sink,
            wire_len: 0,
            limit,
        }
    }

    /// Bytes received so far, as sent by the client.
    pub fn wire_len(&self) -> u64 {
        self.wire_len
    }

    pub fn push(&mut self, chunk: &[u8]) -> Result<(), BodyError> {
        self.wire_len += chunk.len() as u64;
        if self.wire_len > self.limit {
            return Err(BodyError::TooLarge);
        }
        match &mut self.sink {
            Sink::Plain(out) => out.write_all(chunk).map_err(|_| BodyError::TooLarge),
            Sink::Gzip(dec) => dec
                .write_all(chunk)
                .map_err(|e| gzip_error(dec.get_ref().exceeded, &e)),
        }
    }

    /// The whole decoded body.
    pub fn finish(self) -> Result<Vec<u8>, BodyError> {
        match self.sink {
            Sink::Plain(out) => Ok(out.buf),
            Sink::Gzip(mut dec) => {
                dec.try_finish()
                    .map_err(|e| gzip_error(dec.get_ref().exceeded, &e))?;
                match dec.finish() {
                    Ok(out) => Ok(out.buf),
                    Err(e) => Err(BodyError::BadGzip(e.to_string())),
                }
            }
        }
    }
}

fn gzip_error(exceeded: bool, e: &io::Error) -> BodyError {
    if exceeded {
        BodyError::TooLarge
    } else {
        BodyError::BadGzip(e.to_string())
    }
}

/// Whether a `content-encoding` header value means gzip (the only encoding the gateway decodes).
pub fn is_gzip(content_encoding: Option<&str>) -> bool {
    content_encoding
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("gzip") || v.trim().eq_ignore_ascii_case("x-gzip"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use flate2::{write::GzEncoder, Compression};
    use proptest::prelude::*;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut enc = GzEncoder::new(Vec::new(), Compression::default());
        enc.write_all(data).unwrap();
        enc.finish().unwrap()
    }

    fn collect(limit: u64, gz: bool, data: &[u8], chunk: usize) -> Result<Vec<u8>, BodyError> {
        let mut b = BodyBuffer::new(limit, gz, Some(data.len() as u64));
        for c in data.chunks(chunk.max(1)) {
            b.push(c)?;
        }
        b.finish()
    }

    #[test]
    fn plain_bodies_and_limit() {
        assert_eq!(collect(10, false, b"0123456789", 3).unwrap(), b"0123456789");
        assert_eq!(collect(9, false, b"0123456789", 3), Err(BodyError::TooLarge));
        assert_eq!(BodyBuffer::new(1, false, None).finish().unwrap(), b"");
    }

    #[test]
    fn gzip_is_decoded_and_bombs_refused() {
        let data = br#"{"upsert_rows":[{"id":1}]}"#;
        assert_eq!(collect(1000, true, &gzip(data), 5).unwrap(), data);
        let bomb = gzip(&vec![b' '; 1_000_000]);
        assert!(bomb.len() < 10_000);
        assert_eq!(collect(100_000, true, &bomb, 4096), Err(BodyError::TooLarge));
        assert!(matches!(
            collect(1000, true, b"not gzip at all", 4),
            Err(BodyError::BadGzip(_))
        ));
        let g = gzip(data);
        assert!(matches!(
            collect(1000, true, &g[..g.len() - 6], 4),
            Err(BodyError::BadGzip(_))
        ));
    }

    #[test]
    fn gzip_header_values() {
        assert!(is_gzip(Some("gzip")) && is_gzip(Some(" GZIP ")) && is_gzip(Some("x-gzip")));
        assert!(!is_gzip(None) && !is_gzip(Some("br")) && !is_gzip(Some("identity")));
    }

    proptest! {
        #[test]
        fn chunking_does_not_change_the_result(data in prop::collection::vec(any::<u8>(), 0..2000), a in 1usize..64, b in 1usize..700, gz in any::<bool>()) {
            let wire = if gz { gzip(&data) } else { data.clone() };
            let one = collect(1 << 20, gz, &wire, wire.len().max(1)).unwrap();
            prop_assert_eq!(&collect(1 << 20, gz, &wire, a).unwrap(), &one);
            prop_assert_eq!(&collect(1 << 20, gz, &wire, b).unwrap(), &one);
            prop_assert_eq!(one, data);
        }
    }
}
