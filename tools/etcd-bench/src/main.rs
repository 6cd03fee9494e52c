//! `etcd-bench`: closed-loop put load against an etcd v3 cluster, reporting the
//! same figures (and, as far as they apply, the same text and JSON shape) as
//! `raftkv bench --workload put`, so the two can be compared side by side.
//!
//! N clients, each its own tokio task with its own `etcd_client::Client` (its
//! own gRPC channel, so its own HTTP/2 connection), each with one Put
//! outstanding at a time, for the duration. Keys are chosen uniformly at
//! random from `--keys` keys under a fresh random prefix per run (like `raftkv
//! bench`); etcd puts are unconditional, so there is no ErrVersion.
//!
//! Endpoints (`--target`): `leader` (default) asks every endpoint for its
//! status (Maintenance/Status), finds the leader's member id and connects every
//! client only to the endpoint that answered with that id; `all` gives every
//! client all endpoints (the client crate's tonic round-robin balancer).
//!
//! A warm-up (`--warmup`, default 1 s) runs the same load untimed first; the
//! timed window starts when it ends and closes once every client has finished
//! its last operation after the deadline.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, ValueEnum};
use etcd_client::{Client, ConnectOptions};
use hdrhistogram::Histogram;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use tokio::time::Instant;

/// Longest latency the histograms track; slower operations are clamped.
const LATENCY_MAX_US: u64 = 60_000_000;
const CLIENTS_MAX: usize = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Target {
    /// Every client connects only to the current leader's endpoint.
    Leader,
    /// Every client gets all endpoints (round-robin across them).
    All,
}

/// Closed-loop put load against an etcd v3 cluster (figures like `raftkv bench`).
#[derive(Parser, Debug)]
#[command(name = "etcd-bench")]
struct Args {
    /// etcd client URLs, comma-separated (http://127.0.0.1:2379,...).
    #[arg(
        long,
        value_name = "URL[,URL...]",
        value_delimiter = ',',
        required = true
    )]
    endpoints: Vec<String>,
    /// Concurrent clients, each with one operation outstanding (closed loop).
    #[arg(long, value_name = "N", default_value_t = 1)]
    clients: usize,
    /// How long to run (timed), e.g. 10s, 500ms, 2m.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Untimed warm-up before the timed window (0s for none).
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration_or_zero)]
    warmup: Duration,
    /// Bytes per value.
    #[arg(long, value_name = "BYTES", default_value_t = 128)]
    value_size: usize,
    /// Number of distinct keys, chosen uniformly at random per put.
    #[arg(long, value_name = "K", default_value_t = 1000)]
    keys: u64,
    /// Seed of the key prefix and key choices (default: random, printed).
    #[arg(long, value_name = "S")]
    seed: Option<u64>,
    /// Which endpoints the clients talk to.
    #[arg(long, value_enum, default_value_t = Target::Leader)]
    target: Target,
    /// Per-operation timeout in milliseconds (counted as a timeout).
    #[arg(long, value_name = "MS", default_value_t = 10_000)]
    timeout_ms: u64,
    /// Runtime threads of the load generator: 1 a current-thread runtime,
    /// N > 1 a work-stealing one with N workers (as `raftkv bench --threads`).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    threads: u16,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

fn parse_duration_or_zero(text: &str) -> Result<Duration, String> {
    let number = text
        .trim()
        .trim_end_matches(|c: char| c.is_ascii_alphabetic());
    if number.parse::<f64>() == Ok(0.0) {
        return Ok(Duration::ZERO);
    }
    parse_duration(text)
}

/// Parses `10s`, `500ms`, `2m`, `1h` or a bare number of seconds (as `raftkv bench`).
fn parse_duration(text: &str) -> Result<Duration, String> {
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
        "m" => number * 60.0,
        "h" => number * 3600.0,
        other => return Err(format!("unknown unit {other:?} (use ms, s, m or h)")),
    };
    if !(seconds > 0.0 && seconds <= 86_400.0) {
        return Err(format!("{text:?} must be more than 0 and at most 24h"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// Outcome counts; the field names are `raftkv bench`'s (etcd puts never get
/// ErrVersion, ErrMaybe or ErrNoKey, so those stay 0).
#[derive(Clone, Debug, Default, Serialize)]
struct Counts {
    ops: u64,
    puts: u64,
    gets: u64,
    err_version: u64,
    err_maybe: u64,
    err_no_key: u64,
    /// Operations that got no reply within `--timeout-ms`.
    timeouts: u64,
    /// gRPC errors (etcdserver: request timed out, leader changed, unavailable…).
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
    system: &'static str,
    workload: &'static str,
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
    target: Target,
    endpoints: Vec<String>,
    /// First error message seen, if any (for diagnosis).
    #[serde(skip_serializing_if = "Option::is_none")]
    first_error: Option<String>,
}

struct ClientResult {
    counts: Counts,
    latency: Histogram<u64>,
    first_error: Option<String>,
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_MAX_US, 3).expect("valid histogram bounds")
}

fn main() -> anyhow::Result<ExitCode> {
    let args = Args::parse();
    if args.clients == 0 || args.clients > CLIENTS_MAX {
        anyhow::bail!("--clients must be between 1 and {CLIENTS_MAX}");
    }
    if args.keys == 0 {
        anyhow::bail!("--keys must be at least 1");
    }
    // The same runtimes as `raftkv bench --threads N`.
    if args.threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(usize::from(args.threads))
            .enable_all()
            .build()
    }
    .context("cannot start the async runtime")?
    .block_on(run(args))
}

fn connect_options(args: &Args) -> ConnectOptions {
    ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(5))
        .with_timeout(Duration::from_millis(args.timeout_ms))
}

