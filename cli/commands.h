// How subcommands plug into the CLI: each cli/cmd_<name>.cpp defines a static Registration that adds
// its CLI11 subcommand and the function that runs it.
#pragma once

#include <functional>
#include <vector>

namespace CLI {
class App;
}

namespace kvd::cli {

using Register = std::function<void(CLI::App& root)>;
std::vector<Register>& registry();

// Runs the callback attached to whichever subcommand was parsed; returns its exit code.
int run_selected(CLI::App& root);
// Attaches `run` to a subcommand created by a Register function.
void on_run(CLI::App* sub, std::function<int()> run);

struct Registration {
  explicit Registration(Register r) { registry().push_back(std::move(r)); }
};

}  // namespace kvd::cli
