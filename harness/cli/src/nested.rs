//! The nested proving ground: run a command inside an L1 Linux under QEMU TCG whose `/dev/kvm`
//! is a real SVM KVM, so kiln's VMM boots Linux guests there as it would on a laptop.
//!
//! QEMU's TCG emulates AMD SVM with nested paging (`-cpu max`), so an L1 kernel that loads
//! `kvm_amd` has a hardware-style KVM even on a host whose own KVM cannot boot Linux (PVM) or
//! that has no KVM at all. The L1 is small: Debian's kernel (the same package the default guest
//! uses), an initramfs with a static busybox, the KVM and 9p modules and a shell `/init`. It sees
//! the host's root file system read-only over 9p, under a tmpfs overlay, and `chroot`s into it:
//! every binary, library, test executable and cached guest of the host is there at the same
//! path, and whatever the command writes stays in L1 — except under the directories shared back
//! read-write (`--out`), which are mounted at their host paths. The command's exit code comes
//! back through a control share, not from the console; its output streams to our stdout.

use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kiln_guest_build::{self as guest, cache, Cache, GuestError, Progress};

/// Modules the L1 loads: 9p over virtio-pci for the shares, overlayfs for a writable root, and
/// KVM for AMD (`kvm_amd` pulls in `kvm`, `irqbypass` and `ccp`).
pub const L1_MODULES: &[&str] = &["virtio_pci", "9pnet_virtio", "9p", "overlay", "kvm_amd"];

/// Bumped when the L1 image changes in a way the init script does not show (its hash is in
/// the cache key too), so a cached one is rebuilt.
const L1_RECIPE: u32 = 1;

/// Prefix of the lines `/init` prints to report its stages.
const STAGE_PREFIX: &str = "kiln-nested: ";

/// Why the proving ground could not run the command (the command's own failure is its exit code).
#[derive(Debug, thiserror::Error)]
pub enum NestedError {
    /// The L1 image could not be built.
    #[error("cannot build the L1 image: {0}")]
    Image(#[from] GuestError),
    /// A host file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// QEMU is not installed or did not start.
    #[error("cannot start {qemu}: {source} (apt-get install qemu-system-x86)")]
    Qemu {
        /// The binary.
        qemu: String,
        /// What failed.
        source: std::io::Error,
    },
    /// L1 came up but could not provide what the command needs.
    #[error("L1 cannot run the command: {0}")]
    L1(String),
    /// L1 ended without reporting the command's exit code.
    #[error("L1 ended before the command finished ({0}); its console is above")]
    NoExitCode(String),
    /// The whole L1 session ran past its deadline.
    #[error("L1 ran past its {0:?} timeout and was killed")]
    Timeout(Duration),
}

/// What to run in L1 and how big L1 is.
#[derive(Debug, Clone)]
pub struct NestedConfig {
    /// The command and its arguments, run in the host's root file system inside L1.
    pub command: Vec<String>,
    /// Working directory of the command (a host path).
    pub cwd: PathBuf,
    /// Host directories shared back read-write, at the same paths inside L1.
    pub out: Vec<PathBuf>,
    /// Environment variables handed to the command.
    pub env: Vec<(String, String)>,
    /// L1 memory in MiB.
    pub memory_mib: u32,
    /// L1 vCPUs (QEMU runs one TCG thread each).
    pub cpus: u32,
    /// Deadline for the whole session.
    pub timeout: Duration,
    /// The QEMU binary.
    pub qemu: String,
}

/// The L1 kernel and initramfs.
#[derive(Debug, Clone)]
pub struct L1Image {
    /// The kernel.
    pub kernel: PathBuf,
    /// The initramfs.
    pub initrd: PathBuf,
}

/// The environment variables passed into L1 unless overridden: the ones tests and kiln read.
pub fn inherited_env() -> Vec<(String, String)> {
    std::env::vars()
        .filter(|(name, _)| {
            matches!(
                name.as_str(),
                "CI" | "HOME" | "PATH" | "USER" | "LANG" | "RUST_BACKTRACE" | "XDG_CACHE_HOME"
            ) || name.starts_with("KILN_")
        })
        .collect()
}

/// The L1 image from the cache, built (kernel package download, module resolution, initramfs)
/// the first time.
pub fn l1_image(progress: &Progress) -> Result<L1Image, NestedError> {
    let root = cache::cache_root()?
        .parent()
        .map(|p| p.join("nested"))
        .ok_or_else(|| GuestError::Invalid("the guest cache has no parent directory".into()))?;
    let script_hash = cache::sha256_hex(INIT_SCRIPT.as_bytes());
    let key = format!("l1-v{L1_RECIPE}-{}", &script_hash[..12]);
    let dir = root.join(&key);
    let image = L1Image {
        kernel: dir.join(cache::KERNEL_FILE),
        initrd: dir.join(cache::INITRD_FILE),
    };
    if image.kernel.is_file() && image.initrd.is_file() {
        return Ok(image);
    }
    let _lock = Cache::new(&root).lock()?;
    if image.kernel.is_file() && image.initrd.is_file() {
        return Ok(image);
    }
    progress("building the L1 image (once): Debian kernel + KVM and 9p modules + busybox");
    let parts = guest::deb::kernel_with_modules(None, L1_MODULES, progress)?;
    let busybox = guest::userland::busybox(progress)?;
    let initrd = l1_initramfs(&busybox, parts.release.as_deref(), &parts.modules)?;
    let staging = root.join(format!(".{key}.{}", std::process::id()));
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| NestedError::Io { path, source }
    };
    fs::create_dir_all(&staging).map_err(io(&staging))?;
    fs::write(staging.join(cache::KERNEL_FILE), &parts.image).map_err(io(&staging))?;
    fs::write(staging.join(cache::INITRD_FILE), &initrd).map_err(io(&staging))?;
    let _ = fs::remove_dir_all(&dir);
    fs::rename(&staging, &dir).map_err(io(&dir))?;
    progress(&format!("L1 image cached in {}", dir.display()));
    Ok(image)
}

