// fastprompt._C: the CUDA C++ backend.
//
// This is the only translation unit that includes the torch headers; the kernels live in torch-free .cu files
// taking raw pointers, shapes and strides (csrc/kernels.h). Here the raw ops are registered as
// fastprompt::<op>_{fwd,bwd}_cuda with TORCH_LIBRARY_FRAGMENT, with the schemas of the op's declaration
// (fastprompt/ops/<op>.py: tests/ops/test_op_declarations.py compares them with these strings, and the Python side
// refuses a build whose schemas differ), so one autograd Function drives every backend. Their inputs are checked
// with messages a user understands, their outputs allocated, and every CUDA error turned into a Python error. The
// fakes (meta implementations) are the declaration's, registered from Python (fastprompt/ops/cuda.py).
//
// With FASTPROMPT_CUDA_EMULATOR defined, the same file builds the CPU emulation of the tests (tests/cuda_emulator/,
// FASTPROMPT_CUDA_EMULATE=1): no CUDA headers or runtime, the ops registered for CPU tensors, which the emulator's
// scheduler runs the unchanged kernels on.

#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros_like.h>
#ifndef FASTPROMPT_CUDA_EMULATOR
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif
#include <cuda_runtime_api.h>
#include <torch/headeronly/version.h>
#include <torch/library.h>

#include <atomic>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "kernels.h"

namespace fastprompt {

int64_t cmpa_forward_workspace(int64_t m, int64_t d, int64_t heads, int64_t f);
int64_t cmpa_backward_workspace(int64_t m, int64_t d, int64_t d_other, int64_t heads, int64_t f);

namespace {

using Tensors = std::vector<at::Tensor>;

// Kernel launches made by the CMPA ops since the library loaded: the GPU tests read it to check the
// one-launch-each-way design (a device that cannot hold the cooperative grid falls back to one per stage).
std::atomic<int64_t> cmpa_launch_count{0};
int64_t cmpa_launches() { return cmpa_launch_count.load(); }

// What the extension was built against, one string literal behind a marker. The cuda_build_info op returns it
// and fastprompt/_extension.py compares it with the running torch; a build for another torch usually cannot
// even load (undefined symbols), and then _extension.py finds the literal in the file's bytes instead, so
// that the refusal names both versions either way.
#define FASTPROMPT_STR_(x) #x
#define FASTPROMPT_STR(x) FASTPROMPT_STR_(x)
#ifdef FASTPROMPT_CUDA_EMULATOR
constexpr char kBuildInfo[] = "fastprompt-build-info;torch=" TORCH_VERSION ";cuda=emulator;";
#else
constexpr char kBuildInfo[] = "fastprompt-build-info;torch=" TORCH_VERSION ";cudart=" FASTPROMPT_STR(CUDART_VERSION) ";";
#endif

std::string cuda_build_info() { return kBuildInfo; }

DType dtype_of(const char* op, const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::Float32;
    case at::kHalf: return DType::Float16;
    case at::kBFloat16: return DType::BFloat16;
    default: TORCH_CHECK(false, op, ": the cuda backend takes float32, float16 and bfloat16, got ", t.scalar_type());
  }
}

// Same device and dtype as the first input. The CUDA requirement itself is checked last (require_cuda), after
// every shape check, so that bad shapes get their own message wherever the tensors live.
void check_input(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like) {
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " is on ", t.device(), " but the inputs are on ",
              like.device(), " (mixed devices)");
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", name, " is ", t.scalar_type(), " but the inputs are ",
              like.scalar_type(), " (mixed dtypes)");
}

#ifdef FASTPROMPT_CUDA_EMULATOR
// the emulator runs the kernels on the CPU: its "device memory" is CPU tensors
void require_cuda(const char* op, const at::Tensor& t) {
  TORCH_CHECK(t.is_cpu(), op, ": the emulated cuda backend (FASTPROMPT_CUDA_EMULATE=1) takes CPU tensors, got ",
              "tensors on ", t.device());
}
#else
void require_cuda(const char* op, const at::Tensor& t) {
  TORCH_CHECK(t.is_cuda(), op, ": the cuda backend takes CUDA tensors, got tensors on ", t.device(),
              " (use backend='reference', or 'triton' with TRITON_INTERPRET=1, on the CPU)");
}
#endif

void require_nonempty(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.numel() > 0, op, ": ", name, " is empty (shape ", t.sizes(), ")");
}

void check_shape(const char* op, const char* name, const at::Tensor& t, std::vector<int64_t> shape) {
  TORCH_CHECK(t.sizes() == at::IntArrayRef(shape), op, ": ", name, " must have shape ", at::IntArrayRef(shape),
              ", got ", t.sizes());
}

void check(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA error: ", cudaGetErrorString(err));
}

#ifdef FASTPROMPT_CUDA_EMULATOR
cudaStream_t stream_of(const at::Tensor&) { return nullptr; }
struct DeviceGuard {  // one emulated device
  explicit DeviceGuard(at::Device) {}
};
#else
cudaStream_t stream_of(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.device().index()).stream(); }
using DeviceGuard = c10::cuda::CUDAGuard;
#endif

void strides3(const at::Tensor& t, int64_t* out) {
  for (int i = 0; i < 3; ++i) out[i] = t.stride(i);
}

const void* ptr_or_null(const std::optional<at::Tensor>& t) { return t.has_value() ? t->data_ptr() : nullptr; }

