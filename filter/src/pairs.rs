//! A header map as the proxy-wasm host serializes it, read where it lies.
//!
//! The SDK's `hostcalls::get_map` turns every name and value into a `String` of its own (two
//! allocations per header, on every request) and panics on a value that is not UTF-8, which Envoy
//! lets through (`obs-text`): a trap that would fail the VM. The glue keeps the host's bytes as
//! they came and reads them here; a pair that is not UTF-8 is skipped (as if absent).

/// The serialized map: the pair count (u32, little-endian), then each pair's name and value
/// lengths (u32 each), then each name and each value followed by a NUL byte.
#[derive(Debug, Default, Clone)]
pub struct Pairs {
    bytes: Vec<u8>,
}

impl Pairs {
    pub fn from_serialized(bytes: Vec<u8>) -> Pairs {
        Pairs { bytes }
    }

    /// The pairs in order. The walk stops at the first length that runs past the end, so a
    /// malformed map shows what came before it.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.raw().filter_map(|(name, value)| {
            Some((std::str::from_utf8(name).ok()?, std::str::from_utf8(value).ok()?))
        })
    }

    /// The pairs' bytes in order, as [`Pairs::iter`] walks them, nothing validated.
    fn raw(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        let bytes = self.bytes.as_slice();
        let word = move |at: usize| -> Option<usize> {
            let b = bytes.get(at..at.checked_add(4)?)?;
            Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
        };
        let count = word(0).unwrap_or(0);
        let mut data = count.checked_mul(8).and_then(|n| n.checked_add(4));
        (0..count).map_while(move |i| {
            let name_len = word(4 + i * 8)?;
            let value_len = word(8 + i * 8)?;
            let name_start = data?;
            let name = bytes.get(name_start..name_start.checked_add(name_len)?)?;
            let value_start = name_start + name_len + 1;
            let value = bytes.get(value_start..value_start.checked_add(value_len)?)?;
            data = value_start.checked_add(value_len + 1);
            Some((name, value))
        })
    }

    /// The first value of `name` (compared ignoring ASCII case).
    pub fn get(&self, name: &str) -> Option<&str> {
        let [value] = self.get_many([name]);
        value
    }

    /// The first value of each name (compared ignoring ASCII case), as [`Pairs::get`] gives it
    /// for each, from one walk of the map: a name is compared as bytes, and only a matching
    /// pair's value is checked for UTF-8 (a name that matches a `&str` is UTF-8 itself).
    pub fn get_many<'a, const N: usize>(&'a self, names: [&str; N]) -> [Option<&'a str>; N] {
        let mut found: [Option<&'a str>; N] = [None; N];
        let mut missing = N;
        for (name, value) in self.raw() {
            for (i, wanted) in names.iter().enumerate() {
                if found[i].is_none() && name.eq_ignore_ascii_case(wanted.as_bytes()) {
                    if let Ok(value) = std::str::from_utf8(value) {
                        found[i] = Some(value);
                        missing -= 1;
                    }
                }
            }
            if missing == 0 {
                break;
            }
        }
        found
    }

    /// The pairs as owned strings (for the few places that keep them).
    pub fn to_vec(&self) -> Vec<(String, String)> {
        self.iter().map(|(k, v)| (k.to_owned(), v.to_owned())).collect()
    }
}

/// Serializes pairs the way the host does (the test hosts use it too).
pub fn serialize(pairs: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
    for (name, value) in pairs {
        out.extend_from_slice(&(name.len() as u32).to_le_bytes());
        out.extend_from_slice(&(value.len() as u32).to_le_bytes());
    }
    for (name, value) in pairs {
        out.extend_from_slice(name);
        out.push(0);
        out.extend_from_slice(value);
        out.push(0);
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn pairs_read_in_order_and_names_ignore_case() {
        let map = Pairs::from_serialized(serialize(&[
            (b":path", b"/v2/namespaces/a"),
            (b"Content-Length", b"12"),
            (b"x-empty", b""),
            (b"content-length", b"99"),
        ]));
        assert_eq!(map.get("content-length"), Some("12"));
        assert_eq!(map.get(":PATH"), Some("/v2/namespaces/a"));
        assert_eq!(map.get("x-empty"), Some(""));
        assert_eq!(map.get("absent"), None);
        assert_eq!(map.iter().count(), 4);
        assert_eq!(Pairs::default().iter().count(), 0);
    }

    #[test]
    fn a_value_that_is_not_utf8_is_skipped_not_a_panic() {
        let map = Pairs::from_serialized(serialize(&[(b"x-odd", b"caf\xe9"), (b"x-ok", b"1")]));
        assert_eq!(map.get("x-odd"), None);
        assert_eq!(map.get("x-ok"), Some("1"));
    }

    proptest! {
        #[test]
        fn one_walk_finds_what_a_search_per_name_finds(
            pairs in prop::collection::vec(("[aAbB:-]{0,3}", prop::collection::vec(any::<u8>(), 0..4)), 0..10),
            names in prop::array::uniform4("[aAbB:-]{0,3}"),
        ) {
            let raw: Vec<(&[u8], &[u8])> = pairs.iter().map(|(k, v)| (k.as_bytes(), v.as_slice())).collect();
            let map = Pairs::from_serialized(serialize(&raw));
            let wanted = [names[0].as_str(), names[1].as_str(), names[2].as_str(), names[3].as_str()];
            let searched = wanted.map(|name| {
                map.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v)
            });
            prop_assert_eq!(map.get_many(wanted), searched);
        }

        #[test]
        fn any_map_reads_back_and_any_bytes_never_panic(
            pairs in prop::collection::vec(("[a-z:-]{0,12}", "[ -~]{0,20}"), 0..12),
            garbage in prop::collection::vec(any::<u8>(), 0..64),
            cut in 0usize..400,
        ) {
            let raw: Vec<(&[u8], &[u8])> =
                pairs.iter().map(|(k, v)| (k.as_bytes(), v.as_bytes())).collect();
            let bytes = serialize(&raw);
            let map = Pairs::from_serialized(bytes.clone());
            let read: Vec<(String, String)> = map.to_vec();
            let expected: Vec<(String, String)> = pairs.clone();
            prop_assert_eq!(read, expected);
            // Truncated or arbitrary bytes: a prefix of the pairs, never a panic.
            let truncated = Pairs::from_serialized(bytes[..cut.min(bytes.len())].to_vec());
            prop_assert!(truncated.iter().count() <= pairs.len());
            let _ = Pairs::from_serialized(garbage).iter().count();
        }
    }
}
