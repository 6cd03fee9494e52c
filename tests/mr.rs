//! MapReduce without RPC: end-to-end jobs on the Gutenberg corpus against the sequential
//! reference, memory budgets, stale attempts, failures and bad input.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

mod mr_support;
use mr_support::{corpus, job_lines};

use anyhow::Result;
use raftkv::mr::test_apps::{TestAppEnv, test_app_by_name};
use raftkv::mr::{
    App, AppError, CombineOp, Combiner, Emitter, ExecConfig, JobConfig, MapSplit, MapTask, MrError,
    ReduceTask, TaskId, Values, WordCount, app_by_name, intermediate_file_name, output_file_name,
    run_job, run_job_with, run_map, run_reduce, run_sequential,
};

/// The sequential reference of a built-in app over the whole corpus, computed once per test
/// binary (several tests compare against it).
fn corpus_reference(name: &str) -> Vec<String> {
    static CACHE: OnceLock<Mutex<HashMap<String, Vec<String>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    if let Some(lines) = cache.lock().unwrap().get(name) {
        return lines.clone();
    }
    let lines = sequential_lines(&*app_by_name(name).unwrap(), &corpus());
    cache
        .lock()
        .unwrap()
        .insert(name.to_string(), lines.clone());
    lines
}

fn sequential_lines(app: &dyn App, inputs: &[PathBuf]) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("mr-out-0");
    run_sequential(app, inputs, &output).unwrap();
    let mut lines: Vec<String> = std::fs::read_to_string(&output)
        .unwrap()
        .lines()
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    lines.sort();
    lines
}

fn config(out: &Path, workers: usize) -> JobConfig {
    let mut config = JobConfig::new(out);
    config.workers = workers;
    config.exec.sync_files = false;
    config
}

fn assert_same(actual: &[String], expected: &[String]) {
    assert!(!expected.is_empty(), "the reference output is empty");
    if actual != expected {
        let first = actual
            .iter()
            .zip(expected)
            .position(|(a, e)| a != e)
            .unwrap_or(actual.len().min(expected.len()));
        panic!(
            "outputs differ ({} vs {} lines); first difference at line {first}: {:?} vs {:?}",
            actual.len(),
            expected.len(),
            actual.get(first),
            expected.get(first)
        );
    }
}

/// No temporary file is visible in `dir` and the intermediate directory is gone.
fn assert_clean(out: &Path) {
    for entry in std::fs::read_dir(out).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().to_string();
        assert!(!name.starts_with(".mr-tmp-"), "temporary file left: {name}");
    }
    assert!(
        !out.join(".mr-intermediate").exists(),
        "intermediates left behind"
    );
}

// Proves wc with 3 workers and R = 10 equals the sequential reference, and the job is
// complete (all outputs present, nothing temporary left) when run_job returns.
#[test]
fn wc_with_3_workers_matches_sequential() -> Result<()> {
    let inputs = corpus();
    let dir = tempfile::tempdir()?;
    let summary = run_job(app_by_name("wc")?, &inputs, &config(dir.path(), 3))?;
    assert_eq!(summary.outputs.len(), 10);
    assert!(summary.outputs.iter().all(|p| p.exists()));
    assert_eq!(summary.progress.maps_done, 8);
    assert_same(&job_lines(dir.path()), &corpus_reference("wc"));
    assert_clean(dir.path());
    Ok(())
}

// Proves indexer with 2 workers equals the sequential "word N doc1,doc2,…" reference.
#[test]
fn indexer_with_2_workers_matches_sequential() -> Result<()> {
    let inputs = corpus();
    let dir = tempfile::tempdir()?;
    run_job(app_by_name("indexer")?, &inputs, &config(dir.path(), 2))?;
    let lines = job_lines(dir.path());
    assert_same(&lines, &corpus_reference("indexer"));
    assert!(
        lines.iter().any(|l| l.starts_with("the 8 ")),
        "'the' is in all eight texts"
    );
    Ok(())
}

// Proves files split into many map tasks, read in small chunks, give the same output.
#[test]
fn split_files_and_small_chunks_match_sequential() -> Result<()> {
    let inputs = corpus();
    for name in ["wc", "indexer"] {
        let dir = tempfile::tempdir()?;
        let mut config = config(dir.path(), 3);
        config.table.reduce_tasks = 4;
        config.split_bytes = 128 * 1024;
        config.exec.map_chunk_bytes = 5000;
        let summary = run_job(app_by_name(name)?, &inputs, &config)?;
        assert!(summary.progress.map_tasks > 20, "{name}: files were split");
        assert_same(&job_lines(dir.path()), &corpus_reference(name));
    }
    Ok(())
}

