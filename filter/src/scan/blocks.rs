//! The scanner's block-at-a-time paths: byte classes of 16 bytes at once, as bit masks (bit `k`
//! for byte `k`), and what [`super::Cursor`] builds on them: skipping the plain bytes of a string
//! and validating a run of comma-separated numbers (a vector) 64 bytes at a time.
//!
//! Three ways to get the masks give the same answer: wasm SIMD (`simd128`, which the filter is
//! built with), SSE2 on x86_64 (native tests and fuzzing), and SWAR on `u64` words elsewhere.
//! [`reference`] is the byte-at-a-time definition the tests hold all of them to.

/// Which bytes of a 16-byte block belong to each class.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Block {
    /// `"`, `\`, a control byte (below 0x20) or a non-ASCII byte (0x80 and up): what ends a run
    /// of plain string content.
    pub special: u16,
    pub digit: u16,
    pub zero: u16,
    pub dot: u16,
    /// `e` or `E`.
    pub exp: u16,
    pub minus: u16,
    pub plus: u16,
    pub comma: u16,
}

/// The byte-at-a-time definition of [`Block`].
pub fn reference(bytes: &[u8; 16]) -> Block {
    let mut b = Block::default();
    for (k, &c) in bytes.iter().enumerate() {
        let bit = 1u16 << k;
        let set = |mask: &mut u16, yes: bool| {
            if yes {
                *mask |= bit;
            }
        };
        set(
            &mut b.special,
            c == b'"' || c == b'\\' || !(0x20..0x80).contains(&c),
        );
        set(&mut b.digit, c.is_ascii_digit());
        set(&mut b.zero, c == b'0');
        set(&mut b.dot, c == b'.');
        set(&mut b.exp, c == b'e' || c == b'E');
        set(&mut b.minus, c == b'-');
        set(&mut b.plus, c == b'+');
        set(&mut b.comma, c == b',');
    }
    b
}

/// The SWAR way: eight bytes per `u64`, each class a byte-wise compare whose high bits are then
/// gathered into eight mask bits.
pub mod swar {
    use super::Block;

    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    const LOWS: u64 = 0x7F7F_7F7F_7F7F_7F7F;

    /// The high bit of each byte that is at least `n` (1..=0x80); no carry crosses bytes.
    #[inline]
    fn at_least(w: u64, n: u8) -> u64 {
        (((w & LOWS) + (0x80 - u64::from(n)) * ONES) | w) & HIGHS
    }

    /// The high bit of each byte equal to `c`.
    #[inline]
    fn equal(w: u64, c: u8) -> u64 {
        let x = w ^ (u64::from(c) * ONES);
        !(((x & LOWS) + LOWS) | x) & HIGHS
    }

    /// Gathers the high bits of the eight bytes into bits 0..8.
    #[inline]
    fn gather(flags: u64) -> u16 {
        ((flags >> 7).wrapping_mul(0x0102_0408_1020_4080) >> 56) as u16
    }

    fn half(w: u64) -> Block {
        let digit = at_least(w, b'0') & !at_least(w, b'9' + 1);
        let special = equal(w, b'"') | equal(w, b'\\') | (!at_least(w, 0x20) & HIGHS) | (w & HIGHS);
        Block {
            special: gather(special),
            digit: gather(digit),
            zero: gather(equal(w, b'0')),
            dot: gather(equal(w, b'.')),
            exp: gather(equal(w | (0x20 * ONES), b'e')),
            minus: gather(equal(w, b'-')),
            plus: gather(equal(w, b'+')),
            comma: gather(equal(w, b',')),
        }
    }

    pub fn classify(bytes: &[u8; 16]) -> Block {
        let (lo, hi) = bytes.split_at(8);
        let word = |s: &[u8]| u64::from_le_bytes(s.try_into().unwrap_or_default());
        let (a, b) = (half(word(lo)), half(word(hi)));
        let join = |x: u16, y: u16| x | (y << 8);
        Block {
            special: join(a.special, b.special),
            digit: join(a.digit, b.digit),
            zero: join(a.zero, b.zero),
            dot: join(a.dot, b.dot),
            exp: join(a.exp, b.exp),
            minus: join(a.minus, b.minus),
            plus: join(a.plus, b.plus),
            comma: join(a.comma, b.comma),
        }
    }

