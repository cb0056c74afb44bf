//! The guest's serial console as the harness sees it: every byte teed into console.log, split
//! into timestamped lines that readiness, `wait_console` steps and panic detection wait on.
//!
//! A guest controls what it prints, so everything the console keeps is bounded
//! ([`ConsoleLimits`]): the lines kept in memory (oldest dropped first; line indexes stay
//! absolute), the length of one line (a longer one is cut into pieces), and console.log on disk
//! (cut with a note saying so).

use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use regex::Regex;

/// Console lines that mean the guest kernel is dead: fail at once instead of at a timeout.
pub const PANIC_PATTERNS: [&str; 3] = [
    "Kernel panic - not syncing",
    "---[ end Kernel panic",
    "kernel BUG at",
];

/// How long one condition-variable wait lasts before cancellation is re-checked.
const POLL: Duration = Duration::from_millis(50);

/// Bounds on what a console keeps of a guest's output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConsoleLimits {
    /// Most complete lines kept in memory (waits and tails see the newest).
    pub lines: usize,
    /// Most bytes of line text kept in memory, all lines together.
    pub bytes: usize,
    /// Longest line: a line growing past this is cut and handed on in pieces.
    pub line_len: usize,
    /// Most bytes written to console.log; a note marks where it was cut.
    pub log_bytes: u64,
}

/// console.log's default cap: 64 MiB.
pub const DEFAULT_CONSOLE_LOG_LIMIT: u64 = 64 << 20;

impl Default for ConsoleLimits {
    fn default() -> Self {
        ConsoleLimits {
            lines: 20_000,
            bytes: 8 << 20,
            line_len: 64 << 10,
            log_bytes: DEFAULT_CONSOLE_LOG_LIMIT,
        }
    }
}

/// One complete console line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsoleLine {
    /// Time since the console was created (≈ since VM creation).
    pub at: Duration,
    /// The line without its end-of-line characters.
    pub text: String,
}

/// What a console wait ended with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleWait {
    /// A line matched; `index` is its position (wait again from `index + 1`).
    Matched {
        /// Index of the matching line.
        index: usize,
        /// The line.
        line: ConsoleLine,
    },
    /// The guest kernel panicked (this line).
    Panic(String),
    /// The console closed (the VM is gone) before a match.
    Closed,
    /// The deadline passed.
    TimedOut,
    /// The run was cancelled (Ctrl-C).
    Cancelled,
}

#[derive(Debug)]
struct State {
    /// The newest lines; `lines[0]` has index `dropped`.
    lines: VecDeque<ConsoleLine>,
    /// Lines dropped from the front to stay within the limits.
    dropped: usize,
    /// Bytes of text in `lines`.
    bytes: usize,
    partial: Vec<u8>,
    closed: bool,
    panic: Option<String>,
    log: Option<File>,
    /// Bytes written to `log` so far.
    logged: u64,
    /// Whether console.log was cut (the note is written once).
    log_cut: bool,
    limits: ConsoleLimits,
}

impl State {
    fn get(&self, index: usize) -> Option<&ConsoleLine> {
        index
            .checked_sub(self.dropped)
            .and_then(|i| self.lines.get(i))
    }

    /// Appends to console.log up to its limit; past it, writes the note once.
    fn log(&mut self, bytes: &[u8]) {
        let Some(log) = self.log.as_mut() else {
            return;
        };
        let room = self.limits.log_bytes.saturating_sub(self.logged);
        let keep = bytes.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        let mut result = log.write_all(&bytes[..keep]);
        self.logged += keep as u64;
        if keep < bytes.len() && !self.log_cut {
            self.log_cut = true;
            let note = format!(
                "\n[kiln: console.log cut here at its limit of {} bytes; the guest's further \
                 output is not logged]\n",
                self.limits.log_bytes
            );
            result = result.and_then(|()| log.write_all(note.as_bytes()));
            tracing::warn!(
                "console.log reached its limit of {} bytes; the rest is not logged",
                self.limits.log_bytes
            );
        }
        if let Err(e) = result {
            tracing::warn!("console.log write failed: {e}");
            self.log = None;
        }
    }
}

