// kvdistill export (--run DIR [--step N] | --bundle DIR) --out DIR [--dtype f32|bf16|f16] [--model DIR]
// kvdistill inspect-bundle DIR [--json]
//
// export writes a bundle (docs/bundle.md) from a training run or from another bundle, optionally in a smaller
// dtype, then validates it: the written bundle is read back, loaded into a fresh component for the base model,
// and every tensor compared with the source (equal in f32, within the dtype's rounding otherwise).
//   --run DIR            the run's bundle (DIR/bundle) or, with --step or when the run has no bundle yet, its
//                        latest checkpoint (or step N); the base model is the run config's model.dir
//   --bundle DIR         an existing bundle; --model names its base model directory
// inspect-bundle prints what a bundle holds without loading a model, after checking the manifest against the
// tensor file.
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <filesystem>
#include <iostream>
#include <sstream>

#include <torch/torch.h>

#include "cli/commands.h"
#include "common/error.h"
#include "common/fs.h"
#include "common/json_error.h"
#include "export/gate_bundle.h"
#include "gates/component.h"
#include "gates/components.h"
#include "models/config.h"
#include "train/checkpoint.h"
#include "train/config.h"

namespace kvd::cli {
namespace {

struct ExportArgs {
  std::string run, bundle, out, dtype = "f32", model;
  int64_t step = -1;
};

// The component a run holds at a checkpoint (its resolved config rebuilt from state.json).
std::shared_ptr<Component> from_checkpoint(const std::string& ckpt, const ModelConfig& cfg, const BaseModelInfo& base,
                                           const RunConfig& rc) {
  read_checkpoint_meta(ckpt, CheckpointIdentity{rc.component_kind, base.model_id, base.config_sha256});
  std::shared_ptr<Component> c = component_spec(rc.component_kind, ckpt + "/state.json").make(cfg, rc.component);
  c->to(c10::Device(c10::kCPU), torch::kFloat32);
  load_checkpoint_weights(ckpt, *c);
  return c;
}

// The run config stored in a checkpoint's state.json.
RunConfig run_config_of(const std::string& ckpt) {
  const std::string path = ckpt + "/state.json";
  const auto j = parse_json<nlohmann::ordered_json>(read_file(path), path, "corrupt checkpoint state",
                                                    "; export an earlier checkpoint with --step");
  KVD_CHECK(j.is_object() && j.contains("config"), path, ": not a kvdistill training checkpoint");
  return config_from_values(j.at("config"), path);
}

int run_export(const ExportArgs& a) {
  KVD_CHECK(a.run.empty() != a.bundle.empty(), "give exactly one of --run DIR and --bundle DIR");
  KVD_CHECK(a.step < 0 || !a.run.empty(), "--step selects a checkpoint of --run; it does not apply to --bundle");
  const BundleDType dtype = parse_bundle_dtype(a.dtype);
  namespace fs = std::filesystem;

  std::shared_ptr<Component> src;
  std::string model_dir = a.model, source, base_id;
  if (!a.bundle.empty()) {
    KVD_CHECK(!model_dir.empty(), "--bundle needs --model DIR, the base model the bundle was trained for (its "
              "config.json is checked against the bundle's)");
    const nlohmann::json summary = inspect_gate_bundle(a.bundle);
    base_id = summary["manifest"]["base_model"]["id"].get<std::string>();
    BaseModelInfo base = base_model_info(model_dir, base_id);
    src = load_component(a.bundle, load_config(model_dir), c10::Device(c10::kCPU), base);
    source = a.bundle;
  } else {
    const std::string ckpt_root = a.run + "/checkpoints";
    const bool have_bundle = fs::exists(a.run + "/bundle/kvdistill.json");
    if (a.step < 0 && have_bundle) {
      // The run's final bundle; its base model from the latest checkpoint's config, or --model.
      const nlohmann::json summary = inspect_gate_bundle(a.run + "/bundle");
      base_id = summary["manifest"]["base_model"]["id"].get<std::string>();
      if (model_dir.empty()) {
        const std::string last = latest_checkpoint(ckpt_root);
        KVD_CHECK(!last.empty(), a.run, ": the run keeps no checkpoint to name its model; give --model DIR");
        model_dir = run_config_of(last).model_dir;
      }
      src = load_component(a.run + "/bundle", load_config(model_dir), c10::Device(c10::kCPU),
                           base_model_info(model_dir, base_id));
      source = a.run + "/bundle";
    } else {
      std::string ckpt;
      if (a.step >= 0) {
        ckpt = ckpt_root + "/" + checkpoint_name(a.step);
        KVD_CHECK(fs::exists(ckpt + "/state.json"), a.run, ": no checkpoint at step ", a.step, " (",
                  list_checkpoints(ckpt_root).size(), " kept under ", ckpt_root, ")");
      } else {
        ckpt = latest_checkpoint(ckpt_root);
        KVD_CHECK(!ckpt.empty(), a.run, ": neither a bundle nor a checkpoint; is it a train.out_dir of kvdistill train?");
      }
      const RunConfig rc = run_config_of(ckpt);
      if (model_dir.empty()) model_dir = rc.model_dir;
      const BaseModelInfo base = base_model_info(model_dir);
      base_id = base.model_id;
      src = from_checkpoint(ckpt, load_config(model_dir), base, rc);
      source = ckpt;
    }
  }

  // Only an existing bundle can be overwritten by its own export; a run without one (stopped before its end) may
  // export its latest checkpoint into <run>/bundle.
  KVD_CHECK(fs::weakly_canonical(a.out) != fs::weakly_canonical(source), "--out ", a.out,
            " is the source bundle itself; write the export to another directory");
  const ModelConfig cfg = load_config(model_dir);
  const BaseModelInfo base = base_model_info(model_dir, base_id);
  save_gate_bundle(a.out, *src, base, dtype);

  // Validate: the bundle as a reader sees it, loaded into a fresh component, against the source's weights.
  const nlohmann::json summary = inspect_gate_bundle(a.out);
  std::shared_ptr<Component> back = load_component(a.out, cfg, c10::Device(c10::kCPU), base);
  const c10::ScalarType st = bundle_scalar_type(dtype);
  double max_err = 0.0;
  const auto want = src->named_parameters();
  const auto got = back->named_parameters();
  KVD_CHECK(want.size() == got.size(), a.out, ": the exported bundle loads ", got.size(), " tensors, the source has ",
            want.size());
  for (const auto& w : want) {
    const at::Tensor expect = w.value().detach().cpu().to(st).to(torch::kFloat);  // the dtype's rounding
    const at::Tensor& g = got[w.key()];
    KVD_CHECK(torch::equal(g.detach().cpu(), expect), a.out, ": tensor '", w.key(),
              "' reads back different from the source; the export is broken (please report it)");
    max_err = std::max(max_err, (g.detach().cpu() - w.value().detach().cpu()).abs().max().item<double>());
  }
  std::cout << "export: " << source << " -> " << a.out << ": " << src->kind() << ", "
            << summary["tensors"].size() << " tensors, " << summary["tensor_bytes"].get<int64_t>() << " bytes "
            << bundle_dtype_name(dtype) << ", base model '" << base.model_id << "' (config sha256 "
            << base.config_sha256.substr(0, 12) << ")\n"
            << "export: validated: loads into a fresh " << src->kind() << " for " << model_dir
            << "; largest |weight - source| = " << max_err << "\n";
  return 0;
}

std::string shape_text(const nlohmann::json& shape) {
  std::ostringstream os;
  os << "(";
  for (size_t i = 0; i < shape.size(); ++i) os << (i ? ", " : "") << shape[i].get<int64_t>();
  os << ")";
  return os.str();
}

int run_inspect(const std::string& dir, bool as_json) {
  const nlohmann::json s = inspect_gate_bundle(dir);
  if (as_json) {
    std::cout << s.dump(2) << "\n";
    return 0;
  }
  const nlohmann::json& m = s["manifest"];
  std::cout << "bundle: " << dir << "\n"
            << "format_version: " << m["format_version"] << "\n"
            << "kind: " << m["kind"].get<std::string>() << "\n"
            << "base_model: " << m["base_model"]["id"].get<std::string>() << " (config sha256 "
            << m["base_model"]["config_sha256"].get<std::string>() << ")\n"
            << "dtype: " << m["dtype"].get<std::string>() << "\n";
  for (const char* key : {"num_layers", "num_kv_heads", "hidden_size", "score", "score_timing", "higher_keeps",
                          "flag_threshold", "input", "output", "score_formula"})
    if (m.contains(key)) std::cout << key << ": " << (m[key].is_string() ? m[key].get<std::string>() : m[key].dump()) << "\n";
  if (m.contains("options")) std::cout << "options: " << m["options"].dump() << "\n";
  std::cout << "tensors: " << s["tensors"].size() << ", " << s["tensor_bytes"].get<int64_t>() << " bytes\n";
  const size_t shown = std::min<size_t>(s["tensors"].size(), 8);
  for (size_t i = 0; i < shown; ++i)
    std::cout << "  " << s["tensors"][i]["name"].get<std::string>() << " " << s["tensors"][i]["dtype"].get<std::string>()
              << " " << shape_text(s["tensors"][i]["shape"]) << "\n";
  if (shown < s["tensors"].size()) std::cout << "  ... (" << s["tensors"].size() - shown << " more; --json lists all)\n";
  return 0;
}

Registration reg([](CLI::App& root) {
  auto a = std::make_shared<ExportArgs>();
  CLI::App* sub = root.add_subcommand("export", "Write a validated gate bundle from a training run or a bundle");
  sub->add_option("--run", a->run, "A train.out_dir: its bundle, or its latest checkpoint (--step N: that one)");
  sub->add_option("--step", a->step, "With --run: export the checkpoint of this step");
  sub->add_option("--bundle", a->bundle, "An existing bundle directory (re-export, e.g. to bf16)");
  sub->add_option("--model", a->model, "The base model directory (default with --run: the run's model.dir)");
  sub->add_option("--out", a->out, "Output bundle directory (written whole, then renamed into place)")->required();
  sub->add_option("--dtype", a->dtype, "Tensor dtype of the bundle: f32, bf16 or f16")->capture_default_str();
  on_run(sub, [a] { return run_export(*a); });

  auto dir = std::make_shared<std::string>();
  auto as_json = std::make_shared<bool>(false);
  CLI::App* ins = root.add_subcommand("inspect-bundle", "Check a gate bundle and print what it holds");
  ins->add_option("dir", *dir, "Bundle directory (kvdistill.json + gates.safetensors)")->required();
  ins->add_flag("--json", *as_json, "Print the manifest and the tensor list as JSON");
  on_run(ins, [dir, as_json] { return run_inspect(*dir, *as_json); });
});

}  // namespace
}  // namespace kvd::cli
