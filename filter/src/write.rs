//! Validation and stamping of `POST /v2/namespaces/{ns}` bodies (SPEC §2.2, §2.3, §2.5).
//!
//! [`plan`] scans the body once, checking every rejection rule, and records the splices stamping
//! needs: where each row object closes, where columnar writes close (with their id counts), and the
//! client's own `_hevlayer_upserted_at` / `_hevlayer_shard` members to replace or drop. [`render`]
//! then copies the body with those splices applied. Every other byte goes upstream unchanged.

use crate::metrics::WriteReason;
use crate::scan::{Cursor, Kind, Member, MemberCuts, Names, StrToken, SyntaxError};
use crate::sidecar_api;

/// The stamp attribute.
pub const STAMP: &str = crate::sidecar_api::STAMP_ATTRIBUTE;
/// Reserved; accepted from clients but dropped (the gateway does not shard).
pub const SHARD: &str = "_hevlayer_shard";
const RESERVED_PREFIX: &str = "_hevlayer_";

const OPERATIONS: [&str; 10] = [
    "upsert_rows",
    "upsert_columns",
    "patch_rows",
    "patch_columns",
    "deletes",
    "delete_by_filter",
    "patch_by_filter",
    "copy_from_namespace",
    "branch_from_namespace",
    "schema",
];

const NO_OPERATION: &str = "Request must include a native Turbopuffer write operation";
const REMOVED_CUSTOM: &str = "custom write bodies were removed; use native Turbopuffer write keys such as \
     upsert_rows, patch_rows, patch_columns, and deletes";
const REMOVED_BLOBS: &str = "document blob writes are no longer supported; store binary payloads externally \
     and write an ordinary attribute with that location";

/// Why a write body was refused; each is a 422 `validation_error`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    InvalidJson(SyntaxError),
    /// Valid JSON of another kind, starting at this byte offset.
    NotAnObject(Kind, usize),
    NoOperation,
    RemovedKey(&'static str),
    Reserved(String),
    Shape(String),
}

impl Rejection {
    /// The exact message the client sees.
    pub fn message(&self) -> String {
        match self {
            Rejection::InvalidJson(e) => format!("request body is not valid JSON: {e}"),
            Rejection::NotAnObject(kind, at) => not_an_object(*kind, *at),
            Rejection::NoOperation => NO_OPERATION.to_owned(),
            Rejection::RemovedKey(m) => (*m).to_owned(),
            Rejection::Reserved(name) => format!("attribute '{name}' uses the reserved _hevlayer_* prefix"),
            Rejection::Shape(m) => m.clone(),
        }
    }

    /// The counter label for this class of rejection.
    pub fn reason(&self) -> WriteReason {
        match self {
            Rejection::InvalidJson(_) | Rejection::NotAnObject(..) => WriteReason::InvalidJson,
            Rejection::NoOperation => WriteReason::NoOperation,
            Rejection::RemovedKey(_) => WriteReason::RemovedKey,
            Rejection::Reserved(_) => WriteReason::ReservedAttribute,
            Rejection::Shape(_) => WriteReason::Shape,
        }
    }
}

/// The message for a body that is valid JSON of another kind than an object, found at `at`.
pub fn not_an_object(kind: Kind, at: usize) -> String {
    format!(
        "request body must be a JSON object, found {} at byte {at}",
        kind.described()
    )
}

/// What goes in at a splice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Splice {
    /// `,"_hevlayer_upserted_at":S` (without the comma in an empty object).
    Member { comma: bool },
    /// `S` in place of a client's value.
    Value,
    /// `,"_hevlayer_upserted_at":[S,S,..]` with one value per id.
    Column { comma: bool, n: usize },
    /// `[S,S,..]` in place of a client's column.
    ColumnValue { n: usize },
    /// Nothing: the bytes are removed.
    Drop,
    /// `"return_affected_ids":true,` right after the top-level `{` (no comma in an empty object).
    AffectedIds { comma: bool },
    /// `true` in place of the client's `return_affected_ids` value.
    True,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Edit {
    start: usize,
    end: usize,
    splice: Splice,
}

