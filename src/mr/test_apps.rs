//! The reference lab's test applications, for the Lab 1 scenarios. Not user-facing: they sleep,
//! leave marker files and may exit the process on purpose.
//!
//! | name | behaviour (as the lab's `mrapps/*.go`) |
//! |---|---|
//! | `mtiming` | map marks itself running, counts live running mappers, sleeps 1 s; emits `times-<worker>` (start time) and `parallel-<worker>` (the count) |
//! | `rtiming` | map emits keys `a`..`j`; reduce marks itself running, counts live running reducers, sleeps 1 s and outputs the count |
//! | `jobcount` | each map call leaves one marker and sleeps 2–5 s, emits `a`; reduce outputs the number of markers |
//! | `early_exit` | map emits `(filename, 1)`; reduce sleeps 3 s for keys containing `sherlock` or `tom`, outputs the number of values |
//! | `crash` | each map/reduce call exits the process with odds 1/3 and sleeps 0–10 s with odds 1/3; map emits `a` filename, `b` len(filename), `c` len(contents), `d` `xyzzy`; reduce joins the sorted values with spaces |
//! | `nocrash` | `crash` without crashes or sleeps: the reference output for the crash scenario |
//! | `slow_wc` | `wc` whose map sleeps 500 ms per call first (not from the lab: it keeps a job in its map phase long enough to kill the coordinator mid-job); output identical to `wc` |
//!
//! Marker files (`mr-worker-<phase>-<pid>-<slot>`, `mr-worker-jobcount-<pid>-<slot>-<n>`) live in
//! [`TestAppEnv::marker_dir`]. A marker counts as a live worker while process `pid` exists, so
//! markers left by a crashed worker process do not count.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::Rng;

use super::app::{App, AppError, Combiner, Emitter, Values};
use super::apps::WordCount;
use super::error::MrError;

/// Names accepted by [`test_app_by_name`].
pub const TEST_APP_NAMES: &[&str] = &[
    "mtiming",
    "rtiming",
    "jobcount",
    "early_exit",
    "crash",
    "nocrash",
    "slow_wc",
];

/// Environment variable naming the marker directory (default: the current directory).
pub const MARKER_DIR_ENV: &str = "RAFTKV_MR_TEST_DIR";
/// Environment variable scaling every sleep of the test applications, in percent (default 100).
pub const SLEEP_PERCENT_ENV: &str = "RAFTKV_MR_TEST_SLEEP_PERCENT";

/// The side channels of a test application: where markers go and who the worker is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestAppEnv {
    /// Directory of the marker files; must be shared by all workers of the job.
    pub marker_dir: PathBuf,
    /// Process id of the worker; its marker counts only while this process exists.
    pub pid: u32,
    /// Distinguishes workers that share a process (threads of the in-process executor); 0 for a
    /// worker process.
    pub slot: u32,
    /// Scales every sleep, in percent: 100 is the lab's timing.
    pub sleep_percent: u32,
}

impl TestAppEnv {
    /// This process, slot 0, markers in `marker_dir`, the lab's timing.
    pub fn new(marker_dir: impl Into<PathBuf>) -> Self {
        TestAppEnv {
            marker_dir: marker_dir.into(),
            pid: std::process::id(),
            slot: 0,
            sleep_percent: 100,
        }
    }

    /// This process, slot 0, with the marker directory and sleep scale from
    /// [`MARKER_DIR_ENV`] and [`SLEEP_PERCENT_ENV`].
    pub fn from_env() -> Result<Self, MrError> {
        let marker_dir =
            std::env::var_os(MARKER_DIR_ENV).map_or_else(|| PathBuf::from("."), PathBuf::from);
        let mut env = TestAppEnv::new(marker_dir);
        if let Some(value) = std::env::var_os(SLEEP_PERCENT_ENV) {
            env.sleep_percent = value.to_str().and_then(|v| v.parse().ok()).ok_or_else(|| {
                MrError::Config(format!(
                    "{SLEEP_PERCENT_ENV} must be a whole number, got {value:?}"
                ))
            })?;
        }
        Ok(env)
    }

