//! Reads by the stamp (SPEC §2.6): the query rewrite.
//!
//! A query (`POST /v2/namespaces/{ns}/query`, `/multi_query`, or a `/query` body with `queries`)
//! may carry two gateway-only fields, `as_of: T` and `between: [lo, hi]`, which select rows by their
//! `_hevlayer_upserted_at` stamp. [`plan`] scans the body once, like the write path: it validates
//! the grammar and those fields, and records byte splices that remove the two fields and AND a
//! predicate into `filters` (wrapping the caller's filter, or adding the member). The read
//! watermark's predicate is AND-ed in the same way where it applies. [`render`] copies the body
//! with the splices applied; every other byte reaches Turbopuffer unchanged.

use crate::metrics::ReadReason;
use crate::scan::{Cursor, Kind, Member, MemberCuts, StrToken, SyntaxError};
use crate::sidecar_api;
use crate::write::{not_an_object, STAMP};

const AS_OF: &str = "as_of";
const BETWEEN: &str = "between";
const FILTERS: &str = "filters";
const CONSISTENCY: &str = "consistency";
const QUERIES: &str = "queries";

/// The largest bound accepted: Turbopuffer's integer attributes are signed 64-bit.
pub const MAX_BOUND: u64 = i64::MAX as u64;

/// Why a query was refused; each is a 422 `validation_error`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadRejection {
    InvalidJson(SyntaxError),
    /// Valid JSON of another kind, starting at this byte offset.
    NotAnObject(Kind, usize),
    /// A temporal field (or a member the rewrite reads) is invalid; the message names it.
    Field(String),
}

impl ReadRejection {
    /// The exact message the client sees.
    pub fn message(&self) -> String {
        match self {
            ReadRejection::InvalidJson(e) => format!("request body is not valid JSON: {e}"),
            ReadRejection::NotAnObject(kind, at) => not_an_object(*kind, *at),
            ReadRejection::Field(m) => m.clone(),
        }
    }

    pub fn reason(&self) -> ReadReason {
        match self {
            ReadRejection::InvalidJson(_) | ReadRejection::NotAnObject(..) => ReadReason::InvalidJson,
            ReadRejection::Field(_) => ReadReason::BadField,
        }
    }
}

/// A window of stamps a query selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// `as_of: T`: stamps up to and including T.
    AsOf(u64),
    /// `between: [lo, hi]`: stamps after lo, up to and including hi.
    Between(u64, u64),
}

/// Whether and how the read watermark applies to this request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WatermarkRule {
    /// The watermark to apply (epoch ms): set when the namespace's index is updating and the
    /// watermark is known and fresh.
    pub at_ms: Option<u64>,
    /// Apply it to every query, not only to eventually consistent ones.
    pub always: bool,
}

/// One splice: `start..end` of the body is replaced by `insert`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Edit {
    start: usize,
    end: usize,
    insert: Vec<u8>,
}

/// What [`plan`] decided for a valid query.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReadPlan {
    edits: Vec<Edit>,
    /// (Sub-)queries that got a predicate from `as_of` or `between`.
    pub temporal: usize,
    /// (Sub-)queries that got the watermark's predicate.
    pub watermarked: usize,
}

impl ReadPlan {
    /// True when [`render`] would return the body unchanged.
    pub fn is_identity(&self) -> bool {
        self.edits.is_empty()
    }
}

/// A `filters` member's value.
#[derive(Debug, Clone, Copy)]
struct Filters {
    start: usize,
    end: usize,
    null: bool,
}

/// What the scan learned about one query object (the whole body, or one element of `queries`).
#[derive(Debug, Default)]
struct QueryScan {
    /// Offset of the object's `{`.
    open: usize,
    members: usize,
    dropped: usize,
    /// Byte ranges removing `as_of` and `between` members.
    cuts: Vec<(usize, usize)>,
    window: Option<Window>,
    /// Which temporal fields were given (null counts as absent).
    has_as_of: bool,
    has_between: bool,
    filters: Option<Filters>,
    /// `consistency.level`, when given as a string.
    eventual: Option<bool>,
    /// The `queries` array's elements (top level only; `None` when absent or not an array).
    queries: Option<Vec<Option<QueryScan>>>,
}

/// Scan state shared by every query object of the body: the first rule violation.
#[derive(Default)]
struct Scan {
    first_error: Option<String>,
}

impl Scan {
    fn fail(&mut self, message: String) {
        if self.first_error.is_none() {
            self.first_error = Some(message);
        }
    }

