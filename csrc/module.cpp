// The Python module nvfm._C. Loading it runs the TORCH_LIBRARY registrations of every
// operator file in csrc/, which then appear as torch.ops.nvfm.<name>.
#include <torch/extension.h>

static bool cuda_compiled() {
#ifdef NVFM_WITH_CUDA
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "nvfm compiled operators (registered as torch.ops.nvfm.*)";
  m.def("cuda_compiled", &cuda_compiled, "True when the CUDA kernels were compiled in");
}
