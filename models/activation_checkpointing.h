// How Model::forward_train trades compute for memory when gradients are wanted (config key
// train.activation_checkpointing). Kept free of LibTorch headers so that run configs can name it.
#pragma once

namespace kvd {

enum class ActivationCheckpointing {
  None,    // keep every layer's activations for the backward (fastest, most memory)
  Layers,  // keep only each decoder layer's input (and the small tensors its mods supply); the backward runs
           // the layer again from that input (one more forward of the frozen layers, far less memory)
};

}  // namespace kvd
