// Operator schemas of the `rgt` library. Backends register kernels with TORCH_LIBRARY_IMPL(rgt, CPU|CUDA, m) in
// csrc/cpu and csrc/cuda, so the dispatcher picks the device and Python never branches on it.
#include <Python.h>

#include <string>

#include <torch/library.h>

// Importing rgt._C runs the static TORCH_LIBRARY initialisers below; the module itself exports nothing.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

namespace rgt {
namespace {

// Which backends this build of rgt._C contains: "cpu" or "cpu+cuda".
std::string build_info() {
#ifdef WITH_CUDA
  return "cpu+cuda";
#else
  return "cpu";
#endif
}

}  // namespace

TORCH_LIBRARY(rgt, m) {
  m.def("build_info() -> str", &build_info);
  // Recursive depthwise stride-k convolution of RG-SA (csrc/{cpu,cuda}/recursive_dwconv.*).
  m.def("recursive_dwconv_fwd(Tensor x, Tensor weight, Tensor? bias, int times) -> Tensor");
  m.def("recursive_dwconv_bwd(Tensor grad_out, Tensor x, Tensor weight, Tensor? bias, int times) "
        "-> (Tensor, Tensor, Tensor)");
}

}  // namespace rgt
