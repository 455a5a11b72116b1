// CUDA kernel of torch.ops.nest_fast.mel_frontend (module nest_fast._C_cuda; the schema lives in nest_fast._C).
//
// Power-of-two n_fft (NEST: 512), default: two data passes.
//   1. lengths_kernel : frame counts F[b] and the non-zero range of every mel filter (tiny).
//   2. fused_kernel   : one block per (row, 8 frames): dither + pre-emphasis (+ zeroing past the length, or
//                       legacy reflect padding) into a shared-memory signal segment, framing + window, a
//                       block-level radix-2 Stockham FFT (mel_frontend_common.h; the same functions run on the
//                       CPU in nest_fast::_rfft_power_emulate, which the tests check against torch.fft.rfft),
//                       power, sparse mel, log guard, write out[b, :, t] (pad_value at t >= F[b] and in the
//                       pad_to tail). Audio is read once (through L2 for the frame overlap), features written once.
//   3. norm_kernel    : one block per (row, filter): mean and unbiased std over valid frames (two-pass, double),
//                       NaN->0 for one frame (kept NaN in legacy), +1e-5, normalise in place.
// Other n_fft (or NEST_FAST_MEL_CUFFT=1): frames_kernel (the same pre-FFT steps into [B, T_stft, n_fft]) ->
// at::fft_rfft (cuFFT) -> mel_kernel (power/mel/log/pad, power spectrum staged in shared memory) -> norm_kernel.
// Deterministic (no atomics). The dither stream is the same Philox/Box-Muller stream as the CPU kernel.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/fft_rfft.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <cstdlib>

#include "../mel_frontend_common.h"

namespace {

using at::Tensor;
namespace mel = nest_fast::mel;

constexpr int kThreads = 256;

// Only c10/core headers are used (not c10/cuda), so this file also compiles against a CPU-only torch's headers.
#define NF_LAUNCH_CHECK()                                                                              \
  do {                                                                                                 \
    const cudaError_t err_ = cudaGetLastError();                                                       \
    TORCH_CHECK(err_ == cudaSuccess, "nest_fast::mel_frontend: CUDA launch failed: ", cudaGetErrorString(err_)); \
  } while (0)

__global__ void lengths_kernel(const int64_t* __restrict__ n, int64_t* __restrict__ F, int64_t B, int64_t n_fft,
                               int64_t hop, bool legacy, const float* __restrict__ fb, int* __restrict__ ranges,
                               int64_t nfilt, int64_t nbins) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < B) F[i] = mel::valid_frames(n[i], n_fft, hop, legacy);
  if (i < nfilt) {
    const float* row = fb + i * nbins;
    int lo = 0, hi = 0;
    for (int64_t k = 0; k < nbins; ++k)
      if (row[k] != 0.0f) { lo = static_cast<int>(k); break; }
    for (int64_t k = nbins - 1; k >= 0; --k)
      if (row[k] != 0.0f) { hi = static_cast<int>(k) + 1; break; }
    ranges[2 * i] = lo;
    ranges[2 * i + 1] = hi > lo ? hi : lo;
  }
}

// x'[s] = x[s] + dither * noise(b, s)
__device__ __forceinline__ float dithered(const float* __restrict__ xr, int64_t s, uint64_t base, float dither,
                                          uint64_t seed, uint64_t offset) {
  float v = xr[s];
  if (dither != 0.0f) v += dither * mel::gauss1(seed, offset, base + static_cast<uint64_t>(s));
  return v;
}

// The pre-FFT signal y at padded-signal position s (sample index, may be < 0 or >= N) of row b:
// dither + pre-emphasis; constant padding and zero past the length, or (legacy) reflect padding.
__device__ __forceinline__ float ysample(const float* __restrict__ x, const int64_t* __restrict__ n, int64_t b,
                                         int64_t N, int64_t s, float preemph, float dither, uint64_t seed,
                                         uint64_t offset, bool legacy) {
  if (legacy) {
    s = mel::reflect_index(s, N);
  } else if (s < 0 || s >= n[b]) {
    return 0.0f;
  }
  const float* xr = x + b * N;
  const uint64_t base = static_cast<uint64_t>(b) * static_cast<uint64_t>(N);
  float y = dithered(xr, s, base, dither, seed, offset);
  if (preemph != 0.0f && s > 0) y = y - preemph * dithered(xr, s - 1, base, dither, seed, offset);
  return y;
}