fn l1_initramfs(
    busybox: &guest::userland::Busybox,
    release: Option<&str>,
    modules: &[guest::modules::PackedModule],
) -> Result<Vec<u8>, GuestError> {
    let mut initramfs = kiln_guest::Initramfs::new();
    initramfs
        .file("init", 0o755, INIT_SCRIPT)
        .char_device("dev/console", 0o600, 5, 1)
        .dir("proc", 0o555)
        .dir("sys", 0o555)
        .dir("etc", 0o755)
        .file(guest::userland::BUSYBOX_PATH, 0o755, busybox.data.clone());
    for applet in &busybox.applets {
        initramfs.symlink(&format!("bin/{applet}"), "busybox");
    }
    let base = format!("lib/modules/{}", release.unwrap_or("l1"));
    let mut list = String::new();
    for module in modules {
        let path = format!("{base}/{}", module.relative);
        let _ = writeln!(list, "/{path} {}", module.name);
        initramfs.file(&path, 0o644, module.data.clone());
    }
    initramfs.file("etc/modules", 0o644, list);
    let mut out = Vec::new();
    initramfs.write_gzip(&mut out)?;
    Ok(out)
}

/// L1's `/init`. Reads `kiln.ctl=` and `kiln.out=` from the command line; reports each stage on
/// the console; leaves the command's status in `<ctl>/exit-code`, or `<ctl>/l1-error` when L1
/// cannot provide a KVM or the host's root.
const INIT_SCRIPT: &str = r#"#!/bin/busybox sh
export PATH=/bin
say() { echo "kiln-nested: $*"; }
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
ctl= ; outs=
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    kiln.ctl=*) ctl=${arg#kiln.ctl=} ;;
    kiln.out=*) outs="$outs ${arg#kiln.out=}" ;;
  esac
done
fail() { say "error: $*"; [ -d /ctl ] && echo "$*" > /ctl/l1-error; sync; poweroff -f; }
say "stage: loading modules"
while read -r path name; do
  params=
  [ "$name" = kvm_amd ] && params="nested=1"
  insmod "$path" $params 2>/dev/null || grep -q "^$name " /proc/modules || say "insmod $name failed"
