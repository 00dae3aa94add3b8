// One decode step of one Llama block in one call (`tdllm.model.one_call_block`): RMSNorm, the
// fused q/k/v product, RoPE, the key and value written into the cache, attention of each row's
// one query over its slot's keys, the o product and residual, RMSNorm, the gate/up product,
// SwiGLU, the down product and residual; fp32 rows, the projections in any form of our AVX2
// layout (int4 with offsets, symmetric int4, int8: told apart by a group's bytes).
//
// Why: on a CPU without AVX-512 a decode step of a small model is bound by the ~160 eager ops a
// block costs (~2.5 us each, docs/performance.md "One call a block"), not by its weights; the
// products here are int_avx2.cpp's own (int_avx2_product.h), so only the glue between them
// moves from torch's ops to these loops. The arithmetic is the eager block's, in fp32, except
// for summation orders (the norm's mean, the attention's softmax and sums): not the same bits,
// tested against the eager block within rounding.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "int_avx2_product.h"
#include "w4a8_layout.h"

// a * b + c stays two roundings, as torch's separate ops give them (-O3 would fuse it into FMA)
#pragma GCC optimize("fp-contract=off")

namespace {

constexpr int64_t kMaxHeadDim = 256;

// y [m, n] = x [m, k] (fp32 rows, k apart) times `packed` in whichever form it holds
void project(const float* x, int64_t m, const at::Tensor& packed, int64_t n, int64_t k, float* y) {
  const int64_t bytes = packed.size(2);
  if (bytes == group_bytes<4, true>())
    product<4, true>(x, k, m, packed, n, k, y);
  else if (bytes == group_bytes<4, false>())
    product<4, false>(x, k, m, packed, n, k, y);
  else
    product<8, false>(x, k, m, packed, n, k, y);
}

void check_projection(const at::Tensor& packed, int64_t n, int64_t k, const char* name) {
  TORCH_CHECK(holds(packed, n, k, group_bytes<4, true>()) ||
                  holds(packed, n, k, group_bytes<4, false>()) ||
                  holds(packed, n, k, group_bytes<8, false>()),
              name, ": not a packed AVX2 projection of ", n, " outputs and ", k, " inputs");
}

inline float hsum(__m256 v) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps(h, h, 1)));
}

inline float dot(const float* a, const float* b, int64_t d) {  // d a multiple of 8
  __m256 acc = _mm256_setzero_ps();
  for (int64_t i = 0; i < d; i += 8)
    acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  return hsum(acc);
}

// out = weight * (x * rsqrt(mean(x^2) + eps)), RMSNorm's order (tdllm.model.rms_norm)
void rms_norm(const float* x, const float* weight, float eps, int64_t d, float* out) {
  const float r = 1.0f / std::sqrt(dot(x, x, d) / static_cast<float>(d) + eps);
  for (int64_t i = 0; i < d; ++i) out[i] = weight[i] * (x[i] * r);
}

// one head in place: x * cos + roll(x, d/2) * signed_sin (`tdllm.model.rotary.rotate`)
void rotate(float* x, const float* cos, const float* signed_sin, int64_t d, float* scratch) {
  std::copy_n(x, d, scratch);
  const int64_t half = d / 2;
  for (int64_t i = 0; i < d; ++i) {
    const float a = scratch[i] * cos[i], b = scratch[(i + half) % d] * signed_sin[i];
    x[i] = a + b;
  }
}

