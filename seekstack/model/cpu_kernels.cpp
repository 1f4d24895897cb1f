// Kernels for a decode step's few token rows on a CPU, float32 or bfloat16 weights (seekstack/model/cpu_kernels.py
// says why and when). A few rows are bound by the weight bytes read, not by FLOPs: every weight row is loaded once for
// all rows. bfloat16 weights halve those bytes. Where the CPU has avx512_bf16, bfloat16 weights meet bfloat16 inputs
// in vdpbf16ps: 32 exact products an instruction, summed in pairs into float32 lanes; elsewhere each bfloat16 weight
// is widened to float32 as it is loaded (its 16 bits are a float32's high half), and the products and sums are
// float32 (AVX2 + FMA, 8 products an instruction, or plain loops).
// Shapes: N tokens, K experts per token, P = N*K (token, expert) pairs, E experts, D hidden, I expert width.

// at::vec's AVX2 / AVX512 vectors are chosen by these macros, which torch's own build sets per kernel file; without
// them Vectorized<float> is a plain loop (and exp a call per value), ~2x slower than torch's eager ops.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define CPU_CAPABILITY_AVX512
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY_AVX2
#endif

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/native/TopKImpl.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/scaled_dot_product_attention.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define SEEKSTACK_BF16_DOT 1
constexpr bool kPairProducts = true;  // bfloat16 products in vdpbf16ps
#else
constexpr bool kPairProducts = false;
#endif

namespace {

constexpr int64_t kRowsPerLoad = 4;  // token rows that share each load of a weight row (8 measured no faster)
// Whether the few-row kernels keep their accumulators in AVX-512's 32 vector registers (else AVX2's 16): where at::vec
// runs AVX-512 (CPU_CAPABILITY_AVX512 above), the one test both rows_times_weight and panels_linear size their passes by.
#ifdef CPU_CAPABILITY_AVX512
constexpr bool kAvx512Registers = true;
#else
constexpr bool kAvx512Registers = false;
#endif

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

#ifdef __AVX512F__
template <>
struct Vectors<float, float> {  // float32 weights and inputs, 16 lanes: half the loads and FMAs of AVX2 for a row
  static constexpr int64_t kLanes = 16;
  using Acc = __m512;
  using Operand = __m512;
  static Acc zero() { return _mm512_setzero_ps(); }
  static Operand load(const float* w) { return _mm512_loadu_ps(w); }
  static Operand load_input(const float* x) { return _mm512_loadu_ps(x); }
  static Acc fma(Operand w, Operand x, Acc acc) { return _mm512_fmadd_ps(w, x, acc); }
  static float sum(Acc acc) { return _mm512_reduce_add_ps(acc); }
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
// Token rows per pass over those weight rows: kStreams x kStreamRows accumulators and kStreamRows rows stay in
// registers, 16 + 4 of AVX-512's 32 (AVX2 has 16: 2 rows). At 8-16 rows the products, not the reads, bound a pass, and
// each extra row a weight load serves pays (float32 `small` batch-8 decode step 1.08x with AVX-512's 16 lanes).
constexpr int kStreamRows = kAvx512Registers ? 4 : 2;

// outputs[r][j + s * part] = dot(weight[j + s * part, :], inputs[r]) for s < kStreams: one load of each token row
// serves kStreams weight rows, each from its own part of W, so that kStreams sequential streams are in flight
// (one core reads several streams faster than one: 1 / 2 / 4 streams 5.0 / 7.7 / 9.8 GB/s on a Zen 3). A pass of
// kStreamRows rows, bound by its products, fetches each stream's next weight row ahead of its loads, which the
// hardware's prefetcher left to the loads themselves (Zen 4, one thread, `small` at 8 rows: its linears 1.13x, its
// head 1.25x, the compiled float32 step 1.05x, bfloat16 1.02x; at 4 rows, one pass, even). A pass of fewer rows is
// bound by the reads themselves, its loads already keeping the streams' requests in flight, so a fetch ahead there
// only adds requests to the same bytes: it is left out (R == kStreamRows).
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
        if constexpr (R == kStreamRows) __builtin_prefetch(w[s] + in_features + d);  // this stream's next weight row
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
    switch (rows - row) {
      case 3: dot_streams<3>(weight, part, in_features, inputs + row, outputs + row, j); break;
      case 2: dot_streams<2>(weight, part, in_features, inputs + row, outputs + row, j); break;
      case 1: dot_streams<1>(weight, part, in_features, inputs + row, outputs + row, j); break;
      default: break;
    }
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

// A float32 weight W (out, in) as panels (cpu_kernels.py `weight_panels`): the (in, width) blocks W[j : j + width, :]^T
// one after the other, width kPanelWidth (the last out % kPanelWidth). A panel is one sequential stream; a pass over it
// keeps kPanelRows token rows' outputs of its columns in registers for the whole input, each weight vector loaded once
// and multiplied by each row's input broadcast, no horizontal sums (`small`'s linears at 8 rows, weights flushed, one
// thread, Zen 4: 15-19 GB/s where the 4-stream dot products read 11-12).
constexpr int64_t kPanelWidth = 32;
using PanelVector = at::vec::Vectorized<float>;
constexpr int kPanelVectors = kPanelWidth / PanelVector::size();
// Accumulators kPanelRows x kPanelVectors: 16 of AVX-512's 32 registers, 8 of AVX2's 16.
constexpr int kPanelRows = kAvx512Registers ? 8 : 2;

// outputs[r][c] = sum_d panel[d, c] inputs[r][d] for c < width, r < R; Full: width == kPanelWidth.
template <int R, bool Full>
inline void panel_rows(const float* panel, int64_t in_features, int64_t width, const float* const* inputs,
                       float* const* outputs) {
  PanelVector acc[R][kPanelVectors];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < kPanelVectors; ++v) acc[r][v] = PanelVector(0.f);
  int64_t lanes[kPanelVectors];  // each vector's columns in a partial panel
  for (int v = 0; v < kPanelVectors; ++v)
    lanes[v] = std::clamp<int64_t>(width - v * PanelVector::size(), 0, PanelVector::size());
  for (int64_t d = 0; d < in_features; ++d, panel += width) {
    PanelVector w[kPanelVectors];
    for (int v = 0; v < kPanelVectors; ++v)
      w[v] = Full ? PanelVector::loadu(panel + v * PanelVector::size())
                  : PanelVector::loadu(panel + v * PanelVector::size(), lanes[v]);
    for (int r = 0; r < R; ++r) {
      const PanelVector x(inputs[r][d]);
      for (int v = 0; v < kPanelVectors; ++v) acc[r][v] = at::vec::fmadd(w[v], x, acc[r][v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < kPanelVectors; ++v) {
      float* out = outputs[r] + v * PanelVector::size();
      if (Full) acc[r][v].store(out);
      else if (lanes[v] > 0) acc[r][v].store(out, lanes[v]);
    }
}

// panel_rows over all `rows`, kPanelRows at a time: the passes after the first find the panel in L1 or L2.
template <bool Full>
void panel_times_rows(const float* panel, int64_t in_features, int64_t width, const float* const* inputs,
                      float* const* outputs, int64_t rows) {
  using Pass = void (*)(const float*, int64_t, int64_t, const float* const*, float* const*);
  static constexpr auto passes = []<int... R>(std::integer_sequence<int, R...>) {
    return std::array<Pass, sizeof...(R)>{&panel_rows<R + 1, Full>...};
  }(std::make_integer_sequence<int, kPanelRows>{});
  for (int64_t row = 0; row < rows; row += kPanelRows) {
    const int64_t count = std::min<int64_t>(kPanelRows, rows - row);
    passes[count - 1](panel, in_features, width, inputs + row, outputs + row);
  }
}

// y = x W^T for float32 x (N, in) and the panels of W (out_features, in): panels split over threads.
at::Tensor panels_linear(const at::Tensor& x, const at::Tensor& panels, int64_t out_features) {
  const int64_t N = x.size(0), in_features = x.size(1);
  const at::Tensor x_c = x.contiguous();
  at::Tensor y = at::empty({N, out_features}, x.options());
  const float* x_data = x_c.const_data_ptr<float>();
  const float* w = panels.const_data_ptr<float>();
  float* y_data = y.data_ptr<float>();
  std::vector<const float*> inputs(N);
  for (int64_t r = 0; r < N; ++r) inputs[r] = x_data + r * in_features;
  const int64_t count = (out_features + kPanelWidth - 1) / kPanelWidth;
  at::parallel_for(0, count, 8, [&](int64_t begin, int64_t end) {
    std::vector<float*> outputs(N);
    for (int64_t p = begin; p < end; ++p) {
      const int64_t first = p * kPanelWidth, width = std::min(kPanelWidth, out_features - first);
      for (int64_t r = 0; r < N; ++r) outputs[r] = y_data + r * out_features + first;
      const float* panel = w + first * in_features;
      if (width == kPanelWidth) {
        panel_times_rows<true>(panel, in_features, width, inputs.data(), outputs.data(), N);
      } else {
        panel_times_rows<false>(panel, in_features, width, inputs.data(), outputs.data(), N);
      }
    }
  });
  return y;
}

// check_rows, and W (out, in) taking x's rows: what rows_linear and rows_linear_panels both ask, once a call.
void check_linear(const at::Tensor& x, const at::Tensor& weight, const char* op) {
  check_rows(x, weight, op);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1), op, ": weight ", weight.sizes(),
              " does not take rows of ", x.size(1));
}

// y = x W^T over W's rows for x and W that passed check_linear, in x's dtype (float32 or bfloat16; y rounded last);
// past kMostRows rows torch's linear.
at::Tensor linear_over_weight_rows(const at::Tensor& x, const at::Tensor& weight) {
  if (x.size(0) > kMostRows) return at::linear(x, weight);
  const at::Tensor weight_c = weight.contiguous();
  at::Tensor y = at::empty({x.size(0), weight_c.size(0)}, x.options().dtype(at::kFloat));
  if (weight_c.scalar_type() == at::kBFloat16) {
    rows_linear_into<bf16_bits, BF16Input>(x.to(input_dtype<BF16Input>()).contiguous(), weight_c, y);
  } else {
    rows_linear_into<float, float>(x.contiguous(), weight_c, y);
  }
  return y.to(x.scalar_type());
}

// y = x W^T for W (out, in), in x's dtype.
at::Tensor rows_linear(const at::Tensor& x, const at::Tensor& weight) {
  check_linear(x, weight, "rows_linear");
  return linear_over_weight_rows(x, weight);
}

// Rows from which a float32 weight's panels are read instead of its rows: at 1-2 rows the 4 streams of rows_times_weight
// read faster than one panel at a time (`small`'s linears, weights flushed: panels 0.76x at 1 row, 0.95x at 2, 1.48x at
// 4, 1.55x at 8, 1.30x at 16).
constexpr int64_t kPanelMinRows = 3;

// cpu_kernels.py's `panel_layout`: the panels' width, as weight_panels lays them out, and the rows that read them.
std::vector<int64_t> panel_layout() { return {kPanelWidth, kPanelMinRows}; }

// rows_linear(x, weight) for float32 x and W, through W's panels (cpu_kernels.py `weight_panels`) at 3-16 rows.
at::Tensor rows_linear_panels(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& panels) {
  check_linear(x, weight, "rows_linear_panels");
  TORCH_CHECK(weight.scalar_type() == at::kFloat, "rows_linear_panels: panels are float32 copies, the weight ",
              weight.sizes(), " is ", weight.scalar_type());
  TORCH_CHECK(panels.scalar_type() == at::kFloat && panels.is_contiguous() && panels.numel() == weight.numel(),
              "rows_linear_panels: panels (", panels.scalar_type(), ", ", panels.numel(),
              " values) are not those of the weight ", weight.sizes());
  if (x.size(0) < kPanelMinRows || x.size(0) > kMostRows) return linear_over_weight_rows(x, weight);
  return panels_linear(x, panels, weight.size(0));
}

// DecodeLinear's product (infer/packed.py): rows_linear, through W's panels where it holds them.
at::Tensor decode_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& panels) {
  return panels ? rows_linear_panels(x, weight, *panels) : rows_linear(x, weight);
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
  if (K == 0) return at::empty_like(x).zero_();  // no expert chosen: the sum over no pairs, none read past its end
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

// Fused elementwise kernels for the training step and the prefill forward (float32 or bfloat16 in and out, float32
// math): one pass over the rows where torch's eager ops make several, each into fresh memory. Rows of R values; kStep
// values a step as two float32 vectors, the rest one at a time.
using FloatVector = at::vec::Vectorized<float>;
constexpr int64_t kStep = 2 * FloatVector::size();
constexpr int64_t kRowsPerTask = 16;  // rows per at::parallel_for grain

inline void load_step(const float* p, FloatVector& low, FloatVector& high) {
  low = FloatVector::loadu(p);
  high = FloatVector::loadu(p + FloatVector::size());
}
inline void load_step(const c10::BFloat16* p, FloatVector& low, FloatVector& high) {
  at::vec::load_to_float(p, low, high);
}
inline void load_step(const bf16_bits* p, FloatVector& low, FloatVector& high) {
  load_step(reinterpret_cast<const c10::BFloat16*>(p), low, high);
}
inline void store_step(float* p, const FloatVector& low, const FloatVector& high) {
  low.store(p);
  high.store(p + FloatVector::size());
}
inline void store_step(c10::BFloat16* p, const FloatVector& low, const FloatVector& high) {
  at::vec::convert_from_float<c10::BFloat16>(low, high).store(p);
}

inline FloatVector sigmoid(const FloatVector& g) { return FloatVector(1.f) / (FloatVector(1.f) + g.neg().exp()); }
inline float sigmoid(float g) { return 1.f / (1.f + std::exp(-g)); }

// Calls step(d) for the vector steps of a row of R values, then tail(d) for each value left.
template <typename Step, typename Tail>
inline void over_row(int64_t R, const Step& step, const Tail& tail) {
  int64_t d = 0;
  for (; d + kStep <= R; d += kStep) step(d);
  for (; d < R; ++d) tail(d);
}

// A row of R values folded into one float: acc = step(acc, d) over the vector steps, rest = tail(rest, d) over the
// values left, both from `init`, then op(op over acc's lanes, rest): a sum with std::plus<>, a max with Maximum.
template <typename Op, typename Step, typename Tail>
inline float fold_row(int64_t R, float init, const Op& op, const Step& step, const Tail& tail) {
  FloatVector acc(init);
  float rest = init;
  over_row(R, [&](int64_t d) { acc = step(acc, d); }, [&](int64_t d) { rest = tail(rest, d); });
  return op(at::vec::vec_reduce_all<float>(op, acc), rest);
}

struct Maximum {
  FloatVector operator()(const FloatVector& a, const FloatVector& b) const { return at::vec::maximum(a, b); }
  float operator()(float a, float b) const { return std::max(a, b); }
};

// 2-D, read along stride 1; an empty tensor's strides are whatever made it (0 for the gradient of an empty sum).
inline bool rows_of(const at::Tensor& t) { return t.dim() == 2 && (t.stride(1) == 1 || t.numel() == 0); }

void check_elementwise(const at::Tensor& a, const at::Tensor& b, const char* op) {
  TORCH_CHECK(a.device().is_cpu() && (a.scalar_type() == at::kFloat || a.scalar_type() == at::kBFloat16) && rows_of(a),
              op, ": rows must be 2-D float32 or bfloat16 on the CPU, contiguous along a row");
  TORCH_CHECK(b.scalar_type() == a.scalar_type() && rows_of(b) && b.sizes() == a.sizes(), op,
              ": operands must share the first's dtype and shape");
}

// h = SiLU(gate) * up [* weight per row], DeepSeek-V3's expert FFN (the routed experts fold their combine weight g in
// before W_down). gate and up (n, I) may be strided rows (the halves of one projection); h is contiguous.
template <typename T>
void swiglu_rows(const at::Tensor& gate, const at::Tensor& up, const float* weight, at::Tensor& h) {
  const int64_t I = gate.size(1);
  const T* gate_data = gate.const_data_ptr<T>();
  const T* up_data = up.const_data_ptr<T>();
  T* h_data = h.mutable_data_ptr<T>();
  at::parallel_for(0, gate.size(0), kRowsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const T* g = gate_data + row * gate.stride(0);
      const T* u = up_data + row * up.stride(0);
      T* out = h_data + row * I;
      const float w = weight ? weight[row] : 1.f;
      over_row(
          I,
          [&](int64_t d) {
            FloatVector g0, g1, u0, u1;
            load_step(g + d, g0, g1);
            load_step(u + d, u0, u1);
            store_step(out + d, g0 * sigmoid(g0) * u0 * FloatVector(w), g1 * sigmoid(g1) * u1 * FloatVector(w));
          },
          [&](int64_t d) { out[d] = static_cast<T>(float(g[d]) * sigmoid(float(g[d])) * float(u[d]) * w); });
    }
  });
}

