// Kernels for a decode step's few token rows on a CPU, float32 or bfloat16 weights (seekstack/model/cpu_kernels.py
// says why and when). A few rows are bound by the weight bytes read, not by FLOPs: every weight row is loaded once for
// all rows. bfloat16 weights halve those bytes. Where the CPU has avx512_bf16, bfloat16 weights meet bfloat16 inputs
// in vdpbf16ps: 32 exact products an instruction, summed in pairs into float32 lanes; elsewhere each bfloat16 weight
// is widened to float32 as it is loaded (its 16 bits are a float32's high half), and the products and sums are
// float32 (AVX2 + FMA, 8 products an instruction, or plain loops).
// Shapes: N tokens, K experts per token, P = N*K (token, expert) pairs, E experts, D hidden, I expert width.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define SEEKSTACK_BF16_DOT 1
#endif

namespace {

constexpr int64_t kRowsPerLoad = 4;  // token rows that share each load of a weight row (8 measured no faster)

using bf16_bits = uint16_t;  // a bfloat16 value as stored

inline float widened(float w) { return w; }
inline float widened(bf16_bits w) {
  const uint32_t bits = static_cast<uint32_t>(w) << 16;
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

// `value` as the kernels' input type X: itself, or rounded to the nearest bfloat16 (ties to even, as torch rounds).
template <typename X>
inline X as_input(float value);
template <>
inline float as_input<float>(float value) { return value; }
template <>
inline bf16_bits as_input<bf16_bits>(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<bf16_bits>((bits >> 16) | 0x40u);  // NaN stays NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<bf16_bits>(bits >> 16);
}

// The vector instructions for weights of type W times inputs of type X: kLanes products a step, or 0 (plain loops).
template <typename W, typename X>
struct Vectors {
  static constexpr int64_t kLanes = 0;
};

#if defined(__AVX2__) && defined(__FMA__)
inline __m256 load8(const float* w) { return _mm256_loadu_ps(w); }
inline __m256 load8(const bf16_bits* w) {
  const __m128i halves = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(halves), 16));
}

template <typename W>
struct Vectors<W, float> {  // float32 inputs; float32 weights, or bfloat16 ones widened as loaded
  static constexpr int64_t kLanes = 8;
  using Acc = __m256;
  using Operand = __m256;
  static Acc zero() { return _mm256_setzero_ps(); }
  static Operand load(const W* w) { return load8(w); }
  static Operand load_input(const float* x) { return _mm256_loadu_ps(x); }
  static Acc fma(Operand w, Operand x, Acc acc) { return _mm256_fmadd_ps(w, x, acc); }
  static float sum(Acc acc) {
    __m128 half = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    half = _mm_hadd_ps(half, half);
    return _mm_cvtss_f32(_mm_hadd_ps(half, half));
  }
};
#endif

#ifdef SEEKSTACK_BF16_DOT
template <>
struct Vectors<bf16_bits, bf16_bits> {  // bfloat16 weights and inputs: vdpbf16ps (2x the bytes per second of widening)
  static constexpr int64_t kLanes = 32;
  using Acc = __m512;
  using Operand = __m512bh;
  static Acc zero() { return _mm512_setzero_ps(); }
  static Operand load(const bf16_bits* w) { return reinterpret_cast<__m512bh>(_mm512_loadu_si512(w)); }
  static Operand load_input(const bf16_bits* x) { return load(x); }
  static Acc fma(Operand w, Operand x, Acc acc) { return _mm512_dpbf16_ps(acc, w, x); }
  static float sum(Acc acc) { return _mm512_reduce_add_ps(acc); }
};
using BF16Input = bf16_bits;  // what bfloat16 weights take as inputs here
#else
using BF16Input = float;
#endif

// outputs[r][j] = dot(weight_row, inputs[r]) for R rows; R a constant, so that the accumulators stay in registers.
template <int R, typename W, typename X>
inline void dot_rows(const W* weight_row, int64_t in_features, const X* const* inputs, float* const* outputs,
                     int64_t j) {
  using V = Vectors<W, X>;
  float sums[R] = {};
  int64_t d = 0;
  if constexpr (V::kLanes > 0) {
    typename V::Acc acc[R];
    for (int r = 0; r < R; ++r) acc[r] = V::zero();
    for (; d + V::kLanes <= in_features; d += V::kLanes) {
      const auto w = V::load(weight_row + d);
      for (int r = 0; r < R; ++r) acc[r] = V::fma(w, V::load_input(inputs[r] + d), acc[r]);
    }
    for (int r = 0; r < R; ++r) sums[r] = V::sum(acc[r]);
  }
  for (int r = 0; r < R; ++r) {
    for (int64_t tail = d; tail < in_features; ++tail) sums[r] += widened(weight_row[tail]) * widened(inputs[r][tail]);
    outputs[r][j] = sums[r];
  }
}