    pub fn numbers(bytes: &[u8; 64]) -> super::Wide {
        let block = |k: usize| {
            let mut a = [0u8; 16];
            a.copy_from_slice(&bytes[16 * k..16 * k + 16]);
            classify(&a)
        };
        super::Wide::join([block(0), block(1), block(2), block(3)])
    }

    /// [`numbers`] without the exponent classes (`e`, `E`, `+`), which stay empty.
    pub fn plain_numbers(bytes: &[u8; 64]) -> super::Wide {
        super::Wide {
            exp: 0,
            plus: 0,
            ..numbers(bytes)
        }
    }

    /// Which bytes of two blocks are equal.
    pub fn same(x: &[u8; 16], y: &[u8; 16]) -> u16 {
        let word = |s: &[u8]| u64::from_le_bytes(s.try_into().unwrap_or_default());
        let half = |a: &[u8], b: &[u8]| gather(equal(word(a) ^ word(b), 0));
        half(&x[..8], &y[..8]) | (half(&x[8..], &y[8..]) << 8)
    }

    /// The specials of a block only (a string's plain run).
    pub fn special(bytes: &[u8; 16]) -> u16 {
        let (lo, hi) = bytes.split_at(8);
        let word = |s: &[u8]| u64::from_le_bytes(s.try_into().unwrap_or_default());
        let one =
            |w: u64| gather(equal(w, b'"') | equal(w, b'\\') | (!at_least(w, 0x20) & HIGHS) | (w & HIGHS));
        one(word(lo)) | (one(word(hi)) << 8)
    }
}

/// wasm SIMD (`simd128`): what the filter runs in Envoy and in wasmtime.
#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
pub mod simd {
    use super::Block;
    use core::arch::wasm32::*;

    #[inline]
    fn load(bytes: &[u8; 16]) -> v128 {
        // SAFETY: the array holds 16 readable bytes; the load has no alignment requirement.
        unsafe { core::ptr::read_unaligned(bytes.as_ptr().cast::<v128>()) }
    }

    #[inline]
    fn eq(v: v128, c: u8) -> u16 {
        u8x16_bitmask(u8x16_eq(v, u8x16_splat(c)))
    }

    /// Bytes below 0x20 or from 0x80 up: one signed compare, as the bytes from 0x80 are the
    /// negative ones. (Runtimes lower the signed byte compares to one x86 instruction; the
    /// unsigned ones and a shift of bytes take four or five.)
    #[inline]
    fn control_or_high(v: v128) -> v128 {
        i8x16_lt(v, i8x16_splat(0x20))
    }

    #[inline]
    fn quote_or_backslash(v: v128) -> v128 {
        v128_or(u8x16_eq(v, u8x16_splat(b'"')), u8x16_eq(v, u8x16_splat(b'\\')))
    }

    #[inline]
    fn specials(v: v128) -> v128 {
        v128_or(quote_or_backslash(v), control_or_high(v))
    }

    /// Bytes from '0' to '9', by two signed compares (the bytes from 0x80 are negative).
    #[inline]
    fn digits(v: v128) -> v128 {
        v128_and(
            i8x16_gt(v, i8x16_splat(b'/' as i8)),
            i8x16_lt(v, i8x16_splat(b':' as i8)),
        )
    }

    #[inline]
    fn load_at(bytes: &[u8; 64], k: usize) -> v128 {
        // SAFETY: callers pass k < 4, so the 16 bytes read stay inside the 64-byte array; no
        // alignment needed.
        unsafe { core::ptr::read_unaligned(bytes.as_ptr().add(16 * k).cast::<v128>()) }
    }

