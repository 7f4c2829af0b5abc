//! A gzip request body, decoded as its chunks arrive so an oversized or bomb-like body is refused
//! as soon as it crosses the limit. (Plain bodies stay in Envoy's buffer and are read once, whole;
//! they need nothing from here.)

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

/// Collects a gzip request body chunk by chunk, decoding as it goes.
pub struct GzipBody {
    decoder: Box<MultiGzDecoder<Limited>>,
    wire_len: u64,
    limit: u64,
}

impl GzipBody {
    /// `limit` holds on the bytes received and on the decoded bytes alike.
    pub fn new(limit: u64) -> Self {
        let out = Limited {
            buf: Vec::new(),
            limit,
            exceeded: false,
        };
        GzipBody {
            decoder: Box::new(MultiGzDecoder::new(out)),
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
        let dec = &mut self.decoder;
        dec.write_all(chunk)
            .map_err(|e| gzip_error(dec.get_ref().exceeded, &e))
    }

    /// The whole decoded body.
    pub fn finish(self) -> Result<Vec<u8>, BodyError> {
        let mut dec = self.decoder;
        dec.try_finish()
            .map_err(|e| gzip_error(dec.get_ref().exceeded, &e))?;
        match dec.finish() {
            Ok(out) => Ok(out.buf),
            Err(e) => Err(BodyError::BadGzip(e.to_string())),
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

    fn collect(limit: u64, data: &[u8], chunk: usize) -> Result<Vec<u8>, BodyError> {
        let mut b = GzipBody::new(limit);
        for c in data.chunks(chunk.max(1)) {
            b.push(c)?;
        }
        b.finish()
    }

    #[test]
    fn the_limit_holds_on_the_wire_bytes() {
        let wire = gzip(b"0123456789");
        assert_eq!(collect(wire.len() as u64, &wire, 3).unwrap(), b"0123456789");
        assert_eq!(collect(wire.len() as u64 - 1, &wire, 3), Err(BodyError::TooLarge));
        assert!(matches!(GzipBody::new(1).finish(), Err(BodyError::BadGzip(_))));
    }

    #[test]
    fn gzip_is_decoded_and_bombs_refused() {
        let data = br#"{"upsert_rows":[{"id":1}]}"#;
        assert_eq!(collect(1000, &gzip(data), 5).unwrap(), data);
        let bomb = gzip(&vec![b' '; 1_000_000]);
        assert!(bomb.len() < 10_000);
        assert_eq!(collect(100_000, &bomb, 4096), Err(BodyError::TooLarge));
        assert!(matches!(
            collect(1000, b"not gzip at all", 4),
            Err(BodyError::BadGzip(_))
        ));
        let g = gzip(data);
        assert!(matches!(
            collect(1000, &g[..g.len() - 6], 4),
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
        fn chunking_does_not_change_the_result(data in prop::collection::vec(any::<u8>(), 0..2000), a in 1usize..64, b in 1usize..700) {
            let wire = gzip(&data);
            let one = collect(1 << 20, &wire, wire.len().max(1)).unwrap();
            prop_assert_eq!(&collect(1 << 20, &wire, a).unwrap(), &one);
            prop_assert_eq!(&collect(1 << 20, &wire, b).unwrap(), &one);
            prop_assert_eq!(one, data);
        }
    }
}