// ---- prompt insertion ------------------------------------------------------------------------------------
// The part of the argument checks both insertions share (InsertArgs and InsertPackedArgs): per-sequence
// offsets (their values are checked in Python, a host sync) and the LayerNorm parameters.
template <typename Args>
void starts_and_layer_norm(const char* op, Args& a, const at::Tensor& x, const std::optional<at::Tensor>& starts,
                           const std::optional<at::Tensor>& ln_weight, const std::optional<at::Tensor>& ln_bias,
                           double eps) {
  if (starts.has_value()) {
    TORCH_CHECK(starts->device() == x.device() && starts->scalar_type() == at::kLong && starts->numel() == a.n &&
                    starts->is_contiguous(),
                op, ": starts must be a contiguous int64 tensor of N offsets on the device of x");
    a.starts = starts->data_ptr<int64_t>();
  }
  for (const auto* p : {&ln_weight, &ln_bias})
    if (p->has_value()) {
      check_input(op, "a LayerNorm parameter", **p, x);
      TORCH_CHECK((*p)->numel() == a.d && (*p)->is_contiguous(), op, ": LayerNorm parameters must be (D,)");
    }
  a.ln_w = ptr_or_null(ln_weight);
  a.ln_b = ptr_or_null(ln_bias);
  a.has_ln = ln_weight.has_value() || ln_bias.has_value();
  a.eps = static_cast<float>(eps);
}

InsertArgs insert_args(const char* op, const at::Tensor& x, const at::Tensor& prompts, int64_t start,
                       const std::optional<at::Tensor>& starts, const std::optional<at::Tensor>& ln_weight,
                       const std::optional<at::Tensor>& ln_bias, double eps, c10::string_view mode) {
  TORCH_CHECK(x.dim() == 3, op, ": x must be 3-D (N, L, D), got ", x.sizes());
  TORCH_CHECK(prompts.dim() == 2 || prompts.dim() == 3, op, ": prompts must be (M, D) or (N, M, D)");
  TORCH_CHECK(mode == "replace" || mode == "insert", op, ": mode must be replace or insert");
  check_input(op, "prompts", prompts, x);
  require_nonempty(op, "x", x);
  require_nonempty(op, "prompts", prompts);
  InsertArgs a{};
  a.dtype = dtype_of(op, x);
  a.n = x.size(0); a.l = x.size(1); a.d = x.size(2); a.m = prompts.size(-2);
  TORCH_CHECK(prompts.size(-1) == a.d, op, ": prompts have width ", prompts.size(-1), " but x has ", a.d);
  TORCH_CHECK(prompts.dim() == 2 || prompts.size(0) == a.n, op, ": per-sequence prompts must have N = ", a.n,
              " rows, got ", prompts.size(0));
  a.insert_mode = mode == "insert";
  TORCH_CHECK(a.insert_mode || a.m <= a.l, op, ": ", a.m, " prompts do not fit in ", a.l, " tokens");
  a.l_out = a.insert_mode ? a.l + a.m : a.l;
  a.shared = prompts.dim() == 2;
  a.x = x.data_ptr();
  strides3(x, a.sx);
  a.prompts = prompts.data_ptr();
  if (a.shared) {
    a.sp[0] = 0; a.sp[1] = prompts.stride(0); a.sp[2] = prompts.stride(1);
  } else {
    strides3(prompts, a.sp);
  }
  a.start = start;
  const int64_t last = a.insert_mode ? a.l : a.l - a.m;  // per-sequence starts are checked in Python (a sync)
  TORCH_CHECK(starts.has_value() || (start >= 0 && start <= last), op, ": start=", start,
              " is out of range: 0 <= start <= ", last, " for mode ", mode);
  starts_and_layer_norm(op, a, x, starts, ln_weight, ln_bias, eps);
  return a;
}

std::tuple<at::Tensor, at::Tensor, Tensors> insert_fwd(const at::Tensor& x, const at::Tensor& prompts, int64_t start,
                                                       const std::optional<at::Tensor>& starts,
                                                       const std::optional<at::Tensor>& ln_weight,
                                                       const std::optional<at::Tensor>& ln_bias, double eps,
                                                       c10::string_view mode) {
  const char* op = "fastprompt::insert_prompts_fwd_cuda";
  const InsertArgs a = insert_args(op, x, prompts, start, starts, ln_weight, ln_bias, eps, mode);
  require_cuda(op, x);
  DeviceGuard guard(x.device());
  at::Tensor y = at::empty({a.n, a.l_out, a.d}, x.options());
  at::Tensor y_ln = a.has_ln ? at::empty({a.n, a.l_out, a.d}, x.options()) : at::empty({0}, x.options());
  Tensors saved;
  InsertForward out{y.data_ptr(), nullptr, nullptr, nullptr};
  if (a.has_ln) {
    saved = {at::empty({a.n, a.l_out}, x.options().dtype(at::kFloat)),
             at::empty({a.n, a.l_out}, x.options().dtype(at::kFloat))};
    out.y_ln = y_ln.data_ptr();
    out.mean = saved[0].data_ptr<float>();
    out.rstd = saved[1].data_ptr<float>();
  }
  check(insert_prompts_forward(a, out, stream_of(x)), op);
  return {y, y_ln, saved};
}

int sm_count(const at::Tensor& t) {
  int sms = 0;
  check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, t.device().index()), "fastprompt");
  return sms;
}

