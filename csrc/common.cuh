// What the torch-free kernels share: dtype conversion (fp32 / fp16 / bf16 storage, fp32 arithmetic), warp and
// block reductions, and error returns (the binding turns a cudaError_t into a Python error; no kernel file
// includes the torch headers, which keeps each one a few seconds to compile).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels.h"

namespace fastprompt {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
// `scratch` holds 32 floats of shared memory; the call synchronises the block.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < warps ? scratch[lane] : 0.f;
  return warp_sum(v);
}

__device__ __forceinline__ float sigmoidf(float x) { return 1.f / (1.f + expf(-x)); }

// Calls `body` with the storage type of `dtype` (float, __half or __nv_bfloat16).
template <typename F>
inline cudaError_t dispatch_dtype(DType dtype, F&& body) {
  switch (dtype) {
    case DType::Float32: return body(float{});
    case DType::Float16: return body(__half{});
    case DType::BFloat16: return body(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

inline int ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

// Every kernel launch goes through these two helpers rather than <<<>>>, so that the CPU emulator of the tests
// (tests/cuda_emulator/, which compiles these files as C++ with FASTPROMPT_CUDA_EMULATOR defined) runs the same
// launch sites on its own scheduler. The arguments are converted to the kernel's parameter types at the call
// (they are not deduced), as with <<<>>>. Both return the launch's own error (a bad configuration).
template <typename T>
struct NonDeduced {
  using type = T;
};

template <typename... Params>
inline cudaError_t launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t stream,
                                 typename NonDeduced<Params>::type... args) {
#ifdef FASTPROMPT_CUDA_EMULATOR
  (void)stream;  // one emulated stream: launches run to completion, in order
  return cuda_emulator::launch(kernel, grid, block, /*cooperative=*/false, args...);
#else
  kernel<<<grid, block, 0, stream>>>(args...);
  return cudaGetLastError();
#endif
}

// A cooperative launch: every block resident at once, so that the kernel may sync the whole grid. Fails with
// cudaErrorCooperativeLaunchTooLarge when the device cannot hold the grid.
template <typename... Params>
inline cudaError_t launch_cooperative_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t stream,
                                             typename NonDeduced<Params>::type... args) {
#ifdef FASTPROMPT_CUDA_EMULATOR
  (void)stream;
  return cuda_emulator::launch(kernel, grid, block, /*cooperative=*/true, args...);
#else
  void* params[] = {static_cast<void*>(&args)..., nullptr};
  return cudaLaunchCooperativeKernel(reinterpret_cast<void*>(kernel), grid, block, params, 0, stream);
#endif
}

}  // namespace fastprompt

#define FP_RETURN_IF_ERROR(expr)              \
  do {                                         \
    cudaError_t fp_err_ = (expr);              \
    if (fp_err_ != cudaSuccess) return fp_err_; \
  } while (0)