/// What [`plan`] learned about a valid write.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WritePlan {
    edits: Vec<Edit>,
    /// Rows (or column entries) that will carry the stamp.
    pub stamped_rows: u64,
    /// Conditional or filter write: the cache is updated from the ids Turbopuffer returns.
    pub response_driven: bool,
    /// The client itself sent `return_affected_ids: true`.
    pub client_wants_ids: bool,
    /// The write changes documents the cache may hold (upserts, patches, deletes, filter writes).
    pub mirrors: bool,
    /// The write patches rows (`patch_rows`, `patch_columns`): its mirror merges into cached
    /// copies, so they must still be there when it comes.
    pub patches: bool,
    /// Byte ranges [`render_mirror`] leaves out: `vector`/`vectors` members and columns (the cache
    /// keeps no vectors unless configured to) along with the dropped shard members.
    mirror_drops: Vec<(usize, usize)>,
    /// Where the ids the write names are (rows, id columns, `deletes`), in body order: what
    /// [`WritePlan::ids`] reads. Filter writes change documents no id here names.
    id_spans: Vec<(usize, usize)>,
}

impl WritePlan {
    /// True when [`render`] would return the body unchanged.
    pub fn is_identity(&self) -> bool {
        self.edits.is_empty()
    }

    /// The ids the write names, as the JSON tokens the client spelled them with (`body` is the
    /// one planned). Every document the write changes is among them unless it is response
    /// driven (a filter or conditional write).
    pub fn ids<'a>(&'a self, body: &'a [u8]) -> impl ExactSizeIterator<Item = &'a [u8]> + 'a {
        self.id_spans.iter().map(move |&(start, end)| &body[start..end])
    }
}

/// Scans a write body once: validates it (first error wins) and plans the stamp splices.
pub fn plan(body: &[u8]) -> Result<WritePlan, Rejection> {
    let mut cur = Cursor::new(body);
    let mut scan = Scan::default();
    match cur.peek_kind() {
        Ok(Kind::Object) => {}
        Ok(kind) => {
            let at = cur.pos();
            cur.skip_value().map_err(Rejection::InvalidJson)?;
            cur.finish().map_err(Rejection::InvalidJson)?;
            return Err(Rejection::NotAnObject(kind, at));
        }
        Err(e) => return Err(Rejection::InvalidJson(e)),
    }
    let open = cur.pos();
    let mut members = 0;
    let mut names = Names::default();
    cur.object(|cur, m| {
        members += 1;
        scan.unique(&mut names, cur, &m, "the request body");
        scan.top_member(cur, m)
    })
    .map_err(Rejection::InvalidJson)?;
    cur.finish().map_err(Rejection::InvalidJson)?;

    if let Some(key) = scan.removed_top_key {
        return Err(Rejection::RemovedKey(key));
    }
    if !scan.has_operation {
        return Err(Rejection::NoOperation);
    }
    if let Some(rejection) = scan.first_error {
        return Err(rejection);
    }
    let mut plan = scan.plan;
    if plan.response_driven && !plan.client_wants_ids {
        match scan.affected_ids_value {
            Some((start, end)) => plan.edits.push(Edit {
                start,
                end,
                splice: Splice::True,
            }),
            None => plan.edits.push(Edit {
                start: open + 1,
                end: open + 1,
                splice: Splice::AffectedIds { comma: members > 0 },
            }),
        }
    }
    sort_edits(&mut plan.edits);
    Ok(plan)
}

/// Puts edits in body order. They mostly come in order already (a scan goes through the body
/// once), which one look confirms.
fn sort_edits(edits: &mut [Edit]) {
    if !edits.is_sorted_by_key(|e| (e.start, e.end)) {
        edits.sort_by_key(|e| (e.start, e.end));
    }
}

/// Applies a plan's splices with the request's stamp (epoch ms).
pub fn render(body: &[u8], plan: &WritePlan, stamp: u64) -> Vec<u8> {
    apply(body, &plan.edits, plan.stamped_rows, stamp)
}

