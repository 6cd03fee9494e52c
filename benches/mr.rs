//! `cargo bench --bench mr`: word count over the Gutenberg corpus concatenated 30 times (about
//! 99 MB), comparing our in-process MapReduce job (`wc`, 2 workers, R = 10, default
//! configuration, as `raftkv mr run --app wc --workers 2` runs it) with single-thread in-memory
//! HashMap counts, and printing the ratios, the CPU times, the peak memory and the load average.
//!
//! The job's time is `run_job` alone, input planning and fsyncs included; its outputs are read
//! back and checked against the in-memory counts afterwards. The in-memory counts are timed on
//! the input already in memory (the tuned one) or read whole (the std one).
//!
//! Settings (environment): `RAFTKV_BENCH_COPIES` (default 30; 620 gives a 2 GB input, to check
//! that peak memory stays flat), `RAFTKV_BENCH_RUNS` (default 3; rounds interleave the
//! contenders and the best round of each is reported), `RAFTKV_BENCH_WORKERS` (default 2),
//! `RAFTKV_BENCH_SPLITS_MIB` (a comma-separated list of split sizes in MiB: adds a job contender,
//! fsync on, per size, interleaved with the others, to compare against the default).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use raftkv::mr::{FastBuildHasher, JobConfig, WordCount, for_each_word, run_job};

/// PySpark 4.0.1 local[2] on the same input and machine, from issue 6 (excluding 4.7 s start-up).
const PYSPARK_SECONDS: f64 = 12.5;
/// The input of the PySpark figure: the corpus this many times.
const PYSPARK_COPIES: usize = 30;

fn env_number(name: &str, default: usize) -> Result<usize> {
    match std::env::var(name) {
        Ok(value) => value.parse().with_context(|| format!("{name}={value:?}")),
        Err(_) => Ok(default),
    }
}

fn build_input(dir: &Path, copies: usize) -> Result<PathBuf> {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/gutenberg");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&corpus)
        .with_context(|| format!("corpus {}", corpus.display()))?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    files.retain(|p| p.extension().is_some_and(|e| e == "txt"));
    files.sort();
    if files.is_empty() {
        bail!("no .txt files in {}", corpus.display());
    }
    let mut text = Vec::new();
    for file in &files {
        text.extend_from_slice(&std::fs::read(file)?);
    }
    let path = dir.join(format!("corpus-{copies}x.txt"));
    let mut out = std::io::BufWriter::new(std::fs::File::create(&path)?);
    for _ in 0..copies {
        out.write_all(&text)?;
    }
    out.flush()?;
    Ok(path)
}

/// The plain way: read the file, split on non-letters, `HashMap<Vec<u8>, u64>` with the
/// standard hasher and one key allocation per word.
fn naive_count(path: &Path) -> Result<HashMap<Vec<u8>, u64>> {
    let text = std::fs::read(path)?;
    let mut counts: HashMap<Vec<u8>, u64> = HashMap::new();
    for word in text
        .split(|b| !b.is_ascii_alphabetic())
        .filter(|w| !w.is_empty())
    {
        *counts.entry(word.to_vec()).or_insert(0) += 1;
    }
    Ok(counts)
}

/// The tuned way: borrowed keys, a fast hasher, no allocation for words already seen.
fn tuned_count(text: &[u8]) -> HashMap<&[u8], u64, FastBuildHasher> {
    let mut counts: HashMap<&[u8], u64, FastBuildHasher> = HashMap::default();
    for_each_word(text, |word| *counts.entry(word).or_insert(0) += 1);
    counts
}

/// CPU time (user + system) of this process so far, all threads included, from
/// /proc/self/stat (clock ticks, normally 10 ms). `None` where /proc is unavailable.
fn process_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

/// One measured run: wall time and CPU time.
fn measure<T>(f: impl FnOnce() -> Result<T>) -> Result<(Duration, Option<Duration>, T)> {
    let cpu_before = process_cpu();
    let start = Instant::now();
    let value = f()?;
    let elapsed = start.elapsed();
    let cpu = process_cpu()
        .zip(cpu_before)
        .map(|(after, before)| after - before);
    Ok((elapsed, cpu, value))
}

