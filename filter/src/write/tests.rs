#![allow(clippy::unwrap_used, clippy::panic)]
use super::bodies::write_body;
use super::*;
use proptest::prelude::*;

const S: u64 = 1_732_400_000_123;

fn stamped(body: &str) -> String {
    let plan = plan(body.as_bytes()).unwrap_or_else(|r| panic!("{body}: {}", r.message()));
    String::from_utf8(render(body.as_bytes(), &plan, S)).unwrap()
}

fn rejected(body: &str) -> String {
    match plan(body.as_bytes()) {
        Ok(_) => panic!("accepted: {body}"),
        Err(r) => r.message(),
    }
}

#[test]
fn stamps_upsert_rows_and_preserves_every_other_byte() {
    let body = r#"{ "upsert_rows" : [ {"id": 1, "vector": [0.10, 1e3], "t":"x"} ,{"id":"b"} ], "distance_metric":"cosine_distance"}"#;
    assert_eq!(
        stamped(body),
        r#"{ "upsert_rows" : [ {"id": 1, "vector": [0.10, 1e3], "t":"x","_hevlayer_upserted_at":1732400000123} ,{"id":"b","_hevlayer_upserted_at":1732400000123} ], "distance_metric":"cosine_distance"}"#
    );
    let p = plan(body.as_bytes()).unwrap();
    assert_eq!(p.stamped_rows, 2);
    assert!(p.mirrors && !p.response_driven);
}

