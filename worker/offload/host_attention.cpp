// Decode attention over the host KV cache (small-VRAM mode), one pass per (row, KV head): scores over K, their
// softmax, then the weighted sum over V, each cache row read once front to back while the pair's scores stay in
// L1. Same contract as host_attention.decode_attention (float32 math over K/V in their storage dtype; int8
// with a float32 scale per row, head and token). inductor compiles that function into loop nests that walk V in
// head_dim chunks and put barriers between the passes; this kernel streams the cache instead (see
// benchmarks/host_attention.py). Built at start-up by torch.utils.cpp_extension with the host's vector ISA.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cstring>
#include <limits>
#include <optional>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kW = Vec::size();

inline Vec load(const float* p) { return Vec::loadu(p); }
inline Vec load(const c10::BFloat16* p) {
  Vec out;
  at::vec::load_to_float<c10::BFloat16>(p, out);
  return out;
}
inline Vec load(const c10::Half* p) {
  Vec out;
  at::vec::load_to_float<c10::Half>(p, out);
  return out;
}
inline Vec load(const int8_t* p) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  return at::vec::convert_int8_to_float<int8_t>(at::vec::Vectorized<int8_t>::loadu(p, kW));
#else
  alignas(64) float f[kW];
  for (int64_t i = 0; i < kW; ++i) f[i] = static_cast<float>(p[i]);
  return Vec::loadu(f);
#endif
}

struct Strides {
  int64_t row, head, token;
};

// One (row, KV head): its `group` query heads over `length` cached tokens. s: scratch of length floats.
template <typename T, int64_t D>
void attend_pair(const float* q, const T* k, const T* v, Strides ks, Strides vs, const float* k_scale,
                 const float* v_scale, int64_t scale_stride, const float* bias, float scale, int64_t group,
                 int64_t length, float* s, float* out) {
  constexpr int64_t N = D / kW;
  for (int64_t g = 0; g < group; ++g) {
    const float* qg = q + g * D;
    Vec qv[N];
    for (int64_t c = 0; c < N; ++c) qv[c] = Vec::loadu(qg + c * kW);
    float top = -std::numeric_limits<float>::infinity();
    for (int64_t t = 0; t < length; ++t) {
      const T* kt = k + t * ks.token;
      Vec acc = qv[0] * load(kt);
      for (int64_t c = 1; c < N; ++c) acc = at::vec::fmadd(qv[c], load(kt + c * kW), acc);
      float x = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc);
      x = x * (k_scale ? k_scale[t * scale_stride] * scale : scale) + bias[t];
      s[t] = x;
      top = x > top ? x : top;
    }
    // every position masked (cannot happen for a live row): zeros, as the weighted sum over nothing
    const float shift = top == -std::numeric_limits<float>::infinity() ? 0.f : top;
    at::vec::map([shift](Vec x) { return (x - Vec(shift)).exp(); }, s, s, length);
    const float total = at::vec::reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, s, length);
    Vec acc[N];
    for (int64_t c = 0; c < N; ++c) acc[c] = Vec(0.f);
    for (int64_t t = 0; t < length; ++t) {
      const T* vt = v + t * vs.token;
      const Vec p(v_scale ? s[t] * v_scale[t * scale_stride] : s[t]);
      for (int64_t c = 0; c < N; ++c) acc[c] = at::vec::fmadd(p, load(vt + c * kW), acc[c]);
    }
    const Vec inv(total > 0.f ? 1.f / total : 0.f);
    for (int64_t c = 0; c < N; ++c) (acc[c] * inv).store(out + g * D + c * kW);
  }
}

template <typename T, int64_t D>
void attend_all(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& v_scale,
                const at::Tensor& bias, double scale, at::Tensor& out) {
  const int64_t rows = keys.size(0), heads = keys.size(1), length = keys.size(2), group = q.size(2);
  const Strides ks{keys.stride(0), keys.stride(1), keys.stride(2)};
  const Strides vs{values.stride(0), values.stride(1), values.stride(2)};
  const T* kp = keys.const_data_ptr<T>();
  const T* vp = values.const_data_ptr<T>();
  const float* qp = q.const_data_ptr<float>();
  const float* bp = bias.const_data_ptr<float>();
  const float* ksp = k_scale ? k_scale->const_data_ptr<float>() : nullptr;
  const float* vsp = v_scale ? v_scale->const_data_ptr<float>() : nullptr;
  const Strides ss = k_scale ? Strides{k_scale->stride(0), k_scale->stride(1), k_scale->stride(2)} : Strides{0, 0, 0};
  const Strides vss = v_scale ? Strides{v_scale->stride(0), v_scale->stride(1), v_scale->stride(2)} : Strides{0, 0, 0};
  float* op = out.data_ptr<float>();
  at::parallel_for(0, rows * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(length);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = i / heads, h = i % heads;
      // the K and V scales share one stride layout in the cache; passed per tensor for the pointers only
      const float* kscale = ksp ? ksp + r * ss.row + h * ss.head : nullptr;
      const float* vscale = vsp ? vsp + r * vss.row + h * vss.head : nullptr;
      attend_pair<T, D>(qp + i * group * D, kp + r * ks.row + h * ks.head, vp + r * vs.row + h * vs.head, ks, vs,
                        kscale, vscale, ksp ? ss.token : vss.token, bp + r * bias.stride(0), static_cast<float>(scale),
                        group, length, scratch.data(), op + i * group * D);
    }
  });
}

