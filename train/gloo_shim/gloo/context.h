// See gloo/algorithm.h: a stand-in for Gloo's header. ProcessGroupGloo::setTimeout (inline, never emitted
// here: the class's vtable lives in libtorch_cpu.so) names Context::setTimeout, so it is declared.
#pragma once
#include <chrono>
namespace gloo {
class Context {
 public:
  void setTimeout(std::chrono::milliseconds timeout);
};
}  // namespace gloo
