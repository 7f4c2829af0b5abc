//! A wire-level Aerospike test double.
//!
//! One in-memory "node" that speaks enough of the Aerospike protocol for the real `aerospike` 3.0
//! client: the info protocol the client uses to validate and tend a node (`node`, `cluster-name`,
//! `build`, `partition-generation`, `peers-generation`, `peers-clear-std`, `replicas`, ...; the node
//! owns every partition of every configured namespace) and AS_MSG commands: read (all bins,
//! named bins, header only), write, delete, touch, truncate and operate with `Write`, `Incr`,
//! `Append`, `Prepend`, `Touch`, `Delete`, `Read` and map CDT ops (see `cdt`), generation checks
//! (equal / greater; generations are 16-bit and wrap from 65535 to 1 like a real server's),
//! record-exists actions (create-only, update-only, replace, replace-only), TTLs (never, keep,
//! seconds), batch-index commands (rows of reads, operates, writes and deletes, `REPEAT` rows) and
//! a stop-writes switch. Anything else is answered with `PARAMETER_ERROR` (4) so a test fails
//! loudly instead of silently misbehaving. Records are keyed by digest, as on a real server.
//!
//! Fault injection for tests: `set_stalled` (the node stops answering, like a SIGSTOP'd process),
//! `set_delay` (every command answered late), `cut_after` (after N more commands the node fails:
//! the next command's connection is dropped without an answer, after or before applying it, and
//! every later command is refused, as if the node died mid-operation).

pub mod cdt;
pub mod msgpack;

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::msgpack::Val;

/// Protocol message types.
const TYPE_INFO: u8 = 1;
const TYPE_AS_MSG: u8 = 3;
/// Largest message accepted (the client's own limit is in the same range).
const MAX_MESSAGE: usize = 128 << 20;
/// Seconds between the Unix epoch and the Aerospike ("citrusleaf") epoch, 2010-01-01.
const CITRUSLEAF_EPOCH: u64 = 1_262_304_000;
const PARTITIONS: usize = 4096;
/// Record generations are 16-bit on the server (and in batch rows on the wire).
const MAX_GENERATION: u32 = 0xFFFF;

// info1..info3 flags.
const INFO1_READ: u8 = 1;
const INFO1_GET_ALL: u8 = 1 << 1;
const INFO1_BATCH: u8 = 1 << 3;
const INFO1_NOBINDATA: u8 = 1 << 5;
const INFO2_WRITE: u8 = 1;
const INFO2_DELETE: u8 = 1 << 1;
const INFO2_GENERATION: u8 = 1 << 2;
const INFO2_GENERATION_GT: u8 = 1 << 3;
const INFO2_CREATE_ONLY: u8 = 1 << 5;
const INFO2_RESPOND_ALL_OPS: u8 = 1 << 7;
const INFO3_LAST: u8 = 1;
const INFO3_UPDATE_ONLY: u8 = 1 << 3;
const INFO3_CREATE_OR_REPLACE: u8 = 1 << 4;
const INFO3_REPLACE_ONLY: u8 = 1 << 5;

// Field types.
const FIELD_NAMESPACE: u8 = 0;
const FIELD_SET: u8 = 1;
const FIELD_DIGEST: u8 = 4;
const FIELD_BATCH_INDEX: u8 = 41;
const FIELD_FILTER_EXP: u8 = 43;

// Batch row header flags.
const BATCH_MSG_REPEAT: u8 = 0x1;
const BATCH_MSG_INFO: u8 = 0x2;
const BATCH_MSG_GEN: u8 = 0x4;
const BATCH_MSG_TTL: u8 = 0x8;
const BATCH_MSG_INFO4: u8 = 0x10;

// Operation types.
const OP_READ: u8 = 1;
const OP_WRITE: u8 = 2;
const OP_CDT_READ: u8 = 3;
const OP_CDT_MODIFY: u8 = 4;
const OP_INCR: u8 = 5;
const OP_APPEND: u8 = 9;
const OP_PREPEND: u8 = 10;
const OP_TOUCH: u8 = 11;
const OP_DELETE: u8 = 14;

// Particle types.
const PARTICLE_NULL: u8 = 0;
const PARTICLE_INTEGER: u8 = 1;
const PARTICLE_FLOAT: u8 = 2;
const PARTICLE_STRING: u8 = 3;
const PARTICLE_BLOB: u8 = 4;
const PARTICLE_BOOL: u8 = 17;
const PARTICLE_MAP: u8 = 19;
const PARTICLE_LIST: u8 = 20;

