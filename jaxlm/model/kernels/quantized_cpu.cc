// y[M, N] = x[M, K] @ w[K, N] with w held as group-quantized codes (jaxlm/compress/quantize.py):
// codes [G, R, N] (R = g at 8 bits; g/2 at 4 bits, a byte's low nibble is row r of its group and
// its high nibble row r + g/2), scale and offset [G, 1, N] in f16 or f32, w = (code - zero) * scale
// (+ offset). The weights are read once, as codes, and never written out dequantized: decoding is
// memory-bound, so the bytes read are the time. Per group: y += scale * (x . (codes - c) - (zero - c) * sum x)
// (+ offset * sum x), c the middle code. Columns are shared out among the caller and the kernel's
// own helper threads (one per further core of XLA's pool). x86-64 (AVX-512 where the CPU has it).
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kRowsAtOnce = 8;  // x rows sharing one read of the codes
constexpr int64_t kRowChunk = 8;    // code rows converted at once (several x rows), then read by each
constexpr int64_t kColumns = 256;   // columns per block for several x rows

// a row of scales (or offsets) as f32: f16 ones eight at a time (one at a time, _cvtsh_ss stays
// scalar, and at 4 bits in groups of 32 that was a quarter of a decode step)
inline void to_f32(const float* s, float* out, int64_t nb) { std::copy(s, s + nb, out); }
inline void to_f32(const uint16_t* s, float* out, int64_t nb) {
  int64_t n = 0;
#ifdef __F16C__
  for (; n + 8 <= nb; n += 8)
    _mm256_storeu_ps(out + n, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + n))));
#endif
  for (; n < nb; ++n) out[n] = _cvtsh_ss(s[n]);
}

struct Problem {
  const float* x;
  const uint8_t* codes;
  const void* scale;
  const void* offset;  // null: symmetric
  float* y;
  int64_t M, G, R, N;
  float zero;
};

// The level of a code minus the middle code c: at 8 bits (int8)(code ^ 0x80), at 4 bits nibble - 8.
inline float centred8(uint8_t c) { return static_cast<float>(static_cast<int8_t>(c ^ 0x80)); }
inline float low4(uint8_t c) { return static_cast<float>((c & 15) - 8); }
inline float high4(uint8_t c) { return static_cast<float>((c >> 4) - 8); }

// d[n] += sum over 4 byte rows (`stride` apart) of x * level; at 4 bits a byte's high nibble is
// the row `half` rows further on. Written for AVX-512 where the compiler has it (its own
// vectorization of the plain loop runs at two thirds the speed), plain otherwise.
template <int kBits>
inline void four_rows(float* __restrict d, const uint8_t* __restrict r, int64_t stride, const float* x,
                      int64_t half, int64_t nb) {
  int64_t n = 0;
#ifdef __AVX512F__
  const __m128i flip = _mm_set1_epi8(static_cast<char>(0x80)), eight = _mm_set1_epi8(8), nibble = _mm_set1_epi8(15);
  auto f32 = [](__m128i bytes) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes)); };
  auto load = [&](int64_t i) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(r + i * stride + n)); };
  __m512 a[4], b[4];
  for (int i = 0; i < 4; ++i) a[i] = _mm512_set1_ps(x[i]), b[i] = _mm512_set1_ps(kBits == 4 ? x[i + half] : 0.f);
  for (; n + 16 <= nb; n += 16) {
    __m512 s0 = _mm512_loadu_ps(d + n), s1 = _mm512_setzero_ps();
    if (n % 64 == 0)  // the rows two calls ahead, a few lines on: the hardware alone keeps too few reads in flight
      for (int i = 8; i < 12; ++i) _mm_prefetch(reinterpret_cast<const char*>(r + i * stride + n + 256), _MM_HINT_T0);
    for (int i = 0; i < 4; ++i) {
      const __m128i c = load(i);
      if constexpr (kBits == 8) {
        (i % 2 ? s1 : s0) = _mm512_fmadd_ps(a[i], f32(_mm_xor_si128(c, flip)), i % 2 ? s1 : s0);
      } else {
        s0 = _mm512_fmadd_ps(a[i], f32(_mm_sub_epi8(_mm_and_si128(c, nibble), eight)), s0);
        s1 = _mm512_fmadd_ps(b[i], f32(_mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(c, 4), nibble), eight)), s1);
      }
    }
    _mm512_storeu_ps(d + n, _mm512_add_ps(s0, s1));
  }
