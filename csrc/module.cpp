// Python module entry of tofa_fast._C.
//
// The extension exposes its operators through torch.library (TORCH_LIBRARY in the op files), not
// through pybind11: importing the module is what registers them. This file only creates the Python
// module object and records how the extension was built, for `tofa-fast info`.
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "tofa_fast compiled core (ops registered via torch.library)", -1,
      nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
#ifdef TOFA_FAST_WITH_CUDA
  PyModule_AddIntConstant(module, "with_cuda", 1);
#else
  PyModule_AddIntConstant(module, "with_cuda", 0);
#endif
#ifdef _OPENMP
  PyModule_AddIntConstant(module, "with_openmp", 1);
#else
  PyModule_AddIntConstant(module, "with_openmp", 0);
#endif
  return module;
}
}
