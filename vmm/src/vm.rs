//! The public VM API: [`VmConfig`] → [`Vm::start`] → [`VmHandle`] (wait, kill, console, phases).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kiln_devices::console::{console, ConsoleError, ConsoleLog, ConsoleOutput, ConsoleWriter};
use kiln_devices::legacy::{AcpiPmPorts, Cmos, DebugPorts, Phase, PhaseLog, SerialPort, I8042};
use kiln_devices::virtio::block::{open_disk, Block, DiskError, DiskMode, DiskSpec};
use kiln_devices::virtio::fs::{FsError, VirtioFs};
use kiln_devices::virtio::rng::Rng;
use kiln_devices::virtio::vsock::{Vsock, VsockError, GUEST_CID};
use kiln_devices::{Bus, BusError, ExitRequester};
use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::{GuestAddress, GuestMemory as _, GuestMemoryRegion as _};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::arch::x86_64::acpi::{create_acpi_tables, AcpiError};
use crate::arch::x86_64::mptable::{setup_mptable, MptableError};
use crate::arch::x86_64::{cpuid, regs};
use crate::boot::cmdline::{build_cmdline, CmdlineError};
use crate::boot::{self, BootError, EntryPoint, LoadedKernel};
use crate::device_manager::{DeviceError, DeviceManager};
use crate::event_loop::EventLoop;
use crate::exit::{ExitLatch, ExitReason};
use crate::layout;
use crate::memory::{create_guest_memory, e820_map, GuestMemory, MemoryError};
use crate::vcpu::{run_vcpu, ExitContext, RunState, VcpuState};

/// Where KVM puts the TSS it needs on Intel: three pages just below the IOAPIC/BIOS area.
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
/// Longest a vCPU may take to leave KVM_RUN after being kicked before teardown gives up on it.
const KICK_DEADLINE: Duration = Duration::from_secs(5);
/// Longest [`VmHandle::kill`] (and wait, and drop) waits for the VM's threads. A vCPU can be
/// held up by a device that is busy on the event loop (its MMIO access waits for the device);
/// past this the rest of the teardown runs on a background thread, which frees the memory and
/// the VM fd only after every thread that could touch them has ended.
pub const TEARDOWN_WAIT: Duration = Duration::from_millis(300);
/// Offset from SIGRTMIN of the signal that kicks vCPUs out of KVM_RUN.
const KICK_SIGNAL_OFFSET: i32 = 0;

/// Everything needed to start a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// Kernel: ELF (PVH note → PVH entry, else 64-bit entry) or bzImage.
    pub kernel: PathBuf,
    /// Initrd / initramfs.
    pub initrd: Option<PathBuf>,
    /// User command line parts, appended after kiln's defaults.
    pub cmdline: Option<String>,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// Number of vCPUs (the boot CPU plus APs the guest starts).
    pub vcpus: u8,
    /// Where the serial console is copied besides memory.
    pub console: ConsoleOutput,
    /// Console line patterns (regex) to timestamp.
    pub markers: Vec<String>,
    /// Disks, in order (`/dev/vda`, `/dev/vdb`, …); by default each gets a per-run
    /// copy-on-write overlay and its base is never written.
    pub disks: Vec<DiskSpec>,
    /// Directories shared with the guest over virtio-fs (mount with `-t virtiofs <tag>`).
    pub shares: Vec<ShareConfig>,
    /// Unix socket for the virtio-vsock device (Firecracker's host protocol); the guest CID is
    /// [`kiln_devices::virtio::vsock::GUEST_CID`].
    pub vsock: Option<PathBuf>,
    /// Attach a virtio-rng device (so guests do not stall on entropy at boot).
    pub rng: bool,
    /// Also announce virtio-mmio devices as `virtio_mmio.device=` command line entries (for
    /// kernels built with VIRTIO_MMIO_CMDLINE_DEVICES); ACPI announces them always.
    pub virtio_cmdline: bool,
}

