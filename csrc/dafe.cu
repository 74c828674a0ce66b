// DAFE layer fusion (DESIGN.md, op 2) in CUDA C++.
//
// Rows r = n·M + m of prev (N, M, D); the task row of r is m (shared, stride 0 over N) or r.
// Forward, channel gate: row statistics (a warp per row), then a tiled GEMM whose tiles normalise prev as they
// load it and whose epilogue adds b_g and blends, out = σ(z)·prev + σ(−z)·task, keeping z (fp32).
// Forward, token gate: a warp per row; scalar gate: elementwise.
// Backward, channel gate: dz = dout·(prev − task)·σ(z)σ(−z) (elementwise, fp32 scratch); [dh | dtask] from a
// tiled GEMM of dz with [W_g | U_g]; a row-wise LayerNorm backward; [dW_g | dU_g] from a tiled GEMM of dzᵀ with
// [LN(prev) | task]; db_g from column sums. Token and scalar gates: one row-wise kernel. Sums over rows go through
// per-block partials reduced in a fixed order (sum_rows): deterministic, no atomics.

#include "common.cuh"

namespace fastprompt {
namespace {

constexpr int kTile = 16;
constexpr int kRowThreads = 256;

struct Rows {
  int64_t m, d;
  int64_t s0, s1, s2;
  __device__ int64_t at(int64_t r, int64_t k) const { return (r / m) * s0 + (r % m) * s1 + k * s2; }
};

template <typename T>
__device__ inline float ld(const void* p, int64_t i) { return to_float(static_cast<const T*>(p)[i]); }

__global__ void dafe_stats_kernel(const void* prev, Rows rp, int64_t rows, float eps, float* mean, float* rstd,
                                  DType dtype) {
  const int lane = threadIdx.x & 31;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * blockDim.x / 32;
  for (int64_t r = warp; r < rows; r += warps) {
    auto value = [&](int64_t k) {
      switch (dtype) {
        case DType::Float16: return ld<__half>(prev, rp.at(r, k));
        case DType::BFloat16: return ld<__nv_bfloat16>(prev, rp.at(r, k));
        default: return ld<float>(prev, rp.at(r, k));
      }
    };
    float s = 0.f;
    for (int64_t k = lane; k < rp.d; k += 32) s += value(k);
    const float mu = warp_sum(s) / rp.d;
    float v = 0.f;
    for (int64_t k = lane; k < rp.d; k += 32) {
      const float t = value(k) - mu;
      v += t * t;
    }
    const float rs = rsqrtf(warp_sum(v) / rp.d + eps);
    if (lane == 0) {
      mean[r] = mu;
      rstd[r] = rs;
    }
  }
}

// z[r, c] = sum_k LN(prev)[r, k] W_g[c, k] + task[r, k] U_g[c, k] + b_g[c]; out = σ(z) prev + σ(−z) task
template <typename T>
__global__ void dafe_channel_forward(DafeArgs a, Rows rp, Rows rt, DafeForward o) {
  __shared__ float sh[kTile][kTile + 1], st[kTile][kTile + 1], sw[kTile][kTile + 1], su[kTile][kTile + 1];
  const int64_t rows = a.n * a.m, d = a.d;
  const int tx = threadIdx.x, ty = threadIdx.y;
  // row tiles on grid x (up to 2^31 − 1 blocks), column tiles on grid y (at most 65535: D ≤ 65535·16)
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kTile + ty;  // this thread's output row
  const int64_t c = static_cast<int64_t>(blockIdx.y) * kTile + tx;  // and column
  const int64_t lr = static_cast<int64_t>(blockIdx.x) * kTile + ty;  // the row this thread loads
  const int64_t lc = static_cast<int64_t>(blockIdx.y) * kTile + ty;  // the weight row this thread loads
  float acc = 0.f;
  for (int64_t k0 = 0; k0 < d; k0 += kTile) {
    const int64_t k = k0 + tx;
    float h = 0.f, t = 0.f, w = 0.f, u = 0.f;
    if (lr < rows && k < d) {
      h = (ld<T>(a.prev, rp.at(lr, k)) - o.mean[lr]) * o.rstd[lr] * ld<T>(a.ln_w, k) + ld<T>(a.ln_b, k);
      h = to_float(from_float<T>(h));  // the product's operand in the input dtype, as eager
      t = ld<T>(a.task, rt.at(lr, k));
    }
    if (lc < d && k < d) {
      w = ld<T>(a.w_prev, lc * d + k);
      u = ld<T>(a.w_task, lc * d + k);
    }
    sh[ty][tx] = h; st[ty][tx] = t; sw[ty][tx] = w; su[ty][tx] = u;
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kTile; ++i) acc += sh[ty][i] * sw[tx][i] + st[ty][i] * su[tx][i];
    __syncthreads();
  }
  if (r < rows && c < d) {
    const float z = acc + ld<T>(a.b_prev, c);
    const float x = ld<T>(a.prev, rp.at(r, c)), t = ld<T>(a.task, rt.at(r, c));
    static_cast<T*>(o.out)[r * d + c] = from_float<T>(sigmoidf(z) * x + sigmoidf(-z) * t);
    o.z[r * d + c] = z;
  }
}

// token gate (z one number per row, a warp per row) and scalar gate (z = α)
template <typename T>
__global__ void dafe_rowwise_forward(DafeArgs a, Rows rp, Rows rt, DafeForward o) {
  const int lane = threadIdx.x & 31;
  const int64_t rows = a.n * a.m, d = a.d;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * blockDim.x / 32;
  for (int64_t r = warp; r < rows; r += warps) {
    float z;
    if (a.gate == Gate::Token) {
      const float mu = o.mean[r], rs = o.rstd[r];
      float s = 0.f;
      for (int64_t k = lane; k < d; k += 32) {
        const float h = (ld<T>(a.prev, rp.at(r, k)) - mu) * rs * ld<T>(a.ln_w, k) + ld<T>(a.ln_b, k);
        s += h * ld<T>(a.w_prev, k) + ld<T>(a.task, rt.at(r, k)) * ld<T>(a.w_task, k);
      }
      z = warp_sum(s) + ld<T>(a.b_prev, 0);
      if (lane == 0) o.z[r] = z;
    } else {
      z = ld<T>(a.alpha, 0);
    }
    const float g = sigmoidf(z), gbar = sigmoidf(-z);
    for (int64_t k = lane; k < d; k += 32)
      static_cast<T*>(o.out)[r * d + k] =
          from_float<T>(g * ld<T>(a.prev, rp.at(r, k)) + gbar * ld<T>(a.task, rt.at(r, k)));
  }
}

// ---- backward --------------------------------------------------------------------------------------------
template <typename T>
__global__ void dafe_dz(DafeArgs a, Rows rp, Rows rt, Rows ro, DafeBackward b) {
  const int64_t rows = a.n * a.m, d = a.d;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < rows * d;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / d, k = i % d;
    const float z = b.z[i];
    b.work[i] = ld<T>(b.dout, ro.at(r, k)) * (ld<T>(a.prev, rp.at(r, k)) - ld<T>(a.task, rt.at(r, k))) *
                sigmoidf(z) * sigmoidf(-z);
  }
}

