// ops_cpu.cpp: the elementwise pieces of RWKV's two mixing blocks, each fused into one pass
// over memory, forward and backward, for eager training on the CPU (rwkv_ref/ops.py).
//
// In eager PyTorch every elementwise op reads and writes whole (B, T, C) tensors, and every
// result is a fresh allocation (at these sizes, fresh pages from the OS). The three token-shift
// mixes of a TimeMixing block cost 3 ops forward and about 20 backward (lerp's backward is 3
// multiplies, 2 subtractions and a sum per mix); the squared ReLU of the channel mix costs 2
// forward and 4 backward on the widest tensor of the model, (B, T, 4C). Here each is one loop:
//
//   mixes:        out_m = x_prev + mu_m (x - x_prev),   m = 0 .. M-1 (M = 2 or 3)
//     backward:   gx = sum_m g_m mu_m,  gx_prev = sum_m g_m (1 - mu_m),
//                 gmu_m = sum over rows of g_m (x - x_prev)
//   relu_square:  out = max(x, 0)^2;    backward: gx = 2 g max(x, 0)
//
// Rows (all leading dimensions flattened, C contiguous channels each) are split into chunks
// run on at::parallel_for's threads; the inner loop over channels is a SIMD loop, compiled for
// several instruction sets as in wkv_cpu.cpp. gmu is summed per chunk and the chunks' sums
// added at the end, so the result does not depend on the number of threads.
#include "torch_op.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__GLIBC__)
#define OPS_CPU_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define OPS_CPU_CLONES
#endif

namespace {

constexpr int64_t kGrain = int64_t{1} << 15;  // elements per chunk: below this, one thread

// The chunks of rows [0, rows): about kGrain elements each, at most 64.
int64_t chunk_count(int64_t rows, int64_t C) {
  return std::clamp<int64_t>(rows * C / kGrain, 1, std::min<int64_t>(rows, 64));
}

template <typename Fn>
void for_each_chunk(int64_t rows, int64_t chunks, const Fn& fn) {
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) fn(i, rows * i / chunks, rows * (i + 1) / chunks);
  });
}

template <typename F, int M>
OPS_CPU_CLONES void mixes_rows(int64_t r0, int64_t r1, int64_t C, const F* x, const F* xp,
                               const F* mu, F* const* out) {
  for (int64_t r = r0; r < r1; ++r) {
    const F* xr = x + r * C;
    const F* pr = xp + r * C;
    for (int m = 0; m < M; ++m) {
      const F* mm = mu + m * C;
      F* o = out[m] + r * C;
      for (int64_t c = 0; c < C; ++c) o[c] = pr[c] + mm[c] * (xr[c] - pr[c]);
    }
  }
}

// Unrolled over the M gradients (restrict-qualified, one pointer each) so that GCC vectorises
// the loop over channels: with the M loop inside it and pointers it cannot prove apart, it
// does not.
template <typename F, int M>
OPS_CPU_CLONES void mixes_backward_rows(int64_t r0, int64_t r1, int64_t C,
                                        const F* __restrict__ x, const F* __restrict__ xp,
                                        const F* __restrict__ mu, const F* const* g,
                                        F* __restrict__ gx, F* __restrict__ gxp,
                                        F* __restrict__ gmu) {
  static_assert(M == 2 || M == 3, "two or three mixes");
  const F* __restrict__ mu0 = mu;
  const F* __restrict__ mu1 = mu + C;
  const F* __restrict__ mu2 = mu + (M - 1) * C;
  F* __restrict__ gmu0 = gmu;
  F* __restrict__ gmu1 = gmu + C;
  F* __restrict__ gmu2 = gmu + (M - 1) * C;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t o = r * C;
    const F* __restrict__ g0 = g[0] + o;
    const F* __restrict__ g1 = g[1] + o;
    const F* __restrict__ g2 = g[M - 1] + o;
    for (int64_t c = 0; c < C; ++c) {
      const F d = x[o + c] - xp[o + c];
      F to_x = g0[c] * mu0[c] + g1[c] * mu1[c];
      F to_prev = g0[c] * (F(1) - mu0[c]) + g1[c] * (F(1) - mu1[c]);
      gmu0[c] += g0[c] * d;
      gmu1[c] += g1[c] * d;
      if constexpr (M == 3) {
        to_x += g2[c] * mu2[c];
        to_prev += g2[c] * (F(1) - mu2[c]);
        gmu2[c] += g2[c] * d;
      }
      gx[o + c] = to_x;
      gxp[o + c] = to_prev;
    }
  }
}

template <typename F>
OPS_CPU_CLONES void relu_square_rows(int64_t i0, int64_t i1, const F* x, F* out) {
  for (int64_t i = i0; i < i1; ++i) {
    const F r = x[i] > F(0) ? x[i] : F(0);
    out[i] = r * r;
  }
}

template <typename F>
OPS_CPU_CLONES void relu_square_backward_rows(int64_t i0, int64_t i1, const F* x, const F* g,
                                              F* gx) {
  for (int64_t i = i0; i < i1; ++i) gx[i] = x[i] > F(0) ? F(2) * g[i] * x[i] : F(0);
}

// ---------------------------------------------------------------------------- checks

void check_same(const at::Tensor& ref, const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu(), "rwkv_ref ops: ", what, " must be on the CPU");
  TORCH_CHECK(t.is_contiguous(), "rwkv_ref ops: ", what, " must be contiguous");
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "rwkv_ref ops: ", what, " has dtype ",
              t.scalar_type(), " but the input has ", ref.scalar_type());
  TORCH_CHECK(t.sizes() == ref.sizes(), "rwkv_ref ops: ", what, " has shape ", t.sizes(),
              " but the input has ", ref.sizes());
}

