// CPU kernel of torch.ops.nest_fast.mel_frontend and the op's schema (module nest_fast._C).
//
// One op does NeMo's whole FilterbankFeatures forward (SPEC.md §4) for the configurations nest_fast uses:
// dither -> pre-emphasis (zeroed past each length) -> centred STFT (constant or, legacy, reflect padding,
// window zero-padded to n_fft) -> |.|^mag_power -> mel (sparse triangles) -> log guard -> per-feature
// normalisation over valid frames -> pad frames past the length and the time axis to a multiple of pad_to.
//
// Work split: pass 1 runs over (row, chunk of CH frames) items with at::parallel_for; each item builds its
// pre-emphasised, dithered signal segment once, frames+windows it into a small cache-resident buffer, runs
// at::fft_rfft on the chunk, and reduces the spectrum straight to log-mel (only the non-zero range of each
// filter is summed). Frames past a row's length are never computed. Pass 2 runs over (row, filter) pairs
// and normalises (two-pass mean/std in double) and writes the padding.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <utility>
#include <vector>

#include "mel_frontend_common.h"

namespace {

using at::Tensor;
namespace mel = nest_fast::mel;

constexpr int64_t kChunk = 32;  // frames per work item

// y = pre-emphasised (dithered) audio on [lo, hi) of row b, written to yf[0 .. hi-lo).
void preemph_range(const float* xr, int64_t b, int64_t N, int64_t lo, int64_t hi, float pre, float dither,
                   uint64_t seed, uint64_t offset, std::vector<float>& xd, float* yf) {
  if (hi <= lo) return;
  const int64_t a = lo > 0 ? lo - 1 : 0;  // x[lo-1] is needed by pre-emphasis
  const int64_t n = hi - a;
  xd.resize(static_cast<size_t>(n));
  if (dither != 0.0f) {
    const uint64_t base = static_cast<uint64_t>(b) * static_cast<uint64_t>(N);
    uint64_t g_cached = std::numeric_limits<uint64_t>::max();
    float z[4] = {0, 0, 0, 0};
    for (int64_t i = 0; i < n; ++i) {
      const uint64_t e = base + static_cast<uint64_t>(a + i);
      const uint64_t g = e >> 2;
      if (g != g_cached) {
        mel::gauss4(seed, offset, g, z);
        g_cached = g;
      }
      const float noise = dither * z[e & 3];
      xd[i] = xr[a + i] + noise;
    }
  } else {
    std::copy(xr + a, xr + hi, xd.begin());
  }
  const float* xs = xd.data() + (lo - a);  // xs[i] = x'[lo + i]
  if (pre != 0.0f) {
    for (int64_t i = 0; i < hi - lo; ++i) {
      const int64_t s = lo + i;
      yf[i] = s == 0 ? xs[i] : xs[i] - pre * xs[i - 1];
    }
  } else {
    std::copy(xs, xs + (hi - lo), yf);
  }
}

std::tuple<Tensor, Tensor> mel_frontend_cpu(const Tensor& x_, const Tensor& lengths_, const Tensor& window_,
                                            const Tensor& fb_, int64_t hop, int64_t n_fft, double preemph,
                                            double dither, int64_t seed_, int64_t offset_, double log_guard,
                                            int64_t log_mode, int64_t normalize, int64_t pad_to, double pad_value,
                                            double mag_power, bool legacy) {
  mel::check_args(x_, lengths_, window_, fb_, hop, n_fft, log_mode, normalize, pad_to, legacy);
  const Tensor x = x_.contiguous();
  const Tensor lengths = lengths_.contiguous();
  const Tensor window = window_.contiguous();
  const int64_t nbins = n_fft / 2 + 1;
  const int64_t nfilt = fb_.size(-2);
  const Tensor fb = fb_.reshape({nfilt, nbins}).contiguous();
  const int64_t B = x.size(0), N = x.size(1);
  const int64_t T = mel::padded_frames(N, hop, pad_to);
  const int64_t win = window.size(0), left = (n_fft - win) / 2, half = n_fft / 2;

  Tensor out = at::empty({B, nfilt, T}, x.options());
  Tensor lens_out = at::empty({B}, lengths.options());
  const int64_t* nl = lengths.data_ptr<int64_t>();
  int64_t* F = lens_out.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) F[b] = mel::valid_frames(nl[b], n_fft, hop, legacy);
  if (B == 0) return {out, lens_out};

