//! The MessagePack dialect Aerospike uses for list and map bins and for CDT operation arguments:
//! standard MessagePack, except that strings and blobs carry their particle type as the first
//! byte of the payload, a map may start with an ext "order" pseudo-entry, and ext type 0xff
//! encodes the `Wildcard` (0) and `Infinity` (1) range markers.

use std::cmp::Ordering;

const PARTICLE_STRING: u8 = 3;

/// A decoded value.
#[derive(Clone, Debug)]
pub enum Val {
    Nil,
    Bool(bool),
    Int(i64),
    Float(f64),
    /// String or blob payload with its particle type (3 = string, 4 = blob).
    Bytes(u8, Vec<u8>),
    List(Vec<Val>),
    Map(MapVal),
    Wildcard,
    Infinity,
}

/// A map, kept sorted by key; `flags` is the order attribute it was created with
/// (bit 0: key-ordered), echoed back when the map is encoded.
#[derive(Clone, Debug, Default)]
pub struct MapVal {
    pub flags: u8,
    pub entries: Vec<(Val, Val)>,
}

impl MapVal {
    fn position(&self, key: &Val) -> Result<usize, usize> {
        self.entries.binary_search_by(|(k, _)| cmp(k, key))
    }

    pub fn get(&self, key: &Val) -> Option<&Val> {
        self.position(key).ok().map(|i| &self.entries[i].1)
    }

    pub fn contains(&self, key: &Val) -> bool {
        self.position(key).is_ok()
    }

    pub fn insert(&mut self, key: Val, value: Val) {
        match self.position(&key) {
            Ok(i) => self.entries[i].1 = value,
            Err(i) => self.entries.insert(i, (key, value)),
        }
    }

    pub fn remove(&mut self, key: &Val) -> Option<(Val, Val)> {
        self.position(key).ok().map(|i| self.entries.remove(i))
    }
}

impl PartialEq for Val {
    fn eq(&self, other: &Self) -> bool {
        cmp(self, other) == Ordering::Equal
    }
}

fn rank(v: &Val) -> u8 {
    // Aerospike's cross-type order: nil, bool, integer, string, list, map, bytes, float, wildcard,
    // infinity.
    match v {
        Val::Nil => 1,
        Val::Bool(_) => 2,
        Val::Int(_) => 3,
        Val::Bytes(PARTICLE_STRING, _) => 4,
        Val::List(_) => 5,
        Val::Map(_) => 6,
        Val::Bytes(..) => 7,
        Val::Float(_) => 8,
        Val::Wildcard => 9,
        Val::Infinity => 10,
    }
}

/// Total order of values (what key and value ranges and equality use).
pub fn cmp(a: &Val, b: &Val) -> Ordering {
    match (a, b) {
        (Val::Bool(x), Val::Bool(y)) => x.cmp(y),
        (Val::Int(x), Val::Int(y)) => x.cmp(y),
        (Val::Float(x), Val::Float(y)) => x.total_cmp(y),
        (Val::Bytes(_, x), Val::Bytes(_, y)) if rank(a) == rank(b) => x.cmp(y),
        (Val::List(x), Val::List(y)) => cmp_seq(x.iter(), y.iter()),
        (Val::Map(x), Val::Map(y)) => {
            let keys = cmp_seq(x.entries.iter().map(|e| &e.0), y.entries.iter().map(|e| &e.0));
            keys.then_with(|| cmp_seq(x.entries.iter().map(|e| &e.1), y.entries.iter().map(|e| &e.1)))
        }
        _ => rank(a).cmp(&rank(b)),
    }
}

fn cmp_seq<'a>(mut x: impl Iterator<Item = &'a Val>, mut y: impl Iterator<Item = &'a Val>) -> Ordering {
    loop {
        match (x.next(), y.next()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(a), Some(b)) => match cmp(a, b) {
                Ordering::Equal => {}
                other => return other,
            },
        }
    }
}

