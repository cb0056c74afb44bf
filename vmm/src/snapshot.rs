//! Snapshots: pause a VM, save its memory and complete machine state to one file; start new VMs
//! from that file.
//!
//! File layout (all offsets in bytes):
//! - `0..4096`: the header, `KILNSNAP 1\n` then one JSON object ([`Header`]) padded with
//!   newlines: format version, kiln version, the guest shape the caller named, the length and
//!   SHA-256 of the state, and where the memory is and its SHA-256;
//! - `4096..`: the machine state as JSON ([`MachineState`]): per vCPU CPUID, MSRs, registers,
//!   special registers, XSAVE, XCRs, debug registers, LAPIC, events and MP state; the in-kernel
//!   PIC, IOAPIC and PIT; the KVM clock; COM1; each virtio-mmio transport with its queues;
//! - from `memory_offset` (page-aligned): guest RAM, region after region, all-zero pages left
//!   as holes.
//!
//! A restore maps the memory `MAP_PRIVATE` from the file: pages load lazily and stay shared
//! copy-on-write between every VM restored from the same file, so restoring does not get slower
//! with guest memory size. The state's checksum is verified on every restore, the memory's
//! once per file per process (hashing it each time would make restores grow with memory).
//!
//! What is not in a snapshot, and is fresh after a restore: the i8042 (only its reset command
//! matters), the ACPI PM and debug ports (phases start over), host connections of the vsock
//! device (the guest gets a transport-reset event), host-side share and disk files (the caller
//! names new ones; a share must not be mounted when the snapshot is taken, see
//! [`kiln_devices::virtio::VirtioDevice::snapshot_blocker`]).

use std::collections::HashSet;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, CpuId, Msrs,
    Xsave, KVM_CLOCK_TSC_STABLE, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES, KVM_MAX_MSR_ENTRIES,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestMemory as _, GuestMemoryRegion as _, GuestRegionMmap};

use crate::device_manager::DeviceManager;
use crate::exit::ExitReason;
use crate::memory::{ram_ranges, GuestMemory};
use crate::vm::{
    attach_devices, finish, kick_vcpus, launch, open_vm, register_memory, BootInfo, Error, Parts,
    RemoveOnError, VmConfig, VmHandle,
};

/// The first bytes of every snapshot file.
const MAGIC: &[u8] = b"KILNSNAP 1\n";
/// Version of the layout above; a file of another version is refused. 2: the memory hash
/// covers the non-zero pages only (with their offsets), so checking it reads only those.
pub const FORMAT_VERSION: u32 = 2;
/// Size of the header block.
const HEADER_LEN: u64 = 4096;
/// Page size for alignment and hole punching.
const PAGE: usize = 4096;
/// How long the vCPUs and the event loop get to stop before a snapshot gives up.
const PAUSE_DEADLINE: Duration = Duration::from_secs(5);
/// `MSR_IA32_TSC_DEADLINE`: restored after `MSR_IA32_TSC` (and the LAPIC) or a timer is lost.
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

/// Why a snapshot could not be written or read. Each names the file and what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The VM holds state a snapshot cannot carry; nothing was paused.
    #[error("cannot snapshot this VM now: {0}")]
    NotNow(String),
    /// The VM is not running.
    #[error("cannot snapshot: the VM has already ended ({0})")]
    Ended(String),
    /// A vCPU or the event loop did not stop in time.
    #[error("cannot pause the VM: {0}")]
    Pause(String),
    /// A KVM ioctl failed.
    #[error("KVM {op} failed: {source}")]
    Kvm {
        /// Which ioctl.
        op: &'static str,
        /// The OS error.
        source: kvm_ioctls::Error,
    },
    /// Reading or writing the file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The snapshot file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not a usable snapshot (truncated, corrupt, another format or kiln version,
    /// another guest shape).
    #[error("{}: {why}", path.display())]
    Invalid {
        /// The snapshot file.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// The VM described by the snapshot could not be rebuilt.
    #[error("{}: cannot restore: {source}", path.display())]
    Restore {
        /// The snapshot file.
        path: PathBuf,
        /// What failed.
        source: Box<Error>,
    },
}

fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> SnapshotError {
    move |source| SnapshotError::Kvm { op, source }
}