done < /etc/modules
mkdir -p /ctl /host /rw /newroot
mount -t 9p -o trans=virtio,version=9p2000.L,msize=524288 kilnctl /ctl || { say "error: no control share"; poweroff -f; }
grep -qw svm /proc/cpuinfo || fail "the L1 CPU has no svm flag: this QEMU's -cpu max does not emulate AMD SVM"
[ -c /dev/kvm ] || fail "no /dev/kvm after loading kvm_amd (dmesg: $(dmesg | grep -i -E 'kvm|svm' | tail -n 2 | tr '\n' ' '))"
say "stage: /dev/kvm ready ($(cat /sys/module/kvm_amd/parameters/nested 2>/dev/null | sed 's/^1$/nested on/'), npt $(cat /sys/module/kvm_amd/parameters/npt 2>/dev/null))"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=524288,cache=loose,ro hostroot /host || fail "cannot mount the host's root over 9p"
mount -t tmpfs -o mode=755 rw /rw
mkdir -p /rw/upper /rw/work
mount -t overlay overlay -o lowerdir=/host,upperdir=/rw/upper,workdir=/rw/work /newroot || fail "cannot mount the overlay over the host's root"
mount -t proc proc /newroot/proc
mount -t sysfs sys /newroot/sys
mount -t devtmpfs dev /newroot/dev
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts devpts /newroot/dev/pts
mount -t tmpfs shm /newroot/dev/shm
# /tmp stays the overlay's (writable, in memory): a checkout under the host's /tmp must be seen.
mount -t tmpfs run /newroot/run
i=0
for out in $outs; do
  mkdir -p "/newroot$out"
  mount -t 9p -o trans=virtio,version=9p2000.L,msize=524288 "kilnout$i" "/newroot$out" || fail "cannot mount the share for $out"
  i=$((i+1))
done
mkdir -p "/newroot$ctl"
mount --bind /ctl "/newroot$ctl"
say "stage: running the command in the host's root"
# Through a pipe, so the command sees no terminal (no progress bars, no escape codes in logs).
set -o pipefail
chroot /newroot /bin/sh "$ctl/command.sh" < /dev/null 2>&1 | cat > /dev/console
echo $? > /ctl/exit-code.tmp && mv /ctl/exit-code.tmp /ctl/exit-code
say "stage: command exited $(cat /ctl/exit-code); powering off"
umount "/newroot$ctl" 2>/dev/null
sync
poweroff -f
"#;

/// Quotes `s` for a POSIX shell.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The script L1 runs in the host's root: environment, working directory, command.
fn command_script(cfg: &NestedConfig) -> String {
    let mut script = String::from("#!/bin/sh\n");
    for (name, value) in &cfg.env {
        let _ = writeln!(script, "export {name}={}", shell_quote(value));
    }
    let _ = writeln!(
        script,
        "cd {} || exit 125",
        shell_quote(&cfg.cwd.to_string_lossy())
    );
    let argv: Vec<String> = cfg.command.iter().map(|a| shell_quote(a)).collect();
    let _ = writeln!(script, "exec {}", argv.join(" "));
    script
}

/// The QEMU command line that boots L1 with the host's root and the shares.
fn qemu_command(cfg: &NestedConfig, image: &L1Image, ctl: &Path) -> Command {
    let mut cmdline = format!(
        "console=ttyS0 loglevel=4 panic=-1 kiln.ctl={}",
        ctl.display()
    );
    for out in &cfg.out {
        let _ = write!(cmdline, " kiln.out={}", out.display());
    }
    let mut qemu = Command::new(&cfg.qemu);
    qemu.args(["-accel", "tcg,thread=multi", "-cpu", "max", "-M", "pc"])
        .args(["-smp", &cfg.cpus.to_string()])
        .args(["-m", &format!("{}M", cfg.memory_mib)])
        .args(["-display", "none", "-monitor", "none", "-serial", "stdio"])
        .args(["-no-reboot", "-nodefaults"])
        .arg("-kernel")
        .arg(&image.kernel)
        .arg("-initrd")
        .arg(&image.initrd)
        .args(["-append", &cmdline]);
    let mut share = |id: &str, path: &Path, readonly: bool| {
        let ro = if readonly { ",readonly=on" } else { "" };
        qemu.args([
            "-fsdev",
            &format!(
                "local,id={id},path={},security_model=none{ro}",
                path.display()
            ),
            "-device",
            &format!("virtio-9p-pci,fsdev={id},mount_tag={id}"),
        ]);
    };
    share("hostroot", Path::new("/"), true);
    share("kilnctl", ctl, false);
    for (i, out) in cfg.out.iter().enumerate() {
        share(&format!("kilnout{i}"), out, false);
    }
    qemu.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    qemu
}

