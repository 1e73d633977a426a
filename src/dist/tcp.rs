//! [`Collective`] over plain TCP: the CPU and test path, not the GPU one
//! (GPUs use NCCL, [`super::nccl`]).
//!
//! A star through rank 0 over the rendezvous connections: every rank sends
//! its part to rank 0, which combines the parts in rank order (so a sum has
//! the same bits on every rank, whatever the arrival order) and sends the
//! result back. Each operation has a deadline: a rank that died or hangs
//! makes the others fail with a [`CollectiveError`] naming it, instead of
//! waiting forever. After a failure the collective stays failed: the ranks
//! no longer agree on which operation comes next.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::rendezvous::{self, RendezvousError};
use super::{Collective, CollectiveError, World};

/// What rank 0 hands out at the rendezvous: a rank that expects another use
/// of the rendezvous (an NCCL id) is told so.
const PAYLOAD: &[u8] = b"trm tcp collective v1";
const OK: u8 = 0;
const ABORT: u8 = 1;
const REDUCE_F32: u8 = 1;
const REDUCE_F64: u8 = 2;
const GATHER_ROWS: u8 = 3;
const GATHER_BYTES: u8 = 4;
/// A peer's claim above this many bytes is refused before allocating.
const MAX_MESSAGE: u64 = 1 << 34;

enum Links {
    Alone,
    /// Rank 0: the connection to rank r at index r - 1.
    Hub(Vec<TcpStream>),
    Spoke(TcpStream),
}

struct State {
    seq: u64,
    /// Why an earlier operation failed.
    broken: Option<String>,
}

/// One rank of a TCP collective (module docs).
pub struct TcpCollective {
    rank: usize,
    world: usize,
    links: Links,
    op_timeout: Duration,
    state: Mutex<State>,
}

/// Joins the run `world` describes: the rendezvous and every later
/// operation each wait at most `timeout`.
pub fn connect(world: &World, timeout: Duration) -> Result<TcpCollective, RendezvousError> {
    let links = if world.world_size == 1 {
        Links::Alone
    } else if world.rank == 0 {
        Links::Hub(rendezvous::lead(world, PAYLOAD, timeout)?)
    } else {
        let (payload, stream) = rendezvous::join(world, timeout)?;
        if payload != PAYLOAD {
            return Err(RendezvousError::Protocol {
                addr: format!("{:?}:{:?}", world.master_addr, world.master_port),
                message: "rank 0 serves another kind of run (not the TCP collective)".into(),
            });
        }
        Links::Spoke(stream)
    };
    Ok(TcpCollective {
        rank: world.rank,
        world: world.world_size,
        links,
        op_timeout: timeout,
        state: Mutex::new(State {
            seq: 0,
            broken: None,
        }),
    })
}

/// Reads exactly `buf.len()` bytes before `deadline`.
fn read_until(s: &TcpStream, buf: &mut [u8], deadline: Instant) -> Result<(), String> {
    // `Read` for `&TcpStream`: operations take `&self`.
    let mut r = s;
    let mut done = 0;
    while done < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err("sent nothing more before the deadline (hung or too slow)".into());
        }
        s.set_read_timeout(Some(left)).map_err(|e| e.to_string())?;
        match r.read(&mut buf[done..]) {
            Ok(0) => return Err("closed the connection (the process died?)".into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err("sent nothing more before the deadline (hung or too slow)".into())
            }
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(())
}

fn send(s: &TcpStream, head: u8, seq: u64, body: &[u8], wait: Duration) -> Result<(), String> {
    let mut msg = Vec::with_capacity(17 + body.len());
    msg.push(head);
    msg.extend_from_slice(&seq.to_le_bytes());
    msg.extend_from_slice(&(body.len() as u64).to_le_bytes());
    msg.extend_from_slice(body);
    let mut w = s;
    s.set_write_timeout(Some(wait.max(Duration::from_millis(1))))
        .and_then(|_| w.write_all(&msg))
        .map_err(|e| e.to_string())
}