// The backward of h = SiLU(g) u w for the gradient dh, with s = sigmoid(g), SiLU(g) = g s, SiLU'(g) = s (1 + g (1 - s)):
// dg = dh u w SiLU'(g), du = dh SiLU(g) w, dw = sum over the row of dh SiLU(g) u.
template <typename T>
void swiglu_backward_rows(const at::Tensor& grad, const at::Tensor& gate, const at::Tensor& up, const float* weight,
                          at::Tensor& grad_gate, at::Tensor& grad_up, float* grad_weight) {
  const int64_t I = gate.size(1);
  const T* grad_data = grad.const_data_ptr<T>();
  const T* gate_data = gate.const_data_ptr<T>();
  const T* up_data = up.const_data_ptr<T>();
  T* grad_gate_data = grad_gate.mutable_data_ptr<T>();
  T* grad_up_data = grad_up.mutable_data_ptr<T>();
  at::parallel_for(0, gate.size(0), kRowsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const T* dh = grad_data + row * I;
      const T* g = gate_data + row * gate.stride(0);
      const T* u = up_data + row * up.stride(0);
      T* dg = grad_gate_data + row * I;
      T* du = grad_up_data + row * I;
      const float w = weight ? weight[row] : 1.f;
      FloatVector dw_sum(0.f);
      float dw_tail = 0.f;
      auto grads = [&](const FloatVector& dh_, const FloatVector& g_, const FloatVector& u_, FloatVector& dg_,
                       FloatVector& du_) {
        const FloatVector s = sigmoid(g_), silu = g_ * s;
        dw_sum = dw_sum + dh_ * silu * u_;
        du_ = dh_ * silu * FloatVector(w);
        dg_ = dh_ * u_ * FloatVector(w) * s * (FloatVector(1.f) + g_ * (FloatVector(1.f) - s));
      };
      over_row(
          I,
          [&](int64_t d) {
            FloatVector dh0, dh1, g0, g1, u0, u1, dg0, dg1, du0, du1;
            load_step(dh + d, dh0, dh1);
            load_step(g + d, g0, g1);
            load_step(u + d, u0, u1);
            grads(dh0, g0, u0, dg0, du0);
            grads(dh1, g1, u1, dg1, du1);
            store_step(dg + d, dg0, dg1);
            store_step(du + d, du0, du1);
          },
          [&](int64_t d) {
            const float dh_ = float(dh[d]), g_ = float(g[d]), u_ = float(u[d]), s = sigmoid(g_), silu = g_ * s;
            dw_tail += dh_ * silu * u_;
            du[d] = static_cast<T>(dh_ * silu * w);
            dg[d] = static_cast<T>(dh_ * u_ * w * s * (1.f + g_ * (1.f - s)));
          });
      if (grad_weight) grad_weight[row] = at::vec::vec_reduce_all<float>(std::plus<FloatVector>(), dw_sum) + dw_tail;
    }
  });
}

// The combine weights as float32 (n,), or none.
const float* row_weights(const std::optional<at::Tensor>& weights, int64_t rows) {
  if (!weights.has_value()) return nullptr;
  TORCH_CHECK(weights->scalar_type() == at::kFloat && weights->is_contiguous() && weights->numel() == rows,
              "swiglu: weights must be contiguous float32, one per row");
  return weights->const_data_ptr<float>();
}

at::Tensor swiglu(const at::Tensor& gate, const at::Tensor& up, const std::optional<at::Tensor>& weights) {
  check_elementwise(gate, up, "swiglu");
  at::Tensor h = at::empty(gate.sizes(), gate.options());
  const float* weight = row_weights(weights, gate.size(0));
  if (gate.scalar_type() == at::kBFloat16) {
    swiglu_rows<c10::BFloat16>(gate, up, weight, h);
  } else {
    swiglu_rows<float>(gate, up, weight, h);
  }
  return h;
}

// W_down (SiLU(W_gate x) * W_up x) for x (..., D): a dense FFN or shared expert (moe.py FeedForward) in one call, the
// three decode_linear and the swiglu an eager step would make one by one on x's rows, so bitwise theirs.
at::Tensor feed_forward_rows(const at::Tensor& x, const at::Tensor& gate_proj, const at::Tensor& up_proj,
                             const at::Tensor& down_proj, const std::optional<at::Tensor>& gate_panels,
                             const std::optional<at::Tensor>& up_panels, const std::optional<at::Tensor>& down_panels) {
  const at::Tensor rows = x.reshape({-1, x.size(-1)});
  const at::Tensor hidden = swiglu(decode_linear(rows, gate_proj, gate_panels), decode_linear(rows, up_proj, up_panels),
                                   std::nullopt);
  return decode_linear(hidden, down_proj, down_panels).view(x.sizes());
}

// dgate, dup (n, I) contiguous and dweights (n,) float32 (empty without weights).
std::tuple<at::Tensor, at::Tensor, at::Tensor> swiglu_backward(const at::Tensor& grad, const at::Tensor& gate,
                                                               const at::Tensor& up,
                                                               const std::optional<at::Tensor>& weights) {
  check_elementwise(gate, up, "swiglu_backward");
  const at::Tensor grad_c = grad.to(gate.scalar_type()).contiguous();
  check_elementwise(gate, grad_c, "swiglu_backward");
  at::Tensor grad_gate = at::empty(gate.sizes(), gate.options()), grad_up = at::empty(gate.sizes(), gate.options());
  const float* weight = row_weights(weights, gate.size(0));
  at::Tensor grad_weight = at::empty({weight ? gate.size(0) : 0}, gate.options().dtype(at::kFloat));
  float* grad_weight_data = weight ? grad_weight.mutable_data_ptr<float>() : nullptr;
  if (gate.scalar_type() == at::kBFloat16) {
    swiglu_backward_rows<c10::BFloat16>(grad_c, gate, up, weight, grad_gate, grad_up, grad_weight_data);
  } else {
    swiglu_backward_rows<float>(grad_c, gate, up, weight, grad_gate, grad_up, grad_weight_data);
  }
  return {grad_gate, grad_up, grad_weight};
}

