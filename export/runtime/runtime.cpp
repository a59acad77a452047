// libkvdistill_runtime.so: the C ABI of export/runtime/kvdistill.h. Plain C++ on the CPU; it links the safetensors
// reader and nlohmann/json, and with KVD_RUNTIME_CUDA the framework-free launchers of kernels/kv_select.cuh and the
// CUDA runtime (no LibTorch). Every entry point catches everything and turns it into a status and a thread-local
// message.
#include "export/runtime/kvdistill.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <exception>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <sstream>
#include <string>
#include <vector>

#include <map>
#include <mutex>

#include <nlohmann/json.hpp>

#ifdef KVD_RUNTIME_CUDA
#include "kernels/kv_select.cuh"
#endif

#include "models/safetensors.h"

namespace {

thread_local std::string g_error;

struct Failure {
  kvd_status status;
  std::string message;
};

template <typename... A>
[[noreturn]] void fail(kvd_status s, const A&... parts) {
  std::ostringstream os;
  (os << ... << parts);
  throw Failure{s, os.str()};
}

template <typename F>
kvd_status guarded(F&& f) {
  try {
    f();
    g_error.clear();
    return KVD_OK;
  } catch (const Failure& e) {
    g_error = e.message;
    return e.status;
  } catch (const std::exception& e) {
    g_error = std::string("internal error: ") + e.what();
    return KVD_ERR_INTERNAL;
  } catch (...) {
    g_error = "internal error";
    return KVD_ERR_INTERNAL;
  }
}

float bf16_to_float(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

float f16_to_float(uint16_t h) {
  const uint32_t sign = (h >> 15) & 1u, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  float f;
  if (exp == 0) {
    f = std::ldexp(static_cast<float>(man), -24);  // subnormal (or zero)
  } else if (exp == 31) {
    f = man ? std::nanf("") : INFINITY;
  } else {
    f = std::ldexp(static_cast<float>(man | 0x400u), static_cast<int>(exp) - 25);
  }
  return sign ? -f : f;
}

// Element i of a row-major array of `dtype`, as float.
float load(const void* p, kvd_dtype dtype, int64_t i) {
  switch (dtype) {
    case KVD_DTYPE_F32: return static_cast<const float*>(p)[i];
    case KVD_DTYPE_BF16: return bf16_to_float(static_cast<const uint16_t*>(p)[i]);
    case KVD_DTYPE_F16: return f16_to_float(static_cast<const uint16_t*>(p)[i]);
  }
  return 0.0f;
}

struct Layer {
  std::vector<float> w1, b1, w2, bias;  // (G, D), (G), (H, G), (H)
};

}  // namespace

struct kvd_bundle {
  std::string dir;
  kvd_bundle_info info{};
  std::vector<Layer> layers;
#ifdef KVD_RUNTIME_CUDA
  // Per CUDA device: every layer's (W1ᵀ, b1, W2, bias) in one allocation, uploaded at the first kvd_cuda_score.
  mutable std::mutex device_mutex;
  mutable std::map<int, float*> device_weights;
  ~kvd_bundle() {
    for (auto& [dev, ptr] : device_weights) {
      int cur = 0;
      if (cudaGetDevice(&cur) == cudaSuccess && cudaSetDevice(dev) == cudaSuccess) {
        cudaFree(ptr);
        cudaSetDevice(cur);
      }
    }
  }
#endif
};

namespace {

std::vector<float> read_tensor(const kvd::SafetensorsFile& f, const std::string& name, std::vector<int64_t> shape) {
  const kvd::TensorView* v = f.find(name);
  if (!v) fail(KVD_ERR_CORRUPT, f.path(), ": tensor '", name, "' is missing; the bundle is corrupt, export it again");
  if (v->shape != shape) {
    std::ostringstream want, got;
    for (int64_t s : shape) want << s << ",";
    for (int64_t s : v->shape) got << s << ",";
    fail(KVD_ERR_CORRUPT, f.path(), ": tensor '", name, "' has shape (", got.str(), ") but the manifest's dims give (",
         want.str(), ")");
  }
  kvd_dtype dt;
  if (v->dtype == kvd::DType::F32) dt = KVD_DTYPE_F32;
  else if (v->dtype == kvd::DType::BF16) dt = KVD_DTYPE_BF16;
  else if (v->dtype == kvd::DType::F16) dt = KVD_DTYPE_F16;
  else fail(KVD_ERR_CORRUPT, f.path(), ": tensor '", name, "' is ", kvd::dtype_name(v->dtype), ", not F32, BF16 or F16");
  std::vector<float> out(static_cast<size_t>(v->numel()));
  for (size_t i = 0; i < out.size(); ++i) {
    // The mapping may be unaligned for the dtype: copy element by element.
    if (dt == KVD_DTYPE_F32) {
      std::memcpy(&out[i], v->data + 4 * i, 4);
    } else {
      uint16_t h;
      std::memcpy(&h, v->data + 2 * i, 2);
      out[i] = load(&h, dt, 0);
    }
  }
  return out;
}

void open_bundle(const std::string& dir, kvd_bundle& b) {
  const std::string mpath = dir + "/kvdistill.json";
  std::ifstream in(mpath, std::ios::binary);
  if (!in) fail(KVD_ERR_IO, mpath, ": cannot be opened; is ", dir, " a kvdistill bundle (`kvdistill export`)?");
  std::stringstream ss;
  ss << in.rdbuf();
  nlohmann::json m;
  try {
    m = nlohmann::json::parse(ss.str());
  } catch (const nlohmann::json::exception& e) {
    fail(KVD_ERR_CORRUPT, mpath, ": not valid JSON (", e.what(), "); the bundle is corrupt, export it again");
  }
  try {
    if (!m.is_object()) fail(KVD_ERR_CORRUPT, mpath, ": expected a JSON object; export the bundle again");
    const int64_t version = m.at("format_version").get<int64_t>();
    if (version != 1)
      fail(KVD_ERR_VERSION, mpath, ": format_version ", version, ", this runtime reads 1; export the bundle again with "
           "a matching kvdistill");
    const std::string kind = m.at("kind").get<std::string>();
    if (kind != "retention_gate")
      fail(KVD_ERR_UNSUPPORTED, mpath, ": a '", kind, "' bundle; this runtime scores retention_gate (TRIM-KV) bundles");
    b.info.format_version = static_cast<int32_t>(version);
    b.info.kind = KVD_KIND_RETENTION_GATE;
    b.info.num_layers = m.at("num_layers").get<int32_t>();
    b.info.num_kv_heads = m.at("num_kv_heads").get<int32_t>();
    b.info.hidden_size = m.at("hidden_size").get<int32_t>();
    b.info.gate_hidden = m.at("gate_hidden").get<int32_t>();
    if (b.info.num_layers <= 0 || b.info.num_kv_heads <= 0 || b.info.hidden_size <= 0 || b.info.gate_hidden <= 0)
      fail(KVD_ERR_CORRUPT, mpath, ": non-positive dims; the bundle is corrupt, export it again");
    const std::string id = m.at("base_model").at("id").get<std::string>();
    const std::string sha = m.at("base_model").at("config_sha256").get<std::string>();
    std::snprintf(b.info.base_model_id, sizeof b.info.base_model_id, "%s", id.c_str());
    std::snprintf(b.info.base_model_sha256, sizeof b.info.base_model_sha256, "%s", sha.c_str());
  } catch (const nlohmann::json::exception& e) {
    fail(KVD_ERR_CORRUPT, mpath, ": malformed manifest (", e.what(), "); the bundle is corrupt, export it again");
  }
  const std::string tpath = dir + "/gates.safetensors";
  if (!std::filesystem::exists(tpath)) fail(KVD_ERR_IO, tpath, ": not found; the bundle is incomplete, export it again");
  std::unique_ptr<kvd::SafetensorsFile> f;
  try {
    f = std::make_unique<kvd::SafetensorsFile>(tpath);
  } catch (const std::exception& e) {
    fail(KVD_ERR_CORRUPT, e.what(), "; the bundle is corrupt, export it again");
  }
  const int64_t D = b.info.hidden_size, G = b.info.gate_hidden, H = b.info.num_kv_heads;
  for (int32_t l = 0; l < b.info.num_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".self_attn.retention_gate.";
    Layer L;
    L.w1 = read_tensor(*f, p + "w1.weight", {G, D});
    L.b1 = read_tensor(*f, p + "w1.bias", {G});
    L.w2 = read_tensor(*f, p + "w2.weight", {H, G});
    L.bias = read_tensor(*f, p + "bias", {H});
    b.layers.push_back(std::move(L));
  }
  if (static_cast<int64_t>(f->tensors().size()) != 4 * static_cast<int64_t>(b.info.num_layers))
    fail(KVD_ERR_CORRUPT, tpath, ": holds ", f->tensors().size(), " tensors, the manifest's dims give ",
         4 * b.info.num_layers, "; the bundle is corrupt, export it again");
}

void need(bool ok, const char* what) {
  if (!ok) fail(KVD_ERR_INVALID_ARGUMENT, what);
}

}  // namespace

extern "C" {

int32_t kvd_runtime_abi_version(void) { return KVD_RUNTIME_ABI_VERSION; }

const char* kvd_last_error(void) { return g_error.c_str(); }

const char* kvd_status_name(kvd_status s) {
  switch (s) {
    case KVD_OK: return "KVD_OK";
    case KVD_ERR_INVALID_ARGUMENT: return "KVD_ERR_INVALID_ARGUMENT";
    case KVD_ERR_IO: return "KVD_ERR_IO";
    case KVD_ERR_CORRUPT: return "KVD_ERR_CORRUPT";
    case KVD_ERR_VERSION: return "KVD_ERR_VERSION";
    case KVD_ERR_UNSUPPORTED: return "KVD_ERR_UNSUPPORTED";
    case KVD_ERR_MODEL_MISMATCH: return "KVD_ERR_MODEL_MISMATCH";
    case KVD_ERR_DTYPE: return "KVD_ERR_DTYPE";
    case KVD_ERR_INTERNAL: return "KVD_ERR_INTERNAL";
  }
  return "KVD_ERR_UNKNOWN";
}

kvd_status kvd_bundle_open(const char* dir, kvd_bundle** out) {
  return guarded([&] {
    need(dir != nullptr && out != nullptr, "kvd_bundle_open: dir and out must not be NULL");
    *out = nullptr;
    auto b = std::make_unique<kvd_bundle>();
    b->dir = dir;
    open_bundle(dir, *b);
    *out = b.release();
  });
}

void kvd_bundle_close(kvd_bundle* bundle) { delete bundle; }

kvd_status kvd_bundle_get_info(const kvd_bundle* bundle, kvd_bundle_info* out) {
  return guarded([&] {
    need(bundle != nullptr && out != nullptr, "kvd_bundle_get_info: bundle and out must not be NULL");
    *out = bundle->info;
  });
}

kvd_status kvd_bundle_check_model(const kvd_bundle* bundle, int32_t num_layers, int32_t hidden_size,
                                  int32_t num_kv_heads) {
  return guarded([&] {
    need(bundle != nullptr, "kvd_bundle_check_model: bundle must not be NULL");
    const kvd_bundle_info& i = bundle->info;
    if (i.num_layers != num_layers || i.hidden_size != hidden_size || i.num_kv_heads != num_kv_heads)
      fail(KVD_ERR_MODEL_MISMATCH, bundle->dir, ": trained for model '", i.base_model_id, "' with ", i.num_layers,
           " layers, hidden size ", i.hidden_size, " and ", i.num_kv_heads, " KV heads, not ", num_layers, " / ",
           hidden_size, " / ", num_kv_heads, "; use the bundle trained for this model");
  });
}

kvd_status kvd_score_log_beta(const kvd_bundle* bundle, int32_t layer, const void* hidden, kvd_dtype dtype, int64_t n,
                              float* out) {
  return guarded([&] {
    need(bundle != nullptr && hidden != nullptr && out != nullptr,
         "kvd_score_log_beta: bundle, hidden and out must not be NULL");
    if (dtype != KVD_DTYPE_F32 && dtype != KVD_DTYPE_BF16 && dtype != KVD_DTYPE_F16)
      fail(KVD_ERR_DTYPE, "kvd_score_log_beta: dtype ", static_cast<int>(dtype),
           " is not KVD_DTYPE_F32, KVD_DTYPE_BF16 or KVD_DTYPE_F16");
    if (layer < 0 || layer >= bundle->info.num_layers)
      fail(KVD_ERR_INVALID_ARGUMENT, "kvd_score_log_beta: layer ", layer, " outside [0, ", bundle->info.num_layers, ")");
    need(n >= 0, "kvd_score_log_beta: n must be >= 0");
    const Layer& L = bundle->layers[static_cast<size_t>(layer)];
    const int64_t D = bundle->info.hidden_size, G = bundle->info.gate_hidden, H = bundle->info.num_kv_heads;
    std::vector<double> x(static_cast<size_t>(D)), h(static_cast<size_t>(G));
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t d = 0; d < D; ++d) x[d] = load(hidden, dtype, i * D + d);
      for (int64_t g = 0; g < G; ++g) {
        double a = L.b1[g];
        const float* w = &L.w1[static_cast<size_t>(g * D)];
        for (int64_t d = 0; d < D; ++d) a += static_cast<double>(w[d]) * x[d];
        h[g] = a / (1.0 + std::exp(-a));  // silu
      }
      for (int64_t k = 0; k < H; ++k) {
        double z = L.bias[k];
        const float* w = &L.w2[static_cast<size_t>(k * G)];
        for (int64_t g = 0; g < G; ++g) z += static_cast<double>(w[g]) * h[g];
        const double ls = z < 0 ? z - std::log1p(std::exp(z)) : -std::log1p(std::exp(-z));  // log_sigmoid
        out[k * n + i] = static_cast<float>(ls);
      }
    }
  });
}

