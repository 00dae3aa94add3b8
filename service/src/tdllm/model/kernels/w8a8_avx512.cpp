// W8A8 on AVX-512 VNNI: int8 weights streamed once per call for the few rows of a decode step.
//
// The product is the one FBGEMM and oneDNN compute for `Int8DynamicMethod` (w8a8_packed.py):
// input rows already scaled into [-1, 1] are rounded to u8 on the grid `x_step` around 128,
// multiplied by the s8 weights with VPDPBUSD (u8 x s8, four pairs summed into each int32 lane),
// the zero point taken back out with each output's weight sum, and scaled to fp32.
//
// Why our own: at one to eight rows FBGEMM and oneDNN read the weights at 14-22 GB/s on an
// AMX Xeon whose bus gives ~26 (docs/performance.md). Here the weights are packed output-major
// in blocks of 64 outputs, [N/64][K/4][64][4]: one contiguous stream per block, 256 bytes per
// four inputs, so each 64-byte load feeds one VPDPBUSD with a broadcast input quad and no lane
// is ever reduced across. Up to six input rows share each load.
//
// A long prompt's rows are compute-bound instead: where the CPU has AMX, from `kAmxRows` rows the
// same packed weights feed AMX tiles (TDPBUSD, u8 x s8 into 16x16 int32): a B tile is 16 quads
// of 16 outputs, rows 256 bytes apart in a block's stream, so one layout serves both paths.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace {

constexpr int64_t kBlock = 64;     // outputs a block: four 16-lane accumulators
constexpr int kRows = 6;           // input rows a register block (24 accumulators)
constexpr int64_t kAhead = 2048;   // bytes prefetched ahead in a block's stream
constexpr int64_t kQuadStep = 16;  // quads the packing pads K to: one AMX tile's depth
constexpr int64_t kTile = 16;      // rows and outputs of an AMX int32 tile

// Linux hands a process AMX's tile state only when asked (arch_prctl ARCH_REQ_XCOMP_PERM).
bool amx_permitted() {
  static const bool permitted = [] {
    constexpr int kReqXcompPerm = 0x1023, kXtileData = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) == 0;
  }();
  return permitted;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// y rows [r, r + 32) (those below m), outputs [n0, n0 + outputs) of one 64-output block, on
// AMX: per 16 quads, two A tiles (16 input rows each) by two B tiles (16 outputs each), twice.
__attribute__((target("amx-tile,amx-int8,avx512f,avx512bw")))
void amx_block(const uint8_t* x, int64_t lda, int64_t valid, int64_t quads, const int8_t* w,
               const float* scales, const int32_t* sums, float step, float* y, int64_t ldy,
               int64_t outputs) {
  alignas(64) int32_t c[4][kTile * kTile];
  for (int half = 0; half < 2 && 32 * half < outputs; ++half) {
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    const int8_t* wh = w + 32 * half * 4;
    for (int64_t q = 0; q < quads; q += kQuadStep) {
      _tile_loadd(4, x + q * 4, lda);
      _tile_loadd(5, x + kTile * lda + q * 4, lda);
      _tile_loadd(6, wh + q * kBlock * 4, kBlock * 4);
      _tile_loadd(7, wh + q * kBlock * 4 + 64, kBlock * 4);
      _tile_dpbusd(0, 4, 6); _tile_dpbusd(1, 4, 7);
      _tile_dpbusd(2, 5, 6); _tile_dpbusd(3, 5, 7);
    }
    _tile_stored(0, c[0], 64); _tile_stored(1, c[1], 64);
    _tile_stored(2, c[2], 64); _tile_stored(3, c[3], 64);
    for (int t = 0; t < 4; ++t) {  // tile t: input rows 16 * (t / 2), outputs 16 * (t % 2)
      const int64_t col = 32 * half + kTile * (t % 2);
      if (col >= outputs) continue;
      const int64_t lanes = std::min<int64_t>(kTile, outputs - col);
      const auto keep = static_cast<__mmask16>((1u << lanes) - 1);
      const __m512i zero = _mm512_slli_epi32(_mm512_loadu_si512(sums + col), 7);
      const __m512 s = _mm512_mul_ps(_mm512_loadu_ps(scales + col), _mm512_set1_ps(step));
      for (int64_t i = 0; i < kTile && kTile * (t / 2) + i < valid; ++i) {
        const __m512i exact = _mm512_sub_epi32(_mm512_load_si512(c[t] + i * kTile), zero);
        _mm512_mask_storeu_ps(y + (kTile * (t / 2) + i) * ldy + col, keep,
                              _mm512_mul_ps(_mm512_cvtepi32_ps(exact), s));
      }
    }
  }
}

__attribute__((target("amx-tile")))
void amx_configure() {
  TileConfig config;
  for (int t = 0; t < 8; ++t) {
    config.rows[t] = kTile;
    config.colsb[t] = 64;
  }
  // GCC does not see LDTILECFG read the rows and widths and drops their stores: keep them
  asm volatile("" : : "r"(&config) : "memory");
  _tile_loadconfig(&config);
}

