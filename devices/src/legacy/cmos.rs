//! The PC's CMOS RTC (Motorola MC146818) at ports 0x70 (index) and 0x71 (data): the time of
//! day from the host's UTC clock, status registers A-D, and 128 bytes of CMOS RAM.
//!
//! Without it every read of port 0x71 saw an empty bus (0xff): "update in progress" forever and
//! "time invalid", so Linux's `rtc_cmos` driver and its boot-time RTC reads polled the two ports
//! about 20,000 times per boot (each one an exit to kiln), and the guest had no `/dev/rtc0`
//! where QEMU's guests have one. No interrupt (IRQ 8) is raised: alarms, periodic and update
//! interrupts are accepted in register B and never fire, so register C always reads 0.

use std::time::SystemTime;

use chrono::{DateTime, Datelike, NaiveDate, Timelike, Utc};

use crate::bus::BusDevice;

/// Time-of-day registers.
const SECONDS: usize = 0x00;
const MINUTES: usize = 0x02;
const HOURS: usize = 0x04;
const WEEKDAY: usize = 0x06;
const DAY: usize = 0x07;
const MONTH: usize = 0x08;
const YEAR: usize = 0x09;
/// Century, where the PC (and ACPI's FADT default) keeps it.
const CENTURY: usize = 0x32;
/// Status registers.
const REG_A: usize = 0x0a;
const REG_B: usize = 0x0b;
const REG_C: usize = 0x0c;
const REG_D: usize = 0x0d;

/// Register A: update in progress (read-only; never set here, the time is always readable).
const A_UIP: u8 = 0x80;
/// Register A after reset: 32.768 kHz time base, 1024 Hz periodic rate.
const A_DEFAULT: u8 = 0x26;
/// Register B: SET halts updates so the guest can write the time.
const B_SET: u8 = 0x80;
/// Register B: data mode binary (else BCD).
const B_BINARY: u8 = 0x04;
/// Register B: 24-hour mode (else 12-hour with bit 7 of the hour meaning PM).
const B_24H: u8 = 0x02;
/// Register D: valid RAM and time (the battery is good).
const D_VRT: u8 = 0x80;

/// The clock the RTC shows, before the guest's own offset.
pub type Clock = fn() -> SystemTime;

/// The MC146818 CMOS RTC and RAM.
pub struct Cmos {
    index: u8,
    ram: [u8; 128],
    clock: Clock,
    /// What the guest set the clock to, relative to `clock`, in seconds.
    offset: i64,
}

impl Default for Cmos {
    fn default() -> Self {
        Self::new(SystemTime::now)
    }
}

impl Cmos {
    /// A CMOS RTC whose time of day is `clock` (UTC) until the guest sets it.
    pub fn new(clock: Clock) -> Self {
        let mut ram = [0u8; 128];
        ram[REG_A] = A_DEFAULT;
        ram[REG_B] = B_24H;
        ram[REG_D] = D_VRT;
        Self {
            index: 0,
            ram,
            clock,
            offset: 0,
        }
    }

    fn now(&self) -> DateTime<Utc> {
        let host = DateTime::<Utc>::from((self.clock)());
        let delta = chrono::TimeDelta::try_seconds(self.offset).unwrap_or_default();
        host.checked_add_signed(delta).unwrap_or(host)
    }

    fn encode(&self, value: u32) -> u8 {
        let v = (value % 100) as u8;
        if self.ram[REG_B] & B_BINARY != 0 {
            v
        } else {
            (v / 10) << 4 | (v % 10)
        }
    }

    fn decode(&self, value: u8) -> u32 {
        if self.ram[REG_B] & B_BINARY != 0 {
            u32::from(value)
        } else {
            u32::from(value >> 4) * 10 + u32::from(value & 0x0f)
        }
    }