kvd_status kvd_retention_score(const float* log_beta, const int64_t* positions, int32_t num_kv_heads, int64_t n,
                               int64_t next_position, float* scores) {
  return guarded([&] {
    need(log_beta != nullptr && positions != nullptr && scores != nullptr,
         "kvd_retention_score: log_beta, positions and scores must not be NULL");
    need(num_kv_heads > 0 && n >= 0, "kvd_retention_score: num_kv_heads must be > 0 and n >= 0");
    for (int32_t h = 0; h < num_kv_heads; ++h)
      for (int64_t i = 0; i < n; ++i)
        scores[h * n + i] = log_beta[h * n + i] * static_cast<float>(next_position + 1 - positions[i]);
  });
}

kvd_status kvd_select_topk(const float* scores, int32_t num_kv_heads, int64_t n, int64_t keep, int32_t* indices) {
  return guarded([&] {
    need(scores != nullptr && indices != nullptr, "kvd_select_topk: scores and indices must not be NULL");
    need(num_kv_heads > 0, "kvd_select_topk: num_kv_heads must be > 0");
    if (keep < 1 || keep > n) fail(KVD_ERR_INVALID_ARGUMENT, "kvd_select_topk: keep must lie in [1, n = ", n, "], got ", keep);
    if (n > INT32_MAX) fail(KVD_ERR_INVALID_ARGUMENT, "kvd_select_topk: n = ", n, " does not fit int32 indices");
    std::vector<int32_t> order(static_cast<size_t>(n));
    for (int32_t h = 0; h < num_kv_heads; ++h) {
      const float* s = scores + h * n;
      std::iota(order.begin(), order.end(), 0);
      // Highest first; among equal scores the lower index (as kvdistill's selectors break ties).
      std::partial_sort(order.begin(), order.begin() + keep, order.end(), [s](int32_t a, int32_t b) {
        return s[a] > s[b] || (s[a] == s[b] && a < b);
      });
      std::sort(order.begin(), order.begin() + keep);
      std::copy(order.begin(), order.begin() + keep, indices + h * keep);
    }
  });
}