/// Decodes one value from `buf` starting at `*pos`.
pub fn decode(buf: &[u8], pos: &mut usize) -> Option<Val> {
    let marker = take(buf, pos, 1)?[0];
    match marker {
        0x00..=0x7f => Some(Val::Int(i64::from(marker))),
        0x80..=0x8f => decode_map(buf, pos, usize::from(marker & 0x0f)),
        0x90..=0x9f => decode_list(buf, pos, usize::from(marker & 0x0f)),
        0xa0..=0xbf => decode_bytes(buf, pos, usize::from(marker & 0x1f)),
        0xc0 => Some(Val::Nil),
        0xc2 => Some(Val::Bool(false)),
        0xc3 => Some(Val::Bool(true)),
        0xc4 | 0xd9 => {
            let n = usize::from(take(buf, pos, 1)?[0]);
            decode_bytes(buf, pos, n)
        }
        0xc5 | 0xda => {
            let n = usize::from(be_u16(take(buf, pos, 2)?));
            decode_bytes(buf, pos, n)
        }
        0xc6 | 0xdb => {
            let n = usize::try_from(be_u32(take(buf, pos, 4)?)).ok()?;
            decode_bytes(buf, pos, n)
        }
        0xc7 => {
            let n = usize::from(take(buf, pos, 1)?[0]);
            decode_ext(buf, pos, n)
        }
        0xca => {
            let b = take(buf, pos, 4)?;
            Some(Val::Float(f64::from(f32::from_bits(be_u32(b)))))
        }
        0xcb => {
            let b: [u8; 8] = take(buf, pos, 8)?.try_into().ok()?;
            Some(Val::Float(f64::from_bits(u64::from_be_bytes(b))))
        }
        0xcc => Some(Val::Int(i64::from(take(buf, pos, 1)?[0]))),
        0xcd => Some(Val::Int(i64::from(be_u16(take(buf, pos, 2)?)))),
        0xce => Some(Val::Int(i64::from(be_u32(take(buf, pos, 4)?)))),
        0xcf => {
            let b: [u8; 8] = take(buf, pos, 8)?.try_into().ok()?;
            Some(Val::Int(u64::from_be_bytes(b) as i64))
        }
        0xd0 => Some(Val::Int(i64::from(take(buf, pos, 1)?[0] as i8))),
        0xd1 => Some(Val::Int(i64::from(be_u16(take(buf, pos, 2)?) as i16))),
        0xd2 => Some(Val::Int(i64::from(be_u32(take(buf, pos, 4)?) as i32))),
        0xd3 => {
            let b: [u8; 8] = take(buf, pos, 8)?.try_into().ok()?;
            Some(Val::Int(i64::from_be_bytes(b)))
        }
        0xd4 => decode_ext(buf, pos, 1),
        0xd5 => decode_ext(buf, pos, 2),
        0xd6 => decode_ext(buf, pos, 4),
        0xd7 => decode_ext(buf, pos, 8),
        0xdc => {
            let n = usize::from(be_u16(take(buf, pos, 2)?));
            decode_list(buf, pos, n)
        }
        0xdd => {
            let n = usize::try_from(be_u32(take(buf, pos, 4)?)).ok()?;
            decode_list(buf, pos, n)
        }
        0xde => {
            let n = usize::from(be_u16(take(buf, pos, 2)?));
            decode_map(buf, pos, n)
        }
        0xdf => {
            let n = usize::try_from(be_u32(take(buf, pos, 4)?)).ok()?;
            decode_map(buf, pos, n)
        }
        0xe0..=0xff => Some(Val::Int(i64::from(marker as i8))),
        _ => None,
    }
}

/// Decodes a whole buffer holding one value.
pub fn decode_all(buf: &[u8]) -> Option<Val> {
    let mut pos = 0;
    let v = decode(buf, &mut pos)?;
    (pos == buf.len()).then_some(v)
}

fn take<'a>(buf: &'a [u8], pos: &mut usize, n: usize) -> Option<&'a [u8]> {
    let end = pos.checked_add(n)?;
    let out = buf.get(*pos..end)?;
    *pos = end;
    Some(out)
}

fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn decode_bytes(buf: &[u8], pos: &mut usize, n: usize) -> Option<Val> {
    let data = take(buf, pos, n)?;
    match data.split_first() {
        Some((particle, rest)) => Some(Val::Bytes(*particle, rest.to_vec())),
        None => Some(Val::Bytes(PARTICLE_STRING, Vec::new())),
    }
}

/// An ext value: the 0xff range markers, or (as a map's first key) the order flags, which
/// decode to `Int(flags)` wrapped so `decode_map` can recognise them.
fn decode_ext(buf: &[u8], pos: &mut usize, n: usize) -> Option<Val> {
    let kind = take(buf, pos, 1)?[0];
    let data = take(buf, pos, n)?;
    match (kind, data) {
        (0xff, [0]) => Some(Val::Wildcard),
        (0xff, [1]) => Some(Val::Infinity),
        // A map/list order header: carried as a one-element list [flags] marker.
        (flags, _) => Some(Val::List(vec![Val::Bytes(0xff, vec![flags])])),
    }
}

fn is_order_header(v: &Val) -> Option<u8> {
    match v {
        Val::List(items) => match items.as_slice() {
            [Val::Bytes(0xff, f)] if f.len() == 1 => Some(f[0]),
            _ => None,
        },
        _ => None,
    }
}

