//! A single-pass JSON cursor over a byte slice.
//!
//! It validates JSON grammar as it goes and reports byte positions, so callers can find where
//! members and values begin and end and splice new bytes in without building a document tree.
//! Numbers and strings are checked and skipped as tokens: a vector of 1536 floats is never parsed
//! into floats. String content and runs of `number,` elements are skipped a block at a time
//! ([`blocks`]); the byte-at-a-time cursor takes over wherever a block holds something to look at
//! closely, so what is accepted and every error's offset are the same either way.

use std::fmt;

pub mod blocks;
pub mod spans;

/// Nesting deeper than this is refused rather than risking the wasm stack.
pub const MAX_DEPTH: usize = 128;

/// A grammar error at a byte offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntaxError {
    pub offset: usize,
    pub problem: &'static str,
}

impl fmt::Display for SyntaxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at byte {}", self.problem, self.offset)
    }
}

pub type Result<T> = std::result::Result<T, SyntaxError>;

/// The type of a JSON value, from its first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Object,
    Array,
    String,
    Number,
    Bool,
    Null,
}

impl Kind {
    /// The kind as a message names it ("an object", "null").
    pub fn described(self) -> &'static str {
        match self {
            Kind::Object => "an object",
            Kind::Array => "an array",
            Kind::String => "a string",
            Kind::Number => "a number",
            Kind::Bool => "a boolean",
            Kind::Null => "null",
        }
    }
}

/// Where a string token sits: `start..end` is the content between the quotes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StrToken {
    pub start: usize,
    pub end: usize,
    /// The content holds backslash escapes and must be decoded before comparing.
    pub escaped: bool,
}

// Byte classes inside a string.
const PLAIN: u8 = 0;
const QUOTE: u8 = 1;
const BACKSLASH: u8 = 2;
const CONTROL: u8 = 3;
const HIGH: u8 = 4;

const STRING_CLASS: [u8; 256] = {
    let mut t = [PLAIN; 256];
    let mut i = 0;
    while i < 0x20 {
        t[i] = CONTROL;
        i += 1;
    }
    t[b'"' as usize] = QUOTE;
    t[b'\\' as usize] = BACKSLASH;
    let mut h = 0x80;
    while h < 256 {
        t[h] = HIGH;
        h += 1;
    }
    t
};

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;

#[inline]
fn word(b: &[u8], i: usize) -> Option<u64> {
    let bytes: [u8; 8] = b.get(i..i + 8)?.try_into().ok()?;
    Some(u64::from_le_bytes(bytes))
}

/// Numbers whose integer digits plus positive exponent stay within this are far from overflowing
/// an f64 (its largest is about 1.8e308); larger ones are checked by serde_json.
const MAX_SAFE_DIGITS: usize = 300;

/// Whether the decimal exponent `digits` is at least `limit`, without overflowing.
fn exponent_at_least(digits: &[u8], limit: usize) -> bool {
    let mut value = 0usize;
    for &d in digits {
        value = value.saturating_mul(10).saturating_add(usize::from(d - b'0'));
        if value >= limit {
            return true;
        }
    }
    value >= limit
}

/// The value of four hex digits (validated by the caller).
fn hex4(h: &[u8]) -> u32 {
    h.iter()
        .fold(0, |acc, &c| acc * 16 + (c as char).to_digit(16).unwrap_or(0))
}

