//! The host fds a device asks to watch (sockets, timers), kept in an epoll set of their own.
//!
//! Devices close sockets whenever a connection ends, and the next socket they open often gets
//! the same fd number. The kernel drops a closed fd from every epoll set by itself, but
//! event-manager keeps its own fd → subscriber table and can only forget an fd through an
//! `epoll_ctl(DEL)` that succeeds — which it no longer can once the fd is closed. The stale
//! entry then refuses the new socket with the same number (`FdAlreadyRegistered`), and that
//! socket is never watched: a vsock `CONNECT` from the host went unread forever. So each device
//! gets one inner epoll set (its fd is what event-manager watches, for the device's lifetime),
//! and the fds in it follow the device's wishes here, where a closed or reused fd is expected.
//! Firecracker's vsock muxer keeps an inner epoll for the same reason.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsRawFd, RawFd};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

/// Most ready fds handed to the device per wake-up; the rest wait for the next (level-triggered).
const MAX_READY: usize = 64;

/// One device's watched host fds.
pub struct HostFdWatch {
    epoll: Epoll,
    watched: BTreeMap<RawFd, EventSet>,
}

impl HostFdWatch {
    /// An empty set.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            epoll: Epoll::new()?,
            watched: BTreeMap::new(),
        })
    }

    /// Brings the set in line with `wanted`. An fd the device closed may still be listed as
    /// watched, or its number may now name a new socket: a failed modify means "add it again",
    /// and a failed delete means the kernel dropped it already.
    pub fn sync(&mut self, wanted: Vec<(RawFd, EventSet)>) {
        let wanted: BTreeMap<RawFd, EventSet> = wanted.into_iter().collect();
        for &fd in self.watched.keys() {
            if !wanted.contains_key(&fd) {
                let _ = self
                    .epoll
                    .ctl(ControlOperation::Delete, fd, EpollEvent::default());
            }
        }
        for (&fd, &set) in &wanted {
            let event = EpollEvent::new(set, fd as u64);
            let (first, second) = if self.watched.contains_key(&fd) {
                (ControlOperation::Modify, ControlOperation::Add)
            } else {
                (ControlOperation::Add, ControlOperation::Modify)
            };
            if self.epoll.ctl(first, fd, event).is_err() {
                if let Err(e) = self.epoll.ctl(second, fd, event) {
                    tracing::warn!("cannot watch device fd {fd}: {e}");
                }
            }
        }
        self.watched = wanted;
    }

    /// The watched fds that are ready now, with their events (never blocks).
    pub fn ready(&self) -> Vec<(RawFd, EventSet)> {
        let mut events = [EpollEvent::default(); MAX_READY];
        match self.epoll.wait(0, &mut events) {
            Ok(n) => events[..n]
                .iter()
                .map(|e| (e.data() as RawFd, e.event_set()))
                .collect(),
            Err(e) => {
                tracing::warn!("epoll_wait on device fds: {e}");
                Vec::new()
            }
        }
    }
}

impl AsRawFd for HostFdWatch {
    fn as_raw_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    #[test]
    fn a_new_socket_that_reuses_a_closed_fd_number_is_watched() {
        let mut watch = HostFdWatch::new().unwrap();
        let (a, _a_peer) = UnixStream::pair().unwrap();
        let old_fd = a.as_raw_fd();
        watch.sync(vec![(old_fd, EventSet::IN)]);
        // The device closes the socket, then opens another one that gets the same number.
        drop(a);
        drop(_a_peer);
        let (b, mut b_peer) = UnixStream::pair().unwrap();
        assert_eq!(
            b.as_raw_fd(),
            old_fd,
            "the kernel reuses the lowest free fd"
        );
        watch.sync(vec![(b.as_raw_fd(), EventSet::IN)]);
        b_peer.write_all(b"CONNECT 1024\n").unwrap();
        let ready = watch.ready();
        assert_eq!(ready.len(), 1, "{ready:?}");
        assert_eq!(ready[0].0, b.as_raw_fd());
        assert!(ready[0].1.contains(EventSet::IN));
    }

    #[test]
    fn fds_no_longer_wanted_stop_reporting_and_unknown_ones_are_ignored() {
        let mut watch = HostFdWatch::new().unwrap();
        let (a, mut a_peer) = UnixStream::pair().unwrap();
        watch.sync(vec![(a.as_raw_fd(), EventSet::IN)]);
        a_peer.write_all(b"x").unwrap();
        assert_eq!(watch.ready().len(), 1);
        watch.sync(Vec::new());
        assert!(watch.ready().is_empty());
        // A closed fd left in the wanted list (a device bug) is logged, not fatal.
        watch.sync(vec![(i32::MAX - 1, EventSet::IN)]);
        assert!(watch.ready().is_empty());
    }
}
