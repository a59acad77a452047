// kvdistill calibrate: refits, on the user's own text, what a trained part's inference rule holds fitted to data
// rather than learned (Component::calibrate), and writes the result as a new bundle. The trainer calibrates once
// on its training text; a part then serves text of another kind, where the same rule keeps another fraction
// (an Attention-Gate trained at 0.5 on Python docs keeps about 0.96 of the eval suite's task prompts).
//   kvdistill calibrate --model DIR --bundle runs/ag05/bundle --data my-text.h5 --out runs/ag05/bundle-mine \
//       [--sequences 32] [--batch 4] [--split train|val|all] [--device cuda] [--json]
// Prints what it measured before and after (the component's calibration record; --json: the whole record on
// stdout). The source bundle is never changed; the new one is written whole or not at all.
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <memory>

#include <torch/torch.h>

#include "cli/commands.h"
#include "cli/common.h"
#include "common/error.h"
#include "data/loader.h"
#include "data/packed_text.h"
#include "export/gate_bundle.h"
#include "gates/component.h"
#include "models/model.h"
#include "models/tokenizer.h"
#include "train/batches.h"

namespace kvd::cli {
namespace {

struct CalibrateArgs {
  std::string model, bundle, data, out, split = "train", device = "cpu";
  int64_t sequences = 32, batch = 4;
  bool json = false;
};

// The sequences of one split of a packed text file, or of both.
class SplitsSource : public SequenceSource {
 public:
  explicit SplitsSource(std::vector<PackedSplitReader> parts) : parts_(std::move(parts)) {}
  int64_t size() const override {
    int64_t n = 0;
    for (const auto& p : parts_) n += p.size();
    return n;
  }
  int64_t seq_len() const override {
    int64_t l = 0;
    for (const auto& p : parts_) l = std::max(l, p.seq_len());
    return l;
  }
  PackedSequence get(int64_t i, std::vector<uint8_t>& targets) const override {
    targets.clear();
    for (const auto& p : parts_) {
      if (i < p.size()) return p.get(i);
      i -= p.size();
    }
    KVD_FAIL("sequence index out of range");
  }

 private:
  std::vector<PackedSplitReader> parts_;
};

int run(const CalibrateArgs& a) {
  namespace fs = std::filesystem;
  KVD_CHECK(a.sequences > 0, "--sequences ", a.sequences, ": must be positive");
  KVD_CHECK(a.batch > 0, "--batch ", a.batch, ": must be positive");
  KVD_CHECK(fs::weakly_canonical(a.out) != fs::weakly_canonical(a.bundle), "--out ", a.out,
            " is the source bundle itself; write the calibrated bundle to another directory");
  // The bundle is checked (manifest against tensor file) before the model is loaded.
  const nlohmann::json summary = inspect_gate_bundle(a.bundle);
  const nlohmann::json& manifest = summary["manifest"];
  std::string dtype = manifest.value("dtype", std::string("F32"));
  std::transform(dtype.begin(), dtype.end(), dtype.begin(), [](unsigned char ch) { return std::tolower(ch); });

  const c10::Device device = parse_device(a.device);
  const Tokenizer tok = Tokenizer::from_file(a.model);
  const PackedTextReader data = PackedTextReader::open(a.data, tok);
  std::vector<PackedSplitReader> parts;
  if (a.split != "val") parts.push_back(data.split(Split::Train));
  if (a.split != "train") parts.push_back(data.split(Split::Val));
  const SplitsSource source(parts);
  KVD_CHECK(source.size() > 0, a.data, ": the ", a.split, " split holds no sequences; use --split all, or prepare "
            "text with more input");

  const BaseModelInfo base = base_model_info(a.model, manifest["base_model"]["id"].get<std::string>());
  Model model = Model::load(a.model, device);
  std::shared_ptr<Component> component = load_component(a.bundle, model, base);

  const int64_t n = std::min(a.sequences, source.size());
  const std::vector<TrainBatch> batches = spread_batches(source, n, a.batch, device);
  LossOptions options;
  options.model_dir = a.model;
  Stopwatch sw;
  const nlohmann::json result = component->calibrate(model, batches, options);
  KVD_CHECK(!result.is_null(), a.bundle, ": a ", component->kind(), " bundle holds nothing fitted to data, so there "
            "is nothing to calibrate (calibrate applies to parts whose inference rule holds a fitted quantity, such "
            "as the Attention-Gate's keep target)");

  save_gate_bundle(a.out, *component, base, parse_bundle_dtype(dtype));
  std::fprintf(stderr, "calibrate: %s on %lld sequences of up to %lld tokens (%s split of %s, %.1f s): %s; bundle: %s\n",
               component->kind().c_str(), static_cast<long long>(n), static_cast<long long>(source.seq_len()),
               a.split.c_str(), a.data.c_str(), sw.seconds(), calibration_summary(result).c_str(), a.out.c_str());
  if (a.json) std::cout << nlohmann::json{{"bundle", a.out}, {"sequences", n}, {"calibration", result}}.dump() << "\n";
  return 0;
}

Registration reg([](CLI::App& root) {
  auto a = std::make_shared<CalibrateArgs>();
  CLI::App* sub = root.add_subcommand(
      "calibrate", "Refit a trained bundle's data-fitted rule (the Attention-Gate's keep fraction) on your own text");
  sub->add_option("--model", a->model, "Base model directory (the bundle's)")->required();
  sub->add_option("--bundle", a->bundle, "The trained bundle (left unchanged)")->required();
  sub->add_option("--data", a->data, "Packed text .h5 (kvdistill prepare text) of the text the part will serve")
      ->required();
  sub->add_option("--out", a->out, "Directory of the calibrated bundle")->required();
  sub->add_option("--split", a->split, "Sequences of the train split, the val split, or all")
      ->check(CLI::IsMember({"train", "val", "all"}))
      ->capture_default_str();
  sub->add_option("--sequences", a->sequences, "Sequences to calibrate on, spread evenly over the split")
      ->capture_default_str();
  sub->add_option("--batch", a->batch, "Sequences per forward")->capture_default_str();
  sub->add_option("--device", a->device, "cpu | cuda | cuda:N")->capture_default_str();
  sub->add_flag("--json", a->json, "Also print the whole calibration record as JSON on stdout");
  on_run(sub, [a] { return run(*a); });
});

}  // namespace
}  // namespace kvd::cli