/// A message: its head byte, sequence number and body.
fn receive(s: &TcpStream, deadline: Instant) -> Result<(u8, u64, Vec<u8>), String> {
    let mut head = [0u8; 17];
    read_until(s, &mut head, deadline)?;
    let seq = u64::from_le_bytes(head[1..9].try_into().unwrap_or_default());
    let len = u64::from_le_bytes(head[9..17].try_into().unwrap_or_default());
    if len > MAX_MESSAGE {
        return Err(format!(
            "announced {len} bytes, more than any operation sends"
        ));
    }
    let mut body = vec![0u8; len as usize];
    read_until(s, &mut body, deadline)?;
    Ok((head[0], seq, body))
}

/// A number that travels as little-endian bytes and adds up.
trait Elem: Copy + std::ops::AddAssign {
    const SIZE: usize;
    const ZERO: Self;
    fn put(self, out: &mut Vec<u8>);
    fn get(b: &[u8]) -> Self;
}

macro_rules! elem {
    ($t:ty) => {
        impl Elem for $t {
            const SIZE: usize = std::mem::size_of::<$t>();
            const ZERO: Self = 0.0;
            fn put(self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
            fn get(b: &[u8]) -> Self {
                let mut a = [0u8; std::mem::size_of::<$t>()];
                a.copy_from_slice(b);
                <$t>::from_le_bytes(a)
            }
        }
    };
}
elem!(f32);
elem!(f64);

fn encode<T: Elem>(xs: &[T]) -> Vec<u8> {
    let mut out = Vec::with_capacity(xs.len() * T::SIZE);
    xs.iter().for_each(|&x| x.put(&mut out));
    out
}

fn decode_into<T: Elem>(bytes: &[u8], out: &mut [T]) {
    for (o, c) in out.iter_mut().zip(bytes.chunks_exact(T::SIZE)) {
        *o = T::get(c);
    }
}

/// `(ids, rows)` as one body: count, width, ids, rows.
fn encode_rows(ids: &[i32], rows: &[f32], width: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + ids.len() * 4 + rows.len() * 4);
    out.extend_from_slice(&(ids.len() as u64).to_le_bytes());
    out.extend_from_slice(&(width as u64).to_le_bytes());
    ids.iter()
        .for_each(|i| out.extend_from_slice(&i.to_le_bytes()));
    out.extend_from_slice(&encode(rows));
    out
}

struct Rows {
    ids: Vec<i32>,
    rows: Vec<f32>,
    width: usize,
}

fn decode_rows(b: &[u8]) -> Result<Rows, String> {
    let word = |i: usize| {
        b.get(i * 8..i * 8 + 8)
            .map(|w| u64::from_le_bytes(w.try_into().unwrap_or_default()))
    };
    let (count, width) = match (word(0), word(1)) {
        (Some(c), Some(w)) => (c as usize, w as usize),
        _ => {
            return Err(format!(
                "a row message of {} bytes lacks its header",
                b.len()
            ))
        }
    };
    let want = count
        .checked_mul(width)
        .and_then(|cells| cells.checked_add(count))
        .and_then(|n| n.checked_mul(4))
        .and_then(|n| n.checked_add(16));
    if want != Some(b.len()) {
        return Err(format!(
            "a row message of {} bytes does not hold {count} rows of width {width}",
            b.len()
        ));
    }
    let ids_end = 16 + count * 4;
    let ids = b[16..ids_end]
        .chunks_exact(4)
        .map(|c| i32::from_le_bytes(c.try_into().unwrap_or_default()))
        .collect();
    let mut rows = vec![0f32; count * width];
    decode_into(&b[ids_end..], &mut rows);
    Ok(Rows { ids, rows, width })
}

