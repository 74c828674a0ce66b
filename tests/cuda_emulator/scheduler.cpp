// The scheduler of the CPU emulator (see include/cuda_runtime.h for the execution model).
//
// Each GPU thread is a fiber: a stack of its own and a saved stack pointer, switched on the calling OS thread
// (a few lines of assembly on x86-64, ucontext elsewhere). The scheduler runs the fibers of a group (one block,
// or the whole grid of a cooperative launch) in rounds: each ready fiber in turn runs until it waits at a barrier
// or exits; then every barrier whose participants have all arrived opens (a warp's shuffle or __syncwarp, a
// block's __syncthreads, the grid's sync). A round that opens nothing, with threads still waiting, is a deadlock:
// on a GPU the kernel would hang or compute garbage, here it aborts with who waits where.
//
// Launches are serialised by a mutex (one emulated device, one stream). Test-only code: correctness and clear
// failures first, speed second (a thread's wait at a barrier costs about 40 ns on x86-64, ten times that with
// ucontext, whose every switch is a system call).

#include <sys/mman.h>
#include <unistd.h>

#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>
#include <vector>

#include "cuda_runtime.h"

// -DFASTPROMPT_CUDA_EMULATOR_UCONTEXT takes the portable path on x86-64 too
#if defined(__x86_64__) && !defined(FASTPROMPT_CUDA_EMULATOR_UCONTEXT)
#define FP_EMU_ASM_SWITCH 1
#else
#include <ucontext.h>
#endif

#pragma GCC visibility push(hidden)

namespace cuda_emulator {

uint3 thread_idx, block_idx;
dim3 block_dim, grid_dim;

namespace {

// ---- context switching -------------------------------------------------------------------------------------
constexpr size_t kStackBytes = 256 * 1024;  // the kernels' frames are small; a guard page catches an overflow

#ifdef FP_EMU_ASM_SWITCH
// switch_stacks(save, load): push the callee-saved registers, store the stack pointer in *save, load `load`,
// pop that fiber's registers and return into it. Everything else is caller-saved in the System V ABI.
extern "C" void fp_emu_switch_stacks(void** save, void* load);
asm(R"(
  .text
  .p2align 4
  .globl fp_emu_switch_stacks
  .hidden fp_emu_switch_stacks
  .type fp_emu_switch_stacks, @function
fp_emu_switch_stacks:
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
  .size fp_emu_switch_stacks, .-fp_emu_switch_stacks
)");

struct Context {
  void* sp = nullptr;
};

// A fresh fiber's stack as fp_emu_switch_stacks expects it: six zero registers, then the address it returns to
// (`entry`), placed so that `entry` starts with the stack aligned as after a call.
void make_context(Context& c, char* stack, size_t bytes, void (*entry)()) {
  auto* top = reinterpret_cast<uintptr_t*>(reinterpret_cast<uintptr_t>(stack + bytes) & ~uintptr_t{15});
  *--top = 0;  // the return address of `entry`, which never returns
  *--top = reinterpret_cast<uintptr_t>(entry);
  for (int i = 0; i < 6; ++i) *--top = 0;
  c.sp = top;
}

void switch_context(Context& from, Context& to) { fp_emu_switch_stacks(&from.sp, to.sp); }
#else
struct Context {
  ucontext_t uc;
};

void make_context(Context& c, char* stack, size_t bytes, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = bytes;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}

void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

// ---- fibers and barriers -----------------------------------------------------------------------------------
enum class Wait : uint8_t { Ready, Block, Warp, Grid, Done };
enum class WarpOp : uint8_t { Shuffle, SyncWarp };

const char* describe(Wait w) {
  switch (w) {
    case Wait::Ready: return "running";
    case Wait::Block: return "at __syncthreads";
    case Wait::Warp: return "at a warp shuffle or __syncwarp";
    case Wait::Grid: return "at grid.sync";
    case Wait::Done: return "exited";
  }
  return "?";
}

struct Fiber {
  Context context;
  char* stack = nullptr;
  Wait wait = Wait::Ready;
  // a warp operation in progress
  WarpOp op = WarpOp::Shuffle;
  Shuffle kind = Shuffle::Xor;
  int arg = 0;
  uint64_t value = 0, result = 0;
};

struct Run {
  dim3 grid, block;
  unsigned threads = 0;          // per block
  unsigned long long first = 0;  // linear index of the group's first block
  unsigned blocks = 0;           // blocks in the group
  bool cooperative = false;
  bool reverse = false;          // run each round's fibers last to first
  void (*body)(void*) = nullptr;
  void* context = nullptr;
  std::vector<Fiber> fibers;  // blocks * threads
  unsigned current = 0;
  Context scheduler;
  bool active = false;
};

Run run;  // the launch in progress
std::mutex launch_mutex;
std::vector<char*> stack_pool;  // fiber stacks, kept across launches
long long launches = 0;

char* stack_at(size_t i) {
  while (stack_pool.size() <= i) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    void* p = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) fail("cannot map a fiber stack");
    mprotect(p, page, PROT_NONE);  // the guard page below the stack
    stack_pool.push_back(static_cast<char*>(p) + page);
  }
  return stack_pool[i];
}

