//! Reading and trimming write responses: the affected ids Turbopuffer returns (SPEC §2.5).

use crate::scan::{Cursor, Kind, MemberCuts};

/// Members the gateway may have asked for on the client's behalf.
pub const AFFECTED_ID_KEYS: [&str; 3] = ["upserted_ids", "patched_ids", "deleted_ids"];

/// Removes the affected-id arrays from a JSON object response, keeping every other byte.
/// Returns `None` when there is nothing to remove or the body is not a JSON object.
pub fn strip_affected_ids(body: &[u8]) -> Option<Vec<u8>> {
    let mut cur = Cursor::new(body);
    if cur.peek_kind().ok()? != Kind::Object {
        return None;
    }
    let mut plan = MemberCuts::default();
    let close = cur
        .object(|cur, m| {
            plan.begin(&m);
            let drop = AFFECTED_ID_KEYS.contains(&cur.text(m.key).as_ref());
            cur.skip_value()?;
            plan.end(&m, cur.pos(), drop);
            Ok(())
        })
        .ok()?;
    cur.finish().ok()?;
    let cuts = plan.close(close);
    if cuts.is_empty() {
        return None;
    }
    let mut out = Vec::with_capacity(body.len());
    let mut at = 0;
    for (start, end) in cuts {
        out.extend_from_slice(&body[at..start]);
        at = end;
    }
    out.extend_from_slice(&body[at..]);
    Some(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn strip(s: &str) -> Option<String> {
        strip_affected_ids(s.as_bytes()).map(|b| String::from_utf8(b).unwrap())
    }

    #[test]
    fn removes_only_the_id_arrays() {
        assert_eq!(
            strip(r#"{"status":"OK","rows_affected":2,"upserted_ids":[1,2],"billing":{}}"#).unwrap(),
            r#"{"status":"OK","rows_affected":2,"billing":{}}"#
        );
        assert_eq!(
            strip(r#"{"deleted_ids":["a"], "status":"OK"}"#).unwrap(),
            r#"{"status":"OK"}"#
        );
        assert_eq!(strip(r#"{"patched_ids":[],"deleted_ids":[3]}"#).unwrap(), r#"{}"#);
        assert_eq!(
            strip(r#"{"status":"OK","patched_ids":[1]}"#).unwrap(),
            r#"{"status":"OK"}"#
        );
        assert_eq!(
            strip(r#"{"a":1,"upserted_ids":[1],"b":2,"deleted_ids":[2]}"#).unwrap(),
            r#"{"a":1,"b":2}"#
        );
        assert_eq!(strip(r#"{"status":"OK"}"#), None);
        assert_eq!(strip("not json"), None);
        assert_eq!(strip("[1]"), None);
    }

    proptest::proptest! {
        #[test]
        fn result_is_valid_json_without_the_keys(keys in proptest::sample::subsequence(vec!["status", "upserted_ids", "rows_affected", "patched_ids", "deleted_ids", "billing"], 0..6)) {
            let body = format!("{{{}}}", keys.iter().map(|k| format!("\"{k}\": [1]")).collect::<Vec<_>>().join(" , "));
            let out = strip_affected_ids(body.as_bytes()).unwrap_or_else(|| body.clone().into_bytes());
            let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
            let obj = v.as_object().unwrap();
            for k in keys {
                proptest::prop_assert_eq!(obj.contains_key(k), !AFFECTED_ID_KEYS.contains(&k));
            }
        }
    }
}
