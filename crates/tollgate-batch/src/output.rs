//! The results and failures files: what a previous run finished (so a rerun skips it),
//! and the one writer that appends each finished line whole.
//!
//! A line is done once its output line has been written (and flushed to the operating
//! system, which keeps it across a `kill -9`). A line cut short by a crash has no
//! newline; it is removed before the rerun appends anything.
//!
//! What this module must never do: change a file it has not read whole and found to
//! hold only lines this runner writes.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, Write};
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
    /// Failures taken out of the failures file to be sent again (`--retry-failures`).
    pub(crate) requeued: u64,
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

/// What to do with a file's last line when it has no newline.
enum Tail {
    /// The file ends with a newline (or is empty or missing).
    Clean,
    /// A whole record without its newline: keep it and end it.
    Unterminated,
    /// A record cut short by a crash, from this offset on: cut it off.
    Torn(u64),
}

/// Reads one output file into `done`, touching nothing; says what its last line needs.
fn read_file(
    path: &Path,
    is_failures: bool,
    done: &mut Done,
    mut kept: Option<&mut Vec<u8>>,
) -> Result<Tail, BatchError> {
    let io = |source| BatchError::Output {
        path: path.to_path_buf(),
        source,
    };
    let corrupt = |line: u64| BatchError::Corrupt {
        path: path.to_path_buf(),
        line,
    };
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Tail::Clean),
        Err(e) => return Err(io(e)),
    };
    let mut reader = std::io::BufReader::new(file);
    let (mut line, mut offset, mut n) = (Vec::new(), 0u64, 0u64);
    loop {
        line.clear();
        let read = reader.read_until(b'\n', &mut line).map_err(io)?;
        if read == 0 {
            return Ok(Tail::Clean);
        }
        n += 1;
        let terminated = line.last() == Some(&b'\n');
        let Ok(value) = serde_json::from_slice::<Value>(&line) else {
            // The start of a record this runner writes, cut short by a crash. (A whole
            // JSON value is never a cut record: its outer bracket closes last.)
            if !terminated && matches!(line.first(), Some(b'[' | b'{')) {
                return Ok(Tail::Torn(offset));
            }
            return Err(corrupt(n));
        };
        match record_identity(&value, is_failures) {
            Some(_) if kept.is_some() && retryable(&value) => {
                done.requeued += 1;
                if !terminated {
                    return Ok(Tail::Clean);
                }
            }
            Some(found) => {
                if let Some(kept) = kept.as_deref_mut() {
                    kept.extend_from_slice(&line);
                    if !terminated {
                        kept.push(b'\n');
                    }
                }
                done.count += 1;
                match found {
                    Found::Failure(line) => {
                        done.failed_lines.insert(line);
                    }
                    Found::Result(identity) => *done.results.entry(identity).or_insert(0) += 1,
                }
                if !terminated {
                    return Ok(Tail::Unterminated);
                }
            }
            None => return Err(corrupt(n)),
        }
        offset += read as u64;
    }
}

/// Whether a failure record's reason may have passed, so `--retry-failures` sends its
/// line again: no answer (timeout, dropped or refused connection), 408, 409, 5xx, a 429
/// but "too large" (the request alone over a limit never fits), and the reasons that
/// belong to the run, not the line (401/403, out of credit), which earlier versions
/// wrote as line failures. Never a 400, a malformed line or a request too large.
fn retryable(value: &Value) -> bool {
    let error = &value["error"];
    let text = |key: &str| error[key].as_str().unwrap_or("").to_ascii_lowercase();
    let (code, message) = (text("code"), text("message"));
    match error["status"].as_u64() {
        None => matches!(code.as_str(), "timeout" | "connection"),
        Some(429) => !message.contains("too large"),
        Some(401 | 403 | 408 | 409 | 500..=599) => true,
        Some(_) => false,
    }
}

/// What an output line records.
enum Found {
    /// A failure of this input line.
    Failure(u64),
    /// A result with this identity.
    Result(u64),
}

