//! Joining the run a launcher started: the one place that picks the
//! collective for a world and a device.
//!
//! A world of one gets [`SingleProcess`] (no rendezvous, no socket). A
//! larger world joins through NCCL on the GPU for the CUDA engine
//! ([`super::nccl`], its id handed out by the TCP rendezvous), and over TCP
//! ([`super::tcp`], the CPU and test transport) for the CPU engine and the
//! emulator.

use std::time::Duration;

use super::nccl::{self, NcclError};
use super::rendezvous::RendezvousError;
use super::{tcp, Collective, SingleProcess, World};
use crate::model::device_choice::DeviceKind;

/// Why this rank could not join the others.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error(transparent)]
    Rendezvous(#[from] RendezvousError),
    #[error(transparent)]
    Nccl(#[from] NcclError),
}

/// The collective of this rank of `world`, for an engine on `device` (GPU
/// `ordinal` for CUDA). The rendezvous and every later operation each wait
/// at most `timeout` for the other ranks.
pub fn join(
    world: &World,
    device: DeviceKind,
    ordinal: usize,
    timeout: Duration,
) -> Result<Box<dyn Collective>, JoinError> {
    if world.world_size == 1 {
        return Ok(Box::new(SingleProcess));
    }
    match device {
        DeviceKind::Cuda => Ok(nccl::for_cuda(world, ordinal, timeout)?),
        DeviceKind::Cpu | DeviceKind::Emu => Ok(Box::new(tcp::connect(world, timeout)?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_world_of_one_opens_no_socket() {
        // No address at all: anything but SingleProcess would fail to join.
        let world = World::single();
        for device in DeviceKind::ALL {
            let c = join(&world, device, 0, Duration::from_millis(1)).unwrap();
            assert_eq!((c.rank(), c.world_size()), (0, 1));
            let mut buf = [1.5f32, -2.0];
            c.all_reduce_sum(&mut buf).unwrap();
            assert_eq!(buf, [1.5, -2.0]);
        }
    }

    #[test]
    fn a_larger_world_needs_its_rendezvous() {
        let world = World {
            world_size: 2,
            ..World::single()
        };
        let err = join(&world, DeviceKind::Cpu, 0, Duration::from_millis(1))
            .err()
            .expect("a world of 2 without an address cannot join");
        assert!(
            err.to_string().contains("MASTER_ADDR and MASTER_PORT"),
            "{err}"
        );
    }

    #[test]
    fn cuda_ranks_join_through_nccl() {
        // The CUDA branch goes through NCCL, never TCP: without NCCL or a
        // GPU it fails at once with NCCL's error; with both, NCCL's
        // rendezvous gives up on the missing rank 0 after the timeout.
        let world = World {
            rank: 1,
            world_size: 2,
            master_addr: Some("127.0.0.1".into()),
            master_port: Some(9),
            ..World::single()
        };
        let start = std::time::Instant::now();
        match join(&world, DeviceKind::Cuda, 0, Duration::from_secs(2)) {
            Err(JoinError::Nccl(_)) => {}
            Err(e) => panic!("not NCCL's error: {e}"),
            Ok(_) => panic!("joined a world whose rank 0 does not exist"),
        }
        assert!(start.elapsed() < Duration::from_secs(10));
    }
}
