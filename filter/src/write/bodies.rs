//! Generated valid write bodies for the property tests of `write` and `exchange`.
//!
//! Every stamped shape (rows, columns, `patch_by_filter.patch`) comes with attributes in random
//! order, optional vectors, and optional client `_hevlayer_upserted_at` / `_hevlayer_shard`
//! members; around them go deletes, filter writes, conditions, `return_affected_ids` (absent,
//! `true` or `false`) and unknown keys, with whitespace between tokens. The reserved names appear
//! only as member keys, written exactly `"_hevlayer_...":`, and a comma before a reserved member
//! directly follows the previous value: the gateway drops a member from the end of the previous
//! value, so whitespace there would go with it (see `strip_reserved` in `write/tests.rs`).

#![allow(clippy::unwrap_used)]
use proptest::prelude::*;

/// The write operations the generator emits (the option keys do not make a write on their own).
const OPERATIONS: [&str; 7] = [
    "upsert_rows",
    "patch_rows",
    "upsert_columns",
    "patch_columns",
    "deletes",
    "patch_by_filter",
    "delete_by_filter",
];

fn ws() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec!["", " ", "\n  ", "\t"])
}

fn scalar() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f32>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| format!("{f:e}")),
        "[a-z\\u{e9}\\u{4e2d} ]{0,8}".prop_map(|s| serde_json::to_string(&s).unwrap()),
        Just("true".to_owned()),
        Just("null".to_owned()),
        Just("\"a\\\"b\\u00e9\"".to_owned()),
    ]
}

fn vector() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::collection::vec(any::<f32>().prop_filter("finite", |f| f.is_finite()), 1..6).prop_map(
            |v| format!(
                "[{}]",
                v.iter().map(|f| f.to_string()).collect::<Vec<_>>().join(",")
            )
        ),
        "[A-Za-z0-9+/]{4,12}".prop_map(|s| format!("\"{s}==\"")),
    ]
}

fn id() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<u64>().prop_map(|n| n.to_string()),
        "[a-z0-9-]{1,10}".prop_map(|s| format!("\"{s}\""))
    ]
}

/// A member of a generated object: its text and whether its name is reserved.
type Member = (String, bool);

/// Attributes with distinct names (a name given twice in one object is refused).
fn attributes(max: usize) -> impl Strategy<Value = Vec<Member>> {
    prop::collection::vec(("[a-z]{1,6}", scalar(), ws()), 0..max).prop_map(|attrs| {
        let mut seen = std::collections::HashSet::new();
        attrs
            .into_iter()
            .filter(|(k, _, _)| seen.insert(k.clone()))
            .map(|(k, v, w)| (format!("\"a_{k}\":{w}{v}"), false))
            .collect()
    })
}

/// The client's own `_hevlayer_upserted_at` and `_hevlayer_shard` members, each maybe absent.
/// In columns the stamp must be an array (of any length: the gateway replaces it).
fn reserved(columnar: bool) -> impl Strategy<Value = Vec<Member>> {
    let stamp = if columnar {
        prop::collection::vec(scalar(), 0..3)
            .prop_map(|v| format!("[{}]", v.join(",")))
            .boxed()
    } else {
        scalar().boxed()
    };
    (prop::option::of(stamp), prop::option::of(scalar()), ws()).prop_map(|(stamp, shard, w)| {
        let stamp = stamp.map(|v| (format!("\"_hevlayer_upserted_at\":{w}{v}"), true));
        let shard = shard.map(|v| (format!("\"_hevlayer_shard\":{v}"), true));
        stamp.into_iter().chain(shard).collect()
    })
}

/// An object of `members` in random order, with `close` before its `}` and generated whitespace
/// after its `{` and around its commas (but none before a comma that precedes a reserved member).
fn object(
    members: impl Strategy<Value = Vec<Member>>,
    close: impl Strategy<Value = &'static str>,
) -> impl Strategy<Value = String> {
    (members.prop_shuffle(), ws(), ws(), close).prop_map(|(members, open, sep, close)| {
        let mut text = format!("{{{open}");
        for (i, (member, is_reserved)) in members.iter().enumerate() {
            if i > 0 {
                let before_comma = if *is_reserved { "" } else { sep };
                text.push_str(&format!("{before_comma},{sep}"));
            }
            text.push_str(member);
        }
        text.push_str(close);
        text.push('}');
        text
    })
}

