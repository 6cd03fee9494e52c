//! The durable form of a coordinator's job: MapReduce records in a store.
//!
//! Records (keys in the store's MapReduce key space; values are `[RECORD_FORMAT] ++ postcard`):
//!
//! | key | value |
//! |---|---|
//! | `job/spec` | [`StoredJob`]: job id, [`JobSpec`] (inputs, output directory, R, split size, app flag) and the planned splits |
//! | `job/app` | the application bound to the job by its first worker (when the spec names none) |
//! | `task/m/<m: u32 BE>` | the [`TaskRecord`] of map task `m` |
//! | `task/r/<r: u32 BE>` | the [`TaskRecord`] of reduce task `r` |
//!
//! A job is created by one commit holding the spec and every task record, so a crash during
//! creation leaves either nothing or a whole job. Afterwards each commit writes the records the
//! table changed (see the durability contract in `table.rs`). Everything read back is checked:
//! an unknown format byte, an undecodable value, a missing or extra task record is
//! [`MrError::StateCorrupt`], never a panic.

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::error::MrError;
use super::split::MapSplit;
use super::table::{TaskId, TaskRecord, TaskTable};
use crate::storage::{MrStorage, WriteBatch};

/// Version byte in front of every record value.
const RECORD_FORMAT: u8 = 1;
const SPEC_KEY: &[u8] = b"job/spec";
const APP_KEY: &[u8] = b"job/app";
const MAP_PREFIX: &[u8] = b"task/m/";
const REDUCE_PREFIX: &[u8] = b"task/r/";

/// What identifies a job: a coordinator restarted with the same command has the same spec.
/// Timing settings (the task timeout, the failure limit) are not part of it and may change
/// between runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    /// The input files, as given.
    pub inputs: Vec<String>,
    /// The output directory, absolute.
    pub output_dir: String,
    /// Number of reduce tasks, R.
    pub reduce_tasks: u32,
    /// The split size map tasks were planned with.
    pub split_bytes: u64,
    /// The application named on the coordinator's command line, if any.
    pub app: Option<String>,
}

impl JobSpec {
    /// A description of every field of `self` (the stored spec) that differs from `given`, or
    /// `None` if they are equal.
    pub(crate) fn differences(&self, given: &JobSpec) -> Option<String> {
        let mut out = Vec::new();
        if self.inputs != given.inputs {
            out.push(format!(
                "inputs {:?} (stored) vs {:?} (given)",
                self.inputs, given.inputs
            ));
        }
        if self.output_dir != given.output_dir {
            out.push(format!(
                "output directory {} (stored) vs {} (given)",
                self.output_dir, given.output_dir
            ));
        }
        if self.reduce_tasks != given.reduce_tasks {
            out.push(format!(
                "reduce tasks {} (stored) vs {} (given)",
                self.reduce_tasks, given.reduce_tasks
            ));
        }
        if self.split_bytes != given.split_bytes {
            out.push(format!(
                "split bytes {} (stored) vs {} (given)",
                self.split_bytes, given.split_bytes
            ));
        }
        if self.app != given.app {
            out.push(format!(
                "application {:?} (stored) vs {:?} (given)",
                self.app, given.app
            ));
        }
        (!out.is_empty()).then(|| out.join("; "))
    }
}

/// The `job/spec` record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StoredJob {
    /// Random id of the job, chosen at creation.
    pub job_id: u64,
    /// The command-line identity of the job.
    pub spec: JobSpec,
    /// The map splits planned at creation.
    pub splits: Vec<MapSplit>,
}

/// A job read back from a store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct LoadedJob {
    pub job: StoredJob,
    /// The application bound by the first worker, if any.
    pub bound_app: Option<String>,
    pub maps: Vec<TaskRecord>,
    pub reduces: Vec<TaskRecord>,
}

fn encode<T: Serialize>(value: &T) -> Bytes {
    let mut out = vec![RECORD_FORMAT];
    let body = postcard::to_allocvec(value)
        .expect("postcard encodes every job state type (no maps, no unsized sequences)");
    out.extend_from_slice(&body);
    Bytes::from(out)
}

