// rnn_cpu.cpp: RNN mode (one token at a time) on the CPU: the matrix-vector products, and a
// whole block fused into one call.
//
// 1. linear(x, w): y = x W^T for a few rows of x.
//
// Decoding one token reads every weight matrix once and does two flops per weight: the time
// is the time to stream the weights from memory. A product of a (B, K) input with an (N, K)
// row-major weight, B small, is therefore written to read W exactly once, in memory order:
// row n of W is loaded (K contiguous values) and multiplied with each of the B inputs, which
// stay in the L1 cache. The dot products accumulate in float32 in kLanes independent lanes (a
// chain of dependent adds would stall on the add's latency), summed at the end of the row.
// Rows are split among torch's intra-op threads in chunks of at least ~256 KiB of weights.
//
// Weights in float32 or bfloat16 (bf16 -> f32 is a 16-bit shift, so bf16 weights halve the
// bytes read at no cost in arithmetic); inputs are converted to float32 by the caller
// (rwkv_ref/kernel.py), the output is float32. The row loops are compiled for several
// instruction sets and the loader picks the best one the CPU has: AVX2 (x86-64-v3) or
// baseline for float32, which AVX-512 does not read any faster (on the AMD EPYC of
// kernels/README.md its build streamed float32 weights at ~88% of the AVX2 build's rate);
// AVX-512 (x86-64-v4) too for bf16, where the conversions make it ~15% faster.
//
// 2. block_step(...): Block.step of rwkv_ref/model.py for one token, in one call.
//
// Once the products stream at memory speed, what is left of a token's time is ~40 small
// element-wise torch ops per block (LayerNorms, token-shift mixes, the WKV update, gates), each
// costing microseconds of dispatch for a few thousand flops: ~15% of the time of a 169M model.
// block_step does the same arithmetic as Block.step, line by line (the Python names are used
// below), in float32, calling linear's row loop for the seven products and the WKV scan's
// forward (wkv_scan.h) for the WKV update. The tests hold it to Block.step; the Python code
// stays the definition.
#include "torch_op.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <vector>

#include "wkv_scan.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__GLIBC__)
#define F32_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#define BF16_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define F32_CLONES
#define BF16_CLONES
#endif
// The row loop must be inlined into each clone, or it is compiled once, for the baseline.
#define MATVEC_INLINE inline __attribute__((always_inline))

