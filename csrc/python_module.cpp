// An empty Python module named rmask_kernels._C: importing it loads this shared library,
// whose static initializers register the rmask ops with the dispatcher. No pybind11, so
// the extension only needs the stable (limited) Python API and builds one abi3 wheel.
#include <Python.h>

extern "C" {
// PyMODINIT_FUNC: exported despite -fvisibility=hidden (the one symbol Python looks up).
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr,
  };
  return PyModule_Create(&module_def);
}
}
