// The learned parts kvdistill ships, one line each. Kept apart from the registry (gates/components.cpp),
// which needs no LibTorch, so that torch-free programs (the run-config fuzz target) can link the registry
// with a list of their own.
#include "gates/attention_gate.h"
#include "gates/components.h"
#include "gates/dms.h"
#include "gates/kvzap.h"
#include "gates/query_rows.h"
#include "gates/retention_gate.h"

namespace kvd {

std::vector<ComponentSpec> builtin_component_specs() {
  return {
      retention_gate_spec(),
      query_rows_spec(),
      attention_gate_spec(),
      kvzap_spec(),
      dms_spec(),
  };
}

}  // namespace kvd