/// What one output line records; `None` when it is not a line this runner writes:
/// only the shapes it writes count. A failure is `{"line": n, "error": {...}, ...}`; a
/// result is `[request, response]` or `[request, response, metadata]` with the request
/// an object, or the Batch API's output shape `{"custom_id", "response", "error", ...}`.
/// A Batch API *input* line (`custom_id`, `method`, `url`, `body`, no `response`) is not
/// a result, so an input file given as `-o` is refused rather than taken as finished.
fn record_identity(value: &Value, is_failures: bool) -> Option<Found> {
    if is_failures {
        let line = value.get("line").and_then(Value::as_u64)?;
        value.get("error").filter(|e| e.is_object())?;
        return Some(Found::Failure(line));
    }
    match value {
        Value::Array(items) if (2..=3).contains(&items.len()) && items[0].is_object() => {
            Some(request_identity(&items[0], items.get(2)))
        }
        Value::Object(o)
            if o.contains_key("response")
                && o.contains_key("error")
                && !o.contains_key("body")
                && !o.contains_key("method") =>
        {
            o.get("custom_id")
                .and_then(Value::as_str)
                .map(custom_id_identity)
        }
        _ => None,
    }
    .map(Found::Result)
}

/// The lock file beside a results file: `out.jsonl.lock`.
fn lock_path(results: &Path) -> PathBuf {
    let mut name = results.file_name().unwrap_or_default().to_os_string();
    name.push(".lock");
    results.with_file_name(name)
}

/// The right to write one results file and its failures file, held until dropped
/// (or until the process ends, however it ends: the operating system releases the lock
/// of a dead process, so a run after a crash or `kill -9` takes it over).
#[derive(Debug)]
pub(crate) struct Lock {
    _file: std::fs::File,
}

/// Takes the exclusive lock of `results`: an advisory lock (`flock`) on
/// `<results>.lock`, which names the process holding it. The file is left in place
/// after the run (removing it would let two later runs lock two different files).
pub(crate) fn lock(results: &Path) -> Result<Lock, BatchError> {
    let path = lock_path(results);
    let io = |source| BatchError::Output {
        path: path.clone(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io)?;
    match file.try_lock() {
        Ok(()) => {
            let since = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let me = format!(
                "pid {}, started at unix time {since}, lock file {}",
                std::process::id(),
                path.display()
            );
            file.set_len(0)
                .and_then(|()| file.write_all(me.as_bytes()))
                .and_then(|()| file.flush())
                .map_err(io)?;
            Ok(Lock { _file: file })
        }
        Err(std::fs::TryLockError::WouldBlock) => {
            let holder = std::fs::read_to_string(&path)
                .ok()
                .filter(|h| !h.trim().is_empty())
                .unwrap_or_else(|| format!("lock file {}", path.display()));
            Err(BatchError::Locked {
                path: results.to_path_buf(),
                holder: holder.trim().to_string(),
            })
        }
        Err(std::fs::TryLockError::Error(e)) => Err(io(e)),
    }
}

/// Ends an unterminated last line, or cuts a torn one off.
fn mend(path: &Path, tail: Tail) -> Result<(), BatchError> {
    let io = |source| BatchError::Output {
        path: path.to_path_buf(),
        source,
    };
    match tail {
        Tail::Clean => Ok(()),
        Tail::Unterminated => std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .and_then(|mut f| f.write_all(b"\n"))
            .map_err(io),
        Tail::Torn(keep) => {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(io)?;
            let len = file.metadata().map_err(io)?.len();
            tracing::warn!(path = %path.display(), bytes = len - keep, "removing a line cut short by an earlier crash");
            file.set_len(keep).map_err(io)
        }
    }
}

/// Reads what the results and failures files already hold. Both files are read whole
/// before either is changed: a file holding a line this runner does not write is an
/// error and is left as it is; only then is a line cut short by a crash removed.
///
/// With `retry` (`--retry-failures`), the failures whose reason may have passed are not
/// done: the failures file is rewritten without them (a temporary file beside it,
/// synced, then renamed over it, so a crash leaves either the old file or the new one),
/// and the run sends their lines again. A line is thus never in both files.
pub(crate) fn scan(results: &Path, failures: &Path, retry: bool) -> Result<Done, BatchError> {
    let mut done = Done::default();
    let mut kept = retry.then(Vec::new);
    let tails = [
        read_file(results, false, &mut done, None)?,
        read_file(failures, true, &mut done, kept.as_mut())?,
    ];
    let rewrite = done.requeued > 0;
    for (path, tail) in [results, failures].into_iter().zip(tails) {
        if rewrite && path == failures {
            continue;
        }
        mend(path, tail)?;
    }
    if rewrite && let Some(kept) = kept {
        replace(failures, &kept)?;
    }
    Ok(done)
}

/// Replaces `path`'s contents by `bytes` atomically: a temporary file in the same
/// directory, synced, renamed over it.
fn replace(path: &Path, bytes: &[u8]) -> Result<(), BatchError> {
    let io = |source| BatchError::Output {
        path: path.to_path_buf(),
        source,
    };
    let name = path
        .file_name()
        .map_or_else(|| "failures".into(), |n| n.to_string_lossy().into_owned());
    let temp = path.with_file_name(format!(".{name}.retry-{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::File::create(&temp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&temp, path)?;
        if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty())
            && let Ok(dir) = std::fs::File::open(dir)
        {
            let _ = dir.sync_all();
        }
        Ok(())
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&temp);
        io(e)
    })
}