/// The best (lowest wall time) of the runs of one contender.
#[derive(Default)]
struct Best {
    wall: Option<Duration>,
    cpu: Option<Duration>,
}

impl Best {
    fn record(&mut self, wall: Duration, cpu: Option<Duration>) {
        if self.wall.is_none_or(|best| wall < best) {
            self.wall = Some(wall);
            self.cpu = cpu;
        }
    }

    fn wall(&self) -> Duration {
        self.wall.expect("at least one run")
    }
}

fn show(name: &str, wall: Duration, cpu: Option<Duration>) {
    let cpu = cpu.map_or_else(|| "?".to_string(), |c| format!("{:.2}", c.as_secs_f64()));
    println!(
        "  {name:<32} {:>7.3} s wall, {cpu:>5} s CPU",
        wall.as_secs_f64()
    );
}

/// Reads the file once in small blocks so every contender starts from the page cache, without
/// raising the process's peak memory.
fn warm_page_cache(path: &Path) -> Result<()> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut block = vec![0u8; 1 << 20];
    while file.read(&mut block)? > 0 {}
    Ok(())
}

fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Runs the job (only this is timed) on a fresh output directory.
fn job(
    input: &Path,
    out: &Path,
    workers: usize,
    sync_files: bool,
    split_bytes: Option<u64>,
) -> Result<(Duration, Option<Duration>)> {
    let _ = std::fs::remove_dir_all(out);
    let mut config = JobConfig::new(out);
    config.workers = workers;
    if let Some(split_bytes) = split_bytes {
        config.split_bytes = split_bytes;
    }
    config.exec.sync_files = sync_files;
    let (wall, cpu, _) = measure(|| {
        Ok(run_job(
            Arc::new(WordCount),
            &[input.to_path_buf()],
            &config,
        )?)
    })?;
    Ok((wall, cpu))
}

/// The counts in the job's outputs (read after the timed run).
fn job_counts(out: &Path) -> Result<HashMap<Vec<u8>, u64>> {
    let mut counts = HashMap::new();
    for entry in std::fs::read_dir(out)? {
        let path = entry?.path();
        let is_output = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("mr-out-"));
        if !is_output {
            continue;
        }
        for line in std::fs::read_to_string(&path)?.lines() {
            let (word, count) = line.rsplit_once(' ').context("malformed output line")?;
            counts.insert(word.as_bytes().to_vec(), count.parse()?);
        }
    }
    Ok(counts)
}

/// The 1-minute load average, from /proc/loadavg.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(String::from))
        .unwrap_or_else(|| "?".to_string())
}

