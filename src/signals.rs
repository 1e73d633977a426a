//! Graceful preemption. Clusters (SLURM, Kubernetes) send SIGTERM, wait, then
//! kill; a user presses Ctrl-C. The first SIGTERM or SIGINT only raises a
//! flag that the training loop polls after each step (it then checkpoints
//! and exits with [`EXIT_PREEMPTED`]); a second one exits at once.

use std::sync::atomic::{AtomicI32, Ordering};

/// Exit status of a run stopped by a signal after saving its checkpoint
/// (EX_TEMPFAIL: "try again later", what a requeue wants to see).
pub const EXIT_PREEMPTED: u8 = 75;

/// The first signal received (0: none).
static RECEIVED: AtomicI32 = AtomicI32::new(0);

#[cfg(unix)]
extern "C" fn on_signal(sig: libc::c_int) {
    // Only async-signal-safe work here: an atomic swap, and _exit.
    if RECEIVED.swap(sig, Ordering::SeqCst) != 0 {
        // SAFETY: _exit is async-signal-safe; a second signal means "now".
        unsafe { libc::_exit(128 + sig) };
    }
}

/// Installs the handlers for SIGTERM and SIGINT (idempotent).
pub fn install() {
    #[cfg(unix)]
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: the handler only touches an atomic and calls _exit.
        unsafe {
            libc::signal(
                sig,
                on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
            );
        }
    }
}

/// The signal that asked to stop, if any.
pub fn requested() -> Option<i32> {
    match RECEIVED.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// A signal's name for messages.
pub fn name(sig: i32) -> String {
    #[cfg(unix)]
    {
        if sig == libc::SIGTERM {
            return "SIGTERM".into();
        }
        if sig == libc::SIGINT {
            return "SIGINT".into();
        }
    }
    format!("signal {sig}")
}
