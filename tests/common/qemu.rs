//! Booting a kiln guest under `qemu-system-x86_64 -accel tcg` for the end-to-end tests: the
//! agent's virtio-serial port on a Unix socket, a 9p share, the console captured line by line.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// A QEMU process, killed when dropped.
pub struct Qemu {
    child: Child,
    lines: Receiver<String>,
    console: Arc<Mutex<Vec<String>>>,
    /// The agent's virtio-serial port, as a Unix socket QEMU listens on.
    pub agent_socket: PathBuf,
    /// When QEMU was started.
    pub started: Instant,
}

/// What to boot.
pub struct QemuGuest<'a> {
    pub kernel: &'a Path,
    pub initrd: &'a Path,
    /// Host directory shared as 9p tag `fixtures`, mounted at /fixtures by the agent.
    pub share: &'a Path,
    /// Directory for the agent socket.
    pub run_dir: &'a Path,
}

/// `qemu-system-x86_64` if it is installed.
pub fn qemu_binary() -> Result<PathBuf, String> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("qemu-system-x86_64"))
        .find(|p| p.is_file())
        .ok_or_else(|| "qemu-system-x86_64 not found (apt-get install qemu-system-x86)".to_owned())
}

impl Qemu {
    /// Start QEMU: `-M pc` (the Debian kernel's virtio_pci probes the devices; microvm under TCG
    /// stalls calibrating the TSC with no PIT/HPET reference), TCG, 512 MiB, quiet kernel.
    pub fn start(guest: &QemuGuest) -> Result<Qemu, String> {
        let qemu = qemu_binary()?;
        let agent_socket = guest.run_dir.join("agent.sock");
        let mut command = Command::new(qemu);
        command
            .args(["-accel", "tcg", "-M", "pc", "-m", "512", "-smp", "1"])
            .args([
                "-nographic",
                "-no-reboot",
                "-nodefaults",
                "-serial",
                "stdio",
            ])
            .arg("-kernel")
            .arg(guest.kernel)
            .arg("-initrd")
            .arg(guest.initrd)
            .arg("-append")
            .arg("console=ttyS0 quiet panic=-1 kiln.share=fixtures:/fixtures")
            .args(["-device", "virtio-serial-pci"])
            .arg("-chardev")
            .arg(format!(
                "socket,id=agent,path={},server=on,wait=off",
                agent_socket.display()
            ))
            .args([
                "-device",
                "virtserialport,chardev=agent,name=org.kiln.agent.0",
            ])
            .arg("-fsdev")
            .arg(format!(
                "local,security_model=none,id=fs0,path={}",
                guest.share.display()
            ))
            .args(["-device", "virtio-9p-pci,fsdev=fs0,mount_tag=fixtures"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let started = Instant::now();
        let mut child = command
            .spawn()
            .map_err(|e| format!("cannot start qemu-system-x86_64: {e}"))?;
        let (sender, lines) = mpsc::channel();
        let console = Arc::new(Mutex::new(Vec::new()));
        for stream in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let (sender, console) = (sender.clone(), console.clone());
            thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    console.lock().unwrap().push(line.clone());
                    let _ = sender.send(line);
                }
            });
        }
        Ok(Qemu {
            child,
            lines,
            console,
            agent_socket,
            started,
        })
    }

    /// Wait for a console line containing `needle`.
    pub fn wait_for_line(&self, needle: &str, timeout: Duration) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return Ok(line),
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => {
                    return Err(format!(
                        "no {needle:?} within {timeout:?}; console:\n{}",
                        self.console_tail()
                    ))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(format!(
                        "QEMU ended before {needle:?}; console:\n{}",
                        self.console_tail()
                    ))
                }
            }
        }
    }

    /// The last console lines.
    pub fn console_tail(&self) -> String {
        let console = self.console.lock().unwrap();
        let start = console.len().saturating_sub(30);
        console[start..].join("\n")
    }

    /// Wait for QEMU to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus, String> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return Ok(status),
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(50)),
                Ok(None) => return Err(format!("QEMU still running after {timeout:?}")),
                Err(e) => return Err(format!("cannot wait for QEMU: {e}")),
            }
        }
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