// Causal attention's backward (FlashAttention-2, Dao 2023, Alg. 2, over whole score rows), from the forward's
// per-row log-sum-exp L (torch's fused CPU SDPA returns it): P = exp(scale Q K^T - L) recomputed, dV = P^T dO,
// dP = dO V^T, dS = scale P (dP - rowsum(dO O)), dQ = dS K, dK = dS^T Q, over a group of heads at a time; bfloat16
// only (float32 takes causal_attention_training_backward, below). S = Q K^T and dP are kept in float32
// (`causal_scores`: a bfloat16 bmm would round them, and exp(S) turns S's rounding into P's error, 2-4% of the
// gradients at logits of std 4); one pass a score row turns them into P and dS (float32 math), zero above the
// diagonal, stored in bfloat16 for the three other products (bmm calls, AMX), as FlashAttention rounds P and dS.
constexpr int64_t kScoresPerGroup = 1 << 20;  // scores (heads x T x T) a group computes at once
constexpr int64_t kKeysPerTile = 64;          // keys (columns of scores) a brgemm call computes: its widest packed B

// `keys` rows of b (ld_b apart, K wide, K even) as one tile of b^T packed to VNNI, the layout cpublas::pack writes:
// tile[d / 2][key] holds the pair b[key][d], b[key][d + 1], copied straight from b's rows.
void pack_key_tile(const c10::BFloat16* b, int64_t ld_b, int64_t keys, int64_t K, c10::BFloat16* tile) {
  for (int64_t key = 0; key < keys; ++key) {
    for (int64_t d = 0; d < K; d += 2) {
      std::memcpy(tile + (d / 2 * kKeysPerTile + key) * 2, b + key * ld_b + d, 2 * sizeof(*b));
    }
  }
}

// Whether torch's brgemm multiplies bfloat16 operands `width` wide packed to VNNI (oneDNN's ukernel: a CPU with AMX,
// pairs of columns: an even width). The one decision of bfloat16 causal attention's path: where it holds, the bfloat16
// kernels (causal_attention, causal_attention_backward); where not, the float32-math training kernels
// (causal_attention here, attention.py's training attention through the `packs_bfloat16` op).
bool packs_bfloat16(int64_t width) { return at::native::cpublas::could_pack(at::kBFloat16) && width % 2 == 0; }

// scores (n, T, T) float32 = a (n, T, K) b (n, T, K)^T for bfloat16 a and b read along stride 1, in the rows i >= j of
// each key j (the causal half; the rest left unwritten). torch's brgemm (oneDNN, AMX), as its flash CPU kernel calls
// it: b^T in tiles of 64 keys packed to VNNI (`pack_key_tile`), times the rows from the tile's first key down. Where
// it cannot pack them (`packs_bfloat16`), the same call takes b^T unpacked and runs a plain gemm.
void causal_scores(const at::Tensor& a, const at::Tensor& b, at::Tensor& scores) {
  const int64_t n = a.size(0), T_ = a.size(1), K = a.size(2), ld_a = a.stride(1), ld_b = b.stride(1);
  const bool vnni = packs_bfloat16(K);
  const c10::BFloat16* a_data = a.const_data_ptr<c10::BFloat16>();
  const c10::BFloat16* b_data = b.const_data_ptr<c10::BFloat16>();
  float* s_data = scores.mutable_data_ptr<float>();
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    std::vector<c10::BFloat16> b_t(vnni ? K * kKeysPerTile : K * T_);  // one packed tile, or all of b^T (K, T)
    for (int64_t h = begin; h < end; ++h) {
      const c10::BFloat16* A = a_data + h * a.stride(0);
      const c10::BFloat16* B = b_data + h * b.stride(0);
      float* S = s_data + h * T_ * T_;
      for (int64_t d = 0; d < K && !vnni; ++d) {
        for (int64_t j = 0; j < T_; ++j) b_t[d * T_ + j] = B[j * ld_b + d];
      }
      for (int64_t j = 0; j < T_; j += kKeysPerTile) {
        const int64_t keys = std::min(kKeysPerTile, T_ - j);
        if (vnni) pack_key_tile(B + j * ld_b, ld_b, keys, K, b_t.data());
        at::native::cpublas::brgemm(T_ - j, keys, K, ld_a, vnni ? kKeysPerTile : T_, T_, false, A + j * ld_a,
                                    vnni ? b_t.data() : b_t.data() + j, S + j * T_ + j, vnni);
      }
    }
    if (vnni) at::native::cpublas::brgemm_release();
  });
}

// The inputs of the causal attention kernels: q, k (B, H, T, W) and v (B, H, T, V) of one dtype, bfloat16 (or float32
// where `takes_float32`; else `other_dtype` names the kernel for it), read along stride 1; V <= W where
// `value_within_width` (causal_attention writes v's columns into q's width).
void check_causal_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool takes_float32,
                            bool value_within_width, const char* op, const char* other_dtype) {
  TORCH_CHECK(q.dim() == 4 && k.sizes() == q.sizes() && v.dim() == 4 &&
                  v.sizes().slice(0, 3) == q.sizes().slice(0, 3) && (!value_within_width || v.size(3) <= q.size(3)),
              op, ": q, k must be (B, H, T, W) and v (B, H, T, V)", value_within_width ? " with V <= W" : "", ", not q ",
              q.sizes(), ", k ", k.sizes(), ", v ", v.sizes());
  const at::ScalarType dtype = q.scalar_type();
  TORCH_CHECK(k.scalar_type() == dtype && v.scalar_type() == dtype &&
                  (dtype == at::kBFloat16 || (takes_float32 && dtype == at::kFloat)),
              op, ": q, k and v must be ", takes_float32 ? "float32 or bfloat16, one dtype" : "bfloat16", other_dtype,
              ", not ", q.scalar_type(), ", ", k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK(q.stride(-1) == 1 && k.stride(-1) == 1 && v.stride(-1) == 1, op,
              ": q, k and v must be read along stride 1");
}

// P and dS (bfloat16) from float32 S and dP into `probs` and `grad_scores`.
void causal_softmax_backward_rows(const at::Tensor& scores, const at::Tensor& grad_probs, at::Tensor& probs,
                                  at::Tensor& grad_scores, const at::Tensor& lse, const at::Tensor& grad_out,
                                  const at::Tensor& out, float scale) {
  const int64_t heads = scores.size(0), T_ = scores.size(1), V = out.size(2);
  const float* s_data = scores.const_data_ptr<float>();
  const float* dp_data = grad_probs.const_data_ptr<float>();
  c10::BFloat16* p_data = probs.mutable_data_ptr<c10::BFloat16>();
  c10::BFloat16* ds_data = grad_scores.mutable_data_ptr<c10::BFloat16>();
  const float* lse_data = lse.const_data_ptr<float>();
  const c10::BFloat16* grad_out_data = grad_out.const_data_ptr<c10::BFloat16>();
  const c10::BFloat16* out_data = out.const_data_ptr<c10::BFloat16>();
  at::parallel_for(0, heads * T_, kRowsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t h = row / T_, i = row % T_;
      const c10::BFloat16* dO = grad_out_data + h * grad_out.stride(0) + i * grad_out.stride(1);
      const c10::BFloat16* O = out_data + h * out.stride(0) + i * out.stride(1);
      float delta = 0.f;  // rowsum(dO O) = sum_j P_ij dP_ij
      for (int64_t d = 0; d < V; ++d) delta += float(dO[d]) * float(O[d]);
      const float L = lse_data[h * lse.stride(0) + i * lse.stride(1)];
      const float* s = s_data + row * T_;
      const float* dp = dp_data + row * T_;
      c10::BFloat16* p = p_data + row * T_;
      c10::BFloat16* ds = ds_data + row * T_;
      over_row(
          i + 1,
          [&](int64_t j) {
            FloatVector s0, s1, dp0, dp1;
            load_step(s + j, s0, s1);
            load_step(dp + j, dp0, dp1);
            const FloatVector p0 = (s0 * FloatVector(scale) - FloatVector(L)).exp_u20();
            const FloatVector p1 = (s1 * FloatVector(scale) - FloatVector(L)).exp_u20();
            store_step(p + j, p0, p1);
            store_step(ds + j, p0 * (dp0 - FloatVector(delta)) * FloatVector(scale),
                       p1 * (dp1 - FloatVector(delta)) * FloatVector(scale));
          },
          [&](int64_t j) {
            const float p_ij = std::exp(s[j] * scale - L);
            p[j] = static_cast<c10::BFloat16>(p_ij);
            ds[j] = static_cast<c10::BFloat16>(p_ij * (dp[j] - delta) * scale);
          });
      std::fill(p + i + 1, p + T_, c10::BFloat16(0));
      std::fill(ds + i + 1, ds + T_, c10::BFloat16(0));
    }
  });
}

// q, k (B, H, T, D), v, out, grad (B, H, T, V), lse (B, H, T) float32 -> dq, dk, dv.
std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_attention_backward(const at::Tensor& grad, const at::Tensor& q,
                                                                         const at::Tensor& k, const at::Tensor& v,
                                                                         const at::Tensor& out, const at::Tensor& lse,
                                                                         double scale) {
  check_causal_attention(q, k, v, false, false, "causal_attention_backward",
                         " (float32: causal_attention_training_backward)");
  TORCH_CHECK(grad.sizes() == v.sizes() && out.sizes() == v.sizes() && out.scalar_type() == at::kBFloat16 &&
                  out.stride(-1) == 1 && lse.scalar_type() == at::kFloat && lse.sizes() == q.sizes().slice(0, 3),
              "causal_attention_backward: grad and out must be of v's shape ", v.sizes(), ", out bfloat16 read along "
              "stride 1, lse float32 (B, H, T), not grad ", grad.sizes(), ", out ", out.scalar_type(), out.sizes(),
              ", lse ", lse.scalar_type(), lse.sizes());
  const at::Tensor dO = grad.to(q.scalar_type()).contiguous();
  const int64_t B = q.size(0), H = q.size(1), T_ = q.size(2);
  at::Tensor grad_q = at::empty(q.sizes(), q.options()), grad_k = at::empty(k.sizes(), k.options()),
             grad_v = at::empty(v.sizes(), v.options());
  const int64_t group = std::clamp<int64_t>(kScoresPerGroup / std::max<int64_t>(1, T_ * T_), 1, std::max<int64_t>(1, H));
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < H; h += group) {
      const int64_t n = std::min(group, H - h);
      const at::Tensor qg = q[b].narrow(0, h, n), kg = k[b].narrow(0, h, n), vg = v[b].narrow(0, h, n);
      const at::Tensor dOg = dO[b].narrow(0, h, n), og = out[b].narrow(0, h, n), lg = lse[b].narrow(0, h, n);
      at::Tensor scores = at::empty({n, T_, T_}, q.options().dtype(at::kFloat)), grad_probs = at::empty_like(scores);
      causal_scores(qg, kg, scores);
      causal_scores(dOg, vg, grad_probs);
      at::Tensor probs = at::empty({n, T_, T_}, q.options()), grad_scores = at::empty_like(probs);
      causal_softmax_backward_rows(scores, grad_probs, probs, grad_scores, lg, dOg, og, scale);
      at::Tensor dv = grad_v[b].narrow(0, h, n), dq = grad_q[b].narrow(0, h, n), dk = grad_k[b].narrow(0, h, n);
      at::bmm_out(dv, probs.transpose(1, 2), dOg);
      at::bmm_out(dq, grad_scores, kg);
      at::bmm_out(dk, grad_scores.transpose(1, 2), qg);
    }
  }
  return {grad_q, grad_k, grad_v};
}

