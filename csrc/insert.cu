// Prompt insertion fused with LayerNorm (DESIGN.md, op 3) in CUDA C++.
//
// Forward: a block per output row reads the row once, from x or from the prompts, writes it to y and its
// LayerNorm to y_ln (statistics in fp32, two passes over the row while it sits in L1), and keeps mean and rstd.
// Backward: G blocks walk the rows in a fixed order (block g takes rows g, g + G, ...), rebuild each row of y,
// form dy_total = dy + rstd·(dŷ − mean(dŷ) − x̂·mean(dŷ·x̂)) and route it to dx and the prompts; the affine
// gradients accumulate per block into a (G, D) partial buffer that sum_rows reduces in a fixed order: no atomics.

#include "common.cuh"

namespace fastprompt {
namespace {

constexpr int kThreads = 256;

struct RowSource {
  bool is_prompt;
  int64_t x_row;  // the row of x that lands here (insert: shifted past the prompts), when not a prompt
  int64_t p_row;  // the prompt row, when a prompt
};

__device__ inline RowSource source_of(const InsertArgs& a, int64_t n, int64_t j) {
  const int64_t s = a.starts != nullptr ? a.starts[n] : a.start;
  RowSource r;
  r.is_prompt = j >= s && j < s + a.m;
  r.p_row = j - s;
  r.x_row = a.insert_mode ? (j < s ? j : j - a.m) : j;
  return r;
}

template <typename T>
__device__ inline float load_y(const InsertArgs& a, const RowSource& r, int64_t n, int64_t k) {
  if (r.is_prompt) {
    const T* p = static_cast<const T*>(a.prompts);
    return to_float(p[n * a.sp[0] + r.p_row * a.sp[1] + k * a.sp[2]]);
  }
  const T* x = static_cast<const T*>(a.x);
  return to_float(x[n * a.sx[0] + r.x_row * a.sx[1] + k * a.sx[2]]);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) insert_forward_kernel(InsertArgs a, InsertForward out) {
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x, n = row / a.l_out, j = row % a.l_out, d = a.d;
  const RowSource r = source_of(a, n, j);
  T* y = static_cast<T*>(out.y) + row * d;
  float sum = 0.f;
  for (int64_t k = threadIdx.x; k < d; k += blockDim.x) {
    const float v = load_y<T>(a, r, n, k);
    y[k] = from_float<T>(v);
    sum += v;
  }
  if (!a.has_ln) return;
  const float mean = block_sum(sum, scratch) / d;
  float var = 0.f;
  for (int64_t k = threadIdx.x; k < d; k += blockDim.x) {
    const float t = load_y<T>(a, r, n, k) - mean;
    var += t * t;
  }
  const float rstd = rsqrtf(block_sum(var, scratch) / d + a.eps);
  const T* w = static_cast<const T*>(a.ln_w);
  const T* b = static_cast<const T*>(a.ln_b);
  T* y_ln = static_cast<T*>(out.y_ln) + row * d;
  for (int64_t k = threadIdx.x; k < d; k += blockDim.x) {
    float v = (load_y<T>(a, r, n, k) - mean) * rstd;
    if (w != nullptr) v *= to_float(w[k]);
    if (b != nullptr) v += to_float(b[k]);
    y_ln[k] = from_float<T>(v);
  }
  if (threadIdx.x == 0) {
    out.mean[row] = mean;
    out.rstd[row] = rstd;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) insert_backward_kernel(InsertArgs a, InsertBackward g) {
  __shared__ float scratch[32];
  const int64_t d = a.d, rows = a.n * a.l_out;
  const T* w = static_cast<const T*>(a.ln_w);
  const T* dy = static_cast<const T*>(g.dy);
  const T* dy_ln = static_cast<const T*>(g.dy_ln);
  float* dw_part = g.dw_part != nullptr ? g.dw_part + static_cast<int64_t>(blockIdx.x) * d : nullptr;
  float* db_part = g.db_part != nullptr ? g.db_part + static_cast<int64_t>(blockIdx.x) * d : nullptr;
  if (dw_part != nullptr)
    for (int64_t k = threadIdx.x; k < d; k += blockDim.x) dw_part[k] = db_part[k] = 0.f;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t n = row / a.l_out, j = row % a.l_out;
    const RowSource r = source_of(a, n, j);
    float c1 = 0.f, c2 = 0.f, mean = 0.f, rstd = 0.f;
    if (dy_ln != nullptr) {
      mean = g.mean[row];
      rstd = g.rstd[row];
      float s1 = 0.f, s2 = 0.f;
      for (int64_t k = threadIdx.x; k < d; k += blockDim.x) {
        const float xhat = (load_y<T>(a, r, n, k) - mean) * rstd;
        const float dyln = to_float(dy_ln[n * g.sdy_ln[0] + j * g.sdy_ln[1] + k * g.sdy_ln[2]]);
        const float dxhat = w != nullptr ? dyln * to_float(w[k]) : dyln;
        s1 += dxhat * xhat;
        s2 += dxhat;
        dw_part[k] += dyln * xhat;  // this thread owns column k of its block's partial row
        db_part[k] += dyln;
      }
      c1 = block_sum(s1, scratch) / d;
      c2 = block_sum(s2, scratch) / d;
    }
    for (int64_t k = threadIdx.x; k < d; k += blockDim.x) {
      float total = dy != nullptr ? to_float(dy[n * g.sdy[0] + j * g.sdy[1] + k * g.sdy[2]]) : 0.f;
      if (dy_ln != nullptr) {
        const float xhat = (load_y<T>(a, r, n, k) - mean) * rstd;
        const float dyln = to_float(dy_ln[n * g.sdy_ln[0] + j * g.sdy_ln[1] + k * g.sdy_ln[2]]);
        const float dxhat = w != nullptr ? dyln * to_float(w[k]) : dyln;
        total += rstd * (dxhat - c2 - xhat * c1);
      }
      if (r.is_prompt) {
        const int64_t at = (n * a.m + r.p_row) * d + k;
        if (a.shared) static_cast<float*>(g.dprompts)[at] = total;  // summed over N by sum_rows
        else static_cast<T*>(g.dprompts)[at] = from_float<T>(total);
        if (!a.insert_mode) static_cast<T*>(g.dx)[(n * a.l + j) * d + k] = from_float<T>(0.f);  // overwritten
      } else {
        static_cast<T*>(g.dx)[(n * a.l + r.x_row) * d + k] = from_float<T>(total);
      }
    }
  }
}

template <typename T>
__global__ void sum_rows_kernel(const float* part, int64_t rows, int64_t cols, T* out) {
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < cols;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float acc = 0.f;
    for (int64_t r = 0; r < rows; ++r) acc += part[r * cols + c];
    out[c] = from_float<T>(acc);
  }
}

}  // namespace

cudaError_t insert_prompts_forward(const InsertArgs& a, const InsertForward& out, cudaStream_t stream) {
  const int64_t rows = a.n * a.l_out;
  if (rows == 0) return cudaSuccess;
  return dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    return launch_kernel(insert_forward_kernel<T>, static_cast<unsigned>(rows), kThreads, stream, a, out);
  });
}

cudaError_t insert_prompts_backward(const InsertArgs& a, const InsertBackward& b, cudaStream_t stream) {
  return dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    return launch_kernel(insert_backward_kernel<T>, b.grid, kThreads, stream, a, b);
  });
}

cudaError_t sum_rows(DType dtype, const float* part, int64_t rows, int64_t cols, void* out, cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const int blocks = ceil_div(cols, 256) < 1024 ? ceil_div(cols, 256) : 1024;
    return launch_kernel(sum_rows_kernel<T>, blocks > 0 ? blocks : 1, 256, stream, part, rows, cols,
                         static_cast<T*>(out));
  });
}

}  // namespace fastprompt