/// Result codes.
pub mod result_code {
    pub const OK: u8 = 0;
    /// A generic server failure (what a failing node answers in `cut_after`).
    pub const SERVER_ERROR: u8 = 1;
    pub const KEY_NOT_FOUND: u8 = 2;
    pub const GENERATION_ERROR: u8 = 3;
    pub const PARAMETER_ERROR: u8 = 4;
    pub const KEY_EXISTS: u8 = 5;
    /// "Server is out of space": what a stop-writes node answers to writes.
    pub const SERVER_FULL: u8 = 8;
    pub const BIN_TYPE_ERROR: u8 = 12;
    pub const INVALID_NAMESPACE: u8 = 20;
    pub const ELEMENT_NOT_FOUND: u8 = 23;
    pub const ELEMENT_EXISTS: u8 = 24;
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

/// The generation after one more write: 16-bit, wrapping from 65535 to 1 (0 means "no record").
fn next_generation(generation: u32) -> u32 {
    if generation >= MAX_GENERATION {
        1
    } else {
        generation + 1
    }
}

type RecordKey = (String, [u8; 20]);

struct Store {
    namespaces: Vec<String>,
    records: Mutex<HashMap<RecordKey, Record>>,
    stop_writes: AtomicBool,
    commands: AtomicU64,
    /// While set, no message is answered (the node hangs, like a stopped process).
    stalled: AtomicBool,
    /// Added to every AS_MSG command's answer time, in microseconds.
    delay_us: AtomicU64,
    /// The cut `cut_after` arranged, if any.
    cut: Mutex<Option<Cut>>,
    /// Messages read whose fate is not decided yet (held by a stall or a delay).
    undecided: AtomicU64,
}

/// Counts one message as undecided until dropped.
struct Undecided<'a>(&'a AtomicU64);

impl<'a> Undecided<'a> {
    fn new(count: &'a AtomicU64) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Undecided(count)
    }
}

impl Drop for Undecided<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A failure after `left` more commands.
#[derive(Clone, Copy)]
struct Cut {
    left: u64,
    /// The failing command is applied before its connection drops (its outcome is unknown to the
    /// client, like a timeout after the server did the work).
    in_doubt: bool,
    /// The failing command has happened: everything later is refused.
    failed: bool,
}

/// What happens to the next AS_MSG command.
enum Fate {
    Serve,
    /// Drop the connection; apply the command first when true.
    Drop(bool),
    Refuse,
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
            stalled: AtomicBool::new(false),
            delay_us: AtomicU64::new(0),
            cut: Mutex::new(None),
            undecided: AtomicU64::new(0),
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

    /// While on, the node reads requests but answers none (info included) until turned off,
    /// like a process stopped with SIGSTOP: clients see timeouts, not refused connections.
    pub fn set_stalled(&self, on: bool) {
        self.store.stalled.store(on, Ordering::SeqCst);
    }

    /// Every AS_MSG command is answered `delay` late (zero: no delay).
    pub fn set_delay(&self, delay: Duration) {
        let us = u64::try_from(delay.as_micros()).unwrap_or(u64::MAX);
        self.store.delay_us.store(us, Ordering::SeqCst);
    }