fn decode<T: DeserializeOwned>(record: &str, bytes: &[u8]) -> Result<T, MrError> {
    let corrupt = |reason: String| MrError::StateCorrupt {
        record: record.to_string(),
        reason,
    };
    match bytes.split_first() {
        None => Err(corrupt("empty value".into())),
        Some((&RECORD_FORMAT, body)) => {
            postcard::from_bytes(body).map_err(|e| corrupt(format!("cannot decode: {e}")))
        }
        Some((&format, _)) => Err(corrupt(format!(
            "record format {format} is not the supported format {RECORD_FORMAT}"
        ))),
    }
}

fn task_key(task: TaskId) -> Vec<u8> {
    let (prefix, n) = match task {
        TaskId::Map(n) => (MAP_PREFIX, n),
        TaskId::Reduce(n) => (REDUCE_PREFIX, n),
    };
    let mut key = prefix.to_vec();
    key.extend_from_slice(&n.to_be_bytes());
    key
}

/// Adds the record of `task` as it stands in `table` to `batch`.
pub(crate) fn put_task(batch: &mut WriteBatch, table: &TaskTable, task: TaskId) {
    let record = table
        .record(task)
        .unwrap_or_else(|| panic!("persisting {task}, which the table does not have"));
    batch.mr_put(task_key(task), encode(record));
}

/// Adds the binding of the job to `app` to `batch`.
pub(crate) fn put_app(batch: &mut WriteBatch, app: &str) {
    batch.mr_put(Bytes::from_static(APP_KEY), encode(&app.to_string()));
}

/// Creates the job in `store` in one commit: spec, splits and every task record.
pub(crate) fn create<S: MrStorage>(
    store: &S,
    job: &StoredJob,
    table: &TaskTable,
) -> Result<(), MrError> {
    assert_eq!(
        job.splits.as_slice(),
        table.splits(),
        "spec and table differ"
    );
    let mut batch =
        WriteBatch::with_capacity(1 + table.map_tasks() as usize + table.reduce_tasks() as usize);
    batch.mr_put(Bytes::from_static(SPEC_KEY), encode(job));
    for m in 0..table.map_tasks() {
        put_task(&mut batch, table, TaskId::Map(m));
    }
    for r in 0..table.reduce_tasks() {
        put_task(&mut batch, table, TaskId::Reduce(r));
    }
    store.commit(batch)?;
    Ok(())
}

/// Reads the job of `store`, or `None` if it holds no MapReduce records at all.
pub(crate) fn load<S: MrStorage>(store: &S) -> Result<Option<LoadedJob>, MrError> {
    let Some(spec) = store.mr_get(SPEC_KEY)? else {
        let count = store.mr_record_count()?;
        if count > 0 {
            return Err(MrError::StateCorrupt {
                record: "job/spec".into(),
                reason: format!("missing, but the store holds {count} other MapReduce records"),
            });
        }
        return Ok(None);
    };
    let job: StoredJob = decode("job/spec", &spec)?;
    let bound_app = match store.mr_get(APP_KEY)? {
        Some(bytes) => Some(decode::<String>("job/app", &bytes)?),
        None => None,
    };
    let maps = load_tasks(store, MAP_PREFIX, job.splits.len(), TaskId::Map)?;
    let reduces = load_tasks(
        store,
        REDUCE_PREFIX,
        job.spec.reduce_tasks as usize,
        TaskId::Reduce,
    )?;
    Ok(Some(LoadedJob {
        job,
        bound_app,
        maps,
        reduces,
    }))
}

