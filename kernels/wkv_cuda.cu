// wkv_cuda.cu: the WKV scan of wkv_scan.h on the GPU: one thread per (batch row, channel).
//
// Thread i owns channel c = i % C of batch row b = i / C and runs the whole scan of wkv_scan.h
// with N = 1. Neighbouring threads own neighbouring channels, so at each step t a warp reads
// 32 consecutive floats of k and v: coalesced. The backward keeps its per-step scratch in
// the thread's own slots of gk and gv (see wkv_scan.h), so it needs no T_MAX and no shared
// memory.
//
// No torch headers here: `nvcc -c wkv_cuda.cu` needs only the CUDA toolkit. The torch side
// (tensors, streams, dtype dispatch) is in wkv_cuda_bind.cpp, which calls the launchers below.
#include <cstdint>

#include "wkv_scan.h"

namespace {

constexpr int kThreads = 128;  // threads per block

template <typename F>
__global__ void forward_kernel(int64_t B, int64_t T, int64_t C, const F* __restrict__ w,
                               const F* __restrict__ u, const F* __restrict__ k,
                               const F* __restrict__ v, const F* __restrict__ a,
                               const F* __restrict__ b, const F* __restrict__ p,
                               F* __restrict__ y, F* __restrict__ a_out,
                               F* __restrict__ b_out, F* __restrict__ p_out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= B * C) return;
  const int64_t c = i % C, seq = (i / C) * T * C + c;  // state offset is i itself
  wkv::forward_scan<F, 1>(T, C, w + c, u + c, k + seq, v + seq, a + i, b + i, p + i, y + seq,
                          a_out + i, b_out + i, p_out + i);
}

template <typename F>
__global__ void backward_kernel(int64_t B, int64_t T, int64_t C, const F* __restrict__ w,
                                const F* __restrict__ u, const F* __restrict__ k,
                                const F* __restrict__ v, const F* __restrict__ y,
                                const F* __restrict__ gy, const F* __restrict__ a,
                                const F* __restrict__ b, const F* __restrict__ p,
                                const F* __restrict__ ga, const F* __restrict__ gb,
                                const F* __restrict__ gp, F* __restrict__ gk,
                                F* __restrict__ gv, F* __restrict__ gw_part,
                                F* __restrict__ gu_part, F* __restrict__ ga_in,
                                F* __restrict__ gb_in, F* __restrict__ gp_in) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= B * C) return;
  const int64_t c = i % C, seq = (i / C) * T * C + c;
  wkv::backward_scan<F, 1>(T, C, w + c, u + c, k + seq, v + seq, y + seq, gy + seq, a + i,
                           b + i, p + i, ga + i, gb + i, gp + i, gk + seq, gv + seq,
                           gw_part + i, gu_part + i, ga_in + i, gb_in + i, gp_in + i);
}

unsigned blocks_for(int64_t B, int64_t C) {
  return static_cast<unsigned>((B * C + kThreads - 1) / kThreads);
}

template <typename F>
void launch_forward(int64_t B, int64_t T, int64_t C, const F* w, const F* u, const F* k,
                    const F* v, const F* a, const F* b, const F* p, F* y, F* a_out, F* b_out,
                    F* p_out, cudaStream_t stream) {
  forward_kernel<F><<<blocks_for(B, C), kThreads, 0, stream>>>(
      B, T, C, w, u, k, v, a, b, p, y, a_out, b_out, p_out);
}

template <typename F>
void launch_backward(int64_t B, int64_t T, int64_t C, const F* w, const F* u, const F* k,
                     const F* v, const F* y, const F* gy, const F* a, const F* b, const F* p,
                     const F* ga, const F* gb, const F* gp, F* gk, F* gv, F* gw_part,
                     F* gu_part, F* ga_in, F* gb_in, F* gp_in, cudaStream_t stream) {
  backward_kernel<F><<<blocks_for(B, C), kThreads, 0, stream>>>(
      B, T, C, w, u, k, v, y, gy, a, b, p, ga, gb, gp, gk, gv, gw_part, gu_part, ga_in, gb_in,
      gp_in);
}

}  // namespace

// The launchers wkv_cuda_bind.cpp calls (float and double). Pointers are device pointers to
// contiguous tensors: w, u (C,); k, v, y, gy, gk, gv (B, T, C); states and parts (B, C).
// They only enqueue the kernel on `stream`; the caller checks cudaGetLastError().
void wkv_cuda_forward(int64_t B, int64_t T, int64_t C, const float* w, const float* u,
                      const float* k, const float* v, const float* a, const float* b,
                      const float* p, float* y, float* a_out, float* b_out, float* p_out,
                      cudaStream_t stream) {
  launch_forward(B, T, C, w, u, k, v, a, b, p, y, a_out, b_out, p_out, stream);
}

void wkv_cuda_forward(int64_t B, int64_t T, int64_t C, const double* w, const double* u,
                      const double* k, const double* v, const double* a, const double* b,
                      const double* p, double* y, double* a_out, double* b_out, double* p_out,
                      cudaStream_t stream) {
  launch_forward(B, T, C, w, u, k, v, a, b, p, y, a_out, b_out, p_out, stream);
}

void wkv_cuda_backward(int64_t B, int64_t T, int64_t C, const float* w, const float* u,
                       const float* k, const float* v, const float* y, const float* gy,
                       const float* a, const float* b, const float* p, const float* ga,
                       const float* gb, const float* gp, float* gk, float* gv, float* gw_part,
                       float* gu_part, float* ga_in, float* gb_in, float* gp_in,
                       cudaStream_t stream) {
  launch_backward(B, T, C, w, u, k, v, y, gy, a, b, p, ga, gb, gp, gk, gv, gw_part, gu_part,
                  ga_in, gb_in, gp_in, stream);
}

void wkv_cuda_backward(int64_t B, int64_t T, int64_t C, const double* w, const double* u,
                       const double* k, const double* v, const double* y, const double* gy,
                       const double* a, const double* b, const double* p, const double* ga,
                       const double* gb, const double* gp, double* gk, double* gv,
                       double* gw_part, double* gu_part, double* ga_in, double* gb_in,
                       double* gp_in, cudaStream_t stream) {
  launch_backward(B, T, C, w, u, k, v, y, gy, a, b, p, ga, gb, gp, gk, gv, gw_part, gu_part,
                  ga_in, gb_in, gp_in, stream);
}
