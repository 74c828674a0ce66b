"""The CPU emulator of the CUDA C++ backend (tests/cuda_emulator/) is itself tested: tiny kernels compiled here
show that it computes what a GPU computes (block and grid reductions through the production helpers of
csrc/common.cuh, exact fp16 / bf16 conversions) and that it fails, with a message, where a GPU would hang or
misbehave (divergent barriers, partial shuffle masks, bad launch configurations). The failures abort the
process, so those kernels run in a subprocess. Needs only a C++ compiler (g++)."""

import ctypes
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from ..cuda_emulator import build

pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None, reason="no C++ compiler")

KERNELS = textwrap.dedent(r"""
    #include <cooperative_groups.h>

    #include <string>

    #include "common.cuh"  // the production launch helpers and reductions

    using namespace fastprompt;

    // ---- kernels a GPU runs correctly ----------------------------------------------------------------
    __global__ void row_sums(const float* x, int64_t n, float* out) {  // a block per row, block_sum of common.cuh
      __shared__ float scratch[32];
      float v = 0.f;
      for (int64_t k = threadIdx.x; k < n; k += blockDim.x) v += x[blockIdx.x * n + k];
      const float s = block_sum(v, scratch);
      if (threadIdx.x == 0) out[blockIdx.x] = s;
    }

    __global__ void lane_rotation(int* out) {  // out[t] = the lane index of a neighbour, by each shuffle kind
      const int lane = threadIdx.x & 31;
      out[4 * threadIdx.x + 0] = __shfl_sync(0xffffffffu, lane, (lane + 1) & 31);
      out[4 * threadIdx.x + 1] = __shfl_up_sync(0xffffffffu, lane, 3);
      out[4 * threadIdx.x + 2] = __shfl_down_sync(0xffffffffu, lane, 3);
      out[4 * threadIdx.x + 3] = __shfl_xor_sync(0xffffffffu, lane, 5);
    }

    __global__ void grid_total(const float* x, float* partial, float* out) {  // two stages, one cooperative launch
      const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
      partial[i] = warp_sum(x[i]);
      cooperative_groups::this_grid().sync();  // every block's partial sums are written
      if (i == 0) {
        float total = 0.f;
        for (int64_t j = 0; j < static_cast<int64_t>(gridDim.x) * blockDim.x; j += 32) total += partial[j];
        *out = total;
      }
    }

    // out[i] = x of the thread `shift` places on (its own at the edges), through shared memory: needs the
    // barrier between the write and the read
    __global__ void shift_through_shared(const float* x, float* out, int shift, int sync) {
      __shared__ float s[1024];
      const int t = threadIdx.x, n = blockDim.x;
      s[t] = x[blockIdx.x * n + t];
      if (sync) __syncthreads();
      const int j = t + shift;
      out[blockIdx.x * n + t] = s[j >= 0 && j < n ? j : t];
    }

    // ---- kernels with the bugs the emulator must report --------------------------------------------------
    __global__ void divergent_syncthreads(float* out) {
      if (threadIdx.x < 32) __syncthreads();  // the second warp never arrives
      out[threadIdx.x] = 1.f;
    }

    __global__ void syncthreads_after_early_return(float* out) {
      if (threadIdx.x >= 48) return;
      __syncthreads();
      out[threadIdx.x] = 1.f;
    }

    __global__ void partial_mask_shuffle(float* out) {
      out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, 1.f, 1);
    }

    __global__ void divergent_shuffle(float* out) {
      float v = static_cast<float>(threadIdx.x);
      if ((threadIdx.x & 31) < 16) v = warp_sum(v);  // half a warp in a full-mask reduction
      out[threadIdx.x] = v;
    }

    __global__ void grid_sync_outside_cooperative(float* out) {
      cooperative_groups::this_grid().sync();
      out[threadIdx.x] = 1.f;
    }

    __global__ void shared_in_cooperative(float* out) {
      __shared__ float s[32];
      s[threadIdx.x & 31] = 1.f;
      cooperative_groups::this_grid().sync();
      out[threadIdx.x] = s[0];
    }

    __global__ void linear_ids(int* out) {  // every thread writes its linear index where that index points
      const unsigned block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
      const unsigned thread = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
      const unsigned i = block * blockDim.x * blockDim.y * blockDim.z + thread;
      if (out != nullptr) out[i] = static_cast<int>(i);
    }

    // ---- C entry points for ctypes ---------------------------------------------------------------------
    extern "C" {
    int run_row_sums(const float* x, int rows, int64_t n, int threads, float* out) {
      return launch_kernel(row_sums, rows, threads, nullptr, x, n, out);
    }
    int run_shift(const float* x, int blocks, int threads, int shift, int sync, float* out) {
      return launch_kernel(shift_through_shared, blocks, threads, nullptr, x, out, shift, sync);
    }
    int run_lane_rotation(int threads, int* out) { return launch_kernel(lane_rotation, 1, threads, nullptr, out); }
    int run_grid_total(const float* x, int blocks, int threads, float* partial, float* out) {
      return launch_cooperative_kernel(grid_total, blocks, threads, nullptr, x, partial, out);
    }
    int run_launch(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz, int* out) {
      return launch_kernel(linear_ids, dim3(gx, gy, gz), dim3(bx, by, bz), nullptr, out);
    }
    int run_bug(const char* name, int threads) {  // aborts (the emulator's verdict) or returns the launch's error
      static float out[1024];
      const std::string bug(name);
      if (bug == "divergent_syncthreads") return launch_kernel(divergent_syncthreads, 1, threads, nullptr, out);
      if (bug == "early_return") return launch_kernel(syncthreads_after_early_return, 1, threads, nullptr, out);
      if (bug == "partial_mask") return launch_kernel(partial_mask_shuffle, 1, threads, nullptr, out);
      if (bug == "divergent_shuffle") return launch_kernel(divergent_shuffle, 2, threads, nullptr, out);
      if (bug == "grid_sync") return launch_kernel(grid_sync_outside_cooperative, 2, threads, nullptr, out);
      if (bug == "shared_cooperative")
        return launch_cooperative_kernel(shared_in_cooperative, 2, threads, nullptr, out);
      return -1;
    }
    void to_half(const float* x, uint16_t* out, int64_t n) {
      for (int64_t i = 0; i < n; ++i) out[i] = __float2half_rn(x[i]).bits;
    }
    void from_half(const uint16_t* x, float* out, int64_t n) {
      for (int64_t i = 0; i < n; ++i) out[i] = __half2float(__half{x[i]});
    }
    void to_bf16(const float* x, uint16_t* out, int64_t n) {
      for (int64_t i = 0; i < n; ++i) out[i] = __float2bfloat16_rn(x[i]).bits;
    }
    void from_bf16(const uint16_t* x, float* out, int64_t n) {
      for (int64_t i = 0; i < n; ++i) out[i] = __bfloat162float(__nv_bfloat16{x[i]});
    }
    }
""")

