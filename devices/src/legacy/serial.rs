//! COM1: vm-superio's 16550 model behind a bus, interrupting through an eventfd (irqfd).

use std::io;

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;
use crate::console::ConsoleSink;

/// A [`Trigger`] that signals an eventfd, registered by the VMM as an irqfd.
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// The 16550's state in a snapshot: DLL, DLM, IER, IIR, LCR, LSR, MCR, MSR, SCR, and the
/// receive FIFO.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialSnapshot {
    /// The nine registers, in the order above.
    pub registers: [u8; 9],
    /// Bytes received and not yet read by the guest.
    pub in_buffer: Vec<u8>,
}

/// The 16550 UART on COM1; its output goes to a [`ConsoleSink`].
pub struct SerialPort {
    uart: Serial<EventFdTrigger, vm_superio::serial::NoEvents, ConsoleSink>,
}

impl SerialPort {
    /// A UART raising `irq` and writing to `sink`.
    pub fn new(irq: EventFd, sink: ConsoleSink) -> Self {
        Self {
            uart: Serial::new(EventFdTrigger(irq), sink),
        }
    }

    /// The UART's registers and receive FIFO, for a snapshot.
    pub fn state(&self) -> SerialSnapshot {
        let s = self.uart.state();
        SerialSnapshot {
            registers: [
                s.baud_divisor_low,
                s.baud_divisor_high,
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
            ],
            in_buffer: s.in_buffer,
        }
    }

    /// A UART in the state a snapshot saved; a FIFO longer than the 16550's is refused.
    pub fn from_state(
        state: &SerialSnapshot,
        irq: EventFd,
        sink: ConsoleSink,
    ) -> Result<Self, String> {
        let [baud_divisor_low, baud_divisor_high, interrupt_enable, interrupt_identification, line_control, line_status, modem_control, modem_status, scratch] =
            state.registers;
        let s = vm_superio::serial::SerialState {
            baud_divisor_low,
            baud_divisor_high,
            interrupt_enable,
            interrupt_identification,
            line_control,
            line_status,
            modem_control,
            modem_status,
            scratch,
            in_buffer: state.in_buffer.clone(),
        };
        let uart = Serial::from_state(&s, EventFdTrigger(irq), vm_superio::serial::NoEvents, sink)
            .map_err(|e| format!("serial state: {e:?}"))?;
        Ok(Self { uart })
    }

    /// Feeds host input to the guest (the UART's receive FIFO); returns the bytes accepted.
    pub fn enqueue_input(&mut self, input: &[u8]) -> usize {
        self.uart.enqueue_raw_bytes(input).unwrap_or(0)
    }
}

impl BusDevice for SerialPort {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Ok(off), Some(first)) = (u8::try_from(offset), data.first_mut()) {
            *first = self.uart.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(off), Some(&value)) = (u8::try_from(offset), data.first()) {
            // Errors here are from the console sink or the irqfd; the guest cannot act on them,
            // and the in-memory log has the bytes already.
            if let Err(e) = self.uart.write(off, value) {
                tracing::debug!("serial write failed: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::console::{console, ConsoleOutput};

    #[test]
    fn guest_bytes_reach_the_console_and_raise_the_interrupt() {
        let (sink, log, _w) = console(&ConsoleOutput::None, &[]).unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut port = SerialPort::new(irq.try_clone().unwrap(), sink);
        // Enable the THR-empty interrupt (IER bit 1), then write two bytes to THR.
        port.write(1, &[0x02]);
        for b in b"hi" {
            port.write(0, &[*b]);
        }
        assert_eq!(log.text(), "hi");
        assert!(irq.read().unwrap() >= 1);
        // LSR (offset 5) reports the transmitter empty so polling drivers never wait.
        let mut lsr = [0u8];
        port.read(5, &mut lsr);
        assert_eq!(lsr[0] & 0x60, 0x60);
    }
}
