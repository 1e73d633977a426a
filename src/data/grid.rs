//! ARC grids: the token canvas (30x30 in the reference, any smaller square
//! for demos), dihedral transforms, colour maps, EOS framing, cropping and
//! hashing (spec sections 1-2).
//!
//! A `Grid` keeps its cells inline (at most 30x30 bytes) so transforms in the
//! dataset builder's hot loops never allocate.

use sha2::{Digest, Sha256};

/// Largest grid side; also the default (reference) canvas side.
pub const MAX_SIDE: usize = 30;
/// Tokens per flattened default canvas.
pub const SEQ_LEN: usize = MAX_SIDE * MAX_SIDE;
pub const PAD_TOKEN: u8 = 0;
pub const EOS_TOKEN: u8 = 1;
/// Colour `c` is token `c + COLOUR_OFFSET`.
pub const COLOUR_OFFSET: u8 = 2;
pub const NUM_COLOURS: usize = 10;
/// PAD + EOS + 10 colours.
pub const VOCAB_SIZE: usize = NUM_COLOURS + 2;

/// Inverse of each dihedral transform id.
pub const DIHEDRAL_INVERSE: [u8; 8] = [0, 3, 2, 1, 4, 5, 6, 7];

/// A grid of colours 0..9, row-major, at most 30x30.
#[derive(Clone, Copy)]
pub struct Grid {
    rows: u8,
    cols: u8,
    cells: [u8; SEQ_LEN],
}

impl PartialEq for Grid {
    fn eq(&self, other: &Grid) -> bool {
        self.rows == other.rows && self.cols == other.cols && self.cells() == other.cells()
    }
}
impl Eq for Grid {}

impl std::fmt::Debug for Grid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Grid {}x{} [", self.rows, self.cols)?;
        for r in 0..self.rows() {
            if r > 0 {
                write!(f, " / ")?;
            }
            for c in 0..self.cols() {
                write!(f, "{}", self.get(r, c))?;
            }
        }
        write!(f, "]")
    }
}

impl Grid {
    /// A grid from row-major cells; the caller guarantees sizes and colours
    /// (the JSON parser validates user input before calling this).
    pub fn from_cells(rows: usize, cols: usize, cells: &[u8]) -> Grid {
        assert!(rows <= MAX_SIDE && cols <= MAX_SIDE && cells.len() == rows * cols);
        let mut g = Grid {
            rows: rows as u8,
            cols: cols as u8,
            cells: [0; SEQ_LEN],
        };
        g.cells[..cells.len()].copy_from_slice(cells);
        g
    }

    /// A grid from nested rows; `None` if ragged, too large or a colour is out of range.
    pub fn from_rows(rows: &[Vec<u8>]) -> Option<Grid> {
        let r = rows.len();
        let c = rows.first().map_or(0, |row| row.len());
        if r > MAX_SIDE || c > MAX_SIDE || rows.iter().any(|row| row.len() != c) {
            return None;
        }
        let mut g = Grid {
            rows: r as u8,
            cols: c as u8,
            cells: [0; SEQ_LEN],
        };
        for (i, row) in rows.iter().enumerate() {
            for (j, &v) in row.iter().enumerate() {
                if v as usize >= NUM_COLOURS {
                    return None;
                }
                g.cells[i * c + j] = v;
            }
        }
        Some(g)
    }

    pub fn rows(&self) -> usize {
        self.rows as usize
    }

    pub fn cols(&self) -> usize {
        self.cols as usize
    }

    pub fn cells(&self) -> &[u8] {
        &self.cells[..self.rows() * self.cols()]
    }

    pub fn get(&self, r: usize, c: usize) -> u8 {
        self.cells[r * self.cols() + c]
    }

    /// Nested rows, as in ARC JSON.
    pub fn to_rows(&self) -> Vec<Vec<u8>> {
        self.cells()
            .chunks(self.cols().max(1))
            .take(self.rows())
            .map(|r| r.to_vec())
            .collect()
    }