    fn encode_hour(&self, hour: u32) -> u8 {
        if self.ram[REG_B] & B_24H != 0 {
            return self.encode(hour);
        }
        let pm = if hour >= 12 { 0x80 } else { 0 };
        let h12 = match hour % 12 {
            0 => 12,
            h => h,
        };
        self.encode(h12) | pm
    }

    fn decode_hour(&self, value: u8) -> u32 {
        if self.ram[REG_B] & B_24H != 0 {
            return self.decode(value);
        }
        let h12 = self.decode(value & 0x7f) % 12;
        if value & 0x80 != 0 {
            h12 + 12
        } else {
            h12
        }
    }

    /// A time-of-day register as the guest sees it now.
    fn time_register(&self, index: usize) -> Option<u8> {
        let t = self.now();
        Some(match index {
            SECONDS => self.encode(t.second()),
            MINUTES => self.encode(t.minute()),
            HOURS => self.encode_hour(t.hour()),
            // Sunday is 1.
            WEEKDAY => self.encode(t.weekday().number_from_sunday()),
            DAY => self.encode(t.day()),
            MONTH => self.encode(t.month()),
            YEAR => self.encode(t.year().rem_euclid(100) as u32),
            CENTURY => self.encode(t.year().div_euclid(100).rem_euclid(100) as u32),
            _ => return None,
        })
    }

    /// The guest ended a SET cycle: the time registers it wrote become the clock.
    fn take_written_time(&mut self) {
        let year = self.decode(self.ram[CENTURY]) * 100 + self.decode(self.ram[YEAR]);
        let written = i32::try_from(year).ok().and_then(|y| {
            NaiveDate::from_ymd_opt(y, self.decode(self.ram[MONTH]), self.decode(self.ram[DAY]))?
                .and_hms_opt(
                    self.decode_hour(self.ram[HOURS]),
                    self.decode(self.ram[MINUTES]),
                    self.decode(self.ram[SECONDS]),
                )
        });
        match written {
            Some(t) => {
                let host = DateTime::<Utc>::from((self.clock)());
                self.offset = t.and_utc().timestamp() - host.timestamp();
            }
            None => tracing::debug!("the guest wrote an invalid date to the CMOS RTC; ignored"),
        }
    }

    fn read_data(&mut self) -> u8 {
        let index = usize::from(self.index);
        let set = self.ram[REG_B] & B_SET != 0;
        match index {
            // Never "update in progress": the registers are computed at each read.
            REG_A => self.ram[REG_A] & !A_UIP,
            // No interrupt ever becomes pending.
            REG_C => 0,
            REG_D => D_VRT,
            _ if !set => self.time_register(index).unwrap_or(self.ram[index]),
            _ => self.ram[index],
        }
    }

    fn write_data(&mut self, value: u8) {
        let index = usize::from(self.index);
        match index {
            REG_A => self.ram[REG_A] = value & !A_UIP,
            REG_B => {
                let was_set = self.ram[REG_B] & B_SET != 0;
                if value & B_SET != 0 && !was_set {
                    // Freeze the current time into the registers the guest is about to write.
                    for i in [SECONDS, MINUTES, HOURS, WEEKDAY, DAY, MONTH, YEAR, CENTURY] {
                        if let Some(v) = self.time_register(i) {
                            self.ram[i] = v;
                        }
                    }
                }
                self.ram[REG_B] = value;
                if was_set && value & B_SET == 0 {
                    self.take_written_time();
                }
            }
            REG_C | REG_D => {}
            _ => self.ram[index] = value,
        }
    }
}

