//! The fast path for the rows of `upsert_rows` and `patch_rows`: a row whose names are plain and
//! distinct, with a valid id and no name a rule singles out (beyond `vector`/`vectors` in an
//! upsert), is read as member spans in one tight loop and recorded without the per-member
//! bookkeeping of [`Scan::stamped_object`]. Any other row (and every row with an error) is
//! walked the general way from its start, so what is accepted and every message are the same.

use super::{classify, id_token_ok, Edit, Name, Scan, Splice};
use crate::scan::spans::MemberSpan;
use crate::scan::{Cursor, Member, MemberCuts, StrToken};

#[cfg(test)]
thread_local! {
    /// Set by tests to walk every row the general way, the reference for the fast path.
    static GENERAL_ONLY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the fast row path runs (always, outside tests).
#[inline]
fn fast_rows_on() -> bool {
    #[cfg(test)]
    return !GENERAL_ONLY.with(std::cell::Cell::get);
    #[cfg(not(test))]
    true
}

/// Runs `f` with the fast row path off.
#[cfg(test)]
pub(super) fn general_only<T>(f: impl FnOnce() -> T) -> T {
    GENERAL_ONLY.with(|g| g.set(true));
    let out = f();
    GENERAL_ONLY.with(|g| g.set(false));
    out
}

/// How the fast path treats a row's members, kept for the rows after it with the same names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct RowShape {
    /// Which member is the id.
    id: usize,
    /// Whether a member is `vector` or `vectors` (an upsert's, cut from the mirror copy).
    vectors: bool,
}

impl RowShape {
    /// Classifies a row's names; `None` if it has no id or a name the fast path leaves to the
    /// general one.
    fn of(bytes: &[u8], spans: &[MemberSpan], upsert: bool) -> Option<RowShape> {
        let mut id = None;
        let mut vectors = false;
        for (i, span) in spans.iter().enumerate() {
            match classify(span.name(bytes)) {
                Name::Other => {}
                Name::Id => id = Some(i),
                Name::Vector if upsert => vectors = true,
                _ => return None,
            }
        }
        Some(RowShape { id: id?, vectors })
    }
}

impl Scan {
    /// Takes the row at the cursor by the fast path if it can: true when the row is consumed and
    /// recorded, false (the cursor where it was, nothing recorded) when it must be walked by
    /// [`Scan::stamped_object`]. `upsert` must be the same for every row of one array.
    #[inline]
    pub(super) fn plain_row(&mut self, cur: &mut Cursor<'_>, upsert: bool) -> bool {
        if !fast_rows_on() {
            return false;
        }
        let mark = cur.mark();
        let taken = match cur.member_spans(&mut self.row_members) {
            Some(close) => self.record_plain_row(cur.bytes(), close, upsert),
            None => false,
        };
        if !taken {
            self.row_shape = None;
            cur.rewind(mark);
        }
        taken
    }

    /// Records a row read as spans, as [`Scan::stamped_object`] would have; false (nothing
    /// recorded) if the row has no valid id or a name the fast path leaves to the general one.
    #[inline]
    fn record_plain_row(&mut self, bytes: &[u8], close: usize, upsert: bool) -> bool {
        let spans = self.row_members.spans();
        let shape = match self.row_shape {
            Some(shape) if self.row_members.same_names() => shape,
            _ => match RowShape::of(bytes, spans, upsert) {
                Some(shape) => shape,
                None => return false,
            },
        };
        let Some(id) = spans.get(shape.id) else {
            return false;
        };
        if !id_token_ok(
            id.kind,
            bytes.get(id.value_start..id.value_end).unwrap_or_default(),
        ) {
            return false;
        }
        self.row_shape = Some(shape);
        self.plan.id_spans.push((id.value_start, id.value_end));
        if shape.vectors {
            self.plan.mirror_drops.extend(vector_cuts(bytes, spans, close));
        }
        // Every member is kept (the id at least): the stamp goes in with a comma.
        self.plan.edits.push(Edit {
            start: close,
            end: close,
            splice: Splice::Member { comma: true },
        });
        self.plan.stamped_rows += 1;
        true
    }
}
/// The mirror's cuts of a row's `vector`/`vectors` members, as [`super::StampedMembers`] plans them.
fn vector_cuts(bytes: &[u8], spans: &[MemberSpan], close: usize) -> Vec<(usize, usize)> {
    let mut cuts = MemberCuts::default();
    for (index, span) in spans.iter().enumerate() {
        let member = Member {
            index,
            key_start: span.key_start,
            key: StrToken {
                start: span.key_start + 1,
                end: span.key_end,
                escaped: false,
            },
        };
        cuts.begin(&member);
        let drop = classify(span.name(bytes)) == Name::Vector;
        cuts.end(&member, span.value_end, drop);
    }
    cuts.close(close)
}