/// The header block.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// [`FORMAT_VERSION`].
    pub format: u32,
    /// The kiln version that wrote it; another version's snapshot is refused.
    pub kiln_version: String,
    /// The guest shape the caller named when taking it (kernel, initrd, memory, vCPUs, command
    /// line, devices: whatever identifies "the same guest"); a restore must name the same.
    pub shape: String,
    /// Length of the state JSON.
    pub state_len: u64,
    /// SHA-256 of the state JSON, hex.
    pub state_sha256: String,
    /// Where guest RAM starts in the file.
    pub memory_offset: u64,
    /// Bytes of guest RAM.
    pub memory_len: u64,
    /// SHA-256 over every non-zero 4 KiB page of guest RAM, in order, each as its offset
    /// (little-endian u64) then its bytes; hex. Zero pages are holes in the file.
    pub memory_sha256: String,
}

impl Header {
    /// The snapshot's identity: a hash over its state and memory hashes.
    pub fn id(&self) -> String {
        let mut h = Sha256::new();
        h.update(self.state_sha256.as_bytes());
        h.update(self.memory_sha256.as_bytes());
        hex(&h.finalize())
    }
}

/// One vCPU's state.
#[derive(Serialize, Deserialize)]
struct VcpuSnapshot {
    cpuid: Vec<kvm_cpuid_entry2>,
    msrs: Vec<kvm_msr_entry>,
    regs: kvm_regs,
    sregs: kvm_sregs,
    /// `kvm_xsave.region` then its extension, as 32-bit words.
    xsave: Vec<u32>,
    xcrs: kvm_xcrs,
    debug_regs: kvm_debugregs,
    lapic: kvm_lapic_state,
    vcpu_events: kvm_vcpu_events,
    mp_state: kvm_mp_state,
}

/// Everything but memory.
#[derive(Serialize, Deserialize)]
struct MachineState {
    memory_mib: u64,
    vcpus: Vec<VcpuSnapshot>,
    irqchips: Vec<kvm_irqchip>,
    pit: kvm_pit_state2,
    clock: kvm_clock_data,
    serial: kiln_devices::legacy::SerialSnapshot,
    devices: Vec<kiln_devices::virtio::mmio::TransportState>,
    boot: SavedBootInfo,
}

#[derive(Serialize, Deserialize)]
struct SavedBootInfo {
    protocol: String,
    entry: u64,
    cmdline: String,
    initrd: Option<(u64, u64)>,
}

/// What a snapshot wrote.
#[derive(Debug, Clone)]
pub struct SnapshotInfo {
    /// The header as written.
    pub header: Header,
    /// Time the vCPUs and devices took to stop.
    pub pause: Duration,
    /// Time to read the state and write the file.
    pub write: Duration,
}

/// How long each phase of a restore took.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RestoreTimings {
    /// Reading and checking the header and state (and the memory hash on first use).
    pub read_ms: f64,
    /// Mapping guest memory from the file.
    pub memory_ms: f64,
    /// Creating the VM, its devices and vCPUs, and loading their state.
    pub state_ms: f64,
    /// From the start of the restore until the vCPUs run.
    pub total_ms: f64,
}