__global__ void frames_kernel(const float* __restrict__ x, const int64_t* __restrict__ n,
                              const int64_t* __restrict__ F, const float* __restrict__ window,
                              float* __restrict__ frames, int64_t N, int64_t T_stft, int64_t hop, int64_t n_fft,
                              int64_t win, int64_t left, float preemph, float dither, uint64_t seed,
                              uint64_t offset, bool legacy) {
  const int64_t b = blockIdx.y;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= T_stft * n_fft) return;
  const int64_t t = idx / n_fft, j = idx - t * n_fft;
  if (t >= F[b]) return;  // never read downstream
  float v = 0.0f;
  if (j >= left && j < left + win) {
    const int64_t s = t * hop - n_fft / 2 + j;
    v = ysample(x, n, b, N, s, preemph, dither, seed, offset, legacy) * window[j - left];
  }
  frames[(b * T_stft + t) * n_fft + j] = v;
}

// Everything in one kernel for power-of-two n_fft = 2M: block (row b, frames t0 .. t0+tf-1) builds its signal
// segment in shared memory, frames + windows it, runs the M-point Stockham FFT of mel_frontend_common.h
// (checked on the CPU by nest_fast::_rfft_power_emulate), splits it into the power spectrum, reduces that to
// log-mel and writes out[b, :, t0:t0+tf] (pad_value past the length). Dynamic shared memory:
// 2 * tf * M complex (ping-pong) + (M + 1) complex twiddles + seglen floats.
__global__ void fused_kernel(const float* __restrict__ x, const int64_t* __restrict__ n,
                             const int64_t* __restrict__ F, const float* __restrict__ window,
                             const float* __restrict__ fb, const int* __restrict__ ranges, float* __restrict__ out,
                             int64_t N, int64_t T, int hop, int L, int win, int left, int tf, int64_t nfilt,
                             float preemph, float dither, uint64_t seed, uint64_t offset, bool legacy,
                             float mag_power, int64_t log_mode, float guard, float pad_value) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int M = L / 2;
  mel::NfC* bufA = reinterpret_cast<mel::NfC*>(smem_raw);
  mel::NfC* bufB = bufA + tf * M;
  mel::NfC* tw = bufB + tf * M;
  float* seg = reinterpret_cast<float*>(tw + (M + 1));
  const int64_t b = blockIdx.y;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * tf;
  const int64_t Fb = F[b];
  const int64_t nvalid = Fb - t0;
  const int nf = nvalid <= 0 ? 0 : (nvalid < tf ? static_cast<int>(nvalid) : tf);  // block-uniform
  const float* pw = nullptr;
  if (nf > 0) {
    for (int q = threadIdx.x; q <= M; q += blockDim.x) tw[q] = mel::twiddle(q, L);
    const int64_t s0 = t0 * hop - L / 2;
    const int seglen = (nf - 1) * hop + L;
    for (int i = threadIdx.x; i < seglen; i += blockDim.x)
      seg[i] = ysample(x, n, b, N, s0 + i, preemph, dither, seed, offset, legacy);
    __syncthreads();
    for (int idx = threadIdx.x; idx < nf * M; idx += blockDim.x) {
      const int f = idx / M, j0 = 2 * (idx - f * M), j1 = j0 + 1;
      const float* sf = seg + f * hop;
      const float v0 = (j0 >= left && j0 < left + win) ? sf[j0] * window[j0 - left] : 0.0f;
      const float v1 = (j1 >= left && j1 < left + win) ? sf[j1] * window[j1 - left] : 0.0f;
      bufA[idx] = mel::NfC{v0, v1};
    }
    __syncthreads();
    mel::NfC* src = bufA;
    mel::NfC* dst = bufB;
    const int half = M / 2;
    for (int p = 1; p < M; p <<= 1) {
      for (int idx = threadIdx.x; idx < nf * half; idx += blockDim.x) {
        const int f = idx / half, i = idx - f * half;
        mel::fft_stage(src + f * M, dst + f * M, tw, M, p, i);
      }
      __syncthreads();
      mel::NfC* tmp = src;
      src = dst;
      dst = tmp;
    }
    float* power = reinterpret_cast<float*>(dst);  // nf * (M + 1) floats fit in tf * M complex
    for (int idx = threadIdx.x; idx < nf * (M + 1); idx += blockDim.x) {
      const int f = idx / (M + 1), k = idx - f * (M + 1);
      power[idx] = mel::rfft_power(src + f * M, tw, M, k, mag_power);
    }
    __syncthreads();
    pw = power;
  }
  const int nbins = M + 1;
  for (int64_t i = threadIdx.x; i < nfilt * tf; i += blockDim.x) {
    const int64_t m = i / tf, f = i - m * tf;
    const int64_t t = t0 + f;
    if (t >= T) continue;
    float v = pad_value;
    if (t < Fb) {  // implies f < nf
      const int lo = ranges[2 * m], hi = ranges[2 * m + 1];
      const float* w = fb + m * nbins;
      const float* p = pw + f * nbins;
      float acc = 0.0f;
      for (int k = lo; k < hi; ++k) acc += w[k] * p[k];
      if (log_mode == mel::kLogAdd) acc = logf(acc + guard);
      else if (log_mode == mel::kLogClamp) acc = logf(fmaxf(acc, guard));
      v = acc;
    }
    out[(b * nfilt + m) * T + t] = v;
  }
}