/// Boots L1, runs the command in it and returns the command's exit code. L1's console (kernel
/// messages, the stages and the command's output) streams to stdout as it comes.
pub fn run(cfg: &NestedConfig, progress: &Progress) -> Result<i32, NestedError> {
    let image = l1_image(progress)?;
    for out in &cfg.out {
        fs::create_dir_all(out).map_err(|source| NestedError::Io {
            path: out.clone(),
            source,
        })?;
    }
    let ctl = tempfile::Builder::new()
        .prefix("kiln-nested-")
        .tempdir()
        .map_err(|source| NestedError::Io {
            path: std::env::temp_dir(),
            source,
        })?;
    let script = ctl.path().join("command.sh");
    fs::write(&script, command_script(cfg)).map_err(|source| NestedError::Io {
        path: script.clone(),
        source,
    })?;
    progress(&format!(
        "booting L1 under QEMU TCG (-cpu max, {} vCPUs, {} MiB) with the host's root read-only",
        cfg.cpus, cfg.memory_mib
    ));
    let started = Instant::now();
    let mut child = qemu_command(cfg, &image, ctl.path())
        .spawn()
        .map_err(|source| NestedError::Qemu {
            qemu: cfg.qemu.clone(),
            source,
        })?;
    let (tx, rx) = mpsc::channel();
    if let Some(stdout) = child.stdout.take() {
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).split(b'\n').map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
    }
    let deadline = started + cfg.timeout;
    let mut timed_out = false;
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                let text = String::from_utf8_lossy(&line);
                let text = text.trim_end_matches('\r');
                match text.strip_prefix(STAGE_PREFIX) {
                    Some(stage) => progress(&format!(
                        "[{:7.1}s] L1: {stage}",
                        started.elapsed().as_secs_f64()
                    )),
                    None => println!("{text}"),
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if Instant::now() >= deadline {
            timed_out = true;
            let _ = child.kill();
            break;
        }
    }
    let status = child.wait().map_err(|source| NestedError::Qemu {
        qemu: cfg.qemu.clone(),
        source,
    })?;
    if timed_out {
        return Err(NestedError::Timeout(cfg.timeout));
    }
    if let Ok(reason) = fs::read_to_string(ctl.path().join("l1-error")) {
        return Err(NestedError::L1(reason.trim().to_owned()));
    }
    match fs::read_to_string(ctl.path().join("exit-code")) {
        Ok(code) => code
            .trim()
            .parse()
            .map_err(|_| NestedError::NoExitCode(format!("exit-code file holds {code:?}"))),
        Err(_) => Err(NestedError::NoExitCode(format!(
            "QEMU exited with {status}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> NestedConfig {
        NestedConfig {
            command: vec!["echo".into(), "it's".into()],
            cwd: "/work dir".into(),
            out: vec!["/tmp/out".into()],
            env: vec![("CI".into(), "true".into())],
            memory_mib: 4096,
            cpus: 2,
            timeout: Duration::from_secs(60),
            qemu: "qemu-system-x86_64".into(),
        }
    }

    #[test]
    fn the_command_script_quotes_every_word() {
        let script = command_script(&config());
        assert_eq!(
            script,
            "#!/bin/sh\nexport CI='true'\ncd '/work dir' || exit 125\nexec 'echo' 'it'\\''s'\n"
        );
    }

    #[test]
    fn qemu_gets_the_host_root_read_only_and_each_share_read_write() {
        let image = L1Image {
            kernel: "/k".into(),
            initrd: "/i".into(),
        };
        let cmd = qemu_command(&config(), &image, Path::new("/tmp/ctl"));
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let joined = args.join(" ");
        assert!(joined.contains("-cpu max"), "{joined}");
        assert!(joined.contains("-accel tcg"), "{joined}");
        assert!(
            joined.contains("local,id=hostroot,path=/,security_model=none,readonly=on"),
            "{joined}"
        );
        assert!(
            joined.contains("local,id=kilnout0,path=/tmp/out,security_model=none "),
            "{joined}"
        );
        assert!(
            joined.contains("kiln.ctl=/tmp/ctl kiln.out=/tmp/out"),
            "{joined}"
        );
    }
}
