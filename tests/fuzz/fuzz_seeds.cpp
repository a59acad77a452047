// Writes the seed corpus of every fuzz target: fuzz_seeds OUT_DIR -> OUT_DIR/<target>/<seed files>.
// Seeds are small valid inputs (the readers accept them), so fuzzing starts from deep inside each format.
// CTest runs this first (fixture fuzz_seeds); scripts/fuzz.sh runs it before each campaign.
#include <sys/stat.h>

#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "models/safetensors.h"
#include "tests/fuzz/h5_recipe.h"
#include "tests/fuzz/seeds.h"

namespace {

std::string out_dir;

void put(const std::string& target, const std::string& name, const std::string& bytes) {
  const std::string dir = out_dir + "/" + target;
  ::mkdir(out_dir.c_str(), 0755);
  ::mkdir(dir.c_str(), 0755);
  std::ofstream(dir + "/" + name, std::ios::binary) << bytes;
}

std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: fuzz_seeds OUT_DIR\n");
    return 2;
  }
  out_dir = argv[1];
  namespace s = kvd::fuzz::seeds;

  // safetensors: every dtype, a 0-d and an empty tensor, metadata; written by our own writer.
  {
    const std::string tmp = out_dir + ".tmp.safetensors";
    ::mkdir(out_dir.c_str(), 0755);
    std::vector<uint8_t> buf(256);
    for (size_t i = 0; i < buf.size(); ++i) buf[i] = static_cast<uint8_t>(i * 7);
    std::vector<kvd::TensorRef> refs = {{"a.weight", kvd::DType::F32, {2, 3}, buf.data()},
                                        {"b", kvd::DType::BF16, {4}, buf.data()},
                                        {"c", kvd::DType::I64, {}, buf.data()},
                                        {"d", kvd::DType::U8, {0, 5}, buf.data()},
                                        {"e", kvd::DType::F16, {1, 2, 2}, buf.data()}};
    kvd::write_safetensors(tmp, refs, {{"format", "pt"}});
    put("safetensors", "seed0", slurp(tmp));
    kvd::write_safetensors(tmp, {refs[0]}, {});
    put("safetensors", "seed1", slurp(tmp));
    std::remove(tmp.c_str());
  }
  put("gguf", "seed0", s::gguf_bytes(0));
  put("gguf", "seed1", s::gguf_bytes(1));
  for (int v = 0; v < 4; ++v) put("config", "seed" + std::to_string(v), s::config_json(v));
  for (int v = 0; v < 2; ++v) {
    put("tokenizer", "json" + std::to_string(v), std::string(1, '\0') + s::tokenizer_json(v));
    put("chat_template", "seed" + std::to_string(v), s::tokenizer_config_json(v) + "\n@@\nHello, who are you?");
  }
  put("tokenizer", "text0", "\x01Hello world! It's 2024, caf\xc3\xa9 <|im_end|>\n\n  x");
  put("tokenizer", "text1", "\x03 The 12345 quick <mask> brown \xe4\xb8\xad\xe6\x96\x87 fox\xc3\xa9! <|endoftext|>");
  put("eval_tasks", "seed0", s::tasks_jsonl());
  put("bundle", "seed0", s::manifest_json());
  put("run_config", "seed0",
      slurp(KVD_SOURCE_DIR "/configs/demo-trimkv.yaml") + "\n@@\ntrain.steps=3\ntrain.on_nonfinite=skip\ncomponent.budget=32");
  put("run_config", "seed1", slurp(KVD_SOURCE_DIR "/configs/trimkv-smollm2.yaml") + "\n@@\ndist.timeout_s=30");
  put("h5", "seed0", kvd::fuzz::h5recipe::encode(kvd::fuzz::h5recipe::valid()));
  std::printf("fuzz seeds written to %s\n", out_dir.c_str());
  return 0;
}