    pub fn classify(bytes: &[u8; 16]) -> Block {
        let v = load(bytes);
        Block {
            special: u8x16_bitmask(specials(v)),
            digit: u8x16_bitmask(digits(v)),
            zero: eq(v, b'0'),
            dot: eq(v, b'.'),
            exp: eq(v128_or(v, u8x16_splat(0x20)), b'e'),
            minus: eq(v, b'-'),
            plus: eq(v, b'+'),
            comma: eq(v, b','),
        }
    }

    pub fn special(bytes: &[u8; 16]) -> u16 {
        u8x16_bitmask(specials(load(bytes)))
    }

    pub fn same(x: &[u8; 16], y: &[u8; 16]) -> u16 {
        u8x16_bitmask(u8x16_eq(load(x), load(y)))
    }

    /// The number classes of 64 bytes, without the string specials.
    #[inline]
    pub fn numbers(bytes: &[u8; 64]) -> super::Wide {
        let mut w = plain_numbers(bytes);
        for k in 0..4 {
            let v = load_at(bytes, k);
            let shift = 16 * k as u32;
            let m = |x: u16| u64::from(x) << shift;
            w.exp |= m(eq(v128_or(v, u8x16_splat(0x20)), b'e'));
            w.plus |= m(eq(v, b'+'));
        }
        w
    }

    /// [`numbers`] without the exponent classes (`e`, `E`, `+`), which stay empty.
    #[inline]
    pub fn plain_numbers(bytes: &[u8; 64]) -> super::Wide {
        let mut w = super::Wide::default();
        for k in 0..4 {
            let v = load_at(bytes, k);
            let shift = 16 * k as u32;
            let m = |x: u16| u64::from(x) << shift;
            w.digit |= m(u8x16_bitmask(digits(v)));
            w.zero |= m(eq(v, b'0'));
            w.dot |= m(eq(v, b'.'));
            w.minus |= m(eq(v, b'-'));
            w.comma |= m(eq(v, b','));
        }
        w
    }

    /// Whether any of `N` bytes (a multiple of 16) is special, with one test instead of a mask
    /// per block.
    #[inline]
    pub fn any_special<const N: usize>(bytes: &[u8; N]) -> bool {
        let p = bytes.as_ptr();
        // SAFETY: k * 16 + 16 <= N, so each load stays inside the array; no alignment needed.
        let v = |k: usize| unsafe { core::ptr::read_unaligned(p.add(16 * k).cast::<v128>()) };
        let mut low = v(0);
        let mut marks = quote_or_backslash(low);
        for k in 1..N / 16 {
            // A byte below 0x20 (signed) anywhere is one below it in the lane-wise minimum.
            low = i8x16_min(low, v(k));
            marks = v128_or(marks, quote_or_backslash(v(k)));
        }
        v128_any_true(v128_or(marks, control_or_high(low)))
    }
}

/// SSE2 on x86_64 (always present there): native tests, fuzzing and benchmarks.
#[cfg(target_arch = "x86_64")]
pub mod sse2 {
    use super::Block;
    use core::arch::x86_64::*;

    #[inline]
    fn load(bytes: &[u8; 16]) -> __m128i {
        // SAFETY: SSE2 is part of x86_64; the array holds 16 readable bytes (unaligned load).
        unsafe { _mm_loadu_si128(bytes.as_ptr().cast::<__m128i>()) }
    }

    #[inline]
    fn mask(v: __m128i) -> u16 {
        // SAFETY: SSE2 is part of x86_64.
        unsafe { _mm_movemask_epi8(v) as u16 }
    }

    #[inline]
    fn eq(v: __m128i, c: u8) -> __m128i {
        // SAFETY: SSE2 is part of x86_64.
        unsafe { _mm_cmpeq_epi8(v, _mm_set1_epi8(c as i8)) }
    }

    #[inline]
    fn specials(v: __m128i) -> u16 {
        // SAFETY: SSE2 is part of x86_64. Below 0x20 or from 0x80 up is one signed compare.
        mask(unsafe {
            _mm_or_si128(
                _mm_or_si128(eq(v, b'"'), eq(v, b'\\')),
                _mm_cmplt_epi8(v, _mm_set1_epi8(0x20)),
            )
        })
    }

