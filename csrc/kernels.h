// The torch-free interface between csrc/bindings.cpp (which validates, allocates and registers the ops) and
// the CUDA kernels (*.cu): raw pointers, shapes and strides in plain structs; every launcher returns the
// first CUDA error it meets.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fastprompt {

enum class DType : int { Float32 = 0, Float16 = 1, BFloat16 = 2 };

// ---- prompt insertion + LayerNorm (DESIGN.md, op 3) -----------------------------------------------------
struct InsertArgs {
  DType dtype;
  int64_t n, l, m, d, l_out;
  bool insert_mode, shared, has_ln;
  const void* x;
  int64_t sx[3];  // strides of x (N, L, D)
  const void* prompts;
  int64_t sp[3];  // strides of prompts as (N, M, D); sp[0] = 0 when shared
  int64_t start;
  const int64_t* starts;  // per-sequence offsets (N,), or null
  const void* ln_w;       // nullable
  const void* ln_b;       // nullable
  float eps;
};

struct InsertForward {
  void* y;      // (N, L_out, D) contiguous
  void* y_ln;   // (N, L_out, D) or null
  float* mean;  // (N, L_out) or null
  float* rstd;
};

struct InsertBackward {
  const void* dy;  // nullable
  int64_t sdy[3];
  const void* dy_ln;  // nullable
  int64_t sdy_ln[3];
  const float* mean;
  const float* rstd;
  void* dx;           // (N, L, D) contiguous, dtype
  void* dprompts;     // (N, M, D): fp32 rows to sum over N when shared, else dtype
  float* dw_part;     // (G, D) per-block partials, or null
  float* db_part;
  int grid;           // G
};

cudaError_t insert_prompts_forward(const InsertArgs& a, const InsertForward& out, cudaStream_t stream);
cudaError_t insert_prompts_backward(const InsertArgs& a, const InsertBackward& b, cudaStream_t stream);

// The packed variant (mode replace): x (T, D) holds N sequences, sequence n in rows [cu[n], cu[n+1]); rows
// cu[n] + s_n + [0, M) are replaced. It fills the same output structs, with y and y_ln (T, D), mean and rstd (T,),
// dx (T, D), and the (row, column) strides of the packed gradients in sdy[0..1] and sdy_ln[0..1].
struct InsertPackedArgs {
  DType dtype;
  int64_t t, n, m, d;
  bool shared, has_ln;
  const void* x;
  int64_t sx[2];  // strides of x (T, D)
  const void* prompts;
  int64_t sp[3];       // strides of prompts as (N, M, D); sp[0] = 0 when shared
  const int64_t* cu;   // cu_seqlens (N + 1,): 0 = cu[0] <= ... <= cu[N] = T, checked by the caller
  int64_t start;
  const int64_t* starts;  // per-sequence offsets (N,), or null; s_n + M <= cu[n+1] - cu[n], checked by the caller
  const void* ln_w;       // nullable
  const void* ln_b;       // nullable
  float eps;
};

cudaError_t insert_prompts_packed_forward(const InsertPackedArgs& a, const InsertForward& out, cudaStream_t stream);
cudaError_t insert_prompts_packed_backward(const InsertPackedArgs& a, const InsertBackward& b, cudaStream_t stream);
// out[j] = Σ_g part[g, j] in fp32, cast to dtype (deterministic reduction of per-block partials)
cudaError_t sum_rows(DType dtype, const float* part, int64_t rows, int64_t cols, void* out, cudaStream_t stream);

// ---- DAFE layer fusion (DESIGN.md, op 2) -----------------------------------------------------------------
enum class Gate : int { Channel = 0, Token = 1, Scalar = 2 };

struct DafeArgs {
  DType dtype;
  Gate gate;
  int64_t n, m, d;  // rows R = n·m
  const void* prev;
  int64_t sp[3];
  const void* task;
  int64_t st[3];  // st[0] = 0 when the task is shared by all N
  bool shared;    // the task is (M, D), one for all N: its gradient rows are summed over N afterwards
  const void* ln_w;
  const void* ln_b;
  const void* w_prev;  // (k, D)
  const void* b_prev;  // (k,)
  const void* w_task;  // (k, D)
  const void* alpha;   // scalar gate
  float eps;
};

struct DafeForward {
  void* out;    // (R, D) contiguous
  float* z;     // (R, k) gate logits, or null (scalar)
  float* mean;  // (R,) or null
  float* rstd;
};

struct DafeBackward {
  const void* dout;
  int64_t so[3];
  const float* z;
  const float* mean;
  const float* rstd;
  void* dprev;          // (R, D) dtype
  void* dtask;          // (R, D): fp32 rows to sum over N when shared, else dtype
  float* work;          // scratch: dz (R·D) + dh (R·D) for the channel gate
  float* part;          // per-block partials (5, G, D)
  int grid;             // G
  void* d_ln_w;         // parameter gradients, dtype (channel: dw written directly; token/scalar via partials)
  void* d_ln_b;
  void* d_w_prev;
  void* d_b_prev;
  void* d_w_task;
  void* d_alpha;
};

cudaError_t dafe_forward(const DafeArgs& a, const DafeForward& out, cudaStream_t stream);
cudaError_t dafe_backward(const DafeArgs& a, const DafeBackward& b, cudaStream_t stream);

// ---- cross-modal prompt attention (DESIGN.md, op 1) ------------------------------------------------------
// One side's parameters, in CMPASideParams order.
struct CmpaSide {
  int64_t nb, d, d_other, heads, f;  // B (or C), width, other width, heads, MLP width
  const void* x;                     // input (M, NB, D)
  int64_t sx[3];
  const void* w[14];                 // proj W/b, ln1 w/b, in_proj W/b, out_proj W/b, ln2 w/b, fc W/b, cproj W/b
  float* ws;                         // forward workspace (fp32, the layout of fastprompt/ops/cmpa_layout.py)
  int32_t* idx;                      // argmax of max pooling (M, D), or null
  void* out;                         // (M, D) output, or null (text side not computed)
  // backward
  const void* g;                     // upstream gradient (M, NB, D), or null
  int64_t sg[3];
  float* bws;                        // backward workspace (fp32)
  void* grad_w[14];                  // parameter gradients (dtype), null when not computed
  void* dx;                          // input gradient (M, NB, D) contiguous
};

struct CmpaArgs {
  DType dtype;
  int64_t m;
  int fusing;  // 0 mean, 1 first, 2 max
  bool text_side;
  float eps;
  CmpaSide side[2];  // visual, text
};

// Forward in one cooperative launch (grid-wide syncs between stages), or one launch per stage when the
// device cannot run the cooperative grid. `launches` receives the number of launches made.
cudaError_t cmpa_forward(const CmpaArgs& a, cudaStream_t stream, int* launches);
cudaError_t cmpa_backward(const CmpaArgs& a, cudaStream_t stream, int* launches);

}  // namespace fastprompt
