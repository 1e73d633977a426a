// The CPU emulator's runtime: launches, the fiber scheduler, barriers and warp
// collectives (see cuda_emu.h for the model and the rules).
//
// Design rule: a launch is strict where the GPU's behaviour is undefined. A
// barrier that exited threads never reach, threads of a block waiting at
// different __syncthreads, a warp collective whose lanes disagree on the
// operation or mask, a mask naming lanes that do not exist or have exited, and
// a shuffle reading a lane outside its mask all fail the launch with a message
// naming the thread, instead of passing silently or hanging. Warp-level
// matrix instructions are collectives of the whole warp from one call site,
// and their shared-memory operands must be shared memory, aligned as on the GPU.
#include <sys/mman.h>
#include <stdarg.h>
#include <stdlib.h>
#include <unistd.h>

#include <algorithm>
#include <mutex>
#include <string>
#include <vector>

// x86-64 switches fibers with its own few instructions; elsewhere, or with
// TRM_EMU_UCONTEXT defined (to test that path on x86-64), with ucontext.
#if defined(__x86_64__) && !defined(TRM_EMU_UCONTEXT)
#define TRM_EMU_OWN_SWITCH 1
#else
#define TRM_EMU_OWN_SWITCH 0
#include <ucontext.h>
#endif

// Bounds of the section holding every static __shared__ variable (the linker
// defines them; weak, so a build whose kernels declare none still links).
extern "C" unsigned char __start_trm_emu_shared[] __attribute__((weak));
extern "C" unsigned char __stop_trm_emu_shared[] __attribute__((weak));

namespace trm_emu {

uint3 g_thread_idx;
uint3 g_block_idx;
dim3 g_block_dim;
dim3 g_grid_dim;

namespace {

// H200 limits the emulator enforces.
constexpr uint32_t kMaxThreadsPerBlock = 1024;
constexpr uint32_t kMaxSharedPerBlock = 227 * 1024;  // opt-in maximum of sm_90
constexpr size_t kStackBytes = 64 * 1024;
constexpr unsigned char kPoison = 0xff;  // NaN as f32 and bf16, -1 as integers

enum class State : uint8_t { Ready, Barrier, Warp, Done };

#if TRM_EMU_OWN_SWITCH

// A fiber's saved state is its stack pointer: trm_emu_switch (below) keeps
// the rest on the fiber's own stack. glibc's swapcontext would also save and
// restore the signal mask, a system call at every barrier and warp
// collective, which made emulated kernels spend as much time in the kernel as
// in their own code.
struct Context {
    void* sp;
};

}  // namespace
}  // namespace trm_emu

extern "C" {
// Saves the callee-saved state of the System V ABI on the current stack,
// stores the stack pointer in *save, and resumes the fiber whose stack
// pointer is `load`.
__attribute__((visibility("hidden"))) void trm_emu_switch(void** save, void* load) noexcept;
// Where a new fiber's first switch returns to: calls the fiber body in r12.
__attribute__((visibility("hidden"))) void trm_emu_fiber_start() noexcept;
}

// The frame trm_emu_switch pushes, from the saved stack pointer up (64 bytes;
// the stack pointer it saves is 16-byte aligned, as the call left it 8 bytes
// past a 16-byte boundary):
//   0: MXCSR (4 bytes), 4: x87 control word (2 bytes)
//   8: r15, 16: r14, 24: r13, 32: r12, 40: rbx, 48: rbp, 56: return address
asm(R"(
    .pushsection .text
    .p2align 4
    .globl trm_emu_switch
    .hidden trm_emu_switch
    .type trm_emu_switch, @function
trm_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size trm_emu_switch, .-trm_emu_switch

    .p2align 4
    .globl trm_emu_fiber_start
    .hidden trm_emu_fiber_start
    .type trm_emu_fiber_start, @function
trm_emu_fiber_start:
    .cfi_startproc
    .cfi_undefined rip
    call *%r12
    ud2
    .cfi_endproc
    .size trm_emu_fiber_start, .-trm_emu_fiber_start
    .popsection
)");