/// What a restore did.
#[derive(Debug, Clone)]
pub struct RestoreInfo {
    /// The snapshot's header.
    pub header: Header,
    /// The snapshot's id ([`Header::id`]).
    pub id: String,
    /// Phase timings.
    pub timings: RestoreTimings,
    /// Whether this restore hashed the memory (the first use of the file in this process).
    pub verified_memory: bool,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

impl VmHandle {
    /// Pauses the VM, writes its memory and state to `path` (atomically: a temporary file
    /// renamed into place; nothing is left on failure) and ends the VM. `shape` names the guest
    /// shape a restore must match. Refused without pausing while a device holds state a
    /// snapshot cannot carry (a mounted share, a disk request in flight).
    pub fn snapshot(&mut self, path: &Path, shape: &str) -> Result<SnapshotInfo, SnapshotError> {
        if let Some(reason) = self.latch.get() {
            return Err(SnapshotError::Ended(reason.to_string()));
        }
        let Some(r) = self.running.as_ref() else {
            return Err(SnapshotError::Ended("torn down".into()));
        };
        for t in &r.transports {
            let t = t.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(why) = t.device().snapshot_blocker() {
                return Err(SnapshotError::NotNow(why));
            }
        }
        let paused = Instant::now();
        let mut r = self.running.take().expect("checked above");
        let deadline = Instant::now() + PAUSE_DEADLINE;
        r.events.signal_stop();
        let vcpus_stopped = kick_vcpus(&r.threads, deadline);
        let events_stopped = r.events.wait_until(deadline);
        if !(vcpus_stopped && events_stopped) {
            self.latch.set(ExitReason::Killed);
            let writer = self.console_writer.take();
            std::thread::spawn(move || finish(r, writer));
            return Err(SnapshotError::Pause(
                "a vCPU or device did not stop within 5 s; the VM was killed".into(),
            ));
        }
        r.events.join();
        let mut vcpus = Vec::with_capacity(r.threads.len());
        for (handle, _) in r.threads.drain(..) {
            match handle.join() {
                Ok(fd) => vcpus.push(fd),
                Err(_) => {
                    self.latch.set(ExitReason::Killed);
                    return Err(SnapshotError::Pause("a vCPU thread panicked".into()));
                }
            }
        }
        // A guest that ended on its own while pausing has nothing left to save.
        if let Some(reason) = self.latch.get() {
            return Err(SnapshotError::Ended(reason.to_string()));
        }
        let pause = paused.elapsed();
        let written = Instant::now();
        let result = save(&r, &vcpus, &self.info, self.memory_mib)
            .and_then(|state| write_file(path, shape, &state, &r.mem));
        // The VM does not go on: it was paused for good.
        self.latch.set(ExitReason::Killed);
        drop(vcpus);
        let writer = self.console_writer.take();
        finish(r, writer);
        let header = result?;
        Ok(SnapshotInfo {
            header,
            pause,
            write: written.elapsed(),
        })
    }
}

/// Reads the state of a paused VM.
fn save(
    r: &crate::vm::Running,
    vcpus: &[VcpuFd],
    info: &BootInfo,
    memory_mib: u64,
) -> Result<Vec<u8>, SnapshotError> {
    let sys = Kvm::new().map_err(kvm("open /dev/kvm"))?;
    let msr_list = sys
        .get_msr_index_list()
        .map_err(kvm("KVM_GET_MSR_INDEX_LIST"))?;
    let xsave_size = usize::try_from(sys.check_extension_int(Cap::Xsave2)).unwrap_or(0);
    let mut saved = Vec::with_capacity(vcpus.len());
    for vcpu in vcpus {
        saved.push(save_vcpu(vcpu, msr_list.as_slice(), xsave_size)?);
    }
    let mut irqchips = Vec::new();
    for chip_id in [
        KVM_IRQCHIP_PIC_MASTER,
        KVM_IRQCHIP_PIC_SLAVE,
        KVM_IRQCHIP_IOAPIC,
    ] {
        let mut chip = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        r.vm_fd
            .get_irqchip(&mut chip)
            .map_err(kvm("KVM_GET_IRQCHIP"))?;
        irqchips.push(chip);
    }
    let pit = r.vm_fd.get_pit2().map_err(kvm("KVM_GET_PIT2"))?;
    let clock = r.vm_fd.get_clock().map_err(kvm("KVM_GET_CLOCK"))?;
    let serial = r.serial.lock().unwrap_or_else(|e| e.into_inner()).state();
    let mut devices = Vec::with_capacity(r.transports.len());
    for t in &r.transports {
        let t = t.lock().unwrap_or_else(|e| e.into_inner());
        devices.push(t.save().map_err(SnapshotError::NotNow)?);
    }
    let state = MachineState {
        memory_mib,
        vcpus: saved,
        irqchips,
        pit,
        clock,
        serial,
        devices,
        boot: SavedBootInfo {
            protocol: info.protocol.to_string(),
            entry: info.entry,
            cmdline: info.cmdline.clone(),
            initrd: info.initrd,
        },
    };
    serde_json::to_vec(&state).map_err(|e| SnapshotError::NotNow(format!("cannot encode: {e}")))
}

fn save_vcpu(
    vcpu: &VcpuFd,
    msr_list: &[u32],
    xsave_size: usize,
) -> Result<VcpuSnapshot, SnapshotError> {
    // Order as Firecracker's: MP state first, events last (the GET ioctls can change state).
    let mp_state = vcpu.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?;
    let regs = vcpu.get_regs().map_err(kvm("KVM_GET_REGS"))?;
    let sregs = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    let xsave = get_xsave(vcpu, xsave_size)?;
    let xcrs = vcpu.get_xcrs().map_err(kvm("KVM_GET_XCRS"))?;
    let debug_regs = vcpu.get_debug_regs().map_err(kvm("KVM_GET_DEBUGREGS"))?;
    let lapic = vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
    let cpuid = vcpu
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm("KVM_GET_CPUID2"))?
        .as_slice()
        .to_vec();
    let msrs = get_msrs(vcpu, msr_list)?;
    let vcpu_events = vcpu.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?;
    Ok(VcpuSnapshot {
        cpuid,
        msrs,
        regs,
        sregs,
        xsave,
        xcrs,
        debug_regs,
        lapic,
        vcpu_events,
        mp_state,
    })
}