/// The endpoint whose member id is the leader's, asked of every endpoint.
async fn find_leader(args: &Args) -> anyhow::Result<String> {
    let mut leader_id = None;
    let mut by_member = Vec::new();
    for endpoint in &args.endpoints {
        let status = async {
            let mut client =
                Client::connect([endpoint.as_str()], Some(connect_options(args))).await?;
            client.status().await
        }
        .await;
        match status {
            Ok(status) => {
                let member = status.header().map(|h| h.member_id()).unwrap_or_default();
                by_member.push((member, endpoint.clone()));
                if status.leader() != 0 {
                    leader_id = Some(status.leader());
                }
            }
            Err(error) => eprintln!("etcd-bench: status of {endpoint}: {error}"),
        }
    }
    let leader_id = leader_id.context("no endpoint knows a leader")?;
    by_member
        .into_iter()
        .find(|(member, _)| *member == leader_id)
        .map(|(_, endpoint)| endpoint)
        .with_context(|| format!("leader {leader_id:x} is not among the endpoints"))
}

async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let seed = args.seed.unwrap_or_else(rand::random);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let prefix: u32 = rng.random();
    let endpoints: Vec<String> = match args.target {
        Target::Leader => vec![find_leader(&args).await?],
        Target::All => args.endpoints.clone(),
    };
    // One client (one channel, one HTTP/2 connection per endpoint) per task.
    let mut clients = Vec::with_capacity(args.clients);
    for _ in 0..args.clients {
        clients.push(
            Client::connect(&endpoints, Some(connect_options(&args)))
                .await
                .with_context(|| format!("connecting to {endpoints:?}"))?,
        );
    }
    let keys: Arc<Vec<String>> = Arc::new(
        (0..args.keys)
            .map(|k| format!("bench/{prefix:08x}/{k}"))
            .collect(),
    );
    let value = vec![b'x'; args.value_size];
    let timeout = Duration::from_millis(args.timeout_ms);

    let now = Instant::now();
    let started = now + args.warmup;
    let deadline = started + args.duration;
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(client, etcd)| {
            let keys = keys.clone();
            let value = value.clone();
            let client_seed = seed ^ (client as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            tokio::spawn(async move {
                run_client(etcd, &keys, value, client_seed, timeout, started, deadline).await
            })
        })
        .collect();
    let mut counts = Counts::default();
    let mut latency = new_histogram();
    let mut first_error = None;
    for task in tasks {
        let result = task.await.context("a bench client panicked")?;
        counts.add(&result.counts);
        latency
            .add(&result.latency)
            .context("merging latency histograms")?;
        first_error = first_error.or(result.first_error);
    }
    let elapsed = Instant::now().saturating_duration_since(started);
    let report = Report {
        system: "etcd",
        workload: "put",
        clients: args.clients,
        keys: args.keys,
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
        target: args.target,
        endpoints,
        first_error,
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_text(&report);
    }
    Ok(if report.ops == 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn print_text(report: &Report) {
    let c = &report.counts;
    let l = &report.latency_us;
    println!(
        "etcd: workload {}, {} clients, {} keys, {}-byte values, {:.1} s (seed {}; target {} {})",
        report.workload,
        report.clients,
        report.keys,
        report.value_size,
        report.duration_s,
        report.seed,
        match report.target {
            Target::Leader => "leader",
            Target::All => "all",
        },
        report.endpoints.join(",")
    );
    println!(
        "ops:      {} ({:.0} ops/s; {} puts, {} gets)",
        report.ops, report.ops_per_sec, c.puts, c.gets
    );
    println!(
        "latency:  p50 {} µs, p90 {} µs, p99 {} µs, p99.9 {} µs, max {} µs",
        l.p50, l.p90, l.p99, l.p999, l.max
    );
    println!(
        "errors:   {} (timeouts {}, ErrMaybe {}, other {}); ErrVersion {}, ErrNoKey {}",
        report.errors, c.timeouts, c.err_maybe, c.other_errors, c.err_version, c.err_no_key
    );
    if let Some(error) = &report.first_error {
        println!("first error: {error}");
    }
}

/// One closed-loop client: one put at a time until `deadline`; operations
/// that start before `started` are the warm-up (not recorded).
async fn run_client(
    mut etcd: Client,
    keys: &[String],
    value: Vec<u8>,
    seed: u64,
    timeout: Duration,
    started: Instant,
    deadline: Instant,
) -> ClientResult {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut counts = Counts::default();
    let mut latency = new_histogram();
    let mut first_error = None;
    loop {
        let begin = Instant::now();
        if begin >= deadline {
            break;
        }
        let key = &keys[rng.random_range(0..keys.len())];
        let result =
            tokio::time::timeout(timeout, etcd.put(key.as_str(), value.clone(), None)).await;
        if begin < started {
            continue;
        }
        let micros = begin
            .elapsed()
            .as_micros()
            .clamp(1, u128::from(LATENCY_MAX_US)) as u64;
        latency.saturating_record(micros);
        counts.ops += 1;
        counts.puts += 1;
        match result {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => {
                counts.other_errors += 1;
                first_error.get_or_insert_with(|| error.to_string());
            }
            Err(_) => counts.timeouts += 1,
        }
    }
    ClientResult {
        counts,
        latency,
        first_error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration_or_zero("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_duration_or_zero("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration_or_zero("1s"), Ok(Duration::from_secs(1)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("5d").is_err());
    }
}
