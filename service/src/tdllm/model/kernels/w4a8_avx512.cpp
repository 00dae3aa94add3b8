// W4A8 on AVX-512 VNNI: int4 weights with a scale and an offset per 32 inputs, streamed once per
// call for the few rows of a decode step, times inputs rounded to int8 per 32 (llama.cpp's Q4_0 x
// Q8_0 product, on int4's grid: w = q * scale + offset, q in 0..15).
//
// Why our own: torch's int4 kernel (`_weight_int4pack_mm_for_cpu`) reads the weights at 10-20
// GB/s at one row where the bus gives ~26-30 (docs/performance.md), and a prompt's rows cost it
// as much each as one decode step. The weights are in w4a8_layout.h's layout: one contiguous
// stream per block of 64 outputs; each 64-byte load gives two 16-lane VPDPBUSD operands (the low
// and high nibbles, u4 in u8 lanes, times a broadcast quad of s8 inputs), no lane is reduced
// across, and each group's int32 sums are scaled into fp32 with the group's scales:
//   y[n] += dx[g] * (scale[n, g] * sum_k q[n, k] * xq[k] + offset[n, g] * sum_k xq[k])
// where the inputs of group g are rounded as xq = round(x / dx[g]), dx[g] = max|x in g| / 127.
// w4a8_avx2.cpp computes the same sums and scales them in the same order: the same bits.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#include "w4a8_layout.h"

namespace {

constexpr int64_t kAhead = 5120;                   // bytes prefetched ahead in a block's stream

inline __m512 halves(const uint8_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// y rows [0, R) (ldy apart), outputs of registers [j0, j0 + J) of one block (each 16 outputs):
// R rows share every load; J = 4 streams the block once, J = 2 (two calls) leaves room for more
// rows' accumulators in the 32 registers
template <int R, int J>
void block(const int8_t* xq, int64_t lda, const float* dx, const float* dsum, int64_t groups,
           const uint8_t* w, int j0, float* y, int64_t ldy, int64_t outputs) {
  __m512 acc[R][J];
  for (int m = 0; m < R; ++m)
    for (int j = 0; j < J; ++j) acc[m][j] = _mm512_setzero_ps();
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* wg = w + g * kGroupBytes;
    if (J == 4)
      for (int64_t line = 0; line < kGroupBytes; line += 64)
        _mm_prefetch(reinterpret_cast<const char*>(wg + kAhead + line), _MM_HINT_T0);
    __m512i dot[R][J];
    for (int m = 0; m < R; ++m)
      for (int j = 0; j < J; ++j) dot[m][j] = _mm512_setzero_si512();
    for (int o = 0; o < 4; ++o) {  // eight inputs: a quad in the low nibbles, one in the high
      for (int j = 0; j < J; ++j) {
        const __m512i v = _mm512_load_si512(wg + o * 256 + (j0 + j) * 64);
        const __m512i lo = _mm512_and_si512(v, nibble);
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
        for (int m = 0; m < R; ++m) {
          const int8_t* x = xq + m * lda + g * kGroup + o * 8;
          dot[m][j] = _mm512_dpbusd_epi32(
              dot[m][j], lo, _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(x)));
          dot[m][j] = _mm512_dpbusd_epi32(
              dot[m][j], hi, _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(x + 4)));
        }
      }
    }
    for (int j = 0; j < J; ++j) {
      const __m512 scale = halves(wg + kCodeBytes + (j0 + j) * 32);
      const __m512 offset = halves(wg + kCodeBytes + kBlock * 2 + (j0 + j) * 32);
      for (int m = 0; m < R; ++m) {
        const __m512 s = _mm512_mul_ps(scale, _mm512_set1_ps(dx[m * groups + g]));
        acc[m][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[m][j]), s, acc[m][j]);
        acc[m][j] = _mm512_fmadd_ps(offset, _mm512_set1_ps(dsum[m * groups + g]), acc[m][j]);
      }
    }
  }
  for (int j = 0; j < J; ++j) {
    const int64_t first = 16 * (j0 + j);
    if (first >= outputs) break;
    const auto keep = static_cast<__mmask16>((1u << std::min<int64_t>(16, outputs - first)) - 1);
    for (int m = 0; m < R; ++m) _mm512_mask_storeu_ps(y + m * ldy + first, keep, acc[m][j]);
  }
}

template <int R>
void rows(const int8_t* xq, int64_t lda, const float* dx, const float* dsum, int64_t groups,
          const uint8_t* w, float* y, int64_t ldy, int64_t outputs) {
  if (R <= 3) {
    block<R, 4>(xq, lda, dx, dsum, groups, w, 0, y, ldy, outputs);
  } else {  // the block is in L2 for the second half
    block<R, 2>(xq, lda, dx, dsum, groups, w, 0, y, ldy, outputs);
    block<R, 2>(xq, lda, dx, dsum, groups, w, 2, y, ldy, outputs);
  }
}

