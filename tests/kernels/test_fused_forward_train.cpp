// Model::forward_train on CUDA with KernelPath::Fused (the default, train.kernels=fused): layers whose mods set
// key_rate / key_log_mask run the fused retention-biased attention (kernels/retention_attention.h), and the
// retention gate's capacity loss runs the fused soft cache size. Checked against KernelPath::Reference (the
// explicit grouped softmax and the tiled capacity sum) on a small random Llama with head dim 64 in bfloat16,
// packed documents and an awkward length:
//   - the distillation KL, CE and capacity terms within 2% relative;
//   - the gate's gradient: relative L2 error under 5e-2 and cosine similarity above 0.995 (both paths round
//     the attention operands to bf16, in a different order);
//   - two fused backward passes are bitwise equal (no atomics);
//   - the fused path's peak CUDA memory at S = 4096 is under half the reference's (no (B, H, S, S) scores).
// Skipped without a GPU (CI compiles it and runs the kernels' CPU references elsewhere).
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>
#ifdef KVD_WITH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#endif

#include "common/fs.h"
#include "gates/distill_objective.h"
#include "gates/retention_gate.h"
#include "kernels/retention_attention.h"
#include "losses/distill.h"
#include "models/model.h"
#include "models/safetensors.h"

using namespace kvd;