template <typename T>
void dispatch_dim(int64_t d, const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                  const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& v_scale,
                  const at::Tensor& bias, double scale, at::Tensor& out) {
  switch (d) {
    case 16: return attend_all<T, 16>(q, keys, values, k_scale, v_scale, bias, scale, out);
    case 32: return attend_all<T, 32>(q, keys, values, k_scale, v_scale, bias, scale, out);
    case 64: return attend_all<T, 64>(q, keys, values, k_scale, v_scale, bias, scale, out);
    case 128: return attend_all<T, 128>(q, keys, values, k_scale, v_scale, bias, scale, out);
    case 256: return attend_all<T, 256>(q, keys, values, k_scale, v_scale, bias, scale, out);
    default: TORCH_CHECK(false, "host decode attention: head_dim ", d, " not built (16, 32, 64, 128, 256)");
  }
}

at::Tensor decode_attention(const at::Tensor& q_in, const at::Tensor& keys, const at::Tensor& values,
                            const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& v_scale,
                            const at::Tensor& bias_in, double scale) {
  TORCH_CHECK(q_in.dim() == 4 && keys.dim() == 4 && values.dim() == 4, "q, keys, values: 4-d");
  TORCH_CHECK(keys.stride(3) == 1 && values.stride(3) == 1, "keys/values: head_dim contiguous");
  TORCH_CHECK(keys.scalar_type() == values.scalar_type(), "keys and values: one dtype");
  TORCH_CHECK(k_scale.has_value() == (keys.scalar_type() == at::kChar), "scales exactly for int8 K/V");
  TORCH_CHECK(keys.sizes() == values.sizes(), "keys and values: one shape");
  TORCH_CHECK(q_in.size(0) == keys.size(0) && q_in.size(1) == keys.size(1) && q_in.size(3) == keys.size(3),
              "q [rows, kv_heads, group, head_dim] against keys [rows, kv_heads, length, head_dim]");
  TORCH_CHECK(bias_in.dim() == 2 && bias_in.size(0) == keys.size(0) && bias_in.size(1) == keys.size(2),
              "bias: [rows, length]");
  if (k_scale) {
    TORCH_CHECK(v_scale.has_value(), "int8 K/V: both scales");
    for (const at::Tensor* t : {&*k_scale, &*v_scale}) {
      TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 3 && t->size(0) == keys.size(0) &&
                      t->size(1) == keys.size(1) && t->size(2) == keys.size(2),
                  "scales: float32 [rows, kv_heads, length]");
    }
    TORCH_CHECK(k_scale->stride(2) == v_scale->stride(2), "K and V scales: one token stride");
  }
  const at::Tensor q = q_in.to(at::kFloat).contiguous();
  const at::Tensor bias = bias_in.to(at::kFloat).contiguous();
  at::Tensor out = at::empty(q.sizes(), q.options());
  const int64_t d = keys.size(3);
  switch (keys.scalar_type()) {
    case at::kFloat: dispatch_dim<float>(d, q, keys, values, k_scale, v_scale, bias, scale, out); break;
    case at::kBFloat16: dispatch_dim<c10::BFloat16>(d, q, keys, values, k_scale, v_scale, bias, scale, out); break;
    case at::kHalf: dispatch_dim<c10::Half>(d, q, keys, values, k_scale, v_scale, bias, scale, out); break;
    case at::kChar: dispatch_dim<int8_t>(d, q, keys, values, k_scale, v_scale, bias, scale, out); break;
    default: TORCH_CHECK(false, "host decode attention: unsupported K/V dtype ", keys.scalar_type());
  }
  return out;
}

