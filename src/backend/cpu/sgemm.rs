//! sgemm: f32 `C = alpha A B (+ C)` with AVX2+FMA, tuned for the TRM shapes
//! on a few cores.
//!
//! Design rule: BLIS-style blocking (6x16 register tile, KC-deep packed
//! panels, A block sized for L2, B micro-panel for L1); B is packed once per
//! call and shared read-only, M is split between threads, so threads never
//! pack the same data twice and meet only at the end of each phase. The
//! kernel prefetches its C tile while it runs: with C far larger than the
//! caches, the tile's load otherwise stalls every KC pass.
//!
//! The `gemm` crate reaches the same speed on an idle machine, but this
//! blocking loses less when the shared L3 is busy (measured on the 2-core
//! AMD EPYC development machine, f32 at the TRM layer shapes).

use std::arch::x86_64::*;
use std::cell::Cell;
use std::thread::LocalKey;

pub const MR: usize = 6;
pub const NR: usize = 16;
/// Depth of one packed panel pass: a 16-wide B micro-panel of KC rows is
/// 16 KiB, half of L1d, next to a 6 KiB A micro-panel.
pub const KC: usize = 256;
/// Rows of A packed per block: MC x KC floats = 144 KiB, well inside L2.
pub const MC: usize = 144;
/// Products with at most this many B panels (n <= 64) read a row-contiguous
/// A in place.
const DIRECT_A_PANELS: usize = 4;
/// Products with at most this many rows read a row-contiguous B in place.
const DIRECT_B_ROWS: usize = 96;
/// Floats past the last A panel that [`pack_a`]'s 8-wide stores may touch.
const PACK_A_SLACK: usize = 8 - MR;

/// Strided read-only view: element (i, j) at `ptr[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub struct View {
    pub ptr: *const f32,
    pub rs: isize,
    pub cs: isize,
}
unsafe impl Send for View {}
unsafe impl Sync for View {}

#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The pointer (a method, so closures capture the Sync wrapper, not the
    /// raw pointer field).
    fn get(self) -> *mut f32 {
        self.0
    }
}

thread_local! {
    static PACK_A: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
    static PACK_B: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
    static PACK_EDGE: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// Takes this thread's packing buffer, grown to at least `len`. Taking it
/// (rather than borrowing it) keeps a nested product safe: while a thread
/// waits for its helpers, rayon may run another product on it.
fn take_buf(key: &'static LocalKey<Cell<Vec<f32>>>, len: usize) -> Vec<f32> {
    let mut buf = key.with(Cell::take);
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    buf
}

/// [`give_buf`] for a buffer that may never have been taken (still empty).
fn give_taken(key: &'static LocalKey<Cell<Vec<f32>>>, buf: Vec<f32>) {
    if !buf.is_empty() {
        give_buf(key, buf);
    }
}

/// Returns a buffer from [`take_buf`], keeping the larger of it and any
/// buffer a nested product left there.
fn give_buf(key: &'static LocalKey<Cell<Vec<f32>>>, buf: Vec<f32>) {
    key.with(|cell| {
        let other = cell.take();
        cell.set(if other.len() > buf.len() { other } else { buf });
    });
}

/// Whether this CPU can run [`sgemm`].
pub fn available() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
}

/// The columns of an 8x8 block given as rows: `out[j][i] = rows[i][j]`.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
    // Interleave pairs of rows, then pairs of pairs within each 128-bit
    // lane, then swap lane halves.
    let t0 = _mm256_unpacklo_ps(r[0], r[1]);
    let t1 = _mm256_unpackhi_ps(r[0], r[1]);
    let t2 = _mm256_unpacklo_ps(r[2], r[3]);
    let t3 = _mm256_unpackhi_ps(r[2], r[3]);
    let t4 = _mm256_unpacklo_ps(r[4], r[5]);
    let t5 = _mm256_unpackhi_ps(r[4], r[5]);
    let t6 = _mm256_unpacklo_ps(r[6], r[7]);
    let t7 = _mm256_unpackhi_ps(r[6], r[7]);
    let s0 = _mm256_shuffle_ps::<0x44>(t0, t2);
    let s1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
    let s2 = _mm256_shuffle_ps::<0x44>(t1, t3);
    let s3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
    let s4 = _mm256_shuffle_ps::<0x44>(t4, t6);
    let s5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
    let s6 = _mm256_shuffle_ps::<0x44>(t5, t7);
    let s7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
    [
        _mm256_permute2f128_ps::<0x20>(s0, s4),
        _mm256_permute2f128_ps::<0x20>(s1, s5),
        _mm256_permute2f128_ps::<0x20>(s2, s6),
        _mm256_permute2f128_ps::<0x20>(s3, s7),
        _mm256_permute2f128_ps::<0x31>(s0, s4),
        _mm256_permute2f128_ps::<0x31>(s1, s5),
        _mm256_permute2f128_ps::<0x31>(s2, s6),
        _mm256_permute2f128_ps::<0x31>(s3, s7),
    ]
}

