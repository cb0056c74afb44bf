//! vCPU threads: explicit run state, and the handling of one KVM exit as a free function that
//! tests drive with synthetic exits (no /dev/kvm needed).

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use kiln_devices::Bus;
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::exit::{ExitLatch, ExitReason};

/// KVM_SYSTEM_EVENT types (linux/kvm.h).
const KVM_SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const KVM_SYSTEM_EVENT_RESET: u32 = 2;
const KVM_SYSTEM_EVENT_CRASH: u32 = 3;

/// What a vCPU thread is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum VcpuState {
    /// Created, not yet running.
    Created = 0,
    /// In or around KVM_RUN.
    Running = 1,
    /// Asked to stop; leaves KVM_RUN at the next kick.
    Stopping = 2,
    /// The thread has returned.
    Exited = 3,
}

/// A vCPU's run state, shared between its thread and the VM that kicks it.
#[derive(Debug, Default)]
pub struct RunState(AtomicU8);

impl RunState {
    /// The current state.
    pub fn get(&self) -> VcpuState {
        match self.0.load(Ordering::Acquire) {
            0 => VcpuState::Created,
            1 => VcpuState::Running,
            2 => VcpuState::Stopping,
            _ => VcpuState::Exited,
        }
    }

    /// Moves to `state`; a stopping or exited vCPU never goes back to running.
    pub fn set(&self, state: VcpuState) {
        if state == VcpuState::Running {
            let _ = self.0.compare_exchange(
                VcpuState::Created as u8,
                VcpuState::Running as u8,
                Ordering::AcqRel,
                Ordering::Acquire,
            );
        } else {
            self.0.fetch_max(state as u8, Ordering::AcqRel);
        }
    }
}

/// The buses a vCPU dispatches port I/O and MMIO exits to.
#[derive(Clone, Default)]
pub struct ExitContext {
    /// Port I/O bus.
    pub pio: Bus,
    /// MMIO bus.
    pub mmio: Bus,
}

/// What the vCPU loop does after an exit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuAction {
    /// Re-enter the guest.
    Continue,
    /// The VM ends for this reason.
    Stop(ExitReason),
    /// KVM could not run the guest; the loop adds the registers to this description.
    Fatal(String),
}

/// Handles one KVM exit. Unknown ports read as all-ones (like an empty ISA bus) and unclaimed
/// MMIO reads as zero; writes to nothing are dropped.
pub fn handle_exit(exit: VcpuExit<'_>, ctx: &ExitContext) -> VcpuAction {
    match exit {
        VcpuExit::IoIn(port, data) => {
            if !ctx.pio.read(u64::from(port), data) {
                data.fill(0xff);
            }
            VcpuAction::Continue
        }
        VcpuExit::IoOut(port, data) => {
            if !ctx.pio.write(u64::from(port), data) {
                tracing::trace!("write to unclaimed port {port:#x}");
            }
            VcpuAction::Continue
        }
        VcpuExit::MmioRead(addr, data) => {
            if !ctx.mmio.read(addr, data) {
                data.fill(0);
            }
            VcpuAction::Continue
        }
        VcpuExit::MmioWrite(addr, data) => {
            if !ctx.mmio.write(addr, data) {
                tracing::trace!("write to unclaimed MMIO {addr:#x}");
            }
            VcpuAction::Continue
        }
        VcpuExit::Intr => VcpuAction::Continue,
        // With the in-kernel irqchip HLT does not exit; if it does, nothing can wake the vCPU.
        VcpuExit::Hlt => VcpuAction::Stop(ExitReason::Shutdown),
        VcpuExit::Shutdown => VcpuAction::Stop(ExitReason::TripleFault),
        VcpuExit::SystemEvent(kind, _) => match kind {
            KVM_SYSTEM_EVENT_SHUTDOWN => VcpuAction::Stop(ExitReason::Shutdown),
            KVM_SYSTEM_EVENT_RESET => VcpuAction::Stop(ExitReason::Reset),
            KVM_SYSTEM_EVENT_CRASH => VcpuAction::Fatal("guest reported a crash".into()),
            other => VcpuAction::Fatal(format!("unknown system event {other}")),
        },
        VcpuExit::InternalError => {
            VcpuAction::Fatal("emulation failure (KVM_EXIT_INTERNAL_ERROR)".into())
        }
        VcpuExit::FailEntry(reason, cpu) => VcpuAction::Fatal(format!(
            "VM entry failed (hardware reason {reason:#x}, cpu {cpu})"
        )),
        other => VcpuAction::Fatal(format!("unexpected KVM exit {other:?}")),
    }
}

/// Formats the registers that explain an internal error.
fn describe_registers(vcpu: &VcpuFd) -> String {
    let mut s = String::new();
    if let Ok(r) = vcpu.get_regs() {
        s += &format!(
            "rip={:#x} rsp={:#x} rflags={:#x} rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rsi={:#x} rdi={:#x}",
            r.rip, r.rsp, r.rflags, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi
        );
    }
    if let Ok(sr) = vcpu.get_sregs() {
        s += &format!(
            " cr0={:#x} cr3={:#x} cr4={:#x} efer={:#x} cs={:#x}",
            sr.cr0, sr.cr3, sr.cr4, sr.efer, sr.cs.selector
        );
    }
    s
}

