//! An object's members as byte spans, read in one tight loop: the fast path for the many small
//! rows of a write. [`Cursor::member_spans`] takes only objects whose member names are unescaped
//! and distinct and whose values are valid JSON; on anything else it puts the cursor back where
//! it was, for [`Cursor::object`] to walk and judge (and report any error exactly as always).

use super::{blocks, digit_run, fingerprint, Cursor, Kind, MAX_DEPTH, MAX_SAFE_DIGITS};

/// One member of an object read by [`Cursor::member_spans`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemberSpan {
    /// Offset of the opening quote of the name.
    pub key_start: usize,
    /// Offset of the closing quote of the name.
    pub key_end: usize,
    pub value_start: usize,
    pub value_end: usize,
    pub kind: Kind,
}

impl MemberSpan {
    /// The name's bytes: without escapes, they are also its decoded text.
    #[inline]
    pub fn name<'a>(&self, bytes: &'a [u8]) -> &'a [u8] {
        bytes.get(self.key_start + 1..self.key_end).unwrap_or_default()
    }
}

/// The members of the last object [`Cursor::member_spans`] read from one text: what it returns,
/// and the likely shape of the next object (rows of a write mostly name the same members in the
/// same order), whose names are then matched with one compare each. Keep one per text while
/// that text lives (a new text, told by its address and length, starts afresh).
#[derive(Debug, Default)]
pub struct Members {
    spans: Vec<MemberSpan>,
    /// The text the spans are in (its address and length).
    text: (usize, usize),
    /// The last read succeeded: the spans are its members.
    read: bool,
    same_names: bool,
}

impl Members {
    pub fn spans(&self) -> &[MemberSpan] {
        &self.spans
    }

    /// Whether the last object read has the same member names in the same order as the one
    /// before it.
    pub fn same_names(&self) -> bool {
        self.same_names
    }
}

/// Where a cursor was, to go back to with [`Cursor::rewind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mark {
    pos: usize,
    depth: usize,
}

/// Whether `b[x..x + len]` and `b[y..y + len]` are the same bytes: a name of up to 16 bytes
/// (quotes included) in one compare of two blocks.
#[inline(always)]
fn same_bytes(b: &[u8], x: usize, y: usize, len: usize) -> bool {
    if len <= 16 {
        if let Some(same) = blocks::same_prefix(b, x, y, len) {
            return same;
        }
    }
    b.get(x..x + len).is_some_and(|p| b.get(y..y + len) == Some(p))
}

/// Past JSON whitespace from `pos`.
#[inline(always)]
fn skip_ws_from(b: &[u8], mut pos: usize) -> usize {
    while let Some(&c) = b.get(pos) {
        if c <= b' ' && (c == b' ' || c == b'\n' || c == b'\r' || c == b'\t') {
            pos += 1;
        } else {
            break;
        }
    }
    pos
}

/// The kind and end of the scalar at `at` if it is one the fast path takes: a string that ends
/// plain within a block, an integer of a few digits, `true`, `false`, `null`. Anything else
/// (and anything invalid) is `None`, for [`Cursor::skip_value`] to judge.
#[inline(always)]
fn scalar_end(b: &[u8], at: usize) -> Option<(Kind, usize)> {
    match *b.get(at)? {
        b'"' => Some((Kind::String, blocks::plain_string_end(b, at + 1)? + 1)),
        b'1'..=b'9' => {
            let end = digit_run(b, at + 1);
            let short = end - at <= MAX_SAFE_DIGITS;
            (short && !matches!(b.get(end), Some(b'.' | b'e' | b'E'))).then_some((Kind::Number, end))
        }
        b'0' => (!matches!(b.get(at + 1), Some(b'0'..=b'9' | b'.' | b'e' | b'E')))
            .then_some((Kind::Number, at + 1)),
        b't' if b.get(at..at + 4) == Some(b"true") => Some((Kind::Bool, at + 4)),
        b'f' if b.get(at..at + 5) == Some(b"false") => Some((Kind::Bool, at + 5)),
        b'n' if b.get(at..at + 4) == Some(b"null") => Some((Kind::Null, at + 4)),
        _ => None,
    }
}