/// The body the document-cache mirror gets: the upstream body without vectors (the cache does
/// not keep them unless configured to), so a large vector write costs the sidecar little.
pub fn render_mirror(body: &[u8], plan: &WritePlan, stamp: u64) -> Vec<u8> {
    let mut edits: Vec<Edit> = plan
        .edits
        .iter()
        .filter(|e| e.splice != Splice::Drop)
        .copied()
        .collect();
    edits.extend(plan.mirror_drops.iter().copied().map(drop_edit));
    sort_edits(&mut edits);
    apply(body, &edits, plan.stamped_rows, stamp)
}

fn apply(body: &[u8], edits: &[Edit], stamped_rows: u64, stamp: u64) -> Vec<u8> {
    // The stamp member is spelled once and copied whole at each row: one copy per splice (each
    // copy has a fixed cost in a wasm runtime) instead of one per piece.
    let mut digits = [0u8; 20];
    let s = sidecar_api::decimal(stamp, &mut digits);
    let mut member = Vec::with_capacity(STAMP.len() + s.len() + 4);
    member.push(b',');
    push_key(&mut member);
    member.extend_from_slice(s);
    let extra = stamped_rows as usize * member.len() + edits.len() * 8 + 32;
    let mut out = Vec::with_capacity(body.len() + extra);
    let mut at = 0;
    for edit in edits {
        out.extend_from_slice(body.get(at..edit.start).unwrap_or_default());
        match edit.splice {
            Splice::Member { comma } => {
                out.extend_from_slice(if comma { &member } else { &member[1..] });
            }
            Splice::Value => out.extend_from_slice(s),
            Splice::Column { comma, n } => {
                let key = &member[..member.len() - s.len()];
                out.extend_from_slice(if comma { key } else { &key[1..] });
                push_column(&mut out, s, n);
            }
            Splice::ColumnValue { n } => push_column(&mut out, s, n),
            Splice::Drop => {}
            Splice::AffectedIds { comma } => {
                let text: &[u8] = b"\"return_affected_ids\":true,";
                out.extend_from_slice(if comma { text } else { &text[..text.len() - 1] });
            }
            Splice::True => out.extend_from_slice(b"true"),
        }
        at = edit.end;
    }
    out.extend_from_slice(body.get(at..).unwrap_or_default());
    out
}

fn push_key(out: &mut Vec<u8>) {
    out.push(b'"');
    out.extend_from_slice(STAMP.as_bytes());
    out.extend_from_slice(b"\":");
}

fn push_column(out: &mut Vec<u8>, s: &[u8], n: usize) {
    out.reserve(n * (s.len() + 1) + 2);
    out.push(b'[');
    for i in 0..n {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(s);
    }
    out.push(b']');
}

/// How an attribute name is treated in stamped objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Name {
    Id,
    Stamp,
    Shard,
    Reserved,
    Blobs,
    Vector,
    Other,
}

/// Classifies a decoded name by its bytes (an unescaped name's raw bytes are the same).
fn classify(name: &[u8]) -> Name {
    if name.starts_with(RESERVED_PREFIX.as_bytes()) {
        return if name == STAMP.as_bytes() {
            Name::Stamp
        } else if name == SHARD.as_bytes() {
            Name::Shard
        } else {
            Name::Reserved
        };
    }
    match name {
        b"id" => Name::Id,
        b"blobs" => Name::Blobs,
        b"vector" | b"vectors" => Name::Vector,
        _ => Name::Other,
    }
}

/// The members of a stamped object (a row, a patch, a columns object) as they go by: which are
/// cut from what goes upstream (the reserved shard) and from the mirror copy (the shard and
/// vectors), how many stay, and where the client's own stamp value is.
#[derive(Default)]
struct StampedMembers {
    upstream: MemberCuts,
    mirror: MemberCuts,
    kept: usize,
    stamp: Option<(usize, usize)>,
}

impl StampedMembers {
    #[inline]
    fn begin(&mut self, member: &Member) {
        self.upstream.begin(member);
        self.mirror.begin(member);
    }

    /// After the member's value, which spans `value_start..value_end`.
    #[inline]
    fn end(&mut self, member: &Member, class: Name, value_start: usize, value_end: usize) {
        match class {
            Name::Stamp => {
                self.kept += 1;
                self.stamp = Some((value_start, value_end));
            }
            Name::Shard => {}
            _ => self.kept += 1,
        }
        self.upstream.end(member, value_end, class == Name::Shard);
        self.mirror
            .end(member, value_end, matches!(class, Name::Shard | Name::Vector));
    }
}

