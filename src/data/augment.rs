//! Puzzle augmentation: a colour permutation (0 fixed, 1..9 permuted) then a
//! dihedral transform, applied to every grid of a puzzle. An augmented
//! puzzle is named `"{id}|||t{k}|||{perm}"`; the inverse is read back from
//! the name, so predictions can be mapped to the original puzzle.

use rand::seq::SliceRandom;
use rand::Rng;
use sha2::{Digest, Sha256};

use super::arc::Example;
use super::grid::{Grid, NUM_COLOURS};

pub const ID_SEPARATOR: &str = "|||";
/// Candidates drawn per wanted augmentation before giving up.
pub const RETRIES_FACTOR: usize = 5;

/// One augmentation: `map` first, then dihedral transform `tid`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Augmentation {
    pub tid: u8,
    /// `map[c]` is the new colour of colour `c`; `map[0] == 0`.
    pub map: [u8; NUM_COLOURS],
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("'{name}' is not a valid augmented puzzle name: {why}")]
pub struct NameError {
    pub name: String,
    pub why: String,
}

impl Augmentation {
    pub const IDENTITY: Augmentation = Augmentation {
        tid: 0,
        map: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
    };

    /// Draw a candidate: transform uniform in 0..8, colours 1..9 shuffled.
    pub fn random<R: Rng>(rng: &mut R) -> Augmentation {
        let tid = rng.gen_range(0..8u8);
        let mut map = Self::IDENTITY.map;
        map[1..].shuffle(rng);
        Augmentation { tid, map }
    }

    pub fn apply(&self, g: &Grid) -> Grid {
        g.map_colours(&self.map).dihedral(self.tid)
    }

    /// The colour map that undoes `map`.
    pub fn inverse_map(&self) -> [u8; NUM_COLOURS] {
        let mut inv = [0u8; NUM_COLOURS];
        for (c, &m) in self.map.iter().enumerate() {
            inv[m as usize] = c as u8;
        }
        inv
    }

    /// Undo `apply`: inverse dihedral, then inverse colour map.
    pub fn invert(&self, g: &Grid) -> Grid {
        g.inverse_dihedral(self.tid)
            .map_colours(&self.inverse_map())
    }

    /// The augmented puzzle's name.
    pub fn name(&self, base: &str) -> String {
        let mut s = String::with_capacity(base.len() + 2 * ID_SEPARATOR.len() + 2 + NUM_COLOURS);
        s.push_str(base);
        s.push_str(ID_SEPARATOR);
        s.push('t');
        s.push((b'0' + self.tid) as char);
        s.push_str(ID_SEPARATOR);
        for &m in &self.map {
            s.push((b'0' + m) as char);
        }
        s
    }

    /// Split a puzzle name into the original id and its augmentation
    /// (`None` for an original, un-augmented name).
    pub fn parse_name(name: &str) -> Result<(&str, Option<Augmentation>), NameError> {
        let err = |why: &str| NameError {
            name: name.to_string(),
            why: why.to_string(),
        };
        let parts: Vec<&str> = name.split(ID_SEPARATOR).collect();
        if parts.len() == 1 {
            return Ok((name, None));
        }
        if parts.len() != 3 {
            return Err(err("expected id|||tK|||PERM"));
        }
        let t = parts[1]
            .strip_prefix('t')
            .and_then(|d| d.parse::<u8>().ok())
            .filter(|&t| t < 8)
            .ok_or_else(|| err("transform must be t0..t7"))?;
        let digits = parts[2].as_bytes();
        if digits.len() != NUM_COLOURS || !digits.iter().all(u8::is_ascii_digit) {
            return Err(err("colour permutation must be 10 digits"));
        }
        let mut map = [0u8; NUM_COLOURS];
        let mut seen = [false; NUM_COLOURS];
        for (m, d) in map.iter_mut().zip(digits) {
            *m = d - b'0';
            if std::mem::replace(&mut seen[*m as usize], true) {
                return Err(err("colour permutation repeats a digit"));
            }
        }
        Ok((parts[0], Some(Augmentation { tid: t, map })))
    }
}

