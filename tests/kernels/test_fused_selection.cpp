// The selectors' fused path (gates/selector.h: the radix select of kernels/kv_select.h on CUDA) keeps exactly the
// reference path's sets, and KVCache::keep with indices left on the device holds exactly what a host keep holds.
// Metric: equality of every head's kept index list and of the cache's bytes. Scores are quantized so that many
// tie at each cut (ties go to the lower index on both paths); ragged heads carry -inf past their entries, as
// compress_prefill gives them. GPU only (skipped without one); CI runs the same selectors on the CPU
// (tests/gates/test_selector.cpp) and the kernel's code through the emulator (emu_kv_select).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <limits>
#include <string>
#include <vector>

#include "gates/selector.h"
#include "kernels/kv_select.h"
#include "models/kv_cache.h"

namespace {

using namespace kvd;

bool have_kernels() {
  return torch::cuda::is_available() && kv_select_fused_available(torch::empty({1}, torch::kCUDA));
}

struct Case {
  std::string name;
  SelectorOptions opt;
  int64_t layer = 0, layers = 1, tokens = -1;
};

std::vector<Case> cases() {
  std::vector<Case> out;
  auto add = [&](const std::string& name, Allocation a, Budget b, int64_t layer = 0, int64_t layers = 1,
                 int64_t tokens = -1) {
    Case c;
    c.name = name;
    c.opt.allocation = a;
    c.opt.budget = b;
    c.layer = layer;
    c.layers = layers;
    c.tokens = tokens;
    out.push_back(c);
  };
  add("uniform 0.5", Allocation::Uniform, Budget::ratio(0.5));
  add("uniform 0.875", Allocation::Uniform, Budget::ratio(0.875));
  add("uniform 0", Allocation::Uniform, Budget::ratio(0.0));
  add("uniform 0.5 of more tokens (chunked budget)", Allocation::Uniform, Budget::ratio(0.5), 0, 1, 5000);
  add("5 per head", Allocation::Uniform, Budget::tokens(5));
  add("9000 per head (more than held)", Allocation::Uniform, Budget::tokens(9000));
  add("pyramid 0.75, layer 2 of 4", Allocation::Pyramid, Budget::ratio(0.75), 2, 4);
  add("adakv 0.5 (reference path)", Allocation::AdaKV, Budget::ratio(0.5));
  add("threshold 0.25", Allocation::Uniform, Budget::threshold(0.25));
  add("threshold -inf", Allocation::Uniform, Budget::threshold(-std::numeric_limits<double>::infinity()));
  return out;
}

TEST(FusedSelection, SelectLayerKeepsTheReferenceSets) {
  if (!have_kernels()) GTEST_SKIP() << "no CUDA device or no fused kernels in this build";
  torch::manual_seed(3);
  const float ninf = -std::numeric_limits<float>::infinity();
  for (int64_t n : {1, 7, 300, 4099}) {
    const int64_t B = 3, H = 4;
    at::Tensor s = torch::round(torch::randn({B, H, n}) * 4.0) / 4.0;  // (B, H, n), many ties
    for (const char* validity : {"all valid", "ragged heads", "scattered valid entries"}) {
      at::Tensor valid, sc = s;
      if (validity[0] == 'r') {  // head lengths in [0, n], padding at the end (a cache view)
        at::Tensor len = torch::randint(0, n + 1, {B, H, 1}, torch::kLong);
        valid = torch::arange(n, torch::kLong).view({1, 1, n}).lt(len);  // (B, H, n)
      } else if (validity[0] == 's') {
        valid = torch::rand({B, H, n}).lt(0.7);  // (B, H, n)
      }
      if (valid.defined()) sc = s.masked_fill(valid.logical_not(), ninf);  // as compress_prefill scores them
      for (const Case& c : cases()) {
        const std::string what = c.name + ", n " + std::to_string(n) + ", " + validity;
        const RaggedIndices want = select_layer(sc, c.layer, c.layers, c.opt, c.tokens, valid, KernelPath::Reference);
        const RaggedIndices got = select_layer(sc.cuda(), c.layer, c.layers, c.opt, c.tokens,
                                               valid.defined() ? valid.cuda() : valid, KernelPath::Fused);
        EXPECT_TRUE(got.indices.is_cuda()) << what << ": the keep indices left the device";
        EXPECT_TRUE(torch::equal(got.offsets, want.offsets)) << what;
        EXPECT_EQ(ragged_to_lists(got), ragged_to_lists(want)) << what;
      }
      // A budget per row, as compress_prefill selects a layer's rows together.
      const std::vector<int64_t> k = {0, n / 3 + 1, n + 4};
      const std::string what = std::string("a budget per row, n ") + std::to_string(n) + ", " + validity;
      EXPECT_EQ(ragged_to_lists(select_top(sc.cuda(), k, valid.defined() ? valid.cuda() : valid, KernelPath::Fused)),
                ragged_to_lists(select_top(sc, k, valid, KernelPath::Reference)))
          << what;
      if (validity[0] != 's') {  // each head's entries a prefix: the counts known on the host, nothing read back
        const at::Tensor len = (valid.defined() ? valid.sum(-1) : torch::full({B, H}, n, torch::kLong)).contiguous();
        const std::vector<int64_t> lengths(len.data_ptr<int64_t>(), len.data_ptr<int64_t>() + B * H);
        const RaggedIndices want = select_top(sc, k, valid, KernelPath::Reference);
        const RaggedIndices got = select_top_prefix(sc.cuda(), k, lengths, KernelPath::Fused);
        EXPECT_TRUE(got.indices.is_cuda()) << what << " (prefix)";
        EXPECT_TRUE(torch::equal(got.offsets, want.offsets)) << what << " (prefix)";
        EXPECT_EQ(ragged_to_lists(got), ragged_to_lists(want)) << what << " (prefix)";
      }
    }
  }
}

// A CUDA cache and a CPU cache with the same entries and payload, compacted by the same keeps (the CUDA one with
// indices on the device, from the fused selector), hold the same entries, positions, payload and bytes, through a
// second ragged keep (an irregular layout) and an append.
TEST(FusedSelection, DeviceKeepHoldsWhatAHostKeepHolds) {
  if (!have_kernels()) GTEST_SKIP() << "no CUDA device or no fused kernels in this build";
  torch::manual_seed(4);
  const int64_t B = 2, H = 3, hd = 64, n = 1000;
  KVCache host(1, B, H, hd, torch::kBFloat16, torch::kCPU), dev(1, B, H, hd, torch::kBFloat16, torch::kCUDA);
  at::Tensor k = torch::randn({B, H, n, hd}).to(torch::kBFloat16), v = torch::randn({B, H, n, hd}).to(torch::kBFloat16);
  at::Tensor pos = torch::arange(n, torch::kLong).view({1, n}).expand({B, n}).contiguous();
  host.append(0, k, v, pos);
  dev.append(0, k.cuda(), v.cuda(), pos.cuda());
  at::Tensor col = torch::randn({B, H, n});
  for (KVCache* c : {&host, &dev}) {
    c->add_payload("score", torch::kFloat, 0.0);
    c->set_payload(0, "score", col.to(c->device()));
  }
  auto expect_same = [&](const char* what) {
    const KVLayerView a = host.layer(0), b = dev.layer(0);
    ASSERT_EQ(a.n, b.n) << what;
    EXPECT_TRUE(torch::equal(a.k, b.k.cpu())) << what;
    EXPECT_TRUE(torch::equal(a.v, b.v.cpu())) << what;
    EXPECT_TRUE(torch::equal(a.pos, b.pos.cpu())) << what;
    EXPECT_TRUE(torch::equal(a.payload.at("score"), b.payload.at("score").cpu())) << what;
    EXPECT_EQ(a.valid.defined(), b.valid.defined()) << what;
    if (a.valid.defined()) EXPECT_TRUE(torch::equal(a.valid, b.valid.cpu())) << what;
    EXPECT_EQ(host.bytes(), dev.bytes()) << what;
    EXPECT_EQ(host.allocated_bytes(), dev.allocated_bytes()) << what;
  };
  SelectorOptions uniform;
  uniform.budget = Budget::ratio(0.75);
  const at::Tensor s = torch::round(torch::randn({B, H, n}) * 8.0) / 8.0;
  RaggedIndices r = select_layer(s.cuda(), 0, 1, uniform, -1, at::Tensor(), KernelPath::Fused);
  dev.keep(0, r);
  host.keep(0, RaggedIndices{r.indices.cpu(), r.offsets});
  expect_same("uniform keep");
  SelectorOptions th;
  th.budget = Budget::threshold(0.5);
  const at::Tensor s2 = torch::randn({B, H, host.max_length(0)});
  r = select_layer(s2.cuda(), 0, 1, th, -1, at::Tensor(), KernelPath::Fused);
  dev.keep(0, r);
  host.keep(0, RaggedIndices{r.indices.cpu(), r.offsets});
  expect_same("ragged threshold keep");
  // Counts from the host and no bounds read-back (IndexCheck::ByConstruction), as compress_prefill keeps a layer.
  r = select_top_prefix(torch::randn({B, H, host.max_length(0)}).cuda(), {3, 40}, host.lengths(0), KernelPath::Fused);
  dev.keep(0, r, IndexCheck::ByConstruction);
  host.keep(0, RaggedIndices{r.indices.cpu(), r.offsets});
  expect_same("top-k with host counts");
  at::Tensor k1 = torch::randn({B, H, 1, hd}).to(torch::kBFloat16);
  host.append(0, k1, k1, torch::full({B, 1}, n, torch::kLong));
  dev.append(0, k1.cuda(), k1.cuda(), torch::full({B, 1}, n, torch::kLong).cuda());
  expect_same("append after the ragged keep");
}

}  // namespace
