//! Memory a command will need, estimated from its inputs before it
//! allocates, and refused with the estimate and the limit when it would not
//! fit (an abort on a failed multi-terabyte allocation tells the user
//! nothing). Sizes are computed with checked arithmetic: an overflow is
//! itself "too large". Also caps worker threads at the CPU count.

use std::fmt;

/// Environment variable that overrides the memory limit (bytes, or with a
/// K/M/G/T suffix, powers of 1024).
pub const LIMIT_ENV: &str = "TRM_MEMORY_LIMIT";

/// The memory a command may use and where that figure came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryLimit {
    pub bytes: u64,
    pub source: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    #[error("{what} would need about {} of memory, more than the limit of {} ({}); {hint}", Bytes(*need), Bytes(limit.bytes), limit.source)]
    TooLarge {
        what: String,
        need: u64,
        limit: MemoryLimit,
        hint: String,
    },
    #[error("{what}: the size overflows 64 bits; {hint}")]
    Overflow { what: String, hint: String },
    #[error("{LIMIT_ENV}='{value}' is not a size (bytes, or a number with K, M, G or T)")]
    BadOverride { value: String },
}

/// Bytes shown with a binary unit.
pub struct Bytes(pub u64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
        let mut v = self.0 as f64;
        let mut u = 0;
        while v >= 1024.0 && u < UNITS.len() - 1 {
            v /= 1024.0;
            u += 1;
        }
        if u == 0 {
            write!(f, "{} B", self.0)
        } else {
            write!(f, "{v:.1} {}", UNITS[u])
        }
    }
}

fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let (num, shift) = match t.char_indices().last()? {
        (i, 'K' | 'k') => (&t[..i], 10),
        (i, 'M' | 'm') => (&t[..i], 20),
        (i, 'G' | 'g') => (&t[..i], 30),
        (i, 'T' | 't') => (&t[..i], 40),
        _ => (t, 0),
    };
    num.trim().parse::<u64>().ok()?.checked_mul(1u64 << shift)
}

/// `MemAvailable` of a `/proc/meminfo` text, in bytes.
fn mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// The limit: `TRM_MEMORY_LIMIT` when set, else the memory available now
/// (`MemAvailable` in /proc/meminfo), else none (u64::MAX).
pub fn memory_limit() -> Result<MemoryLimit, LimitError> {
    if let Ok(value) = std::env::var(LIMIT_ENV) {
        let bytes = parse_size(&value).ok_or(LimitError::BadOverride {
            value: value.clone(),
        })?;
        return Ok(MemoryLimit {
            bytes,
            source: format!("set by {LIMIT_ENV}"),
        });
    }
    let available = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| mem_available(&t));
    Ok(match available {
        Some(bytes) => MemoryLimit {
            bytes,
            source: format!(
                "the memory available now, MemAvailable in /proc/meminfo; {LIMIT_ENV} overrides it"
            ),
        },
        None => MemoryLimit {
            bytes: u64::MAX,
            source: "no /proc/meminfo".into(),
        },
    })
}

/// Products and sums of sizes that turn into `None` on overflow.
pub fn product(factors: &[u64]) -> Option<u64> {
    factors.iter().try_fold(1u64, |acc, &f| acc.checked_mul(f))
}

pub fn sum(terms: &[Option<u64>]) -> Option<u64> {
    terms
        .iter()
        .try_fold(0u64, |acc, t| t.and_then(|t| acc.checked_add(t)))
}

/// Refuses `need` bytes (`None`: overflowed) for `what` above `limit`;
/// `hint` says what to change.
pub fn check_against(
    what: &str,
    need: Option<u64>,
    hint: &str,
    limit: &MemoryLimit,
) -> Result<(), LimitError> {
    match need {
        None => Err(LimitError::Overflow {
            what: what.into(),
            hint: hint.into(),
        }),
        Some(need) if need > limit.bytes => Err(LimitError::TooLarge {
            what: what.into(),
            need,
            limit: limit.clone(),
            hint: hint.into(),
        }),
        Some(_) => Ok(()),
    }
}

/// [`check_against`] the machine's [`memory_limit`].
pub fn check(what: &str, need: Option<u64>, hint: &str) -> Result<(), LimitError> {
    check_against(what, need, hint, &memory_limit()?)
}