  // non-zero range [lo, hi) of every filter
  const float* fbp = fb.data_ptr<float>();
  std::vector<int64_t> flo(nfilt), fhi(nfilt);
  for (int64_t m = 0; m < nfilt; ++m) {
    int64_t lo = 0, hi = 0;
    const float* row = fbp + m * nbins;
    for (int64_t k = 0; k < nbins; ++k)
      if (row[k] != 0.0f) { lo = k; break; }
    for (int64_t k = nbins - 1; k >= 0; --k)
      if (row[k] != 0.0f) { hi = k + 1; break; }
    flo[m] = lo;
    fhi[m] = std::max(lo, hi);
  }

  std::vector<std::pair<int64_t, int64_t>> items;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t0 = 0; t0 < F[b]; t0 += kChunk) items.emplace_back(b, t0);

  const float* xp = x.data_ptr<float>();
  const float* wp = window.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float pre = static_cast<float>(preemph), dith = static_cast<float>(dither);
  const uint64_t seed = static_cast<uint64_t>(seed_), offset = static_cast<uint64_t>(offset_);
  const float guard = static_cast<float>(log_guard), mpow = static_cast<float>(mag_power);

  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t i0, int64_t i1) {
    Tensor frames = at::empty({kChunk, n_fft}, x.options());
    float* fr = frames.data_ptr<float>();
    std::vector<float> yseg(static_cast<size_t>((kChunk - 1) * hop + n_fft)), ysrc, xd, melbuf(kChunk * nfilt),
        pw(nbins);
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t b = items[it].first, t0 = items[it].second;
      const int64_t nf = std::min(kChunk, F[b] - t0);
      const int64_t s0 = t0 * hop - half, s1 = (t0 + nf - 1) * hop - half + n_fft;
      const float* xr = xp + b * N;
      // 1. the signal segment [s0, s1) after dither, pre-emphasis, masking and padding
      if (!legacy) {
        const int64_t nb = nl[b];
        const int64_t lo = std::max<int64_t>(s0, 0), hi = std::min<int64_t>(s1, nb);
        std::fill(yseg.begin(), yseg.begin() + (s1 - s0), 0.0f);
        if (hi > lo) preemph_range(xr, b, N, lo, hi, pre, dith, seed, offset, xd, yseg.data() + (lo - s0));
      } else {
        int64_t lo = std::max<int64_t>(s0, 0), hi = std::min<int64_t>(s1, N);
        if (s0 < 0) { lo = std::min<int64_t>(lo, 1); hi = std::max<int64_t>(hi, -s0 + 1); }
        if (s1 > N) { lo = std::min<int64_t>(lo, 2 * (N - 1) - (s1 - 1)); hi = std::max<int64_t>(hi, N); }
        lo = std::max<int64_t>(lo, 0);
        hi = std::min<int64_t>(hi, N);
        ysrc.resize(static_cast<size_t>(hi - lo));
        preemph_range(xr, b, N, lo, hi, pre, dith, seed, offset, xd, ysrc.data());
        for (int64_t s = s0; s < s1; ++s) yseg[s - s0] = ysrc[mel::reflect_index(s, N) - lo];
      }
      // 2. frames x window (window zero-padded to n_fft, centred)
      for (int64_t f = 0; f < nf; ++f) {
        float* row = fr + f * n_fft;
        const float* ys = yseg.data() + f * hop;
        std::fill(row, row + left, 0.0f);
        for (int64_t j = 0; j < win; ++j) row[left + j] = ys[left + j] * wp[j];
        std::fill(row + left + win, row + n_fft, 0.0f);
      }
      // 3. FFT of the chunk
      const Tensor spec = at::view_as_real(at::fft_rfft(frames.narrow(0, 0, nf), c10::nullopt, -1)).contiguous();
      const float* sp = spec.data_ptr<float>();
      // 4. power -> mel -> log
      for (int64_t f = 0; f < nf; ++f) {
        const float* c = sp + f * nbins * 2;
        float* pwp = pw.data();
        if (mpow == 2.0f) {
          for (int64_t k = 0; k < nbins; ++k) {  // sqrt then square, as the reference
            const float mag = std::sqrt(c[2 * k] * c[2 * k] + c[2 * k + 1] * c[2 * k + 1]);
            pwp[k] = mag * mag;
          }
        } else {
          for (int64_t k = 0; k < nbins; ++k) {
            const float mag = std::sqrt(c[2 * k] * c[2 * k] + c[2 * k + 1] * c[2 * k + 1]);
            pwp[k] = mpow == 1.0f ? mag : std::pow(mag, mpow);
          }
        }
        float* mrow = melbuf.data() + f * nfilt;
        for (int64_t m = 0; m < nfilt; ++m) {
          const float* w = fbp + m * nbins;
          float acc = 0.0f;
          for (int64_t k = flo[m]; k < fhi[m]; ++k) acc += w[k] * pwp[k];
          if (log_mode == mel::kLogAdd) acc = std::log(acc + guard);
          else if (log_mode == mel::kLogClamp) acc = std::log(std::max(acc, guard));
          mrow[m] = acc;
        }
      }
      // 5. transpose into out[b, :, t0:t0+nf]
      for (int64_t m = 0; m < nfilt; ++m) {
        float* orow = op + (b * nfilt + m) * T + t0;
        for (int64_t f = 0; f < nf; ++f) orow[f] = melbuf[f * nfilt + m];
      }
    }
  });

  // pass 2: per (row, filter) normalisation over valid frames + padding
  const float pv = static_cast<float>(pad_value);
  at::parallel_for(0, B * nfilt, 8, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / nfilt;
      const int64_t Fb = std::min(F[b], T);
      float* row = op + r * T;
      if (normalize == 1 && Fb > 0) {
        double sum = 0.0;
        for (int64_t t = 0; t < Fb; ++t) sum += row[t];
        const float mean = static_cast<float>(sum / static_cast<double>(Fb));
        float sd;
        if (Fb == 1) {
          sd = legacy ? std::numeric_limits<float>::quiet_NaN() : 0.0f;  // sqrt(0/0): NaN (≤2.4) or NaN -> 0
        } else {
          double ss = 0.0;
          for (int64_t t = 0; t < Fb; ++t) {
            const double d = static_cast<double>(row[t] - mean);
            ss += d * d;
          }
          sd = static_cast<float>(std::sqrt(ss / static_cast<double>(Fb - 1)));
        }
        sd += 1e-5f;
        for (int64_t t = 0; t < Fb; ++t) row[t] = (row[t] - mean) / sd;
      }
      for (int64_t t = Fb; t < T; ++t) row[t] = pv;
    }
  });
  return {out, lens_out};
}

