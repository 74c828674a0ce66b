// Cross-modal prompt attention (DESIGN.md, op 1) in CUDA C++: both sides, forward in one cooperative launch,
// backward in one, the stages separated by grid-wide syncs (and run as one launch per stage on a device that
// cannot hold the cooperative grid).
//
// The compute is tiny (M <= 64 prompt rows), the weights are large (about 11 M parameters at ViT-B/16
// widths): every GEMM stage spreads its weight reads over the whole grid.
//   out[m, n] = sum_k A[m, k] W[n, k]   (nn.Linear, W row-major (N, K)): a warp per output column n, its lanes
//       striding over k (coalesced reads of W's row n), M rows accumulated 8 at a time.
//   dA[m, k] = sum_n dY[m, n] W[n, k]   (input gradients): a thread per column k, consecutive threads reading
//       consecutive elements of each row n of W.
//   dW[n, k] = sum_m dY[m, n] A[m, k]   (weight gradients): a thread per element of W, a loop over the M rows.
// Every sum is done by one thread or one warp in a fixed order: deterministic, no atomics.
// Intermediates live in fp32 workspaces with the layout of fastprompt/ops/cmpa_layout.py (the same as the
// Triton kernels'), so the forward's saved workspace is interchangeable in shape.

#include <cooperative_groups.h>

#include "common.cuh"

namespace cg = cooperative_groups;