// Causal attention's forward for bfloat16 inference (FlashAttention's forward over whole score rows, Dao 2023, without
// the log-sum-exp the backward needs): per head, blocks of 64 query rows, each over the keys up to its own last row
// only, S = Q K^T in float32 (torch's brgemm, AMX, as causal_scores), one pass a row into P = exp(scale S - max)
// rounded to bfloat16 (as FlashAttention rounds it), O = P V / rowsum(P) in float32, written as (B, T, H, V): the rows
// o_proj takes. torch's flash CPU kernel computes every score of a 512-key block (the whole row up to T = 512, half of
// them masked) and multiplies P by v zero-padded to q's width. Where the CPU cannot pack bfloat16 for brgemm (no AMX)
// or W is odd, `causal_attention_training`'s forward (below), float32 math, its log-sum-exp unused.
// A packed B is at most kKeysPerTile columns wide, in steps of 16 (oneDNN's), so P V runs on v's columns in blocks of
// 64, v zero-padded to 16 columns (DeepSeek-V3's 128 is two blocks).
constexpr int64_t kQueriesPerBlock = 64;
constexpr int64_t kPackedColumns = 16;

std::tuple<at::Tensor, at::Tensor> causal_attention_training(const at::Tensor& q, const at::Tensor& k,
                                                             const at::Tensor& v, double scale);

at::Tensor causal_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  check_causal_attention(q, k, v, false, true, "causal_attention", " (float32: causal_attention_training)");
  const int64_t B = q.size(0), H = q.size(1), T_ = q.size(2), W = q.size(3), V = v.size(3);
  if (!packs_bfloat16(W)) {
    return std::get<0>(causal_attention_training(q, k, v, scale));
  }
  at::Tensor out = at::empty({B, T_, H, V}, v.options());
  const int64_t tiles = (T_ + kKeysPerTile - 1) / kKeysPerTile, padded = tiles * kKeysPerTile;
  const int64_t columns = (V + kPackedColumns - 1) / kPackedColumns * kPackedColumns;  // v's width, padded
  const float scale_f = static_cast<float>(scale);
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<c10::BFloat16> k_packed(tiles * W * kKeysPerTile), v_packed(padded * columns, c10::BFloat16(0));
    std::vector<c10::BFloat16> probs(kQueriesPerBlock * padded);
    std::vector<float> scores(kQueriesPerBlock * padded), o(kQueriesPerBlock * columns), inverse(kQueriesPerBlock);
    const c10::BFloat16 zero(0);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const c10::BFloat16* Q = q.const_data_ptr<c10::BFloat16>() + b * q.stride(0) + h * q.stride(1);
      const c10::BFloat16* K = k.const_data_ptr<c10::BFloat16>() + b * k.stride(0) + h * k.stride(1);
      const c10::BFloat16* Vd = v.const_data_ptr<c10::BFloat16>() + b * v.stride(0) + h * v.stride(1);
      const int64_t ld_q = q.stride(2), ld_k = k.stride(2), ld_v = v.stride(2);
      // K^T in tiles of 64 keys packed to VNNI (`pack_key_tile`); V in blocks of 64 columns packed to VNNI along the
      // keys (block[key / 2][n] holds v[key][n], v[key + 1][n]); keys past T and columns past V are zeros.
      std::fill(k_packed.begin() + T_ / kKeysPerTile * W * kKeysPerTile, k_packed.end(), zero);
      for (int64_t j = 0; j < T_; j += kKeysPerTile) {
        pack_key_tile(K + j * ld_k, ld_k, std::min(kKeysPerTile, T_ - j), W, k_packed.data() + j * W);
      }
      const auto* v_bits = reinterpret_cast<const uint16_t*>(Vd);
      for (int64_t first_n = 0; first_n < V; first_n += kKeysPerTile) {
        const int64_t block = std::min(kKeysPerTile, columns - first_n), filled = std::min(kKeysPerTile, V - first_n);
        auto* pairs = reinterpret_cast<uint32_t*>(v_packed.data() + first_n * padded);
        for (int64_t key = 0; key < T_; key += 2) {  // a pair of keys' bfloat16s as one 32-bit word, low bits first
          const uint16_t* even = v_bits + key * ld_v + first_n;
          const uint16_t* odd = key + 1 < T_ ? even + ld_v : nullptr;
          uint32_t* pair = pairs + key / 2 * block;
          for (int64_t n = 0; n < filled; ++n) pair[n] = even[n] | (odd == nullptr ? 0u : uint32_t{odd[n]} << 16);
        }
      }
      for (int64_t first = 0; first < T_; first += kQueriesPerBlock) {
        const int64_t rows = std::min(kQueriesPerBlock, T_ - first);
        const int64_t width = (first + rows + kKeysPerTile - 1) / kKeysPerTile * kKeysPerTile;  // keys seen, in tiles
        for (int64_t j = 0; j < width; j += kKeysPerTile) {
          at::native::cpublas::brgemm(rows, kKeysPerTile, W, ld_q, kKeysPerTile, width, false, Q + first * ld_q,
                                      k_packed.data() + j * W, scores.data() + j, true);
        }
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t seen = first + r + 1;  // keys 0..first + r
          const float* s = scores.data() + r * width;
          c10::BFloat16* p = probs.data() + r * width;
          const float top = fold_row(
              seen, -std::numeric_limits<float>::infinity(), Maximum(),
              [&](const FloatVector& acc, int64_t j) {
                FloatVector s0, s1;
                load_step(s + j, s0, s1);
                return at::vec::maximum(acc, at::vec::maximum(s0, s1));
              },
              [&](float acc, int64_t j) { return std::max(acc, s[j]); });
          const float shift = top * scale_f;
          const float total = fold_row(
              seen, 0.f, std::plus<>(),
              [&](const FloatVector& acc, int64_t j) {
                FloatVector s0, s1;
                load_step(s + j, s0, s1);
                s0 = (s0 * FloatVector(scale_f) - FloatVector(shift)).exp_u20();
                s1 = (s1 * FloatVector(scale_f) - FloatVector(shift)).exp_u20();
                store_step(p + j, s0, s1);
                return acc + s0 + s1;
              },
              [&](float acc, int64_t j) {
                const float e = std::exp(s[j] * scale_f - shift);
                p[j] = static_cast<c10::BFloat16>(e);
                return acc + e;
              });
          inverse[r] = 1.f / total;
          std::fill(p + seen, p + width, zero);
        }
        for (int64_t first_n = 0; first_n < V; first_n += kKeysPerTile) {
          const int64_t block = std::min(kKeysPerTile, columns - first_n);
          at::native::cpublas::brgemm(rows, block, width, width, block, columns, false, probs.data(),
                                      v_packed.data() + first_n * padded, o.data() + first_n, true);
        }
        for (int64_t r = 0; r < rows; ++r) {
          c10::BFloat16* row = out.mutable_data_ptr<c10::BFloat16>() + ((b * T_ + first + r) * H + h) * V;
          const float* o_row = o.data() + r * columns;
          over_row(
              V,
              [&](int64_t n) {
                FloatVector o0, o1;
                load_step(o_row + n, o0, o1);
                store_step(row + n, o0 * FloatVector(inverse[r]), o1 * FloatVector(inverse[r]));
              },
              [&](int64_t n) { row[n] = static_cast<c10::BFloat16>(o_row[n] * inverse[r]); });
        }
      }
    }
    at::native::cpublas::brgemm_release();
  });
  return out;
}

// Causal attention for training (the forward, keeping each query row's log-sum-exp L, and its backward; the same
// equations as above, float32 math throughout, on float32 or bfloat16 tensors: a bfloat16 head widened to float32 rows
// once, the results narrowed as they are written, where a cast of the whole q, k, v, out and gradients cost 13 ms a
// `small` 4 x 512 layer beside the kernels' ~52 on an avx512_bf16 EPYC without AMX): per head, blocks of kQueriesPerBlock query rows over the keys up to
// the block's last row only (forward + backward 1.5-1.9x torch's flash SDPA's at `tiny`'s and `small`'s shapes, one
// EPYC thread). A block works on the transposed scores S^T = K Q^T (keys x queries), so that each of its
// products reads K, V, Q and dO as they lie, or transposed once a head (Q^T, K^T, V^T, dO^T), and dK, dV accumulate
// straight into their rows; the softmax runs along a key row's query columns, a vector of queries at a time. Products
// by torch's brgemm (oneDNN, float32), but S and dP of bfloat16 rows by vdpbf16ps where the CPU has avx512_bf16
// (`ColumnsOf`); out (B, T, H, V) and the gradients (B, T, H, W or V): o_proj's layout.

// x (rows, cols), rows ld apart -> x^T (cols, rows), its rows ld_t apart, into `t` (16 x 16 tiles in AVX-512).
void transpose_into(const float* x, int64_t ld, int64_t rows, int64_t cols, float* t, int64_t ld_t) {
  at::vec::transpose_mxn<float>(x, ld, t, ld_t, static_cast<int>(rows), static_cast<int>(cols));
}

// n values from `from` into `to`, float32 <-> bfloat16 (rounded to nearest even, as torch's casts).
template <typename From, typename To>
void convert_row(const From* from, int64_t n, To* to) {
  over_row(
      n,
      [&](int64_t d) {
        FloatVector low, high;
        load_step(from + d, low, high);
        store_step(to + d, low, high);
      },
      [&](int64_t d) { to[d] = static_cast<To>(static_cast<float>(from[d])); });
}

struct HeadOf {  // (b, h)'s T rows of a (B, H, T, D) tensor read along stride 1, in float32
  const float* data = nullptr;
  int64_t ld = 0;
  // A float32 tensor's own rows; a bfloat16 tensor's widened into `rows` (T x D, D apart) where `wanted`.
  HeadOf(const at::Tensor& t, int64_t b, int64_t h, std::vector<float>& rows, bool wanted = true) {
    const int64_t offset = b * t.stride(0) + h * t.stride(1), T_ = t.size(2), D = t.size(3);
    if (!wanted) return;
    if (t.scalar_type() == at::kFloat) {
      data = t.const_data_ptr<float>() + offset;
      ld = t.stride(2);
      return;
    }
    rows.resize(T_ * D);
    const c10::BFloat16* from = t.const_data_ptr<c10::BFloat16>() + offset;
    for (int64_t i = 0; i < T_; ++i) convert_row(from + i * t.stride(2), D, rows.data() + i * D);
    data = rows.data();
    ld = D;
  }
};

// -inf in scores^T (width, rows) where a key j lies after query i (j > first + i).
void mask_after_diagonal(int64_t first, int64_t width, float* scores_t) {
  for (int64_t j = first + 1; j < width; ++j) {
    std::fill(scores_t + j * kQueriesPerBlock, scores_t + j * kQueriesPerBlock + (j - first),
              -std::numeric_limits<float>::infinity());
  }
}

#ifdef SEEKSTACK_BF16_DOT
// out (R, 64) = a[:R] x[:64]^T for R bfloat16 rows of a (ld_a apart) and x as `pairs` (ColumnsOf), D even: each pair of
// a row broadcast against 16 columns' pairs in vdpbf16ps (exact products summed in float32), R x 64 sums in registers.
template <int R>
inline void pair_products_rows(const c10::BFloat16* a, int64_t ld_a, const uint32_t* pairs, int64_t ld, int64_t D,
                               float* out) {
  constexpr int kVectors = kQueriesPerBlock / 16;
  __m512 acc[R][kVectors];
  for (auto& row : acc) {
    for (auto& sums : row) sums = _mm512_setzero_ps();
  }
  for (int64_t p = 0; p < D / 2; ++p) {
    __m512bh columns[kVectors];
    for (int v = 0; v < kVectors; ++v) {
      columns[v] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(pairs + p * ld + 16 * v));
    }
    for (int r = 0; r < R; ++r) {
      uint32_t pair;
      std::memcpy(&pair, a + r * ld_a + 2 * p, sizeof pair);
      const __m512bh row = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(pair)));
      for (int v = 0; v < kVectors; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], row, columns[v]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < kVectors; ++v) _mm512_storeu_ps(out + r * kQueriesPerBlock + 16 * v, acc[r][v]);
  }
}
#endif

