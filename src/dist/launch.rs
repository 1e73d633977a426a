//! Joining the run a launcher started: the one place that picks the
//! collective for a world and a device.
//!
//! A world of one gets [`SingleProcess`] (no rendezvous, no socket). A
//! larger world joins over TCP ([`super::tcp`]) on every device for now:
//! the CUDA engine's multi-rank path still reduces in host memory, so the
//! CPU transport serves it until NCCL on device buffers takes the `Cuda`
//! branch here.

use std::time::Duration;

use super::rendezvous::RendezvousError;
use super::{tcp, Collective, SingleProcess, World};
use crate::model::device_choice::DeviceKind;

/// Why this rank could not join the others.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error(transparent)]
    Rendezvous(#[from] RendezvousError),
}

/// The collective of this rank of `world`, for an engine on `device`. The
/// rendezvous and every later operation each wait at most `timeout` for
/// the other ranks.
pub fn join(
    world: &World,
    device: DeviceKind,
    timeout: Duration,
) -> Result<Box<dyn Collective>, JoinError> {
    if world.world_size == 1 {
        return Ok(Box::new(SingleProcess));
    }
    match device {
        DeviceKind::Cpu | DeviceKind::Emu | DeviceKind::Cuda => {
            Ok(Box::new(tcp::connect(world, timeout)?))
        }
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
            let c = join(&world, device, Duration::from_millis(1)).unwrap();
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
        let err = join(&world, DeviceKind::Cpu, Duration::from_millis(1))
            .err()
            .expect("a world of 2 without an address cannot join");
        assert!(
            err.to_string().contains("MASTER_ADDR and MASTER_PORT"),
            "{err}"
        );
    }
}
