//! Rendezvous over TCP, with no shared filesystem: rank 0 listens on
//! `MASTER_PORT` and hands a payload (the NCCL unique id) to every other
//! rank, which connects to `MASTER_ADDR:MASTER_PORT`.
//!
//! The payload travels only over the live connection to this run's rank 0,
//! after a handshake carrying the job identity and the world size, so a stale
//! id (a file left by an earlier run) is impossible by construction; a rank
//! of another job is refused, and told why.
//!
//! Members retry with backoff until the timeout (rank 0 may start last);
//! rank 0 waits for every rank until the same timeout and then names the
//! ones that never came. The connections stay open for [`super::tcp`].

use std::io::{Read, Write};
use std::net::{Ipv6Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use super::World;

/// The wait when `TRM_RENDEZVOUS_TIMEOUT_S` is unset: long enough for a
/// cluster to start every node.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

const MAGIC: &[u8; 8] = b"TRMRDV01";
const ACCEPTED: u8 = 0;
const REFUSED: u8 = 1;
/// Larger claims from a peer are refused before allocating.
const MAX_JOB_ID: usize = 4096;
const MAX_PAYLOAD: usize = 1 << 20;
/// A connection that does not say hello this fast is not one of our ranks.
const HELLO_WAIT: Duration = Duration::from_secs(10);
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// A rendezvous that did not complete.
#[derive(Debug, thiserror::Error)]
pub enum RendezvousError {
    #[error("rendezvous: TRM_RENDEZVOUS_TIMEOUT_S={0:?} is not a positive number of seconds")]
    BadTimeout(String),
    #[error("rendezvous: a world of {world} ranks needs MASTER_ADDR and MASTER_PORT")]
    NoAddress { world: usize },
    #[error("rendezvous: rank 0 cannot listen on port {port}: {source}")]
    Listen {
        port: u16,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "rendezvous: rank {rank} could not reach rank 0 at {addr} within {timeout_s:.1} s \
         (TRM_RENDEZVOUS_TIMEOUT_S sets the wait); last error: {last}"
    )]
    Unreachable {
        rank: usize,
        addr: String,
        timeout_s: f64,
        last: String,
    },
    #[error("rendezvous: rank 0 at {addr} refused rank {rank}: {reason}")]
    Refused {
        rank: usize,
        addr: String,
        reason: String,
    },
    #[error(
        "rendezvous: rank(s) {missing:?} of {world} never reached rank 0 on port {port} \
         within {timeout_s:.1} s{}", refused_note(.refused)
    )]
    Missing {
        missing: Vec<usize>,
        world: usize,
        port: u16,
        timeout_s: f64,
        /// Connections turned away meanwhile (another job, not a trm rank).
        refused: Vec<String>,
    },
    /// A rank of this job disagrees with rank 0: the launch is misconfigured.
    #[error("rendezvous: {peer}: {message}")]
    Conflict { peer: String, message: String },
    #[error("rendezvous: with rank 0 at {addr}: {message}")]
    Protocol { addr: String, message: String },
}

fn refused_note(refused: &[String]) -> String {
    if refused.is_empty() {
        String::new()
    } else {
        format!("; turned away meanwhile: {}", refused.join("; "))
    }
}

/// The rendezvous timeout from `TRM_RENDEZVOUS_TIMEOUT_S` read through `get`
/// (seconds, fractions allowed), [`DEFAULT_TIMEOUT`] when unset.
pub fn timeout_from_vars(
    get: impl Fn(&str) -> Option<String>,
) -> Result<Duration, RendezvousError> {
    match get("TRM_RENDEZVOUS_TIMEOUT_S") {
        None => Ok(DEFAULT_TIMEOUT),
        Some(v) => match v.trim().parse::<f64>() {
            Ok(s) if s > 0.0 && s.is_finite() && s < 1e9 => Ok(Duration::from_secs_f64(s)),
            _ => Err(RendezvousError::BadTimeout(v)),
        },
    }
}

/// [`timeout_from_vars`] over the process environment.
pub fn timeout_from_env() -> Result<Duration, RendezvousError> {
    timeout_from_vars(|k| std::env::var(k).ok())
}

fn address(world: &World) -> Result<(String, u16), RendezvousError> {
    match (&world.master_addr, world.master_port) {
        (Some(a), Some(p)) => Ok((a.clone(), p)),
        _ => Err(RendezvousError::NoAddress {
            world: world.world_size,
        }),
    }
}