/// A column's values: their count when it is an array (`None` otherwise, skipped); id values
/// must be strings or numbers.
fn column_values(
    cur: &mut Cursor<'_>,
    class: Name,
    name: &str,
    errors: &mut Vec<String>,
    id_spans: &mut Vec<(usize, usize)>,
) -> Result<Option<usize>, SyntaxError> {
    if cur.peek_kind()? != Kind::Array {
        cur.skip_value()?;
        return Ok(None);
    }
    if class != Name::Id {
        return cur.array(|cur| cur.skip_value().map(|_| ())).map(Some);
    }
    let mut bad_id = false;
    let n = cur.array(|cur| {
        let start = cur.pos();
        bad_id |= !skip_id(cur)?;
        id_spans.push((start, cur.pos()));
        Ok(())
    })?;
    if bad_id {
        errors.push(format!("{name} id values must be strings or numbers"));
    }
    Ok(Some(n))
}

fn drop_edit((start, end): (usize, usize)) -> Edit {
    Edit {
        start,
        end,
        splice: Splice::Drop,
    }
}

/// Skips one id value; true if it is a string or an unsigned 64-bit integer.
fn skip_id(cur: &mut Cursor<'_>) -> crate::scan::Result<bool> {
    let kind = cur.peek_kind()?;
    let start = cur.pos();
    cur.skip_value()?;
    Ok(id_token_ok(
        kind,
        cur.bytes().get(start..cur.pos()).unwrap_or_default(),
    ))
}

/// Whether a valid JSON token of this kind is an id: a string or an unsigned 64-bit integer.
#[inline]
fn id_token_ok(kind: Kind, token: &[u8]) -> bool {
    match kind {
        Kind::String => true,
        Kind::Number => {
            token.iter().all(u8::is_ascii_digit)
                && std::str::from_utf8(token).is_ok_and(|d| d.parse::<u64>().is_ok())
        }
        _ => false,
    }
}

/// Scan state: the plan so far and the first rule violation in document order.
#[derive(Default)]
struct Scan {
    plan: WritePlan,
    has_operation: bool,
    removed_top_key: Option<&'static str>,
    first_error: Option<Rejection>,
    affected_ids_value: Option<(usize, usize)>,
    /// A row's member names, the buffer reused from row to row.
    row_names: Names,
    /// A row's members read by the fast path ([`rows`]), the buffer reused from row to row.
    row_members: crate::scan::spans::Members,
    /// How the fast path treated the last row's names, for the next one if it has the same.
    row_shape: Option<rows::RowShape>,
}

type Step = crate::scan::Result<()>;

impl Scan {
    fn fail(&mut self, rejection: Rejection) {
        if self.first_error.is_none() {
            self.first_error = Some(rejection);
        }
    }

    fn shape(&mut self, message: String) {
        self.fail(Rejection::Shape(message));
    }

    /// Refuses a member name seen before in the same object: which of the two Turbopuffer would
    /// apply is its parser's choice, and the mirror could cache the other.
    #[inline]
    fn unique(&mut self, names: &mut Names, cur: &Cursor<'_>, m: &Member, place: &str) {
        if names.repeats(cur.bytes(), m.key) {
            self.repeated(cur, m, place);
        }
    }

    #[cold]
    fn repeated(&mut self, cur: &Cursor<'_>, m: &Member, place: &str) {
        self.shape(format!(
            "member '{}' appears twice in {place} (again at byte {})",
            cur.text(m.key),
            m.key_start
        ));
    }

