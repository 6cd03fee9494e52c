//! Lab 1 (MapReduce) with real processes: `raftkv mr coordinator` and separate `raftkv mr
//! worker` processes over TCP on 127.0.0.1 (port 0), on the Gutenberg corpus. Every scenario
//! of the lab — outputs against the sequential reference, map and reduce parallelism, job
//! count, early exit, crashes with workers restarted in a loop — plus a SIGKILLed coordinator
//! that resumes, `raftkv mr run`, and bad input.
//!
//! Every process has a time bound like the lab's (45 s, 120 s in the crash scenario): past it
//! the test kills it and fails. That is hang protection, not a timing assertion. To keep the
//! suite short, some scenarios scale the test applications' sleeps
//! (`RAFTKV_MR_TEST_SLEEP_PERCENT`) and the task timeout (`--task-timeout-ms`) by the same
//! factor, which keeps their meaning (sleeps still overlap, slow tasks still time out).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

mod mr_support;
use mr_support::{corpus, job_lines};

use anyhow::{Context, Result};
use raftkv::mr::test_apps::{TestAppEnv, test_app_by_name};
use raftkv::mr::{App, app_by_name, run_sequential};

const BIN: &str = env!("CARGO_BIN_EXE_raftkv");
/// The lab's bound on every process.
const PROCESS_BOUND: Duration = Duration::from_secs(45);
/// The lab's bound in the crash scenario.
const CRASH_PROCESS_BOUND: Duration = Duration::from_secs(120);
/// How often process exits and files are checked while waiting.
const POLL: Duration = Duration::from_millis(20);

/// The sequential reference (`run_sequential`) of `name` over the corpus, sorted, blank lines
/// dropped; test applications run without sleeps. Computed once per name.
fn reference(name: &str) -> Vec<String> {
    static CACHE: OnceLock<Mutex<HashMap<String, Vec<String>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    if let Some(lines) = cache.lock().unwrap().get(name) {
        return lines.clone();
    }
    let scratch = tempfile::tempdir().unwrap();
    let app: std::sync::Arc<dyn App> = match app_by_name(name) {
        Ok(app) => app,
        Err(_) => {
            let env = TestAppEnv {
                sleep_percent: 0,
                ..TestAppEnv::new(scratch.path())
            };
            test_app_by_name(name, env).unwrap()
        }
    };
    let output = scratch.path().join("mr-out-0");
    run_sequential(&*app, &corpus(), &output).unwrap();
    let mut lines: Vec<String> = std::fs::read_to_string(&output)
        .unwrap()
        .lines()
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    lines.sort();
    cache
        .lock()
        .unwrap()
        .insert(name.to_string(), lines.clone());
    lines
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

/// A child process with a deadline; its output goes to a log file. Killed when dropped.
struct Process {
    name: String,
    child: Child,
    log: PathBuf,
    deadline: Instant,
    status: Option<ExitStatus>,
}

impl Process {
    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The exit status if the process has exited; kills it and fails past its deadline.
    fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("try_wait");
        }
        if self.status.is_none() && Instant::now() > self.deadline {
            let _ = self.child.kill();
            let _ = self.child.wait();
            panic!(
                "{} ran past its time bound; killed. Log:\n{}",
                self.name,
                self.log_text()
            );
        }
        self.status
    }

    fn wait(&mut self) -> ExitStatus {
        loop {
            if let Some(status) = self.try_status() {
                return status;
            }
            std::thread::sleep(POLL);
        }
    }

    fn wait_success(&mut self) {
        let status = self.wait();
        assert!(
            status.success(),
            "{} exited with {status}. Log:\n{}",
            self.name,
            self.log_text()
        );
    }

    fn wait_failure(&mut self) -> String {
        let status = self.wait();
        let log = self.log_text();
        assert!(
            !status.success(),
            "{} should have failed. Log:\n{log}",
            self.name
        );
        log
    }

    /// SIGKILL.
    fn kill(&mut self) {
        self.child.kill().expect("kill");
        self.status = Some(self.child.wait().expect("wait"));
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A coordinator process; its stdout lines arrive on a channel (and go to its log).
struct CoordinatorProcess {
    process: Process,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
    address: String,
}

impl CoordinatorProcess {
    /// Waits for a stdout line matching `matches` and returns it; fails if the coordinator
    /// exits or passes its deadline first.
    fn wait_line(&mut self, what: &str, matches: impl Fn(&str) -> bool) -> String {
        loop {
            match self.lines.recv_timeout(POLL) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if matches(&line) {
                        return line;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    self.process.try_status();
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = self.process.wait();
                    panic!(
                        "coordinator exited ({status}) before printing {what}. Log:\n{}",
                        self.process.log_text()
                    );
                }
            }
        }
    }
}

