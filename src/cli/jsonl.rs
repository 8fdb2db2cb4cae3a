//! JSON Lines for `farsight batch`: reading input documents, and an output file that resumes.
//!
//! Every output line is written with one `write_all` of the complete line (newline included),
//! so after a crash a line is whole or torn only at the end of the file; [`ResultsFile::open`]
//! cuts a torn last line and collects the keys of the documents already written, which the
//! run then skips.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use super::common::CliError;

/// A document's settings that override the command line's.
#[derive(Deserialize, Debug, Default, Clone)]
pub struct DocSettings {
    pub max_new_tokens: Option<usize>,
    pub temperature: Option<f32>,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    pub seed: Option<u64>,
    pub stop: Option<StopField>,
}

/// `stop` as one string or a list.
#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
pub enum StopField {
    One(String),
    Many(Vec<String>),
}

impl StopField {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            StopField::One(s) => vec![s],
            StopField::Many(v) => v,
        }
    }
}

/// One input line: `{"id": "..." or 123, "text": "...", ...settings}`; other fields are ignored.
#[derive(Deserialize, Debug)]
pub struct Doc {
    pub id: Value,
    pub text: String,
    #[serde(flatten)]
    pub settings: DocSettings,
}

/// The key under which a document is recorded: its id (as JSON), or its line number when the
/// line had no usable id (malformed or duplicate lines).
pub fn id_key(id: &Value) -> String {
    id.to_string()
}

/// The key of a line without a usable id.
pub fn line_key(line: usize) -> String {
    format!("line:{line}")
}

/// Parses one input line (`line` counts from 1, for messages).
pub fn parse_doc(bytes: &[u8]) -> Result<Doc, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8".to_string())?;
    let doc: Doc = serde_json::from_str(text).map_err(|e| format!("not a valid document: {e}"))?;
    match &doc.id {
        Value::String(s) if !s.is_empty() => {}
        Value::Number(n) if n.is_u64() || n.is_i64() => {}
        other => {
            return Err(format!(
                "\"id\" must be a non-empty string or an integer, not {other}"
            ))
        }
    }
    Ok(doc)
}

/// The input file, line by line (split on `\n`; a trailing `\r` is dropped).
pub struct InputLines {
    reader: BufReader<File>,
    path: PathBuf,
    line: usize,
    buf: Vec<u8>,
}

impl InputLines {
    pub fn open(path: &Path) -> Result<InputLines, CliError> {
        let f = File::open(path).map_err(|e| CliError::io(path, e))?;
        if f.metadata().map(|m| m.is_dir()).unwrap_or(false) {
            return Err(CliError::Usage(format!(
                "{}: is a directory",
                path.display()
            )));
        }
        Ok(InputLines {
            reader: BufReader::new(f),
            path: path.to_path_buf(),
            line: 0,
            buf: Vec::new(),
        })
    }

    /// The next line and its number (from 1), or `None` at the end.
    pub fn next_line(&mut self) -> Result<Option<(usize, &[u8])>, CliError> {
        self.buf.clear();
        let n = self
            .reader
            .read_until(b'\n', &mut self.buf)
            .map_err(|e| CliError::io(&self.path, e))?;
        if n == 0 {
            return Ok(None);
        }
        self.line += 1;
        let mut end = self.buf.len();
        while end > 0 && matches!(self.buf[end - 1], b'\n' | b'\r') {
            end -= 1;
        }
        Ok(Some((self.line, &self.buf[..end])))
    }
}

/// Counts the non-blank lines of `path` that belong to shard `index` of `count`.
pub fn count_lines(path: &Path, index: usize, count: usize) -> Result<usize, CliError> {
    let mut lines = InputLines::open(path)?;
    let mut n = 0;
    while let Some((no, b)) = lines.next_line()? {
        n += usize::from(in_shard(no, index, count) && !is_blank(b));
    }
    Ok(n)
}

/// Shard rule: line `no` (from 1) belongs to shard `(no - 1) % count`.
pub fn in_shard(no: usize, index: usize, count: usize) -> bool {
    (no - 1) % count == index
}

pub fn is_blank(b: &[u8]) -> bool {
    b.iter().all(u8::is_ascii_whitespace)
}

