// lowrank_ext._C: importing it loads this library, whose static initialisers register the
// `lowrank` ops with the dispatcher. The module itself only reports how it was built.
#include <pybind11/pybind11.h>

#ifndef LOWRANK_CUDA_ARCHS
#define LOWRANK_CUDA_ARCHS ""
#endif
#ifndef LOWRANK_CUDA_COMPILER
#define LOWRANK_CUDA_COMPILER ""
#endif

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "lowrank_ext compiled kernels (ops are under torch.ops.lowrank)";
  py::dict info;
  info["version"] = LOWRANK_VERSION;
  info["torch_version"] = LOWRANK_TORCH_VERSION;
#ifdef LOWRANK_WITH_CUDA
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
  info["cuda_archs"] = LOWRANK_CUDA_ARCHS;
  info["cuda_compiler"] = LOWRANK_CUDA_COMPILER;
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  info["cxx_compiler"] = LOWRANK_CXX_COMPILER;
  m.attr("BUILD_INFO") = info;
}