// What follows the checks in both insertion backwards (N x L and packed share InsertBackward): allocate dx
// (`dx_shape`), the prompt rows' gradient (fp32 per sequence when the prompts are shared) and the LayerNorm
// affine's per-block partials over `rows` output rows, launch, then reduce the shared rows and the partials.
template <typename Launch>
std::tuple<at::Tensor, at::Tensor, Tensors> insert_backward_outputs(
    const char* op, InsertBackward& b, const at::Tensor& x, const at::Tensor& prompts,
    const std::optional<at::Tensor>& ln_weight, const std::optional<at::Tensor>& ln_bias, at::IntArrayRef dx_shape,
    int64_t rows, DType dtype, int64_t n, int64_t m, int64_t d, bool shared, bool has_dyln, Launch launch) {
  require_cuda(op, x);
  DeviceGuard guard(x.device());
  b.grid = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(rows, 4 * sm_count(x))));
  at::Tensor dx = at::empty(dx_shape, x.options());
  at::Tensor dp = shared ? at::empty({n, m, d}, x.options().dtype(at::kFloat)) : at::empty({n, m, d}, prompts.options());
  at::Tensor parts = has_dyln ? at::empty({2, b.grid, d}, x.options().dtype(at::kFloat)) : at::Tensor();
  b.dx = dx.data_ptr();
  b.dprompts = dp.data_ptr();
  if (has_dyln) {
    b.dw_part = parts[0].data_ptr<float>();
    b.db_part = parts[1].data_ptr<float>();
  }
  const cudaStream_t stream = stream_of(x);
  check(launch(stream), op);
  at::Tensor dprompts = dp;
  if (shared) {
    dprompts = at::empty({m, d}, prompts.options());
    check(sum_rows(dtype, dp.data_ptr<float>(), n, m * d, dprompts.data_ptr(), stream), op);
  }
  Tensors ln_grads;
  for (int i = 0; i < 2; ++i) {
    const auto& p = i == 0 ? ln_weight : ln_bias;
    if (!p.has_value()) continue;
    at::Tensor g = at::zeros_like(*p);
    if (has_dyln) check(sum_rows(dtype, parts[i].data_ptr<float>(), b.grid, d, g.data_ptr(), stream), op);
    ln_grads.push_back(g);
  }
  return {dx, dprompts, ln_grads};
}

std::tuple<at::Tensor, at::Tensor, Tensors> insert_bwd(const std::optional<at::Tensor>& grad_y,
                                                       const std::optional<at::Tensor>& grad_y_ln,
                                                       const at::Tensor& x, const at::Tensor& prompts, int64_t start,
                                                       const std::optional<at::Tensor>& starts,
                                                       const std::optional<at::Tensor>& ln_weight,
                                                       const std::optional<at::Tensor>& ln_bias, at::TensorList saved,
                                                       double eps, c10::string_view mode) {
  const char* op = "fastprompt::insert_prompts_bwd_cuda";
  const InsertArgs a = insert_args(op, x, prompts, start, starts, ln_weight, ln_bias, eps, mode);
  const bool has_dyln = grad_y_ln.has_value() && a.has_ln;
  InsertBackward b{};
  if (grad_y.has_value()) {
    check_input(op, "grad_y", *grad_y, x);
    check_shape(op, "grad_y", *grad_y, {a.n, a.l_out, a.d});
    b.dy = grad_y->data_ptr();
    strides3(*grad_y, b.sdy);
  }
  if (has_dyln) {
    check_input(op, "grad_y_ln", *grad_y_ln, x);
    check_shape(op, "grad_y_ln", *grad_y_ln, {a.n, a.l_out, a.d});
    TORCH_CHECK(saved.size() == 2, op, ": the forward's statistics are missing");
    for (const auto& t : saved)
      TORCH_CHECK(t.scalar_type() == at::kFloat && t.numel() == a.n * a.l_out && t.is_contiguous() &&
                      t.device() == x.device(),
                  op, ": saved statistics must be the forward's fp32 (N, L_out) mean and rstd");
    b.dy_ln = grad_y_ln->data_ptr();
    strides3(*grad_y_ln, b.sdy_ln);
    b.mean = saved[0].data_ptr<float>();
    b.rstd = saved[1].data_ptr<float>();
  }
  return insert_backward_outputs(op, b, x, prompts, ln_weight, ln_bias, {a.n, a.l, a.d}, a.n * a.l_out, a.dtype,
                                 a.n, a.m, a.d, a.shared, has_dyln,
                                 [&](cudaStream_t stream) { return insert_prompts_backward(a, b, stream); });
}

