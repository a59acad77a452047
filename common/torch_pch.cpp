// Anchors the precompiled header of kvd_models (CMake builds the PCH per target).
#include "common/torch_pch.h"