// The columns x (T, D) of a head's products a x^T over a block of kQueriesPerBlock of them (S^T = K Q^T: Q; dP^T =
// V dO^T: dO): x^T in float32 for brgemm, or, where a and x are bfloat16, D even and the CPU has avx512_bf16, x's rows
// as bfloat16 pairs, pairs[p][i] = (x[i][2p], x[i][2p + 1]), for vdpbf16ps at twice float32's FMA rate (its products of
// bfloat16 values exact, as the widened float32 ones; sums in float32, in another order). `small`'s 4 x 6 x 512 on the
// avx512_bf16 EPYC without AMX, one thread: forward 1.23x, backward 1.16x; the bf16 training step 1.05x.
struct ColumnsOf {
  bool in_pairs;
  int64_t ld;  // T, or in pairs T rounded up to whole blocks (their columns zero)
  std::vector<float> transposed;
  std::vector<uint32_t> pairs;

  ColumnsOf(const at::Tensor& x, const at::Tensor& a)
      : in_pairs(kPairProducts && x.scalar_type() == at::kBFloat16 && a.scalar_type() == at::kBFloat16 &&
                 x.size(3) % 2 == 0 && x.stride(0) % 2 == 0 && x.stride(1) % 2 == 0 && x.stride(2) % 2 == 0 &&
                 x.storage_offset() % 2 == 0),
        ld(in_pairs ? (x.size(2) + kQueriesPerBlock - 1) / kQueriesPerBlock * kQueriesPerBlock : x.size(2)) {}

  // (b, h)'s head: x's rows `widened` (HeadOf) transposed, or its bfloat16 rows in pairs: the rows as (T, D / 2)
  // 32-bit values, transposed as float32's bits are (even strides and offset: whole pairs).
  void set(const at::Tensor& x, int64_t b, int64_t h, const HeadOf& widened) {
    const int64_t T_ = x.size(2), D = x.size(3);
    if (!in_pairs) {
      transposed.resize(D * T_);
      transpose_into(widened.data, widened.ld, T_, D, transposed.data(), T_);
      return;
    }
    pairs.assign(D / 2 * ld, 0u);
    const c10::BFloat16* rows = x.const_data_ptr<c10::BFloat16>() + b * x.stride(0) + h * x.stride(1);
    transpose_into(reinterpret_cast<const float*>(rows), x.stride(2) / 2, T_, D / 2,
                   reinterpret_cast<float*>(pairs.data()), ld);
  }

  // out (keys, kQueriesPerBlock) = a[:keys] x[first : first + rows]^T for (b, h)'s rows of a: `widened` (HeadOf) for
  // brgemm, a's own bfloat16 rows in pairs (which write all kQueriesPerBlock columns).
  void products(const at::Tensor& a, int64_t b, int64_t h, const HeadOf& widened, int64_t keys, int64_t first,
                int64_t rows, float* out) const {
    const int64_t D = a.size(3);
#ifdef SEEKSTACK_BF16_DOT
    if (in_pairs) {
      const c10::BFloat16* rows_a = a.const_data_ptr<c10::BFloat16>() + b * a.stride(0) + h * a.stride(1);
      const int64_t ld_a = a.stride(2);
      int64_t j = 0;
      for (; j + 4 <= keys; j += 4) {
        pair_products_rows<4>(rows_a + j * ld_a, ld_a, pairs.data() + first, ld, D, out + j * kQueriesPerBlock);
      }
      for (; j < keys; ++j) {
        pair_products_rows<1>(rows_a + j * ld_a, ld_a, pairs.data() + first, ld, D, out + j * kQueriesPerBlock);
      }
      return;
    }
#endif
    at::native::cpublas::brgemm(keys, rows, D, widened.ld, ld, kQueriesPerBlock, false, widened.data,
                                transposed.data() + first, out);
  }
};

// `rows` float32 rows of `cols` values, ld apart, into `to`'s rows from `offset`, ld_to apart: float32 or bfloat16.
void store_rows(const float* from, int64_t ld, int64_t rows, int64_t cols, at::Tensor& to, int64_t offset,
                int64_t ld_to) {
  for (int64_t i = 0; i < rows; ++i) {
    if (to.scalar_type() == at::kFloat) {
      std::memcpy(to.mutable_data_ptr<float>() + offset + i * ld_to, from + i * ld, cols * sizeof(float));
    } else {
      convert_row(from + i * ld, cols, to.mutable_data_ptr<c10::BFloat16>() + offset + i * ld_to);
    }
  }
}

// x (rows, cols) transposed into `to`'s rows from `offset`, ld_to apart: straight into a float32 tensor, through
// `buffer` into a bfloat16 one.
void transpose_to(const float* x, int64_t ld, int64_t rows, int64_t cols, at::Tensor& to, int64_t offset,
                  int64_t ld_to, std::vector<float>& buffer) {
  if (to.scalar_type() == at::kFloat) {
    transpose_into(x, ld, rows, cols, to.mutable_data_ptr<float>() + offset, ld_to);
    return;
  }
  buffer.resize(cols * rows);
  transpose_into(x, ld, rows, cols, buffer.data(), rows);
  store_rows(buffer.data(), rows, cols, rows, to, offset, ld_to);
}

// q, k (B, H, T, W), v (B, H, T, V) float32 or bfloat16 -> out (B, T, H, V) of their dtype, L (B, H, T) float32
// = scale m + log(sum_j exp(scale S_ij - scale m)).
std::tuple<at::Tensor, at::Tensor> causal_attention_training(const at::Tensor& q, const at::Tensor& k,
                                                             const at::Tensor& v, double scale) {
  check_causal_attention(q, k, v, true, false, "causal_attention_training", "");
  const int64_t B = q.size(0), H = q.size(1), T_ = q.size(2), W = q.size(3), V = v.size(3);
  at::Tensor out = at::empty({B, T_, H, V}, v.options()), lse = at::empty({B, H, T_}, q.options().dtype(at::kFloat));
  const float scale_f = static_cast<float>(scale);
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> values_t(V * T_), scores_t(T_ * kQueriesPerBlock);
    std::vector<float> out_t(V * kQueriesPerBlock), top(kQueriesPerBlock), total(kQueriesPerBlock);
    std::vector<float> q_rows, k_rows, v_rows, out_rows;  // a bfloat16 head's, in float32
    ColumnsOf queries(q, k);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const HeadOf Q(q, b, h, q_rows, !queries.in_pairs), K(k, b, h, k_rows, !queries.in_pairs), Vh(v, b, h, v_rows);
      queries.set(q, b, h, Q);
      transpose_into(Vh.data, Vh.ld, T_, V, values_t.data(), T_);
      for (int64_t first = 0; first < T_; first += kQueriesPerBlock) {
        const int64_t rows = std::min(kQueriesPerBlock, T_ - first), width = first + rows;
        queries.products(k, b, h, K, width, first, rows, scores_t.data());  // S^T = K[:width] Q^T
        mask_after_diagonal(first, width, scores_t.data());
        std::fill(top.begin(), top.end(), -std::numeric_limits<float>::infinity());
        std::fill(total.begin(), total.end(), 0.f);
        for (int64_t j = 0; j < width; ++j) {  // row maxima, a key row at a time
          const float* s = scores_t.data() + j * kQueriesPerBlock;
          over_row(
              rows,
              [&](int64_t i) {
                FloatVector s0, s1, m0, m1;
                load_step(s + i, s0, s1);
                load_step(top.data() + i, m0, m1);
                store_step(top.data() + i, at::vec::maximum(m0, s0), at::vec::maximum(m1, s1));
              },
              [&](int64_t i) { top[i] = std::max(top[i], s[i]); });
        }
        for (int64_t j = 0; j < width; ++j) {  // P^T = exp(scale S^T - scale m), unnormalised; the row sums
          float* s = scores_t.data() + j * kQueriesPerBlock;
          over_row(
              rows,
              [&](int64_t i) {
                FloatVector s0, s1, m0, m1, t0, t1;
                load_step(s + i, s0, s1);
                load_step(top.data() + i, m0, m1);
                load_step(total.data() + i, t0, t1);
                s0 = ((s0 - m0) * FloatVector(scale_f)).exp_u20();
                s1 = ((s1 - m1) * FloatVector(scale_f)).exp_u20();
                store_step(s + i, s0, s1);
                store_step(total.data() + i, t0 + s0, t1 + s1);
              },
              [&](int64_t i) {
                s[i] = std::exp((s[i] - top[i]) * scale_f);
                total[i] += s[i];
              });
        }
        // O^T (V, rows) = V^T[:, :width] P^T
        at::native::cpublas::brgemm(V, rows, width, T_, kQueriesPerBlock, kQueriesPerBlock, false, values_t.data(),
                                    scores_t.data(), out_t.data());
        float* L = lse.mutable_data_ptr<float>() + (b * H + h) * T_ + first;
        for (int64_t i = 0; i < rows; ++i) {
          L[i] = top[i] * scale_f + std::log(total[i]);
          total[i] = 1.f / total[i];
        }
        for (int64_t c = 0; c < V; ++c) {  // O^T's columns divided by the row sums
          float* o = out_t.data() + c * kQueriesPerBlock;
          over_row(
              rows,
              [&](int64_t i) {
                FloatVector o0, o1, t0, t1;
                load_step(o + i, o0, o1);
                load_step(total.data() + i, t0, t1);
                store_step(o + i, o0 * t0, o1 * t1);
              },
              [&](int64_t i) { o[i] *= total[i]; });
        }
        transpose_to(out_t.data(), kQueriesPerBlock, V, rows, out, ((b * T_ + first) * H + h) * V, H * V, out_rows);
      }
    }
  });
  return {out, lse};
}

