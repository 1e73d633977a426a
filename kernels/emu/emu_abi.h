// The launch request Rust passes to an emulated kernel's entry point
// (`trm_emu_entry_<kernel>`). Same restricted syntax as kernels/abi.h: build.rs
// generates the Rust mirror from this file.
#pragma once

#include <stdint.h>

// Flags of TrmEmuLaunch.flags.
#define TRM_EMU_REVERSE_ORDER 1u

// Grid and block of one launch, its shared memory, and scheduling flags.
struct TrmEmuLaunch {
    uint32_t grid_x;
    uint32_t grid_y;
    uint32_t grid_z;
    uint32_t block_x;
    uint32_t block_y;
    uint32_t block_z;
    uint32_t shared_bytes;         // dynamic shared memory per block
    uint32_t static_shared_bytes;  // the kernel's static shared memory (ptxas's count on the GPU)
    uint32_t flags;                // TRM_EMU_REVERSE_ORDER: run blocks and threads last to first
    uint32_t skip_barrier_line;    // tests: __syncthreads at this source line do nothing (0: none)
};
