//! This process's place in a data-parallel run, read from what the launcher
//! exported, and the rule that picks its GPU.
//!
//! Order: torchrun's variables (`RANK`, `WORLD_SIZE`, ...; Kubeflow's
//! PyTorchJob and a hand-written Kubernetes Indexed Job set the same) win;
//! else SLURM's (`srun` sets `SLURM_PROCID`); else a single process.
//! `TRM_JOB_ID`, when set, replaces the job identity under any launcher.

use super::slurm;

/// SLURM exports no port: every task derives the same one from the job id.
const SLURM_PORT_BASE: u32 = 20000;
const SLURM_PORT_SPAN: u64 = 20000;

/// Who started this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launcher {
    Torchrun,
    Slurm,
    Single,
}

/// This process's place in the run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct World {
    pub rank: usize,
    pub world_size: usize,
    /// Rank among the processes of this node.
    pub local_rank: usize,
    pub local_world_size: usize,
    /// Where rank 0 listens; `None` for a world of one.
    pub master_addr: Option<String>,
    pub master_port: Option<u16>,
    /// The same on every rank of one run and different between runs: the
    /// rendezvous refuses a rank whose identity differs.
    pub job_id: String,
    pub launcher: Launcher,
}

/// An environment that does not describe a usable world.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WorldError {
    #[error("{var}={value:?} is not a non-negative integer")]
    NotANumber { var: &'static str, value: String },
    #[error("{var}={value:?} is not a TCP port (1-65535)")]
    NotAPort { var: &'static str, value: String },
    #[error("{var} is not set ({why})")]
    Missing {
        var: &'static str,
        why: &'static str,
    },
    #[error("{rank_var}={rank} must be below {size_var}={size}")]
    RankTooLarge {
        rank_var: &'static str,
        rank: usize,
        size_var: &'static str,
        size: usize,
    },
    #[error("{var}=0: a run has at least one process")]
    Empty { var: &'static str },
    #[error("{var}={value:?}: {message}")]
    BadList {
        var: &'static str,
        value: String,
        message: String,
    },
}

impl World {
    /// The world of one process.
    pub fn single() -> World {
        World {
            rank: 0,
            world_size: 1,
            local_rank: 0,
            local_world_size: 1,
            master_addr: None,
            master_port: None,
            job_id: "single".into(),
            launcher: Launcher::Single,
        }
    }

    /// Reads the launcher's variables through `get` (tests pass a map).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<World, WorldError> {
        let get = |k: &str| get(k).filter(|v| !v.trim().is_empty());
        let mut world = if get("RANK").is_some() || get("WORLD_SIZE").is_some() {
            torchrun(&get)?
        } else if get("SLURM_PROCID").is_some() {
            slurm_world(&get)?
        } else {
            World::single()
        };
        if let Some(id) = get("TRM_JOB_ID") {
            world.job_id = id.trim().to_string();
        }
        world.master_port = rendezvous_port(&get, &world)?;
        Ok(world)
    }

    /// [`World::from_vars`] over the process environment.
    pub fn from_env() -> Result<World, WorldError> {
        World::from_vars(|k| std::env::var(k).ok())
    }

    /// The start-up line: who launched us and where this rank sits.
    pub fn describe(&self) -> String {
        let launcher = match self.launcher {
            Launcher::Torchrun => "torchrun",
            Launcher::Slurm => "SLURM",
            Launcher::Single => "no launcher",
        };
        if self.world_size == 1 {
            return format!("single process ({launcher})");
        }
        let at = match (&self.master_addr, self.master_port) {
            (Some(a), Some(p)) => format!("{a}:{p}"),
            (Some(a), None) => a.clone(),
            _ => "?".into(),
        };
        format!(
            "rank {} of {} (local {} of {}) via {}, rendezvous at {at}, job {}",
            self.rank,
            self.world_size,
            self.local_rank,
            self.local_world_size,
            launcher,
            self.job_id
        )
    }
}

fn number(
    get: &impl Fn(&str) -> Option<String>,
    var: &'static str,
) -> Result<Option<usize>, WorldError> {
    get(var)
        .map(|v| {
            v.trim().parse().map_err(|_| WorldError::NotANumber {
                var,
                value: v.clone(),
            })
        })
        .transpose()
}

fn required(
    get: &impl Fn(&str) -> Option<String>,
    var: &'static str,
    why: &'static str,
) -> Result<usize, WorldError> {
    number(get, var)?.ok_or(WorldError::Missing { var, why })
}

fn port(
    get: &impl Fn(&str) -> Option<String>,
    var: &'static str,
) -> Result<Option<u16>, WorldError> {
    get(var)
        .map(|v| match v.trim().parse::<u16>() {
            Ok(p) if p > 0 => Ok(p),
            _ => Err(WorldError::NotAPort { var, value: v }),
        })
        .transpose()
}

/// Where rank 0 serves trm's rendezvous: `TRM_RENDEZVOUS_PORT` when set;
/// under torchrun with its store shared (`TORCHELASTIC_USE_AGENT_STORE=True`:
/// the static rendezvous always, c10d unless sharing is turned off) the port
/// after `MASTER_PORT`, where torchrun's own store already listens; else the
/// launcher's port.
fn rendezvous_port(
    get: &impl Fn(&str) -> Option<String>,
    world: &World,
) -> Result<Option<u16>, WorldError> {
    if let Some(p) = port(get, "TRM_RENDEZVOUS_PORT")? {
        return Ok(Some(p));
    }
    let agent_store =
        get("TORCHELASTIC_USE_AGENT_STORE").is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
    match (world.launcher, world.master_port) {
        (Launcher::Torchrun, Some(p)) if agent_store => match p.checked_add(1) {
            Some(next) => Ok(Some(next)),
            None => Err(WorldError::NotAPort {
                var: "MASTER_PORT",
                value: format!(
                    "{p}: torchrun's store holds it and the next port does not exist; \
                     set TRM_RENDEZVOUS_PORT"
                ),
            }),
        },
        (_, p) => Ok(p),
    }
}

fn below(
    rank_var: &'static str,
    rank: usize,
    size_var: &'static str,
    size: usize,
) -> Result<(), WorldError> {
    if size == 0 {
        return Err(WorldError::Empty { var: size_var });
    }
    if rank >= size {
        return Err(WorldError::RankTooLarge {
            rank_var,
            rank,
            size_var,
            size,
        });
    }
    Ok(())
}

fn torchrun(get: &impl Fn(&str) -> Option<String>) -> Result<World, WorldError> {
    const WHY: &str = "torchrun sets RANK and WORLD_SIZE together";
    let rank = required(get, "RANK", WHY)?;
    let world_size = required(get, "WORLD_SIZE", WHY)?;
    below("RANK", rank, "WORLD_SIZE", world_size)?;
    // One process per pod (Kubeflow, Indexed Jobs) sets no local variables.
    let local_rank = number(get, "LOCAL_RANK")?.unwrap_or(0);
    let local_world_size = number(get, "LOCAL_WORLD_SIZE")?.unwrap_or(1);
    below(
        "LOCAL_RANK",
        local_rank,
        "LOCAL_WORLD_SIZE",
        local_world_size,
    )?;
    let master_addr = get("MASTER_ADDR").map(|a| a.trim().to_string());
    let master_port = port(get, "MASTER_PORT")?;
    if world_size > 1 {
        const WHY: &str = "rank 0's address, needed when WORLD_SIZE > 1";
        if master_addr.is_none() {
            return Err(WorldError::Missing {
                var: "MASTER_ADDR",
                why: WHY,
            });
        }
        if master_port.is_none() {
            return Err(WorldError::Missing {
                var: "MASTER_PORT",
                why: WHY,
            });
        }
    }
    // Without a run id every rank still agrees on where rank 0 listens.
    let job_id = get("TORCHELASTIC_RUN_ID")
        .map(|id| id.trim().to_string())
        .unwrap_or_else(|| {
            format!(
                "torchrun:{}:{}",
                master_addr.as_deref().unwrap_or("-"),
                master_port.unwrap_or(0)
            )
        });
    Ok(World {
        rank,
        world_size,
        local_rank,
        local_world_size,
        master_addr,
        master_port,
        job_id,
        launcher: Launcher::Torchrun,
    })
}

fn slurm_world(get: &impl Fn(&str) -> Option<String>) -> Result<World, WorldError> {
    const WHY: &str = "srun sets it for every task";
    let rank = required(get, "SLURM_PROCID", WHY)?;
    let world_size = required(get, "SLURM_NTASKS", WHY)?;
    below("SLURM_PROCID", rank, "SLURM_NTASKS", world_size)?;
    let local_rank = required(get, "SLURM_LOCALID", WHY)?;
    let local_world_size = match number(get, "SLURM_NTASKS_PER_NODE")? {
        Some(n) => n,
        None => {
            let var = "SLURM_TASKS_PER_NODE";
            let list = get(var).ok_or(WorldError::Missing { var, why: WHY })?;
            let node = number(get, "SLURM_NODEID")?.unwrap_or(0);
            slurm::tasks_on_node(&list, node).map_err(|e| WorldError::BadList {
                var,
                value: list.clone(),
                message: e.0,
            })?
        }
    };
    below(
        "SLURM_LOCALID",
        local_rank,
        "tasks on this node",
        local_world_size,
    )?;
    let job = required(get, "SLURM_JOB_ID", WHY)?;
    // An explicit MASTER_ADDR / MASTER_PORT (common in sbatch scripts) wins.
    let master_addr = match get("MASTER_ADDR") {
        Some(a) => a.trim().to_string(),
        None => {
            let var = "SLURM_JOB_NODELIST";
            let list = get(var).ok_or(WorldError::Missing { var, why: WHY })?;
            slurm::first_host(&list).map_err(|e| WorldError::BadList {
                var,
                value: list.clone(),
                message: e.0,
            })?
        }
    };
    let derived = (SLURM_PORT_BASE as u64 + job as u64 % SLURM_PORT_SPAN) as u16;
    let master_port = port(get, "MASTER_PORT")?.unwrap_or(derived);
    // The step tells a relaunch within the same allocation from its stale tasks.
    let job_id = match get("SLURM_STEP_ID") {
        Some(step) => format!("slurm:{job}.{}", step.trim()),
        None => format!("slurm:{job}"),
    };
    Ok(World {
        rank,
        world_size,
        local_rank,
        local_world_size,
        master_addr: Some(master_addr),
        master_port: Some(master_port),
        job_id,
        launcher: Launcher::Slurm,
    })
}

/// The CUDA ordinal this process drives: its local rank when it sees every
/// GPU of the node, 0 when the launcher (SLURM's `--gpus-per-task`, a
/// Kubernetes device plugin) left exactly one visible through
/// `CUDA_VISIBLE_DEVICES`.
pub fn gpu_ordinal(world: &World, cuda_visible_devices: Option<&str>) -> usize {
    let visible =
        cuda_visible_devices.map(|v| v.split(',').filter(|d| !d.trim().is_empty()).count());
    match visible {
        Some(1) => 0,
        _ => world.local_rank,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    const TORCHRUN: &[(&str, &str)] = &[
        ("RANK", "5"),
        ("WORLD_SIZE", "8"),
        ("LOCAL_RANK", "1"),
        ("LOCAL_WORLD_SIZE", "4"),
        ("MASTER_ADDR", "node01"),
        ("MASTER_PORT", "29500"),
        ("TORCHELASTIC_RUN_ID", "run-42"),
    ];

    const SLURM: &[(&str, &str)] = &[
        ("SLURM_PROCID", "6"),
        ("SLURM_NTASKS", "8"),
        ("SLURM_LOCALID", "2"),
        ("SLURM_NODEID", "1"),
        ("SLURM_TASKS_PER_NODE", "4(x2)"),
        ("SLURM_JOB_NODELIST", "gpu[07-08]"),
        ("SLURM_JOB_ID", "123456"),
    ];

    fn with(base: &[(&str, &str)], extra: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut m: Vec<(String, String)> = base
            .iter()
            .filter(|(k, _)| !extra.iter().any(|(e, _)| e == k))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        m.extend(
            extra
                .iter()
                .filter(|(_, v)| !v.is_empty())
                .map(|(k, v)| (k.to_string(), v.to_string())),
        );
        m
    }

    fn world(pairs: Vec<(String, String)>) -> Result<World, WorldError> {
        let m: HashMap<String, String> = pairs.into_iter().collect();
        World::from_vars(move |k| m.get(k).cloned())
    }

    #[test]
    fn torchrun_variables() {
        let w = World::from_vars(vars(TORCHRUN)).unwrap();
        assert_eq!(
            w,
            World {
                rank: 5,
                world_size: 8,
                local_rank: 1,
                local_world_size: 4,
                master_addr: Some("node01".into()),
                master_port: Some(29500),
                job_id: "run-42".into(),
                launcher: Launcher::Torchrun,
            }
        );
        assert_eq!(
            w.describe(),
            "rank 5 of 8 (local 1 of 4) via torchrun, rendezvous at node01:29500, job run-42"
        );
    }

    #[test]
    fn rendezvous_port_beside_torchruns_store() {
        let port = |extra: &[(&str, &str)]| world(with(TORCHRUN, extra)).map(|w| w.master_port);
        assert_eq!(port(&[]).unwrap(), Some(29500));
        let shared = [("TORCHELASTIC_USE_AGENT_STORE", "True")];
        assert_eq!(port(&shared).unwrap(), Some(29501));
        assert_eq!(
            port(&[("TORCHELASTIC_USE_AGENT_STORE", "False")]).unwrap(),
            Some(29500)
        );
        let chosen = [
            ("TORCHELASTIC_USE_AGENT_STORE", "True"),
            ("TRM_RENDEZVOUS_PORT", "40000"),
        ];
        assert_eq!(port(&chosen).unwrap(), Some(40000));
        let top = [
            ("TORCHELASTIC_USE_AGENT_STORE", "True"),
            ("MASTER_PORT", "65535"),
        ];
        assert!(port(&top)
            .unwrap_err()
            .to_string()
            .contains("TRM_RENDEZVOUS_PORT"));
        let bad = [("TRM_RENDEZVOUS_PORT", "x")];
        assert!(port(&bad)
            .unwrap_err()
            .to_string()
            .contains("TRM_RENDEZVOUS_PORT"));
        // SLURM's derived port can be overridden too.
        let w = world(with(SLURM, &[("TRM_RENDEZVOUS_PORT", "40001")])).unwrap();
        assert_eq!(w.master_port, Some(40001));
    }

    #[test]
    fn torchrun_wins_over_slurm() {
        let mut both: Vec<(&str, &str)> = SLURM.to_vec();
        both.extend_from_slice(TORCHRUN);
        let w = World::from_vars(vars(&both)).unwrap();
        assert_eq!(w.launcher, Launcher::Torchrun);
        assert_eq!(w.rank, 5);
    }

    /// A Kubernetes Indexed Job (one pod per rank) exporting torchrun's
    /// variables by hand: no local variables, no run id, a headless service.
    #[test]
    fn kubernetes_indexed_job() {
        let w = World::from_vars(vars(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "4"),
            ("MASTER_ADDR", "trm-0.trm-headless.default.svc"),
            ("MASTER_PORT", "23456"),
        ]))
        .unwrap();
        assert_eq!((w.rank, w.world_size), (3, 4));
        assert_eq!((w.local_rank, w.local_world_size), (0, 1));
        assert_eq!(w.job_id, "torchrun:trm-0.trm-headless.default.svc:23456");
        let w = World::from_vars(vars(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "4"),
            ("MASTER_ADDR", "trm-0"),
            ("MASTER_PORT", "23456"),
            ("TRM_JOB_ID", "trm-job-7f3a"),
        ]))
        .unwrap();
        assert_eq!(w.job_id, "trm-job-7f3a");
    }

    #[test]
    fn slurm_variables() {
        let w = World::from_vars(vars(SLURM)).unwrap();
        assert_eq!(
            w,
            World {
                rank: 6,
                world_size: 8,
                local_rank: 2,
                local_world_size: 4,
                master_addr: Some("gpu07".into()),
                master_port: Some(20000 + (123456 % 20000) as u16),
                job_id: "slurm:123456".into(),
                launcher: Launcher::Slurm,
            }
        );
        assert!(
            w.describe()
                .contains("via SLURM, rendezvous at gpu07:23456"),
            "{}",
            w.describe()
        );
    }

    #[test]
    fn slurm_nodelist_forms_and_overrides() {
        for (list, host) in [
            ("node[01-04,07],gpu5", "node01"),
            ("gpu5,node[01-04]", "gpu5"),
            ("a17", "a17"),
            ("rack[1-2]-n[003-004]", "rack1-n003"),
        ] {
            let w = world(with(SLURM, &[("SLURM_JOB_NODELIST", list)])).unwrap();
            assert_eq!(w.master_addr.as_deref(), Some(host), "{list}");
        }
        let w = world(with(
            SLURM,
            &[
                ("SLURM_NTASKS_PER_NODE", "8"),
                ("SLURM_TASKS_PER_NODE", "garbage"),
                ("MASTER_ADDR", "10.0.0.9"),
                ("MASTER_PORT", "31000"),
                ("SLURM_STEP_ID", "3"),
            ],
        ))
        .unwrap();
        assert_eq!(w.local_world_size, 8);
        assert_eq!(w.master_addr.as_deref(), Some("10.0.0.9"));
        assert_eq!(w.master_port, Some(31000));
        assert_eq!(w.job_id, "slurm:123456.3");
        // Uneven nodes: this is node 2, which runs 3 tasks.
        let w = world(with(
            SLURM,
            &[
                ("SLURM_TASKS_PER_NODE", "4(x2),3"),
                ("SLURM_NODEID", "2"),
                ("SLURM_LOCALID", "1"),
            ],
        ))
        .unwrap();
        assert_eq!(w.local_world_size, 3);
    }

    #[test]
    fn single_process() {
        let w = World::from_vars(|_| None).unwrap();
        assert_eq!(w, World::single());
        assert_eq!(w.describe(), "single process (no launcher)");
        // A world of one needs no address.
        let w = World::from_vars(vars(&[("RANK", "0"), ("WORLD_SIZE", "1")])).unwrap();
        assert_eq!((w.world_size, w.launcher), (1, Launcher::Torchrun));
    }

    fn err(pairs: Vec<(String, String)>) -> String {
        world(pairs).unwrap_err().to_string()
    }

    /// A base environment, the variables changed in it, and what the error says.
    type BadCase<'a> = (&'a [(&'a str, &'a str)], &'a [(&'a str, &'a str)], &'a str);

    #[test]
    fn inconsistent_environments_name_the_variable() {
        let cases: &[BadCase] = &[
            (
                TORCHRUN,
                &[("RANK", "8")],
                "RANK=8 must be below WORLD_SIZE=8",
            ),
            (
                TORCHRUN,
                &[("RANK", "two")],
                "RANK=\"two\" is not a non-negative integer",
            ),
            (TORCHRUN, &[("RANK", "-1")], "RANK=\"-1\""),
            (TORCHRUN, &[("WORLD_SIZE", "")], "WORLD_SIZE is not set"),
            (
                TORCHRUN,
                &[("WORLD_SIZE", "0"), ("RANK", "0")],
                "WORLD_SIZE=0",
            ),
            (TORCHRUN, &[("MASTER_ADDR", "")], "MASTER_ADDR is not set"),
            (TORCHRUN, &[("MASTER_PORT", "")], "MASTER_PORT is not set"),
            (
                TORCHRUN,
                &[("MASTER_PORT", "70000")],
                "MASTER_PORT=\"70000\" is not a TCP port",
            ),
            (TORCHRUN, &[("MASTER_PORT", "0")], "MASTER_PORT=\"0\""),
            (
                TORCHRUN,
                &[("LOCAL_RANK", "4")],
                "LOCAL_RANK=4 must be below LOCAL_WORLD_SIZE=4",
            ),
            (
                TORCHRUN,
                &[("LOCAL_WORLD_SIZE", "x")],
                "LOCAL_WORLD_SIZE=\"x\"",
            ),
            (
                SLURM,
                &[("SLURM_PROCID", "9")],
                "SLURM_PROCID=9 must be below SLURM_NTASKS=8",
            ),
            (SLURM, &[("SLURM_NTASKS", "")], "SLURM_NTASKS is not set"),
            (
                SLURM,
                &[("SLURM_LOCALID", "4")],
                "SLURM_LOCALID=4 must be below tasks on this node=4",
            ),
            (SLURM, &[("SLURM_JOB_ID", "abc")], "SLURM_JOB_ID=\"abc\""),
            (
                SLURM,
                &[("SLURM_JOB_NODELIST", "gpu[07-08")],
                "SLURM_JOB_NODELIST=\"gpu[07-08\"",
            ),
            (
                SLURM,
                &[("SLURM_JOB_NODELIST", "")],
                "SLURM_JOB_NODELIST is not set",
            ),
            (
                SLURM,
                &[("SLURM_TASKS_PER_NODE", "4(x2)"), ("SLURM_NODEID", "5")],
                "SLURM_TASKS_PER_NODE=\"4(x2)\"",
            ),
            (
                SLURM,
                &[("SLURM_TASKS_PER_NODE", "")],
                "SLURM_TASKS_PER_NODE is not set",
            ),
        ];
        for (base, extra, want) in cases {
            let got = err(with(base, extra));
            assert!(got.contains(want), "{extra:?}: {got:?} lacks {want:?}");
        }
    }

    #[test]
    fn device_rule() {
        let w = World::from_vars(vars(TORCHRUN)).unwrap();
        // Every GPU visible (or the variable unset): the local rank.
        assert_eq!(gpu_ordinal(&w, None), 1);
        assert_eq!(gpu_ordinal(&w, Some("0,1,2,3")), 1);
        // The launcher bound one GPU to this process: it is ordinal 0.
        assert_eq!(gpu_ordinal(&w, Some("3")), 0);
        assert_eq!(gpu_ordinal(&w, Some("GPU-8f2c1a")), 0);
        assert_eq!(gpu_ordinal(&w, Some(" 2, ")), 0);
        assert_eq!(gpu_ordinal(&World::single(), Some("0,1")), 0);
    }
}
