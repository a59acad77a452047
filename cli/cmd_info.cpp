// kvdistill info --model DIR: the resolved model config, as kvdistill understands it.
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <iostream>

#include "cli/commands.h"
#include "models/config.h"

namespace kvd::cli {
namespace {

struct InfoArgs {
  std::string model;
};

Registration reg([](CLI::App& root) {
  auto args = std::make_shared<InfoArgs>();
  CLI::App* sub = root.add_subcommand("info", "Print the resolved config of a Hugging Face model directory");
  sub->add_option("--model", args->model, "Model directory (config.json, safetensors, tokenizer.json)")->required();
  on_run(sub, [args] {
    const ModelConfig cfg = load_config(args->model);
    std::cout << cfg.to_json().dump(2) << "\n";
    return 0;
  });
});

}  // namespace
}  // namespace kvd::cli