// Proves tiny memory budgets force combine flushes, sorted-run spills and multi-pass merges,
// and the output is still identical.
#[test]
fn tiny_memory_budgets_spill_and_match_sequential() -> Result<()> {
    let inputs = corpus()[..3].to_vec();
    for name in ["wc", "indexer"] {
        let dir = tempfile::tempdir()?;
        let mut config = config(dir.path(), 2);
        config.table.reduce_tasks = 3;
        config.exec.combine_buffer_bytes_max = 16 * 1024;
        config.exec.record_bytes_max = 1024;
        config.exec.sort_buffer_bytes_max = 8 * 1024;
        config.exec.merge_fan_in_max = 3;
        let summary = run_job(app_by_name(name)?, &inputs, &config)?;
        assert!(
            summary.progress.spills > 100,
            "{name}: spills = {}",
            summary.progress.spills
        );
        assert_same(
            &job_lines(dir.path()),
            &sequential_lines(&*app_by_name(name)?, &inputs),
        );
    }
    Ok(())
}

// Proves each budget acts where it should: a tiny combine table spills in map, a tiny sort
// buffer spills in reduce (more runs than the fan-in, so merges take several passes), and
// the reduce output equals the one from generous budgets.
#[test]
fn budgets_spill_in_map_and_reduce_tasks() -> Result<()> {
    let input = corpus()
        .into_iter()
        .find(|p| p.ends_with("pg-grimm.txt"))
        .unwrap();
    let size = std::fs::metadata(&input)?.len();
    let app = app_by_name("wc")?;
    let run = |combine: usize, sort: usize| -> Result<(u64, u64, Vec<u8>)> {
        let dir = tempfile::tempdir()?;
        let mut exec = ExecConfig::new(dir.path());
        exec.sync_files = false;
        exec.combine_buffer_bytes_max = combine;
        exec.record_bytes_max = 1024;
        exec.sort_buffer_bytes_max = sort;
        exec.merge_fan_in_max = 4;
        let split = MapSplit {
            path: input.to_str().unwrap().to_string(),
            start: 0,
            end: size,
        };
        let map = run_map(
            &*app,
            &MapTask {
                task: 0,
                attempt: 1,
                split,
                reduce_tasks: 1,
            },
            &exec,
        )?;
        let reduce = ReduceTask {
            task: 0,
            attempt: 1,
            map_attempts: vec![1],
        };
        let stats = run_reduce(&*app, &reduce, &exec)?;
        assert_eq!(stats.input_records, map.output_records);
        let output = std::fs::read(dir.path().join(output_file_name(0)))?;
        Ok((map.spills, stats.spills, output))
    };
    let (map_spills, reduce_spills, generous) = run(32 << 20, 64 << 20)?;
    assert_eq!((map_spills, reduce_spills), (0, 0));
    let (map_spills, reduce_spills, tiny) = run(8 * 1024, 8 * 1024)?;
    assert!(map_spills > 10, "map spills = {map_spills}");
    assert!(
        reduce_spills > 16,
        "reduce spills = {reduce_spills} (fan-in 4: several passes)"
    );
    assert_eq!(tiny, generous);
    Ok(())
}

// Proves turning the combiner off does not change the output.
#[test]
fn combiner_off_matches_sequential() -> Result<()> {
    let inputs = corpus();
    for name in ["wc", "indexer"] {
        let dir = tempfile::tempdir()?;
        let mut config = config(dir.path(), 2);
        config.exec.use_combiner = false;
        run_job(app_by_name(name)?, &inputs, &config)?;
        assert_same(&job_lines(dir.path()), &corpus_reference(name));
    }
    Ok(())
}

/// `wc` with its combiner called once per value: the same `combine`, no declared `CombineOp`.
struct PerValueWordCount;

impl App for PerValueWordCount {
    fn name(&self) -> &str {
        "wc"
    }

    fn map(&self, filename: &str, contents: &[u8], emit: &mut Emitter<'_>) -> Result<(), AppError> {
        WordCount.map(filename, contents, emit)
    }

