//! One NCCL communicator with a deadline on every operation.
//!
//! The communicator is non-blocking (`ncclConfig_t.blocking = 0`): its
//! creation and every call return at once, and [`Watchdog`] polls them to
//! completion or to the deadline (see [`super::watch`]). Operations take raw
//! device addresses and a stream; callers order them against other streams
//! with events.
//!
//! Teardown: `ncclCommAbort`, never `ncclCommDestroy`, which may wait on
//! peers (a dead one: forever). An aborted communicator is not touched
//! again, so dropping one after a failure neither panics nor hangs.

use std::ffi::c_int;
use std::time::Duration;

use super::library::{Config, Nccl, RawComm, UniqueId, IN_PROGRESS, SUCCESS};
use super::watch::{Inflight, Progress, Watchdog};
use crate::backend::cuda::{Event, Gpu, Stream};

/// A live (or aborted) communicator of this rank.
pub struct Communicator {
    nccl: &'static Nccl,
    /// Null once aborted.
    comm: RawComm,
    rank: usize,
    world: usize,
    watch: Watchdog,
}

// SAFETY: the handle is only used behind `&mut self` (one thread at a
// time), which NCCL allows for a communicator.
unsafe impl Send for Communicator {}

/// The communicator's state as a poll sees it, with an optional event
/// recorded after the operation.
struct Poll<'a> {
    nccl: &'static Nccl,
    comm: &'a mut RawComm,
    event: Option<&'a Event>,
}

impl Inflight for Poll<'_> {
    fn poll(&mut self) -> Progress {
        if self.comm.is_null() {
            return Progress::Failed("the communicator is gone".into());
        }
        let mut state: c_int = SUCCESS;
        // SAFETY: a live communicator; writes one int.
        let r = unsafe { (self.nccl.comm_get_async_error)(*self.comm, &mut state) };
        if r != SUCCESS {
            return Progress::Failed(self.nccl.describe(r));
        }
        if state != SUCCESS && state != IN_PROGRESS {
            return Progress::Failed(self.nccl.describe(state));
        }
        match self.event {
            Some(e) => match e.query() {
                Ok(true) => Progress::Done,
                Ok(false) => Progress::Pending,
                Err(err) => Progress::Failed(err.to_string()),
            },
            None if state == SUCCESS => Progress::Done,
            None => Progress::Pending,
        }
    }

    fn abort(&mut self) {
        if !self.comm.is_null() {
            // SAFETY: a live communicator, never used after this call.
            let _ = unsafe { (self.nccl.comm_abort)(*self.comm) };
            *self.comm = std::ptr::null_mut();
        }
    }
}

impl Communicator {
    /// Joins the communicator `id` as `rank` of `world` on `gpu`'s device,
    /// waiting at most `timeout` for every rank to join.
    pub fn init(
        nccl: &'static Nccl,
        id: UniqueId,
        rank: usize,
        world: usize,
        gpu: &Gpu,
        timeout: Duration,
    ) -> Result<Communicator, String> {
        let (r, n) = match (c_int::try_from(rank), c_int::try_from(world)) {
            (Ok(r), Ok(n)) => (r, n),
            _ => return Err(format!("rank {rank} of {world}: too many ranks")),
        };
        // NCCL takes the device from the calling thread's current context.
        gpu.bind().map_err(|e| e.to_string())?;
        let mut comm: RawComm = std::ptr::null_mut();
        let mut config = Config::nonblocking();
        // SAFETY: `comm` and `config` are valid for the call; `id` is the
        // 128 bytes rank 0's ncclGetUniqueId wrote.
        let r = unsafe { (nccl.comm_init_rank_config)(&mut comm, n, id, r, &mut config) };
        let mut me = Communicator {
            nccl,
            comm,
            rank,
            world,
            watch: Watchdog::new(timeout),
        };
        if r != SUCCESS && r != IN_PROGRESS {
            let why = format!("ncclCommInitRankConfig: {}", nccl.describe(r));
            me.abort_with(why.clone());
            return Err(why);
        }
        if me.comm.is_null() {
            return Err("ncclCommInitRankConfig returned no communicator".into());
        }
        me.settle("joining the communicator")?;
        Ok(me)
    }

