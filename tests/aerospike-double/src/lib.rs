//! A wire-level Aerospike test double.
//!
//! One in-memory "node" that speaks enough of the Aerospike protocol for the real `aerospike` 3.0
//! client: the info protocol the client uses to validate and tend a node (`node`, `cluster-name`,
//! `build`, `partition-generation`, `peers-generation`, `peers-clear-std`, `replicas`, ...; the node
//! owns every partition of every configured namespace) and single-record AS_MSG commands: read
//! (all bins, named bins, header only), write, delete, touch, truncate and operate with `Write`, `Incr`,
//! `Append`, `Prepend`, `Touch`, `Delete` and `Read` ops, generation checks (equal / greater),
//! record-exists actions (create-only, update-only, replace, replace-only), TTLs (never, keep,
//! seconds) and a stop-writes switch. Anything else is answered with `PARAMETER_ERROR` (4) so a
//! test fails loudly instead of silently misbehaving. Records are keyed by digest, as on a real
//! server.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Protocol message types.
const TYPE_INFO: u8 = 1;
const TYPE_AS_MSG: u8 = 3;
/// Largest message accepted (the client's own limit is in the same range).
const MAX_MESSAGE: usize = 128 << 20;
/// Seconds between the Unix epoch and the Aerospike ("citrusleaf") epoch, 2010-01-01.
const CITRUSLEAF_EPOCH: u64 = 1_262_304_000;
const PARTITIONS: usize = 4096;

// info1..info3 flags.
const INFO1_READ: u8 = 1;
const INFO1_GET_ALL: u8 = 1 << 1;
const INFO1_NOBINDATA: u8 = 1 << 5;
const INFO2_WRITE: u8 = 1;
const INFO2_DELETE: u8 = 1 << 1;
const INFO2_GENERATION: u8 = 1 << 2;
const INFO2_GENERATION_GT: u8 = 1 << 3;
const INFO2_CREATE_ONLY: u8 = 1 << 5;
const INFO2_RESPOND_ALL_OPS: u8 = 1 << 7;
const INFO3_UPDATE_ONLY: u8 = 1 << 3;
const INFO3_CREATE_OR_REPLACE: u8 = 1 << 4;
const INFO3_REPLACE_ONLY: u8 = 1 << 5;

// Field types.
const FIELD_NAMESPACE: u8 = 0;
const FIELD_SET: u8 = 1;
const FIELD_DIGEST: u8 = 4;

// Operation types.
const OP_READ: u8 = 1;
const OP_WRITE: u8 = 2;
const OP_INCR: u8 = 5;
const OP_APPEND: u8 = 9;
const OP_PREPEND: u8 = 10;
const OP_TOUCH: u8 = 11;
const OP_DELETE: u8 = 14;

// Particle types.
const PARTICLE_NULL: u8 = 0;
const PARTICLE_INTEGER: u8 = 1;
const PARTICLE_STRING: u8 = 3;
const PARTICLE_BLOB: u8 = 4;

/// Result codes.
pub mod result_code {
    pub const OK: u8 = 0;
    pub const KEY_NOT_FOUND: u8 = 2;
    pub const GENERATION_ERROR: u8 = 3;
    pub const PARAMETER_ERROR: u8 = 4;
    pub const KEY_EXISTS: u8 = 5;
    /// "Server is out of space": what a stop-writes node answers to writes.
    pub const SERVER_FULL: u8 = 8;
    pub const BIN_TYPE_ERROR: u8 = 12;
    pub const INVALID_NAMESPACE: u8 = 20;
}

/// TTL values with a special meaning in a write's `record_ttl`.
const TTL_NEVER_EXPIRE: u32 = u32::MAX;
const TTL_DONT_UPDATE: u32 = u32::MAX - 1;

#[derive(Clone, Debug, PartialEq, Eq)]
struct Bin {
    name: String,
    particle: u8,
    value: Vec<u8>,
}

#[derive(Clone, Debug)]
struct Record {
    set: String,
    bins: Vec<Bin>,
    generation: u32,
    /// Citrusleaf-epoch seconds after which the record is gone; 0 = never.
    void_time: u32,
}

impl Record {
    fn bin(&self, name: &str) -> Option<&Bin> {
        self.bins.iter().find(|b| b.name == name)
    }

    fn set_bin(&mut self, bin: Bin) {
        match self.bins.iter_mut().find(|b| b.name == bin.name) {
            Some(existing) => *existing = bin,
            None => self.bins.push(bin),
        }
    }
}