/// A shared, cloneable console: backends `push` bytes, the runner waits on lines.
#[derive(Debug, Clone)]
pub struct Console {
    inner: Arc<(Mutex<State>, Condvar)>,
    start: Instant,
}

impl Console {
    /// A console that also appends every byte to `log` (console.log in the bundle), with the
    /// default limits.
    pub fn new(log: Option<File>) -> Console {
        Console::with_limits(log, ConsoleLimits::default())
    }

    /// A console that keeps at most what `limits` allow.
    pub fn with_limits(log: Option<File>, limits: ConsoleLimits) -> Console {
        let limits = ConsoleLimits {
            lines: limits.lines.max(1),
            line_len: limits.line_len.max(1),
            ..limits
        };
        Console {
            inner: Arc::new((
                Mutex::new(State {
                    lines: VecDeque::new(),
                    dropped: 0,
                    bytes: 0,
                    partial: Vec::new(),
                    closed: false,
                    panic: None,
                    log,
                    logged: 0,
                    log_cut: false,
                    limits,
                }),
                Condvar::new(),
            )),
            start: Instant::now(),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves lines intact; keep using them.
        self.inner.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Feeds console output from the guest.
    pub fn push(&self, bytes: &[u8]) {
        let at = self.start.elapsed();
        let mut st = self.state();
        st.log(bytes);
        // Only the new bytes are scanned: a long partial line is never rescanned.
        let mut rest = bytes;
        while !rest.is_empty() {
            let room = st.limits.line_len - st.partial.len();
            let window = &rest[..rest.len().min(room)];
            match window.iter().position(|&b| b == b'\n') {
                Some(nl) => {
                    st.partial.extend_from_slice(&window[..=nl]);
                    rest = &rest[nl + 1..];
                }
                None => {
                    st.partial.extend_from_slice(window);
                    rest = &rest[window.len()..];
                    if st.partial.len() < st.limits.line_len {
                        break;
                    }
                    // Too long: hand this piece on as a line of its own.
                }
            }
            let raw = std::mem::take(&mut st.partial);
            let text = String::from_utf8_lossy(&raw)
                .trim_end_matches(['\n', '\r'])
                .to_string();
            push_line(&mut st, ConsoleLine { at, text });
        }
        drop(st);
        self.inner.1.notify_all();
    }

    /// Marks the console closed (VM exited); a trailing partial line becomes a line.
    pub fn close(&self) {
        let at = self.start.elapsed();
        let mut st = self.state();
        if !st.partial.is_empty() {
            let text = String::from_utf8_lossy(&st.partial).trim_end().to_string();
            st.partial.clear();
            push_line(&mut st, ConsoleLine { at, text });
        }
        st.closed = true;
        if let Some(log) = st.log.as_mut() {
            let _ = log.flush();
        }
        drop(st);
        self.inner.1.notify_all();
    }

    /// Whether the console is closed.
    pub fn is_closed(&self) -> bool {
        self.state().closed
    }

    /// The first panic line seen, if any.
    pub fn panic_line(&self) -> Option<String> {
        self.state().panic.clone()
    }

    /// Number of complete lines so far (including those no longer kept in memory).
    pub fn len(&self) -> usize {
        let st = self.state();
        st.dropped + st.lines.len()
    }

    /// Bytes of console text held in memory: the kept lines and the partial line.
    pub fn retained_bytes(&self) -> usize {
        let st = self.state();
        st.bytes + st.partial.len()
    }

    /// Whether no complete line arrived yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The last `n` lines (plus a trailing partial line).
    pub fn tail(&self, n: usize) -> Vec<String> {
        let st = self.state();
        let mut out: Vec<String> = st
            .lines
            .iter()
            .skip(st.lines.len().saturating_sub(n))
            .map(|l| l.text.clone())
            .collect();
        if !st.partial.is_empty() {
            out.push(String::from_utf8_lossy(&st.partial).into_owned());
        }
        out
    }

    /// The kept lines for which `keep` holds, oldest first.
    pub fn lines_where(&self, keep: &dyn Fn(&ConsoleLine) -> bool) -> Vec<ConsoleLine> {
        self.state()
            .lines
            .iter()
            .filter(|l| keep(l))
            .cloned()
            .collect()
    }

    /// Waits for a line at index `from` or later for which `matches` holds.
    pub fn wait_until(
        &self,
        from: usize,
        matches: &dyn Fn(&str) -> bool,
        deadline: Instant,
        cancel: &AtomicBool,
    ) -> ConsoleWait {
        self.wait_until_line(from, &|l| matches(&l.text), deadline, cancel)
    }

    /// Waits for a line at index `from` or later for which `matches` holds, given the line with
    /// its time.
    pub fn wait_until_line(
        &self,
        from: usize,
        matches: &dyn Fn(&ConsoleLine) -> bool,
        deadline: Instant,
        cancel: &AtomicBool,
    ) -> ConsoleWait {
        let mut st = self.state();
        let mut next = from;
        loop {
            // Lines dropped to stay within the limits are not waited on.
            next = next.max(st.dropped);
            while let Some(line) = st.get(next) {
                if matches(line) {
                    return ConsoleWait::Matched {
                        index: next,
                        line: line.clone(),
                    };
                }
                next += 1;
            }
            if let Some(p) = &st.panic {
                return ConsoleWait::Panic(p.clone());
            }
            if st.closed {
                return ConsoleWait::Closed;
            }
            if cancel.load(Ordering::SeqCst) {
                return ConsoleWait::Cancelled;
            }
            let now = Instant::now();
            if now >= deadline {
                return ConsoleWait::TimedOut;
            }
            let slice = (deadline - now).min(POLL);
            st = match self.inner.1.wait_timeout(st, slice) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
    }

    /// Waits for a line matching `re` at index `from` or later.
    pub fn wait_for(
        &self,
        from: usize,
        re: &Regex,
        deadline: Instant,
        cancel: &AtomicBool,
    ) -> ConsoleWait {
        self.wait_until(from, &|l| re.is_match(l), deadline, cancel)
    }
}

fn push_line(st: &mut State, line: ConsoleLine) {
    if st.panic.is_none() && PANIC_PATTERNS.iter().any(|p| line.text.contains(p)) {
        st.panic = Some(line.text.clone());
    }
    st.bytes += line.text.len();
    st.lines.push_back(line);
    while st.lines.len() > st.limits.lines || (st.bytes > st.limits.bytes && st.lines.len() > 1) {
        let Some(old) = st.lines.pop_front() else {
            break;
        };
        st.bytes -= old.text.len();
        st.dropped += 1;
    }
}

/// A flag shared by everything that must stop when the run is cancelled.
pub type CancelFlag = Arc<AtomicBool>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_split_across_pushes_and_matched_in_order() {
        let console = Console::new(None);
        console.push(b"one\r\ntw");
        console.push(b"o\nthree\n");
        let cancel = AtomicBool::new(false);
        let soon = Instant::now() + Duration::from_millis(100);
        let re = Regex::new("^t").unwrap_or_else(|e| panic!("{e}"));
        let ConsoleWait::Matched { index, line } = console.wait_for(0, &re, soon, &cancel) else {
            panic!("no match")
        };
        assert_eq!((index, line.text.as_str()), (1, "two"));
        let again = console.wait_for(index + 1, &re, soon, &cancel);
        assert!(matches!(again, ConsoleWait::Matched { index: 2, .. }));
        assert_eq!(
            console.wait_for(3, &re, soon, &cancel),
            ConsoleWait::TimedOut
        );
    }

    #[test]
    fn a_panic_line_ends_waits_at_once() {
        let console = Console::new(None);
        let waiter = console.clone();
        let t = std::thread::spawn(move || {
            let re = Regex::new("never").unwrap_or_else(|e| panic!("{e}"));
            let cancel = AtomicBool::new(false);
            let far = Instant::now() + Duration::from_secs(60);
            waiter.wait_for(0, &re, far, &cancel)
        });
        console.push(b"[ 1.0] Kernel panic - not syncing: VFS: Unable to mount root fs\n");
        let result = t.join().unwrap_or(ConsoleWait::TimedOut);
        assert!(matches!(result, ConsoleWait::Panic(l) if l.contains("VFS")));
    }

    #[test]
    fn close_flushes_the_partial_line_and_ends_waits() {
        let console = Console::new(None);
        console.push(b"no newline");
        console.close();
        assert_eq!(console.tail(5), ["no newline"]);
        let cancel = AtomicBool::new(false);
        let re = Regex::new("x").unwrap_or_else(|e| panic!("{e}"));
        let far = Instant::now() + Duration::from_secs(60);
        assert_eq!(console.wait_for(1, &re, far, &cancel), ConsoleWait::Closed);
    }

    /// A guest that prints one endless line: memory stays bounded and each push costs only its
    /// own bytes (the old console rescanned the whole partial line on every push).
    #[test]
    fn an_endless_line_is_cut_into_bounded_pieces() {
        let console = Console::new(None);
        let limits = ConsoleLimits::default();
        let chunk = vec![b'x'; 1 << 20];
        let started = Instant::now();
        for _ in 0..64 {
            console.push(&chunk);
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "64 MiB took {:?}",
            started.elapsed()
        );
        assert!(
            console.retained_bytes() <= limits.bytes + limits.line_len,
            "{} bytes kept",
            console.retained_bytes()
        );
        let tail = console.tail(usize::MAX);
        let kept: usize = tail.iter().map(String::len).sum();
        assert!(
            kept <= limits.bytes + limits.line_len,
            "tail of {kept} bytes"
        );
        assert!(tail.iter().all(|l| l.len() <= limits.line_len));
    }

    /// Millions of lines: only the newest are kept, indexes stay absolute and waits go on.
    #[test]
    fn millions_of_lines_keep_only_the_newest() {
        let console = Console::new(None);
        let limits = ConsoleLimits::default();
        let block: Vec<u8> = b"spam spam spam spam\n".repeat(10_000);
        for _ in 0..200 {
            console.push(&block);
        }
        console.push(b"the end\n");
        assert_eq!(console.len(), 2_000_001);
        let tail = console.tail(usize::MAX);
        assert!(tail.len() <= limits.lines, "{} lines kept", tail.len());
        assert!(console.retained_bytes() <= limits.bytes);
        let cancel = AtomicBool::new(false);
        let re = Regex::new("^the end$").unwrap_or_else(|e| panic!("{e}"));
        let soon = Instant::now() + Duration::from_millis(100);
        let hit = console.wait_for(0, &re, soon, &cancel);
        assert!(
            matches!(
                hit,
                ConsoleWait::Matched {
                    index: 2_000_000,
                    ..
                }
            ),
            "{hit:?}"
        );
    }

    /// console.log stops at its limit, with a note where it was cut.
    #[test]
    fn console_log_is_cut_at_its_limit_with_a_note() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("console.log");
        let log = File::create(&path).unwrap_or_else(|e| panic!("{e}"));
        let limits = ConsoleLimits {
            log_bytes: 1000,
            ..ConsoleLimits::default()
        };
        let console = Console::with_limits(Some(log), limits);
        for _ in 0..100 {
            console.push(&[b'a'; 99]);
            console.push(b"\n");
        }
        console.close();
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{e}"));
        let (kept, note) = text.split_at(1000);
        assert_eq!(kept.len(), 1000);
        assert!(kept.bytes().all(|b| b == b'a' || b == b'\n'));
        assert!(
            note.contains("[kiln: console.log cut here at its limit of 1000 bytes"),
            "{note:?}"
        );
        assert!(note.len() < 200, "nothing after the note: {note:?}");
    }
}
