//! After a restore from a snapshot: make the guest a fresh one (see `Message::Resume`).
//!
//! - entropy: the host's bytes go into the input pool with `RNDADDENTROPY` (credited), then
//!   `RNDRESEEDCRNG` reseeds the kernel's CRNG from it, so two VMs restored from one snapshot
//!   read different random bytes from then on;
//! - clock: `CLOCK_REALTIME` is set to the host's time (the monotonic clock goes on from the
//!   snapshot, as after a suspend);
//! - shares: mounted now, so no FUSE session is ever inside a snapshot;
//! - boot id: `/proc/sys/kernel/random/boot_id` cannot change, so the readiness record carries
//!   the id the host chose, and the agent prints a new record with it; its `t=` counts from
//!   the resume (the restored VM's own start), not from the snapshotted boot.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

use kiln_agent_proto::readiness::MARKER_PREFIX;
use kiln_agent_proto::{ReadyRecord, ResumeRequest, Transport};

use crate::cmdline::Share;
use crate::init;

/// `RNDADDENTROPY`: `_IOW('R', 0x03, int[2])`.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `RNDRESEEDCRNG`: `_IO('R', 0x07)`.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;
/// The most entropy bytes taken from one request.
const MAX_ENTROPY: usize = 512;

/// What the readiness record needs, set once the transports run.
#[derive(Debug, Clone, Default)]
pub struct ReadyInfo {
    /// Transports the agent serves on.
    pub transports: Vec<Transport>,
    /// `kiln.marker=` lines printed after the record.
    pub markers: Vec<String>,
}

static READY: OnceLock<ReadyInfo> = OnceLock::new();
static BOOT_ID: Mutex<Option<String>> = Mutex::new(None);
/// Guest uptime (ms) when the last resume was applied: a record's `t=` counts from there, so
/// the host's check that a record is not older than its VM holds for a restored VM too.
static RESUMED_AT_MS: Mutex<Option<u64>> = Mutex::new(None);

/// Records what later readiness records repeat.
pub fn set_ready_info(info: ReadyInfo) {
    let _ = READY.set(info);
}

/// The boot id to announce: the host's after a resume, the kernel's before.
pub fn boot_id() -> String {
    BOOT_ID
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
        .unwrap_or_else(init::boot_id)
}

/// The readiness record and marker lines, as one block for one write.
pub fn ready_lines() -> String {
    let info = READY.get().cloned().unwrap_or_default();
    let record = ReadyRecord {
        version: 1,
        boot: boot_id(),
        transports: info.transports,
        t_ms: init::ms_since_boot().saturating_sub(
            RESUMED_AT_MS
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .unwrap_or(0),
        ),
    };
    let mut lines = format!("{record}\n");
    for marker in &info.markers {
        lines.push_str(&format!("{MARKER_PREFIX} {marker}\n"));
    }
    lines
}

/// Carries out a resume; the first failure is the answer.
pub fn resume(req: &ResumeRequest) -> Result<(), String> {
    let pid1 = std::process::id() == 1;
    if req.boot_id.is_empty() || req.boot_id.len() > 64 || req.boot_id.contains(char::is_whitespace)
    {
        return Err(format!("resume: bad boot id {:?}", req.boot_id));
    }
    reseed(&req.entropy)?;
    set_clock(req.unix_secs, req.unix_nanos)?;
    if pid1 {
        for share in &req.shares {
            let share = Share {
                tag: share.tag.clone(),
                mountpoint: PathBuf::from(&share.mountpoint),
                read_only: share.read_only,
            };
            if !share.mountpoint.is_absolute() {
                return Err(format!(
                    "resume: share {:?}: mount point {} is not absolute",
                    share.tag,
                    share.mountpoint.display()
                ));
            }
            init::mount_share(&share).map_err(|e| format!("resume: {e}"))?;
        }
    }
    *BOOT_ID.lock().unwrap_or_else(|e| e.into_inner()) = Some(req.boot_id.clone());
    *RESUMED_AT_MS.lock().unwrap_or_else(|e| e.into_inner()) = Some(init::ms_since_boot());
    // The console is where the host looks for the record.
    let lines = ready_lines();
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(lines.as_bytes()).and_then(|()| out.flush());
    Ok(())
}

fn reseed(entropy: &[u8]) -> Result<(), String> {
    if entropy.len() < 32 {
        return Err(format!(
            "resume: {} bytes of entropy; at least 32 are needed",
            entropy.len()
        ));
    }
    let bytes = &entropy[..entropy.len().min(MAX_ENTROPY)];
    let random = File::open("/dev/urandom").map_err(|e| format!("resume: /dev/urandom: {e}"))?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = Vec::with_capacity(8 + bytes.len().next_multiple_of(4));
    info.extend_from_slice(&((bytes.len() * 8) as i32).to_ne_bytes());
    info.extend_from_slice(&(bytes.len() as i32).to_ne_bytes());
    info.extend_from_slice(bytes);
    info.resize(8 + bytes.len().next_multiple_of(4), 0);
    // u32-aligned buffer for the kernel.
    let mut words: Vec<u32> = info
        .chunks(4)
        .map(|c| u32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    // SAFETY: `words` holds a rand_pool_info whose buf_size matches the bytes that follow.
    let r = unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY, words.as_mut_ptr()) };
    if r != 0 {
        return Err(format!(
            "resume: RNDADDENTROPY: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    let r = unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG) };
    if r != 0 {
        return Err(format!(
            "resume: RNDRESEEDCRNG: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

fn set_clock(secs: u64, nanos: u32) -> Result<(), String> {
    if nanos >= 1_000_000_000 {
        return Err(format!("resume: {nanos} ns is not below one second"));
    }
    let ts = libc::timespec {
        tv_sec: libc::time_t::try_from(secs).map_err(|_| format!("resume: time {secs} s"))?,
        tv_nsec: nanos.into(),
    };
    // SAFETY: a valid timespec.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
        return Err(format!(
            "resume: cannot set the clock: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}