/// Reads exactly `count` task records under `prefix`, numbered `0..count`.
fn load_tasks<S: MrStorage>(
    store: &S,
    prefix: &[u8],
    count: usize,
    id: fn(u32) -> TaskId,
) -> Result<Vec<TaskRecord>, MrError> {
    let rows = store.mr_scan_prefix(prefix, count.saturating_add(1))?;
    if rows.len() != count {
        return Err(MrError::StateCorrupt {
            record: String::from_utf8_lossy(prefix).into_owned(),
            reason: format!("expected {count} task records, found {}", rows.len()),
        });
    }
    let mut records = Vec::with_capacity(count);
    for (i, (key, value)) in rows.iter().enumerate() {
        let task = id(i as u32);
        if key.as_ref() != task_key(task).as_slice() {
            return Err(MrError::StateCorrupt {
                record: task.to_string(),
                reason: format!(
                    "found key {:?} in its place",
                    key.escape_ascii().to_string()
                ),
            });
        }
        records.push(decode(&task.to_string(), value)?);
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mr::table::{TableConfig, WorkerId};
    use crate::storage::{MemDisk, MemStore, Storage};

    fn job() -> (StoredJob, TaskTable) {
        let splits: Vec<MapSplit> = (0..3)
            .map(|i| MapSplit {
                path: format!("in-{i}"),
                start: 0,
                end: 10,
            })
            .collect();
        let config = TableConfig {
            reduce_tasks: 2,
            ..TableConfig::default()
        };
        let table = TaskTable::new(config, splits.clone()).unwrap();
        let job = StoredJob {
            job_id: 7,
            spec: JobSpec {
                inputs: vec!["in-0".into(), "in-1".into(), "in-2".into()],
                output_dir: "/out".into(),
                reduce_tasks: 2,
                split_bytes: 100,
                app: None,
            },
            splits,
        };
        (job, table)
    }

    // Proves a created job reads back whole, and task updates and the app binding persist.
    #[test]
    fn create_update_and_load_round_trip() {
        let store = MemStore::open(&MemDisk::new()).unwrap();
        assert_eq!(load(&store).unwrap(), None);
        let (stored, mut table) = job();
        create(&store, &stored, &table).unwrap();
        table.assign(WorkerId(1), 5);
        let mut batch = WriteBatch::new();
        put_task(&mut batch, &table, TaskId::Map(0));
        put_app(&mut batch, "wc");
        store.commit(batch).unwrap();
        let loaded = load(&store).unwrap().unwrap();
        assert_eq!(loaded.job, stored);
        assert_eq!(loaded.bound_app.as_deref(), Some("wc"));
        assert_eq!(loaded.maps.len(), 3);
        assert_eq!(loaded.reduces.len(), 2);
        assert_eq!(&loaded.maps[0], table.record(TaskId::Map(0)).unwrap());
    }

    // Proves damaged or incomplete state is a StateCorrupt error naming the record.
    #[test]
    fn damaged_state_is_a_clear_error() {
        let (stored, table) = job();
        let fresh = || {
            let store = MemStore::open(&MemDisk::new()).unwrap();
            create(&store, &stored, &table).unwrap();
            store
        };
        let expect_corrupt = |store: &MemStore, what: &str| match load(store) {
            Err(MrError::StateCorrupt { record, .. }) => assert!(
                record.contains(what),
                "record {record:?} should name {what:?}"
            ),
            other => panic!("expected StateCorrupt about {what}, got {other:?}"),
        };
        let store = fresh();
        store.mr_delete(&task_key(TaskId::Reduce(1))).unwrap();
        expect_corrupt(&store, "task/r/");
        let store = fresh();
        store
            .mr_put(&task_key(TaskId::Map(1)), b"\x01\xff\xff")
            .unwrap();
        expect_corrupt(&store, "map task 1");
        let store = fresh();
        store.mr_put(SPEC_KEY, b"\x09abc").unwrap();
        expect_corrupt(&store, "job/spec");
        let store = fresh();
        store.mr_put(SPEC_KEY, b"").unwrap();
        expect_corrupt(&store, "job/spec");
        let store = fresh();
        store.mr_delete(SPEC_KEY).unwrap();
        expect_corrupt(&store, "job/spec");
        let store = fresh();
        store
            .mr_put(&task_key(TaskId::Map(7)), &encode(&0u8))
            .unwrap();
        expect_corrupt(&store, "task/m/");
    }

    // Proves differences name every changed field and equal specs have none.
    #[test]
    fn spec_differences_name_the_fields() {
        let (stored, _) = job();
        assert_eq!(stored.spec.differences(&stored.spec), None);
        let mut given = stored.spec.clone();
        given.reduce_tasks = 5;
        given.app = Some("wc".into());
        let text = stored.spec.differences(&given).unwrap();
        assert!(
            text.contains("reduce tasks 2 (stored) vs 5 (given)"),
            "{text}"
        );
        assert!(text.contains("application"), "{text}");
        assert!(!text.contains("inputs"), "{text}");
    }
}
