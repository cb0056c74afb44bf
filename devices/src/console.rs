//! The guest console: where serial output goes (stdout, a file, memory) and the marker watcher
//! that timestamps lines matching patterns.
//!
//! The vCPU thread only appends to memory and hands complete lines to a writer thread, so a slow
//! terminal or pipe never stalls the guest.

use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use regex::Regex;

/// Most console bytes kept in memory; beyond this the log is marked truncated.
pub const MAX_CONSOLE_MEMORY: usize = 16 << 20;
/// Lines longer than this are cut into pieces for the watcher and the writer.
const MAX_LINE: usize = 4096;
/// Most marker hits kept: a guest printing a matching line in a loop must not grow them forever.
pub const MAX_MARKER_HITS: usize = 1024;
/// Chunks waiting for the writer thread before new ones are dropped (and counted).
const WRITER_BACKLOG: usize = 4096;

/// Where console output is copied besides memory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ConsoleOutput {
    /// Memory only.
    #[default]
    None,
    /// The process's standard output.
    Stdout,
    /// A file, created or truncated.
    File(PathBuf),
}

/// A console line that matched a watched pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MarkerHit {
    /// The pattern, as given.
    pub pattern: String,
    /// The whole line (without the newline).
    pub line: String,
    /// Time since the console was created (the VM start).
    pub at: Duration,
}

#[derive(Default)]
struct Shared {
    bytes: Vec<u8>,
    truncated: bool,
    dropped_output: u64,
    hits: Vec<MarkerHit>,
    dropped_hits: u64,
}

/// A cheap, cloneable read handle on a console.
#[derive(Clone)]
pub struct ConsoleLog {
    shared: Arc<Mutex<Shared>>,
}

impl ConsoleLog {
    /// Everything the guest wrote so far (lossy UTF-8).
    pub fn text(&self) -> String {
        let s = self.lock();
        String::from_utf8_lossy(&s.bytes).into_owned()
    }

    /// The raw bytes the guest wrote so far.
    pub fn bytes(&self) -> Vec<u8> {
        self.lock().bytes.clone()
    }

    /// The bytes after the first `offset` (empty when there are none yet).
    pub fn bytes_since(&self, offset: usize) -> Vec<u8> {
        self.lock()
            .bytes
            .get(offset..)
            .map(<[u8]>::to_vec)
            .unwrap_or_default()
    }

    /// Marker hits not kept because [`MAX_MARKER_HITS`] were kept already.
    pub fn dropped_markers(&self) -> u64 {
        self.lock().dropped_hits
    }

    /// Whether output beyond [`MAX_CONSOLE_MEMORY`] was discarded from memory.
    pub fn truncated(&self) -> bool {
        self.lock().truncated
    }

    /// Bytes the stdout/file copy could not keep up with and dropped.
    pub fn dropped_output(&self) -> u64 {
        self.lock().dropped_output
    }

