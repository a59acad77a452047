// kvdistill: the command-line entry point. Each subcommand lives in cli/cmd_<name>.cpp and registers
// itself through cli/commands.h. Errors from library code arrive here as exceptions and leave as one
// line on stderr and exit code 1 (2 for usage errors).
#include <CLI/CLI.hpp>

#include <csignal>
#include <cstdio>
#include <exception>
#include <iostream>

#include "cli/commands.h"
#include <c10/util/Exception.h>

#include "common/error.h"
#include "models/profile.h"

int main(int argc, char** argv) {
  // A write to a socket whose peer died (a rank of a data-parallel run, the store's host) must fail as an error that
  // the trainer reports, not kill this process silently: Python, and so torchrun's usual workers, ignore SIGPIPE too.
  std::signal(SIGPIPE, SIG_IGN);
  CLI::App app{"kvdistill: learned KV-cache compression, distilled from a frozen LLM"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "kvdistill 0.1.0");
  for (auto& reg : kvd::cli::registry()) reg(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::cerr << "kvdistill: " << e.what() << " (run with --help for usage)\n";
    return 2;
  }
  try {
    const kvd::TraceScope trace;  // KVD_TRACE=FILE.json records the command (models/profile.h)
    return kvd::cli::run_selected(app);
  } catch (const kvd::Error& e) {
    std::cerr << "kvdistill: error: " << e.what() << "\n";
  } catch (const c10::Error& e) {
    std::cerr << "kvdistill: error: " << e.what_without_backtrace() << "\n";
  } catch (const std::exception& e) {
    std::cerr << "kvdistill: error: " << e.what() << "\n";
  }
  return 1;
}
