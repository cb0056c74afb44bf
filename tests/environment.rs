//! The environment identity through the real `kiln` binary: `kiln run --expect-environment`
//! stops a drifted gate before anything boots (exit 4, one line per differing field, no bundle),
//! a bad contract is a usage error, and a run whose contract is what `kiln doctor
//! --environment` printed passes and records the identity in result.json and `--json`.

#[macro_use]
mod common;

use std::fs;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use serde_json::Value;

/// `kiln ARGS` with the operator variables set to `operator` (and no others inherited).
fn kiln(args: &[&str], extra: &[&Path], operator: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
    cmd.args(args).args(extra).stdin(Stdio::null());
    for var in [
        "KILN_ENV_NAME",
        "KILN_ENV_VERSION",
        "KILN_ENV_RUNNER_REF",
        "KILN_ENV_SYSTEM_CLASS",
    ] {
        cmd.env_remove(var);
    }
    cmd.envs(operator.iter().copied());
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run kiln: {e}"))
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A corpus of one scenario that would fail if it ever booted (its kernel is four bytes).
fn corpus(dir: &Path) -> std::path::PathBuf {
    let corpus = dir.join("corpus");
    fs::create_dir(&corpus).unwrap();
    fs::write(corpus.join("vmlinux"), b"junk").unwrap();
    fs::write(
        corpus.join("never.toml"),
        "id = \"never\"\n[guest]\nkernel = \"vmlinux\"\n",
    )
    .unwrap();
    corpus
}

fn run_with_contract(dir: &Path, contract: &str, operator: &[(&str, &str)]) -> Output {
    let gate = dir.join("gate.toml");
    fs::write(&gate, contract).unwrap();
    let corpus = corpus(dir);
    let artifacts = dir.join("artifacts");
    let out = kiln(
        &["run", "--jobs", "1", "--expect-environment"],
        &[&gate, &corpus, Path::new("--artifacts"), &artifacts],
        operator,
    );
    assert!(!artifacts.exists(), "nothing ran: {}", stderr(&out));
    out
}

#[test]
fn a_drifted_environment_fails_the_run_before_anything_boots() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_with_contract(
        dir.path(),
        "[host]\nkvm_kind = \"no-such-kvm\"\n\n[operator]\nsystem_class = \"ci-large\"\n\
         name = \"release-pool\"\n",
        &[("KILN_ENV_SYSTEM_CLASS", "ci-small")],
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(4), "{err}");
    let gate = dir.path().join("gate.toml");
    let gate = gate.display();
    assert!(
        err.contains(&format!(
            "kiln: environment drift: operator.system_class is \"ci-small\", expected \
             \"ci-large\" ({gate}:5)"
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "kiln: environment drift: operator.name is not set, expected \"release-pool\" \
             ({gate}:6)"
        )),
        "{err}"
    );
    assert!(
        err.contains("kiln: environment drift: host.kvm_kind is \""),
        "{err}"
    );
    assert!(
        err.contains("environment drift in 3 fields against "),
        "{err}"
    );
    assert!(
        !err.contains("kiln: backend"),
        "no backend was chosen: {err}"
    );
}

#[test]
fn an_unknown_contract_field_is_a_usage_error_naming_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_with_contract(dir.path(), "[host]\n\nkvm = \"pvm\"\n", &[]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    let gate = dir.path().join("gate.toml");
    assert!(
        err.contains(&format!("{}:3: unknown field \"host.kvm\"", gate.display())),
        "{err}"
    );
}

#[test]
fn doctor_prints_a_contract_the_run_then_matches_and_records() {
    or_skip!(common::kvm_usable());
    let kernel = or_skip!(common::build_guest("pvh_info"));
    let operator = [
        ("KILN_ENV_NAME", "release-pool"),
        ("KILN_ENV_SYSTEM_CLASS", "ci-large"),
    ];
    let printed = kiln(&["doctor", "--environment"], &[], &operator);
    assert_eq!(printed.status.code(), Some(0), "{}", stderr(&printed));
    let contract = String::from_utf8(printed.stdout).unwrap();
    assert!(
        contract.contains("system_class = \"ci-large\""),
        "{contract}"
    );

    let dir = tempfile::tempdir().unwrap();
    let gate = dir.path().join("gate.toml");
    fs::write(&gate, &contract).unwrap();
    let corpus = dir.path().join("corpus");
    fs::create_dir(&corpus).unwrap();
    fs::write(
        corpus.join("pvh.toml"),
        format!(
            "id = \"pvh\"\nbackends = [\"kiln\"]\n[guest]\nkernel = \"{}\"\nmemory = 64\n\
             [readiness]\nmarker = 'PVH done'\ntimeout = \"30s\"\n",
            kernel.display()
        ),
    )
    .unwrap();
    let artifacts = dir.path().join("artifacts");
    let out = kiln(
        &["run", "--backend", "kiln", "--jobs", "1", "--json"],
        &[
            &corpus,
            Path::new("--artifacts"),
            &artifacts,
            Path::new("--expect-environment"),
            &gate,
        ],
        &operator,
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("kiln: environment: kvm "), "{err}");
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["environment"]["operator"]["name"], "release-pool");

    let text = fs::read(artifacts.join("pvh/latest/result.json")).unwrap();
    let result: Value = serde_json::from_slice(&text).unwrap();
    let env = &result["environment"];
    assert_eq!(env["operator"]["system_class"], "ci-large", "{result}");
    assert_eq!(env["host"]["kvm_kind"], result["provenance"]["host_kvm"]);
    for field in ["kernel", "os", "cpu_model"] {
        assert!(
            env["host"][field].as_str().is_some_and(|v| !v.is_empty()),
            "{field}"
        );
    }
    assert_eq!(env["kiln"]["version"], env!("CARGO_PKG_VERSION"));
    let image = result["provenance"]["guest_image_sha256"].as_str().unwrap();
    assert_eq!(image.len(), 64, "{result}");
}