kvd_status kvd_compact_flat(void* cache, int32_t num_kv_heads, int64_t n, int64_t row_bytes, const int32_t* indices,
                            int64_t keep) {
  return guarded([&] {
    need(cache != nullptr && indices != nullptr, "kvd_compact_flat: cache and indices must not be NULL");
    need(num_kv_heads > 0 && row_bytes > 0, "kvd_compact_flat: num_kv_heads and row_bytes must be > 0");
    if (keep < 0 || keep > n) fail(KVD_ERR_INVALID_ARGUMENT, "kvd_compact_flat: keep must lie in [0, n = ", n, "]");
    auto* base = static_cast<uint8_t*>(cache);
    for (int32_t h = 0; h < num_kv_heads; ++h) {
      const int32_t* idx = indices + h * keep;
      for (int64_t j = 0; j < keep; ++j) {
        if (idx[j] < 0 || idx[j] >= n || (j > 0 && idx[j] <= idx[j - 1]))
          fail(KVD_ERR_INVALID_ARGUMENT, "kvd_compact_flat: head ", h, ": indices must be ascending in [0, ", n,
               "), found ", idx[j], " at ", j);
      }
      uint8_t* head = base + static_cast<int64_t>(h) * n * row_bytes;
      // Ascending indices: idx[j] >= j, so a row is read before any later write can reach it.
      for (int64_t j = 0; j < keep; ++j)
        if (idx[j] != j) std::memmove(head + j * row_bytes, head + idx[j] * row_bytes, static_cast<size_t>(row_bytes));
    }
  });
}