__attribute__((target("amx-tile")))
void amx_release() { _tile_release(); }

template <int R>
void block(const uint8_t* x, int64_t quads, const int8_t* w, const float* scales,
           const int32_t* sums, float step, float* y, int64_t ldy, int64_t outputs) {
  __m512i acc[R][4];
  for (int m = 0; m < R; ++m)
    for (int j = 0; j < 4; ++j) acc[m][j] = _mm512_setzero_si512();
  const auto* xq = reinterpret_cast<const int32_t*>(x);
  for (int64_t q = 0; q < quads; ++q) {
    const int8_t* wq = w + q * kBlock * 4;
    for (int j = 0; j < 4; ++j)
      _mm_prefetch(reinterpret_cast<const char*>(wq + kAhead + 64 * j), _MM_HINT_T0);
    const __m512i w0 = _mm512_load_si512(wq), w1 = _mm512_load_si512(wq + 64);
    const __m512i w2 = _mm512_load_si512(wq + 128), w3 = _mm512_load_si512(wq + 192);
    for (int m = 0; m < R; ++m) {
      const __m512i xm = _mm512_set1_epi32(xq[m * quads + q]);
      acc[m][0] = _mm512_dpbusd_epi32(acc[m][0], xm, w0);
      acc[m][1] = _mm512_dpbusd_epi32(acc[m][1], xm, w1);
      acc[m][2] = _mm512_dpbusd_epi32(acc[m][2], xm, w2);
      acc[m][3] = _mm512_dpbusd_epi32(acc[m][3], xm, w3);
    }
  }
  for (int j = 0; j < 4 && 16 * j < outputs; ++j) {
    const __m512i zero = _mm512_slli_epi32(_mm512_loadu_si512(sums + 16 * j), 7);  // 128 * sum
    const __m512 s = _mm512_mul_ps(_mm512_loadu_ps(scales + 16 * j), _mm512_set1_ps(step));
    const int64_t lanes = std::min<int64_t>(16, outputs - 16 * j);
    const auto keep = static_cast<__mmask16>((1u << lanes) - 1);
    for (int m = 0; m < R; ++m) {
      const __m512i exact = _mm512_sub_epi32(acc[m][j], zero);
      _mm512_mask_storeu_ps(y + m * ldy + 16 * j, keep,
                            _mm512_mul_ps(_mm512_cvtepi32_ps(exact), s));
    }
  }
}

// round(v / step) + 128 for the first `k` entries, 128 (a zero weight's partner) after them
void round_row(const float* v, int64_t k, int64_t padded, float inverse, uint8_t* out) {
  const __m512 scale = _mm512_set1_ps(inverse);
  const __m512i zero = _mm512_set1_epi32(128);
  int64_t i = 0;
  for (; i + 16 <= k; i += 16) {  // the current rounding mode: to nearest, ties to even
    const __m512i r = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(v + i), scale));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i),
                     _mm512_cvtusepi32_epi8(_mm512_add_epi32(r, zero)));
  }
  for (; i < k; ++i) out[i] = static_cast<uint8_t>(std::nearbyint(v[i] * inverse) + 128);
  for (; i < padded; ++i) out[i] = 128;
}

}  // namespace

// weight [N, K] s8 -> [ceil(N/64), quads, 64, 4], zero-padded; quads: K/4 up to a multiple of 16
at::Tensor pack(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kChar, "weight: [N, K] int8");
  const int64_t n = weight.size(0), k = weight.size(1);
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  const int64_t quads = (k + 4 * kQuadStep - 1) / (4 * kQuadStep) * kQuadStep;
  at::Tensor whole = weight;  // one copy, the packed one, unless the shape needs padding
  if (blocks * kBlock != n || quads * 4 != k) {
    whole = at::zeros({blocks * kBlock, quads * 4}, at::kChar);
    whole.narrow(0, 0, n).narrow(1, 0, k).copy_(weight);
  }
  return whole.unflatten(0, {blocks, kBlock}).unflatten(2, {quads, 4})
      .permute({0, 2, 1, 3}).contiguous();
}

// sum of each row of weight [N, K] s8, padded with zeros to `outputs` (torch's own sum would
// widen the whole matrix to int32 first: 4x its size, transient, on every load)
at::Tensor row_sums(const at::Tensor& weight, int64_t outputs) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kChar && weight.stride(1) == 1 &&
              outputs >= weight.size(0), "weight: [N, K] int8 rows");
  const int64_t n = weight.size(0), k = weight.size(1), ld = weight.stride(0);
  at::Tensor sums = at::zeros({outputs}, at::kInt);
  int32_t* out = sums.data_ptr<int32_t>();
  const int8_t* w = weight.data_ptr<int8_t>();
  at::parallel_for(0, n, 256, [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) {
      int32_t total = 0;
      for (int64_t i = 0; i < k; ++i) total += w[r * ld + i];
      out[r] = total;
    }
  });
  return sums;
}

