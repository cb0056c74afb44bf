//! Golden error messages and the shapes scenarios resolve to.

use std::fs;

use super::*;

/// Writes `files` into a fresh directory and loads it as a corpus.
fn corpus(files: &[(&str, &str)]) -> (tempfile::TempDir, Result<Vec<Scenario>, Vec<String>>) {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, text) in files {
        let path = dir.path().join(name);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).expect("mkdir");
        }
        fs::write(path, text).expect("write");
    }
    let result = load_corpus(&[dir.path().to_path_buf()]).map_err(|errs| {
        errs.iter()
            .map(|e| {
                e.to_string()
                    .replace(&dir.path().display().to_string(), "D")
            })
            .collect()
    });
    (dir, result)
}

fn errors(files: &[(&str, &str)]) -> Vec<String> {
    match corpus(files).1 {
        Ok(s) => panic!("expected errors, got {} scenarios", s.len()),
        Err(e) => e,
    }
}

#[test]
fn declared_shares_keep_the_default_output_share_unless_they_take_it() {
    let tags = |share: &str| {
        let text = format!("id = \"a\"\n[[steps]]\nrun = [\"true\"]\n{share}");
        let (_dir, result) = corpus(&[("a.toml", &text), ("in/.keep", "")]);
        let s = result.expect("valid").remove(0);
        s.shares
            .iter()
            .map(|s| format!("{}:{}", s.tag, s.mount))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        tags("[[shares]]\ntag = \"in\"\nhost = \"in\"\n"),
        ["in:/mnt/in", "output:/mnt/output"]
    );
    assert_eq!(
        tags("[[shares]]\ntag = \"output\"\nhost = \"in\"\n"),
        ["output:/mnt/output"]
    );
    assert_eq!(
        tags("[[shares]]\ntag = \"results\"\nmount = \"/mnt/output\"\n"),
        ["results:/mnt/output"]
    );
}

#[test]
fn minimal_scenario_gets_the_defaults() {
    let (_dir, result) = corpus(&[("a.toml", "id = \"a\"\n[[steps]]\nrun = [\"true\"]\n")]);
    let s = &result.expect("valid")[0];
    assert_eq!(s.guest.kernel, ImageRef::Default);
    assert_eq!(s.guest.memory, DEFAULT_MEMORY_MIB);
    assert_eq!(s.shares.len(), 1);
    assert_eq!(s.shares[0].mount, "/mnt/output");
    assert!(matches!(s.readiness.kind, ReadinessKind::Agent));
    assert_eq!(s.steps[0].timeout, DEFAULT_STEP_TIMEOUT);
    assert_eq!(s.steps[0].name, "true");
    let toml = s.to_toml();
    assert!(toml.contains("id = \"a\""), "{toml}");
    assert!(toml.contains("run = [\"true\"]"), "{toml}");
    // The "as run" copy is itself a valid scenario.
    let again = SourceFile {
        path: "again.toml".into(),
        text: toml,
    };
    let (back, _) = parse_scenario(&again, None).expect("as-run copy parses");
    assert_eq!(back.id, "a");
}

#[test]
fn unknown_field_names_place_field_and_suggestion() {
    let e = errors(&[("a.toml", "id = \"a\"\n[guest]\nmemroy = 512\n")]);
    assert_eq!(
        e,
        ["D/a.toml:3:1: guest.memroy: unknown field `memroy`; did you mean `memory`?"]
    );
}

#[test]
fn unknown_field_in_a_step_names_its_index() {
    let e = errors(&[(
        "a.toml",
        "id = \"a\"\n[[steps]]\nrun = [\"x\"]\n[[steps]]\nshel = \"x\"\n",
    )]);
    assert_eq!(
        e,
        ["D/a.toml:5:1: steps[1].shel: unknown field `shel`; did you mean `shell`?"]
    );
}

#[test]
fn wrong_type_names_the_value_and_expectation() {
    let e = errors(&[("a.toml", "id = \"a\"\n[guest]\nmemory = \"lots\"\n")]);
    assert_eq!(
        e,
        ["D/a.toml:3:10: guest.memory: invalid type: string \"lots\", expected u64"]
    );
}

#[test]
fn bad_duration_says_what_would_be_right() {
    let e = errors(&[("a.toml", "id = \"a\"\ntimeout = \"soon\"\n")]);
    assert_eq!(e.len(), 1);
    assert!(
        e[0].starts_with("D/a.toml:2:11: timeout: invalid duration \"soon\""),
        "{}",
        e[0]
    );
    assert!(
        e[0].ends_with("write seconds (30) or \"30s\", \"500ms\", \"2m\""),
        "{}",
        e[0]
    );
}

