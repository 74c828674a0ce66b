// Prompt insertion fused with LayerNorm (DESIGN.md, op 3) in CUDA C++.
//
// Forward: a block per output row reads the row once, from x or from the prompts, writes it to y and its
// LayerNorm to y_ln (statistics in fp32, two passes over the row while it sits in L1), and keeps mean and rstd.
// Backward: G blocks walk the rows in a fixed order (block g takes rows g, g + G, ...), rebuild each row of y,
// form dy_total = dy + rstd·(dŷ − mean(dŷ) − x̂·mean(dŷ·x̂)) and route it to dx and the prompts; the affine
// gradients accumulate per block into a (G, D) partial buffer that sum_rows reduces in a fixed order: no atomics.
//
// Packed variant (mode replace): x (T, D) holds N sequences, sequence n in rows [cu[n], cu[n+1]), and rows
// cu[n] + s_n + [0, M) are replaced. The same row kernels, each row finding its sequence by a binary search over
// cu_seqlens (ceil(log2 N) loads of a cached (N+1)-entry array, the same for every thread of the block): no
// per-row map to build beforehand, no extra launch, no host sync.

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

// One row of y, whose element k is load(k) in fp32: written to y, its LayerNorm to y_ln (two passes over the row
// while it sits in L1), its mean and rstd kept. The whole block takes part (block_sum synchronises it).
template <typename T, typename Load>
__device__ __forceinline__ void forward_row(const Load& load, int64_t row, int64_t d, bool has_ln, const void* ln_w,
                                            const void* ln_b, float eps, const InsertForward& out, float* scratch) {
  T* y = static_cast<T*>(out.y) + row * d;
  float sum = 0.f;
  for (int64_t k = threadIdx.x; k < d; k += blockDim.x) {
    const float v = load(k);
    y[k] = from_float<T>(v);
    sum += v;
  }
  if (!has_ln) return;
  const float mean = block_sum(sum, scratch) / d;
  float var = 0.f;
  for (int64_t k = threadIdx.x; k < d; k += blockDim.x) {
    const float t = load(k) - mean;
    var += t * t;
  }
  const float rstd = rsqrtf(block_sum(var, scratch) / d + eps);
  const T* w = static_cast<const T*>(ln_w);
  const T* b = static_cast<const T*>(ln_b);
  T* y_ln = static_cast<T*>(out.y_ln) + row * d;
  for (int64_t k = threadIdx.x; k < d; k += blockDim.x) {
    float v = (load(k) - mean) * rstd;
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
__global__ void __launch_bounds__(kThreads) insert_forward_kernel(InsertArgs a, InsertForward out) {
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x, n = row / a.l_out, j = row % a.l_out;
  const RowSource r = source_of(a, n, j);
  forward_row<T>([&](int64_t k) { return load_y<T>(a, r, n, k); }, row, a.d, a.has_ln, a.ln_w, a.ln_b, a.eps, out,
                 scratch);
}

// The gradient reaching one row of y, column by column: dy_total = dy + rstd·(dŷ − mean(dŷ) − x̂·mean(dŷ·x̂)),
// dŷ = dy_ln·w, handed to route(k, dy_total). load(k) rebuilds y (only with dy_ln); dy(k) and dy_ln(k) read the
// upstream gradients (null pointers: absent); the affine partials accumulate in dw_part / db_part (column k
// belongs to thread k mod blockDim). The whole block takes part.
template <typename T, typename Load, typename Dy, typename DyLn, typename Route>
__device__ __forceinline__ void backward_row(const Load& load, const Dy& dy, const DyLn& dy_ln, bool has_dy,
                                             bool has_dyln, const T* w, float mean, float rstd, int64_t d,
                                             float* dw_part, float* db_part, float* scratch, const Route& route) {
  float c1 = 0.f, c2 = 0.f;
  if (has_dyln) {
    float s1 = 0.f, s2 = 0.f;
    for (int64_t k = threadIdx.x; k < d; k += blockDim.x) {
      const float xhat = (load(k) - mean) * rstd;
      const float dyln = dy_ln(k);
      const float dxhat = w != nullptr ? dyln * to_float(w[k]) : dyln;
      s1 += dxhat * xhat;
      s2 += dxhat;
      dw_part[k] += dyln * xhat;
      db_part[k] += dyln;
    }
    c1 = block_sum(s1, scratch) / d;
    c2 = block_sum(s2, scratch) / d;
  }
  for (int64_t k = threadIdx.x; k < d; k += blockDim.x) {
    float total = has_dy ? dy(k) : 0.f;
    if (has_dyln) {
      const float xhat = (load(k) - mean) * rstd;
      const float dyln = dy_ln(k);
      const float dxhat = w != nullptr ? dyln * to_float(w[k]) : dyln;
      total += rstd * (dxhat - c2 - xhat * c1);
    }
    route(k, total);
  }
}

// Zeroes this block's row of the affine partials (when there are any) and returns where it starts.
__device__ __forceinline__ float* partial_row(float* part, int64_t d) {
  if (part == nullptr) return nullptr;
  part += static_cast<int64_t>(blockIdx.x) * d;
  for (int64_t k = threadIdx.x; k < d; k += blockDim.x) part[k] = 0.f;
  return part;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) insert_backward_kernel(InsertArgs a, InsertBackward g) {
  __shared__ float scratch[32];
  const int64_t d = a.d, rows = a.n * a.l_out;
  const T* dy = static_cast<const T*>(g.dy);
  const T* dy_ln = static_cast<const T*>(g.dy_ln);
  float* dw_part = partial_row(g.dw_part, d);
  float* db_part = partial_row(g.db_part, d);
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t n = row / a.l_out, j = row % a.l_out;
    const RowSource r = source_of(a, n, j);
    const float mean = dy_ln != nullptr ? g.mean[row] : 0.f, rstd = dy_ln != nullptr ? g.rstd[row] : 0.f;
    backward_row<T>(
        [&](int64_t k) { return load_y<T>(a, r, n, k); },
        [&](int64_t k) { return to_float(dy[n * g.sdy[0] + j * g.sdy[1] + k * g.sdy[2]]); },
        [&](int64_t k) { return to_float(dy_ln[n * g.sdy_ln[0] + j * g.sdy_ln[1] + k * g.sdy_ln[2]]); },
        dy != nullptr, dy_ln != nullptr, static_cast<const T*>(a.ln_w), mean, rstd, d, dw_part, db_part, scratch,
        [&](int64_t k, float total) {
          if (r.is_prompt) {
            const int64_t at = (n * a.m + r.p_row) * d + k;
            if (a.shared) static_cast<float*>(g.dprompts)[at] = total;  // summed over N by sum_rows
            else static_cast<T*>(g.dprompts)[at] = from_float<T>(total);
            if (!a.insert_mode) static_cast<T*>(g.dx)[(n * a.l + j) * d + k] = from_float<T>(0.f);  // overwritten
          } else {
            static_cast<T*>(g.dx)[(n * a.l + r.x_row) * d + k] = from_float<T>(total);
          }
        });
  }
}

// ---- packed ----------------------------------------------------------------------------------------------------
struct PackedSource {
  bool is_prompt;
  int64_t n;      // the sequence of the row
  int64_t p_row;  // the prompt row that replaces it, when a prompt
};

// The last n < N with cu[n] <= t: the sequence of packed row t (empty sequences, cu[n] = cu[n+1], are passed over).
__device__ __forceinline__ int64_t sequence_of(const int64_t* cu, int64_t n_seq, int64_t t) {
  int64_t lo = 0, hi = n_seq;  // cu[lo] <= t < cu[hi]
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (cu[mid] <= t) lo = mid;
    else hi = mid;
  }
  return lo;
}