kvd_status kvd_compact_paged(void* pool, int64_t num_pool_blocks, const int32_t* block_table, int64_t n,
                             int32_t num_kv_heads, int32_t tokens_per_block, int64_t row_bytes,
                             const int32_t* indices, int64_t keep) {
  return guarded([&] {
    need(pool != nullptr && block_table != nullptr && indices != nullptr,
         "kvd_compact_paged: pool, block_table and indices must not be NULL");
    need(num_kv_heads > 0 && tokens_per_block > 0 && row_bytes > 0,
         "kvd_compact_paged: num_kv_heads, tokens_per_block and row_bytes must be > 0");
    if (keep < 0 || keep > n) fail(KVD_ERR_INVALID_ARGUMENT, "kvd_compact_paged: keep must lie in [0, n = ", n, "]");
    const int64_t blocks = (n + tokens_per_block - 1) / tokens_per_block;
    for (int64_t b = 0; b < blocks; ++b)
      if (block_table[b] < 0 || block_table[b] >= num_pool_blocks)
        fail(KVD_ERR_INVALID_ARGUMENT, "kvd_compact_paged: block_table[", b, "] = ", block_table[b], " outside the pool's ",
             num_pool_blocks, " blocks");
    auto* base = static_cast<uint8_t*>(pool);
    auto row = [&](int32_t h, int64_t token) {
      const int64_t block = block_table[token / tokens_per_block], slot = token % tokens_per_block;
      return base + ((block * num_kv_heads + h) * tokens_per_block + slot) * row_bytes;
    };
    for (int32_t h = 0; h < num_kv_heads; ++h) {
      const int32_t* idx = indices + h * keep;
      for (int64_t j = 0; j < keep; ++j)
        if (idx[j] < 0 || idx[j] >= n || (j > 0 && idx[j] <= idx[j - 1]))
          fail(KVD_ERR_INVALID_ARGUMENT, "kvd_compact_paged: head ", h, ": indices must be ascending in [0, ", n,
               "), found ", idx[j], " at ", j);
      for (int64_t j = 0; j < keep; ++j)
        if (idx[j] != j) std::memmove(row(h, j), row(h, idx[j]), static_cast<size_t>(row_bytes));
    }
  });
}