void check_mixes(const at::Tensor& x, const at::Tensor& xp, const at::Tensor& mu) {
  check_same(x, x, "x");
  check_same(x, xp, "x_prev");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, "rwkv_ref ops: x must have channels");
  TORCH_CHECK(mu.dim() == 2 && (mu.size(0) == 2 || mu.size(0) == 3) &&
                  mu.size(1) == x.size(-1) && mu.is_contiguous() &&
                  mu.scalar_type() == x.scalar_type() && mu.device().is_cpu(),
              "rwkv_ref ops: mu must be a contiguous (2 or 3, C) tensor like x, got ",
              mu.sizes());
}

// ---------------------------------------------------------------------------- the ops

// [out_0, .., out_{M-1}] with out_m = lerp(x_prev, x, mu[m]); x, x_prev (..., C), mu (M, C).
std::vector<at::Tensor> mixes(at::Tensor x, at::Tensor xp, at::Tensor mu) {
  check_mixes(x, xp, mu);
  const int64_t M = mu.size(0), C = x.size(-1), rows = x.numel() / C;
  std::vector<at::Tensor> out;
  for (int64_t m = 0; m < M; ++m) out.push_back(at::empty_like(x));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rwkv_ref_mixes", [&] {
    using F = scalar_t;
    const F *px = x.data_ptr<F>(), *pp = xp.data_ptr<F>(), *pm = mu.data_ptr<F>();
    F* po[3];
    for (int64_t m = 0; m < M; ++m) po[m] = out[m].data_ptr<F>();
    for_each_chunk(rows, chunk_count(rows, C), [&](int64_t, int64_t r0, int64_t r1) {
      if (M == 3) {
        mixes_rows<F, 3>(r0, r1, C, px, pp, pm, po);
      } else {
        mixes_rows<F, 2>(r0, r1, C, px, pp, pm, po);
      }
    });
  });
  return out;
}

// [gx, gx_prev, gmu] given g, the M gradients w.r.t. the outputs (each like x).
std::vector<at::Tensor> mixes_backward(at::Tensor x, at::Tensor xp, at::Tensor mu,
                                       std::vector<at::Tensor> g) {
  check_mixes(x, xp, mu);
  const int64_t M = mu.size(0), C = x.size(-1), rows = x.numel() / C;
  TORCH_CHECK(static_cast<int64_t>(g.size()) == M, "rwkv_ref ops: ", M,
              " output gradients expected, got ", g.size());
  for (const auto& gm : g) check_same(x, gm, "an output gradient");
  const int64_t chunks = chunk_count(rows, C);
  auto gx = at::empty_like(x), gxp = at::empty_like(x);
  auto parts = at::zeros({chunks, M, C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rwkv_ref_mixes_backward", [&] {
    using F = scalar_t;
    const F *px = x.data_ptr<F>(), *pp = xp.data_ptr<F>(), *pm = mu.data_ptr<F>();
    const F* pg[3];
    for (int64_t m = 0; m < M; ++m) pg[m] = g[m].data_ptr<F>();
    F *pgx = gx.data_ptr<F>(), *pgp = gxp.data_ptr<F>(), *pparts = parts.data_ptr<F>();
    for_each_chunk(rows, chunks, [&](int64_t i, int64_t r0, int64_t r1) {
      F* gmu = pparts + i * M * C;
      if (M == 3) {
        mixes_backward_rows<F, 3>(r0, r1, C, px, pp, pm, pg, pgx, pgp, gmu);
      } else {
        mixes_backward_rows<F, 2>(r0, r1, C, px, pp, pm, pg, pgx, pgp, gmu);
      }
    });
  });
  return {gx, gxp, parts.sum(0)};
}

at::Tensor relu_square(at::Tensor x) {
  check_same(x, x, "x");
  auto out = at::empty_like(x);
  const int64_t n = x.numel();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rwkv_ref_relu_square", [&] {
    using F = scalar_t;
    const F* px = x.data_ptr<F>();
    F* po = out.data_ptr<F>();
    for_each_chunk(n, chunk_count(n, 1), [&](int64_t, int64_t i0, int64_t i1) {
      relu_square_rows<F>(i0, i1, px, po);
    });
  });
  return out;
}

at::Tensor relu_square_backward(at::Tensor x, at::Tensor g) {
  check_same(x, x, "x");
  check_same(x, g, "the output gradient");
  auto gx = at::empty_like(x);
  const int64_t n = x.numel();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rwkv_ref_relu_square_backward", [&] {
    using F = scalar_t;
    const F *px = x.data_ptr<F>(), *pg = g.data_ptr<F>();
    F* pgx = gx.data_ptr<F>();
    for_each_chunk(n, chunk_count(n, 1), [&](int64_t, int64_t i0, int64_t i1) {
      relu_square_backward_rows<F>(i0, i1, px, pg, pgx);
    });
  });
  return gx;
}

}  // namespace

// torch.ops.<build>.mixes(x, x_prev, mu) -> [lerp(x_prev, x, mu[m]) for m]: x, x_prev (..., C),
// mu (M, C); mixes_backward(x, x_prev, mu, [g_m]) -> [gx, gx_prev, gmu]; relu_square(x) ->
// max(x, 0)^2; relu_square_backward(x, g) -> 2 g max(x, 0).
TORCH_LIBRARY(TORCH_EXTENSION_NAME, m) {
  m.def("mixes", &mixes);
  m.def("mixes_backward", &mixes_backward);
  m.def("relu_square", &relu_square);
  m.def("relu_square_backward", &relu_square_backward);
}
