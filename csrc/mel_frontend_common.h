// Shared by the CPU (csrc/mel_frontend.cpp) and CUDA (csrc/cuda/mel_frontend_cuda.cu) mel-frontend kernels:
// the dither generator (counter-based Philox4x32-10 + Box-Muller, so a (seed, offset) pair gives the same
// noise on every device and thread count), frame-count and reflect-index helpers, and the argument checks.
#pragma once

#include <cmath>
#include <cstdint>

#include <ATen/core/Tensor.h>
#include <ATen/ops/stack.h>

#if defined(__CUDACC__)
#define NF_HD __host__ __device__ __forceinline__
#else
#define NF_HD inline
#endif

namespace nest_fast {
namespace mel {

NF_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// Philox4x32 with 10 rounds (Salmon et al., SC'11): counter c (in/out), key (k0, k1).
NF_HD void philox4x32_10(uint32_t c[4], uint32_t k0, uint32_t k1) {
  const uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u, W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) {
    const uint32_t hi0 = mulhi32(M0, c[0]), lo0 = M0 * c[0];
    const uint32_t hi1 = mulhi32(M1, c[2]), lo1 = M1 * c[2];
    const uint32_t n0 = hi1 ^ c[1] ^ k0, n2 = hi0 ^ c[3] ^ k1;
    c[0] = n0;
    c[1] = lo1;
    c[2] = n2;
    c[3] = lo0;
    k0 += W0;
    k1 += W1;
  }
}

// Four standard normals for group g (elements 4g .. 4g+3 of the flattened [B, N] audio).
NF_HD void gauss4(uint64_t seed, uint64_t offset, uint64_t g, float z[4]) {
  uint32_t c[4] = {static_cast<uint32_t>(g), static_cast<uint32_t>(g >> 32), static_cast<uint32_t>(offset),
                   static_cast<uint32_t>(offset >> 32)};
  philox4x32_10(c, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  const float inv24 = 1.0f / 16777216.0f;
  const float two_pi = 6.283185307179586f;
  for (int p = 0; p < 2; ++p) {
    const float u1 = static_cast<float>((c[2 * p] >> 8) + 1u) * inv24;  // (0, 1]
    const float u2 = static_cast<float>(c[2 * p + 1] >> 8) * inv24;     // [0, 1)
    const float r = sqrtf(-2.0f * logf(u1));
    const float th = two_pi * u2;
    z[2 * p] = r * cosf(th);
    z[2 * p + 1] = r * sinf(th);
  }
}

// One standard normal for flattened element e (the lane e % 4 of gauss4(e / 4)).
NF_HD float gauss1(uint64_t seed, uint64_t offset, uint64_t e) {
  float z[4];
  gauss4(seed, offset, e >> 2, z);
  return z[e & 3];
}

// Valid feature frames for n samples (NeMo's get_seq_len with center=True; 0 for an empty utterance).
NF_HD int64_t valid_frames(int64_t n, int64_t n_fft, int64_t hop, bool legacy) {
  if (n <= 0) return 0;
  const int64_t num = n + 2 * (n_fft / 2) - n_fft;  // >= 0 for n >= 1
  return num / hop + (legacy ? 1 : 0);
}

// torch's reflect padding (single bounce; needs N > pad).
NF_HD int64_t reflect_index(int64_t s, int64_t N) {
  if (s < 0) return -s;
  if (s >= N) return 2 * (N - 1) - s;
  return s;
}

// ---- block-level real FFT used by the fused CUDA kernel (and, index for index, by the CPU emulation op
// nest_fast::_rfft_power_emulate that the tests check against torch.fft.rfft) --------------------------------
// A real frame of L = 2M samples is packed as z[n] = x[2n] + i x[2n+1], transformed by an M-point radix-2
// Stockham FFT (log2 M out-of-place passes, natural order, no bit reversal) and split into X[0..M].
struct NfC {
  float re, im;
};

NF_HD bool is_pow2(int64_t v) { return v > 0 && (v & (v - 1)) == 0; }

// exp(-2 pi i k / L), computed in double
NF_HD NfC twiddle(int64_t k, int64_t L) {
#if defined(__CUDA_ARCH__)
  double s, c;
  sincospi(-2.0 * static_cast<double>(k) / static_cast<double>(L), &s, &c);
#else
  const double a = -2.0 * 3.14159265358979323846 * static_cast<double>(k) / static_cast<double>(L);
  const double s = std::sin(a), c = std::cos(a);
#endif
  return NfC{static_cast<float>(c), static_cast<float>(s)};
}

// Butterfly i (0 <= i < M/2) of the pass that merges sub-transforms of size p into size 2p.
// twL[q] = exp(-2 pi i q / (2M)), q <= M, so the pass twiddle exp(-2 pi i k / (2p)) is twL[k * M / p].
NF_HD void fft_stage(const NfC* in, NfC* out, const NfC* twL, int M, int p, int i) {
  const int k = i & (p - 1);
  const NfC u0 = in[i], u1 = in[i + M / 2];
  const NfC w = twL[k * (M / p)];
  const NfC v{u1.re * w.re - u1.im * w.im, u1.re * w.im + u1.im * w.re};
  const int j = (i << 1) - k;
  out[j] = NfC{u0.re + v.re, u0.im + v.im};
  out[j + p] = NfC{u0.re - v.re, u0.im - v.im};
}

// |X[k]|^mag_power (sqrt then power, as the reference) from the packed M-point transform Z, 0 <= k <= M.
NF_HD float rfft_power(const NfC* Z, const NfC* twL, int M, int k, float mag_power) {
  const NfC zk = Z[k == M ? 0 : k];
  const NfC zm = Z[k == 0 ? 0 : M - k];
  const NfC zc{zm.re, -zm.im};                                      // conj(Z[M-k])
  const NfC fe{0.5f * (zk.re + zc.re), 0.5f * (zk.im + zc.im)};     // even samples' transform
  const NfC fo{0.5f * (zk.im - zc.im), -0.5f * (zk.re - zc.re)};    // odd samples': (zk - zc) / 2i
  const NfC w = twL[k];
  const float re = fe.re + (w.re * fo.re - w.im * fo.im);
  const float im = fe.im + (w.re * fo.im + w.im * fo.re);
  const float mag = sqrtf(re * re + im * im);
  return mag_power == 2.0f ? mag * mag : (mag_power == 1.0f ? mag : powf(mag, mag_power));
}

enum LogMode : int64_t { kNoLog = 0, kLogAdd = 1, kLogClamp = 2 };

// Argument checks shared by the CPU and CUDA entry points (clear errors naming the argument).
inline void check_args(const at::Tensor& x, const at::Tensor& lengths, const at::Tensor& window, const at::Tensor& fb,
                       int64_t hop, int64_t n_fft, int64_t log_mode, int64_t normalize, int64_t pad_to,
                       bool legacy) {
  TORCH_CHECK(x.dim() == 2, "nest_fast::mel_frontend: x (audio) must be 2-D [batch, samples], got shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat, "nest_fast::mel_frontend: x (audio) must be float32, got ",
              x.scalar_type());
  TORCH_CHECK(lengths.device() == x.device(), "nest_fast::mel_frontend: lengths is on ", lengths.device(),
              " but x (audio) is on ", x.device());
  TORCH_CHECK(lengths.scalar_type() == at::kLong, "nest_fast::mel_frontend: lengths must be int64, got ",
              lengths.scalar_type());
  TORCH_CHECK(lengths.dim() == 1 && lengths.size(0) == x.size(0),
              "nest_fast::mel_frontend: lengths must be 1-D with one entry per batch row (", x.size(0),
              "), got shape ", lengths.sizes());
  TORCH_CHECK(hop > 0, "nest_fast::mel_frontend: hop must be positive, got ", hop);
  TORCH_CHECK(n_fft > 0, "nest_fast::mel_frontend: n_fft must be positive, got ", n_fft);
  TORCH_CHECK(window.dim() == 1 && window.scalar_type() == at::kFloat && window.device() == x.device(),
              "nest_fast::mel_frontend: window must be a 1-D float32 tensor on ", x.device(), ", got shape ",
              window.sizes(), " dtype ", window.scalar_type(), " on ", window.device());
  TORCH_CHECK(window.size(0) >= 1 && window.size(0) <= n_fft, "nest_fast::mel_frontend: window length ",
              window.size(0), " must be in [1, n_fft=", n_fft, "]");
  const int64_t nbins = n_fft / 2 + 1;
  TORCH_CHECK((fb.dim() == 2 || (fb.dim() == 3 && fb.size(0) == 1)) && fb.scalar_type() == at::kFloat &&
                  fb.device() == x.device(),
              "nest_fast::mel_frontend: fb must be a float32 [nfilt, n_fft//2+1] or [1, nfilt, n_fft//2+1] tensor on ",
              x.device(), ", got shape ", fb.sizes(), " dtype ", fb.scalar_type(), " on ", fb.device());
  TORCH_CHECK(fb.size(-1) == nbins, "nest_fast::mel_frontend: fb has ", fb.size(-1),
              " frequency bins but n_fft=", n_fft, " gives ", nbins);
  TORCH_CHECK(fb.size(-2) >= 1, "nest_fast::mel_frontend: fb needs at least one filter");
  TORCH_CHECK(log_mode >= 0 && log_mode <= 2, "nest_fast::mel_frontend: log_mode must be 0 (none), 1 (add) or 2 (clamp), got ",
              log_mode);
  TORCH_CHECK(normalize == 0 || normalize == 1,
              "nest_fast::mel_frontend: normalize must be 0 (none) or 1 (per_feature), got ", normalize);
  TORCH_CHECK(pad_to >= 0, "nest_fast::mel_frontend: pad_to must be >= 0, got ", pad_to);
  if (legacy) {
    TORCH_CHECK(x.size(1) > n_fft / 2, "nest_fast::mel_frontend: legacy (reflect-padded) STFT needs more than n_fft//2=",
                n_fft / 2, " samples per row, got x (audio) of shape ", x.sizes());
  }
  if (lengths.numel() > 0) {
    // one host sync on CUDA; keeps out-of-range lengths from reading past the audio
    const at::Tensor mm = at::stack({lengths.min(), lengths.max()}).cpu();
    const int64_t lo = mm[0].item<int64_t>(), hi = mm[1].item<int64_t>();
    TORCH_CHECK(lo >= 0, "nest_fast::mel_frontend: lengths must be non-negative, got min ", lo);
    TORCH_CHECK(hi <= x.size(1), "nest_fast::mel_frontend: lengths has a length ", hi,
                " longer than x (audio)'s time axis (", x.size(1), ")");
  }
}

inline int64_t padded_frames(int64_t N, int64_t hop, int64_t pad_to) {
  const int64_t t = N / hop + 1;
  return pad_to > 0 ? (t + pad_to - 1) / pad_to * pad_to : t;
}

}  // namespace mel
}  // namespace nest_fast
