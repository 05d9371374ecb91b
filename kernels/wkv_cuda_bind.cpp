// wkv_cuda_bind.cpp: the torch side of the CUDA WKV kernel: checks, allocation, dtype
// dispatch and the current stream; the kernels themselves are in wkv_cuda.cu (no torch there).
#include "wkv_bind.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <limits>
#include <vector>

// Launchers defined in wkv_cuda.cu (float and double overloads).
void wkv_cuda_forward(int64_t B, int64_t T, int64_t C, const float* w, const float* u,
                      const float* k, const float* v, const float* a, const float* b,
                      const float* p, float* y, float* a_out, float* b_out, float* p_out,
                      cudaStream_t stream);
void wkv_cuda_forward(int64_t B, int64_t T, int64_t C, const double* w, const double* u,
                      const double* k, const double* v, const double* a, const double* b,
                      const double* p, double* y, double* a_out, double* b_out, double* p_out,
                      cudaStream_t stream);
void wkv_cuda_backward(int64_t B, int64_t T, int64_t C, const float* w, const float* u,
                       const float* k, const float* v, const float* y, const float* gy,
                       const float* a, const float* b, const float* p, const float* ga,
                       const float* gb, const float* gp, float* gk, float* gv, float* gw_part,
                       float* gu_part, float* ga_in, float* gb_in, float* gp_in,
                       cudaStream_t stream);
void wkv_cuda_backward(int64_t B, int64_t T, int64_t C, const double* w, const double* u,
                       const double* k, const double* v, const double* y, const double* gy,
                       const double* a, const double* b, const double* p, const double* ga,
                       const double* gb, const double* gp, double* gk, double* gv,
                       double* gw_part, double* gu_part, double* ga_in, double* gb_in,
                       double* gp_in, cudaStream_t stream);

namespace {

using wkv_bind::in;
using wkv_bind::out;

void check(const std::vector<at::Tensor>& xs, int64_t T) {
  wkv_bind::check(xs, T, c10::DeviceType::CUDA, "cuda");
}

// y and the outgoing state (a, b, p) for k, v (B, T, C) from the incoming state (B, C).
std::vector<at::Tensor> forward(at::Tensor w, at::Tensor u, at::Tensor k, at::Tensor v,
                                at::Tensor a, at::Tensor b, at::Tensor p) {
  const int64_t B = k.size(0), T = k.size(1), C = k.size(2);
  check({w, u, k, v, a, b, p}, T);
  const c10::cuda::CUDAGuard guard(k.device());
  auto y = at::empty_like(k);
  auto a_out = at::empty_like(a), b_out = at::empty_like(a), p_out = at::empty_like(a);
  AT_DISPATCH_FLOATING_TYPES(k.scalar_type(), "wkv_forward_cuda", [&] {
    using F = scalar_t;
    wkv_cuda_forward(B, T, C, in<F>(w), in<F>(u), in<F>(k), in<F>(v), in<F>(a), in<F>(b),
                     in<F>(p), out<F>(y), out<F>(a_out), out<F>(b_out), out<F>(p_out),
                     c10::cuda::getCurrentCUDAStream());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {y, a_out, b_out, p_out};
}

// Gradients w.r.t. w, u, k, v, a_in, b_in, p_in given those w.r.t. y, a_out, b_out, p_out.
std::vector<at::Tensor> backward(at::Tensor w, at::Tensor u, at::Tensor k, at::Tensor v,
                                 at::Tensor y, at::Tensor gy, at::Tensor a, at::Tensor b,
                                 at::Tensor p, at::Tensor ga, at::Tensor gb, at::Tensor gp) {
  const int64_t B = k.size(0), T = k.size(1), C = k.size(2);
  check({w, u, k, v, y, gy, a, b, p, ga, gb, gp}, T);
  const c10::cuda::CUDAGuard guard(k.device());
  auto gk = at::empty_like(k), gv = at::empty_like(k);
  auto gw_part = at::empty_like(a), gu_part = at::empty_like(a);
  auto ga_in = at::empty_like(a), gb_in = at::empty_like(a), gp_in = at::empty_like(a);
  AT_DISPATCH_FLOATING_TYPES(k.scalar_type(), "wkv_backward_cuda", [&] {
    using F = scalar_t;
    wkv_cuda_backward(B, T, C, in<F>(w), in<F>(u), in<F>(k), in<F>(v), in<F>(y), in<F>(gy),
                      in<F>(a), in<F>(b), in<F>(p), in<F>(ga), in<F>(gb), in<F>(gp),
                      out<F>(gk), out<F>(gv), out<F>(gw_part), out<F>(gu_part), out<F>(ga_in),
                      out<F>(gb_in), out<F>(gp_in), c10::cuda::getCurrentCUDAStream());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // w and u are shared by the batch: sum the per-row shares.
  return {gw_part.sum(0), gu_part.sum(0), gk, gv, ga_in, gb_in, gp_in};
}

}  // namespace

// torch.ops.<build>.forward and backward: the arguments and results of wkv_cpu.cpp's.
TORCH_LIBRARY(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward);
  m.def("backward", &backward);
}
