// The AVX2 products (int_avx2.cpp's comment has the arithmetic): the rounding of a row's inputs
// to int8 per 32 (`round_row`) and the product of rows with a block of 64 outputs (`block`), in
// the three forms of the layout (int4 with offsets, symmetric int4, int8). Shared by the ops of
// int_avx2.cpp and the decode block of decode_block_avx2.cpp, so both run the same kernel;
// internal linkage, as w4a8_layout.h.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "w4a8_layout.h"

namespace {
constexpr int64_t kAhead = 5120;  // bytes prefetched ahead in a block's stream
constexpr int kRows = 4;          // rows sharing each load of the weights (6: no faster)

inline __m256 halves(const uint8_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

inline __m256i quad(const int8_t* x) {
  int32_t bits;
  std::memcpy(&bits, x, 4);
  return _mm256_set1_epi32(bits);
}

// y rows [0, R) (ldy apart), the 64 outputs of one block (eight registers of 8): R rows share
// every load of the block's stream. Each row's eight broadcast quads of a group are made once
// and read from L1 by the eight registers' products (a broadcast per product ran 1.3x slower
// at 4 rows); the compiler keeps what accumulators it can in registers.
// a block's bytes per group: codes, 64 fp16 scales, and 64 fp16 offsets where the form has them
// (int4's asymmetric; int8 and symmetric int4 have none)
template <int Bits, bool Offsets>
constexpr int64_t group_bytes() {
  return kBlock * kGroup * Bits / 8 + kBlock * 2 * (Offsets ? 2 : 1);
}

template <int R, int Bits, bool Offsets>
void block(const int8_t* xq, int64_t lda, const float* dx, const float* dsum, int64_t groups,
           const uint8_t* w, float* y, int64_t ldy) {
  constexpr int64_t code_bytes = kBlock * kGroup * Bits / 8;
  constexpr int64_t bytes = group_bytes<Bits, Offsets>();
  __m256 acc[R][8];
  for (int m = 0; m < R; ++m)
    for (int j = 0; j < 8; ++j) acc[m][j] = _mm256_setzero_ps();
  const __m256i nibble = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* wg = w + g * bytes;
    for (int64_t line = 0; line < bytes; line += 64)
      _mm_prefetch(reinterpret_cast<const char*>(wg + kAhead + line), _MM_HINT_T0);
    alignas(32) __m256i quads[R][8];  // inputs 4i..4i+3 of the group in every lane
    for (int m = 0; m < R; ++m)
      for (int i = 0; i < 8; ++i) quads[m][i] = quad(xq + m * lda + g * kGroup + i * 4);
    for (int j = 0; j < 8; ++j) {
      __m256i dot[R];  // int4: int16 sums of the group's products; int8: int32 sums
      for (int m = 0; m < R; ++m) dot[m] = _mm256_setzero_si256();
      for (int c = 0; c < Bits; ++c) {  // a chunk of 256 bytes: 4 inputs a nibble (int4) or byte
        const __m256i v =
            _mm256_load_si256(reinterpret_cast<const __m256i*>(wg + c * 256 + j * 32));
        if (Bits == 4) {  // inputs 8c..8c+3 in the low nibbles, 8c+4..8c+7 in the high
          const __m256i lo = _mm256_and_si256(v, nibble);
          const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
          for (int m = 0; m < R; ++m) {
            dot[m] = _mm256_add_epi16(dot[m], _mm256_maddubs_epi16(lo, quads[m][2 * c]));
            dot[m] = _mm256_add_epi16(dot[m], _mm256_maddubs_epi16(hi, quads[m][2 * c + 1]));
          }
        } else {  // inputs 4c..4c+3, s8 codes: |q| (u8) times the inputs signed as q
          const __m256i size = _mm256_abs_epi8(v);
          for (int m = 0; m < R; ++m) {
            const __m256i pairs = _mm256_maddubs_epi16(size, _mm256_sign_epi8(quads[m][c], v));
            dot[m] = _mm256_add_epi32(dot[m], _mm256_madd_epi16(pairs, ones));
          }
        }
      }
      const __m256 scale = halves(wg + code_bytes + j * 16);
      // int4's offset (symmetric: -8 scale, the value the stored one would have); int8 has none
      const __m256 offset = Offsets ? halves(wg + code_bytes + kBlock * 2 + j * 16)
                                    : _mm256_mul_ps(scale, _mm256_set1_ps(-8.0f));
      for (int m = 0; m < R; ++m) {
        const __m256 s = _mm256_mul_ps(scale, _mm256_set1_ps(dx[m * groups + g]));
        const __m256i sum32 = Bits == 4 ? _mm256_madd_epi16(dot[m], ones) : dot[m];
        const __m256 sum = _mm256_cvtepi32_ps(sum32);
        acc[m][j] = _mm256_fmadd_ps(sum, s, acc[m][j]);
        if (Bits == 4)
          acc[m][j] = _mm256_fmadd_ps(offset, _mm256_set1_ps(dsum[m * groups + g]), acc[m][j]);
      }
    }
  }
  for (int m = 0; m < R; ++m)
    for (int j = 0; j < 8; ++j) _mm256_storeu_ps(y + m * ldy + 8 * j, acc[m][j]);
}

// 8 inputs as fp32: bf16 widens exactly (its bits are fp32's upper half)
inline __m256 load8(const float* x) { return _mm256_loadu_ps(x); }
inline __m256 load8(const uint16_t* x) {
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}

inline float max8(__m256 v) {
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_max_ss(h, _mm_shuffle_ps(h, h, 1)));
}