#endif
  for (; n < nb; ++n) {
    float sum = 0.f;
    for (int i = 0; i < 4; ++i) {
      const uint8_t c = r[i * stride + n];
      sum += kBits == 8 ? x[i] * centred8(c) : x[i] * low4(c) + x[i + half] * high4(c);
    }
    d[n] += sum;
  }
}

template <int kBits>
inline void one_row(float* __restrict d, const uint8_t* __restrict r, const float* x, int64_t half, int64_t nb) {
  for (int64_t n = 0; n < nb; ++n)
    d[n] += kBits == 8 ? x[0] * centred8(r[n]) : x[0] * low4(r[n]) + x[half] * high4(r[n]);
}

// w[i] (rows kColumns apart) = levels of `n_rows` byte rows (at 4 bits: low nibbles in rows
// 0..n_rows-1, high nibbles in rows n_rows..2 n_rows-1), converted once for every x row
template <int kBits>
inline void levels(float* __restrict w, const uint8_t* __restrict r, int64_t stride, int64_t n_rows, int64_t nb) {
  constexpr int64_t width = kColumns;
  for (int64_t i = 0; i < n_rows; ++i)
    for (int64_t n = 0; n < nb; ++n) {
      const uint8_t c = r[i * stride + n];
      if constexpr (kBits == 8) {
        w[i * width + n] = centred8(c);
      } else {
        w[i * width + n] = low4(c);
        w[(n_rows + i) * width + n] = high4(c);
      }
    }
}

// d[n] += sum_i x[i] * w[i][n] (rows kColumns apart: a constant the compiler can use), four rows per pass over d
inline void multiply_add(float* __restrict d, const float* __restrict w, const float* x, int64_t n_rows, int64_t nb) {
  constexpr int64_t width = kColumns;
  int64_t i = 0;
  for (; i + 4 <= n_rows; i += 4) {
    const float *w0 = w + i * width, *w1 = w0 + width, *w2 = w1 + width, *w3 = w2 + width;
    for (int64_t n = 0; n < nb; ++n) d[n] += x[i] * w0[n] + x[i + 1] * w1[n] + x[i + 2] * w2[n] + x[i + 3] * w3[n];
  }
  for (; i < n_rows; ++i)
    for (int64_t n = 0; n < nb; ++n) d[n] += x[i] * w[i * width + n];
}

// dot[m] += x rows m0.. (mb of them) . levels of code rows r0..r0+rc of group gi, columns c0..c0+nb
template <int kBits>
void rows_into(const Problem& p, int64_t gi, int64_t r0, int64_t rc, int64_t m0, int64_t mb, int64_t c0, int64_t nb,
               float* dot, float* w) {
  const int64_t g = kBits == 4 ? 2 * p.R : p.R, K = p.G * g;
  const uint8_t* r = p.codes + (gi * p.R + r0) * p.N + c0;
  if (mb == 1) {  // decoding one row: the codes are converted inside the multiply-add
    const float* xm = p.x + m0 * K + gi * g + r0;
    int64_t i = 0;
    for (; i + 4 <= rc; i += 4) four_rows<kBits>(dot, r + i * p.N, p.N, xm + i, p.R, nb);
    for (; i < rc; ++i) one_row<kBits>(dot, r + i * p.N, xm + i, p.R, nb);
    return;
  }
  levels<kBits>(w, r, p.N, rc, nb);
  for (int64_t m = 0; m < mb; ++m) {
    const float* xm = p.x + (m0 + m) * K + gi * g;
    float xs[2 * kRowChunk];
    for (int64_t i = 0; i < rc; ++i) xs[i] = xm[r0 + i], xs[rc + i] = kBits == 4 ? xm[p.R + r0 + i] : 0.f;
    multiply_add(dot + m * nb, w, xs, kBits == 4 ? 2 * rc : rc, nb);
  }
}