// outputs[r][j] = dot(weight[j, :], inputs[r]) for first <= j < last, r < rows; weight is (out_features, in_features).
// Each weight row is read from memory once: the row blocks after the first find it in L1.
template <typename W, typename X>
void rows_times_weight_rows(const W* weight, int64_t first, int64_t last, int64_t in_features,
                            const X* const* inputs, float* const* outputs, int64_t rows) {
  for (int64_t j = first; j < last; ++j) {
    const W* weight_row = weight + j * in_features;
    int64_t row = 0;
    for (; row + kRowsPerLoad <= rows; row += kRowsPerLoad)
      dot_rows<kRowsPerLoad>(weight_row, in_features, inputs + row, outputs + row, j);
    switch (rows - row) {
      case 3: dot_rows<3>(weight_row, in_features, inputs + row, outputs + row, j); break;
      case 2: dot_rows<2>(weight_row, in_features, inputs + row, outputs + row, j); break;
      case 1: dot_rows<1>(weight_row, in_features, inputs + row, outputs + row, j); break;
      default: break;
    }
  }
}

constexpr int kStreams = 4;  // weight rows read side by side from far-apart parts of the matrix
constexpr int kStreamRows = 2;  // token rows per pass over those weight rows

// outputs[r][j + s * part] = dot(weight[j + s * part, :], inputs[r]) for s < kStreams: one load of each token row
// serves kStreams weight rows, each from its own part of W, so that kStreams sequential streams are in flight
// (one core reads several streams faster than one: 1 / 2 / 4 streams 5.0 / 7.7 / 9.8 GB/s on a Zen 3).
template <int R, typename W, typename X>
inline void dot_streams(const W* weight, int64_t part, int64_t in_features, const X* const* inputs,
                        float* const* outputs, int64_t j) {
  using V = Vectors<W, X>;
  float sums[kStreams][R] = {};
  int64_t d = 0;
  const W* w[kStreams];
  for (int s = 0; s < kStreams; ++s) w[s] = weight + (j + s * part) * in_features;
  if constexpr (V::kLanes > 0) {
    typename V::Acc acc[kStreams][R];
    for (int s = 0; s < kStreams; ++s)
      for (int r = 0; r < R; ++r) acc[s][r] = V::zero();
    for (; d + V::kLanes <= in_features; d += V::kLanes) {
      typename V::Operand xs[R];
      for (int r = 0; r < R; ++r) xs[r] = V::load_input(inputs[r] + d);
      for (int s = 0; s < kStreams; ++s) {
        const auto ws = V::load(w[s] + d);
        for (int r = 0; r < R; ++r) acc[s][r] = V::fma(ws, xs[r], acc[s][r]);
      }
    }
    for (int s = 0; s < kStreams; ++s)
      for (int r = 0; r < R; ++r) sums[s][r] = V::sum(acc[s][r]);
  }
  for (int s = 0; s < kStreams; ++s)
    for (int r = 0; r < R; ++r) {
      for (int64_t tail = d; tail < in_features; ++tail) sums[s][r] += widened(w[s][tail]) * widened(inputs[r][tail]);
      outputs[r][j + s * part] = sums[s][r];
    }
}

// outputs[r][j] = dot(weight[j, :], inputs[r]) for j < out_features, r < rows: the weight rows in kStreams equal
// parts read side by side, the last out_features % kStreams rows alone.
template <typename W, typename X>
void rows_times_weight(const W* weight, int64_t out_features, int64_t in_features, const X* const* inputs,
                       float* const* outputs, int64_t rows) {
  const int64_t part = out_features / kStreams;
  for (int64_t j = 0; j < part; ++j) {
    int64_t row = 0;
    for (; row + kStreamRows <= rows; row += kStreamRows)
      dot_streams<kStreamRows>(weight, part, in_features, inputs + row, outputs + row, j);
    if (row < rows) dot_streams<1>(weight, part, in_features, inputs + row, outputs + row, j);
  }
  rows_times_weight_rows(weight, part * kStreams, out_features, in_features, inputs, outputs, rows);
}

