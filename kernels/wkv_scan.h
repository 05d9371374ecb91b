// wkv_scan.h: the WKV scan of RWKV-4, forward and hand-derived backward, for ONE batch row
// and a block of N adjacent channels, all T tokens. The same body is compiled by g++ for the
// CPU (wkv_cpu.cpp, N = 32 channels per call, so that the inner loop over channels, which
// are contiguous in memory, vectorises) and by nvcc for the GPU (wkv_cuda.cu, N = 1: one
// thread per channel). No torch headers.
//
// Convention: w is the POSITIVE decay rate, w = exp(time_decay); the per-step decay is
// exp(-w). (The official RWKV-4 kernel is handed -exp(time_decay) instead and adds it.)
//
// Layout: k, v, y, gy, gk, gv are (B, T, C) contiguous, element (b, t, c) at b*T*C + t*C + c;
// the functions below get pointers already offset to (b, 0, c0) and step by C along t.
// w, u are (C,) and the states (B, C); their pointers are offset to c0 and (b, c0).
//
// ---------------------------------------------------------------------------- the math
// Per channel, with E_t = e^{u + k_t} and lambda = e^{-w}:
//
//   y_t = (N_{t-1} + E_t v_t) / Z_t,            Z_t = D_{t-1} + E_t
//   N_t = lambda N_{t-1} + e^{k_t} v_t,         D_t = lambda D_{t-1} + e^{k_t}
//
// with N_{-1}, D_{-1} the incoming state. A state is stored scaled as (a, b, p):
// N = a e^p, D = b e^p, p the largest exponent among the terms of N and D; the final
// p_T = max(p_in - T w, max_i k_i - (T-1-i) w). Every exp below has an argument <= 0.
//
// ---------------------------------------------------------------------------- backward
// Write gX for dLoss/dX. The loss sees y_t (gradient gy_t) and the outgoing state
// (a_T, b_T, p_T) (gradients ga_T, gb_T, gp_T). Since a_T = N_T e^{-p_T}, b_T = D_T e^{-p_T}:
//
//   gN_T = ga_T e^{-p_T},  gD_T = gb_T e^{-p_T},  and p_T itself gets
//   g = gp_T - ga_T a_T - gb_T b_T, which flows through the max that defines p_T: to
//   k_{i*} and -(T-1-i*) to w if token i* won the max, or to p_in and -T to w if the
//   incoming state won.
//
// Reverse in time, gN_t and gD_t collect everything that depends on N_t, D_t:
//
//   gN_{t-1} = lambda gN_t + gy_t / Z_t
//   gD_{t-1} = lambda gD_t - gy_t y_t / Z_t
//   gk_t = gy_t E_t (v_t - y_t) / Z_t + e^{k_t} (gN_t v_t + gD_t)
//   gv_t = gy_t E_t / Z_t             + e^{k_t} gN_t
//   gu   = sum_t gy_t E_t (v_t - y_t) / Z_t
//
// and the incoming state: g a_in = gN_{-1} e^{p_in}, g b_in = gD_{-1} e^{p_in},
// g p_in = gN_{-1} N_{-1} + gD_{-1} D_{-1} (+ g above if the incoming state won p_T).
//
// gw is computed forward in time by forward-mode differentiation: N'_t = dN_t/dw obeys
// N'_t = lambda (N'_{t-1} - N_{t-1}), N'_{-1} = 0, and then
//
//   gw = sum_t gy_t (N'_{t-1} - y_t D'_{t-1}) / Z_t + gN_T N'_T + gD_T D'_T (+ the p_T term).
//
// Scaled forms, so that nothing overflows:
//  * forward: N'_t = aw e^{p_t}, D'_t = bw e^{p_t}, same scale as (aa, bb); with the output
//    step's rescaling Z_t = e^{po_t} (e1 bb + e2), po_t = max(pp, u + k_t):
//      q_t = gy_t / (e1 bb + e2),  r_t = u + k_t - po_t  (so E_t / Z_t = e^{r_t} q_t / gy_t)
//      gw += q_t e1 (aw - y_t bw),   gu += q_t e^{r_t} (v_t - y_t)
//  * reverse: gN_t = ga e^h, gD_t = gb e^h, h the largest exponent among the terms; the
//    terms are gy_tau e^{-po_tau} decayed by e^{-(tau-1-t) w}, and e^{-p_T} decayed by
//    e^{-(T-1-t) w}. Because p_T and every po_tau bound k_t minus the same decay,
//    k_t + h <= 0, so e^{k_t + h} <= 1; likewise p_in + h <= 0 at the end.
//
// The scratch trick (no T_MAX, no extra memory): the reverse pass needs q_t and r_t,
// computed in the forward pass. They are stored in the OUTPUT buffers gk[t] and gv[t] of the
// same channel; the reverse pass reads index t just before it overwrites that index with the
// final gk_t, gv_t. One caller (a GPU thread, or a CPU loop iteration) owns each (b, c)
// channel, so no one else ever reads or writes those addresses: it is race-free.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