    /// Walks one query object. `label` prefixes field names in messages (`queries[2].`);
    /// `top` says whether `queries` is read here.
    fn query(&mut self, cur: &mut Cursor<'_>, label: &str, top: bool) -> crate::scan::Result<QueryScan> {
        let mut q = QueryScan {
            open: cur.pos(),
            ..QueryScan::default()
        };
        let mut cuts = MemberCuts::default();
        // Which of the fields below were seen (bit by position in `READ_FIELDS`).
        let mut seen = 0u8;
        let close = cur.object(|cur, m| {
            q.members += 1;
            cuts.begin(&m);
            let found = read_field(cur, m.key, top);
            let field = found.map(|(_, name)| name);
            if let Some((index, name)) = found {
                let bit = 1u8 << index;
                if seen & bit != 0 {
                    self.fail(format!(
                        "{label}{name} is given more than once (byte {})",
                        m.key_start
                    ));
                }
                seen |= bit;
            }
            let drop = matches!(field, Some(AS_OF | BETWEEN));
            match field {
                Some(AS_OF) => {
                    q.has_as_of |= cur.peek_kind()? != Kind::Null;
                    if let Some(t) = self.bound(cur, label)? {
                        q.window = Some(Window::AsOf(t));
                    }
                }
                Some(BETWEEN) => {
                    q.has_between |= cur.peek_kind()? != Kind::Null;
                    if let Some((lo, hi)) = self.between(cur, label)? {
                        q.window = Some(Window::Between(lo, hi));
                    }
                }
                Some(FILTERS) => {
                    let start = cur.pos();
                    let null = cur.skip_value()? == Kind::Null;
                    q.filters = Some(Filters {
                        start,
                        end: cur.pos(),
                        null,
                    });
                }
                Some(CONSISTENCY) => q.eventual = consistency_level(cur)?,
                Some(_) => q.queries = self.queries(cur)?,
                None => {
                    cur.skip_value()?;
                }
            }
            if drop {
                q.dropped += 1;
            }
            cuts.end(&m, cur.pos(), drop);
            Ok(())
        })?;
        q.cuts = cuts.close(close);
        if q.has_as_of && q.has_between {
            self.fail(format!(
                "{label}as_of and {label}between cannot be combined; give one of them"
            ));
        }
        Ok(q)
    }

    /// `as_of`: a non-negative integer, or null (absent).
    fn bound(&mut self, cur: &mut Cursor<'_>, label: &str) -> crate::scan::Result<Option<u64>> {
        let start = cur.pos();
        let kind = cur.skip_value()?;
        if kind == Kind::Null {
            return Ok(None);
        }
        match integer(kind, &cur.bytes()[start..cur.pos()]) {
            Some(t) => Ok(Some(t)),
            None => {
                self.fail(format!(
                    "{label}as_of must be a non-negative integer of epoch milliseconds (at most {MAX_BOUND}), found {}",
                    shown(&cur.bytes()[start..cur.pos()])
                ));
                Ok(None)
            }
        }
    }

    /// `between`: `[lo, hi]` of non-negative integers with lo <= hi, or null (absent).
    fn between(&mut self, cur: &mut Cursor<'_>, label: &str) -> crate::scan::Result<Option<(u64, u64)>> {
        let start = cur.pos();
        let kind = cur.peek_kind()?;
        if kind != Kind::Array {
            cur.skip_value()?;
            if kind != Kind::Null {
                self.fail(format!(
                    "{label}between must be an array of two non-negative integers [lo, hi] of epoch milliseconds, found {}",
                    shown(&cur.bytes()[start..cur.pos()])
                ));
            }
            return Ok(None);
        }
        let mut bounds: Vec<Option<u64>> = Vec::with_capacity(2);
        cur.array(|cur| {
            let at = cur.pos();
            let kind = cur.skip_value()?;
            bounds.push(integer(kind, &cur.bytes()[at..cur.pos()]));
            Ok(())
        })?;
        match bounds.as_slice() {
            [Some(lo), Some(hi)] if lo <= hi => Ok(Some((*lo, *hi))),
            [Some(lo), Some(hi)] => {
                self.fail(format!(
                    "{label}between lower bound {lo} is greater than its upper bound {hi}"
                ));
                Ok(None)
            }
            _ => {
                self.fail(format!(
                    "{label}between must be an array of two non-negative integers [lo, hi] of epoch milliseconds (at most {MAX_BOUND}), found {}",
                    shown(&cur.bytes()[start..cur.pos()])
                ));
                Ok(None)
            }
        }
    }