__device__ __forceinline__ PackedSource packed_source_of(const InsertPackedArgs& a, int64_t t) {
  PackedSource r;
  r.n = sequence_of(a.cu, a.n, t);
  r.p_row = t - a.cu[r.n] - (a.starts != nullptr ? a.starts[r.n] : a.start);
  r.is_prompt = r.p_row >= 0 && r.p_row < a.m;
  return r;
}

template <typename T>
__device__ __forceinline__ float load_packed(const InsertPackedArgs& a, const PackedSource& r, int64_t t, int64_t k) {
  if (r.is_prompt)
    return to_float(static_cast<const T*>(a.prompts)[r.n * a.sp[0] + r.p_row * a.sp[1] + k * a.sp[2]]);
  return to_float(static_cast<const T*>(a.x)[t * a.sx[0] + k * a.sx[1]]);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) insert_packed_forward_kernel(InsertPackedArgs a, InsertForward out) {
  __shared__ float scratch[32];
  const int64_t t = blockIdx.x;
  const PackedSource r = packed_source_of(a, t);
  forward_row<T>([&](int64_t k) { return load_packed<T>(a, r, t, k); }, t, a.d, a.has_ln, a.ln_w, a.ln_b, a.eps,
                 out, scratch);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) insert_packed_backward_kernel(InsertPackedArgs a, InsertBackward g) {
  __shared__ float scratch[32];
  const int64_t d = a.d;
  const T* dy = static_cast<const T*>(g.dy);
  const T* dy_ln = static_cast<const T*>(g.dy_ln);
  float* dw_part = partial_row(g.dw_part, d);
  float* db_part = partial_row(g.db_part, d);
  for (int64_t t = blockIdx.x; t < a.t; t += gridDim.x) {
    const PackedSource r = packed_source_of(a, t);
    const float mean = dy_ln != nullptr ? g.mean[t] : 0.f, rstd = dy_ln != nullptr ? g.rstd[t] : 0.f;
    backward_row<T>(
        [&](int64_t k) { return load_packed<T>(a, r, t, k); },
        [&](int64_t k) { return to_float(dy[t * g.sdy[0] + k * g.sdy[1]]); },
        [&](int64_t k) { return to_float(dy_ln[t * g.sdy_ln[0] + k * g.sdy_ln[1]]); },
        dy != nullptr, dy_ln != nullptr, static_cast<const T*>(a.ln_w), mean, rstd, d, dw_part, db_part, scratch,
        [&](int64_t k, float total) {
          // x's row t lands on y's row t, zero where a prompt replaced it
          static_cast<T*>(g.dx)[t * d + k] = from_float<T>(r.is_prompt ? 0.f : total);
          if (!r.is_prompt) return;
          const int64_t at = (r.n * a.m + r.p_row) * d + k;
          if (a.shared) static_cast<float*>(g.dprompts)[at] = total;  // summed over N by sum_rows
          else static_cast<T*>(g.dprompts)[at] = from_float<T>(total);
        });
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

cudaError_t insert_prompts_packed_forward(const InsertPackedArgs& a, const InsertForward& out, cudaStream_t stream) {
  if (a.t == 0) return cudaSuccess;
  return dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    return launch_kernel(insert_packed_forward_kernel<T>, static_cast<unsigned>(a.t), kThreads, stream, a, out);
  });
}

cudaError_t insert_prompts_packed_backward(const InsertPackedArgs& a, const InsertBackward& b, cudaStream_t stream) {
  return dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    return launch_kernel(insert_packed_backward_kernel<T>, b.grid, kThreads, stream, a, b);
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