// ---- packed prompt insertion -------------------------------------------------------------------------------
// cu_seqlens' values (0 first, T last, non-decreasing) and start_n + M <= length_n need the host: they are checked
// in Python (fastprompt/ops/insert.py, one sync in eager mode); here the shapes, dtypes and devices.
InsertPackedArgs insert_packed_args(const char* op, const at::Tensor& x, const at::Tensor& prompts,
                                    const at::Tensor& cu_seqlens, int64_t start, const std::optional<at::Tensor>& starts,
                                    const std::optional<at::Tensor>& ln_weight,
                                    const std::optional<at::Tensor>& ln_bias, double eps) {
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D (T, D) packed sequences, got ", x.sizes());
  TORCH_CHECK(prompts.dim() == 2 || prompts.dim() == 3, op, ": prompts must be (M, D) or (N, M, D)");
  check_input(op, "prompts", prompts, x);
  require_nonempty(op, "x", x);
  require_nonempty(op, "prompts", prompts);
  TORCH_CHECK(cu_seqlens.dim() == 1 && cu_seqlens.numel() >= 2 && cu_seqlens.scalar_type() == at::kLong &&
                  cu_seqlens.is_contiguous() && cu_seqlens.device() == x.device(),
              op, ": cu_seqlens must be a contiguous int64 tensor (N + 1,), N >= 1, on the device of x, got ",
              cu_seqlens.scalar_type(), " ", cu_seqlens.sizes(), " on ", cu_seqlens.device());
  InsertPackedArgs a{};
  a.dtype = dtype_of(op, x);
  a.t = x.size(0); a.d = x.size(1); a.n = cu_seqlens.numel() - 1; a.m = prompts.size(-2);
  TORCH_CHECK(prompts.size(-1) == a.d, op, ": prompts have width ", prompts.size(-1), " but x has ", a.d);
  TORCH_CHECK(prompts.dim() == 2 || prompts.size(0) == a.n, op, ": per-sequence prompts must have N = ", a.n,
              " rows (cu_seqlens holds N + 1 offsets), got ", prompts.size(0));
  TORCH_CHECK(a.m <= a.t, op, ": ", a.m, " prompts do not fit in ", a.t, " tokens");
  a.shared = prompts.dim() == 2;
  a.x = x.data_ptr();
  a.sx[0] = x.stride(0); a.sx[1] = x.stride(1);
  a.prompts = prompts.data_ptr();
  if (a.shared) {
    a.sp[0] = 0; a.sp[1] = prompts.stride(0); a.sp[2] = prompts.stride(1);
  } else {
    strides3(prompts, a.sp);
  }
  a.cu = cu_seqlens.data_ptr<int64_t>();
  a.start = start;
  TORCH_CHECK(starts.has_value() || start >= 0, op, ": start=", start, " is out of range: start >= 0");
  starts_and_layer_norm(op, a, x, starts, ln_weight, ln_bias, eps);
  return a;
}

std::tuple<at::Tensor, at::Tensor, Tensors> insert_packed_fwd(const at::Tensor& x, const at::Tensor& prompts,
                                                              const at::Tensor& cu_seqlens, int64_t start,
                                                              const std::optional<at::Tensor>& starts,
                                                              const std::optional<at::Tensor>& ln_weight,
                                                              const std::optional<at::Tensor>& ln_bias, double eps) {
  const char* op = "fastprompt::insert_prompts_packed_fwd_cuda";
  const InsertPackedArgs a = insert_packed_args(op, x, prompts, cu_seqlens, start, starts, ln_weight, ln_bias, eps);
  require_cuda(op, x);
  DeviceGuard guard(x.device());
  at::Tensor y = at::empty({a.t, a.d}, x.options());
  at::Tensor y_ln = a.has_ln ? at::empty({a.t, a.d}, x.options()) : at::empty({0}, x.options());
  Tensors saved;
  InsertForward out{y.data_ptr(), nullptr, nullptr, nullptr};
  if (a.has_ln) {
    saved = {at::empty({a.t}, x.options().dtype(at::kFloat)), at::empty({a.t}, x.options().dtype(at::kFloat))};
    out.y_ln = y_ln.data_ptr();
    out.mean = saved[0].data_ptr<float>();
    out.rstd = saved[1].data_ptr<float>();
  }
  check(insert_prompts_packed_forward(a, out, stream_of(x)), op);
  return {y, y_ln, saved};
}

std::tuple<at::Tensor, at::Tensor, Tensors> insert_packed_bwd(
    const std::optional<at::Tensor>& grad_y, const std::optional<at::Tensor>& grad_y_ln, const at::Tensor& x,
    const at::Tensor& prompts, const at::Tensor& cu_seqlens, int64_t start, const std::optional<at::Tensor>& starts,
    const std::optional<at::Tensor>& ln_weight, const std::optional<at::Tensor>& ln_bias, at::TensorList saved,
    double eps) {
  const char* op = "fastprompt::insert_prompts_packed_bwd_cuda";
  const InsertPackedArgs a = insert_packed_args(op, x, prompts, cu_seqlens, start, starts, ln_weight, ln_bias, eps);
  const bool has_dyln = grad_y_ln.has_value() && a.has_ln;
  InsertBackward b{};
  if (grad_y.has_value()) {
    check_input(op, "grad_y", *grad_y, x);
    check_shape(op, "grad_y", *grad_y, {a.t, a.d});
    b.dy = grad_y->data_ptr();
    b.sdy[0] = grad_y->stride(0); b.sdy[1] = grad_y->stride(1);
  }
  if (has_dyln) {
    check_input(op, "grad_y_ln", *grad_y_ln, x);
    check_shape(op, "grad_y_ln", *grad_y_ln, {a.t, a.d});
    TORCH_CHECK(saved.size() == 2, op, ": the forward's statistics are missing");
    for (const auto& t : saved)
      TORCH_CHECK(t.scalar_type() == at::kFloat && t.numel() == a.t && t.is_contiguous() && t.device() == x.device(),
                  op, ": saved statistics must be the forward's fp32 (T,) mean and rstd");
    b.dy_ln = grad_y_ln->data_ptr();
    b.sdy_ln[0] = grad_y_ln->stride(0); b.sdy_ln[1] = grad_y_ln->stride(1);
    b.mean = saved[0].data_ptr<float>();
    b.rstd = saved[1].data_ptr<float>();
  }
  return insert_backward_outputs(op, b, x, prompts, ln_weight, ln_bias, {a.t, a.d}, a.t, a.dtype, a.n, a.m, a.d,
                                 a.shared, has_dyln,
                                 [&](cudaStream_t stream) { return insert_prompts_packed_backward(a, b, stream); });
}