#[test]
fn unknown_backend_gets_a_suggestion() {
    let e = errors(&[("a.toml", "id = \"a\"\nbackends = [\"qemy\"]\n")]);
    assert_eq!(
        e,
        ["D/a.toml:2:13: backends[0]: unknown value `qemy`; did you mean `qemu`?"]
    );
}

#[test]
fn missing_kernel_base_image_and_share_dir_are_reported_together() {
    let e = errors(&[(
        "a.toml",
        "id = \"a\"\n[guest]\nkernel = \"vmlinux\"\n[[disks]]\nbase = \"base.img\"\n\
         [[shares]]\ntag = \"in\"\nhost = \"data\"\n",
    )]);
    assert_eq!(
        e,
        [
            "D/a.toml:3:10: guest.kernel: file \"vmlinux\" does not exist (looked at D/vmlinux)",
            "D/a.toml:5:8: disks[0].base: file \"base.img\" does not exist (looked at D/base.img)",
            "D/a.toml:8:8: shares[0].host: directory \"data\" does not exist (looked at D/data)",
        ]
    );
}

#[test]
fn duplicate_ids_point_at_both_files() {
    let e = errors(&[
        ("a.toml", "id = \"same\"\n"),
        ("b.toml", "\nid = \"same\"\n"),
    ]);
    assert_eq!(
        e,
        ["D/b.toml:2:6: id: duplicate id `same`; already used by D/a.toml:1:6"]
    );
}

#[test]
fn bad_regex_is_named_with_the_reason() {
    let e = errors(&[("a.toml", "id = \"a\"\n[readiness]\nmarker = \"boot(\"\n")]);
    assert_eq!(
        e,
        ["D/a.toml:3:10: readiness.marker: invalid regex \"boot(\": unclosed group"]
    );
}

#[test]
fn a_step_needs_exactly_one_action() {
    let e = errors(&[(
        "a.toml",
        "id = \"a\"\n[[steps]]\nrun = [\"x\"]\nshell = \"y\"\n",
    )]);
    assert_eq!(
        e,
        ["D/a.toml:2:1: steps[0]: a step needs exactly one of `run`, `shell`, `put`, `get`, `wait_console`"]
    );
}

#[test]
fn toml_syntax_errors_have_a_position() {
    let e = errors(&[("a.toml", "id = \"a\"\n[guest\n")]);
    assert_eq!(e.len(), 1);
    assert!(e[0].starts_with("D/a.toml:2:"), "{}", e[0]);
}

#[test]
fn missing_id_is_an_error() {
    let e = errors(&[("a.toml", "description = \"x\"\n")]);
    assert_eq!(e, ["D/a.toml:1:1: missing field `id`"]);
}

#[test]
fn defaults_file_is_merged_under_each_scenario() {
    let (_dir, result) = corpus(&[
        (
            "kiln.toml",
            "[defaults]\ntimeout = \"2m\"\nbackends = [\"qemu\"]\n[defaults.guest]\nmemory = 512\n\
             cmdline = \"quiet\"\n[defaults.readiness]\ntimeout = 30\n\
             [defaults.steps]\ntimeout = \"5s\"\nenv = { A = \"1\", B = \"2\" }\n",
        ),
        (
            "a.toml",
            "id = \"a\"\n[guest]\nvcpus = 2\ncmdline = \"kiln.marker=x\"\n\
             [[steps]]\nshell = \"true\"\nenv = { B = \"3\" }\n",
        ),
    ]);
    let s = &result.expect("valid")[0];
    assert_eq!(s.timeout, Duration::from_secs(120));
    assert_eq!(s.backends, [BackendKind::Qemu]);
    assert_eq!((s.guest.memory, s.guest.vcpus), (512, 2));
    assert_eq!(s.guest.cmdline, "quiet kiln.marker=x");
    assert_eq!(s.readiness.timeout, Duration::from_secs(30));
    assert_eq!(s.steps[0].timeout, Duration::from_secs(5));
    let StepAction::Run(run) = &s.steps[0].action else {
        panic!("run step")
    };
    assert_eq!(run.env.get("A").map(String::as_str), Some("1"));
    assert_eq!(run.env.get("B").map(String::as_str), Some("3"));
}

#[test]
fn errors_in_defaults_point_at_the_defaults_file() {
    let e = errors(&[
        ("kiln.toml", "[defaults.guest]\nkernel = \"nope\"\n"),
        ("a.toml", "id = \"a\"\n"),
    ]);
    assert_eq!(
        e,
        ["D/kiln.toml:2:10: guest.kernel: file \"nope\" does not exist (looked at D/nope)"]
    );
    let e = errors(&[
        ("kiln.toml", "[defaults]\nguset = 1\n"),
        ("a.toml", "id = \"a\"\n"),
    ]);
    assert_eq!(
        e,
        ["D/kiln.toml:2:1: defaults.guset: unknown field `guset`; did you mean `guest`?"]
    );
}