/// Index of the first byte at or after `i` that is not an ASCII digit, eight bytes at a time.
#[inline]
fn digit_run(b: &[u8], mut i: usize) -> usize {
    while let Some(w) = word(b, i) {
        // A byte's high bit is set in `low` if it is below '0' and in `high` if it is above '9'.
        // Digits neither borrow nor carry, so the first flagged byte is exact.
        let low = w.wrapping_sub(0x30 * ONES);
        let high = w.wrapping_add(0x46 * ONES);
        let flags = (low | high) & HIGHS;
        if flags != 0 {
            return i + (flags.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while matches!(b.get(i), Some(b'0'..=b'9')) {
        i += 1;
    }
    i
}

/// Checks the `\u` escape at `b[i..]` (its backslash at `i`) and returns its length: 6, or 12 for
/// a surrogate pair. UTF-16 surrogates come in pairs (a high one, then a low one), as serde_json
/// requires: a lone one names no character.
fn unicode_escape(b: &[u8], i: usize) -> std::result::Result<usize, &'static str> {
    let Some(hex) = b
        .get(i + 2..i + 6)
        .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
    else {
        return Err("invalid \\u escape in string");
    };
    match hex4(hex) {
        0xD800..=0xDBFF => {
            let low = b
                .get(i + 6..i + 12)
                .filter(|l| l[0] == b'\\' && l[1] == b'u')
                .filter(|l| l[2..].iter().all(u8::is_ascii_hexdigit))
                .map(|l| hex4(&l[2..]));
            if matches!(low, Some(0xDC00..=0xDFFF)) {
                Ok(12)
            } else {
                Err("lone surrogate in \\u escape")
            }
        }
        0xDC00..=0xDFFF => Err("lone surrogate in \\u escape"),
        _ => Ok(6),
    }
}

#[cfg(test)]
thread_local! {
    /// Set by tests to run the byte-at-a-time cursor alone, the reference for the block paths.
    static BYTEWISE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the block-at-a-time paths run (always, outside tests).
#[inline]
fn blocks_on() -> bool {
    #[cfg(test)]
    return !BYTEWISE.with(std::cell::Cell::get);
    #[cfg(not(test))]
    true
}

/// A cursor over a JSON text.
pub struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
    depth: usize,
}

impl<'a> Cursor<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Cursor {
            bytes,
            pos: 0,
            depth: 0,
        }
    }

    pub fn pos(&self) -> usize {
        self.pos
    }

    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    pub fn error<T>(&self, problem: &'static str) -> Result<T> {
        Err(SyntaxError {
            offset: self.pos,
            problem,
        })
    }

    fn eof<T>(&self) -> Result<T> {
        Err(SyntaxError {
            offset: self.bytes.len(),
            problem: "unexpected end of input",
        })
    }

    /// Skips JSON whitespace.
    #[inline]
    pub fn skip_ws(&mut self) {
        while let Some(&c) = self.bytes.get(self.pos) {
            // Most calls find a token at once: one compare rules out every byte above a space.
            if c <= b' ' && (c == b' ' || c == b'\n' || c == b'\r' || c == b'\t') {
                self.pos += 1;
            } else {
                break;
            }
        }
    }

    /// The next non-whitespace byte, without consuming it.
    #[inline]
    pub fn peek(&mut self) -> Option<u8> {
        self.skip_ws();
        self.bytes.get(self.pos).copied()
    }

    /// The kind of the value starting at the next non-whitespace byte.
    pub fn peek_kind(&mut self) -> Result<Kind> {
        match self.peek() {
            None => self.eof(),
            Some(b'{') => Ok(Kind::Object),
            Some(b'[') => Ok(Kind::Array),
            Some(b'"') => Ok(Kind::String),
            Some(b'-' | b'0'..=b'9') => Ok(Kind::Number),
            Some(b't' | b'f') => Ok(Kind::Bool),
            Some(b'n') => Ok(Kind::Null),
            Some(_) => self.error("expected a JSON value"),
        }
    }

    /// Consumes the byte `c` after optional whitespace.
    pub fn expect(&mut self, c: u8, problem: &'static str) -> Result<()> {
        match self.peek() {
            Some(x) if x == c => {
                self.pos += 1;
                Ok(())
            }
            Some(_) => self.error(problem),
            None => self.eof(),
        }
    }

    /// Requires that only whitespace remains.
    pub fn finish(&mut self) -> Result<()> {
        match self.peek() {
            None => Ok(()),
            Some(_) => self.error("trailing characters after the JSON value"),
        }
    }

    /// Skips one value of any kind, validating it, and returns its kind.
    #[inline]
    pub fn skip_value(&mut self) -> Result<Kind> {
        let kind = self.peek_kind()?;
        match kind {
            Kind::String => {
                self.string_here()?;
            }
            Kind::Number => self.number_here()?,
            _ => self.skip_other(kind)?,
        }
        Ok(kind)
    }

    /// [`Cursor::skip_value`] past the kinds it handles inline (objects, arrays, literals).
    fn skip_other(&mut self, kind: Kind) -> Result<()> {
        match kind {
            Kind::Object => {
                self.object(|cur, _key| cur.skip_value().map(|_| ()))?;
            }
            Kind::Array => self.skip_array()?,
            Kind::String => {
                self.string_here()?;
            }
            Kind::Number => self.number_here()?,
            Kind::Bool => {
                if self.bytes[self.pos] == b't' {
                    self.literal(b"true")?;
                } else {
                    self.literal(b"false")?;
                }
            }
            Kind::Null => self.literal(b"null")?,
        }
        Ok(())
    }

    /// Skips an array; the hot path of vectors sent as number arrays.
    fn skip_array(&mut self) -> Result<()> {
        self.expect(b'[', "expected an array")?;
        self.enter()?;
        if self.peek() == Some(b']') {
            self.pos += 1;
            self.depth -= 1;
            return Ok(());
        }
        loop {
            match self.bytes.get(self.pos) {
                Some(b'-' | b'0'..=b'9') => {
                    // Whole `number,` elements a block at a time; the cursor takes over at the
                    // first element they do not cover.
                    let run_end = if blocks_on() {
                        blocks::number_run(self.bytes, self.pos)
                    } else {
                        self.pos
                    };
                    if run_end != self.pos {
                        self.pos = run_end;
                        self.skip_ws();
                        continue;
                    }
                    self.number_here()?
                }
                Some(_) => {
                    self.skip_value()?;
                }
                None => return self.eof(),
            }
            let next = match self.bytes.get(self.pos) {
                Some(&c @ (b',' | b']')) => c,
                _ => match self.peek() {
                    Some(c) => c,
                    None => return self.eof(),
                },
            };
            self.pos += 1;
            match next {
                b',' => self.skip_ws(),
                b']' => {
                    self.depth -= 1;
                    return Ok(());
                }
                _ => {
                    self.pos -= 1;
                    return self.error("expected ',' or ']' in array");
                }
            }
        }
    }

    fn literal(&mut self, lit: &'static [u8]) -> Result<()> {
        match self.bytes.get(self.pos..self.pos + lit.len()) {
            Some(s) if s == lit => {
                self.pos += lit.len();
                Ok(())
            }
            Some(_) => self.error("invalid literal"),
            None => self.eof(),
        }
    }

    /// Consumes a number token, checking the JSON number grammar.
    pub fn number(&mut self) -> Result<()> {
        self.skip_ws();
        self.number_here()
    }

    #[inline]
    fn number_here(&mut self) -> Result<()> {
        let b = self.bytes;
        let start = self.pos;
        let mut i = start;
        if b.get(i) == Some(&b'-') {
            i += 1;
        }
        let int_start = i;
        match b.get(i) {
            Some(b'0') => i += 1,
            Some(b'1'..=b'9') => i = digit_run(b, i + 1),
            _ => {
                self.pos = i;
                return self.error("invalid number");
            }
        }
        let int_digits = i - int_start;
        if b.get(i) == Some(&b'.') {
            i += 1;
            if !matches!(b.get(i), Some(b'0'..=b'9')) {
                self.pos = i;
                return self.error("invalid number");
            }
            i = digit_run(b, i + 1);
        }
        let mut big = int_digits > MAX_SAFE_DIGITS;
        if matches!(b.get(i), Some(b'e' | b'E')) {
            i += 1;
            let negative = b.get(i) == Some(&b'-');
            if matches!(b.get(i), Some(b'+' | b'-')) {
                i += 1;
            }
            if !matches!(b.get(i), Some(b'0'..=b'9')) {
                self.pos = i;
                return self.error("invalid number");
            }
            let exp_start = i;
            i = digit_run(b, i + 1);
            big |= !negative
                && exponent_at_least(
                    &b[exp_start..i],
                    MAX_SAFE_DIGITS - int_digits.min(MAX_SAFE_DIGITS),
                );
        }
        // A number that may not fit an f64 gets serde_json's own verdict, so the two always agree
        // on which numbers are valid (serde_json refuses one that overflows, e.g. 1e400).
        if big && serde_json::from_slice::<serde_json::Value>(&b[start..i]).is_err() {
            self.pos = start;
            return self.error("number out of range");
        }
        self.pos = i;
        Ok(())
    }

    /// Consumes a string token and returns where its content is.
    pub fn string(&mut self) -> Result<StrToken> {
        self.expect(b'"', "expected a string")?;
        self.string_content()
    }

    /// A string token whose opening quote is the byte at the cursor.
    #[inline]
    fn string_here(&mut self) -> Result<StrToken> {
        self.pos += 1;
        self.string_content()
    }

    /// The rest of a string token, after its opening quote. Most strings (names, short values)
    /// end in the first block with nothing to look at on the way.
    #[inline]
    fn string_content(&mut self) -> Result<StrToken> {
        let start = self.pos;
        if blocks_on() {
            if let Some(end) = blocks::plain_string_end(self.bytes, start) {
                self.pos = end + 1;
                return Ok(StrToken {
                    start,
                    end,
                    escaped: false,
                });
            }
        }
        self.string_rest(start)
    }

    /// A string token from its content's `start`, byte by byte past escapes, control and
    /// non-ASCII bytes.
    fn string_rest(&mut self, start: usize) -> Result<StrToken> {
        let b = self.bytes;
        let mut i = start;
        let mut escaped = false;
        let mut high = false;
        loop {
            if blocks_on() {
                i = blocks::plain_run(b, i);
            }
            let Some(&c) = b.get(i) else {
                self.pos = i;
                return self.eof();
            };
            match STRING_CLASS[c as usize] {
                PLAIN => i += 1,
                QUOTE => break,
                BACKSLASH => {
                    escaped = true;
                    match b.get(i + 1) {
                        Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => i += 2,
                        Some(b'u') => match unicode_escape(b, i) {
                            Ok(len) => i += len,
                            Err(problem) => {
                                self.pos = i;
                                return self.error(problem);
                            }
                        },
                        Some(_) => {
                            self.pos = i;
                            return self.error("invalid escape in string");
                        }
                        None => {
                            self.pos = i;
                            return self.eof();
                        }
                    }
                }
                CONTROL => {
                    self.pos = i;
                    return self.error("control character in string");
                }
                _ => {
                    high = true;
                    i += 1;
                }
            }
        }
        if high && std::str::from_utf8(&b[start..i]).is_err() {
            self.pos = start;
            return self.error("invalid UTF-8 in string");
        }
        self.pos = i + 1;
        Ok(StrToken {
            start,
            end: i,
            escaped,
        })
    }

    /// Walks an object. For each member, `member` is called with the cursor positioned at the
    /// member's value and must consume exactly that value. Returns the offset of the closing `}`.
    pub fn object(&mut self, mut member: impl FnMut(&mut Self, Member) -> Result<()>) -> Result<usize> {
        self.expect(b'{', "expected an object")?;
        self.enter()?;
        if self.peek() == Some(b'}') {
            let close = self.pos;
            self.pos += 1;
            self.depth -= 1;
            return Ok(close);
        }
        let mut index = 0;
        loop {
            self.skip_ws();
            let key_start = self.pos;
            if self.bytes.get(self.pos) != Some(&b'"') {
                return if self.pos >= self.bytes.len() {
                    self.eof()
                } else {
                    self.error("expected a member name")
                };
            }
            let key = self.string_here()?;
            // Compact JSON has the colon right after the name.
            if self.bytes.get(self.pos) == Some(&b':') {
                self.pos += 1;
            } else {
                self.expect(b':', "expected ':' after a member name")?;
            }
            self.skip_ws();
            member(
                self,
                Member {
                    index,
                    key_start,
                    key,
                },
            )?;
            index += 1;
            let next = match self.bytes.get(self.pos) {
                Some(&c @ (b',' | b'}')) => Some(c),
                _ => self.peek(),
            };
            match next {
                Some(b',') => self.pos += 1,
                Some(b'}') => {
                    let close = self.pos;
                    self.pos += 1;
                    self.depth -= 1;
                    return Ok(close);
                }
                Some(_) => return self.error("expected ',' or '}' in object"),
                None => return self.eof(),
            }
        }
    }

    /// Walks an array. `element` is called with the cursor at each element and must consume it.
    /// Returns the number of elements.
    pub fn array(&mut self, mut element: impl FnMut(&mut Self) -> Result<()>) -> Result<usize> {
        self.expect(b'[', "expected an array")?;
        self.enter()?;
        if self.peek() == Some(b']') {
            self.pos += 1;
            self.depth -= 1;
            return Ok(0);
        }
        let mut count = 0;
        loop {
            self.skip_ws();
            element(self)?;
            count += 1;
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b']') => {
                    self.pos += 1;
                    self.depth -= 1;
                    return Ok(count);
                }
                Some(_) => return self.error("expected ',' or ']' in array"),
                None => return self.eof(),
            }
        }
    }

    fn enter(&mut self) -> Result<()> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return self.error("nesting too deep");
        }
        Ok(())
    }

    /// The decoded text of a string token (allocates only when it has escapes).
    pub fn text(&self, tok: StrToken) -> std::borrow::Cow<'a, str> {
        decode(self.bytes, tok)
    }
}

