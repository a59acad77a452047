// The query-row objective (Judge-Q / LookaheadKV, gates/query_rows.h) two ways, in one run, on one prompt +
// response of random tokens:
//   efficient  the prompt prefilled once without gradients into a KVCache, the response's attention summed by
//              blocks of rows against the cached keys, then only the n rows forward + backward
//              (Model::forward_extra): what QueryRowsImpl::loss runs per sample
//   naive      whole-sequence forwards (Model::forward_train): prompt + response with statistics over the
//              response rows, then the prompt with the rows appended, forward + backward
// Reports for each: seconds per step (best of --repeat after a warm-up), (prompt + response) tokens/s, and
// peak memory above what the loaded model holds: on CUDA the caching allocator's peak allocated bytes over the
// steps; on the CPU the peak resident-set growth over the steps (VmHWM, reset after loading) of a forked child
// that loads the model and runs them, one child per variant. Prints the ratios and the relative difference
// between the two losses (the same quantity computed two ways). With --overhead, also the eviction overhead at inference:
// the rows' forward (no grad) against a prefilled cache as a percentage of the prompt's prefill.
//   build/bench_query_rows --model DIR [--device cuda] [--prompt 2048] [--response 256] [--rows 32]
//                          [--preset lookahead|judgeq] [--repeat 3] [--overhead 4096,8192]
#include <CLI/CLI.hpp>
#include <sys/resource.h>
#include <sys/wait.h>
#include <torch/cuda.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "common/error.h"
#include "common/torch_pch.h"
#include "gates/components.h"
#include "gates/query_rows.h"
#include "models/device.h"
#include "models/kv_cache.h"
#include "models/model.h"

#if defined(KVD_WITH_CUDA)
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#endif

namespace {

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }
void sync(const c10::Device& d) {
  if (d.is_cuda()) torch::cuda::synchronize();
}

long rss_kib() {  // current resident set, KiB
  FILE* f = std::fopen("/proc/self/statm", "r");
  if (!f) return 0;
  long pages = 0, rss = 0;
  const int n = std::fscanf(f, "%ld %ld", &pages, &rss);
  std::fclose(f);
  return n == 2 ? rss * (::sysconf(_SC_PAGESIZE) / 1024) : 0;
}

struct Measure {
  double seconds = 0;      // best of `repeat`
  double peak_mib = 0;     // see the header
  double loss = 0;
};

// VmHWM (the peak resident set) in KiB, reset to the current RSS first when `reset` (writing 5 to
// /proc/self/clear_refs, Linux >= 4.0); -1 when unavailable.
long peak_rss_kib(bool reset) {
  if (reset) {
    FILE* c = std::fopen("/proc/self/clear_refs", "w");
    if (!c) return -1;
    const bool ok = std::fputs("5", c) >= 0;
    std::fclose(c);
    if (!ok) return -1;
  }
  FILE* f = std::fopen("/proc/self/status", "r");
  if (!f) return -1;
  char line[256];
  long kib = -1;
  while (std::fgets(line, sizeof(line), f))
    if (std::strncmp(line, "VmHWM:", 6) == 0) kib = std::atol(line + 6);
  std::fclose(f);
  return kib;
}