    /// Bytes from '0' to '9', by two signed compares.
    #[inline]
    fn digits(v: __m128i) -> __m128i {
        // SAFETY: SSE2 is part of x86_64.
        unsafe {
            _mm_and_si128(
                _mm_cmpgt_epi8(v, _mm_set1_epi8(b'/' as i8)),
                _mm_cmplt_epi8(v, _mm_set1_epi8(b':' as i8)),
            )
        }
    }

    pub fn classify(bytes: &[u8; 16]) -> Block {
        let v = load(bytes);
        // SAFETY: SSE2 is part of x86_64.
        let lower = unsafe { _mm_or_si128(v, _mm_set1_epi8(0x20)) };
        Block {
            special: specials(v),
            digit: mask(digits(v)),
            zero: mask(eq(v, b'0')),
            dot: mask(eq(v, b'.')),
            exp: mask(eq(lower, b'e')),
            minus: mask(eq(v, b'-')),
            plus: mask(eq(v, b'+')),
            comma: mask(eq(v, b',')),
        }
    }

    pub fn special(bytes: &[u8; 16]) -> u16 {
        specials(load(bytes))
    }

    pub fn same(x: &[u8; 16], y: &[u8; 16]) -> u16 {
        // SAFETY: SSE2 is part of x86_64.
        mask(unsafe { _mm_cmpeq_epi8(load(x), load(y)) })
    }

    /// The number classes of 64 bytes, without the string specials.
    #[inline]
    pub fn numbers(bytes: &[u8; 64]) -> super::Wide {
        let mut w = plain_numbers(bytes);
        for (k, chunk) in bytes.chunks_exact(16).enumerate() {
            let Ok(block) = <&[u8; 16]>::try_from(chunk) else {
                continue;
            };
            let v = load(block);
            // SAFETY: SSE2 is part of x86_64.
            let lower = unsafe { _mm_or_si128(v, _mm_set1_epi8(0x20)) };
            let shift = 16 * k as u32;
            let m = |x: __m128i| u64::from(mask(x)) << shift;
            w.exp |= m(eq(lower, b'e'));
            w.plus |= m(eq(v, b'+'));
        }
        w
    }

    /// [`numbers`] without the exponent classes (`e`, `E`, `+`), which stay empty.
    #[inline]
    pub fn plain_numbers(bytes: &[u8; 64]) -> super::Wide {
        let mut w = super::Wide::default();
        for (k, chunk) in bytes.chunks_exact(16).enumerate() {
            let Ok(block) = <&[u8; 16]>::try_from(chunk) else {
                continue;
            };
            let v = load(block);
            let shift = 16 * k as u32;
            let m = |x: __m128i| u64::from(mask(x)) << shift;
            w.digit |= m(digits(v));
            w.zero |= m(eq(v, b'0'));
            w.dot |= m(eq(v, b'.'));
            w.minus |= m(eq(v, b'-'));
            w.comma |= m(eq(v, b','));
        }
        w
    }
}

#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
use simd as fast;
#[cfg(all(
    not(all(target_arch = "wasm32", target_feature = "simd128")),
    target_arch = "x86_64"
))]
use sse2 as fast;
#[cfg(not(any(
    all(target_arch = "wasm32", target_feature = "simd128"),
    target_arch = "x86_64"
)))]
use swar as fast;

/// The classes of the 16 bytes at `b[at..]`, if there are 16.
#[inline]
pub fn classify(b: &[u8], at: usize) -> Option<Block> {
    Some(fast::classify(b.get(at..at + 16)?.try_into().ok()?))
}

/// Index of the first special byte (see [`Block::special`]) at or after `i`, looking at whole
/// 16-byte blocks only: when fewer than 16 bytes remain, where those begin.
#[inline]
pub fn plain_run(b: &[u8], mut i: usize) -> usize {
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    {
        while let Some(chunk) = b.get(i..i + 128).and_then(|c| <&[u8; 128]>::try_from(c).ok()) {
            if simd::any_special(chunk) {
                break;
            }
            i += 128;
        }
        if let Some(chunk) = b.get(i..i + 64).and_then(|c| <&[u8; 64]>::try_from(c).ok()) {
            if !simd::any_special(chunk) {
                i += 64;
            }
        }
    }
    while let Some(block) = b.get(i..i + 16).and_then(|c| <&[u8; 16]>::try_from(c).ok()) {
        let special = fast::special(block);
        if special != 0 {
            return i + special.trailing_zeros() as usize;
        }
        i += 16;
    }
    i
}

