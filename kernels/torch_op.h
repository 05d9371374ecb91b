// torch_op.h: the parts of libtorch that the kernels' torch bindings use, and nothing more.
//
// Each kernel registers its functions as operators of the library named by its build
// (TORCH_LIBRARY(TORCH_EXTENSION_NAME, m), called from Python as torch.ops.<build>.<name>;
// rwkv_ref/kernel.py loads them), not as a Python module through pybind11. The catch-all
// <torch/extension.h> that a pybind11 module needs takes about 35 s of a kernel's 45 s compile
// on 2 cores; these headers parse in about 12 s, and the build needs no Python headers.
#pragma once

#include <ATen/Dispatch.h>           // AT_DISPATCH_FLOATING_TYPES
#include <ATen/core/Tensor.h>        // at::Tensor and its methods
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>      // TORCH_CHECK
#include <torch/library.h>           // TORCH_LIBRARY
