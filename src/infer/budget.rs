//! `--time-limit`: how many augmented copies per puzzle fit the time left,
//! decided before the run from one warm batch per device, so a notebook
//! with a time limit gets a whole submission instead of being killed half
//! way with nothing written.
//!
//! Fewer copies means a prefix of each puzzle's group (the original first,
//! then the augmentations in the model's draw order), so the copies that
//! run keep their trained embeddings.

use std::time::Duration;

/// Share of the limit the estimate may use: the rest covers the estimate's
/// error, voting and writing the submission.
pub const PLANNED_SHARE: f64 = 0.9;

/// Share of the limit after which a run still going stops taking batches
/// and votes with what it has (the estimate was wrong: a throttled GPU).
pub const STOP_SHARE: f64 = 0.97;

/// `--time-limit`: `90s`, `45m`, `9h`, `1h30m`, or plain seconds (`600`,
/// `0.5`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let bad = || format!("`{text}` is not a duration: expected e.g. 600, 90s, 45m, 9h or 1h30m");
    if let Ok(secs) = t.parse::<f64>() {
        return Duration::try_from_secs_f64(secs).map_err(|_| bad());
    }
    let mut total = 0.0f64;
    let mut number = String::new();
    for c in t.chars() {
        if c.is_ascii_digit() || c == '.' {
            number.push(c);
            continue;
        }
        let unit = match c {
            'h' => 3600.0,
            'm' => 60.0,
            's' => 1.0,
            _ => return Err(bad()),
        };
        let n: f64 = number.parse().map_err(|_| bad())?;
        total += n * unit;
        number.clear();
    }
    if !number.is_empty() || t.is_empty() {
        return Err(bad());
    }
    Duration::try_from_secs_f64(total).map_err(|_| bad())
}

/// One original puzzle as the budget sees it.
#[derive(Debug, Clone, Copy)]
pub struct PuzzleSize {
    /// Members of its group (the original and its augmented copies).
    pub members: usize,
    /// Its test inputs.
    pub tests: usize,
}

/// Examples run when every puzzle keeps at most `members` members.
pub fn examples_with(puzzles: &[PuzzleSize], members: usize) -> usize {
    puzzles
        .iter()
        .map(|p| p.members.min(members) * p.tests)
        .sum()
}

/// The plan for the time left.
#[derive(Debug, Clone, PartialEq)]
pub struct Budget {
    /// Members per puzzle to run (at least 1: the original).
    pub members: usize,
    /// Estimated time of the run at that many.
    pub estimate: Duration,
    /// Whether even the originals alone are estimated over the time left.
    pub over: bool,
}

/// The most members per puzzle (up to `max_members`) whose batches fit in
/// `left` at `batches_per_s` (all devices together), batches of `batch`.
pub fn plan(
    puzzles: &[PuzzleSize],
    max_members: usize,
    batch: usize,
    batches_per_s: f64,
    left: Duration,
) -> Budget {
    let time_of = |members: usize| {
        let batches = examples_with(puzzles, members).div_ceil(batch.max(1));
        Duration::from_secs_f64(batches as f64 / batches_per_s.max(f64::MIN_POSITIVE))
    };
    let max_members = max_members.max(1);
    // The time grows with the members, so the largest that fits is found
    // by bisection over 1..=max_members.
    let (mut lo, mut hi) = (1usize, max_members);
    if time_of(1) > left {
        return Budget {
            members: 1,
            estimate: time_of(1),
            over: true,
        };
    }
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if time_of(mid) <= left {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    Budget {
        members: lo,
        estimate: time_of(lo),
        over: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        let s = |x: f64| Duration::from_secs_f64(x);
        assert_eq!(parse_duration("600").unwrap(), s(600.0));
        assert_eq!(parse_duration("0.5").unwrap(), s(0.5));
        assert_eq!(parse_duration("90s").unwrap(), s(90.0));
        assert_eq!(parse_duration("45m").unwrap(), s(2700.0));
        assert_eq!(parse_duration("9h").unwrap(), s(32400.0));
        assert_eq!(parse_duration("1h30m").unwrap(), s(5400.0));
        assert_eq!(parse_duration(" 2m30s ").unwrap(), s(150.0));
        for bad in ["", "h", "10x", "5m3", "-3", "1.2.3s", "inf"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn plan_takes_the_most_members_that_fit() {
        // 3 puzzles of 1001 members: 1, 2 and 1 test inputs.
        let p = [
            PuzzleSize {
                members: 1001,
                tests: 1,
            },
            PuzzleSize {
                members: 1001,
                tests: 2,
            },
            PuzzleSize {
                members: 1001,
                tests: 1,
            },
        ];
        assert_eq!(examples_with(&p, 1001), 4004);
        assert_eq!(examples_with(&p, 10), 40);
        // Batches of 100 at 10 batches/s: everything is 41 batches, 4.1 s.
        let all = plan(&p, 1001, 100, 10.0, Duration::from_secs(5));
        assert_eq!((all.members, all.over), (1001, false));
        // 2 s = 20 batches = 2000 examples: 500 members (500 * 4 = 2000).
        let half = plan(&p, 1001, 100, 10.0, Duration::from_secs(2));
        assert_eq!((half.members, half.over), (500, false));
        assert!(half.estimate <= Duration::from_secs(2));
        assert!(examples_with(&p, 501).div_ceil(100) > 20);
        // Not even the originals (1 batch, 0.1 s): 1 member, over.
        let none = plan(&p, 1001, 100, 10.0, Duration::from_millis(50));
        assert_eq!((none.members, none.over), (1, true));
        // Groups shorter than the cap keep all their members.
        let short = [PuzzleSize {
            members: 3,
            tests: 1,
        }];
        assert_eq!(
            plan(&short, 1001, 1, 1.0, Duration::from_secs(60)).members,
            1001
        );
        assert_eq!(examples_with(&short, 1001), 3);
    }
}
