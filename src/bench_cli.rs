//! `raftkv bench`: closed-loop load against a running key/value cluster (a
//! module of the binary, not of the library).
//!
//! N clients each run one operation at a time for the given duration, each
//! with its own [`Clerk`] (so each finds and remembers the leader itself),
//! all sharing one TCP client transport. Latencies go into an
//! [`hdrhistogram`] per client, merged at the end. A Put needs the key's
//! current version: every client keeps the versions it last saw, so with
//! `--keys` ≥ `--clients` each client owns its keys and every Put succeeds;
//! with fewer keys clients contend, a Put may get ErrVersion (counted, and the
//! client reads the key to learn its version). Keys live under a fresh random
//! prefix per run, so runs never collide.
//!
//! `--check` records every operation (including the preload and the version
//! reads) and runs the linearizability checker over the history at the end.

use std::collections::HashMap;
use std::io::IsTerminal as _;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use raftkv::NodeId;
use raftkv::check::{CheckConfig, CheckOutcome, Recorder, check_history};
use raftkv::kv::{
    Clerk, EndpointRpc, KvCommand, KvError, KvReply, NodeCounters, NodeRole, fetch_status,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use tokio::time::Instant;

use crate::kv_cli::{ClientArgs, print_line, runtime_with_threads, tcp_client};

/// Longest latency the histograms track; slower operations are clamped.
const LATENCY_MAX_US: u64 = 60_000_000;
/// Clients run concurrently at most.
const CLIENTS_MAX: usize = 4096;
/// Keys at most (they are preloaded for get and mixed workloads).
const KEYS_MAX: u64 = 10_000_000;

/// What the clients do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    /// Only Puts.
    Put,
    /// Only Gets (of preloaded keys).
    Get,
    /// Half Gets, half Puts, chosen at random per operation.
    Mixed,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::Put => "put",
            Workload::Get => "get",
            Workload::Mixed => "mixed",
        }
    }
}

/// Arguments of `raftkv bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// Concurrent clients, each with one operation outstanding (closed loop).
    #[arg(long, value_name = "N", default_value_t = 1)]
    clients: usize,
    /// How long to run, e.g. 10s, 500ms, 2m.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// What the clients do.
    #[arg(long, value_enum, default_value_t = Workload::Put)]
    workload: Workload,
    /// Bytes per value.
    #[arg(long, value_name = "BYTES", default_value_t = 128)]
    value_size: usize,
    /// Number of distinct keys (default: one per client).
    #[arg(long, value_name = "K")]
    keys: Option<u64>,
    /// Seed of the clients' key and operation choices (default: random, printed).
    #[arg(long, value_name = "S")]
    seed: Option<u64>,
    /// Record the history and check it for linearizability (exit 1 if it is not).
    #[arg(long)]
    check: bool,
    /// Runtime threads of the load generator: 1 drives every client from one
    /// thread (the requests of a round then leave in few writes, and no
    /// wake-up crosses threads); N > 1 a work-stealing runtime with N workers.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    threads: u16,
}