/// The names of one object so far, to find one given twice: a 64-bit filter of their
/// fingerprints, so a name is compared with the others only when its bit is already set. Names
/// are added to the filter only once one needs checking.
#[derive(Default)]
struct NameCheck {
    filter: u64,
    /// How many of the object's names are in the filter.
    filtered: usize,
}

impl NameCheck {
    /// Whether the name at `key_start..=key_end` (quotes included) is one of `spans[..n]`.
    #[inline]
    fn repeated(
        &mut self,
        b: &[u8],
        spans: &[MemberSpan],
        n: usize,
        key_start: usize,
        key_end: usize,
    ) -> bool {
        let earlier = spans.get(..n).unwrap_or_default();
        for m in earlier.get(self.filtered..).unwrap_or_default() {
            self.filter |= 1u64 << (fingerprint(m.name(b)) & 63);
        }
        self.filtered = n;
        let name = b.get(key_start + 1..key_end).unwrap_or_default();
        let bit = 1u64 << (fingerprint(name) & 63);
        let maybe = self.filter & bit != 0;
        self.filter |= bit;
        self.filtered += 1;
        maybe && earlier.iter().any(|m| m.name(b) == name)
    }
}

impl Cursor<'_> {
    pub fn mark(&self) -> Mark {
        Mark {
            pos: self.pos,
            depth: self.depth,
        }
    }

    pub fn rewind(&mut self, mark: Mark) {
        self.pos = mark.pos;
        self.depth = mark.depth;
    }

    /// Reads the object whose `{` is the next non-whitespace byte into `members` and returns the
    /// offset of its closing brace. `None`, with the cursor where it was, when a member name has
    /// escapes or is given twice, or when anything in the object is not valid.
    pub fn member_spans(&mut self, members: &mut Members) -> Option<usize> {
        let text = (self.bytes.as_ptr() as usize, self.bytes.len());
        if members.text != text || !members.read {
            members.spans.clear();
            members.text = text;
        }
        let mark = self.mark();
        let template = members.spans.len();
        let read = self.spans_of_object(&mut members.spans);
        members.same_names = false;
        members.read = read.is_some();
        match read {
            Some((close, same)) => {
                members.same_names = same && template > 0 && members.spans.len() == template;
                Some(close)
            }
            None => {
                self.rewind(mark);
                None
            }
        }
    }

    /// The members into `spans`, over the last object's (the template, whose names are distinct):
    /// the closing brace and whether every name matched the template's at its place. The
    /// common member is read with the position in a local; the cursor catches up before any
    /// out-of-line step.
    #[inline]
    fn spans_of_object(&mut self, spans: &mut Vec<MemberSpan>) -> Option<(usize, bool)> {
        if self.peek() != Some(b'{') || self.enter().is_err() {
            return None;
        }
        self.pos += 1;
        self.skip_ws();
        let b = self.bytes;
        let mut names = NameCheck::default();
        let mut same = true;
        let mut n = 0;
        let mut pos = self.pos;
        if b.get(pos) == Some(&b'}') {
            spans.clear();
            return Some((self.close_object(), true));
        }
        loop {
            let key_start = pos;
            // Names that match the template's in order are distinct, as the template's are.
            let template = spans.get(n).filter(|_| same).map(|t| t.key_end + 1 - t.key_start);
            let key_end = match template {
                Some(len) if same_bytes(b, pos, spans[n].key_start, len) => {
                    pos += len;
                    pos - 1
                }
                _ => {
                    same = false;
                    self.pos = pos;
                    let end = self.other_name(spans, n, &mut names)?;
                    pos = self.pos;
                    end
                }
            };
            if b.get(pos) == Some(&b':') {
                pos += 1;
            } else {
                self.pos = pos;
                self.expect(b':', "").ok()?;
                pos = self.pos;
            }
            pos = skip_ws_from(b, pos);
            let value_start = pos;
            let kind = match scalar_end(b, pos) {
                Some((kind, end)) => {
                    pos = end;
                    kind
                }
                None => {
                    self.pos = pos;
                    let kind = self.other_value()?;
                    pos = self.pos;
                    kind
                }
            };
            let member = MemberSpan {
                key_start,
                key_end,
                value_start,
                value_end: pos,
                kind,
            };
            match spans.get_mut(n) {
                Some(slot) => *slot = member,
                None => spans.push(member),
            }
            n += 1;
            pos = skip_ws_from(b, pos);
            self.pos = pos;
            match b.get(pos) {
                Some(b',') => pos = skip_ws_from(b, pos + 1),
                Some(b'}') => {
                    spans.truncate(n);
                    return Some((self.close_object(), same));
                }
                _ => return None,
            }
        }
    }

    /// A name that is not the template's at its place (or once one was not): read as a string
    /// token without escapes, and checked against the object's earlier names. Returns its
    /// closing quote's offset.
    #[inline(never)]
    fn other_name(&mut self, spans: &[MemberSpan], n: usize, names: &mut NameCheck) -> Option<usize> {
        if self.bytes.get(self.pos) != Some(&b'"') {
            return None;
        }
        let key_start = self.pos;
        let key = self.string_here().ok()?;
        if key.escaped || names.repeated(self.bytes, spans, n, key_start, key.end) {
            return None;
        }
        Some(key.end)
    }

    /// Skips the value at the cursor that [`scalar_end`] did not take: arrays of what it takes
    /// here, anything else by [`Cursor::skip_value`].
    #[inline(never)]
    fn other_value(&mut self) -> Option<Kind> {
        if self.bytes.get(self.pos) == Some(&b'[') && self.span_array() {
            return Some(Kind::Array);
        }
        self.skip_value().ok()
    }

    /// An array at the cursor whose elements [`scalar_end`] takes, with no whitespace between
    /// them, and that does not start with a number; false (the cursor unmoved) when it is any
    /// other array.
    #[inline]
    fn span_array(&mut self) -> bool {
        let b = self.bytes;
        let mut pos = self.pos + 1;
        if self.depth >= MAX_DEPTH {
            return false;
        }
        match b.get(pos) {
            Some(b']') => {}
            // Number arrays (vectors) go the cursor's way, a block of numbers at a time.
            Some(b'0'..=b'9' | b'-') => return false,
            _ => loop {
                let Some((_, end)) = scalar_end(b, pos) else {
                    return false;
                };
                pos = end;
                match b.get(pos) {
                    Some(b',') => pos += 1,
                    Some(b']') => break,
                    _ => return false,
                }
            },
        }
        self.pos = pos + 1;
        true
    }

    /// Past the closing brace at the cursor; returns its offset.
    #[inline]
    fn close_object(&mut self) -> usize {
        let close = self.pos;
        self.pos += 1;
        self.depth -= 1;
        close
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    type Read = Option<(Vec<MemberSpan>, usize, usize)>;

    /// The members [`Cursor::object`] sees in the object at `at`, as spans, or `None` if it
    /// refuses the text or a name has escapes or repeats; and where the walk ended.
    fn walked(text: &[u8], at: usize) -> (Read, Option<usize>) {
        let mut cur = Cursor {
            bytes: text,
            pos: at,
            depth: 0,
        };
        let mut members = Vec::new();
        let mut names = super::super::Names::default();
        let mut plain = true;
        let Ok(close) = cur.object(|cur, m| {
            plain &= !m.key.escaped && !names.repeats(cur.bytes(), m.key);
            let value_start = cur.pos();
            let kind = cur.skip_value()?;
            members.push(MemberSpan {
                key_start: m.key_start,
                key_end: m.key.end,
                value_start,
                value_end: cur.pos(),
                kind,
            });
            Ok(())
        }) else {
            return (None, None);
        };
        (plain.then_some((members, close, cur.pos())), Some(cur.pos()))
    }

    /// Reads the objects of `text` one after the other with one [`Members`], each checked
    /// against the walk.
    fn read_all(text: &[u8]) {
        let mut cur = Cursor::new(text);
        let mut members = Members::default();
        let mut previous: Option<Vec<Vec<u8>>> = None;
        loop {
            let at = cur.pos();
            let (expected, end) = walked(text, at);
            let read = cur
                .member_spans(&mut members)
                .map(|close| (members.spans().to_vec(), close, cur.pos()));
            let text_of =
                |r: &Read| String::from_utf8_lossy(&text[at..r.as_ref().map_or(at, |r| r.2)]).into_owned();
            assert_eq!(read, expected, "{}", text_of(&expected));
            if read.is_none() {
                assert_eq!((cur.pos, cur.depth), (at, 0), "rewound");
            }
            let names: Option<Vec<Vec<u8>>> = read
                .as_ref()
                .map(|r| r.0.iter().map(|m| m.name(text).to_vec()).collect());
            if read.is_some() {
                let nonempty = names.as_ref().is_some_and(|n| !n.is_empty());
                assert_eq!(members.same_names(), nonempty && previous == names);
            }
            previous = names;
            let Some(end) = end else { return };
            cur.pos = end;
            cur.skip_ws();
            if cur.pos >= text.len() {
                return;
            }
        }
    }

    #[test]
    fn reads_what_the_object_walk_sees() {
        for text in [
            r#"{"id":"doc-1","title":"title 1","score":3,"tags":["a","b"],"published":true}"#,
            r#" { "id" : 1 , "v" : [1.5, {"x": null}] , "a long name of many bytes": "x" } "#,
            "{}",
            "{ }",
            r#"{"a":1,"b":2,"a":3}"#,
            r#"{"a":1,"\u0062":2}"#,
            r#"{"a":1,}"#,
            r#"{"a" 1}"#,
            r#"{"a":01}"#,
            r#"{"a":"\ud800"}"#,
            r#"{"a":1"#,
            r#"{"a":1 "b":2}"#,
            "[1]",
            r#"{"é":1,"e":2}"#,
            r#"{"a":1,"b":2} {"a":3,"b":4} {"b":1,"a":2} {"b":1,"b":2} {"a":1,"b":2,"c":3} {"a":1}"#,
            r#"{"a":1,"b":2,"c":3} {"c":1,"b":2,"c":3} {"c":1,"b":2,"a":3} {"c":1,"b":2,"a":3}"#,
        ] {
            read_all(text.as_bytes());
        }
    }

    #[test]
    fn refuses_nesting_past_the_limit_and_rewinds() {
        const MAX: usize = super::super::MAX_DEPTH;
        let deep = format!("{{\"a\":{}{}}}", "[".repeat(MAX), "]".repeat(MAX));
        read_all(deep.as_bytes());
        let mut cur = Cursor::new(deep.as_bytes());
        assert_eq!(cur.member_spans(&mut Members::default()), None);
        assert_eq!(cur.pos(), 0);
    }

    proptest::proptest! {
        #[test]
        fn agrees_with_the_object_walk(
            objects in proptest::collection::vec((
                proptest::collection::vec(
                    ("[a-c]{1,2}|\"|\\\\u0061|[a-z]{17,20}", "1|-0.5|\"x\"|\\[1, 2\\]|\\[1,\"a\"\\]|\\{\"a\":1\\}|true|nul|01|\"\\\\q\""),
                    0..6,
                ),
                "[ \n]{0,1}",
                "\\}|,\\}|",
            ), 1..5),
        ) {
            let objects: Vec<String> = objects
                .iter()
                .map(|(members, ws, tail)| {
                    let body: Vec<String> = members
                        .iter()
                        .map(|(k, v)| format!("{ws}\"{k}\"{ws}:{ws}{v}{ws}"))
                        .collect();
                    format!("{{{}{tail}", body.join(","))
                })
                .collect();
            read_all(objects.join(" ").as_bytes());
        }
    }
}