// grid (ceil(T / tf), B); dynamic shared memory tf * nbins floats.
__global__ void mel_kernel(const float2* __restrict__ spec, const int64_t* __restrict__ F,
                           const float* __restrict__ fb, const int* __restrict__ ranges, float* __restrict__ out,
                           int64_t T_stft, int64_t T, int64_t nbins, int64_t nfilt, int tf, float mag_power,
                           int64_t log_mode, float guard, float pad_value) {
  extern __shared__ float pw[];  // [tf][nbins]
  const int64_t b = blockIdx.y;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * tf;
  const int64_t Fb = F[b];
  const int64_t nvalid = Fb - t0;  // frames of this block that are valid (may be <= 0 or > tf)
  if (nvalid > 0) {
    const int64_t nf = nvalid < tf ? nvalid : tf;
    const float2* sp = spec + (b * T_stft + t0) * nbins;  // frames t0 .. t0+nf-1 are contiguous
    for (int64_t i = threadIdx.x; i < nf * nbins; i += blockDim.x) {
      const float2 c = sp[i];
      const float mag = sqrtf(c.x * c.x + c.y * c.y);
      pw[i] = mag_power == 2.0f ? mag * mag : (mag_power == 1.0f ? mag : powf(mag, mag_power));
    }
  }
  __syncthreads();
  for (int64_t i = threadIdx.x; i < nfilt * tf; i += blockDim.x) {
    const int64_t m = i / tf, f = i - m * tf;
    const int64_t t = t0 + f;
    if (t >= T) continue;
    float v = pad_value;
    if (t < Fb) {
      const int lo = ranges[2 * m], hi = ranges[2 * m + 1];
      const float* w = fb + m * nbins;
      const float* p = pw + f * nbins;
      float acc = 0.0f;
      for (int k = lo; k < hi; ++k) acc += w[k] * p[k];
      if (log_mode == mel::kLogAdd) acc = logf(acc + guard);
      else if (log_mode == mel::kLogClamp) acc = logf(fmaxf(acc, guard));
      v = acc;
    }
    out[(b * nfilt + m) * T + t] = v;
  }
}

__device__ __forceinline__ double block_sum(double v, double* sh) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // sh may still be read from a previous call
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  double s = 0.0;
  const int nw = (blockDim.x + 31) >> 5;
  for (int w = 0; w < nw; ++w) s += sh[w];
  return s;
}