void set_indices(unsigned i) {
  const unsigned long long b = run.first + i / run.threads;
  const unsigned t = i % run.threads;
  block_idx.x = static_cast<unsigned>(b % run.grid.x);
  block_idx.y = static_cast<unsigned>(b / run.grid.x % run.grid.y);
  block_idx.z = static_cast<unsigned>(b / (static_cast<unsigned long long>(run.grid.x) * run.grid.y));
  thread_idx.x = t % run.block.x;
  thread_idx.y = t / run.block.x % run.block.y;
  thread_idx.z = t / (run.block.x * run.block.y);
}

void fiber_main() {
  run.body(run.context);
  run.fibers[run.current].wait = Wait::Done;
  switch_context(run.fibers[run.current].context, run.scheduler);
  fail("an exited fiber was resumed");  // unreachable
}

Fiber& self() {
  if (!run.active) fail("a device function was called outside a kernel launch");
  return run.fibers[run.current];
}

void wait_at(Wait w) {
  Fiber& f = self();
  f.wait = w;
  switch_context(f.context, run.scheduler);
}

// Who waits where, for the deadlock message: per block of the group, and per warp whose lanes disagree.
[[noreturn]] void deadlock() {
  std::string text;
  for (unsigned b = 0; b < run.blocks; ++b) {
    int counts[5] = {0, 0, 0, 0, 0};
    for (unsigned t = 0; t < run.threads; ++t) ++counts[static_cast<int>(run.fibers[b * run.threads + t].wait)];
    if (counts[static_cast<int>(Wait::Done)] == static_cast<int>(run.threads)) continue;
    set_indices(b * run.threads);
    text += "\n  block (" + std::to_string(block_idx.x) + "," + std::to_string(block_idx.y) + "," +
            std::to_string(block_idx.z) + "):";
    for (int w = 1; w < 5; ++w)
      if (counts[w] > 0) text += " " + std::to_string(counts[w]) + " " + describe(static_cast<Wait>(w)) + ";";
    for (unsigned w0 = 0; w0 < run.threads; w0 += 32) {
      const unsigned lanes = run.threads - w0 < 32 ? run.threads - w0 : 32;
      int at_warp = 0;
      for (unsigned l = 0; l < lanes; ++l) at_warp += run.fibers[b * run.threads + w0 + l].wait == Wait::Warp;
      if (at_warp > 0 && at_warp < static_cast<int>(lanes))
        text += "\n    warp " + std::to_string(w0 / 32) + ": " + std::to_string(at_warp) + " of " +
                std::to_string(lanes) + " lanes at a warp shuffle or __syncwarp, the others not";
    }
  }
  fail("deadlock in a %s of grid (%u,%u,%u) x block (%u,%u,%u): the threads wait at barriers that "
       "some threads of their warp, block or grid never reach (divergent __syncthreads, shuffle, __syncwarp or "
       "grid.sync, or one after an early return):%s",
       run.cooperative ? "cooperative launch" : "launch", run.grid.x, run.grid.y, run.grid.z, run.block.x, run.block.y,
       run.block.z, text.c_str());
}