// one query head over keys/values [0, n) of its key head (rows of d, d apart): softmax(q.k /
// sqrt(d)) . v into out
void attend(const float* q, const float* keys, const float* values, int64_t n, int64_t d,
            float* scores, float* out) {
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  float most = -INFINITY;
  for (int64_t j = 0; j < n; ++j) {
    scores[j] = dot(q, keys + j * d, d) * scale;
    most = std::max(most, scores[j]);
  }
  float total = 0.0f;
  for (int64_t j = 0; j < n; ++j) total += scores[j] = std::exp(scores[j] - most);
  __m256 acc[kMaxHeadDim / 8];  // the output, 8 lanes a register, summed over the values' rows
  const int64_t lanes = d / 8;
  for (int64_t i = 0; i < lanes; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    const __m256 p = _mm256_set1_ps(scores[j]);
    for (int64_t i = 0; i < lanes; ++i)
      acc[i] = _mm256_fmadd_ps(p, _mm256_loadu_ps(values + j * d + 8 * i), acc[i]);
  }
  const __m256 sum = _mm256_set1_ps(total);
  for (int64_t i = 0; i < lanes; ++i) _mm256_storeu_ps(out + 8 * i, _mm256_div_ps(acc[i], sum));
}

// x [B, 1, hidden] fp32: each row one token of the sequence in cache slot slots[b] at position
// positions[b] (its key and value are written there; it attends to positions 0..positions[b]);
// cos, signed_sin [B, 1, 1, head_dim]: the rows' RoPE tables; caches [slots, kv_heads, len,
// head_dim] fp32. Returns the block's output, [B, 1, hidden].
at::Tensor decode_block(const at::Tensor& x, const at::Tensor& slots, const at::Tensor& positions,
                        const at::Tensor& cos, const at::Tensor& signed_sin,
                        const at::Tensor& norm1, const at::Tensor& norm2, double eps,
                        const at::Tensor& qkv, const at::Tensor& o, const at::Tensor& gate_up,
                        const at::Tensor& down, int64_t heads, int64_t kv_heads,
                        int64_t intermediate, at::Tensor k_cache, at::Tensor v_cache) {
  TORCH_CHECK(x.dim() == 3 && x.size(1) == 1 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "x: [B, 1, hidden] contiguous fp32");
  const int64_t rows = x.size(0), hidden = x.size(2);
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.scalar_type() == at::kFloat &&
              k_cache.is_contiguous() && v_cache.sizes() == k_cache.sizes() &&
              v_cache.scalar_type() == at::kFloat && v_cache.is_contiguous() &&
              kv_heads > 0 && k_cache.size(1) == kv_heads && heads % kv_heads == 0,
              "caches: [slots, kv_heads, len, head_dim] contiguous fp32");
  const int64_t d = k_cache.size(3), length = k_cache.size(2);
  TORCH_CHECK(d > 0 && d % 8 == 0 && d <= kMaxHeadDim && cos.numel() == rows * d &&
              signed_sin.numel() == rows * d &&
              cos.scalar_type() == at::kFloat && signed_sin.scalar_type() == at::kFloat &&
              cos.is_contiguous() && signed_sin.is_contiguous(),
              "cos, signed_sin: [B, 1, 1, head_dim] fp32, head_dim a multiple of 8 up to 256");
  TORCH_CHECK(norm1.numel() == hidden && norm2.numel() == hidden &&
              norm1.scalar_type() == at::kFloat && norm2.scalar_type() == at::kFloat &&
              norm1.is_contiguous() && norm2.is_contiguous(), "norms: [hidden] fp32");
  const at::Tensor slot = slots.to(at::kLong).contiguous().view(-1);
  const at::Tensor position = positions.to(at::kLong).contiguous().view(-1);
  TORCH_CHECK(slot.numel() == rows && position.numel() == rows, "slots, positions: one a row");
  const int64_t* sp = slot.data_ptr<int64_t>();
  const int64_t* pp = position.data_ptr<int64_t>();
  for (int64_t b = 0; b < rows; ++b)
    TORCH_CHECK_INDEX(sp[b] >= 0 && sp[b] < k_cache.size(0) && pp[b] >= 0 && pp[b] < length,
                      "row ", b, ": slot ", sp[b], " position ", pp[b], " outside the cache");
  const int64_t q_size = heads * d, kv_size = kv_heads * d, fused = q_size + 2 * kv_size;
  check_projection(qkv, fused, hidden, "qkv");
  check_projection(o, hidden, q_size, "o");
  check_projection(gate_up, 2 * intermediate, hidden, "gate_up");
  check_projection(down, hidden, intermediate, "down");

  at::Tensor out = at::empty_like(x);
  // scratch: normed rows, q/k/v, attention, o and down outputs, gate/up, SwiGLU
  at::Tensor work =
      at::empty({rows * (2 * hidden + fused + q_size + 3 * intermediate)}, at::kFloat);
  float* normed = work.data_ptr<float>();
  float* heads_out = normed + rows * hidden;
  float* attention = heads_out + rows * fused;
  float* projected = attention + rows * q_size;
  float* gate = projected + rows * hidden;
  float* act = gate + rows * 2 * intermediate;
  const float* xp = x.data_ptr<float>();
  float* yp = out.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* ssp = signed_sin.data_ptr<float>();
  float* kc = k_cache.data_ptr<float>();
  float* vc = v_cache.data_ptr<float>();
  const float e = static_cast<float>(eps);

  for (int64_t b = 0; b < rows; ++b)
    rms_norm(xp + b * hidden, norm1.data_ptr<float>(), e, hidden, normed + b * hidden);
  project(normed, rows, qkv, fused, hidden, heads_out);
  std::vector<float> scratch(d);
  for (int64_t b = 0; b < rows; ++b) {  // RoPE on q and k, then k and v into the cache
    float* row = heads_out + b * fused;
    for (int64_t h = 0; h < heads + kv_heads; ++h)
      rotate(row + h * d, cp + b * d, ssp + b * d, d, scratch.data());
    for (int64_t g = 0; g < kv_heads; ++g) {
      const int64_t at = ((sp[b] * kv_heads + g) * length + pp[b]) * d;
      std::copy_n(row + q_size + g * d, d, kc + at);
      std::copy_n(row + q_size + kv_size + g * d, d, vc + at);
    }
  }
  // each (row, query head) on its own: a thread takes whole heads once the spans are long
  const int64_t per_kv = heads / kv_heads, longest = *std::max_element(pp, pp + rows) + 1;
  at::parallel_for(0, rows * heads, std::max<int64_t>(1, 16384 / (longest * d)),
                   [&](int64_t first, int64_t last) {
    std::vector<float> scores(longest);
    for (int64_t t = first; t < last; ++t) {
      const int64_t b = t / heads, h = t % heads, g = h / per_kv;
      const int64_t base = (sp[b] * kv_heads + g) * length * d;
      attend(heads_out + b * fused + h * d, kc + base, vc + base, pp[b] + 1, d, scores.data(),
             attention + b * q_size + h * d);
    }
  });
  project(attention, rows, o, hidden, q_size, projected);
  for (int64_t i = 0; i < rows * hidden; ++i) yp[i] = xp[i] + projected[i];  // x1 into out
  for (int64_t b = 0; b < rows; ++b)
    rms_norm(yp + b * hidden, norm2.data_ptr<float>(), e, hidden, normed + b * hidden);
  project(normed, rows, gate_up, 2 * intermediate, hidden, gate);
  for (int64_t b = 0; b < rows; ++b)
    for (int64_t i = 0; i < intermediate; ++i) {
      const float g = gate[b * 2 * intermediate + i];
      const float u = gate[b * 2 * intermediate + intermediate + i];
      act[b * intermediate + i] = g / (1.0f + std::exp(-g)) * u;
    }
  project(act, rows, down, hidden, intermediate, projected);
  for (int64_t i = 0; i < rows * hidden; ++i) yp[i] += projected[i];
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tdllm_avx2, m) {
  m.def(
      "decode_block(Tensor x, Tensor slots, Tensor positions, Tensor cos, Tensor signed_sin, "
      "Tensor norm1, Tensor norm2, float eps, Tensor qkv, Tensor o, Tensor gate_up, Tensor down, "
      "int heads, int kv_heads, int intermediate, Tensor(a!) k_cache, Tensor(b!) v_cache) -> "
      "Tensor");
}

TORCH_LIBRARY_IMPL(tdllm_avx2, CPU, m) { m.impl("decode_block", &decode_block); }