fn get_xsave(vcpu: &VcpuFd, xsave_size: usize) -> Result<Vec<u32>, SnapshotError> {
    let base = std::mem::size_of::<kvm_bindings::kvm_xsave>();
    let extra = xsave_size.saturating_sub(base).div_ceil(4);
    let mut xsave =
        Xsave::new(extra).map_err(|e| SnapshotError::NotNow(format!("XSAVE buffer: {e:?}")))?;
    if xsave_size > 0 {
        // SAFETY: the buffer holds the size KVM_CAP_XSAVE2 reported.
        unsafe { vcpu.get_xsave2(&mut xsave) }.map_err(kvm("KVM_GET_XSAVE2"))?;
    } else {
        let legacy = vcpu.get_xsave().map_err(kvm("KVM_GET_XSAVE"))?;
        // SAFETY: only the fixed part is written; the length field is untouched.
        unsafe { xsave.as_mut_fam_struct() }.xsave = legacy;
    }
    let mut words = xsave.as_fam_struct_ref().xsave.region.to_vec();
    words.extend_from_slice(xsave.as_slice());
    Ok(words)
}

/// Every MSR KVM lists that this vCPU can read; one that fails to read is left out.
fn get_msrs(vcpu: &VcpuFd, list: &[u32]) -> Result<Vec<kvm_msr_entry>, SnapshotError> {
    let mut out = Vec::with_capacity(list.len());
    let mut pending: &[u32] = list;
    while !pending.is_empty() {
        let chunk = &pending[..pending.len().min(KVM_MAX_MSR_ENTRIES)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries)
            .map_err(|e| SnapshotError::NotNow(format!("MSR list: {e:?}")))?;
        let read = vcpu.get_msrs(&mut msrs).map_err(kvm("KVM_GET_MSRS"))?;
        out.extend_from_slice(&msrs.as_slice()[..read]);
        // KVM stops at the first MSR it cannot read: skip that one.
        let consumed = (read + 1).min(chunk.len());
        pending = &pending[consumed..];
    }
    Ok(out)
}

