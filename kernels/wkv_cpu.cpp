// wkv_cpu.cpp: the WKV scan of wkv_scan.h on the CPU, as a torch extension.
//
// The work is split into jobs of (one batch row, one block of kBlock adjacent channels), run
// in parallel on at::parallel_for's threads (OpenMP: built with -fopenmp). A job scans its
// block through all T tokens; at each token the inner loop runs over the block's channels,
// which are contiguous in memory (c is the fastest index of (B, T, C)): a SIMD loop. Channels
// left over when C is not a multiple of kBlock are scanned one per job with N = 1, the very
// instantiation each GPU thread runs, so the CPU tests cover that code path too.
//
// The SIMD width matters (about 5x between SSE2 and AVX-512 on the machine of
// kernels/README.md), but -march=native would make a build that crashes with SIGILL on an
// older CPU sharing the same extension cache. So the job functions are compiled three times,
// for x86-64-v4 (AVX-512), x86-64-v3 (AVX2, FMA) and baseline x86-64, and the loader picks
// the best one the running CPU has (GCC function multi-versioning through glibc's ifunc).
// Other compilers and architectures get one build for the compiler's default target.
#include "wkv_bind.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <vector>

#include "wkv_scan.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__GLIBC__)
#define WKV_CPU_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define WKV_CPU_CLONES
#endif

namespace {

constexpr int kBlock = 32;  // channels per job: measured faster than 16 or 64 (README)

// Runs fn(i) for the jobs i = 0 .. count-1 of T tokens each on torch's intra-op threads.
// Threads only pay off with enough work each: below ~2^15 channel-steps per thread (tens of
// microseconds) everything runs on the calling thread; small calls are common (tests,
// gradcheck, RNN mode one token at a time). Jobs are handed out one at a time from a shared
// counter rather than split in equal ranges up front, so that a thread the OS preempts (on a
// busy machine) does not hold the others up.
template <typename Fn>
void for_each_job(int64_t count, int64_t T, const Fn& fn) {
  const int64_t per_thread = std::max<int64_t>(1, (int64_t{1} << 15) / (T * kBlock));
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), count / per_thread);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::max<int64_t>(threads, 1), 1, [&](int64_t, int64_t) {
    for (int64_t i = next++; i < count; i = next++) fn(i);
  });
}

// Job i: batch row b, channels [c0, c0 + kBlock) for a full block, else the single channel c0.
struct Job {
  int64_t b, c0;
  bool full;
};

int64_t jobs_per_row(int64_t C) { return C / kBlock + C % kBlock; }

Job job_at(int64_t i, int64_t C) {
  const int64_t blocks = C / kBlock, b = i / jobs_per_row(C), j = i % jobs_per_row(C);
  return j < blocks ? Job{b, j * kBlock, true} : Job{b, blocks * kBlock + (j - blocks), false};
}

// Raw pointers to the whole tensors; each job offsets them to its row and channels.
template <typename F>
struct ForwardArgs {
  int64_t T, C;
  const F *w, *u, *k, *v, *a, *b, *p;
  F *y, *a_out, *b_out, *p_out;
};

template <typename F>
struct BackwardArgs {
  int64_t T, C;
  const F *w, *u, *k, *v, *y, *gy, *a, *b, *p, *ga, *gb, *gp;
  F *gk, *gv, *gw_part, *gu_part, *ga_in, *gb_in, *gp_in;
};

template <typename F, int N>
WKV_INLINE void forward_block(const ForwardArgs<F>& x, const Job& job) {
  const int64_t c = job.c0, seq = job.b * x.T * x.C + c, st = job.b * x.C + c;
  wkv::forward_scan<F, N>(x.T, x.C, x.w + c, x.u + c, x.k + seq, x.v + seq, x.a + st,
                          x.b + st, x.p + st, x.y + seq, x.a_out + st, x.b_out + st,
                          x.p_out + st);
}

template <typename F, int N>
WKV_INLINE void backward_block(const BackwardArgs<F>& x, const Job& job) {
  const int64_t c = job.c0, seq = job.b * x.T * x.C + c, st = job.b * x.C + c;
  wkv::backward_scan<F, N>(x.T, x.C, x.w + c, x.u + c, x.k + seq, x.v + seq, x.y + seq,
                           x.gy + seq, x.a + st, x.b + st, x.p + st, x.ga + st, x.gb + st,
                           x.gp + st, x.gk + seq, x.gv + seq, x.gw_part + st, x.gu_part + st,
                           x.ga_in + st, x.gb_in + st, x.gp_in + st);
}