/// One scenario's directory: outputs, job state, markers and logs.
struct Lab {
    dir: tempfile::TempDir,
    out: PathBuf,
    state: PathBuf,
    markers: PathBuf,
    sleep_percent: u32,
    bound: Duration,
    spawned: Mutex<u32>,
    /// This lab's cluster id: a process can never join another test's job, even if a port is
    /// reused.
    cluster_id: String,
}

impl Lab {
    fn new(sleep_percent: u32, bound: Duration) -> Result<Lab> {
        let dir = tempfile::tempdir()?;
        let markers = dir.path().join("markers");
        std::fs::create_dir(&markers)?;
        Ok(Lab {
            out: dir.path().join("out"),
            state: dir.path().join("state"),
            markers,
            dir,
            sleep_percent,
            bound,
            spawned: Mutex::new(0),
            cluster_id: rand::random::<u32>().to_string(),
        })
    }

    fn log_path(&self, name: &str) -> PathBuf {
        let mut n = self.spawned.lock().unwrap();
        *n += 1;
        self.dir.path().join(format!("{n:03}-{name}.log"))
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(BIN);
        command
            .args(args)
            .current_dir(self.dir.path())
            .env("RUST_LOG", "raftkv=info")
            .env("RAFTKV_MR_TEST_DIR", &self.markers)
            .env(
                "RAFTKV_MR_TEST_SLEEP_PERCENT",
                self.sleep_percent.to_string(),
            )
            .stdin(Stdio::null());
        command
    }

    /// Runs `raftkv ARGS` with stdout and stderr in one log.
    fn spawn(&self, name: &str, args: &[&str]) -> Process {
        let log = self.log_path(name);
        let file = std::fs::File::create(&log).unwrap();
        let child = self
            .command(args)
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        Process {
            name: format!("{name} (pid {})", child.id()),
            child,
            log,
            deadline: Instant::now() + self.bound,
            status: None,
        }
    }

    /// The coordinator arguments for this lab: listen address, R = 10, state and output
    /// directories, `extra`, the corpus.
    fn coordinator_args(&self, listen: &str, extra: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = ["mr", "coordinator", "--listen", listen]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.extend(["--reduce-tasks".into(), "10".into()]);
        args.extend(["--state-dir".into(), self.state.display().to_string()]);
        args.extend(["--output-dir".into(), self.out.display().to_string()]);
        args.extend(["--cluster-id".into(), self.cluster_id.clone()]);
        args.extend(extra.iter().map(|s| s.to_string()));
        args.extend(corpus().iter().map(|p| p.display().to_string()));
        args
    }

    /// Starts a coordinator and waits for its `listening on` line.
    fn coordinator_with(&self, args: &[String]) -> CoordinatorProcess {
        let log = self.log_path("coordinator");
        let file = std::fs::File::create(&log).unwrap();
        let mut child = self
            .command(&args.iter().map(String::as_str).collect::<Vec<_>>())
            .stdout(Stdio::piped())
            .stderr(file.try_clone().unwrap())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (sender, lines) = mpsc::channel();
        std::thread::spawn(move || {
            let mut file = file;
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = writeln!(file, "{line}");
                // Keep draining stdout after the test stops listening, so the coordinator
                // never writes to a closed pipe.
                let _ = sender.send(line);
            }
        });
        let mut coordinator = CoordinatorProcess {
            process: Process {
                name: format!("coordinator (pid {})", child.id()),
                child,
                log,
                deadline: Instant::now() + self.bound,
                status: None,
            },
            lines,
            seen: Vec::new(),
            address: String::new(),
        };
        let line = coordinator.wait_line("its address", |l| l.starts_with("listening on "));
        coordinator.address = line["listening on ".len()..].to_string();
        coordinator
    }

    fn coordinator(&self, extra: &[&str]) -> CoordinatorProcess {
        self.coordinator_with(&self.coordinator_args("127.0.0.1:0", extra))
    }

    fn worker(&self, address: &str, app: &str, extra: &[&str]) -> Process {
        let mut args = vec![
            "mr",
            "worker",
            "--coordinator",
            address,
            "--app",
            app,
            "--cluster-id",
            &self.cluster_id,
        ];
        args.extend_from_slice(extra);
        self.spawn(&format!("worker-{app}"), &args)
    }

    fn markers_named(&self, prefix: &str) -> usize {
        std::fs::read_dir(&self.markers)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with(prefix)
            })
            .count()
    }
}

