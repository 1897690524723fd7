// The CPU emulation's runtime: kernel registry, launch, and the per-block fiber scheduler that
// gives `__syncthreads()` and warp shuffles their CUDA meaning. See cuda_emu.h for the model.
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sched.h>
#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#include <chrono>
#include <cmath>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "registry.h"

namespace emu {

// ---- execution contexts (fibers) ----
//
// On x86-64 a context switch saves the callee-saved registers on the current stack, swaps the
// stack pointer and restores the other context's registers: no system call (ucontext's
// swapcontext saves the signal mask with one, which made barrier-heavy kernels 50x slower).
// Elsewhere ucontext is used.
#if defined(__x86_64__)
extern "C" void medssl_emu_switch(void** save_sp, void* load_sp);
asm(R"(
    .text
    .globl medssl_emu_switch
    .type medssl_emu_switch, @function
medssl_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size medssl_emu_switch, .-medssl_emu_switch
)");

struct Ctx {
    void* sp = nullptr;
};

// Prepares `c` to start `entry` (which must never return) on the given stack.
static void ctx_init(Ctx& c, char* stack, size_t size, void (*entry)()) {
    uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + size) & ~static_cast<uintptr_t>(15);
    void** sp = reinterpret_cast<void**>(top);
    *--sp = nullptr;                          // return address of `entry` (never used)
    *--sp = reinterpret_cast<void*>(entry);   // popped by `ret`: entry starts with rsp = 8 mod 16
    for (int i = 0; i < 6; ++i) *--sp = nullptr;  // rbp rbx r12 r13 r14 r15
    c.sp = sp;
}

static inline void ctx_switch(Ctx& from, Ctx& to) { medssl_emu_switch(&from.sp, to.sp); }
#else
struct Ctx {
    ucontext_t uc;
};

static void ctx_init(Ctx& c, char* stack, size_t size, void (*entry)()) {
    getcontext(&c.uc);
    c.uc.uc_stack.ss_sp = stack;
    c.uc.uc_stack.ss_size = size;
    c.uc.uc_link = nullptr;
    makecontext(&c.uc, entry, 0);
}

static inline void ctx_switch(Ctx& from, Ctx& to) { swapcontext(&from.uc, &to.uc); }
#endif

thread_local Thread* cur_thread = nullptr;
thread_local uint3 cur_block_idx;
thread_local uint3 cur_block_dim;
thread_local uint3 cur_grid_dim;