/// Packs panel `jp` of B[p0..p0+kc, 0..n] (columns `jp * NR..`) into `dst`:
/// `kc x NR` values row by row, zero-padded past n.
#[target_feature(enable = "avx2")]
unsafe fn pack_b(dst: *mut f32, b: View, p0: usize, kc: usize, n: usize, jp: usize) {
    let j0 = jp * NR;
    let nr = NR.min(n - j0);
    let panel = std::slice::from_raw_parts_mut(dst, kc * NR);
    if b.cs == 1 && nr == NR {
        for kk in 0..kc {
            let src = b.ptr.offset((p0 + kk) as isize * b.rs + j0 as isize);
            std::ptr::copy_nonoverlapping(src, panel.as_mut_ptr().add(kk * NR), NR);
        }
    } else if b.rs == 1 && nr == NR {
        // B = W^T with W's rows contiguous: 8x8 transposes, 8 columns
        // (W rows) at a time.
        let k8 = kc / 8 * 8;
        for h in 0..2 {
            let src = b.ptr.offset((j0 + 8 * h) as isize * b.cs + p0 as isize);
            let mut kk = 0;
            while kk < k8 {
                let rows = std::array::from_fn(|i| {
                    _mm256_loadu_ps(src.offset(i as isize * b.cs + kk as isize))
                });
                let cols = transpose8(rows);
                for (j, col) in cols.iter().enumerate() {
                    _mm256_storeu_ps(panel.as_mut_ptr().add((kk + j) * NR + 8 * h), *col);
                }
                kk += 8;
            }
            for kk in k8..kc {
                for jj in 0..8 {
                    panel[kk * NR + 8 * h + jj] = *src.offset(jj as isize * b.cs + kk as isize);
                }
            }
        }
    } else {
        for jj in 0..NR {
            if jj < nr {
                let col = b.ptr.offset((j0 + jj) as isize * b.cs + p0 as isize * b.rs);
                for kk in 0..kc {
                    panel[kk * NR + jj] = *col.offset(kk as isize * b.rs);
                }
            } else {
                for kk in 0..kc {
                    panel[kk * NR + jj] = 0.0;
                }
            }
        }
    }
}

/// Packs A[i0..i0+mc, p0..p0+kc] into panels of MR rows: panel ip holds
/// `kc x MR` values column by column, zero-padded past mc. `dst` must have
/// [`PACK_A_SLACK`] floats past the last panel.
#[target_feature(enable = "avx2")]
unsafe fn pack_a(dst: &mut [f32], a: View, i0: usize, mc: usize, p0: usize, kc: usize) {
    let mp = mc.div_ceil(MR);
    assert!(dst.len() >= mp * kc * MR + PACK_A_SLACK);
    for ip in 0..mp {
        let r0 = i0 + ip * MR;
        let mr = MR.min(mc - ip * MR);
        let panel = dst.as_mut_ptr().add(ip * kc * MR);
        if a.rs == 1 && mr == MR {
            for kk in 0..kc {
                let src = a.ptr.offset((p0 + kk) as isize * a.cs + r0 as isize);
                std::ptr::copy_nonoverlapping(src, panel.add(kk * MR), MR);
            }
        } else if a.cs == 1 && mr == MR {
            // Rows contiguous: transpose 6 rows (and 2 zero rows) 8 columns
            // at a time; each 8-wide store spills 2 lanes into the next
            // column, which the next store (or the tail, or the next panel,
            // or the slack) overwrites.
            let src = a.ptr.offset(r0 as isize * a.rs + p0 as isize);
            let k8 = kc / 8 * 8;
            let mut kk = 0;
            while kk < k8 {
                let rows = std::array::from_fn(|i| {
                    if i < MR {
                        _mm256_loadu_ps(src.offset(i as isize * a.rs + kk as isize))
                    } else {
                        _mm256_setzero_ps()
                    }
                });
                let cols = transpose8(rows);
                for (j, col) in cols.iter().enumerate() {
                    _mm256_storeu_ps(panel.add((kk + j) * MR), *col);
                }
                kk += 8;
            }
            for kk in k8..kc {
                for ii in 0..MR {
                    *panel.add(kk * MR + ii) = *src.offset(ii as isize * a.rs + kk as isize);
                }
            }
        } else {
            for ii in 0..MR {
                if ii < mr {
                    let row = a.ptr.offset((r0 + ii) as isize * a.rs + p0 as isize * a.cs);
                    for kk in 0..kc {
                        *panel.add(kk * MR + ii) = *row.offset(kk as isize * a.cs);
                    }
                } else {
                    for kk in 0..kc {
                        *panel.add(kk * MR + ii) = 0.0;
                    }
                }
            }
        }
    }
}