impl BusDevice for Cmos {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            1 => self.read_data(),
            _ => 0xff,
        };
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            // Bit 7 masks NMIs on a PC; there is nothing to mask here.
            0 => self.index = value & 0x7f,
            1 => self.write_data(value),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    // 2026-12-06 20:34:56 UTC, a Sunday.
    fn fixed() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_589_296)
    }

    fn get(c: &mut Cmos, index: u8) -> u8 {
        c.write(0, &[index]);
        let mut b = [0u8];
        c.read(1, &mut b);
        b[0]
    }

    fn set(c: &mut Cmos, index: u8, value: u8) {
        c.write(0, &[index]);
        c.write(1, &[value]);
    }

    #[test]
    fn the_time_reads_in_bcd_24_hour_mode_as_linux_expects_after_reset() {
        let mut c = Cmos::new(fixed);
        assert_eq!(get(&mut c, 0x00), 0x56);
        assert_eq!(get(&mut c, 0x02), 0x34);
        assert_eq!(get(&mut c, 0x04), 0x20);
        assert_eq!(get(&mut c, 0x06), 0x01, "Sunday is 1");
        assert_eq!(get(&mut c, 0x07), 0x06);
        assert_eq!(get(&mut c, 0x08), 0x12);
        assert_eq!(get(&mut c, 0x09), 0x26);
        assert_eq!(get(&mut c, 0x32), 0x20);
        // Readable at once (no update in progress), valid, no interrupt pending.
        assert_eq!(get(&mut c, 0x0a) & 0x80, 0);
        assert_eq!(get(&mut c, 0x0d), 0x80);
        assert_eq!(get(&mut c, 0x0c), 0);
        // The NMI-mask bit of the index is not part of the index.
        assert_eq!(get(&mut c, 0x80), 0x56);
    }

    #[test]
    fn binary_and_12_hour_modes_follow_register_b() {
        let mut c = Cmos::new(fixed);
        set(&mut c, 0x0b, 0x04); // binary, 12-hour
        assert_eq!(get(&mut c, 0x00), 56);
        assert_eq!(get(&mut c, 0x04), 0x80 | 8, "20h is 8 PM");
        set(&mut c, 0x0b, 0x00); // BCD, 12-hour
        assert_eq!(get(&mut c, 0x04), 0x88);
    }

    #[test]
    fn the_guest_sets_the_clock_through_a_set_cycle() {
        let mut c = Cmos::new(fixed);
        set(&mut c, 0x0b, 0x82); // SET, 24-hour, BCD
                                 // While SET holds, the registers keep the frozen time and take the guest's writes.
        assert_eq!(get(&mut c, 0x02), 0x34);
        set(&mut c, 0x09, 0x30); // 2030
        set(&mut c, 0x08, 0x01);
        set(&mut c, 0x07, 0x02);
        set(&mut c, 0x04, 0x03);
        set(&mut c, 0x02, 0x04);
        set(&mut c, 0x00, 0x05);
        set(&mut c, 0x0b, 0x02);
        assert_eq!(
            [0x09, 0x08, 0x07, 0x04, 0x02, 0x00].map(|i| get(&mut c, i)),
            [0x30, 0x01, 0x02, 0x03, 0x04, 0x05]
        );
        // An impossible date leaves the clock as it was.
        set(&mut c, 0x0b, 0x82);
        set(&mut c, 0x08, 0x13);
        set(&mut c, 0x0b, 0x02);
        assert_eq!(get(&mut c, 0x09), 0x30);
        assert_eq!(get(&mut c, 0x08), 0x01);
    }

    #[test]
    fn cmos_ram_keeps_what_is_written_and_read_only_registers_stay() {
        let mut c = Cmos::new(fixed);
        set(&mut c, 0x40, 0xab);
        set(&mut c, 0x7f, 0xcd);
        assert_eq!(get(&mut c, 0x40), 0xab);
        assert_eq!(get(&mut c, 0x7f), 0xcd);
        set(&mut c, 0x0d, 0x00);
        assert_eq!(get(&mut c, 0x0d), 0x80);
        set(&mut c, 0x0a, 0xff);
        assert_eq!(get(&mut c, 0x0a), 0x7f, "UIP is read-only");
        // The index port reads as an empty bus; wider reads are zero-extended.
        let mut b = [0u8; 2];
        c.read(0, &mut b);
        assert_eq!(b, [0xff, 0]);
    }
}
