//! The records of a pipeline on Aerospike: how a pipeline addresses its records ([`Pipe`]) and a
//! staged document's state bins ([`StagedRecord`]). The journal, the queue and the pipeline
//! operations all use them; this module uses none of those.

use aerospike::{Bin, Bins, Value};

use super::{bin_int, bin_str};
use crate::cache::{FAILED_REASON_SET_STAGE, STAGE_FAILED};

pub(super) const QN_NONE: i64 = -1;
/// The bins of a staged document other than its chunks.
const STATE_BINS: [&str; 9] = [
    "stage", "qn", "worker", "lexp", "lms", "from", "reason", "tx", "ver",
];

/// A pipeline as its operations address it: set and incarnation.
#[derive(Clone, Debug)]
pub struct Pipe {
    pub id: String,
    pub set: String,
    pub inc: String,
}

impl Pipe {
    pub fn key(&self, rest: &str) -> Value {
        Value::String(format!("{}:{rest}", self.inc))
    }

    pub fn doc_key(&self, id: &str) -> Value {
        self.key(&format!("d:{id}"))
    }

    pub fn journal_key(&self, shard: u64) -> Value {
        self.key(&format!("j:{shard}"))
    }

    pub fn chunk_key(&self, part: &str, chunk: i64) -> Value {
        self.key(&format!("q:{part}:c:{chunk}"))
    }

    pub fn bucket_key(&self, minute: i64, shard: u64) -> Value {
        self.key(&format!("x:{minute}:{shard}"))
    }

    pub fn dir_key(&self) -> Value {
        self.key("x:dir")
    }
}

/// A staged document's state (the bins of `d:<id>` but its chunks).
#[derive(Clone, Debug, Default)]
pub struct StagedRecord {
    pub generation: u32,
    pub stage: String,
    pub qn: i64,
    pub worker: String,
    pub lease_expires: i64,
    pub lease_ms: i64,
    pub from: String,
    pub reason: String,
    /// The journaled transition that last changed what the document counts as.
    pub tx: i64,
    /// Content version: a new one with every stage.
    pub ver: i64,
}

/// The failure reason a document entering `stage` carries.
pub(super) fn reason_for(stage: &str) -> String {
    if stage == STAGE_FAILED {
        FAILED_REASON_SET_STAGE.to_owned()
    } else {
        String::new()
    }
}

impl StagedRecord {
    pub(super) fn from_record(rec: &aerospike::Record) -> Self {
        Self {
            generation: rec.generation,
            stage: bin_str(rec, "stage").unwrap_or_default(),
            qn: bin_int(rec, "qn").unwrap_or(QN_NONE),
            worker: bin_str(rec, "worker").unwrap_or_default(),
            lease_expires: bin_int(rec, "lexp").unwrap_or(0),
            lease_ms: bin_int(rec, "lms").unwrap_or(0),
            from: bin_str(rec, "from").unwrap_or_default(),
            reason: bin_str(rec, "reason").unwrap_or_default(),
            tx: bin_int(rec, "tx").unwrap_or(0),
            ver: bin_int(rec, "ver").unwrap_or(0),
        }
    }

    /// False for a placeholder (see the module doc).
    pub fn present(&self) -> bool {
        !self.stage.is_empty()
    }

    pub fn leased(&self) -> bool {
        self.lease_expires > 0
    }

    /// Unleased in `stage`.
    pub(super) fn unleased(stage: &str) -> Self {
        Self {
            stage: stage.to_owned(),
            qn: QN_NONE,
            reason: reason_for(stage),
            ..Self::default()
        }
    }

    pub(super) fn bins(&self) -> Vec<Bin> {
        vec![
            Bin::new("stage", Value::String(self.stage.clone())),
            Bin::new("qn", Value::Int(self.qn)),
            Bin::new("worker", Value::String(self.worker.clone())),
            Bin::new("lexp", Value::Int(self.lease_expires)),
            Bin::new("lms", Value::Int(self.lease_ms)),
            Bin::new("from", Value::String(self.from.clone())),
            Bin::new("reason", Value::String(self.reason.clone())),
            Bin::new("tx", Value::Int(self.tx)),
            Bin::new("ver", Value::Int(self.ver)),
        ]
    }
}

pub(super) fn state_bins() -> Bins {
    Bins::from(STATE_BINS.as_slice())
}
