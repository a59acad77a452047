#include "cli/commands.h"

#include <CLI/CLI.hpp>

#include <map>

namespace kvd::cli {

std::vector<Register>& registry() {
  static std::vector<Register> r;
  return r;
}

namespace {
std::map<CLI::App*, std::function<int()>>& runners() {
  static std::map<CLI::App*, std::function<int()>> m;
  return m;
}
}  // namespace

void on_run(CLI::App* sub, std::function<int()> run) { runners()[sub] = std::move(run); }

int run_selected(CLI::App& root) {
  for (CLI::App* sub : root.get_subcommands()) {
    auto it = runners().find(sub);
    if (it != runners().end()) return it->second();
  }
  return 2;
}

}  // namespace kvd::cli