/// The 6x16 register tile: `C[0..mr, 0..nr] = alpha * Apanel Bpanel + (load ? C : 0)`.
///
/// A is packed (`a[k * MR + i]`, `A_PACKED`) or read in place
/// (`a[i * lda + k]`); B is packed (`b[k * NR + j]`, `B_PACKED`) or read in
/// place (`b[k * ldb + j]`). Full 6x16 panels are always read: callers pack
/// short edge panels (zero padded).
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel_6x16<const A_PACKED: bool, const B_PACKED: bool>(
    kc: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    rs_c: usize,
    alpha: f32,
    load: bool,
    mr: usize,
    nr: usize,
) {
    let mut c00 = _mm256_setzero_ps();
    let mut c01 = _mm256_setzero_ps();
    let mut c10 = _mm256_setzero_ps();
    let mut c11 = _mm256_setzero_ps();
    let mut c20 = _mm256_setzero_ps();
    let mut c21 = _mm256_setzero_ps();
    let mut c30 = _mm256_setzero_ps();
    let mut c31 = _mm256_setzero_ps();
    let mut c40 = _mm256_setzero_ps();
    let mut c41 = _mm256_setzero_ps();
    let mut c50 = _mm256_setzero_ps();
    let mut c51 = _mm256_setzero_ps();
    for i in 0..mr {
        _mm_prefetch::<_MM_HINT_T0>(c.add(i * rs_c) as *const i8);
        _mm_prefetch::<_MM_HINT_T0>(c.add(i * rs_c + 15) as *const i8);
    }
    let mut pa = a;
    let mut pb = b;
    // A element (row i, step o) relative to pa.
    let ai = |pa: *const f32, o: usize, i: usize| -> *const f32 {
        if A_PACKED {
            pa.add(o * MR + i)
        } else {
            pa.add(i * lda + o)
        }
    };
    let astep = if A_PACKED { MR } else { 1 };
    let bstep = if B_PACKED { NR } else { ldb };
    // Row i of the tile at k offset o: one broadcast of A, two FMAs.
    macro_rules! row {
        ($o:expr, $i:expr, $b0:ident, $b1:ident, $lo:ident, $hi:ident) => {{
            let a = _mm256_broadcast_ss(&*ai(pa, $o, $i));
            $lo = _mm256_fmadd_ps(a, $b0, $lo);
            $hi = _mm256_fmadd_ps(a, $b1, $hi);
        }};
    }
    macro_rules! step {
        ($o:expr) => {{
            let b0 = _mm256_loadu_ps(pb.add($o * bstep));
            let b1 = _mm256_loadu_ps(pb.add($o * bstep + 8));
            row!($o, 0, b0, b1, c00, c01);
            row!($o, 1, b0, b1, c10, c11);
            row!($o, 2, b0, b1, c20, c21);
            row!($o, 3, b0, b1, c30, c31);
            row!($o, 4, b0, b1, c40, c41);
            row!($o, 5, b0, b1, c50, c51);
        }};
    }
    let mut k = kc;
    while k >= 4 {
        step!(0);
        step!(1);
        step!(2);
        step!(3);
        pa = pa.add(4 * astep);
        pb = pb.add(4 * bstep);
        k -= 4;
    }
    while k > 0 {
        step!(0);
        pa = pa.add(astep);
        pb = pb.add(bstep);
        k -= 1;
    }
    let al = _mm256_set1_ps(alpha);
    let rows = [
        [c00, c01],
        [c10, c11],
        [c20, c21],
        [c30, c31],
        [c40, c41],
        [c50, c51],
    ];
    if mr == MR && nr == NR {
        for (i, r) in rows.iter().enumerate() {
            let p = c.add(i * rs_c);
            let mut v0 = _mm256_mul_ps(al, r[0]);
            let mut v1 = _mm256_mul_ps(al, r[1]);
            if load {
                v0 = _mm256_add_ps(v0, _mm256_loadu_ps(p));
                v1 = _mm256_add_ps(v1, _mm256_loadu_ps(p.add(8)));
            }
            _mm256_storeu_ps(p, v0);
            _mm256_storeu_ps(p.add(8), v1);
        }
    } else {
        let mut tile = [0f32; MR * NR];
        for (i, r) in rows.iter().enumerate() {
            _mm256_storeu_ps(tile.as_mut_ptr().add(i * NR), _mm256_mul_ps(al, r[0]));
            _mm256_storeu_ps(tile.as_mut_ptr().add(i * NR + 8), _mm256_mul_ps(al, r[1]));
        }
        for i in 0..mr {
            for j in 0..nr {
                let p = c.add(i * rs_c + j);
                let v = tile[i * NR + j];
                *p = if load { *p + v } else { v };
            }
        }
    }
}