impl VmConfig {
    /// A config for `kernel` with 128 MiB, one vCPU, console kept in memory.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        Self {
            kernel: kernel.into(),
            initrd: None,
            cmdline: None,
            memory_mib: 128,
            vcpus: 1,
            console: ConsoleOutput::None,
            markers: Vec::new(),
            disks: Vec::new(),
            shares: Vec::new(),
            vsock: None,
            rng: true,
            virtio_cmdline: false,
        }
    }

    /// Adds a disk.
    pub fn disk(mut self, spec: DiskSpec) -> Self {
        self.disks.push(spec);
        self
    }

    /// Shares `dir` with the guest as virtio-fs tag `tag`.
    pub fn share(
        mut self,
        tag: impl Into<String>,
        dir: impl Into<PathBuf>,
        read_only: bool,
    ) -> Self {
        self.shares.push(ShareConfig {
            tag: tag.into(),
            dir: dir.into(),
            read_only,
        });
        self
    }

    /// Sets the initrd.
    pub fn initrd(mut self, path: impl Into<PathBuf>) -> Self {
        self.initrd = Some(path.into());
        self
    }

    /// Sets the user part of the command line.
    pub fn cmdline(mut self, cmdline: impl Into<String>) -> Self {
        self.cmdline = Some(cmdline.into());
        self
    }

    /// Sets guest RAM in MiB.
    pub fn memory_mib(mut self, mib: u64) -> Self {
        self.memory_mib = mib;
        self
    }

    /// Sets the vCPU count.
    pub fn vcpus(mut self, n: u8) -> Self {
        self.vcpus = n;
        self
    }

    /// Copies the console to stdout or a file.
    pub fn console_output(mut self, out: ConsoleOutput) -> Self {
        self.console = out;
        self
    }

    /// Attaches a virtio-vsock device listening on the Unix socket `uds`.
    pub fn vsock(mut self, uds: impl Into<PathBuf>) -> Self {
        self.vsock = Some(uds.into());
        self
    }

    /// Attaches (or not) the virtio-rng device.
    pub fn rng(mut self, on: bool) -> Self {
        self.rng = on;
        self
    }

    /// Adds `virtio_mmio.device=` entries to the command line.
    pub fn virtio_cmdline(mut self, on: bool) -> Self {
        self.virtio_cmdline = on;
        self
    }

    /// Timestamps console lines matching `pattern` (a regex).
    pub fn marker(mut self, pattern: impl Into<String>) -> Self {
        self.markers.push(pattern.into());
        self
    }
}

/// A host directory shared with the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareConfig {
    /// The virtio-fs mount tag.
    pub tag: String,
    /// The host directory; nothing outside it is reachable from the guest.
    pub dir: PathBuf,
    /// Refuse every change from the guest (EROFS).
    pub read_only: bool,
}

/// Why [`VmConfig::vcpus`] cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VcpusProblem {
    /// Zero vCPUs.
    #[error("a VM needs at least one vCPU")]
    Zero,
    /// More than this host's KVM allows.
    #[error("KVM on this host allows at most {max}")]
    AboveMax {
        /// The most KVM allows (at most 255).
        max: usize,
    },
}

