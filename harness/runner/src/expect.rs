//! Checks after the VM phases: a command's output against its step, and file expectations
//! (existence, size, sha256, a host-side verify command) against the bundle's fixtures.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::artifacts::{sha256_file, ExpectationResult, FailureClass};
use kiln_scenario::FileExpect;

/// Time limit for a host-side verify command.
const VERIFY_TIMEOUT: Duration = Duration::from_secs(60);

/// Checks a command's output against its step.
pub fn check_output(
    run: &kiln_scenario::RunStep,
    o: &kiln_backends::Output,
    timeout: Duration,
) -> Result<(), (FailureClass, String)> {
    if o.timed_out {
        return Err((
            FailureClass::StepTimeout,
            format!(
                "command did not finish within {}",
                humantime::format_duration(timeout)
            ),
        ));
    }
    if o.code != Some(run.exit_code) {
        let got = match (o.code, o.signal) {
            (Some(c), _) => format!("exit code {c}"),
            (None, Some(sig)) => format!("signal {sig}"),
            (None, None) => "no exit status".into(),
        };
        let stderr = String::from_utf8_lossy(&o.stderr);
        let last = stderr.lines().last().unwrap_or("").trim();
        let hint = if last.is_empty() {
            String::new()
        } else {
            format!(" (stderr: {last})")
        };
        return Err((
            FailureClass::StepFailed,
            format!("expected exit code {}, got {got}{hint}", run.exit_code),
        ));
    }
    for (name, data, contains, regex) in [
        ("stdout", &o.stdout, &run.stdout_contains, &run.stdout_regex),
        ("stderr", &o.stderr, &run.stderr_contains, &run.stderr_regex),
    ] {
        let text = String::from_utf8_lossy(data);
        if let Some(missing) = contains.iter().find(|c| !text.contains(c.as_str())) {
            return Err((
                FailureClass::StepFailed,
                format!("{name} does not contain {missing:?}"),
            ));
        }
        if let Some(re) = regex {
            if !re.0.is_match(&text) {
                return Err((
                    FailureClass::StepFailed,
                    format!("{name} does not match /{}/", re.0.as_str()),
                ));
            }
        }
    }
    Ok(())
}

/// Checks one file expectation under `fixtures`.
pub fn check_file(fixtures: &Path, scenario_dir: &Path, e: &FileExpect) -> ExpectationResult {
    let path = fixtures.join(&e.path);
    let verdict = |message: Option<String>| ExpectationResult {
        path: e.path.clone(),
        ok: message.is_none(),
        message,
    };
    let meta = match fs::metadata(&path) {
        Ok(m) if m.is_file() => m,
        Ok(_) => return verdict(Some("is not a regular file".into())),
        Err(_) if !e.exists => return verdict(None),
        Err(_) => return verdict(Some("does not exist".into())),
    };
    if !e.exists {
        return verdict(Some("exists but must not".into()));
    }
    let size = meta.len();
    if e.non_empty && size == 0 {
        return verdict(Some("is empty".into()));
    }
    if let Some(min) = e.min_size.filter(|m| size < *m) {
        return verdict(Some(format!("is {size} bytes, less than min_size {min}")));
    }
    if let Some(max) = e.max_size.filter(|m| size > *m) {
        return verdict(Some(format!("is {size} bytes, more than max_size {max}")));
    }
    if let Some(want) = &e.sha256 {
        match sha256_file(&path) {
            Ok(got) if &got == want => {}
            Ok(got) => return verdict(Some(format!("sha256 is {got}, expected {want}"))),
            Err(err) => return verdict(Some(format!("cannot read: {err}"))),
        }
    }
    if let Some(cmd) = &e.verify {
        if let Err(why) = run_verify(cmd, &path, fixtures, scenario_dir) {
            return verdict(Some(format!("verify `{cmd}`: {why}")));
        }
    }
    verdict(None)
}

/// Why a host-side verify command did not pass.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// /bin/sh did not start.
    #[error("cannot start /bin/sh: {0}")]
    Spawn(#[source] std::io::Error),
    /// The command exited unsuccessfully.
    #[error("{status}{}", if last.is_empty() { String::new() } else { format!(": {last}") })]
    Failed {
        /// Its status.
        status: std::process::ExitStatus,
        /// The last line it wrote to stderr (empty when none).
        last: String,
    },
    /// The command ran past its time limit and was killed.
    #[error("did not finish within {}", humantime::format_duration(*.0))]
    TimedOut(Duration),
    /// Waiting for it failed.
    #[error("wait failed: {0}")]
    Wait(#[source] std::io::Error),
}

/// Runs a host-side verify command (`sh -c CMD sh FILE`; `$KILN_FILE` is the file,
/// `$KILN_SCENARIO_DIR` the scenario file's directory) with a time limit.
fn run_verify(cmd: &str, file: &Path, cwd: &Path, scenario_dir: &Path) -> Result<(), VerifyError> {
    let mut child = Command::new("/bin/sh")
        .arg("-c")
        .arg(cmd)
        .arg("sh")
        .arg(file)
        .env("KILN_FILE", file)
        .env(
            "KILN_SCENARIO_DIR",
            std::path::absolute(scenario_dir).unwrap_or_else(|_| scenario_dir.to_path_buf()),
        )
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(VerifyError::Spawn)?;
    let until = Instant::now() + VERIFY_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                let last = err.lines().last().unwrap_or("").trim().to_string();
                return Err(VerifyError::Failed { status, last });
            }
            Ok(None) if Instant::now() >= until => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(VerifyError::TimedOut(VERIFY_TIMEOUT));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => return Err(VerifyError::Wait(e)),
        }
    }
}