    /// Lines that matched a watched pattern, in order.
    pub fn markers(&self) -> Vec<MarkerHit> {
        self.lock().hits.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The write end of the console, owned by the serial device.
pub struct ConsoleSink {
    shared: Arc<Mutex<Shared>>,
    patterns: Vec<(String, Regex)>,
    line: Vec<u8>,
    start: Instant,
    tx: Option<SyncSender<Vec<u8>>>,
}

/// Joins the writer thread; dropping it flushes the stdout/file copy.
pub struct ConsoleWriter {
    thread: Option<JoinHandle<()>>,
}

impl ConsoleWriter {
    /// Waits until every chunk handed over so far is written.
    pub fn finish(mut self) {
        self.join();
    }

    fn join(&mut self) {
        if let Some(t) = self.thread.take() {
            // The writer only ends when every sender is gone; a panic there loses output only.
            let _ = t.join();
        }
    }
}

impl Drop for ConsoleWriter {
    fn drop(&mut self) {
        self.join();
    }
}

/// Console construction errors.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// A marker pattern is not a valid regex.
    #[error("invalid marker pattern {pattern:?}: {source}")]
    Pattern {
        /// The pattern as given.
        pattern: String,
        /// What the regex parser said.
        source: regex::Error,
    },
    /// The console file could not be created.
    #[error("cannot create console file {path}: {source}")]
    File {
        /// The path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The writer thread could not be started.
    #[error("cannot start the console writer thread: {0}")]
    Thread(io::Error),
}

/// Builds a console: the sink for the serial device, a log handle, and the writer thread.
pub fn console(
    output: &ConsoleOutput,
    patterns: &[String],
) -> Result<(ConsoleSink, ConsoleLog, ConsoleWriter), ConsoleError> {
    let compiled = patterns
        .iter()
        .map(|p| {
            Regex::new(p)
                .map(|r| (p.clone(), r))
                .map_err(|source| ConsoleError::Pattern {
                    pattern: p.clone(),
                    source,
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let out: Option<Box<dyn Write + Send>> = match output {
        ConsoleOutput::None => None,
        ConsoleOutput::Stdout => Some(Box::new(io::stdout())),
        ConsoleOutput::File(path) => {
            let f = std::fs::File::create(path).map_err(|source| ConsoleError::File {
                path: path.clone(),
                source,
            })?;
            Some(Box::new(f))
        }
    };
    let (tx, thread) = match out {
        None => (None, None),
        Some(mut out) => {
            let (tx, rx) = mpsc::sync_channel::<Vec<u8>>(WRITER_BACKLOG);
            let thread = std::thread::Builder::new()
                .name("kiln-console".into())
                .spawn(move || {
                    for chunk in rx {
                        // Console copies are best effort: a closed stdout must not kill the VM.
                        if out.write_all(&chunk).is_err() {
                            break;
                        }
                        let _ = out.flush();
                    }
                })
                .map_err(ConsoleError::Thread)?;
            (Some(tx), Some(thread))
        }
    };
    let shared = Arc::new(Mutex::new(Shared::default()));
    let sink = ConsoleSink {
        shared: shared.clone(),
        patterns: compiled,
        line: Vec::with_capacity(256),
        start: Instant::now(),
        tx,
    };
    Ok((sink, ConsoleLog { shared }, ConsoleWriter { thread }))
}

impl ConsoleSink {
    fn end_line(&mut self) {
        let line = std::mem::take(&mut self.line);
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end_matches(['\n', '\r']);
        let at = self.start.elapsed();
        let hits: Vec<MarkerHit> = self
            .patterns
            .iter()
            .filter(|(_, re)| re.is_match(text))
            .map(|(p, _)| MarkerHit {
                pattern: p.clone(),
                line: text.to_string(),
                at,
            })
            .collect();
        if !hits.is_empty() {
            let mut s = self.shared.lock().unwrap_or_else(|e| e.into_inner());
            let room = MAX_MARKER_HITS.saturating_sub(s.hits.len());
            s.dropped_hits += hits.len().saturating_sub(room) as u64;
            s.hits.extend(hits.into_iter().take(room));
        }
        if let Some(tx) = &self.tx {
            let len = line.len() as u64;
            match tx.try_send(line) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                    let mut s = self.shared.lock().unwrap_or_else(|e| e.into_inner());
                    s.dropped_output += len;
                }
            }
        }
        self.line = Vec::with_capacity(256);
    }
}

impl Write for ConsoleSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        {
            let mut s = self.shared.lock().unwrap_or_else(|e| e.into_inner());
            let room = MAX_CONSOLE_MEMORY.saturating_sub(s.bytes.len());
            let keep = room.min(buf.len());
            s.bytes.extend_from_slice(&buf[..keep]);
            if keep < buf.len() {
                s.truncated = true;
            }
        }
        for &b in buf {
            self.line.push(b);
            if b == b'\n' || self.line.len() >= MAX_LINE {
                self.end_line();
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.line.is_empty() {
            self.end_line();
        }
        Ok(())
    }
}

impl Drop for ConsoleSink {
    fn drop(&mut self) {
        // A partial last line (no newline) still reaches the watcher and the copy.
        let _ = self.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_text_and_timestamps_matching_lines() {
        let (mut sink, log, writer) = console(
            &ConsoleOutput::None,
            &["^KILN_READY ".to_string(), "panic".to_string()],
        )
        .unwrap();
        sink.write_all(b"booting\nKILN_READY v=1 boot=x\nKernel panic - not syncing\n")
            .unwrap();
        sink.write_all(b"partial").unwrap();
        assert_eq!(
            log.text(),
            "booting\nKILN_READY v=1 boot=x\nKernel panic - not syncing\npartial"
        );
        let hits = log.markers();
        assert_eq!(hits.len(), 2);
        assert_eq!(hits[0].pattern, "^KILN_READY ");
        assert_eq!(hits[0].line, "KILN_READY v=1 boot=x");
        assert_eq!(hits[1].line, "Kernel panic - not syncing");
        assert!(hits[0].at <= hits[1].at);
        drop(sink);
        writer.finish();
        assert_eq!(log.markers().len(), 2);
    }

    #[test]
    fn copies_to_a_file_and_flushes_partial_lines() {
        let dir = std::env::temp_dir().join(format!("kiln-console-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("console.log");
        let (mut sink, _log, writer) = console(&ConsoleOutput::File(path.clone()), &[]).unwrap();
        sink.write_all(b"line one\r\nno newline").unwrap();
        drop(sink);
        writer.finish();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "line one\r\nno newline"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn bad_pattern_and_unwritable_file_are_errors() {
        let err = console(&ConsoleOutput::None, &["(".into()]).err().unwrap();
        assert!(err.to_string().starts_with("invalid marker pattern \"(\""));
        let err = console(
            &ConsoleOutput::File("/nonexistent-dir/console.log".into()),
            &[],
        )
        .err()
        .unwrap();
        assert!(err.to_string().contains("/nonexistent-dir/console.log"));
    }

    #[test]
    fn memory_is_bounded() {
        let (mut sink, log, _w) = console(&ConsoleOutput::None, &[]).unwrap();
        let chunk = vec![b'x'; 1 << 20];
        for _ in 0..(MAX_CONSOLE_MEMORY >> 20) + 2 {
            sink.write_all(&chunk).unwrap();
        }
        assert_eq!(log.bytes().len(), MAX_CONSOLE_MEMORY);
        assert!(log.truncated());
    }

    #[test]
    fn marker_hits_are_capped() {
        let (mut sink, log, _writer) = console(&ConsoleOutput::None, &["^M".to_string()]).unwrap();
        for _ in 0..(MAX_MARKER_HITS + 500) {
            sink.write_all(b"M hit\n").unwrap();
        }
        assert_eq!(log.markers().len(), MAX_MARKER_HITS);
        assert_eq!(log.dropped_markers(), 500);
        assert_eq!(log.bytes_since(3), log.bytes()[3..]);
        assert!(log.bytes_since(usize::MAX).is_empty());
    }
}