#ifdef KVD_RUNTIME_CUDA
}  // extern "C"

namespace {

void cuda_ok(cudaError_t e, const char* who) {
  if (e != cudaSuccess) fail(KVD_ERR_INTERNAL, who, ": CUDA error ", cudaGetErrorString(e));
}

bool device_count_positive() {  // asked once per process: every kvd_cuda_ call checks it
  static const bool positive = [] {
    int count = 0;
    const bool ok = cudaGetDeviceCount(&count) == cudaSuccess && count > 0;
    cudaGetLastError();  // no device: clear the query's error state
    return ok;
  }();
  return positive;
}

// KVD_ERR_UNSUPPORTED without a device; KVD_ERR_INVALID_ARGUMENT for NULL or host memory.
void need_device_memory(const void* p, const char* who, const char* name) {
  if (!device_count_positive()) fail(KVD_ERR_UNSUPPORTED, who, ": no CUDA device is visible; use the CPU functions");
  if (!p) fail(KVD_ERR_INVALID_ARGUMENT, who, ": ", name, " must not be NULL");
  cudaPointerAttributes attr{};
  const cudaError_t e = cudaPointerGetAttributes(&attr, p);
  if (e != cudaSuccess || attr.type == cudaMemoryTypeUnregistered) {
    cudaGetLastError();  // clear the query's error state
    fail(KVD_ERR_INVALID_ARGUMENT, who, ": ", name, " is host memory; pass device memory (cudaMalloc), or use the CPU "
         "function");
  }
}

const float* device_weights(const kvd_bundle& b) {
  int dev = 0;
  cuda_ok(cudaGetDevice(&dev), "kvd_cuda_score");
  std::lock_guard<std::mutex> lock(b.device_mutex);
  auto it = b.device_weights.find(dev);
  if (it != b.device_weights.end()) return it->second;
  const int64_t D = b.info.hidden_size, G = b.info.gate_hidden, H = b.info.num_kv_heads;
  const int64_t per_layer = D * G + G + H * G + H;
  std::vector<float> host(static_cast<size_t>(per_layer * b.info.num_layers));
  for (size_t l = 0; l < b.layers.size(); ++l) {
    float* p = host.data() + l * per_layer;
    const Layer& L = b.layers[l];
    for (int64_t g = 0; g < G; ++g)
      for (int64_t d = 0; d < D; ++d) p[d * G + g] = L.w1[static_cast<size_t>(g * D + d)];  // W1ᵀ (D, G)
    std::copy(L.b1.begin(), L.b1.end(), p + D * G);
    std::copy(L.w2.begin(), L.w2.end(), p + D * G + G);
    std::copy(L.bias.begin(), L.bias.end(), p + D * G + G + H * G);
  }
  float* ptr = nullptr;
  cuda_ok(cudaMalloc(&ptr, host.size() * sizeof(float)), "kvd_cuda_score (weights)");
  const cudaError_t e = cudaMemcpy(ptr, host.data(), host.size() * sizeof(float), cudaMemcpyHostToDevice);
  if (e != cudaSuccess) {
    cudaFree(ptr);
    cuda_ok(e, "kvd_cuda_score (weights)");
  }
  b.device_weights[dev] = ptr;
  return ptr;
}

void check_select_dims(const char* who, int32_t batch, int32_t num_kv_heads, int64_t n, int64_t keep) {
  need(batch > 0 && num_kv_heads > 0, "batch and num_kv_heads must be > 0");
  if (keep < 1 || keep > n) fail(KVD_ERR_INVALID_ARGUMENT, who, ": keep must lie in [1, n = ", n, "], got ", keep);
  if (n > INT32_MAX) fail(KVD_ERR_INVALID_ARGUMENT, who, ": n = ", n, " does not fit int32 indices");
}

// A compaction of `batch` requests' (num_kv_heads) segments of n rows with kvd_cuda_select_topk's indices
// (TensorRT-LLM's layout: head h, request b at h · batch · keep + b · keep).
kvd::kernels::CompactArgs trtllm_compact(void* base, int32_t batch, int32_t num_kv_heads, int64_t n, int64_t row_bytes,
                                         const int32_t* indices, int64_t keep) {
  kvd::kernels::CompactArgs a;
  a.base = base;
  a.row_bytes = row_bytes;
  a.num_segments = batch * num_kv_heads;
  a.heads = num_kv_heads;
  a.n = n;
  a.indices = indices;
  a.idx_b_stride = keep;
  a.idx_h_stride = static_cast<int64_t>(batch) * keep;
  a.keep = keep;
  return a;
}

}  // namespace

