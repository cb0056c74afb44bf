//! `kiln-agent`: PID 1 of kiln's initramfs, or a service in a full guest. See guest/PROTOCOL.md.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use kiln_agent::transport::{self, ShutdownHandler};
use kiln_agent::{children, cmdline, init, Agent, FilePolicy};
use kiln_agent_proto::{Transport, SERIAL_PORT_NAME, VSOCK_PORT};

const USAGE: &str = "usage: kiln-agent [--files DIR]... [--listen-unix PATH]

Serves kiln's guest protocol on vsock port 1024 and the virtio-serial port org.kiln.agent.0.
As PID 1 it first mounts /proc /sys /dev /tmp /run, loads the modules in /etc/kiln/modules and
mounts kiln.share=<tag>:<mountpoint>[:ro] shares from the kernel command line.

  --files DIR         allow put/get only under DIR (repeatable; default /, or kiln.files=)
  --listen-unix PATH  also serve on a Unix socket at PATH (running the agent on a host)";

/// How long to wait for the virtio-serial port when virtio_console is there but the port is not
/// yet (the host announces ports asynchronously after the driver loads).
const SERIAL_PORT_WAIT: Duration = Duration::from_secs(1);

struct Args {
    files: Vec<PathBuf>,
    listen_unix: Option<PathBuf>,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Option<Args>, String> {
    let mut parsed = Args {
        files: Vec::new(),
        listen_unix: None,
    };
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--files" => parsed.files.push(value("--files")?.into()),
            "--listen-unix" => parsed.listen_unix = Some(value("--listen-unix")?.into()),
            "--help" | "-h" => {
                println!("{USAGE}");
                return Ok(None);
            }
            "--version" => {
                println!("kiln-agent {}", env!("CARGO_PKG_VERSION"));
                return Ok(None);
            }
            // The kernel passes unknown boot words to init as arguments; PID 1 ignores them.
            other if std::process::id() == 1 => {
                let _ = other;
            }
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    Ok(Some(parsed))
}

fn warn(message: &str) {
    eprintln!("kiln-agent: warning: {message}");
}

fn main() {
    let pid1 = std::process::id() == 1;
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(Some(args)) => args,
        Ok(None) => return,
        Err(message) => {
            eprintln!("kiln-agent: {message}");
            std::process::exit(2);
        }
    };
    if pid1 {
        let warnings = init::mount_system();
        init::ensure_console();
        warnings.iter().for_each(|w| warn(w));
        if std::env::var_os("PATH").is_none() {
            // Still single-threaded here, so changing the environment races with nothing.
            std::env::set_var("PATH", init::DEFAULT_PATH);
        }
        if let Err(e) = init::set_hostname(init::HOSTNAME) {
            warn(&format!("cannot set the hostname: {e}"));
        }
        init::load_modules(Path::new(init::MODULES_LIST))
            .iter()
            .for_each(|w| warn(w));
    }
    if let Err(e) = children::start_reaper() {
        warn(&e.to_string());
    }
    let (options, warnings) =
        cmdline::parse(&std::fs::read_to_string("/proc/cmdline").unwrap_or_default());
    warnings.iter().for_each(|w| warn(w));
    if pid1 {
        for share in &options.shares {
            if let Err(e) = init::mount_share(share) {
                warn(&e);
            }
        }
    }
    let roots: Vec<PathBuf> = args
        .files
        .iter()
        .chain(&options.file_roots)
        .cloned()
        .collect();
    let agent = Arc::new(Agent {
        files: if roots.is_empty() {
            FilePolicy::default()
        } else {
            FilePolicy::new(&roots)
        },
    });
    let on_shutdown: ShutdownHandler = Arc::new(move |reboot| {
        let e = init::power_off(reboot, pid1);
        eprintln!("kiln-agent: shutdown: {e}");
    });

    let transports = start_transports(&args, &agent, &on_shutdown);
    kiln_agent::resume::set_ready_info(kiln_agent::resume::ReadyInfo {
        transports,
        markers: options.markers.clone(),
    });
    let lines = kiln_agent::resume::ready_lines();
    // One write, so kernel messages cannot land inside the record.
    let mut stdout = std::io::stdout().lock();
    let _ = stdout
        .write_all(lines.as_bytes())
        .and_then(|()| stdout.flush());
    drop(stdout);

    // Transports run on their own threads; PID 1 must never exit.
    loop {
        thread::park();
    }
}

fn start_transports(
    args: &Args,
    agent: &Arc<Agent>,
    on_shutdown: &ShutdownHandler,
) -> Vec<Transport> {
    let mut transports = Vec::new();
    match transport::vsock_listener(VSOCK_PORT) {
        Ok(Some(listener)) => {
            let (agent, on_shutdown) = (agent.clone(), on_shutdown.clone());
            thread::spawn(move || transport::serve_vsock(listener, agent, on_shutdown));
            transports.push(Transport::Vsock(VSOCK_PORT));
        }
        Ok(None) => {}
        Err(e) => warn(&format!("cannot listen on vsock port {VSOCK_PORT}: {e}")),
    }
    if let Some(device) = find_serial_port(transports.is_empty()) {
        match transport::open_serial(&device) {
            Ok(port) => {
                let (agent, on_shutdown) = (agent.clone(), on_shutdown.clone());
                thread::spawn(move || transport::serve_serial(port, &agent, &on_shutdown));
                transports.push(Transport::Serial(SERIAL_PORT_NAME.into()));
            }
            Err(e) => warn(&format!("cannot open {}: {e}", device.display())),
        }
    }
    if let Some(path) = &args.listen_unix {
        match transport::serve_unix(path, agent.clone(), on_shutdown.clone()) {
            Ok(()) => transports.push(Transport::Unix(path.display().to_string())),
            Err(e) => warn(&format!("cannot listen on {}: {e}", path.display())),
        }
    }
    transports
}

/// Find the agent's virtio-serial port; when nothing else serves and virtio_console is loaded,
/// wait a little for the host to announce it.
fn find_serial_port(wait: bool) -> Option<PathBuf> {
    let (sys_class, dev) = (Path::new("/sys/class"), Path::new("/dev"));
    let deadline = Instant::now() + SERIAL_PORT_WAIT;
    loop {
        let found = transport::find_serial_port(sys_class, dev, SERIAL_PORT_NAME);
        let class_exists = sys_class.join("virtio-ports").exists();
        if found.is_some() || !wait || !class_exists || Instant::now() >= deadline {
            return found;
        }
        thread::sleep(Duration::from_millis(5));
    }
}