// `setup` builds everything a step needs (loads the model) and returns the step; the step runs `repeat` times
// after one warm-up. CUDA: in this process, the peak from the caching allocator. CPU: in a forked child (forked
// before any LibTorch work, so no thread pool crosses the fork), the peak RSS growth over the steps.
Measure measure(const c10::Device& device, int64_t repeat, const std::function<std::function<double()>()>& setup) {
  Measure m;
  if (device.is_cuda()) {
#if defined(KVD_WITH_CUDA)
    const c10::DeviceIndex di = device.index() < 0 ? 0 : device.index();
    const std::function<double()> step = setup();
    step();
    sync(device);
    const auto base = c10::cuda::CUDACachingAllocator::getDeviceStats(di);
    c10::cuda::CUDACachingAllocator::resetPeakStats(di);
    m.seconds = 1e30;
    for (int64_t i = 0; i < repeat; ++i) {
      const double t0 = now();
      m.loss = step();
      sync(device);
      m.seconds = std::min(m.seconds, now() - t0);
    }
    const auto st = c10::cuda::CUDACachingAllocator::getDeviceStats(di);
    m.peak_mib = (st.allocated_bytes[0].peak - base.allocated_bytes[0].current) / 1048576.0;
#endif
    return m;
  }
  int fd[2];
  KVD_CHECK(::pipe(fd) == 0, "pipe failed");
  const pid_t pid = ::fork();
  KVD_CHECK(pid >= 0, "fork failed");
  if (pid == 0) {
    ::close(fd[0]);
    double r[3] = {1e30, -1, 0};
    try {
      const std::function<double()> step = setup();
      // The peak covers the warm-up too: freed memory stays with the allocator, so later steps would not show it.
      const long base = rss_kib();
      const bool hwm = peak_rss_kib(true) >= 0;
      step();  // warm-up
      for (int64_t i = 0; i < repeat; ++i) {
        const double t0 = now();
        r[2] = step();
        r[0] = std::min(r[0], now() - t0);
      }
      struct rusage ru;
      ::getrusage(RUSAGE_SELF, &ru);
      // VmHWM since the reset; without it, ru_maxrss (which may still hold the load's peak: then 0).
      const double peak = hwm ? static_cast<double>(peak_rss_kib(false)) : static_cast<double>(ru.ru_maxrss);
      r[1] = std::max(0.0, peak - static_cast<double>(base)) / 1024.0;
    } catch (const std::exception& e) {
      std::fprintf(stderr, "bench_query_rows (child): %s\n", e.what());
      ::_exit(1);
    }
    (void)!::write(fd[1], r, sizeof(r));
    ::close(fd[1]);
    ::_exit(0);
  }
  ::close(fd[1]);
  double r[3] = {0, 0, 0};
  const ssize_t got = ::read(fd[0], r, sizeof(r));
  ::close(fd[0]);
  int status = 0;
  ::waitpid(pid, &status, 0);
  KVD_CHECK(got == static_cast<ssize_t>(sizeof(r)) && WIFEXITED(status) && WEXITSTATUS(status) == 0,
            "the measured step failed in its child process");
  m.seconds = r[0];
  m.peak_mib = r[1];
  m.loss = r[2];
  return m;
}

