// wkv_bind.h: what the CPU (wkv_cpu.cpp) and CUDA (wkv_cuda_bind.cpp) torch bindings share:
// the checks on the tensors handed over by rwkv_ref/kernel.py, and raw data pointers.
#pragma once

#include "torch_op.h"

#include <cstdint>
#include <limits>
#include <vector>

namespace wkv_bind {

// Every tensor on one device of the kernel's type, contiguous, of one dtype; T must fit the
// scan's 32-bit time index. kernel names the build in the message ("cpp" or "cuda").
inline void check(const std::vector<at::Tensor>& xs, int64_t T, c10::DeviceType device,
                  const char* kernel) {
  for (const auto& x : xs) {
    TORCH_CHECK(x.device().type() == device, "wkv ", kernel, " kernel: tensors must be on a ",
                c10::DeviceTypeName(device), " device");
    TORCH_CHECK(x.device() == xs[0].device(), "wkv ", kernel,
                " kernel: tensors on different devices");
    TORCH_CHECK(x.is_contiguous(), "wkv ", kernel, " kernel: tensors must be contiguous");
    TORCH_CHECK(x.scalar_type() == xs[0].scalar_type(), "wkv ", kernel, " kernel: mixed dtypes");
  }
  TORCH_CHECK(T < std::numeric_limits<int32_t>::max(), "wkv ", kernel,
              " kernel: T must be < 2^31");
}

template <typename F>
const F* in(const at::Tensor& x) { return x.data_ptr<F>(); }

template <typename F>
F* out(at::Tensor& x) { return x.data_ptr<F>(); }

}  // namespace wkv_bind