impl TcpCollective {
    /// Sets how long one operation may wait for the other ranks (the
    /// rendezvous timeout until then).
    pub fn with_op_timeout(mut self, timeout: Duration) -> TcpCollective {
        self.op_timeout = timeout;
        self
    }

    fn fail(&self, op: &'static str, message: String) -> CollectiveError {
        CollectiveError {
            op,
            rank: self.rank,
            world: self.world,
            message,
        }
    }

    /// One operation: `local` is this rank's body; rank 0 turns every rank's
    /// body, in rank order, into the reply with `combine`.
    fn exchange(
        &self,
        op: &'static str,
        tag: u8,
        local: Vec<u8>,
        combine: impl FnOnce(Vec<Vec<u8>>) -> Result<Vec<u8>, String>,
    ) -> Result<Vec<u8>, CollectiveError> {
        let mut state = self
            .state
            .lock()
            .map_err(|_| self.fail(op, "another thread panicked mid-operation".into()))?;
        if let Some(why) = &state.broken {
            return Err(self.fail(op, format!("an earlier operation failed: {why}")));
        }
        state.seq += 1;
        let seq = state.seq;
        let result = match &self.links {
            Links::Alone => combine(vec![local]),
            Links::Hub(peers) => self.hub(peers, tag, seq, local, combine),
            Links::Spoke(hub) => self.spoke(hub, tag, seq, &local),
        };
        result.map_err(|message| {
            state.broken = Some(message.clone());
            self.fail(op, message)
        })
    }

    fn hub(
        &self,
        peers: &[TcpStream],
        tag: u8,
        seq: u64,
        local: Vec<u8>,
        combine: impl FnOnce(Vec<Vec<u8>>) -> Result<Vec<u8>, String>,
    ) -> Result<Vec<u8>, String> {
        let deadline = Instant::now() + self.op_timeout;
        let mut parts = vec![local];
        let gathered = peers.iter().enumerate().try_for_each(|(i, s)| {
            let rank = i + 1;
            let (t, q, body) = receive(s, deadline).map_err(|e| format!("rank {rank} {e}"))?;
            if (t, q) != (tag, seq) {
                return Err(format!(
                    "rank {rank} is at operation {q} ({}), rank 0 at {seq} ({})",
                    op_name(t),
                    op_name(tag)
                ));
            }
            parts.push(body);
            Ok(())
        });
        let reply = gathered.and_then(|_| combine(parts));
        let wait = self.op_timeout;
        match reply {
            Ok(body) => {
                for (i, s) in peers.iter().enumerate() {
                    send(s, OK, seq, &body, wait).map_err(|e| format!("rank {}: {e}", i + 1))?;
                }
                Ok(body)
            }
            Err(why) => {
                // Tell every rank still listening, so each names the culprit.
                for s in peers {
                    let _ = send(s, ABORT, seq, why.as_bytes(), Duration::from_secs(1));
                }
                Err(why)
            }
        }
    }

    fn spoke(&self, hub: &TcpStream, tag: u8, seq: u64, local: &[u8]) -> Result<Vec<u8>, String> {
        send(hub, tag, seq, local, self.op_timeout)
            .map_err(|e| format!("sending to rank 0: {e}"))?;
        // Rank 0 waits up to the timeout for the slowest rank, then reports
        // it: waiting twice as long lets that report arrive first.
        let deadline = Instant::now() + 2 * self.op_timeout;
        let (status, q, body) = receive(hub, deadline).map_err(|e| format!("rank 0 {e}"))?;
        if q != seq {
            return Err(format!(
                "rank 0 answered operation {q}, this rank is at {seq}"
            ));
        }
        match status {
            OK => Ok(body),
            ABORT => Err(format!(
                "rank 0 aborted: {}",
                String::from_utf8_lossy(&body)
            )),
            other => Err(format!("rank 0 sent unknown status {other}")),
        }
    }