/// Where one KC pass reads B from.
#[derive(Clone, Copy)]
enum BSource<'a> {
    /// This pass's panels, packed (panel jp at `jp * kc * NR`).
    Packed(&'a [f32]),
    /// B itself (row-contiguous), read in place from row p0.
    InPlace(View),
}

/// One A micro-panel and one B micro-panel into C's tile at (r0, j0).
#[allow(clippy::too_many_arguments)]
#[inline]
unsafe fn tile(
    kc: usize,
    a: (*const f32, Option<usize>),
    b: (*const f32, Option<usize>),
    c: *mut f32,
    rs_c: usize,
    alpha: f32,
    load: bool,
    mr: usize,
    nr: usize,
) {
    // `Some(ld)`: read in place with that row stride; `None`: packed.
    match (a.1, b.1) {
        (None, None) => kernel_6x16::<true, true>(kc, a.0, 0, b.0, 0, c, rs_c, alpha, load, mr, nr),
        (None, Some(ldb)) => {
            kernel_6x16::<true, false>(kc, a.0, 0, b.0, ldb, c, rs_c, alpha, load, mr, nr)
        }
        (Some(lda), None) => {
            kernel_6x16::<false, true>(kc, a.0, lda, b.0, 0, c, rs_c, alpha, load, mr, nr)
        }
        (Some(lda), Some(ldb)) => {
            kernel_6x16::<false, false>(kc, a.0, lda, b.0, ldb, c, rs_c, alpha, load, mr, nr)
        }
    }
}