// ---- DAFE ------------------------------------------------------------------------------------------------
DafeArgs dafe_args(const char* op, const at::Tensor& prev, const at::Tensor& task, at::TensorList params,
                   c10::string_view gate, double eps) {
  TORCH_CHECK(prev.dim() == 3, op, ": prev must be 3-D (N, M, D), got ", prev.sizes());
  TORCH_CHECK(task.dim() == 2 || task.dim() == 3, op, ": task must be (M, D) or (N, M, D)");
  check_input(op, "task", task, prev);
  require_nonempty(op, "prev", prev);
  DafeArgs a{};
  a.dtype = dtype_of(op, prev);
  a.n = prev.size(0); a.m = prev.size(1); a.d = prev.size(2);
  a.prev = prev.data_ptr();
  strides3(prev, a.sp);
  check_shape(op, "task", task, task.dim() == 2 ? std::vector<int64_t>{a.m, a.d}
                                               : std::vector<int64_t>{a.n, a.m, a.d});
  a.task = task.data_ptr();
  a.shared = task.dim() == 2;
  if (a.shared) {
    a.st[0] = 0; a.st[1] = task.stride(0); a.st[2] = task.stride(1);
  } else {
    strides3(task, a.st);
  }
  for (const auto& p : params) {
    check_input(op, "a gate parameter", p, prev);
    TORCH_CHECK(p.is_contiguous(), op, ": gate parameters must be contiguous");
  }
  if (gate == "scalar") {
    TORCH_CHECK(params.size() == 1 && params[0].numel() == 1, op, ": the scalar gate takes [alpha], one element");
    a.gate = Gate::Scalar;
    a.alpha = params[0].data_ptr();
  } else {
    TORCH_CHECK(gate == "channel" || gate == "token", op, ": gate must be channel, token or scalar");
    TORCH_CHECK(params.size() == 5, op, ": the ", gate, " gate takes [ln_weight, ln_bias, W_g, b_g, U_g]");
    a.gate = gate == "channel" ? Gate::Channel : Gate::Token;
    const int64_t k = a.gate == Gate::Channel ? a.d : 1;
    check_shape(op, "ln_weight", params[0], {a.d});
    check_shape(op, "ln_bias", params[1], {a.d});
    check_shape(op, "gate_prev_weight", params[2], {k, a.d});
    check_shape(op, "gate_prev_bias", params[3], {k});
    check_shape(op, "gate_task_weight", params[4], {k, a.d});
    a.ln_w = params[0].data_ptr(); a.ln_b = params[1].data_ptr(); a.w_prev = params[2].data_ptr();
    a.b_prev = params[3].data_ptr(); a.w_task = params[4].data_ptr();
  }
  a.eps = static_cast<float>(eps);
  return a;
}

std::tuple<at::Tensor, Tensors> dafe_fwd(const at::Tensor& prev, const at::Tensor& task, at::TensorList params,
                                         c10::string_view gate, double eps) {
  const char* op = "fastprompt::dafe_fwd_cuda";
  const DafeArgs a = dafe_args(op, prev, task, params, gate, eps);
  require_cuda(op, prev);
  DeviceGuard guard(prev.device());
  at::Tensor out = at::empty({a.n, a.m, a.d}, prev.options());
  DafeForward o{out.data_ptr(), nullptr, nullptr, nullptr};
  Tensors saved;
  if (a.gate != Gate::Scalar) {
    const int64_t k = a.gate == Gate::Channel ? a.d : 1;
    const auto f32 = prev.options().dtype(at::kFloat);
    saved = {at::empty({a.n, a.m, k}, f32), at::empty({a.n * a.m}, f32), at::empty({a.n * a.m}, f32)};
    o.z = saved[0].data_ptr<float>();
    o.mean = saved[1].data_ptr<float>();
    o.rstd = saved[2].data_ptr<float>();
  }
  check(dafe_forward(a, o, stream_of(prev)), op);
  return {out, saved};
}

std::tuple<at::Tensor, at::Tensor, Tensors> dafe_bwd(const at::Tensor& grad_out, const at::Tensor& prev,
                                                     const at::Tensor& task, at::TensorList params,
                                                     at::TensorList saved, c10::string_view gate, double eps) {
  const char* op = "fastprompt::dafe_bwd_cuda";
  const DafeArgs a = dafe_args(op, prev, task, params, gate, eps);
  check_input(op, "grad_out", grad_out, prev);
  check_shape(op, "grad_out", grad_out, {a.n, a.m, a.d});
  const int64_t rows = a.n * a.m, d = a.d;
  const auto f32 = prev.options().dtype(at::kFloat);
  DafeBackward b{};
  b.dout = grad_out.data_ptr();
  strides3(grad_out, b.so);
  if (a.gate != Gate::Scalar) {
    TORCH_CHECK(saved.size() == 3, op, ": the forward's gate logits and statistics are missing");
    const int64_t k = a.gate == Gate::Channel ? a.d : 1;
    const int64_t sizes[3] = {a.n * a.m * k, a.n * a.m, a.n * a.m};
    for (int i = 0; i < 3; ++i)
      TORCH_CHECK(saved[i].scalar_type() == at::kFloat && saved[i].numel() == sizes[i] && saved[i].is_contiguous() &&
                      saved[i].device() == prev.device(),
                  op, ": saved[", i, "] is not the forward's fp32 gate logits / statistics");
    b.z = saved[0].data_ptr<float>(); b.mean = saved[1].data_ptr<float>(); b.rstd = saved[2].data_ptr<float>();
  }
  require_cuda(op, prev);
  DeviceGuard guard(prev.device());
  b.grid = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(rows, 4 * sm_count(prev))));
  at::Tensor dprev = at::empty({a.n, a.m, d}, prev.options());
  at::Tensor dtask_rows = a.shared ? at::empty({a.n, a.m, d}, f32) : at::empty({a.n, a.m, d}, task.options());
  at::Tensor work = a.gate == Gate::Channel ? at::empty({2 * rows * d}, f32) : at::Tensor();
  at::Tensor part = at::empty({5, b.grid, d}, f32);
  b.dprev = dprev.data_ptr();
  b.dtask = dtask_rows.data_ptr();
  b.work = work.defined() ? work.data_ptr<float>() : nullptr;
  b.part = part.data_ptr<float>();
  Tensors grads;
  for (const auto& p : params) grads.push_back(at::empty_like(p));
  if (a.gate == Gate::Scalar) {
    b.d_alpha = grads[0].data_ptr();
  } else {
    b.d_ln_w = grads[0].data_ptr(); b.d_ln_b = grads[1].data_ptr(); b.d_w_prev = grads[2].data_ptr();
    b.d_b_prev = grads[3].data_ptr(); b.d_w_task = grads[4].data_ptr();
  }
  const cudaStream_t stream = stream_of(prev);
  check(dafe_backward(a, b, stream), op);
  at::Tensor dtask = dtask_rows;
  if (a.shared) {
    dtask = at::empty({a.m, d}, task.options());
    check(sum_rows(a.dtype, dtask_rows.data_ptr<float>(), a.n, a.m * d, dtask.data_ptr(), stream), op);
  }
  return {dprev, dtask, grads};
}