// One job; compiled once per instruction set (see the top of the file).
template <typename F>
WKV_CPU_CLONES void forward_job(const ForwardArgs<F>& x, Job job) {
  if (job.full) {
    forward_block<F, kBlock>(x, job);
  } else {
    forward_block<F, 1>(x, job);
  }
}

template <typename F>
WKV_CPU_CLONES void backward_job(const BackwardArgs<F>& x, Job job) {
  if (job.full) {
    backward_block<F, kBlock>(x, job);
  } else {
    backward_block<F, 1>(x, job);
  }
}

// ---------------------------------------------------------------------------- bindings

using wkv_bind::in;
using wkv_bind::out;

void check(const std::vector<at::Tensor>& xs, int64_t T) {
  wkv_bind::check(xs, T, c10::DeviceType::CPU, "cpp");
}

// y and the outgoing state (a, b, p) for k, v (B, T, C) from the incoming state (B, C).
std::vector<at::Tensor> forward(at::Tensor w, at::Tensor u, at::Tensor k, at::Tensor v,
                                at::Tensor a, at::Tensor b, at::Tensor p) {
  const int64_t B = k.size(0), T = k.size(1), C = k.size(2);
  check({w, u, k, v, a, b, p}, T);
  auto y = at::empty_like(k);
  auto a_out = at::empty_like(a), b_out = at::empty_like(a), p_out = at::empty_like(a);
  AT_DISPATCH_FLOATING_TYPES(k.scalar_type(), "wkv_forward_cpu", [&] {
    using F = scalar_t;
    const ForwardArgs<F> x{T, C, in<F>(w), in<F>(u), in<F>(k), in<F>(v), in<F>(a), in<F>(b),
                           in<F>(p), out<F>(y), out<F>(a_out), out<F>(b_out), out<F>(p_out)};
    for_each_job(B * jobs_per_row(C), T, [&](int64_t i) { forward_job<F>(x, job_at(i, C)); });
  });
  return {y, a_out, b_out, p_out};
}

// Gradients w.r.t. w, u, k, v, a_in, b_in, p_in given those w.r.t. y, a_out, b_out, p_out.
std::vector<at::Tensor> backward(at::Tensor w, at::Tensor u, at::Tensor k, at::Tensor v,
                                 at::Tensor y, at::Tensor gy, at::Tensor a, at::Tensor b,
                                 at::Tensor p, at::Tensor ga, at::Tensor gb, at::Tensor gp) {
  const int64_t B = k.size(0), T = k.size(1), C = k.size(2);
  check({w, u, k, v, y, gy, a, b, p, ga, gb, gp}, T);
  auto gk = at::empty_like(k), gv = at::empty_like(k);
  auto gw_part = at::empty_like(a), gu_part = at::empty_like(a);
  auto ga_in = at::empty_like(a), gb_in = at::empty_like(a), gp_in = at::empty_like(a);
  AT_DISPATCH_FLOATING_TYPES(k.scalar_type(), "wkv_backward_cpu", [&] {
    using F = scalar_t;
    const BackwardArgs<F> x{T, C, in<F>(w), in<F>(u), in<F>(k), in<F>(v), in<F>(y),
                            in<F>(gy), in<F>(a), in<F>(b), in<F>(p), in<F>(ga), in<F>(gb),
                            in<F>(gp), out<F>(gk), out<F>(gv), out<F>(gw_part),
                            out<F>(gu_part), out<F>(ga_in), out<F>(gb_in), out<F>(gp_in)};
    for_each_job(B * jobs_per_row(C), T, [&](int64_t i) { backward_job<F>(x, job_at(i, C)); });
  });
  // w and u are shared by the batch: sum the per-row shares.
  return {gw_part.sum(0), gu_part.sum(0), gk, gv, ga_in, gb_in, gp_in};
}

}  // namespace

// torch.ops.<build>.forward(w, u, k, v, a, b, p) -> [y, a, b, p];
// backward(w, u, k, v, y, gy, a, b, p, ga, gb, gp) -> [gw, gu, gk, gv, ga_in, gb_in, gp_in].
TORCH_LIBRARY(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward);
  m.def("backward", &backward);
}