    /// `queries`: each object element is a sub-query; anything else is Turbopuffer's to judge.
    fn queries(&mut self, cur: &mut Cursor<'_>) -> crate::scan::Result<Option<Vec<Option<QueryScan>>>> {
        if cur.peek_kind()? != Kind::Array {
            cur.skip_value()?;
            return Ok(None);
        }
        let mut subs = Vec::new();
        cur.array(|cur| {
            if cur.peek_kind()? == Kind::Object {
                let label = format!("queries[{}].", subs.len());
                subs.push(Some(self.query(cur, &label, false)?));
            } else {
                cur.skip_value()?;
                subs.push(None);
            }
            Ok(())
        })?;
        Ok(Some(subs))
    }
}

/// The member names the rewrite reads.
const READ_FIELDS: [&str; 5] = [AS_OF, BETWEEN, FILTERS, CONSISTENCY, QUERIES];

/// Which of [`READ_FIELDS`] a member's name is, by position and name (`queries` only at the top
/// level). A name without escapes is compared as it is, with no decoding: this runs for every
/// member of every query.
fn read_field(cur: &Cursor<'_>, key: StrToken, top: bool) -> Option<(usize, &'static str)> {
    let decoded;
    let name: &[u8] = if key.escaped {
        decoded = cur.text(key);
        decoded.as_bytes()
    } else {
        cur.bytes().get(key.start..key.end).unwrap_or_default()
    };
    READ_FIELDS
        .iter()
        .copied()
        .enumerate()
        .find(|(_, f)| f.as_bytes() == name)
        .filter(|(_, f)| top || *f != QUERIES)
}

/// `consistency.level`: Some(true) for "eventual", Some(false) for another string.
fn consistency_level(cur: &mut Cursor<'_>) -> crate::scan::Result<Option<bool>> {
    if cur.peek_kind()? != Kind::Object {
        cur.skip_value()?;
        return Ok(None);
    }
    let mut level = None;
    cur.object(|cur, m: Member| {
        if cur.text(m.key) == "level" && cur.peek_kind()? == Kind::String {
            let tok = cur.string()?;
            level = Some(cur.text(tok) == "eventual");
            return Ok(());
        }
        cur.skip_value().map(|_| ())
    })?;
    Ok(level)
}