/// Identity of an augmented puzzle for deduplication: SHA-256 over the
/// sorted per-example `(hash(input), hash(output))` pairs of all its
/// examples (train and test), i.e. the multiset of examples.
pub fn puzzle_key<'a>(examples: impl Iterator<Item = &'a Example>, aug: &Augmentation) -> [u8; 32] {
    let mut pairs: Vec<[u8; 64]> = examples
        .map(|ex| {
            let mut p = [0u8; 64];
            p[..32].copy_from_slice(&aug.apply(&ex.input).hash());
            p[32..].copy_from_slice(&aug.apply(&ex.output).hash());
            p
        })
        .collect();
    pairs.sort_unstable();
    let mut h = Sha256::new();
    for p in &pairs {
        h.update(p);
    }
    h.finalize().into()
}

/// The group of a puzzle: the identity first, then up to `num_aug` distinct
/// augmentations (distinct = different multiset of examples from every
/// earlier member, the original included), trying at most
/// `RETRIES_FACTOR * num_aug` candidates.
pub fn draw_group<R: Rng>(examples: &[Example], num_aug: usize, rng: &mut R) -> Vec<Augmentation> {
    let mut group = vec![Augmentation::IDENTITY];
    if num_aug == 0 {
        return group;
    }
    let mut seen = std::collections::HashSet::with_capacity(num_aug + 1);
    seen.insert(puzzle_key(examples.iter(), &Augmentation::IDENTITY));
    for _ in 0..RETRIES_FACTOR * num_aug {
        let aug = Augmentation::random(rng);
        if seen.insert(puzzle_key(examples.iter(), &aug)) {
            group.push(aug);
            if group.len() > num_aug {
                break;
            }
        }
    }
    group
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn ex(r: usize, c: usize, seed: u8) -> Example {
        let cells: Vec<u8> = (0..r * c)
            .map(|i| ((i as u8).wrapping_mul(3).wrapping_add(seed)) % 10)
            .collect();
        let out: Vec<u8> = cells.iter().map(|v| (v + 1) % 10).collect();
        Example {
            input: Grid::from_cells(r, c, &cells),
            output: Grid::from_cells(r, c, &out),
        }
    }

    #[test]
    fn names_round_trip() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for _ in 0..200 {
            let a = Augmentation::random(&mut rng);
            assert_eq!(a.map[0], 0);
            let name = a.name("00576224");
            let (base, back) = Augmentation::parse_name(&name).unwrap();
            assert_eq!(base, "00576224");
            assert_eq!(back, Some(a));
        }
        assert_eq!(
            Augmentation {
                tid: 3,
                map: [0, 3, 8, 1, 2, 5, 6, 4, 7, 9]
            }
            .name("x"),
            "x|||t3|||0381256479"
        );
        assert_eq!(Augmentation::parse_name("abc").unwrap(), ("abc", None));
        for bad in [
            "a|||t9|||0123456789",
            "a|||t1|||012345678",
            "a|||t1|||0123456788",
            "a|||x1|||0123456789",
            "a|||t1",
        ] {
            assert!(Augmentation::parse_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn invert_undoes_apply() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let e = ex(4, 7, 3);
        for _ in 0..100 {
            let a = Augmentation::random(&mut rng);
            assert_eq!(a.invert(&a.apply(&e.input)), e.input);
            // Colour map first, then transform: same as transform then map.
            assert_eq!(
                a.apply(&e.input),
                e.input.dihedral(a.tid).map_colours(&a.map)
            );
        }
    }

    #[test]
    fn groups_are_distinct_and_capped() {
        let examples = vec![ex(3, 3, 0), ex(2, 5, 4)];
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let g = draw_group(&examples, 50, &mut rng);
        assert_eq!(g.len(), 51);
        assert_eq!(g[0], Augmentation::IDENTITY);
        let keys: std::collections::HashSet<_> =
            g.iter().map(|a| puzzle_key(examples.iter(), a)).collect();
        assert_eq!(keys.len(), g.len());

        // A single black cell looks the same under every augmentation:
        // nothing distinct can be found, the group is just the original.
        let blank = vec![Example {
            input: Grid::from_cells(1, 1, &[0]),
            output: Grid::from_cells(1, 1, &[0]),
        }];
        assert_eq!(draw_group(&blank, 10, &mut rng).len(), 1);

        // One non-black colour, symmetric shape: only the 9 colour choices differ.
        let one = vec![Example {
            input: Grid::from_cells(1, 1, &[5]),
            output: Grid::from_cells(1, 1, &[5]),
        }];
        assert_eq!(draw_group(&one, 1000, &mut rng).len(), 9);
    }
}