// grad, out (B, H, T, V), lse (B, H, T) of causal_attention_training -> dq, dk (B, H, T, W), dv (B, H, T, V) in q's
// dtype, views of (B, T, H, *) tensors; a bfloat16 head's dK and dV summed in float32 rows, narrowed once. Query blocks from the last, whose keys are all T: its products write dK and dV, the others'
// add to them.
std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_attention_training_backward(
    const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, double scale) {
  check_causal_attention(q, k, v, true, false, "causal_attention_training_backward", "");
  const int64_t B = q.size(0), H = q.size(1), T_ = q.size(2), W = q.size(3), V = v.size(3);
  TORCH_CHECK(grad.sizes() == v.sizes() && out.sizes() == v.sizes() && grad.scalar_type() == q.scalar_type() &&
                  out.scalar_type() == q.scalar_type() && lse.scalar_type() == at::kFloat && lse.is_contiguous() &&
                  lse.sizes() == q.sizes().slice(0, 3),
              "causal_attention_training_backward: grad and out must be of v's shape ", v.sizes(), " and q's dtype ",
              q.scalar_type(), ", lse contiguous float32 (B, H, T), not grad ", grad.scalar_type(), grad.sizes(),
              ", out ", out.scalar_type(), out.sizes(), ", lse ", lse.scalar_type(), lse.sizes());
  const at::Tensor dO = grad.stride(-1) == 1 ? grad : grad.contiguous();
  TORCH_CHECK(out.stride(-1) == 1, "causal_attention_training_backward: out must be read along stride 1");
  at::Tensor grad_q = at::empty({B, T_, H, W}, q.options()), grad_k = at::empty({B, T_, H, W}, q.options()),
             grad_v = at::empty({B, T_, H, V}, q.options());
  const float scale_f = static_cast<float>(scale);
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> keys_t(W * T_), delta(T_);
    std::vector<float> scores_t(T_ * kQueriesPerBlock), grad_t(T_ * kQueriesPerBlock), grad_q_t(W * kQueriesPerBlock);
    std::vector<float> q_rows, k_rows, v_rows, grad_out_rows, out_rows, grad_q_rows;  // a bfloat16 head's, in float32
    const bool in_float32 = q.scalar_type() == at::kFloat;
    std::vector<float> grad_k_sums(in_float32 ? 0 : T_ * W), grad_v_sums(in_float32 ? 0 : T_ * V);
    ColumnsOf queries(q, k), grad_out(dO, v);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const HeadOf Q(q, b, h, q_rows), K(k, b, h, k_rows), Vh(v, b, h, v_rows, !grad_out.in_pairs),
          dOh(dO, b, h, grad_out_rows), O(out, b, h, out_rows);
      queries.set(q, b, h, Q);
      transpose_into(K.data, K.ld, T_, W, keys_t.data(), T_);
      grad_out.set(dO, b, h, dOh);
      for (int64_t i = 0; i < T_; ++i) {  // rowsum(dO O) = sum_j P_ij dP_ij
        float sum = 0.f;
        for (int64_t c = 0; c < V; ++c) sum += dOh.data[i * dOh.ld + c] * O.data[i * O.ld + c];
        delta[i] = sum;
      }
      const float* L = lse.const_data_ptr<float>() + (b * H + h) * T_;
      const int64_t dq_offset = (b * T_ * H + h) * W, dv_offset = (b * T_ * H + h) * V;
      // dK, dV summed over the query blocks in float32: a float32 tensor's own rows, else the head's sums
      float* dK = in_float32 ? grad_k.mutable_data_ptr<float>() + dq_offset : grad_k_sums.data();
      float* dV = in_float32 ? grad_v.mutable_data_ptr<float>() + dv_offset : grad_v_sums.data();
      const int64_t ld_dk = in_float32 ? H * W : W, ld_dv = in_float32 ? H * V : V;
      const int64_t last = ((T_ + kQueriesPerBlock - 1) / kQueriesPerBlock - 1) * kQueriesPerBlock;  // -64 at T = 0
      for (int64_t first = last; first >= 0; first -= kQueriesPerBlock) {
        const int64_t rows = std::min(kQueriesPerBlock, T_ - first), width = first + rows;
        queries.products(k, b, h, K, width, first, rows, scores_t.data());  // S^T = K[:width] Q^T
        mask_after_diagonal(first, width, scores_t.data());
        grad_out.products(v, b, h, Vh, width, first, rows, grad_t.data());  // dP^T (width, rows) = V[:width] dO^T
        for (int64_t j = 0; j < width; ++j) {  // P^T = exp(scale S^T - L), dS^T = scale P^T (dP^T - delta)
          float* s = scores_t.data() + j * kQueriesPerBlock;
          float* dp = grad_t.data() + j * kQueriesPerBlock;
          const float* Li = L + first;
          const float* delta_i = delta.data() + first;
          over_row(
              rows,
              [&](int64_t i) {
                FloatVector s0, s1, l0, l1, dp0, dp1, d0, d1;
                load_step(s + i, s0, s1);
                load_step(Li + i, l0, l1);
                load_step(dp + i, dp0, dp1);
                load_step(delta_i + i, d0, d1);
                const FloatVector p0 = (s0 * FloatVector(scale_f) - l0).exp_u20();
                const FloatVector p1 = (s1 * FloatVector(scale_f) - l1).exp_u20();
                store_step(s + i, p0, p1);
                store_step(dp + i, p0 * (dp0 - d0) * FloatVector(scale_f), p1 * (dp1 - d1) * FloatVector(scale_f));
              },
              [&](int64_t i) {
                s[i] = std::exp(s[i] * scale_f - Li[i]);
                dp[i] = s[i] * (dp[i] - delta_i[i]) * scale_f;
              });
        }
        const bool add = first != last;
        // dV[:width] (+)= P^T dO, dK[:width] (+)= dS^T Q, dQ^T = K^T[:, :width] dS^T
        at::native::cpublas::brgemm(width, V, rows, kQueriesPerBlock, dOh.ld, ld_dv, add, scores_t.data(),
                                    dOh.data + first * dOh.ld, dV);
        at::native::cpublas::brgemm(width, W, rows, kQueriesPerBlock, Q.ld, ld_dk, add, grad_t.data(),
                                    Q.data + first * Q.ld, dK);
        at::native::cpublas::brgemm(W, rows, width, T_, kQueriesPerBlock, kQueriesPerBlock, false, keys_t.data(),
                                    grad_t.data(), grad_q_t.data());
        transpose_to(grad_q_t.data(), kQueriesPerBlock, W, rows, grad_q, dq_offset + first * H * W, H * W,
                     grad_q_rows);
      }
      if (!in_float32) {
        store_rows(dK, ld_dk, T_, W, grad_k, dq_offset, H * W);
        store_rows(dV, ld_dv, T_, V, grad_v, dv_offset, H * V);
      }
    }
  });
  return {grad_q.transpose(1, 2), grad_k.transpose(1, 2), grad_v.transpose(1, 2)};
}

// RMSNorm (Zhang & Sennrich 2019): y = x r w with r = 1 / sqrt(mean(x^2) + eps) per row; r (n,) float32 kept for the
// backward. The weight W is T or float32 (a float32 parameter under autocast scaling bf16 rows); y is in x's dtype.
template <typename T, typename W>
void rms_norm_rows(const at::Tensor& x, const at::Tensor& weight, double eps, at::Tensor& y, at::Tensor& rstd) {
  const int64_t D = x.size(1);
  const T* x_data = x.const_data_ptr<T>();
  const W* w = weight.const_data_ptr<W>();
  T* y_data = y.mutable_data_ptr<T>();
  float* rstd_data = rstd.mutable_data_ptr<float>();
  at::parallel_for(0, x.size(0), kRowsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const T* xs = x_data + row * D;
      T* out = y_data + row * D;
      const float sum = fold_row(
          D, 0.f, std::plus<>(),
          [&](const FloatVector& squares, int64_t d) {
            FloatVector x0, x1;
            load_step(xs + d, x0, x1);
            return squares + x0 * x0 + x1 * x1;
          },
          [&](float squares, int64_t d) { return squares + float(xs[d]) * float(xs[d]); });
      // a row whose squares overflow float32 (values past ~1e19: an adapter's huge lora_alpha) has no scale: NaN, not
      // 1 / sqrt(inf) = 0, whose all-zero row read as a plain one; the NaN reaches its logits, and the engine ends it
      const float mean_square = sum / D;
      const float r = std::isinf(mean_square) ? std::numeric_limits<float>::quiet_NaN()
                                              : 1.f / std::sqrt(mean_square + static_cast<float>(eps));
      rstd_data[row] = r;
      over_row(
          D,
          [&](int64_t d) {
            FloatVector x0, x1, w0, w1;
            load_step(xs + d, x0, x1);
            load_step(w + d, w0, w1);
            store_step(out + d, x0 * FloatVector(r) * w0, x1 * FloatVector(r) * w1);
          },
          [&](int64_t d) { out[d] = static_cast<T>(float(xs[d]) * r * float(w[d])); });
    }
  });
}

// The backward of y = n w, n = x r, for the gradient dy: with gn = dy w, dx = r (gn - n mean(gn n)) and dw = sum over
// rows of dy n, summed per block of kRowsPerTask rows (a block to a thread), then over the blocks; `dw_blocks` null
// (a frozen weight: LoRA) skips dw.
template <typename T, typename W>
void rms_norm_backward_rows(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& rstd, at::Tensor& grad_x, float* dw_blocks) {
  const int64_t D = x.size(1);
  const T* dy_data = grad.const_data_ptr<T>();
  const T* x_data = x.const_data_ptr<T>();
  const W* w = weight.const_data_ptr<W>();
  const float* rstd_data = rstd.const_data_ptr<float>();
  T* dx_data = grad_x.mutable_data_ptr<T>();
  at::parallel_for(0, (x.size(0) + kRowsPerTask - 1) / kRowsPerTask, 1, [&](int64_t first_block, int64_t last_block) {
    for (int64_t block = first_block; block < last_block; ++block) {
      float* dw = dw_blocks == nullptr ? nullptr : dw_blocks + block * D;
      if (dw != nullptr) std::fill(dw, dw + D, 0.f);
      for (int64_t row = block * kRowsPerTask; row < std::min((block + 1) * kRowsPerTask, x.size(0)); ++row) {
        const T* dy = dy_data + row * D;
        const T* xs = x_data + row * D;
        T* dx = dx_data + row * D;
        const float r = rstd_data[row];
        const float dot = fold_row(
            D, 0.f, std::plus<>(),
            [&](const FloatVector& sum, int64_t d) {
              FloatVector dy0, dy1, x0, x1, w0, w1;
              load_step(dy + d, dy0, dy1);
              load_step(xs + d, x0, x1);
              load_step(w + d, w0, w1);
              return sum + dy0 * w0 * x0 + dy1 * w1 * x1;
            },
            [&](float sum, int64_t d) { return sum + float(dy[d]) * float(w[d]) * float(xs[d]); });
        // mean(gn n) = r mean(gn x); dx = r gn - x r^3 mean(gn x)
        const float mean = dot / D;
        const float x_scale = r * r * r * mean;
        over_row(
            D,
            [&](int64_t d) {
              FloatVector dy0, dy1, x0, x1, w0, w1;
              load_step(dy + d, dy0, dy1);
              load_step(xs + d, x0, x1);
              load_step(w + d, w0, w1);
              store_step(dx + d, FloatVector(r) * dy0 * w0 - x0 * FloatVector(x_scale),
                         FloatVector(r) * dy1 * w1 - x1 * FloatVector(x_scale));
              if (dw != nullptr)
                store_step(dw + d, FloatVector::loadu(dw + d) + dy0 * x0 * FloatVector(r),
                           FloatVector::loadu(dw + d + FloatVector::size()) + dy1 * x1 * FloatVector(r));
            },
            [&](int64_t d) {
              dx[d] = static_cast<T>(r * float(dy[d]) * float(w[d]) - float(xs[d]) * x_scale);
              if (dw != nullptr) dw[d] += float(dy[d]) * float(xs[d]) * r;
            });
      }
    }
  });
}

// x (..., D) as rows (n, D), and a weight (D,) in x's dtype, or float32 beside bfloat16 rows.
at::Tensor norm_rows(const at::Tensor& x, const at::Tensor& weight, const char* op) {
  const at::Tensor rows = x.reshape({-1, x.size(-1)});
  check_elementwise(rows, rows, op);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == rows.size(1) &&
                  (weight.scalar_type() == x.scalar_type() || weight.scalar_type() == at::kFloat),
              op, ": the weight must be (D,) in the rows' dtype or float32");
  return rows.contiguous();
}