namespace {

constexpr int kLanes = 32;  // float32 partial sums per row: two AVX-512 or four AVX2 registers
constexpr int kLanesBf16 = 16;  // bf16 pairs per row: measured faster than 32 or 64
constexpr int kMaxBatch = 16;

MATVEC_INLINE float as_float(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// y[b, n] = sum_k w[n, k] x[b, k] for the rows n in [n0, n1) and all B inputs; float32 w.
F32_CLONES void rows_f32(const float* w, const float* x, float* y, int64_t B, int64_t N,
                            int64_t K, int64_t n0, int64_t n1) {
  const int64_t k_main = K / kLanes * kLanes;
  for (int64_t n = n0; n < n1; ++n) {
    const float* row = w + n * K;
    for (int64_t b = 0; b < B; ++b) {
      const float* xb = x + b * K;
      float lanes[kLanes] = {};
      for (int64_t k = 0; k < k_main; k += kLanes) {
#pragma omp simd
        for (int j = 0; j < kLanes; ++j) lanes[j] += row[k + j] * xb[k + j];
      }
      float sum = 0.0f;
      for (int64_t k = k_main; k < K; ++k) sum += row[k] * xb[k];
      for (int j = 0; j < kLanes; ++j) sum += lanes[j];
      y[b * N + n] = sum;
    }
  }
}

// The same for bfloat16 w, read as 32-bit pairs (w[n, 2i], w[n, 2i+1]): on little-endian x86,
// the pair's low half is w[n, 2i], a float once shifted up by 16 bits, and its high half is
// w[n, 2i+1], a float once the low half is masked off. xe, xo: (B, K/2) the even and odd
// columns of x. Two cheap integer ops per two weights, no widening shuffles.
BF16_CLONES void rows_bf16(const uint16_t* w, const float* xe, const float* xo, const float* x,
                             float* y, int64_t B, int64_t N, int64_t K, int64_t n0, int64_t n1) {
  const int64_t H = K / 2, h_main = H / kLanesBf16 * kLanesBf16;
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* row = w + n * K;
    for (int64_t b = 0; b < B; ++b) {
      const float *e = xe + b * H, *o = xo + b * H;
      float lanes[kLanesBf16] = {};
      for (int64_t h = 0; h < h_main; h += kLanesBf16) {
#pragma omp simd
        for (int j = 0; j < kLanesBf16; ++j) {
          uint32_t pair;
          std::memcpy(&pair, row + 2 * (h + j), sizeof pair);
          lanes[j] += as_float(pair << 16) * e[h + j] + as_float(pair & 0xFFFF0000u) * o[h + j];
        }
      }
      float sum = 0.0f;
      for (int64_t k = 2 * h_main; k < K; ++k)
        sum += as_float(uint32_t{row[k]} << 16) * x[b * K + k];
      for (int j = 0; j < kLanesBf16; ++j) sum += lanes[j];
      y[b * N + n] = sum;
    }
  }
}

// y (B, N) = x (B, K) w^T for a contiguous (N, K) w, float32 or bfloat16, on torch's threads
// in chunks of rows of at least ~256 KiB.
void products(const at::Tensor& w, const float* x, float* y, int64_t B) {
  const int64_t N = w.size(0), K = w.size(1);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / (K * w.element_size()));
  if (w.scalar_type() == at::kFloat) {
    const float* wp = w.data_ptr<float>();
    at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
      rows_f32(wp, x, y, B, N, K, n0, n1);
    });
    return;
  }
  const int64_t H = K / 2;
  std::vector<float> xe(B * H), xo(B * H);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      xe[b * H + h] = x[b * K + 2 * h];
      xo[b * H + h] = x[b * K + 2 * h + 1];
    }
  const auto* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    rows_bf16(wp, xe.data(), xo.data(), x, y, B, N, K, n0, n1);
  });
}

// x (B, K) float32, w (N, K) float32 or bfloat16, both contiguous on the CPU -> (B, N) float32.
at::Tensor linear(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "matvec: tensors must be on the CPU");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1),
              "matvec: expected x (B, K) and w (N, K), got x ", x.sizes(), " and w ", w.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat, "matvec: x must be float32");
  TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16,
              "matvec: w must be float32 or bfloat16, got ", w.scalar_type());
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous(), "matvec: tensors must be contiguous");
  TORCH_CHECK(x.size(0) <= kMaxBatch, "matvec: at most ", kMaxBatch, " rows of x");
  const int64_t B = x.size(0), N = w.size(0), K = w.size(1);
  at::Tensor y = at::empty({B, N}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  products(w, xp, yp, B);
  return y;
}


// ---------------------------------------------------------------------------- block_step

// A weight matrix or parameter vector, float32 or bfloat16 (all of one block share the dtype).
struct Weights {
  const void* data;
  bool bf16;
  MATVEC_INLINE float operator[](int64_t i) const {
    if (!bf16) return static_cast<const float*>(data)[i];
    return as_float(uint32_t{static_cast<const uint16_t*>(data)[i]} << 16);
  }
};

Weights weights(const at::Tensor& t, at::ScalarType dtype, int64_t numel, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == dtype &&
                  t.numel() == numel,
              "block_step: ", name, " must be a contiguous CPU tensor of ", numel, " ", dtype,
              " values, got ", t.sizes(), " ", t.scalar_type());
  return Weights{t.data_ptr(), dtype == at::kBFloat16};
}

// out (B, N) = in (B, K) W^T for W (N, K).
void product(const at::Tensor& w, const std::vector<float>& in, std::vector<float>& out,
             int64_t B) {
  out.resize(B * w.size(0));
  products(w, in.data(), out.data(), B);
}