extern "C" {

int32_t kvd_cuda_available(void) { return device_count_positive() ? 1 : 0; }

kvd_status kvd_cuda_score(const kvd_bundle* bundle, int32_t layer, const void* hidden, kvd_dtype dtype, int32_t batch,
                          int64_t n, const int64_t* positions, int64_t next_position, float* out, void* stream) {
  return guarded([&] {
    need(bundle != nullptr, "kvd_cuda_score: bundle must not be NULL");
    if (dtype != KVD_DTYPE_F32 && dtype != KVD_DTYPE_BF16 && dtype != KVD_DTYPE_F16)
      fail(KVD_ERR_DTYPE, "kvd_cuda_score: dtype ", static_cast<int>(dtype),
           " is not KVD_DTYPE_F32, KVD_DTYPE_BF16 or KVD_DTYPE_F16");
    if (layer < 0 || layer >= bundle->info.num_layers)
      fail(KVD_ERR_INVALID_ARGUMENT, "kvd_cuda_score: layer ", layer, " outside [0, ", bundle->info.num_layers, ")");
    need(batch >= 0 && n >= 0, "kvd_cuda_score: batch and n must be >= 0");
    if (bundle->info.gate_hidden > kvd::kernels::kMaxGateWidth)
      fail(KVD_ERR_UNSUPPORTED, "kvd_cuda_score: gate width ", bundle->info.gate_hidden, " exceeds the kernel's ",
           kvd::kernels::kMaxGateWidth, "; use kvd_score_log_beta");
    need_device_memory(hidden, "kvd_cuda_score", "hidden");
    need_device_memory(out, "kvd_cuda_score", "out");
    if (positions) need_device_memory(positions, "kvd_cuda_score", "positions");
    const int64_t D = bundle->info.hidden_size, G = bundle->info.gate_hidden, H = bundle->info.num_kv_heads;
    const float* w = device_weights(*bundle) + layer * (D * G + G + H * G + H);
    kvd::kernels::RetentionGateDevice g;
    g.w1t = w;
    g.b1 = w + D * G;
    g.w2 = w + D * G + G;
    g.bias = w + D * G + G + H * G;
    g.D = static_cast<int>(D), g.G = static_cast<int>(G), g.H = static_cast<int>(H);
    const auto dt = dtype == KVD_DTYPE_F32 ? kvd::kernels::RowDType::F32
                    : dtype == KVD_DTYPE_BF16 ? kvd::kernels::RowDType::BF16 : kvd::kernels::RowDType::F16;
    cuda_ok(kvd::kernels::retention_score(hidden, dt, batch, n, g, positions, n, next_position, out,
                                          static_cast<cudaStream_t>(stream)),
            "kvd_cuda_score");
  });
}

kvd_status kvd_cuda_select_topk(const float* scores, int32_t batch, int32_t num_kv_heads, int64_t n, int64_t keep,
                                int32_t* indices, void* stream) {
  return guarded([&] {
    need_device_memory(scores, "kvd_cuda_select_topk", "scores");
    need_device_memory(indices, "kvd_cuda_select_topk", "indices");
    check_select_dims("kvd_cuda_select_topk", batch, num_kv_heads, n, keep);
    kvd::kernels::SelectArgs a;
    a.scores = scores;
    a.score_stride = n;
    a.num_segments = batch * num_kv_heads;
    a.heads = num_kv_heads;
    a.n = n;
    a.keep = keep;
    a.indices = indices;
    a.out_b_stride = keep;                       // TensorRT-LLM: (H, batch · keep)
    a.out_h_stride = static_cast<int64_t>(batch) * keep;
    cuda_ok(kvd::kernels::select_rows(a, static_cast<cudaStream_t>(stream)), "kvd_cuda_select_topk");
  });
}

kvd_status kvd_cuda_compact_flat(void* cache, int32_t batch, int32_t num_kv_heads, int64_t n, int64_t row_bytes,
                                 const int32_t* indices, int64_t keep, void* stream) {
  return guarded([&] {
    need_device_memory(cache, "kvd_cuda_compact_flat", "cache");
    need_device_memory(indices, "kvd_cuda_compact_flat", "indices");
    check_select_dims("kvd_cuda_compact_flat", batch, num_kv_heads, n, keep);
    need(row_bytes > 0, "kvd_cuda_compact_flat: row_bytes must be > 0");
    kvd::kernels::CompactArgs a = trtllm_compact(cache, batch, num_kv_heads, n, row_bytes, indices, keep);
    a.segment_rows = n;
    cuda_ok(kvd::kernels::compact_rows(a, static_cast<cudaStream_t>(stream)), "kvd_cuda_compact_flat");
  });
}

kvd_status kvd_cuda_compact_paged(void* pool, const int32_t* block_tables, int64_t max_blocks, int32_t batch, int64_t n,
                                  int32_t num_kv_heads, int32_t tokens_per_block, int64_t row_bytes,
                                  const int32_t* indices, int64_t keep, void* stream) {
  return guarded([&] {
    need_device_memory(pool, "kvd_cuda_compact_paged", "pool");
    need_device_memory(block_tables, "kvd_cuda_compact_paged", "block_tables");
    need_device_memory(indices, "kvd_cuda_compact_paged", "indices");
    check_select_dims("kvd_cuda_compact_paged", batch, num_kv_heads, n, keep);
    need(tokens_per_block > 0 && row_bytes > 0, "kvd_cuda_compact_paged: tokens_per_block and row_bytes must be > 0");
    if (max_blocks * tokens_per_block < n)
      fail(KVD_ERR_INVALID_ARGUMENT, "kvd_cuda_compact_paged: ", max_blocks, " blocks of ", tokens_per_block,
           " tokens cannot hold n = ", n);
    kvd::kernels::CompactArgs a = trtllm_compact(pool, batch, num_kv_heads, n, row_bytes, indices, keep);
    a.block_table = block_tables;
    a.block_table_stride = max_blocks;
    a.tokens_per_block = tokens_per_block;
    cuda_ok(kvd::kernels::compact_rows(a, static_cast<cudaStream_t>(stream)), "kvd_cuda_compact_paged");
  });
}

}  // extern "C"
#else
int32_t kvd_cuda_available(void) { return 0; }

#define KVD_NO_CUDA(name)                                                                                       \
  guarded([] { fail(KVD_ERR_UNSUPPORTED, name ": this runtime was built without CUDA; use the CPU functions"); })
kvd_status kvd_cuda_score(const kvd_bundle*, int32_t, const void*, kvd_dtype, int32_t, int64_t, const int64_t*, int64_t,
                          float*, void*) {
  return KVD_NO_CUDA("kvd_cuda_score");
}
kvd_status kvd_cuda_select_topk(const float*, int32_t, int32_t, int64_t, int64_t, int32_t*, void*) {
  return KVD_NO_CUDA("kvd_cuda_select_topk");
}
kvd_status kvd_cuda_compact_flat(void*, int32_t, int32_t, int64_t, int64_t, const int32_t*, int64_t, void*) {
  return KVD_NO_CUDA("kvd_cuda_compact_flat");
}
kvd_status kvd_cuda_compact_paged(void*, const int32_t*, int64_t, int32_t, int64_t, int32_t, int32_t, int64_t,
                                  const int32_t*, int64_t, void*) {
  return KVD_NO_CUDA("kvd_cuda_compact_paged");
}
#undef KVD_NO_CUDA

}  // extern "C"
#endif