/// A non-negative JSON integer no larger than [`MAX_BOUND`] (no sign, fraction or exponent).
fn integer(kind: Kind, text: &[u8]) -> Option<u64> {
    if kind != Kind::Number || text.is_empty() {
        return None;
    }
    let mut n: u64 = 0;
    for &b in text {
        if !b.is_ascii_digit() {
            return None;
        }
        n = n.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    (n <= MAX_BOUND).then_some(n)
}

/// A value's text for a message, cut short if long.
fn shown(text: &[u8]) -> String {
    const MAX: usize = 40;
    let s = String::from_utf8_lossy(&text[..text.len().min(MAX)]);
    if text.len() > MAX {
        format!("{s}...")
    } else {
        s.into_owned()
    }
}

/// Appends the predicate a window selects.
fn window_predicate(window: Window, out: &mut Vec<u8>) {
    match window {
        Window::AsOf(t) => condition("Lte", t, out),
        Window::Between(lo, hi) => {
            out.extend_from_slice(b"[\"And\",[");
            condition("Gt", lo, out);
            out.push(b',');
            condition("Lte", hi, out);
            out.extend_from_slice(b"]]");
        }
    }
}

/// Appends `["_hevlayer_upserted_at","<op>",<value>]`.
fn condition(op: &str, value: u64, out: &mut Vec<u8>) {
    out.reserve(STAMP.len() + op.len() + 28);
    out.extend_from_slice(b"[\"");
    out.extend_from_slice(STAMP.as_bytes());
    out.extend_from_slice(b"\",\"");
    out.extend_from_slice(op.as_bytes());
    out.extend_from_slice(b"\",");
    sidecar_api::push_decimal(out, value);
    out.push(b']');
}

/// A query object's predicates, comma-separated, and how many there are.
#[derive(Default)]
struct Predicates {
    list: Vec<u8>,
    count: usize,
}

impl Predicates {
    /// Starts the next predicate (the caller appends it).
    fn next(&mut self) -> &mut Vec<u8> {
        if self.count > 0 {
            self.list.push(b',');
        }
        self.count += 1;
        &mut self.list
    }

    /// `["And",[a,b,..]]` of the predicates (the predicate itself when there is one).
    fn and(&self, out: &mut Vec<u8>) {
        if self.count == 1 {
            out.extend_from_slice(&self.list);
            return;
        }
        out.extend_from_slice(b"[\"And\",[");
        out.extend_from_slice(&self.list);
        out.extend_from_slice(b"]]");
    }
}

/// Adds the edits of one query object: its cuts, and its predicates AND-ed into `filters`.
fn rewrite(q: &QueryScan, predicates: &Predicates, edits: &mut Vec<Edit>) {
    edits.extend(q.cuts.iter().map(|&(start, end)| Edit {
        start,
        end,
        insert: Vec::new(),
    }));
    if predicates.count == 0 {
        return;
    }
    match q.filters {
        Some(f) if !f.null => {
            edits.push(Edit {
                start: f.start,
                end: f.start,
                insert: b"[\"And\",[".to_vec(),
            });
            let mut tail = Vec::with_capacity(predicates.list.len() + 3);
            tail.push(b',');
            tail.extend_from_slice(&predicates.list);
            tail.extend_from_slice(b"]]");
            edits.push(Edit {
                start: f.end,
                end: f.end,
                insert: tail,
            });
        }
        Some(f) => {
            let mut insert = Vec::with_capacity(predicates.list.len() + 10);
            predicates.and(&mut insert);
            edits.push(Edit {
                start: f.start,
                end: f.end,
                insert,
            });
        }
        None => {
            let mut member = Vec::with_capacity(predicates.list.len() + 22);
            member.extend_from_slice(b"\"filters\":");
            predicates.and(&mut member);
            if q.members > q.dropped {
                member.push(b',');
            }
            edits.push(Edit {
                start: q.open + 1,
                end: q.open + 1,
                insert: member,
            });
        }
    }
}

/// Scans a query body once: validates it (grammar errors first, then the first field error) and
/// plans the splices. `watermark` says whether the read watermark applies.
pub fn plan(body: &[u8], watermark: WatermarkRule) -> Result<ReadPlan, ReadRejection> {
    let mut cur = Cursor::new(body);
    match cur.peek_kind() {
        Ok(Kind::Object) => {}
        Ok(kind) => {
            let at = cur.pos();
            cur.skip_value().map_err(ReadRejection::InvalidJson)?;
            cur.finish().map_err(ReadRejection::InvalidJson)?;
            return Err(ReadRejection::NotAnObject(kind, at));
        }
        Err(e) => return Err(ReadRejection::InvalidJson(e)),
    }
    let mut scan = Scan::default();
    let mut top = scan
        .query(&mut cur, "", true)
        .map_err(ReadRejection::InvalidJson)?;
    cur.finish().map_err(ReadRejection::InvalidJson)?;
    if top.queries.is_some() && (top.has_as_of || top.has_between) {
        scan.fail(
            "as_of and between belong in each sub-query of a multi-query (queries[i].as_of), not at its top level"
                .to_owned(),
        );
    }
    if let Some(message) = scan.first_error {
        return Err(ReadRejection::Field(message));
    }
    let mut plan = ReadPlan::default();
    let watermarked = |q: &QueryScan, inherited: Option<bool>| {
        watermark
            .at_ms
            .filter(|_| watermark.always || q.eventual.or(inherited).unwrap_or(false))
    };
    let add = |q: &QueryScan, inherited: Option<bool>, plan: &mut ReadPlan| {
        let mut predicates = Predicates::default();
        if let Some(window) = q.window {
            window_predicate(window, predicates.next());
            plan.temporal += 1;
        }
        if let Some(w) = watermarked(q, inherited) {
            condition("Lte", w, predicates.next());
            plan.watermarked += 1;
        }
        rewrite(q, &predicates, &mut plan.edits);
    };
    match top.queries.take() {
        Some(subs) => {
            // The top level of a multi-query keeps its members; only the sub-queries change.
            for q in subs.iter().flatten() {
                add(q, top.eventual, &mut plan);
            }
        }
        None => add(&top, None, &mut plan),
    }
    plan.edits.sort_by_key(|e| (e.start, e.end));
    Ok(plan)
}

/// Applies a plan's splices.
pub fn render(body: &[u8], plan: &ReadPlan) -> Vec<u8> {
    let extra: usize = plan.edits.iter().map(|e| e.insert.len()).sum();
    let mut out = Vec::with_capacity(body.len() + extra);
    let mut at = 0;
    for edit in &plan.edits {
        out.extend_from_slice(&body[at..edit.start]);
        out.extend_from_slice(&edit.insert);
        at = edit.end;
    }
    out.extend_from_slice(&body[at..]);
    out
}

#[cfg(test)]
mod tests;