/// Where a finished line goes.
#[derive(Debug)]
pub(crate) enum Record {
    Result(Value),
    Failure(Value),
}

/// Appends records to the two files, each as one whole line flushed at once. Both are
/// opened (created when missing) before the run sends anything.
pub(crate) struct Writer {
    results: Sink,
    failures: Sink,
}

struct Sink {
    path: PathBuf,
    file: std::io::BufWriter<std::fs::File>,
}

impl Sink {
    fn write(&mut self, value: &Value) -> Result<(), BatchError> {
        let io = |path: &Path, source| BatchError::Output {
            path: path.to_path_buf(),
            source,
        };
        let mut line = serde_json::to_vec(value).map_err(|e| io(&self.path, e.into()))?;
        line.push(b'\n');
        self.file.write_all(&line).map_err(|e| io(&self.path, e))?;
        self.file.flush().map_err(|e| io(&self.path, e))
    }
}

impl Writer {
    /// Opens (creating them when missing) both files for appending: a file that cannot
    /// be written is an error before anything is sent.
    pub(crate) fn open(results: PathBuf, failures: PathBuf) -> Result<Writer, BatchError> {
        let open = |path: PathBuf| {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|source| BatchError::Output {
                    path: path.clone(),
                    source,
                })?;
            Ok::<_, BatchError>(Sink {
                path,
                file: std::io::BufWriter::with_capacity(64 * 1024, file),
            })
        };
        Ok(Writer {
            results: open(results)?,
            failures: open(failures)?,
        })
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
                "[{req},{{}}]\n[{req},{{}}]\n{{\"custom_id\":\"x\",\"response\":{{}},\"error\":null}}\n[{{\"torn"
            ),
        )
        .expect("write");
        std::fs::write(&failures, "{\"line\":4,\"error\":{}}\n").expect("write");
        let mut done = scan(&results, &failures, false).expect("scan");
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
        assert!(text.ends_with("null}\n"), "the torn line is gone: {text:?}");
    }

    #[test]
    fn a_corrupt_line_in_the_middle_stops_the_run() {
        let dir = tempfile::tempdir().expect("tempdir");
        let results = dir.path().join("r.jsonl");
        std::fs::write(&results, "garbage\n[{},{}]\n").expect("write");
        let err = scan(&results, &dir.path().join("f.jsonl"), false).expect_err("corrupt");
        assert!(err.to_string().contains("line 1"), "{err}");
    }

    /// `-o` pointed at a file this runner did not write: the run refuses to start and
    /// changes nothing, not even the file's last line.
    #[test]
    fn a_foreign_file_is_refused_and_left_as_it_was() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (results, failures) = (dir.path().join("r.jsonl"), dir.path().join("f.jsonl"));
        for text in [
            "[{},{}]\nnotes: call Bob",
            "{\"not\": \"ours\"}",
            "just text",
        ] {
            std::fs::write(&results, text).expect("write");
            let err = scan(&results, &failures, false).expect_err("not a tollgate file");
            assert!(matches!(err, BatchError::Corrupt { .. }), "{err}");
            assert_eq!(std::fs::read_to_string(&results).expect("read"), text);
        }
        // A torn results line is not cut while the failures file is foreign.
        std::fs::write(&results, "[{},{}]\n[{\"to").expect("write");
        std::fs::write(&failures, "{\"line\":1}\nhello").expect("write");
        assert!(scan(&results, &failures, false).is_err());
        assert_eq!(
            std::fs::read_to_string(&results).expect("read"),
            "[{},{}]\n[{\"to"
        );
    }

    /// A Batch API input file given as `-o` holds `custom_id`s but no responses: it is
    /// refused, never taken as finished work (which would send nothing and append to
    /// it).
    #[test]
    fn a_batch_input_file_is_not_a_results_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (results, failures) = (dir.path().join("r.jsonl"), dir.path().join("f.jsonl"));
        let input = r#"{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{"model":"m"}}"#;
        std::fs::write(&results, format!("{input}\n")).expect("write");
        assert!(matches!(
            scan(&results, &failures, false),
            Err(BatchError::Corrupt { line: 1, .. })
        ));
        // Nor is a failures file whose lines have no error.
        std::fs::remove_file(&results).expect("remove");
        std::fs::write(&failures, "{\"line\":3}\n").expect("write");
        assert!(scan(&results, &failures, false).is_err());
    }

    /// One run per results file: a second is refused, naming the first; once the first
    /// lets go (or dies), the next takes the lock over.
    #[test]
    fn a_second_run_on_the_same_results_file_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let results = dir.path().join("r.jsonl");
        let first = lock(&results).expect("the first run locks");
        let err = lock(&results).expect_err("the second is refused");
        let text = err.to_string();
        assert!(
            text.contains(&format!("pid {}", std::process::id())),
            "{text}"
        );
        drop(first);
        lock(&results).expect("taken over once released");
    }

    /// A whole record whose newline was not written counts as done and gets its newline,
    /// so the next record starts on a line of its own.
    #[test]
    fn a_whole_last_line_without_its_newline_is_kept_and_ended() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (results, failures) = (dir.path().join("r.jsonl"), dir.path().join("f.jsonl"));
        std::fs::write(&results, "[{\"a\":1},{}]\n[{\"a\":2},{}]").expect("write");
        std::fs::write(&failures, "{\"line\":9,\"error\":{}}").expect("write");
        let mut done = scan(&results, &failures, false).expect("scan");
        assert_eq!(done.count, 3);
        assert!(done.take(
            1,
            Some(request_identity(&serde_json::json!({"a": 2}), None))
        ));
        assert!(done.take(9, None));
        assert!(
            std::fs::read_to_string(&results)
                .expect("read")
                .ends_with("{}]\n")
        );
        assert!(
            std::fs::read_to_string(&failures)
                .expect("read")
                .ends_with("}}\n")
        );
    }

    /// `--retry-failures` takes back the failures whose reason may have passed and
    /// rewrites the failures file without them; the others stay done.
    #[test]
    fn retry_takes_back_only_retryable_failures() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (results, failures) = (dir.path().join("r.jsonl"), dir.path().join("f.jsonl"));
        let lines = [
            r#"{"line":1,"error":{"message":"request failed","code":"timeout","status":null}}"#,
            r#"{"line":2,"error":{"message":"HTTP 400: bad","code":"invalid_request","status":400}}"#,
            r#"{"line":3,"error":{"message":"HTTP 503: busy","code":"server_error","status":503}}"#,
            r#"{"line":4,"error":{"message":"HTTP 429: Request too large for gpt-4o","code":"rate_limit_exceeded","status":429}}"#,
            r#"{"line":5,"error":{"message":"HTTP 429: Rate limit reached","code":"rate_limit_exceeded","status":429}}"#,
            r#"{"line":6,"error":{"message":"not JSON","code":"malformed_line","status":null}}"#,
            r#"{"line":7,"error":{"message":"HTTP 401: Incorrect API key","code":"invalid_api_key","status":401}}"#,
            r#"{"line":8,"error":{"message":"the request counts 9 tokens","code":"request_too_large","status":null}}"#,
        ];
        std::fs::write(&failures, lines.join("\n")).expect("write");
        let before = std::fs::read_to_string(&failures).expect("read");
        let mut done = scan(&results, &failures, false).expect("scan");
        assert_eq!((done.count, done.requeued), (8, 0));
        assert!(done.take(1, None));
        let mut done = scan(&results, &failures, true).expect("scan");
        assert_eq!((done.count, done.requeued), (4, 4));
        for (line, is_done) in [
            (1, false),
            (2, true),
            (3, false),
            (4, true),
            (5, false),
            (6, true),
            (7, false),
            (8, true),
        ] {
            assert_eq!(done.take(line, None), is_done, "line {line}");
        }
        let after = std::fs::read_to_string(&failures).expect("read");
        assert_ne!(after, before);
        assert_eq!(
            after,
            format!("{}\n{}\n{}\n{}\n", lines[1], lines[3], lines[5], lines[7])
        );
        assert_eq!(
            std::fs::read_dir(dir.path()).expect("dir").count(),
            1,
            "no temporary file left"
        );
    }
}
