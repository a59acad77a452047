// The shared owner of a component, for the scorers that share its parameters (Component::make_scorer): the
// shared_ptr holding `self`, or null when the component is a plain object (the caller then keeps it alive).
#pragma once

#include <memory>

#include <torch/nn/module.h>

namespace kvd {

template <class T>
std::shared_ptr<T> shared_owner(T* self) {
  try {
    return std::dynamic_pointer_cast<T>(self->shared_from_this());
  } catch (const std::bad_weak_ptr&) {
    return nullptr;  // not shared-owned
  }
}

}  // namespace kvd