/// Whether `b[x..x + len]` and `b[y..y + len]` are the same bytes, for `len` up to 16 with 16
/// bytes to read at both places: one compare of two blocks (`None` otherwise).
#[inline]
pub fn same_prefix(b: &[u8], x: usize, y: usize, len: usize) -> Option<bool> {
    let block = |at: usize| b.get(at..at + 16).and_then(|c| <&[u8; 16]>::try_from(c).ok());
    let wanted = u16::MAX.checked_shr(16 - len.min(16) as u32).unwrap_or(0);
    Some(fast::same(block(x)?, block(y)?) & wanted == wanted)
}

/// Where the closing quote is when a string's content from `start` is plain up to it within
/// one block (the common short string); `None` sends the string the long way.
#[inline]
pub fn plain_string_end(b: &[u8], start: usize) -> Option<usize> {
    let block: &[u8; 16] = b.get(start..start + 16)?.try_into().ok()?;
    let special = fast::special(block);
    let end = start + special.trailing_zeros() as usize;
    (special != 0 && b.get(end) == Some(&b'"')).then_some(end)
}

/// The classes of 64 bytes a number array is made of, as 64-bit masks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Wide {
    digit: u64,
    zero: u64,
    dot: u64,
    exp: u64,
    minus: u64,
    plus: u64,
    comma: u64,
}

impl Wide {
    /// Joins four blocks' masks, the first in the low bits.
    fn join(blocks: [Block; 4]) -> Wide {
        let mut w = Wide::default();
        for (k, c) in blocks.iter().enumerate() {
            let shift = 16 * k as u32;
            w.digit |= u64::from(c.digit) << shift;
            w.zero |= u64::from(c.zero) << shift;
            w.dot |= u64::from(c.dot) << shift;
            w.exp |= u64::from(c.exp) << shift;
            w.minus |= u64::from(c.minus) << shift;
            w.plus |= u64::from(c.plus) << shift;
            w.comma |= u64::from(c.comma) << shift;
        }
        w
    }
}

/// The byte-at-a-time definition of [`Wide`].
pub fn reference_wide(bytes: &[u8; 64]) -> Wide {
    let block = |k: usize| {
        let mut a = [0u8; 16];
        a.copy_from_slice(&bytes[16 * k..16 * k + 16]);
        reference(&a)
    };
    Wide::join([block(0), block(1), block(2), block(3)])
}

/// The number classes of the 64 bytes at `b[at..]`, if there are 64.
#[inline]
pub fn wide(b: &[u8], at: usize) -> Option<Wide> {
    let chunk: &[u8; 64] = b.get(at..at + 64)?.try_into().ok()?;
    Some(fast::numbers(chunk))
}

/// Skips whole `number,` elements of an array from `i`, the start of an element, 64 bytes at a
/// time, and returns where the next element starts. Only tokens the byte-at-a-time number grammar
/// accepts, each followed directly by a comma, are skipped; anything else (whitespace, the closing
/// bracket, an invalid or possibly out-of-range number) is left where it starts, for the cursor to
/// judge and report exactly as before.
///
/// Most windows hold no exponent: their classes are found without the exponent ones, and
/// [`valid_numbers`] is compiled a second time for them with those known to be empty. A window
/// is one of them when the first byte that is none of digit, '.', '-' or ',' (where the valid
/// prefix ends at the latest) is not an exponent's 'e', 'E' or '+'; what lies past that byte is
/// never looked at, so both ways skip the same.
#[inline]
pub fn number_run(b: &[u8], mut i: usize) -> usize {
    while let Some(chunk) = b.get(i..i + 64).and_then(|c| <&[u8; 64]>::try_from(c).ok()) {
        let plain = fast::plain_numbers(chunk);
        let known = plain.digit | plain.dot | plain.minus | plain.comma;
        let first_other = (!known).trailing_zeros() as usize;
        let skipped = if matches!(chunk.get(first_other), Some(b'e' | b'E' | b'+')) {
            valid_numbers(&fast::numbers(chunk))
        } else {
            valid_numbers(&plain)
        };
        if skipped == 0 {
            break;
        }
        i += skipped;
    }
    i
}