    fn all_reduce<T: Elem>(
        &self,
        op: &'static str,
        tag: u8,
        buf: &mut [T],
    ) -> Result<(), CollectiveError> {
        if self.world == 1 {
            return Ok(());
        }
        let len = buf.len();
        let reply = self.exchange(op, tag, encode(buf), |parts| {
            let mut acc = vec![T::ZERO; len];
            for (rank, p) in parts.iter().enumerate() {
                if p.len() != len * T::SIZE {
                    return Err(format!(
                        "rank {rank} sent {} values, rank 0 has {len}",
                        p.len() / T::SIZE
                    ));
                }
                // Rank order, element by element: the same bits on every rank.
                for (a, c) in acc.iter_mut().zip(p.chunks_exact(T::SIZE)) {
                    *a += T::get(c);
                }
            }
            Ok(encode(&acc))
        })?;
        if reply.len() != len * T::SIZE {
            return Err(self.fail(
                op,
                format!("rank 0 returned {} bytes for {len} values", reply.len()),
            ));
        }
        decode_into(&reply, buf);
        Ok(())
    }
}

fn op_name(tag: u8) -> &'static str {
    match tag {
        REDUCE_F32 => "all-reduce f32",
        REDUCE_F64 => "all-reduce f64",
        GATHER_ROWS => "all-gather rows",
        GATHER_BYTES => "all-gather bytes",
        _ => "unknown",
    }
}

