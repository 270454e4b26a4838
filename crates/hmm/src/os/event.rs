//! Wake-ups for threads that sleep in `poll`: an `eventfd`, and a poll over a
//! userfaultfd together with one.

use std::os::fd::OwnedFd;
use std::time::Duration;

use rustix::event::{EventfdFlags, PollFd, PollFlags};
use rustix::io::Errno;

/// An `eventfd` used to wake a thread polling it (a fault service at shutdown).
#[derive(Debug)]
pub struct Notifier {
    fd: OwnedFd,
}

/// What a [`Notifier::poll_with`] wait saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Ready {
    /// The other descriptor is readable.
    pub other: bool,
    /// The notifier was signalled (and is now reset).
    pub notified: bool,
}

impl Notifier {
    /// A new, unsignalled notifier.
    pub fn new() -> Result<Self, Errno> {
        let fd = rustix::event::eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?;
        Ok(Self { fd })
    }

    /// Signals the notifier: a thread in [`poll_with`](Self::poll_with) wakes.
    pub fn notify(&self) {
        // Writing 1 fails only when the counter would overflow, which leaves it
        // signalled anyway.
        let _ = rustix::io::write(&self.fd, &1u64.to_ne_bytes());
    }

    /// Waits until `other` is readable, the notifier is signalled, or `timeout`
    /// passes (`None`: no limit). A signal is consumed.
    pub fn poll_with(
        &self,
        other: std::os::fd::BorrowedFd<'_>,
        timeout: Option<Duration>,
    ) -> Result<Ready, Errno> {
        let ts = timeout.map(|t| rustix::time::Timespec {
            tv_sec: t.as_secs().try_into().unwrap_or(i64::MAX),
            tv_nsec: t.subsec_nanos().into(),
        });
        let mut fds = [PollFd::new(&other, PollFlags::IN), PollFd::new(&self.fd, PollFlags::IN)];
        loop {
            match rustix::event::poll(&mut fds, ts.as_ref()) {
                Ok(_) => break,
                Err(Errno::INTR) => continue,
                Err(e) => return Err(e),
            }
        }
        let other = !fds[0].revents().is_empty();
        let notified = !fds[1].revents().is_empty();
        if notified {
            let mut buf = [0u8; 8];
            let _ = rustix::io::read(&self.fd, &mut buf);
        }
        Ok(Ready { other, notified })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn notify_wakes_and_is_consumed() {
        let n = Notifier::new().unwrap();
        let other = Notifier::new().unwrap();
        let r = n.poll_with(other.fd.as_fd(), Some(Duration::from_millis(1))).unwrap();
        assert_eq!(r, Ready::default());
        n.notify();
        let r = n.poll_with(other.fd.as_fd(), Some(Duration::from_millis(1))).unwrap();
        assert!(r.notified && !r.other);
        let r = n.poll_with(other.fd.as_fd(), Some(Duration::from_millis(1))).unwrap();
        assert!(!r.notified, "a signal is consumed by the wait that saw it");
        other.notify();
        let r = n.poll_with(other.fd.as_fd(), Some(Duration::from_millis(1))).unwrap();
        assert!(r.other && !r.notified);
    }
}