/// Rows `m0..m1` of C for one KC pass (`p0..p0+kc`).
#[allow(clippy::too_many_arguments)]
unsafe fn rows_block(
    bsrc: BSource<'_>,
    a: View,
    c: OutPtr,
    rs_c: usize,
    m0: usize,
    m1: usize,
    n: usize,
    p0: usize,
    kc: usize,
    alpha: f32,
    load: bool,
) {
    let np = n.div_ceil(NR);
    // B's edge panel when B is read in place: packed here, zero padded, so
    // the kernel never reads past B's columns.
    // Taken from the thread-local only when needed (no zeroing per call).
    let mut edge: Vec<f32> = Vec::new();
    let b_panel = |jp: usize, edge: &mut Vec<f32>| -> (*const f32, Option<usize>) {
        match bsrc {
            BSource::Packed(packed) => (packed.as_ptr().add(jp * kc * NR), None),
            BSource::InPlace(b) if (jp + 1) * NR <= n => (
                b.ptr.offset(p0 as isize * b.rs + (jp * NR) as isize),
                Some(b.rs as usize),
            ),
            BSource::InPlace(b) => {
                if edge.is_empty() {
                    *edge = take_buf(&PACK_EDGE, KC * NR);
                }
                pack_b(edge.as_mut_ptr(), b, p0, kc, n, jp);
                (edge.as_ptr(), None)
            }
        }
    };
    if a.cs == 1 && np <= DIRECT_A_PANELS {
        // Few B panels: packing A would cost as much as the product; read
        // A's rows in place, each 6-row slice once for all the B panels.
        let mut bps = [(std::ptr::null(), None); DIRECT_A_PANELS];
        for (jp, bp) in bps.iter_mut().enumerate().take(np) {
            *bp = b_panel(jp, &mut edge);
        }
        let mut short: Vec<f32> = Vec::new();
        let mut r0 = m0;
        while r0 < m1 {
            let mr = MR.min(m1 - r0);
            let ap = if mr == MR {
                (
                    a.ptr.offset(r0 as isize * a.rs + p0 as isize),
                    Some(a.rs as usize),
                )
            } else {
                // Short last slice: packed (zero rows) so the kernel never
                // reads past A.
                short = take_buf(&PACK_A, MR * KC + PACK_A_SLACK);
                pack_a(&mut short, a, r0, mr, p0, kc);
                (short.as_ptr(), None)
            };
            for (jp, &bp) in bps.iter().enumerate().take(np) {
                let j0 = jp * NR;
                let cp = c.get().add(r0 * rs_c + j0);
                tile(kc, ap, bp, cp, rs_c, alpha, load, mr, NR.min(n - j0));
            }
            r0 += mr;
        }
        give_taken(&PACK_A, short);
        give_taken(&PACK_EDGE, edge);
        return;
    }
    let mut buf = take_buf(&PACK_A, MC * kc + PACK_A_SLACK);
    let mut i0 = m0;
    while i0 < m1 {
        let mc = MC.min(m1 - i0);
        pack_a(&mut buf, a, i0, mc, p0, kc);
        for jp in 0..np {
            let j0 = jp * NR;
            let nr = NR.min(n - j0);
            let bp = b_panel(jp, &mut edge);
            for ip in 0..mc.div_ceil(MR) {
                let r0 = i0 + ip * MR;
                let mr = MR.min(m1 - r0);
                let ap = buf.as_ptr().add(ip * kc * MR);
                tile(
                    kc,
                    (ap, None),
                    bp,
                    c.get().add(r0 * rs_c + j0),
                    rs_c,
                    alpha,
                    load,
                    mr,
                    nr,
                );
            }
        }
        i0 += mc;
    }
    give_buf(&PACK_A, buf);
    give_taken(&PACK_EDGE, edge);
}

/// Runs `f(0..parts)` with part 0 on the calling worker and the others
/// spawned, returning when all are done.
fn split<F: Fn(usize) + Sync>(parts: usize, f: F) {
    if parts <= 1 {
        f(0);
        return;
    }
    let f = &f;
    rayon::scope(|s| {
        for t in 1..parts {
            s.spawn(move |_| f(t));
        }
        f(0);
    });
}

/// `C[m, n] (row stride rs_c) = alpha A[m, k] B[k, n] + (accumulate ? C : 0)`,
/// on `threads` rayon workers (1 = the calling thread only).
///
/// All of B is packed first (its panels shared out between the threads),
/// then each thread owns a range of C's rows for every KC pass: two
/// fork-joins per call, no other synchronisation.
///
/// # Safety
/// The views must be in bounds for the given sizes, C must not alias A or B,
/// and the CPU must have AVX2 and FMA ([`available`]).
#[allow(clippy::too_many_arguments)]
pub unsafe fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    c: *mut f32,
    rs_c: usize,
    a: View,
    b: View,
    alpha: f32,
    accumulate: bool,
    threads: usize,
) {
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    let threads = threads.clamp(1, m.div_ceil(MR));
    if b.cs == 1 && m <= DIRECT_B_ROWS {
        // Few rows use each B value: packing B would cost a large share of
        // the product.
        compute(m, n, k, c, rs_c, a, None, b, alpha, accumulate, threads);
        return;
    }
    let mut pb = take_buf(&PACK_B, packed_len(k, n));
    pack_all_b(&mut pb, b, k, n, threads);
    compute(
        m,
        n,
        k,
        c,
        rs_c,
        a,
        Some(&pb),
        b,
        alpha,
        accumulate,
        threads,
    );
    give_buf(&PACK_B, pb);
}