    fn reduce(
        &self,
        key: &[u8],
        values: &mut Values<'_>,
        output: &mut Vec<u8>,
    ) -> Result<(), AppError> {
        WordCount.reduce(key, values, output)
    }

    fn combiner(&self) -> Option<&dyn Combiner> {
        Some(self)
    }
}

impl Combiner for PerValueWordCount {
    fn combine(&self, key: &[u8], accumulator: &mut Vec<u8>, value: &[u8]) -> Result<(), AppError> {
        WordCount.combine(key, accumulator, value)
    }
}

/// Declares a u64 sum but emits 4-byte values.
struct MalformedSum;

impl App for MalformedSum {
    fn name(&self) -> &str {
        "malformed-sum"
    }

    fn map(&self, _: &str, _: &[u8], emit: &mut Emitter<'_>) -> Result<(), AppError> {
        emit.emit(b"key", &1u32.to_le_bytes());
        Ok(())
    }

    fn reduce(&self, _: &[u8], _: &mut Values<'_>, _: &mut Vec<u8>) -> Result<(), AppError> {
        Ok(())
    }

    fn combiner(&self) -> Option<&dyn Combiner> {
        Some(self)
    }
}

impl Combiner for MalformedSum {
    fn combine(&self, _: &[u8], _: &mut Vec<u8>, _: &[u8]) -> Result<(), AppError> {
        Ok(())
    }

    fn op(&self) -> Option<CombineOp> {
        Some(CombineOp::SumU64Le)
    }
}

// Proves wc's native combine (CombineOp::SumU64Le) gives the same output as its combiner
// called per value (and, without spills, the same intermediate bytes), with generous and tiny
// combine budgets, and that a
// value the declared operation cannot take fails the map task with a clear error.
#[test]
fn native_combine_matches_the_combiner() -> Result<()> {
    let inputs = corpus()[..3].to_vec();
    for combine_bytes in [32 << 20, 16 * 1024] {
        let mut outputs = Vec::new();
        let mut records = Vec::new();
        for app in [
            app_by_name("wc")?,
            Arc::new(PerValueWordCount) as Arc<dyn App>,
        ] {
            let dir = tempfile::tempdir()?;
            let mut config = config(dir.path(), 2);
            config.table.reduce_tasks = 3;
            config.exec.combine_buffer_bytes_max = combine_bytes;
            let summary = run_job(app, &inputs, &config)?;
            outputs.push(job_lines(dir.path()));
            records.push((summary.progress.spills, summary.progress.intermediate_bytes));
        }
        assert_eq!(outputs[0], outputs[1], "budget {combine_bytes}");
        if combine_bytes == 32 << 20 {
            assert_eq!(records[0], records[1], "no spill: the same records written");
        } else {
            // Native entries are smaller, so the two tables spill at different points.
            assert!(
                records[0].0 > 0 && records[1].0 > 0,
                "both spill: {records:?}"
            );
        }
        assert_same(&outputs[0], &sequential_lines(&WordCount, &inputs));
    }
    let dir = tempfile::tempdir()?;
    let input = dir.path().join("input.txt");
    std::fs::write(&input, "a line\n")?;
    let mut config = config(&dir.path().join("out"), 1);
    config.table.task_failures_max = 1;
    match run_job(Arc::new(MalformedSum), &[input], &config) {
        Err(MrError::JobFailed { last_error, .. }) => {
            assert!(last_error.contains("must be 8 bytes"), "{last_error}")
        }
        other => panic!("expected JobFailed, got {other:?}"),
    }
    Ok(())
}

/// Blocks the first map call of the first input until a reduce runs, then emits "stale";
/// every later call of that input emits "fresh".
struct StaleProbe {
    target: String,
    calls: Mutex<u32>,
    released: (Mutex<bool>, Condvar),
}

impl App for StaleProbe {
    fn name(&self) -> &str {
        "stale-probe"
    }

    fn map(&self, filename: &str, _: &[u8], emit: &mut Emitter<'_>) -> Result<(), AppError> {
        emit.emit(filename.as_bytes(), b"seen");
        if filename != self.target {
            return Ok(());
        }
        let call = {
            let mut calls = self.calls.lock().unwrap();
            *calls += 1;
            *calls
        };
        if call > 1 {
            emit.emit(b"probe", b"fresh");
            return Ok(());
        }
        let (lock, released) = &self.released;
        let guard = lock.lock().unwrap();
        let (guard, timeout) = released
            .wait_timeout_while(guard, Duration::from_secs(60), |released| !*released)
            .unwrap();
        drop(guard);
        if timeout.timed_out() {
            return Err(AppError::new("never released: no reduce ran"));
        }
        emit.emit(b"probe", b"stale");
        Ok(())
    }

