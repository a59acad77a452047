// kvdistill forward --model DIR --input-ids FILE --out logits.safetensors
// Full-sequence logits (T, V) float32 as one safetensors tensor "logits": for debugging and external
// parity checks (e.g. against transformers).
#include <CLI/CLI.hpp>

#include <iostream>

#include "cli/commands.h"
#include "cli/common.h"
#include "models/model.h"
#include "models/safetensors.h"

namespace kvd::cli {
namespace {

struct ForwardArgs {
  std::string model, input_ids, out, device = "cpu";
};

int run(const ForwardArgs& a) {
  const c10::Device device = parse_device(a.device);
  Model model = Model::load(a.model, device);
  const std::vector<int64_t> ids = read_ids_file(a.input_ids, model.config().vocab_size);
  const int64_t T = static_cast<int64_t>(ids.size());
  torch::NoGradGuard no_grad;
  at::Tensor x = torch::tensor(ids, torch::kInt64).view({1, T}).to(device);  // (1, T)
  ForwardOutput out = model.forward_train(x, sequential_positions(1, T, device));
  at::Tensor logits = model.logits(out.hidden[0]).to(torch::kCPU, torch::kFloat32).contiguous();  // (T, V)
  write_safetensors(a.out, {{"logits", DType::F32, {T, logits.size(1)}, logits.data_ptr()}});
  std::cerr << "forward: " << T << " tokens -> " << a.out << " (" << T << " x " << logits.size(1) << " float32)\n";
  return 0;
}

Registration reg([](CLI::App& root) {
  auto a = std::make_shared<ForwardArgs>();
  CLI::App* sub = root.add_subcommand("forward", "Write full-sequence logits (T, V) float32 to a safetensors file");
  sub->add_option("--model", a->model, "Model directory")->required();
  sub->add_option("--input-ids", a->input_ids, "File of whitespace-separated token ids")->required();
  sub->add_option("--out", a->out, "Output .safetensors (one tensor 'logits')")->required();
  sub->add_option("--device", a->device, "cpu | cuda | cuda:N")->capture_default_str();
  on_run(sub, [a] { return run(*a); });
});

}  // namespace
}  // namespace kvd::cli
