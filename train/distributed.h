// Data-parallel training over c10d (docs/ecosystem.md, "Distributed launch").
//
//   rank discovery   torchrun env (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), then SLURM
//                    (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; MASTER_ADDR from the env or the first host
//                    of `scontrol show hostnames $SLURM_JOB_NODELIST`), then a single process
//   rendezvous       c10d::TCPStore at MASTER_ADDR:MASTER_PORT (torchrun's agent store when it hosts one)
//   collectives      ProcessGroupGloo on CPU, ProcessGroupNCCL on CUDA, each with a timeout
//   what moves       trainable parameters (broadcast from rank 0 once) and their gradients (bucketed
//                    all-reduce, averaged); frozen weights never move
//   failures         a rank that fails writes "why" into the store and exits; the others' collectives fail
//                    (peer gone) or time out, and they exit != 0 naming the failed rank when it said why
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

namespace kvd {

enum class LaunchSource { Torchrun, Slurm, Single };
const char* launch_source_name(LaunchSource s);

struct RankInfo {
  LaunchSource source = LaunchSource::Single;
  int rank = 0, world_size = 1, local_rank = 0;
  std::string master_addr = "127.0.0.1";
  int master_port = 29500;
  bool agent_store = false;  // torchrun's agent already hosts the TCPStore (TORCHELASTIC_USE_AGENT_STORE)
  std::string describe() const;
};

// Reads the launch environment through `env` (std::getenv by default; tests pass a map). `hostnames`
// expands a SLURM node list (default: runs `scontrol show hostnames`). Throws naming the variable when a
// value is malformed or inconsistent (rank >= world size, ...).
using EnvFn = std::function<const char*(const char*)>;
using HostnamesFn = std::function<std::vector<std::string>(const std::string& nodelist)>;
RankInfo discover_ranks(const EnvFn& env = nullptr, const HostnamesFn& hostnames = nullptr);

enum class CollectiveBackend { None, Gloo, Nccl };

// Splits `tensors` (same dtype and device) into flat buckets of at most `bucket_bytes` (a tensor larger
// than a bucket gets one of its own), calls `sum_` on each flat bucket in order (an in-place all-reduce
// SUM), multiplies by `scale` and copies the results back. Returns the number of buckets.
int64_t bucketed_allreduce(const std::vector<at::Tensor>& tensors, int64_t bucket_bytes,
                           const std::function<void(at::Tensor&)>& sum_, double scale);

class Distributed {
 public:
  // world_size 1: no store, no process group; every collective is a no-op.
  static std::unique_ptr<Distributed> init(const RankInfo& info, CollectiveBackend backend, c10::Device device,
                                           std::chrono::milliseconds timeout);
  ~Distributed();

  int rank() const { return info_.rank; }
  int world_size() const { return info_.world_size; }
  bool is_main() const { return info_.rank == 0; }
  const RankInfo& info() const { return info_; }
  CollectiveBackend backend() const { return backend_; }

  // Rank 0's values into every rank's tensors (in place).
  void broadcast_(const std::vector<at::Tensor>& tensors);
  // Average of the gradients of `params` over ranks (bucketed); parameters without a gradient get zeros.
  void average_grads_(const std::vector<at::Tensor>& params, int64_t bucket_bytes);
  // Sum of a scalar over ranks (float64).
  double sum(double x);
  // In-place SUM all-reduce of one tensor on the collective device (no-op for world size 1).
  void sum_(at::Tensor& t, const char* what);
  void barrier();
  // Records why this rank fails (other ranks report it) and aborts the process group. Never throws.
  void fail(const std::string& why) noexcept;
  // What a failed peer recorded, or "" (used to explain a failed collective).
  std::string peer_failure() noexcept;

 private:
  struct State;
  Distributed(RankInfo info, CollectiveBackend backend, std::unique_ptr<State> st);
  RankInfo info_;
  CollectiveBackend backend_;
  std::unique_ptr<State> st_;
};

}  // namespace kvd
