// The precompiled LibTorch header of every LibTorch target (see CMakeLists.txt).
// Headers of our own include only what they need; this keeps LibTorch's parse cost to once per build.
#pragma once
#include <torch/torch.h>
