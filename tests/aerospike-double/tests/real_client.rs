#![allow(clippy::unwrap_used, clippy::field_reassign_with_default)]

//! The real `aerospike` 3.0 client against the double: connect, then every command the double
//! claims to support.

use aerospike::policy::{Expiration, GenerationPolicy, RecordExistsAction};
use aerospike::{as_bin, as_key, operations, Bins, Client, ClientPolicy, ReadPolicy, Value, WritePolicy};
use aerospike_double::{result_code, Double};

async fn connect(double: &Double) -> Client {
    let mut policy = ClientPolicy::default();
    policy.timeout = 2000;
    Client::new(&policy, &double.hosts()).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_client_connects_and_runs_single_record_commands() {
    let double = Double::start("127.0.0.1:0", &["hevlayer"]).await.unwrap();
    let client = connect(&double).await;
    assert!(client.is_connected());
    let rp = ReadPolicy::default();
    let wp = WritePolicy::default();
    let key = as_key!("hevlayer", "tpuf_ns", "doc-1");

    // Missing record.
    let err = client.get(&rp, &key, Bins::All).await.unwrap_err();
    assert_eq!(err.result_code(), i32::from(result_code::KEY_NOT_FOUND));
    assert!(!client.exists(&rp, &key).await.unwrap());

    // put / get all / get named / header.
    client
        .put(&wp, &key, &[as_bin!("attrs", "{\"a\":1}"), as_bin!("ts", 42)])
        .await
        .unwrap();
    let rec = client.get(&rp, &key, Bins::All).await.unwrap();
    assert_eq!(rec.bins.get("attrs"), Some(&Value::from("{\"a\":1}")));
    assert_eq!(rec.bins.get("ts"), Some(&Value::from(42)));
    assert_eq!(rec.generation, 1);
    let rec = client.get(&rp, &key, ["ts"]).await.unwrap();
    assert_eq!(rec.bins.len(), 1);
    let rec = client.get(&rp, &key, Bins::None).await.unwrap();
    assert!(rec.bins.is_empty());
    assert_eq!(rec.generation, 1);
    assert!(client.exists(&rp, &key).await.unwrap());
    assert_eq!(double.record_count("hevlayer", "tpuf_ns"), 1);

    // Generation check: the stale generation loses, the current one wins.
    let mut gen_policy = WritePolicy::default();
    gen_policy.generation_policy = GenerationPolicy::ExpectGenEqual;
    gen_policy.generation = 7;
    let err = client
        .put(&gen_policy, &key, &[as_bin!("ts", 43)])
        .await
        .unwrap_err();
    assert_eq!(err.result_code(), i32::from(result_code::GENERATION_ERROR));
    gen_policy.generation = 1;
    client.put(&gen_policy, &key, &[as_bin!("ts", 43)]).await.unwrap();
    let rec = client.get(&rp, &key, Bins::All).await.unwrap();
    assert_eq!(rec.generation, 2);
    assert_eq!(rec.bins.get("ts"), Some(&Value::from(43)));
    assert!(rec.bins.contains_key("attrs"), "an update keeps the other bins");

    // Create-only refuses an existing record; replace drops the other bins.
    let mut create = WritePolicy::default();
    create.record_exists_action = RecordExistsAction::CreateOnly;
    let err = client.put(&create, &key, &[as_bin!("x", 1)]).await.unwrap_err();
    assert_eq!(err.result_code(), i32::from(result_code::KEY_EXISTS));
    let mut replace = WritePolicy::default();
    replace.record_exists_action = RecordExistsAction::Replace;
    client
        .put(&replace, &key, &[as_bin!("only", "this")])
        .await
        .unwrap();
    let rec = client.get(&rp, &key, Bins::All).await.unwrap();
    assert_eq!(rec.bins.len(), 1);

    // operate: add, put and read back in one atomic command.
    let counter = as_key!("hevlayer", "pl_p", "_counts");
    let ops = [
        operations::add(&as_bin!("pending", 2)),
        operations::add(&as_bin!("pending", 3)),
        operations::get_bin("pending"),
    ];
    let rec = client.operate(&wp, &counter, &ops).await.unwrap();
    // One result slot per op: the two adds answer nil, the read answers the sum.
    assert_eq!(
        rec.results,
        Some(vec![Value::Nil, Value::Nil, Value::from(5)]),
        "{rec:?}"
    );
    let ops = [operations::put(&as_bin!("stage", "embedding")), operations::get()];
    let rec = client.operate(&wp, &counter, &ops).await.unwrap();
    assert_eq!(rec.bins.get("stage"), Some(&Value::from("embedding")));
    assert_eq!(rec.bins.get("pending"), Some(&Value::from(5)));

    // Touch, TTL and delete.
    let mut ttl = WritePolicy::default();
    ttl.expiration = Expiration::Seconds(3600);
    client.put(&ttl, &key, &[as_bin!("t", 1)]).await.unwrap();
    let rec = client.get(&rp, &key, Bins::All).await.unwrap();
    let left = rec.time_to_live().unwrap().as_secs();
    assert!((3590..=3600).contains(&left), "{left}");
    client.touch(&wp, &key).await.unwrap();
    assert!(client.delete(&wp, &key).await.unwrap());
    assert!(!client.delete(&wp, &key).await.unwrap());
    assert_eq!(double.record_count("hevlayer", "tpuf_ns"), 0);

    // Stop-writes: writes refused, reads still served.
    double.set_stop_writes(true);
    let err = client.put(&wp, &counter, &[as_bin!("x", 1)]).await.unwrap_err();
    assert_eq!(err.result_code(), i32::from(result_code::SERVER_FULL));
    assert!(client.get(&rp, &counter, Bins::All).await.is_ok());
    double.set_stop_writes(false);

    // An unknown namespace is an error, not a hang.
    let other = as_key!("nope", "s", "k");
    assert!(client.get(&rp, &other, Bins::All).await.is_err());
    client.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_expire() {
    let double = Double::start("127.0.0.1:0", &["hevlayer"]).await.unwrap();
    let client = connect(&double).await;
    let mut wp = WritePolicy::default();
    wp.expiration = Expiration::Seconds(1);
    let key = as_key!("hevlayer", "s", 7);
    client.put(&wp, &key, &[as_bin!("v", 1)]).await.unwrap();
    assert!(client.exists(&ReadPolicy::default(), &key).await.unwrap());
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    assert!(!client.exists(&ReadPolicy::default(), &key).await.unwrap());
    client.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncate_drops_one_set() {
    let double = Double::start("127.0.0.1:0", &["hevlayer"]).await.unwrap();
    let client = connect(&double).await;
    let wp = WritePolicy::default();
    for i in 0..3 {
        client
            .put(&wp, &as_key!("hevlayer", "a", i), &[as_bin!("v", i)])
            .await
            .unwrap();
    }
    client
        .put(&wp, &as_key!("hevlayer", "b", 1), &[as_bin!("v", 1)])
        .await
        .unwrap();
    client
        .truncate(&aerospike::AdminPolicy::default(), "hevlayer", "a", 0)
        .await
        .unwrap();
    assert_eq!(double.record_count("hevlayer", "a"), 0);
    assert_eq!(double.record_count("hevlayer", "b"), 1);
    client
        .put(&wp, &as_key!("hevlayer", "a", 9), &[as_bin!("v", 9)])
        .await
        .unwrap();
    assert_eq!(double.record_count("hevlayer", "a"), 1);
    client.close().await.unwrap();
}
