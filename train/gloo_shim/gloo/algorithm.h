// Minimal stand-in for Gloo's headers, which PyPI's LibTorch does not ship. It declares only what
// torch/csrc/distributed/c10d/ProcessGroupGloo.hpp names: every Gloo type there is held through a pointer
// (so the class layout does not depend on Gloo), except GlooStore's base, declared in rendezvous/store.h.
// kvdistill never touches Gloo objects itself; it constructs ProcessGroupGloo through the exported
// constructor of libtorch_cpu.so and uses it through c10d::Backend.
#pragma once
#include "gloo/context.h"