/// A right-hand side packed once for several products (the same K or V
/// against every query block, say).
pub struct PackedB {
    data: Vec<f32>,
    k: usize,
    n: usize,
}

impl PackedB {
    /// Packs `b` (`k x n`) on `threads` workers.
    ///
    /// # Safety
    /// `b` must be in bounds for `k x n` and the CPU must have AVX2
    /// ([`available`]).
    pub unsafe fn new(b: View, k: usize, n: usize, threads: usize) -> Self {
        let mut data = vec![0.0; packed_len(k, n)];
        pack_all_b(&mut data, b, k, n, threads.max(1));
        PackedB { data, k, n }
    }

    /// `(k, n)`.
    pub fn shape(&self) -> (usize, usize) {
        (self.k, self.n)
    }
}

/// [`sgemm`] with a B packed beforehand.
///
/// # Safety
/// As [`sgemm`] (A `m x b.k`, C `m x b.n`).
#[allow(clippy::too_many_arguments)]
pub unsafe fn sgemm_packed(
    m: usize,
    c: *mut f32,
    rs_c: usize,
    a: View,
    b: &PackedB,
    alpha: f32,
    accumulate: bool,
    threads: usize,
) {
    let (k, n) = (b.k, b.n);
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    let threads = threads.clamp(1, m.div_ceil(MR));
    let unused = View {
        ptr: std::ptr::null(),
        rs: 0,
        cs: 0,
    };
    compute(
        m,
        n,
        k,
        c,
        rs_c,
        a,
        Some(&b.data),
        unused,
        alpha,
        accumulate,
        threads,
    );
}

/// Floats of B packed whole: every KC pass's panels.
fn packed_len(k: usize, n: usize) -> usize {
    k * n.div_ceil(NR) * NR
}

/// Packs all of B (`k x n`) into `dst`, the panels shared out between the
/// threads. Pass p0's panels start at `p0 * np * NR` (earlier passes hold
/// p0 rows).
unsafe fn pack_all_b(dst: &mut [f32], b: View, k: usize, n: usize, threads: usize) {
    let np = n.div_ceil(NR);
    assert!(dst.len() >= packed_len(k, n));
    let base = OutPtr(dst.as_mut_ptr());
    let parts = threads.min(np);
    split(parts, |t| {
        let mut p0 = 0;
        while p0 < k {
            let kc = KC.min(k - p0);
            for jp in np * t / parts..np * (t + 1) / parts {
                pack_b(
                    base.get().add(p0 * np * NR + jp * kc * NR),
                    b,
                    p0,
                    kc,
                    n,
                    jp,
                );
            }
            p0 += kc;
        }
    });
}