    fn top_member(&mut self, cur: &mut Cursor<'_>, m: Member) -> Step {
        let key = cur.text(m.key);
        let kind = cur.peek_kind()?;
        let is_null = kind == Kind::Null;
        if OPERATIONS.contains(&key.as_ref()) && !is_null {
            self.has_operation = true;
        }
        match key.as_ref() {
            "upsert_rows" | "patch_rows" | "upsert_columns" | "patch_columns" if is_null => {
                cur.skip_value().map(|_| ())
            }
            "upsert_rows" => self.rows(cur, "upsert_rows"),
            "patch_rows" => self.rows(cur, "patch_rows"),
            "upsert_columns" => self.columns(cur, "upsert_columns"),
            "patch_columns" => self.columns(cur, "patch_columns"),
            "deletes" => self.deletes(cur),
            "patch_by_filter" => {
                if !is_null {
                    self.plan.response_driven = true;
                    self.plan.mirrors = true;
                }
                self.patch_by_filter(cur)
            }
            "delete_by_filter" | "upsert_condition" | "patch_condition" | "delete_condition" => {
                if !is_null {
                    self.plan.response_driven = true;
                    self.plan.mirrors |= key == "delete_by_filter";
                }
                cur.skip_value().map(|_| ())
            }
            "return_affected_ids" => {
                let start = cur.pos();
                if kind == Kind::Bool && cur.bytes().get(start) == Some(&b't') {
                    self.plan.client_wants_ids = true;
                }
                cur.skip_value()?;
                self.affected_ids_value = Some((start, cur.pos()));
                Ok(())
            }
            "upserts" | "patches" => {
                self.removed_top_key.get_or_insert(REMOVED_CUSTOM);
                cur.skip_value().map(|_| ())
            }
            _ => cur.skip_value().map(|_| ()),
        }
    }

    fn id_value(&mut self, cur: &mut Cursor<'_>, op: &str) -> Step {
        if !skip_id(cur)? {
            self.shape(format!("{op} id values must be strings or numbers"));
        }
        Ok(())
    }

    /// Checks an attribute name of a stamped object; returns how to treat it.
    #[inline]
    fn attribute(&mut self, cur: &Cursor<'_>, key: StrToken, op: &str) -> Name {
        // Names without escapes are classified on their bytes, with nothing decoded.
        let class = match cur.bytes().get(key.start..key.end) {
            Some(raw) if !key.escaped => classify(raw),
            _ => classify(cur.text(key).as_bytes()),
        };
        if matches!(class, Name::Reserved | Name::Blobs | Name::Vector) {
            self.attribute_rules(cur, key, op, class);
        }
        class
    }

    /// The rules on the names [`Scan::attribute`] singles out.
    fn attribute_rules(&mut self, cur: &Cursor<'_>, key: StrToken, op: &str, class: Name) {
        match class {
            Name::Reserved => self.fail(Rejection::Reserved(cur.text(key).into_owned())),
            Name::Blobs if op != "patch_by_filter" => self.fail(Rejection::RemovedKey(REMOVED_BLOBS)),
            Name::Vector if op.starts_with("patch") => self.shape(format!(
                "{op} cannot patch vector or vectors values; upsert full rows instead"
            )),
            _ => {}
        }
    }

    fn rows(&mut self, cur: &mut Cursor<'_>, name: &'static str) -> Step {
        self.plan.mirrors = true;
        self.plan.patches |= name == "patch_rows";
        if cur.peek_kind()? != Kind::Array {
            self.shape(format!("{name} must be an array of row objects"));
            return cur.skip_value().map(|_| ());
        }
        let upsert = name == "upsert_rows";
        self.row_shape = None;
        cur.array(|cur| {
            if self.plain_row(cur, upsert) {
                return Ok(());
            }
            if cur.peek_kind()? != Kind::Object {
                self.shape(format!("{name} entries must be objects"));
                return cur.skip_value().map(|_| ());
            }
            self.stamped_object(cur, name, true)
        })
        .map(|_| ())
    }