fn main() -> Result<()> {
    let copies = env_number("RAFTKV_BENCH_COPIES", 30)?;
    let runs = env_number("RAFTKV_BENCH_RUNS", 3)?.max(1);
    let workers = env_number("RAFTKV_BENCH_WORKERS", 2)?;
    let splits_mib: Vec<u64> = match std::env::var("RAFTKV_BENCH_SPLITS_MIB") {
        Ok(list) => list
            .split(',')
            .map(|s| {
                s.trim()
                    .parse()
                    .with_context(|| format!("RAFTKV_BENCH_SPLITS_MIB={list:?}"))
            })
            .collect::<Result<_>>()?,
        Err(_) => Vec::new(),
    };
    let mut split_best: Vec<Best> = splits_mib.iter().map(|_| Best::default()).collect();
    let dir = tempfile::tempdir()?;
    let input = build_input(dir.path(), copies)?;
    let input_bytes = std::fs::metadata(&input)?.len();
    warm_page_cache(&input)?;
    println!(
        "mr bench: wc over {} ({:.1} MB, corpus × {copies}), best of {runs}, {workers} workers, R = 10",
        input.display(),
        input_bytes as f64 / 1e6
    );

    // Rounds interleave the contenders so that load from other processes on the machine
    // affects them alike; each contender's best round is reported.
    let out = dir.path().join("out");
    let mut text = None;
    let (mut job_best, mut nosync_best, mut naive_best, mut tuned_best) = (
        Best::default(),
        Best::default(),
        Best::default(),
        Best::default(),
    );
    let mut job_rss = None;
    let load_before = load_average();
    for round in 0..runs {
        let (wall, cpu) = job(&input, &out, workers, true, None)?;
        job_best.record(wall, cpu);
        if round == 0 {
            // Before anything else holds the input in memory.
            job_rss = peak_rss_mib();
        }
        let counts = job_counts(&out)?;
        if text.is_none() {
            text = Some(std::fs::read(&input)?);
        }
        let text: &[u8] = text.as_deref().expect("read above");
        let (wall, cpu) = job(&input, &out, workers, false, None)?;
        nosync_best.record(wall, cpu);
        if job_counts(&out)? != counts {
            bail!("job output without fsync differs");
        }
        for (mib, best) in splits_mib.iter().zip(&mut split_best) {
            let (wall, cpu) = job(&input, &out, workers, true, Some(mib << 20))?;
            best.record(wall, cpu);
            if job_counts(&out)? != counts {
                bail!("job output with {mib} MiB splits differs");
            }
        }
        let (wall, cpu, naive_counts) = measure(|| naive_count(&input))?;
        naive_best.record(wall, cpu);
        let (wall, cpu, tuned_counts) = measure(|| Ok(tuned_count(text)))?;
        tuned_best.record(wall, cpu);
        if counts != naive_counts {
            bail!("job output differs from the in-memory count");
        }
        let tuned_owned: HashMap<Vec<u8>, u64> =
            tuned_counts.iter().map(|(k, v)| (k.to_vec(), *v)).collect();
        if tuned_owned != naive_counts {
            bail!("tuned count differs from the naive count");
        }
        if round == 0 {
            println!(
                "  words: {}, distinct: {} (job output checked against the in-memory counts)",
                naive_counts.values().sum::<u64>(),
                naive_counts.len()
            );
        }
    }
    let (job_time, naive_time, tuned_time) =
        (job_best.wall(), naive_best.wall(), tuned_best.wall());
    let seconds = |d: Duration| d.as_secs_f64();
    show("mr job, fsync on (default)", job_time, job_best.cpu);
    show("mr job, fsync off", nosync_best.wall(), nosync_best.cpu);
    for (mib, best) in splits_mib.iter().zip(&split_best) {
        show(
            &format!("mr job, fsync on, {mib} MiB splits"),
            best.wall(),
            best.cpu,
        );
    }
    show("in-memory count, std HashMap", naive_time, naive_best.cpu);
    show("in-memory count, tuned", tuned_time, tuned_best.cpu);
    println!(
        "  ratio job / std in-memory count:   {:.2}",
        seconds(job_time) / seconds(naive_time)
    );
    println!(
        "  ratio job / tuned in-memory count: {:.2} (target <= 1.5)",
        seconds(job_time) / seconds(tuned_time)
    );
    if let (Some(job_cpu), Some(tuned_cpu)) = (job_best.cpu, tuned_best.cpu) {
        println!(
            "  CPU time job / tuned count:        {:.2} (the wall ratio tends to this when other \
             load leaves the job no second core)",
            seconds(job_cpu) / seconds(tuned_cpu)
        );
    }
    if copies == PYSPARK_COPIES {
        println!(
            "  speed-up over PySpark local[2] ({PYSPARK_SECONDS} s, issue 6): {:.1}x (target >= 10)",
            PYSPARK_SECONDS / seconds(job_time)
        );
    }
    println!(
        "  load average (1 min) before / after: {load_before} / {} on {} CPUs",
        load_average(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    if let Some(rss) = job_rss {
        println!(
            "  peak RSS of the process after the job runs (input: {:.0} MiB): {rss:.0} MiB",
            input_bytes as f64 / 1048576.0
        );
    }
    Ok(())
}
