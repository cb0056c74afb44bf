//! The guest's serial console as the harness sees it: every byte teed into console.log, split
//! into timestamped lines that readiness, `wait_console` steps and panic detection wait on.

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
    lines: Vec<ConsoleLine>,
    partial: Vec<u8>,
    closed: bool,
    panic: Option<String>,
    log: Option<File>,
}

/// A shared, cloneable console: backends `push` bytes, the runner waits on lines.
#[derive(Debug, Clone)]
pub struct Console {
    inner: Arc<(Mutex<State>, Condvar)>,
    start: Instant,
}

impl Console {
    /// A console that also appends every byte to `log` (console.log in the bundle).
    pub fn new(log: Option<File>) -> Console {
        Console {
            inner: Arc::new((
                Mutex::new(State {
                    lines: Vec::new(),
                    partial: Vec::new(),
                    closed: false,
                    panic: None,
                    log,
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
        if let Some(log) = st.log.as_mut() {
            if let Err(e) = log.write_all(bytes) {
                tracing::warn!("console.log write failed: {e}");
                st.log = None;
            }
        }
        st.partial.extend_from_slice(bytes);
        while let Some(nl) = st.partial.iter().position(|&b| b == b'\n') {
            let raw: Vec<u8> = st.partial.drain(..=nl).collect();
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

    /// Number of complete lines so far.
    pub fn len(&self) -> usize {
        self.state().lines.len()
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

    /// Waits for a line at index `from` or later for which `matches` holds.
    pub fn wait_until(
        &self,
        from: usize,
        matches: &dyn Fn(&str) -> bool,
        deadline: Instant,
        cancel: &AtomicBool,
    ) -> ConsoleWait {
        let mut st = self.state();
        let mut next = from;
        loop {
            while let Some(line) = st.lines.get(next) {
                if matches(&line.text) {
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
    st.lines.push(line);
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
}