// packed [N/64, K/4, 64, 4] -> weight [N, K]
at::Tensor unpack(const at::Tensor& packed, int64_t n, int64_t k) {
  const int64_t blocks = packed.size(0), quads = packed.size(1);
  return packed.permute({0, 2, 1, 3}).reshape({blocks * kBlock, quads * 4})
      .narrow(0, 0, n).narrow(1, 0, k).contiguous();
}

// scaled [M, >= K] fp32 rows in [-1, 1]; scales and sums [N] (per-output weight scale and
// weight sum); y [M, N] = step * scales[n] * sum_k (round(scaled / step) * w[n, k]); on AMX from
// `amx_min_rows` rows (0: never)
at::Tensor product(const at::Tensor& scaled, const at::Tensor& packed, const at::Tensor& scales,
                   const at::Tensor& sums, int64_t n, int64_t k, double x_step,
                   int64_t amx_min_rows) {
  TORCH_CHECK(scaled.dim() == 2 && scaled.scalar_type() == at::kFloat && scaled.stride(1) == 1 &&
              scaled.size(1) >= k, "scaled: [M, >= K] fp32 rows");
  TORCH_CHECK(packed.scalar_type() == at::kChar && packed.is_contiguous() && packed.dim() == 4 &&
              packed.size(0) * kBlock >= n && packed.size(1) * 4 >= k &&
              packed.size(1) % kQuadStep == 0, "packed: from pack");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && sums.scalar_type() == at::kInt &&
              scales.numel() >= packed.size(0) * kBlock && sums.numel() >= packed.size(0) * kBlock,
              "scales fp32, sums int32, padded to the packed outputs");
  const int64_t m = scaled.size(0), quads = packed.size(1), lda = quads * 4;
  const bool amx = amx_min_rows > 0 && m >= amx_min_rows && amx_permitted();
  const int64_t padded_rows = amx ? (m + 2 * kTile - 1) / (2 * kTile) * (2 * kTile) : m;
  const float step = static_cast<float>(x_step), inverse = static_cast<float>(1.0 / x_step);
  at::Tensor rounded = at::empty({padded_rows, lda}, at::kByte);
  uint8_t* x = rounded.data_ptr<uint8_t>();
  const float* rows = scaled.data_ptr<float>();
  at::parallel_for(0, m, 8, [&](int64_t first, int64_t last) {  // a prompt's rows: both cores
    for (int64_t r = first; r < last; ++r)
      round_row(rows + r * scaled.stride(0), k, lda, inverse, x + r * lda);
  });
  std::fill(x + m * lda, x + padded_rows * lda, uint8_t{128});

  at::Tensor y = at::empty({m, n}, scaled.options());
  const int8_t* w = packed.data_ptr<int8_t>();
  const float* sc = scales.data_ptr<float>();
  const int32_t* su = sums.data_ptr<int32_t>();
  float* out = y.data_ptr<float>();
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t last) {
    if (amx) amx_configure();
    for (int64_t b = first; b < last; ++b) {
      const int64_t n0 = b * kBlock, outputs = std::min<int64_t>(kBlock, n - n0);
      const int8_t* wb = w + b * quads * kBlock * 4;
      if (amx) {
        for (int64_t r = 0; r < m; r += 2 * kTile)
          amx_block(x + r * lda, lda, m - r, quads, wb, sc + n0, su + n0, step,
                    out + r * n + n0, n, outputs);
        continue;
      }
      for (int64_t r = 0; r < m; r += kRows) {  // the block's weights stay in L2 across rows
        const uint8_t* xr = x + r * lda;
        float* yr = out + r * n + n0;
        switch (std::min<int64_t>(kRows, m - r)) {
          case 1: block<1>(xr, quads, wb, sc + n0, su + n0, step, yr, n, outputs); break;
          case 2: block<2>(xr, quads, wb, sc + n0, su + n0, step, yr, n, outputs); break;
          case 3: block<3>(xr, quads, wb, sc + n0, su + n0, step, yr, n, outputs); break;
          case 4: block<4>(xr, quads, wb, sc + n0, su + n0, step, yr, n, outputs); break;
          case 5: block<5>(xr, quads, wb, sc + n0, su + n0, step, yr, n, outputs); break;
          default: block<6>(xr, quads, wb, sc + n0, su + n0, step, yr, n, outputs); break;
        }
      }
    }
    if (amx) amx_release();
  });
  return y;
}

TORCH_LIBRARY(tdllm_avx512, m) {
  m.def("pack(Tensor weight) -> Tensor");
  m.def("unpack(Tensor packed, int n, int k) -> Tensor");
  m.def("row_sums(Tensor weight, int outputs) -> Tensor");
  m.def("w8a8(Tensor scaled, Tensor packed, Tensor scales, Tensor sums, int n, int k, "
        "float x_step, int amx_min_rows) -> Tensor");
}

TORCH_LIBRARY_IMPL(tdllm_avx512, CPU, m) {
  m.impl("pack", &pack);
  m.impl("unpack", &unpack);
  m.impl("row_sums", &row_sums);
  m.impl("w8a8", &product);
}