COOPERATIVE_TOO_LARGE = 720  # cudaErrorCooperativeLaunchTooLarge


@pytest.fixture(scope="module")
def kernels():
    path = build.compile_kernels(KERNELS, "emulator_test_kernels")
    lib = ctypes.CDLL(str(path))
    lib.run_launch.argtypes = [ctypes.c_uint] * 6 + [ctypes.c_void_p]
    lib.path = path
    return lib


def ptr(t: torch.Tensor):
    return ctypes.c_void_p(t.data_ptr())


# ---- what a GPU computes ---------------------------------------------------------------------------------

@pytest.mark.parametrize("threads", [32, 96, 256, 1024])
def test_block_sum_of_common_cuh(kernels, threads):
    x = torch.randn(5, 1000, dtype=torch.float32)
    out = torch.full((5,), float("nan"))
    assert kernels.run_row_sums(ptr(x), 5, ctypes.c_int64(1000), threads, ptr(out)) == 0
    torch.testing.assert_close(out, x.double().sum(1).float(), rtol=1e-5, atol=1e-4)


def test_every_shuffle_kind(kernels):
    out = torch.full((64, 4), -7, dtype=torch.int32)
    assert kernels.run_lane_rotation(64, ptr(out)) == 0
    lane = torch.arange(64) % 32
    expected = torch.stack([(lane + 1) % 32,
                            torch.where(lane >= 3, lane - 3, lane),   # up: the low lanes keep their own value
                            torch.where(lane < 29, lane + 3, lane),   # down: the high lanes keep theirs
                            lane ^ 5], 1).int()
    assert torch.equal(out, expected)