    /// Apply dihedral transform `tid` (0 identity, 1 rot90 counter-clockwise
    /// as numpy `rot90(k=1)`, 2 rot180, 3 rot270, 4 flip left-right, 5 flip
    /// up-down, 6 transpose, 7 anti-transpose). Ids >= 8 are the identity, as
    /// in the reference.
    pub fn dihedral(&self, tid: u8) -> Grid {
        let (r, c) = (self.rows(), self.cols());
        let swaps = matches!(tid, 1 | 3 | 6 | 7);
        let (out_r, out_c) = if swaps { (c, r) } else { (r, c) };
        let mut out = Grid {
            rows: out_r as u8,
            cols: out_c as u8,
            cells: [0; SEQ_LEN],
        };
        // For each output cell (i, j), the source cell it reads.
        for i in 0..out_r {
            for j in 0..out_c {
                let (si, sj) = match tid {
                    1 => (j, c - 1 - i),
                    2 => (r - 1 - i, c - 1 - j),
                    3 => (r - 1 - j, i),
                    4 => (i, c - 1 - j),
                    5 => (r - 1 - i, j),
                    6 => (j, i),
                    7 => (r - 1 - j, c - 1 - i),
                    _ => (i, j),
                };
                out.cells[i * out_c + j] = self.cells[si * c + sj];
            }
        }
        out
    }

    /// Undo `dihedral(tid)`.
    pub fn inverse_dihedral(&self, tid: u8) -> Grid {
        self.dihedral(DIHEDRAL_INVERSE.get(tid as usize).copied().unwrap_or(0))
    }

    /// Map every colour through `map` (`map[c]` is the new colour of `c`).
    pub fn map_colours(&self, map: &[u8; NUM_COLOURS]) -> Grid {
        let mut out = *self;
        let n = self.rows() * self.cols();
        for v in &mut out.cells[..n] {
            *v = map[*v as usize];
        }
        out
    }

    /// SHA-256 over the two shape bytes followed by the raw cells.
    pub fn hash(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update([self.rows, self.cols]);
        h.update(self.cells());
        h.finalize().into()
    }

    /// Render into a square token canvas at offset (r0, c0) with the EOS
    /// frame; the side is derived from `canvas.len()` (30x30 = `SEQ_LEN` in
    /// the reference). The EOS row/column is dropped where it would fall
    /// outside the canvas. The caller guarantees a valid canvas (see
    /// `canvas_side`) and that the grid fits at that offset.
    pub fn render(&self, r0: usize, c0: usize, canvas: &mut [u8]) {
        let side = canvas_side(canvas.len()).expect("canvas is a square of side 1..=30");
        debug_assert!(r0 + self.rows() <= side && c0 + self.cols() <= side);
        canvas.fill(PAD_TOKEN);
        let (nr, nc) = (self.rows(), self.cols());
        for i in 0..nr {
            let dst = &mut canvas[(r0 + i) * side + c0..][..nc];
            for (d, &s) in dst.iter_mut().zip(&self.cells[i * nc..(i + 1) * nc]) {
                *d = s + COLOUR_OFFSET;
            }
        }
        let (eos_r, eos_c) = (r0 + nr, c0 + nc);
        if eos_r < side {
            canvas[eos_r * side + c0..eos_r * side + eos_c].fill(EOS_TOKEN);
        }
        if eos_c < side {
            for i in r0..eos_r {
                canvas[i * side + eos_c] = EOS_TOKEN;
            }
        }
    }

    /// Crop a predicted square token canvas back to a grid: scan rows from
    /// the top; the width is the leading run of colour tokens in the first
    /// row, shrinking to the run of each later row; keep the prefix rectangle
    /// of largest area. A canvas whose length is not a square of side
    /// 1..=30 gives `None`; one with no leading colour gives an empty grid.
    pub fn crop(canvas: &[u8]) -> Option<Grid> {
        let side = canvas_side(canvas.len())?;
        let is_colour = |t: u8| (COLOUR_OFFSET..COLOUR_OFFSET + NUM_COLOURS as u8).contains(&t);
        let mut width = side;
        let (mut best_area, mut best_r, mut best_c) = (0usize, 0usize, 0usize);
        for r in 0..side {
            let row = &canvas[r * side..(r + 1) * side];
            let run = row
                .iter()
                .take(width)
                .take_while(|&&t| is_colour(t))
                .count();
            width = run;
            if width == 0 {
                break;
            }
            let area = (r + 1) * width;
            if area > best_area {
                (best_area, best_r, best_c) = (area, r + 1, width);
            }
        }
        let mut g = Grid {
            rows: best_r as u8,
            cols: best_c as u8,
            cells: [0; SEQ_LEN],
        };
        for i in 0..best_r {
            for j in 0..best_c {
                g.cells[i * best_c + j] = canvas[i * side + j] - COLOUR_OFFSET;
            }
        }
        Some(g)
    }
}