/// Heap bytes a model of `arch` needs at `batch` examples: parameters
/// (training: with gradients, two Adam moments and an EMA copy), the
/// puzzle-embedding table, and activations per token (one layer's worth
/// per layer). A floor rather than a ceiling, so that only runs that surely
/// cannot fit are refused;
/// computed in f64 so absurd widths (`expansion=1e9`) give a number, not an
/// overflow.
pub fn model_bytes(
    arch: &crate::model::config::ArchConfig,
    batch: usize,
    training: bool,
) -> Option<u64> {
    let h = arch.hidden_size as f64;
    let inter = (arch.expansion * h * 2.0 / 3.0).max(0.0);
    let vocab = arch.vocab_size as f64;
    let layers = arch.l_layers.max(1) as f64;
    let params = 2.0 * vocab * h + layers * (4.0 * h * h + 3.0 * h * inter) + 2.0 * h;
    let table = arch.num_puzzle_identifiers as f64 * arch.puzzle_emb_ndim as f64;
    let tokens = batch as f64 * arch.total_seq_len() as f64;
    let per_token_layer = 10.0 * h + 3.0 * inter;
    let (copies, table_copies, kept_layers) = if training {
        (5.0, 3.0, layers)
    } else {
        (1.0, 1.0, 2.0)
    };
    let activations = tokens * (per_token_layer * kept_layers + 4.0 * h + vocab);
    let bytes = 4.0 * (params * copies + table * table_copies + activations);
    (bytes.is_finite() && bytes < u64::MAX as f64).then_some(bytes as u64)
}

/// Worker threads to start for a request (`None`/0: every CPU), capped at
/// the CPU count: more threads than CPUs only contend. The second value is
/// the warning to print when the request was capped.
pub fn cap_threads(requested: usize, cpus: usize) -> (usize, Option<String>) {
    if requested > cpus {
        (
            cpus,
            Some(format!(
                "warning: {requested} threads requested but this machine has {cpus} CPUs; using {cpus}"
            )),
        )
    } else {
        (requested, None)
    }
}

/// The CPUs this process may use.
pub fn cpu_count() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(bytes: u64) -> MemoryLimit {
        MemoryLimit {
            bytes,
            source: "test".into(),
        }
    }

    #[test]
    fn sizes_and_meminfo_parse() {
        assert_eq!(parse_size("512"), Some(512));
        assert_eq!(parse_size("8G"), Some(8 << 30));
        assert_eq!(parse_size(" 3m "), Some(3 << 20));
        assert_eq!(parse_size("x"), None);
        assert_eq!(parse_size("99999999999T"), None);
        let info = "MemTotal:       24000000 kB\nMemAvailable:   1000 kB\n";
        assert_eq!(mem_available(info), Some(1_024_000));
        assert_eq!(mem_available("MemTotal: 1 kB\n"), None);
    }

    #[test]
    fn refusals_say_the_estimate_the_limit_and_what_to_do() {
        let e = check_against(
            "the dataset",
            Some(5 << 40),
            "lower --num-aug",
            &limit(24 << 30),
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "the dataset would need about 5.0 TiB of memory, more than the limit of 24.0 GiB (test); lower --num-aug"
        );
        let e = check_against("x", product(&[u64::MAX, 2]), "lower y", &limit(1)).unwrap_err();
        assert_eq!(e.to_string(), "x: the size overflows 64 bits; lower y");
        assert_eq!(check_against("x", Some(10), "", &limit(10)), Ok(()));
        assert_eq!(sum(&[Some(1), Some(2)]), Some(3));
        assert_eq!(sum(&[Some(1), None]), None);
        assert_eq!(sum(&[Some(u64::MAX), Some(1)]), None);
    }

    #[test]
    fn threads_above_the_cpus_are_capped_with_a_warning() {
        assert_eq!(cap_threads(4, 8), (4, None));
        let (n, w) = cap_threads(5000, 2);
        assert_eq!(n, 2);
        assert_eq!(
            w.unwrap(),
            "warning: 5000 threads requested but this machine has 2 CPUs; using 2"
        );
    }
}
