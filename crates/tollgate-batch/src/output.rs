//! The results and failures files: what a previous run finished (so a rerun skips it),
//! and the one writer that appends each finished line whole.
//!
//! A line is done once its output line has been written (and flushed to the operating
//! system, which keeps it across a `kill -9`). A line cut short by a crash has no
//! newline; it is removed before the rerun appends anything.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::BatchError;
use crate::input::{custom_id_identity, request_identity};

/// What earlier runs finished.
#[derive(Debug, Default)]
pub(crate) struct Done {
    /// Lines in the failures file.
    failed_lines: HashSet<u64>,
    /// Identities of the results, with how many results each has.
    results: HashMap<u64, u32>,
    /// How many output lines were read.
    pub(crate) count: u64,
}

impl Done {
    /// Whether input line `line` with `identity` is already finished; each result line
    /// answers for one input line only, so identical requests each run once.
    pub(crate) fn take(&mut self, line: u64, identity: Option<u64>) -> bool {
        if self.failed_lines.contains(&line) {
            return true;
        }
        let Some(identity) = identity else {
            return false;
        };
        match self.results.get_mut(&identity) {
            Some(n) if *n > 0 => {
                *n -= 1;
                true
            }
            _ => false,
        }
    }

    /// Whether nothing was finished before.
    pub(crate) fn is_empty(&self) -> bool {
        self.count == 0
    }
}

/// Cuts an unfinished last line (no newline) off `path`, if the file exists.
fn truncate_partial(path: &Path) -> Result<(), BatchError> {
    let io = |source| BatchError::Output {
        path: path.to_path_buf(),
        source,
    };
    let mut file = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io(e)),
    };
    let len = file.metadata().map_err(io)?.len();
    let mut keep = len;
    let mut buf = [0u8; 4096];
    while keep > 0 {
        let start = keep.saturating_sub(buf.len() as u64);
        let chunk = &mut buf[..usize::try_from(keep - start).unwrap_or(0)];
        file.seek(SeekFrom::Start(start)).map_err(io)?;
        std::io::Read::read_exact(&mut file, chunk).map_err(io)?;
        if let Some(pos) = chunk.iter().rposition(|&b| b == b'\n') {
            keep = start + pos as u64 + 1;
            break;
        }
        keep = start;
    }
    if keep < len {
        tracing::warn!(path = %path.display(), bytes = len - keep, "removing a line cut short by an earlier crash");
        file.set_len(keep).map_err(io)?;
    }
    Ok(())
}

/// Reads what the results and failures files already hold.
pub(crate) fn scan(results: &Path, failures: &Path) -> Result<Done, BatchError> {
    let mut done = Done::default();
    for (path, is_failures) in [(results, false), (failures, true)] {
        truncate_partial(path)?;
        let file = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => {
                return Err(BatchError::Output {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        for (n, line) in std::io::BufReader::new(file).split(b'\n').enumerate() {
            let line = line.map_err(|source| BatchError::Output {
                path: path.to_path_buf(),
                source,
            })?;
            let Ok(value) = serde_json::from_slice::<Value>(&line) else {
                return Err(BatchError::Corrupt {
                    path: path.to_path_buf(),
                    line: n as u64 + 1,
                });
            };
            done.count += 1;
            if is_failures {
                match value.get("line").and_then(Value::as_u64) {
                    Some(line) => {
                        done.failed_lines.insert(line);
                    }
                    None => {
                        return Err(BatchError::Corrupt {
                            path: path.to_path_buf(),
                            line: n as u64 + 1,
                        });
                    }
                }
                continue;
            }
            let identity = match &value {
                Value::Array(items) => items.first().map(|r| request_identity(r, items.get(2))),
                Value::Object(o) => o
                    .get("custom_id")
                    .and_then(Value::as_str)
                    .map(custom_id_identity),
                _ => None,
            };
            let Some(identity) = identity else {
                return Err(BatchError::Corrupt {
                    path: path.to_path_buf(),
                    line: n as u64 + 1,
                });
            };
            *done.results.entry(identity).or_insert(0) += 1;
        }
    }
    Ok(done)
}

/// Where a finished line goes.
#[derive(Debug)]
pub(crate) enum Record {
    Result(Value),
    Failure(Value),
}

/// Appends records to the two files, each as one whole line flushed at once. Files are
/// created on first use.
pub(crate) struct Writer {
    results: Sink,
    failures: Sink,
}

struct Sink {
    path: PathBuf,
    file: Option<std::io::BufWriter<std::fs::File>>,
}

impl Sink {
    fn write(&mut self, value: &Value) -> Result<(), BatchError> {
        let io = |path: &Path, source| BatchError::Output {
            path: path.to_path_buf(),
            source,
        };
        if self.file.is_none() {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)
                .map_err(|e| io(&self.path, e))?;
            self.file = Some(std::io::BufWriter::with_capacity(64 * 1024, file));
        }
        let Some(file) = self.file.as_mut() else {
            return Ok(());
        };
        let mut line = serde_json::to_vec(value).map_err(|e| io(&self.path, e.into()))?;
        line.push(b'\n');
        file.write_all(&line).map_err(|e| io(&self.path, e))?;
        file.flush().map_err(|e| io(&self.path, e))
    }
}

impl Writer {
    pub(crate) fn new(results: PathBuf, failures: PathBuf) -> Writer {
        Writer {
            results: Sink {
                path: results,
                file: None,
            },
            failures: Sink {
                path: failures,
                file: None,
            },
        }
    }

    pub(crate) fn write(&mut self, record: &Record) -> Result<(), BatchError> {
        match record {
            Record::Result(v) => self.results.write(v),
            Record::Failure(v) => self.failures.write(v),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rerun_skips_each_finished_line_once_and_drops_a_torn_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let results = dir.path().join("r.jsonl");
        let failures = dir.path().join("f.jsonl");
        let req = serde_json::json!({"a": 1});
        std::fs::write(
            &results,
            format!(
                "[{req},{{}}]\n[{req},{{}}]\n{{\"custom_id\":\"x\",\"response\":{{}}}}\n[{{\"torn"
            ),
        )
        .expect("write");
        std::fs::write(&failures, "{\"line\":4,\"error\":{}}\n").expect("write");
        let mut done = scan(&results, &failures).expect("scan");
        assert_eq!(done.count, 4);
        let id = request_identity(&req, None);
        assert!(done.take(1, Some(id)));
        assert!(done.take(2, Some(id)));
        assert!(
            !done.take(3, Some(id)),
            "only two identical requests were done"
        );
        assert!(done.take(4, None));
        assert!(done.take(5, Some(custom_id_identity("x"))));
        assert!(!done.take(6, Some(custom_id_identity("y"))));
        let text = std::fs::read_to_string(&results).expect("read");
        assert!(text.ends_with("}}\n"), "the torn line is gone: {text:?}");
    }

    #[test]
    fn a_corrupt_line_in_the_middle_stops_the_run() {
        let dir = tempfile::tempdir().expect("tempdir");
        let results = dir.path().join("r.jsonl");
        std::fs::write(&results, "garbage\n[{},{}]\n").expect("write");
        let err = scan(&results, &dir.path().join("f.jsonl")).expect_err("corrupt");
        assert!(err.to_string().contains("line 1"), "{err}");
    }
}