// ---- CMPA ------------------------------------------------------------------------------------------------
int fusing_code(const char* op, c10::string_view fusing) {
  if (fusing == "mean") return 0;
  if (fusing == "first") return 1;
  TORCH_CHECK(fusing == "max", op, ": fusing must be mean, first or max");
  return 2;
}

void side_args(const char* op, CmpaSide& s, const at::Tensor& x, at::TensorList params, int64_t heads,
               int64_t d_other, Tensors& keep) {
  TORCH_CHECK(x.dim() == 3, op, ": the prompt rows must be 3-D (M, B, D), got ", x.sizes());
  TORCH_CHECK(params.size() == 14, op, ": each side takes 14 parameters, got ", params.size());
  TORCH_CHECK(params[10].dim() == 2, op, ": fc_weight must be 2-D (F, D), got ", params[10].sizes());
  s.nb = x.size(1); s.d = x.size(2); s.d_other = d_other; s.heads = heads; s.f = params[10].size(0);
  TORCH_CHECK(heads > 0 && s.d % heads == 0, op, ": the width ", s.d, " is not divisible by ", heads, " heads");
  require_nonempty(op, "the prompt rows", x);
  s.x = x.data_ptr();
  strides3(x, s.sx);
  const int64_t d = s.d, f = s.f;
  const std::vector<int64_t> shapes[14] = {{d, d_other}, {d}, {d}, {d}, {3 * d, d}, {3 * d}, {d, d}, {d},
                                           {d},          {d}, {f, d}, {f}, {d, f}, {d}};
  static const char* names[14] = {"proj_weight",     "proj_bias",     "ln1_weight", "ln1_bias",  "in_proj_weight",
                                  "in_proj_bias",    "out_proj_weight", "out_proj_bias", "ln2_weight", "ln2_bias",
                                  "fc_weight",       "fc_bias",       "cproj_weight", "cproj_bias"};
  for (int i = 0; i < 14; ++i) {
    check_input(op, names[i], params[i], x);
    check_shape(op, names[i], params[i], shapes[i]);
    keep.push_back(params[i].contiguous());
    s.w[i] = keep.back().data_ptr();
  }
}

CmpaArgs cmpa_args(const char* op, const at::Tensor& visual, const at::Tensor& text, at::TensorList visual_params,
                   at::TensorList text_params, int64_t n_head_visual, int64_t n_head_text, c10::string_view fusing,
                   double eps, bool compute_text, Tensors& keep) {
  check_input(op, "text", text, visual);
  TORCH_CHECK(visual.dim() == 3 && text.dim() == 3, op, ": visual (M, B, Dv) and text (M, C, Dt) must be 3-D, got ",
              visual.sizes(), " and ", text.sizes());
  TORCH_CHECK(visual.size(0) == text.size(0), op, ": visual and text must share M, got ", visual.size(0), " and ",
              text.size(0));
  CmpaArgs a{};
  a.dtype = dtype_of(op, visual);
  a.m = visual.size(0);
  a.fusing = fusing_code(op, fusing);
  a.text_side = compute_text;
  a.eps = static_cast<float>(eps);
  side_args(op, a.side[0], visual, visual_params, n_head_visual, text.size(2), keep);
  side_args(op, a.side[1], text, text_params, n_head_text, visual.size(2), keep);
  return a;
}

