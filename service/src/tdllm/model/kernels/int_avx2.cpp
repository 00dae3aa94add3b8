// Our kernels for a CPU without AVX-512 (an AMD EPYC before Zen 4, an Intel core before Ice
// Lake): int4 or int8 weights with an fp16 scale per 32 inputs (and an offset, for int4 on an
// asymmetric grid), times inputs rounded to int8 per 32.
//
// Why: torch's int4 and int8 kernels read a decode step's weights at 7-13 GB/s on such a CPU
// where the bus gives 28-30 (docs/performance.md, "A CPU without AVX-512").
//
// int4 (`w4a8`): the product of w4a8_avx512.cpp on 256-bit registers and without VNNI, on the
// same layout (w4a8_layout.h), giving the same bits; and on its symmetric form (Q4_0's grid: no
// offsets stored, each -8 scale, exact in fp32): the bits of the offsets it leaves out, from 10%
// fewer bytes. A 32-byte load holds four inputs of eight outputs in each nibble; VPMADDUBSW
// multiplies the u4 codes (u8 lanes) by a broadcast quad of s8 inputs and adds pairs into int16
// lanes. A group's eight such products fit int16 without saturating (8 x 2 x 15 x 128 = 30720 <
// 32767), so they are added in int16 and widened once per group (VPMADDWD by ones): the exact
// int32 sum VPDPBUSD gives, scaled into fp32 by the same two FMAs in the same order as the
// AVX-512 kernel.
//
// int8 (`w8a8g`: `quant: w8a8-avx2`, and `w4a8`'s head here): s8 codes (Q8_0's: w = q * scale)
// in the same blocks of 64 outputs, a group's codes in eight 256-byte chunks (inputs 4i..4i+3 of
// the 64 outputs, a byte an input) then its 64 fp16 scales: 2176 bytes, Q8_0's 34 a 32. VPMADDUBSW
// takes |q| as its unsigned side and the inputs with q's sign (VPSIGNB, llama.cpp's Q8_0 x Q8_0
// on AVX2): a pair sums to at most 2 x 127 x 128, so each is widened at once (VPMADDWD by ones)
// and summed in int32: exact (1.3x the speed of splitting u8 codes into nibbles at 4-8 rows).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <tuple>

#include "int_avx2_product.h"
#include "w4a8_layout.h"

namespace {

template <int Bits, bool Offsets>
at::Tensor product_of(const at::Tensor& x, const at::Tensor& packed, int64_t n, int64_t k) {
  return product_with(x, packed, n, k, group_bytes<Bits, Offsets>(),
                      [&](const auto* in, int64_t lda, int64_t m, auto* out) {
                        product<Bits, Offsets>(in, lda, m, packed, n, k, out);
                      });
}

// int4 in either form of the layout, told apart by a group's bytes (product_with checks them)
at::Tensor w4a8(const at::Tensor& x, const at::Tensor& packed, int64_t n, int64_t k) {
  if (packed.dim() == 3 && packed.size(2) == kSymmetricGroupBytes)
    return product_of<4, false>(x, packed, n, k);
  return product_of<4, true>(x, packed, n, k);
}

// the symmetric form: w = (q - 8) * scale (the caller checks that the scales fit fp16)
at::Tensor pack4s(const at::Tensor& codes, const at::Tensor& scales) {
  return pack4(codes, scales, at::Tensor());
}

constexpr int64_t kInt8Bytes = group_bytes<8, false>(), kInt8CodeBytes = kBlock * kGroup;

// rows [first, first + R) of the int8 layout `packed` ([ceil(N/64), K/32, 2176] u8, zeros past
// N) from codes [R, K] s8 and scales [R, K/32] fp32 (w = q * scale): a projection is packed as
// its rows arrive, with no staged copy of the whole (the caller checks fp16's range)
void pack8_into(at::Tensor packed, int64_t first, const at::Tensor& codes,
                const at::Tensor& scales) {
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kChar && codes.size(1) % kGroup == 0,
              "codes: [R, K] int8, K a multiple of 32");
  const int64_t r = codes.size(0), k = codes.size(1), groups = k / kGroup;
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.dim() == 3 &&
              packed.size(1) == groups && packed.size(2) == kInt8Bytes && first >= 0 &&
              first + r <= packed.size(0) * kBlock,
              "packed: [blocks, K/32, 2176] u8 holding the rows");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.dim() == 2 && scales.size(0) == r &&
              scales.size(1) == groups, "scales: [R, K/32] fp32");
  const at::Tensor c = codes.contiguous(), s = scales.contiguous();
  const auto* cp = reinterpret_cast<const uint8_t*>(c.data_ptr<int8_t>());
  const float* sp = s.data_ptr<float>();
  uint8_t* out = packed.data_ptr<uint8_t>();
  at::parallel_for(0, r, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t row = first + i, b = row / kBlock, lane = row % kBlock;
      for (int64_t g = 0; g < groups; ++g) {
        uint8_t* dst = out + (b * groups + g) * kInt8Bytes;
        const uint8_t* src = cp + i * k + g * kGroup;
        for (int chunk = 0; chunk < 8; ++chunk)
          std::memcpy(dst + chunk * 256 + lane * 4, src + chunk * 4, 4);
        reinterpret_cast<c10::Half*>(dst + kInt8CodeBytes)[lane] = c10::Half(sp[i * groups + g]);
      }
    }
  });
}