    pub fn rank(&self) -> usize {
        self.rank
    }
    pub fn world(&self) -> usize {
        self.world
    }
    pub fn nccl(&self) -> &'static Nccl {
        self.nccl
    }

    /// Refuses work after an abort.
    pub fn check(&self) -> Result<(), String> {
        self.watch.check()
    }

    fn poll<'a>(&'a mut self, event: Option<&'a Event>) -> (&'a mut Watchdog, Poll<'a>) {
        (
            &mut self.watch,
            Poll {
                nccl: self.nccl,
                comm: &mut self.comm,
                event,
            },
        )
    }

    /// Aborts (once) and remembers why.
    fn abort_with(&mut self, why: String) -> String {
        let (w, mut p) = self.poll(None);
        w.fail(&mut p, why)
    }

    /// Waits until the communicator is no longer busy with a call that
    /// returned `ncclInProgress` (joining, connecting on first use).
    fn settle(&mut self, what: &str) -> Result<(), String> {
        let (w, mut p) = self.poll(None);
        w.wait(what, &mut p)
    }

    /// Runs one enqueueing call; an error result aborts.
    fn enqueue(&mut self, what: &str, call: impl FnOnce(RawComm) -> c_int) -> Result<(), String> {
        self.check()?;
        let r = call(self.comm);
        match r {
            SUCCESS => Ok(()),
            IN_PROGRESS => self.settle(what),
            r => {
                let why = format!("{what}: {}", self.nccl.describe(r));
                Err(self.abort_with(why))
            }
        }
    }

    /// Enqueues the sum over ranks of `count` elements of `dtype` at `send`
    /// into `recv` (may be equal) on `stream`.
    ///
    /// # Safety
    /// `send` and `recv` must be device addresses on this communicator's
    /// GPU holding `count` elements of `dtype` each, alive until `stream`
    /// has run the operation.
    pub unsafe fn all_reduce(
        &mut self,
        send: u64,
        recv: u64,
        count: usize,
        dtype: c_int,
        op: c_int,
        stream: &Stream,
    ) -> Result<(), String> {
        let nccl = self.nccl;
        let stream = stream.raw().cu_stream();
        self.enqueue("ncclAllReduce", |comm| {
            // SAFETY: the addresses as the caller vouches; `comm` is live.
            unsafe {
                (nccl.all_reduce)(
                    send as usize as *const _,
                    recv as usize as *mut _,
                    count,
                    dtype,
                    op,
                    comm,
                    stream,
                )
            }
        })
    }

    /// Enqueues the gather of every rank's `count` elements at `send` into
    /// `recv` (rank order) on `stream`.
    ///
    /// # Safety
    /// As for [`Communicator::all_reduce`], with `recv` holding
    /// `world * count` elements.
    pub unsafe fn all_gather(
        &mut self,
        send: u64,
        recv: u64,
        count: usize,
        dtype: c_int,
        stream: &Stream,
    ) -> Result<(), String> {
        let nccl = self.nccl;
        let stream = stream.raw().cu_stream();
        self.enqueue("ncclAllGather", |comm| {
            // SAFETY: the addresses as the caller vouches; `comm` is live.
            unsafe {
                (nccl.all_gather)(
                    send as usize as *const _,
                    recv as usize as *mut _,
                    count,
                    dtype,
                    comm,
                    stream,
                )
            }
        })
    }

    /// Waits within the deadline for `event` (recorded after the operations
    /// to wait for), watching the communicator's asynchronous error.
    pub fn wait_event(&mut self, what: &str, event: &Event) -> Result<(), String> {
        let (w, mut p) = self.poll(Some(event));
        w.wait(what, &mut p)
    }

    /// Aborts now (an error elsewhere means the ranks are out of step).
    pub fn abort(&mut self, why: String) -> String {
        self.abort_with(why)
    }
}

impl Drop for Communicator {
    fn drop(&mut self) {
        if !self.comm.is_null() {
            // SAFETY: a live communicator, never used again. Abort, not
            // destroy: it does not wait for the other ranks.
            let _ = unsafe { (self.nccl.comm_abort)(self.comm) };
            self.comm = std::ptr::null_mut();
        }
    }
}