// 16 inputs as fp32: bf16 widens exactly (its bits are fp32's upper half)
inline __m512 load16(const float* x) { return _mm512_loadu_ps(x); }
inline __m512 load16(const uint16_t* x) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

// one row's groups of 32: xq = round(x / dx) (to nearest, ties to even), dx = max|x| / 127 (a
// zero group: dx = 0, xq = 0), dsum = dx * sum(xq). A NaN in a group makes dx NaN (max_ps
// would pass it over), so the row's outputs are NaN as a float product's would be.
template <typename T>
void round_row(const T* x, int64_t groups, int8_t* xq, float* dx, float* dsum) {
  for (int64_t g = 0; g < groups; ++g) {
    const __m512 a = load16(x + g * kGroup), b = load16(x + g * kGroup + 16);
    float most = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
    if (_mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(b, b, _CMP_UNORD_Q))
      most = std::numeric_limits<float>::quiet_NaN();
    const float inverse = most > 0 ? 127.0f / most : 0.0f;
    const __m512 by = _mm512_set1_ps(inverse);
    const __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, by));
    const __m512i qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, by));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(xq + g * kGroup), _mm512_cvtsepi32_epi8(qa));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(xq + g * kGroup + 16), _mm512_cvtsepi32_epi8(qb));
    dx[g] = most / 127.0f;
    dsum[g] = dx[g] * static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb)));
  }
}

// fp32 -> bf16 bits in the low half of each lane, to nearest even as torch's vectorized cast
// rounds (ATen's cvtfp32_bf16): a NaN becomes 0xFFFF
inline __m512i bf16_bits(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(
      _mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7FFF)), lsb), 16);
  return _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q),
                               _mm512_set1_epi32(0xFFFF));
}

// a block's fp32 outputs (rows of `tile`, 64 apart) into rows of y (ldy apart), in y's dtype
inline void store(const float* tile, int64_t rows, int64_t outputs, float* y, int64_t ldy) {
  for (int64_t r = 0; r < rows; ++r) std::copy_n(tile + r * kBlock, outputs, y + r * ldy);
}
inline void store(const float* tile, int64_t rows, int64_t outputs, uint16_t* y, int64_t ldy) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t o = 0; o < outputs; o += 16) {
      const auto keep = static_cast<__mmask16>((1u << std::min<int64_t>(16, outputs - o)) - 1);
      _mm512_mask_cvtepi32_storeu_epi16(y + r * ldy + o, keep,
                                        bf16_bits(_mm512_loadu_ps(tile + r * kBlock + o)));
    }
}

// x [M, K] rows of T (fp32 or bf16 bits) times the packed weights into y [M, n] of T
template <typename T>
void product(const T* in, int64_t lda, int64_t m, const at::Tensor& packed, int64_t n, int64_t k,
             T* out) {
  const int64_t groups = k / kGroup;
  at::Tensor xq = at::empty({m, k}, at::kChar);
  at::Tensor dx = at::empty({m, groups}, at::kFloat), dsum = at::empty_like(dx);
  int8_t* q = xq.data_ptr<int8_t>();
  float *d = dx.data_ptr<float>(), *ds = dsum.data_ptr<float>();
  at::parallel_for(0, m, 8, [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r)
      round_row(in + r * lda, groups, q + r * k, d + r * groups, ds + r * groups);
  });

  const uint8_t* w = packed.data_ptr<uint8_t>();
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t last) {
    alignas(64) float tile[6 * kBlock];  // a block's outputs for up to six rows, then y's dtype
    for (int64_t b = first; b < last; ++b) {
      const int64_t n0 = b * kBlock, outputs = std::min<int64_t>(kBlock, n - n0);
      const uint8_t* wb = w + b * groups * kGroupBytes;
      for (int64_t r = 0; r < m; r += 6) {  // the block's weights stay in L2 across rows
        const int8_t* xr = q + r * k;
        const float *dr = d + r * groups, *sr = ds + r * groups;
        const int64_t count = std::min<int64_t>(6, m - r);
        switch (count) {
          case 1: rows<1>(xr, k, dr, sr, groups, wb, tile, kBlock, outputs); break;
          case 2: rows<2>(xr, k, dr, sr, groups, wb, tile, kBlock, outputs); break;
          case 3: rows<3>(xr, k, dr, sr, groups, wb, tile, kBlock, outputs); break;
          case 4: rows<4>(xr, k, dr, sr, groups, wb, tile, kBlock, outputs); break;
          case 5: rows<5>(xr, k, dr, sr, groups, wb, tile, kBlock, outputs); break;
          default: rows<6>(xr, k, dr, sr, groups, wb, tile, kBlock, outputs); break;
        }
        store(tile, count, outputs, out + r * n + n0, n);
      }
    }
  });
}

}  // namespace