inline int32_t sum8(__m256i v) {
  __m128i h = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4E));
  return _mm_cvtsi128_si32(_mm_add_epi32(h, _mm_shuffle_epi32(h, 0xB1)));
}

// one row's groups of 32, as the AVX-512 kernel rounds them: xq = round(x / dx) (to nearest,
// ties to even), dx = max|x| / 127 (a zero group: dx = 0, xq = 0), dsum = dx * sum(xq); a NaN
// in a group makes dx NaN, so the row's outputs are NaN as a float product's would be
template <typename T>
void round_row(const T* x, int64_t groups, int8_t* xq, float* dx, float* dsum) {
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t g = 0; g < groups; ++g) {
    __m256 v[4];
    for (int i = 0; i < 4; ++i) v[i] = load8(x + g * kGroup + 8 * i);
    const __m256 most8 = _mm256_max_ps(
        _mm256_max_ps(_mm256_and_ps(v[0], magnitude), _mm256_and_ps(v[1], magnitude)),
        _mm256_max_ps(_mm256_and_ps(v[2], magnitude), _mm256_and_ps(v[3], magnitude)));
    float most = max8(most8);
    const __m256 nan = _mm256_or_ps(_mm256_cmp_ps(v[0], v[1], _CMP_UNORD_Q),
                                    _mm256_cmp_ps(v[2], v[3], _CMP_UNORD_Q));
    if (_mm256_movemask_ps(nan)) most = std::numeric_limits<float>::quiet_NaN();
    const float inverse = most > 0 ? 127.0f / most : 0.0f;
    const __m256 by = _mm256_set1_ps(inverse);
    __m256i q[4];
    for (int i = 0; i < 4; ++i) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], by));
    // int32 -> int8 with saturation, as VPMOVSDB does; the packs interleave 128-bit lanes
    const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]),
                                             _mm256_packs_epi32(q[2], q[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(xq + g * kGroup),
                        _mm256_permutevar8x32_epi32(bytes, order));
    dx[g] = most / 127.0f;
    const __m256i total = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]),
                                           _mm256_add_epi32(q[2], q[3]));
    dsum[g] = dx[g] * static_cast<float>(sum8(total));
  }
}

// fp32 -> bf16 bits, to nearest even as torch's cast rounds (a NaN becomes 0xFFFF)
inline uint16_t bf16_bits(float v) {
  if (std::isnan(v)) return 0xFFFF;
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  return static_cast<uint16_t>((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}

// a block's fp32 outputs (rows of `tile`, 64 apart) into rows of y (ldy apart), in y's dtype
inline void store(const float* tile, int64_t rows, int64_t outputs, float* y, int64_t ldy) {
  for (int64_t r = 0; r < rows; ++r) std::copy_n(tile + r * kBlock, outputs, y + r * ldy);
}
inline void store(const float* tile, int64_t rows, int64_t outputs, uint16_t* y, int64_t ldy) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t o = 0; o < outputs; ++o) y[r * ldy + o] = bf16_bits(tile[r * kBlock + o]);
}

// x [M, K] rows of T (fp32 or bf16 bits) times the packed weights into y [M, n] of T
template <int Bits, bool Offsets, typename T>
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
    alignas(32) float tile[kRows * kBlock];  // a block's outputs for up to kRows rows
    for (int64_t b = first; b < last; ++b) {
      const int64_t n0 = b * kBlock, outputs = std::min<int64_t>(kBlock, n - n0);
      const uint8_t* wb = w + b * groups * group_bytes<Bits, Offsets>();
      for (int64_t r = 0; r < m; r += kRows) {  // the block's weights stay in L2 across rows
        const int8_t* xr = q + r * k;
        const float *dr = d + r * groups, *sr = ds + r * groups;
        const int64_t count = std::min<int64_t>(kRows, m - r);
        switch (count) {
          case 1: block<1, Bits, Offsets>(xr, k, dr, sr, groups, wb, tile, kBlock); break;
          case 2: block<2, Bits, Offsets>(xr, k, dr, sr, groups, wb, tile, kBlock); break;
          case 3: block<3, Bits, Offsets>(xr, k, dr, sr, groups, wb, tile, kBlock); break;
          default: block<4, Bits, Offsets>(xr, k, dr, sr, groups, wb, tile, kBlock); break;
        }
        store(tile, count, outputs, out + r * n + n0, n);
      }
    }
  });
}

}  // namespace