/// Runs `vcpu` until the VM ends or the vCPU is stopped: reports the reason to `latch` and
/// hands the vCPU back, its last exit completed (so that a snapshot reads consistent state).
pub fn run_vcpu(
    index: u8,
    mut vcpu: VcpuFd,
    ctx: ExitContext,
    latch: Arc<ExitLatch>,
    state: Arc<RunState>,
) -> VcpuFd {
    state.set(VcpuState::Running);
    let _span = tracing::debug_span!("vcpu", index).entered();
    loop {
        if state.get() != VcpuState::Running || latch.is_set() {
            break;
        }
        let action = match vcpu.run() {
            Ok(exit) => handle_exit(exit, &ctx),
            // A kick (signal) interrupted KVM_RUN: look at the state again.
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => VcpuAction::Continue,
            Err(e) => VcpuAction::Stop(ExitReason::VmmError(format!(
                "KVM_RUN failed on vCPU {index}: {e}"
            ))),
        };
        match action {
            VcpuAction::Continue => {}
            VcpuAction::Stop(reason) => {
                if reason == ExitReason::TripleFault {
                    tracing::warn!("vCPU {index} triple fault: {}", describe_registers(&vcpu));
                }
                latch.set(reason);
                break;
            }
            VcpuAction::Fatal(what) => {
                let detail = format!("vCPU {index}: {what}; {}", describe_registers(&vcpu));
                tracing::error!("{detail}");
                latch.set(ExitReason::InternalError(detail));
                break;
            }
        }
    }
    // An I/O or MMIO exit is complete (a read's value in its register) only after the next
    // KVM_RUN; with immediate_exit set that entry returns at once without running the guest.
    vcpu.set_kvm_immediate_exit(1);
    let _ = vcpu.run();
    vcpu.set_kvm_immediate_exit(0);
    state.set(VcpuState::Exited);
    vcpu
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_devices::legacy::DebugPorts;
    use kiln_devices::BusDevice;
    use std::sync::Mutex;

    struct Echo;
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8 + 1);
        }
        fn write(&mut self, _offset: u64, _data: &[u8]) {}
    }

    fn ctx_with_latch() -> (ExitContext, Arc<ExitLatch>) {
        let latch = Arc::new(ExitLatch::default());
        let mut ctx = ExitContext::default();
        let ports = DebugPorts::new(
            latch.clone(),
            kiln_devices::legacy::PhaseLog::new(std::time::Instant::now()),
        );
        ctx.pio
            .insert(Arc::new(Mutex::new(ports)), 0x501, 2)
            .unwrap();
        ctx.pio
            .insert(Arc::new(Mutex::new(Echo)), 0x3f8, 8)
            .unwrap();
        ctx.mmio
            .insert(Arc::new(Mutex::new(Echo)), 0xd000_0000, 0x1000)
            .unwrap();
        (ctx, latch)
    }

    #[test]
    fn port_io_reaches_devices_and_unclaimed_ports_read_ones() {
        let (ctx, latch) = ctx_with_latch();
        let mut data = [0u8; 1];
        assert_eq!(
            handle_exit(VcpuExit::IoIn(0x3fd, &mut data), &ctx),
            VcpuAction::Continue
        );
        assert_eq!(data, [6]);
        let mut data = [0u8; 2];
        handle_exit(VcpuExit::IoIn(0x80, &mut data), &ctx);
        assert_eq!(data, [0xff, 0xff]);
        assert_eq!(
            handle_exit(VcpuExit::IoOut(0x80, &[1]), &ctx),
            VcpuAction::Continue
        );
        assert_eq!(latch.get(), None);
        assert_eq!(
            handle_exit(VcpuExit::IoOut(0x501, &[9]), &ctx),
            VcpuAction::Continue
        );
        assert_eq!(latch.get(), Some(ExitReason::ExitPort(9)));
    }

    #[test]
    fn mmio_dispatch_and_unclaimed_reads_zero() {
        let (ctx, _) = ctx_with_latch();
        let mut data = [0u8; 4];
        handle_exit(VcpuExit::MmioRead(0xd000_0010, &mut data), &ctx);
        assert_eq!(data, [0x11; 4]);
        handle_exit(VcpuExit::MmioRead(0xc000_0000, &mut data), &ctx);
        assert_eq!(data, [0; 4]);
        assert_eq!(
            handle_exit(VcpuExit::MmioWrite(0xc000_0000, &[1]), &ctx),
            VcpuAction::Continue
        );
    }

    #[test]
    fn terminal_exits_map_to_reasons() {
        let ctx = ExitContext::default();
        assert_eq!(
            handle_exit(VcpuExit::Shutdown, &ctx),
            VcpuAction::Stop(ExitReason::TripleFault)
        );
        assert_eq!(
            handle_exit(VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_RESET, &[]), &ctx),
            VcpuAction::Stop(ExitReason::Reset)
        );
        assert_eq!(
            handle_exit(VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN, &[]), &ctx),
            VcpuAction::Stop(ExitReason::Shutdown)
        );
        assert!(matches!(
            handle_exit(VcpuExit::InternalError, &ctx),
            VcpuAction::Fatal(s) if s.contains("emulation failure")
        ));
        assert!(matches!(
            handle_exit(VcpuExit::FailEntry(0x21, 0), &ctx),
            VcpuAction::Fatal(s) if s.contains("0x21")
        ));
        assert!(matches!(
            handle_exit(VcpuExit::Exception, &ctx),
            VcpuAction::Fatal(_)
        ));
        assert_eq!(handle_exit(VcpuExit::Intr, &ctx), VcpuAction::Continue);
    }

    #[test]
    fn run_state_only_moves_forward() {
        let s = RunState::default();
        assert_eq!(s.get(), VcpuState::Created);
        s.set(VcpuState::Running);
        assert_eq!(s.get(), VcpuState::Running);
        s.set(VcpuState::Stopping);
        s.set(VcpuState::Running);
        assert_eq!(s.get(), VcpuState::Stopping);
        s.set(VcpuState::Exited);
        s.set(VcpuState::Stopping);
        assert_eq!(s.get(), VcpuState::Exited);
    }
}