/// Writes header, state and memory to a temporary file beside `path`, then renames it.
fn write_file(
    path: &Path,
    shape: &str,
    state: &[u8],
    mem: &GuestMemory,
) -> Result<Header, SnapshotError> {
    let io = |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    };
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
    let mut tmp = tempfile::Builder::new()
        .prefix(".snapshot-")
        .suffix(".tmp")
        .tempfile_in(dir.unwrap_or(Path::new(".")))
        .map_err(io)?;
    let memory_offset = (HEADER_LEN + state.len() as u64).next_multiple_of(PAGE as u64);
    let memory_len: u64 = mem.iter().map(|r| r.len()).sum();
    let file = tmp.as_file_mut();
    file.set_len(memory_offset + memory_len).map_err(io)?;
    file.seek(SeekFrom::Start(HEADER_LEN)).map_err(io)?;
    file.write_all(state).map_err(io)?;
    // Memory, skipping zero pages (the file has holes there), hashing everything.
    let mut hasher = Sha256::new();
    let mut offset = memory_offset;
    let mut page = vec![0u8; PAGE];
    for region in mem.iter() {
        let len = region.len();
        let mut at = 0u64;
        while at < len {
            let n = PAGE.min((len - at) as usize);
            let buf = &mut page[..n];
            vm_memory::Bytes::read_slice(region, buf, vm_memory::MemoryRegionAddress(at))
                .map_err(|e| io(std::io::Error::other(e.to_string())))?;
            if buf.iter().any(|&b| b != 0) {
                hasher.update((offset - memory_offset).to_le_bytes());
                hasher.update(&*buf);
                file.seek(SeekFrom::Start(offset)).map_err(io)?;
                file.write_all(buf).map_err(io)?;
            }
            at += n as u64;
            offset += n as u64;
        }
    }
    let header = Header {
        format: FORMAT_VERSION,
        kiln_version: env!("CARGO_PKG_VERSION").to_string(),
        shape: shape.to_string(),
        state_len: state.len() as u64,
        state_sha256: hex(&Sha256::digest(state)),
        memory_offset,
        memory_len,
        memory_sha256: hex(&hasher.finalize()),
    };
    let mut block = MAGIC.to_vec();
    serde_json::to_writer(&mut block, &header)
        .map_err(|e| io(std::io::Error::other(e.to_string())))?;
    block.push(b'\n');
    if block.len() as u64 > HEADER_LEN {
        return Err(SnapshotError::Invalid {
            path: path.to_path_buf(),
            why: format!(
                "the header ({} bytes, shape {} bytes) does not fit in {HEADER_LEN} bytes",
                block.len(),
                shape.len()
            ),
        });
    }
    file.seek(SeekFrom::Start(0)).map_err(io)?;
    file.write_all(&block).map_err(io)?;
    file.sync_all().map_err(io)?;
    tmp.persist(path).map_err(|e| io(e.error))?;
    Ok(header)
}

/// Reads and checks a snapshot's header without restoring it (for `kiln` to decide whether a
/// cached snapshot is usable).
pub fn read_header(path: &Path) -> Result<Header, SnapshotError> {
    let mut file = File::open(path).map_err(|source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    read_header_from(path, &mut file)
}

fn read_header_from(path: &Path, file: &mut File) -> Result<Header, SnapshotError> {
    let invalid = |why: String| SnapshotError::Invalid {
        path: path.to_path_buf(),
        why,
    };
    let mut block = vec![0u8; HEADER_LEN as usize];
    let mut filled = 0;
    while filled < block.len() {
        match file.read(&mut block[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) => {
                return Err(SnapshotError::Io {
                    path: path.to_path_buf(),
                    source: e,
                })
            }
        }
    }
    if !block.starts_with(MAGIC) {
        return Err(invalid("not a kiln snapshot (no KILNSNAP 1 header)".into()));
    }
    let json = &block[MAGIC.len()..filled];
    let end = json.iter().position(|&b| b == b'\n').unwrap_or(json.len());
    let header: Header = serde_json::from_slice(&json[..end])
        .map_err(|e| invalid(format!("unreadable header: {e}")))?;
    if header.format != FORMAT_VERSION {
        return Err(invalid(format!(
            "snapshot format {} (this kiln reads format {FORMAT_VERSION})",
            header.format
        )));
    }
    let ours = env!("CARGO_PKG_VERSION");
    if header.kiln_version != ours {
        return Err(invalid(format!(
            "written by kiln {} (this is kiln {ours}); take a new snapshot",
            header.kiln_version
        )));
    }
    let len = file
        .metadata()
        .map_err(|source| SnapshotError::Io {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    let state_end = HEADER_LEN.checked_add(header.state_len);
    let memory_end = header.memory_offset.checked_add(header.memory_len);
    match (state_end, memory_end) {
        (Some(s), Some(m))
            if s <= header.memory_offset
                && m <= len
                && header.memory_offset.is_multiple_of(PAGE as u64) => {}
        _ => {
            return Err(invalid(format!(
                "truncated or inconsistent: {len} bytes, state {} bytes, memory {} bytes at {}",
                header.state_len, header.memory_len, header.memory_offset
            )))
        }
    }
    Ok(header)
}

/// A file as the memory check knows it: device, inode, size, mtime (s, ns).
type FileKey = (u64, u64, u64, i64, i64);

/// Snapshot files whose memory hash this process has checked.
fn verified() -> &'static Mutex<HashSet<FileKey>> {
    static SET: OnceLock<Mutex<HashSet<FileKey>>> = OnceLock::new();
    SET.get_or_init(Default::default)
}

/// Hashes the memory part of the file unless this process already did; returns whether it
/// hashed.
fn verify_memory(path: &Path, file: &mut File, header: &Header) -> Result<bool, SnapshotError> {
    let io = |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    };
    let meta = file.metadata().map_err(io)?;
    let key = (
        meta.dev(),
        meta.ino(),
        meta.len(),
        meta.mtime(),
        meta.mtime_nsec(),
    );
    if verified()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .contains(&key)
    {
        return Ok(false);
    }
    let hasher = hash_memory(file, header).map_err(io)?;
    if hex(&hasher.finalize()) != header.memory_sha256 {
        return Err(SnapshotError::Invalid {
            path: path.to_path_buf(),
            why: "guest memory does not match its checksum (the file is corrupt)".into(),
        });
    }
    verified()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key);
    Ok(true)
}