// y[m0.., c0..c0+nb]: per group, the centred dot products, then scale (and offset) applied
template <int kBits, typename Scale>
void block(const Problem& p, int64_t m0, int64_t mb, int64_t c0, int64_t nb, float* acc, float* dot, float* w,
           float* sf, float* of) {
  const int64_t g = kBits == 4 ? 2 * p.R : p.R, K = p.G * g;
  constexpr float kCenter = 1 << (kBits - 1);
  const Scale* scale = static_cast<const Scale*>(p.scale);
  const Scale* offset = static_cast<const Scale*>(p.offset);
  std::fill(acc, acc + mb * nb, 0.f);
  for (int64_t gi = 0; gi < p.G; ++gi) {
    std::fill(dot, dot + mb * nb, 0.f);
    for (int64_t r0 = 0; r0 < p.R; r0 += kRowChunk)  // rows in memory order: the codes stream
      rows_into<kBits>(p, gi, r0, std::min(kRowChunk, p.R - r0), m0, mb, c0, nb, dot, w);
    to_f32(scale + gi * p.N + c0, sf, nb);
    if (offset) to_f32(offset + gi * p.N + c0, of, nb);
    for (int64_t m = 0; m < mb; ++m) {
      const float* xm = p.x + (m0 + m) * K + gi * g;
      float xsum = 0.f;
      for (int64_t k = 0; k < g; ++k) xsum += xm[k];
      const float shift = (p.zero - kCenter) * xsum;  // the codes were summed centred
      float *a = acc + m * nb, *d = dot + m * nb;
      for (int64_t n = 0; n < nb; ++n) a[n] += sf[n] * (d[n] - shift);
      if (offset)
        for (int64_t n = 0; n < nb; ++n) a[n] += of[n] * xsum;
    }
  }
  for (int64_t m = 0; m < mb; ++m) std::copy(acc + m * nb, acc + (m + 1) * nb, p.y + (m0 + m) * p.N + c0);
}

// columns n0..n1 of y: for one x row in one block (each code row read as one run of bytes); for
// several, in blocks whose sums and converted levels stay in L1
template <int kBits, typename Scale>
void columns(const Problem& p, int64_t n0, int64_t n1) {
  const int64_t width = p.M == 1 ? n1 - n0 : kColumns;
  thread_local std::vector<float> buffer;
  buffer.resize((2 * kRowsAtOnce + 2 * kRowChunk + 2) * width);
  float *acc = buffer.data(), *dot = acc + kRowsAtOnce * width, *w = dot + kRowsAtOnce * width;
  float *sf = w + 2 * kRowChunk * width, *of = sf + width;
  for (int64_t m0 = 0; m0 < p.M; m0 += kRowsAtOnce)
    for (int64_t c0 = n0; c0 < n1; c0 += width)
      block<kBits, Scale>(p, m0, std::min(kRowsAtOnce, p.M - m0), c0, std::min(width, n1 - c0), acc, dot, w, sf, of);
}

using Columns = void (*)(const Problem&, int64_t, int64_t);

Columns pick(int64_t bits, bool f16) {
  if (bits == 8) return f16 ? columns<8, uint16_t> : columns<8, float>;
  return f16 ? columns<4, uint16_t> : columns<4, float>;
}