namespace trm_emu {
namespace {

void switch_context(Context& save, const Context& load) { trm_emu_switch(&save.sp, load.sp); }

// The floating-point controls of the scheduler, which new fibers inherit (as
// getcontext would give them).
struct FpControls {
    uint32_t mxcsr;
    uint16_t fpu_cw;
};
FpControls fp_controls() {
    FpControls fp;
    asm volatile("stmxcsr %0\n\tfnstcw %1" : "=m"(fp.mxcsr), "=m"(fp.fpu_cw));
    return fp;
}

// Lays out at the top of the stack [stack, stack + bytes) the frame
// trm_emu_switch would have saved, so that the first switch to `c` returns
// into trm_emu_fiber_start with r12 = entry and rbp = 0 (ends frame-pointer
// backtraces). Its stack pointer is then 16 bytes below the top, so `entry`
// is called with the alignment the ABI requires. No system call: blocks set
// up every thread anew.
void init_context(Context& c, unsigned char* stack, size_t bytes, void (*entry)(), FpControls fp) {
    uint64_t* const top = reinterpret_cast<uint64_t*>(stack + bytes);  // page-aligned
    uint64_t* const f = top - 10;
    f[0] = fp.mxcsr | (uint64_t)fp.fpu_cw << 32;
    f[1] = f[2] = f[3] = 0;                                // r15, r14, r13
    f[4] = (uint64_t)(uintptr_t)entry;                     // r12
    f[5] = f[6] = 0;                                       // rbx, rbp
    f[7] = (uint64_t)(uintptr_t)&trm_emu_fiber_start;      // return address
    f[8] = f[9] = 0;                                       // the trampoline's stack
    c.sp = f;
}

#else  // ucontext: portable, but a system call per switch

struct Context {
    ucontext_t uc;
};

void switch_context(Context& save, const Context& load) { swapcontext(&save.uc, &load.uc); }

struct FpControls {};
FpControls fp_controls() { return FpControls{}; }

void init_context(Context& c, unsigned char* stack, size_t bytes, void (*entry)(), FpControls) {
    getcontext(&c.uc);
    c.uc.uc_stack.ss_sp = stack;
    c.uc.uc_stack.ss_size = bytes;
    c.uc.uc_link = nullptr;
    makecontext(&c.uc, entry, 0);
}

#endif

// One cp.async not yet completed: its group is 0 until cp_async_commit.
struct PendingCopy {
    void* dst;
    const void* src;  // null: zero fill
    int bytes;
    uint32_t group;
};

struct Thread {
    Context ctx;
    State state;
    uint3 idx;
    // The warp collective this thread waits in.
    int op;
    unsigned mask;
    int width;
    int arg;
    uint64_t value;  // matrix instructions: the address of the lane's record
    uint64_t result;
    const char* what;
    const char* site_file;  // matrix instructions: the call site; else null
    int site_line;
    // This thread's cp.async copies in flight, and the groups it committed.
    std::vector<PendingCopy> copies;
    uint32_t committed;
};

// A lane's operands and results in a matrix-instruction collective, on the
// lane's own fiber stack while it waits.
struct MmaRecord {
    uint32_t a[4];
    uint32_t b[2];
    float c[4];
    float d[4];
};
struct LdmatrixRecord {
    const unsigned char* row;
    uint32_t r[4];
};

struct Launch {
    const char* kernel;
    KernelBody body;
    const void* args;
    uint32_t nthreads;
    bool reverse;
    uint32_t skip_barrier_line;
    std::vector<Thread> threads;
    // Per warp of the block: the lanes in State::Warp and in State::Done, so
    // that a collective need not look at every lane (bit l: lane l).
    std::vector<uint32_t> warp_waiting;
    std::vector<uint32_t> warp_done;
    Context scheduler;
    uint32_t current;
    unsigned char* dynamic_shared;
    size_t dynamic_bytes;
    // The barrier being filled.
    uint32_t at_barrier;
    const char* barrier_file;
    int barrier_line;
    int barrier_op;
    uint32_t barrier_true;
    int barrier_result;
    // The first error; the launch stops at it.
    int error_code;
    std::string error;
};

std::mutex g_mutex;             // one emulated launch at a time
Launch* g_launch = nullptr;     // the launch in progress (under g_mutex)
std::vector<void*> g_stacks;    // fiber stacks, reused across launches (under g_mutex)
size_t g_page = 0;

std::string format(const char* fmt, va_list ap) {
    char buf[1024];
    vsnprintf(buf, sizeof buf, fmt, ap);
    return buf;
}

std::string thread_name(const Launch& L, uint32_t linear) {
    const Thread& t = L.threads[linear];
    char buf[160];
    snprintf(buf, sizeof buf, "block (%u,%u,%u) thread (%u,%u,%u) [warp %u lane %u]", g_block_idx.x, g_block_idx.y,
             g_block_idx.z, t.idx.x, t.idx.y, t.idx.z, linear / 32, linear % 32);
    return buf;
}

// Records the launch's first error and returns to the scheduler for good.
[[noreturn]] __attribute__((format(printf, 2, 3))) void fail(int code, const char* fmt, ...) {
    Launch& L = *g_launch;
    if (L.error_code == TRM_EMU_OK) {
        va_list ap;
        va_start(ap, fmt);
        L.error = format(fmt, ap);
        va_end(ap);
        L.error_code = code;
    }
    switch_context(L.threads[L.current].ctx, L.scheduler);
    abort();  // a failed thread is never resumed
}

void yield() {
    Launch& L = *g_launch;
    switch_context(L.threads[L.current].ctx, L.scheduler);
}

void fiber_main() {
    Launch& L = *g_launch;
    L.body(L.args);
    L.threads[L.current].state = State::Done;
    L.warp_done[L.current / 32] |= 1u << L.current % 32;
    switch_context(L.threads[L.current].ctx, L.scheduler);
    abort();  // a finished thread is never resumed
}

const char* barrier_name(int op) {
    switch (op) {
        case kBarrierCount: return "__syncthreads_count";
        case kBarrierAnd: return "__syncthreads_and";
        case kBarrierOr: return "__syncthreads_or";
        default: return "__syncthreads";
    }
}

// Fiber stacks with a guard page below each, so an overflow faults.
bool ensure_stacks(uint32_t n) {
    if (g_page == 0) g_page = (size_t)sysconf(_SC_PAGESIZE);
    while (g_stacks.size() < n) {
        void* p = mmap(nullptr, kStackBytes + g_page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                       -1, 0);
        if (p == MAP_FAILED) return false;
        if (mprotect(p, g_page, PROT_NONE) != 0) {
            munmap(p, kStackBytes + g_page);
            return false;
        }
        g_stacks.push_back(p);
    }
    return true;
}

// The shuffle source lane of `lane` as PTX defines shfl.sync (modes idx, up,
// down, bfly with the c operand CUDA's intrinsics pass for `width`); returns
// `lane` itself when the source is outside the lane's segment.
int shuffle_source(int op, int lane, int b, int width) {
    const int seg = (32 - width) & 0x1f;  // c[12:8]
    const int clamp = op == kShflUp ? 0 : 0x1f;
    const int max_lane = (lane & seg) | (clamp & ~seg);
    const int min_lane = lane & seg;
    int j = lane;
    bool ok = false;
    switch (op) {
        case kShflUp: j = lane - b; ok = j >= max_lane; break;
        case kShflDown: j = lane + b; ok = j <= max_lane; break;
        case kShflXor: j = lane ^ (b & 0x1f); ok = j <= max_lane; break;
        default: j = min_lane | (b & 0x1f & ~seg); ok = j <= max_lane; break;
    }
    return ok ? j : lane;
}

// Whether [p, p + bytes) lies in the block's shared memory (static or dynamic).
bool is_shared(const void* p, size_t bytes) {
    const Launch& L = *g_launch;
    const uintptr_t a = (uintptr_t)p;
    const auto inside = [&](const unsigned char* lo, const unsigned char* hi) {
        return lo != nullptr && a >= (uintptr_t)lo && a + bytes <= (uintptr_t)hi;
    };
    return inside(__start_trm_emu_shared, __stop_trm_emu_shared) ||
           inside(L.dynamic_shared, L.dynamic_shared + L.dynamic_bytes);
}

bool is_ldmatrix(int op) { return op >= kLdmatrixX1 && op <= kLdmatrixX4Trans; }

// Matrices of an ldmatrix variant (1, 2 or 4).
int ldmatrix_count(int op) {
    switch (op) {
        case kLdmatrixX1:
        case kLdmatrixX1Trans: return 1;
        case kLdmatrixX2:
        case kLdmatrixX2Trans: return 2;
        default: return 4;
    }
}

const char* ldmatrix_name(int op) {
    switch (op) {
        case kLdmatrixX1: return "ldmatrix.x1";
        case kLdmatrixX2: return "ldmatrix.x2";
        case kLdmatrixX4: return "ldmatrix.x4";
        case kLdmatrixX1Trans: return "ldmatrix.x1.trans";
        case kLdmatrixX2Trans: return "ldmatrix.x2.trans";
        default: return "ldmatrix.x4.trans";
    }
}

double bf16_value(uint32_t bits) { return (double)from_bits<float>((bits & 0xffffu) << 16); }

// D = A B + C for the whole warp, with the m16n8k16 fragment layouts of the
// PTX ISA (g = lane / 4, t = lane % 4; element i of a register pair is bits
// 16 * (i % 2) of register i / 2):
//   A 16x16: a_i at row g + 8 * (i / 2 % 2), column 2t + i % 2 + 8 * (i / 4)
//   B 16x8:  b_i at row 2t + i % 2 + 8 * (i / 2), column g
//   C, D 16x8: c_i at row g + 8 * (i / 2), column 2t + i % 2
// The bf16 products are exact in double; each element is the exact sum
// rounded once to f32. Tensor cores round their internal sums their own way,
// so GPU and emulator agree to a tolerance, not bit for bit.
void complete_mma(Launch& L, uint32_t base) {
    MmaRecord* rec[32];
    double a[16][16], b[16][8], c[16][8];
    for (int l = 0; l < 32; l++) {
        rec[l] = reinterpret_cast<MmaRecord*>(L.threads[base + l].value);
        const int g = l / 4, t = l % 4;
        for (int i = 0; i < 8; i++)
            a[g + 8 * (i / 2 % 2)][2 * t + i % 2 + 8 * (i / 4)] = bf16_value(rec[l]->a[i / 2] >> 16 * (i % 2));
        for (int i = 0; i < 4; i++) {
            b[2 * t + i % 2 + 8 * (i / 2)][g] = bf16_value(rec[l]->b[i / 2] >> 16 * (i % 2));
            c[g + 8 * (i / 2)][2 * t + i % 2] = rec[l]->c[i];
        }
    }
    // c += a b, columns innermost: eight independent sums instead of one
    // chain of dependent adds, each still summed in the order of k.
    for (int row = 0; row < 16; row++)
        for (int k = 0; k < 16; k++)
            for (int col = 0; col < 8; col++) c[row][col] += a[row][k] * b[k][col];
    for (int l = 0; l < 32; l++) {
        const int g = l / 4, t = l % 4;
        for (int i = 0; i < 4; i++) rec[l]->d[i] = (float)c[g + 8 * (i / 2)][2 * t + i % 2];
    }
}

// ldmatrix.m8n8.b16: lanes 8j..8j+7 give the row addresses of matrix j; lane
// l receives in register j the elements (l / 4, 2 (l % 4)) and (l / 4,
// 2 (l % 4) + 1) of matrix j, low half first; .trans gives the same of the
// transposed matrix.
void complete_ldmatrix(Launch& L, uint32_t base, int op) {
    const int n = ldmatrix_count(op);
    const bool trans = op >= kLdmatrixX1Trans;
    LdmatrixRecord* rec[32];
    for (int l = 0; l < 32; l++) rec[l] = reinterpret_cast<LdmatrixRecord*>(L.threads[base + l].value);
    for (int l = 0; l < 8 * n; l++) {
        const void* row = rec[l]->row;
        if ((uintptr_t)row % 16 != 0)
            fail(TRM_EMU_ERR_ADDRESS, "%s: %s gives the row address %p, which is not 16-byte aligned", ldmatrix_name(op),
                 thread_name(L, base + l).c_str(), row);
        if (!is_shared(row, 16))
            fail(TRM_EMU_ERR_ADDRESS, "%s: %s gives the row address %p, which is not in shared memory",
                 ldmatrix_name(op), thread_name(L, base + l).c_str(), row);
    }
    for (int l = 0; l < 32; l++) {
        const int q = l % 4, r = l / 4;
        for (int j = 0; j < n; j++) {
            uint16_t lo, hi;
            if (trans) {
                memcpy(&lo, rec[8 * j + 2 * q]->row + 2 * r, 2);
                memcpy(&hi, rec[8 * j + 2 * q + 1]->row + 2 * r, 2);
            } else {
                memcpy(&lo, rec[8 * j + r]->row + 4 * q, 2);
                memcpy(&hi, rec[8 * j + r]->row + 4 * q + 2, 2);
            }
            rec[l]->r[j] = (uint32_t)lo | (uint32_t)hi << 16;
        }
    }
}

// All lanes of `mask` in warp `base/32` have called the collective: compute
// every lane's result and wake them.
void complete_collective(Launch& L, uint32_t base, unsigned mask, int op) {
    if (op == kMmaM16n8k16Bf16) complete_mma(L, base);
    if (is_ldmatrix(op)) complete_ldmatrix(L, base, op);
    uint64_t common = 0;
    switch (op) {
        case kBallot:
        case kAny:
        case kAll: {
            unsigned votes = 0;
            for (int l = 0; l < 32; l++)
                if ((mask >> l & 1u) && L.threads[base + l].value != 0) votes |= 1u << l;
            common = op == kBallot ? votes : op == kAny ? votes != 0 : votes == mask;
            break;
        }
        case kReduceAdd:
        case kReduceMinU:
        case kReduceMaxU:
        case kReduceMinI:
        case kReduceMaxI: {
            bool first = true;
            uint32_t acc = 0;
            for (int l = 0; l < 32; l++) {
                if (!(mask >> l & 1u)) continue;
                const uint32_t v = (uint32_t)L.threads[base + l].value;
                if (first) {
                    acc = v;
                    first = false;
                } else if (op == kReduceAdd) {
                    acc += v;
                } else if (op == kReduceMinU) {
                    acc = v < acc ? v : acc;
                } else if (op == kReduceMaxU) {
                    acc = v > acc ? v : acc;
                } else if (op == kReduceMinI) {
                    acc = (int32_t)v < (int32_t)acc ? v : acc;
                } else {
                    acc = (int32_t)v > (int32_t)acc ? v : acc;
                }
            }
            common = acc;
            break;
        }
        default: break;
    }
    for (int l = 0; l < 32; l++) {
        if (!(mask >> l & 1u)) continue;
        Thread& t = L.threads[base + l];
        if (op == kShflIdx || op == kShflUp || op == kShflDown || op == kShflXor) {
            const int j = shuffle_source(op, l, t.arg, t.width);
            if (!(mask >> j & 1u))
                fail(TRM_EMU_ERR_WARP, "%s: %s reads lane %d, which is not in the mask 0x%08x", t.what,
                     thread_name(L, base + l).c_str(), j, mask);
            t.result = L.threads[base + j].value;
        } else {
            t.result = common;
        }
        t.state = State::Ready;
    }
    L.warp_waiting[base / 32] &= ~mask;
}

// Explains why no thread of the block can run.
std::string describe_stall(const Launch& L) {
    uint32_t done = 0, barrier = 0, warp = 0;
    int first_done = -1, first_warp = -1;
    for (uint32_t i = 0; i < L.nthreads; i++) {
        switch (L.threads[i].state) {
            case State::Done: done++; if (first_done < 0) first_done = (int)i; break;
            case State::Barrier: barrier++; break;
            case State::Warp: warp++; if (first_warp < 0) first_warp = (int)i; break;
            default: break;
        }
    }
    char buf[512];
    std::string s;
    if (barrier > 0) {
        snprintf(buf, sizeof buf, "%s at %s:%d is reached by %u of %u threads", barrier_name(L.barrier_op),
                 L.barrier_file, L.barrier_line, barrier, L.nthreads);
        s += buf;
    }
    if (warp > 0) {
        const Thread& t = L.threads[first_warp];
        const uint32_t base = (uint32_t)first_warp / 32 * 32;
        unsigned missing = 0;
        for (int l = 0; l < 32; l++)
            if ((t.mask >> l & 1u) && L.threads[base + l].state != State::Warp) missing |= 1u << l;
        snprintf(buf, sizeof buf, "%s%u threads wait in warp collectives; warp %u waits in %s (mask 0x%08x) for lanes 0x%08x",
                 s.empty() ? "" : "; ", warp, base / 32, t.what, t.mask, missing);
        s += buf;
    }
    if (done > 0) {
        snprintf(buf, sizeof buf, "; %u threads have returned (first: thread %d)", done, first_done);
        s += buf;
    }
    return s;
}

// Whether two __FILE__ strings name the same file: lanes at one call site
// pass the same pointer, so the strcmp is rarely needed.
bool same_file(const char* a, const char* b) { return a == b || strcmp(a, b) == 0; }

// Runs every thread of the current block to completion.
void run_block(Launch& L) {
    if (+__start_trm_emu_shared != nullptr && +__stop_trm_emu_shared > +__start_trm_emu_shared)
        memset(__start_trm_emu_shared, kPoison, (size_t)(__stop_trm_emu_shared - __start_trm_emu_shared));
    if (L.dynamic_bytes > 0) memset(L.dynamic_shared, kPoison, L.dynamic_bytes);
    L.at_barrier = 0;
    std::fill(L.warp_waiting.begin(), L.warp_waiting.end(), 0u);
    std::fill(L.warp_done.begin(), L.warp_done.end(), 0u);
    const uint32_t bx = g_block_dim.x, by = g_block_dim.y;
    const FpControls fp = fp_controls();
    for (uint32_t i = 0; i < L.nthreads; i++) {
        Thread& t = L.threads[i];
        t.state = State::Ready;
        t.idx = uint3{i % bx, i / bx % by, i / (bx * by)};
        t.op = 0;
        t.mask = 0;
        t.site_file = nullptr;
        t.copies.clear();
        t.committed = 0;
        init_context(t.ctx, (unsigned char*)g_stacks[i] + g_page, kStackBytes, fiber_main, fp);
    }
    for (;;) {
        bool ran = false;
        uint32_t done = 0;
        for (uint32_t k = 0; k < L.nthreads; k++) {
            const uint32_t i = L.reverse ? L.nthreads - 1 - k : k;
            Thread& t = L.threads[i];
            if (t.state == State::Done) done++;
            if (t.state != State::Ready) continue;
            L.current = i;
            g_thread_idx = t.idx;
            switch_context(L.scheduler, t.ctx);
            ran = true;
            if (L.error_code != TRM_EMU_OK) return;
        }
        if (!ran) {
            if (done == L.nthreads) return;
            L.error_code = TRM_EMU_ERR_DEADLOCK;
            L.error = "deadlock in block (" + std::to_string(g_block_idx.x) + "," + std::to_string(g_block_idx.y) +
                      "," + std::to_string(g_block_idx.z) + "): " + describe_stall(L);
            return;
        }
    }
}

}  // namespace

int barrier(int op, int predicate, const char* file, int line) {
    Launch& L = *g_launch;
    // A test's planted missing barrier: the thread runs on as if the line
    // were not there.
    if (L.skip_barrier_line != 0 && line == (int)L.skip_barrier_line) return predicate;
    Thread& me = L.threads[L.current];
    if (L.at_barrier == 0) {
        L.barrier_file = file;
        L.barrier_line = line;
        L.barrier_op = op;
        L.barrier_true = 0;
    } else if (L.barrier_line != line || !same_file(L.barrier_file, file) || L.barrier_op != op) {
        fail(TRM_EMU_ERR_DEADLOCK,
             "divergent barriers: %s reaches %s at %s:%d while %u threads wait at %s at %s:%d",
             thread_name(L, L.current).c_str(), barrier_name(op), file, line, L.at_barrier,
             barrier_name(L.barrier_op), L.barrier_file, L.barrier_line);
    }
    me.state = State::Barrier;
    L.at_barrier++;
    L.barrier_true += predicate != 0;
    if (L.at_barrier == L.nthreads) {
        switch (op) {
            case kBarrierCount: L.barrier_result = (int)L.barrier_true; break;
            case kBarrierAnd: L.barrier_result = L.barrier_true == L.nthreads; break;
            case kBarrierOr: L.barrier_result = L.barrier_true != 0; break;
            default: L.barrier_result = 0; break;
        }
        for (Thread& t : L.threads) t.state = State::Ready;
        L.at_barrier = 0;
    } else {
        yield();
    }
    // Every thread reads the result before any can complete the next barrier.
    return L.barrier_result;
}

namespace {

bool same_site(const Thread& t, const char* file, int line) {
    if (t.site_file == nullptr || file == nullptr) return t.site_file == file;
    return t.site_line == line && same_file(t.site_file, file);
}

std::string site_text(const char* file, int line) {
    return file == nullptr ? std::string() : " at " + std::string(file) + ":" + std::to_string(line);
}

// Whether lane `lane`'s collective `t` passes full_check (below): the waiting
// lanes of its mask are in the same collective, no waiting lane outside it
// names it, and no lane of it has returned. Waiting lanes that name one
// another were checked against each other as they arrived, so one waiting
// lane of the mask stands for all of them, instead of every lane checking
// every lane (most of an mma's cost). False sends the caller to full_check,
// which then fails the launch with the message naming the lane.
bool agrees_fast(const Launch& L, uint32_t base, int lane, const Thread& t) {
    const uint32_t warp = base / 32;
    const unsigned others = L.warp_waiting[warp] & ~(1u << lane);
    if (L.warp_done[warp] & t.mask) return false;
    for (unsigned rest = others & ~t.mask; rest != 0; rest &= rest - 1)
        if (L.threads[base + (uint32_t)__builtin_ctz(rest)].mask >> lane & 1u) return false;
    const unsigned named = others & t.mask;
    if (named == 0) return true;
    const Thread& o = L.threads[base + (uint32_t)__builtin_ctz(named)];
    return o.op == t.op && o.mask == t.mask && o.width == t.width && same_site(o, t.site_file, t.site_line);
}

// The check agrees_fast stands for, lane by lane, failing the launch at the
// first lane that disagrees.
void full_check(const Launch& L, uint32_t me, uint32_t lanes) {
    const Thread& t = L.threads[me];
    const uint32_t base = me / 32 * 32;
    const int lane = (int)(me % 32);
    const int op = t.op, width = t.width, line = t.site_line;
    const unsigned mask = t.mask;
    const char *name = t.what, *file = t.site_file;
    for (int l = 0; l < (int)lanes; l++) {
        if (l == lane) continue;
        const Thread& o = L.threads[base + l];
        const bool mine = mask >> l & 1u;
        // A waiting lane that names me, or that I name, must be in the same collective.
        if (o.state == State::Warp && (mine || (o.mask >> lane & 1u)) &&
            (o.op != op || o.mask != mask || o.width != width || !same_site(o, file, line)))
            fail(TRM_EMU_ERR_WARP,
                 "mismatched warp collectives: %s calls %s (mask 0x%08x, width %d)%s while lane %d waits in %s "
                 "(mask 0x%08x, width %d)%s",
                 thread_name(L, me).c_str(), name, mask, width, site_text(file, line).c_str(), l, o.what, o.mask,
                 o.width, site_text(o.site_file, o.site_line).c_str());
        if (mine && o.state == State::Done)
            fail(TRM_EMU_ERR_DEADLOCK, "%s: %s uses mask 0x%08x but lane %d has returned", name,
                 thread_name(L, me).c_str(), mask, l);
    }
}

// A warp collective; `file`/`line` (null for shuffles and votes, which may
// meet across call sites) must agree between the lanes when given.
uint64_t collective(int op, unsigned mask, uint64_t value, int arg, int width, const char* name, const char* file,
                    int line) {
    Launch& L = *g_launch;
    const uint32_t me = L.current;
    const uint32_t base = me / 32 * 32;
    const int lane = (int)(me % 32);
    const uint32_t lanes = L.nthreads - base < 32 ? L.nthreads - base : 32;
    const unsigned exist = lanes == 32 ? 0xffffffffu : (1u << lanes) - 1u;
    if (!(mask >> lane & 1u))
        fail(TRM_EMU_ERR_WARP, "%s: %s calls it with mask 0x%08x, which does not name the calling lane", name,
             thread_name(L, me).c_str(), mask);
    if (mask & ~exist)
        fail(TRM_EMU_ERR_WARP, "%s: mask 0x%08x names lanes that do not exist (warp %u has %u threads)", name, mask,
             base / 32, lanes);
    if (width < 1 || width > 32 || (width & (width - 1)) != 0)
        fail(TRM_EMU_ERR_WARP, "%s: width %d is not a power of two in 1..32", name, width);
    Thread& t = L.threads[me];
    t.op = op;
    t.mask = mask;
    t.width = width;
    t.arg = arg;
    t.value = value;
    t.what = name;
    t.site_file = file;
    t.site_line = line;
    t.state = State::Warp;
    if (!agrees_fast(L, base, lane, t)) full_check(L, me, lanes);
    unsigned& waiting = L.warp_waiting[base / 32];
    waiting |= 1u << lane;
    if ((waiting & mask) == mask) {
        complete_collective(L, base, mask, op);
    } else {
        yield();
    }
    return t.result;
}

}  // namespace

uint64_t warp_collective(int op, unsigned mask, uint64_t value, int arg, int width, const char* name) {
    return collective(op, mask, value, arg, width, name, nullptr, 0);
}

void mma_m16n8k16_bf16(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4], const char* file,
                       int line) {
    MmaRecord rec;
    memcpy(rec.a, a, sizeof rec.a);
    memcpy(rec.b, b, sizeof rec.b);
    memcpy(rec.c, c, sizeof rec.c);
    (void)collective(kMmaM16n8k16Bf16, 0xffffffffu, (uint64_t)(uintptr_t)&rec, 0, 32,
                     "mma.sync.m16n8k16.row.col.f32.bf16.bf16.f32", file, line);
    memcpy(d, rec.d, sizeof rec.d);
}