void check_int8_layout(const at::Tensor& packed, int64_t n, int64_t k) {
  TORCH_CHECK(holds(packed, n, k, kInt8Bytes), "packed: from pack8_into");
}

// the code and scale of row `row`, group `g` (s8 codes: chunk c's four at q(c)[0..3])
struct Int8Group {
  const uint8_t* group;
  int64_t lane;
  const int8_t* quad(int chunk) const {
    return reinterpret_cast<const int8_t*>(group + chunk * 256 + lane * 4);
  }
  float scale() const {
    return static_cast<float>(reinterpret_cast<const c10::Half*>(group + kInt8CodeBytes)[lane]);
  }
};

inline Int8Group int8_group(const uint8_t* packed, int64_t groups, int64_t row, int64_t g) {
  return {packed + (row / kBlock * groups + g) * kInt8Bytes, row % kBlock};
}

// packed -> (codes [n, k] s8, scales [n, k/32] fp32): for checks
std::tuple<at::Tensor, at::Tensor> unpack8(const at::Tensor& packed, int64_t n, int64_t k) {
  check_int8_layout(packed, n, k);
  const int64_t groups = k / kGroup;
  at::Tensor codes = at::empty({n, k}, at::kChar), scales = at::empty({n, groups}, at::kFloat);
  int8_t* c = codes.data_ptr<int8_t>();
  float* s = scales.data_ptr<float>();
  for (int64_t row = 0; row < n; ++row)
    for (int64_t g = 0; g < groups; ++g) {
      const Int8Group group = int8_group(packed.data_ptr<uint8_t>(), groups, row, g);
      for (int chunk = 0; chunk < 8; ++chunk)
        std::memcpy(c + row * k + g * kGroup + chunk * 4, group.quad(chunk), 4);
      s[row * groups + g] = group.scale();
    }
  return {codes, scales};
}

// rows `rows` ([T] int64, each in [0, n): IndexError otherwise) of the int8 layout, decoded to
// fp32 [T, k]: q * scale, a Q8_0 block's d * q exactly, as a tied head packed from the
// embedding's blocks holds them (the embedding read from the head, `head_embedding.py`)
at::Tensor rows8(const at::Tensor& packed, const at::Tensor& rows, int64_t n, int64_t k) {
  check_int8_layout(packed, n, k);
  TORCH_CHECK(rows.scalar_type() == at::kLong && rows.dim() == 1, "rows: [T] int64");
  const at::Tensor r = rows.contiguous();
  const int64_t* ids = r.data_ptr<int64_t>();
  const int64_t t = r.size(0), groups = k / kGroup;
  for (int64_t i = 0; i < t; ++i)
    TORCH_CHECK_INDEX(ids[i] >= 0 && ids[i] < n, "row ", ids[i], " outside ", n, " rows");
  at::Tensor out = at::empty({t, k}, at::kFloat);
  float* dst = out.data_ptr<float>();
  for (int64_t i = 0; i < t; ++i)
    for (int64_t g = 0; g < groups; ++g) {
      const Int8Group group = int8_group(packed.data_ptr<uint8_t>(), groups, ids[i], g);
      const float scale = group.scale();
      float* o = dst + i * k + g * kGroup;
      for (int chunk = 0; chunk < 8; ++chunk)
        for (int j = 0; j < 4; ++j) o[chunk * 4 + j] = float(group.quad(chunk)[j]) * scale;
    }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tdllm_avx2, m) {
  m.def("pack4(Tensor codes, Tensor scales, Tensor offsets) -> Tensor");
  m.def("pack4s(Tensor codes, Tensor scales) -> Tensor");
  m.def("unpack4(Tensor packed, int n, int k) -> (Tensor, Tensor, Tensor)");
  m.def("w4a8(Tensor x, Tensor packed, int n, int k) -> Tensor");
  m.def("pack8_into(Tensor(a!) packed, int first, Tensor codes, Tensor scales) -> ()");
  m.def("unpack8(Tensor packed, int n, int k) -> (Tensor, Tensor)");
  m.def("w8a8g(Tensor x, Tensor packed, int n, int k) -> Tensor");
  m.def("rows8(Tensor packed, Tensor rows, int n, int k) -> Tensor");
}

TORCH_LIBRARY_IMPL(tdllm_avx2, CPU, m) {
  m.impl("pack4", &pack4);
  m.impl("pack4s", &pack4s);
  m.impl("unpack4", &unpack4);
  m.impl("w4a8", &w4a8);
  m.impl("pack8_into", &pack8_into);
  m.impl("unpack8", &unpack8);
  m.impl("w8a8g", &product_of<8, false>);
  m.impl("rows8", &rows8);
}