/// The output file, opened for appending after a resume check.
pub struct ResultsFile {
    file: File,
    path: PathBuf,
    /// Keys of the documents already in the file.
    pub done: HashSet<String>,
}

impl ResultsFile {
    /// Opens (or creates) `path`, cuts a torn last line, and reads the keys already written.
    pub fn open(path: &Path) -> Result<ResultsFile, CliError> {
        let io = |e| CliError::io(path, e);
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .map_err(io)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(io)?;
        let whole = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        if whole < bytes.len() {
            tracing::warn!(
                "{}: cutting a torn last line ({} bytes)",
                path.display(),
                bytes.len() - whole
            );
            file.set_len(whole as u64).map_err(io)?;
            file.seek(SeekFrom::End(0)).map_err(io)?;
        }
        let mut done = HashSet::new();
        for (i, line) in bytes[..whole].split(|&b| b == b'\n').enumerate() {
            if is_blank(line) {
                continue;
            }
            let v: Value = serde_json::from_slice(line).map_err(|e| {
                CliError::Usage(format!(
                    "{}: line {} is not JSON ({e}); not a results file?",
                    path.display(),
                    i + 1
                ))
            })?;
            match (v.get("id"), v.get("line").and_then(Value::as_u64)) {
                (Some(id), _) if !id.is_null() => done.insert(id_key(id)),
                (_, Some(no)) => done.insert(line_key(no as usize)),
                _ => {
                    return Err(CliError::Usage(format!(
                        "{}: line {} has neither \"id\" nor \"line\"; not a results file?",
                        path.display(),
                        i + 1
                    )))
                }
            };
        }
        Ok(ResultsFile {
            file,
            path: path.to_path_buf(),
            done,
        })
    }

    /// Appends one record as a whole line (one `write_all` of the full buffer, then flush).
    pub fn write(&mut self, record: &Value) -> Result<(), CliError> {
        let mut buf = serde_json::to_vec(record)
            .map_err(|e| CliError::Usage(format!("encoding a result: {e}")))?;
        buf.push(b'\n');
        self.file
            .write_all(&buf)
            .and_then(|_| self.file.flush())
            .map_err(|e| CliError::io(&self.path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torn_last_line_is_cut_and_keys_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("out.jsonl");
        std::fs::write(&p, "{\"id\":\"a\",\"output\":\"x\"}\n{\"id\":null,\"line\":4,\"error\":\"e\"}\n{\"id\":7,\"out").unwrap();
        let mut r = ResultsFile::open(&p).unwrap();
        let mut keys: Vec<_> = r.done.iter().cloned().collect();
        keys.sort();
        assert_eq!(keys, vec!["\"a\"", "line:4"]);
        r.write(&serde_json::json!({"id": 7, "output": "y"}))
            .unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(
            text.ends_with("\"line\":4,\"error\":\"e\"}\n{\"id\":7,\"output\":\"y\"}\n"),
            "{text}"
        );
    }

    #[test]
    fn documents_parse_with_settings_and_bad_ones_say_why() {
        let d =
            parse_doc(br#"{"id": 3, "text": "hi", "temperature": 0.5, "stop": "x", "extra": 1}"#)
                .unwrap();
        assert_eq!(d.settings.temperature, Some(0.5));
        assert_eq!(d.settings.stop.unwrap().into_vec(), vec!["x"]);
        assert!(parse_doc(b"{\"id\": \"a\"}").unwrap_err().contains("text"));
        assert!(parse_doc(b"{\"id\": 1.5, \"text\": \"t\"}")
            .unwrap_err()
            .contains("id"));
        assert!(parse_doc(b"{\"id\": \"\", \"text\": \"t\"}")
            .unwrap_err()
            .contains("id"));
        assert!(parse_doc(b"not json").is_err());
        assert!(parse_doc(b"\xff\xfe").unwrap_err().contains("UTF-8"));
    }

    #[test]
    fn shards_partition_the_lines() {
        for count in 1..5 {
            for no in 1..20 {
                assert_eq!((0..count).filter(|&i| in_shard(no, i, count)).count(), 1);
            }
        }
    }
}