// Test hook: the fused CUDA kernel's FFT (pack -> Stockham passes -> real split -> power), run index for index
// on the CPU so its indexing is checked without a GPU. frames [F, L] float32, L a power of two >= 4.
Tensor rfft_power_emulate(const Tensor& frames_, double mag_power) {
  TORCH_CHECK(frames_.dim() == 2 && frames_.scalar_type() == at::kFloat,
              "nest_fast::_rfft_power_emulate: frames must be a 2-D float32 tensor, got ", frames_.sizes(), " ",
              frames_.scalar_type());
  const int64_t L = frames_.size(1);
  TORCH_CHECK(mel::is_pow2(L) && L >= 4, "nest_fast::_rfft_power_emulate: frame length must be a power of two >= 4, got ", L);
  const Tensor frames = frames_.contiguous();
  const int M = static_cast<int>(L / 2);
  Tensor out = at::empty({frames.size(0), M + 1}, frames.options());
  std::vector<mel::NfC> a(M), b(M), tw(M + 1);
  for (int q = 0; q <= M; ++q) tw[q] = mel::twiddle(q, L);
  const float* fr = frames.data_ptr<float>();
  float* op = out.data_ptr<float>();
  for (int64_t f = 0; f < frames.size(0); ++f) {
    for (int n = 0; n < M; ++n) a[n] = mel::NfC{fr[f * L + 2 * n], fr[f * L + 2 * n + 1]};
    mel::NfC* src = a.data();
    mel::NfC* dst = b.data();
    for (int p = 1; p < M; p <<= 1) {
      for (int i = 0; i < M / 2; ++i) mel::fft_stage(src, dst, tw.data(), M, p, i);
      std::swap(src, dst);
    }
    for (int k = 0; k <= M; ++k) op[f * (M + 1) + k] = mel::rfft_power(src, tw.data(), M, k, static_cast<float>(mag_power));
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(nest_fast, m) {
  m.def("_rfft_power_emulate(Tensor frames, float mag_power) -> Tensor");
  m.def(
      "mel_frontend(Tensor x, Tensor lengths, Tensor window, Tensor fb, int hop, int n_fft, float preemph, "
      "float dither, int seed, int offset, float log_guard, int log_mode, int normalize, int pad_to, "
      "float pad_value, float mag_power, bool legacy) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(nest_fast, CPU, m) {
  m.impl("mel_frontend", &mel_frontend_cpu);
  m.impl("_rfft_power_emulate", &rfft_power_emulate);
}

// Importable Python module (the op registers itself when the shared library loads).
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", "nest_fast C++ ops (torch.ops.nest_fast)", -1,
                                   nullptr};
  return PyModule_Create(&def);
}