/// Parses `10s`, `500ms`, `250us`, `2m`, `1h` or a bare number of seconds.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (try 10s, 500ms, 2m)"))?;
    let seconds = match unit {
        "" | "s" => number,
        "ms" => number / 1e3,
        "us" | "µs" => number / 1e6,
        "m" => number * 60.0,
        "h" => number * 3600.0,
        other => return Err(format!("unknown unit {other:?} (use us, ms, s, m or h)")),
    };
    if !(seconds > 0.0 && seconds <= 86_400.0) {
        return Err(format!("{text:?} must be more than 0 and at most 24h"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// Outcome counts of one client (or of all, merged).
#[derive(Clone, Debug, Default, Serialize)]
struct Counts {
    /// Operations that completed (any reply, including ErrVersion/ErrNoKey).
    ops: u64,
    puts: u64,
    gets: u64,
    /// Puts answered ErrVersion (another client moved the key on).
    err_version: u64,
    /// Puts answered ErrMaybe (re-sent after a lost reply).
    err_maybe: u64,
    /// Gets answered ErrNoKey.
    err_no_key: u64,
    /// Operations that got no usable reply within `--timeout-ms`.
    timeouts: u64,
    /// Other errors.
    other_errors: u64,
}

impl Counts {
    fn add(&mut self, other: &Counts) {
        self.ops += other.ops;
        self.puts += other.puts;
        self.gets += other.gets;
        self.err_version += other.err_version;
        self.err_maybe += other.err_maybe;
        self.err_no_key += other.err_no_key;
        self.timeouts += other.timeouts;
        self.other_errors += other.other_errors;
    }

    fn errors(&self) -> u64 {
        self.err_maybe + self.timeouts + self.other_errors
    }
}

/// What one client brings back.
struct ClientResult {
    counts: Counts,
    latency: Histogram<u64>,
}

#[derive(Serialize)]
struct LatencyReport {
    p50: u64,
    p90: u64,
    p99: u64,
    p999: u64,
    max: u64,
    mean: f64,
}

#[derive(Serialize)]
struct Report {
    workload: Workload,
    clients: usize,
    keys: u64,
    value_size: usize,
    seed: u64,
    duration_s: f64,
    ops: u64,
    ops_per_sec: f64,
    latency_us: LatencyReport,
    counts: Counts,
    errors: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    linearizable: Option<String>,
    /// What the leader did during the run (its status counters before and
    /// after); `None` when no node answered as leader both times.
    server: Option<ServerReport>,
}

/// The leader's work during the run: how the load was batched.
#[derive(Serialize)]
struct ServerReport {
    /// The node that led at the end of the run.
    leader: NodeId,
    /// Storage flushes on the leader during the run.
    flushes: u64,
    /// Log entries the leader created (each one carries one or more puts).
    entries: u64,
    /// Puts per log entry (`None` without entries).
    puts_per_entry: Option<f64>,
    /// Log entries per leader flush (`None` without flushes).
    entries_per_flush: Option<f64>,
}

impl ServerReport {
    fn new(leader: NodeId, before: &NodeCounters, after: &NodeCounters, puts: u64) -> Self {
        let flushes = after.flushes.saturating_sub(before.flushes);
        let entries = after
            .proposals_accepted
            .saturating_sub(before.proposals_accepted);
        ServerReport {
            leader,
            flushes,
            entries,
            puts_per_entry: ratio(puts, entries),
            entries_per_flush: ratio(entries, flushes),
        }
    }
}

/// `numerator / denominator`, or `None` when the denominator is 0.
pub(crate) fn ratio(numerator: u64, denominator: u64) -> Option<f64> {
    (denominator > 0).then(|| numerator as f64 / denominator as f64)
}

/// A ratio with one decimal, or `-` when there is none.
pub(crate) fn one_decimal(value: Option<f64>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}"))
}

/// Every node's counters and whether it leads, as far as each answers now
/// (all asked at once, each within the call timeout).
async fn server_counters(
    rpc: &EndpointRpc,
    servers: &[NodeId],
) -> HashMap<NodeId, (bool, NodeCounters)> {
    let asked = servers.iter().map(|&id| async move {
        let status = fetch_status(rpc.endpoint(), id, rpc.call_timeout())
            .await
            .ok()?;
        let leads = status.role == NodeRole::Leader && status.stopped.is_none();
        Some((id, (leads, status.counters)))
    });
    futures::future::join_all(asked)
        .await
        .into_iter()
        .flatten()
        .collect()
}

/// The report of the node that leads after the run, if it answered before too.
fn leader_report(
    before: &HashMap<NodeId, (bool, NodeCounters)>,
    after: &HashMap<NodeId, (bool, NodeCounters)>,
    puts: u64,
) -> Option<ServerReport> {
    let (&leader, (_, counters)) = after.iter().find(|(_, (leads, _))| *leads)?;
    let (_, earlier) = before.get(&leader)?;
    Some(ServerReport::new(leader, earlier, counters, puts))
}

/// Everything the clients share.
struct Shared {
    clerks: Vec<Clerk<EndpointRpc>>,
    keys: Vec<String>,
    value: Bytes,
    recorder: Option<Recorder>,
    /// Operations completed so far, for the progress bar.
    done: AtomicU64,
}

impl Shared {
    /// One recorded Get; `None` on a timeout (it never returned).
    async fn get(&self, client: usize, key: &str) -> Result<(u64, Bytes), KvError> {
        let pending = self.recorder.as_ref().map(|recorder| {
            recorder.begin(
                client as u64,
                KvCommand::Get {
                    key: key.to_owned(),
                },
            )
        });
        let result = self.clerks[client].get(key).await;
        if let Some(pending) = pending {
            finish(pending, KvReply::Get(result.clone()));
        }
        result.map(|versioned| (versioned.version, versioned.value))
    }

    async fn put(&self, client: usize, key: &str, version: u64) -> Result<(), KvError> {
        let pending = self.recorder.as_ref().map(|recorder| {
            recorder.begin(
                client as u64,
                KvCommand::Put {
                    key: key.to_owned(),
                    value: self.value.clone(),
                    version,
                },
            )
        });
        let result = self.clerks[client]
            .put(key, self.value.clone(), version)
            .await;
        if let Some(pending) = pending {
            finish(pending, KvReply::Put(result.clone()));
        }
        result
    }
}

/// Records a completion, unless the operation timed out (then its outcome is
/// unknown: it stays pending in the history, as the checker requires).
fn finish(pending: raftkv::check::PendingCall, reply: KvReply) {
    let timed_out = matches!(
        reply,
        KvReply::Get(Err(KvError::Timeout { .. })) | KvReply::Put(Err(KvError::Timeout { .. }))
    );
    if !timed_out {
        pending.finish(reply);
    }
}

/// `raftkv bench`.
pub fn bench(args: BenchArgs) -> anyhow::Result<ExitCode> {
    if args.clients == 0 || args.clients > CLIENTS_MAX {
        anyhow::bail!("--clients must be between 1 and {CLIENTS_MAX}");
    }
    let keys = args.keys.unwrap_or(args.clients as u64);
    if keys == 0 || keys > KEYS_MAX {
        anyhow::bail!("--keys must be between 1 and {KEYS_MAX}");
    }
    if args.value_size > raftkv::kv::VALUE_BYTES_MAX {
        anyhow::bail!(
            "--value-size must be at most {} bytes",
            raftkv::kv::VALUE_BYTES_MAX
        );
    }
    runtime_with_threads(args.threads)?.block_on(run(args, keys))
}

async fn run(args: BenchArgs, key_count: u64) -> anyhow::Result<ExitCode> {
    let seed = args.seed.unwrap_or_else(rand::random);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let prefix: u32 = rng.random();
    let (rpc, servers, clerk_config) = tcp_client(&args.client).await?;
    let clerks = (0..args.clients)
        .map(|_| Clerk::new(rpc.clone(), servers.clone(), clerk_config))
        .collect::<Result<Vec<_>, _>>()?;
    let shared = Arc::new(Shared {
        clerks,
        keys: (0..key_count)
            .map(|k| format!("bench/{prefix:08x}/{k}"))
            .collect(),
        value: Bytes::from(vec![b'x'; args.value_size]),
        recorder: args.check.then(Recorder::new),
        done: AtomicU64::new(0),
    });

    // Preload for reads, untimed: every key at version 1.
    if args.workload != Workload::Put {
        preload(&shared, args.clients).await?;
    }

    let counters_before = server_counters(&rpc, &servers).await;
    let progress = progress_bar(args.duration);
    let started = Instant::now();
    let deadline = started + args.duration;
    let tasks: Vec<_> = (0..args.clients)
        .map(|client| {
            let shared = shared.clone();
            let workload = args.workload;
            let clients = args.clients;
            let preloaded = args.workload != Workload::Put;
            let client_seed = seed ^ (client as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            tokio::spawn(async move {
                run_client(
                    &shared,
                    client,
                    clients,
                    workload,
                    preloaded,
                    client_seed,
                    deadline,
                )
                .await
            })
        })
        .collect();
    let ticker = progress.clone().map(|bar| {
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(Duration::from_millis(100));
            loop {
                interval.tick().await;
                let elapsed = started.elapsed();
                bar.set_position(elapsed.as_millis().min(u128::from(u64::MAX)) as u64);
                let done = shared.done.load(Ordering::Relaxed);
                let rate = done as f64 / elapsed.as_secs_f64().max(1e-3);
                bar.set_message(format!("{done} ops, {rate:.0}/s"));
            }
        })
    });
    let mut counts = Counts::default();
    let mut latency = new_histogram();
    for task in tasks {
        let result = task.await.context("a bench client panicked")?;
        counts.add(&result.counts);
        latency
            .add(&result.latency)
            .context("merging latency histograms")?;
    }
    let elapsed = started.elapsed();
    if let Some(ticker) = ticker {
        ticker.abort();
    }
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }

    let counters_after = server_counters(&rpc, &servers).await;
    let server = leader_report(&counters_before, &counters_after, counts.puts);
    let linearizable = match &shared.recorder {
        None => None,
        Some(recorder) => {
            let history = recorder.history();
            let config = CheckConfig {
                time_budget: Duration::from_secs(60),
                ..CheckConfig::default()
            };
            Some(match check_history(&history, &config)? {
                CheckOutcome::Ok => format!("ok ({} operations)", history.len()),
                other => format!("FAILED: {other}"),
            })
        }
    };
    let report = Report {
        workload: args.workload,
        clients: args.clients,
        keys: key_count,
        value_size: args.value_size,
        seed,
        duration_s: elapsed.as_secs_f64(),
        ops: counts.ops,
        ops_per_sec: counts.ops as f64 / elapsed.as_secs_f64(),
        latency_us: LatencyReport {
            p50: latency.value_at_quantile(0.50),
            p90: latency.value_at_quantile(0.90),
            p99: latency.value_at_quantile(0.99),
            p999: latency.value_at_quantile(0.999),
            max: latency.max(),
            mean: latency.mean(),
        },
        errors: counts.errors(),
        counts,
        linearizable,
        server,
    };
    if args.client.json {
        print_line(&serde_json::to_string(&report)?)?;
    } else {
        print_text(&report)?;
    }
    let check_failed = report
        .linearizable
        .as_deref()
        .is_some_and(|verdict| !verdict.starts_with("ok"));
    Ok(if check_failed || report.ops == 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn print_text(report: &Report) -> anyhow::Result<()> {
    let c = &report.counts;
    let l = &report.latency_us;
    print_line(&format!(
        "workload {}, {} clients, {} keys, {}-byte values, {:.1} s (seed {})",
        report.workload.name(),
        report.clients,
        report.keys,
        report.value_size,
        report.duration_s,
        report.seed
    ))?;
    print_line(&format!(
        "ops:      {} ({:.0} ops/s; {} puts, {} gets)",
        report.ops, report.ops_per_sec, c.puts, c.gets
    ))?;
    print_line(&format!(
        "latency:  p50 {} µs, p90 {} µs, p99 {} µs, p99.9 {} µs, max {} µs",
        l.p50, l.p90, l.p99, l.p999, l.max
    ))?;
    print_line(&format!(
        "errors:   {} (timeouts {}, ErrMaybe {}, other {}); ErrVersion {}, ErrNoKey {}",
        report.errors, c.timeouts, c.err_maybe, c.other_errors, c.err_version, c.err_no_key
    ))?;
    if let Some(server) = &report.server {
        let per = one_decimal;
        print_line(&format!(
            "leader:   node {}: {} log entries ({} puts each), {} flushes ({} entries each)",
            server.leader,
            server.entries,
            per(server.puts_per_entry),
            server.flushes,
            per(server.entries_per_flush)
        ))?;
    }
    if let Some(verdict) = &report.linearizable {
        print_line(&format!("linearizable: {verdict}"))?;
    }
    Ok(())
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_MAX_US, 3).expect("valid histogram bounds")
}

fn progress_bar(duration: Duration) -> Option<indicatif::ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new(duration.as_millis().min(u128::from(u64::MAX)) as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {elapsed}/{duration} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    Some(bar)
}

/// Puts every key at version 1, `clients` at a time.
async fn preload(shared: &Arc<Shared>, clients: usize) -> anyhow::Result<()> {
    let next = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..clients)
        .map(|client| {
            let shared = shared.clone();
            let next = next.clone();
            tokio::spawn(async move {
                loop {
                    let k = next.fetch_add(1, Ordering::Relaxed) as usize;
                    let Some(key) = shared.keys.get(k) else {
                        return Ok(());
                    };
                    match shared.put(client, key, 0).await {
                        Ok(()) | Err(KvError::Maybe) => {}
                        Err(error) => {
                            return Err(anyhow::anyhow!("preloading {key:?}: {error}"));
                        }
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.context("a preload task panicked")??;
    }
    Ok(())
}

/// One closed-loop client: one operation at a time until `deadline`.
async fn run_client(
    shared: &Shared,
    client: usize,
    clients: usize,
    workload: Workload,
    preloaded: bool,
    seed: u64,
    deadline: Instant,
) -> ClientResult {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let key_count = shared.keys.len();
    // With at least one key per client, client c owns keys c, c + N, c + 2N…
    let owned: Option<Vec<usize>> =
        (key_count >= clients).then(|| (client..key_count).step_by(clients).collect());
    let mut versions: HashMap<usize, u64> = HashMap::new();
    let mut counts = Counts::default();
    let mut latency = new_histogram();
    while Instant::now() < deadline {
        let key = match &owned {
            Some(keys) => keys[rng.random_range(0..keys.len())],
            None => rng.random_range(0..key_count),
        };
        let is_put = match workload {
            Workload::Put => true,
            Workload::Get => false,
            Workload::Mixed => rng.random_bool(0.5),
        };
        let started = Instant::now();
        let outcome = if is_put {
            let version = *versions.entry(key).or_insert(if preloaded { 1 } else { 0 });
            let result = shared.put(client, &shared.keys[key], version).await;
            counts.puts += 1;
            match result {
                Ok(()) => {
                    versions.insert(key, version + 1);
                    Ok(())
                }
                Err(error) => Err(error),
            }
        } else {
            counts.gets += 1;
            shared
                .get(client, &shared.keys[key])
                .await
                .map(|(version, _)| {
                    versions.insert(key, version);
                })
        };
        let micros = started
            .elapsed()
            .as_micros()
            .clamp(1, u128::from(LATENCY_MAX_US)) as u64;
        latency.saturating_record(micros);
        counts.ops += 1;
        shared.done.fetch_add(1, Ordering::Relaxed);
        let refresh = match outcome {
            Ok(()) => false,
            Err(KvError::Version) => {
                counts.err_version += 1;
                true
            }
            Err(KvError::Maybe) => {
                counts.err_maybe += 1;
                true
            }
            Err(KvError::NoKey) => {
                counts.err_no_key += 1;
                false
            }
            Err(KvError::Timeout { .. }) => {
                counts.timeouts += 1;
                true
            }
            Err(error) => {
                counts.other_errors += 1;
                tracing::warn!(%error, "bench: operation failed");
                true
            }
        };
        if refresh {
            // Learn the key's version again (untimed, not counted as an op).
            match shared.get(client, &shared.keys[key]).await {
                Ok((version, _)) => {
                    versions.insert(key, version);
                }
                Err(KvError::NoKey) => {
                    versions.insert(key, 0);
                }
                Err(_) => {
                    versions.remove(&key);
                }
            }
        }
    }
    ClientResult { counts, latency }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("250us"), Ok(Duration::from_micros(250)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5d").is_err());
        assert!(parse_duration("").is_err());
    }
}
