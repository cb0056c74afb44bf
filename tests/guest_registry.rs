//! `kiln guest push` / `kiln guest pull` against a real OCI registry (Debian's `docker-registry`,
//! started here on a loopback port with filesystem storage): a round trip byte for byte with a
//! stable digest, a tampered blob refused with nothing cached, missing credentials and a missing
//! digest as one clear line, a pulled guest used from a read-only cache without a write, and
//! `kiln run` booting a scenario whose guest is a registry reference.
//!
//! Without `docker-registry` (or `htpasswd`, for the credential test) the tests skip saying so;
//! on CI, which installs both (.ci/install-deps), that is a failure.

mod common;

use common::describe;

use std::fs;
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use kiln::guest::cache::{FileRecord, Source};
use kiln::guest::{Cache, Manifest};

/// A `docker-registry` serving 127.0.0.1:`port` from `dir`, stopped when dropped.
struct Registry {
    child: Child,
    dir: tempfile::TempDir,
    port: u16,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn on_path(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(tool))
        .find(|candidate| candidate.is_file())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

impl Registry {
    /// Starts a registry, requiring `user`/`password` (htpasswd, bcrypt) when given.
    fn start(auth: Option<(&str, &str)>) -> Result<Registry, String> {
        let Some(binary) = on_path("docker-registry") else {
            return common::ci_requires(
                "docker-registry not found on PATH (apt-get install docker-registry)".into(),
            );
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let mut auth_yaml = String::new();
        if let Some((user, password)) = auth {
            let Some(htpasswd) = on_path("htpasswd") else {
                return common::ci_requires(
                    "htpasswd not found on PATH (apt-get install apache2-utils)".into(),
                );
            };
            let out = Command::new(htpasswd)
                .args(["-Bbn", user, password])
                .output()
                .expect("run htpasswd");
            assert!(out.status.success(), "htpasswd failed: {out:?}");
            fs::write(dir.path().join("htpasswd"), &out.stdout).expect("write htpasswd");
            auth_yaml = format!(
                "auth:\n  htpasswd:\n    realm: kiln-test\n    path: {}\n",
                dir.path().join("htpasswd").display()
            );
        }
        // The port is free when asked for; another process may take it before the registry
        // binds it, so try a few.
        let log_path = dir.path().join("registry.log");
        for _ in 0..5 {
            let port = free_port();
            let config = format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
                 http:\n  addr: 127.0.0.1:{port}\n{auth_yaml}",
                dir.path().join("data").display()
            );
            fs::write(dir.path().join("config.yml"), config).expect("write config");
            let mut child = Command::new(&binary)
                .arg("serve")
                .arg(dir.path().join("config.yml"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(fs::File::create(&log_path).expect("log"))
                .spawn()
                .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
            let deadline = Instant::now() + Duration::from_secs(20);
            let exited = loop {
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Ok(Registry { child, dir, port });
                }
                if let Ok(Some(_)) = child.try_wait() {
                    break true;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    break false;
                }
                std::thread::sleep(Duration::from_millis(50));
            };
            let log = fs::read_to_string(&log_path).unwrap_or_default();
            assert!(
                exited && log.contains("address already in use"),
                "docker-registry did not serve 127.0.0.1:{port}: {log}"
            );
        }
        panic!("every loopback port tried for docker-registry was taken");
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Where the registry keeps blob `sha256:<hex>` on disk.
    fn blob(&self, hex: &str) -> PathBuf {
        self.dir
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

/// A user's home: a guest cache under `xdg/`, and an empty docker config so no credentials
/// leak in from the machine running the tests.
struct Home {
    dir: tempfile::TempDir,
}

impl Home {
    fn new() -> Home {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::create_dir_all(dir.path().join("docker")).expect("docker dir");
        Home { dir }
    }

    fn cache(&self) -> Cache {
        Cache::new(self.dir.path().join("xdg/kiln/guests"))
    }

    /// Stores a small stand-in guest as this cache's default and returns its entry name.
    fn with_guest(self, kernel: &[u8]) -> (Home, String) {
        let manifest = Manifest {
            format: kiln::guest::RECIPE_VERSION,
            name: String::new(),
            source: Source::Host {
                release: "6.1.0-test".into(),
            },
            kernel_release: Some("6.1.0-test".into()),
            agent_sha256: "00".into(),
            busybox_sha256: None,
            modules: Vec::new(),
            kernel: FileRecord {
                sha256: String::new(),
                size: 0,
            },
            initrd: FileRecord {
                sha256: String::new(),
                size: 0,
            },
            built_by: "kiln guest_registry test".into(),
        };
        let cache = self.cache();
        let image = cache
            .store(kernel, b"initrd: a gzip'd cpio in real life", manifest)
            .expect("store the stand-in guest");
        cache
            .set_alias(kiln::guest::DEFAULT_ALIAS, &image.manifest.name)
            .expect("alias");
        (self, image.manifest.name)
    }

    /// `kiln ARGS` with this home (and `env` added).
    fn kiln(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(args)
            .env("HOME", self.dir.path())
            .env("XDG_CACHE_HOME", self.dir.path().join("xdg"))
            .env("DOCKER_CONFIG", self.dir.path().join("docker"))
            .env_remove("KILN_REGISTRY_USER")
            .env_remove("KILN_REGISTRY_PASSWORD")
            .env_remove("KILN_REGISTRY_PLAIN_HTTP")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .output()
            .expect("run kiln")
    }
}

impl Home {
    /// `kiln ARGS` as user nobody (uid 65534) with this home, when the tests run as root and
    /// `setpriv` is there; `None` (said on stderr) otherwise.
    fn kiln_as_nobody(&self, args: &[&str]) -> Option<Output> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("note: not root, so the cache is not tried as another user");
            return None;
        }
        let Some(setpriv) = on_path("setpriv") else {
            eprintln!("note: no setpriv, so the cache is not tried as another user");
            return None;
        };
        // The home itself is a private temporary directory; let nobody in to read.
        fs::set_permissions(self.dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
        let out = Command::new(setpriv)
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(env!("CARGO_BIN_EXE_kiln"))
            .args(args)
            .env("HOME", self.dir.path())
            .env("XDG_CACHE_HOME", self.dir.path().join("xdg"))
            .env("DOCKER_CONFIG", self.dir.path().join("docker"))
            .env_remove("KILN_REGISTRY_USER")
            .env_remove("KILN_REGISTRY_PASSWORD")
            .stdin(Stdio::null())
            .output()
            .expect("run kiln as nobody");
        Some(out)
    }
}

/// The one line of stdout of a command that must succeed.
fn stdout_line(out: &Output) -> String {
    assert!(out.status.success(), "{}", describe(out));
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<_> = text.lines().collect();
    assert_eq!(lines.len(), 1, "{}", describe(out));
    lines[0].to_owned()
}

/// The `kiln: error:` line of a command that must fail.
fn error_line(out: &Output) -> String {
    assert!(!out.status.success(), "{}", describe(out));
    let text = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<_> = text
        .lines()
        .filter(|l| l.starts_with("kiln: error:"))
        .collect();
    assert_eq!(errors.len(), 1, "{}", describe(out));
    errors[0].to_owned()
}

/// Every path under `root` with its size and modification time.
fn snapshot(root: &Path) -> Vec<(PathBuf, u64, i64, i64)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).expect("read_dir") {
            let path = entry.expect("entry").path();
            let meta = fs::symlink_metadata(&path).expect("metadata");
            if meta.is_dir() {
                stack.push(path.clone());
            }
            out.push((path, meta.len(), meta.mtime(), meta.mtime_nsec()));
        }
    }
    out.sort();
    out
}

fn set_writable(root: &Path, writable: bool) {
    let mut paths: Vec<PathBuf> = snapshot(root).into_iter().map(|(p, ..)| p).collect();
    paths.push(root.to_owned());
    for path in paths {
        let mut perms = fs::metadata(&path).expect("metadata").permissions();
        let mode = if writable {
            perms.mode() | 0o200
        } else {
            perms.mode() & !0o222
        };
        perms.set_mode(mode);
        fs::set_permissions(&path, perms).expect("chmod");
    }
}

#[test]
fn a_pushed_guest_pulls_into_a_fresh_cache_byte_for_byte_with_a_stable_digest() {
    let registry = or_skip!(Registry::start(None));
    let (publisher, name) = Home::new().with_guest(b"kernel: a bzImage in real life");
    let target = format!("{}/kiln/guest:v1", registry.host());
    let pushed = stdout_line(&publisher.kiln(&["guest", "push", &target], &[]));
    assert!(
        pushed.starts_with(&format!("oci://{target}@sha256:")),
        "{pushed}"
    );
    // The same entry pushed again (by name this time) is the same artifact.
    let again = stdout_line(&publisher.kiln(&["guest", "push", &target, "--guest", &name], &[]));
    assert_eq!(again, pushed);

    let runner = Home::new();
    let dir = stdout_line(&runner.kiln(&["guest", "pull", &pushed, "--alias", "ci"], &[]));
    let published = publisher.cache().find(&name).expect("published entry");
    let pulled = runner.cache().find("ci").expect("pulled entry");
    assert_eq!(Path::new(&dir), pulled.dir);
    for file in ["kernel", "initrd.img", "manifest.json"] {
        assert_eq!(
            fs::read(pulled.dir.join(file)).expect("pulled file"),
            fs::read(published.dir.join(file)).expect("published file"),
            "{file}"
        );
    }

    // Once pulled, the guest needs neither the registry nor a writable cache: with the
    // registry gone and the cache read-only (root ignores the modes, so nothing may change
    // either), pulling again and `kiln guest path` answer from the cache.
    drop(registry);
    let cache_root = runner.cache().root().to_owned();
    set_writable(&cache_root, false);
    let before = snapshot(&cache_root);
    assert_eq!(
        stdout_line(&runner.kiln(&["guest", "pull", &pushed], &[])),
        dir
    );
    assert_eq!(
        stdout_line(&runner.kiln(&["guest", "path", "ci"], &[])),
        dir
    );
    // Another user (nobody) uses the same cache, which takes files everyone may read.
    if let Some(out) = runner.kiln_as_nobody(&["guest", "pull", &pushed]) {
        assert_eq!(stdout_line(&out), dir);
    }
    if let Some(out) = runner.kiln_as_nobody(&["guest", "path", "ci"]) {
        assert_eq!(stdout_line(&out), dir);
    }
    assert_eq!(
        snapshot(&cache_root),
        before,
        "the read-only cache was written"
    );
    set_writable(&cache_root, true);

    // A cached copy changed after the pull is refused when opened, never used.
    let mut kernel = fs::read(&pulled.kernel).expect("kernel");
    kernel[0] ^= 1;
    fs::write(&pulled.kernel, &kernel).expect("tamper");
    let err = error_line(&runner.kiln(&["guest", "pull", &pushed], &[]));
    assert!(err.contains("cannot reach the registry"), "{err}");
    let out = runner.kiln(&["guest", "pull", &pushed], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("tampered with; refusing it"),
        "{}",
        describe(&out)
    );
}

#[test]
fn a_tampered_blob_in_the_registry_is_refused_and_nothing_is_cached() {
    let registry = or_skip!(Registry::start(None));
    let kernel = b"kernel: a bzImage in real life".to_vec();
    let (publisher, _) = Home::new().with_guest(&kernel);
    let pushed = stdout_line(&publisher.kiln(
        &["guest", "push", &format!("{}/kiln/guest", registry.host())],
        &[],
    ));
    // Same length, other bytes: only the hash can tell.
    let blob = registry.blob(&kiln::guest::cache::sha256_hex(&kernel));
    let mut stored = fs::read(&blob).expect("the kernel blob in the registry's storage");
    assert_eq!(stored, kernel);
    stored[0] ^= 0x20;
    fs::File::create(&blob)
        .and_then(|mut f| f.write_all(&stored))
        .expect("tamper with the blob");

    let runner = Home::new();
    let err = error_line(&runner.kiln(&["guest", "pull", &pushed], &[]));
    assert!(
        err.contains("the kernel layer of") && err.contains("refusing it"),
        "{err}"
    );
    assert!(
        err.contains(&kiln::guest::cache::sha256_hex(&stored)),
        "{err}"
    );
    let root = runner.cache().root().to_owned();
    let entries = if root.exists() {
        snapshot(&root)
    } else {
        Vec::new()
    };
    let left: Vec<_> = entries
        .into_iter()
        .map(|(p, ..)| p)
        .filter(|p| !p.ends_with(".lock"))
        .collect();
    assert!(left.is_empty(), "the cache holds {left:?}");
}

#[test]
fn pushing_without_credentials_to_a_registry_that_requires_them_is_one_clear_line() {
    let registry = or_skip!(Registry::start(Some(("ci", "s3cret"))));
    let (publisher, _) = Home::new().with_guest(b"kernel");
    let target = format!("{}/kiln/guest", registry.host());
    let err = error_line(&publisher.kiln(&["guest", "push", &target], &[]));
    assert_eq!(
        err,
        format!(
            "kiln: error: registry {} requires credentials to push kiln/guest: set \
             KILN_REGISTRY_USER and KILN_REGISTRY_PASSWORD (or run `docker login {}`)",
            registry.host(),
            registry.host()
        )
    );
    let wrong = [
        ("KILN_REGISTRY_USER", "ci"),
        ("KILN_REGISTRY_PASSWORD", "guess"),
    ];
    let err = error_line(&publisher.kiln(&["guest", "push", &target], &wrong));
    assert!(
        err.contains("refused the credentials from KILN_REGISTRY_USER"),
        "{err}"
    );

    let right = [
        ("KILN_REGISTRY_USER", "ci"),
        ("KILN_REGISTRY_PASSWORD", "s3cret"),
    ];
    let pushed = stdout_line(&publisher.kiln(&["guest", "push", &target], &right));
    let runner = Home::new();
    let err = error_line(&runner.kiln(&["guest", "pull", &pushed], &[]));
    assert!(
        err.contains("requires credentials to pull kiln/guest"),
        "{err}"
    );
    // docker login's config.json is the other place credentials come from.
    let auth = "Y2k6czNjcmV0"; // base64("ci:s3cret")
    fs::write(
        runner.dir.path().join("docker/config.json"),
        format!(
            r#"{{"auths":{{"{}":{{"auth":"{auth}"}}}}}}"#,
            registry.host()
        ),
    )
    .expect("config.json");
    stdout_line(&runner.kiln(&["guest", "pull", &pushed], &[]));
}

#[test]
fn pulling_a_digest_the_registry_does_not_have_is_a_clear_error() {
    let registry = or_skip!(Registry::start(None));
    let runner = Home::new();
    let reference = format!(
        "oci://{}/kiln/guest@sha256:{}",
        registry.host(),
        "0".repeat(64)
    );
    let err = error_line(&runner.kiln(&["guest", "pull", &reference], &[]));
    assert!(
        err.contains(&format!("{reference} is not in the registry")),
        "{err}"
    );
    let err = error_line(&runner.kiln(&["guest", "pull", "oci://host/kiln/guest:v1"], &[]));
    assert!(err.contains("a guest is pulled by digest"), "{err}");
}

/// `Ok` when QEMU is installed and the default guest is cached or can be built here.
fn real_guest() -> Result<kiln::guest::GuestImage, String> {
    common::qemu()?;
    match kiln::guest::default_guest() {
        Ok(guest) => Ok(guest),
        // No apt, no network or no package lists: the machine cannot fetch the kernel (CI can).
        Err(kiln::guest::GuestError::Invalid(message))
            if message.contains("apt-get") || message.contains("cannot run dpkg-deb") =>
        {
            common::ci_requires(format!("cannot build the default guest here: {message}"))
        }
        Err(e) => panic!("building the default guest failed: {e}"),
    }
}

#[test]
fn kiln_run_boots_registry_guests_pulled_into_an_empty_cache() {
    let registry = or_skip!(Registry::start(None));
    let guest = or_skip!(real_guest());
    let target =
        kiln::guest::registry::Reference::parse(&format!("{}/kiln/default-guest", registry.host()))
            .expect("reference");
    let pushed = kiln::guest::registry::push(&guest, &target, &|_| {})
        .expect("push the default guest")
        .to_string();

    // One scenario names the registry guest itself; the other asks for the default guest,
    // which --guest makes the same registry guest. The runner's cache starts empty and cannot
    // build a default guest in time to pass unnoticed: no alias may appear in it.
    let runner = Home::new();
    let corpus = runner.dir.path().join("corpus");
    fs::create_dir_all(&corpus).expect("corpus dir");
    let scenario = |id: &str, kernel: &str| {
        format!(
            "id = \"{id}\"\n[guest]\nkernel = \"{kernel}\"\nmemory = 256\n\
             [readiness]\ntimeout = \"3m\"\n\
             [[steps]]\nshell = \"uname -r\"\nstdout_contains = \"{}\"\n",
            guest.manifest.kernel_release.as_deref().unwrap_or("")
        )
    };
    fs::write(corpus.join("named.toml"), scenario("named", &pushed)).expect("scenario");
    fs::write(corpus.join("default.toml"), scenario("default", "default")).expect("scenario");
    let artifacts = runner.dir.path().join("artifacts");
    let out = runner.kiln(
        &[
            "run",
            corpus.to_str().expect("utf-8 path"),
            "--backend",
            "qemu",
            "--jobs",
            "2",
            "--guest",
            &pushed,
            "--artifacts",
            artifacts.to_str().expect("utf-8 path"),
        ],
        &[("KILN_LOG", "warn")],
    );
    assert!(out.status.success(), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.matches("kiln: guest: pulled ").count(),
        1,
        "pulled once for both scenarios: {}",
        describe(&out)
    );
    let cache = runner.cache();
    let digest = pushed.rsplit_once("@sha256:").expect("digest").1;
    let pulled = cache
        .pulled(digest)
        .expect("the pulled guest is recorded")
        .expect("and verifies");
    assert_eq!(
        fs::read(&pulled.kernel).expect("pulled kernel"),
        fs::read(&guest.kernel).expect("default kernel")
    );
    assert!(cache.aliases().is_empty(), "{:?}", cache.aliases());
}