/// Hashes the memory part of the file as [`Header::memory_sha256`] defines it, reading only
/// the file's data extents (`SEEK_DATA`/`SEEK_HOLE`): holes are zero pages, which the hash skips.
fn hash_memory(file: &mut File, header: &Header) -> std::io::Result<Sha256> {
    let start = header.memory_offset;
    let end = start + header.memory_len;
    let fd = file.as_raw_fd();
    let mut hasher = Sha256::new();
    let mut page = vec![0u8; PAGE];
    let mut at = start;
    while at < end {
        // SAFETY: lseek on an fd this function borrows.
        let data = unsafe { libc::lseek(fd, at as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // only a hole up to the end of the file
            }
            return Err(e);
        }
        let data = (data as u64).max(at);
        if data >= end {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
        let hole = if hole < 0 {
            end
        } else {
            (hole as u64).min(end)
        };
        // Whole pages, from the page holding `data`.
        let mut pos = start + (data - start) / PAGE as u64 * PAGE as u64;
        file.seek(SeekFrom::Start(pos))?;
        while pos < hole {
            let n = (PAGE as u64).min(end - pos) as usize;
            file.read_exact(&mut page[..n])?;
            if page[..n].iter().any(|&b| b != 0) {
                hasher.update((pos - start).to_le_bytes());
                hasher.update(&page[..n]);
            }
            pos += n as u64;
        }
        at = pos;
    }
    Ok(hasher)
}

/// Maps guest RAM from the snapshot file, private copy-on-write.
fn map_memory(
    path: &Path,
    file: &File,
    header: &Header,
    mib: u64,
) -> Result<GuestMemory, SnapshotError> {
    let invalid = |why: String| SnapshotError::Invalid {
        path: path.to_path_buf(),
        why,
    };
    let bytes = mib << 20;
    if bytes != header.memory_len {
        return Err(invalid(format!(
            "holds {} MiB of memory, the VM asks for {mib} MiB",
            header.memory_len >> 20
        )));
    }
    let mut regions = Vec::new();
    let mut offset = header.memory_offset;
    for (addr, len) in ram_ranges(bytes) {
        let size = usize::try_from(len).map_err(|_| invalid("memory too large".into()))?;
        let fd = file.try_clone().map_err(|source| SnapshotError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let region = MmapRegionBuilder::new_with_bitmap(size, ())
            .with_file_offset(FileOffset::new(fd, offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| invalid(format!("cannot map guest memory: {e}")))?;
        let region = GuestRegionMmap::new(region, addr)
            .ok_or_else(|| invalid("guest memory region overflows".into()))?;
        regions.push(region);
        offset += len;
    }
    GuestMemory::from_regions(regions).map_err(|e| invalid(format!("guest memory: {e}")))
}

impl crate::vm::Vm {
    /// Starts a VM from the snapshot at `path`. `config` gives what is per VM: console,
    /// markers, disks, shares, vsock socket, rng; its memory size, vCPU count and device list
    /// must be those of the snapshotted VM, and `shape` the shape the snapshot was taken
    /// with. Kernel, initrd and command line are not read (they are in the memory).
    /// Anything that does not match is refused before a vCPU runs.
    pub fn restore(
        path: &Path,
        shape: &str,
        config: VmConfig,
    ) -> Result<(VmHandle, RestoreInfo), SnapshotError> {
        let started = Instant::now();
        let io = |source| SnapshotError::Io {
            path: path.to_path_buf(),
            source,
        };
        let invalid = |why: String| SnapshotError::Invalid {
            path: path.to_path_buf(),
            why,
        };
        let mut file = File::open(path).map_err(io)?;
        let header = read_header_from(path, &mut file)?;
        if header.shape != shape {
            return Err(invalid(format!(
                "taken for guest shape {:?}, this VM is {shape:?}",
                header.shape
            )));
        }
        let mut state_bytes = vec![0u8; header.state_len as usize];
        file.seek(SeekFrom::Start(HEADER_LEN)).map_err(io)?;
        file.read_exact(&mut state_bytes).map_err(io)?;
        if hex(&Sha256::digest(&state_bytes)) != header.state_sha256 {
            return Err(invalid(
                "machine state does not match its checksum (the file is corrupt)".into(),
            ));
        }
        let state: MachineState = serde_json::from_slice(&state_bytes)
            .map_err(|e| invalid(format!("unreadable machine state: {e}")))?;
        if state.memory_mib != config.memory_mib {
            return Err(invalid(format!(
                "taken with {} MiB of memory, the VM asks for {} MiB",
                state.memory_mib, config.memory_mib
            )));
        }
        if state.vcpus.len() != usize::from(config.vcpus) {
            return Err(invalid(format!(
                "taken with {} vCPUs, the VM asks for {}",
                state.vcpus.len(),
                config.vcpus
            )));
        }
        let verified_memory = verify_memory(path, &mut file, &header)?;
        let read = started.elapsed();

        let restore_err = |e: Error| SnapshotError::Restore {
            path: path.to_path_buf(),
            source: Box::new(e),
        };
        let (_kvm, vm_fd) = open_vm(config.vcpus).map_err(restore_err)?;
        let mapped = Instant::now();
        let mem = map_memory(path, &file, &header, config.memory_mib)?;
        register_memory(&vm_fd, &mem).map_err(restore_err)?;
        let memory = mapped.elapsed();

        let loading = Instant::now();
        let mut mmio = kiln_devices::Bus::new();
        let mut devices = DeviceManager::new();
        let mut created = RemoveOnError::default();
        attach_devices(&config, &vm_fd, &mem, &mut mmio, &mut devices, &mut created)
            .map_err(restore_err)?;
        if devices.transports().len() != state.devices.len() {
            return Err(invalid(format!(
                "has {} virtio devices, the VM asks for {}",
                state.devices.len(),
                devices.transports().len()
            )));
        }
        restore_vm_state(&vm_fd, &state)?;
        let mut vcpus = Vec::with_capacity(state.vcpus.len());
        for (id, saved) in state.vcpus.iter().enumerate() {
            let vcpu = vm_fd
                .create_vcpu(id as u64)
                .map_err(kvm("KVM_CREATE_VCPU"))?;
            restore_vcpu(&vcpu, saved)?;
            vcpus.push(vcpu);
        }
        // Devices last: activating one may signal its interrupt into the restored irqchip.
        for (i, (t, saved)) in devices.transports().iter().zip(&state.devices).enumerate() {
            let mut t = t.lock().unwrap_or_else(|e| e.into_inner());
            t.restore(saved)
                .map_err(|why| invalid(format!("virtio device {i}: {why}")))?;
        }
        let state_ms = loading.elapsed();
        let info = BootInfo {
            protocol: if state.boot.protocol == "pvh" {
                "pvh"
            } else {
                "linux64"
            },
            entry: state.boot.entry,
            cmdline: state.boot.cmdline.clone(),
            initrd: state.boot.initrd,
        };
        let parts = Parts {
            config: &config,
            started,
            vm_fd,
            mem,
            mmio,
            devices,
            vcpus,
            info,
            serial: Some(state.serial.clone()),
        };
        let handle = launch(parts).map_err(restore_err)?;
        created.0.clear();
        let id = header.id();
        let timings = RestoreTimings {
            read_ms: ms(read),
            memory_ms: ms(memory),
            state_ms: ms(state_ms),
            total_ms: ms(started.elapsed()),
        };
        Ok((
            handle,
            RestoreInfo {
                header,
                id,
                timings,
                verified_memory,
            },
        ))
    }
}

fn restore_vm_state(vm_fd: &VmFd, state: &MachineState) -> Result<(), SnapshotError> {
    vm_fd.set_pit2(&state.pit).map_err(kvm("KVM_SET_PIT2"))?;
    let mut clock = state.clock;
    // KVM refuses flags it did not expect on input.
    clock.flags &= !KVM_CLOCK_TSC_STABLE;
    vm_fd.set_clock(&clock).map_err(kvm("KVM_SET_CLOCK"))?;
    for chip in &state.irqchips {
        vm_fd.set_irqchip(chip).map_err(kvm("KVM_SET_IRQCHIP"))?;
    }
    Ok(())
}

fn restore_vcpu(vcpu: &VcpuFd, s: &VcpuSnapshot) -> Result<(), SnapshotError> {
    let bad = |why: String| SnapshotError::NotNow(why);
    let cpuid = CpuId::from_entries(&s.cpuid).map_err(|e| bad(format!("CPUID: {e:?}")))?;
    // Firecracker's order: CPUID, MP state, regs, sregs, XSAVE, XCRs, debug regs, LAPIC (after
    // sregs, which set the APIC base; before MSRs, for the TSC deadline), MSRs, events (SET_REGS
    // clears pending exceptions, which the events restore).
    vcpu.set_cpuid2(&cpuid).map_err(kvm("KVM_SET_CPUID2"))?;
    vcpu.set_mp_state(s.mp_state)
        .map_err(kvm("KVM_SET_MP_STATE"))?;
    vcpu.set_regs(&s.regs).map_err(kvm("KVM_SET_REGS"))?;
    vcpu.set_sregs(&s.sregs).map_err(kvm("KVM_SET_SREGS"))?;
    let region_len = 1024;
    if s.xsave.len() < region_len {
        return Err(bad("XSAVE area too short".into()));
    }
    let mut xsave =
        Xsave::new(s.xsave.len() - region_len).map_err(|e| bad(format!("XSAVE: {e:?}")))?;
    // SAFETY: only the fixed part is written; the length field is untouched.
    unsafe { xsave.as_mut_fam_struct() }
        .xsave
        .region
        .copy_from_slice(&s.xsave[..region_len]);
    xsave.as_mut_slice().copy_from_slice(&s.xsave[region_len..]);
    // SAFETY: the buffer is as large as the state it was saved from.
    unsafe { vcpu.set_xsave2(&xsave) }.map_err(kvm("KVM_SET_XSAVE"))?;
    vcpu.set_xcrs(&s.xcrs).map_err(kvm("KVM_SET_XCRS"))?;
    vcpu.set_debug_regs(&s.debug_regs)
        .map_err(kvm("KVM_SET_DEBUGREGS"))?;
    vcpu.set_lapic(&s.lapic).map_err(kvm("KVM_SET_LAPIC"))?;
    let (deferred, first): (Vec<_>, Vec<_>) = s
        .msrs
        .iter()
        .copied()
        .partition(|m| m.index == MSR_IA32_TSC_DEADLINE);
    for entries in [first, deferred] {
        for chunk in entries.chunks(KVM_MAX_MSR_ENTRIES) {
            set_msrs(vcpu, chunk)?;
        }
    }
    vcpu.set_vcpu_events(&s.vcpu_events)
        .map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
    // Tell a kvmclock guest it was paused, so its watchdogs do not fire (fails harmlessly
    // when the guest does not use kvmclock).
    let _ = vcpu.kvmclock_ctrl();
    Ok(())
}

/// Writes `entries`; one KVM refuses is skipped with a warning (it read back the same way on
/// this host, so a refusal means KVM does not let it be written, as for some read-only MSRs).
fn set_msrs(vcpu: &VcpuFd, mut entries: &[kvm_msr_entry]) -> Result<(), SnapshotError> {
    while !entries.is_empty() {
        let msrs = Msrs::from_entries(entries)
            .map_err(|e| SnapshotError::NotNow(format!("MSR list: {e:?}")))?;
        let written = vcpu.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
        if written < entries.len() {
            tracing::warn!(
                "restore: KVM refused MSR {:#x}; it keeps its reset value",
                entries[written].index
            );
            entries = &entries[written + 1..];
        } else {
            entries = &[];
        }
    }
    Ok(())
}