    /// The worker's name in markers and keys: `<pid>-<slot>`.
    pub fn worker_tag(&self) -> String {
        format!("{}-{}", self.pid, self.slot)
    }

    fn sleep_ms(&self, ms: u64) {
        let scaled = ms.saturating_mul(u64::from(self.sleep_percent)) / 100;
        if scaled > 0 {
            std::thread::sleep(Duration::from_millis(scaled));
        }
    }
}

/// The test application called `name` (one of [`TEST_APP_NAMES`]), using `env`.
pub fn test_app_by_name(name: &str, env: TestAppEnv) -> Result<Arc<dyn App>, MrError> {
    let app: Arc<dyn App> = match name {
        "mtiming" => Arc::new(MapTiming { env }),
        "rtiming" => Arc::new(ReduceTiming { env }),
        "jobcount" => Arc::new(JobCount {
            env,
            calls: AtomicU64::new(0),
        }),
        "early_exit" => Arc::new(EarlyExit { env }),
        "crash" => Arc::new(Crash { env, crash: true }),
        "nocrash" => Arc::new(Crash { env, crash: false }),
        "slow_wc" => Arc::new(SlowWordCount {
            env,
            inner: WordCount,
        }),
        _ => {
            return Err(MrError::UnknownApp {
                name: name.to_string(),
                known: TEST_APP_NAMES.join(", "),
            });
        }
    };
    Ok(app)
}

fn io_error(what: &str, path: &Path, e: std::io::Error) -> AppError {
    AppError::new(format!("{what} {}: {e}", path.display()))
}

/// Whether process `pid` exists (the lab's `kill(pid, 0)`).
fn process_alive(pid: u32) -> bool {
    if cfg!(target_os = "linux") {
        Path::new("/proc").join(pid.to_string()).exists()
    } else {
        // Without /proc, assume alive: a crashed worker's marker may then be counted.
        true
    }
}

/// The lab's `nparallel`: leaves a marker for this worker in `phase`, counts the markers of
/// live workers in the same phase (this one included), sleeps 1 s and removes the marker.
pub(crate) fn count_parallel(env: &TestAppEnv, phase: &str) -> Result<u64, AppError> {
    let prefix = format!("mr-worker-{phase}-");
    let mine = env.marker_dir.join(format!("{prefix}{}", env.worker_tag()));
    std::fs::write(&mine, b"x").map_err(|e| io_error("write marker", &mine, e))?;
    let entries =
        std::fs::read_dir(&env.marker_dir).map_err(|e| io_error("list", &env.marker_dir, e))?;
    let mut live = 0;
    for entry in entries {
        let entry = entry.map_err(|e| io_error("list", &env.marker_dir, e))?;
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(&prefix)) else {
            continue;
        };
        let pid = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(process_alive) {
            live += 1;
        }
    }
    env.sleep_ms(1000);
    std::fs::remove_file(&mine).map_err(|e| io_error("remove marker", &mine, e))?;
    Ok(live)
}

/// Sorts the values as strings and joins them with spaces (the lab's deterministic reduce).
fn join_sorted(values: &mut Values<'_>, output: &mut Vec<u8>) {
    let mut all = Vec::new();
    while let Some(value) = values.next_value() {
        all.push(value.to_vec());
    }
    all.sort();
    output.extend_from_slice(&all.join(&b' '));
}

fn count_values(values: &mut Values<'_>) -> u64 {
    let mut n = 0;
    while values.next_value().is_some() {
        n += 1;
    }
    n
}

struct MapTiming {
    env: TestAppEnv,
}

impl App for MapTiming {
    fn name(&self) -> &str {
        "mtiming"
    }

    fn map(
        &self,
        _filename: &str,
        _contents: &[u8],
        emit: &mut Emitter<'_>,
    ) -> Result<(), AppError> {
        let started = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_err(|e| AppError::new(format!("clock before 1970: {e}")))?
            .as_secs_f64();
        let parallel = count_parallel(&self.env, "map")?;
        let tag = self.env.worker_tag();
        emit.emit(
            format!("times-{tag}").as_bytes(),
            format!("{started:.1}").as_bytes(),
        );
        emit.emit(
            format!("parallel-{tag}").as_bytes(),
            parallel.to_string().as_bytes(),
        );
        Ok(())
    }

