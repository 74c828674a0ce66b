// What the emulated op library adds to torch besides the cuda backend's ops (csrc/bindings.cpp):
//
// - cuda_emulator::kernel_launches(): the launches the scheduler has run since the library loaded, counted by the
//   emulator itself (the tests compare it with what the CMPA ops report, as the profiler does on a GPU);
// - poisoned CPU memory: every CPU allocation starts as 0xFF bytes (NaN in fp32 / fp16 / bf16, -1 in integers),
//   so an output element a kernel forgets to write fails the comparison instead of passing with whatever the
//   allocator left there (the C++ ops allocate with at::empty, which the tests' poisoned_outputs() cannot reach).
#include <c10/core/CPUAllocator.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>

#include "cuda_runtime.h"

namespace {

class PoisoningAllocator final : public c10::Allocator {
 public:
  explicit PoisoningAllocator(c10::Allocator* base) : base_(base) {}

  c10::DataPtr allocate(size_t bytes) override {
    c10::DataPtr p = base_->allocate(bytes);
    if (bytes > 0) std::memset(p.get(), 0xff, bytes);
    return p;
  }
  c10::DeleterFnPtr raw_deleter() const override { return base_->raw_deleter(); }
  bool is_simple_data_ptr(const c10::DataPtr& p) const override { return base_->is_simple_data_ptr(p); }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    base_->copy_data(dest, src, count);
  }

 private:
  c10::Allocator* base_;
};

const bool installed = [] {
  static PoisoningAllocator allocator(c10::GetCPUAllocator());
  c10::SetCPUAllocator(&allocator, /*priority=*/100);
  return true;
}();

}  // namespace

TORCH_LIBRARY(cuda_emulator, m) {
  m.def("kernel_launches() -> int", [] { return static_cast<int64_t>(cuda_emulator::launch_count()); });
}