fn decode_list(buf: &[u8], pos: &mut usize, n: usize) -> Option<Val> {
    let mut items = Vec::with_capacity(n.min(buf.len()));
    for i in 0..n {
        let v = decode(buf, pos)?;
        if i == 0 && is_order_header(&v).is_some() {
            continue;
        }
        items.push(v);
    }
    Some(Val::List(items))
}

fn decode_map(buf: &[u8], pos: &mut usize, n: usize) -> Option<Val> {
    let mut map = MapVal::default();
    for i in 0..n {
        let k = decode(buf, pos)?;
        let v = decode(buf, pos)?;
        if i == 0 {
            if let Some(flags) = is_order_header(&k) {
                map.flags = flags;
                continue;
            }
        }
        map.insert(k, v);
    }
    Some(Val::Map(map))
}

/// Encodes a value.
pub fn encode(v: &Val, out: &mut Vec<u8>) {
    match v {
        Val::Nil => out.push(0xc0),
        Val::Bool(b) => out.push(if *b { 0xc3 } else { 0xc2 }),
        Val::Int(i) => encode_int(*i, out),
        Val::Float(f) => {
            out.push(0xcb);
            out.extend_from_slice(&f.to_bits().to_be_bytes());
        }
        Val::Bytes(particle, data) => {
            encode_str_header(data.len() + 1, out);
            out.push(*particle);
            out.extend_from_slice(data);
        }
        Val::List(items) => {
            encode_header(items.len(), 0x90, 0xdc, 0xdd, out);
            for item in items {
                encode(item, out);
            }
        }
        Val::Map(map) => {
            let ordered = map.flags & 1 != 0;
            encode_header(map.entries.len() + usize::from(ordered), 0x80, 0xde, 0xdf, out);
            if ordered {
                out.extend_from_slice(&[0xc7, 0, map.flags, 0xc0]);
            }
            for (k, v) in &map.entries {
                encode(k, out);
                encode(v, out);
            }
        }
        Val::Wildcard => out.extend_from_slice(&[0xd4, 0xff, 0]),
        Val::Infinity => out.extend_from_slice(&[0xd4, 0xff, 1]),
    }
}

pub fn to_bytes(v: &Val) -> Vec<u8> {
    let mut out = Vec::new();
    encode(v, &mut out);
    out
}

fn encode_header(n: usize, fix: u8, m16: u8, m32: u8, out: &mut Vec<u8>) {
    if n < 16 {
        out.push(fix | n as u8);
    } else if n < 1 << 16 {
        out.push(m16);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(m32);
        out.extend_from_slice(&(n as u32).to_be_bytes());
    }
}

fn encode_str_header(n: usize, out: &mut Vec<u8>) {
    if n < 32 {
        out.push(0xa0 | n as u8);
    } else if n < 256 {
        out.extend_from_slice(&[0xd9, n as u8]);
    } else if n < 1 << 16 {
        out.push(0xda);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(0xdb);
        out.extend_from_slice(&(n as u32).to_be_bytes());
    }
}

fn encode_int(i: i64, out: &mut Vec<u8>) {
    match i {
        0..=0x7f => out.push(i as u8),
        -32..=-1 => out.push(i as i8 as u8),
        0x80..=0xff => out.extend_from_slice(&[0xcc, i as u8]),
        0x100..=0xffff => {
            out.push(0xcd);
            out.extend_from_slice(&(i as u16).to_be_bytes());
        }
        0x1_0000..=0xffff_ffff => {
            out.push(0xce);
            out.extend_from_slice(&(i as u32).to_be_bytes());
        }
        _ => {
            out.push(0xd3);
            out.extend_from_slice(&i.to_be_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip() {
        let mut map = MapVal {
            flags: 1,
            entries: Vec::new(),
        };
        map.insert(Val::Int(300), Val::Bytes(PARTICLE_STRING, b"x".to_vec()));
        map.insert(
            Val::Int(-5),
            Val::List(vec![Val::Nil, Val::Int(1 << 40), Val::Bool(true)]),
        );
        let v = Val::Map(map);
        let bytes = to_bytes(&v);
        assert_eq!(decode_all(&bytes), Some(v));
        for i in [
            0,
            1,
            127,
            128,
            255,
            256,
            65535,
            65536,
            -1,
            -32,
            -33,
            -129,
            i64::MIN,
            i64::MAX,
        ] {
            assert_eq!(decode_all(&to_bytes(&Val::Int(i))), Some(Val::Int(i)), "{i}");
        }
    }

    #[test]
    fn ints_sort_before_strings() {
        assert_eq!(cmp(&Val::Int(9), &Val::Bytes(3, b"a".to_vec())), Ordering::Less);
        assert_eq!(
            cmp(&Val::Bytes(3, b"a".to_vec()), &Val::Bytes(3, b"b".to_vec())),
            Ordering::Less
        );
    }
}