/// The side of a square canvas of `len` tokens, if `len` is the square of a
/// side in 1..=`MAX_SIDE` (the largest canvas a `Grid` can fill).
pub fn canvas_side(len: usize) -> Option<usize> {
    (1..=MAX_SIDE).find(|s| s * s == len)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(r: usize, c: usize) -> Grid {
        let cells: Vec<u8> = (0..r * c).map(|i| (i * 7 % 10) as u8).collect();
        Grid::from_cells(r, c, &cells)
    }

    #[test]
    fn dihedral_inverses_undo_every_transform() {
        for (r, c) in [(1, 1), (2, 3), (5, 4), (30, 30), (1, 30), (7, 1)] {
            let g = sample(r, c);
            for t in 0..8u8 {
                let back = g.dihedral(t).inverse_dihedral(t);
                assert_eq!(back, g, "t{t} on {r}x{c}");
            }
        }
    }

    #[test]
    fn dihedral_matches_numpy_definitions_on_2x3() {
        // [[0,1,2],[3,4,5]] under numpy's rot90/flips/transposes.
        let g = Grid::from_cells(2, 3, &[0, 1, 2, 3, 4, 5]);
        let expect: [(usize, usize, [u8; 6]); 8] = [
            (2, 3, [0, 1, 2, 3, 4, 5]),
            (3, 2, [2, 5, 1, 4, 0, 3]), // rot90 k=1 (counter-clockwise)
            (2, 3, [5, 4, 3, 2, 1, 0]),
            (3, 2, [3, 0, 4, 1, 5, 2]), // rot90 k=3
            (2, 3, [2, 1, 0, 5, 4, 3]),
            (2, 3, [3, 4, 5, 0, 1, 2]),
            (3, 2, [0, 3, 1, 4, 2, 5]),
            (3, 2, [5, 2, 4, 1, 3, 0]), // fliplr(rot90)
        ];
        for (t, (r, c, cells)) in expect.iter().enumerate() {
            let out = g.dihedral(t as u8);
            assert_eq!((out.rows(), out.cols()), (*r, *c), "t{t}");
            assert_eq!(out.cells(), cells, "t{t}");
        }
    }

    #[test]
    fn render_frames_with_eos_and_crop_recovers() {
        let g = sample(3, 4);
        let mut canvas = [0u8; SEQ_LEN];
        g.render(2, 5, &mut canvas);
        // EOS row below, EOS column right; the corner stays PAD.
        for j in 5..9 {
            assert_eq!(canvas[5 * 30 + j], EOS_TOKEN);
        }
        for i in 2..5 {
            assert_eq!(canvas[i * 30 + 9], EOS_TOKEN);
        }
        assert_eq!(canvas[5 * 30 + 9], PAD_TOKEN);
        assert_eq!(canvas[2 * 30 + 5], g.get(0, 0) + 2);
        assert_eq!(canvas.iter().filter(|&&t| t >= 2).count(), 12);

        g.render(0, 0, &mut canvas);
        assert_eq!(Grid::crop(&canvas).unwrap(), g);

        // A full 30x30 grid has no EOS at all.
        let full = sample(30, 30);
        full.render(0, 0, &mut canvas);
        assert!(!canvas.contains(&EOS_TOKEN));
        assert_eq!(Grid::crop(&canvas).unwrap(), full);
    }

    #[test]
    fn crop_takes_largest_prefix_rectangle() {
        let mut canvas = [0u8; SEQ_LEN];
        // Row 0: 5 colours; row 1: 3 colours; row 2: 3 colours; row 3: none.
        canvas[..5].fill(3);
        for i in 1..3 {
            for j in 0..3 {
                canvas[i * 30 + j] = 4;
            }
            canvas[i * 30 + 3] = EOS_TOKEN;
        }
        // Candidates: 1x5 (5), 2x3 (6), 3x3 (9): 3x3 wins.
        let g = Grid::crop(&canvas).unwrap();
        assert_eq!((g.rows(), g.cols()), (3, 3));
        assert_eq!(g.get(0, 0), 1);
        assert_eq!(g.get(2, 2), 2);

        // Nothing predicted: empty grid.
        let empty = Grid::crop(&[0u8; SEQ_LEN]).unwrap();
        assert_eq!((empty.rows(), empty.cols()), (0, 0));
    }

    #[test]
    fn small_canvas_is_the_top_left_window_of_the_30x30_rendering() {
        // On an s x s canvas the frame is cut at the edge exactly as it is at
        // 30x30, so the small rendering is the 30x30 one's top-left window.
        let mut big = [0u8; SEQ_LEN];
        for side in [1usize, 3, 8, 29] {
            let mut small = vec![0u8; side * side];
            for (r, c) in [(1, 1), (2, 3), (3, 2), (side, side), (side, 1), (1, side)] {
                if r > side || c > side {
                    continue;
                }
                let g = sample(r, c);
                for (r0, c0) in [(0, 0), (side - r, side - c), ((side - r) / 2, 0)] {
                    g.render(r0, c0, &mut small);
                    g.render(r0, c0, &mut big);
                    for i in 0..side {
                        assert_eq!(
                            &small[i * side..(i + 1) * side],
                            &big[i * MAX_SIDE..i * MAX_SIDE + side],
                            "side {side}, {r}x{c} at ({r0}, {c0}), row {i}"
                        );
                    }
                    assert_eq!(small.iter().filter(|&&t| t >= COLOUR_OFFSET).count(), r * c);
                }
                g.render(0, 0, &mut small);
                assert_eq!(Grid::crop(&small).unwrap(), g, "side {side}, {r}x{c}");
            }
        }
    }

    #[test]
    fn render_and_crop_on_an_8x8_canvas() {
        let g = sample(3, 4);
        let mut canvas = [0u8; 64];
        g.render(4, 4, &mut canvas);
        // Grid in rows 4..7, columns 4..8; EOS row 7 only (column 8 is off
        // the canvas), no EOS column.
        assert_eq!(canvas[4 * 8 + 4], g.get(0, 0) + COLOUR_OFFSET);
        assert_eq!(canvas[6 * 8 + 7], g.get(2, 3) + COLOUR_OFFSET);
        assert_eq!(&canvas[7 * 8 + 4..], &[EOS_TOKEN; 4]);
        assert_eq!(canvas.iter().filter(|&&t| t == EOS_TOKEN).count(), 4);
        assert_eq!(canvas.iter().filter(|&&t| t == PAD_TOKEN).count(), 64 - 16);

        // A full 8x8 grid: no EOS; it crops back whole.
        let full = sample(8, 8);
        full.render(0, 0, &mut canvas);
        assert!(!canvas.contains(&EOS_TOKEN));
        assert_eq!(Grid::crop(&canvas).unwrap(), full);
        // 1x1 canvas.
        let mut one = [0u8; 1];
        sample(1, 1).render(0, 0, &mut one);
        assert_eq!(one, [COLOUR_OFFSET]);
        assert_eq!(Grid::crop(&one).unwrap(), sample(1, 1));
    }

    #[test]
    fn crop_rejects_canvases_that_are_not_squares_up_to_30() {
        for len in [0usize, 2, 63, 65, 899, 31 * 31] {
            assert!(Grid::crop(&vec![2u8; len]).is_none(), "len {len}");
        }
        assert_eq!(canvas_side(64), Some(8));
        assert_eq!(canvas_side(1), Some(1));
        assert_eq!(canvas_side(SEQ_LEN), Some(MAX_SIDE));
        assert_eq!(canvas_side(0), None);
        assert_eq!(canvas_side(31 * 31), None);
    }

    #[test]
    fn colour_maps_and_hash() {
        let g = Grid::from_cells(1, 3, &[0, 1, 9]);
        let mut map = [0u8; 10];
        for (c, m) in map.iter_mut().enumerate() {
            *m = if c == 0 { 0 } else { 10 - c as u8 };
        }
        assert_eq!(g.map_colours(&map).cells(), &[0, 9, 1]);
        // sha256(bytes([1, 3, 0, 1, 9])), as hashlib computes it.
        assert_eq!(
            hex::encode(g.hash()),
            hex::encode(Sha256::digest([1u8, 3, 0, 1, 9]))
        );
        assert_ne!(g.hash(), Grid::from_cells(3, 1, &[0, 1, 9]).hash());
    }

    #[test]
    fn from_rows_rejects_bad_grids() {
        assert!(Grid::from_rows(&[vec![1, 2], vec![3]]).is_none());
        assert!(Grid::from_rows(&[vec![10]]).is_none());
        assert!(Grid::from_rows(&vec![vec![0u8; 31]; 2]).is_none());
        assert!(Grid::from_rows(&vec![vec![0u8; 2]; 31]).is_none());
        let g = Grid::from_rows(&[vec![1, 2], vec![3, 4]]).unwrap();
        assert_eq!(g.to_rows(), vec![vec![1, 2], vec![3, 4]]);
    }
}