// y shaped like x, not a view of rows (FSDP2 warns of a module output that is a view), and r (n,).
std::tuple<at::Tensor, at::Tensor> rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const at::Tensor x_c = norm_rows(x, weight, "rms_norm"), weight_c = weight.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options()), rstd = at::empty({x_c.size(0)}, x.options().dtype(at::kFloat));
  if (x.scalar_type() == at::kFloat) {
    rms_norm_rows<float, float>(x_c, weight_c, eps, y, rstd);
  } else if (weight.scalar_type() == at::kFloat) {
    rms_norm_rows<c10::BFloat16, float>(x_c, weight_c, eps, y, rstd);
  } else {
    rms_norm_rows<c10::BFloat16, c10::BFloat16>(x_c, weight_c, eps, y, rstd);
  }
  return {y, rstd};
}

// W^UQ RMSNorm(W^DQ x) for x (..., D): MLA's low-rank query (attention.py project_query) in one call, the
// decode_linear, rms_norm and decode_linear an eager step would make one by one on x's rows, so bitwise theirs.
at::Tensor latent_query_rows(const at::Tensor& x, const at::Tensor& down_proj, const at::Tensor& norm_weight,
                             double eps, const at::Tensor& up_proj, const std::optional<at::Tensor>& down_panels,
                             const std::optional<at::Tensor>& up_panels) {
  const at::Tensor latent = decode_linear(x.reshape({-1, x.size(-1)}), down_proj, down_panels);
  const at::Tensor query = decode_linear(std::get<0>(rms_norm(latent, norm_weight, eps)), up_proj, up_panels);
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = query.size(1);
  return query.view(shape);
}

// MLA's absorbed decode attention (attention.py attend_absorbed): softmax(scale q K^T + mask) K[:, :V] for the H x T
// query rows q of each sequence over its S cached keys K = [c^KV; k^R], which double as the values (their first V = C
// columns). The scores are rows_linear's products with the keys as the weight rows (each key read once for all rows);
// the softmax (exp as torch's flash SDPA takes it) and the weighted sum are float32. A row that sees no key is 0.
template <typename K, typename X>
void latent_attention_into(const at::Tensor& query, const at::Tensor& keys, const bool* mask, float scale,
                           at::Tensor& out) {
  const int64_t T_ = query.size(2), D = query.size(3), S = keys.size(1), V = out.size(3);
  const int64_t rows = query.size(1) * T_;  // row h T + t: query t of head h
  if (rows == 0) return;  // no query rows (T or H of 0): nothing to write, and a group of 0 rows would divide by 0
  const X* q_data = reinterpret_cast<const X*>(query.const_data_ptr());
  const K* k_data = weight_data<K>(keys);
  float* out_data = out.mutable_data_ptr<float>();
  constexpr float kUnseen = -std::numeric_limits<float>::infinity();
  // A task: a sequence's rows, in groups whose scores stay within kScoresPerGroup (a long cache, many heads).
  const int64_t group = std::clamp<int64_t>(kScoresPerGroup / std::max<int64_t>(S, 1), 1, rows);
  const int64_t groups = (rows + group - 1) / group;
  at::parallel_for(0, query.size(0) * groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(group * S), sums(group);
    std::vector<const X*> inputs(group);
    std::vector<float*> outputs(group);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / groups, first = task % groups * group, n = std::min(group, rows - first);
      const K* key = k_data + b * keys.stride(0);
      for (int64_t r = 0; r < n; ++r) {
        inputs[r] = q_data + (b * rows + first + r) * D;
        outputs[r] = scores.data() + r * S;
      }
      rows_times_weight(key, S, D, inputs.data(), outputs.data(), n);
      for (int64_t r = 0; r < n; ++r) {  // the scores become exp(s - max s), their sum kept
        float* s = outputs[r];
        const bool* seen = mask == nullptr ? nullptr : mask + (b * T_ + (first + r) % T_) * S;
        float top = kUnseen;
        for (int64_t j = 0; j < S; ++j) {
          s[j] = seen == nullptr || seen[j] ? s[j] * scale : kUnseen;
          top = std::max(top, s[j]);
        }
        if (top == kUnseen) top = 0.f;  // no key seen: every exp is 0, and so is the row
        sums[r] = fold_row(
            S, 0.f, std::plus<>(),
            [&](const FloatVector& sum, int64_t j) {
              FloatVector s0, s1;
              load_step(s + j, s0, s1);
              s0 = (s0 - FloatVector(top)).exp_u20();
              s1 = (s1 - FloatVector(top)).exp_u20();
              store_step(s + j, s0, s1);
              return sum + s0 + s1;
            },
            [&](float sum, int64_t j) { return sum + (s[j] = std::exp(s[j] - top)); });
      }
      for (int64_t r = 0; r < n; ++r) {  // o = sum_j p_j k_j[:V] / sum_j p_j, kStep values of o in registers
        const float* p = outputs[r];
        const float norm = sums[r] > 0.f ? 1.f / sums[r] : 0.f;
        float* o = out_data + (b * rows + first + r) * V;
        over_row(
            V,
            [&](int64_t c) {
              FloatVector o0(0.f), o1(0.f), k0, k1;
              for (int64_t j = 0; j < S; ++j) {
                load_step(key + j * D + c, k0, k1);
                o0 = at::vec::fmadd(FloatVector(p[j]), k0, o0);
                o1 = at::vec::fmadd(FloatVector(p[j]), k1, o1);
              }
              store_step(o + c, o0 * FloatVector(norm), o1 * FloatVector(norm));
            },
            [&](int64_t c) {
              float sum = 0.f;
              for (int64_t j = 0; j < S; ++j) sum += p[j] * widened(key[j * D + c]);
              o[c] = sum * norm;
            });
      }
    }
  });
}

// query (B, H, T, D), keys (B, S, D), mask (B, T, S) bool or None -> (B, H, T, V) in query's dtype.
at::Tensor latent_attention_rows(const at::Tensor& query, const at::Tensor& keys, const std::optional<at::Tensor>& mask,
                                 double scale, int64_t value_width) {
  TORCH_CHECK(query.device().is_cpu() && query.dim() == 4 &&
                  (query.scalar_type() == at::kFloat || query.scalar_type() == at::kBFloat16),
              "latent_attention_rows: query must be (B, H, T, D) float32 or bfloat16 on the CPU");
  const int64_t B = query.size(0), T_ = query.size(2), S = keys.size(1);
  TORCH_CHECK(keys.scalar_type() == query.scalar_type() && keys.dim() == 3 && keys.size(0) == B &&
                  keys.size(2) == query.size(3) && value_width <= query.size(3),
              "latent_attention_rows: keys ", keys.sizes(), " do not match the query ", query.sizes());
  const at::Tensor mask_c = mask.has_value() ? mask->to(at::kBool).expand({B, T_, S}).contiguous() : at::Tensor();
  // A cache's [:, :end] slice, its batch rows apart by the cache's length, is read in place (copied every step and
  // layer it cost ~30% of the attention, 8 x 1024 keys of 576): only each sequence's S x D keys must be contiguous.
  const at::Tensor keys_c = keys.stride(2) == 1 && keys.stride(1) == keys.size(2) ? keys : keys.contiguous();
  at::Tensor out = at::empty({B, query.size(1), T_, value_width}, query.options().dtype(at::kFloat));
  const bool* seen = mask.has_value() ? mask_c.const_data_ptr<bool>() : nullptr;
  if (query.scalar_type() == at::kBFloat16) {
    latent_attention_into<bf16_bits, BF16Input>(query.to(input_dtype<BF16Input>()).contiguous(), keys_c, seen, scale,
                                                out);
  } else {
    latent_attention_into<float, float>(query.contiguous(), keys_c, seen, scale, out);
  }
  return out.to(query.scalar_type());
}

// dx shaped like x, in x's dtype; dw in the weight's where `weight_grad` asks for it, else undefined (None).
std::tuple<at::Tensor, at::Tensor> rms_norm_backward(const at::Tensor& grad, const at::Tensor& x,
                                                     const at::Tensor& weight, const at::Tensor& rstd,
                                                     bool weight_grad) {
  const at::Tensor x_c = norm_rows(x, weight, "rms_norm_backward"), weight_c = weight.contiguous();
  const at::Tensor grad_c = grad.to(x.scalar_type()).reshape(x_c.sizes()).contiguous();
  at::Tensor grad_x = at::empty(x.sizes(), x.options());
  at::Tensor blocks =
      weight_grad
          ? at::empty({(x_c.size(0) + kRowsPerTask - 1) / kRowsPerTask, x_c.size(1)}, x.options().dtype(at::kFloat))
          : at::Tensor();
  float* dw_blocks = weight_grad ? blocks.mutable_data_ptr<float>() : nullptr;
  if (x.scalar_type() == at::kFloat) {
    rms_norm_backward_rows<float, float>(grad_c, x_c, weight_c, rstd, grad_x, dw_blocks);
  } else if (weight.scalar_type() == at::kFloat) {
    rms_norm_backward_rows<c10::BFloat16, float>(grad_c, x_c, weight_c, rstd, grad_x, dw_blocks);
  } else {
    rms_norm_backward_rows<c10::BFloat16, c10::BFloat16>(grad_c, x_c, weight_c, rstd, grad_x, dw_blocks);
  }
  return {grad_x, weight_grad ? blocks.sum(0).to(weight.scalar_type()) : at::Tensor()};
}

// The cross-entropy of logit rows z (n, V) against targets t (n,), float32 math over float32 or bfloat16 z, in three
// passes over a row while it is in cache: m = max_v z_v, lse = m + log sum_v exp(z_v - m), loss = lse - z_t; then the
// gradient (softmax(z) - onehot(t)) s, s the row's scale (1 / rows counted, 0 for an ignored row), written over z
// (torch's eager ops would make each pass into fresh memory, and widen bf16 logits to float32 and their gradient back)
// where `grad` asks for it; without, z is left as it is.
template <typename T>
void cross_entropy_rows_of(at::Tensor& logits, const int64_t* targets, const float* scale, bool grad, float* losses) {
  const int64_t V = logits.size(1);
  T* data = logits.mutable_data_ptr<T>();
  at::parallel_for(0, logits.size(0), 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      T* z = data + row * V;
      const float m = fold_row(
          V, -std::numeric_limits<float>::infinity(), Maximum(),
          [&](const FloatVector& most, int64_t d) {
            FloatVector z0, z1;
            load_step(z + d, z0, z1);
            return at::vec::maximum(most, at::vec::maximum(z0, z1));
          },
          [&](float most, int64_t d) { return std::max(most, float(z[d])); });
      const float exp_sum = fold_row(
          V, 0.f, std::plus<>(),
          [&](const FloatVector& sum, int64_t d) {
            FloatVector z0, z1;
            load_step(z + d, z0, z1);
            return sum + (z0 - FloatVector(m)).exp() + (z1 - FloatVector(m)).exp();
          },
          [&](float sum, int64_t d) { return sum + std::exp(float(z[d]) - m); });
      const float lse = m + std::log(exp_sum);
      const int64_t t = targets[row];
      const float target_logit = float(z[t]), s = scale[row];
      losses[row] = lse - target_logit;
      if (!grad) continue;
      over_row(
          V,
          [&](int64_t d) {
            FloatVector z0, z1;
            load_step(z + d, z0, z1);
            const FloatVector g0 = (z0 - FloatVector(lse)).exp() * FloatVector(s);
            const FloatVector g1 = (z1 - FloatVector(lse)).exp() * FloatVector(s);
            store_step(z + d, g0, g1);
          },
          [&](int64_t d) { z[d] = static_cast<T>(std::exp(float(z[d]) - lse) * s); });
      z[t] = static_cast<T>((std::exp(target_logit - lse) - 1.f) * s);
    }
  });
}