// y = LayerNorm(x) * weight + bias over each row of C values (biased variance, as torch).
void layer_norm(const float* x, Weights weight, Weights bias, double eps, int64_t C, float* y) {
  double mean = 0, var = 0;
  for (int64_t c = 0; c < C; ++c) mean += x[c];
  mean /= C;
  for (int64_t c = 0; c < C; ++c) var += (x[c] - mean) * (x[c] - mean);
  const float scale = static_cast<float>(1.0 / std::sqrt(var / C + eps));
  for (int64_t c = 0; c < C; ++c)
    y[c] = static_cast<float>(x[c] - mean) * scale * weight[c] + bias[c];
}

// mix(x, x_prev, mu) = x_prev + mu (x - x_prev), torch.lerp's formula.
MATVEC_INLINE float mix(float x, float x_prev, float mu) { return x_prev + mu * (x - x_prev); }
MATVEC_INLINE float sigmoid(float z) { return 1.0f / (1.0f + std::exp(-z)); }

// params: ln1.weight, ln1.bias, ln2.weight, ln2.bias, att.time_mix_k, att.time_mix_v,
// att.time_mix_r, ffn.time_mix_k, ffn.time_mix_r, all (C,); matrices: att.receptance, att.key,
// att.value, att.output, ffn.key, ffn.receptance, ffn.value. w = exp(time_decay) and
// u = time_first: (A,) float32. x, att_x, ffn_x: (B, C) float32; a, b, p: (B, A) float32.
// Returns [x, att_x, a, b, p, ffn_x] after this token, new tensors (the inputs are not changed).
std::vector<at::Tensor> block_step(const at::Tensor& x_in, const at::Tensor& att_x_in,
                                   const at::Tensor& a_in, const at::Tensor& b_in,
                                   const at::Tensor& p_in, const at::Tensor& ffn_x_in,
                                   const std::vector<at::Tensor>& params,
                                   const std::vector<at::Tensor>& matrices,
                                   const at::Tensor& w_in, const at::Tensor& u_in, double eps) {
  TORCH_CHECK(params.size() == 9 && matrices.size() == 7, "block_step: 9 params, 7 matrices");
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(0) <= kMaxBatch, "block_step: x must be (B, C)");
  const int64_t B = x_in.size(0), C = x_in.size(1), A = w_in.numel();
  const int64_t F = matrices[4].size(0);
  const at::ScalarType dtype = matrices[0].scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16,
              "block_step: weights must be float32 or bfloat16");
  const int64_t shapes[7][2] = {{A, C}, {A, C}, {A, C}, {C, A}, {F, C}, {C, C}, {C, F}};
  for (int i = 0; i < 7; ++i) {
    weights(matrices[i], dtype, shapes[i][0] * shapes[i][1], "a weight matrix");
    TORCH_CHECK(matrices[i].size(0) == shapes[i][0], "block_step: matrix ", i, " has ",
                matrices[i].size(0), " rows, expected ", shapes[i][0]);
  }
  Weights P[9];
  for (int i = 0; i < 9; ++i) P[i] = weights(params[i], dtype, C, "a (C,) parameter");
  const Weights ln1_w = P[0], ln1_b = P[1], ln2_w = P[2], ln2_b = P[3];
  const Weights att_mix_k = P[4], att_mix_v = P[5], att_mix_r = P[6];
  const Weights ffn_mix_k = P[7], ffn_mix_r = P[8];
  const float* dense[6];
  const at::Tensor* states[6] = {&x_in, &att_x_in, &ffn_x_in, &a_in, &b_in, &p_in};
  const int64_t widths[6] = {C, C, C, A, A, A};
  for (int i = 0; i < 6; ++i)
    dense[i] = static_cast<const float*>(
        weights(*states[i], at::kFloat, B * widths[i], "the state and x").data);
  const float *x0 = dense[0], *att_x = dense[1], *ffn_x = dense[2];
  const float *a = dense[3], *b = dense[4], *p = dense[5];
  const float* w = static_cast<const float*>(weights(w_in, at::kFloat, A, "w").data);
  const float* u = static_cast<const float*>(weights(u_in, at::kFloat, A, "u").data);

  auto opts = x_in.options();
  at::Tensor x_out = at::empty({B, C}, opts), xa_out = at::empty({B, C}, opts),
             xf_out = at::empty({B, C}, opts), a_out = at::empty({B, A}, opts),
             b_out = at::empty({B, A}, opts), p_out = at::empty({B, A}, opts);
  float *x = x_out.data_ptr<float>(), *xa = xa_out.data_ptr<float>();
  float *xf = xf_out.data_ptr<float>();
  std::vector<float> xr(B * C), xk(B * C), xv(B * C), r, k, v, wkv_y(B * A), gated(B * A),
      out;

  // att: xa = ln1(x); r, k, v from the token-shifted mixes
  for (int64_t i = 0; i < B; ++i) {
    layer_norm(x0 + i * C, ln1_w, ln1_b, eps, C, xa + i * C);
    for (int64_t c = 0; c < C; ++c) {
      const int64_t j = i * C + c;
      xr[j] = mix(xa[j], att_x[j], att_mix_r[c]);
      xk[j] = mix(xa[j], att_x[j], att_mix_k[c]);
      xv[j] = mix(xa[j], att_x[j], att_mix_v[c]);
    }
  }
  product(matrices[0], xr, r, B);
  product(matrices[1], xk, k, B);
  product(matrices[2], xv, v, B);
  // wkv_step: one token of the WKV scan's own forward (wkv_scan.h), channel by channel
  float *a2 = a_out.data_ptr<float>(), *b2 = b_out.data_ptr<float>(), *p2 = p_out.data_ptr<float>();
  for (int64_t j = 0; j < B * A; ++j) {
    const int64_t c = j % A;
    wkv::forward_scan<float, 1>(1, A, w + c, u + c, &k[j], &v[j], a + j, b + j, p + j, &wkv_y[j],
                                a2 + j, b2 + j, p2 + j);
    gated[j] = sigmoid(r[j]) * wkv_y[j];
  }
  product(matrices[3], gated, out, B);
  for (int64_t j = 0; j < B * C; ++j) x[j] = x0[j] + out[j];

  // ffn: xf = ln2(x); out = sigmoid(W'_r xr) * W'_v relu(W'_k xk)^2
  for (int64_t i = 0; i < B; ++i) {
    layer_norm(x + i * C, ln2_w, ln2_b, eps, C, xf + i * C);
    for (int64_t c = 0; c < C; ++c) {
      const int64_t j = i * C + c;
      xk[j] = mix(xf[j], ffn_x[j], ffn_mix_k[c]);
      xr[j] = mix(xf[j], ffn_x[j], ffn_mix_r[c]);
    }
  }
  product(matrices[4], xk, k, B);
  for (float& z : k) z = z > 0 ? z * z : 0.0f;
  product(matrices[5], xr, r, B);
  product(matrices[6], k, out, B);
  for (int64_t j = 0; j < B * C; ++j) x[j] += sigmoid(r[j]) * out[j];
  return {x_out, xa_out, a_out, b_out, p_out, xf_out};
}

int64_t max_batch() { return kMaxBatch; }

}  // namespace

// torch.ops.<build>.linear(x, w): x (B, K) float32 @ w (N, K)^T -> (B, N) float32, B <= 16;
// block_step(...): one token through one block (Block.step), float32; max_batch(): the most
// rows one call takes (rwkv_ref.kernel.RNN_MAX_BATCH, checked by the tests).
TORCH_LIBRARY(TORCH_EXTENSION_NAME, m) {
  m.def("linear", &linear);
  m.def("block_step", &block_step);
  m.def("max_batch", &max_batch);
}