#[test]
fn sequence_readiness_and_expectations_resolve() {
    let (_dir, result) = corpus(&[(
        "a.toml",
        "id = \"a\"\n[readiness]\ntimeout = 90\n[[readiness.sequence]]\nmarker = \"one\"\n\
         timeout = \"10s\"\n[[readiness.sequence]]\nmarker = \"two\"\n\
         [[expect.files]]\npath = \"output/a.bin\"\nnon_empty = true\nverify = \"test -s \\\"$1\\\"\"\n",
    )]);
    let s = &result.expect("valid")[0];
    let ReadinessKind::Sequence(seq) = &s.readiness.kind else {
        panic!("sequence")
    };
    assert_eq!(seq.len(), 2);
    assert_eq!(seq[0].timeout, Some(Duration::from_secs(10)));
    assert_eq!(s.expect.files[0].path, "output/a.bin");
    assert!(s.expect.files[0].exists && s.expect.files[0].non_empty);
}

#[test]
fn expectation_paths_and_hashes_are_checked() {
    let e = errors(&[(
        "a.toml",
        "id = \"a\"\n[[expect.files]]\npath = \"../x\"\n[[expect.files]]\npath = \"y\"\nsha256 = \"abc\"\n",
    )]);
    assert_eq!(
        e,
        [
            "D/a.toml:3:8: expect.files[0].path: path \"../x\" must be relative to fixtures/, without `..` or empty parts",
            "D/a.toml:6:10: expect.files[1].sha256: \"abc\" is not a SHA-256: 64 hex digits",
        ]
    );
}

#[test]
fn command_only_fields_on_other_steps_are_rejected() {
    let e = errors(&[(
        "a.toml",
        "id = \"a\"\n[[steps]]\nwait_console = \"x\"\nexit_code = 1\n",
    )]);
    assert_eq!(
        e,
        ["D/a.toml:2:1: steps[0].exit_code: `exit_code` applies only to `run` and `shell` steps"]
    );
}

#[test]
fn diff_rules_resolve_to_regexes_and_step_indices() {
    let text = "id = \"a\"\n[[steps]]\nname = \"clock\"\nrun = [\"date\"]\n[[steps]]\nrun = [\"true\"]\n\
                [diff]\nignore = ['\\d\\d:\\d\\d', { regex = 'pid \\d+', reason = \"pids differ\" }]\n\
                ignore_steps = [\"clock\", 1]\nreason = \"wall clock\"\n";
    let (_dir, result) = corpus(&[("a.toml", text)]);
    let s = &result.expect("valid")[0];
    assert_eq!(s.diff.ignore.len(), 2);
    assert_eq!(s.diff.ignore[1].reason, "pids differ");
    assert_eq!(s.diff.ignore_steps, [0, 1]);
    assert_eq!(s.diff.reason, "wall clock");
    // The "as run" copy parses again with the same rules.
    let again = s.to_toml();
    let (_dir, result) = corpus(&[("a.toml", &again)]);
    assert_eq!(
        result.expect("as-run copy valid")[0].diff.ignore_steps,
        [0, 1]
    );
}

#[test]
fn diff_rule_errors_name_place_and_field() {
    let text = "id = \"a\"\n[[steps]]\nrun = [\"true\"]\n[diff]\nignore = [\"(\", \"\"]\n\
                ignore_steps = [3, \"nope\"]\n";
    let e = errors(&[("a.toml", text)]);
    assert_eq!(
        e,
        [
            "D/a.toml:5:11: diff.ignore[0]: invalid regex \"(\": unclosed group",
            "D/a.toml:5:16: diff.ignore[1]: empty regex: it would match everywhere and hide every output",
            "D/a.toml:6:17: diff.ignore_steps[0]: no step 3: name a step by its index (0 to 0) or its name",
            "D/a.toml:6:20: diff.ignore_steps[1]: no step named \"nope\": name a step by its index (0 to 0) or its name",
        ]
    );
    let e = errors(&[("a.toml", "id = \"a\"\n[diff]\nignor = []\n")]);
    assert_eq!(e.len(), 1);
    assert!(e[0].starts_with("D/a.toml:3:1: "), "{}", e[0]);
}

