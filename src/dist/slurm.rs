//! SLURM's compressed lists: host lists (`node[01-04,07],gpu5`) and task
//! counts per node (`4(x2),3`). Only what the world needs is read: the first
//! host (where task 0 runs under SLURM's default block distribution) and the
//! count on one node.

/// A malformed SLURM list: what was wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ListError(pub String);

/// The first host of a SLURM host list such as `node[01-04,07],gpu5`
/// (`node01`) or `rack[2-3]-n[8-9]` (`rack2-n8`). Zero padding is kept: it is
/// part of the host name. The whole list is checked, so a typo is an error
/// rather than a silently wrong address.
pub fn first_host(list: &str) -> Result<String, ListError> {
    let list = list.trim();
    if list.is_empty() {
        return Err(ListError("the host list is empty".into()));
    }
    let hosts = split_top_level(list)?;
    for h in &hosts {
        check_host(h)?;
    }
    let mut out = String::new();
    let mut rest = hosts[0];
    while let Some(open) = rest.find('[') {
        out.push_str(&rest[..open]);
        // split_top_level checked that every '[' has its ']'.
        let close = open + rest[open..].find(']').unwrap_or(rest.len() - open);
        let inner = &rest[open + 1..close];
        let first = inner.split(',').next().unwrap_or("");
        out.push_str(first.split('-').next().unwrap_or(""));
        rest = &rest[close + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The entries of a host list, split at the commas outside brackets.
fn split_top_level(list: &str) -> Result<Vec<&str>, ListError> {
    let (mut depth, mut start, mut out) = (0usize, 0usize, Vec::new());
    for (i, c) in list.char_indices() {
        match c {
            '[' if depth == 0 => depth = 1,
            '[' => return Err(ListError(format!("nested '[' at byte {i} in {list:?}"))),
            ']' if depth == 1 => depth = 0,
            ']' => {
                return Err(ListError(format!(
                    "']' without '[' at byte {i} in {list:?}"
                )))
            }
            ',' if depth == 0 => {
                out.push(&list[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err(ListError(format!("'[' without ']' in {list:?}")));
    }
    out.push(&list[start..]);
    Ok(out)
}

/// One entry: a name, where each bracket holds ranges `a-b` or numbers `a`.
fn check_host(host: &str) -> Result<(), ListError> {
    if host.is_empty() || host.starts_with('[') {
        return Err(ListError(format!("an entry without a host name: {host:?}")));
    }
    let mut rest = host;
    while let Some(open) = rest.find('[') {
        let close = open + rest[open..].find(']').unwrap_or(rest.len() - open);
        for range in rest[open + 1..close].split(',') {
            let mut ends = range.split('-');
            let lo = ends.next().unwrap_or("");
            let hi = ends.next().unwrap_or(lo);
            let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
            if ends.next().is_some() || !digits(lo) || !digits(hi) {
                return Err(ListError(format!(
                    "{range:?} in {host:?} is not a number or a range a-b"
                )));
            }
        }
        rest = &rest[close + 1..];
    }
    Ok(())
}

/// The number of tasks on node `node` from a SLURM_TASKS_PER_NODE value such
/// as `4(x2),3` (nodes 0 and 1 run 4 tasks, node 2 runs 3).
pub fn tasks_on_node(list: &str, node: usize) -> Result<usize, ListError> {
    let mut seen = 0usize;
    for entry in list.trim().split(',') {
        let bad = || ListError(format!("{entry:?} in {list:?} is not N or N(xM)"));
        let (count, repeat) = match entry.split_once('(') {
            Some((n, rep)) => {
                let rep = rep
                    .strip_prefix('x')
                    .and_then(|r| r.strip_suffix(')'))
                    .ok_or_else(bad)?;
                (n, rep.parse::<usize>().map_err(|_| bad())?)
            }
            None => (entry, 1),
        };
        let count: usize = count.trim().parse().map_err(|_| bad())?;
        seen += repeat;
        if node < seen {
            return Ok(count);
        }
    }
    Err(ListError(format!(
        "{list:?} describes {seen} nodes, this is node {node}"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_host_of_every_form() {
        assert_eq!(first_host("gpu5").unwrap(), "gpu5");
        assert_eq!(first_host("a1,b2,c3").unwrap(), "a1");
        assert_eq!(first_host("node[01-04,07],gpu5").unwrap(), "node01");
        assert_eq!(first_host("node[7,01-04]").unwrap(), "node7");
        assert_eq!(first_host("node[001-128]").unwrap(), "node001");
        assert_eq!(first_host("rack[2-3]-n[08-09]").unwrap(), "rack2-n08");
        assert_eq!(first_host("host-a,node[1-2]").unwrap(), "host-a");
        assert_eq!(first_host("gpu[3]").unwrap(), "gpu3");
    }

    #[test]
    fn malformed_host_lists_are_errors() {
        for bad in [
            "",
            "node[01-04",
            "node01-04]",
            "node[[1]]",
            "node[a-b]",
            "node[1-2-3]",
            "node[]",
            "[1-2]",
            "a,,b",
            "a,node[1-x]",
        ] {
            assert!(first_host(bad).is_err(), "{bad:?} accepted");
        }
        let e = first_host("n[1-x]").unwrap_err();
        assert!(e.0.contains("\"1-x\""), "{e}");
    }

    #[test]
    fn tasks_per_node_compressed() {
        assert_eq!(tasks_on_node("4", 0).unwrap(), 4);
        assert_eq!(tasks_on_node("4(x2),3", 0).unwrap(), 4);
        assert_eq!(tasks_on_node("4(x2),3", 1).unwrap(), 4);
        assert_eq!(tasks_on_node("4(x2),3", 2).unwrap(), 3);
        assert!(tasks_on_node("4(x2),3", 3)
            .unwrap_err()
            .0
            .contains("3 nodes"));
        assert!(tasks_on_node("4(2)", 0).is_err());
        assert!(tasks_on_node("four", 0).is_err());
    }
}
