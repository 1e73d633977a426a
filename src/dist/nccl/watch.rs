//! Deadlines for NCCL operations: nothing waits forever on a dead rank.
//!
//! NCCL calls on a non-blocking communicator return at once; the host then
//! polls the operation ([`Inflight::poll`]: the communicator's asynchronous
//! error and a CUDA event after the operation) until it is done, it fails,
//! or the deadline passes. On failure or timeout the communicator is aborted
//! ([`Inflight::abort`], `ncclCommAbort`: NCCL's kernels exit, so the
//! streams drain) exactly once, and every later operation fails at once
//! with the first cause: after one failure the ranks no longer agree on
//! what comes next. The rules are here, apart from NCCL, so tests drive
//! them with fakes.

use std::time::{Duration, Instant};

/// Where an operation stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    Done,
    Pending,
    Failed(String),
}

/// An operation under watch.
pub trait Inflight {
    fn poll(&mut self) -> Progress;
    /// Tears the communicator down (called at most once per communicator).
    fn abort(&mut self);
}

/// Host polls before the first sleep: most waits end within microseconds.
const SPINS: u32 = 200;
const FIRST_NAP: Duration = Duration::from_micros(20);
const MAX_NAP: Duration = Duration::from_millis(2);

/// The deadline and the broken state of one communicator.
#[derive(Debug)]
pub struct Watchdog {
    timeout: Duration,
    /// Why the communicator was aborted, once it was.
    broken: Option<String>,
}

impl Watchdog {
    pub fn new(timeout: Duration) -> Watchdog {
        Watchdog {
            timeout,
            broken: None,
        }
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Whether an earlier failure aborted the communicator.
    pub fn is_broken(&self) -> bool {
        self.broken.is_some()
    }

    /// Refuses any operation after an abort.
    pub fn check(&self) -> Result<(), String> {
        match &self.broken {
            Some(why) => Err(format!(
                "the communicator was aborted after an earlier failure ({why})"
            )),
            None => Ok(()),
        }
    }

    /// Aborts through `op` (unless already aborted) and returns the message
    /// the caller reports.
    pub fn fail(&mut self, op: &mut dyn Inflight, why: String) -> String {
        if self.broken.is_none() {
            op.abort();
            self.broken = Some(why.clone());
        }
        why
    }

    /// Polls `op` until it is done; fails it (aborting) on an error or when
    /// `timeout` passes. `what` names it in the message.
    pub fn wait(&mut self, what: &str, op: &mut dyn Inflight) -> Result<(), String> {
        self.check()?;
        let start = Instant::now();
        let mut polls = 0u32;
        let mut nap = FIRST_NAP;
        loop {
            match op.poll() {
                Progress::Done => return Ok(()),
                Progress::Failed(e) => return Err(self.fail(op, format!("{what}: {e}"))),
                Progress::Pending => {}
            }
            let waited = start.elapsed();
            if waited >= self.timeout {
                let why = format!(
                    "{what}: not done after {:.1} s (a rank died, hangs, or is out of step; \
                     TRM_RENDEZVOUS_TIMEOUT_S sets the wait)",
                    waited.as_secs_f64()
                );
                return Err(self.fail(op, why));
            }
            polls += 1;
            if polls < SPINS {
                std::thread::yield_now();
            } else {
                std::thread::sleep(nap.min(self.timeout - waited));
                nap = (nap * 2).min(MAX_NAP);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Done after `done_after` polls, failed after `fail_after`, or never.
    struct Fake {
        polls: u32,
        done_after: Option<u32>,
        fail_after: Option<u32>,
        aborts: u32,
    }

    impl Fake {
        fn new(done_after: Option<u32>, fail_after: Option<u32>) -> Fake {
            Fake {
                polls: 0,
                done_after,
                fail_after,
                aborts: 0,
            }
        }
    }

    impl Inflight for Fake {
        fn poll(&mut self) -> Progress {
            self.polls += 1;
            if self.fail_after.is_some_and(|n| self.polls >= n) {
                return Progress::Failed("ncclRemoteError: peer closed".into());
            }
            if self.done_after.is_some_and(|n| self.polls >= n) {
                return Progress::Done;
            }
            Progress::Pending
        }
        fn abort(&mut self) {
            self.aborts += 1;
        }
    }

    #[test]
    fn completion_is_not_an_abort() {
        let mut w = Watchdog::new(Duration::from_secs(5));
        let mut op = Fake::new(Some(300), None);
        w.wait("all-reduce", &mut op).unwrap();
        assert_eq!((op.polls, op.aborts), (300, 0));
        assert!(!w.is_broken());
    }

    /// An operation that never completes: the wait ends at the deadline,
    /// aborts once, and every later operation fails without polling.
    #[test]
    fn a_hung_operation_times_out_and_aborts_once() {
        let timeout = Duration::from_millis(60);
        let mut w = Watchdog::new(timeout);
        let mut op = Fake::new(None, None);
        let start = Instant::now();
        let e = w.wait("all-reduce of bucket 1", &mut op).unwrap_err();
        let took = start.elapsed();
        assert!(took >= timeout, "returned after {took:?}");
        assert!(took < timeout + Duration::from_millis(500), "took {took:?}");
        assert!(
            e.contains("all-reduce of bucket 1: not done after 0.1 s"),
            "{e}"
        );
        assert!(e.contains("TRM_RENDEZVOUS_TIMEOUT_S"), "{e}");
        assert_eq!(op.aborts, 1);
        assert!(w.is_broken());
        let mut next = Fake::new(Some(1), None);
        let e2 = w.wait("all-gather", &mut next).unwrap_err();
        assert!(e2.contains("aborted after an earlier failure"), "{e2}");
        assert!(e2.contains("all-reduce of bucket 1"), "{e2}");
        assert_eq!((next.polls, next.aborts), (0, 0));
        // A failure reported afterwards does not abort again.
        let _ = w.fail(&mut op, "later".into());
        assert_eq!(op.aborts, 1);
    }

    #[test]
    fn an_asynchronous_error_aborts_at_once() {
        let mut w = Watchdog::new(Duration::from_secs(60));
        let mut op = Fake::new(None, Some(3));
        let start = Instant::now();
        let e = w.wait("all-gather", &mut op).unwrap_err();
        assert!(start.elapsed() < Duration::from_secs(1));
        assert_eq!(e, "all-gather: ncclRemoteError: peer closed");
        assert_eq!((op.polls, op.aborts), (3, 1));
        assert!(w.check().is_err());
    }
}