/// What a member says first.
struct Hello {
    rank: usize,
    world_size: usize,
    job_id: String,
}

fn write_frame(s: &mut impl Write, head: &[u8], body: &[u8]) -> std::io::Result<()> {
    let mut msg = Vec::with_capacity(MAGIC.len() + head.len() + 4 + body.len());
    msg.extend_from_slice(MAGIC);
    msg.extend_from_slice(head);
    msg.extend_from_slice(&(body.len() as u32).to_le_bytes());
    msg.extend_from_slice(body);
    s.write_all(&msg)?;
    s.flush()
}

fn read_u32(s: &mut impl Read) -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

fn read_magic(s: &mut impl Read) -> Result<(), String> {
    let mut m = [0u8; 8];
    s.read_exact(&mut m).map_err(|e| e.to_string())?;
    if &m != MAGIC {
        return Err(format!("not a trm rendezvous peer (it sent {m:02x?})"));
    }
    Ok(())
}

fn read_body(s: &mut impl Read, limit: usize) -> Result<Vec<u8>, String> {
    let len = read_u32(s).map_err(|e| e.to_string())? as usize;
    if len > limit {
        return Err(format!("announces {len} bytes, at most {limit} expected"));
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).map_err(|e| e.to_string())?;
    Ok(body)
}

fn read_hello(s: &mut TcpStream) -> Result<Hello, String> {
    read_magic(s)?;
    let rank = read_u32(s).map_err(|e| e.to_string())? as usize;
    let world_size = read_u32(s).map_err(|e| e.to_string())? as usize;
    let job = read_body(s, MAX_JOB_ID)?;
    Ok(Hello {
        rank,
        world_size,
        job_id: String::from_utf8_lossy(&job).into_owned(),
    })
}

fn bind(world: &World, port: u16) -> Result<TcpListener, RendezvousError> {
    // Every interface: MASTER_ADDR names this host as the others see it.
    let ipv6 = world
        .master_addr
        .as_deref()
        .is_some_and(|a| a.parse::<Ipv6Addr>().is_ok());
    let any: SocketAddr = if ipv6 {
        (Ipv6Addr::UNSPECIFIED, port).into()
    } else {
        ([0, 0, 0, 0], port).into()
    };
    let listener =
        TcpListener::bind(any).map_err(|source| RendezvousError::Listen { port, source })?;
    listener
        .set_nonblocking(true)
        .map_err(|source| RendezvousError::Listen { port, source })?;
    Ok(listener)
}

/// Rank 0: listens on `MASTER_PORT`, hands `payload` to each rank of this
/// job, and returns the connections indexed by rank - 1 once all
/// `world_size - 1` ranks have joined.
pub fn lead(
    world: &World,
    payload: &[u8],
    timeout: Duration,
) -> Result<Vec<TcpStream>, RendezvousError> {
    if world.world_size == 1 {
        return Ok(Vec::new());
    }
    let (_, port) = address(world)?;
    let listener = bind(world, port)?;
    let deadline = Instant::now() + timeout;
    let mut peers: Vec<Option<TcpStream>> = (1..world.world_size).map(|_| None).collect();
    let mut refused = Vec::new();
    while peers.iter().any(Option::is_none) {
        let now = Instant::now();
        if now >= deadline {
            let missing = (1..world.world_size)
                .filter(|r| peers[r - 1].is_none())
                .collect();
            return Err(RendezvousError::Missing {
                missing,
                world: world.world_size,
                port,
                timeout_s: timeout.as_secs_f64(),
                refused,
            });
        }
        let (mut stream, from) = match listener.accept() {
            Ok(conn) => conn,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(source) => return Err(RendezvousError::Listen { port, source }),
        };
        let wait = HELLO_WAIT
            .min(deadline - now)
            .max(Duration::from_millis(10));
        let setup = stream
            .set_nonblocking(false)
            .and_then(|_| stream.set_read_timeout(Some(wait)))
            .and_then(|_| stream.set_write_timeout(Some(wait)));
        let hello = match setup
            .map_err(|e| e.to_string())
            .and_then(|_| read_hello(&mut stream))
        {
            Ok(h) => h,
            Err(e) => {
                refused.push(format!("{from}: {e}"));
                continue;
            }
        };
        if let Err(reason) = admit(world, &hello, &peers) {
            // Best effort: the refused side learns why; rank 0 goes on.
            let _ = write_frame(&mut stream, &[REFUSED], reason.as_bytes());
            let peer = format!("rank {} of job {:?} from {from}", hello.rank, hello.job_id);
            if hello.job_id == world.job_id {
                return Err(RendezvousError::Conflict {
                    peer,
                    message: reason,
                });
            }
            refused.push(format!("{peer}: {reason}"));
            continue;
        }
        if let Err(e) = write_frame(&mut stream, &[ACCEPTED], payload) {
            // The rank vanished mid-handshake; it may retry.
            refused.push(format!("rank {} from {from}: {e}", hello.rank));
            continue;
        }
        let _ = stream.set_nodelay(true);
        let _ = stream.set_read_timeout(None);
        let _ = stream.set_write_timeout(None);
        peers[hello.rank - 1] = Some(stream);
    }
    Ok(peers.into_iter().flatten().collect())
}