namespace {

bool have_fused_gpu() {
  if (!torch::cuda::is_available()) return false;
  at::Tensor q = torch::zeros({1, 1, 1, 64}, torch::TensorOptions().device(torch::kCUDA).dtype(torch::kBFloat16));
  return retention_attention_fused_available(q, q);
}

// A random Llama (2 layers, 4 query heads over 2 KV heads, head dim 64) written as an HF directory.
std::string random_llama_dir() {
  const std::string dir = std::filesystem::temp_directory_path().string() + "/kvd_fused_llama_" + std::to_string(::getpid());
  make_dirs(dir);
  const int64_t d = 256, H = 4, Hkv = 2, hd = 64, ffn = 512, V = 512, L = 2;
  nlohmann::json cfg = {{"architectures", {"LlamaForCausalLM"}}, {"model_type", "llama"}, {"hidden_size", d},
                        {"num_attention_heads", H}, {"num_key_value_heads", Hkv}, {"head_dim", hd},
                        {"intermediate_size", ffn}, {"num_hidden_layers", L}, {"vocab_size", V},
                        {"rms_norm_eps", 1e-5}, {"rope_theta", 10000.0}, {"max_position_embeddings", 8192},
                        {"tie_word_embeddings", false}, {"hidden_act", "silu"}, {"torch_dtype", "float32"}};
  write_file_atomic(dir + "/config.json", cfg.dump(2));
  torch::manual_seed(7);
  std::vector<std::pair<std::string, at::Tensor>> w;
  auto add = [&](const std::string& name, std::vector<int64_t> shape, double std) {
    w.emplace_back(name, std == 0 ? torch::ones(shape) : torch::randn(shape) * std);
  };
  add("model.embed_tokens.weight", {V, d}, 1.0);
  add("model.norm.weight", {d}, 0);
  add("lm_head.weight", {V, d}, 0.05);
  for (int64_t l = 0; l < L; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    add(p + "input_layernorm.weight", {d}, 0);
    add(p + "post_attention_layernorm.weight", {d}, 0);
    add(p + "self_attn.q_proj.weight", {H * hd, d}, 0.08);
    add(p + "self_attn.k_proj.weight", {Hkv * hd, d}, 0.08);
    add(p + "self_attn.v_proj.weight", {Hkv * hd, d}, 0.06);
    add(p + "self_attn.o_proj.weight", {d, H * hd}, 0.06);
    add(p + "mlp.gate_proj.weight", {ffn, d}, 0.06);
    add(p + "mlp.up_proj.weight", {ffn, d}, 0.06);
    add(p + "mlp.down_proj.weight", {d, ffn}, 0.04);
  }
  std::vector<TensorRef> refs;
  for (auto& [name, t] : w) {
    t = t.contiguous();
    refs.push_back(TensorRef{name, DType::F32, std::vector<int64_t>(t.sizes().begin(), t.sizes().end()), t.data_ptr()});
  }
  write_safetensors(dir + "/model.safetensors", refs, {{"format", "pt"}});
  return dir;
}

// Packed documents of the given lengths in one row; labels are the next token within a document.
TrainBatch packed_batch(int64_t vocab, const std::vector<int64_t>& docs, c10::Device dev) {
  int64_t T = 0;
  for (int64_t n : docs) T += n;
  torch::manual_seed(11);
  TrainBatch b;
  b.ids = torch::randint(vocab, {1, T}, torch::kLong);
  b.doc_ids = torch::zeros({1, T}, torch::kLong);
  int64_t r = 0;
  for (size_t i = 0; i < docs.size(); ++i)
    for (int64_t j = 0; j < docs[i]; ++j) b.doc_ids[0][r++] = static_cast<int64_t>(i);
  b.positions = document_positions(b.doc_ids);
  b.labels = torch::full({1, T}, kIgnoreLabel, torch::kLong);
  at::Tensor same = b.doc_ids.narrow(1, 1, T - 1) == b.doc_ids.narrow(1, 0, T - 1);
  b.labels.narrow(1, 0, T - 1).copy_(torch::where(same, b.ids.narrow(1, 1, T - 1), at::Scalar(kIgnoreLabel)));
  b.ids = b.ids.to(dev);
  b.doc_ids = b.doc_ids.to(dev);
  b.positions = b.positions.to(dev);
  b.labels = b.labels.to(dev);
  return b;
}

struct PathRun {
  double kl = 0, ce = 0, cap = 0;
  at::Tensor grad;  // all gate gradients, flattened, float64 on the CPU
  int64_t peak_bytes = 0;
};

PathRun run(const Model& model, RetentionGate& gate, const TrainBatch& tb, KernelPath kernels) {
  gate->zero_grad();
#ifdef KVD_WITH_CUDA
  torch::cuda::synchronize();
  c10::cuda::CUDACachingAllocator::resetPeakStats(0);
  const int64_t before = c10::cuda::CUDACachingAllocator::getDeviceStats(0).allocated_bytes[0].current;
#endif
  LossOptions lo;
  lo.block = 256;
  lo.kernels = kernels;
  ComponentLoss l = gate->loss(model, tb, lo);
  at::Tensor total = torch::zeros({}, torch::TensorOptions().device(model.device()));
  PathRun r;
  for (auto& [name, v] : l.terms) {
    total = total + v.to(torch::kFloat);
    if (name == "kl") r.kl = v.item<double>();
    if (name == "ce") r.ce = v.item<double>();
    if (name == "capacity") r.cap = v.item<double>();
  }
  total.backward();
#ifdef KVD_WITH_CUDA
  torch::cuda::synchronize();
  r.peak_bytes = c10::cuda::CUDACachingAllocator::getDeviceStats(0).allocated_bytes[0].peak - before;
#endif
  std::vector<at::Tensor> gs;
  for (const at::Tensor& p : gate->parameters()) gs.push_back(p.grad().detach().to(torch::kCPU, torch::kDouble).flatten());
  r.grad = torch::cat(gs);
  return r;
}

// A small gate on CUDA whose β spread over (0, 1): the bias matters and the capacity term is active.
RetentionGate cuda_gate(const Model& model) {
  torch::manual_seed(3);
  RetentionGateOptions o;
  o.hidden = 32;
  o.bias_init = 2.0;
  o.init_std = 0.3;
  o.budget = 64;
  RetentionGate gate(model.config(), o);
  gate->to(torch::kCUDA);
  return gate;
}

double rel(double a, double b) { return std::abs(a - b) / std::max(std::abs(b), 1e-12); }

}  // namespace

TEST(FusedForwardTrain, MatchesTheReferencePathAndIsDeterministic) {
  if (!have_fused_gpu()) GTEST_SKIP() << "needs a CUDA GPU and a kvdistill built with its kernels";
  const std::string dir = random_llama_dir();
  const Model model = Model::load(dir, torch::kCUDA, torch::kBFloat16);
  RetentionGate gate = cuda_gate(model);
  const TrainBatch tb = packed_batch(model.config().vocab_size, {311, 19, 659}, torch::kCUDA);  // T = 989

  const PathRun ref = run(model, gate, tb, KernelPath::Reference);
  const PathRun a = run(model, gate, tb, KernelPath::Fused);
  const PathRun b = run(model, gate, tb, KernelPath::Fused);
  std::printf("kl %.6f / %.6f  ce %.6f / %.6f  capacity %.6f / %.6f\n", a.kl, ref.kl, a.ce, ref.ce, a.cap, ref.cap);
  EXPECT_LT(rel(a.kl, ref.kl), 2e-2);
  EXPECT_LT(rel(a.ce, ref.ce), 2e-2);
  EXPECT_LT(rel(a.cap, ref.cap), 2e-2);
  const double err = ((a.grad - ref.grad).norm() / ref.grad.norm()).item<double>();
  const double cos = (a.grad.dot(ref.grad) / (a.grad.norm() * ref.grad.norm())).item<double>();
  std::printf("gate gradient: relative L2 error %.3e, cosine %.6f\n", err, cos);
  EXPECT_GT(ref.grad.norm().item<double>(), 0.0);
  EXPECT_LT(err, 5e-2);
  EXPECT_GT(cos, 0.995);
  EXPECT_TRUE(torch::equal(a.grad, b.grad)) << "two fused backward passes differ";
  remove_tree(dir);
}