/// Runs `app` with one coordinator and `workers` worker processes; returns the sorted output
/// lines, read as soon as the coordinator exited (the job must be complete by then).
fn run_lab_job(lab: &Lab, app: &str, workers: usize, extra: &[&str]) -> Vec<String> {
    let mut coordinator = lab.coordinator(extra);
    let mut processes: Vec<Process> = (0..workers)
        .map(|_| lab.worker(&coordinator.address, app, &[]))
        .collect();
    coordinator.process.wait_success();
    let lines = job_lines(&lab.out);
    for worker in &mut processes {
        worker.wait_success();
    }
    lines
}

// Proves wc with 3 worker processes equals the sequential output, already complete when the
// coordinator exits, and every process exits cleanly.
#[test]
fn wc_with_3_workers_matches_sequential() -> Result<()> {
    let lab = Lab::new(100, PROCESS_BOUND)?;
    assert_same(&run_lab_job(&lab, "wc", 3, &[]), &reference("wc"));
    Ok(())
}

// Proves indexer with 2 worker processes gives the sequential "word N doc1,doc2,…" output.
#[test]
fn indexer_with_2_workers_matches_sequential() -> Result<()> {
    let lab = Lab::new(100, PROCESS_BOUND)?;
    assert_same(&run_lab_job(&lab, "indexer", 2, &[]), &reference("indexer"));
    Ok(())
}

// Proves map tasks run in parallel on both workers: exactly 2 distinct worker ids did maps,
// and some map saw 2 mappers running at once (lab timing: 1 s per map).
#[test]
fn map_parallelism() -> Result<()> {
    let lab = Lab::new(100, PROCESS_BOUND)?;
    let lines = run_lab_job(&lab, "mtiming", 2, &[]);
    let workers = lines.iter().filter(|l| l.starts_with("times-")).count();
    assert_eq!(workers, 2, "saw {workers} workers rather than 2: {lines:?}");
    let parallel = lines
        .iter()
        .filter(|l| l.starts_with("parallel-"))
        .any(|l| l.split(' ').skip(1).any(|count| count == "2"));
    assert!(parallel, "map workers did not run in parallel: {lines:?}");
    Ok(())
}

// Proves reduce tasks run in parallel: at least 2 of the keys a–j saw 2 reducers at once (lab
// timing: 1 s per reduce).
#[test]
fn reduce_parallelism() -> Result<()> {
    let lab = Lab::new(100, PROCESS_BOUND)?;
    let lines = run_lab_job(&lab, "rtiming", 2, &[]);
    assert_eq!(lines.len(), 10, "keys a–j: {lines:?}");
    let parallel = lines
        .iter()
        .filter(|l| l.len() == 3 && l.as_bytes()[0].is_ascii_lowercase() && l.ends_with(" 2"))
        .count();
    assert!(parallel >= 2, "too few parallel reduces: {lines:?}");
    Ok(())
}

// Proves each map task runs exactly once with 4 workers, 2 of them joining while maps are
// running: the reduce counts exactly 8 map calls (sleeps at 50%: 1–2.5 s per map, far below
// the 10 s timeout).
#[test]
fn job_count_is_exactly_8() -> Result<()> {
    let lab = Lab::new(50, PROCESS_BOUND)?;
    let mut coordinator = lab.coordinator(&[]);
    let mut workers: Vec<Process> = (0..2)
        .map(|_| lab.worker(&coordinator.address, "jobcount", &[]))
        .collect();
    // The late workers join once the first maps are under way.
    while lab.markers_named("mr-worker-jobcount") < 2 {
        assert!(
            coordinator.process.try_status().is_none(),
            "job ended before the late workers joined"
        );
        std::thread::sleep(POLL);
    }
    for _ in 0..2 {
        workers.push(lab.worker(&coordinator.address, "jobcount", &[]));
    }
    coordinator.process.wait_success();
    assert_eq!(job_lines(&lab.out), vec!["a 8".to_string()]);
    for worker in &mut workers {
        worker.wait_success();
    }
    Ok(())
}

// Proves no process exits before the job is complete: the output seen when the first of the
// coordinator and 3 workers exits equals the final output (and the sequential one).
#[test]
fn early_exit_sees_the_final_output() -> Result<()> {
    let lab = Lab::new(100, PROCESS_BOUND)?;
    let coordinator = lab.coordinator(&[]);
    let mut processes = vec![coordinator.process];
    for _ in 0..3 {
        processes.push(lab.worker(&coordinator.address, "early_exit", &[]));
    }
    let first_exit = 'wait: loop {
        for process in &mut processes {
            if process.try_status().is_some() {
                break 'wait process.name.clone();
            }
        }
        std::thread::sleep(POLL);
    };
    let at_first_exit = job_lines(&lab.out);
    for process in &mut processes {
        process.wait_success();
    }
    let last = job_lines(&lab.out);
    assert_eq!(
        at_first_exit, last,
        "output changed after {first_exit} exited"
    );
    assert_same(&last, &reference("early_exit"));
    Ok(())
}