// Opens the barriers whose participants have all arrived; false when none could open.
bool open_barriers() {
  bool opened = false;
  const unsigned n = run.blocks * run.threads;
  unsigned at_grid = 0;
  for (unsigned b = 0; b < run.blocks; ++b) {
    Fiber* block = &run.fibers[b * run.threads];
    unsigned at_block = 0;
    for (unsigned w0 = 0; w0 < run.threads; w0 += 32) {
      Fiber* warp = block + w0;
      unsigned at_warp = 0;
      for (unsigned l = 0; l < 32 && w0 + l < run.threads; ++l) at_warp += warp[l].wait == Wait::Warp;
      if (at_warp == 32) {  // (a partial warp never gets here: its lanes abort at the operation)
        for (unsigned l = 1; l < 32; ++l)
          if (warp[l].op != warp[0].op || (warp[l].op == WarpOp::Shuffle && warp[l].kind != warp[0].kind))
            fail("the lanes of warp %u of block %u meet at different warp operations (a shuffle of one kind, "
                 "another shuffle or __syncwarp): divergent code",
                 w0 / 32, b);
        if (warp[0].op == WarpOp::Shuffle)
          for (unsigned l = 0; l < 32; ++l) {
            int src = static_cast<int>(l);
            switch (warp[l].kind) {
              case Shuffle::Index: src = warp[l].arg & 31; break;
              case Shuffle::Up: src = static_cast<int>(l) - warp[l].arg; break;
              case Shuffle::Down: src = static_cast<int>(l) + warp[l].arg; break;
              case Shuffle::Xor: src = static_cast<int>(l) ^ warp[l].arg; break;
            }
            warp[l].result = src >= 0 && src < 32 ? warp[src].value : warp[l].value;  // out of range: own value
          }
        for (unsigned l = 0; l < 32; ++l) warp[l].wait = Wait::Ready;
        opened = true;
      }
    }
    for (unsigned t = 0; t < run.threads; ++t) {
      at_block += block[t].wait == Wait::Block;
      at_grid += block[t].wait == Wait::Grid;
    }
    if (at_block == run.threads) {
      for (unsigned t = 0; t < run.threads; ++t) block[t].wait = Wait::Ready;
      opened = true;
    }
  }
  if (at_grid == n && n > 0) {
    for (auto& f : run.fibers) f.wait = Wait::Ready;
    opened = true;
  }
  return opened;
}

// Runs the group's fibers to completion.
void run_group() {
  const unsigned n = run.blocks * run.threads;
  run.fibers.resize(n);
  for (unsigned i = 0; i < n; ++i) {
    Fiber& f = run.fibers[i];
    f.stack = stack_at(i);
    f.wait = Wait::Ready;
    make_context(f.context, f.stack, kStackBytes, fiber_main);
  }
  unsigned done = 0;
  while (done < n) {
    done = 0;
    for (unsigned k = 0; k < n; ++k) {
      const unsigned i = run.reverse ? n - 1 - k : k;
      Fiber& f = run.fibers[i];
      if (f.wait == Wait::Ready) {
        run.current = i;
        set_indices(i);
        switch_context(run.scheduler, f.context);
      }
      done += f.wait == Wait::Done;
    }
    if (done < n && !open_barriers()) deadlock();
  }
}

bool env_is(const char* name, const char* value, bool if_unset) {
  const char* v = getenv(name);
  return v == nullptr || *v == '\0' ? if_unset : std::string(v) == value;
}

}  // namespace

void fail(const char* format, ...) {
  va_list args;
  va_start(args, format);
  fputs("fastprompt cuda emulator: ", stderr);
  vfprintf(stderr, format, args);
  fputs("\n", stderr);
  va_end(args);
  fflush(stderr);
  abort();
}

bool cooperative_launch_supported() { return !env_is("FASTPROMPT_CUDA_EMULATE_COOPERATIVE", "0", false); }

SharedDeclaration::SharedDeclaration() {
  if (run.active && run.cooperative)
    fail("a kernel launched cooperatively declares __shared__ memory: the emulator runs a cooperative grid's "
         "blocks interleaved with one copy of each __shared__ variable, so it cannot give each block its own");
}

void sync_block() { wait_at(Wait::Block); }

void sync_grid() {
  if (!run.cooperative)
    fail("grid.sync() in a kernel that was not launched cooperatively (launch_cooperative_kernel): on a GPU it "
         "fails or deadlocks");
  wait_at(Wait::Grid);
}

