//! Faults `kiln run` must survive with one clear error and nothing lost (issue 12): `kill -9`
//! in the middle of a scenario, a full artifacts disk and an unreadable disk base image. Each
//! runs a bare-metal guest (tests/guests) through the kiln backend, so PVM is enough. A share
//! deleted while the VM runs is covered by the runner's own tests
//! (`a_share_dir_deleted_mid_run_is_an_infra_error_and_the_others_pass`).

#[macro_use]
mod common;

use common::describe;

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Writes `<corpus>/<id>.toml`: `guest` with readiness on `marker`, and a raw disk `base.img`.
fn scenario(corpus: &Path, id: &str, guest: &Path, marker: &str, timeout: &str) {
    fs::create_dir_all(corpus).unwrap();
    let base = corpus.join("base.img");
    if !base.exists() {
        fs::write(&base, vec![0u8; 1 << 20]).unwrap();
    }
    fs::write(
        corpus.join(format!("{id}.toml")),
        format!(
            r#"id = "{id}"
backends = ["kiln"]
[guest]
kernel = "{}"
memory = 64
[readiness]
marker = '{marker}'
timeout = "{timeout}"
[[disks]]
name = "scratch"
base = "base.img"
format = "raw"
keep = true
"#,
            guest.display()
        ),
    )
    .unwrap();
}