void check_rows(const at::Tensor& x, const at::Tensor& weight, const char* op) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              op, ": x must be 2-D float32 or bfloat16 on the CPU");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), op, ": weights must be in x's dtype");
}

// The weight's elements as stored: float, or the 16 bits of each bfloat16.
template <typename W>
const W* weight_data(const at::Tensor& weight) {
  return reinterpret_cast<const W*>(weight.const_data_ptr());
}

constexpr int64_t kMostRows = 16;  // measured up to here (cpu_kernels.MAX_TOKENS); more rows go to the BLAS call

// The dtype of the kernels' inputs of type X.
template <typename X>
constexpr at::ScalarType input_dtype() {
  return std::is_same_v<X, float> ? at::kFloat : at::kBFloat16;
}

// y = x W^T for W (out, in) of element type W, x of type X (a contiguous tensor in input_dtype<X>): output rows split
// over threads; y float32.
template <typename W, typename X>
void rows_linear_into(const at::Tensor& x, const at::Tensor& weight, at::Tensor& y) {
  const int64_t N = x.size(0), in_features = x.size(1), out_features = weight.size(0);
  std::vector<const X*> inputs(N);
  const X* x_data = reinterpret_cast<const X*>(x.const_data_ptr());
  for (int64_t r = 0; r < N; ++r) inputs[r] = x_data + r * in_features;
  const W* w = weight_data<W>(weight);
  float* y_data = y.data_ptr<float>();
  at::parallel_for(0, out_features, 256, [&](int64_t begin, int64_t end) {
    std::vector<float*> outputs(N);
    for (int64_t r = 0; r < N; ++r) outputs[r] = y_data + r * out_features + begin;
    rows_times_weight(w + begin * in_features, end - begin, in_features, inputs.data(), outputs.data(), N);
  });
}

// y = x W^T for W (out, in), in x's dtype (float32 or bfloat16; y rounded last).
at::Tensor rows_linear(const at::Tensor& x, const at::Tensor& weight) {
  check_rows(x, weight, "rows_linear");
  if (x.size(0) > kMostRows) return at::linear(x, weight);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1), "rows_linear: weight ", weight.sizes(),
              " does not take rows of ", x.size(1));
  const at::Tensor weight_c = weight.contiguous();
  at::Tensor y = at::empty({x.size(0), weight_c.size(0)}, x.options().dtype(at::kFloat));
  if (weight_c.scalar_type() == at::kBFloat16) {
    rows_linear_into<bf16_bits, BF16Input>(x.to(input_dtype<BF16Input>()).contiguous(), weight_c, y);
  } else {
    rows_linear_into<float, float>(x.contiguous(), weight_c, y);
  }
  return y.to(x.scalar_type());
}