// dh[r, c] = sum_k dz[r, k] W_g[k, c] (kept in the scratch after dz) ; dtask = dout σ(−z) + sum_k dz[r, k] U_g[k, c]
template <typename T>
__global__ void dafe_channel_dx(DafeArgs a, Rows rt, Rows ro, DafeBackward b) {
  __shared__ float sz[kTile][kTile + 1], sw[kTile][kTile + 1], su[kTile][kTile + 1];
  const int64_t rows = a.n * a.m, d = a.d;
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kTile + ty;  // row tiles on grid x, as the forward
  const int64_t c = static_cast<int64_t>(blockIdx.y) * kTile + tx;
  const float* dz = b.work;
  float acc_h = 0.f, acc_t = 0.f;
  for (int64_t k0 = 0; k0 < d; k0 += kTile) {
    sz[ty][tx] = (r < rows && k0 + tx < d) ? dz[r * d + k0 + tx] : 0.f;
    const bool ok = k0 + ty < d && c < d;
    sw[ty][tx] = ok ? ld<T>(a.w_prev, (k0 + ty) * d + c) : 0.f;
    su[ty][tx] = ok ? ld<T>(a.w_task, (k0 + ty) * d + c) : 0.f;
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kTile; ++i) {
      acc_h += sz[ty][i] * sw[i][tx];
      acc_t += sz[ty][i] * su[i][tx];
    }
    __syncthreads();
  }
  if (r < rows && c < d) {
    b.work[rows * d + r * d + c] = acc_h;
    const float v = ld<T>(b.dout, ro.at(r, c)) * sigmoidf(-b.z[r * d + c]) + acc_t;
    if (a.shared) static_cast<float*>(b.dtask)[r * d + c] = v;  // shared: summed over N afterwards
    else static_cast<T*>(b.dtask)[r * d + c] = from_float<T>(v);
  }
}