    fn reduce(
        &self,
        _: &[u8],
        values: &mut Values<'_>,
        output: &mut Vec<u8>,
    ) -> Result<(), AppError> {
        *self.released.0.lock().unwrap() = true;
        self.released.1.notify_all();
        let mut all = Vec::new();
        while let Some(v) = values.next_value() {
            all.push(v.to_vec());
        }
        all.sort();
        output.extend_from_slice(&all.join(&b' '));
        Ok(())
    }
}

// Proves a timed-out attempt is re-run elsewhere, and when the stale attempt completes late
// its output is ignored: reduces read only the accepted attempt's files.
#[test]
fn stale_attempt_completing_late_is_ignored() -> Result<()> {
    let inputs = corpus();
    let dir = tempfile::tempdir()?;
    let mut config = config(dir.path(), 2);
    config.table.task_timeout_ms = 200;
    let probe = Arc::new(StaleProbe {
        target: inputs[0].to_str().unwrap().to_string(),
        calls: Mutex::new(0),
        released: (Mutex::new(false), Condvar::new()),
    });
    let app: Arc<dyn App> = probe.clone();
    let summary = run_job(app, &inputs, &config)?;
    let lines = job_lines(dir.path());
    assert!(lines.contains(&"probe fresh".to_string()), "{lines:?}");
    assert!(!lines.iter().any(|l| l.contains("stale")), "{lines:?}");
    assert_eq!(lines.len(), inputs.len() + 1);
    assert!(summary.progress.timeouts >= 1);
    assert!(summary.progress.late_completions >= 1);
    assert!(*probe.calls.lock().unwrap() >= 2);
    assert_clean(dir.path());
    Ok(())
}

/// Fails (or panics) the first `failures` map calls of `target`, then behaves like wc.
struct Flaky {
    target: String,
    failures: u32,
    panic: bool,
    calls: Mutex<u32>,
}

impl App for Flaky {
    fn name(&self) -> &str {
        "flaky"
    }

    fn map(&self, filename: &str, contents: &[u8], emit: &mut Emitter<'_>) -> Result<(), AppError> {
        if filename == self.target {
            let call = {
                let mut calls = self.calls.lock().unwrap();
                *calls += 1;
                *calls
            };
            if call <= self.failures {
                if self.panic {
                    panic!("injected panic {call}");
                }
                return Err(AppError::new(format!("injected failure {call}")));
            }
        }
        app_by_name("wc").unwrap().map(filename, contents, emit)
    }

    fn reduce(
        &self,
        key: &[u8],
        values: &mut Values<'_>,
        output: &mut Vec<u8>,
    ) -> Result<(), AppError> {
        app_by_name("wc").unwrap().reduce(key, values, output)
    }
}

// Proves a failing task is retried and the job still matches the reference.
#[test]
fn failed_task_is_retried() -> Result<()> {
    let inputs = corpus();
    let dir = tempfile::tempdir()?;
    let app = Arc::new(Flaky {
        target: inputs[3].to_str().unwrap().to_string(),
        failures: 2,
        panic: false,
        calls: Mutex::new(0),
    });
    let summary = run_job(app, &inputs, &config(dir.path(), 2))?;
    assert_eq!(summary.progress.failures, 2);
    assert_same(&job_lines(dir.path()), &corpus_reference("wc"));
    Ok(())
}

// Proves a task failing task_failures_max times (by error or by panic) fails the job with the
// task and the application's message, and leaves no output of that task.
#[test]
fn persistent_failure_fails_the_job() -> Result<()> {
    let inputs = corpus();
    for panic in [false, true] {
        let dir = tempfile::tempdir()?;
        let mut config = config(dir.path(), 2);
        config.table.task_failures_max = 3;
        let app = Arc::new(Flaky {
            target: inputs[5].to_str().unwrap().to_string(),
            failures: u32::MAX,
            panic,
            calls: Mutex::new(0),
        });
        match run_job(app, &inputs, &config) {
            Err(MrError::JobFailed {
                task,
                failures,
                last_error,
            }) => {
                assert_eq!(task, TaskId::Map(5));
                assert_eq!(failures, 3);
                let expected = if panic {
                    "panicked: injected panic 3"
                } else {
                    "injected failure 3"
                };
                assert!(last_error.contains(expected), "{last_error}");
            }
            other => panic!("expected JobFailed, got {other:?}"),
        }
        assert!(
            job_lines(dir.path()).is_empty(),
            "no output from a failed job"
        );
    }
    Ok(())
}

