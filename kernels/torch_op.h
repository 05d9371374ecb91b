// torch_op.h: the parts of libtorch that the kernels' torch bindings use, and nothing more.
//
// Each kernel registers its functions as operators of the library named by its build
// (TORCH_LIBRARY(TORCH_EXTENSION_NAME, m), called from Python as torch.ops.<build>.<name>;
// rwkv_ref/kernel.py loads them), not as a Python module through pybind11. The catch-all
// <torch/extension.h> that a pybind11 module needs parses in about 45 s on 2 cores, these
// headers in about 12 s, and a kernel's build fell from about 80 s to under 30 s
// (kernels/README.md, "Building"); the build needs no Python headers either.
#pragma once

#include <ATen/Dispatch.h>           // AT_DISPATCH_FLOATING_TYPES
#include <ATen/core/Tensor.h>        // at::Tensor and its methods
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>      // TORCH_CHECK
#include <torch/library.h>           // TORCH_LIBRARY