// dprev = dout σ(z) + rstd (dĥ − mean(dĥ) − x̂ mean(dĥ x̂)), dĥ = dh γ ; partials dγ = Σ dh x̂, dβ = Σ dh
template <typename T>
__global__ void dafe_channel_ln(DafeArgs a, Rows rp, Rows ro, DafeBackward b) {
  __shared__ float scratch[32];
  const int64_t rows = a.n * a.m, d = a.d;
  const float* dh = b.work + rows * d;
  float* pw = b.part + static_cast<int64_t>(blockIdx.x) * d;
  float* pb = b.part + static_cast<int64_t>(b.grid + blockIdx.x) * d;
  for (int64_t k = threadIdx.x; k < d; k += blockDim.x) pw[k] = pb[k] = 0.f;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const float mu = b.mean[r], rs = b.rstd[r];
    float s1 = 0.f, s2 = 0.f;
    for (int64_t k = threadIdx.x; k < d; k += blockDim.x) {
      const float xh = (ld<T>(a.prev, rp.at(r, k)) - mu) * rs, g = dh[r * d + k];
      const float dhh = g * ld<T>(a.ln_w, k);
      s1 += dhh * xh;
      s2 += dhh;
      pw[k] += g * xh;
      pb[k] += g;
    }
    const float c1 = block_sum(s1, scratch) / d, c2 = block_sum(s2, scratch) / d;
    for (int64_t k = threadIdx.x; k < d; k += blockDim.x) {
      const float xh = (ld<T>(a.prev, rp.at(r, k)) - mu) * rs;
      const float dhh = dh[r * d + k] * ld<T>(a.ln_w, k);
      const float v = ld<T>(b.dout, ro.at(r, k)) * sigmoidf(b.z[r * d + k]) + rs * (dhh - c2 - xh * c1);
      static_cast<T*>(b.dprev)[r * d + k] = from_float<T>(v);
    }
  }
}

// dW_g[k, c] = sum_r dz[r, k] LN(prev)[r, c] ; dU_g[k, c] = sum_r dz[r, k] task[r, c]
template <typename T>
__global__ void dafe_channel_dw(DafeArgs a, Rows rp, Rows rt, DafeBackward b) {
  __shared__ float sz[kTile][kTile + 1], sh[kTile][kTile + 1], st[kTile][kTile + 1];
  const int64_t rows = a.n * a.m, d = a.d;
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t kk = static_cast<int64_t>(blockIdx.y) * kTile + ty;  // output row (k of W)
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kTile + tx;
  const int64_t lk = static_cast<int64_t>(blockIdx.y) * kTile + tx;   // dz column this thread loads
  float acc_w = 0.f, acc_u = 0.f;
  for (int64_t r0 = 0; r0 < rows; r0 += kTile) {
    const int64_t r = r0 + ty;
    sz[ty][tx] = (r < rows && lk < d) ? b.work[r * d + lk] : 0.f;  // sz[r][k]
    float h = 0.f, t = 0.f;
    if (r < rows && c < d) {
      h = (ld<T>(a.prev, rp.at(r, c)) - b.mean[r]) * b.rstd[r] * ld<T>(a.ln_w, c) + ld<T>(a.ln_b, c);
      t = ld<T>(a.task, rt.at(r, c));
    }
    sh[ty][tx] = h;
    st[ty][tx] = t;
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kTile; ++i) {
      acc_w += sz[i][ty] * sh[i][tx];
      acc_u += sz[i][ty] * st[i][tx];
    }
    __syncthreads();
  }
  if (kk < d && c < d) {
    static_cast<T*>(b.d_w_prev)[kk * d + c] = from_float<T>(acc_w);
    static_cast<T*>(b.d_w_task)[kk * d + c] = from_float<T>(acc_u);
  }
}

template <typename T>
__global__ void column_sums(const float* x, int64_t rows, int64_t cols, T* out) {
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < cols;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float acc = 0.f;
    for (int64_t r = 0; r < rows; ++r) acc += x[r * cols + c];
    out[c] = from_float<T>(acc);
  }
}

