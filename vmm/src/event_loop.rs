//! The device event loop: an event-manager epoll loop on its own thread. Virtio queue
//! notifications (ioeventfds) and host-side sockets are subscribers; the vCPU threads never
//! wait on device work.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

/// A device-side subscriber of the loop.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// How long one epoll wait may block before the stop flag is looked at again.
const POLL_MS: i32 = 100;

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

/// A running event loop; stopping (or dropping) it joins the thread.
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

    /// Stops the loop and joins its thread.
    pub fn stop(&mut self) {
        self.stopped.store(true, Ordering::Release);
        let _ = self.stop_evt.write(1);
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
        lp.stop();
        assert!(t.elapsed() < Duration::from_secs(1));
    }
}