    fn reduce(
        &self,
        _key: &[u8],
        values: &mut Values<'_>,
        output: &mut Vec<u8>,
    ) -> Result<(), AppError> {
        join_sorted(values, output);
        Ok(())
    }
}

struct ReduceTiming {
    env: TestAppEnv,
}

impl App for ReduceTiming {
    fn name(&self) -> &str {
        "rtiming"
    }

    fn map(
        &self,
        _filename: &str,
        _contents: &[u8],
        emit: &mut Emitter<'_>,
    ) -> Result<(), AppError> {
        for key in b'a'..=b'j' {
            emit.emit(&[key], b"1");
        }
        Ok(())
    }

    fn reduce(
        &self,
        _key: &[u8],
        _values: &mut Values<'_>,
        output: &mut Vec<u8>,
    ) -> Result<(), AppError> {
        let parallel = count_parallel(&self.env, "reduce")?;
        output.extend_from_slice(parallel.to_string().as_bytes());
        Ok(())
    }
}

struct JobCount {
    env: TestAppEnv,
    /// Map calls so far in this process (the lab's global `count`).
    calls: AtomicU64,
}

impl App for JobCount {
    fn name(&self) -> &str {
        "jobcount"
    }

    fn map(
        &self,
        _filename: &str,
        _contents: &[u8],
        emit: &mut Emitter<'_>,
    ) -> Result<(), AppError> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        let marker = self
            .env
            .marker_dir
            .join(format!("mr-worker-jobcount-{}-{n}", self.env.worker_tag()));
        std::fs::write(&marker, b"x").map_err(|e| io_error("write marker", &marker, e))?;
        self.env.sleep_ms(2000 + rand::rng().random_range(0..3000));
        emit.emit(b"a", b"x");
        Ok(())
    }

    fn reduce(
        &self,
        _key: &[u8],
        _values: &mut Values<'_>,
        output: &mut Vec<u8>,
    ) -> Result<(), AppError> {
        let entries = std::fs::read_dir(&self.env.marker_dir)
            .map_err(|e| io_error("list", &self.env.marker_dir, e))?;
        let mut invocations = 0u64;
        for entry in entries {
            let entry = entry.map_err(|e| io_error("list", &self.env.marker_dir, e))?;
            if entry
                .file_name()
                .to_string_lossy()
                .starts_with("mr-worker-jobcount")
            {
                invocations += 1;
            }
        }
        output.extend_from_slice(invocations.to_string().as_bytes());
        Ok(())
    }
}

struct EarlyExit {
    env: TestAppEnv,
}

impl App for EarlyExit {
    fn name(&self) -> &str {
        "early_exit"
    }

    fn map(
        &self,
        filename: &str,
        _contents: &[u8],
        emit: &mut Emitter<'_>,
    ) -> Result<(), AppError> {
        emit.emit(filename.as_bytes(), b"1");
        Ok(())
    }

    fn reduce(
        &self,
        key: &[u8],
        values: &mut Values<'_>,
        output: &mut Vec<u8>,
    ) -> Result<(), AppError> {
        let key = String::from_utf8_lossy(key);
        if key.contains("sherlock") || key.contains("tom") {
            self.env.sleep_ms(3000);
        }
        output.extend_from_slice(count_values(values).to_string().as_bytes());
        Ok(())
    }
}

struct Crash {
    env: TestAppEnv,
    crash: bool,
}

impl Crash {
    /// With odds 1/3 exits the process, with odds 1/3 sleeps 0–10 s (the lab's `maybeCrash`).
    fn maybe_crash(&self) {
        if !self.crash {
            return;
        }
        let mut rng = rand::rng();
        let draw = rng.random_range(0..1000);
        if draw < 330 {
            tracing::info!("crash test application: exiting on purpose");
            std::process::exit(1);
        } else if draw < 660 {
            self.env.sleep_ms(rng.random_range(0..10_000));
        }
    }
}