// The scan functions are inlined into their callers (a GPU kernel, or a CPU function compiled
// once per instruction set, see wkv_cpu.cpp), and so compiled for that caller's target.
#if defined(__CUDACC__)
#define WKV_HOST_DEVICE __host__ __device__
#define WKV_INLINE __forceinline__
#define WKV_RESTRICT __restrict__
#elif defined(_MSC_VER)
#define WKV_HOST_DEVICE
#define WKV_INLINE __forceinline
#define WKV_RESTRICT __restrict
#else
#define WKV_HOST_DEVICE
#define WKV_INLINE inline __attribute__((always_inline))
#define WKV_RESTRICT __restrict__
#endif

namespace wkv {

template <typename T, typename S>
WKV_HOST_DEVICE WKV_INLINE T bit_cast_(S x) {
  static_assert(sizeof(T) == sizeof(S), "bit_cast_ needs equal sizes");
  T out;
  std::memcpy(&out, &x, sizeof out);  // compiles to nothing (also under nvcc)
  return out;
}

// exp that vectorises: the CPU loop over channels stays SIMD only if exp is plain arithmetic.
// float: x = n ln2 + r with n an integer and |r| <= ln2/2; e^r by its Taylor series to
// degree 7 (truncation error < 1e-8, so about 1 ulp after rounding), times 2^n built in the
// exponent bits. For x <= 88 (every exp in this file has x <= 0); below e^-87.3, the
// smallest normal float, it returns 0. A NaN stays NaN. The GPU runs the same code, so the
// CPU tests check the GPU's arithmetic too.
// double: the library exp (double is for tests and references, not speed).
WKV_HOST_DEVICE WKV_INLINE float exp_(float x) {
  const float log2e = 1.44269504f, ln2_hi = 0.693145752f, ln2_lo = 1.42860677e-6f;
  const float round_magic = 12582912.0f;  // 1.5 * 2^23: x + it rounds x to an integer
  const float xc = x < -87.3f ? -87.3f : x;
  const float shifted = xc * log2e + round_magic;  // = round_magic + n, exactly
  const float n = shifted - round_magic;
  const float r = (xc - n * ln2_hi) - n * ln2_lo;  // ln2_hi has zero low bits: n ln2_hi exact
  const float e = 1.0f + r * (1.0f + r * (1.0f / 2 + r * (1.0f / 6 + r * (1.0f / 24 +
                  r * (1.0f / 120 + r * (1.0f / 720 + r * (1.0f / 5040)))))));
  // n sits in the low bits of `shifted`; move n + 127 into the exponent field: 2^n.
  const uint32_t n_bits = bit_cast_<uint32_t>(shifted) - bit_cast_<uint32_t>(round_magic);
  const float two_n = bit_cast_<float>((n_bits + 127u) << 23);
  return x < -87.3f ? 0.0f : e * two_n;
}

WKV_HOST_DEVICE WKV_INLINE double exp_(double x) { return ::exp(x); }

// m = max(x, y), ex = e^{x - m}, ey = e^{y - m} with one exp: one of the two is e^0 = 1.
// (The same numbers as computing both exps: e^0 is exactly 1 and x - y = -(y - x).)
template <typename F>
WKV_HOST_DEVICE WKV_INLINE void rebase(F x, F y, F& m, F& ex, F& ey) {
  const bool x_wins = x > y;
  m = x_wins ? x : y;
  const F e = exp_(x_wins ? y - x : x - y);
  ex = x_wins ? F(1) : e;
  ey = x_wins ? e : F(1);
}

// ---------------------------------------------------------------------------- forward

// y for T tokens of N channels, and the state after the last token. The names follow the
// official kernel: (aa, bb, pp) the state, e1 and e2 the rescaling factors of the past and
// of the current token.
template <typename F, int N>
WKV_HOST_DEVICE WKV_INLINE void forward_scan(
    int64_t T, int64_t C, const F* WKV_RESTRICT w, const F* WKV_RESTRICT u,
    const F* WKV_RESTRICT k, const F* WKV_RESTRICT v,
    const F* WKV_RESTRICT a_in, const F* WKV_RESTRICT b_in, const F* WKV_RESTRICT p_in,
    F* WKV_RESTRICT y, F* WKV_RESTRICT a_out, F* WKV_RESTRICT b_out, F* WKV_RESTRICT p_out) {
  F aa[N], bb[N], pp[N];
  for (int j = 0; j < N; ++j) { aa[j] = a_in[j]; bb[j] = b_in[j]; pp[j] = p_in[j]; }
  for (int64_t t = 0; t < T; ++t) {
    const int64_t row = t * C;
    for (int j = 0; j < N; ++j) {
      const F kk = k[row + j], vv = v[row + j];
      F p, e1, e2;
      // read: the past at exponent pp plus the current token at exponent u + k
      rebase(pp[j], u[j] + kk, p, e1, e2);
      y[row + j] = (e1 * aa[j] + e2 * vv) / (e1 * bb[j] + e2);
      // write: decay the past by e^{-w}, add the current token at exponent k
      rebase(pp[j] - w[j], kk, p, e1, e2);
      aa[j] = e1 * aa[j] + e2 * vv;
      bb[j] = e1 * bb[j] + e2;
      pp[j] = p;
    }
  }
  for (int j = 0; j < N; ++j) { a_out[j] = aa[j]; b_out[j] = bb[j]; p_out[j] = pp[j]; }
}

// ---------------------------------------------------------------------------- backward

// Gradients for T tokens of N channels (the derivation is at the top of this file).
// gw_part and gu_part receive this batch row's shares of gw and gu (the caller sums them over
// the batch). gk and gv double as scratch for q_t and r_t between the two passes.
template <typename F, int N>
WKV_HOST_DEVICE WKV_INLINE void backward_scan(
    int64_t T, int64_t C, const F* WKV_RESTRICT w, const F* WKV_RESTRICT u,
    const F* WKV_RESTRICT k, const F* WKV_RESTRICT v, const F* WKV_RESTRICT y,
    const F* WKV_RESTRICT gy,
    const F* WKV_RESTRICT a_in, const F* WKV_RESTRICT b_in, const F* WKV_RESTRICT p_in,
    const F* WKV_RESTRICT ga_out, const F* WKV_RESTRICT gb_out, const F* WKV_RESTRICT gp_out,
    F* WKV_RESTRICT gk, F* WKV_RESTRICT gv, F* WKV_RESTRICT gw_part, F* WKV_RESTRICT gu_part,
    F* WKV_RESTRICT ga_in, F* WKV_RESTRICT gb_in, F* WKV_RESTRICT gp_in) {
  F aa[N], bb[N], pp[N];  // the state, recomputed from the saved inputs
  F aw[N], bw[N];         // dN/dw, dD/dw at the state's scale e^{pp}
  F gw[N], gu[N];         // gradient accumulators
  int32_t arg[N];         // the token whose k set pp last, -1 for the incoming state
  for (int j = 0; j < N; ++j) {
    aa[j] = a_in[j]; bb[j] = b_in[j]; pp[j] = p_in[j];
    aw[j] = 0; bw[j] = 0; gw[j] = 0; gu[j] = 0; arg[j] = -1;
  }
  // Forward in time: gw, gu, and the scratch q_t -> gk[t], r_t -> gv[t].
  for (int64_t t = 0; t < T; ++t) {
    const int64_t row = t * C;
    for (int j = 0; j < N; ++j) {
      const F kk = k[row + j], vv = v[row + j], yy = y[row + j];
      const F ww = u[j] + kk;
      F p, e1, e2;
      rebase(pp[j], ww, p, e1, e2);
      const F q = gy[row + j] / (e1 * bb[j] + e2);
      gw[j] += q * e1 * (aw[j] - yy * bw[j]);
      gu[j] += q * e2 * (vv - yy);
      gk[row + j] = q;
      gv[row + j] = ww - p;
      const F decayed = pp[j] - w[j];
      rebase(decayed, kk, p, e1, e2);
      aw[j] = e1 * (aw[j] - aa[j]);  // N'_t = lambda (N'_{t-1} - N_{t-1}), rescaled
      bw[j] = e1 * (bw[j] - bb[j]);
      aa[j] = e1 * aa[j] + e2 * vv;
      bb[j] = e1 * bb[j] + e2;
      pp[j] = p;
      arg[j] = kk >= decayed ? static_cast<int32_t>(t) : arg[j];
    }
  }
  // The outgoing state: gN_T = ga e^{-p_T}; the rest of gp_T goes to whichever won p_T.
  F ga[N], gb[N], h[N], gp_rest[N];  // gN = ga e^h, gD = gb e^h
  for (int j = 0; j < N; ++j) {
    ga[j] = ga_out[j]; gb[j] = gb_out[j]; h[j] = -pp[j];
    gp_rest[j] = gp_out[j] - ga_out[j] * aa[j] - gb_out[j] * bb[j];
    const int64_t age = arg[j] < 0 ? T : T - 1 - arg[j];
    gw[j] += ga_out[j] * aw[j] + gb_out[j] * bw[j] - static_cast<F>(age) * gp_rest[j];
  }
  // Reverse in time: read the scratch at t, overwrite it with gk_t, gv_t, fold y_t into gN.
  for (int64_t t = T - 1; t >= 0; --t) {
    const int64_t row = t * C;
    for (int j = 0; j < N; ++j) {
      const F kk = k[row + j], vv = v[row + j], yy = y[row + j];
      const F q = gk[row + j], r = gv[row + j];
      const F e_now = exp_(r);            // E_t / Z_t = e_now * q / gy_t
      const F e_past = exp_(kk + h[j]);   // e^{k_t} gN_t = e_past * ga
      const F won = arg[j] == static_cast<int32_t>(t) ? gp_rest[j] : F(0);
      gk[row + j] = q * e_now * (vv - yy) + e_past * (ga[j] * vv + gb[j]) + won;
      gv[row + j] = q * e_now + e_past * ga[j];
      // gN_{t-1} = lambda gN_t + q e^{-po_t}, with -po_t = r - u - k
      F s_old, s_now;
      rebase(h[j] - w[j], r - u[j] - kk, h[j], s_old, s_now);
      ga[j] = s_old * ga[j] + s_now * q;
      gb[j] = s_old * gb[j] - s_now * q * yy;
    }
  }
  // The incoming state: N_in = a_in e^{p_in}, so g a_in = gN_in e^{p_in}, and so on.
  for (int j = 0; j < N; ++j) {
    const F s = exp_(h[j] + p_in[j]);
    ga_in[j] = ga[j] * s;
    gb_in[j] = gb[j] * s;
    gp_in[j] = s * (ga[j] * a_in[j] + gb[j] * b_in[j]) + (arg[j] < 0 ? gp_rest[j] : F(0));
    gw_part[j] = gw[j];
    gu_part[j] = gu[j];
  }
}

}  // namespace wkv