std::tuple<at::Tensor, at::Tensor, Tensors> cmpa_fwd(const at::Tensor& visual, const at::Tensor& text,
                                                     at::TensorList visual_params, at::TensorList text_params,
                                                     int64_t n_head_visual, int64_t n_head_text,
                                                     c10::string_view fusing, double eps, bool compute_text) {
  const char* op = "fastprompt::cmpa_fwd_cuda";
  Tensors keep;
  CmpaArgs a = cmpa_args(op, visual, text, visual_params, text_params, n_head_visual, n_head_text, fusing, eps,
                         compute_text, keep);
  require_cuda(op, visual);
  DeviceGuard guard(visual.device());
  const auto f32 = visual.options().dtype(at::kFloat);
  auto& v = a.side[0];
  auto& t = a.side[1];
  at::Tensor ws_v = at::empty({cmpa_forward_workspace(a.m, v.d, v.heads, v.f)}, f32);
  // without the text side only its pooled rows (the head of its workspace) are computed and kept
  at::Tensor ws_t = at::empty({compute_text ? cmpa_forward_workspace(a.m, t.d, t.heads, t.f) : a.m * t.d}, f32);
  const bool is_max = a.fusing == 2;
  const auto i32 = visual.options().dtype(at::kInt);
  at::Tensor idx_v = at::empty(is_max ? at::IntArrayRef{a.m, v.d} : at::IntArrayRef{0}, i32);
  at::Tensor idx_t = at::empty(is_max ? at::IntArrayRef{a.m, t.d} : at::IntArrayRef{0}, i32);
  at::Tensor out_v = at::empty({a.m, v.d}, visual.options());
  at::Tensor out_t = compute_text ? at::empty({a.m, t.d}, text.options()) : at::empty({0}, text.options());
  v.ws = ws_v.data_ptr<float>(); t.ws = ws_t.data_ptr<float>();
  v.idx = is_max ? idx_v.data_ptr<int32_t>() : nullptr;
  t.idx = is_max ? idx_t.data_ptr<int32_t>() : nullptr;
  v.out = out_v.data_ptr();
  t.out = compute_text ? out_t.data_ptr() : nullptr;
  int launches = 0;
  check(cmpa_forward(a, stream_of(visual), &launches), op);
  cmpa_launch_count += launches;
  return {out_v, out_t, Tensors{ws_v, ws_t, idx_v, idx_t}};
}

std::tuple<at::Tensor, at::Tensor, Tensors, Tensors> cmpa_bwd(
    const std::optional<at::Tensor>& grad_visual_out, const std::optional<at::Tensor>& grad_text_out,
    const at::Tensor& visual, const at::Tensor& text, at::TensorList visual_params, at::TensorList text_params,
    at::TensorList saved, int64_t n_head_visual, int64_t n_head_text, c10::string_view fusing, double eps,
    bool compute_text) {
  const char* op = "fastprompt::cmpa_bwd_cuda";
  Tensors keep;
  CmpaArgs a = cmpa_args(op, visual, text, visual_params, text_params, n_head_visual, n_head_text, fusing, eps,
                         compute_text, keep);
  auto& v = a.side[0];
  auto& t = a.side[1];
  // the forward's saved tensors, as cmpa_fwd made them
  TORCH_CHECK(saved.size() == 4, op, ": the forward's 4 saved tensors are missing");
  const bool is_max = a.fusing == 2;
  for (int s = 0; s < 2; ++s) {
    const CmpaSide& side = a.side[s];
    const int64_t ws = s == 0 || compute_text ? cmpa_forward_workspace(a.m, side.d, side.heads, side.f) : a.m * side.d;
    TORCH_CHECK(saved[s].scalar_type() == at::kFloat && saved[s].numel() == ws && saved[s].is_contiguous() &&
                    saved[s].device() == visual.device(),
                op, ": saved[", s, "] is not the forward's fp32 workspace of ", ws, " floats");
    TORCH_CHECK(saved[2 + s].scalar_type() == at::kInt && saved[2 + s].numel() == (is_max ? a.m * side.d : 0) &&
                    saved[2 + s].device() == visual.device(),
                op, ": saved[", 2 + s, "] is not the forward's max-pooling index");
  }
  const std::optional<at::Tensor>* grads_in[2] = {&grad_visual_out, &grad_text_out};
  for (int s = 0; s < 2; ++s) {
    if (!grads_in[s]->has_value()) continue;
    const at::Tensor& g = **grads_in[s];
    check_input(op, "an upstream gradient", g, visual);
    check_shape(op, s == 0 ? "grad_visual_out" : "grad_text_out", g, {a.m, a.side[s].nb, a.side[s].d});
    a.side[s].g = g.data_ptr();
    strides3(g, a.side[s].sg);
  }
  require_cuda(op, visual);
  DeviceGuard guard(visual.device());
  v.ws = saved[0].data_ptr<float>(); t.ws = saved[1].data_ptr<float>();
  v.idx = saved[2].numel() ? saved[2].data_ptr<int32_t>() : nullptr;
  t.idx = saved[3].numel() ? saved[3].data_ptr<int32_t>() : nullptr;
  const auto f32 = visual.options().dtype(at::kFloat);
  at::Tensor bws_v = at::empty({cmpa_backward_workspace(a.m, v.d, v.d_other, v.heads, v.f)}, f32);
  at::Tensor bws_t = compute_text ? at::empty({cmpa_backward_workspace(a.m, t.d, t.d_other, t.heads, t.f)}, f32)
                                  : at::Tensor();
  v.bws = bws_v.data_ptr<float>();
  t.bws = compute_text ? bws_t.data_ptr<float>() : nullptr;
  Tensors grads_v, grads_t;
  for (int i = 0; i < 14; ++i) {
    // contiguous, whatever the parameters' own strides: the kernels write them row-major
    grads_v.push_back(at::empty(visual_params[i].sizes(), visual_params[i].options()));
    v.grad_w[i] = grads_v.back().data_ptr();
    grads_t.push_back(at::empty(compute_text ? text_params[i].sizes() : at::IntArrayRef{0}, text_params[i].options()));
    t.grad_w[i] = compute_text ? grads_t.back().data_ptr() : nullptr;
  }
  at::Tensor dvisual = at::empty({a.m, v.nb, v.d}, visual.options());
  at::Tensor dtext = at::empty({a.m, t.nb, t.d}, text.options());
  v.dx = dvisual.data_ptr();
  t.dx = dtext.data_ptr();
  int launches = 0;
  check(cmpa_backward(a, stream_of(visual), &launches), op);
  cmpa_launch_count += launches;
  return {dvisual, dtext, grads_v, grads_t};
}

}  // namespace
}  // namespace fastprompt