def test_cooperative_launch_and_grid_sync(kernels):
    blocks, threads = 4, 256  # 2 SMs x 2048 threads: resident at once
    x = torch.randn(blocks * threads)
    partial, out = torch.empty(blocks * threads), torch.full((1,), float("nan"))
    assert kernels.run_grid_total(ptr(x), blocks, threads, ptr(partial), ptr(out)) == 0
    torch.testing.assert_close(out[0], x.double().sum().float(), rtol=1e-5, atol=1e-4)
    # a grid the emulated device cannot hold at once is refused, as by cudaLaunchCooperativeKernel
    assert kernels.run_grid_total(ptr(x), 5, 1024, ptr(partial), ptr(out)) == COOPERATIVE_TOO_LARGE


def test_valid_launch_configurations_run_every_thread_once(kernels):
    for config in [(1, 1, 1, 1, 1, 1), (1, 65535, 1, 1, 1, 1), (1, 1, 65535, 1, 1, 1), (1, 1, 1, 1, 1, 64),
                   (1, 1, 1, 1024, 1, 1), (1, 1, 1, 16, 16, 4), (3, 2, 2, 8, 4, 2)]:
        n = 1
        for extent in config:
            n *= extent
        out = torch.full((n,), -1, dtype=torch.int32)
        assert kernels.run_launch(*config, ptr(out)) == 0, config
        assert torch.equal(out, torch.arange(n, dtype=torch.int32)), config


@pytest.mark.parametrize("order", ["forward", "reverse"])
def test_a_missing_syncthreads_garbles_the_result(kernels, monkeypatch, order):
    """The threads of a block run one after the other between barriers: a read of shared memory that another
    thread writes without a barrier in between sees the stale value when the writer runs later (the next thread
    in the forward order, the previous one in the reverse order)."""
    monkeypatch.setenv("FASTPROMPT_CUDA_EMULATE_ORDER", order)
    blocks, threads = 3, 64
    x = torch.randn(blocks, threads)
    out = torch.empty(blocks, threads)
    for shift in (1, -1):
        expected = x.roll(-shift, dims=1)
        expected[:, -1 if shift == 1 else 0] = x[:, -1 if shift == 1 else 0]
        assert kernels.run_shift(ptr(x), blocks, threads, shift, 1, ptr(out)) == 0
        assert torch.equal(out, expected)
        assert kernels.run_shift(ptr(x), blocks, threads, shift, 0, ptr(out)) == 0  # no barrier
        caught = (shift == 1) == (order == "forward")
        assert torch.equal(out, expected) != caught, (order, shift)


# ---- exact fp16 / bf16 conversions (torch's are round-to-nearest-even) ------------------------------------

def _floats() -> torch.Tensor:
    """Random bit patterns, every half and bfloat16 value and the points halfway between neighbours (ties),
    each nudged by one float ulp either way, subnormals, the overflow thresholds, infinities, NaN, zeros."""
    g = torch.Generator().manual_seed(0)
    random_bits = torch.randint(-2**31, 2**31 - 1, (400_000,), generator=g, dtype=torch.int64).int()
    values = [random_bits.view(torch.float32), torch.randn(100_000, generator=g) * 1e-6,
              torch.tensor([0.0, -0.0, 65504.0, 65519.99, 65520.0, 65536.0, 2.0**-24, 2.0**-25, 3 * 2.0**-26,
                            2.0**-14, 3.4e38, float("inf"), float("-inf"), float("nan")])]
    for small in (torch.float16, torch.bfloat16):
        every = torch.arange(-2**15, 2**15, dtype=torch.int32).short().view(small).float()
        every = every[torch.isfinite(every)].sort().values.unique()
        mid = ((every[1:].double() + every[:-1].double()) / 2).float()  # exact in fp32
        for t in (every, mid):
            values += [t, torch.nextafter(t, torch.full_like(t, float("inf"))),
                       torch.nextafter(t, torch.full_like(t, float("-inf")))]
    return torch.cat(values).contiguous()


@pytest.mark.parametrize("small,to,back", [(torch.float16, "to_half", "from_half"),
                                           (torch.bfloat16, "to_bf16", "from_bf16")], ids=["fp16", "bf16"])
def test_conversions_round_to_nearest_even(kernels, small, to, back):
    x = _floats()
    bits = torch.empty(x.numel(), dtype=torch.int16)
    getattr(kernels, to)(ptr(x), ptr(bits), ctypes.c_int64(x.numel()))
    expected = x.to(small)
    got = bits.view(small)
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(got), nan)
    assert torch.equal(got[~nan].view(torch.int16), expected[~nan].view(torch.int16))  # bit-exact, signs of 0
    every = torch.arange(-2**15, 2**15, dtype=torch.int32).short()
    widened = torch.empty(every.numel())
    getattr(kernels, back)(ptr(every), ptr(widened), ctypes.c_int64(every.numel()))
    reference = every.view(small).float()
    nan = torch.isnan(reference)
    assert torch.equal(torch.isnan(widened), nan)
    assert torch.equal(widened[~nan].view(torch.int32), reference[~nan].view(torch.int32))


