//! The transports: an AF_VSOCK listener (kiln's VMM, Firecracker-style hosts), the virtio-serial
//! port `org.kiln.agent.0` (QEMU without vhost-vsock), and a Unix socket for running on a host.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use crate::session::{log_session_error, serve_session, serve_stream, Agent, Outcome};

/// How long a per-connection client may stay silent before the agent drops it.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// `IOCTL_VM_SOCKETS_GET_LOCAL_CID` from `<linux/vm_sockets.h>`: `_IO(7, 0xb9)`.
const IOCTL_VM_SOCKETS_GET_LOCAL_CID: libc::c_ulong = 0x7b9;

/// What the agent does when a client asks for a shutdown.
pub type ShutdownHandler = Arc<dyn Fn(bool) + Send + Sync>;

/// Listen on vsock `port` if this guest has a vsock transport (a guest CID), else `Ok(None)`.
pub fn vsock_listener(port: u32) -> io::Result<Option<OwnedFd>> {
    if local_cid().is_none() {
        return Ok(None);
    }
    // SAFETY: socket(2) with constant arguments; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_vm is plain data; all-zero is valid before the fields are set.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_port = port;
    addr.svm_cid = libc::VMADDR_CID_ANY;
    // SAFETY: `addr` is a valid sockaddr_vm and the length passed is its size.
    let rc = unsafe {
        libc::bind(
            socket.as_raw_fd(),
            (&addr as *const libc::sockaddr_vm).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: listen(2) on a descriptor we own.
    if unsafe { libc::listen(socket.as_raw_fd(), 64) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Some(socket))
}

/// This guest's vsock CID, when a guest-side vsock transport is loaded.
fn local_cid() -> Option<u32> {
    let dev = File::open("/dev/vsock").ok()?;
    let mut cid: u32 = libc::VMADDR_CID_ANY;
    // SAFETY: the ioctl writes one u32 through the pointer, which points at `cid`.
    let rc = unsafe { libc::ioctl(dev.as_raw_fd(), IOCTL_VM_SOCKETS_GET_LOCAL_CID, &mut cid) };
    // CIDs 0-2 belong to the hypervisor, local and host; ANY means no transport.
    (rc == 0 && cid > 2 && cid != libc::VMADDR_CID_ANY).then_some(cid)
}

/// Accept vsock connections forever, one thread and one session per connection.
pub fn serve_vsock(listener: OwnedFd, agent: Arc<Agent>, on_shutdown: ShutdownHandler) {
    loop {
        // SAFETY: accept4(2) on a listening socket we own; peer address not requested.
        let fd = unsafe {
            libc::accept4(
                listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if fd < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                eprintln!("kiln-agent: vsock accept failed: {e}");
                thread::sleep(Duration::from_millis(100));
            }
            continue;
        }
        // SAFETY: `fd` is a fresh connected socket nobody else owns.
        let conn = unsafe { OwnedFd::from_raw_fd(fd) };
        set_idle_timeout(&conn);
        let (agent, on_shutdown) = (agent.clone(), on_shutdown.clone());
        thread::spawn(move || serve_connection(File::from(conn), &agent, &on_shutdown));
    }
}

/// Serve connections on a Unix socket at `path` forever (replacing a stale socket file).
pub fn serve_unix(path: &Path, agent: Arc<Agent>, on_shutdown: ShutdownHandler) -> io::Result<()> {
    let _ = fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    thread::spawn(move || loop {
        match listener.accept() {
            Ok((conn, _)) => {
                let _ = conn.set_read_timeout(Some(IDLE_TIMEOUT));
                let (agent, on_shutdown) = (agent.clone(), on_shutdown.clone());
                thread::spawn(move || serve_connection(conn, &agent, &on_shutdown));
            }
            Err(e) => {
                eprintln!("kiln-agent: unix accept failed: {e}");
                thread::sleep(Duration::from_millis(100));
            }
        }
    });
    Ok(())
}

fn serve_connection<S: io::Read + io::Write + AsRawFd>(
    mut conn: S,
    agent: &Agent,
    on_shutdown: &ShutdownHandler,
) {
    match serve_session(&mut conn, agent) {
        Ok(Outcome::Shutdown { reboot }) => {
            // Let the acknowledgement reach the host: wait (at most HANGUP_WAIT) until it hangs
            // up. Each read is bounded too: the idle timeout alone would hold the power-off
            // for a minute when a host keeps the connection open.
            set_recv_timeout(conn.as_raw_fd(), HANGUP_POLL);
            wait_for_hangup(&mut conn);
            on_shutdown(reboot);
        }
        Ok(_) => {}
        Err(e) => log_session_error(&e),
    }
}

/// How long a shutdown waits for the host to hang up, and the longest single read of that wait.
const HANGUP_WAIT: Duration = Duration::from_secs(1);
const HANGUP_POLL: Duration = Duration::from_millis(100);

fn wait_for_hangup<S: io::Read>(conn: &mut S) {
    let deadline = std::time::Instant::now() + HANGUP_WAIT;
    let mut buf = [0u8; 64];
    while std::time::Instant::now() < deadline {
        match conn.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted
                        | io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

fn set_idle_timeout(conn: &OwnedFd) {
    set_recv_timeout(conn.as_raw_fd(), IDLE_TIMEOUT);
}

/// SO_RCVTIMEO on any socket (vsock has no std type to call `set_read_timeout` on).
fn set_recv_timeout(fd: std::os::fd::RawFd, timeout: Duration) {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: `tv` is a valid timeval and the length passed is its size.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        );
    }
}

/// Find the device of the virtio-serial port called `name` by scanning
/// `<sys_class>/virtio-ports/*/name`; the device is `<dev>/<entry>` (e.g. `/dev/vport0p1`).
pub fn find_serial_port(sys_class: &Path, dev: &Path, name: &str) -> Option<PathBuf> {
    let mut entries: Vec<_> = fs::read_dir(sys_class.join("virtio-ports"))
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.file_name())
        .collect();
    entries.sort();
    entries.into_iter().find_map(|entry| {
        let port_name =
            fs::read_to_string(sys_class.join("virtio-ports").join(&entry).join("name")).ok()?;
        (port_name.trim_end() == name).then(|| dev.join(&entry))
    })
}

/// Open the virtio-serial port device at `path` for serving.
pub fn open_serial(path: &Path) -> io::Result<File> {
    OpenOptions::new().read(true).write(true).open(path)
}

/// Serve an open virtio-serial port forever: sessions run one after another; while the host side
/// is disconnected, reads return end of file and the agent polls every 10 ms.
pub fn serve_serial(mut port: File, agent: &Agent, on_shutdown: &ShutdownHandler) {
    loop {
        match serve_stream(&mut port, agent) {
            Outcome::Shutdown { reboot } => {
                // The port has no hang-up to wait for: give the host a moment to drain the reply.
                thread::sleep(Duration::from_millis(50));
                on_shutdown(reboot);
            }
            Outcome::Closed | Outcome::Served => thread::sleep(Duration::from_millis(10)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_port_is_found_by_name() {
        let sys = tempfile::tempdir().expect("tempdir");
        for (entry, name) in [
            ("vport0p0", "org.qemu.guest_agent.0"),
            ("vport0p1", "org.kiln.agent.0"),
        ] {
            let dir = sys.path().join("virtio-ports").join(entry);
            fs::create_dir_all(&dir).expect("mkdir");
            fs::write(dir.join("name"), format!("{name}\n")).expect("name");
        }
        assert_eq!(
            find_serial_port(sys.path(), Path::new("/dev"), "org.kiln.agent.0"),
            Some(PathBuf::from("/dev/vport0p1"))
        );
        assert_eq!(
            find_serial_port(sys.path(), Path::new("/dev"), "org.other"),
            None
        );
        assert_eq!(
            find_serial_port(&sys.path().join("none"), Path::new("/dev"), "x"),
            None
        );
    }

    #[test]
    fn a_shutdown_powers_off_within_its_hangup_wait_when_the_host_keeps_the_connection_open() {
        use crate::files::FilePolicy;
        use kiln_agent_proto::client::Client;
        use std::os::unix::net::UnixStream;
        use std::sync::mpsc;
        use std::time::Instant;

        let (host, guest) = UnixStream::pair().expect("socketpair");
        // As serve_unix/serve_vsock set it: reads that are idle for a minute give up.
        guest.set_read_timeout(Some(IDLE_TIMEOUT)).expect("timeout");
        let (tx, rx) = mpsc::channel();
        let on_shutdown: ShutdownHandler = Arc::new(move |reboot| {
            let _ = tx.send((reboot, Instant::now()));
        });
        let agent = Agent {
            files: FilePolicy::new(&[]),
        };
        let server = thread::spawn(move || serve_connection(guest, &agent, &on_shutdown));
        let mut client = Client::new(host.try_clone().expect("clone"));
        client.shutdown(false).expect("acknowledged");
        let answered = Instant::now();
        // The host keeps `host` open: the agent must not wait for it longer than HANGUP_WAIT.
        let (reboot, at) = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("power-off requested while the host kept the connection open");
        assert!(!reboot);
        assert!(
            at.duration_since(answered) < HANGUP_WAIT + Duration::from_millis(500),
            "{:?}",
            at.duration_since(answered)
        );
        server.join().expect("server");
        drop(host);
    }
}