/// One object member as seen by [`Cursor::object`].
#[derive(Debug, Clone, Copy)]
pub struct Member {
    /// Position among the object's members.
    pub index: usize,
    /// Offset of the opening quote of the member name.
    pub key_start: usize,
    pub key: StrToken,
}

/// The member names of one object seen so far, to find one given twice. Names compare decoded, so
/// `"id"` and `"\u0069d"` are the same member, as any JSON parser sees them. A 64-bit filter of
/// cheap fingerprints spares the comparisons for names that cannot match, which is nearly all of
/// them: this runs for every member of every row.
#[derive(Debug, Default)]
pub struct Names {
    filter: u64,
    escaped: bool,
    seen: Vec<StrToken>,
}

impl Names {
    /// Forgets the names (keeps the buffer for the next object).
    pub fn clear(&mut self) {
        self.filter = 0;
        self.escaped = false;
        self.seen.clear();
    }

    /// Records `key`; true if the object already had a member of that name.
    #[inline]
    pub fn repeats(&mut self, bytes: &[u8], key: StrToken) -> bool {
        let raw = bytes.get(key.start..key.end).unwrap_or_default();
        let found = if key.escaped || self.escaped {
            self.escaped = true;
            self.seen
                .iter()
                .any(|other| decode(bytes, *other) == decode(bytes, key))
        } else {
            let bit = 1u64 << (fingerprint(raw) & 63);
            let maybe = self.filter & bit != 0;
            self.filter |= bit;
            maybe
                && self
                    .seen
                    .iter()
                    .any(|other| bytes.get(other.start..other.end) == Some(raw))
        };
        if !found {
            self.seen.push(key);
        }
        found
    }
}