namespace {

struct Kernel {
    void* fn;
    Invoke invoke;
    Check check;
    bool direct;
};

std::mutex& registry_lock() {
    static std::mutex m;
    return m;
}

std::map<std::string, Kernel>& registry() {
    static std::map<std::string, Kernel> r;
    return r;
}

// A failure inside a kernel (barrier misuse); carries the message to the launch.
struct Fault : std::runtime_error {
    using std::runtime_error::runtime_error;
};

const size_t kStack = 64 * 1024;

struct Fiber : Thread {
    Ctx ctx;
    int lin = 0;      // linear thread index in the block
    bool started = false;
    bool done = false;
    int waiting = 0;  // 0 runnable, 1 block barrier, 2 warp barrier
    unsigned wait_gen = 0;
    int shfl_parity = 0;
};

struct Barrier {
    int live = 0;
    int arrived = 0;
    unsigned gen = 0;
    void maybe_release() {
        if (arrived > 0 && arrived == live) {
            arrived = 0;
            ++gen;
        }
    }
};

struct Warp : Barrier {
    uint32_t slots[2][32];
};

// The block being run by fibers on this OS thread (null in direct mode).
struct Block {
    Barrier bar;
    std::vector<Warp> warps;
    Fiber* fibers = nullptr;
    int n = 0;
    Ctx sched;
    std::string error;
    const Kernel* k = nullptr;
    void* const* args = nullptr;
};

thread_local Block* cur_block_state = nullptr;
// The running block's dynamic shared memory, and when its current wait for other blocks began
// (spin_pause; reset at the block's start).
thread_local std::vector<float> dyn_smem;
thread_local unsigned spins = 0;
thread_local std::chrono::steady_clock::time_point spin_since;
thread_local std::vector<std::unique_ptr<char[]>> stacks;
thread_local std::vector<Fiber> fiber_pool;

void fiber_main() {
    Block* b = cur_block_state;
    Fiber* f = static_cast<Fiber*>(cur_thread);
    try {
        b->k->invoke(b->k->fn, b->args);
    } catch (const std::exception& e) {
        if (b->error.empty()) b->error = e.what();
    }
    f->done = true;
    b->bar.live -= 1;
    b->bar.maybe_release();
    Warp& w = b->warps[f->lin / 32];
    w.live -= 1;
    if (w.arrived > 0 && b->error.empty()) {
        char msg[200];
        snprintf(msg, sizeof msg,
                 "thread %d exited while %d lane(s) of its warp wait at a full-mask shuffle "
                 "(undefined on the device)",
                 f->lin, w.arrived);
        b->error = msg;
    }
    w.maybe_release();
    ctx_switch(f->ctx, b->sched);  // never resumed
}

void wait_on(Barrier& bar, int kind) {
    Block* b = cur_block_state;
    Fiber* f = static_cast<Fiber*>(cur_thread);
    f->wait_gen = bar.gen;
    bar.arrived += 1;
    bar.maybe_release();
    if (bar.gen != f->wait_gen) return;  // this thread was the last to arrive
    f->waiting = kind;
    ctx_switch(f->ctx, b->sched);
}

void run_block_fibers(const Kernel& k, void* const* args, unsigned nthreads) {
    Block b;
    b.k = &k;
    b.args = args;
    b.n = (int)nthreads;
    b.bar.live = (int)nthreads;
    b.warps.resize((nthreads + 31) / 32);
    for (size_t w = 0; w < b.warps.size(); ++w)
        b.warps[w].live = (int)std::min<unsigned>(32, nthreads - 32 * (unsigned)w);
    while (stacks.size() < nthreads) stacks.emplace_back(new char[kStack]);
    if (fiber_pool.size() < nthreads) fiber_pool.resize(nthreads);
    b.fibers = fiber_pool.data();
    const uint3 bd = cur_block_dim;
    for (unsigned t = 0; t < nthreads; ++t) {
        Fiber& f = b.fibers[t];
        f = Fiber();
        f.lin = (int)t;
        f.tid.x = t % bd.x;
        f.tid.y = (t / bd.x) % bd.y;
        f.tid.z = t / (bd.x * bd.y);
    }
    cur_block_state = &b;
    int live = (int)nthreads;
    while (live > 0) {
        bool progress = false;
        for (unsigned t = 0; t < nthreads && b.error.empty(); ++t) {
            Fiber& f = b.fibers[t];
            if (f.done) continue;
            if (f.waiting == 1 && f.wait_gen == b.bar.gen) continue;
            if (f.waiting == 2 && f.wait_gen == b.warps[f.lin / 32].gen) continue;
            f.waiting = 0;
            cur_thread = &f;
            if (!f.started) {
                f.started = true;
                ctx_init(f.ctx, stacks[t].get(), kStack, fiber_main);
            }
            ctx_switch(b.sched, f.ctx);
            progress = true;
            if (f.done) --live;
        }
        if (!b.error.empty()) break;
        if (!progress) {
            int at_block = 0, at_warp = 0;
            for (unsigned t = 0; t < nthreads; ++t) {
                if (b.fibers[t].done) continue;
                if (b.fibers[t].waiting == 1) ++at_block;
                if (b.fibers[t].waiting == 2) ++at_warp;
            }
            char msg[256];
            snprintf(msg, sizeof msg,
                     "deadlock in block (%u,%u,%u): %d thread(s) wait at __syncthreads and %d at "
                     "a warp shuffle, %d thread(s) of the block have exited",
                     cur_block_idx.x, cur_block_idx.y, cur_block_idx.z, at_block, at_warp,
                     (int)nthreads - live);
            b.error = msg;
            break;
        }
    }
    cur_block_state = nullptr;
    cur_thread = nullptr;
    if (!b.error.empty()) throw Fault(b.error);
}

void run_block_direct(const Kernel& k, void* const* args, unsigned nthreads) {
    Thread t;
    cur_thread = &t;
    const uint3 bd = cur_block_dim;
    for (unsigned i = 0; i < nthreads; ++i) {
        t.copies.clear();
        t.committed = 0;
        t.tid.x = i % bd.x;
        t.tid.y = (i / bd.x) % bd.y;
        t.tid.z = i / (bd.x * bd.y);
        k.invoke(k.fn, args);
    }
    cur_thread = nullptr;
}

}  // namespace