// Proves a corrupted, truncated or missing intermediate file makes the reduce fail with a
// clear error naming the file, and leaves no output: a flipped byte anywhere in the file is
// caught by a reduce task that reads it (each reads the index and its own blocks).
#[test]
fn damaged_intermediate_files_are_clear_errors() -> Result<()> {
    let input = corpus()
        .into_iter()
        .find(|p| p.ends_with("pg-metamorphosis.txt"))
        .unwrap();
    let size = std::fs::metadata(&input)?.len();
    let app = app_by_name("wc")?;
    let dir = tempfile::tempdir()?;
    let mut exec = ExecConfig::new(dir.path());
    exec.sync_files = false;
    let split = MapSplit {
        path: input.to_str().unwrap().to_string(),
        start: 0,
        end: size,
    };
    run_map(
        &*app,
        &MapTask {
            task: 0,
            attempt: 1,
            split,
            reduce_tasks: 2,
        },
        &exec,
    )?;
    let path = exec.intermediate_dir.join(intermediate_file_name(0, 1));
    let original = std::fs::read(&path)?;
    let reduce = |task: u32| ReduceTask {
        task,
        attempt: 1,
        map_attempts: vec![1],
    };

    // Flip bytes across the whole file, the index and footer at its end included.
    let positions = (0..64)
        .map(|i| i * original.len() / 64)
        .chain(original.len() - 64..original.len());
    for position in positions {
        let mut flipped = original.clone();
        flipped[position] ^= 0x20;
        std::fs::write(&path, &flipped)?;
        let mut caught = false;
        for task in 0..2 {
            match run_reduce(&*app, &reduce(task), &exec) {
                Err(MrError::Corrupt { path: p, .. }) => {
                    assert_eq!(p, path);
                    assert!(!dir.path().join(output_file_name(task)).exists());
                    caught = true;
                }
                Ok(_) => std::fs::remove_file(dir.path().join(output_file_name(task)))?,
                Err(other) => panic!("expected Corrupt, got {other:?}"),
            }
        }
        assert!(caught, "a flip at byte {position} went unnoticed");
    }
    std::fs::write(&path, &original[..original.len() - 5])?;
    match run_reduce(&*app, &reduce(1), &exec) {
        Err(MrError::Corrupt { reason, .. }) => assert!(reason.contains("truncated"), "{reason}"),
        other => panic!("expected Corrupt, got {other:?}"),
    }
    std::fs::remove_file(&path)?;
    match run_reduce(&*app, &reduce(1), &exec) {
        Err(MrError::Io { path: p, .. }) => assert_eq!(p, path),
        other => panic!("expected Io, got {other:?}"),
    }
    assert!(!dir.path().join(output_file_name(1)).exists());
    std::fs::write(&path, &original)?;
    run_reduce(&*app, &reduce(1), &exec)?;
    assert!(dir.path().join(output_file_name(1)).exists());
    Ok(())
}