/// A cheap hash of a name's raw bytes: its length and first and last bytes.
#[inline]
fn fingerprint(raw: &[u8]) -> usize {
    let first = raw.first().copied().unwrap_or(0) as usize;
    let last = raw.last().copied().unwrap_or(0) as usize;
    raw.len().wrapping_mul(31) ^ first.wrapping_mul(7) ^ last.wrapping_mul(13)
}

/// Plans the removal of some members of one object, each with one adjacent comma, so that what
/// remains is still a valid object. Feed it every member in order, then close it.
#[derive(Debug, Default)]
pub struct MemberCuts {
    prev_end: Option<usize>,
    /// A dropped member with no kept member before it: its cut runs to the next member's start.
    pending: Option<usize>,
    ranges: Vec<(usize, usize)>,
}

impl MemberCuts {
    /// At the start of a member, before its value is consumed.
    pub fn begin(&mut self, member: &Member) {
        if let Some(start) = self.pending.take() {
            self.ranges.push((start, member.key_start));
        }
    }

    /// After a member's value; `drop` removes the member.
    pub fn end(&mut self, member: &Member, value_end: usize, drop: bool) {
        match (drop, self.prev_end) {
            (true, Some(prev)) => self.ranges.push((prev, value_end)),
            (true, None) => {
                self.pending = Some(member.key_start);
                return;
            }
            (false, _) => {}
        }
        self.prev_end = Some(value_end);
    }