// x [..., K] fp32 or bf16 times the packed weights: y [..., n] in x's dtype
at::Tensor product4(const at::Tensor& x, const at::Tensor& packed, int64_t n, int64_t k) {
  return product_with(x, packed, n, k, kGroupBytes,
                      [&](const auto* in, int64_t lda, int64_t m, auto* out) {
                        product(in, lda, m, packed, n, k, out);
                      });
}

// The weights of outputs [first, first + 64 * blocks) as bf16, transposed, into `wt` [k, >= 64 *
// blocks] (q * scale + offset in fp32, rounded to nearest even), for oneDNN's bf16 GEMM on a
// prompt's rows, AMX tiles where the CPU has them. Lane l of a register holds four inputs of
// output l, so an input's 16 outputs are a shift and a mask away: no transposition in memory.
// The caller's row stride should not be a multiple of 4 KiB: the 32 inputs of a register would
// all land in one L1 set.
void widen4(const at::Tensor& packed, int64_t k, int64_t first, int64_t blocks, at::Tensor wt) {
  const int64_t groups = k / kGroup;
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.dim() == 3 &&
              k % kGroup == 0 && packed.size(1) == groups && packed.size(2) == kGroupBytes &&
              first >= 0 && first % kBlock == 0 && blocks >= 0 &&
              first / kBlock + blocks <= packed.size(0),
              "packed: from pack4; first a multiple of 64 and the blocks within it");
  TORCH_CHECK(wt.scalar_type() == at::kBFloat16 && wt.dim() == 2 && wt.size(0) == k &&
              wt.size(1) >= blocks * kBlock && wt.stride(1) == 1, "wt: [k, >= 64 * blocks] bf16");
  const int64_t stride = wt.stride(0);
  auto* out = reinterpret_cast<uint16_t*>(wt.data_ptr<at::BFloat16>());
  const uint8_t* w = packed.data_ptr<uint8_t>() + first / kBlock * groups * kGroupBytes;
  at::parallel_for(0, blocks * groups, 16, [&](int64_t begin, int64_t end) {
    const __m512i nibble = _mm512_set1_epi32(0x0F), one = _mm512_set1_epi32(1);
    const __m512i half_ulp = _mm512_set1_epi32(0x7FFF);
    for (int64_t bg = begin; bg < end; ++bg) {
      const int64_t b = bg / groups, g = bg % groups;
      const uint8_t* wg = w + bg * kGroupBytes;
      for (int j = 0; j < 4; ++j) {
        const __m512 scale = halves(wg + kCodeBytes + j * 32);
        const __m512 offset = halves(wg + kCodeBytes + kBlock * 2 + j * 32);
        uint16_t* column = out + g * kGroup * stride + b * kBlock + j * 16;
        for (int o = 0; o < 4; ++o) {
          const __m512i v = _mm512_load_si512(wg + o * 256 + j * 64);
          for (int i = 0; i < 8; ++i) {  // input o * 8 + i: byte i % 4, the high nibble from 4
            const int shift = 8 * (i % 4) + 4 * (i / 4);
            const __m512i q = _mm512_and_si512(_mm512_srli_epi32(v, shift), nibble);
            const __m512i bits =
                _mm512_castps_si512(_mm512_fmadd_ps(_mm512_cvtepi32_ps(q), scale, offset));
            const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), one);
            const __m512i rounded =
                _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(bits, half_ulp), lsb), 16);
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(column + (o * 8 + i) * stride),
                                _mm512_cvtepi32_epi16(rounded));
          }
        }
      }
    }
  });
}

TORCH_LIBRARY_FRAGMENT(tdllm_avx512, m) {
  m.def("pack4(Tensor codes, Tensor scales, Tensor offsets) -> Tensor");
  m.def("unpack4(Tensor packed, int n, int k) -> (Tensor, Tensor, Tensor)");
  m.def("w4a8(Tensor x, Tensor packed, int n, int k) -> Tensor");
  m.def("widen4(Tensor packed, int k, int first, int blocks, Tensor(a!) wt) -> ()");
}

TORCH_LIBRARY_IMPL(tdllm_avx512, CPU, m) {
  m.impl("pack4", &pack4);
  m.impl("unpack4", &unpack4);
  m.impl("w4a8", &product4);
  m.impl("widen4", &widen4);
}