void ldmatrix(int op, uint32_t* regs, const void* row, const char* file, int line) {
    LdmatrixRecord rec{static_cast<const unsigned char*>(row), {0, 0, 0, 0}};
    (void)collective(op, 0xffffffffu, (uint64_t)(uintptr_t)&rec, 0, 32, ldmatrix_name(op), file, line);
    memcpy(regs, rec.r, sizeof(uint32_t) * (size_t)ldmatrix_count(op));
}

void cp_async(void* dst, const void* src, int bytes, bool valid, const char* file, int line) {
    Launch& L = *g_launch;
    const auto bad = [&](const char* which, const void* p, const char* why) {
        fail(TRM_EMU_ERR_ADDRESS, "cp.async of %d bytes at %s:%d in %s: the %s %p is %s", bytes, file, line,
             thread_name(L, L.current).c_str(), which, p, why);
    };
    if ((uintptr_t)dst % (uintptr_t)bytes != 0) bad("destination", dst, "misaligned");
    if (!is_shared(dst, (size_t)bytes)) bad("destination", dst, "not in shared memory");
    if (valid && (uintptr_t)src % (uintptr_t)bytes != 0) bad("source", src, "misaligned");
    if (valid && is_shared(src, 1)) bad("source", src, "in shared memory, not global");
    L.threads[L.current].copies.push_back(PendingCopy{dst, valid ? src : nullptr, bytes, 0});
}

