#include "train/distributed.h"

#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <thread>

#include <torch/torch.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifndef USE_C10D_GLOO
#define USE_C10D_GLOO 1
#endif
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#ifdef KVD_WITH_NCCL
#include <c10/cuda/CUDAFunctions.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include "common/error.h"

namespace kvd {

const char* launch_source_name(LaunchSource s) {
  switch (s) {
    case LaunchSource::Torchrun: return "torchrun";
    case LaunchSource::Slurm: return "slurm";
    case LaunchSource::Single: return "single process";
  }
  return "?";
}

std::string RankInfo::describe() const {
  std::string s = std::string("distributed: ") + launch_source_name(source) + ", world size " +
                  std::to_string(world_size);
  if (source != LaunchSource::Single)
    s += ", rendezvous " + master_addr + ":" + std::to_string(master_port) +
         (agent_store ? " (torchrun agent store)" : " (TCPStore on rank 0)");
  return s;
}

namespace {

int env_int(const EnvFn& env, const char* name, int fallback, bool required) {
  const char* v = env(name);
  if (!v || !*v) {
    KVD_CHECK(!required, "environment variable ", name, " is not set, but the launch looks distributed; "
              "launch with torchrun or srun, or unset the other variables");
    return fallback;
  }
  char* end = nullptr;
  long x = std::strtol(v, &end, 10);
  KVD_CHECK(*end == '\0' && x >= 0 && x < (1L << 30), "environment variable ", name, "='", v,
            "' is not a non-negative integer");
  return static_cast<int>(x);
}

std::vector<std::string> scontrol_hostnames(const std::string& nodelist) {
  std::vector<std::string> hosts;
  const std::string cmd = "scontrol show hostnames '" + nodelist + "' 2>/dev/null";
  FILE* p = popen(cmd.c_str(), "r");
  if (!p) return hosts;
  char buf[512];
  while (std::fgets(buf, sizeof buf, p)) {
    std::string h(buf);
    while (!h.empty() && (h.back() == '\n' || h.back() == '\r' || h.back() == ' ')) h.pop_back();
    if (!h.empty()) hosts.push_back(h);
  }
  pclose(p);
  return hosts;
}

}  // namespace

RankInfo discover_ranks(const EnvFn& env_in, const HostnamesFn& hostnames_in) {
  EnvFn env = env_in ? env_in : EnvFn([](const char* n) -> const char* { return std::getenv(n); });
  HostnamesFn hostnames = hostnames_in ? hostnames_in : HostnamesFn(scontrol_hostnames);
  auto set = [&](const char* n) { const char* v = env(n); return v && *v; };
  RankInfo r;
  if (set("RANK") || set("WORLD_SIZE")) {
    r.source = LaunchSource::Torchrun;
    r.rank = env_int(env, "RANK", 0, true);
    r.world_size = env_int(env, "WORLD_SIZE", 1, true);
    r.local_rank = env_int(env, "LOCAL_RANK", r.rank, false);
    const char* a = env("MASTER_ADDR");
    KVD_CHECK(r.world_size == 1 || (a && *a), "environment variable MASTER_ADDR is not set (torchrun sets it; "
              "when launching by hand set MASTER_ADDR and MASTER_PORT)");
    if (a && *a) r.master_addr = a;
    r.master_port = env_int(env, "MASTER_PORT", 29500, r.world_size > 1);
    const char* agent = env("TORCHELASTIC_USE_AGENT_STORE");
    r.agent_store = agent && std::string(agent) == "True";
  } else if (set("SLURM_PROCID") && set("SLURM_NTASKS")) {
    r.source = LaunchSource::Slurm;
    r.rank = env_int(env, "SLURM_PROCID", 0, true);
    r.world_size = env_int(env, "SLURM_NTASKS", 1, true);
    r.local_rank = env_int(env, "SLURM_LOCALID", 0, false);
    const char* a = env("MASTER_ADDR");
    if (a && *a) {
      r.master_addr = a;
    } else if (r.world_size > 1) {
      const char* nl = env("SLURM_JOB_NODELIST");
      KVD_CHECK(nl && *nl, "SLURM launch without MASTER_ADDR or SLURM_JOB_NODELIST; export MASTER_ADDR");
      const auto hosts = hostnames(nl);
      KVD_CHECK(!hosts.empty(), "`scontrol show hostnames ", nl, "` gave no host; export MASTER_ADDR");
      r.master_addr = hosts.front();
    }
    r.master_port = env_int(env, "MASTER_PORT", 29500, false);
  }
  KVD_CHECK(r.world_size >= 1, "world size must be >= 1 (WORLD_SIZE / SLURM_NTASKS)");
  KVD_CHECK(r.rank < r.world_size, "rank ", r.rank, " is not below the world size ", r.world_size,
            " (RANK / SLURM_PROCID vs WORLD_SIZE / SLURM_NTASKS)");
  KVD_CHECK(r.master_port > 0 && r.master_port < 65536, "MASTER_PORT ", r.master_port, " is not a TCP port");
  return r;
}

int64_t bucketed_allreduce(const std::vector<at::Tensor>& tensors, int64_t bucket_bytes,
                           const std::function<void(at::Tensor&)>& sum_, double scale) {
  KVD_CHECK(bucket_bytes > 0, "bucketed_allreduce: bucket size must be > 0");
  int64_t buckets = 0;
  size_t i = 0;
  while (i < tensors.size()) {
    // [i, j): one bucket
    size_t j = i;
    int64_t bytes = 0;
    while (j < tensors.size()) {
      const at::Tensor& t = tensors[j];
      KVD_CHECK(t.scalar_type() == tensors[i].scalar_type() && t.device() == tensors[i].device(),
                "bucketed_allreduce: tensors must share dtype and device");
      const int64_t b = t.numel() * static_cast<int64_t>(t.element_size());
      if (j > i && bytes + b > bucket_bytes) break;
      bytes += b;
      ++j;
    }
    std::vector<at::Tensor> flat_parts;
    for (size_t k = i; k < j; ++k) flat_parts.push_back(tensors[k].reshape({-1}));
    at::Tensor flat = torch::cat(flat_parts);  // (sum of numel)
    sum_(flat);
    if (scale != 1.0) flat.mul_(scale);
    int64_t off = 0;
    for (size_t k = i; k < j; ++k) {
      const int64_t n = tensors[k].numel();
      tensors[k].copy_(flat.narrow(0, off, n).view_as(tensors[k]));
      off += n;
    }
    ++buckets;
    i = j;
  }
  return buckets;
}

struct Distributed::State {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> pg;
  std::chrono::milliseconds timeout{300000};
  c10::Device device{c10::kCPU};  // where collective tensors live (this rank's GPU for NCCL)
  // Every rank's host name and pid, exchanged at init and kept here (the store lives in rank 0: it is
  // gone when rank 0 is), so that a failed collective can name the rank that died.
  std::vector<std::pair<std::string, int64_t>> peers;
};

namespace {

std::string host_name() {
  char buf[256] = {0};
  if (::gethostname(buf, sizeof buf - 1) != 0) return "?";
  return buf;
}

// Whether process `pid` on this host has exited: gone (ESRCH), or a zombie not yet reaped by its parent
// (/proc/<pid>/stat state Z or X), which kill(pid, 0) still reports as alive.
bool process_exited(int64_t pid) {
  if (::kill(static_cast<pid_t>(pid), 0) != 0) return errno == ESRCH;
  FILE* f = std::fopen(("/proc/" + std::to_string(pid) + "/stat").c_str(), "r");
  if (!f) return false;
  char buf[512] = {0};
  const size_t n = std::fread(buf, 1, sizeof buf - 1, f);
  std::fclose(f);
  // "pid (comm) S ...": the state follows the last ')' (comm may itself hold parentheses).
  const char* close = nullptr;
  for (size_t i = 0; i < n; ++i)
    if (buf[i] == ')') close = buf + i;
  return close && close[1] == ' ' && (close[2] == 'Z' || close[2] == 'X');
}

// "rank 1 (pid 4242) exited" for each peer on this host whose process is gone; "" if none is known gone
// (a peer on another host, or one that is alive but stuck: then the timeout fired).
// A peer killed by a signal resets its sockets while the kernel is still tearing the process down, so a
// collective can fail a few milliseconds before the process counts as exited: wait up to `grace` for it.
std::string dead_peers(const std::vector<std::pair<std::string, int64_t>>& peers, int self,
                       std::chrono::milliseconds grace = std::chrono::milliseconds(2000)) {
  const std::string me = host_name();
  const auto until = std::chrono::steady_clock::now() + grace;
  std::vector<size_t> local;  // the other ranks on this host
  for (size_t r = 0; r < peers.size(); ++r)
    if (static_cast<int>(r) != self && peers[r].first == me && peers[r].second > 0) local.push_back(r);
  if (local.empty()) return "";
  for (;;) {
    std::string out;
    for (size_t r : local) {
      if (process_exited(peers[r].second))
        out += (out.empty() ? "" : ", ") + std::string("rank ") + std::to_string(r) + " (pid " +
               std::to_string(peers[r].second) + ") exited";
    }
    if (!out.empty() || std::chrono::steady_clock::now() >= until) return out;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

}  // namespace

Distributed::Distributed(RankInfo info, CollectiveBackend backend, std::unique_ptr<State> st)
    : info_(std::move(info)), backend_(backend), st_(std::move(st)) {}

Distributed::~Distributed() = default;

std::unique_ptr<Distributed> Distributed::init(const RankInfo& info, CollectiveBackend backend, c10::Device device,
                                               std::chrono::milliseconds timeout) {
  auto st = std::make_unique<State>();
  st->timeout = timeout;
  st->device = device;
  if (info.world_size == 1) return std::unique_ptr<Distributed>(new Distributed(info, CollectiveBackend::None, std::move(st)));

  c10d::TCPStoreOptions opt;
  opt.port = static_cast<uint16_t>(info.master_port);
  opt.isServer = info.rank == 0 && !info.agent_store;
  opt.numWorkers = info.world_size;
  opt.waitWorkers = false;
  opt.timeout = timeout;
  try {
    auto tcp = c10::make_intrusive<c10d::TCPStore>(info.master_addr, opt);
    st->store = c10::make_intrusive<c10d::PrefixStore>("kvdistill", tcp);
  } catch (const std::exception& e) {
    KVD_FAIL("rendezvous at ", info.master_addr, ":", info.master_port, " failed (",
             e.what(), "); check MASTER_ADDR / MASTER_PORT and that every rank was launched");
  }

  if (backend == CollectiveBackend::Gloo) {
    KVD_CHECK(device.is_cpu(), "dist.backend gloo needs train.device cpu (use nccl on CUDA)");
    // Transport device: GLOO_SOCKET_IFNAME if set (as in PyTorch), loopback for a single-host 127.0.0.1 run,
    // else the default (the interface this host name resolves to).
    auto o = c10d::ProcessGroupGloo::Options::create(timeout);
    const char* ifname = std::getenv("GLOO_SOCKET_IFNAME");
    if (ifname && *ifname)
      o->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(ifname));
    else if (info.master_addr == "127.0.0.1" || info.master_addr == "localhost")
      o->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
    else
      o->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
    st->pg = c10::make_intrusive<c10d::ProcessGroupGloo>(st->store, info.rank, info.world_size, o);
  } else if (backend == CollectiveBackend::Nccl) {
#ifdef KVD_WITH_NCCL
    KVD_CHECK(device.is_cuda(), "dist.backend nccl needs a CUDA device");
    c10::cuda::set_device(device.index());  // NCCL communicators bind to the current device
    auto o = c10d::ProcessGroupNCCL::Options::create();
    o->timeout = timeout;
    st->pg = c10::make_intrusive<c10d::ProcessGroupNCCL>(st->store, info.rank, info.world_size, o);
#else
    KVD_FAIL("this kvdistill was built without NCCL (no CUDA LibTorch or nccl.h at configure time); "
             "use dist.backend=gloo with train.device=cpu, or rebuild on the GPU machine");
#endif
  } else {
    KVD_FAIL("world size ", info.world_size, " needs a collective backend (gloo or nccl)");
  }
  const std::string me = host_name() + " " + std::to_string(::getpid());
  st->store->set("peer/" + std::to_string(info.rank), std::vector<uint8_t>(me.begin(), me.end()));
  auto d = std::unique_ptr<Distributed>(new Distributed(info, backend, std::move(st)));
  d->barrier();
  for (int r = 0; r < info.world_size; ++r) {
    const std::vector<uint8_t> v = d->st_->store->get("peer/" + std::to_string(r));
    const std::string s(v.begin(), v.end());
    const size_t sp = s.rfind(' ');
    d->st_->peers.emplace_back(s.substr(0, sp), sp == std::string::npos ? 0 : std::atoll(s.c_str() + sp + 1));
  }
  return d;
}

void Distributed::sum_(at::Tensor& t, const char* what) {
  if (!st_->pg) return;
  std::vector<at::Tensor> v{t};
  c10d::AllreduceOptions o;
  o.reduceOp = c10d::ReduceOp::SUM;
  o.timeout = st_->timeout;
  bool ok = false;
  std::string err;
  try {
    ok = st_->pg->allreduce(v, o)->wait(st_->timeout);
  } catch (const std::exception& e) {
    err = e.what();
  }
  if (!ok) {
    std::string peer = peer_failure();
    const std::string dead = peer.empty() ? dead_peers(st_->peers, rank()) : "";
    KVD_FAIL("rank ", rank(), ": all-reduce of ", what, " failed",
             !peer.empty() ? " because " + peer
             : !dead.empty() ? " because " + dead + " (killed or crashed; its last output says why)"
                             : std::string(" (a peer exited, or it timed out after dist.timeout_s=") +
                                   std::to_string(st_->timeout.count() / 1000) + " s)",
             err.empty() ? "" : ": " + err.substr(0, err.find('\n')));
  }
}

void Distributed::broadcast_(const std::vector<at::Tensor>& tensors) {
  if (!st_->pg) return;
  for (const at::Tensor& t : tensors) {
    std::vector<at::Tensor> v{t.detach()};
    c10d::BroadcastOptions o;
    o.rootRank = 0;
    o.timeout = st_->timeout;
    try {
      st_->pg->broadcast(v, o)->wait(st_->timeout);
    } catch (const std::exception& e) {
      std::string peer = peer_failure();
      if (peer.empty()) peer = dead_peers(st_->peers, rank());
      KVD_FAIL("rank ", rank(), ": broadcast of the trainable parameters failed", peer.empty() ? "" : " because " + peer,
               ": ", std::string(e.what()).substr(0, std::string(e.what()).find('\n')));
    }
  }
}

void Distributed::average_grads_(const std::vector<at::Tensor>& params, int64_t bucket_bytes) {
  std::vector<at::Tensor> grads;
  for (const at::Tensor& p : params) {
    if (!p.mutable_grad().defined()) p.mutable_grad() = torch::zeros_like(p);
    grads.push_back(p.mutable_grad());
  }
  if (!st_->pg) return;
  bucketed_allreduce(grads, bucket_bytes, [&](at::Tensor& flat) { sum_(flat, "gradients"); },
                     1.0 / world_size());
}

double Distributed::sum(double x) {
  if (!st_->pg) return x;
  at::Tensor t = torch::full({1}, x, torch::kFloat64);
  if (backend_ == CollectiveBackend::Nccl) t = t.to(st_->device);
  sum_(t, "a scalar");
  return t.cpu().item<double>();
}

void Distributed::barrier() {
  if (!st_->pg) return;
  sum(0.0);  // an all-reduce doubles as a barrier with the same timeout and error reporting
}

void Distributed::fail(const std::string& why) noexcept {
  if (!st_ || !st_->store) return;
  try {
    const std::string msg = "rank " + std::to_string(rank()) + " failed: " + why;
    st_->store->set("failed", std::vector<uint8_t>(msg.begin(), msg.end()));
  } catch (...) {
  }
  try {
    if (st_->pg) st_->pg->abort();
  } catch (...) {
  }
}

std::string Distributed::peer_failure() noexcept {
  try {
    if (st_->store && st_->store->check({"failed"})) {
      auto v = st_->store->get("failed");
      return std::string(v.begin(), v.end());
    }
  } catch (...) {
  }
  return "";
}

}  // namespace kvd
