// See gloo/algorithm.h: a stand-in for Gloo's header.
#pragma once
namespace gloo::transport {
class Device;
class UnboundBuffer;
}  // namespace gloo::transport