// Each row's loss (n,) float32; with `grad` the logits are overwritten with their gradient.
at::Tensor cross_entropy_rows(at::Tensor& logits, const at::Tensor& targets, const at::Tensor& scale, bool grad) {
  check_elementwise(logits, logits, "cross_entropy_rows");
  const int64_t rows = logits.size(0), V = logits.size(1);
  TORCH_CHECK(logits.is_contiguous(), "cross_entropy_rows: logits must be contiguous");
  TORCH_CHECK(targets.scalar_type() == at::kLong && targets.is_contiguous() && targets.numel() == rows &&
                  scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() == rows,
              "cross_entropy_rows: targets (int64) and scale (float32) must be contiguous, one per row");
  const int64_t* target_data = targets.const_data_ptr<int64_t>();
  for (int64_t row = 0; row < rows; ++row) {
    TORCH_CHECK(target_data[row] >= 0 && target_data[row] < V, "cross_entropy_rows: target ", target_data[row],
                " of row ", row, " is outside the vocabulary of ", V);
  }
  at::Tensor losses = at::empty({rows}, logits.options().dtype(at::kFloat));
  if (logits.scalar_type() == at::kBFloat16) {
    cross_entropy_rows_of<c10::BFloat16>(logits, target_data, scale.const_data_ptr<float>(), grad,
                                         losses.mutable_data_ptr<float>());
  } else {
    cross_entropy_rows_of<float>(logits, target_data, scale.const_data_ptr<float>(), grad,
                                 losses.mutable_data_ptr<float>());
  }
  return losses;
}

// The K largest of `values` (n,) by torch.topk(sorted=False)'s own loop on a CPU (ATen/native/TopKImpl.h): the same
// ties kept, the same order, NaN the largest.
void topk_indices(const float* values, int64_t n, int64_t k, int64_t* indices) {
  std::vector<float> kept(k);
  char* data[3] = {reinterpret_cast<char*>(kept.data()), reinterpret_cast<char*>(indices),
                   reinterpret_cast<char*>(const_cast<float*>(values))};
  const int64_t strides[3] = {0, 0, 0};
  at::native::topk_impl_loop<float, float>(1, 1, 1, k, n, /*largest=*/true, /*sorted=*/false, data, strides, 1);
}

// Router.select for a few float32 rows in one call, where its torch ops are a dozen of ~1-3 us each: choice = scores
// [+ bias]; with n_group > 1 the `topk_group` groups of the best score kept (a group's score its two best choices
// summed, `group_top2`, or its best), the others -inf; the `top_k` best choices -> experts (N, K) int64, as torch's
// ops pick them.
at::Tensor route_rows(const at::Tensor& scores, const std::optional<at::Tensor>& bias, int64_t n_group,
                      int64_t topk_group, bool group_top2, int64_t top_k) {
  TORCH_CHECK(scores.dim() == 2 && scores.scalar_type() == at::kFloat,
              "route_rows: scores must be (N, E) float32, not ", scores.scalar_type(), " ", scores.sizes());
  const int64_t N = scores.size(0), E = scores.size(1);
  TORCH_CHECK(n_group >= 1 && E % n_group == 0, "route_rows: n_group ", n_group, " does not divide the ", E,
              " experts");
  const int64_t width = E / n_group;
  TORCH_CHECK(topk_group >= 1 && topk_group <= n_group, "route_rows: topk_group ", topk_group,
              " is not between 1 and n_group ", n_group);
  TORCH_CHECK(!group_top2 || n_group == 1 || width >= 2,
              "route_rows: a group's top-2 sum needs 2 experts a group, not ", width);
  TORCH_CHECK(top_k >= 1 && top_k <= E, "route_rows: top_k ", top_k, " is not between 1 and the ", E, " experts");
  const at::Tensor scores_c = scores.contiguous();
  at::Tensor bias_c;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == E, "route_rows: bias must be (", E,
                ",) float32, not ", bias->scalar_type(), " ", bias->sizes());
    bias_c = bias->contiguous();
  }
  at::Tensor experts = at::empty({N, top_k}, scores.options().dtype(at::kLong));
  std::vector<float> choice(E), group_scores(n_group);
  std::vector<int64_t> kept(topk_group);
  for (int64_t row = 0; row < N; ++row) {
    const float* s = scores_c.const_data_ptr<float>() + row * E;
    for (int64_t e = 0; e < E; ++e) choice[e] = bias_c.defined() ? s[e] + bias_c.const_data_ptr<float>()[e] : s[e];
    if (n_group > 1) {
      for (int64_t g = 0; g < n_group; ++g) {
        const float* group = choice.data() + g * width;
        int64_t best[2];
        topk_indices(group, width, group_top2 ? 2 : 1, best);
        group_scores[g] = group_top2 ? group[best[0]] + group[best[1]] : group[best[0]];
      }
      topk_indices(group_scores.data(), n_group, topk_group, kept.data());
      for (int64_t g = 0; g < n_group; ++g) {
        if (std::find(kept.begin(), kept.end(), g) == kept.end()) {
          std::fill_n(choice.data() + g * width, width, -std::numeric_limits<float>::infinity());
        }
      }
    }
    topk_indices(choice.data(), E, top_k, experts.mutable_data_ptr<int64_t>() + row * top_k);
  }
  return experts;
}

// dW += dY^T X for a linear Y = X W^T, dW (out, in) float32, dY (n, out) and X (n, in) bfloat16: MKL's bf16 x bf16 ->
// float32 GEMM (in torch's x86 builds) sums the products in float32 straight into dW, where torch's bf16 `mm` rounds
// them to a fresh bf16 (out, in) that `add_` widens into another fresh float32 copy before adding it (`small`'s head,
// 16,384 x 384 from 384 rows: 7 against 17 ms, one thread). The symbol is weak: a torch without it (aarch64, a build
// without MKL) leaves it null, the op is not registered, and head_loss.py keeps `mm` + `add_`.
extern "C" void cblas_gemm_bf16bf16f32(int layout, int trans_a, int trans_b, int m, int n, int k, float alpha,
                                       const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta, float* c,
                                       int ldc) __attribute__((weak));

void add_weight_grad(at::Tensor& grad_weight, const at::Tensor& grad_out, const at::Tensor& input) {
  TORCH_CHECK(grad_weight.scalar_type() == at::kFloat && grad_weight.is_contiguous(),
              "add_weight_grad: dW must be contiguous float32, not ", grad_weight.scalar_type(), " of strides ",
              grad_weight.strides());
  TORCH_CHECK(grad_out.scalar_type() == at::kBFloat16 && input.scalar_type() == at::kBFloat16,
              "add_weight_grad: dY and X must be bfloat16, not ", grad_out.scalar_type(), " and ", input.scalar_type());
  TORCH_CHECK(grad_out.dim() == 2 && input.dim() == 2 && grad_out.size(0) == input.size(0) &&
                  grad_weight.sizes() == at::IntArrayRef({grad_out.size(1), input.size(1)}),
              "add_weight_grad: dW (out, in) += dY (n, out)^T X (n, in), not dW ", grad_weight.sizes(), ", dY ",
              grad_out.sizes(), ", X ", input.sizes());
  const int64_t rows = input.size(0), out = grad_out.size(1), in = input.size(1);
  TORCH_CHECK(std::max({rows, out, in}) <= std::numeric_limits<int>::max(), "add_weight_grad: dY ", grad_out.sizes(),
              " and X ", input.sizes(), " are past the BLAS's int sizes");
  if (grad_weight.numel() == 0) {
    return;  // nothing to add to, where MKL refuses its zero leading dimensions (and prints so)
  }
  const at::Tensor dy = grad_out.contiguous(), x = input.contiguous();
  constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;  // CBLAS_LAYOUT, CBLAS_TRANSPOSE
  cblas_gemm_bf16bf16f32(kRowMajor, kTrans, kNoTrans, out, in, rows, 1.f,
                         reinterpret_cast<const uint16_t*>(dy.const_data_ptr<c10::BFloat16>()), out,
                         reinterpret_cast<const uint16_t*>(x.const_data_ptr<c10::BFloat16>()), in, 1.f,
                         grad_weight.mutable_data_ptr<float>(), in);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(seekstack, m) {
  m.def("rows_linear(Tensor x, Tensor weight) -> Tensor");
  m.def("rows_linear_panels(Tensor x, Tensor weight, Tensor panels) -> Tensor");
  m.def("grouped_experts(Tensor x, Tensor experts, Tensor weights, Tensor gate_up_proj, Tensor down_proj) -> Tensor");
  m.def("swiglu(Tensor gate, Tensor up, Tensor? weights) -> Tensor");
  m.def(
      "feed_forward_rows(Tensor x, Tensor gate_proj, Tensor up_proj, Tensor down_proj, Tensor? gate_panels, "
      "Tensor? up_panels, Tensor? down_panels) -> Tensor");
  m.def("swiglu_backward(Tensor grad, Tensor gate, Tensor up, Tensor? weights) -> (Tensor, Tensor, Tensor)");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def(
      "latent_query_rows(Tensor x, Tensor down_proj, Tensor norm_weight, float eps, Tensor up_proj, Tensor? "
      "down_panels, Tensor? up_panels) -> Tensor");
  m.def("latent_attention_rows(Tensor query, Tensor keys, Tensor? mask, float scale, int value_width) -> Tensor");
  m.def("rms_norm_backward(Tensor grad, Tensor x, Tensor weight, Tensor rstd, bool weight_grad) -> (Tensor, Tensor)");
  m.def(
      "causal_attention_backward(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float scale) -> "
      "(Tensor, Tensor, Tensor)");
  m.def("packs_bfloat16(int width) -> bool", packs_bfloat16);  // no tensor to dispatch on: one kernel for all
  m.def("panel_layout() -> int[]", panel_layout);
  m.def("causal_attention(Tensor q, Tensor k, Tensor v, float scale) -> Tensor");
  m.def("causal_attention_training(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor, Tensor)");
  m.def(
      "causal_attention_training_backward(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "float scale) -> (Tensor, Tensor, Tensor)");
  m.def("cross_entropy_rows(Tensor(a!) logits, Tensor targets, Tensor scale, bool grad) -> Tensor");
  if (cblas_gemm_bf16bf16f32 != nullptr) {
    m.def("add_weight_grad(Tensor(a!) grad_weight, Tensor grad_out, Tensor input) -> ()");
  }
  m.def("route_rows(Tensor scores, Tensor? bias, int n_group, int topk_group, bool group_top2, int top_k) -> Tensor");
}

TORCH_LIBRARY_IMPL(seekstack, CPU, m) {
  m.impl("rows_linear", rows_linear);
  m.impl("rows_linear_panels", rows_linear_panels);
  m.impl("grouped_experts", grouped_experts);
  m.impl("swiglu", swiglu);
  m.impl("feed_forward_rows", feed_forward_rows);
  m.impl("swiglu_backward", swiglu_backward);
  m.impl("rms_norm", rms_norm);
  m.impl("latent_query_rows", latent_query_rows);
  m.impl("latent_attention_rows", latent_attention_rows);
  m.impl("rms_norm_backward", rms_norm_backward);
  m.impl("causal_attention_backward", causal_attention_backward);
  m.impl("causal_attention", causal_attention);
  m.impl("causal_attention_training", causal_attention_training);
  m.impl("causal_attention_training_backward", causal_attention_training_backward);
  m.impl("cross_entropy_rows", cross_entropy_rows);
  if (cblas_gemm_bf16bf16f32 != nullptr) {
    m.impl("add_weight_grad", add_weight_grad);
  }
  m.impl("route_rows", route_rows);
}