std::vector<int64_t> parse_lengths(const std::string& s) {
  std::vector<int64_t> out;
  size_t i = 0;
  while (i < s.size()) {
    size_t j = s.find(',', i);
    if (j == std::string::npos) j = s.size();
    if (j > i) out.push_back(std::stoll(s.substr(i, j - i)));
    i = j + 1;
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"kvdistill query-row objective: efficient recipe vs whole-sequence forwards"};
  std::string model_dir = ".cache/models/SmolLM2-135M-Instruct", device_s = "cpu", preset = "lookahead", overhead;
  int64_t prompt = 2048, response = 256, rows = 32, repeat = 3, block = 128;
  app.add_option("--model", model_dir)->capture_default_str();
  app.add_option("--device", device_s)->capture_default_str();
  app.add_option("--prompt", prompt, "Prompt tokens")->capture_default_str();
  app.add_option("--response", response, "Response tokens")->capture_default_str();
  app.add_option("--rows", rows, "Query rows n")->capture_default_str();
  app.add_option("--preset", preset, "lookahead or judgeq")->capture_default_str();
  app.add_option("--block", block, "Response rows per block of the efficient target")->capture_default_str();
  app.add_option("--repeat", repeat)->capture_default_str();
  app.add_option("--overhead", overhead, "Prompt lengths for the eviction-overhead measurement, e.g. 4096,8192");
  CLI11_PARSE(app, argc, argv);
  try {
    const c10::Device device = kvd::parse_device(device_s);
    // Everything a measured step needs, built afresh for each variant (in the child on the CPU).
    struct Setup {
      std::unique_ptr<kvd::Model> model;
      std::shared_ptr<kvd::QueryRowsImpl> qr;
      at::Tensor x, y;  // (1, N), (1, R)
    };
    auto build = [&]() {
      auto s = std::make_shared<Setup>();
      s->model = std::make_unique<kvd::Model>(kvd::Model::load(model_dir, device));
      torch::manual_seed(0);
      s->qr = std::dynamic_pointer_cast<kvd::QueryRowsImpl>(kvd::make_component(
          "query_rows", s->model->config(), {{"preset", preset}, {"rows", rows}, {"target_block", block}}));
      s->qr->to(device, torch::kFloat32);
      {  // LoRA b = 0 at init: give it values, as after training, so both LoRA ends do their work.
        torch::NoGradGuard ng;
        for (auto& p : s->qr->named_parameters())
          if (p.key().find("_b") != std::string::npos) p.value().normal_(0.0, 0.01);
      }
      const int64_t V = s->model->config().vocab_size;
      s->x = torch::randint(V, {1, prompt}, torch::kLong).to(device);
      s->y = torch::randint(V, {1, response}, torch::kLong).to(device);
      return s;
    };
    auto efficient = [&]() -> std::function<double()> {
      std::shared_ptr<Setup> s = build();
      return [s]() {
        const kvd::Model& model = *s->model;
        kvd::KVCache cache = model.new_cache(1);
        std::vector<at::Tensor> target;
        {
          torch::NoGradGuard ng;
          model.prefill(s->x, cache);
          target = kvd::response_attention_targets(model, cache, s->y, s->qr->options().target_block);
        }
        at::Tensor l = kvd::query_rows_objective(s->qr->row_attention(model, cache), target, s->qr->options().loss);
        l.backward();
        s->qr->zero_grad();
        return l.item<double>();
      };
    };
    auto naive = [&]() -> std::function<double()> {
      std::shared_ptr<Setup> s = build();
      return [s]() {
        at::Tensor l = kvd::query_rows_objective(kvd::naive_row_attention(*s->model, *s->qr, s->x),
                                                 kvd::naive_response_targets(*s->model, s->x, s->y),
                                                 s->qr->options().loss);
        l.backward();
        s->qr->zero_grad();
        return l.item<double>();
      };
    };
    const Measure e = measure(device, repeat, efficient);
    const Measure n = measure(device, repeat, naive);
    const double tok = static_cast<double>(prompt + response);
    std::printf("{\"bench\": \"query_rows_objective\", \"device\": \"%s\", \"preset\": \"%s\", "
                "\"prompt\": %lld, \"response\": %lld, \"rows\": %lld, \"peak_measure\": \"%s\",\n"
                " \"efficient\": {\"s_per_step\": %.4f, \"tok_s\": %.1f, \"peak_mib\": %.1f, \"loss\": %.8g},\n"
                " \"naive\": {\"s_per_step\": %.4f, \"tok_s\": %.1f, \"peak_mib\": %.1f, \"loss\": %.8g},\n"
                " \"speedup\": %.2f, \"memory_ratio\": %.2f, \"loss_rel_diff\": %.2e}\n",
                device.str().c_str(), preset.c_str(), static_cast<long long>(prompt),
                static_cast<long long>(response), static_cast<long long>(rows),
                device.is_cuda() ? "cuda allocator peak over the steps" : "peak RSS growth over the steps (forked child)",
                e.seconds, tok / e.seconds, e.peak_mib, e.loss, n.seconds, tok / n.seconds, n.peak_mib, n.loss,
                n.seconds / e.seconds, n.peak_mib / std::max(1e-9, e.peak_mib),
                std::abs(e.loss - n.loss) / std::max(1e-30, std::abs(n.loss)));
    std::fflush(stdout);

    std::shared_ptr<Setup> s = build();
    const kvd::Model& model = *s->model;
    const auto& qr = s->qr;
    const int64_t V = model.config().vocab_size;
    // Eviction overhead at inference: the rows after a prefilled prompt vs the prompt's prefill.
    for (int64_t len : parse_lengths(overhead)) {
      torch::NoGradGuard ng;
      const at::Tensor p = torch::randint(V, {1, len}, torch::kLong).to(device);
      double best_prefill = 1e30, best_rows = 1e30;
      for (int64_t i = 0; i < repeat + 1; ++i) {  // the first round warms up
        kvd::KVCache cache = model.new_cache(1);
        sync(device);
        double t0 = now();
        model.prefill(p, cache);
        sync(device);
        const double tp = now() - t0;
        t0 = now();
        qr->row_attention(model, cache);
        sync(device);
        const double tr = now() - t0;
        if (i > 0) best_prefill = std::min(best_prefill, tp), best_rows = std::min(best_rows, tr);
      }
      std::printf("{\"bench\": \"query_rows_overhead\", \"device\": \"%s\", \"prompt\": %lld, \"rows\": %lld, "
                  "\"prefill_s\": %.4f, \"rows_s\": %.4f, \"overhead_pct\": %.2f}\n",
                  device.str().c_str(), static_cast<long long>(len), static_cast<long long>(rows), best_prefill,
                  best_rows, 100.0 * best_rows / best_prefill);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_query_rows: %s\n", e.what());
    return 1;
  }
  return 0;
}
