//! The device event loop: an event-manager epoll loop on its own thread. Virtio queue
//! notifications (ioeventfds) and host-side sockets are subscribers; the vCPU threads never
//! wait on device work.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

/// A device-side subscriber of the loop.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// How long one epoll wait may block before the stop flag is looked at again.
const POLL_MS: i32 = 100;
/// How long [`EventLoop::stop`] waits for a loop that is inside a device operation.
pub const STOP_WAIT: Duration = Duration::from_millis(200);

struct StopSubscriber {
    evt: EventFd,
    stopped: Arc<AtomicBool>,
}

impl MutEventSubscriber for StopSubscriber {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.evt.read();
        self.stopped.store(true, Ordering::Release);
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.evt, EventSet::IN)) {
            tracing::error!("cannot watch the event loop's stop eventfd: {e:?}");
        }
    }
}

/// A running event loop; stopping (or dropping) it ends the thread.
///
/// Stopping never waits on a busy device for long: the thread owns the subscribers (and through
/// them the devices and the guest memory they map), so a thread still inside a device operation
/// after [`STOP_WAIT`] is left to finish it; it then sees the stop flag and exits, and only then
/// drops what it touched.
pub struct EventLoop {
    stop_evt: EventFd,
    stopped: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EventLoop {
    /// Starts a loop serving `subscribers`.
    pub fn start(subscribers: Vec<Subscriber>) -> io::Result<Self> {
        let mut manager =
            EventManager::<Subscriber>::new().map_err(|e| io::Error::other(format!("{e:?}")))?;
        let stop_evt = EventFd::new(libc::EFD_NONBLOCK)?;
        let stopped = Arc::new(AtomicBool::new(false));
        manager.add_subscriber(Arc::new(Mutex::new(StopSubscriber {
            evt: stop_evt.try_clone()?,
            stopped: stopped.clone(),
        })));
        for s in subscribers {
            manager.add_subscriber(s);
        }
        let flag = stopped.clone();
        let thread = std::thread::Builder::new()
            .name("kiln-events".into())
            .spawn(move || {
                while !flag.load(Ordering::Acquire) {
                    if let Err(e) = manager.run_with_timeout(POLL_MS) {
                        tracing::error!("event loop failed: {e:?}");
                        break;
                    }
                }
            })?;
        Ok(Self {
            stop_evt,
            stopped,
            thread: Some(thread),
        })
    }

    /// Asks the loop to stop after the event it is handling; does not wait.
    pub fn signal_stop(&self) {
        self.stopped.store(true, Ordering::Release);
        let _ = self.stop_evt.write(1);
    }

    /// Waits until the thread ended or `deadline` passed; returns whether it ended.
    pub fn wait_until(&self, deadline: Instant) -> bool {
        loop {
            match &self.thread {
                Some(t) if !t.is_finished() => {}
                _ => return true,
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Stops the loop and joins its thread if it ends within [`STOP_WAIT`]; otherwise leaves
    /// it to exit once its device operation returns. Returns whether it was joined.
    pub fn stop(&mut self) -> bool {
        self.signal_stop();
        let ended = self.wait_until(Instant::now() + STOP_WAIT);
        if ended {
            self.join();
        } else if self.thread.take().is_some() {
            tracing::warn!(
                "the device event loop is still busy {STOP_WAIT:?} after stop; it exits when its device operation returns"
            );
        }
        ended
    }

    /// Stops the loop and waits for its thread however long it takes.
    pub fn join(&mut self) {
        self.signal_stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for EventLoop {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    struct Counter {
        evt: EventFd,
        seen: Arc<Mutex<u64>>,
    }

    impl MutEventSubscriber for Counter {
        fn process(&mut self, _events: Events, _ops: &mut EventOps) {
            if let Ok(n) = self.evt.read() {
                *self.seen.lock().unwrap() += n;
            }
        }
        fn init(&mut self, ops: &mut EventOps) {
            ops.add(Events::new(&self.evt, EventSet::IN)).unwrap();
        }
    }

    /// Stuck in its handler until `release` is set.
    struct Busy {
        evt: EventFd,
        entered: Arc<AtomicBool>,
        release: Arc<AtomicBool>,
        left: Arc<AtomicBool>,
    }

    impl MutEventSubscriber for Busy {
        fn process(&mut self, _events: Events, _ops: &mut EventOps) {
            let _ = self.evt.read();
            self.entered.store(true, Ordering::Release);
            while !self.release.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(1));
            }
            self.left.store(true, Ordering::Release);
        }
        fn init(&mut self, ops: &mut EventOps) {
            ops.add(Events::new(&self.evt, EventSet::IN)).unwrap();
        }
    }

    #[test]
    fn stop_returns_promptly_while_a_device_is_busy_and_the_thread_exits_after() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let flags = || Arc::new(AtomicBool::new(false));
        let (entered, release, left) = (flags(), flags(), flags());
        let busy = Arc::new(Mutex::new(Busy {
            evt: evt.try_clone().unwrap(),
            entered: entered.clone(),
            release: release.clone(),
            left: left.clone(),
        }));
        let weak = Arc::downgrade(&busy);
        let mut lp = EventLoop::start(vec![busy]).unwrap();
        evt.write(1).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !entered.load(Ordering::Acquire) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(entered.load(Ordering::Acquire));
        let t = Instant::now();
        assert!(!lp.stop(), "a busy loop cannot have been joined");
        // STOP_WAIT, plus slack for a loaded test host.
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
        drop(lp);
        // The subscriber is still alive: the thread owns it while it runs.
        assert!(weak.upgrade().is_some());
        release.store(true, Ordering::Release);
        let deadline = Instant::now() + Duration::from_secs(5);
        while weak.upgrade().is_some() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        assert!(left.load(Ordering::Acquire));
        assert!(weak.upgrade().is_none(), "the detached loop never exited");
    }

    #[test]
    fn subscribers_see_their_events_and_stop_joins() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let seen = Arc::new(Mutex::new(0));
        let mut lp = EventLoop::start(vec![Arc::new(Mutex::new(Counter {
            evt: evt.try_clone().unwrap(),
            seen: seen.clone(),
        }))])
        .unwrap();
        evt.write(5).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while *seen.lock().unwrap() != 5 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        assert_eq!(*seen.lock().unwrap(), 5);
        let t = Instant::now();
        assert!(lp.stop());
        assert!(t.elapsed() < Duration::from_secs(1));
    }
}