// one block per (b, m) row of out
__global__ void norm_kernel(float* __restrict__ out, const int64_t* __restrict__ F, int64_t nfilt, int64_t T,
                            bool legacy) {
  __shared__ double sh[32];
  const int64_t r = blockIdx.x;
  const int64_t b = r / nfilt;
  int64_t Fb = F[b];
  if (Fb > T) Fb = T;
  if (Fb <= 0) return;
  float* row = out + r * T;
  double s = 0.0;
  for (int64_t t = threadIdx.x; t < Fb; t += blockDim.x) s += row[t];
  s = block_sum(s, sh);
  const float mean = static_cast<float>(s / static_cast<double>(Fb));
  float sd;
  if (Fb == 1) {
    sd = legacy ? __int_as_float(0x7fc00000) : 0.0f;  // sqrt(0/0): NaN (<=2.4) or NaN -> 0
  } else {
    double ss = 0.0;
    for (int64_t t = threadIdx.x; t < Fb; t += blockDim.x) {
      const double d = static_cast<double>(row[t] - mean);
      ss += d * d;
    }
    ss = block_sum(ss, sh);
    sd = static_cast<float>(sqrt(ss / static_cast<double>(Fb - 1)));
  }
  sd += 1e-5f;
  for (int64_t t = threadIdx.x; t < Fb; t += blockDim.x) row[t] = (row[t] - mean) / sd;
}

// NEST_FAST_MEL_CUFFT=1 selects the framing + cuFFT + mel path even where the fused kernel applies.
bool force_cufft() {
  const char* v = std::getenv("NEST_FAST_MEL_CUFFT");
  return v != nullptr && v[0] != '\0' && v[0] != '0';
}