/// A duration a deadline (`now + duration`) cannot hold is an error, not a panic at run time.
#[test]
fn durations_past_a_year_are_errors() {
    for bad in [
        "9000000000000000000",
        "1e300",
        "\"300000000 years\"",
        "31536001",
    ] {
        let errs = errors(&[("a.toml", &format!("id = \"a\"\ntimeout = {bad}\n"))]);
        assert_eq!(errs.len(), 1, "{bad}: {errs:?}");
        assert!(errs[0].contains("timeout"), "{bad}: {errs:?}");
        let step = format!("id = \"a\"\n[[steps]]\nrun = [\"true\"]\ntimeout = {bad}\n");
        assert_eq!(errors(&[("a.toml", &step)]).len(), 1, "step timeout {bad}");
    }
    let (_dir, ok) = corpus(&[("a.toml", "id = \"a\"\ntimeout = 31536000\n")]);
    assert!(ok.is_ok());
}

/// `fixtures_limit`: bytes or a size with a unit, in a scenario or `[defaults]`.
#[test]
fn fixtures_limit_takes_sizes_and_defaults() {
    let (_dir, result) = corpus(&[
        ("kiln.toml", "[defaults]\nfixtures_limit = \"2MiB\"\n"),
        ("a.toml", "id = \"a\"\n"),
        ("b.toml", "id = \"b\"\nfixtures_limit = 4096\n"),
    ]);
    let s = result.expect("valid");
    assert_eq!(s[0].fixtures_limit, 2 << 20);
    assert_eq!(s[1].fixtures_limit, 4096);
    let (_dir, result) = corpus(&[("a.toml", "id = \"a\"\n")]);
    assert_eq!(
        result.expect("valid")[0].fixtures_limit,
        DEFAULT_FIXTURES_LIMIT
    );
    for bad in ["\"lots\"", "-1", "\"99999999TiB\""] {
        let errs = errors(&[("a.toml", &format!("id = \"a\"\nfixtures_limit = {bad}\n"))]);
        assert!(errs[0].contains("fixtures_limit"), "{bad}: {errs:?}");
    }
}

/// `[artifacts] max_size` in kiln.toml: the run's budget, read without touching the scenarios;
/// a bad size is an error naming the field.
#[test]
fn kiln_toml_sets_the_artifacts_budget() {
    let (dir, result) = corpus(&[
        ("kiln.toml", "[artifacts]\nmax_size = \"2GiB\"\n"),
        ("a.toml", "id = \"a\"\n"),
    ]);
    assert!(result.is_ok(), "{result:?}");
    let found = artifacts_max_size(&[dir.path().join("a.toml")]).expect("valid");
    assert_eq!(found, Some((2 << 30, dir.path().join("kiln.toml"))));
    let (none, _) = corpus(&[("a.toml", "id = \"a\"\n")]);
    assert_eq!(artifacts_max_size(&[none.path().to_path_buf()]), Ok(None));
    let e = errors(&[
        ("kiln.toml", "[artifacts]\nmax_size = \"12Q\"\n"),
        ("a.toml", "id = \"a\"\n"),
    ]);
    assert!(e[0].contains("artifacts.max_size"), "{e:?}");
}

#[test]
fn a_registry_guest_is_pinned_by_digest_and_brings_its_own_initrd() {
    let hex = "0123456789abcdef".repeat(4);
    let reference = format!("oci://registry.example:5000/kiln/guest:v1@sha256:{hex}");
    let text = format!("id = \"a\"\n[guest]\nkernel = \"{reference}\"\n");
    let (_dir, result) = corpus(&[("a.toml", &text)]);
    let s = result.expect("valid").remove(0);
    assert_eq!(s.guest.kernel, ImageRef::Registry(reference.clone()));
    assert!(s.to_toml().contains(&reference));

    let e = errors(&[(
        "a.toml",
        "id = \"a\"\n[guest]\nkernel = \"oci://registry.example/kiln/guest:v1\"\n",
    )]);
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0].starts_with("D/a.toml:3:10: guest.kernel: registry guest \"oci://registry.example/kiln/guest:v1\" has no digest"),
        "{e:?}"
    );
    let e = errors(&[(
        "a.toml",
        "id = \"a\"\n[guest]\nkernel = \"oci://registry.example/kiln/guest@sha256:abc\"\n",
    )]);
    assert!(
        e[0].contains("expected oci://HOST[:PORT]/REPOSITORY"),
        "{e:?}"
    );
    let text = format!("{text}initrd = \"initrd.img\"\n");
    let e = errors(&[("a.toml", &text), ("initrd.img", "")]);
    assert!(
        e[0].contains("guest.initrd: a registry guest brings its own initrd"),
        "{e:?}"
    );
}