namespace {
void check_warp_op(unsigned mask, const char* what) {
  if (mask != 0xffffffffu)
    fail("%s with mask 0x%08x: the emulator takes full-warp masks only, as the kernels use (a partial mask is a "
         "divergence the kernel has to reason about lane by lane)",
         what, mask);
  if ((run.current % run.threads) / 32 * 32 + 32 > run.threads)
    fail("%s in a partial warp (%u threads a block): the full mask names lanes that do not exist", what,
         run.threads);
}
}  // namespace

void sync_warp(unsigned mask) {
  check_warp_op(mask, "__syncwarp");
  Fiber& f = self();
  f.op = WarpOp::SyncWarp;
  wait_at(Wait::Warp);
}

uint64_t shuffle(unsigned mask, uint64_t value, Shuffle kind, int arg, int width) {
  check_warp_op(mask, "a warp shuffle");
  if (width != 32) fail("a warp shuffle of width %d: only the full width 32 is emulated", width);
  Fiber& f = self();
  f.op = WarpOp::Shuffle;
  f.kind = kind;
  f.arg = arg;
  f.value = value;
  wait_at(Wait::Warp);
  return f.result;
}

cudaError_t run_grid(dim3 grid, dim3 block, bool cooperative, void (*body)(void*), void* context) {
  const unsigned long long threads = static_cast<unsigned long long>(block.x) * block.y * block.z;
  const unsigned long long blocks = static_cast<unsigned long long>(grid.x) * grid.y * grid.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535 ||
      threads == 0 || threads > 1024 || block.x > 1024 || block.y > 1024 || block.z > 64)
    fail("invalid launch configuration: grid (%u,%u,%u), block (%u,%u,%u) (a grid of at least one block, at most "
         "2^31-1 x 65535 x 65535; at most 1024 threads a block, at most 1024 x 1024 x 64)",
         grid.x, grid.y, grid.z, block.x, block.y, block.z);
  std::lock_guard<std::mutex> lock(launch_mutex);
  if (run.active) fail("a kernel launch from inside a kernel (dynamic parallelism is not emulated)");
  if (cooperative) {
    int per_sm = 0;
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, body, static_cast<int>(threads), 0);
    if (!cooperative_launch_supported()) fail("a cooperative launch on a device that does not support them");
    if (blocks > static_cast<unsigned long long>(per_sm) * kSMs) return cudaErrorCooperativeLaunchTooLarge;
  }
  ++launches;
  run.grid = grid;
  run.block = block;
  run.threads = static_cast<unsigned>(threads);
  run.cooperative = cooperative;
  run.reverse = env_is("FASTPROMPT_CUDA_EMULATE_ORDER", "reverse", false);
  run.body = body;
  run.context = context;
  grid_dim = grid;
  block_dim = block;
  run.active = true;
  if (cooperative) {  // every block resident: all threads of the grid interleaved
    run.first = 0;
    run.blocks = static_cast<unsigned>(blocks);
    run_group();
  } else {  // one block after the other (what __shared__ as a static variable needs)
    run.blocks = 1;
    for (unsigned long long b = 0; b < blocks; ++b) {
      run.first = b;
      run_group();
    }
  }
  run.active = false;
  return cudaSuccess;
}

long long launch_count() {
  std::lock_guard<std::mutex> lock(launch_mutex);
  return launches;
}

}  // namespace cuda_emulator

// ---- runtime API -------------------------------------------------------------------------------------------
// Launch errors are returned by the launch helpers directly (and kernel bugs abort): no error is ever pending.
cudaError_t cudaGetLastError() { return cudaSuccess; }

const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorCooperativeLaunchTooLarge: return "too many blocks in cooperative launch";
  }
  return "unknown error";
}

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; return cudaSuccess;
    case cudaDevAttrMultiProcessorCount: *value = cuda_emulator::kSMs; return cudaSuccess;
    case cudaDevAttrMaxThreadsPerMultiProcessor: *value = cuda_emulator::kMaxThreadsPerSM; return cudaSuccess;
    case cudaDevAttrCooperativeLaunch: *value = cuda_emulator::cooperative_launch_supported(); return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}

#pragma GCC visibility pop
