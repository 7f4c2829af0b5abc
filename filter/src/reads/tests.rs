#![allow(clippy::unwrap_used, clippy::panic)]
use super::*;
use proptest::prelude::*;
use serde_json::{json, Value};

const NONE: WatermarkRule = WatermarkRule {
    at_ms: None,
    always: false,
};

fn rewritten_with(body: &str, rule: WatermarkRule) -> String {
    let plan = plan(body.as_bytes(), rule).unwrap_or_else(|r| panic!("{body}: {}", r.message()));
    String::from_utf8(render(body.as_bytes(), &plan)).unwrap()
}

fn rewritten(body: &str) -> String {
    rewritten_with(body, NONE)
}

fn rejected(body: &str) -> String {
    match plan(body.as_bytes(), NONE) {
        Ok(_) => panic!("accepted: {body}"),
        Err(r) => {
            assert_eq!(r.reason(), ReadReason::BadField, "{body}: {}", r.message());
            r.message()
        }
    }
}

fn updating(at_ms: u64) -> WatermarkRule {
    WatermarkRule {
        at_ms: Some(at_ms),
        always: false,
    }
}

#[test]
fn queries_without_temporal_fields_are_untouched() {
    for body in [
        r#"{"rank_by":["id","asc"],"top_k":5}"#,
        r#"{"filters":["a","Eq",1],"rank_by":["vector","ANN",[0.1,0.2]],"top_k":1}"#,
        r#"{}"#,
        r#"{"queries":[{"rank_by":["id","asc"],"top_k":1}]}"#,
        r#"{"as_of":null,"between":null}"#,
    ] {
        let plan = plan(body.as_bytes(), NONE).unwrap();
        assert_eq!(plan.temporal, 0, "{body}");
        if !body.contains("null") {
            assert!(plan.is_identity(), "{body}");
        }
    }
    // Null temporal fields count as absent, and are removed all the same.
    assert_eq!(
        rewritten(r#"{"as_of":null,"top_k":1,"between":null}"#),
        r#"{"top_k":1}"#
    );
}

#[test]
fn as_of_becomes_the_filter_when_there_is_none() {
    assert_eq!(
        rewritten(r#"{"rank_by":["id","asc"],"top_k":5,"as_of":1700000000000}"#),
        r#"{"filters":["_hevlayer_upserted_at","Lte",1700000000000],"rank_by":["id","asc"],"top_k":5}"#
    );
    assert_eq!(
        rewritten(r#"{"as_of":7}"#),
        r#"{"filters":["_hevlayer_upserted_at","Lte",7]}"#
    );
    assert_eq!(
        rewritten(r#"{"as_of":7,"top_k":1}"#),
        r#"{"filters":["_hevlayer_upserted_at","Lte",7],"top_k":1}"#
    );
    assert_eq!(
        rewritten(r#"{"as_of":0,"filters":null}"#),
        r#"{"filters":["_hevlayer_upserted_at","Lte",0]}"#
    );
}

#[test]
fn as_of_is_anded_with_the_callers_filters() {
    assert_eq!(
        rewritten(r#"{"filters":["color","Eq","red"],"as_of":5,"top_k":3}"#),
        r#"{"filters":["And",[["color","Eq","red"],["_hevlayer_upserted_at","Lte",5]]],"top_k":3}"#
    );
    // Nested filters are kept byte for byte, whitespace and all.
    assert_eq!(
        rewritten("{\"as_of\" : 5 , \"filters\" : [\"Or\", [[\"a\",\"Eq\",1], [\"Not\",[\"b\",\"In\",[1, 2.50]]]]] }"),
        "{\"filters\" : [\"And\",[[\"Or\", [[\"a\",\"Eq\",1], [\"Not\",[\"b\",\"In\",[1, 2.50]]]]],[\"_hevlayer_upserted_at\",\"Lte\",5]]] }"
    );
}

#[test]
fn between_selects_a_half_open_window() {
    assert_eq!(
        rewritten(r#"{"between":[10,20],"top_k":1}"#),
        r#"{"filters":["And",[["_hevlayer_upserted_at","Gt",10],["_hevlayer_upserted_at","Lte",20]]],"top_k":1}"#
    );
    assert_eq!(
        rewritten(r#"{"top_k":1,"filters":["id","In",[1,2]],"between":[ 10 , 10 ]}"#),
        r#"{"top_k":1,"filters":["And",[["id","In",[1,2]],["And",[["_hevlayer_upserted_at","Gt",10],["_hevlayer_upserted_at","Lte",10]]]]]}"#
    );
}

#[test]
fn escaped_member_names_are_read_like_turbopuffer_reads_them() {
    assert_eq!(
        rewritten(r#"{"as\u005fof":5,"top_k":1}"#),
        r#"{"filters":["_hevlayer_upserted_at","Lte",5],"top_k":1}"#
    );
    assert!(
        rejected(r#"{"filters":1,"filter\u0073":2,"as_of":1}"#).contains("filters is given more than once")
    );
}

#[test]
fn the_watermark_applies_to_eventual_queries_only_unless_always() {
    let eventual = r#"{"consistency":{"level":"eventual"},"top_k":1}"#;
    assert_eq!(
        rewritten_with(eventual, updating(99)),
        r#"{"filters":["_hevlayer_upserted_at","Lte",99],"consistency":{"level":"eventual"},"top_k":1}"#
    );
    for strong in [
        r#"{"top_k":1}"#,
        r#"{"consistency":{"level":"strong"},"top_k":1}"#,
        r#"{"consistency":{},"top_k":1}"#,
    ] {
        let plan = plan(strong.as_bytes(), updating(99)).unwrap();
        assert!(plan.is_identity() && plan.watermarked == 0, "{strong}");
        let always = WatermarkRule {
            at_ms: Some(99),
            always: true,
        };
        let out = rewritten_with(strong, always);
        assert!(
            out.starts_with(r#"{"filters":["_hevlayer_upserted_at","Lte",99],"#),
            "{out}"
        );
    }
    // Unknown watermark (or a namespace that is up to date): nothing to apply.
    assert!(plan(eventual.as_bytes(), NONE).unwrap().is_identity());
}

#[test]
fn watermark_and_window_and_filters_combine_in_one_and() {
    let body = r#"{"filters":["a","Eq",1],"as_of":50,"consistency":{"level":"eventual"}}"#;
    let plan = plan(body.as_bytes(), updating(40)).unwrap();
    assert_eq!((plan.temporal, plan.watermarked), (1, 1));
    assert_eq!(
        String::from_utf8(render(body.as_bytes(), &plan)).unwrap(),
        r#"{"filters":["And",[["a","Eq",1],["_hevlayer_upserted_at","Lte",50],["_hevlayer_upserted_at","Lte",40]]],"consistency":{"level":"eventual"}}"#
    );
    assert_eq!(
        rewritten_with(r#"{"as_of":50,"consistency":{"level":"eventual"}}"#, updating(40)),
        r#"{"filters":["And",[["_hevlayer_upserted_at","Lte",50],["_hevlayer_upserted_at","Lte",40]]],"consistency":{"level":"eventual"}}"#
    );
}

#[test]
fn multi_queries_rewrite_each_sub_query() {
    let body = r#"{"queries":[{"rank_by":["id","asc"],"top_k":1,"as_of":5},{"top_k":2},{"filters":["x","Eq",1],"between":[1,2]},7],"consistency":{"level":"eventual"},"rerank_by":["RRF"]}"#;
    let plan = plan(body.as_bytes(), updating(3)).unwrap();
    assert_eq!((plan.temporal, plan.watermarked), (2, 3));
    let out: Value = serde_json::from_slice(&render(body.as_bytes(), &plan)).unwrap();
    let w = json!(["_hevlayer_upserted_at", "Lte", 3]);
    assert_eq!(
        out,
        json!({
            "queries": [
                {"filters": ["And", [["_hevlayer_upserted_at", "Lte", 5], w]], "rank_by": ["id", "asc"], "top_k": 1},
                {"filters": w, "top_k": 2},
                {"filters": ["And", [["x", "Eq", 1],
                    ["And", [["_hevlayer_upserted_at", "Gt", 1], ["_hevlayer_upserted_at", "Lte", 2]]], w]]},
                7
            ],
            "consistency": {"level": "eventual"},
            "rerank_by": ["RRF"]
        })
    );
    // A strong multi-query gets only the windows.
    let strong = body.replace(r#""consistency":{"level":"eventual"},"#, "");
    let plan_strong = super::plan(strong.as_bytes(), updating(3)).unwrap();
    assert_eq!((plan_strong.temporal, plan_strong.watermarked), (2, 0));
    // A sub-query's own consistency wins over the top level's.
    let own = r#"{"queries":[{"consistency":{"level":"eventual"}},{"top_k":1}]}"#;
    assert_eq!(super::plan(own.as_bytes(), updating(3)).unwrap().watermarked, 1);
}

#[test]
fn bad_temporal_fields_are_named() {
    for (body, expected) in [
        (r#"{"as_of":-1}"#, "as_of must be a non-negative integer of epoch milliseconds (at most 9223372036854775807), found -1"),
        (r#"{"as_of":1.5}"#, "found 1.5"),
        (r#"{"as_of":1e3}"#, "found 1e3"),
        (r#"{"as_of":"5"}"#, "found \"5\""),
        (r#"{"as_of":true}"#, "as_of must be"),
        (r#"{"as_of":[5]}"#, "as_of must be"),
        (r#"{"as_of":9223372036854775808}"#, "as_of must be"),
        (r#"{"as_of":99999999999999999999999}"#, "as_of must be"),
        (r#"{"between":[1]}"#, "between must be an array of two non-negative integers [lo, hi] of epoch milliseconds (at most 9223372036854775807), found [1]"),
        (r#"{"between":[1,2,3]}"#, "between must be an array of two"),
        (r#"{"between":[]}"#, "found []"),
        (r#"{"between":[1,-2]}"#, "between must be an array of two"),
        (r#"{"between":[1,2.0]}"#, "between must be an array of two"),
        (r#"{"between":{"lo":1,"hi":2}}"#, "between must be an array of two"),
        (r#"{"between":"1,2"}"#, "between must be an array of two"),
        (r#"{"between":[5,4]}"#, "between lower bound 5 is greater than its upper bound 4"),
        (r#"{"as_of":5,"between":[1,2]}"#, "as_of and between cannot be combined; give one of them"),
        (r#"{"as_of":5,"as_of":6}"#, "as_of is given more than once (byte 11)"),
        (r#"{"filters":["a","Eq",1],"as_of":1,"filters":null}"#, "filters is given more than once"),
        (r#"{"consistency":{},"consistency":{}}"#, "consistency is given more than once"),
        (r#"{"queries":[{"as_of":-1}]}"#, "queries[0].as_of must be"),
        (r#"{"queries":[{"top_k":1},{"between":[2,1]}]}"#, "queries[1].between lower bound 2"),
        (r#"{"queries":[{"as_of":1,"between":[0,1]}]}"#, "queries[0].as_of and queries[0].between cannot be combined"),
        (r#"{"queries":[],"as_of":1}"#, "as_of and between belong in each sub-query of a multi-query"),
        (r#"{"queries":[],"queries":[]}"#, "queries is given more than once"),
    ] {
        let message = rejected(body);
        assert!(message.contains(expected), "{body}: {message}");
    }
    // The first violation in document order wins.
    assert!(rejected(r#"{"between":[2,1],"as_of":-1}"#).starts_with("between lower bound"));
    // Long values are cut short in messages.
    let long = format!(r#"{{"as_of":"{}"}}"#, "x".repeat(500));
    assert!(rejected(&long).len() < 200);
}

#[test]
fn malformed_bodies_name_the_byte() {
    let err = plan(br#"{"as_of":5,"#, NONE).unwrap_err();
    assert_eq!(err.reason(), ReadReason::InvalidJson);
    assert_eq!(
        err.message(),
        "request body is not valid JSON: unexpected end of input at byte 11"
    );
    let err = plan(br#"  [1]"#, NONE).unwrap_err();
    assert_eq!(
        err.message(),
        "request body must be a JSON object, found an array at byte 2"
    );
    assert_eq!(err.reason(), ReadReason::InvalidJson);
    // Grammar beats a field error that comes first.
    let err = plan(br#"{"as_of":-1,"x":}"#, NONE).unwrap_err();
    assert_eq!(err.reason(), ReadReason::InvalidJson);
    assert_eq!(plan(b"", NONE).unwrap_err().reason(), ReadReason::InvalidJson);
}

#[test]
fn a_sub_query_object_nested_deeper_is_not_a_sub_query() {
    // `queries` inside a sub-query is not special, and neither is a nested object's `as_of`.
    let body = r#"{"top_k":1,"rank_by":["Sum",[{"as_of":"x"}]],"x":{"queries":[{"as_of":-1}]}}"#;
    assert!(plan(body.as_bytes(), NONE).unwrap().is_identity());
}

// ---- property tests ----

/// A JSON value's text from a small generator (the kinds a query holds), with whitespace.
fn value_text() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        any::<i32>().prop_map(|n| n.to_string()),
        (-1000.0f64..1000.0).prop_map(|f| format!("{f:.3}")),
        "[a-z]{0,6}".prop_map(|s| format!("\"{s}\"")),
        Just("true".to_owned()),
        Just("null".to_owned()),
    ];
    leaf.prop_recursive(3, 12, 4, |inner| {
        prop_oneof![
            prop::collection::vec((inner.clone(), ws()), 0..4).prop_map(|items| {
                let parts: Vec<String> = items.into_iter().map(|(v, w)| format!("{w}{v}{w}")).collect();
                format!("[{}]", parts.join(","))
            }),
            prop::collection::vec(("[a-z]{1,4}", inner), 0..3).prop_map(|members| {
                let mut seen = std::collections::HashSet::new();
                let parts: Vec<String> = members
                    .into_iter()
                    .filter(|(k, _)| seen.insert(k.clone()))
                    .map(|(k, v)| format!("\"{k}\": {v}"))
                    .collect();
                format!("{{{}}}", parts.join(", "))
            }),
        ]
    })
}

fn ws() -> impl Strategy<Value = &'static str> {
    prop_oneof![Just(""), Just(" "), Just("\n  "), Just("\t")]
}

/// One generated query: its members (key, value text) in order, and whether the watermark applies.
#[derive(Debug, Clone)]
struct Generated {
    members: Vec<(String, String)>,
    ws: Vec<&'static str>,
}

fn query() -> impl Strategy<Value = Generated> {
    let other = prop::collection::vec(("[a-z_]{1,8}", value_text()), 0..5);
    let window = prop_oneof![
        Just(None),
        (0u64..2_000_000_000_000).prop_map(|t| Some(("as_of".to_owned(), t.to_string()))),
        (0u64..1_000, 0u64..1_000).prop_map(|(a, b)| {
            let (lo, hi) = (a.min(b), a.max(b));
            Some(("between".to_owned(), format!("[{lo}, {hi}]")))
        }),
    ];
    let filters = prop_oneof![
        Just(None),
        Just(Some("null".to_owned())),
        value_text().prop_map(|v| Some(format!("[\"And\",[{v}]]"))),
    ];
    let consistency = prop_oneof![
        Just(None),
        Just(Some(r#"{"level":"eventual"}"#.to_owned())),
        Just(Some(r#"{"level": "strong"}"#.to_owned())),
    ];
    (
        other,
        window,
        filters,
        consistency,
        any::<prop::sample::Index>(),
        prop::collection::vec(ws(), 40),
    )
        .prop_map(|(other, window, filters, consistency, at, ws)| {
            let mut members: Vec<(String, String)> = Vec::new();
            for (k, v) in other {
                let reserved = ["as_of", "between", "filters", "consistency", "queries"];
                if !reserved.contains(&k.as_str()) && !members.iter().any(|(m, _)| *m == k) {
                    members.push((k, v));
                }
            }
            let mut special: Vec<(String, String)> = Vec::new();
            special.extend(window);
            special.extend(filters.map(|f| ("filters".to_owned(), f)));
            special.extend(consistency.map(|c| ("consistency".to_owned(), c)));
            for s in special {
                let i = at.index(members.len() + 1);
                members.insert(i, s);
            }
            Generated { members, ws }
        })
}

fn text_of(g: &Generated) -> String {
    let mut out = String::from("{");
    for (i, (k, v)) in g.members.iter().enumerate() {
        let w = |j: usize| g.ws[(i * 3 + j) % g.ws.len()];
        if i > 0 {
            out.push(',');
        }
        out.push_str(&format!("{}\"{k}\"{}:{}{v}", w(0), w(1), w(2)));
    }
    out.push_str(g.ws[0]);
    out.push('}');
    out
}

/// The meaning the rewrite must give a query, computed on `serde_json` values.
fn expected(input: &Value, watermark: Option<u64>) -> Value {
    let mut q = input.as_object().unwrap().clone();
    let mut preds = Vec::new();
    if let Some(t) = q.remove("as_of").filter(|v| !v.is_null()) {
        preds.push(json!(["_hevlayer_upserted_at", "Lte", t]));
    }
    if let Some(b) = q.remove("between").filter(|v| !v.is_null()) {
        preds.push(json!([
            "And",
            [
                ["_hevlayer_upserted_at", "Gt", b[0]],
                ["_hevlayer_upserted_at", "Lte", b[1]]
            ]
        ]));
    }
    let eventual = q.get("consistency").and_then(|c| c.get("level")) == Some(&json!("eventual"));
    if let (Some(w), true) = (watermark, eventual) {
        preds.push(json!(["_hevlayer_upserted_at", "Lte", w]));
    }
    if preds.is_empty() {
        return Value::Object(q);
    }
    let filters = match q.remove("filters").filter(|v| !v.is_null()) {
        Some(f) => {
            let mut all = vec![f];
            all.extend(preds);
            json!(["And", all])
        }
        None if preds.len() == 1 => preds.remove(0),
        None => json!(["And", preds]),
    };
    q.insert("filters".to_owned(), filters);
    Value::Object(q)
}

proptest! {

    #[test]
    fn bounds_read_as_the_standard_parser_reads_them(text in "[0-9]{0,22}|[0-9.eE+-]{1,6}") {
        let parsed = if text.bytes().all(|b| b.is_ascii_digit()) {
            text.parse::<u64>().ok().filter(|&n| n <= MAX_BOUND)
        } else {
            None
        };
        prop_assert_eq!(integer(Kind::Number, text.as_bytes()), parsed);
        prop_assert_eq!(integer(Kind::String, text.as_bytes()), None);
    }

    #[test]
    fn rewrites_keep_every_other_byte_and_mean_what_they_should(g in query(), watermark in prop::option::of(0u64..5_000)) {
        let body = text_of(&g);
        let input: Value = serde_json::from_str(&body).unwrap();
        let rule = WatermarkRule { at_ms: watermark, always: false };
        let plan = plan(body.as_bytes(), rule).unwrap();
        let out = String::from_utf8(render(body.as_bytes(), &plan)).unwrap();
        let parsed: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{out}: {e}"));
        prop_assert_eq!(&parsed, &expected(&input, watermark));
        // Byte preservation: every kept member's text (and the caller's filter) appears verbatim,
        // in order; nothing is in the output but those, the inserted predicates and the
        // separators that were already there.
        let mut from = 0;
        let mut kept_len = 0;
        let rewritten = plan.temporal + plan.watermarked > 0;
        for (k, v) in &g.members {
            if k == "as_of" || k == "between" || (k == "filters" && v == "null" && rewritten) {
                continue;
            }
            let piece = if k == "filters" { v.clone() } else { format!("\"{k}\"") };
            let found = out[from..].find(&piece);
            prop_assert!(found.is_some(), "{} missing from {}", piece, out);
            from += found.unwrap_or(0) + piece.len();
            kept_len += piece.len();
            if k != "filters" {
                let value_at = out[from..].find(v.as_str());
                prop_assert!(value_at.is_some(), "{} missing from {}", v, out);
                from += value_at.unwrap_or(0) + v.len();
                kept_len += v.len();
            }
        }
        let inserted: usize = plan.edits.iter().map(|e| e.insert.len()).sum();
        prop_assert!(out.len() <= body.len() + inserted);
        prop_assert!(out.len() >= kept_len);
        if plan.is_identity() {
            prop_assert_eq!(&out, &body);
        }
    }

    #[test]
    fn arbitrary_bytes_get_an_answer(bytes in prop::collection::vec(any::<u8>(), 0..96)) {
        if let Ok(plan) = plan(&bytes, updating(5)) {
            let out = render(&bytes, &plan);
            prop_assert!(serde_json::from_slice::<Value>(&out).is_ok() || serde_json::from_slice::<Value>(&bytes).is_err());
        }
    }

    #[test]
    fn json_like_text_gets_an_answer(text in r#"[\[\]{}",:0-9a-z_. ]{0,60}"#, as_of in 0u64..10) {
        let body = format!(r#"{{"as_of":{as_of},"x":{text}}}"#);
        match plan(body.as_bytes(), updating(5)) {
            Ok(plan) => {
                let out = render(body.as_bytes(), &plan);
                prop_assert!(serde_json::from_slice::<Value>(&out).is_ok(), "{}", String::from_utf8_lossy(&out));
            }
            // Either not JSON, or a repeated member the rewrite reads (`"x":1,"as_of":2`).
            Err(r) => prop_assert!(serde_json::from_str::<Value>(&body).is_err() || r.reason() == ReadReason::BadField),
        }
    }
}
