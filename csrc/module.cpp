// The Python module entry point of the ahead-of-time build (peftops._C, see setup.py). The ops
// register themselves with TORCH_LIBRARY when the library loads; importing the module is only
// the way Python loads it. The just-in-time build (peftops/cuda_ext.py) skips this file.
#include <Python.h>

static struct PyModuleDef peftops_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&peftops_c_module); }