void cp_async_commit() {
    Thread& t = g_launch->threads[g_launch->current];
    t.committed++;
    for (PendingCopy& c : t.copies)
        if (c.group == 0) c.group = t.committed;
}

void cp_async_wait(int pending) {
    Thread& t = g_launch->threads[g_launch->current];
    size_t kept = 0;
    for (const PendingCopy& c : t.copies) {
        if (c.group != 0 && c.group + (uint32_t)pending <= t.committed) {
            if (c.src != nullptr) {
                memcpy(c.dst, c.src, (size_t)c.bytes);
            } else {
                memset(c.dst, 0, (size_t)c.bytes);
            }
        } else {
            t.copies[kept++] = c;
        }
    }
    t.copies.resize(kept);
}

void trap(const char* file, int line) {
    fail(TRM_EMU_ERR_TRAP, "__trap() at %s:%d in %s", file, line, thread_name(*g_launch, g_launch->current).c_str());
}

unsigned char* dynamic_shared_base() { return g_launch->dynamic_shared; }

int launch(const char* kernel, KernelBody body, const void* args, const TrmEmuLaunch* cfg, uint32_t max_threads,
           char* err, size_t err_len) {
    auto report = [&](int code, const std::string& message) {
        if (err != nullptr && err_len > 0) snprintf(err, err_len, "%s", message.c_str());
        return code;
    };
    const uint64_t nthreads = (uint64_t)cfg->block_x * cfg->block_y * cfg->block_z;
    const uint64_t nblocks = (uint64_t)cfg->grid_x * cfg->grid_y * cfg->grid_z;
    char buf[256];
    if (nthreads == 0 || nthreads > kMaxThreadsPerBlock || cfg->block_z > 64) {
        snprintf(buf, sizeof buf, "block (%u,%u,%u): needs 1..%u threads and z <= 64", cfg->block_x, cfg->block_y,
                 cfg->block_z, kMaxThreadsPerBlock);
        return report(TRM_EMU_ERR_CONFIG, buf);
    }
    if (max_threads > 0 && nthreads > max_threads) {
        snprintf(buf, sizeof buf, "block of %llu threads, more than the kernel's __launch_bounds__(%u)",
                 (unsigned long long)nthreads, max_threads);
        return report(TRM_EMU_ERR_CONFIG, buf);
    }
    if (nblocks == 0 || cfg->grid_x > 0x7fffffffu || cfg->grid_y > 65535 || cfg->grid_z > 65535) {
        snprintf(buf, sizeof buf, "grid (%u,%u,%u): needs x in 1..2^31-1, y and z in 1..65535", cfg->grid_x,
                 cfg->grid_y, cfg->grid_z);
        return report(TRM_EMU_ERR_CONFIG, buf);
    }
    // As on the GPU, the limit is on static plus dynamic shared memory.
    if ((uint64_t)cfg->shared_bytes + cfg->static_shared_bytes > kMaxSharedPerBlock) {
        snprintf(buf, sizeof buf,
                 "%u bytes of dynamic plus %u of static shared memory, more than the %u of an sm_90 block",
                 cfg->shared_bytes, cfg->static_shared_bytes, kMaxSharedPerBlock);
        return report(TRM_EMU_ERR_CONFIG, buf);
    }

    std::lock_guard<std::mutex> lock(g_mutex);
    if (!ensure_stacks((uint32_t)nthreads)) return report(TRM_EMU_ERR_HOST, "cannot map fiber stacks");
    Launch L{};
    L.kernel = kernel;
    L.body = body;
    L.args = args;
    L.nthreads = (uint32_t)nthreads;
    L.reverse = (cfg->flags & TRM_EMU_REVERSE_ORDER) != 0;
    L.skip_barrier_line = cfg->skip_barrier_line;
    L.threads.resize(nthreads);
    L.warp_waiting.resize((nthreads + 31) / 32);
    L.warp_done.resize((nthreads + 31) / 32);
    L.dynamic_bytes = cfg->shared_bytes;
    L.dynamic_shared = (unsigned char*)aligned_alloc(128, (L.dynamic_bytes + 127) / 128 * 128 + 128);
    if (L.dynamic_shared == nullptr) return report(TRM_EMU_ERR_HOST, "cannot allocate dynamic shared memory");
    L.error_code = TRM_EMU_OK;
    g_launch = &L;
    g_grid_dim = dim3(cfg->grid_x, cfg->grid_y, cfg->grid_z);
    g_block_dim = dim3(cfg->block_x, cfg->block_y, cfg->block_z);
    for (uint64_t k = 0; k < nblocks && L.error_code == TRM_EMU_OK; k++) {
        const uint64_t b = L.reverse ? nblocks - 1 - k : k;
        g_block_idx = uint3{(unsigned)(b % cfg->grid_x), (unsigned)(b / cfg->grid_x % cfg->grid_y),
                            (unsigned)(b / ((uint64_t)cfg->grid_x * cfg->grid_y))};
        run_block(L);
    }
    g_launch = nullptr;
    free(L.dynamic_shared);
    if (L.error_code != TRM_EMU_OK) return report(L.error_code, L.error);
    return TRM_EMU_OK;
}

}  // namespace trm_emu