// A decode step's new K/V: row r's token goes to position positions[r] of cache row r (keys [rows, kv_heads,
// max_len, head_dim], new_k [rows, kv_heads, head_dim], one dtype), with its int8 scales where given. One copy of
// head_dim elements per row and head, in parallel: index_put's advanced indexing is slow for what is under a MB.
void store_decode(const at::Tensor& keys, const at::Tensor& values, const std::optional<at::Tensor>& k_scale,
                  const std::optional<at::Tensor>& v_scale, const at::Tensor& new_k, const at::Tensor& new_v,
                  const std::optional<at::Tensor>& new_k_scale, const std::optional<at::Tensor>& new_v_scale,
                  const at::Tensor& positions_in) {
  TORCH_CHECK(keys.dim() == 4 && keys.sizes() == values.sizes(), "keys/values: [rows, kv_heads, max_len, head_dim]");
  TORCH_CHECK(new_k.dim() == 3 && new_k.sizes() == new_v.sizes() && new_k.size(0) == keys.size(0) &&
                  new_k.size(1) == keys.size(1) && new_k.size(2) == keys.size(3),
              "new_k/new_v: [rows, kv_heads, head_dim]");
  TORCH_CHECK(new_k.scalar_type() == keys.scalar_type() && new_v.scalar_type() == values.scalar_type(),
              "new K/V in the cache's dtype");
  TORCH_CHECK(keys.stride(3) == 1 && values.stride(3) == 1 && new_k.stride(2) == 1 && new_v.stride(2) == 1,
              "head_dim contiguous");
  TORCH_CHECK(k_scale.has_value() == new_k_scale.has_value() && v_scale.has_value() == new_v_scale.has_value() &&
                  k_scale.has_value() == (keys.scalar_type() == at::kChar),
              "scales exactly for int8 K/V, with theirs");
  if (k_scale) {
    for (const at::Tensor* t : {&*k_scale, &*v_scale, &*new_k_scale, &*new_v_scale}) {
      TORCH_CHECK(t->scalar_type() == at::kFloat, "scales: float32");
    }
    TORCH_CHECK(k_scale->dim() == 3 && k_scale->sizes() == v_scale->sizes() && k_scale->size(0) == keys.size(0) &&
                    k_scale->size(1) == keys.size(1) && k_scale->size(2) == keys.size(2),
                "scales: [rows, kv_heads, max_len]");
    TORCH_CHECK(new_k_scale->dim() == 2 && new_k_scale->sizes() == new_v_scale->sizes() &&
                    new_k_scale->size(0) == keys.size(0) && new_k_scale->size(1) == keys.size(1),
                "new scales: [rows, kv_heads]");
  }
  const at::Tensor positions = positions_in.to(at::kLong).contiguous();
  TORCH_CHECK(positions.dim() == 1 && positions.size(0) == keys.size(0), "positions: one per row");
  const int64_t rows = keys.size(0), heads = keys.size(1), max_len = keys.size(2);
  const int64_t* pos = positions.const_data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r) TORCH_CHECK(pos[r] >= 0 && pos[r] < max_len, "position out of the cache");
  const int64_t bytes = keys.size(3) * keys.element_size();
  auto* kp = static_cast<char*>(keys.data_ptr());
  auto* vp = static_cast<char*>(values.data_ptr());
  const auto* nkp = static_cast<const char*>(new_k.const_data_ptr());
  const auto* nvp = static_cast<const char*>(new_v.const_data_ptr());
  const int64_t es = keys.element_size();
  at::parallel_for(0, rows * heads, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = i / heads, h = i % heads, p = pos[r];
      std::memcpy(kp + (r * keys.stride(0) + h * keys.stride(1) + p * keys.stride(2)) * es,
                  nkp + (r * new_k.stride(0) + h * new_k.stride(1)) * es, bytes);
      std::memcpy(vp + (r * values.stride(0) + h * values.stride(1) + p * values.stride(2)) * es,
                  nvp + (r * new_v.stride(0) + h * new_v.stride(1)) * es, bytes);
      if (k_scale) {
        k_scale->data_ptr<float>()[r * k_scale->stride(0) + h * k_scale->stride(1) + p * k_scale->stride(2)] =
            new_k_scale->const_data_ptr<float>()[r * new_k_scale->stride(0) + h * new_k_scale->stride(1)];
        v_scale->data_ptr<float>()[r * v_scale->stride(0) + h * v_scale->stride(1) + p * v_scale->stride(2)] =
            new_v_scale->const_data_ptr<float>()[r * new_v_scale->stride(0) + h * new_v_scale->stride(1)];
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY(batchgen_host, m) {
  m.def("decode_attention(Tensor q, Tensor keys, Tensor values, Tensor? k_scale, Tensor? v_scale, Tensor bias, "
        "float scale) -> Tensor");
  m.impl("decode_attention", c10::DispatchKey::CPU, TORCH_FN(decode_attention));
  m.def("store_decode(Tensor(a!) keys, Tensor(b!) values, Tensor(c!)? k_scale, Tensor(d!)? v_scale, Tensor new_k, "
        "Tensor new_v, Tensor? new_k_scale, Tensor? new_v_scale, Tensor positions) -> ()");
  m.impl("store_decode", c10::DispatchKey::CPU, TORCH_FN(store_decode));
}