// token and scalar gates: block g takes rows g, g + G, ...; partials part[i][g][:] for
// i = 0 dW_g = Σ dz h, 1 dU_g = Σ dz task, 2 dγ = Σ dz w x̂, 3 dβ = Σ dz w, 4 (column 0) db = Σ dz (or Σ dgate)
template <typename T>
__global__ void dafe_rowwise_backward(DafeArgs a, Rows rp, Rows rt, Rows ro, DafeBackward b) {
  __shared__ float scratch[32];
  const int64_t rows = a.n * a.m, d = a.d, g_count = b.grid;
  float* part = b.part;
  const bool token = a.gate == Gate::Token;
  for (int i = 0; i < 5; ++i)
    for (int64_t k = threadIdx.x; k < d; k += blockDim.x) part[(i * g_count + blockIdx.x) * d + k] = 0.f;
  __syncthreads();
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const float z = token ? b.z[r] : ld<T>(a.alpha, 0);
    const float g = sigmoidf(z), gbar = sigmoidf(-z);
    float s = 0.f;
    for (int64_t k = threadIdx.x; k < d; k += blockDim.x)
      s += ld<T>(b.dout, ro.at(r, k)) * (ld<T>(a.prev, rp.at(r, k)) - ld<T>(a.task, rt.at(r, k)));
    const float dgate = block_sum(s, scratch);
    const float dz = token ? dgate * g * gbar : dgate;  // scalar: the sum is scaled by σσ̄ once, at the end
    float c1 = 0.f, c2 = 0.f, mu = 0.f, rs = 0.f;
    if (token) {
      mu = b.mean[r];
      rs = b.rstd[r];
      float s1 = 0.f, s2 = 0.f;
      for (int64_t k = threadIdx.x; k < d; k += blockDim.x) {
        const float xh = (ld<T>(a.prev, rp.at(r, k)) - mu) * rs;
        const float dhh = dz * ld<T>(a.w_prev, k) * ld<T>(a.ln_w, k);
        s1 += dhh * xh;
        s2 += dhh;
      }
      c1 = block_sum(s1, scratch) / d;
      c2 = block_sum(s2, scratch) / d;
    }
    for (int64_t k = threadIdx.x; k < d; k += blockDim.x) {
      const float dout = ld<T>(b.dout, ro.at(r, k));
      float dprev = dout * g, dtask = dout * gbar;
      if (token) {
        const float x = ld<T>(a.prev, rp.at(r, k)), t = ld<T>(a.task, rt.at(r, k));
        const float xh = (x - mu) * rs, w = ld<T>(a.w_prev, k), lw = ld<T>(a.ln_w, k);
        const float dhh = dz * w * lw;
        dprev += rs * (dhh - c2 - xh * c1);
        dtask += dz * ld<T>(a.w_task, k);
        const float h = xh * lw + ld<T>(a.ln_b, k);
        part[(0 * g_count + blockIdx.x) * d + k] += dz * h;
        part[(1 * g_count + blockIdx.x) * d + k] += dz * t;
        part[(2 * g_count + blockIdx.x) * d + k] += dz * w * xh;
        part[(3 * g_count + blockIdx.x) * d + k] += dz * w;
      }
      static_cast<T*>(b.dprev)[r * d + k] = from_float<T>(dprev);
      if (a.shared) static_cast<float*>(b.dtask)[r * d + k] = dtask;
      else static_cast<T*>(b.dtask)[r * d + k] = from_float<T>(dtask);
    }
    if (threadIdx.x == 0) part[(4 * g_count + blockIdx.x) * d] += dz;
    __syncthreads();
  }
}

// the scalar gate's dα = σ(α)σ(−α) Σ_g part[4][g][0]
template <typename T>
__global__ void scalar_alpha_grad(const float* part, int64_t g_count, int64_t d, const void* alpha, void* out) {
  float acc = 0.f;
  for (int64_t g = 0; g < g_count; ++g) acc += part[(4 * g_count + g) * d];
  const float z = ld<T>(alpha, 0);
  static_cast<T*>(out)[0] = from_float<T>(acc * sigmoidf(z) * sigmoidf(-z));
}