impl App for Crash {
    fn name(&self) -> &str {
        if self.crash { "crash" } else { "nocrash" }
    }

    fn map(&self, filename: &str, contents: &[u8], emit: &mut Emitter<'_>) -> Result<(), AppError> {
        self.maybe_crash();
        emit.emit(b"a", filename.as_bytes());
        emit.emit(b"b", filename.len().to_string().as_bytes());
        emit.emit(b"c", contents.len().to_string().as_bytes());
        emit.emit(b"d", b"xyzzy");
        Ok(())
    }

    fn reduce(
        &self,
        _key: &[u8],
        values: &mut Values<'_>,
        output: &mut Vec<u8>,
    ) -> Result<(), AppError> {
        self.maybe_crash();
        join_sorted(values, output);
        Ok(())
    }
}

struct SlowWordCount {
    env: TestAppEnv,
    inner: WordCount,
}

impl App for SlowWordCount {
    fn name(&self) -> &str {
        "slow_wc"
    }

    fn map(&self, filename: &str, contents: &[u8], emit: &mut Emitter<'_>) -> Result<(), AppError> {
        self.env.sleep_ms(500);
        self.inner.map(filename, contents, emit)
    }

    fn reduce(
        &self,
        key: &[u8],
        values: &mut Values<'_>,
        output: &mut Vec<u8>,
    ) -> Result<(), AppError> {
        self.inner.reduce(key, values, output)
    }

    fn combiner(&self) -> Option<&dyn Combiner> {
        self.inner.combiner()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(dir: &Path, slot: u32) -> TestAppEnv {
        TestAppEnv {
            slot,
            sleep_percent: 0,
            ..TestAppEnv::new(dir)
        }
    }

    // Proves count_parallel counts live workers' markers (its own included), ignores markers
    // of dead processes and of other phases, and removes its own marker.
    #[test]
    fn count_parallel_counts_live_markers_only() {
        let dir = tempfile::tempdir().unwrap();
        let me = env(dir.path(), 0);
        std::fs::write(dir.path().join(format!("mr-worker-map-{}-7", me.pid)), "x").unwrap();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        std::fs::write(dir.path().join(format!("mr-worker-map-{dead}-0")), "x").unwrap();
        std::fs::write(
            dir.path().join(format!("mr-worker-reduce-{}-3", me.pid)),
            "x",
        )
        .unwrap();
        assert_eq!(count_parallel(&me, "map").unwrap(), 2);
        assert!(
            !dir.path()
                .join(format!("mr-worker-map-{}", me.worker_tag()))
                .exists()
        );
        assert_eq!(count_parallel(&me, "reduce").unwrap(), 2);
    }

    // Proves every listed test app resolves with its own name and is absent from the user list.
    #[test]
    fn test_apps_resolve_and_stay_out_of_the_user_registry() {
        let dir = tempfile::tempdir().unwrap();
        for name in TEST_APP_NAMES {
            assert_eq!(
                test_app_by_name(name, env(dir.path(), 0)).unwrap().name(),
                *name
            );
            assert!(crate::mr::app_by_name(name).is_err());
        }
        assert!(test_app_by_name("wc", env(dir.path(), 0)).is_err());
    }

    // Proves jobcount leaves one marker per map call and its reduce counts them.
    #[test]
    fn jobcount_counts_map_calls() {
        let dir = tempfile::tempdir().unwrap();
        let app = test_app_by_name("jobcount", env(dir.path(), 1)).unwrap();
        let mut sink = |_: &[u8], _: &[u8]| {};
        for _ in 0..3 {
            app.map("f", b"", &mut Emitter::new(&mut sink)).unwrap();
        }
        let values: [&[u8]; 0] = [];
        let mut source = values.iter();
        let mut output = Vec::new();
        app.reduce(b"a", &mut Values::new(&mut source), &mut output)
            .unwrap();
        assert_eq!(output, b"3");
    }
}