// y_t = sum_k g_{t,k} W_down[e_{t,k}] (SiLU(W_gate[e] x_t) * W_up[e] x_t), DeepSeek-V3 eq. 12-13: the pairs grouped
// by expert, each chosen expert's weights read once for all of its tokens.
template <typename W, typename X>
at::Tensor grouped_experts_of(const at::Tensor& x, const at::Tensor& experts, const at::Tensor& weights,
                              const at::Tensor& gate_up_proj, const at::Tensor& down_proj) {
  TORCH_CHECK(experts.scalar_type() == at::kLong && weights.scalar_type() == at::kFloat,
              "grouped_experts: experts must be int64, weights float32");
  const int64_t N = x.size(0), D = x.size(1), K = experts.size(1), E = gate_up_proj.size(0);
  const int64_t I = down_proj.size(2);
  TORCH_CHECK(experts.size(0) == N && weights.sizes() == experts.sizes(), "grouped_experts: routing shape mismatch");
  TORCH_CHECK(gate_up_proj.size(1) == 2 * I && gate_up_proj.size(2) == D && down_proj.size(0) == E &&
                  down_proj.size(1) == D,
              "grouped_experts: expert weight shapes do not match x");
  const at::Tensor x_c = x.to(input_dtype<X>()).contiguous(), experts_c = experts.contiguous();
  const at::Tensor weights_c = weights.contiguous();
  const at::Tensor gate_up_c = gate_up_proj.contiguous(), down_c = down_proj.contiguous();
  const X* x_data = reinterpret_cast<const X*>(x_c.const_data_ptr());
  const int64_t* expert_of = experts_c.data_ptr<int64_t>();
  const float* gate_of = weights_c.data_ptr<float>();
  const W* gate_up = weight_data<W>(gate_up_c);
  const W* down = weight_data<W>(down_c);
  const int64_t P = N * K;

  // Counting sort of the pairs by expert: pairs_of[first[e] .. first[e + 1]) are expert e's.
  std::vector<int64_t> first(E + 1, 0), pairs_of(P);
  for (int64_t p = 0; p < P; ++p) {
    TORCH_CHECK(expert_of[p] >= 0 && expert_of[p] < E, "grouped_experts: expert id ", expert_of[p], " out of range");
    ++first[expert_of[p] + 1];
  }
  for (int64_t e = 0; e < E; ++e) first[e + 1] += first[e];
  std::vector<int64_t> next(first.begin(), first.end() - 1);
  for (int64_t p = 0; p < P; ++p) pairs_of[next[expert_of[p]]++] = p;

  std::vector<float> projected(P * 2 * I), pair_out(P * D);
  std::vector<X> hidden(P * I);
  at::parallel_for(0, E, 1, [&](int64_t begin, int64_t end) {
    std::vector<const X*> inputs;
    std::vector<float*> outputs;
    for (int64_t e = begin; e < end; ++e) {
      const int64_t count = first[e + 1] - first[e];
      if (count == 0) continue;
      inputs.resize(count);
      outputs.resize(count);
      for (int64_t q = 0; q < count; ++q) {
        const int64_t p = pairs_of[first[e] + q];
        inputs[q] = x_data + (p / K) * D;
        outputs[q] = projected.data() + p * 2 * I;
      }
      rows_times_weight(gate_up + e * 2 * I * D, 2 * I, D, inputs.data(), outputs.data(), count);
      for (int64_t q = 0; q < count; ++q) {  // h = g * SiLU(gate) * up: the combine weight folded in before W_down
        const int64_t p = pairs_of[first[e] + q];
        const float* gate = projected.data() + p * 2 * I;
        X* h = hidden.data() + p * I;
        for (int64_t i = 0; i < I; ++i)
          h[i] = as_input<X>(gate_of[p] * gate[i] / (1.f + std::exp(-gate[i])) * gate[I + i]);
        inputs[q] = h;
        outputs[q] = pair_out.data() + p * D;
      }
      rows_times_weight(down + e * D * I, D, I, inputs.data(), outputs.data(), count);
    }
  });

  at::Tensor y = at::empty({N, D}, x.options().dtype(at::kFloat));
  float* y_data = y.data_ptr<float>();
  for (int64_t t = 0; t < N; ++t) {  // each token's K pair outputs summed in routing order: deterministic
    float* out = y_data + t * D;
    const float* pair = pair_out.data() + t * K * D;
    for (int64_t d = 0; d < D; ++d) out[d] = pair[d];
    for (int64_t k = 1; k < K; ++k)
      for (int64_t d = 0; d < D; ++d) out[d] += pair[k * D + d];
  }
  return y.to(x.scalar_type());
}

at::Tensor grouped_experts(const at::Tensor& x, const at::Tensor& experts, const at::Tensor& weights,
                           const at::Tensor& gate_up_proj, const at::Tensor& down_proj) {
  check_rows(x, gate_up_proj, "grouped_experts");
  check_rows(x, down_proj, "grouped_experts");
  if (gate_up_proj.scalar_type() == at::kBFloat16)
    return grouped_experts_of<bf16_bits, BF16Input>(x, experts, weights, gate_up_proj, down_proj);
  return grouped_experts_of<float, float>(x, experts, weights, gate_up_proj, down_proj);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(seekstack, m) {
  m.def("rows_linear(Tensor x, Tensor weight) -> Tensor");
  m.def("grouped_experts(Tensor x, Tensor experts, Tensor weights, Tensor gate_up_proj, Tensor down_proj) -> Tensor");
}

TORCH_LIBRARY_IMPL(seekstack, CPU, m) {
  m.impl("rows_linear", rows_linear);
  m.impl("grouped_experts", grouped_experts);
}