/// A row: an id, maybe a vector (upserts only), attributes, maybe the client's stamp members.
/// With none of them it is `{"id":...}` alone, which is valid.
fn row(upsert: bool) -> impl Strategy<Value = String> {
    let members = (
        id(),
        ws(),
        // Patches may not carry vectors.
        if upsert {
            prop::option::weighted(0.7, vector()).boxed()
        } else {
            Just(None).boxed()
        },
        attributes(4),
        reserved(false),
    )
        .prop_map(|(id, w, vector, attrs, reserved)| {
            let mut members = vec![(format!("\"id\":{w}{id}"), false)];
            members.extend(vector.map(|v| (format!("\"vector\":{v}"), false)));
            members.extend(attrs);
            members.extend(reserved);
            members
        });
    object(members, ws())
}

/// A columnar write of `n` ids with one attribute column and maybe the client's stamp columns.
fn columns(n: usize) -> impl Strategy<Value = String> {
    let members = (
        prop::collection::vec(id(), n..=n),
        prop::collection::vec(scalar(), n..=n),
        reserved(true),
    )
        .prop_map(|(ids, vals, reserved)| {
            let mut members = vec![
                (format!("\"id\":[{}]", ids.join(",")), false),
                (format!("\"a_col\":[{}]", vals.join(", ")), false),
            ];
            members.extend(reserved);
            members
        });
    object(members, ws())
}

/// `patch_by_filter`: its patch may be empty or hold only reserved members, so nothing goes
/// before its `}` (an emptied object keeps only the whitespace after its `{`).
fn patch_by_filter() -> impl Strategy<Value = String> {
    let members = (attributes(3), reserved(false)).prop_map(|(mut attrs, reserved)| {
        attrs.extend(reserved);
        attrs
    });
    object(members, Just(""))
        .prop_map(|patch| format!("\"patch_by_filter\":{{\"filters\":[\"a\",\"Eq\",1],\"patch\":{patch}}}"))
}

/// Valid write bodies of every stamped shape, with options and unknown keys around them.
pub fn write_body() -> impl Strategy<Value = String> {
    (
        prop::collection::vec(row(true), 0..4),
        prop::collection::vec(row(false), 0..3),
        (1usize..4).prop_flat_map(columns),
        (1usize..4).prop_flat_map(columns),
        prop::collection::vec(id(), 0..3),
        patch_by_filter(),
        prop::sample::subsequence(
            [
                &OPERATIONS[..],
                &[
                    "upsert_condition",
                    "patch_condition",
                    "delete_condition",
                    "x_unknown",
                ],
            ]
            .concat(),
            1..6,
        )
        .prop_filter("needs an operation", |keys| {
            keys.iter().any(|k| OPERATIONS.contains(k))
        })
        .prop_shuffle(),
        prop::option::of(any::<bool>()),
        ws(),
    )
        .prop_map(
            |(upserts, patches, upsert_cols, patch_cols, deletes, pbf, keys, ask, w)| {
                let mut members: Vec<String> = keys
                    .iter()
                    .map(|k| match *k {
                        "upsert_rows" => format!("\"upsert_rows\":{w}[{}]", upserts.join(",")),
                        "patch_rows" => format!("\"patch_rows\":[{}]", patches.join(&format!(",{w}"))),
                        "upsert_columns" => format!("\"upsert_columns\":{upsert_cols}"),
                        "patch_columns" => format!("\"patch_columns\":{w}{patch_cols}"),
                        "deletes" => format!("\"deletes\":[{}]", deletes.join(",")),
                        "patch_by_filter" => pbf.clone(),
                        "delete_by_filter" => "\"delete_by_filter\":[\"a\",\"Eq\",2]".to_owned(),
                        "x_unknown" => format!("\"x_unknown\":{w}{{\"k\":[1,2]}}"),
                        condition => format!("\"{condition}\":[\"v\",\"Lt\",{w}3]"),
                    })
                    .collect();
                if let Some(ask) = ask {
                    members.push(format!("\"return_affected_ids\":{ask}"));
                }
                format!("{w}{{{w}{}{w}}}{w}", members.join(&format!(",{w}")))
            },
        )
}