    /// `Some(n)`: serve `n` more AS_MSG commands; drop the connection of the next one without
    /// answering (applying it first when `in_doubt`); answer every later one `SERVER_ERROR` without
    /// applying it. `None` heals the node. Info requests are always answered, so the client keeps
    /// the node.
    pub fn cut_after(&self, commands: Option<u64>, in_doubt: bool) {
        *self.store.cut.lock().unwrap_or_else(PoisonError::into_inner) = commands.map(|left| Cut {
            left,
            in_doubt,
            failed: false,
        });
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

    /// Sets the generation of every record of a set (tests of generation wraparound).
    pub fn set_generations(&self, namespace: &str, set: &str, generation: u32) {
        let mut records = self.store.records.lock().unwrap_or_else(PoisonError::into_inner);
        for ((ns, _), r) in records.iter_mut() {
            if ns == namespace && r.set == set {
                r.generation = generation.clamp(1, MAX_GENERATION);
            }
        }
    }

    /// AS_MSG commands served so far.
    pub fn commands_served(&self) -> u64 {
        self.store.commands.load(Ordering::Relaxed)
    }

    /// Waits (at most `limit`) until every message the node has read has had its fate decided:
    /// after a stall, the commands a client gave up on are still served once it ends, and a test
    /// that arranges a cut next must not have them count against it. True when settled.
    pub async fn settled(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while self.store.undecided.load(Ordering::SeqCst) > 0 {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        true
    }
}

impl Drop for Double {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// Waits while the node is stalled (polled; the connection task ends when the double is dropped).
async fn wait_while_stalled(store: &Store) {
    while store.stalled.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn fate(store: &Store) -> Fate {
    let mut cut = store.cut.lock().unwrap_or_else(PoisonError::into_inner);
    match cut.as_mut() {
        None => Fate::Serve,
        Some(c) if c.failed => Fate::Refuse,
        Some(c) if c.left == 0 => {
            c.failed = true;
            Fate::Drop(c.in_doubt)
        }
        Some(c) => {
            c.left -= 1;
            Fate::Serve
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
        let undecided = Undecided::new(&store.undecided);
        wait_while_stalled(&store).await;
        let reply = match header[1] {
            TYPE_INFO => frame(TYPE_INFO, &info_reply(&body, &store, addr)),
            TYPE_AS_MSG => {
                let delay = store.delay_us.load(Ordering::SeqCst);
                if delay > 0 {
                    tokio::time::sleep(Duration::from_micros(delay)).await;
                }
                match fate(&store) {
                    Fate::Serve => {
                        store.commands.fetch_add(1, Ordering::Relaxed);
                        frame(TYPE_AS_MSG, &as_msg_reply(&body, &store))
                    }
                    Fate::Drop(apply) => {
                        if apply {
                            let _ = as_msg_reply(&body, &store);
                        }
                        return Err(io::Error::new(
                            io::ErrorKind::ConnectionAborted,
                            "injected failure",
                        ));
                    }
                    Fate::Refuse => {
                        let mut out = Vec::new();
                        encode_reply(&mut out, &Outcome::error(result_code::SERVER_ERROR), 0, 0);
                        frame(TYPE_AS_MSG, &out)
                    }
                }
            }
            other => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("unsupported message type {other}"),
                ));
            }
        };
        drop(undecided);
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

/// A parsed AS_MSG request (a single-record command, or one row of a batch).
#[derive(Clone)]
struct Request {
    info1: u8,
    info2: u8,
    info3: u8,
    generation: u32,
    ttl: u32,
    namespace: String,
    set: String,
    digest: Option<[u8; 20]>,
    /// A filter expression: not supported (refused rather than ignored).
    filtered: bool,
    batch: Option<Vec<u8>>,
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

impl Request {
    fn empty() -> Self {
        Self {
            info1: 0,
            info2: 0,
            info3: 0,
            generation: 0,
            ttl: 0,
            namespace: String::new(),
            set: String::new(),
            digest: None,
            filtered: false,
            batch: None,
            ops: Vec::new(),
        }
    }

    /// Reads `n_fields` fields and `n_ops` ops.
    fn read_fields_and_ops(&mut self, r: &mut Reader<'_>, n_fields: u16, n_ops: u16) -> Option<()> {
        for _ in 0..n_fields {
            let size = usize::try_from(r.u32()?).ok()?;
            let kind = r.u8()?;
            let data = r.take(size.checked_sub(1)?)?;
            match kind {
                FIELD_NAMESPACE => self.namespace = String::from_utf8_lossy(data).into_owned(),
                FIELD_SET => self.set = String::from_utf8_lossy(data).into_owned(),
                FIELD_DIGEST => self.digest = Some(data.try_into().ok()?),
                FIELD_BATCH_INDEX => self.batch = Some(data.to_vec()),
                FIELD_FILTER_EXP => self.filtered = true,
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
            self.ops.push((
                op,
                Bin {
                    name,
                    particle,
                    value,
                },
            ));
        }
        Some(())
    }
}

fn parse_request(body: &[u8]) -> Option<Request> {
    let mut r = Reader { buf: body, pos: 0 };
    let header_size = r.u8()?;
    let mut req = Request::empty();
    req.info1 = r.u8()?;
    req.info2 = r.u8()?;
    req.info3 = r.u8()?;
    let _info4 = r.u8()?;
    let _result = r.u8()?;
    req.generation = r.u32()?;
    req.ttl = r.u32()?;
    let _timeout = r.u32()?;
    let n_fields = r.u16()?;
    let n_ops = r.u16()?;
    r.pos = usize::from(header_size);
    req.read_fields_and_ops(&mut r, n_fields, n_ops)?;
    Some(req)
}

/// The rows of a batch-index field: (row index, request). A `REPEAT` row reuses the previous
/// row's header, fields and ops with its own digest.
fn parse_batch(data: &[u8]) -> Option<Vec<(u32, Request)>> {
    let mut r = Reader { buf: data, pos: 0 };
    let count = r.u32()?;
    let _flags = r.u8()?;
    let mut rows: Vec<(u32, Request)> = Vec::new();
    for _ in 0..count {
        let index = r.u32()?;
        let digest: [u8; 20] = r.take(20)?.try_into().ok()?;
        let flags = r.u8()?;
        let mut req = if flags & BATCH_MSG_REPEAT != 0 {
            rows.last()?.1.clone()
        } else {
            if flags & BATCH_MSG_INFO == 0 {
                return None;
            }
            let mut req = Request::empty();
            req.info1 = r.u8()?;
            req.info2 = r.u8()?;
            req.info3 = r.u8()?;
            if flags & BATCH_MSG_INFO4 != 0 {
                let _txn_attr = r.u8()?;
            }
            if flags & BATCH_MSG_GEN != 0 {
                req.generation = u32::from(r.u16()?);
            }
            if flags & BATCH_MSG_TTL != 0 {
                req.ttl = r.u32()?;
            }
            let n_fields = r.u16()?;
            let n_ops = r.u16()?;
            req.read_fields_and_ops(&mut r, n_fields, n_ops)?;
            req
        };
        req.digest = Some(digest);
        rows.push((index, req));
    }
    Some(rows)
}

/// What a command produced: result code, record generation and void time, returned bins.
struct Outcome {
    result: u8,
    generation: u32,
    void_time: u32,
    bins: Vec<Bin>,
}

impl Outcome {
    fn error(code: u8) -> Self {
        Self {
            result: code,
            generation: 0,
            void_time: 0,
            bins: Vec::new(),
        }
    }

    fn ok(generation: u32, void_time: u32, bins: Vec<Bin>) -> Self {
        Self {
            result: result_code::OK,
            generation,
            void_time,
            bins,
        }
    }
}

/// An AS_MSG reply header plus one op per returned bin; `index` is the batch row (0 otherwise).
fn encode_reply(out: &mut Vec<u8>, outcome: &Outcome, info3: u8, index: u32) {
    out.extend_from_slice(&[22, 0, 0, info3, 0, outcome.result]);
    out.extend_from_slice(&outcome.generation.to_be_bytes());
    out.extend_from_slice(&outcome.void_time.to_be_bytes());
    out.extend_from_slice(&index.to_be_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
    out.extend_from_slice(
        &u16::try_from(outcome.bins.len())
            .unwrap_or(u16::MAX)
            .to_be_bytes(),
    );
    for bin in &outcome.bins {
        let size = u32::try_from(4 + bin.name.len() + bin.value.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&size.to_be_bytes());
        out.push(OP_READ);
        out.push(bin.particle);
        out.push(0);
        out.push(u8::try_from(bin.name.len()).unwrap_or(u8::MAX));
        out.extend_from_slice(bin.name.as_bytes());
        out.extend_from_slice(&bin.value);
    }
}

fn as_msg_reply(body: &[u8], store: &Store) -> Vec<u8> {
    let mut out = Vec::new();
    let Some(req) = parse_request(body) else {
        encode_reply(&mut out, &Outcome::error(result_code::PARAMETER_ERROR), 0, 0);
        return out;
    };
    if req.info1 & INFO1_BATCH != 0 {
        return batch_reply(&req, store);
    }
    let outcome = execute(store, &req);
    encode_reply(&mut out, &outcome, 0, 0);
    out
}

/// Every row answered in order, then the end marker (`INFO3_LAST`).
fn batch_reply(req: &Request, store: &Store) -> Vec<u8> {
    let mut out = Vec::new();
    let rows = req.batch.as_deref().and_then(parse_batch);
    let Some(rows) = rows else {
        encode_reply(
            &mut out,
            &Outcome::error(result_code::PARAMETER_ERROR),
            INFO3_LAST,
            0,
        );
        return out;
    };
    for (index, row) in &rows {
        let outcome = execute(store, row);
        encode_reply(&mut out, &outcome, 0, *index);
    }
    encode_reply(&mut out, &Outcome::ok(0, 0, Vec::new()), INFO3_LAST, 0);
    out
}

/// Runs one single-record command (a whole command, or a batch row) under the store's lock.
fn execute(store: &Store, req: &Request) -> Outcome {
    if !store.namespaces.contains(&req.namespace) {
        return Outcome::error(result_code::INVALID_NAMESPACE);
    }
    let Some(digest) = req.digest else {
        return Outcome::error(result_code::PARAMETER_ERROR);
    };
    if req.filtered {
        return Outcome::error(result_code::PARAMETER_ERROR);
    }
    let key = (req.namespace.clone(), digest);
    let now = citrusleaf_now();
    let mut records = store.records.lock().unwrap_or_else(PoisonError::into_inner);
    if records.get(&key).is_some_and(|r| expired(r, now)) {
        records.remove(&key);
    }
    if req.info2 & INFO2_WRITE != 0 {
        if store.stop_writes.load(Ordering::SeqCst) {
            return Outcome::error(result_code::SERVER_FULL);
        }
        if req.info2 & INFO2_DELETE != 0 {
            return delete(&mut records, &key, req);
        }
        return operate(&mut records, key, req, now, true);
    }
    if req.info1 & INFO1_READ != 0 {
        if req.ops.iter().any(|(op, _)| *op != OP_READ) {
            return operate(&mut records, key, req, now, false);
        }
        return read(records.get(&key), req);
    }
    Outcome::error(result_code::PARAMETER_ERROR)
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

fn read(record: Option<&Record>, req: &Request) -> Outcome {
    let Some(record) = record else {
        return Outcome::error(result_code::KEY_NOT_FOUND);
    };
    if req.info1 & INFO1_NOBINDATA != 0 {
        return Outcome::ok(record.generation, record.void_time, Vec::new());
    }
    if req.info1 & INFO1_GET_ALL != 0 || req.ops.is_empty() {
        return Outcome::ok(record.generation, record.void_time, record.bins.clone());
    }
    let bins = req
        .ops
        .iter()
        .filter_map(|(_, bin)| record.bin(&bin.name).cloned())
        .collect();
    Outcome::ok(record.generation, record.void_time, bins)
}

fn delete(records: &mut HashMap<RecordKey, Record>, key: &RecordKey, req: &Request) -> Outcome {
    let Some(record) = records.get(key) else {
        return Outcome::error(result_code::KEY_NOT_FOUND);
    };
    if !generation_ok(req, record.generation) {
        return Outcome::error(result_code::GENERATION_ERROR);
    }
    records.remove(key);
    Outcome::ok(0, 0, Vec::new())
}

fn be_i64(value: &[u8]) -> Option<i64> {
    let bytes: [u8; 8] = value.try_into().ok()?;
    Some(i64::from_be_bytes(bytes))
}

/// A CDT op's result as a returned bin.
fn value_bin(name: &str, value: &Val) -> Bin {
    let (particle, value) = match value {
        Val::Nil => (PARTICLE_NULL, Vec::new()),
        Val::Bool(b) => (PARTICLE_BOOL, vec![u8::from(*b)]),
        Val::Int(i) => (PARTICLE_INTEGER, i.to_be_bytes().to_vec()),
        Val::Float(f) => (PARTICLE_FLOAT, f.to_bits().to_be_bytes().to_vec()),
        Val::Bytes(p, data) => (*p, data.clone()),
        Val::List(_) => (PARTICLE_LIST, msgpack::to_bytes(value)),
        Val::Map(_) | Val::Wildcard | Val::Infinity => (PARTICLE_MAP, msgpack::to_bytes(value)),
    };
    Bin {
        name: name.to_owned(),
        particle,
        value,
    }
}

/// Applies a map CDT op to `record`; returns the op's result bin.
fn apply_map_op(record: &mut Record, op: u8, bin: &Bin) -> Result<Bin, u8> {
    let current = match record.bin(&bin.name) {
        None => None,
        Some(b) if b.particle == PARTICLE_MAP => match msgpack::decode_all(&b.value) {
            Some(Val::Map(m)) => Some(m),
            _ => return Err(result_code::BIN_TYPE_ERROR),
        },
        Some(_) => return Err(result_code::BIN_TYPE_ERROR),
    };
    let applied = cdt::apply(current.as_ref(), &bin.value)?;
    if applied.map.is_some() && op == OP_CDT_READ {
        return Err(result_code::PARAMETER_ERROR);
    }
    if let Some(map) = applied.map {
        record.set_bin(Bin {
            name: bin.name.clone(),
            particle: PARTICLE_MAP,
            value: msgpack::to_bytes(&Val::Map(map)),
        });
    }
    Ok(value_bin(&bin.name, &applied.result))
}

/// Applies a write's or an operate's ops to the record as one atomic step: any failing op leaves
/// the record untouched. `persist` is false for read-only operates.
fn operate(
    records: &mut HashMap<RecordKey, Record>,
    key: RecordKey,
    req: &Request,
    now: u64,
    persist: bool,
) -> Outcome {
    let existing = records.get(&key);
    if !persist && existing.is_none() {
        return Outcome::error(result_code::KEY_NOT_FOUND);
    }
    if !generation_ok(req, existing.map_or(0, |r| r.generation)) {
        return Outcome::error(result_code::GENERATION_ERROR);
    }
    if existing.is_some() && req.info2 & INFO2_CREATE_ONLY != 0 {
        return Outcome::error(result_code::KEY_EXISTS);
    }
    if existing.is_none() && req.info3 & (INFO3_UPDATE_ONLY | INFO3_REPLACE_ONLY) != 0 {
        return Outcome::error(result_code::KEY_NOT_FOUND);
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
            OP_CDT_READ | OP_CDT_MODIFY => match apply_map_op(&mut record, *op, bin) {
                Ok(result) => {
                    out.push(result);
                    continue;
                }
                Err(code) => return Outcome::error(code),
            },
            OP_INCR => {
                if bin.particle != PARTICLE_INTEGER {
                    return Outcome::error(result_code::PARAMETER_ERROR);
                }
                let Some(add) = be_i64(&bin.value) else {
                    return Outcome::error(result_code::PARAMETER_ERROR);
                };
                let current = match record.bin(&bin.name) {
                    None => 0,
                    Some(b) if b.particle == PARTICLE_INTEGER => match be_i64(&b.value) {
                        Some(v) => v,
                        None => return Outcome::error(result_code::BIN_TYPE_ERROR),
                    },
                    Some(_) => return Outcome::error(result_code::BIN_TYPE_ERROR),
                };
                record.set_bin(Bin {
                    name: bin.name.clone(),
                    particle: PARTICLE_INTEGER,
                    value: current.wrapping_add(add).to_be_bytes().to_vec(),
                });
            }
            OP_APPEND | OP_PREPEND => {
                if bin.particle != PARTICLE_STRING && bin.particle != PARTICLE_BLOB {
                    return Outcome::error(result_code::PARAMETER_ERROR);
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
                    Some(_) => return Outcome::error(result_code::BIN_TYPE_ERROR),
                };
                record.set_bin(Bin {
                    name: bin.name.clone(),
                    particle: bin.particle,
                    value,
                });
            }
            OP_TOUCH => {
                if existing.is_none() {
                    return Outcome::error(result_code::KEY_NOT_FOUND);
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
            _ => return Outcome::error(result_code::PARAMETER_ERROR),
        }
        if respond_all {
            out.push(Bin {
                name: bin.name.clone(),
                particle: PARTICLE_NULL,
                value: Vec::new(),
            });
        }
    }
    if req.info1 & INFO1_GET_ALL != 0 {
        // An operate with a read-all op answers with the whole record as written.
        out = record.bins.clone();
    }
    if !persist {
        return Outcome::ok(record.generation, record.void_time, out);
    }
    if deleted || record.bins.is_empty() {
        // A record left without bins no longer exists.
        let generation = existing.map_or(0, |r| r.generation);
        records.remove(&key);
        return Outcome::ok(generation, 0, out);
    }
    record.generation = next_generation(record.generation);
    record.void_time = match req.ttl {
        TTL_DONT_UPDATE => existing.map_or(0, |r| r.void_time),
        TTL_NEVER_EXPIRE | 0 => 0,
        seconds => u32::try_from(now + u64::from(seconds)).unwrap_or(u32::MAX),
    };
    let (generation, void_time) = (record.generation, record.void_time);
    records.insert(key, record);
    Outcome::ok(generation, void_time, out)
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

    #[test]
    fn generations_wrap_at_16_bits() {
        assert_eq!(next_generation(0), 1);
        assert_eq!(next_generation(65_534), 65_535);
        assert_eq!(next_generation(65_535), 1);
    }
}
