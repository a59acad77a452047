// Loader batches as the component and the model take them (TrainBatch), and what a component's calibration
// needs around them: for the trainer and for `kvdistill calibrate`, which calibrates a bundle outside it.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <c10/core/Device.h>

#include "gates/component.h"

namespace kvd {

struct Batch;
class SequenceSource;

// A loader Batch on `device`: ids, positions, document ids, and next-token labels (-100 at segment ends, on
// padding and before context-only tokens).
TrainBatch make_train_batch(const Batch& b, c10::Device device);

// n sequences of `source` spread evenly over it (sequence i·size/n for i < n; all of them when n ≥ size), as
// batches of up to batch_size rows padded to the source's seq_len: the sequences Component::calibrate fits on.
std::vector<TrainBatch> spread_batches(const SequenceSource& source, int64_t n, int64_t batch_size, c10::Device device);

// A Component::calibrate result in one log line: its scalar fields ("kept_after 0.5, kept_before 0.476, ..."),
// in key order; arrays and objects (per-unit values, passes) are left to the metrics log.
std::string calibration_summary(const nlohmann::json& result);

}  // namespace kvd
