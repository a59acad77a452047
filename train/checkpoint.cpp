#include "train/checkpoint.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <mutex>

#include <torch/torch.h>

#include "common/error.h"
#include "common/fs.h"
#include "common/json_error.h"
#include "models/safetensors.h"

namespace kvd {

namespace {

bool exists(const std::string& p) {
  struct stat st;
  return ::stat(p.c_str(), &st) == 0;
}

void fsync_path(const std::string& p) {
  const int fd = ::open(p.c_str(), O_RDONLY);
  KVD_CHECK(fd >= 0, "cannot open ", p, " to fsync it: ", std::strerror(errno));
  const int rc = ::fsync(fd);
  ::close(fd);
  KVD_CHECK(rc == 0, "fsync of ", p, " failed: ", std::strerror(errno), " (disk full?)");
}

std::vector<std::string> entries(const std::string& dir) {
  std::vector<std::string> out;
  DIR* d = ::opendir(dir.c_str());
  if (!d) return out;
  while (dirent* e = ::readdir(d)) {
    std::string n = e->d_name;
    if (n != "." && n != "..") out.push_back(n);
  }
  ::closedir(d);
  std::sort(out.begin(), out.end());
  return out;
}

}  // namespace

std::string checkpoint_name(int64_t step) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "step_%08lld", static_cast<long long>(step));
  return buf;
}

std::vector<std::string> list_checkpoints(const std::string& root) {
  std::vector<std::string> out;
  for (const std::string& n : entries(root))
    if (n.rfind("step_", 0) == 0 && exists(root + "/" + n + "/state.json")) out.push_back(root + "/" + n);
  return out;  // names are zero-padded, so lexical order is step order
}

std::string latest_checkpoint(const std::string& root) {
  auto all = list_checkpoints(root);
  return all.empty() ? "" : all.back();
}

std::string save_checkpoint_dir(const std::string& root, const std::string& name,
                                const std::function<void(const std::string& tmp_dir)>& write_files,
                                int64_t keep_last) {
  make_dirs(root);
  // Leftovers of a crashed save.
  for (const std::string& n : entries(root))
    if (n.rfind(".tmp.", 0) == 0) remove_tree(root + "/" + n);
  const std::string tmp = root + "/.tmp." + name + "." + std::to_string(::getpid());
  const std::string final_path = root + "/" + name;
  KVD_CHECK(::mkdir(tmp.c_str(), 0755) == 0, "cannot create ", tmp, ": ", std::strerror(errno));
  try {
    write_files(tmp);
    for (const std::string& n : entries(tmp)) fsync_path(tmp + "/" + n);
    fsync_path(tmp);
  } catch (const Error&) {
    remove_tree(tmp);
    throw;
  } catch (const std::exception& e) {
    // LibTorch's writer (optimizer.pt, rng.pt) does not say why a write failed: a nearly full disk does.
    remove_tree(tmp);
    struct statvfs vfs {};
    const bool full = ::statvfs(root.c_str(), &vfs) == 0 &&
                      static_cast<double>(vfs.f_bavail) * static_cast<double>(vfs.f_frsize) < 64.0 * 1048576.0;
    const std::string what = std::string(e.what()).substr(0, std::string(e.what()).find('\n'));
    if (full) fail_write(tmp, ENOSPC, "writing the checkpoint");
    KVD_FAIL(tmp, ": writing the checkpoint failed (", what, ")");
  }
  // A directory is removed only after it was renamed out of the step_* namespace (one atomic rename), so
  // a process killed at any moment leaves either a whole checkpoint or a .tmp.* leftover, never a
  // step_* directory with some of its files gone.
  auto retire = [&](const std::string& dir, const std::string& name_) {
    const std::string gone = root + "/.tmp.retired." + name_ + "." + std::to_string(::getpid());
    KVD_CHECK(::rename(dir.c_str(), gone.c_str()) == 0, "cannot rename ", dir, " to ", gone, ": ", std::strerror(errno));
    return gone;
  };
  std::string replaced;
  if (exists(final_path)) replaced = retire(final_path, name);  // the same step saved again (after a resume)
  KVD_CHECK(::rename(tmp.c_str(), final_path.c_str()) == 0, "cannot rename ", tmp, " to ", final_path, ": ",
            std::strerror(errno));
  fsync_path(root);
  if (!replaced.empty()) remove_tree(replaced);
  auto all = list_checkpoints(root);
  for (size_t i = 0; i + static_cast<size_t>(keep_last) < all.size(); ++i) {
    const size_t slash = all[i].find_last_of('/');
    remove_tree(retire(all[i], all[i].substr(slash + 1)));
  }
  return final_path;
}