/// Whether rank 0 takes this hello; else why not. A foreign job is turned
/// away; a disagreement within this job is a misconfigured launch.
fn admit(world: &World, h: &Hello, peers: &[Option<TcpStream>]) -> Result<(), String> {
    if h.job_id != world.job_id {
        return Err(format!(
            "it belongs to job {:?}, rank 0 serves job {:?} (a stale rank of an earlier run, \
             or two runs on one port)",
            h.job_id, world.job_id
        ));
    }
    if h.world_size != world.world_size {
        return Err(format!(
            "it counts {} ranks, rank 0 counts {}",
            h.world_size, world.world_size
        ));
    }
    if h.rank == 0 || h.rank >= world.world_size {
        return Err(format!(
            "rank {} is not a member rank of a world of {}",
            h.rank, world.world_size
        ));
    }
    if peers[h.rank - 1].is_some() {
        return Err(format!("rank {} has already joined", h.rank));
    }
    Ok(())
}

/// A rank other than 0: connects to rank 0 (retrying until `timeout`) and
/// returns the payload and the connection.
pub fn join(world: &World, timeout: Duration) -> Result<(Vec<u8>, TcpStream), RendezvousError> {
    let (host, port) = address(world)?;
    let addr = format!("{host}:{port}");
    let deadline = Instant::now() + timeout;
    let mut backoff = FIRST_BACKOFF;
    loop {
        let last = match attempt(world, &host, port, deadline) {
            Ok(done) => return Ok(done),
            Err(Attempt::Refused(reason)) => {
                return Err(RendezvousError::Refused {
                    rank: world.rank,
                    addr,
                    reason,
                })
            }
            Err(Attempt::Garbled(message)) => {
                return Err(RendezvousError::Protocol { addr, message })
            }
            Err(Attempt::Retry(e)) => e,
        };
        let now = Instant::now();
        if now >= deadline {
            return Err(RendezvousError::Unreachable {
                rank: world.rank,
                addr,
                timeout_s: timeout.as_secs_f64(),
                last,
            });
        }
        std::thread::sleep(backoff.min(deadline - now));
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

enum Attempt {
    /// Rank 0 is not there yet (or the name does not resolve yet).
    Retry(String),
    Refused(String),
    Garbled(String),
}

fn attempt(
    world: &World,
    host: &str,
    port: u16,
    deadline: Instant,
) -> Result<(Vec<u8>, TcpStream), Attempt> {
    let left = || {
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(10))
    };
    // Resolved on every try: a Kubernetes service name appears late.
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| Attempt::Retry(format!("resolving {host}: {e}")))?
        .collect();
    let mut last = Attempt::Retry(format!("{host} resolves to no address"));
    for a in addrs {
        let mut s = match TcpStream::connect_timeout(&a, left().min(Duration::from_secs(5))) {
            Ok(s) => s,
            Err(e) => {
                last = Attempt::Retry(format!("connecting to {a}: {e}"));
                continue;
            }
        };
        let io = |e: std::io::Error| Attempt::Retry(format!("handshake with {a}: {e}"));
        s.set_read_timeout(Some(left())).map_err(io)?;
        s.set_write_timeout(Some(left())).map_err(io)?;
        let mut head = Vec::with_capacity(8);
        head.extend_from_slice(&(world.rank as u32).to_le_bytes());
        head.extend_from_slice(&(world.world_size as u32).to_le_bytes());
        write_frame(&mut s, &head, world.job_id.as_bytes()).map_err(io)?;
        // A reset here is a listener going away mid-handshake: retry. A reply
        // that is not ours is another service on that port: say so.
        let mut m = [0u8; 8];
        s.read_exact(&mut m).map_err(io)?;
        if &m != MAGIC {
            return Err(Attempt::Garbled(format!(
                "{a} answered {m:02x?}, not a trm rendezvous (another service on that port?)"
            )));
        }
        let mut status = [0u8; 1];
        s.read_exact(&mut status).map_err(io)?;
        let body =
            read_body(&mut s, MAX_PAYLOAD).map_err(|e| Attempt::Garbled(format!("{a}: {e}")))?;
        return match status[0] {
            ACCEPTED => {
                let _ = s.set_nodelay(true);
                let _ = s.set_read_timeout(None);
                let _ = s.set_write_timeout(None);
                Ok((body, s))
            }
            REFUSED => Err(Attempt::Refused(
                String::from_utf8_lossy(&body).into_owned(),
            )),
            other => Err(Attempt::Garbled(format!("{a}: unknown status {other}"))),
        };
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::Launcher;
    use std::process::{Child, Command, Stdio};

    const CHILD: &str = "TRM_TEST_RENDEZVOUS_CHILD";

    fn world(rank: usize, size: usize, port: u16, job: &str) -> World {
        World {
            rank,
            world_size: size,
            local_rank: 0,
            local_world_size: 1,
            master_addr: Some("127.0.0.1".into()),
            master_port: Some(port),
            job_id: job.into(),
            launcher: Launcher::Torchrun,
        }
    }

    fn free_port() -> u16 {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    }

    /// A member rank in its own process: runs only when a test spawned this
    /// binary with [`CHILD`] set, and reads its place from the environment
    /// as `trm train` will.
    #[test]
    fn member_process() {
        if std::env::var(CHILD).is_err() {
            return;
        }
        let delay: u64 = std::env::var("TEST_DELAY_MS").unwrap().parse().unwrap();
        std::thread::sleep(Duration::from_millis(delay));
        let outcome = World::from_env().map_err(|e| e.to_string()).and_then(|w| {
            let t = timeout_from_env().map_err(|e| e.to_string())?;
            join(&w, t).map_err(|e| e.to_string())
        });
        match outcome {
            Ok((payload, _)) => println!("\nOUTCOME ok {}", hex::encode(payload)),
            Err(e) => println!("\nOUTCOME err {e}"),
        }
    }

    fn spawn(
        rank: usize,
        size: usize,
        port: u16,
        job: &str,
        delay_ms: u64,
        timeout_s: f64,
    ) -> Child {
        Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "dist::rendezvous::tests::member_process",
                "--nocapture",
            ])
            .env(CHILD, "1")
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", size.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .env("TORCHELASTIC_RUN_ID", job)
            .env("TRM_RENDEZVOUS_TIMEOUT_S", timeout_s.to_string())
            .env("TEST_DELAY_MS", delay_ms.to_string())
            .env_remove("TRM_JOB_ID")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    }

    /// The member's payload (hex) or its error text.
    fn outcome(child: Child) -> Result<String, String> {
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .find_map(|l| l.strip_prefix("OUTCOME "))
            .unwrap_or_else(|| panic!("the child reported nothing: {text}"));
        match line.split_once(' ') {
            Some(("ok", hex)) => Ok(hex.to_string()),
            Some(("err", e)) => Err(e.to_string()),
            _ => Ok(String::new()),
        }
    }

    #[test]
    fn three_ranks_receive_the_payload() {
        let port = free_port();
        // Members start first: they retry until rank 0 listens.
        let kids: Vec<Child> = (1..3)
            .map(|r| spawn(r, 3, port, "job-a", 0, 20.0))
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        let peers = lead(
            &world(0, 3, port, "job-a"),
            b"unique-id",
            Duration::from_secs(20),
        )
        .unwrap();
        assert_eq!(peers.len(), 2);
        for k in kids {
            assert_eq!(outcome(k).unwrap(), hex::encode(b"unique-id"));
        }
    }

    #[test]
    fn a_late_rank_still_joins() {
        let port = free_port();
        let early = spawn(1, 3, port, "job-b", 0, 20.0);
        let late = spawn(2, 3, port, "job-b", 1500, 20.0);
        let t0 = Instant::now();
        let peers = lead(&world(0, 3, port, "job-b"), b"x", Duration::from_secs(20)).unwrap();
        assert!(
            t0.elapsed() >= Duration::from_millis(1400),
            "{:?}",
            t0.elapsed()
        );
        assert_eq!(peers.len(), 2);
        assert_eq!(outcome(early).unwrap(), hex::encode(b"x"));
        assert_eq!(outcome(late).unwrap(), hex::encode(b"x"));
    }

    /// Rank 2 never comes; a rank of another job knocks meanwhile. Rank 0
    /// names the missing rank and the one it turned away; the foreign rank
    /// is told why.
    #[test]
    fn missing_rank_times_out_by_name() {
        let port = free_port();
        let member = spawn(1, 3, port, "job-c", 0, 10.0);
        let foreign = spawn(2, 3, port, "job-old", 200, 10.0);
        let t0 = Instant::now();
        let e = lead(
            &world(0, 3, port, "job-c"),
            b"id",
            Duration::from_millis(1500),
        )
        .unwrap_err();
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
        let msg = e.to_string();
        assert!(
            matches!(&e, RendezvousError::Missing { missing, .. } if missing == &[2]),
            "{msg}"
        );
        assert!(
            msg.contains("rank(s) [2] of 3 never reached rank 0"),
            "{msg}"
        );
        assert!(msg.contains("\"job-old\""), "{msg}");
        assert_eq!(outcome(member).unwrap(), hex::encode(b"id"));
        let refusal = outcome(foreign).unwrap_err();
        assert!(refusal.contains("refused rank 2"), "{refusal}");
        assert!(
            refusal.contains("\"job-old\"") && refusal.contains("\"job-c\""),
            "{refusal}"
        );
    }

    #[test]
    fn wrong_job_is_refused_and_the_run_goes_on() {
        let port = free_port();
        let stale = spawn(1, 2, port, "yesterday", 0, 10.0);
        let right = spawn(1, 2, port, "today", 800, 10.0);
        let peers = lead(&world(0, 2, port, "today"), b"id", Duration::from_secs(10)).unwrap();
        assert_eq!(peers.len(), 1);
        assert_eq!(outcome(right).unwrap(), hex::encode(b"id"));
        let e = outcome(stale).unwrap_err();
        assert!(
            e.contains("belongs to job \"yesterday\", rank 0 serves job \"today\""),
            "{e}"
        );
    }

    /// Same job, different world size: a misconfigured launch stops rank 0.
    #[test]
    fn disagreeing_world_size_is_a_conflict() {
        let port = free_port();
        let member =
            std::thread::spawn(move || join(&world(1, 4, port, "j"), Duration::from_secs(10)));
        let e = lead(&world(0, 2, port, "j"), b"id", Duration::from_secs(10)).unwrap_err();
        assert!(
            e.to_string().contains("it counts 4 ranks, rank 0 counts 2"),
            "{e}"
        );
        let e = member.join().unwrap().unwrap_err();
        assert!(matches!(e, RendezvousError::Refused { .. }), "{e}");
    }

    #[test]
    fn nobody_listening_names_address_and_timeout() {
        let port = free_port();
        let t0 = Instant::now();
        let e = join(&world(1, 2, port, "j"), Duration::from_millis(400)).unwrap_err();
        assert!(t0.elapsed() < Duration::from_secs(3));
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("rank 0 at 127.0.0.1:{port} within 0.4 s")),
            "{msg}"
        );
        assert!(msg.contains("TRM_RENDEZVOUS_TIMEOUT_S"), "{msg}");
    }

    #[test]
    fn garbage_peer_is_not_a_rank() {
        let port = free_port();
        let junk = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
            s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        });
        let e = lead(&world(0, 2, port, "j"), b"id", Duration::from_millis(600)).unwrap_err();
        junk.join().unwrap();
        assert!(e.to_string().contains("not a trm rendezvous peer"), "{e}");
    }

    #[test]
    fn timeout_variable() {
        assert_eq!(timeout_from_vars(|_| None).unwrap(), DEFAULT_TIMEOUT);
        let t = timeout_from_vars(|_| Some("2.5".into())).unwrap();
        assert_eq!(t, Duration::from_millis(2500));
        for bad in ["0", "-1", "soon", "inf"] {
            let e = timeout_from_vars(|_| Some(bad.into())).unwrap_err();
            assert!(e.to_string().contains("TRM_RENDEZVOUS_TIMEOUT_S"), "{e}");
        }
        let e = lead(
            &World {
                master_addr: None,
                ..world(0, 2, 1, "j")
            },
            b"",
            DEFAULT_TIMEOUT,
        )
        .unwrap_err();
        assert!(e.to_string().contains("needs MASTER_ADDR"), "{e}");
        assert!(lead(&World::single(), b"", DEFAULT_TIMEOUT)
            .unwrap()
            .is_empty());
    }
}
