// The CUDA runtime as the CPU emulator of the tests sees it: the qualifiers, thread indices, barriers, warp
// shuffles, math functions and runtime calls that csrc/*.cu use, so that those files compile unchanged as C++
// (with FASTPROMPT_CUDA_EMULATOR defined: launches go through cuda_emulator::launch) and run on the scheduler of
// scheduler.cpp.
//
// The execution model (scheduler.cpp): every GPU thread of a block is a fiber (its own stack, switched on one
// OS thread); a fiber runs until it reaches a barrier (__syncthreads, a warp shuffle or __syncwarp, grid.sync)
// and the barrier opens when every thread it involves has arrived. A barrier that some involved thread can never
// reach (it exited, or waits at another barrier) is a divergence deadlock on a GPU: the emulator aborts with a
// message saying who waits where. Ordinary launches run one block at a time; a cooperative launch runs the whole
// grid's threads interleaved (grid.sync needs every block resident), on an emulated device of kSMs SMs.
//
// Only what the kernels use is here; anything else fails to compile, which is the signal to add it.
#pragma once

#include <math.h>  // expf, fmaxf, sqrtf, isnan, INFINITY in the global namespace, as in device code

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>

#pragma GCC visibility push(hidden)  // each library that links the emulator has its own copy of its state

// ---- qualifiers ----------------------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __grid_constant__  // kernel parameters are ordinary copies here

// `__shared__ float s[32];` becomes `cuda_emulator::SharedDeclaration fp_emu_shared_N; static float s[32];`. A
// static local is one copy for the whole program: right while one block runs at a time (ordinary launches),
// though a block starts with what the previous one left there rather than garbage. A cooperative launch
// interleaves all blocks, where one copy would be shared between blocks; so the declaration object tells the
// scheduler that the kernel declares shared memory, and a cooperative launch aborts then.
#define FP_EMU_SHARED_NAME_(n) fp_emu_shared_##n
#define FP_EMU_SHARED_(n) ::cuda_emulator::SharedDeclaration FP_EMU_SHARED_NAME_(n); static
#define __shared__ FP_EMU_SHARED_(__COUNTER__)

// ---- types ---------------------------------------------------------------------------------------------------
struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
};

// the runtime's numeric values, so that messages match the real ones
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevice = 101,
  cudaErrorCooperativeLaunchTooLarge = 720,
};
typedef cudaError_t cudaError;

enum cudaDeviceAttr {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrMaxThreadsPerMultiProcessor = 39,
  cudaDevAttrCooperativeLaunch = 95,
};

struct CUstream_st;
typedef CUstream_st* cudaStream_t;  // streams are not emulated: launches run to completion, in order

namespace cuda_emulator {

// the running thread's indices and the launch's shape, set by the scheduler before it switches to a fiber
extern uint3 thread_idx, block_idx;
extern dim3 block_dim, grid_dim;

// the emulated device
constexpr int kSMs = 2;
constexpr int kMaxThreadsPerSM = 2048;
constexpr int kMaxBlocksPerSM = 32;

// whether the emulated device offers cooperative launches: yes, unless FASTPROMPT_CUDA_EMULATE_COOPERATIVE=0
// (read at every query, so a test can switch the CMPA kernels to their one-launch-per-stage fallback)
bool cooperative_launch_supported();

[[noreturn]] void fail(const char* format, ...) __attribute__((format(printf, 1, 2)));

// barriers (scheduler.cpp)
void sync_block();
void sync_grid();
void sync_warp(unsigned mask);
enum class Shuffle { Index, Up, Down, Xor };
uint64_t shuffle(unsigned mask, uint64_t value, Shuffle kind, int arg, int width);

struct SharedDeclaration {
  SharedDeclaration();
};

// Runs body(context) as every thread of the grid; returns a launch error, or aborts on a kernel bug.
cudaError_t run_grid(dim3 grid, dim3 block, bool cooperative, void (*body)(void*), void* context);
long long launch_count();  // launches run since the library loaded

template <typename T>
struct NonDeduced {
  using type = T;
};

// The emulated <<<grid, block>>>(args...): each thread calls the kernel with its own copy of the arguments.
template <typename... Params>
cudaError_t launch(void (*kernel)(Params...), dim3 grid, dim3 block, bool cooperative,
                   typename NonDeduced<Params>::type... args) {
  struct Call {
    void (*kernel)(Params...);
    std::tuple<Params...> args;
  } call{kernel, std::tuple<Params...>(args...)};
  return run_grid(grid, block, cooperative,
                  [](void* context) {
                    Call* c = static_cast<Call*>(context);
                    std::apply(c->kernel, c->args);
                  },
                  &call);
}

template <typename T>
uint64_t to_bits(T v) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8, "shuffles move up to 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  return bits;
}

template <typename T>
T from_bits(uint64_t bits) {
  T v;
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}

}  // namespace cuda_emulator

#define threadIdx (::cuda_emulator::thread_idx)
#define blockIdx (::cuda_emulator::block_idx)
#define blockDim (::cuda_emulator::block_dim)
#define gridDim (::cuda_emulator::grid_dim)
constexpr int warpSize = 32;

// ---- device functions ----------------------------------------------------------------------------------------
inline void __syncthreads() { cuda_emulator::sync_block(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { cuda_emulator::sync_warp(mask); }

template <typename T>
T __shfl_sync(unsigned mask, T v, int src_lane, int width = warpSize) {
  using namespace cuda_emulator;
  return from_bits<T>(shuffle(mask, to_bits(v), Shuffle::Index, src_lane, width));
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = warpSize) {
  using namespace cuda_emulator;
  return from_bits<T>(shuffle(mask, to_bits(v), Shuffle::Up, static_cast<int>(delta), width));
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = warpSize) {
  using namespace cuda_emulator;
  return from_bits<T>(shuffle(mask, to_bits(v), Shuffle::Down, static_cast<int>(delta), width));
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = warpSize) {
  using namespace cuda_emulator;
  return from_bits<T>(shuffle(mask, to_bits(v), Shuffle::Xor, lane_mask, width));
}

// IEEE 1/sqrt here (within an ulp); on a GPU rsqrtf is an approximation (about 2 ulp), as are the __expf-style
// intrinsics (not provided: a kernel that uses one fails to compile here until it is added, with that caveat).
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }

// ---- runtime API ---------------------------------------------------------------------------------------------
cudaError_t cudaGetLastError();
const char* cudaGetErrorString(cudaError_t error);
cudaError_t cudaGetDevice(int* device);
// Any device ordinal answers for the one emulated device (the bindings pass a CPU tensor's index, -1).
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);

template <typename Kernel>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, Kernel, int block_size,
                                                          size_t dynamic_smem_bytes) {
  // thread-count limits only (registers and shared memory are not modelled)
  (void)dynamic_smem_bytes;
  if (block_size <= 0 || block_size > 1024) return cudaErrorInvalidValue;
  const int by_threads = cuda_emulator::kMaxThreadsPerSM / block_size;
  *blocks = by_threads < cuda_emulator::kMaxBlocksPerSM ? by_threads : cuda_emulator::kMaxBlocksPerSM;
  return cudaSuccess;
}

#pragma GCC visibility pop