std::string save_training_checkpoint(const std::string& root, const CheckpointMeta& meta, torch::nn::Module& module,
                                     torch::optim::Optimizer& optimizer, int64_t keep_last) {
  return save_checkpoint_dir(
      root, checkpoint_name(meta.step),
      [&](const std::string& dir) {
        // Trainable weights, fp32, on CPU.
        std::vector<at::Tensor> keep;
        std::vector<TensorRef> refs;
        for (const auto& p : module.named_parameters()) {
          at::Tensor t = p.value().detach().to(torch::kCPU, torch::kFloat32).contiguous();
          keep.push_back(t);
          refs.push_back({p.key(), DType::F32, t.sizes().vec(), t.data_ptr()});
        }
        write_safetensors(dir + "/weights.safetensors", refs,
                          {{"component_kind", meta.identity.component_kind}, {"model_id", meta.identity.model_id}});
        // The component's training state outside its parameters (Component::end_step), if any, in its dtype.
        std::vector<at::Tensor> bkeep;
        std::vector<TensorRef> brefs;
        for (const auto& b : module.named_buffers()) {
          at::Tensor t = b.value().detach().to(torch::kCPU, torch::kFloat64).contiguous();
          bkeep.push_back(t);
          brefs.push_back({b.key(), DType::F64, t.sizes().vec(), t.data_ptr()});
        }
        if (!brefs.empty()) write_safetensors(dir + "/buffers.safetensors", brefs, {});
        torch::save(optimizer, dir + "/optimizer.pt");
        std::vector<at::Tensor> rng{at::globalContext().defaultGenerator(c10::kCPU).get_state()};
        if (torch::cuda::is_available())
          for (int64_t i = 0; i < static_cast<int64_t>(torch::cuda::device_count()); ++i)
            rng.push_back(at::globalContext().defaultGenerator(c10::Device(c10::kCUDA, i)).get_state());
        torch::save(rng, dir + "/rng.pt");
        nlohmann::ordered_json j;
        j["format"] = "kvdistill_train_checkpoint";
        j["format_version"] = 1;
        j["step"] = meta.step;
        j["component_kind"] = meta.identity.component_kind;
        j["model_id"] = meta.identity.model_id;
        j["model_config_sha256"] = meta.identity.model_sha256;
        j["world_size"] = meta.world_size;
        j["cursor"] = meta.cursor;
        j["config"] = meta.config;
        write_file_atomic(dir + "/state.json", j.dump(2) + "\n");
      },
      keep_last);
}

