// fastprompt._C: the CUDA C++ backend.
//
// This is the only translation unit that includes the torch headers (about 90-115 s of compile time on
// two cores); the kernels live in torch-free .cu files taking raw pointers, shapes and strides, and are
// registered here as fastprompt::<op>_{fwd,bwd}_cuda with TORCH_LIBRARY_FRAGMENT, so that the Python
// custom ops of the other backends and these never collide.

#include <Python.h>

#include <cuda_runtime_api.h>
#include <torch/headeronly/version.h>
#include <torch/library.h>

#include <string>

namespace {

// What the extension was built against; fastprompt/_extension.py compares it with the running torch
// and refuses a mismatched build with both versions in the message.
std::string cuda_build_info() {
  return std::string("torch=") + TORCH_VERSION + ";cuda=" + std::to_string(CUDART_VERSION / 1000) + "." +
         std::to_string((CUDART_VERSION % 1000) / 10);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastprompt, m) {
  m.def("cuda_build_info() -> str", &cuda_build_info);
}

// `import fastprompt._C` loads this library (and so runs the registrations above); the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "fastprompt CUDA C++ ops (see torch.ops.fastprompt)", -1,
                               nullptr};
  return PyModule_Create(&module);
}
