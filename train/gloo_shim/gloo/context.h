// See gloo/algorithm.h: a stand-in for Gloo's header.
#pragma once
namespace gloo {
class Context;
}