void add_kernel(const char* name, void* fn, Invoke invoke, Check check, bool direct) {
    std::lock_guard<std::mutex> g(registry_lock());
    registry()[name] = Kernel{fn, invoke, check, direct};
}

void syncthreads() {
    if (!cur_block_state)
        throw Fault(
            "__syncthreads() in a kernel that the build classified as barrier-free (it runs "
            "without fibers); the classification in build.rs missed a barrier");
    wait_on(cur_block_state->bar, 1);
}

float* dyn_shared() { return dyn_smem.data(); }

void async_copy(void* dst, const void* src) {
    cur_thread->copies.push_back(AsyncCopy{dst, src, cur_thread->committed});
}

void async_commit() { ++cur_thread->committed; }

void async_wait(unsigned pending) {
    Thread& t = *cur_thread;
    // Groups numbered below `done` are complete; the copies of the open group (not committed)
    // are not waited for, as on the device.
    const unsigned done = t.committed > pending ? t.committed - pending : 0;
    size_t kept = 0;
    for (const AsyncCopy& c : t.copies) {
        if (c.group < done)
            memcpy(c.dst, c.src, 16);
        else
            t.copies[kept++] = c;
    }
    t.copies.resize(kept);
}

void spin_pause() {
    if (spins++ == 0) spin_since = std::chrono::steady_clock::now();
    sched_yield();
    if ((spins & 1023) == 0 &&
        std::chrono::steady_clock::now() - spin_since > std::chrono::seconds(20)) {
        char msg[200];
        snprintf(msg, sizeof msg,
                 "block (%u,%u,%u) waited over 20 s for other blocks (a grid-wide wait that "
                 "never ends: an ordinary launch of a kernel that needs a cooperative one, or a "
                 "block that failed)",
                 cur_block_idx.x, cur_block_idx.y, cur_block_idx.z);
        throw Fault(msg);
    }
}

// Runs block `idx` of a launch on this OS thread.
void run_block(const Kernel& k, void* const* args, uint3 idx, uint3 block, uint3 grid,
               size_t shared_floats) {
    cur_block_idx = idx;
    cur_block_dim = block;
    cur_grid_dim = grid;
    dyn_smem.assign(shared_floats, NAN);
    spins = 0;
    const unsigned nthreads = block.x * block.y * block.z;
    if (k.direct)
        run_block_direct(k, args, nthreads);
    else
        run_block_fibers(k, args, nthreads);
}

uint32_t shfl_xor_bits(unsigned mask, uint32_t bits, int lane_mask) {
    Block* b = cur_block_state;
    if (!b)
        throw Fault(
            "warp shuffle in a kernel that the build classified as barrier-free (it runs without "
            "fibers); the classification in build.rs missed a shuffle");
    if (mask != 0xffffffffu) throw Fault("only full-mask warp shuffles are emulated");
    if (lane_mask < 0 || lane_mask > 31) throw Fault("shuffle lane mask outside 0..31");
    Fiber* f = static_cast<Fiber*>(cur_thread);
    Warp& w = b->warps[f->lin / 32];
    if (w.live != 32) {
        char msg[200];
        snprintf(msg, sizeof msg,
                 "full-mask warp shuffle in warp %d of block (%u,%u,%u) with %d live lanes "
                 "(undefined on the device: every lane named in the mask must take part)",
                 f->lin / 32, cur_block_idx.x, cur_block_idx.y, cur_block_idx.z, w.live);
        throw Fault(msg);
    }
    const int lane = f->lin & 31;
    const int p = f->shfl_parity;
    f->shfl_parity ^= 1;
    w.slots[p][lane] = bits;
    wait_on(w, 2);
    return w.slots[p][lane ^ lane_mask];
}

}  // namespace emu

