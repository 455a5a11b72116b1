// CUDA kernel of torch.ops.nest_fast.mel_frontend (module nest_fast._C_cuda; the schema lives in nest_fast._C).
//
// Four launches plus cuFFT (through ATen):
//   1. lengths_kernel  : frame counts F[b] and the non-zero range of every mel filter (tiny).
//   2. frames_kernel   : dither + pre-emphasis (+ zeroing past the length, or legacy reflect padding) +
//                        centred framing + window, in one pass, straight into the FFT input [B, T_stft, n_fft];
//                        frames past a row's length are skipped (their FFT output is never read).
//   3. at::fft_rfft    : cuFFT r2c over the last axis.
//   4. mel_kernel      : |X|^mag_power -> sparse mel -> log guard, TF frames per block (power spectrum in
//                        shared memory), coalesced writes of out[b, m, t]; also writes pad_value at t >= F[b]
//                        (including the pad_to tail), so no other pass touches padding.
//   5. norm_kernel     : one block per (row, filter): mean and unbiased std over valid frames (two-pass,
//                        double), NaN->0 for one frame (kept NaN in legacy), +1e-5, normalise in place.
// Deterministic (no atomics). The dither stream is the same Philox/Box-Muller stream as the CPU kernel.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/fft_rfft.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/library.h>

#include <cuda_runtime.h>

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
    int64_t s = t * hop - n_fft / 2 + j;
    bool inside;
    if (legacy) {
      s = mel::reflect_index(s, N);
      inside = true;
    } else {
      inside = s >= 0 && s < n[b];  // constant padding, zero past the length
    }
    if (inside) {
      const float* xr = x + b * N;
      const uint64_t base = static_cast<uint64_t>(b) * static_cast<uint64_t>(N);
      float y = dithered(xr, s, base, dither, seed, offset);
      if (preemph != 0.0f && s > 0) y = y - preemph * dithered(xr, s - 1, base, dither, seed, offset);
      v = y * window[j - left];
    }
  }
  frames[(b * T_stft + t) * n_fft + j] = v;
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