// Proves the job survives workers that crash (exit mid-task, 1/3 per call) or stall (sleep,
// 1/3 per call), restarted in a loop: the output equals nocrash's. Sleeps (0–10 s in the lab)
// and the task timeout (10 s) are both scaled to 10%.
#[test]
fn crashing_workers_restarted_in_a_loop() -> Result<()> {
    let lab = Lab::new(10, CRASH_PROCESS_BOUND)?;
    let mut coordinator = lab.coordinator(&["--task-timeout-ms", "1000"]);
    let worker_flags = ["--coordinator-gone-ms", "3000"];
    let spawn = || lab.worker(&coordinator.address, "crash", &worker_flags);
    let mut slots: Vec<Process> = (0..3).map(|_| spawn()).collect();
    let mut restarts = 0;
    while coordinator.process.try_status().is_none() {
        for slot in &mut slots {
            if slot.try_status().is_some() {
                *slot = spawn();
                restarts += 1;
            }
        }
        std::thread::sleep(POLL);
    }
    coordinator.process.wait_success();
    eprintln!("crash scenario: {restarts} worker restarts");
    assert_same(&job_lines(&lab.out), &reference("nocrash"));
    for slot in &mut slots {
        slot.wait();
    }
    Ok(())
}

/// `progress: maps M/8, reduces R/10` or `resumed job: maps M/8, reduces R/10 done, …` →
/// (M, R).
fn parse_progress(line: &str) -> Option<(u32, u32)> {
    let maps = line
        .split("maps ")
        .nth(1)?
        .split('/')
        .next()?
        .parse()
        .ok()?;
    let reduces = line
        .split("reduces ")
        .nth(1)?
        .split('/')
        .next()?
        .parse()
        .ok()?;
    Some((maps, reduces))
}

// Proves a coordinator SIGKILLed mid-job and restarted with the same command resumes from its
// durable state — every completion it had reported is still done — and finishes with the
// sequential output while the same workers keep running.
#[test]
fn coordinator_killed_mid_job_resumes() -> Result<()> {
    let lab = Lab::new(100, PROCESS_BOUND)?;
    let mut first = lab.coordinator(&[]);
    let address = first.address.clone();
    let mut workers: Vec<Process> = (0..2)
        .map(|_| lab.worker(&address, "slow_wc", &[]))
        .collect();
    // slow_wc maps take 0.5 s each: 8 maps on 2 workers leave time to kill after two.
    let line = first.wait_line("map progress", |l| {
        l.starts_with("progress:") && parse_progress(l).is_some_and(|(maps, _)| maps >= 2)
    });
    first.process.kill();
    let (maps_reported, _) = parse_progress(&line).unwrap();

    let mut second = lab.coordinator_with(&lab.coordinator_args(&address, &[]));
    let resumed = second
        .seen
        .iter()
        .find(|l| l.starts_with("resumed job:"))
        .cloned()
        .context("the restarted coordinator did not resume the job")?;
    let (maps_done, reduces_done) = parse_progress(&resumed).unwrap();
    assert!(
        maps_done >= maps_reported,
        "{maps_reported} maps were reported done before the kill, {resumed:?} after"
    );
    assert!(
        reduces_done < 10,
        "the kill came after the job: {resumed:?}"
    );
    second.process.wait_success();
    assert_same(&job_lines(&lab.out), &reference("wc"));
    for worker in &mut workers {
        worker.wait_success();
    }
    Ok(())
}