    /// A row (or `patch_by_filter.patch`): check its names, replace or drop the client's stamp
    /// members, and insert the stamp before the closing brace if the client had none.
    fn stamped_object(&mut self, cur: &mut Cursor<'_>, op: &str, needs_id: bool) -> Step {
        let mut has_id = false;
        let mut members = StampedMembers::default();
        let mut names = std::mem::take(&mut self.row_names);
        names.clear();
        let place = match op {
            "patch_by_filter" => "patch_by_filter.patch",
            "upsert_rows" => "an upsert_rows entry",
            _ => "a patch_rows entry",
        };
        let close = cur.object(|cur, m| {
            members.begin(&m);
            self.unique(&mut names, cur, &m, place);
            let class = self.attribute(cur, m.key, op);
            let value_start = cur.pos();
            match class {
                Name::Id if needs_id => {
                    has_id = true;
                    self.id_value(cur, op)?;
                    self.plan.id_spans.push((value_start, cur.pos()));
                }
                _ => {
                    cur.skip_value()?;
                }
            }
            members.end(&m, class, value_start, cur.pos());
            Ok(())
        })?;
        self.row_names = names;
        if needs_id && !has_id {
            self.shape(format!("{op} entries must include id"));
        }
        let splice = match members.stamp {
            Some(_) => Splice::Value,
            None => Splice::Member {
                comma: members.kept > 0,
            },
        };
        self.stamp_at(members, close, splice);
        self.plan.stamped_rows += 1;
        Ok(())
    }

    /// Adds an object's cuts and its stamp splice: over the client's stamp value if it had one,
    /// else before the closing brace.
    fn stamp_at(&mut self, members: StampedMembers, close: usize, splice: Splice) {
        let (start, end) = members.stamp.unwrap_or((close, close));
        self.plan
            .edits
            .extend(members.upstream.close(close).into_iter().map(drop_edit));
        self.plan.mirror_drops.extend(members.mirror.close(close));
        self.plan.edits.push(Edit { start, end, splice });
    }

    /// `upsert_columns` / `patch_columns`: every column an array as long as the id column; the
    /// stamp goes in as one more column (or over the client's).
    fn columns(&mut self, cur: &mut Cursor<'_>, name: &'static str) -> Step {
        self.plan.mirrors = true;
        self.plan.patches |= name == "patch_columns";
        if cur.peek_kind()? != Kind::Object {
            self.shape(format!("{name} must be an object of column arrays"));
            return cur.skip_value().map(|_| ());
        }
        let mut ids: Option<Option<usize>> = None; // Some(None): an id member that is not an array
        let mut lengths: Vec<(String, usize)> = Vec::new();
        let mut members = StampedMembers::default();
        let mut errors: Vec<String> = Vec::new();
        let mut names = Names::default();
        let close = cur.object(|cur, m| {
            members.begin(&m);
            self.unique(&mut names, cur, &m, name);
            let class = self.attribute(cur, m.key, name);
            let value_start = cur.pos();
            let count = column_values(cur, class, name, &mut errors, &mut self.plan.id_spans)?;
            match (class, count) {
                (Name::Id, _) => ids = Some(count),
                (Name::Shard, _) => {}
                (_, None) => errors.push(format!("{name} column '{}' must be an array", cur.text(m.key))),
                (Name::Stamp, Some(_)) => {}
                (_, Some(count)) => lengths.push((cur.text(m.key).into_owned(), count)),
            }
            members.end(&m, class, value_start, cur.pos());
            Ok(())
        })?;
        let Some(n) = self.column_count(name, ids, errors, &lengths) else {
            return Ok(());
        };
        let splice = match members.stamp {
            Some(_) => Splice::ColumnValue { n },
            None => Splice::Column {
                comma: members.kept > 0,
                n,
            },
        };
        self.stamp_at(members, close, splice);
        self.plan.stamped_rows += n as u64;
        Ok(())
    }

    /// The number of rows of a columns write, or `None` after a shape error: the id column is
    /// a non-empty array and every other column as long.
    fn column_count(
        &mut self,
        name: &str,
        ids: Option<Option<usize>>,
        errors: Vec<String>,
        lengths: &[(String, usize)],
    ) -> Option<usize> {
        let n = match ids {
            None => {
                self.shape(format!("{name} must include an id column"));
                return None;
            }
            Some(None) => {
                self.shape(format!("{name} id column must be an array"));
                return None;
            }
            Some(Some(0)) => {
                self.shape(format!("{name} id column must not be empty"));
                return None;
            }
            Some(Some(n)) => n,
        };
        if let Some(e) = errors.into_iter().next() {
            self.shape(e);
            return None;
        }
        if let Some((column, count)) = lengths.iter().find(|(_, c)| *c != n) {
            self.shape(format!("{name} column '{column}' has {count} values for {n} ids"));
            return None;
        }
        Some(n)
    }