# ---- what a GPU would hang on or misreport: the emulator aborts with a message ------------------------------

def _run_in_subprocess(kernels, call: str) -> subprocess.CompletedProcess:
    script = (f"import ctypes; lib = ctypes.CDLL({str(kernels.path)!r}); "
              f"lib.run_launch.argtypes = [ctypes.c_uint] * 6 + [ctypes.c_void_p]; print('returned', lib.{call})")
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("bug,threads,message", [
    ("divergent_syncthreads", 64, r"deadlock .*block \(0,0,0\): 32 at __syncthreads; 32 exited"),
    ("early_return", 64, r"deadlock .*48 at __syncthreads; 16 exited"),
    ("partial_mask", 32, "a warp shuffle with mask 0x0000ffff"),
    ("partial_mask", 48, "a warp shuffle with mask 0x0000ffff"),
    ("divergent_shuffle", 64, r"deadlock .*warp 0: 16 of 32 lanes at a warp shuffle"),
    ("divergent_shuffle", 48, r"a warp shuffle in a partial warp \(48 threads a block\)"),
    ("grid_sync", 32, r"grid.sync\(\) in a kernel that was not launched cooperatively"),
    ("shared_cooperative", 32, "a kernel launched cooperatively declares __shared__ memory"),
])
def test_the_emulator_catches(kernels, bug, threads, message):
    done = _run_in_subprocess(kernels, f"run_bug({bug.encode()!r}, {threads})")
    assert done.returncode != 0 and "returned" not in done.stdout, (done.stdout, done.stderr)
    assert re.search("fastprompt cuda emulator: " + message, done.stderr, re.DOTALL), done.stderr


@pytest.mark.parametrize("config", [(0, 1, 1, 32, 1, 1), (1, 0, 1, 32, 1, 1), (1, 65536, 1, 32, 1, 1),
                                    (1, 1, 65536, 32, 1, 1), (2**31, 1, 1, 32, 1, 1), (1, 1, 1, 2048, 1, 1),
                                    (1, 1, 1, 32, 64, 1), (1, 1, 1, 1, 1, 65), (1, 1, 1, 0, 1, 1)],
                         ids=["zero-grid", "zero-grid-y", "grid-y", "grid-z", "grid-x", "threads", "threads-2d",
                              "block-z", "no-threads"])
def test_the_emulator_catches_invalid_launch_configurations(kernels, config):
    done = _run_in_subprocess(kernels, f"run_launch{(*config, None)}")
    assert done.returncode != 0 and "returned" not in done.stdout, (done.stdout, done.stderr)
    assert "fastprompt cuda emulator: invalid launch configuration" in done.stderr, done.stderr


# ---- the package under FASTPROMPT_CUDA_EMULATE=1 ----------------------------------------------------------

def test_emulated_package_loads_the_emulator_not_the_extension():
    """Read at import: the cuda backend serves CPU tensors (auto still picks reference there), fastprompt._C is
    never imported, and the ops run the kernels."""
    script = textwrap.dedent("""
        import sys
        import torch, fastprompt
        from fastprompt import _extension, backends
        assert backends.load_error("cuda") is None, backends.load_error("cuda")
        assert "fastprompt._C" not in sys.modules
        assert _extension.build_info()["cuda"] == "emulator"
        cpu = torch.device("cpu")
        assert backends.device_unavailable_reason("cuda", cpu) is None
        assert "CPU emulator" in backends.device_unavailable_reason("cuda", torch.device("meta"))
        assert backends.select("dafe", "auto", cpu, {"dtype": torch.float32}).backend == "reference"
        x, p = torch.randn(2, 7, 24), torch.randn(3, 24)
        before = torch.ops.cuda_emulator.kernel_launches()
        y, _ = fastprompt.insert_prompts(x, p, 1, backend="cuda")
        assert torch.ops.cuda_emulator.kernel_launches() == before + 1
        assert torch.equal(y, fastprompt.insert_prompts(x, p, 1, backend="reference")[0])
        print("ok")
    """)
    env = dict(os.environ, FASTPROMPT_CUDA_EMULATE="1")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900, env=env,
                          cwd=build.ROOT)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]