impl Collective for TcpCollective {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        self.all_reduce("TCP all-reduce", REDUCE_F32, buf)
    }
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<(), CollectiveError> {
        self.all_reduce("TCP all-reduce f64", REDUCE_F64, buf)
    }
    fn all_gather_rows(
        &self,
        ids: &[i32],
        rows: &[f32],
    ) -> Result<(Vec<i32>, Vec<f32>), CollectiveError> {
        const OP: &str = "TCP all-gather";
        let width = match (ids.len(), rows.len()) {
            (0, 0) => 0,
            (0, r) => return Err(self.fail(OP, format!("{r} row values for no ids"))),
            (n, r) if r % n != 0 => {
                return Err(self.fail(OP, format!("{r} row values do not split into {n} rows")))
            }
            (n, r) => r / n,
        };
        let reply = self.exchange(OP, GATHER_ROWS, encode_rows(ids, rows, width), |parts| {
            let mut all = Rows {
                ids: Vec::new(),
                rows: Vec::new(),
                width: 0,
            };
            for (rank, p) in parts.iter().enumerate() {
                let part = decode_rows(p).map_err(|e| format!("rank {rank}: {e}"))?;
                if part.ids.is_empty() {
                    continue;
                }
                if all.ids.is_empty() {
                    all.width = part.width;
                } else if part.width != all.width {
                    return Err(format!(
                        "rank {rank} sent rows of width {}, earlier ranks {}",
                        part.width, all.width
                    ));
                }
                all.ids.extend(part.ids);
                all.rows.extend(part.rows);
            }
            Ok(encode_rows(&all.ids, &all.rows, all.width))
        })?;
        let all = decode_rows(&reply).map_err(|e| self.fail(OP, format!("rank 0's reply: {e}")))?;
        Ok((all.ids, all.rows))
    }
    fn all_gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>, CollectiveError> {
        const OP: &str = "TCP all-gather";
        // Rank 0 replies with every part, each behind its u64 length.
        let reply = self.exchange(OP, GATHER_BYTES, mine.to_vec(), |parts| {
            let mut out = Vec::new();
            for p in parts {
                out.extend_from_slice(&(p.len() as u64).to_le_bytes());
                out.extend_from_slice(&p);
            }
            Ok(out)
        })?;
        let mut parts = Vec::with_capacity(self.world);
        let mut rest = &reply[..];
        while parts.len() < self.world {
            let bad = || self.fail(OP, "rank 0's reply is cut short".into());
            let head: [u8; 8] = rest
                .get(..8)
                .ok_or_else(bad)?
                .try_into()
                .map_err(|_| bad())?;
            let n = u64::from_le_bytes(head) as usize;
            let body = rest.get(8..8 + n).ok_or_else(bad)?;
            parts.push(body.to_vec());
            rest = &rest[8 + n..];
        }
        Ok(parts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::Launcher;
    use std::sync::mpsc;

    fn world(rank: usize, size: usize, port: u16) -> World {
        World {
            rank,
            world_size: size,
            local_rank: rank,
            local_world_size: size,
            master_addr: Some("127.0.0.1".into()),
            master_port: Some(port),
            job_id: "tcp-test".into(),
            launcher: Launcher::Torchrun,
        }
    }

    fn free_port() -> u16 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    }

    /// Runs `f` on `size` ranks, one thread each, joined over localhost with
    /// operations limited to `op_timeout`; results in rank order.
    fn on_ranks<R: Send>(
        size: usize,
        op_timeout: Duration,
        f: impl Fn(usize, TcpCollective) -> R + Sync,
    ) -> Vec<R> {
        let port = free_port();
        std::thread::scope(|sc| {
            let f = &f;
            let handles: Vec<_> = (0..size)
                .map(|r| {
                    sc.spawn(move || {
                        let c = connect(&world(r, size, port), Duration::from_secs(20)).unwrap();
                        f(r, c.with_op_timeout(op_timeout))
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    /// Values of very different magnitudes, so the order of the sum shows.
    fn values(rank: usize, n: usize) -> Vec<f64> {
        (0..n)
            .map(|i| {
                let k = ((i * 7919 + rank * 104_729) % 1000) as f64 + 0.1234567;
                let sign = if (i + rank) % 3 == 0 { -1.0 } else { 1.0 };
                sign * k * 10f64.powi((i % 9) as i32 - 4)
            })
            .collect()
    }

    #[test]
    fn sums_have_the_same_bits_on_every_rank() {
        let n = 5000;
        let got = on_ranks(3, Duration::from_secs(20), |r, c| {
            let mut a: Vec<f32> = values(r, n).iter().map(|&v| v as f32).collect();
            c.all_reduce_sum(&mut a).unwrap();
            let mut b = values(r, n);
            c.all_reduce_sum_f64(&mut b).unwrap();
            (a, b)
        });
        for i in 0..n {
            let f32s: Vec<f32> = (0..3).map(|r| values(r, n)[i] as f32).collect();
            let want32 = (f32s[0] + f32s[1]) + f32s[2];
            let want64 = (values(0, n)[i] + values(1, n)[i]) + values(2, n)[i];
            for (r, (a, b)) in got.iter().enumerate() {
                assert_eq!(
                    a[i].to_bits(),
                    want32.to_bits(),
                    "f32 value {i} on rank {r}"
                );
                assert_eq!(
                    b[i].to_bits(),
                    want64.to_bits(),
                    "f64 value {i} on rank {r}"
                );
            }
        }
    }

    #[test]
    fn gather_is_in_rank_order() {
        // Rank 1 has no rows this step; the others have rank + 1 rows.
        let got = on_ranks(3, Duration::from_secs(20), |r, c| {
            let n = if r == 1 { 0 } else { r + 1 };
            let ids: Vec<i32> = (0..n).map(|k| (r * 10 + k) as i32).collect();
            let rows: Vec<f32> = ids
                .iter()
                .flat_map(|&i| [i as f32, 0.5, -(i as f32)])
                .collect();
            c.all_gather_rows(&ids, &rows).unwrap()
        });
        let want_ids = vec![0, 20, 21, 22];
        let want_rows: Vec<f32> = want_ids
            .iter()
            .flat_map(|&i| [i as f32, 0.5, -(i as f32)])
            .collect();
        for (ids, rows) in got {
            assert_eq!(ids, want_ids);
            assert_eq!(rows, want_rows);
        }
    }

    #[test]
    fn byte_gather_keeps_each_ranks_length() {
        // Rank 1 sends nothing; the others send rank + 2 bytes.
        let got = on_ranks(3, Duration::from_secs(20), |r, c| {
            let n = if r == 1 { 0 } else { r + 2 };
            c.all_gather_bytes(&vec![r as u8 + 1; n]).unwrap()
        });
        for parts in got {
            assert_eq!(parts, vec![vec![1, 1], vec![], vec![3, 3, 3, 3]]);
        }
    }

    #[test]
    fn a_rank_that_dies_is_named_by_the_others() {
        let t0 = Instant::now();
        let got = on_ranks(3, Duration::from_secs(10), |r, c| {
            if r == 2 {
                drop(c); // the process is gone: its connection closes
                return vec![];
            }
            let mut buf = vec![1.0f32; 16];
            let first = c.all_reduce_sum(&mut buf).unwrap_err().to_string();
            let again = c.all_reduce_sum(&mut buf).unwrap_err().to_string();
            vec![first, again]
        });
        // The closed connection is seen at once, long before the timeout.
        assert!(t0.elapsed() < Duration::from_secs(8), "{:?}", t0.elapsed());
        assert!(
            got[0][0].starts_with("TCP all-reduce on rank 0 of 3 failed"),
            "{}",
            got[0][0]
        );
        assert!(
            got[0][0].contains("rank 2 closed the connection"),
            "{}",
            got[0][0]
        );
        assert!(
            got[1][0].contains("rank 0 aborted: rank 2 closed"),
            "{}",
            got[1][0]
        );
        for g in &got[..2] {
            assert!(g[1].contains("an earlier operation failed"), "{}", g[1]);
        }
    }

    #[test]
    fn a_rank_that_hangs_times_out_by_name() {
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let done_rx = Mutex::new(done_rx);
        let t0 = Instant::now();
        let got = on_ranks(3, Duration::from_millis(700), |r, c| {
            if r == 2 {
                // Alive but never calls: waits until the others have failed.
                let _ = done_rx
                    .lock()
                    .unwrap()
                    .recv_timeout(Duration::from_secs(20));
                drop(c);
                return String::new();
            }
            let mut buf = vec![0.0f64; 4];
            let e = c.all_reduce_sum_f64(&mut buf).unwrap_err().to_string();
            let _ = done_tx.send(());
            e
        });
        assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
        assert!(
            got[0].contains("rank 2 sent nothing more before the deadline"),
            "{}",
            got[0]
        );
        assert!(
            got[1].contains("rank 0 aborted: rank 2 sent nothing"),
            "{}",
            got[1]
        );
    }

    #[test]
    fn disagreeing_ranks_are_errors_not_panics() {
        let got = on_ranks(2, Duration::from_secs(10), |r, c| {
            let mut buf = vec![0.0f32; 4 + r];
            let len = c.all_reduce_sum(&mut buf).unwrap_err().to_string();
            // Bad input fails on its own rank before any traffic.
            let bad = c
                .all_gather_rows(&[1, 2], &[0.0; 3])
                .unwrap_err()
                .to_string();
            (len, bad)
        });
        assert!(
            got[0].0.contains("rank 1 sent 5 values, rank 0 has 4"),
            "{}",
            got[0].0
        );
        assert!(got[1].0.contains("rank 1 sent 5 values"), "{}", got[1].0);
        assert!(
            got[0].1.contains("3 row values do not split into 2 rows"),
            "{}",
            got[0].1
        );
    }

    #[test]
    fn a_world_of_one_is_the_identity() {
        let c = connect(&World::single(), Duration::from_secs(1)).unwrap();
        let mut buf = vec![1.5f32, -2.0];
        c.all_reduce_sum(&mut buf).unwrap();
        assert_eq!(buf, [1.5, -2.0]);
        let (ids, rows) = c.all_gather_rows(&[7], &[1.0, 2.0]).unwrap();
        assert_eq!((ids, rows), (vec![7], vec![1.0, 2.0]));
    }
}