// The teacher's forward (no grad, no mods) over packed documents: flash attention's variable-length form, one
// sequence per document run, against the reference path (SDPA under the documents' mask). Two rows of different
// document layouts; a row where a document id recurs after another cannot be runs and takes the fused kernel.
// Metric: relative L2 error of the final hidden states (both paths round the attention to bf16).
TEST(FusedForwardTrain, TeacherOverPackedDocumentsMatchesTheReferencePath) {
  if (!have_fused_gpu()) GTEST_SKIP() << "needs a CUDA GPU and a kvdistill built with its kernels";
  const std::string dir = random_llama_dir();
  const Model model = Model::load(dir, torch::kCUDA, torch::kBFloat16);
  const int64_t T = 989;
  torch::manual_seed(5);
  const at::Tensor ids = torch::randint(model.config().vocab_size, {2, T}, torch::kLong).to(torch::kCUDA);
  auto docs_of = [&](const std::vector<std::vector<int64_t>>& rows) {  // (doc id, length) runs per row
    at::Tensor d = torch::zeros({2, T}, torch::kLong);
    for (int64_t b = 0; b < 2; ++b) {
      int64_t t = 0;
      for (size_t i = 0; i < rows[b].size(); i += 2)
        for (int64_t j = 0; j < rows[b][i + 1]; ++j) d[b][t++] = rows[b][i];
      EXPECT_EQ(t, T);
    }
    return d;
  };
  for (const at::Tensor& docs : {docs_of({{0, 311, 1, 19, 2, 659}, {0, 1, 1, 988}}),   // runs
                                 docs_of({{0, 311, 1, 19, 0, 659}, {3, 989}})}) {   // id 0 recurs in row 0
    const at::Tensor pos = document_positions(docs).to(torch::kCUDA), d = docs.to(torch::kCUDA);
    torch::NoGradGuard no_grad;
    AttentionMods fused, reference;
    reference.kernels = KernelPath::Reference;
    const at::Tensor a = model.forward_train(ids, pos, fused, d).hidden.to(torch::kDouble);
    const at::Tensor r = model.forward_train(ids, pos, reference, d).hidden.to(torch::kDouble);
    const double err = ((a - r).norm() / r.norm()).item<double>();
    std::printf("teacher over packed documents: relative L2 error %.3e\n", err);
    EXPECT_LT(err, 1e-2);
    EXPECT_TRUE(torch::equal(model.forward_train(ids, pos, fused, d).hidden.to(torch::kDouble), a));  // deterministic
  }
  remove_tree(dir);
}

TEST(FusedForwardTrain, NeedsNoSquareScoreTensor) {
  if (!have_fused_gpu()) GTEST_SKIP() << "needs a CUDA GPU and a kvdistill built with its kernels";
  const std::string dir = random_llama_dir();
  const Model model = Model::load(dir, torch::kCUDA, torch::kBFloat16);
  RetentionGate gate = cuda_gate(model);
  const TrainBatch tb = packed_batch(model.config().vocab_size, {4096}, torch::kCUDA);
  const PathRun ref = run(model, gate, tb, KernelPath::Reference);
  const PathRun fused = run(model, gate, tb, KernelPath::Fused);
  std::printf("peak CUDA memory at S = 4096: reference %.1f MiB, fused %.1f MiB\n", ref.peak_bytes / 1048576.0,
              fused.peak_bytes / 1048576.0);
  EXPECT_LT(fused.peak_bytes * 2, ref.peak_bytes);
  remove_tree(dir);
}