/// The product proper: each thread runs every KC pass over its own rows of
/// C, reading B from `packed` (all passes, see [`pack_all_b`]) or, when
/// `None`, in place from `b`.
#[allow(clippy::too_many_arguments)]
unsafe fn compute(
    m: usize,
    n: usize,
    k: usize,
    c: *mut f32,
    rs_c: usize,
    a: View,
    packed: Option<&[f32]>,
    b: View,
    alpha: f32,
    accumulate: bool,
    threads: usize,
) {
    let np = n.div_ceil(NR);
    let c = OutPtr(c);
    let per = m.div_ceil(threads).div_ceil(MR) * MR;
    split(threads, |t| {
        let (m0, m1) = ((t * per).min(m), ((t + 1) * per).min(m));
        let mut p0 = 0;
        while p0 < k && m0 < m1 {
            let kc = KC.min(k - p0);
            let load = accumulate || p0 > 0;
            let src = match packed {
                Some(all) => BSource::Packed(&all[p0 * np * NR..(p0 + kc) * np * NR]),
                None => BSource::InPlace(b),
            };
            rows_block(src, a, c, rs_c, m0, m1, n, p0, kc, alpha, load);
            p0 += kc;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;
    use rayon::prelude::*;

    /// A row-major (or, with `trans`, column-major) random `rows x cols`
    /// matrix with a padded leading dimension, as a view.
    struct Operand {
        data: Vec<f32>,
        rs: isize,
        cs: isize,
    }

    impl Operand {
        fn new(rng: &mut ChaCha8Rng, rows: usize, cols: usize, trans: bool) -> Self {
            let (outer, inner) = if trans { (cols, rows) } else { (rows, cols) };
            let ld = inner + 3; // padding catches stride mix-ups
            let data = (0..outer * ld).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let (rs, cs) = if trans {
                (1, ld as isize)
            } else {
                (ld as isize, 1)
            };
            Operand { data, rs, cs }
        }
        fn at(&self, i: usize, j: usize) -> f64 {
            self.data[(i as isize * self.rs + j as isize * self.cs) as usize] as f64
        }
        fn view(&self) -> View {
            View {
                ptr: self.data.as_ptr(),
                rs: self.rs,
                cs: self.cs,
            }
        }
    }

    /// Runs one product and checks every element of C (including the
    /// padding columns, which must be untouched) against an f64 reference.
    /// Tolerance: 1e-5 * (k + 1) absolute on entries of size ~sqrt(k).
    #[allow(clippy::too_many_arguments)]
    fn check(
        seed: u64,
        m: usize,
        n: usize,
        k: usize,
        ta: bool,
        tb: bool,
        acc: bool,
        threads: usize,
    ) {
        if !available() {
            return;
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let a = Operand::new(&mut rng, m, k, ta);
        let b = Operand::new(&mut rng, k, n, tb);
        let ldc = n + 2;
        let c0: Vec<f32> = (0..m * ldc).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let alpha = 0.75f32;
        let product = |threads: usize| {
            let mut c = c0.clone();
            let (av, bv) = (a.view(), b.view());
            unsafe { sgemm(m, n, k, c.as_mut_ptr(), ldc, av, bv, alpha, acc, threads) };
            c
        };
        let c = product(threads);
        // Each element's summation order is fixed, so the thread count
        // never changes a bit of the result.
        let c1 = product(1);
        assert!(
            c.iter().zip(&c1).all(|(x, y)| x.to_bits() == y.to_bits()),
            "m{m} n{n} k{k}: {threads} threads differ from 1"
        );
        // A B packed beforehand gives the same bits too.
        let mut c2 = c0.clone();
        unsafe {
            let pb = PackedB::new(b.view(), k, n, threads);
            assert_eq!(pb.shape(), (k, n));
            sgemm_packed(m, c2.as_mut_ptr(), ldc, a.view(), &pb, alpha, acc, threads);
        }
        assert!(
            c.iter().zip(&c2).all(|(x, y)| x.to_bits() == y.to_bits()),
            "m{m} n{n} k{k}: the pre-packed B differs"
        );
        let tol = 1e-5 * (k as f64 + 1.0);
        for i in 0..m {
            for j in 0..ldc {
                let got = c[i * ldc + j] as f64;
                let want = if j >= n {
                    c0[i * ldc + j] as f64
                } else {
                    let dot: f64 = (0..k).map(|t| a.at(i, t) * b.at(t, j)).sum();
                    alpha as f64 * dot + if acc { c0[i * ldc + j] as f64 } else { 0.0 }
                };
                assert!(
                    (got - want).abs() <= tol,
                    "m{m} n{n} k{k} ta{ta} tb{tb} acc{acc} t{threads}: C[{i},{j}] = {got}, want {want}"
                );
            }
        }
    }

    #[test]
    fn matches_f64_reference_on_edges_and_blocks() {
        // Sizes straddling MR, NR, MC and KC, both storage orders of both
        // operands (packed and direct A paths), overwrite and accumulate.
        let shapes = [
            (1, 1, 1),
            (5, 15, 3),
            (6, 16, 4),
            (7, 17, 9),
            (13, 64, 31),
            (MC + 5, 33, KC + 7),
            (2 * MC + 1, 70, 2 * KC + 1),
            (40, 5 * NR + 3, KC),
        ];
        let mut seed = 0;
        for &(m, n, k) in &shapes {
            for ta in [false, true] {
                for tb in [false, true] {
                    for acc in [false, true] {
                        for threads in [1, 2, 3] {
                            seed += 1;
                            check(seed, m, n, k, ta, tb, acc, threads);
                        }
                    }
                }
            }
        }
    }

    /// Products running inside a parallel loop, each itself threaded: rayon
    /// runs other products on a thread while it waits, and the packing
    /// buffers must survive that.
    #[test]
    fn nested_threaded_products_agree() {
        (0..8u64)
            .into_par_iter()
            .for_each(|s| check(100 + s, 50, 40, 300, s % 2 == 0, false, s % 3 == 0, 2));
    }
}