fn kiln_run(corpus: &Path, artifacts: &Path, tmp: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
    cmd.arg("run")
        .arg(corpus)
        .args(["--backend", "kiln", "--jobs", "1", "--artifacts"])
        .arg(artifacts)
        .env("TMPDIR", tmp)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Every entry under `dir` (recursively), as paths relative to it.
fn tree(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            out.push(p.strip_prefix(root).unwrap().display().to_string());
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                walk(root, &p, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// The staging dirs (`.<run>.partial`) under `artifacts/<id>`.
fn partials(artifacts: &Path, id: &str) -> Vec<PathBuf> {
    fs::read_dir(artifacts.join(id))
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.to_string_lossy().ends_with(".partial"))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn kill_9_mid_scenario_leaves_nothing_the_next_run_does_not_clean() {
    or_skip!(common::kvm_usable());
    let spin = or_skip!(common::build_guest("spin"));
    let pvh = or_skip!(common::build_guest("pvh_info"));
    let dir = tempfile::tempdir().unwrap();
    let (artifacts, tmp) = (dir.path().join("artifacts"), dir.path().join("tmp"));
    fs::create_dir(&tmp).unwrap();
    // Never ready: the VM spins until it is killed.
    scenario(&dir.path().join("spin"), "s", &spin, "never printed", "5m");
    let mut child = kiln_run(&dir.path().join("spin"), &artifacts, &tmp)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let booted = partials(&artifacts, "s")
            .iter()
            .any(|p| fs::read_to_string(p.join("console.log")).is_ok_and(|c| c.contains("spin")));
        if booted {
            break;
        }
        assert!(Instant::now() < deadline, "the spin guest never printed");
        assert!(child.try_wait().unwrap().is_none(), "kiln run ended early");
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let left_art = tree(&artifacts);
    let left_tmp = tree(&tmp);
    eprintln!("after kill -9: artifacts {left_art:?}, TMPDIR {left_tmp:?}");
    assert!(
        !artifacts.join("s/latest").exists(),
        "latest of a killed run"
    );

    // The next run, same artifacts dir and TMPDIR, another scenario and the killed one's id.
    let next = dir.path().join("next");
    scenario(&next, "s", &pvh, "PVH done", "30s");
    scenario(&next, "t", &pvh, "PVH done", "30s");
    let out = kiln_run(&next, &artifacts, &tmp).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for id in ["s", "t"] {
        let latest = artifacts.join(id).join("latest");
        assert!(
            latest.join("result.json").is_file(),
            "{id}: {}",
            describe(&out)
        );
        assert!(
            partials(&artifacts, id).is_empty(),
            "{id}: {:?}",
            tree(&artifacts)
        );
    }
    // The killed run's staging dir and work dir are gone, and the run said so in one line.
    assert_eq!(tree(&tmp), Vec::<String>::new(), "{}", describe(&out));
    let said: Vec<&str> = stderr.lines().filter(|l| l.contains("killed")).collect();
    assert_eq!(said.len(), 1, "{stderr}");
    eprintln!("the next run: {}", said[0]);
    assert!(
        said[0].contains(&artifacts.display().to_string()),
        "{stderr}"
    );
}

#[test]
fn a_full_artifacts_disk_is_one_clear_error() {
    or_skip!(common::kvm_usable());
    let pvh = or_skip!(common::build_guest("pvh_info"));
    let dir = tempfile::tempdir().unwrap();
    let artifacts = dir.path().join("artifacts");
    fs::create_dir(&artifacts).unwrap();
    let tmp = dir.path().join("tmp");
    fs::create_dir(&tmp).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
        .arg(&artifacts)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        skip!("cannot mount a 64 KiB tmpfs here (not root, or no CAP_SYS_ADMIN)");
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(artifacts.clone());
    // Fill it up but for a few KiB: the bundle's directories fit, its files do not.
    let filler = artifacts.join("filler");
    let _ = fs::write(&filler, vec![1u8; 64 << 10]);
    let len = fs::metadata(&filler).map_or(0, |m| m.len());
    fs::write(&filler, vec![1u8; (len as usize).saturating_sub(4096)]).unwrap();
    let corpus = dir.path().join("corpus");
    scenario(&corpus, "full", &pvh, "PVH done", "30s");
    let out = kiln_run(&corpus, &artifacts, &tmp).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{}", describe(&out));
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains(&artifacts.display().to_string()))
        .collect();
    assert_eq!(
        errors.len(),
        1,
        "one line names the artifacts dir:\n{stderr}"
    );
    assert!(errors[0].contains("No space left on device"), "{stderr}");
    assert!(!errors[0].contains(".tmp-"), "a temp file's name: {stderr}");
    assert!(
        !artifacts.join("full/latest").exists(),
        "{:?}",
        tree(&artifacts)
    );
    assert!(
        partials(&artifacts, "full").is_empty(),
        "{:?}",
        tree(&artifacts)
    );
    assert_eq!(tree(&tmp), Vec::<String>::new());
}

/// Drops CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the child's bounding set (root gets the
/// bounding set back on exec), so file modes bind root too.
fn without_dac_override(cmd: &mut Command) {
    // SAFETY: prctl is an async-signal-safe system call.
    unsafe {
        cmd.pre_exec(|| {
            // CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
            for cap in [1 as libc::c_ulong, 2] {
                if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

#[test]
fn an_unreadable_base_image_is_one_clear_error_and_never_written() {
    use std::os::unix::fs::PermissionsExt;
    or_skip!(common::kvm_usable());
    let pvh = or_skip!(common::build_guest("pvh_info"));
    let dir = tempfile::tempdir().unwrap();
    let (artifacts, tmp) = (dir.path().join("artifacts"), dir.path().join("tmp"));
    fs::create_dir(&tmp).unwrap();
    let corpus = dir.path().join("corpus");
    scenario(&corpus, "unreadable", &pvh, "PVH done", "30s");
    let base = corpus.join("base.img");
    fs::set_permissions(&base, fs::Permissions::from_mode(0o000)).unwrap();
    let mut cmd = kiln_run(&corpus, &artifacts, &tmp);
    without_dac_override(&mut cmd);
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{}", describe(&out));
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    let named: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains(&base.display().to_string()))
        .collect();
    assert_eq!(named.len(), 1, "{stderr}");
    assert!(named[0].contains("unreadable.toml"), "{stderr}");
    assert!(named[0].contains("Permission denied"), "{stderr}");
    fs::set_permissions(&base, fs::Permissions::from_mode(0o644)).unwrap();
    assert_eq!(fs::read(&base).unwrap(), vec![0u8; 1 << 20], "base written");
    assert!(
        !artifacts.exists(),
        "nothing booted: {:?}",
        tree(&artifacts)
    );
}
