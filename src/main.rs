//! The `raftkv` command-line tool.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use raftkv::kv::KvCommand;
use raftkv::raft::{Entry, EntryKind};
use raftkv::storage::{KvStorage, MrStorage, RaftLogStorage, Store, StoreConfig};
use serde::Serialize;

mod kv_cli;

/// raftkv: replicated durable state and MapReduce.
#[derive(Parser, Debug)]
#[command(name = "raftkv", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Show what the data directory of a stopped node holds: format version,
    /// Raft groups (hard state, log bounds, snapshot, last entries), KV maps
    /// and MapReduce records. Never modifies or creates the directory.
    Inspect {
        /// The node's data directory.
        dir: PathBuf,
        /// Print one JSON document instead of text.
        #[arg(long)]
        json: bool,
        /// How many entries to show per log (the last ones), and how many keys
        /// per KV map and MapReduce records (the first ones).
        #[arg(long, value_name = "N", default_value_t = 10)]
        entries: usize,
    },
    /// Run the single-node versioned key/value server over TCP until SIGINT
    /// or SIGTERM. Prints `listening on ADDR` once bound. Its node id is 1.
    Kvsrv(kv_cli::KvsrvArgs),
    /// Put VALUE at KEY if the key's version is N (0 creates a missing key).
    /// Prints OK, ErrVersion, ErrNoKey or ErrMaybe; exits 0, 3, 4 or 5
    /// (1 for other failures, 2 for usage errors).
    Put(kv_cli::PutArgs),
    /// Print the value of KEY (exit 0), or ErrNoKey (exit 4).
    Get(kv_cli::GetArgs),
    /// Acquire or release a lock kept in the key NAME.
    Lock {
        #[command(subcommand)]
        action: kv_cli::LockAction,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Inspect { dir, json, entries } => {
            inspect(&dir, json, entries).map(|()| ExitCode::SUCCESS)
        }
        Command::Kvsrv(args) => kv_cli::kvsrv(args),
        Command::Put(args) => kv_cli::put(args),
        Command::Get(args) => kv_cli::get(args),
        Command::Lock { action } => kv_cli::lock(action),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("raftkv: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Bytes of entry data shown as hex.
const HEX_PREFIX_BYTES: usize = 32;
/// Bytes of a MapReduce value shown.
const VALUE_PREFIX_BYTES: usize = 48;

#[derive(Serialize)]
struct Report {
    directory: String,
    format_version: u32,
    raft_groups: Vec<GroupReport>,
    kv_namespaces: Vec<NamespaceReport>,
    mapreduce: MapReduceReport,
}

#[derive(Serialize)]
struct GroupReport {
    group: u64,
    term: u64,
    voted_for: Option<u64>,
    first_index: u64,
    last_index: u64,
    entry_count: u64,
    snapshot: SnapshotReport,
    last_entries: Vec<EntryReport>,
}

#[derive(Serialize)]
struct SnapshotReport {
    last_included_index: u64,
    last_included_term: u64,
    data_bytes: usize,
}

#[derive(Serialize)]
struct EntryReport {
    index: u64,
    term: u64,
    kind: &'static str,
    data_bytes: usize,
    decoded: DecodedData,
}

/// An entry's data as `inspect` understands it.
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum DecodedData {
    /// No data (a no-op entry, or an empty command).
    Empty,
    /// A key/value Put command.
    KvPut {
        key: String,
        version: u64,
        value_bytes: usize,
        /// The first bytes of the value, non-printable bytes escaped.
        value_prefix: String,
        truncated: bool,
    },
    /// A key/value Get command.
    KvGet { key: String },
    /// Bytes `inspect` cannot decode: the first bytes in hex.
    Opaque { hex_prefix: String, truncated: bool },
}

#[derive(Serialize)]
struct NamespaceReport {
    namespace: u64,
    applied_index: u64,
    key_count: u64,
    first_keys: Vec<KeyReport>,
}

#[derive(Serialize)]
struct KeyReport {
    key: String,
    version: u64,
    value_bytes: usize,
}

#[derive(Serialize)]
struct MapReduceReport {
    record_count: u64,
    first_records: Vec<RecordReport>,
}

#[derive(Serialize)]
struct RecordReport {
    key: String,
    value_bytes: usize,
    value_prefix: String,
}

/// Decodes an entry's data for display. The one place to teach `inspect` a
/// new command format: key/value commands ([`KvCommand::decode`]), else hex.
fn decode_entry_data(entry: &Entry) -> DecodedData {
    if entry.data.is_empty() {
        return DecodedData::Empty;
    }
    match KvCommand::decode(&entry.data) {
        Ok(KvCommand::Put {
            key,
            value,
            version,
        }) => {
            return DecodedData::KvPut {
                key: escaped(key.as_bytes()),
                version,
                value_bytes: value.len(),
                value_prefix: escaped(&value[..value.len().min(VALUE_PREFIX_BYTES)]),
                truncated: value.len() > VALUE_PREFIX_BYTES,
            };
        }
        Ok(KvCommand::Get { key }) => {
            return DecodedData::KvGet {
                key: escaped(key.as_bytes()),
            };
        }
        Err(_) => {}
    }
    let shown = &entry.data[..entry.data.len().min(HEX_PREFIX_BYTES)];
    DecodedData::Opaque {
        hex_prefix: shown.iter().map(|b| format!("{b:02x}")).collect(),
        truncated: entry.data.len() > HEX_PREFIX_BYTES,
    }
}

fn kind_name(kind: EntryKind) -> &'static str {
    match kind {
        EntryKind::Normal => "normal",
        EntryKind::Noop => "noop",
    }
}

fn escaped(bytes: &[u8]) -> String {
    bytes.escape_ascii().to_string()
}

fn build_report(store: &Store, n: usize) -> anyhow::Result<Report> {
    let mut raft_groups = Vec::new();
    for group in store.groups()? {
        let hard_state = store.hard_state(group)?;
        let first_index = store.first_index(group)?;
        let last_index = store.last_index(group)?;
        let (meta, data) = store.snapshot(group)?;
        let lo = first_index.max((last_index + 1).saturating_sub(n as u64));
        let last_entries = store
            .entries(group, lo, last_index + 1, u64::MAX)?
            .iter()
            .map(|entry| EntryReport {
                index: entry.index,
                term: entry.term,
                kind: kind_name(entry.kind),
                data_bytes: entry.data.len(),
                decoded: decode_entry_data(entry),
            })
            .collect();
        raft_groups.push(GroupReport {
            group,
            term: hard_state.term,
            voted_for: hard_state.voted_for,
            first_index,
            last_index,
            entry_count: last_index + 1 - first_index,
            snapshot: SnapshotReport {
                last_included_index: meta.last_included_index,
                last_included_term: meta.last_included_term,
                data_bytes: data.len(),
            },
            last_entries,
        });
    }
    let mut kv_namespaces = Vec::new();
    for namespace in store.kv_namespaces()? {
        let first_keys = store
            .kv_scan(namespace, None, n)?
            .into_iter()
            .map(|(key, value)| KeyReport {
                key: escaped(&key),
                version: value.version,
                value_bytes: value.value.len(),
            })
            .collect();
        kv_namespaces.push(NamespaceReport {
            namespace,
            applied_index: store.applied_index(namespace)?,
            key_count: store.kv_key_count(namespace)?,
            first_keys,
        });
    }
    let first_records = store
        .mr_scan_prefix(b"", n)?
        .into_iter()
        .map(|(key, value)| RecordReport {
            key: escaped(&key),
            value_bytes: value.len(),
            value_prefix: escaped(&value[..value.len().min(VALUE_PREFIX_BYTES)]),
        })
        .collect();
    Ok(Report {
        directory: store.path().display().to_string(),
        format_version: store.format_version(),
        raft_groups,
        kv_namespaces,
        mapreduce: MapReduceReport {
            record_count: store.mr_record_count()?,
            first_records,
        },
    })
}

fn render_text(report: &Report) -> Result<String, std::fmt::Error> {
    let mut out = String::new();
    writeln!(out, "raftkv data directory {}", report.directory)?;
    writeln!(out, "format version: {}", report.format_version)?;
    if report.raft_groups.is_empty() {
        writeln!(out, "raft groups: none")?;
    }
    for group in &report.raft_groups {
        writeln!(out)?;
        writeln!(out, "raft group {}", group.group)?;
        let vote = group
            .voted_for
            .map_or_else(|| "nobody".to_owned(), |node| format!("node {node}"));
        writeln!(out, "  hard state: term {}, voted for {vote}", group.term)?;
        writeln!(
            out,
            "  log: first index {}, last index {} ({} entries)",
            group.first_index, group.last_index, group.entry_count
        )?;
        let snapshot = &group.snapshot;
        if snapshot.last_included_index == 0 {
            writeln!(out, "  snapshot: none")?;
        } else {
            writeln!(
                out,
                "  snapshot: last included index {}, term {}, {} bytes",
                snapshot.last_included_index, snapshot.last_included_term, snapshot.data_bytes
            )?;
        }
        writeln!(out, "  last {} entries:", group.last_entries.len())?;
        for entry in &group.last_entries {
            let data = match &entry.decoded {
                DecodedData::Empty => String::new(),
                DecodedData::KvPut {
                    key,
                    version,
                    value_bytes,
                    value_prefix,
                    truncated,
                } => format!(
                    "  kv put \"{key}\" version {version} value ({value_bytes} bytes) \"{value_prefix}{}\"",
                    if *truncated { "..." } else { "" }
                ),
                DecodedData::KvGet { key } => format!("  kv get \"{key}\""),
                DecodedData::Opaque {
                    hex_prefix,
                    truncated,
                } => format!("  hex {hex_prefix}{}", if *truncated { "..." } else { "" }),
            };
            writeln!(
                out,
                "    index {}  term {}  {}  {} bytes{data}",
                entry.index, entry.term, entry.kind, entry.data_bytes
            )?;
        }
    }
    if report.kv_namespaces.is_empty() {
        writeln!(out)?;
        writeln!(out, "kv namespaces: none")?;
    }
    for namespace in &report.kv_namespaces {
        writeln!(out)?;
        writeln!(out, "kv namespace {}", namespace.namespace)?;
        writeln!(out, "  applied index: {}", namespace.applied_index)?;
        writeln!(
            out,
            "  keys: {} (first {} shown)",
            namespace.key_count,
            namespace.first_keys.len()
        )?;
        for key in &namespace.first_keys {
            writeln!(
                out,
                "    \"{}\"  version {}  {} bytes",
                key.key, key.version, key.value_bytes
            )?;
        }
    }
    writeln!(out)?;
    writeln!(out, "mapreduce records: {}", report.mapreduce.record_count)?;
    for record in &report.mapreduce.first_records {
        writeln!(
            out,
            "    \"{}\"  {} bytes  \"{}\"",
            record.key, record.value_bytes, record.value_prefix
        )?;
    }
    Ok(out)
}

fn inspect(dir: &Path, json: bool, n: usize) -> anyhow::Result<()> {
    let config = StoreConfig {
        create_if_missing: false,
        ..StoreConfig::default()
    };
    let store = Store::open_with(dir, &config)?;
    let report = build_report(&store, n)?;
    let mut out = if json {
        serde_json::to_string_pretty(&report)?
    } else {
        render_text(&report)?
    };
    if !out.ends_with('\n') {
        out.push('\n');
    }
    match std::io::stdout().lock().write_all(out.as_bytes()) {
        // The reader went away (`raftkv inspect DIR | head`): not an error.
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}