TORCH_LIBRARY_FRAGMENT(fastprompt, m) {
  m.def("cuda_build_info() -> str", &fastprompt::cuda_build_info);
  m.def("cuda_cmpa_launches() -> int", &fastprompt::cmpa_launches);
  m.def("insert_prompts_fwd_cuda(Tensor x, Tensor prompts, SymInt start, Tensor? starts, Tensor? ln_weight, "
        "Tensor? ln_bias, float eps, str mode) -> (Tensor, Tensor, Tensor[])");
  m.def("insert_prompts_bwd_cuda(Tensor? grad_y, Tensor? grad_y_ln, Tensor x, Tensor prompts, SymInt start, "
        "Tensor? starts, Tensor? ln_weight, Tensor? ln_bias, Tensor[] saved, float eps, str mode) "
        "-> (Tensor, Tensor, Tensor[])");
  m.def("insert_prompts_packed_fwd_cuda(Tensor x, Tensor prompts, Tensor cu_seqlens, SymInt start, Tensor? starts, "
        "Tensor? ln_weight, Tensor? ln_bias, float eps) -> (Tensor, Tensor, Tensor[])");
  m.def("insert_prompts_packed_bwd_cuda(Tensor? grad_y, Tensor? grad_y_ln, Tensor x, Tensor prompts, "
        "Tensor cu_seqlens, SymInt start, Tensor? starts, Tensor? ln_weight, Tensor? ln_bias, Tensor[] saved, "
        "float eps) -> (Tensor, Tensor, Tensor[])");
  m.def("dafe_fwd_cuda(Tensor prev, Tensor task, Tensor[] params, str gate, float eps) -> (Tensor, Tensor[])");
  m.def("dafe_bwd_cuda(Tensor grad_out, Tensor prev, Tensor task, Tensor[] params, Tensor[] saved, str gate, "
        "float eps) -> (Tensor, Tensor, Tensor[])");
  m.def("cmpa_fwd_cuda(Tensor visual, Tensor text, Tensor[] visual_params, Tensor[] text_params, "
        "SymInt n_head_visual, SymInt n_head_text, str fusing, float eps, bool compute_text) "
        "-> (Tensor, Tensor, Tensor[])");
  m.def("cmpa_bwd_cuda(Tensor? grad_visual_out, Tensor? grad_text_out, Tensor visual, Tensor text, "
        "Tensor[] visual_params, Tensor[] text_params, Tensor[] saved, SymInt n_head_visual, SymInt n_head_text, "
        "str fusing, float eps, bool compute_text) -> (Tensor, Tensor, Tensor[], Tensor[])");
}

#ifndef FASTPROMPT_CUDA_EMULATOR
TORCH_LIBRARY_IMPL(fastprompt, CUDA, m) {
  m.impl("insert_prompts_fwd_cuda", &fastprompt::insert_fwd);
  m.impl("insert_prompts_bwd_cuda", &fastprompt::insert_bwd);
  m.impl("insert_prompts_packed_fwd_cuda", &fastprompt::insert_packed_fwd);
  m.impl("insert_prompts_packed_bwd_cuda", &fastprompt::insert_packed_bwd);
  m.impl("dafe_fwd_cuda", &fastprompt::dafe_fwd);
  m.impl("dafe_bwd_cuda", &fastprompt::dafe_bwd);
  m.impl("cmpa_fwd_cuda", &fastprompt::cmpa_fwd);
  m.impl("cmpa_bwd_cuda", &fastprompt::cmpa_bwd);
}

#endif

// On CPU tensors the same functions run their checks, so a caller learns what is wrong with the inputs (or that
// they must be CUDA tensors) instead of the dispatcher's "could not run ... with arguments from the CPU backend".
// Nothing past the checks runs there: require_cuda comes before any allocation or CUDA call. Under the emulator
// these are the ops proper: require_cuda takes CPU tensors, and the kernels run on them.
TORCH_LIBRARY_IMPL(fastprompt, CPU, m) {
  m.impl("insert_prompts_fwd_cuda", &fastprompt::insert_fwd);
  m.impl("insert_prompts_bwd_cuda", &fastprompt::insert_bwd);
  m.impl("insert_prompts_packed_fwd_cuda", &fastprompt::insert_packed_fwd);
  m.impl("insert_prompts_packed_bwd_cuda", &fastprompt::insert_packed_bwd);
  m.impl("dafe_fwd_cuda", &fastprompt::dafe_fwd);
  m.impl("dafe_bwd_cuda", &fastprompt::dafe_bwd);
  m.impl("cmpa_fwd_cuda", &fastprompt::cmpa_fwd);
  m.impl("cmpa_bwd_cuda", &fastprompt::cmpa_bwd);
}

// `import fastprompt._C` loads this library (and so runs the registrations above); the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "fastprompt CUDA C++ ops (see torch.ops.fastprompt)", -1,
                               nullptr};
  return PyModule_Create(&module);
}