// Proves `raftkv mr run` (coordinator and workers in one process) equals the sequential
// output and prints a summary.
#[test]
fn mr_run_in_one_process_matches_sequential() -> Result<()> {
    let lab = Lab::new(100, PROCESS_BOUND)?;
    let mut args: Vec<String> = ["mr", "run", "--app", "indexer", "--reduce-tasks", "10"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(["--workers".into(), "3".into(), "--output-dir".into()]);
    args.push(lab.out.display().to_string());
    args.extend(corpus().iter().map(|p| p.display().to_string()));
    let mut run = lab.spawn("run", &args.iter().map(String::as_str).collect::<Vec<_>>());
    run.wait_success();
    let log = run.log_text();
    assert!(
        log.contains("job complete: 8 map tasks, 10 reduce tasks"),
        "{log}"
    );
    assert_same(&job_lines(&lab.out), &reference("indexer"));
    Ok(())
}

// Proves bad input is a clear error, never a hang or a panic: a missing input file, an
// output directory that cannot be created, a state directory that is a file, a worker of
// another application, an unknown application, a restart with another job on the same state,
// and a worker whose coordinator is not there.
#[test]
fn bad_input_is_a_clear_error() -> Result<()> {
    let lab = Lab::new(100, PROCESS_BOUND)?;
    let input = lab.dir.path().join("input.txt");
    std::fs::write(&input, "one two two\n")?;
    let input = input.display().to_string();
    let missing = lab.dir.path().join("missing.txt").display().to_string();
    let a_file = lab.dir.path().join("a-file");
    std::fs::write(&a_file, "x")?;
    let a_file = a_file.display().to_string();
    let out = lab.out.display().to_string();
    let state = lab.state.display().to_string();
    let no_panic = |log: &str| assert!(!log.contains("panicked"), "{log}");
    let coordinator = |state: &str, out: &str, extra: &[&str], inputs: &[&str]| {
        let mut args = vec![
            "mr",
            "coordinator",
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            state,
            "--output-dir",
            out,
            "--cluster-id",
            &lab.cluster_id,
        ];
        args.extend_from_slice(extra);
        args.extend_from_slice(inputs);
        lab.spawn("coordinator", &args)
    };

    let log = coordinator(&state, &out, &[], &[&input, &missing]).wait_failure();
    assert!(log.contains(&missing) && log.contains("input"), "{log}");
    assert!(!log.contains("listening on"), "{log}");
    no_panic(&log);
    let log = coordinator(&state, &a_file, &[], &[&input]).wait_failure();
    assert!(log.contains("cannot create output directory"), "{log}");
    let log = coordinator(&a_file, &out, &[], &[&input]).wait_failure();
    assert!(log.contains("cannot open state directory"), "{log}");
    no_panic(&log);
    let run = |out: &str, input: &str| {
        lab.spawn(
            "run",
            &["mr", "run", "--app", "wc", "--output-dir", out, input],
        )
    };
    let log = run(&out, &missing).wait_failure();
    assert!(log.contains(&missing), "{log}");
    let log = run(&format!("{a_file}/out"), &input).wait_failure();
    assert!(log.contains("cannot create directory"), "{log}");
    let log = lab
        .spawn(
            "run",
            &["mr", "run", "--app", "crash", "--output-dir", &out, &input],
        )
        .wait_failure();
    assert!(log.contains("invalid value 'crash'"), "{log}");
    let log = lab.worker("127.0.0.1:1", "nonsense", &[]).wait_failure();
    assert!(
        log.contains("unknown MapReduce application \"nonsense\""),
        "{log}"
    );

    // A worker of another application is refused; the job's own workers finish it.
    let mut job = lab.coordinator_with(&[
        "mr".into(),
        "coordinator".into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--state-dir".into(),
        state.clone(),
        "--output-dir".into(),
        out.clone(),
        "--app".into(),
        "wc".into(),
        "--cluster-id".into(),
        lab.cluster_id.clone(),
        input.clone(),
    ]);
    let log = lab.worker(&job.address, "indexer", &[]).wait_failure();
    assert!(
        log.contains("refused") && log.contains("\"wc\"") && log.contains("\"indexer\""),
        "{log}"
    );
    lab.worker(&job.address, "wc", &[]).wait_success();
    job.process.wait_success();
    assert_eq!(job_lines(&lab.out), vec!["one 1", "two 2"]);

    // The same command again finds the job complete; another job on that state is refused.
    let mut again = coordinator(&state, &out, &["--app", "wc"], &[&input]);
    again.wait_success();
    assert!(again.log_text().contains("job complete"));
    let log = coordinator(
        &state,
        &out,
        &["--app", "wc", "--reduce-tasks", "5"],
        &[&input],
    )
    .wait_failure();
    assert!(
        log.contains("holds a different job")
            && log.contains("reduce tasks 10 (stored) vs 5 (given)"),
        "{log}"
    );

    // Nobody listens on a port whose listener was closed (and if a port were reused, this
    // lab's cluster id keeps the worker out of anyone else's job).
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let log = lab
        .worker(&closed.to_string(), "wc", &["--coordinator-gone-ms", "300"])
        .wait_failure();
    assert!(log.contains("no reply from the coordinator"), "{log}");
    no_panic(&log);
    Ok(())
}