type RecordKey = (String, [u8; 20]);

struct Store {
    namespaces: Vec<String>,
    records: Mutex<HashMap<RecordKey, Record>>,
    stop_writes: AtomicBool,
    commands: AtomicU64,
}

fn citrusleaf_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        .saturating_sub(CITRUSLEAF_EPOCH)
}

fn expired(record: &Record, now: u64) -> bool {
    record.void_time != 0 && u64::from(record.void_time) <= now
}

/// A running double. Stopped when dropped.
pub struct Double {
    addr: SocketAddr,
    store: Arc<Store>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Double {
    /// Starts a double on `bind` (use `127.0.0.1:0` in tests) serving `namespaces`.
    pub async fn start(bind: &str, namespaces: &[&str]) -> io::Result<Self> {
        let listener = TcpListener::bind(bind).await?;
        let addr = listener.local_addr()?;
        let store = Arc::new(Store {
            namespaces: namespaces.iter().map(|s| (*s).to_owned()).collect(),
            records: Mutex::new(HashMap::new()),
            stop_writes: AtomicBool::new(false),
            commands: AtomicU64::new(0),
        });
        let (tx, mut rx) = tokio::sync::oneshot::channel::<()>();
        let accept_store = store.clone();
        tokio::spawn(async move {
            // Dropping the double closes its open connections too, like a node going away.
            let (gone_tx, gone_rx) = tokio::sync::watch::channel(false);
            loop {
                tokio::select! {
                    _ = &mut rx => break,
                    accepted = listener.accept() => {
                        if let Ok((stream, _)) = accepted {
                            let store = accept_store.clone();
                            let mut gone = gone_rx.clone();
                            tokio::spawn(async move {
                                tokio::select! {
                                    _ = serve_connection(stream, store, addr) => {}
                                    _ = gone.changed() => {}
                                }
                            });
                        }
                    }
                }
            }
            let _ = gone_tx.send(true);
        });
        Ok(Self {
            addr,
            store,
            stop: Some(tx),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `host:port`, as the client's seed list wants it.
    pub fn hosts(&self) -> String {
        self.addr.to_string()
    }

    /// While on, every write is refused with `SERVER_FULL` (like a node in stop-writes).
    pub fn set_stop_writes(&self, on: bool) {
        self.store.stop_writes.store(on, Ordering::SeqCst);
    }

    /// Live (unexpired) records in a namespace and set.
    pub fn record_count(&self, namespace: &str, set: &str) -> usize {
        let now = citrusleaf_now();
        let records = self.store.records.lock().unwrap_or_else(PoisonError::into_inner);
        records
            .iter()
            .filter(|((ns, _), r)| ns == namespace && r.set == set && !expired(r, now))
            .count()
    }

    /// AS_MSG commands served so far.
    pub fn commands_served(&self) -> u64 {
        self.store.commands.load(Ordering::Relaxed)
    }
}

impl Drop for Double {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

async fn serve_connection(mut stream: TcpStream, store: Arc<Store>, addr: SocketAddr) -> io::Result<()> {
    stream.set_nodelay(true)?;
    loop {
        let mut header = [0u8; 8];
        match stream.read_exact(&mut header).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let size = u64::from_be_bytes([
            0, 0, header[2], header[3], header[4], header[5], header[6], header[7],
        ]);
        let size = usize::try_from(size).unwrap_or(usize::MAX);
        if size > MAX_MESSAGE {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "message too large"));
        }
        let mut body = vec![0u8; size];
        stream.read_exact(&mut body).await?;
        let reply = match header[1] {
            TYPE_INFO => frame(TYPE_INFO, &info_reply(&body, &store, addr)),
            TYPE_AS_MSG => {
                store.commands.fetch_add(1, Ordering::Relaxed);
                frame(TYPE_AS_MSG, &as_msg_reply(&body, &store))
            }
            other => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("unsupported message type {other}"),
                ));
            }
        };
        stream.write_all(&reply).await?;
    }
}

fn frame(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + body.len());
    let size = (body.len() as u64).to_be_bytes();
    out.push(2);
    out.push(kind);
    out.extend_from_slice(&size[2..8]);
    out.extend_from_slice(body);
    out
}

fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn info_reply(body: &[u8], store: &Store, addr: SocketAddr) -> Vec<u8> {
    let text = String::from_utf8_lossy(body);
    let mut out = String::new();
    for command in text.split('\n').filter(|c| !c.is_empty()) {
        let value = match command {
            "node" => "BB9D0UBLE000001".to_owned(),
            "cluster-name" => "null".to_owned(),
            "build" => "7.2.0.0".to_owned(),
            "edition" => "Aerospike Test Double".to_owned(),
            "partition-generation" | "peers-generation" | "rebalance-generation" => "1".to_owned(),
            "peers-clear-std" | "peers-clear-alt" | "peers-tls-std" | "peers-tls-alt" => {
                format!("1,{}", addr.port())
            }
            "service-clear-std" | "service-clear-alt" | "service" => addr.to_string(),
            "namespaces" => store.namespaces.join(";"),
            "features" => {
                "batch-index;blob-bits;float;geo;pipelining;peers;replicas;truncate-namespace".to_owned()
            }
            "replicas" | "replicas-all" | "replicas-master" => {
                let bitmap = base64(&[0xFF; PARTITIONS / 8]);
                store
                    .namespaces
                    .iter()
                    .map(|ns| format!("{ns}:0,1,{bitmap}"))
                    .collect::<Vec<_>>()
                    .join(";")
            }
            _ if command.starts_with("truncate:") || command.starts_with("truncate-namespace:") => {
                truncate(store, command)
            }
            _ => String::new(),
        };
        out.push_str(command);
        out.push('\t');
        out.push_str(&value);
        out.push('\n');
    }
    out.into_bytes()
}

/// `truncate:namespace=NS;set=SET[;lut=NANOS]` and `truncate-namespace:namespace=NS`: removes every
/// record of the set (or namespace) at once; records written afterwards survive.
fn truncate(store: &Store, command: &str) -> String {
    let args = command.split_once(':').map_or("", |(_, a)| a);
    let mut namespace = None;
    let mut set = None;
    for pair in args.split(';') {
        match pair.split_once('=') {
            Some(("namespace", v)) => namespace = Some(v.to_owned()),
            Some(("set", v)) => set = Some(v.to_owned()),
            _ => {}
        }
    }
    let Some(namespace) = namespace else {
        return "ERROR::namespace missing".to_owned();
    };
    let mut records = store.records.lock().unwrap_or_else(PoisonError::into_inner);
    records.retain(|(ns, _), r| !(ns == &namespace && set.as_ref().is_none_or(|s| s == &r.set)));
    "ok".to_owned()
}

/// A parsed AS_MSG request.
struct Request {
    info1: u8,
    info2: u8,
    info3: u8,
    generation: u32,
    ttl: u32,
    namespace: String,
    set: String,
    digest: Option<[u8; 20]>,
    ops: Vec<(u8, Bin)>,
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let out = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(out)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
}

fn parse_request(body: &[u8]) -> Option<Request> {
    let mut r = Reader { buf: body, pos: 0 };
    let header_size = r.u8()?;
    let info1 = r.u8()?;
    let info2 = r.u8()?;
    let info3 = r.u8()?;
    let _info4 = r.u8()?;
    let _result = r.u8()?;
    let generation = r.u32()?;
    let ttl = r.u32()?;
    let _timeout = r.u32()?;
    let n_fields = r.u16()?;
    let n_ops = r.u16()?;
    r.pos = usize::from(header_size);
    let mut req = Request {
        info1,
        info2,
        info3,
        generation,
        ttl,
        namespace: String::new(),
        set: String::new(),
        digest: None,
        ops: Vec::new(),
    };
    for _ in 0..n_fields {
        let size = usize::try_from(r.u32()?).ok()?;
        let kind = r.u8()?;
        let data = r.take(size.checked_sub(1)?)?;
        match kind {
            FIELD_NAMESPACE => req.namespace = String::from_utf8_lossy(data).into_owned(),
            FIELD_SET => req.set = String::from_utf8_lossy(data).into_owned(),
            FIELD_DIGEST => req.digest = Some(data.try_into().ok()?),
            _ => {}
        }
    }
    for _ in 0..n_ops {
        let size = usize::try_from(r.u32()?).ok()?;
        let op = r.u8()?;
        let particle = r.u8()?;
        let _unused = r.u8()?;
        let name_len = usize::from(r.u8()?);
        let name = String::from_utf8_lossy(r.take(name_len)?).into_owned();
        let value = r.take(size.checked_sub(4 + name_len)?)?.to_vec();
        req.ops.push((
            op,
            Bin {
                name,
                particle,
                value,
            },
        ));
    }
    Some(req)
}

