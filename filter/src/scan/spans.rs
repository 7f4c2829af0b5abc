//! An object's members as byte spans, read in one tight loop: the fast path for the many small
//! rows of a write. [`Cursor::member_spans`] takes only objects whose member names are unescaped
//! and distinct and whose values are valid JSON; on anything else it puts the cursor back where
//! it was, for [`Cursor::object`] to walk and judge (and report any error exactly as always).

use super::{blocks, fingerprint, Cursor, Kind, MAX_DEPTH};

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

/// Where a cursor was, to go back to with [`Cursor::rewind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mark {
    pos: usize,
    depth: usize,
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

    /// Reads the object whose `{` is the next non-whitespace byte into `members` (cleared first)
    /// and returns the offset of its closing brace. `None`, with the cursor where it was, when a
    /// member name has escapes or is given twice, or when anything in the object is not valid.
    pub fn member_spans(&mut self, members: &mut Vec<MemberSpan>) -> Option<usize> {
        let mark = self.mark();
        members.clear();
        let close = self.spans_of_object(members);
        if close.is_none() {
            self.rewind(mark);
        }
        close
    }

    #[inline]
    fn spans_of_object(&mut self, members: &mut Vec<MemberSpan>) -> Option<usize> {
        if self.peek() != Some(b'{') {
            return None;
        }
        self.pos += 1;
        self.enter().ok()?;
        self.skip_ws();
        // A 64-bit filter of the names' fingerprints: a name is compared with the others only
        // when its bit is already set.
        let mut seen = 0u64;
        let mut next = self.bytes.get(self.pos).copied();
        if next == Some(b'}') {
            return Some(self.close_object());
        }
        loop {
            if next != Some(b'"') {
                return None;
            }
            let member = self.span_of_member()?;
            let name = member.name(self.bytes);
            let bit = 1u64 << (fingerprint(name) & 63);
            if seen & bit != 0 && members.iter().any(|m| m.name(self.bytes) == name) {
                return None;
            }
            seen |= bit;
            members.push(member);
            next = match self.bytes.get(self.pos) {
                Some(&c @ (b',' | b'}')) => Some(c),
                _ => self.peek(),
            };
            match next {
                Some(b',') => {
                    self.pos += 1;
                    self.skip_ws();
                    next = self.bytes.get(self.pos).copied();
                }
                Some(b'}') => return Some(self.close_object()),
                _ => return None,
            }
        }
    }

    /// One member from its name's opening quote (the byte at the cursor) to the end of its value.
    #[inline]
    fn span_of_member(&mut self) -> Option<MemberSpan> {
        let key_start = self.pos;
        let key = self.string_here().ok()?;
        if key.escaped {
            return None;
        }
        if self.bytes.get(self.pos) == Some(&b':') {
            self.pos += 1;
        } else {
            self.expect(b':', "").ok()?;
        }
        self.skip_ws();
        let value_start = self.pos;
        let kind = self.span_value()?;
        Some(MemberSpan {
            key_start,
            key_end: key.end,
            value_start,
            value_end: self.pos,
            kind,
        })
    }

    /// Skips the value at the cursor (after whitespace): short plain strings, numbers, literals
    /// and arrays of those here, anything else by [`Cursor::skip_value`].
    #[inline]
    fn span_value(&mut self) -> Option<Kind> {
        if let Some(kind) = self.span_scalar() {
            return Some(kind);
        }
        if self.bytes.get(self.pos) == Some(&b'[') && self.span_array() {
            return Some(Kind::Array);
        }
        self.skip_value().ok()
    }

    /// Skips the scalar at the cursor if it is one the fast path takes (the cursor unmoved
    /// otherwise, and on an error: [`Cursor::skip_value`] then judges it).
    #[inline]
    fn span_scalar(&mut self) -> Option<Kind> {
        let at = self.pos;
        let (kind, end) = match *self.bytes.get(at)? {
            b'"' => (Kind::String, blocks::plain_string_end(self.bytes, at + 1)? + 1),
            b'0'..=b'9' | b'-' => {
                self.number_here().ok().or_else(|| {
                    self.pos = at;
                    None
                })?;
                return Some(Kind::Number);
            }
            b't' if self.bytes.get(at..at + 4) == Some(b"true") => (Kind::Bool, at + 4),
            b'f' if self.bytes.get(at..at + 5) == Some(b"false") => (Kind::Bool, at + 5),
            b'n' if self.bytes.get(at..at + 4) == Some(b"null") => (Kind::Null, at + 4),
            _ => return None,
        };
        self.pos = end;
        Some(kind)
    }

    /// An array at the cursor whose elements [`Cursor::span_scalar`] takes, with no whitespace
    /// between them; false (the cursor unmoved) when it is any other array.
    #[inline]
    fn span_array(&mut self) -> bool {
        if self.depth >= MAX_DEPTH {
            return false;
        }
        let at = self.pos;
        self.pos += 1;
        let closed = match self.bytes.get(self.pos) {
            Some(b']') => true,
            _ => loop {
                if self.span_scalar().is_none() {
                    break false;
                }
                match self.bytes.get(self.pos) {
                    Some(b',') => self.pos += 1,
                    Some(b']') => break true,
                    _ => break false,
                }
            },
        };
        if closed {
            self.pos += 1;
        } else {
            self.pos = at;
        }
        closed
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

    /// The members [`Cursor::object`] sees, as spans, or `None` if it refuses the text or a name
    /// has escapes or repeats.
    fn walked(text: &[u8]) -> Option<(Vec<MemberSpan>, usize, usize)> {
        let mut cur = Cursor::new(text);
        let mut members = Vec::new();
        let mut names = super::super::Names::default();
        let mut plain = true;
        let close = cur
            .object(|cur, m| {
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
            })
            .ok()?;
        plain.then_some((members, close, cur.pos()))
    }

    fn read(text: &[u8]) -> Option<(Vec<MemberSpan>, usize, usize)> {
        let mut cur = Cursor::new(text);
        let mut members = vec![];
        match cur.member_spans(&mut members) {
            Some(close) => Some((members, close, cur.pos())),
            None => {
                assert_eq!((cur.pos(), cur.depth), (0, 0), "rewound");
                None
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
        ] {
            assert_eq!(read(text.as_bytes()), walked(text.as_bytes()), "{text}");
        }
    }

    #[test]
    fn refuses_nesting_past_the_limit_and_rewinds() {
        let deep = format!("{{\"a\":{}{}}}", "[".repeat(MAX), "]".repeat(MAX));
        assert_eq!(read(deep.as_bytes()), None);
        const MAX: usize = super::super::MAX_DEPTH;
    }

    proptest::proptest! {
        #[test]
        fn agrees_with_the_object_walk(
            members in proptest::collection::vec(
                ("[a-c]{1,2}|\"|\\\\u0061|[a-z]{17,20}", "1|-0.5|\"x\"|\\[1, 2\\]|\\{\"a\":1\\}|true|nul|01|\"\\\\q\""),
                0..8,
            ),
            ws in "[ \n]{0,1}",
            tail in "\\}|,\\}|",
        ) {
            let body: Vec<String> = members
                .iter()
                .map(|(k, v)| format!("{ws}\"{k}\"{ws}:{ws}{v}{ws}"))
                .collect();
            let text = format!("{{{}{tail}", body.join(","));
            proptest::prop_assert_eq!(read(text.as_bytes()), walked(text.as_bytes()), "{}", text);
        }
    }
}
