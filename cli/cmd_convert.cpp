// kvdistill convert --gguf FILE --out DIR: a llama-architecture GGUF into a Hugging Face model directory
// (config.json, model.safetensors, tokenizer.json, tokenizer_config.json, generation_config.json).
#include <CLI/CLI.hpp>

#include <iostream>

#include "cli/commands.h"
#include "cli/common.h"
#include "models/convert.h"

namespace kvd::cli {
namespace {

struct ConvertArgs {
  std::string gguf, out;
};

Registration reg([](CLI::App& root) {
  auto a = std::make_shared<ConvertArgs>();
  CLI::App* sub = root.add_subcommand("convert", "Convert a GGUF (llama architecture) into a Hugging Face model directory");
  sub->add_option("--gguf", a->gguf, "Input .gguf file")->required();
  sub->add_option("--out", a->out, "Output model directory (created; replaced only on success)")->required();
  on_run(sub, [a] {
    Stopwatch sw;
    convert_gguf_to_hf(a->gguf, a->out, stderr_progress());
    std::cerr << "convert: " << a->gguf << " -> " << a->out << " in " << sw.seconds() << " s\n";
    return 0;
  });
});

}  // namespace
}  // namespace kvd::cli