/// An AS_MSG reply: header plus one op per returned bin.
fn reply(result: u8, generation: u32, void_time: u32, bins: &[Bin]) -> Vec<u8> {
    let mut out = Vec::with_capacity(
        22 + bins
            .iter()
            .map(|b| 8 + b.name.len() + b.value.len())
            .sum::<usize>(),
    );
    out.extend_from_slice(&[22, 0, 0, 0, 0, result]);
    out.extend_from_slice(&generation.to_be_bytes());
    out.extend_from_slice(&void_time.to_be_bytes());
    out.extend_from_slice(&0u32.to_be_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
    out.extend_from_slice(&u16::try_from(bins.len()).unwrap_or(u16::MAX).to_be_bytes());
    for bin in bins {
        let size = u32::try_from(4 + bin.name.len() + bin.value.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&size.to_be_bytes());
        out.push(OP_READ);
        out.push(bin.particle);
        out.push(0);
        out.push(u8::try_from(bin.name.len()).unwrap_or(u8::MAX));
        out.extend_from_slice(bin.name.as_bytes());
        out.extend_from_slice(&bin.value);
    }
    out
}

fn error(code: u8) -> Vec<u8> {
    reply(code, 0, 0, &[])
}

fn as_msg_reply(body: &[u8], store: &Store) -> Vec<u8> {
    let Some(req) = parse_request(body) else {
        return error(result_code::PARAMETER_ERROR);
    };
    if !store.namespaces.contains(&req.namespace) {
        return error(result_code::INVALID_NAMESPACE);
    }
    let Some(digest) = req.digest else {
        return error(result_code::PARAMETER_ERROR);
    };
    let key = (req.namespace.clone(), digest);
    let now = citrusleaf_now();
    let mut records = store.records.lock().unwrap_or_else(PoisonError::into_inner);
    if records.get(&key).is_some_and(|r| expired(r, now)) {
        records.remove(&key);
    }
    if req.info2 & INFO2_WRITE != 0 {
        if store.stop_writes.load(Ordering::SeqCst) {
            return error(result_code::SERVER_FULL);
        }
        if req.info2 & INFO2_DELETE != 0 {
            return delete(&mut records, &key, &req);
        }
        return write(&mut records, key, &req, now);
    }
    if req.info1 & INFO1_READ != 0 {
        return read(records.get(&key), &req);
    }
    error(result_code::PARAMETER_ERROR)
}

fn generation_ok(req: &Request, current: u32) -> bool {
    if req.info2 & INFO2_GENERATION != 0 {
        return req.generation == current;
    }
    if req.info2 & INFO2_GENERATION_GT != 0 {
        return req.generation > current;
    }
    true
}

fn read(record: Option<&Record>, req: &Request) -> Vec<u8> {
    let Some(record) = record else {
        return error(result_code::KEY_NOT_FOUND);
    };
    if req.info1 & INFO1_NOBINDATA != 0 {
        return reply(result_code::OK, record.generation, record.void_time, &[]);
    }
    if req.info1 & INFO1_GET_ALL != 0 || req.ops.is_empty() {
        return reply(result_code::OK, record.generation, record.void_time, &record.bins);
    }
    let mut bins = Vec::new();
    for (op, bin) in &req.ops {
        if *op != OP_READ {
            return error(result_code::PARAMETER_ERROR);
        }
        if let Some(found) = record.bin(&bin.name) {
            bins.push(found.clone());
        }
    }
    reply(result_code::OK, record.generation, record.void_time, &bins)
}

fn delete(records: &mut HashMap<RecordKey, Record>, key: &RecordKey, req: &Request) -> Vec<u8> {
    let Some(record) = records.get(key) else {
        return error(result_code::KEY_NOT_FOUND);
    };
    if !generation_ok(req, record.generation) {
        return error(result_code::GENERATION_ERROR);
    }
    records.remove(key);
    reply(result_code::OK, 0, 0, &[])
}

fn be_i64(value: &[u8]) -> Option<i64> {
    let bytes: [u8; 8] = value.try_into().ok()?;
    Some(i64::from_be_bytes(bytes))
}

fn write(records: &mut HashMap<RecordKey, Record>, key: RecordKey, req: &Request, now: u64) -> Vec<u8> {
    let existing = records.get(&key);
    if !generation_ok(req, existing.map_or(0, |r| r.generation)) {
        return error(result_code::GENERATION_ERROR);
    }
    if existing.is_some() && req.info2 & INFO2_CREATE_ONLY != 0 {
        return error(result_code::KEY_EXISTS);
    }
    if existing.is_none() && req.info3 & (INFO3_UPDATE_ONLY | INFO3_REPLACE_ONLY) != 0 {
        return error(result_code::KEY_NOT_FOUND);
    }
    let replace = req.info3 & (INFO3_CREATE_OR_REPLACE | INFO3_REPLACE_ONLY) != 0;
    let mut record = match existing {
        Some(r) if !replace => r.clone(),
        Some(r) => Record {
            bins: Vec::new(),
            ..r.clone()
        },
        None => Record {
            set: req.set.clone(),
            bins: Vec::new(),
            generation: 0,
            void_time: 0,
        },
    };
    let respond_all = req.info2 & INFO2_RESPOND_ALL_OPS != 0;
    let mut out = Vec::new();
    let mut deleted = false;
    for (op, bin) in &req.ops {
        match *op {
            OP_WRITE => {
                if bin.particle == PARTICLE_NULL {
                    record.bins.retain(|b| b.name != bin.name);
                } else {
                    record.set_bin(bin.clone());
                }
            }
            OP_INCR => {
                if bin.particle != PARTICLE_INTEGER {
                    return error(result_code::PARAMETER_ERROR);
                }
                let Some(add) = be_i64(&bin.value) else {
                    return error(result_code::PARAMETER_ERROR);
                };
                let current = match record.bin(&bin.name) {
                    None => 0,
                    Some(b) if b.particle == PARTICLE_INTEGER => match be_i64(&b.value) {
                        Some(v) => v,
                        None => return error(result_code::BIN_TYPE_ERROR),
                    },
                    Some(_) => return error(result_code::BIN_TYPE_ERROR),
                };
                record.set_bin(Bin {
                    name: bin.name.clone(),
                    particle: PARTICLE_INTEGER,
                    value: current.wrapping_add(add).to_be_bytes().to_vec(),
                });
            }
            OP_APPEND | OP_PREPEND => {
                if bin.particle != PARTICLE_STRING && bin.particle != PARTICLE_BLOB {
                    return error(result_code::PARAMETER_ERROR);
                }
                let value = match record.bin(&bin.name) {
                    None => bin.value.clone(),
                    Some(b) if b.particle == bin.particle => {
                        if *op == OP_APPEND {
                            [b.value.as_slice(), bin.value.as_slice()].concat()
                        } else {
                            [bin.value.as_slice(), b.value.as_slice()].concat()
                        }
                    }
                    Some(_) => return error(result_code::BIN_TYPE_ERROR),
                };
                record.set_bin(Bin {
                    name: bin.name.clone(),
                    particle: bin.particle,
                    value,
                });
            }
            OP_TOUCH => {
                if existing.is_none() {
                    return error(result_code::KEY_NOT_FOUND);
                }
            }
            OP_DELETE => {
                deleted = true;
                record.bins.clear();
            }
            OP_READ => {
                if bin.name.is_empty() {
                    continue;
                }
                match record.bin(&bin.name) {
                    Some(found) => out.push(found.clone()),
                    None if respond_all => out.push(Bin {
                        name: bin.name.clone(),
                        particle: PARTICLE_NULL,
                        value: Vec::new(),
                    }),
                    None => {}
                }
                continue;
            }
            _ => return error(result_code::PARAMETER_ERROR),
        }
        if respond_all {
            out.push(Bin {
                name: bin.name.clone(),
                particle: PARTICLE_NULL,
                value: Vec::new(),
            });
        }
    }
    if deleted || record.bins.is_empty() {
        // A record left without bins no longer exists.
        let generation = existing.map_or(0, |r| r.generation);
        records.remove(&key);
        return reply(result_code::OK, generation, 0, &out);
    }
    if req.info1 & INFO1_GET_ALL != 0 {
        // An operate with a read-all op answers with the whole record as written.
        out = record.bins.clone();
    }
    record.generation = record.generation.wrapping_add(1).max(1);
    record.void_time = match req.ttl {
        TTL_DONT_UPDATE => existing.map_or(0, |r| r.void_time),
        TTL_NEVER_EXPIRE | 0 => 0,
        seconds => u32::try_from(now + u64::from(seconds)).unwrap_or(u32::MAX),
    };
    let (generation, void_time) = (record.generation, record.void_time);
    records.insert(key, record);
    reply(result_code::OK, generation, void_time, &out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_standard_alphabet() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(&[0xFF; 512]).len(), 684);
    }
}