CheckpointMeta read_checkpoint_meta(const std::string& dir, const CheckpointIdentity& expect) {
  const std::string path = dir + "/state.json";
  KVD_CHECK(exists(path), dir, ": not a kvdistill training checkpoint (no state.json); pass a step_* directory "
            "under <train.out_dir>/checkpoints, or --resume none");
  const nlohmann::ordered_json j = parse_json<nlohmann::ordered_json>(
      read_file(path), path, "corrupt checkpoint state", "; resume from an earlier checkpoint");
  KVD_CHECK(j.is_object() && j.contains("format") && j["format"] == "kvdistill_train_checkpoint", path,
            ": not a kvdistill training checkpoint");
  CheckpointMeta m;
  with_json_context(path, "corrupt checkpoint state", [&] {
    m.step = j.at("step").get<int64_t>();
    m.identity.component_kind = j.at("component_kind").get<std::string>();
    m.identity.model_id = j.at("model_id").get<std::string>();
    m.identity.model_sha256 = j.at("model_config_sha256").get<std::string>();
    m.world_size = j.value("world_size", int64_t{1});
    m.cursor = j.at("cursor");
    m.config = j.at("config");
  });
  KVD_CHECK(m.identity.component_kind == expect.component_kind, dir, ": this checkpoint trains component '",
            m.identity.component_kind, "', but the run config says component.kind=", expect.component_kind,
            "; use another train.out_dir, set component.kind=", m.identity.component_kind, ", or pass --resume none");
  KVD_CHECK(m.identity.model_sha256 == expect.model_sha256, dir, ": this checkpoint was trained on model '",
            m.identity.model_id, "' (config sha256 ", m.identity.model_sha256.substr(0, 12), "), but model.dir is '",
            expect.model_id, "' (", expect.model_sha256.substr(0, 12), "); use another train.out_dir or pass --resume none");
  return m;
}

void load_checkpoint_weights(const std::string& dir, torch::nn::Module& module) {
  SafetensorsFile f(dir + "/weights.safetensors");
  torch::NoGradGuard ng;
  auto params = module.named_parameters();
  KVD_CHECK(f.tensors().size() == params.size(), f.path(), ": holds ", f.tensors().size(), " tensors, the component has ",
            params.size(), " parameters; the checkpoint is for another configuration of the component");
  for (auto& p : params) {
    const TensorView* v = f.find(p.key());
    KVD_CHECK(v, f.path(), ": parameter '", p.key(), "' is missing; the checkpoint is for another component");
    KVD_CHECK(v->dtype == DType::F32 && v->shape == p.value().sizes().vec(), f.path(), ": parameter '", p.key(),
              "' has another shape than the component's ", p.value().sizes(),
              "; check component.* settings against the checkpoint's config");
    at::Tensor src = torch::from_blob(const_cast<uint8_t*>(v->data), v->shape, torch::kFloat32);
    p.value().copy_(src);
  }
  auto buffers = module.named_buffers();
  if (!buffers.is_empty()) {
    SafetensorsFile bf(dir + "/buffers.safetensors");
    for (auto& b : buffers) {
      const TensorView* v = bf.find(b.key());
      KVD_CHECK(v && v->dtype == DType::F64 && v->shape == b.value().sizes().vec(), bf.path(), ": buffer '", b.key(),
                "' is missing or has another shape; the checkpoint is for another configuration of the component");
      b.value().copy_(torch::from_blob(const_cast<uint8_t*>(v->data), v->shape, torch::kFloat64));
    }
  }
}

void load_training_state(const std::string& dir, torch::nn::Module& module, torch::optim::Optimizer& optimizer) {
  load_checkpoint_weights(dir, module);
  auto params = module.named_parameters();
  const c10::Device device = params.size() ? params[0].value().device() : c10::Device(c10::kCPU);
  torch::load(optimizer, dir + "/optimizer.pt", device);
  std::vector<at::Tensor> rng;
  torch::load(rng, dir + "/rng.pt");
  auto restore = [](at::Generator g, const at::Tensor& state) {  // a handle: copies share the generator
    std::lock_guard<std::mutex> lock(g.mutex());
    g.set_state(state);
  };
  if (!rng.empty()) restore(at::globalContext().defaultGenerator(c10::kCPU), rng[0]);
  for (size_t i = 1; i < rng.size() && torch::cuda::is_available() &&
                     static_cast<int64_t>(i - 1) < static_cast<int64_t>(torch::cuda::device_count());
       ++i)
    restore(at::globalContext().defaultGenerator(c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(i - 1))), rng[i]);
}

}  // namespace kvd
