//! Reports: nextest-style live lines, an indicatif progress bar only on a terminal (never on
//! CI), the final summary, the `--json` document and JUnit XML.

pub mod junit;

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use crate::{RunEvent, RunSummary, ScenarioOutcome};

/// Prints progress to stderr as scenarios finish.
pub struct LiveReporter {
    bar: Option<ProgressBar>,
    out: Mutex<()>,
}

/// Whether to draw a progress bar: stderr is a terminal and this is not CI.
pub fn progress_wanted() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("CI").is_none()
}

/// ` START              id` (and `(attempt N)` on a retry), aligned with the status lines.
pub fn start_line(id: &str, attempt: u32) -> String {
    let mut line = format!("{:>6} {:>11} {id}", "START", "");
    if attempt > 1 {
        line.push_str(&format!(" (attempt {attempt})"));
    }
    line
}

/// `PASS [   1.234s] id`, nextest's shape.
pub fn status_line(outcome: &ScenarioOutcome) -> String {
    let r = &outcome.result;
    let status = if r.passed() && outcome.retries.is_empty() {
        "PASS".to_string()
    } else if r.passed() {
        "FLAKY".to_string()
    } else {
        "FAIL".to_string()
    };
    let mut line = format!(
        "{status:>6} [{:>8.3}s] {}",
        r.phases.total_ms / 1000.0,
        r.scenario
    );
    if let Some(f) = &r.failure {
        line += &format!(": {}: {}", f.class.as_str(), f.message);
    }
    if !outcome.retries.is_empty() {
        line += &format!(" (attempt {})", r.attempt);
    }
    line
}

impl LiveReporter {
    /// A reporter for `total` scenarios; a progress bar when `progress`.
    pub fn new(total: usize, progress: bool) -> LiveReporter {
        let bar = progress.then(|| {
            let bar = ProgressBar::new(total as u64);
            if let Ok(style) = ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}",
            ) {
                bar.set_style(style);
            }
            bar.enable_steady_tick(Duration::from_millis(100));
            bar
        });
        LiveReporter {
            bar,
            out: Mutex::new(()),
        }
    }

    fn print(&self, line: &str) {
        let _guard = self.out.lock().unwrap_or_else(|p| p.into_inner());
        match &self.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("{line}"),
        }
    }

    /// Handles one runner event.
    pub fn on_event(&self, event: RunEvent<'_>) {
        match event {
            RunEvent::Started { id, attempt } => match &self.bar {
                Some(bar) => bar.set_message(format!("{id} (attempt {attempt})")),
                // Without a bar (CI logs, pipes) a line per start, so a long run is never silent
                // until its first scenario ends.
                None => self.print(&start_line(id, attempt)),
            },
            RunEvent::Retrying(r) => self.print(&format!(
                "{:>6} [{:>8.3}s] {}: {}",
                format!("TRY {}", r.attempt),
                r.phases.total_ms / 1000.0,
                r.scenario,
                r.failure.as_ref().map_or(String::new(), |f| format!(
                    "{}: {}",
                    f.class.as_str(),
                    f.message
                ))
            )),
            RunEvent::Finished(outcome) => {
                self.print(&status_line(outcome));
                if let Some(bar) = &self.bar {
                    bar.inc(1);
                }
            }
        }
    }

    /// Removes the bar before the summary.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// "1 scenario", "3 scenarios".
/// `1 scenario`, `2 scenarios`.
pub fn plural(n: usize, noun: &str) -> String {
    format!("{n} {noun}{}", if n == 1 { "" } else { "s" })
}

/// The final summary: counts, then each failure with its class and bundle.
pub fn summary_text(summary: &RunSummary, backend: &str) -> String {
    let passed = summary.outcomes.iter().filter(|o| o.passed()).count();
    let failed = summary.outcomes.len() - passed;
    let flaky = summary
        .outcomes
        .iter()
        .filter(|o| o.passed() && !o.retries.is_empty())
        .count();
    let mut out = format!(
        "{:-<60}\n  Summary [{:>8.3}s] {} run on {backend}: {passed} passed{}, {failed} failed",
        "",
        summary.elapsed.as_secs_f64(),
        plural(summary.outcomes.len(), "scenario"),
        if flaky > 0 {
            format!(" ({flaky} flaky)")
        } else {
            String::new()
        },
    );
    if !summary.not_run.is_empty() {
        out += &format!(", {} not run", summary.not_run.len());
    }
    if summary.cancelled {
        out += " (interrupted)";
    }
    out.push('\n');
    if let Some(env) = &summary.environment {
        out += &format!("  {}\n", env.summary_line());
    }
    for o in summary.outcomes.iter().filter(|o| !o.passed()) {
        let r = &o.result;
        let class = r.class().map_or("failed", |c| c.as_str());
        out += &format!("  {:>18}  {}", class, r.scenario);
        if let Some(dir) = &r.bundle {
            out += &format!("  {}", dir.display());
        }
        out.push('\n');
    }
    out
}

/// The `--json` document: one object with the run and every result record.
pub fn json_document(summary: &RunSummary, backend: &str, exit_code: i32) -> serde_json::Value {
    json!({
        "kiln_version": env!("CARGO_PKG_VERSION"),
        "backend": backend,
        "exit_code": exit_code,
        "cancelled": summary.cancelled,
        "elapsed_ms": summary.elapsed.as_secs_f64() * 1000.0,
        "passed": summary.outcomes.iter().filter(|o| o.passed()).count(),
        "failed": summary.outcomes.iter().filter(|o| !o.passed()).count(),
        "not_run": summary.not_run,
        "environment": summary.environment,
        "scenarios": summary.outcomes.iter().map(|o| json!({
            "id": o.result.scenario,
            "result": o.result,
            "retries": o.retries,
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_lines_put_the_id_where_status_lines_do() {
        let start = start_line("cow-disk", 1);
        assert_eq!(start, " START             cow-disk");
        assert_eq!(start.find("cow-disk"), Some("  FAIL [  12.345s] ".len()));
        assert_eq!(
            start_line("cow-disk", 2),
            " START             cow-disk (attempt 2)"
        );
    }
}