namespace fastprompt {
namespace {

constexpr int kThreads = 256;
constexpr int kRows = 8;  // M rows accumulated per pass of a warp-per-column GEMM

enum Weight { PW = 0, PB, LN1W, LN1B, INW, INB, OUTW, OUTB, LN2W, LN2B, FCW, FCB, CPW, CPB };

// The device view of one side: its tensors and its slices of the workspaces.
template <typename T>
struct View {
  int64_t m, nb, d, d_other, heads, hd, f;
  const T* x;
  int64_t sx0, sx1, sx2;
  const T* w[14];
  T* gw[14];
  const float* other_bar;  // the other side's pooled rows (the query source)
  float *xbar, *p, *stats, *qkv, *probs, *o, *x1, *h;
  int32_t* idx;
  T* out;
  const T* g;
  int64_t sg0, sg1, sg2;
  float *dy, *dh, *dc, *dx1, *dout_attn, *dqkv, *da, *db, *dxbar_ln, *dother, *consts, *ds;
  const float* other_dother;  // the other side's gradient to this side's pooled rows
  T* dx;
  bool active;                // computed (the text side may be off)
};

// Forward workspace offsets (floats), as fastprompt/ops/cmpa_layout.py.
__host__ __device__ inline int64_t fwd_size(int64_t m, int64_t d, int64_t h, int64_t f) {
  return 2 * m * d + 6 * m + 3 * m * d + h * m * m + 2 * m * d + m * f;
}
__host__ __device__ inline int64_t bwd_size(int64_t m, int64_t d, int64_t dother, int64_t h, int64_t f) {
  return m * d + m * f + m * d + m * d + m * d + 3 * m * d + m * d + m * d + m * d + m * dother + 6 * m + h * m * m;
}

// The backward workspace of a side: dy, dh, dc, dx1, do, dqkv, da, db, dxbar_ln, dother, consts, ds.
struct BwdSlots {
  float *dy, *dh, *dc, *dx1, *dout_attn, *dqkv, *da, *db, *dxbar_ln, *dother, *consts, *ds;
};
__host__ __device__ inline BwdSlots bwd_slots(float* b, int64_t m, int64_t d, int64_t f, int64_t dother) {
  BwdSlots s;
  s.dy = b; s.dh = s.dy + m * d; s.dc = s.dh + m * f; s.dx1 = s.dc + m * d; s.dout_attn = s.dx1 + m * d;
  s.dqkv = s.dout_attn + m * d; s.da = s.dqkv + 3 * m * d; s.db = s.da + m * d; s.dxbar_ln = s.db + m * d;
  s.dother = s.dxbar_ln + m * d; s.consts = s.dother + m * dother; s.ds = s.consts + 6 * m;
  return s;
}

template <typename T>
__host__ __device__ View<T> make_view(const CmpaArgs& a, int s) {
  const CmpaSide& c = a.side[s];
  const CmpaSide& o = a.side[1 - s];
  View<T> v;
  v.m = a.m; v.nb = c.nb; v.d = c.d; v.d_other = c.d_other; v.heads = c.heads; v.hd = c.d / c.heads; v.f = c.f;
  v.x = static_cast<const T*>(c.x); v.sx0 = c.sx[0]; v.sx1 = c.sx[1]; v.sx2 = c.sx[2];
  for (int i = 0; i < 14; ++i) {
    v.w[i] = static_cast<const T*>(c.w[i]);
    v.gw[i] = static_cast<T*>(c.grad_w[i]);
  }
  const int64_t m = a.m, d = c.d;
  float* ws = c.ws;
  v.xbar = ws; v.p = ws + m * d; v.stats = ws + 2 * m * d; v.qkv = v.stats + 6 * m; v.probs = v.qkv + 3 * m * d;
  v.o = v.probs + c.heads * m * m; v.x1 = v.o + m * d; v.h = v.x1 + m * d;
  v.other_bar = o.ws;  // xbar is the head of every forward workspace
  v.idx = c.idx; v.out = static_cast<T*>(c.out);
  v.g = static_cast<const T*>(c.g); v.sg0 = c.sg[0]; v.sg1 = c.sg[1]; v.sg2 = c.sg[2];
  if (c.bws != nullptr) {
    const BwdSlots b = bwd_slots(c.bws, m, d, c.f, c.d_other);
    v.dy = b.dy; v.dh = b.dh; v.dc = b.dc; v.dx1 = b.dx1; v.dout_attn = b.dout_attn; v.dqkv = b.dqkv;
    v.da = b.da; v.db = b.db; v.dxbar_ln = b.dxbar_ln; v.dother = b.dother; v.consts = b.consts; v.ds = b.ds;
  }
  // the other side's gradient to this side's pooled rows (through the other side's projection)
  v.other_dother = o.bws != nullptr ? bwd_slots(o.bws, m, o.d, o.f, o.d_other).dother : nullptr;
  v.dx = static_cast<T*>(c.dx);
  v.active = s == 0 || a.text_side;
  return v;
}

__device__ __forceinline__ float quick_gelu(float h) { return h * sigmoidf(1.702f * h); }
__device__ __forceinline__ float quick_gelu_grad(float h) {
  const float s = sigmoidf(1.702f * h);
  return s + 1.702f * h * s * (1.f - s);
}

// ---- the GEMM patterns --------------------------------------------------------------------------------
// out[m, n] = epilogue(m, n, sum_k a(m, k) * W[n, k]) for n in [0, N): a warp per column.
template <typename T, typename A, typename Epilogue>
__device__ void linear_columns(int64_t items_before, int64_t warp, int64_t warps, int64_t rows, int64_t n_cols,
                               int64_t k_dim, const T* w, A a, Epilogue epilogue) {
  const int lane = threadIdx.x & 31;
  for (int64_t n = warp - items_before; n < n_cols; n += warps) {
    if (n < 0) continue;
    const T* wrow = w + n * k_dim;
    for (int64_t m0 = 0; m0 < rows; m0 += kRows) {
      float acc[kRows];
#pragma unroll
      for (int i = 0; i < kRows; ++i) acc[i] = 0.f;
      for (int64_t k = lane; k < k_dim; k += 32) {
        const float wk = to_float(wrow[k]);
#pragma unroll
        for (int i = 0; i < kRows; ++i)
          if (m0 + i < rows) acc[i] += a(m0 + i, k) * wk;
      }
#pragma unroll
      for (int i = 0; i < kRows; ++i) {
        const float total = warp_sum(acc[i]);
        if (lane == 0 && m0 + i < rows) epilogue(m0 + i, n, total);
      }
    }
  }
}

// dA[m, k] = epilogue(m, k, sum_n dy(m, n) W[n, k]) for k in [0, K): a thread per column, rows in passes of 8.
template <typename T, typename G, typename Epilogue>
__device__ void input_grad_columns(int64_t row_stride, int64_t rows, int64_t n_dim, int64_t k, const T* w, G dy,
                                   Epilogue epilogue) {
  for (int64_t m0 = 0; m0 < rows; m0 += kRows) {
    float acc[kRows];
#pragma unroll
    for (int i = 0; i < kRows; ++i) acc[i] = 0.f;
    for (int64_t n = 0; n < n_dim; ++n) {
      const float wk = to_float(w[n * row_stride + k]);
#pragma unroll
      for (int i = 0; i < kRows; ++i)
        if (m0 + i < rows) acc[i] += dy(m0 + i, n) * wk;
    }
#pragma unroll
    for (int i = 0; i < kRows; ++i)
      if (m0 + i < rows) epilogue(m0 + i, k, acc[i]);
  }
}

// LayerNorm statistics of row `r` of a (rows, d) fp32 buffer, by one warp; lane 0 writes mean and rstd.
__device__ void row_stats(const float* x, int64_t d, float eps, float* mean_out, float* rstd_out) {
  const int lane = threadIdx.x & 31;
  float s = 0.f;
  for (int64_t k = lane; k < d; k += 32) s += x[k];
  const float mean = warp_sum(s) / d;
  float v = 0.f;
  for (int64_t k = lane; k < d; k += 32) {
    const float t = x[k] - mean;
    v += t * t;
  }
  const float rstd = rsqrtf(warp_sum(v) / d + eps);
  if (lane == 0) {
    *mean_out = mean;
    *rstd_out = rstd;
  }
}

// ---- forward stages -------------------------------------------------------------------------------------
template <typename T>
__device__ void f_pool(const CmpaArgs& a, const View<T>* v, int64_t tid, int64_t threads) {
  const int64_t items0 = a.m * v[0].d, total = items0 + a.m * v[1].d;
  for (int64_t i = tid; i < total; i += threads) {
    const View<T>& s = v[i < items0 ? 0 : 1];
    const int64_t j = i < items0 ? i : i - items0;
    const int64_t m = j / s.d, d = j % s.d;
    const T* base = s.x + m * s.sx0 + d * s.sx2;
    float acc;
    if (a.fusing == 1) {
      acc = to_float(base[0]);
    } else if (a.fusing == 0) {
      acc = 0.f;
      for (int64_t b = 0; b < s.nb; ++b) acc += to_float(base[b * s.sx1]);
      acc /= s.nb;
    } else {
      acc = to_float(base[0]);
      int32_t best = 0;
      for (int64_t b = 1; b < s.nb; ++b) {
        const float x = to_float(base[b * s.sx1]);
        // strictly larger: the first index of the maximum wins ties (torch.max); a NaN beats every number and
        // the first NaN stays (torch.max propagates NaN, and x > NaN is always false)
        if (x > acc || (isnan(x) && !isnan(acc))) {
          acc = x;
          best = static_cast<int32_t>(b);
        }
      }
      s.idx[j] = best;
    }
    s.xbar[j] = acc;
  }
}

template <typename T>
__device__ void f_proj(const CmpaArgs& a, const View<T>* v, int64_t warp, int64_t warps) {
  int64_t before = 0;
  for (int s = 0; s < 2; ++s) {
    const View<T>& x = v[s];
    if (!x.active) continue;
    const float* src = x.other_bar;
    const int64_t k_dim = x.d_other;
    const T* bias = x.w[PB];
    float* p = x.p;
    const int64_t d = x.d;
    linear_columns(before, warp, warps, a.m, d, k_dim, x.w[PW],
                   [=](int64_t m, int64_t k) { return src[m * k_dim + k]; },
                   [=](int64_t m, int64_t n, float acc) { p[m * d + n] = acc + to_float(bias[n]); });
    before += d;
  }
}

template <typename T>
__device__ void f_ln1_stats(const CmpaArgs& a, const View<T>* v, int64_t warp, int64_t warps) {
  // rows: side 0 p rows, side 0 xbar rows, side 1 p rows, side 1 xbar rows
  for (int64_t r = warp; r < 4 * a.m; r += warps) {
    const View<T>& x = v[r / (2 * a.m)];
    const int64_t j = r % (2 * a.m);
    if (!x.active) continue;
    const bool query = j < a.m;
    const int64_t m = query ? j : j - a.m;
    const float* row = (query ? x.p : x.xbar) + m * x.d;
    float* st = x.stats + (query ? 0 : 2 * a.m);
    row_stats(row, x.d, a.eps, st + m, st + a.m + m);
  }
}

template <typename T>
__device__ void f_qkv(const CmpaArgs& a, const View<T>* v, int64_t warp, int64_t warps) {
  int64_t before = 0;
  for (int s = 0; s < 2; ++s) {
    const View<T>& x = v[s];
    if (!x.active) continue;
    const int64_t d = x.d, m_rows = a.m;
    const float *p = x.p, *xbar = x.xbar, *st = x.stats;
    const T *g = x.w[LN1W], *b = x.w[LN1B], *bias = x.w[INB];
    float* qkv = x.qkv;
    const int lane = threadIdx.x & 31;
    // columns [0, D) take LN1(p), columns [D, 3D) take LN1(xbar): a warp per column
    for (int64_t n = warp - before; n < 3 * d; n += warps) {
      if (n < 0) continue;
      const bool query = n < d;
      const float* src = query ? p : xbar;
      const float* mean = st + (query ? 0 : 2 * m_rows);
      const float* rstd = mean + m_rows;
      const T* wrow = x.w[INW] + n * d;
      for (int64_t m0 = 0; m0 < m_rows; m0 += kRows) {
        float acc[kRows];
#pragma unroll
        for (int i = 0; i < kRows; ++i) acc[i] = 0.f;
        for (int64_t k = lane; k < d; k += 32) {
          const float wk = to_float(wrow[k]), gk = to_float(g[k]), bk = to_float(b[k]);
#pragma unroll
          for (int i = 0; i < kRows; ++i)
            if (m0 + i < m_rows) {
              const int64_t m = m0 + i;
              acc[i] += ((src[m * d + k] - mean[m]) * rstd[m] * gk + bk) * wk;
            }
        }
#pragma unroll
        for (int i = 0; i < kRows; ++i) {
          const float total = warp_sum(acc[i]);
          if (lane == 0 && m0 + i < m_rows) qkv[(m0 + i) * 3 * d + n] = total + to_float(bias[n]);
        }
      }
    }
    before += 3 * d;
  }
}

// P_h = softmax(q_h k_hᵀ / √hd) and o_h = P_h v_h: a warp per (side, head, query row).
template <typename T>
__device__ void f_attention(const CmpaArgs& a, const View<T>* v, int64_t warp, int64_t warps) {
  const int lane = threadIdx.x & 31;
  const int64_t items0 = v[0].heads * a.m, total = items0 + (v[1].active ? v[1].heads * a.m : 0);
  for (int64_t item = warp; item < total; item += warps) {
    const View<T>& x = v[item < items0 ? 0 : 1];
    const int64_t j = item < items0 ? item : item - items0;
    const int64_t h = j / a.m, i = j % a.m, d = x.d, hd = x.hd, M = a.m;
    const float scale = rsqrtf(static_cast<float>(hd));
    const float* q = x.qkv + i * 3 * d + h * hd;
    float* prow = x.probs + h * M * M + i * M;
    float local_max = -INFINITY;
    for (int64_t key = lane; key < M; key += 32) {
      const float* k = x.qkv + key * 3 * d + d + h * hd;
      float s = 0.f;
      for (int64_t c = 0; c < hd; ++c) s += q[c] * k[c];
      s *= scale;
      prow[key] = s;
      local_max = fmaxf(local_max, s);
    }
    const float row_max = warp_max(local_max);
    float local_sum = 0.f;
    for (int64_t key = lane; key < M; key += 32) {
      const float e = expf(prow[key] - row_max);
      prow[key] = e;
      local_sum += e;
    }
    const float inv = 1.f / warp_sum(local_sum);
    for (int64_t key = lane; key < M; key += 32) prow[key] *= inv;
    __syncwarp();
    for (int64_t c = lane; c < hd; c += 32) {
      float acc = 0.f;
      for (int64_t key = 0; key < M; ++key) acc += prow[key] * x.qkv[key * 3 * d + 2 * d + h * hd + c];
      x.o[i * d + h * hd + c] = acc;
    }
  }
}

template <typename T>
__device__ void f_out_proj(const CmpaArgs& a, const View<T>* v, int64_t warp, int64_t warps) {
  int64_t before = 0;
  for (int s = 0; s < 2; ++s) {
    const View<T>& x = v[s];
    if (!x.active) continue;
    const int64_t d = x.d;
    const float *o = x.o, *xbar = x.xbar;
    const T* bias = x.w[OUTB];
    float* x1 = x.x1;
    linear_columns(before, warp, warps, a.m, d, d, x.w[OUTW],
                   [=](int64_t m, int64_t k) { return o[m * d + k]; },
                   [=](int64_t m, int64_t n, float acc) {
                     x1[m * d + n] = xbar[m * d + n] + acc + to_float(bias[n]);
                   });
    before += d;
  }
}

template <typename T>
__device__ void f_ln2_stats(const CmpaArgs& a, const View<T>* v, int64_t warp, int64_t warps) {
  for (int64_t r = warp; r < 2 * a.m; r += warps) {
    const View<T>& x = v[r / a.m];
    const int64_t m = r % a.m;
    if (!x.active) continue;
    row_stats(x.x1 + m * x.d, x.d, a.eps, x.stats + 4 * a.m + m, x.stats + 5 * a.m + m);
  }
}

template <typename T>
__device__ void f_fc(const CmpaArgs& a, const View<T>* v, int64_t warp, int64_t warps) {
  int64_t before = 0;
  for (int s = 0; s < 2; ++s) {
    const View<T>& x = v[s];
    if (!x.active) continue;
    const int64_t d = x.d, f = x.f, M = a.m;
    const float *x1 = x.x1, *mean = x.stats + 4 * M, *rstd = x.stats + 5 * M;
    const T *g = x.w[LN2W], *b = x.w[LN2B], *bias = x.w[FCB];
    float* h = x.h;
    linear_columns(before, warp, warps, M, f, d, x.w[FCW],
                   [=](int64_t m, int64_t k) {
                     return (x1[m * d + k] - mean[m]) * rstd[m] * to_float(g[k]) + to_float(b[k]);
                   },
                   [=](int64_t m, int64_t n, float acc) { h[m * f + n] = acc + to_float(bias[n]); });
    before += f;
  }
}

template <typename T>
__device__ void f_cproj(const CmpaArgs& a, const View<T>* v, int64_t warp, int64_t warps) {
  int64_t before = 0;
  for (int s = 0; s < 2; ++s) {
    const View<T>& x = v[s];
    if (!x.active) continue;
    const int64_t d = x.d, f = x.f;
    const float *h = x.h, *x1 = x.x1;
    const T* bias = x.w[CPB];
    T* out = x.out;
    linear_columns(before, warp, warps, a.m, d, f, x.w[CPW],
                   [=](int64_t m, int64_t k) { return quick_gelu(h[m * f + k]); },
                   [=](int64_t m, int64_t n, float acc) {
                     out[m * d + n] = from_float<T>(x1[m * d + n] + acc + to_float(bias[n]));
                   });
    before += d;
  }
}

// ---- backward stages ------------------------------------------------------------------------------------
// Items of a stage are enumerated side by side: side 0's first, then side 1's (when it is active).
template <typename T, typename Body>
__device__ void for_items(const View<T>* v, int64_t count0, int64_t count1, int64_t tid, int64_t threads, Body body) {
  const int64_t total = count0 + (v[1].active ? count1 : 0);
  for (int64_t i = tid; i < total; i += threads) {
    if (i < count0) body(v[0], i);
    else body(v[1], i - count0);
  }
}

template <typename T>
__device__ void b_reduce_upstream(const CmpaArgs& a, const View<T>* v, int64_t tid, int64_t threads) {
  for_items(v, a.m * v[0].d, a.m * v[1].d, tid, threads, [&](const View<T>& x, int64_t j) {
    const int64_t m = j / x.d, n = j % x.d;
    float acc = 0.f;
    if (x.g != nullptr)
      for (int64_t b = 0; b < x.nb; ++b) acc += to_float(x.g[m * x.sg0 + b * x.sg1 + n * x.sg2]);
    x.dy[j] = acc;
  });
}

// dh = (dy W_c) g'(h) ; dW_c = dyᵀ g(h) ; db_c = sum_m dy
template <typename T>
__device__ void b_cproj(const CmpaArgs& a, const View<T>* v, int64_t tid, int64_t threads) {
  const int64_t M = a.m;
  auto count = [&](const View<T>& x) { return x.f + x.d * x.f + x.d; };
  for_items(v, count(v[0]), count(v[1]), tid, threads, [&](const View<T>& x, int64_t j) {
    const int64_t d = x.d, f = x.f;
    if (j < f) {
      const float* dy = x.dy;
      input_grad_columns(f, M, d, j, x.w[CPW], [=](int64_t m, int64_t n) { return dy[m * d + n]; },
                         [&](int64_t m, int64_t k, float acc) { x.dh[m * f + k] = acc * quick_gelu_grad(x.h[m * f + k]); });
    } else if (j < f + d * f) {
      const int64_t e = j - f, n = e / f, k = e % f;
      float acc = 0.f;
      for (int64_t m = 0; m < M; ++m) acc += x.dy[m * d + n] * quick_gelu(x.h[m * f + k]);
      x.gw[CPW][e] = from_float<T>(acc);
    } else {
      const int64_t n = j - f - d * f;
      float acc = 0.f;
      for (int64_t m = 0; m < M; ++m) acc += x.dy[m * d + n];
      x.gw[CPB][n] = from_float<T>(acc);
    }
  });
}

// dc = dh W_fc ; dW_fc = dhᵀ LN2(x1) ; db_fc = sum_m dh
template <typename T>
__device__ void b_fc(const CmpaArgs& a, const View<T>* v, int64_t tid, int64_t threads) {
  const int64_t M = a.m;
  auto count = [&](const View<T>& x) { return x.d + x.f * x.d + x.f; };
  for_items(v, count(v[0]), count(v[1]), tid, threads, [&](const View<T>& x, int64_t j) {
    const int64_t d = x.d, f = x.f;
    const float *mean = x.stats + 4 * M, *rstd = x.stats + 5 * M;
    if (j < d) {
      const float* dh = x.dh;
      input_grad_columns(d, M, f, j, x.w[FCW], [=](int64_t m, int64_t n) { return dh[m * f + n]; },
                         [&](int64_t m, int64_t k, float acc) { x.dc[m * d + k] = acc; });
    } else if (j < d + f * d) {
      const int64_t e = j - d, n = e / d, k = e % d;
      const float gk = to_float(x.w[LN2W][k]), bk = to_float(x.w[LN2B][k]);
      float acc = 0.f;
      for (int64_t m = 0; m < M; ++m)
        acc += x.dh[m * f + n] * ((x.x1[m * d + k] - mean[m]) * rstd[m] * gk + bk);
      x.gw[FCW][e] = from_float<T>(acc);
    } else {
      const int64_t n = j - d - f * d;
      float acc = 0.f;
      for (int64_t m = 0; m < M; ++m) acc += x.dh[m * f + n];
      x.gw[FCB][n] = from_float<T>(acc);
    }
  });
}

// The row constants of a LayerNorm backward: c1 = mean(dẑ·x̂), c2 = mean(dẑ), dẑ = dz·γ (a warp per row).
template <typename T>
__device__ void ln_consts(const float* dz, const float* x, float mean, float rstd, const T* gamma, int64_t d,
                          float* c1, float* c2) {
  const int lane = threadIdx.x & 31;
  float s1 = 0.f, s2 = 0.f;
  for (int64_t k = lane; k < d; k += 32) {
    const float dzh = dz[k] * to_float(gamma[k]), xh = (x[k] - mean) * rstd;
    s1 += dzh * xh;
    s2 += dzh;
  }
  s1 = warp_sum(s1);
  s2 = warp_sum(s2);
  if (lane == 0) {
    *c1 = s1 / d;
    *c2 = s2 / d;
  }
}

// consts layout: [c1_c, c2_c, c1_a, c2_a, c1_b, c2_b], M each
template <typename T>
__device__ void b_ln2_consts(const CmpaArgs& a, const View<T>* v, int64_t warp, int64_t warps) {
  const int64_t M = a.m;
  for (int64_t r = warp; r < 2 * M; r += warps) {
    const View<T>& x = v[r / M];
    const int64_t m = r % M;
    if (!x.active) continue;
    ln_consts(x.dc + m * x.d, x.x1 + m * x.d, x.stats[4 * M + m], x.stats[5 * M + m], x.w[LN2W], x.d,
              x.consts + m, x.consts + M + m);
  }
}

// dx1 = dy + rstd (dĉ − c2 − x̂ c1) ; dγ2 = sum_m dc x̂, dβ2 = sum_m dc
template <typename T>
__device__ void b_ln2(const CmpaArgs& a, const View<T>* v, int64_t tid, int64_t threads) {
  const int64_t M = a.m;
  auto count = [&](const View<T>& x) { return M * x.d + x.d; };
  for_items(v, count(v[0]), count(v[1]), tid, threads, [&](const View<T>& x, int64_t j) {
    const int64_t d = x.d;
    const float *mean = x.stats + 4 * M, *rstd = x.stats + 5 * M;
    if (j < M * d) {
      const int64_t m = j / d, k = j % d;
      const float xh = (x.x1[j] - mean[m]) * rstd[m];
      const float dzh = x.dc[j] * to_float(x.w[LN2W][k]);
      x.dx1[j] = x.dy[j] + rstd[m] * (dzh - x.consts[M + m] - xh * x.consts[m]);
    } else {
      const int64_t k = j - M * d;
      float gw = 0.f, gb = 0.f;
      for (int64_t m = 0; m < M; ++m) {
        gw += x.dc[m * d + k] * (x.x1[m * d + k] - mean[m]) * rstd[m];
        gb += x.dc[m * d + k];
      }
      x.gw[LN2W][k] = from_float<T>(gw);
      x.gw[LN2B][k] = from_float<T>(gb);
    }
  });
}

// do = dx1 W_o ; dW_o = dx1ᵀ o ; db_o = sum_m dx1
template <typename T>
__device__ void b_out_proj(const CmpaArgs& a, const View<T>* v, int64_t tid, int64_t threads) {
  const int64_t M = a.m;
  auto count = [&](const View<T>& x) { return x.d + x.d * x.d + x.d; };
  for_items(v, count(v[0]), count(v[1]), tid, threads, [&](const View<T>& x, int64_t j) {
    const int64_t d = x.d;
    if (j < d) {
      const float* dx1 = x.dx1;
      input_grad_columns(d, M, d, j, x.w[OUTW], [=](int64_t m, int64_t n) { return dx1[m * d + n]; },
                         [&](int64_t m, int64_t k, float acc) { x.dout_attn[m * d + k] = acc; });
    } else if (j < d + d * d) {
      const int64_t e = j - d, n = e / d, k = e % d;
      float acc = 0.f;
      for (int64_t m = 0; m < M; ++m) acc += x.dx1[m * d + n] * x.o[m * d + k];
      x.gw[OUTW][e] = from_float<T>(acc);
    } else {
      const int64_t n = j - d - d * d;
      float acc = 0.f;
      for (int64_t m = 0; m < M; ++m) acc += x.dx1[m * d + n];
      x.gw[OUTB][n] = from_float<T>(acc);
    }
  });
}

// dS = P ⊙ (dP − rowsum(dP ⊙ P)) with dP = do vᵀ, and dq = dS k / √hd: a warp per (side, head, query row)
template <typename T>
__device__ void b_attention_rows(const CmpaArgs& a, const View<T>* v, int64_t warp, int64_t warps) {
  const int lane = threadIdx.x & 31;
  const int64_t M = a.m, items0 = v[0].heads * M, total = items0 + (v[1].active ? v[1].heads * M : 0);
  for (int64_t item = warp; item < total; item += warps) {
    const View<T>& x = v[item < items0 ? 0 : 1];
    const int64_t j = item < items0 ? item : item - items0;
    const int64_t h = j / M, i = j % M, d = x.d, hd = x.hd;
    const float scale = rsqrtf(static_cast<float>(hd));
    const float* prow = x.probs + h * M * M + i * M;
    float* dsrow = x.ds + h * M * M + i * M;
    const float* dout = x.dout_attn + i * d + h * hd;
    float local = 0.f;
    for (int64_t key = lane; key < M; key += 32) {
      const float* vv = x.qkv + key * 3 * d + 2 * d + h * hd;
      float dp = 0.f;
      for (int64_t c = 0; c < hd; ++c) dp += dout[c] * vv[c];
      dsrow[key] = dp;
      local += dp * prow[key];
    }
    const float dot = warp_sum(local);
    for (int64_t key = lane; key < M; key += 32) dsrow[key] = prow[key] * (dsrow[key] - dot) * scale;
    __syncwarp();
    for (int64_t c = lane; c < hd; c += 32) {
      float acc = 0.f;
      for (int64_t key = 0; key < M; ++key) acc += dsrow[key] * x.qkv[key * 3 * d + d + h * hd + c];
      x.dqkv[i * 3 * d + h * hd + c] = acc;
    }
  }
}

// dk = dSᵀ q, dv = Pᵀ do: a warp per (side, head, key row)
template <typename T>
__device__ void b_attention_keys(const CmpaArgs& a, const View<T>* v, int64_t warp, int64_t warps) {
  const int lane = threadIdx.x & 31;
  const int64_t M = a.m, items0 = v[0].heads * M, total = items0 + (v[1].active ? v[1].heads * M : 0);
  for (int64_t item = warp; item < total; item += warps) {
    const View<T>& x = v[item < items0 ? 0 : 1];
    const int64_t j = item < items0 ? item : item - items0;
    const int64_t h = j / M, key = j % M, d = x.d, hd = x.hd;
    for (int64_t c = lane; c < hd; c += 32) {
      float dk = 0.f, dv = 0.f;
      for (int64_t i = 0; i < M; ++i) {
        dk += x.ds[h * M * M + i * M + key] * x.qkv[i * 3 * d + h * hd + c];
        dv += x.probs[h * M * M + i * M + key] * x.dout_attn[i * d + h * hd + c];
      }
      x.dqkv[key * 3 * d + d + h * hd + c] = dk;
      x.dqkv[key * 3 * d + 2 * d + h * hd + c] = dv;
    }
  }
}

// da = dq W_q ; db = dk W_k + dv W_v ; dW_in = [dqᵀ LN1(p) ; dkᵀ LN1(x̄) ; dvᵀ LN1(x̄)] ; db_in = sum_m dqkv
template <typename T>
__device__ void b_in_proj(const CmpaArgs& a, const View<T>* v, int64_t tid, int64_t threads) {
  const int64_t M = a.m;
  auto count = [&](const View<T>& x) { return 2 * x.d + 3 * x.d * x.d + 3 * x.d; };
  for_items(v, count(v[0]), count(v[1]), tid, threads, [&](const View<T>& x, int64_t j) {
    const int64_t d = x.d;
    const float* dqkv = x.dqkv;
    if (j < d) {
      input_grad_columns(d, M, d, j, x.w[INW], [=](int64_t m, int64_t n) { return dqkv[m * 3 * d + n]; },
                         [&](int64_t m, int64_t k, float acc) { x.da[m * d + k] = acc; });
    } else if (j < 2 * d) {
      const int64_t k = j - d;
      // rows D..3D of W_in against [dk | dv]
      input_grad_columns(d, M, 2 * d, k, x.w[INW] + d * d,
                         [=](int64_t m, int64_t n) { return dqkv[m * 3 * d + d + n]; },
                         [&](int64_t m, int64_t kk, float acc) { x.db[m * d + kk] = acc; });
    } else if (j < 2 * d + 3 * d * d) {
      const int64_t e = j - 2 * d, r = e / d, k = e % d;
      const bool query = r < d;
      const float* src = query ? x.p : x.xbar;
      const float* mean = x.stats + (query ? 0 : 2 * M);
      const float* rstd = mean + M;
      const float gk = to_float(x.w[LN1W][k]), bk = to_float(x.w[LN1B][k]);
      float acc = 0.f;
      for (int64_t m = 0; m < M; ++m) acc += dqkv[m * 3 * d + r] * ((src[m * d + k] - mean[m]) * rstd[m] * gk + bk);
      x.gw[INW][e] = from_float<T>(acc);
    } else {
      const int64_t r = j - 2 * d - 3 * d * d;
      float acc = 0.f;
      for (int64_t m = 0; m < M; ++m) acc += dqkv[m * 3 * d + r];
      x.gw[INB][r] = from_float<T>(acc);
    }
  });
}

template <typename T>
__device__ void b_ln1_consts(const CmpaArgs& a, const View<T>* v, int64_t warp, int64_t warps) {
  const int64_t M = a.m;
  for (int64_t r = warp; r < 4 * M; r += warps) {
    const View<T>& x = v[r / (2 * M)];
    const int64_t j = r % (2 * M);
    if (!x.active) continue;
    const bool query = j < M;
    const int64_t m = query ? j : j - M;
    const float* dz = (query ? x.da : x.db) + m * x.d;
    const float* src = (query ? x.p : x.xbar) + m * x.d;
    const float* st = x.stats + (query ? 0 : 2 * M);
    float* c = x.consts + (query ? 2 * M : 4 * M);
    ln_consts(dz, src, st[m], st[M + m], x.w[LN1W], x.d, c + m, c + M + m);
  }
}

// dp = LN1_bwd(da; p) (into the dc slot), dx̄_ln = LN1_bwd(db; x̄) ; dγ1, dβ1 from both uses
template <typename T>
__device__ void b_ln1(const CmpaArgs& a, const View<T>* v, int64_t tid, int64_t threads) {
  const int64_t M = a.m;
  auto count = [&](const View<T>& x) { return 2 * M * x.d + x.d; };
  for_items(v, count(v[0]), count(v[1]), tid, threads, [&](const View<T>& x, int64_t j) {
    const int64_t d = x.d;
    if (j < 2 * M * d) {
      const bool query = j < M * d;
      const int64_t e = query ? j : j - M * d, m = e / d, k = e % d;
      const float* src = query ? x.p : x.xbar;
      const float* st = x.stats + (query ? 0 : 2 * M);
      const float* c = x.consts + (query ? 2 * M : 4 * M);
      const float xh = (src[e] - st[m]) * st[M + m];
      const float dzh = (query ? x.da : x.db)[e] * to_float(x.w[LN1W][k]);
      (query ? x.dc : x.dxbar_ln)[e] = st[M + m] * (dzh - c[M + m] - xh * c[m]);
    } else {
      const int64_t k = j - 2 * M * d;
      float gw = 0.f, gb = 0.f;
      for (int64_t m = 0; m < M; ++m) {
        const float xa = (x.p[m * d + k] - x.stats[m]) * x.stats[M + m];
        const float xb = (x.xbar[m * d + k] - x.stats[2 * M + m]) * x.stats[3 * M + m];
        gw += x.da[m * d + k] * xa + x.db[m * d + k] * xb;
        gb += x.da[m * d + k] + x.db[m * d + k];
      }
      x.gw[LN1W][k] = from_float<T>(gw);
      x.gw[LN1B][k] = from_float<T>(gb);
    }
  });
}

// dŌ = dp W_p (to the other side's pooled rows) ; dW_p = dpᵀ Ō ; db_p = sum_m dp   (dp is in the dc slot)
template <typename T>
__device__ void b_proj(const CmpaArgs& a, const View<T>* v, int64_t tid, int64_t threads) {
  const int64_t M = a.m;
  auto count = [&](const View<T>& x) { return x.d_other + x.d * x.d_other + x.d; };
  for_items(v, count(v[0]), count(v[1]), tid, threads, [&](const View<T>& x, int64_t j) {
    const int64_t d = x.d, o = x.d_other;
    const float* dp = x.dc;
    if (j < o) {
      input_grad_columns(o, M, d, j, x.w[PW], [=](int64_t m, int64_t n) { return dp[m * d + n]; },
                         [&](int64_t m, int64_t k, float acc) { x.dother[m * o + k] = acc; });
    } else if (j < o + d * o) {
      const int64_t e = j - o, n = e / o, k = e % o;
      float acc = 0.f;
      for (int64_t m = 0; m < M; ++m) acc += dp[m * d + n] * x.other_bar[m * o + k];
      x.gw[PW][e] = from_float<T>(acc);
    } else {
      const int64_t n = j - o - d * o;
      float acc = 0.f;
      for (int64_t m = 0; m < M; ++m) acc += dp[m * d + n];
      x.gw[PB][n] = from_float<T>(acc);
    }
  });
}

// dX[m, b, :] from dX̄ = dx1 + dX̄_ln (this side's own stages, when computed) + dŌ of the other side's projection
template <typename T>
__device__ void b_pool(const CmpaArgs& a, const View<T>* v, int64_t tid, int64_t threads) {
  const int64_t M = a.m;
  const int64_t count0 = M * v[0].nb * v[0].d, total = count0 + M * v[1].nb * v[1].d;
  for (int64_t i = tid; i < total; i += threads) {
    const int s = i < count0 ? 0 : 1;
    const View<T>& x = v[s];
    const int64_t e = i < count0 ? i : i - count0;
    const int64_t d = x.d, m = e / (x.nb * d), b = (e / d) % x.nb, k = e % d;
    float g = 0.f;
    if (x.active) g += x.dx1[m * d + k] + x.dxbar_ln[m * d + k];
    if (v[1 - s].active) g += x.other_dother[m * d + k];
    float val;
    if (a.fusing == 0) val = g / x.nb;
    else if (a.fusing == 1) val = b == 0 ? g : 0.f;
    else val = b == x.idx[m * d + k] ? g : 0.f;
    x.dx[e] = from_float<T>(val);
  }
}

// ---- the stage sequences ---------------------------------------------------------------------------------
constexpr int kForwardStages = 9;
constexpr int kBackwardStages = 13;

template <typename T>
__device__ void forward_stage(int stage, const CmpaArgs& a, const View<T>* v) {
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t threads = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t warp = tid / 32, warps = threads / 32;
  switch (stage) {
    case 0: f_pool(a, v, tid, threads); break;
    case 1: f_proj(a, v, warp, warps); break;
    case 2: f_ln1_stats(a, v, warp, warps); break;
    case 3: f_qkv(a, v, warp, warps); break;
    case 4: f_attention(a, v, warp, warps); break;
    case 5: f_out_proj(a, v, warp, warps); break;
    case 6: f_ln2_stats(a, v, warp, warps); break;
    case 7: f_fc(a, v, warp, warps); break;
    case 8: f_cproj(a, v, warp, warps); break;
  }
}

template <typename T>
__device__ void backward_stage(int stage, const CmpaArgs& a, const View<T>* v) {
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t threads = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t warp = tid / 32, warps = threads / 32;
  switch (stage) {
    case 0: b_reduce_upstream(a, v, tid, threads); break;
    case 1: b_cproj(a, v, tid, threads); break;
    case 2: b_fc(a, v, tid, threads); break;
    case 3: b_ln2_consts(a, v, warp, warps); break;
    case 4: b_ln2(a, v, tid, threads); break;
    case 5: b_out_proj(a, v, tid, threads); break;
    case 6: b_attention_rows(a, v, warp, warps); break;
    case 7: b_attention_keys(a, v, warp, warps); break;
    case 8: b_in_proj(a, v, tid, threads); break;
    case 9: b_ln1_consts(a, v, warp, warps); break;
    case 10: b_ln1(a, v, tid, threads); break;
    case 11: b_proj(a, v, tid, threads); break;
    case 12: b_pool(a, v, tid, threads); break;
  }
}

// The kernels' parameter: the arguments and both sides' views, built once on the host. The stages pick a view
// with a side known only at run time (v[s]); a by-value parameter indexed that way is first copied into every
// thread's local memory (1.1 KB a thread: ptxas reported a 1168-byte stack frame, some 75 MB of local-memory
// traffic per launch on an H100-sized grid). `__grid_constant__` makes the threads read it in place instead.
template <typename T>
struct CmpaLaunch {
  CmpaArgs a;
  View<T> v[2];
};
static_assert(sizeof(CmpaLaunch<float>) <= 4096, "kernel parameters are limited to 4 KB before CUDA 12.1 / Volta");

template <typename T, bool Forward>
__global__ void __launch_bounds__(kThreads) cmpa_cooperative(const __grid_constant__ CmpaLaunch<T> p) {
  cg::grid_group grid = cg::this_grid();
  const int stages = Forward ? kForwardStages : kBackwardStages;
  for (int stage = 0; stage < stages; ++stage) {
    if (Forward) forward_stage(stage, p.a, p.v);
    else backward_stage(stage, p.a, p.v);
    if (stage + 1 < stages) grid.sync();  // the next stage reads what every block wrote
  }
}

template <typename T, bool Forward>
__global__ void __launch_bounds__(kThreads) cmpa_one_stage(const __grid_constant__ CmpaLaunch<T> p, int stage) {
  if (Forward) forward_stage(stage, p.a, p.v);
  else backward_stage(stage, p.a, p.v);
}

template <typename T, bool Forward>
cudaError_t launch(const CmpaArgs& a, cudaStream_t stream, int* launches) {
  int device = 0, sms = 0, cooperative = 0, per_sm = 0;
  FP_RETURN_IF_ERROR(cudaGetDevice(&device));
  FP_RETURN_IF_ERROR(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  FP_RETURN_IF_ERROR(cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, device));
  FP_RETURN_IF_ERROR(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, cmpa_cooperative<T, Forward>,
                                                                   kThreads, 0));
  const int blocks = sms * (per_sm > 2 ? 2 : per_sm);  // every block resident: the grid-wide sync needs it
  const CmpaLaunch<T> p{a, {make_view<T>(a, 0), make_view<T>(a, 1)}};
  if (cooperative && blocks > 0) {
    const cudaError_t err = launch_cooperative_kernel(cmpa_cooperative<T, Forward>, blocks, kThreads, stream, p);
    if (err == cudaSuccess) {
      *launches = 1;
      return cudaSuccess;
    }
    if (err != cudaErrorCooperativeLaunchTooLarge) return err;
    (void)cudaGetLastError();  // fall back to one launch per stage
  }
  const int stages = Forward ? kForwardStages : kBackwardStages;
  const int grid = sms > 0 ? 4 * sms : 256;
  for (int stage = 0; stage < stages; ++stage) {
    FP_RETURN_IF_ERROR(launch_kernel(cmpa_one_stage<T, Forward>, grid, kThreads, stream, p, stage));
  }
  *launches = stages;
  return cudaSuccess;
}

}  // namespace

int64_t cmpa_forward_workspace(int64_t m, int64_t d, int64_t heads, int64_t f) { return fwd_size(m, d, heads, f); }
int64_t cmpa_backward_workspace(int64_t m, int64_t d, int64_t d_other, int64_t heads, int64_t f) {
  return bwd_size(m, d, d_other, heads, f);
}

cudaError_t cmpa_forward(const CmpaArgs& a, cudaStream_t stream, int* launches) {
  return dispatch_dtype(a.dtype, [&](auto tag) { return launch<decltype(tag), true>(a, stream, launches); });
}

cudaError_t cmpa_backward(const CmpaArgs& a, cudaStream_t stream, int* launches) {
  return dispatch_dtype(a.dtype, [&](auto tag) { return launch<decltype(tag), false>(a, stream, launches); });
}

}  // namespace fastprompt