    /// The byte ranges to remove, given the offset of the object's closing brace.
    pub fn close(mut self, close: usize) -> Vec<(usize, usize)> {
        if let Some(start) = self.pending.take() {
            self.ranges.push((start, close));
        }
        self.ranges
    }
}

/// Decodes a validated string token.
pub fn decode(bytes: &[u8], tok: StrToken) -> std::borrow::Cow<'_, str> {
    let raw = &bytes[tok.start..tok.end];
    if !tok.escaped {
        // Validated by `Cursor::string`, so this borrows (and is not the lossy walk, which costs
        // more on every member name of every row).
        return match std::str::from_utf8(raw) {
            Ok(text) => std::borrow::Cow::Borrowed(text),
            Err(_) => String::from_utf8_lossy(raw),
        };
    }
    let mut quoted = Vec::with_capacity(raw.len() + 2);
    quoted.push(b'"');
    quoted.extend_from_slice(raw);
    quoted.push(b'"');
    // Lone surrogates are valid JSON grammar but not a Rust string; replace them.
    match serde_json::from_slice::<String>(&quoted) {
        Ok(s) => std::borrow::Cow::Owned(s),
        Err(_) => String::from_utf8_lossy(raw).into_owned().into(),
    }
}

/// Validates a whole JSON text.
pub fn validate(bytes: &[u8]) -> Result<Kind> {
    let mut cur = Cursor::new(bytes);
    let kind = cur.skip_value()?;
    cur.finish()?;
    Ok(kind)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn accepts_what_serde_json_accepts() {
        for text in [
            "{}",
            "[]",
            " {\"a\" : [1, -2.5e+3, 0, true, false, null, \"x\\u00e9\\n\"]} ",
            "\"caf\u{e9}\"",
            "-0.0E-1",
            "[[[[]]]]",
        ] {
            assert!(validate(text.as_bytes()).is_ok(), "{text}");
            assert!(serde_json::from_str::<serde_json::Value>(text).is_ok(), "{text}");
        }
    }

    #[test]
    fn rejects_bad_grammar_with_offsets() {
        let cases: &[(&str, usize)] = &[
            ("", 0),
            ("{", 1),
            ("{\"a\":1,}", 7),
            ("[1 2]", 3),
            ("01", 1),
            ("1.", 2),
            ("-", 1),
            ("\"a\\x\"", 2),
            ("{\"a\" 1}", 5),
            ("nul", 3),
            ("{} x", 3),
            ("\"\u{1}\"", 1),
            ("{1:2}", 1),
        ];
        for (text, offset) in cases {
            let err = validate(text.as_bytes()).unwrap_err();
            assert_eq!(err.offset, *offset, "{text:?}: {err}");
            assert!(serde_json::from_str::<serde_json::Value>(text).is_err(), "{text}");
        }
    }

    #[test]
    fn rejects_invalid_utf8_and_deep_nesting() {
        assert!(validate(b"\"\xff\"").is_err());
        let deep = "[".repeat(MAX_DEPTH + 1) + &"]".repeat(MAX_DEPTH + 1);
        assert_eq!(validate(deep.as_bytes()).unwrap_err().problem, "nesting too deep");
        let ok = "[".repeat(MAX_DEPTH) + &"]".repeat(MAX_DEPTH);
        assert!(validate(ok.as_bytes()).is_ok());
    }

    #[test]
    fn surrogates_must_pair_and_numbers_must_fit_like_serde_json_says() {
        for (text, offset) in [
            (r#""\ud800""#, 1),
            (r#""\udc00""#, 1),
            (r#""ab\ud800\u0041""#, 3),
            (r#""\ud800\ud800""#, 1),
            (r#""\ud800x""#, 1),
            (r#""\uDBFF\""#, 1),
            ("1e400", 0),
            ("-1e400", 0),
            ("[1, 1.8e308]", 4),
            ("1.7976931348623158e308", 0),
            ("1e99999999999999999999", 0),
        ] {
            let err = validate(text.as_bytes()).unwrap_err();
            assert_eq!(err.offset, offset, "{text}: {err}");
            assert!(serde_json::from_str::<serde_json::Value>(text).is_err(), "{text}");
        }
        let long = format!("1{}", "0".repeat(400));
        assert!(validate(long.as_bytes()).is_err());
        for text in [
            r#""\ud800\udc00""#,
            r#""\uDBFF\uDFFF x""#,
            r#""\ud7ff\ue000""#,
            "1e308",
            "1.7976931348623157e308",
            "17976931348623157e292",
            "1e-400",
            "0e99999999999999999999",
            "123456789012345678901234567890",
            "0.0000000000000000000000000000001e330",
        ] {
            assert!(validate(text.as_bytes()).is_ok(), "{text}");
            assert!(serde_json::from_str::<serde_json::Value>(text).is_ok(), "{text}");
        }
    }

    #[test]
    fn repeated_names_are_found_decoded() {
        let text = br#"{"id":1,"a":2,"\u0069d":3,"ab":4,"a":5}"#;
        let mut cur = Cursor::new(text);
        let mut seen = Names::default();
        let mut repeated = Vec::new();
        cur.object(|cur, m| {
            if seen.repeats(cur.bytes(), m.key) {
                repeated.push(m.key_start);
            }
            cur.skip_value().map(|_| ())
        })
        .unwrap();
        assert_eq!(repeated, vec![14, 33]);
    }

    #[test]
    fn decodes_escaped_names() {
        let text = br#""\u005fhevlayer_x""#;
        let mut cur = Cursor::new(text);
        let tok = cur.string().unwrap();
        assert!(tok.escaped);
        assert_eq!(cur.text(tok), "_hevlayer_x");
    }

    /// The outcome of validating `text` with the block paths on or off.
    fn validated(text: &[u8], blocks: bool) -> Result<Kind> {
        BYTEWISE.with(|b| b.set(!blocks));
        let outcome = validate(text);
        BYTEWISE.with(|b| b.set(false));
        outcome
    }

    #[test]
    fn block_paths_report_what_the_bytewise_cursor_reports() {
        let numbers: Vec<String> = (0..200).map(|i| format!("{}.{}", i % 7, i * 37)).collect();
        let good = format!("[{}]", numbers.join(","));
        let mut cases = vec![good.clone()];
        for (at, with) in [
            (20, "01"),
            (60, "1e400"),
            (100, "1.2.3"),
            (140, " "),
            (180, "\"a\""),
        ] {
            let mut bad = numbers.clone();
            bad[at] = with.to_owned();
            cases.push(format!("[{}]", bad.join(",")));
        }
        cases.push(format!(
            "[{}]",
            "\"abcdefghijklmnopqrstuvwxyz\",".repeat(20) + "\"\u{1}\""
        ));
        cases.push(format!("\"{}\\q\"", "x".repeat(150)));
        for text in &cases {
            assert_eq!(
                validated(text.as_bytes(), true),
                validated(text.as_bytes(), false),
                "{text}"
            );
        }
        assert!(validated(good.as_bytes(), true).is_ok());
    }

    proptest::proptest! {
        #[test]
        fn block_paths_agree_with_the_bytewise_cursor(
            parts in proptest::collection::vec(proptest::prop_oneof![
                6 => "-?(0|[1-9][0-9]{0,6})(\\.[0-9]{1,8})?([eE][+-]?[0-9]{1,3})?",
                2 => "[0-9eE.+\\-]{1,5}",
                2 => "\"([a-zA-Z0-9 ]|\\\\[nu\"]|\u{e9}|\u{1}){0,40}\"",
                1 => "[ \\[\\]{}:,tn]",
            ], 0..60),
            seps in proptest::collection::vec("[,]|, |,\\]", 60),
        ) {
            let mut text = String::from("[");
            for (p, sep) in parts.iter().zip(&seps) {
                text.push_str(p);
                text.push_str(sep);
            }
            text.push_str("0]");
            let fast = validated(text.as_bytes(), true);
            proptest::prop_assert_eq!(&fast, &validated(text.as_bytes(), false), "{}", text);
            proptest::prop_assert_eq!(fast.is_ok(), serde_json::from_str::<serde_json::Value>(&text).is_ok());
        }

        #[test]
        fn agrees_with_serde_json_on_arbitrary_bytes(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            let ours = validate(&bytes).is_ok();
            let theirs = serde_json::from_slice::<serde_json::Value>(&bytes).is_ok();
            proptest::prop_assert_eq!(ours, theirs);
        }

        #[test]
        fn agrees_with_serde_json_on_json_like_text(text in "[\\[\\]{}\",:0-9a-z.eE+\\- \\\\]{0,40}") {
            let ours = validate(text.as_bytes()).is_ok();
            let theirs = serde_json::from_str::<serde_json::Value>(&text).is_ok();
            proptest::prop_assert_eq!(ours, theirs);
        }

        #[test]
        fn agrees_with_serde_json_on_escapes_and_big_numbers(
            parts in proptest::collection::vec(proptest::prop_oneof![
                "\\\\u[dD][89abAB][0-9a-fA-F]{2}",
                "\\\\u[dD][c-fC-F][0-9a-fA-F]{2}",
                "\\\\u[0-9a-fA-F]{4}",
                "[a-z\\\\\"]",
            ], 0..6),
            mantissa in "-?[1-9][0-9]{0,20}(\\.[0-9]{1,20})?",
            exponent in proptest::option::of(-400i32..700),
        ) {
            let string = format!("\"{}\"", parts.concat());
            let number = match exponent {
                Some(e) => format!("{mantissa}e{e}"),
                None => mantissa,
            };
            for text in [string.clone(), number.clone(), format!("[{string},{number}]")] {
                let ours = validate(text.as_bytes()).is_ok();
                let theirs = serde_json::from_str::<serde_json::Value>(&text).is_ok();
                proptest::prop_assert_eq!(ours, theirs, "{}", text);
            }
        }
    }
}