// Proves bad job input is a clear error: a missing input, an output directory that cannot be
// created, a line over the limit, an invalid configuration.
#[test]
fn bad_job_input_is_a_clear_error() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let missing = dir.path().join("missing.txt");
    let err = run_job(
        app_by_name("wc")?,
        std::slice::from_ref(&missing),
        &config(&dir.path().join("out"), 1),
    )
    .unwrap_err();
    assert!(
        matches!(&err, MrError::Io { path, .. } if *path == missing),
        "{err}"
    );

    let not_a_dir = dir.path().join("file");
    std::fs::write(&not_a_dir, "x")?;
    let input = dir.path().join("input.txt");
    std::fs::write(&input, "one line\n")?;
    let err = run_job(
        app_by_name("wc")?,
        std::slice::from_ref(&input),
        &config(&not_a_dir.join("out"), 1),
    )
    .unwrap_err();
    assert!(
        matches!(
            &err,
            MrError::Io {
                op: "create directory",
                ..
            }
        ),
        "{err}"
    );

    let long = dir.path().join("long.txt");
    std::fs::write(&long, format!("short\n{}\nshort\n", "x".repeat(5000)))?;
    let mut config = config(&dir.path().join("out2"), 1);
    config.exec.map_chunk_bytes = 1000;
    config.exec.map_line_bytes_max = 4000;
    config.table.task_failures_max = 1;
    match run_job(app_by_name("wc")?, &[long], &config) {
        Err(MrError::JobFailed { last_error, .. }) => {
            assert!(
                last_error.contains("longer than map_line_bytes_max"),
                "{last_error}"
            );
            assert!(last_error.contains("byte 6 "), "{last_error}");
        }
        other => panic!("expected JobFailed, got {other:?}"),
    }

    let mut config = JobConfig::new(dir.path().join("out3"));
    config.workers = 0;
    assert!(matches!(
        run_job(app_by_name("wc")?, std::slice::from_ref(&input), &config),
        Err(MrError::Config(_))
    ));
    config.workers = 1;
    config.exec.merge_fan_in_max = 1;
    assert!(matches!(
        run_job(app_by_name("wc")?, &[input], &config),
        Err(MrError::Config(_))
    ));
    Ok(())
}

/// One test application per worker, each with its own slot (worker identity).
fn per_worker(name: &str, workers: u32, marker_dir: &Path) -> Vec<Arc<dyn App>> {
    (0..workers)
        .map(|slot| {
            let env = TestAppEnv {
                slot,
                sleep_percent: 0,
                ..TestAppEnv::new(marker_dir)
            };
            test_app_by_name(name, env).unwrap()
        })
        .collect()
}

// Proves the jobcount application sees exactly one map call per input (8) with 4 workers.
#[test]
fn jobcount_sees_one_map_per_input() -> Result<()> {
    let inputs = corpus();
    let dir = tempfile::tempdir()?;
    let markers = tempfile::tempdir()?;
    let apps = per_worker("jobcount", 4, markers.path());
    run_job_with(&apps, &inputs, &config(dir.path(), 4), &|_| {})?;
    assert_eq!(job_lines(dir.path()), vec!["a 8".to_string()]);
    Ok(())
}

// Proves the crash scenario's reference app (nocrash) and early_exit give the sequential
// output through the executor.
#[test]
fn nocrash_and_early_exit_match_sequential() -> Result<()> {
    let inputs = corpus();
    for name in ["nocrash", "early_exit"] {
        let dir = tempfile::tempdir()?;
        let markers = tempfile::tempdir()?;
        let apps = per_worker(name, 3, markers.path());
        run_job_with(&apps, &inputs, &config(dir.path(), 3), &|_| {})?;
        assert_same(
            &job_lines(dir.path()),
            &sequential_lines(&*apps[0], &inputs),
        );
    }
    Ok(())
}

// Proves the progress callback sees every task finish and monotone counters.
#[test]
fn progress_reports_every_task() -> Result<()> {
    let inputs = corpus();
    let dir = tempfile::tempdir()?;
    let seen = Mutex::new(Vec::new());
    let apps = vec![app_by_name("wc")?; 2];
    run_job_with(&apps, &inputs, &config(dir.path(), 2), &|p| {
        seen.lock().unwrap().push(*p)
    })?;
    let seen = seen.into_inner().unwrap();
    // Callbacks run outside the table lock, so they may arrive out of order; each completion
    // still reports a distinct count of finished tasks.
    let mut finished: Vec<u32> = seen.iter().map(|p| p.maps_done + p.reduces_done).collect();
    finished.sort_unstable();
    assert_eq!(finished, (1..=18).collect::<Vec<u32>>());
    let last = seen
        .iter()
        .max_by_key(|p| p.maps_done + p.reduces_done)
        .unwrap();
    assert_eq!((last.maps_done, last.reduces_done), (8, 10));
    assert_eq!(last.input_bytes_done, last.input_bytes);
    let total: u64 = inputs
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    assert_eq!(last.input_bytes, total);
    let counts: HashMap<String, u64> = job_lines(dir.path())
        .iter()
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').unwrap();
            (k.to_string(), v.parse().unwrap())
        })
        .collect();
    assert_eq!(
        last.output_bytes,
        counts
            .iter()
            .map(|(k, v)| (k.len() + v.to_string().len() + 2) as u64)
            .sum::<u64>()
    );
    Ok(())
}
