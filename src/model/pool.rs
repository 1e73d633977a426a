//! A free list of activation buffers reused across block calls.
//!
//! Design rule: a step allocates the same few large buffers (qkv, gate/up,
//! scores...) for every one of its H_cycles x (L_cycles + 1) x L_layers block
//! calls. Fresh allocations of that size cost page faults and zero-filling
//! (~5 % of a step); recycling them costs neither. A buffer from [`BufPool::take`]
//! holds stale values: only ops that overwrite their whole output may use it.

use std::sync::Mutex;

/// Most buffers kept: a gradient cycle's tape (9 buffers per block call,
/// (L_cycles + 1) x L_layers calls) comes back after the backward and serves
/// the next step; more would only hold memory.
const MAX_FREE: usize = 128;

/// A thread-safe free list of `Vec<T>`.
#[derive(Debug, Default)]
pub struct BufPool<T> {
    free: Mutex<Vec<Vec<T>>>,
}

impl<T: Copy + Default> BufPool<T> {
    pub fn new() -> Self {
        BufPool {
            free: Mutex::new(Vec::new()),
        }
    }

    /// A buffer of length `n` with unspecified (stale but initialised)
    /// contents: the smallest free one that fits, else a new one.
    pub fn take(&self, n: usize) -> Vec<T> {
        let found = {
            let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
            let best = free
                .iter()
                .enumerate()
                .filter(|(_, v)| v.capacity() >= n)
                .min_by_key(|(_, v)| v.capacity())
                .map(|(i, _)| i);
            best.map(|i| free.swap_remove(i))
        };
        match found {
            Some(mut v) => {
                if v.len() >= n {
                    v.truncate(n);
                } else {
                    v.resize(n, T::default());
                }
                v
            }
            None => vec![T::default(); n],
        }
    }

    /// Returns a buffer for reuse (dropped when the pool is full).
    pub fn give(&self, v: Vec<T>) {
        if v.capacity() == 0 {
            return;
        }
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        if free.len() < MAX_FREE {
            free.push(v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reuses_the_smallest_fitting_buffer() {
        let pool = BufPool::<f32>::new();
        let a = pool.take(100);
        assert_eq!(a.len(), 100);
        let pa = a.as_ptr();
        pool.give(vec![1.0; 1000]);
        pool.give(a);
        let b = pool.take(50);
        assert_eq!(b.len(), 50);
        assert_eq!(b.as_ptr(), pa, "the 100-long buffer is the best fit");
        let c = pool.take(500);
        assert_eq!(c.len(), 500);
        assert!(c.iter().all(|&x| x == 1.0), "stale contents are kept");
        let d = pool.take(2000);
        assert_eq!(d.len(), 2000);
    }
}