std::tuple<Tensor, Tensor> mel_frontend_cuda(const Tensor& x_, const Tensor& lengths_, const Tensor& window_,
                                             const Tensor& fb_, int64_t hop, int64_t n_fft, double preemph,
                                             double dither, int64_t seed, int64_t offset, double log_guard,
                                             int64_t log_mode, int64_t normalize, int64_t pad_to, double pad_value,
                                             double mag_power, bool legacy) {
  mel::check_args(x_, lengths_, window_, fb_, hop, n_fft, log_mode, normalize, pad_to, legacy);
  const c10::DeviceGuard guard(x_.device());
  const Tensor x = x_.contiguous();
  const Tensor lengths = lengths_.contiguous();
  const Tensor window = window_.contiguous();
  const int64_t nbins = n_fft / 2 + 1;
  const int64_t nfilt = fb_.size(-2);
  const Tensor fb = fb_.reshape({nfilt, nbins}).contiguous();
  const int64_t B = x.size(0), N = x.size(1);
  const int64_t T_stft = N / hop + 1;
  const int64_t T = mel::padded_frames(N, hop, pad_to);
  const int64_t win = window.size(0), left = (n_fft - win) / 2;
  TORCH_CHECK(B <= 65535, "nest_fast::mel_frontend: the CUDA kernel takes at most 65535 rows in x (audio), got ", B);
  TORCH_CHECK(T_stft * n_fft < (int64_t(1) << 31) * kThreads, "nest_fast::mel_frontend: x (audio) is too long");

  Tensor out = at::empty({B, nfilt, T}, x.options());
  Tensor lens_out = at::empty({B}, lengths.options());
  if (B == 0) return {out, lens_out};
  Tensor ranges = at::empty({nfilt, 2}, x.options().dtype(at::kInt));
  const c10::impl::VirtualGuardImpl cuda_impl(c10::DeviceType::CUDA);
  cudaStream_t stream = static_cast<cudaStream_t>(cuda_impl.getStream(x.device()).native_handle());

  {
    const int64_t n = B > nfilt ? B : nfilt;
    lengths_kernel<<<static_cast<unsigned>((n + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
        lengths.data_ptr<int64_t>(), lens_out.data_ptr<int64_t>(), B, n_fft, hop, legacy, fb.data_ptr<float>(),
        ranges.data_ptr<int>(), nfilt, nbins);
    NF_LAUNCH_CHECK();
  }

  // fused single-kernel path for power-of-two n_fft when a block of >= 1 frame fits in 48 KB of shared memory
  constexpr int64_t kSmemBudget = 48 * 1024;
  const int64_t M = n_fft / 2;
  auto fused_smem = [&](int64_t tf) {
    return (2 * tf * M + M + 1) * static_cast<int64_t>(sizeof(mel::NfC)) +
           ((tf - 1) * hop + n_fft) * static_cast<int64_t>(sizeof(float));
  };
  int fused_tf = 0;
  if (mel::is_pow2(n_fft) && n_fft >= 4 && !force_cufft()) {
    for (int tf = 8; tf >= 1; tf >>= 1)
      if (fused_smem(tf) <= kSmemBudget) { fused_tf = tf; break; }
  }
  if (fused_tf > 0) {
    const dim3 grid(static_cast<unsigned>((T + fused_tf - 1) / fused_tf), static_cast<unsigned>(B));
    fused_kernel<<<grid, kThreads, static_cast<size_t>(fused_smem(fused_tf)), stream>>>(
        x.data_ptr<float>(), lengths.data_ptr<int64_t>(), lens_out.data_ptr<int64_t>(), window.data_ptr<float>(),
        fb.data_ptr<float>(), ranges.data_ptr<int>(), out.data_ptr<float>(), N, T, static_cast<int>(hop),
        static_cast<int>(n_fft), static_cast<int>(win), static_cast<int>(left), fused_tf, nfilt,
        static_cast<float>(preemph), static_cast<float>(dither), static_cast<uint64_t>(seed),
        static_cast<uint64_t>(offset), legacy, static_cast<float>(mag_power), log_mode,
        static_cast<float>(log_guard), static_cast<float>(pad_value));
    NF_LAUNCH_CHECK();
  } else {
    Tensor frames = at::empty({B, T_stft, n_fft}, x.options());
    {
      const dim3 grid(static_cast<unsigned>((T_stft * n_fft + kThreads - 1) / kThreads), static_cast<unsigned>(B));
      frames_kernel<<<grid, kThreads, 0, stream>>>(
          x.data_ptr<float>(), lengths.data_ptr<int64_t>(), lens_out.data_ptr<int64_t>(), window.data_ptr<float>(),
          frames.data_ptr<float>(), N, T_stft, hop, n_fft, win, left, static_cast<float>(preemph),
          static_cast<float>(dither), static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), legacy);
      NF_LAUNCH_CHECK();
    }

    const Tensor spec = at::fft_rfft(frames, c10::nullopt, -1).contiguous();  // [B, T_stft, nbins] complex64
    frames.reset();

    {
      constexpr int64_t kSmemBudget = 48 * 1024;
      int tf = 32;
      while (tf > 1 && static_cast<int64_t>(tf) * nbins * static_cast<int64_t>(sizeof(float)) > kSmemBudget) tf >>= 1;
      TORCH_CHECK(static_cast<int64_t>(tf) * nbins * static_cast<int64_t>(sizeof(float)) <= kSmemBudget,
                  "nest_fast::mel_frontend: n_fft=", n_fft, " is too large for the CUDA kernel");
      const size_t smem = static_cast<size_t>(tf) * static_cast<size_t>(nbins) * sizeof(float);
      const dim3 grid(static_cast<unsigned>((T + tf - 1) / tf), static_cast<unsigned>(B));
      mel_kernel<<<grid, kThreads, smem, stream>>>(
          reinterpret_cast<const float2*>(spec.data_ptr()), lens_out.data_ptr<int64_t>(), fb.data_ptr<float>(),
          ranges.data_ptr<int>(), out.data_ptr<float>(), T_stft, T, nbins, nfilt, tf, static_cast<float>(mag_power),
          log_mode, static_cast<float>(log_guard), static_cast<float>(pad_value));
      NF_LAUNCH_CHECK();
    }
  }

  if (normalize == 1) {
    norm_kernel<<<static_cast<unsigned>(B * nfilt), kThreads, 0, stream>>>(out.data_ptr<float>(),
                                                                          lens_out.data_ptr<int64_t>(), nfilt, T,
                                                                          legacy);
    NF_LAUNCH_CHECK();
  }
  return {out, lens_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(nest_fast, CUDA, m) { m.impl("mel_frontend", &mel_frontend_cuda); }

extern "C" PyObject* PyInit__C_cuda(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C_cuda", "nest_fast CUDA ops (torch.ops.nest_fast)", -1,
                                   nullptr};
  return PyModule_Create(&def);
}