/// Errors starting a VM; each says which input (by its [`VmConfig`] field) or host facility is
/// at fault. A command line that sets those fields from its options words them its own way.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// [`VmConfig::vcpus`] is out of range.
    #[error("VmConfig.vcpus = {count}: {problem}")]
    Vcpus {
        /// The count given.
        count: u8,
        /// What is wrong with it.
        problem: VcpusProblem,
    },
    /// /dev/kvm could not be opened.
    #[error("cannot open /dev/kvm: {source}{hint}")]
    KvmOpen {
        /// The OS error.
        source: kvm_ioctls::Error,
        /// What to do about it.
        hint: &'static str,
    },
    /// A KVM ioctl failed.
    #[error("KVM {op} failed: {source}")]
    Kvm {
        /// Which operation.
        op: &'static str,
        /// The OS error.
        source: kvm_ioctls::Error,
    },
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Kernel or initrd.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// Command line.
    #[error(transparent)]
    Cmdline(#[from] CmdlineError),
    /// ACPI tables.
    #[error(transparent)]
    Acpi(#[from] AcpiError),
    /// The MP table.
    #[error(transparent)]
    Mptable(#[from] MptableError),
    /// Console setup.
    #[error(transparent)]
    Console(#[from] ConsoleError),
    /// Device placement.
    #[error("device layout: {0}")]
    Bus(#[from] BusError),
    /// A disk could not be opened.
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// A share could not be set up.
    #[error(transparent)]
    Share(#[from] FsError),
    /// The vsock device could not be set up.
    #[error(transparent)]
    Vsock(#[from] VsockError),
    /// A virtio device could not be set up.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// Initial register state.
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
    /// Thread or eventfd creation.
    #[error("cannot create {what}: {source}")]
    Host {
        /// What was being created.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
}

fn kvm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { op, source }
}

/// Facts about a started VM, for logs and provenance.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BootInfo {
    /// "pvh" or "linux64".
    pub protocol: &'static str,
    /// Guest entry address.
    pub entry: u64,
    /// The full command line handed to the guest.
    pub cmdline: String,
    /// Initrd address and size.
    pub initrd: Option<(u64, u64)>,
}

/// Namespace for starting VMs.
pub struct Vm;

impl Vm {
    /// Builds and starts a VM; the vCPUs are running when this returns.
    pub fn start(config: VmConfig) -> Result<VmHandle, Error> {
        let started = Instant::now();
        let _span = tracing::info_span!("vm", kernel = %config.kernel.display()).entered();
        let (kvm, vm_fd) = open_vm(config.vcpus)?;
        let mem = create_guest_memory(config.memory_mib)?;
        register_memory(&vm_fd, &mem)?;

        let kernel = boot::load_kernel(&mem, &config.kernel, config.initrd.as_deref())?;
        let mut mmio = Bus::new();
        let mut devices = DeviceManager::new();
        // Overlays the user asked to keep must not outlive a start that fails.
        let mut created = RemoveOnError::default();
        attach_devices(&config, &vm_fd, &mem, &mut mmio, &mut devices, &mut created)?;
        let kiln_parts = if config.virtio_cmdline {
            devices.cmdline_entries()
        } else {
            Vec::new()
        };
        let cmdline = build_cmdline(
            &kiln_parts,
            config.cmdline.as_deref(),
            kernel.cmdline_limit(),
        )?;
        boot::write_cmdline(&mem, &cmdline)?;
        let cmdline_text = cmdline
            .as_cstring()
            .map(|c| c.to_string_lossy().into_owned())
            .unwrap_or_default();
        let rsdp = create_acpi_tables(&mem, config.vcpus, devices.slots())?;
        setup_mptable(&mem, config.vcpus)?;
        write_boot_structures(&mem, &kernel, cmdline_text.len(), rsdp)?;

        let vcpus = create_vcpus(&kvm, &vm_fd, &mem, &kernel.entry, config.vcpus)?;
        let info = BootInfo {
            protocol: match kernel.entry {
                EntryPoint::Pvh(_) => "pvh",
                EntryPoint::Linux64(_) => "linux64",
            },
            entry: match kernel.entry {
                EntryPoint::Pvh(a) | EntryPoint::Linux64(a) => a.0,
            },
            cmdline: cmdline_text,
            initrd: kernel.initrd.map(|(a, s)| (a.0, s)),
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
            serial: None,
        };
        let handle = launch(parts)?;
        created.0.clear();
        tracing::debug!(info = ?handle.info, "VM started in {:?}", started.elapsed());
        Ok(handle)
    }
}

/// Opens /dev/kvm and creates a VM with the in-kernel irqchip and PIT, checking `vcpus`
/// against what this host allows.
pub(crate) fn open_vm(vcpus: u8) -> Result<(Kvm, VmFd), Error> {
    if vcpus == 0 {
        return Err(Error::Vcpus {
            count: 0,
            problem: VcpusProblem::Zero,
        });
    }
    let kvm = Kvm::new().map_err(|source| Error::KvmOpen {
        hint: match source.errno() {
            libc::EACCES | libc::EPERM => {
                " (add yourself to the kvm group: `sudo usermod -aG kvm $USER`, then log in again)"
            }
            libc::ENOENT => " (no KVM here: load kvm_intel/kvm_amd, or use the QEMU backend)",
            _ => "",
        },
        source,
    })?;
    let max = kvm.get_max_vcpus().min(usize::from(u8::MAX));
    if usize::from(vcpus) > max {
        return Err(Error::Vcpus {
            count: vcpus,
            problem: VcpusProblem::AboveMax { max },
        });
    }
    let vm_fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    vm_fd
        .set_tss_address(KVM_TSS_ADDRESS)
        .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    vm_fd
        .create_irq_chip()
        .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    vm_fd
        .create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .map_err(kvm_err("KVM_CREATE_PIT2"))?;
    Ok((kvm, vm_fd))
}

/// Creates the virtio devices of `config` in kiln's fixed order (disks, shares, vsock, rng):
/// a snapshot's devices are matched to a restored VM's by this order.
pub(crate) fn attach_devices(
    config: &VmConfig,
    vm_fd: &VmFd,
    mem: &GuestMemory,
    mmio: &mut Bus,
    devices: &mut DeviceManager,
    created: &mut RemoveOnError,
) -> Result<(), Error> {
    for spec in &config.disks {
        let disk = open_disk(spec)?;
        if let DiskMode::KeptOverlay(path) = &spec.mode {
            created.0.push(path.clone());
        }
        devices.add_virtio(vm_fd, mem, mmio, Box::new(Block::new(disk)))?;
    }
    for share in &config.shares {
        let fs = VirtioFs::new(&share.tag, &share.dir, share.read_only)?;
        devices.add_virtio(vm_fd, mem, mmio, Box::new(fs))?;
    }
    if let Some(uds) = &config.vsock {
        let vsock = Vsock::new(uds, GUEST_CID)?;
        devices.add_virtio(vm_fd, mem, mmio, Box::new(vsock))?;
    }
    if config.rng {
        devices.add_virtio(vm_fd, mem, mmio, Box::new(Rng::new()))?;
    }
    Ok(())
}

/// A VM built and ready to run (by a boot or a restore).
pub(crate) struct Parts<'a> {
    pub config: &'a VmConfig,
    pub started: Instant,
    pub vm_fd: VmFd,
    pub mem: GuestMemory,
    pub mmio: Bus,
    pub devices: DeviceManager,
    pub vcpus: Vec<VcpuFd>,
    pub info: BootInfo,
    /// The COM1 state to start from (a restore), or a reset UART.
    pub serial: Option<kiln_devices::legacy::SerialSnapshot>,
}

/// Wires the legacy devices and the console, starts the event loop and one thread per vCPU.
pub(crate) fn launch(mut p: Parts<'_>) -> Result<VmHandle, Error> {
    let latch = Arc::new(ExitLatch::default());
    let phases = PhaseLog::new(p.started);
    let (sink, console_log, console_writer) = console(&p.config.console, &p.config.markers)?;
    let (pio, serial) = legacy_devices(
        &p.vm_fd,
        latch.clone(),
        phases.clone(),
        sink,
        p.serial.as_ref(),
    )?;
    let ctx = ExitContext { pio, mmio: p.mmio };
    install_kick_handler();
    let transports = p.devices.transports().to_vec();
    let events = EventLoop::start(p.devices.take_subscribers()).map_err(|source| Error::Host {
        what: "the event loop thread",
        source,
    })?;
    let first_run = Arc::new(std::sync::OnceLock::new());
    let mut threads = Vec::with_capacity(p.vcpus.len());
    for (i, vcpu) in p.vcpus.into_iter().enumerate() {
        let state = Arc::new(RunState::default());
        let (ctx, latch2, state2) = (ctx.clone(), latch.clone(), state.clone());
        let first = first_run.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("kiln-vcpu{i}"))
            .spawn(move || {
                if i == 0 {
                    let _ = first.set(Instant::now());
                }
                run_vcpu(i as u8, vcpu, ctx, latch2, state2)
            });
        match spawned {
            Ok(handle) => threads.push((handle, state)),
            Err(source) => {
                // Tear down what already runs before reporting.
                latch.set(ExitReason::Killed);
                stop_vcpus(&mut threads);
                return Err(Error::Host {
                    what: "a vCPU thread",
                    source,
                });
            }
        }
    }
    Ok(VmHandle {
        running: Some(Running {
            threads,
            events,
            transports,
            serial,
            vm_fd: p.vm_fd,
            mem: p.mem,
        }),
        latch,
        console: console_log,
        console_writer: Some(console_writer),
        phases,
        started: p.started,
        first_run,
        info: p.info,
        vsock: p.config.vsock.clone(),
        memory_mib: p.config.memory_mib,
    })
}

/// Files created while starting a VM, removed if the start fails.
#[derive(Default)]
pub(crate) struct RemoveOnError(pub(crate) Vec<PathBuf>);

impl Drop for RemoveOnError {
    fn drop(&mut self) {
        for path in &self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Hands every guest RAM region to KVM.
pub(crate) fn register_memory(vm_fd: &VmFd, mem: &GuestMemory) -> Result<(), Error> {
    for (slot, region) in mem.iter().enumerate() {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|_| Error::Host {
                what: "a guest memory mapping",
                source: std::io::Error::other("region has no host address"),
            })?;
        let region_desc = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
            flags: 0,
        };
        // SAFETY: the region is a live mmap owned by `mem`, which the VmHandle keeps alive
        // until after the VM fd (and so the KVM mapping) is dropped.
        unsafe { vm_fd.set_user_memory_region(region_desc) }
            .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(())
}

/// Writes `boot_params` or `hvm_start_info` for the kernel's entry protocol.
fn write_boot_structures(
    mem: &GuestMemory,
    kernel: &LoadedKernel,
    cmdline_len: usize,
    rsdp: GuestAddress,
) -> Result<(), Error> {
    let ram: u64 = mem.iter().map(|r| r.len()).sum();
    let e820 = e820_map(ram);
    match kernel.entry {
        EntryPoint::Pvh(_) => {
            let (info, memmap, modules) = boot::start_info(kernel.initrd, &e820, Some(rsdp));
            boot::write_start_info(mem, &info, &memmap, &modules)?;
        }
        EntryPoint::Linux64(_) => {
            let params = boot::boot_params(
                kernel.setup_header.as_ref(),
                cmdline_len,
                kernel.initrd,
                &e820,
                Some(rsdp),
            );
            boot::write_boot_params(mem, &params)?;
        }
    }
    Ok(())
}

/// COM1 (reset, or in the state a snapshot saved), i8042, the CMOS RTC (always reset: it reads
/// the host's clock), ACPI PM ports and kiln's debug ports on a new PIO bus; also returns COM1
/// (snapshots read its state).
fn legacy_devices(
    vm_fd: &VmFd,
    latch: Arc<ExitLatch>,
    phases: PhaseLog,
    sink: kiln_devices::console::ConsoleSink,
    serial_state: Option<&kiln_devices::legacy::SerialSnapshot>,
) -> Result<(Bus, Arc<Mutex<SerialPort>>), Error> {
    let host = |what| move |source| Error::Host { what, source };
    let com1_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(host("the COM1 eventfd"))?;
    vm_fd
        .register_irqfd(&com1_irq, layout::COM1_IRQ)
        .map_err(kvm_err("KVM_IRQFD (COM1)"))?;
    let serial = match serial_state {
        None => SerialPort::new(com1_irq, sink),
        Some(state) => SerialPort::from_state(state, com1_irq, sink).map_err(|e| Error::Host {
            what: "COM1 from the snapshot",
            source: std::io::Error::other(e),
        })?,
    };
    let serial = Arc::new(Mutex::new(serial));
    let exit: Arc<dyn ExitRequester> = latch;
    let mut pio = Bus::new();
    pio.insert(serial.clone(), u64::from(layout::COM1_PORT), 8)?;
    pio.insert(
        Arc::new(Mutex::new(I8042::new(exit.clone()))),
        u64::from(layout::I8042_PORT),
        5,
    )?;
    pio.insert(
        Arc::new(Mutex::new(Cmos::default())),
        u64::from(layout::CMOS_PORT),
        2,
    )?;
    pio.insert(
        Arc::new(Mutex::new(AcpiPmPorts::new(
            exit.clone(),
            layout::ACPI_RESET_VALUE,
        ))),
        u64::from(layout::ACPI_SLEEP_CONTROL_PORT),
        3,
    )?;
    pio.insert(
        Arc::new(Mutex::new(DebugPorts::new(exit, phases))),
        u64::from(layout::EXIT_PORT),
        2,
    )?;
    Ok((pio, serial))
}

/// Creates and configures the vCPUs; vCPU 0 gets the entry state, the others wait for
/// INIT/SIPI from the guest through the in-kernel LAPIC, as on real hardware.
fn create_vcpus(
    kvm: &Kvm,
    vm_fd: &VmFd,
    mem: &GuestMemory,
    entry: &EntryPoint,
    count: u8,
) -> Result<Vec<VcpuFd>, Error> {
    let supported = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    let msrs = kvm_bindings::Msrs::from_entries(&regs::boot_msrs()).map_err(|e| Error::Host {
        what: "the boot MSR list",
        source: std::io::Error::other(format!("{e:?}")),
    })?;
    let mut vcpus = Vec::with_capacity(usize::from(count));
    for id in 0..count {
        let vcpu = vm_fd
            .create_vcpu(u64::from(id))
            .map_err(kvm_err("KVM_CREATE_VCPU"))?;
        let mut cpuid = supported.clone();
        cpuid::filter_cpuid(cpuid.as_mut_slice(), id, count);
        vcpu.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
        vcpu.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
        let mut lapic = vcpu.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?;
        regs::set_lint(&mut lapic.regs);
        vcpu.set_lapic(&lapic).map_err(kvm_err("KVM_SET_LAPIC"))?;
        if id == 0 {
            let sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
            let sregs = regs::setup_sregs(mem, entry, sregs)?;
            vcpu.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
            vcpu.set_regs(&regs::boot_regs(entry))
                .map_err(kvm_err("KVM_SET_REGS"))?;
            vcpu.set_fpu(&regs::boot_fpu())
                .map_err(kvm_err("KVM_SET_FPU"))?;
        }
        vcpus.push(vcpu);
    }
    Ok(vcpus)
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the no-op handler whose only job is to make KVM_RUN return EINTR.
fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if let Err(e) = register_signal_handler(SIGRTMIN() + KICK_SIGNAL_OFFSET, kick_handler) {
            tracing::error!("cannot install the vCPU kick handler: {e}");
        }
    });
}

/// Marks every vCPU stopping and kicks the unfinished ones out of KVM_RUN until all returned
/// or `deadline` passed; returns whether all did.
pub(crate) fn kick_vcpus(
    threads: &[(JoinHandle<VcpuFd>, Arc<RunState>)],
    deadline: Instant,
) -> bool {
    for (_, state) in threads {
        state.set(VcpuState::Stopping);
    }
    loop {
        let mut all = true;
        // A kick that lands just before KVM_RUN is lost, so kick until the thread is gone.
        for (handle, _) in threads.iter().filter(|(h, _)| !h.is_finished()) {
            all = false;
            let _ = handle.kill(SIGRTMIN() + KICK_SIGNAL_OFFSET);
        }
        if all {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Stops every vCPU thread: mark it stopping, kick it out of KVM_RUN until it returns (at
/// most [`KICK_DEADLINE`]), join; a vCPU that never returns is leaked.
fn stop_vcpus(threads: &mut Vec<(JoinHandle<VcpuFd>, Arc<RunState>)>) {
    kick_vcpus(threads, Instant::now() + KICK_DEADLINE);
    for (handle, state) in threads.drain(..) {
        if handle.is_finished() {
            let _ = handle.join();
        } else {
            tracing::error!(
                "a vCPU did not leave KVM_RUN within {KICK_DEADLINE:?} (state {:?}); leaking its thread",
                state.get()
            );
        }
    }
}

pub(crate) struct Running {
    pub(crate) threads: Vec<(JoinHandle<VcpuFd>, Arc<RunState>)>,
    pub(crate) events: EventLoop,
    pub(crate) transports: Vec<Arc<Mutex<kiln_devices::virtio::mmio::MmioTransport>>>,
    pub(crate) serial: Arc<Mutex<SerialPort>>,
    // Dropped after the threads are joined: KVM's view of memory goes before the mapping.
    pub(crate) vm_fd: VmFd,
    pub(crate) mem: GuestMemory,
}

/// A started VM. Dropping it kills the VM and frees everything.
pub struct VmHandle {
    pub(crate) running: Option<Running>,
    pub(crate) latch: Arc<ExitLatch>,
    console: ConsoleLog,
    pub(crate) console_writer: Option<ConsoleWriter>,
    phases: PhaseLog,
    started: Instant,
    /// When vCPU 0 first entered KVM_RUN.
    first_run: Arc<std::sync::OnceLock<Instant>>,
    pub(crate) info: BootInfo,
    vsock: Option<PathBuf>,
    pub(crate) memory_mib: u64,
}

impl VmHandle {
    /// Waits up to `timeout` for the VM to end; past it the VM is killed and the reason is
    /// [`ExitReason::Timeout`]. Every thread and fd is released when this returns.
    pub fn wait(&mut self, timeout: Duration) -> ExitReason {
        if self.latch.wait(timeout).is_none() {
            self.latch.set(ExitReason::Timeout);
        }
        self.teardown()
    }

    /// Waits without a time limit.
    pub fn wait_forever(&mut self) -> ExitReason {
        while self.latch.wait(Duration::from_secs(3600)).is_none() {}
        self.teardown()
    }

    /// Kills the VM (if it still runs) and frees everything.
    pub fn kill(&mut self) -> ExitReason {
        self.latch.set(ExitReason::Killed);
        self.teardown()
    }

    /// Why the VM ended, once it has.
    pub fn exit_reason(&self) -> Option<ExitReason> {
        self.latch.get()
    }

    /// The serial console (live while the VM runs).
    pub fn console(&self) -> ConsoleLog {
        self.console.clone()
    }

    /// Phases the guest wrote to the marker port.
    pub fn phases(&self) -> Vec<Phase> {
        self.phases.phases()
    }

    /// Boot protocol, entry, command line and initrd placement.
    pub fn boot_info(&self) -> &BootInfo {
        &self.info
    }

    /// Opens a stream to guest vsock `port` through the VM's vsock Unix socket (Firecracker's
    /// `CONNECT <port>` handshake).
    pub fn vsock_connect(&self, port: u32, timeout: Duration) -> std::io::Result<UnixStream> {
        let uds = self.vsock.as_ref().ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::NotFound, "this VM has no vsock device")
        })?;
        let mut stream = UnixStream::connect(uds)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.write_all(format!("CONNECT {port}\n").as_bytes())?;
        // Read the reply byte by byte: anything after the newline is guest data.
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while line.len() < 64 {
            stream.read_exact(&mut byte)?;
            if byte[0] == b'\n' {
                break;
            }
            line.push(byte[0]);
        }
        let line = String::from_utf8_lossy(&line);
        if !line.starts_with("OK ") {
            return Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionRefused,
                format!("vsock port {port}: the VM answered {line:?}"),
            ));
        }
        stream.set_read_timeout(None)?;
        Ok(stream)
    }

    /// When [`Vm::start`] was called.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Time from [`Vm::start`] (or the restore) until vCPU 0 first entered the guest: the
    /// VMM's share of the boot, before the kernel runs.
    pub fn kernel_entry(&self) -> Option<Duration> {
        self.first_run
            .get()
            .map(|t| t.saturating_duration_since(self.started))
    }

    /// Time from start until the VM ended, once it has.
    pub fn run_time(&self) -> Option<Duration> {
        self.latch.at().map(|t| t.duration_since(self.started))
    }

    /// Stops the VM's threads and frees everything, waiting at most [`TEARDOWN_WAIT`]: what
    /// has not ended by then finishes on a background thread.
    fn teardown(&mut self) -> ExitReason {
        if let Some(r) = self.running.take() {
            let deadline = Instant::now() + TEARDOWN_WAIT;
            r.events.signal_stop();
            let vcpus_done = kick_vcpus(&r.threads, deadline);
            let events_done = r.events.wait_until(deadline);
            let writer = self.console_writer.take();
            if vcpus_done && events_done {
                finish(r, writer);
            } else {
                tracing::warn!(
                    "the VM's threads did not end within {TEARDOWN_WAIT:?} (a device is busy); finishing the teardown in the background"
                );
                let spawned = std::thread::Builder::new()
                    .name("kiln-teardown".into())
                    .spawn(move || finish(r, writer));
                if let Err(e) = spawned {
                    tracing::error!("cannot start the teardown thread ({e}); leaking the VM");
                }
            }
        }
        self.latch.get().unwrap_or(ExitReason::Killed)
    }
}

/// Ends the VM's threads however long that takes, then frees its memory and fds, then lets the
/// console writer drain.
pub(crate) fn finish(mut r: Running, writer: Option<ConsoleWriter>) {
    if !kick_vcpus(&r.threads, Instant::now() + KICK_DEADLINE) {
        tracing::error!("a vCPU did not leave KVM_RUN within {KICK_DEADLINE:?}; still waiting");
    }
    // The memory and the VM fd below must outlive every vCPU, however long one takes.
    for (handle, _) in r.threads.drain(..) {
        let _ = handle.join();
    }
    r.events.join();
    // The joined threads dropped the last bus clones, so the serial device and its console
    // sink are gone and the writer thread can drain and end.
    drop(r);
    if let Some(w) = writer {
        w.finish();
    }
}

impl Drop for VmHandle {
    fn drop(&mut self) {
        if self.running.is_some() {
            self.kill();
        }
    }
}
