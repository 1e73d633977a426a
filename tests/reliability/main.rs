//! Reliability tests: bounded inputs, non-UTF-8 paths, and fuzzing of every
//! reader of outside bytes under a counting allocator.

mod alloc;
mod bounded_grids;
mod fixture;
mod fuzz;
mod limits;
mod mutate;
mod non_utf8;

#[global_allocator]
static COUNTING: alloc::Counting = alloc::Counting;
