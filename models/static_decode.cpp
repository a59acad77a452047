#include "models/static_decode.h"

#include <algorithm>
#include <map>
#include <optional>

#include <torch/torch.h>

#include "common/error.h"
#include "models/device.h"
#include "models/kv_cache.h"
#include "models/model.h"

#if KVD_WITH_CUDA
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "models/cuda_stream.h"
#endif

namespace kvd {

StaticDecodeState make_static_decode(const Model& model, const KVCache& cache, const std::vector<int64_t>& first,
                                     int64_t steps) {
  torch::NoGradGuard no_grad;
  const char* who = "make_static_decode";
  const int64_t B = cache.batch(), Hkv = cache.num_kv_heads(), hd = cache.head_dim(), L = cache.num_layers();
  KVD_CHECK(static_cast<int64_t>(first.size()) == B, who, ": ", first.size(), " first tokens for a batch of ", B);
  KVD_CHECK(steps >= 1, who, ": steps must be >= 1, got ", steps);
  KVD_CHECK(cache.dtype() == model.dtype() && cache.device() == model.device() && L == model.config().num_layers,
            who, ": the cache does not belong to this model");
  int64_t longest = 0;
  for (int64_t l = 0; l < L; ++l) longest = std::max(longest, cache.max_length(l));
  StaticDecodeState s;
  s.batch = B;
  s.kv_heads = Hkv;
  s.head_dim = hd;
  s.capacity = longest + steps;
  s.max_steps = steps;
  const int64_t C = s.capacity, S = B * Hkv;
  const auto kv_opt = torch::TensorOptions().dtype(model.dtype()).device(model.device());
  const auto lopt = torch::TensorOptions().dtype(torch::kLong).device(model.device());
  s.start = torch::arange(S, lopt) * C;  // (B * H_kv)
  for (int64_t l = 0; l < L; ++l) {
    const KVLayerView kv = cache.layer(l);  // (B, H_kv, n, hd) padded to the longest head
    at::Tensor k = torch::zeros({B, Hkv, C, hd}, kv_opt), v = torch::zeros({B, Hkv, C, hd}, kv_opt);
    at::Tensor pos = torch::full({B, Hkv, C}, -1, lopt);
    if (kv.n > 0) {
      k.narrow(2, 0, kv.n).copy_(kv.k);
      v.narrow(2, 0, kv.n).copy_(kv.v);
      pos.narrow(2, 0, kv.n).copy_(kv.valid.defined() ? torch::where(kv.valid, kv.pos, torch::full_like(kv.pos, -1)) : kv.pos);
    }
    s.k.push_back(k.view({S * C, hd}));
    s.v.push_back(v.view({S * C, hd}));
    s.pos.push_back(pos.view({S * C}));
    s.len0.push_back(cache.lengths(l));
    s.len.push_back(host_ints(cache.lengths(l), model.device()));  // (B * H_kv)
    s.row_state.push_back(cache.row_state(l));
    s.payload.emplace_back();
    for (const PayloadColumn& col : cache.payload_columns()) {  // the same slots as the entries
      at::Tensor c = torch::full({B, Hkv, C}, col.fill, lopt.dtype(col.dtype));  // (B, H_kv, C)
      if (kv.n > 0) c.narrow(2, 0, kv.n).copy_(kv.payload.at(col.name));
      s.payload.back().push_back(c.view({S * C}));
    }
  }
  s.payload_columns = cache.payload_columns();
  s.next0 = cache.next_positions();
  s.tok = host_ints(first, model.device()).view({B, 1});     // (B, 1)
  s.qpos = host_ints(s.next0, model.device()).view({B, 1});  // (B, 1)
  s.history = torch::zeros({steps, B}, lopt);                                    // (steps, B)
  s.step = torch::zeros({1}, lopt);
  return s;
}

void attach_evictor(StaticDecodeState& s, std::shared_ptr<StaticStepEvictor> evictor, const KVCache& cache,
                    const std::vector<bool>& alive, const std::vector<int64_t>& limit, const std::vector<int64_t>& eos) {
  const int64_t B = s.batch;
  KVD_CHECK(evictor, "attach_evictor: no evictor");
  KVD_CHECK(static_cast<int64_t>(alive.size()) == B && static_cast<int64_t>(limit.size()) == B, "attach_evictor: ",
            alive.size(), " / ", limit.size(), " row flags for a batch of ", B);
  const c10::Device dev = s.tok.device();
  std::vector<int64_t> a(alive.begin(), alive.end());
  s.evictor = std::move(evictor);
  s.evictor->attach(s);
  s.alive = host_ints(a, dev).gt(0);  // (B)
  s.fed = torch::zeros({B}, torch::TensorOptions().dtype(torch::kLong).device(dev));  // (B)
  KVD_CHECK(cache.batch() == B && cache.next_positions() == s.next0, "attach_evictor: the cache is not the state's");
  std::vector<int64_t> held(B);
  for (int64_t b = 0; b < B; ++b) held[b] = cache.row_bytes(b) / cache.bytes_per_entry();
  s.entries = host_ints(held, dev);                           // (B)
  s.peak = s.entries.clone();                                 // (B)
  s.peak_total = s.entries.sum().view({1});                   // (1)
  s.limit = host_ints(limit, dev);    // (B)
  s.eos = host_ints(eos, dev);        // (E)
}

void add_static_payload(StaticDecodeState& s, const PayloadColumn& col) {
  for (const PayloadColumn& c : s.payload_columns)
    if (c.name == col.name) {
      KVD_CHECK(c.dtype == col.dtype, "add_static_payload: column '", col.name, "' exists with another dtype");
      return;
    }
  const int64_t slots = s.batch * s.kv_heads * s.capacity;
  const auto opt = torch::TensorOptions().dtype(col.dtype).device(s.start.device());
  s.payload_columns.push_back(col);
  for (std::vector<at::Tensor>& layer : s.payload) layer.push_back(torch::full({slots}, col.fill, opt));
}

int64_t static_decode_bytes(const KVCache& cache, int64_t steps) {
  int64_t longest = 0;
  for (int64_t l = 0; l < cache.num_layers(); ++l) longest = std::max(longest, cache.max_length(l));
  const int64_t slots = cache.num_layers() * cache.batch() * cache.num_kv_heads() * (longest + steps);
  int64_t per_slot = cache.bytes_per_entry() + 8;  // K + V, and an int64 position
  for (const PayloadColumn& c : cache.payload_columns()) per_slot += static_cast<int64_t>(c10::elementSize(c.dtype));
  return slots * per_slot;
}

bool static_decode_fits(const KVCache& cache, int64_t steps) {
#if KVD_WITH_CUDA
  if (cache.device().is_cuda()) {
    c10::cuda::CUDAGuard guard(cache.device());
    size_t free = 0, total = 0;
    if (cudaMemGetInfo(&free, &total) != cudaSuccess) return false;
    // What the caching allocator holds but no tensor uses is free for the state too; the driver's count leaves it
    // out.
    const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(c10::cuda::current_device());
    const int64_t cached = stats.reserved_bytes[0].current - stats.allocated_bytes[0].current;
    return static_decode_bytes(cache, steps) <= (static_cast<int64_t>(free) + std::max<int64_t>(0, cached)) / 2;
  }
#endif
  (void)steps;
  return true;
}

namespace {

// write_back for a state whose evictor emptied slots (pos -1); T the most steps a row fed.
void write_back_evicted(const StaticDecodeState& s, KVCache& cache, const std::vector<int64_t>& fed, int64_t T) {
  const int64_t B = s.batch, Hkv = s.kv_heads, hd = s.head_dim, C = s.capacity, S = B * Hkv;
  const c10::Device dev = s.start.device();
  const auto lopt = torch::TensorOptions().dtype(torch::kLong).device(dev);
  const at::Tensor slot = torch::arange(C, lopt).view({1, C});                  // (1, C)
  const at::Tensor fed_d = host_ints(fed, dev).view({B, 1, 1});   // (B, 1, 1)
  // The peaks step-by-step eviction reaches (a layer's appended entries count before its eviction), counted on the
  // device while decoding.
  {
    const at::Tensor pk = torch::cat({s.peak, s.peak_total}).to(torch::kCPU).contiguous();  // (B + 1)
    const int64_t* p = pk.data_ptr<int64_t>();
    std::vector<int64_t> rows(B);
    for (int64_t b = 0; b < B; ++b) rows[b] = p[b] * cache.bytes_per_entry();
    cache.raise_peaks(rows, p[B] * cache.bytes_per_entry());
  }
  for (const PayloadColumn& col : s.payload_columns) cache.add_payload(col.name, col.dtype, col.fill);
  for (int64_t l = 0; l < static_cast<int64_t>(s.k.size()); ++l) {
    if (!s.row_state[l].empty()) cache.set_row_state(l, s.row_state[l]);
    const at::Tensor pos = s.pos[l].view({S, C});                                           // (S, C)
    const at::Tensor len0 = host_ints(s.len0[l], dev).view({S, 1});  // (S, 1)
    // 1. The entries held before decoding that the evictor emptied leave the cache (indices = slots, in order).
    const at::Tensor held = slot.lt(len0).logical_and(pos.ge(0));  // (S, C)
    at::Tensor tail;  // (S, T) the decoded entries that survive (steps each row fed)
    at::Tensor step_slot;  // (S, T) their slots
    if (T > 0) {
      const at::Tensor i = torch::arange(T, lopt).view({1, T});  // (1, T)
      step_slot = (len0 + i).clamp_max(C - 1);                    // (S, T)
      tail = i.lt(fed_d.view({B, 1}).repeat_interleave(Hkv, 0)).logical_and(pos.gather(1, step_slot).ge(0));
    }
    // One read-back of both counts per layer.
    const at::Tensor counts = torch::stack({held.sum(1), T > 0 ? tail.sum(1) : torch::zeros({S}, lopt)})
                                  .to(torch::kCPU).contiguous();  // (2, S)
    const int64_t* c = counts.data_ptr<int64_t>();
    const std::vector<int64_t> kept(c, c + S), gained(c + S, c + 2 * S);
    if (kept != s.len0[l]) {
      std::vector<int64_t> off(S + 1, 0);
      for (int64_t r = 0; r < S; ++r) off[r + 1] = off[r] + kept[r];
      const at::Tensor idx = held.nonzero().select(1, 1).contiguous();  // (Σ kept) slot of each kept entry, row-major
      cache.keep(l, RaggedIndices{idx, torch::tensor(off, torch::kLong)}, IndexCheck::ByConstruction);
    }
    if (T == 0) continue;
    // 2. Each head gains its own surviving decoded entries, in step order: right-aligned in (B, H_kv, T) with
    // T - gained[r] leading slots of padding.
    const at::Tensor order =
        std::get<1>(tail.logical_not().to(torch::kInt).sort(std::optional<bool>(true), 1, false));  // (S, T)
    std::vector<int64_t> lead(S);
    for (int64_t r = 0; r < S; ++r) lead[r] = T - gained[r];
    const at::Tensor i = torch::arange(T, lopt).view({1, T});                                 // (1, T)
    const at::Tensor pick = order.gather(1, (i - host_ints(lead, dev).view({S, 1})).clamp_min(0));  // (S, T)
    const at::Tensor src = step_slot.gather(1, pick);                                                 // (S, T)
    const at::Tensor rows = (s.start.view({S, 1}) + src).flatten();                                  // (S * T)
    const at::Tensor k = s.k[l].index_select(0, rows).view({B, Hkv, T, hd});  // (B, H_kv, T, hd)
    const at::Tensor v = s.v[l].index_select(0, rows).view({B, Hkv, T, hd});
    const at::Tensor p = pos.gather(1, src).view({B, Hkv, T});                 // (B, H_kv, T)
    cache.append(l, k, v, p, lead);
    for (size_t c = 0; c < s.payload_columns.size(); ++c)  // each decoded entry's value, from its slot
      cache.set_payload_tail(l, s.payload_columns[c].name, s.payload[l][c].index_select(0, rows).view({B, Hkv, T}), lead);
  }
  cache.advance(fed);
}

}  // namespace

void write_back(const StaticDecodeState& s, KVCache& cache, const std::vector<int64_t>& fed) {
  torch::NoGradGuard no_grad;
  const int64_t B = s.batch, Hkv = s.kv_heads, hd = s.head_dim;
  KVD_CHECK(cache.batch() == B, "write_back: the cache has batch ", cache.batch(), ", the state ", B);
  KVD_CHECK(static_cast<int64_t>(fed.size()) == B, "write_back: ", fed.size(), " counts for a batch of ", B);
  KVD_CHECK(cache.next_positions() == s.next0, "write_back: the cache moved since the state was made from it");
  int64_t T = 0;
  for (int64_t f : fed) {
    KVD_CHECK(f >= 0 && f <= s.max_steps, "write_back: a row fed ", f, " tokens, outside [0, ", s.max_steps, "]");
    T = std::max(T, f);
  }
  if (s.evictor) {
    write_back_evicted(s, cache, fed, T);
    return;
  }
  if (T == 0) return;
  // Row b's decoded entries are left-padded to T: lead[b] = T - fed[b] padding entries, never stored.
  std::vector<int64_t> lead(B);
  for (int64_t b = 0; b < B; ++b) lead[b] = T - fed[b];
  const auto lopt = torch::TensorOptions().dtype(torch::kLong).device(s.start.device());
  at::Tensor t = torch::arange(T, lopt).view({1, T});                               // (1, T)
  at::Tensor ld = host_ints(lead, s.start.device()).view({B, 1});  // (B, 1)
  at::Tensor i = (t - ld).clamp_min(0);                                              // (B, T) decode step of each slot
  at::Tensor first = host_ints(s.next0, s.start.device()).view({B, 1});  // (B, 1)
  at::Tensor positions = torch::where(t.ge(ld), first + i, torch::full_like(i, -1));  // (B, T)
  for (int64_t l = 0; l < static_cast<int64_t>(s.k.size()); ++l) {
    at::Tensor len0 = host_ints(s.len0[l], s.start.device()).view({B, Hkv, 1});  // (B, H_kv, 1)
    at::Tensor rows = (s.start.view({B, Hkv, 1}) + len0 + i.view({B, 1, T})).flatten();            // (B * H_kv * T)
    at::Tensor k = s.k[l].index_select(0, rows).view({B, Hkv, T, hd});  // (B, H_kv, T, hd)
    at::Tensor v = s.v[l].index_select(0, rows).view({B, Hkv, T, hd});
    cache.append(l, k, v, positions, lead);
  }
  cache.advance(fed);
}

struct StaticDecoder::Graph {
#if KVD_WITH_CUDA
  std::map<int64_t, std::unique_ptr<at::cuda::CUDAGraph>> graphs;  // [variant] captured
  std::optional<c10::cuda::CUDAStream> stream;  // the capture and replay stream: the thread's own side stream
#endif
};

StaticDecoder::StaticDecoder(const Model& model, StaticDecodeState& state, StepRunner runner, int64_t block)
    : model_(model), s_(state), runner_(runner), block_(block) {
  KVD_CHECK(block >= 1, "StaticDecoder: block must be >= 1");
  if (runner == StepRunner::Graph) {
#if KVD_WITH_CUDA
    KVD_CHECK(model.device().is_cuda(), "StaticDecoder: CUDA graphs need a model on a CUDA device; use the eager runner");
    graph_ = std::make_unique<Graph>();
#else
    KVD_CHECK(false, "StaticDecoder: this build has no CUDA; use the eager runner");
#endif
  }
}

StaticDecoder::~StaticDecoder() = default;

void StaticDecoder::run_step() {
  KVD_CHECK(run_ < s_.max_steps, "StaticDecoder: the state has room for ", s_.max_steps, " steps");
  s_.host_step = run_;
  if (runner_ == StepRunner::Eager) {
    model_.decode_static(s_);
    ++run_;
    return;
  }
#if KVD_WITH_CUDA
  Graph& g = *graph_;
  if (!g.stream) {
    // Capture needs a side stream, which waits for the state's uploads on the current stream. It is this thread's
    // own (models/cuda_stream.h): one from LibTorch's pool may be another thread's current stream (eval
    // --workers), whose work would then land in this capture.
    c10::cuda::CUDAStream current = c10::cuda::getCurrentCUDAStream(model_.device().index());
    g.stream = thread_side_stream(current.device_index());
    at::cuda::CUDAEvent ready;
    ready.record(current);
    ready.block(*g.stream);
  }
  c10::cuda::CUDAStreamGuard guard(*g.stream);
  const int64_t variant = s_.evictor ? s_.evictor->variant(run_) : 0;
  std::unique_ptr<at::cuda::CUDAGraph>& graph = g.graphs[variant];
  if (!graph) {
    // The first step of a variant runs for real (which also sets up cuBLAS's workspace and the allocator's blocks
    // on this stream), then the same step is recorded, not run: the graph then stands for every step of it.
    model_.decode_static(s_);
    graph = std::make_unique<at::cuda::CUDAGraph>();
    // Thread-local capture: other threads (eval --workers) may allocate and launch meanwhile.
    graph->capture_begin({0, 0}, cudaStreamCaptureModeThreadLocal);
    try {
      model_.decode_static(s_);
    } catch (...) {
      // Out of memory (or any error) while recording: the capture is ended and the graph dropped before the error
      // goes on, else the stream stays in capture and the next device-wide call (a synchronize, returning cached
      // blocks, another worker's batch run alone) fails with "operation not permitted when stream is capturing".
      try {
        graph->capture_end();
      } catch (...) {  // an invalidated capture ends with an error of its own; the first one is what the caller needs
      }
      (void)cudaGetLastError();
      graph.reset();
      throw;
    }
    graph->capture_end();
  } else {
    graph->replay();
  }
  ++run_;
#endif
}

std::vector<int64_t> StaticDecoder::next() {
  const int64_t B = s_.batch;
  if (read_ == run_) {
    const int64_t n = std::min(block_, s_.max_steps - run_);
    KVD_CHECK(n > 0, "StaticDecoder: no room for another step (the state holds ", s_.max_steps, ")");
    const int64_t first = run_;
    for (int64_t i = 0; i < n; ++i) run_step();
    at::Tensor blk;  // (n, B)
#if KVD_WITH_CUDA
    if (runner_ == StepRunner::Graph) {
      c10::cuda::CUDAStreamGuard guard(*graph_->stream);
      blk = s_.history.narrow(0, first, n).to(torch::kCPU).contiguous();  // waits for the side stream
    }
#endif
    if (!blk.defined()) blk = s_.history.narrow(0, first, n).to(torch::kCPU).contiguous();
    host_.insert(host_.end(), blk.data_ptr<int64_t>(), blk.data_ptr<int64_t>() + n * B);
  }
  std::vector<int64_t> out(host_.begin() + read_ * B, host_.begin() + (read_ + 1) * B);
  ++read_;
  return out;
}

}  // namespace kvd