// token gate: the (1, D) / (1,) gradients from the partials, columns summed over the blocks in order
template <typename T>
__global__ void token_param_grads(const float* part, int64_t g_count, int64_t d, DafeBackward b) {
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < d;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float s[4] = {0.f, 0.f, 0.f, 0.f};
    for (int64_t g = 0; g < g_count; ++g)
      for (int i = 0; i < 4; ++i) s[i] += part[(i * g_count + g) * d + k];
    static_cast<T*>(b.d_w_prev)[k] = from_float<T>(s[0]);
    static_cast<T*>(b.d_w_task)[k] = from_float<T>(s[1]);
    static_cast<T*>(b.d_ln_w)[k] = from_float<T>(s[2]);
    static_cast<T*>(b.d_ln_b)[k] = from_float<T>(s[3]);
    if (k == 0) {
      float db = 0.f;
      for (int64_t g = 0; g < g_count; ++g) db += part[(4 * g_count + g) * d];
      static_cast<T*>(b.d_b_prev)[0] = from_float<T>(db);
    }
  }
}

Rows rows_of(const DafeArgs& a, const int64_t* s) { return Rows{a.m, a.d, s[0], s[1], s[2]}; }

int blocks_for(int64_t items, int threads) {
  const int64_t b = (items + threads - 1) / threads;
  return static_cast<int>(b < 4096 ? (b > 0 ? b : 1) : 4096);
}

}  // namespace

cudaError_t dafe_forward(const DafeArgs& a, const DafeForward& o, cudaStream_t stream) {
  const int64_t rows = a.n * a.m;
  if (rows == 0) return cudaSuccess;  // nothing to write, and a zero-size grid is a launch error
  const Rows rp = rows_of(a, a.sp), rt = rows_of(a, a.st);
  if (a.gate != Gate::Scalar) {
    FP_RETURN_IF_ERROR(launch_kernel(dafe_stats_kernel, blocks_for(rows * 32, kRowThreads), kRowThreads, stream,
                                     a.prev, rp, rows, a.eps, o.mean, o.rstd, a.dtype));
  }
  return dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (a.gate == Gate::Channel) {
      const dim3 grid(ceil_div(rows, kTile), ceil_div(a.d, kTile)), block(kTile, kTile);
      return launch_kernel(dafe_channel_forward<T>, grid, block, stream, a, rp, rt, o);
    }
    return launch_kernel(dafe_rowwise_forward<T>, blocks_for(rows * 32, kRowThreads), kRowThreads, stream, a, rp, rt,
                         o);
  });
}

cudaError_t dafe_backward(const DafeArgs& a, const DafeBackward& b, cudaStream_t stream) {
  const int64_t rows = a.n * a.m, d = a.d;
  const Rows rp = rows_of(a, a.sp), rt = rows_of(a, a.st), ro = rows_of(a, b.so);
  return dispatch_dtype(a.dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    if (a.gate == Gate::Channel) {
      FP_RETURN_IF_ERROR(
          launch_kernel(dafe_dz<T>, blocks_for(rows * d, kRowThreads), kRowThreads, stream, a, rp, rt, ro, b));
      const dim3 block(kTile, kTile);
      if (rows > 0)  // no rows: dh and dtask are empty (a zero-size grid is a launch error)
        FP_RETURN_IF_ERROR(launch_kernel(dafe_channel_dx<T>, dim3(ceil_div(rows, kTile), ceil_div(d, kTile)), block,
                                         stream, a, rt, ro, b));
      FP_RETURN_IF_ERROR(launch_kernel(dafe_channel_ln<T>, b.grid, kRowThreads, stream, a, rp, ro, b));
      FP_RETURN_IF_ERROR(launch_kernel(dafe_channel_dw<T>, dim3(ceil_div(d, kTile), ceil_div(d, kTile)), block,
                                       stream, a, rp, rt, b));
      FP_RETURN_IF_ERROR(launch_kernel(column_sums<T>, blocks_for(d, kRowThreads), kRowThreads, stream, b.work, rows,
                                       d, static_cast<T*>(b.d_b_prev)));
      FP_RETURN_IF_ERROR(sum_rows(a.dtype, b.part, b.grid, d, b.d_ln_w, stream));
      return sum_rows(a.dtype, b.part + b.grid * d, b.grid, d, b.d_ln_b, stream);
    }
    FP_RETURN_IF_ERROR(launch_kernel(dafe_rowwise_backward<T>, b.grid, kRowThreads, stream, a, rp, rt, ro, b));
    if (a.gate == Gate::Token)
      return launch_kernel(token_param_grads<T>, blocks_for(d, kRowThreads), kRowThreads, stream, b.part, b.grid, d, b);
    return launch_kernel(scalar_alpha_grad<T>, 1, 1, stream, b.part, b.grid, d, a.alpha, b.d_alpha);
  });
}

}  // namespace fastprompt