#[test]
fn stamps_patch_rows() {
    assert_eq!(
        stamped(r#"{"patch_rows":[{"id":7,"n":null}]}"#),
        r#"{"patch_rows":[{"id":7,"n":null,"_hevlayer_upserted_at":1732400000123}]}"#
    );
}

#[test]
fn stamps_columns_with_one_value_per_id() {
    assert_eq!(
        stamped(r#"{"upsert_columns":{"id":[1,2,3],"vector":["AAAAAA==","AAAAAA==","AAAAAA=="]}}"#),
        r#"{"upsert_columns":{"id":[1,2,3],"vector":["AAAAAA==","AAAAAA==","AAAAAA=="],"_hevlayer_upserted_at":[1732400000123,1732400000123,1732400000123]}}"#
    );
    assert_eq!(
        stamped(r#"{"patch_columns":{"id":["a"],"x":[true]}}"#),
        r#"{"patch_columns":{"id":["a"],"x":[true],"_hevlayer_upserted_at":[1732400000123]}}"#
    );
}

#[test]
fn stamps_patch_by_filter_and_requests_affected_ids() {
    assert_eq!(
        stamped(r#"{"patch_by_filter":{"filters":["a","Eq",1],"patch":{"b":2}}}"#),
        r#"{"return_affected_ids":true,"patch_by_filter":{"filters":["a","Eq",1],"patch":{"b":2,"_hevlayer_upserted_at":1732400000123}}}"#
    );
    assert_eq!(
        stamped(r#"{"patch_by_filter":{"filters":["a","Eq",1],"patch":{}}}"#),
        r#"{"return_affected_ids":true,"patch_by_filter":{"filters":["a","Eq",1],"patch":{"_hevlayer_upserted_at":1732400000123}}}"#
    );
    let p = plan(br#"{"patch_by_filter":{"filters":["a","Eq",1],"patch":{"b":2}}}"#).unwrap();
    assert!(p.response_driven && p.mirrors && !p.client_wants_ids);
}

#[test]
fn leaves_unstamped_operations_alone() {
    for body in [
        r#"{"deletes":[1,"a"]}"#,
        r#"{"schema":{"a":"string"}}"#,
        r#"{"copy_from_namespace":"src"}"#,
        r#"{"branch_from_namespace":{"source_namespace":"src"}}"#,
        r#"{"upsert_rows":[],"future_key":{"x":1}}"#,
    ] {
        assert_eq!(stamped(body), body);
    }
    let copy = plan(br#"{"copy_from_namespace":"src"}"#).unwrap();
    assert!(!copy.mirrors && copy.is_identity());
}

#[test]
fn conditional_and_filter_writes_get_return_affected_ids() {
    assert_eq!(
        stamped(r#"{"delete_by_filter":["a","Eq",1]}"#),
        r#"{"return_affected_ids":true,"delete_by_filter":["a","Eq",1]}"#
    );
    assert_eq!(
        stamped(r#"{"deletes":[1],"delete_condition":["v","Lt",2],"return_affected_ids":false}"#),
        r#"{"deletes":[1],"delete_condition":["v","Lt",2],"return_affected_ids":true}"#
    );
    let asked = r#"{"upsert_rows":[{"id":1}],"upsert_condition":["v","Lt",2],"return_affected_ids":true}"#;
    let p = plan(asked.as_bytes()).unwrap();
    assert!(p.client_wants_ids && p.response_driven);
    assert_eq!(
        stamped(asked),
        r#"{"upsert_rows":[{"id":1,"_hevlayer_upserted_at":1732400000123}],"upsert_condition":["v","Lt",2],"return_affected_ids":true}"#
    );
}

#[test]
fn replaces_client_stamps_and_drops_client_shards() {
    assert_eq!(
        stamped(r#"{"upsert_rows":[{"id":1,"_hevlayer_upserted_at":5,"_hevlayer_shard":3,"a":1}]}"#),
        r#"{"upsert_rows":[{"id":1,"_hevlayer_upserted_at":1732400000123,"a":1}]}"#
    );
    assert_eq!(
        stamped(r#"{"upsert_rows":[{"_hevlayer_shard":3, "id":1}]}"#),
        r#"{"upsert_rows":[{"id":1,"_hevlayer_upserted_at":1732400000123}]}"#
    );
    assert_eq!(
        stamped(r#"{"patch_rows":[{"id":1,"_hevlayer_shard":3}]}"#),
        r#"{"patch_rows":[{"id":1,"_hevlayer_upserted_at":1732400000123}]}"#
    );
    assert_eq!(
        stamped(r#"{"upsert_columns":{"_hevlayer_shard":[1,2],"id":[1,2],"_hevlayer_upserted_at":[0,0]}}"#),
        r#"{"upsert_columns":{"id":[1,2],"_hevlayer_upserted_at":[1732400000123,1732400000123]}}"#
    );
    assert_eq!(
        stamped(r#"{"patch_by_filter":{"filters":[],"patch":{"_hevlayer_shard":1}}}"#),
        r#"{"return_affected_ids":true,"patch_by_filter":{"filters":[],"patch":{"_hevlayer_upserted_at":1732400000123}}}"#
    );
}

#[test]
fn every_rejection_message() {
    let removed_custom = "custom write bodies were removed; use native Turbopuffer write keys such as upsert_rows, patch_rows, patch_columns, and deletes";
    let removed_blobs = "document blob writes are no longer supported; store binary payloads externally and write an ordinary attribute with that location";
    let cases: &[(&str, &str)] = &[
        ("{}", "Request must include a native Turbopuffer write operation"),
        (
            r#"{"foo":1}"#,
            "Request must include a native Turbopuffer write operation",
        ),
        (
            r#"{"upsert_rows":null}"#,
            "Request must include a native Turbopuffer write operation",
        ),
        (
            r#"{"distance_metric":"cosine_distance","return_affected_ids":true}"#,
            "Request must include a native Turbopuffer write operation",
        ),
        (r#"{"upserts":[{"id":1}]}"#, removed_custom),
        (r#"{"patches":[{"id":1}],"deletes":[1]}"#, removed_custom),
        (r#"{"upsert_rows":[{"id":1,"blobs":{}}]}"#, removed_blobs),
        (r#"{"patch_rows":[{"id":1,"blobs":{}}]}"#, removed_blobs),
        (r#"{"upsert_columns":{"id":[1],"blobs":[1]}}"#, removed_blobs),
        (r#"{"patch_columns":{"id":[1],"blobs":[1]}}"#, removed_blobs),
        (
            r#"{"upsert_rows":[{"id":1,"_hevlayer_x":1}]}"#,
            "attribute '_hevlayer_x' uses the reserved _hevlayer_* prefix",
        ),
        (
            r#"{"upsert_rows":[{"id":1,"\u005fhevlayer_x":1}]}"#,
            "attribute '_hevlayer_x' uses the reserved _hevlayer_* prefix",
        ),
        (
            r#"{"patch_rows":[{"id":1,"_hevlayer_parent_id":1}]}"#,
            "attribute '_hevlayer_parent_id' uses the reserved _hevlayer_* prefix",
        ),
        (
            r#"{"upsert_columns":{"id":[1],"_hevlayer_y":[1]}}"#,
            "attribute '_hevlayer_y' uses the reserved _hevlayer_* prefix",
        ),
        (
            r#"{"patch_columns":{"id":[1],"_hevlayer_y":[1]}}"#,
            "attribute '_hevlayer_y' uses the reserved _hevlayer_* prefix",
        ),
        (
            r#"{"patch_by_filter":{"filters":[],"patch":{"_hevlayer_z":1}}}"#,
            "attribute '_hevlayer_z' uses the reserved _hevlayer_* prefix",
        ),
        (
            r#"{"upsert_rows":{}}"#,
            "upsert_rows must be an array of row objects",
        ),
        (
            r#"{"patch_rows":"x"}"#,
            "patch_rows must be an array of row objects",
        ),
        (r#"{"upsert_rows":[1]}"#, "upsert_rows entries must be objects"),
        (r#"{"patch_rows":[[]]}"#, "patch_rows entries must be objects"),
        (
            r#"{"upsert_rows":[{"a":1}]}"#,
            "upsert_rows entries must include id",
        ),
        (r#"{"patch_rows":[{}]}"#, "patch_rows entries must include id"),
        (
            r#"{"upsert_rows":[{"id":null}]}"#,
            "upsert_rows id values must be strings or numbers",
        ),
        (
            r#"{"upsert_rows":[{"id":-1}]}"#,
            "upsert_rows id values must be strings or numbers",
        ),
        (
            r#"{"upsert_rows":[{"id":1.5}]}"#,
            "upsert_rows id values must be strings or numbers",
        ),
        (
            r#"{"upsert_rows":[{"id":18446744073709551616}]}"#,
            "upsert_rows id values must be strings or numbers",
        ),
        (
            r#"{"patch_rows":[{"id":{}}]}"#,
            "patch_rows id values must be strings or numbers",
        ),
        (
            r#"{"upsert_columns":[]}"#,
            "upsert_columns must be an object of column arrays",
        ),
        (
            r#"{"patch_columns":1}"#,
            "patch_columns must be an object of column arrays",
        ),
        (
            r#"{"upsert_columns":{"a":[1]}}"#,
            "upsert_columns must include an id column",
        ),
        (
            r#"{"upsert_columns":{"id":1}}"#,
            "upsert_columns id column must be an array",
        ),
        (
            r#"{"patch_columns":{"id":[]}}"#,
            "patch_columns id column must not be empty",
        ),
        (
            r#"{"upsert_columns":{"id":[1],"a":2}}"#,
            "upsert_columns column 'a' must be an array",
        ),
        (
            r#"{"upsert_columns":{"a":[1,2,3],"id":[1,2]}}"#,
            "upsert_columns column 'a' has 3 values for 2 ids",
        ),
        (
            r#"{"patch_columns":{"id":[1,2],"a":[1]}}"#,
            "patch_columns column 'a' has 1 values for 2 ids",
        ),
        (
            r#"{"upsert_columns":{"id":[1,true]}}"#,
            "upsert_columns id values must be strings or numbers",
        ),
        (
            r#"{"patch_rows":[{"id":1,"vector":[1]}]}"#,
            "patch_rows cannot patch vector or vectors values; upsert full rows instead",
        ),
        (
            r#"{"patch_columns":{"id":[1],"vectors":[[[1]]]}}"#,
            "patch_columns cannot patch vector or vectors values; upsert full rows instead",
        ),
        (
            r#"{"patch_by_filter":{"filters":[],"patch":{"vector":[1]}}}"#,
            "patch_by_filter cannot patch vector or vectors values; upsert full rows instead",
        ),
        (r#"{"deletes":{}}"#, "deletes must be an array"),
        (
            r#"{"deletes":[1,null]}"#,
            "deletes values must be strings or numbers",
        ),
        (
            "[1]",
            "request body must be a JSON object, found an array at byte 0",
        ),
        (
            " \n\"x\"",
            "request body must be a JSON object, found a string at byte 2",
        ),
        ("null", "request body must be a JSON object, found null at byte 0"),
        (
            "-1.5e3 ",
            "request body must be a JSON object, found a number at byte 0",
        ),
        (
            "",
            "request body is not valid JSON: unexpected end of input at byte 0",
        ),
        (
            r#"{"upsert_rows":[{"id":1}"#,
            "request body is not valid JSON: unexpected end of input at byte 24",
        ),
        (
            r#"{"upsert_rows":[{"id":1,}]}"#,
            "request body is not valid JSON: expected a member name at byte 24",
        ),
    ];
    for (body, message) in cases {
        assert_eq!(rejected(body), *message, "{body}");
    }
}

#[test]
fn first_error_wins() {
    // Grammar errors anywhere beat rule errors; removed keys beat the rest; then document order.
    assert!(rejected(r#"{"upserts":1,"upsert_rows":[{"id":1}],"x":}"#)
        .starts_with("request body is not valid JSON"));
    assert!(
        rejected(r#"{"upsert_rows":[{"_hevlayer_a":1}],"upserts":[]}"#).starts_with("custom write bodies")
    );
    assert_eq!(
        rejected(r#"{"upsert_rows":[{"_hevlayer_a":1,"blobs":1}],"deletes":{}}"#),
        "attribute '_hevlayer_a' uses the reserved _hevlayer_* prefix"
    );
    assert_eq!(
        rejected(r#"{"deletes":{},"upsert_rows":[{"_hevlayer_a":1}]}"#),
        "deletes must be an array"
    );
    assert_eq!(
        rejected(r#"{"upsert_rows":[{"id":1},{"a":1},5]}"#),
        "upsert_rows entries must include id"
    );
}

#[test]
fn a_member_given_twice_is_refused_with_its_name_and_offset() {
    for (body, message) in [
        (
            r#"{"upsert_rows":[{"id":1,"id":2,"a":1}]}"#,
            "member 'id' appears twice in an upsert_rows entry (again at byte 24)",
        ),
        (
            r#"{"upsert_rows":[{"id":1}],"upsert_rows":[{"id":2}]}"#,
            "member 'upsert_rows' appears twice in the request body (again at byte 26)",
        ),
        (
            r#"{"patch_rows":[{"id":1,"a":1,"\u0061":2}]}"#,
            "member 'a' appears twice in a patch_rows entry (again at byte 29)",
        ),
        (
            r#"{"upsert_columns":{"id":[1],"x":[1],"x":[2]}}"#,
            "member 'x' appears twice in upsert_columns (again at byte 36)",
        ),
        (
            r#"{"patch_by_filter":{"filters":["a","Eq",1],"patch":{"b":1},"patch":{"b":2}}}"#,
            "member 'patch' appears twice in patch_by_filter (again at byte 59)",
        ),
        (
            r#"{"patch_by_filter":{"filters":["a","Eq",1],"patch":{"b":1,"b":2}}}"#,
            "member 'b' appears twice in patch_by_filter.patch (again at byte 58)",
        ),
        (
            r#"{"deletes":[1],"deletes":[2]}"#,
            "member 'deletes' appears twice in the request body (again at byte 15)",
        ),
    ] {
        assert_eq!(rejected(body), message, "{body}");
        assert_eq!(plan(body.as_bytes()).unwrap_err().reason(), WriteReason::Shape);
    }
    // Members of nested values and rows of different entries may share names.
    stamped(r#"{"upsert_rows":[{"id":1,"m":{"k":1}},{"id":2,"m":{"k":1}}]}"#);
}

#[test]
fn reason_labels() {
    assert_eq!(plan(b"{").unwrap_err().reason(), WriteReason::InvalidJson);
    assert_eq!(plan(b"{}").unwrap_err().reason(), WriteReason::NoOperation);
    assert_eq!(
        plan(br#"{"upserts":[]}"#).unwrap_err().reason(),
        WriteReason::RemovedKey
    );
    assert_eq!(
        plan(br#"{"upsert_rows":[{"id":1,"_hevlayer_q":1}]}"#)
            .unwrap_err()
            .reason(),
        WriteReason::ReservedAttribute
    );
    assert_eq!(
        plan(br#"{"deletes":1}"#).unwrap_err().reason(),
        WriteReason::Shape
    );
}

// ---- property tests ----

/// Removes every `_hevlayer_upserted_at` and `_hevlayer_shard` member from a generated body's
/// text (where those names appear only as member keys): the member with the comma before it,
/// or, for an object's first member, with the comma and whitespace after it.
fn strip_reserved(text: &str) -> String {
    let mut text = text.to_owned();
    for key in [STAMP, SHARD] {
        let quoted = format!("\"{key}\":");
        while let Some(start) = text.find(&quoted) {
            text = cut_member(&text, start, start + quoted.len());
        }
    }
    text
}

/// `text` without the member whose key starts at `key_start` and whose value follows `value_start`.
fn cut_member(text: &str, key_start: usize, value_start: usize) -> String {
    // serde_json finds where the value ends, independently of the gateway's scanner.
    let mut values =
        serde_json::Deserializer::from_str(&text[value_start..]).into_iter::<serde::de::IgnoredAny>();
    values.next().unwrap().unwrap();
    let value_end = value_start + values.byte_offset();
    let before = text[..key_start].trim_end();
    let (from, to) = match (
        before.strip_suffix(','),
        text[value_end..].trim_start().strip_prefix(','),
    ) {
        (Some(kept), _) => (kept.len(), value_end),
        (None, Some(rest)) => (key_start, text.len() - rest.trim_start().len()),
        (None, None) => (key_start, value_end),
    };
    format!("{}{}", &text[..from], &text[to..])
}

/// The gateway's `return_affected_ids` edit (SPEC §2.5), undone on the output or done on the
/// input, so the two can be compared: inserted right after the top-level `{`, or the client's
/// `false` turned into `true`.
fn align_affected_ids(body: &str, out: &str, p: &WritePlan) -> (String, String) {
    const KEY: &str = "\"return_affected_ids\":";
    if !p.response_driven {
        (body.to_owned(), out.to_owned())
    } else if body.contains(KEY) {
        (
            body.replace(&format!("{KEY}false"), &format!("{KEY}true")),
            out.to_owned(),
        )
    } else {
        (body.to_owned(), out.replacen(&format!("{{{KEY}true,"), "{", 1))
    }
}

/// The objects that carry the stamp: rows, column objects (flagged) and `patch_by_filter.patch`.
fn stamped_objects(
    v: &mut serde_json::Value,
) -> Vec<(bool, &mut serde_json::Map<String, serde_json::Value>)> {
    let mut found = Vec::new();
    for (key, value) in v.as_object_mut().into_iter().flatten() {
        match key.as_str() {
            "upsert_rows" | "patch_rows" => found.extend(
                value
                    .as_array_mut()
                    .into_iter()
                    .flatten()
                    .filter_map(|r| r.as_object_mut())
                    .map(|r| (false, r)),
            ),
            "upsert_columns" | "patch_columns" => found.extend(value.as_object_mut().map(|c| (true, c))),
            "patch_by_filter" => found.extend(
                value
                    .get_mut("patch")
                    .and_then(|p| p.as_object_mut())
                    .map(|p| (false, p)),
            ),
            _ => {}
        }
    }
    found
}

/// The output is valid JSON grammar, and serde_json reads it whenever it read the input (it refuses
/// some grammatical numbers, such as `1E400`, which the gateway leaves for Turbopuffer to judge).
fn output_is_valid(input: &[u8], out: &[u8]) -> bool {
    let serde_ok = |b: &[u8]| serde_json::from_slice::<serde_json::Value>(b).is_ok();
    crate::scan::validate(out).is_ok() && (!serde_ok(input) || serde_ok(out))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    /// Byte preservation: with the stamps and the client's reserved members taken out of both
    /// texts the same way, the output is the input byte for byte. And as JSON: every stamped
    /// object carries exactly the request's stamp and no shard, and apart from those members and
    /// a forced `return_affected_ids` the output's value is the input's.
    #[test]
    fn output_minus_stamps_equals_input(body in write_body()) {
        let p = plan(body.as_bytes()).unwrap();
        let out = String::from_utf8(render(body.as_bytes(), &p, S)).unwrap();
        let (input_text, out_text) = align_affected_ids(&body, &out, &p);
        prop_assert_eq!(strip_reserved(&out_text), strip_reserved(&input_text));

        let mut input: serde_json::Value = serde_json::from_str(&body).unwrap();
        let mut output: serde_json::Value = serde_json::from_str(&out).unwrap();
        let mut counted = 0u64;
        for (columnar, object) in stamped_objects(&mut output) {
            let ids = if columnar { object["id"].as_array().unwrap().len() } else { 1 };
            let stamp = if columnar { serde_json::json!(vec![S; ids]) } else { serde_json::json!(S) };
            prop_assert_eq!(object.remove(STAMP), Some(stamp));
            prop_assert_eq!(object.remove(SHARD), None);
            counted += ids as u64;
        }
        prop_assert_eq!(p.stamped_rows, counted);
        for (_, object) in stamped_objects(&mut input) {
            object.remove(STAMP);
            object.remove(SHARD);
        }
        if p.response_driven {
            prop_assert_eq!(output.as_object_mut().unwrap().remove("return_affected_ids"), Some(serde_json::Value::Bool(true)));
            input.as_object_mut().unwrap().remove("return_affected_ids");
        }
        prop_assert_eq!(output, input);
    }

    #[test]
    fn arbitrary_bytes_always_get_an_answer(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        if let Ok(p) = plan(&bytes) {
            let out = render(&bytes, &p, S);
            prop_assert!(output_is_valid(&bytes, &out));
        }
    }

    #[test]
    fn mutated_bodies_always_get_an_answer(body in write_body(), cut in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let mut bytes = body.into_bytes();
        let i = cut.index(bytes.len());
        bytes[i] = byte;
        match plan(&bytes) {
            Ok(p) => {
                let out = render(&bytes, &p, S);
                prop_assert!(output_is_valid(&bytes, &out));
            }
            Err(r) => prop_assert!(!r.message().is_empty()),
        }
    }

    #[test]
    fn validity_agrees_with_serde_json(body in write_body(), cut in any::<prop::sample::Index>()) {
        let bytes = &body.as_bytes()[..cut.index(body.len())];
        let ours = !matches!(plan(bytes), Err(Rejection::InvalidJson(_)));
        let theirs = serde_json::from_slice::<serde_json::Value>(bytes).is_ok();
        prop_assert_eq!(ours, theirs);
    }
}

#[test]
fn the_mirror_copy_leaves_vectors_out() {
    let body = br#"{"upsert_rows":[{"id":1,"vector":[0.1,0.2],"t":"a"},{"vector":"AAAA","id":2,"_hevlayer_shard":1}],"upsert_columns":{"id":[3],"vectors":[[[1]]],"x":[1]}}"#;
    let p = plan(body).unwrap();
    let mirror = String::from_utf8(render_mirror(body, &p, S)).unwrap();
    assert_eq!(
        mirror,
        r#"{"upsert_rows":[{"id":1,"t":"a","_hevlayer_upserted_at":1732400000123},{"id":2,"_hevlayer_upserted_at":1732400000123}],"upsert_columns":{"id":[3],"x":[1],"_hevlayer_upserted_at":[1732400000123]}}"#
    );
    let plain = br#"{"patch_rows":[{"id":1,"t":"a"}]}"#;
    let p = plan(plain).unwrap();
    assert_eq!(render_mirror(plain, &p, S), render(plain, &p, S));
}

proptest! {
    #[test]
    fn the_mirror_copy_is_the_upstream_body_without_vectors(body in write_body()) {
        let p = plan(body.as_bytes()).unwrap();
        let upstream: serde_json::Value = serde_json::from_slice(&render(body.as_bytes(), &p, S)).unwrap();
        let mirror: serde_json::Value = serde_json::from_slice(&render_mirror(body.as_bytes(), &p, S)).unwrap();
        let mut expected = upstream.clone();
        for op in ["upsert_rows", "patch_rows"] {
            if let Some(rows) = expected.get_mut(op).and_then(|r| r.as_array_mut()) {
                for r in rows {
                    if let Some(o) = r.as_object_mut() {
                        o.remove("vector");
                        o.remove("vectors");
                    }
                }
            }
        }
        prop_assert_eq!(mirror, expected);
    }
}

#[test]
fn a_fence_names_the_ids_a_write_touches_or_its_whole_namespace() {
    use crate::fence::Scope;
    let ids = |body: &str| match fence_scope(body.as_bytes(), 5) {
        Scope::Ids(ids) => Some(ids),
        Scope::Namespace => None,
    };
    assert_eq!(
        ids(
            r#"{"upsert_rows":[{"t":1,"id":"a"},{"id":7}],"patch_columns":{"x":[1],"id":["\u0062"]},"deletes":[9,"z"]}"#
        ),
        Some(vec![
            "\"a\"".into(),
            "7".into(),
            "\"\\u0062\"".into(),
            "9".into(),
            "\"z\"".into()
        ])
    );
    assert_eq!(
        ids(r#"{"upsert_rows":[{"id":1}],"upsert_condition":["v","Lt",1]}"#),
        Some(vec!["1".into()]),
        "a conditional write touches at most its own ids"
    );
    assert_eq!(
        ids(r#"{"patch_by_filter":{"filters":["a","Eq",1],"patch":{"b":1}}}"#),
        None
    );
    assert_eq!(ids(r#"{"delete_by_filter":["a","Eq",1]}"#), None);
    assert_eq!(
        ids(r#"{"deletes":[1,2,3,4,5,6]}"#),
        None,
        "more than the limit: the namespace"
    );
    assert_eq!(ids(r#"{"deletes":[1,2,3,4,5]}"#).map(|v| v.len()), Some(5));
    assert_eq!(ids(r#"{"schema":{}}"#), Some(vec![]));
}

proptest! {
    /// The ids the plan collects are the ids the fence's own scan finds, in the same spelling and
    /// order (the fence scan is the independent reference: it reads nothing but ids).
    #[test]
    fn the_plan_names_the_ids_the_fence_scan_finds(body in write_body()) {
        use crate::fence::Scope;
        let p = plan(body.as_bytes()).unwrap();
        let ours: Vec<String> = p.ids(body.as_bytes()).map(|t| String::from_utf8_lossy(t).into_owned()).collect();
        match fence_scope(body.as_bytes(), usize::MAX - 1) {
            Scope::Ids(theirs) => prop_assert_eq!(ours, theirs),
            Scope::Namespace => prop_assert!(body.contains("_by_filter")),
        }
    }
}

#[test]
fn the_plan_names_ids_in_every_form_with_whitespace() {
    let body = br#"{ "upsert_rows" : [ { "t" : 1 , "id" : "a" } ] , "patch_columns" : { "id" : [ 7 , "\u0062" ] , "x" : [ 1 , 2 ] } , "deletes" : [ 9 ] }"#;
    let p = plan(body).unwrap();
    let ids: Vec<&[u8]> = p.ids(body).collect();
    assert_eq!(ids, vec![&b"\"a\""[..], b"7", br#""\u0062""#, b"9"]);
}

/// The plan with the fast row path and with every row walked the general way.
fn both_ways(body: &[u8]) -> (Result<WritePlan, Rejection>, Result<WritePlan, Rejection>) {
    (plan(body), super::rows::general_only(|| plan(body)))
}

/// Row members the fast path takes and ones it must leave to the general walk (escaped, reserved
/// or repeated names, ids that are not ids, vectors in patches, whitespace and nesting).
fn row_member() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        r#""id":"doc-1""#,
        r#""id":7"#,
        r#""id" : 18446744073709551615"#,
        r#""id":18446744073709551616"#,
        r#""id":-1"#,
        r#""id":1.5"#,
        r#""id":true"#,
        r#""id":[1]"#,
        r#""\u0069d":2"#,
        r#""title":"title 1""#,
        r#""title":"a \"quoted\" title and then some more""#,
        r#""score":3"#,
        r#""score":-0.5e3"#,
        r#""score":01"#,
        r#""score":1e400"#,
        r#""tags":["a","b"]"#,
        r#""tags":[ "a" ,"b"]"#,
        r#""tags":[1,"b",null,true,false,-2.5]"#,
        r#""tags":[]"#,
        r#""tags":[1,]"#,
        r#""nested":{"a":[{"b":null}]}"#,
        r#""published":true"#,
        r#""published":false"#,
        r#""published":nul"#,
        r#""published":truex"#,
        r#""a name longer than sixteen bytes":"\u00e9\ud800""#,
        r#""bad":"\ud800""#,
        r#""ctl":"a	b""#,
        r#""vector":[0.5,1.5]"#,
        r#""vectors":"AAAA""#,
        r#""blobs":{}"#,
        r#""_hevlayer_upserted_at":1"#,
        r#""_hevlayer_shard":2"#,
        r#""_hevlayer_other":3"#,
        r#""é":1"#,
    ])
    .prop_map(str::to_owned)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(600))]

    #[test]
    fn the_fast_row_path_plans_what_the_general_walk_plans(
        rows in prop::collection::vec((prop::collection::vec(row_member(), 0..7), "[ \n]?", "[ \n]?"), 0..6),
        op in prop::sample::select(vec!["upsert_rows", "patch_rows"]),
    ) {
        let rows: Vec<String> = rows
            .iter()
            .map(|(members, open, sep)| format!("{{{open}{}}}", members.join(&format!("{sep},"))))
            .collect();
        let body = format!("{{\"{op}\":[{}]}}", rows.join(","));
        let (fast, general) = both_ways(body.as_bytes());
        prop_assert_eq!(fast, general, "{}", body);
    }

    #[test]
    fn the_fast_row_path_agrees_on_generated_and_mutated_bodies(
        body in write_body(),
        cut in any::<prop::sample::Index>(),
        byte in any::<u8>(),
    ) {
        let (fast, general) = both_ways(body.as_bytes());
        prop_assert_eq!(fast, general, "{}", body);
        let mut bytes = body.into_bytes();
        let i = cut.index(bytes.len());
        bytes[i] = byte;
        let (fast, general) = both_ways(&bytes);
        prop_assert_eq!(fast, general, "{}", String::from_utf8_lossy(&bytes));
    }
}

#[test]
fn the_fast_row_path_takes_the_common_rows() {
    let body = br#"{"upsert_rows":[{"id":"doc-1","title":"title 1","score":3,"tags":["a","b"],"published":true},{ "id" : 2 , "vector" : [0.5, 1.5], "t": {"a": [1]} }]}"#;
    let mut cur = crate::scan::Cursor::new(body);
    let mut scan = Scan::default();
    cur.expect(b'{', "").unwrap();
    cur.string().unwrap();
    cur.expect(b':', "").unwrap();
    cur.expect(b'[', "").unwrap();
    assert!(scan.plain_row(&mut cur, true));
    cur.expect(b',', "").unwrap();
    assert!(scan.plain_row(&mut cur, true));
    assert_eq!(scan.plan.stamped_rows, 2);
    assert_eq!(scan.plan.mirror_drops.len(), 1);
    assert!(!scan.plain_row(&mut cur, true), "not a row: the closing bracket");
}