extern "C" void medssl_emu_register_all();

// Launches kernel `name` with the CUDA argument convention (`args[i]` points at parameter i's
// value). Returns 0, or 1 with a message in `err`.
extern "C" int medssl_emu_launch(const char* name, const unsigned* grid, const unsigned* block,
                                 void* const* args, const char* kinds, const size_t* sizes,
                                 int nargs, size_t shared_bytes, int cooperative, char* err,
                                 size_t err_len) {
    static std::once_flag once;
    std::call_once(once, medssl_emu_register_all);
    emu::Kernel k;
    {
        std::lock_guard<std::mutex> g(emu::registry_lock());
        auto it = emu::registry().find(name);
        if (it == emu::registry().end()) {
            snprintf(err, err_len, "kernel `%s` is not in any kernels/*.cu file", name);
            return 1;
        }
        k = it->second;
    }
    if (!k.check(kinds, sizes, nargs, err, err_len)) return 1;
    const unsigned nthreads = block[0] * block[1] * block[2];
    if (nthreads == 0 || nthreads > 1024 || block[2] > 64) {
        snprintf(err, err_len, "invalid block (%u,%u,%u): 1..1024 threads, z <= 64", block[0],
                 block[1], block[2]);
        return 1;
    }
    if (grid[0] == 0 || grid[1] == 0 || grid[2] == 0 || grid[1] > 65535 || grid[2] > 65535) {
        snprintf(err, err_len, "invalid grid (%u,%u,%u)", grid[0], grid[1], grid[2]);
        return 1;
    }
    const uint3 bd{block[0], block[1], block[2]}, gd{grid[0], grid[1], grid[2]};
    const size_t blocks = (size_t)grid[0] * grid[1] * grid[2];
    const size_t shared_floats = (shared_bytes + 3) / 4;
    if (!cooperative) {
        try {
            for (unsigned z = 0; z < grid[2]; ++z)
                for (unsigned y = 0; y < grid[1]; ++y)
                    for (unsigned x = 0; x < grid[0]; ++x)
                        emu::run_block(k, args, uint3{x, y, z}, bd, gd, shared_floats);
        } catch (const std::exception& e) {
            snprintf(err, err_len, "%s", e.what());
            emu::cur_thread = nullptr;
            return 1;
        }
        return 0;
    }
    // Cooperative: every block at once, one OS thread each (the device guarantees that all
    // blocks are resident together, so blocks may wait for each other).
    if (blocks > 256) {
        snprintf(err, err_len,
                 "cooperative grid of %zu blocks: the emulation runs at most 256 at once", blocks);
        return 1;
    }
    std::vector<std::string> errors(blocks);
    std::vector<std::thread> threads;
    threads.reserve(blocks);
    size_t b = 0;
    for (unsigned z = 0; z < grid[2]; ++z)
        for (unsigned y = 0; y < grid[1]; ++y)
            for (unsigned x = 0; x < grid[0]; ++x, ++b)
                threads.emplace_back([&, x, y, z, b] {
                    try {
                        emu::run_block(k, args, uint3{x, y, z}, bd, gd, shared_floats);
                    } catch (const std::exception& e) {
                        errors[b] = e.what();
                    }
                });
    for (auto& t : threads) t.join();
    for (const auto& e : errors)
        if (!e.empty()) {
            snprintf(err, err_len, "%s", e.c_str());
            return 1;
        }
    return 0;
}