/// How many bytes of a 64-byte window that starts at an element are whole valid `number,`
/// elements (0 if none).
#[inline(always)]
fn valid_numbers(w: &Wide) -> usize {
    let known = w.digit | w.dot | w.exp | w.minus | w.plus | w.comma;
    // Up to the first byte that cannot be in a number array without whitespace.
    let within = match (!known).trailing_zeros() {
        64 => u64::MAX,
        n => (1u64 << n) - 1,
    };
    let comma = w.comma & within;
    if comma == 0 {
        return 0;
    }
    // Through the last comma: each token in it ends with its comma.
    let last = 63 - comma.leading_zeros();
    let region = if last == 63 { u64::MAX } else { (2u64 << last) - 1 };
    let (digit, dot, exp, minus, plus) = (
        w.digit & region,
        w.dot & region,
        w.exp & region,
        w.minus & region,
        w.plus & region,
    );
    let starts = (1 | (comma << 1)) & region;
    let signed = starts & minus;
    let int_start = (starts & !minus) | (signed << 1);
    let exp_sign = (exp << 1) & (minus | plus);
    let after_digit = digit << 1;
    let mut bad = int_start & !digit;
    bad |= ((int_start & w.zero) << 1) & digit; // a leading zero
    bad |= (comma | dot | exp) & !after_digit;
    bad |= (dot << 1) & !digit;
    bad |= (exp << 1) & !(digit | exp_sign);
    bad |= (exp_sign << 1) & !digit;
    bad |= plus & !exp_sign;
    bad |= minus & !(signed | exp_sign);
    // Each run of digits, by what comes before it: a fraction may not be followed by another
    // '.', an exponent by '.' or 'e'.
    let run_start = digit & !after_digit;
    let fraction = run_start & (dot << 1);
    let exponent = run_start & ((exp | exp_sign) << 1);
    let after_fraction = digit.wrapping_add(fraction) & !digit;
    let exponent_digits = (digit.wrapping_add(exponent) ^ digit) & digit;
    let after_exponent = digit.wrapping_add(exponent) & !digit;
    bad |= after_fraction & dot;
    bad |= after_exponent & (dot | exp);
    // Three exponent digits may be out of an f64's range: the cursor decides those.
    bad |= exponent_digits & (exponent_digits >> 1) & (exponent_digits >> 2);
    bad &= region;
    // Keep the whole tokens before the first bad byte.
    let good = comma & ((bad & bad.wrapping_neg()).wrapping_sub(1) | if bad == 0 { u64::MAX } else { 0 });
    match good {
        0 => 0,
        g => 64 - g.leading_zeros() as usize,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    fn block(bytes: &[u8]) -> [u8; 16] {
        let mut a = [b' '; 16];
        a[..bytes.len().min(16)].copy_from_slice(&bytes[..bytes.len().min(16)]);
        a
    }

    /// The byte-at-a-time number grammar over `text`, element by element: the length of the
    /// prefix made of whole valid `number,` elements.
    fn reference_numbers(text: &[u8]) -> usize {
        let mut cur = super::super::Cursor::new(text);
        let mut done = 0;
        while cur.number_here().is_ok() && text.get(cur.pos()) == Some(&b',') {
            done = cur.pos() + 1;
            cur = super::super::Cursor::new(text);
            cur.pos = done;
        }
        done
    }

    #[test]
    fn every_way_classifies_like_the_reference() {
        let all: Vec<u8> = (0..=255).collect();
        for chunk in all.chunks(16) {
            let b = block(chunk);
            assert_eq!(swar::classify(&b), reference(&b));
            assert_eq!(fast::classify(&b), reference(&b));
        }
    }

    #[test]
    fn number_runs_stop_where_the_grammar_needs_a_closer_look() {
        let pad = |s: &str| format!("{s}{}", " ".repeat(64));
        for (text, skipped) in [
            ("1,-0.5,2e5,3E-07,0,", 19),
            ("1,2,01,3,", 4),
            ("1,1e400,2,", 2),
            ("1.5.3,2,", 0),
            ("1e5e3,", 0),
            ("-,1,", 0),
            ("1,2]", 2),
            ("1, 2,", 2),
            ("1.,", 0),
            ("+1,", 0),
        ] {
            let p = pad(text);
            assert_eq!(number_run(p.as_bytes(), 0), skipped, "{text}");
            assert_eq!(reference_numbers(&p.as_bytes()[..skipped]), skipped, "{text}");
        }
    }

    proptest! {
        #[test]
        fn blocks_classify_like_the_reference(bytes in proptest::array::uniform16(any::<u8>())) {
            prop_assert_eq!(swar::classify(&bytes), reference(&bytes));
            prop_assert_eq!(fast::classify(&bytes), reference(&bytes));
            prop_assert_eq!(fast::special(&bytes), reference(&bytes).special);
            prop_assert_eq!(swar::special(&bytes), reference(&bytes).special);
            let mut other = bytes;
            other[usize::from(bytes[0] % 16)] ^= bytes[1] & 1;
            let same: u16 = (0..16).filter(|&k| bytes[k] == other[k]).map(|k| 1 << k).sum();
            prop_assert_eq!(fast::same(&bytes, &other), same);
            prop_assert_eq!(swar::same(&bytes, &other), same);
        }

        #[test]
        fn wide_masks_classify_like_the_reference(bytes in proptest::collection::vec(
            proptest::sample::select(b"0123456789.,eE+-x ]".to_vec()), 64)) {
            let chunk: [u8; 64] = bytes.try_into().unwrap();
            prop_assert_eq!(fast::numbers(&chunk), reference_wide(&chunk));
            prop_assert_eq!(swar::numbers(&chunk), reference_wide(&chunk));
            let plain = Wide { exp: 0, plus: 0, ..reference_wide(&chunk) };
            prop_assert_eq!(fast::plain_numbers(&chunk), plain);
            prop_assert_eq!(swar::plain_numbers(&chunk), plain);
        }

        #[test]
        fn plain_runs_end_at_the_first_special_byte(
            bytes in proptest::collection::vec(prop_oneof![
                8 => proptest::char::range('a', 'z').prop_map(|c| c as u8),
                1 => any::<u8>(),
            ], 0..200),
            from in 0usize..200,
        ) {
            let from = from.min(bytes.len());
            let end = plain_run(&bytes, from);
            let special = |k: usize| reference(&block(&bytes[k..=k])).special & 1 != 0;
            prop_assert!(from <= end && end <= bytes.len());
            prop_assert!((from..end).all(|k| !special(k)));
            prop_assert!(bytes.len() - end < 16 || special(end));
            if let Some(close) = plain_string_end(&bytes, from) {
                prop_assert!((from..close).all(|k| !special(k)));
                prop_assert_eq!(bytes[close], b'"');
            }
        }

        #[test]
        fn number_runs_skip_only_what_the_grammar_accepts(
            parts in proptest::collection::vec(prop_oneof![
                "-?(0|[1-9][0-9]{0,8})(\\.[0-9]{1,9})?([eE][+-]?[0-9]{1,3})?",
                "[0-9eE.+\\-]{1,6}",
                Just(String::from(" ")),
                Just(String::from("]")),
            ], 1..30),
            at in 0usize..8,
        ) {
            let text = format!("{}{}", parts.join(","), " ".repeat(64));
            let at = at.min(text.len());
            let end = number_run(text.as_bytes(), at);
            // Whatever was skipped is whole valid elements, each ended by its comma.
            prop_assert_eq!(reference_numbers(&text.as_bytes()[at..end]), end - at);
        }
    }
}
