#![allow(clippy::unwrap_used, clippy::panic, clippy::field_reassign_with_default)]

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_reads_answer_every_row() {
    use aerospike::{BatchOperation, BatchPolicy, BatchReadPolicy};
    let double = Double::start("127.0.0.1:0", &["hevlayer"]).await.unwrap();
    let client = connect(&double).await;
    let wp = WritePolicy::default();
    for i in 0..5 {
        client
            .put(
                &wp,
                &as_key!("hevlayer", "b", i),
                &[as_bin!("v", i), as_bin!("w", "x")],
            )
            .await
            .unwrap();
    }
    let rp = BatchReadPolicy::default();
    let mut ops: Vec<BatchOperation> = (0..7)
        .map(|i| BatchOperation::read(&rp, as_key!("hevlayer", "b", i), Bins::All))
        .collect();
    ops.push(BatchOperation::read(
        &rp,
        as_key!("hevlayer", "b", 1),
        Bins::from(["w"]),
    ));
    ops.push(BatchOperation::read_ops(
        &rp,
        as_key!("hevlayer", "b", 2),
        vec![operations::get_bin("v")],
    ));
    let before = double.commands_served();
    client.batch(&BatchPolicy::default(), &mut ops).await.unwrap();
    assert_eq!(double.commands_served() - before, 1, "one batch-index command");
    for (i, op) in ops.iter().take(7).enumerate() {
        match op.record() {
            Some(rec) if i < 5 => assert_eq!(rec.bins.get("v"), Some(&Value::from(i as i64))),
            None if i >= 5 => assert_eq!(op.result_code(), Some(aerospike::ResultCode::KeyNotFoundError)),
            other => panic!("row {i}: {other:?}"),
        }
    }
    let named = ops[7].record().unwrap();
    assert_eq!(named.bins.len(), 1);
    assert_eq!(ops[8].record().unwrap().bins.get("v"), Some(&Value::from(2)));
    client.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn map_operations_are_atomic_per_record() {
    use aerospike::operations::maps;
    use aerospike::operations::{MapOrder, MapPolicy, MapReturnType, MapWriteFlags};
    let double = Double::start("127.0.0.1:0", &["hevlayer"]).await.unwrap();
    let client = connect(&double).await;
    let wp = WritePolicy::default();
    let key = as_key!("hevlayer", "m", "k");
    let create_only = MapPolicy::new(MapOrder::KeyOrdered, MapWriteFlags::CREATE_ONLY);
    let plain = MapPolicy::new(MapOrder::KeyOrdered, MapWriteFlags::DEFAULT);
    let ops = [
        maps::put(
            &create_only,
            "j",
            Value::from("doc"),
            Value::from(vec![Value::from(1), Value::from("a")]),
        ),
        maps::increment_value(&plain, "c", Value::from("s:pending"), Value::from(1)),
        maps::increment_value(&plain, "c", Value::from("l"), Value::from(-1)),
    ];
    let rec = client.operate(&wp, &key, &ops).await.unwrap();
    assert_eq!(
        rec.results,
        Some(vec![Value::from(1), Value::from(1), Value::from(-1)])
    );
    // A create-only put of an existing key fails the whole command: the counter is untouched.
    let again = [
        maps::put(&create_only, "j", Value::from("doc"), Value::from(2)),
        maps::increment_value(&plain, "c", Value::from("s:pending"), Value::from(1)),
    ];
    let err = client.operate(&wp, &key, &again).await.unwrap_err();
    assert_eq!(err.result_code(), i32::from(result_code::ELEMENT_EXISTS));
    let rec = client.get(&ReadPolicy::default(), &key, Bins::All).await.unwrap();
    assert_eq!(rec.generation, 1);
    let counts = match rec.bins.get("c") {
        Some(Value::SortedMap(m)) => m.clone(),
        other => panic!("{other:?}"),
    };
    assert_eq!(counts.get(&Value::from("s:pending")), Some(&Value::from(1)));
    // Put-items with no-fail + partial writes only the keys that are missing.
    let mut items = std::collections::HashMap::new();
    items.insert(Value::from(1), Value::from(""));
    items.insert(Value::from(2), Value::from(""));
    let ops = [maps::put_items(&plain, "q", items.clone())];
    client.operate(&wp, &key, &ops).await.unwrap();
    let tomb = MapPolicy::new(
        MapOrder::KeyOrdered,
        MapWriteFlags::CREATE_ONLY | MapWriteFlags::NO_FAIL | MapWriteFlags::PARTIAL,
    );
    items.insert(Value::from(3), Value::from(""));
    items.insert(Value::from(1), Value::from("overwritten?"));
    let ops = [maps::put_items(&tomb, "q", items), maps::size("q")];
    let rec = client.operate(&wp, &key, &ops).await.unwrap();
    assert_eq!(rec.results.as_ref().unwrap()[1], Value::from(3));
    let ops = [maps::get_by_key("q", Value::from(1), MapReturnType::VALUE)];
    let rec = client.operate(&wp, &key, &ops).await.unwrap();
    assert_eq!(rec.results, Some(vec![Value::from("")]));
    // Key ranges, removal by key list and by value.
    let ops = [
        maps::get_by_key_range("q", Value::Nil, Value::from(3), MapReturnType::KEY),
        maps::remove_by_key_list("q", vec![Value::from(1), Value::from(9)], MapReturnType::COUNT),
        maps::remove_by_value(
            "j",
            Value::from(vec![Value::from(1), Value::from("a")]),
            MapReturnType::COUNT,
        ),
        maps::remove_by_key_range("q", Value::from(3), Value::Nil, MapReturnType::COUNT),
        maps::size("q"),
        maps::size("j"),
    ];
    let rec = client.operate(&wp, &key, &ops).await.unwrap();
    assert_eq!(
        rec.results,
        Some(vec![
            Value::from(vec![Value::from(1), Value::from(2)]),
            Value::from(1),
            Value::from(1),
            Value::from(1),
            Value::from(1),
            Value::from(0),
        ])
    );
    // A read-only operate on a missing record is "not found".
    let err = client
        .operate(&wp, &as_key!("hevlayer", "m", "none"), &[maps::size("q")])
        .await
        .unwrap_err();
    assert_eq!(err.result_code(), i32::from(result_code::KEY_NOT_FOUND));
    client.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generations_wrap_at_16_bits_and_checks_follow() {
    let double = Double::start("127.0.0.1:0", &["hevlayer"]).await.unwrap();
    let client = connect(&double).await;
    let key = as_key!("hevlayer", "g", 1);
    client
        .put(&WritePolicy::default(), &key, &[as_bin!("v", 1)])
        .await
        .unwrap();
    double.set_generations("hevlayer", "g", 65_535);
    let rec = client.get(&ReadPolicy::default(), &key, Bins::All).await.unwrap();
    assert_eq!(rec.generation, 65_535);
    let mut gen_policy = WritePolicy::default();
    gen_policy.generation_policy = GenerationPolicy::ExpectGenEqual;
    gen_policy.generation = 65_535;
    client.put(&gen_policy, &key, &[as_bin!("v", 2)]).await.unwrap();
    let rec = client.get(&ReadPolicy::default(), &key, Bins::All).await.unwrap();
    assert_eq!(rec.generation, 1, "wraps past 65535 to 1");
    let err = client
        .put(&gen_policy, &key, &[as_bin!("v", 3)])
        .await
        .unwrap_err();
    assert_eq!(err.result_code(), i32::from(result_code::GENERATION_ERROR));
    gen_policy.generation = 1;
    client.put(&gen_policy, &key, &[as_bin!("v", 3)]).await.unwrap();
    client.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_node_times_out_and_a_failing_node_drops_commands() {
    let double = Double::start("127.0.0.1:0", &["hevlayer"]).await.unwrap();
    let client = connect(&double).await;
    let key = as_key!("hevlayer", "f", 1);
    let mut rp = ReadPolicy::default();
    rp.base_policy.total_timeout = 100;
    rp.base_policy.socket_timeout = 100;
    // The reads that must succeed get time to spare on a busy machine (a CI run here once had
    // the first read after the stall miss 100 ms); only the stalled read needs the short one.
    let mut patient = ReadPolicy::default();
    patient.base_policy.total_timeout = 5_000;
    client
        .put(&WritePolicy::default(), &key, &[as_bin!("v", 1)])
        .await
        .unwrap();
    double.set_stalled(true);
    let started = std::time::Instant::now();
    assert!(client.get(&rp, &key, Bins::All).await.is_err());
    assert!(started.elapsed() < std::time::Duration::from_secs(2));
    double.set_stalled(false);
    assert!(client.get(&patient, &key, Bins::All).await.is_ok());
    // The reads the client gave up on during the stall are served late; let them be, or one of
    // them could use up a command the cut below leaves.
    assert!(double.settled(std::time::Duration::from_secs(5)).await);
    // Two more commands are served, then every command fails until healed.
    double.cut_after(Some(2), false);
    assert!(client.get(&patient, &key, Bins::All).await.is_ok());
    assert!(client.get(&patient, &key, Bins::All).await.is_ok());
    assert!(client.get(&rp, &key, Bins::All).await.is_err());
    let err = client.get(&rp, &key, Bins::All).await.unwrap_err();
    assert_eq!(err.result_code(), i32::from(result_code::SERVER_ERROR));
    double.cut_after(None, false);
    assert!(client.get(&patient, &key, Bins::All).await.is_ok());
    // In doubt: the failing command is applied although the client hears nothing back.
    let mut wp = WritePolicy::default();
    wp.base_policy.total_timeout = 200;
    double.cut_after(Some(0), true);
    assert!(client.put(&wp, &key, &[as_bin!("v", 9)]).await.is_err());
    double.cut_after(None, false);
    let rec = client.get(&rp, &key, Bins::All).await.unwrap();
    assert_eq!(rec.bins.get("v"), Some(&Value::from(9)));
    // A delay slows every answer.
    double.set_delay(std::time::Duration::from_millis(30));
    let started = std::time::Instant::now();
    client.get(&rp, &key, Bins::All).await.unwrap();
    assert!(started.elapsed() >= std::time::Duration::from_millis(30));
    client.close().await.unwrap();
}