// The columns in shares that the caller and helper threads take from a counter. The helpers are
// the kernel's own and spin for a while after each call: a decode step calls the kernel ~100
// times, a few microseconds apart, and waking a sleeping thread (XLA's pool) takes longer than
// a share. The caller waits only for shares another thread has taken (so running); a helper that
// comes late finds none (the job is shared, not on the caller's stack). One job at a time: a call
// made while another runs (XLA runs independent ops concurrently) does its own work alone.
struct Job {
  Problem p;
  Columns run;
  int64_t shares, width;
  std::atomic<int64_t> next{0}, done{0};
  void drain() {
    for (int64_t s; (s = next.fetch_add(1)) < shares; done.fetch_add(1, std::memory_order_release))
      run(p, s * width, std::min(p.N, (s + 1) * width));
  }
};

class Helpers {
 public:
  explicit Helpers(int64_t n) {
    for (int64_t i = 0; i < n; ++i) std::thread([this] { loop(); }).detach();
  }

  void run(std::shared_ptr<Job> job) {
    std::unique_lock<std::mutex> alone(busy_, std::try_to_lock);
    if (alone.owns_lock()) {
      {
        std::lock_guard<std::mutex> l(m_);
        job_ = job;
        generation_.fetch_add(1, std::memory_order_release);
      }
      wake_.notify_all();
    }
    job->drain();
    for (int spins = 0; job->done.load(std::memory_order_acquire) < job->shares; ++spins)
      if (spins < (1 << 16)) _mm_pause(); else std::this_thread::yield();
  }

 private:
  void loop() {
    uint64_t seen = 0;
    for (;;) {
      const auto start = std::chrono::steady_clock::now();
      while (generation_.load(std::memory_order_acquire) == seen) {
        if (std::chrono::steady_clock::now() - start < std::chrono::microseconds(kSpinMicros)) {
          std::this_thread::yield();  // spinning, but XLA's threads get the core when they need it
          continue;
        }
        std::unique_lock<std::mutex> l(m_);
        wake_.wait(l, [&] { return generation_.load() != seen; });
      }
      std::shared_ptr<Job> job;
      {
        std::lock_guard<std::mutex> l(m_);
        job = job_;
        seen = generation_.load();
      }
      job->drain();
    }
  }

  static constexpr int64_t kSpinMicros = 2000;
  std::mutex busy_, m_;
  std::condition_variable wake_;
  std::atomic<uint64_t> generation_{0};
  std::shared_ptr<Job> job_;
};

ffi::Error QuantizedMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> codes,
                               ffi::AnyBuffer scale, ffi::AnyBuffer offset, ffi::ResultBuffer<ffi::F32> y,
                               int64_t bits, float zero, int64_t has_offset) {
  auto cd = codes.dimensions();
  if (cd.size() != 3 || (bits != 4 && bits != 8)) return ffi::Error::InvalidArgument("codes must be [G, R, N], bits 4 or 8");
  const bool f16 = scale.element_type() == ffi::DataType::F16;
  if (!f16 && scale.element_type() != ffi::DataType::F32) return ffi::Error::InvalidArgument("scale must be f16 or f32");
  static Helpers* helpers = new Helpers(std::max<int64_t>(0, pool.num_threads() - 1));  // never destroyed
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  auto job = std::make_shared<Job>();
  job->p = Problem{x.typed_data(), codes.typed_data(), scale.untyped_data(), has_offset ? offset.untyped_data() : nullptr,
                   y->typed_data(), x.dimensions()[0], cd[0], cd[1], cd[2], zero};
  job->run = pick(bits, f16);
  job->width = std::max<int64_t>(64, ((job->p.N + threads - 1) / threads + 15) / 16 * 16);
  job->shares = (job->p.N + job->width - 1) / job->width;
  helpers->run(job);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(QuantizedMatmul, QuantizedMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("bits")
                                  .Attr<float>("zero")
                                  .Attr<int64_t>("has_offset"));