    fn deletes(&mut self, cur: &mut Cursor<'_>) -> Step {
        match cur.peek_kind()? {
            Kind::Null => cur.skip_value().map(|_| ()),
            Kind::Array => {
                self.plan.mirrors = true;
                let mut bad = false;
                let ids = &mut self.plan.id_spans;
                cur.array(|cur| {
                    let start = cur.pos();
                    let k = cur.skip_value()?;
                    bad |= !matches!(k, Kind::String | Kind::Number);
                    ids.push((start, cur.pos()));
                    Ok(())
                })?;
                if bad {
                    self.shape("deletes values must be strings or numbers".to_owned());
                }
                Ok(())
            }
            _ => {
                self.shape("deletes must be an array".to_owned());
                cur.skip_value().map(|_| ())
            }
        }
    }

    fn patch_by_filter(&mut self, cur: &mut Cursor<'_>) -> Step {
        if cur.peek_kind()? != Kind::Object {
            // Turbopuffer judges a malformed patch_by_filter; there is nothing to stamp.
            return cur.skip_value().map(|_| ());
        }
        let mut names = Names::default();
        cur.object(|cur, m| {
            self.unique(&mut names, cur, &m, "patch_by_filter");
            if cur.text(m.key) == "patch" && cur.peek_kind()? == Kind::Object {
                self.stamped_object(cur, "patch_by_filter", false)
            } else {
                cur.skip_value().map(|_| ())
            }
        })
        .map(|_| ())
    }
}

/// The documents an accepted write may change, for the fence when its mirror did not happen: the
/// ids it names (as the JSON tokens it spells them with), or the whole namespace for filter writes
/// and for more than `max_ids` ids. Scans the body again (up to the id past the limit): this
/// runs only when a mirror did not happen.
pub fn fence_scope(body: &[u8], max_ids: usize) -> crate::fence::Scope {
    use crate::fence::Scope;
    let mut ids: Vec<String> = Vec::new();
    let mut whole = false;
    let mut cur = Cursor::new(body);
    // Past `max_ids` the answer is the namespace: the scan stops there (an error ends it).
    let token = |cur: &mut Cursor<'_>, ids: &mut Vec<String>| -> crate::scan::Result<()> {
        let start = cur.pos();
        cur.skip_value()?;
        ids.push(String::from_utf8_lossy(&body[start..cur.pos()]).into_owned());
        if ids.len() > max_ids {
            return cur.error("enough ids");
        }
        Ok(())
    };
    let scanned = cur.object(|cur, m| {
        let key = cur.text(m.key);
        let kind = cur.peek_kind()?;
        match (key.as_ref(), kind) {
            ("upsert_rows" | "patch_rows", Kind::Array) => cur
                .array(|cur| {
                    if cur.peek_kind()? != Kind::Object {
                        return cur.skip_value().map(|_| ());
                    }
                    cur.object(|cur, m| {
                        if cur.text(m.key) == "id" {
                            token(cur, &mut ids)
                        } else {
                            cur.skip_value().map(|_| ())
                        }
                    })
                    .map(|_| ())
                })
                .map(|_| ()),
            ("upsert_columns" | "patch_columns", Kind::Object) => cur
                .object(|cur, m| {
                    if cur.text(m.key) == "id" && cur.peek_kind()? == Kind::Array {
                        cur.array(|cur| token(cur, &mut ids)).map(|_| ())
                    } else {
                        cur.skip_value().map(|_| ())
                    }
                })
                .map(|_| ()),
            ("deletes", Kind::Array) => cur.array(|cur| token(cur, &mut ids)).map(|_| ()),
            ("patch_by_filter" | "delete_by_filter", k) if k != Kind::Null => {
                whole = true;
                cur.skip_value().map(|_| ())
            }
            _ => cur.skip_value().map(|_| ()),
        }
    });
    if whole || scanned.is_err() || ids.len() > max_ids {
        Scope::Namespace
    } else {
        Scope::Ids(ids)
    }
}

#[cfg(test)]
pub(crate) mod bodies;
mod rows;
#[cfg(test)]
mod tests;
