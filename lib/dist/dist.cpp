#include "dist/dist.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>

#if PATCH_WITH_GLOO
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#endif
#if PATCH_WITH_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include "core/error.h"

namespace patch::dist {
namespace {

int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  if (!v || !*v) return fallback;
  char* end = nullptr;
  const long x = std::strtol(v, &end, 10);
  if (*end != '\0' || x < 0 || x > 1 << 20)
    throw core::ConfigError(
        core::str("environment ", name, "='", v, "': expected a non-negative integer"));
  return static_cast<int>(x);
}

volatile sig_atomic_t g_forward = 0;
extern "C" void on_launcher_signal(int sig) {
  g_forward = sig;
}

}  // namespace

Env env_from_environment() {
  Env e;
  e.world = env_int("WORLD_SIZE", 1);
  e.rank = env_int("RANK", 0);
  e.local_rank = env_int("LOCAL_RANK", e.rank);
  if (const char* a = std::getenv("MASTER_ADDR"); a && *a) e.master_addr = a;
  e.master_port = env_int("MASTER_PORT", e.master_port);
  e.launched = std::getenv("PATCH_DIST_LAUNCHED") != nullptr;
  if (e.world < 1 || e.rank >= e.world)
    throw core::ConfigError(core::str("environment RANK=", e.rank, " WORLD_SIZE=", e.world,
                                      ": expected 0 <= RANK < WORLD_SIZE"));
  return e;
}

at::Device rank_device(at::Device requested, int local_rank, int world) {
  if (world <= 1 || !requested.is_cuda()) return requested;
  const int gpus = static_cast<int>(at::getNumGPUs());
  if (local_rank >= gpus)
    throw core::ConfigError(core::str("dist.nproc: ", world, " ranks need one GPU each, but ", gpus,
                                      " are visible (rank ", local_rank, " has none)"));
  return at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(local_rank));
}

bool has_backend(const std::string& backend) {
#if PATCH_WITH_GLOO
  if (backend == "gloo") return true;
#endif
#if PATCH_WITH_NCCL
  if (backend == "nccl") return true;
#endif
  return false;
}

struct Group::Impl {
  Env env;
  std::string backend = "none";
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> pg;
  at::Device device = at::kCPU;
};

Group::Group(const Env& env, at::Device device, const std::string& backend)
    : impl_(std::make_unique<Impl>()) {
  auto& m = *impl_;
  m.env = env;
  m.device = device;
  if (env.world == 1) return;
  m.backend = backend == "auto" ? (device.is_cuda() ? "nccl" : "gloo") : backend;
  if (!has_backend(m.backend))
    throw core::ConfigError(core::str(
        "dist.backend: ", m.backend, " is not in this build (",
        m.backend == "gloo" ? "install libgloo-dev and rebuild" : "build with PATCH_WITH_CUDA=ON",
        ")"));
  if ((m.backend == "nccl") != device.is_cuda())
    throw core::ConfigError(
        core::str("dist.backend: ", m.backend, " does not run on ", device.str()));
  c10d::TCPStoreOptions so;
  so.port = static_cast<uint16_t>(env.master_port);
  so.isServer = env.rank == 0;
  so.numWorkers = env.world;
  so.timeout = std::chrono::seconds(120);
  m.store = c10::make_intrusive<c10d::TCPStore>(env.master_addr, so);
#if PATCH_WITH_GLOO
  if (m.backend == "gloo") {
    auto opts = c10d::ProcessGroupGloo::Options::create();
    opts->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
    m.pg = c10::make_intrusive<c10d::ProcessGroupGloo>(m.store, env.rank, env.world, opts);
  }
#endif
#if PATCH_WITH_NCCL
  if (m.backend == "nccl") {
    // NVLink SHARP (multicast) needs fabric resources the lent machines lack.
    ::setenv("NCCL_NVLS_ENABLE", "0", /*overwrite=*/0);
    m.pg = c10::make_intrusive<c10d::ProcessGroupNCCL>(m.store, env.rank, env.world,
                                                       c10d::ProcessGroupNCCL::Options::create());
  }
#endif
}

Group::~Group() = default;

int Group::rank() const {
  return impl_->env.rank;
}
int Group::world() const {
  return impl_->env.world;
}
const std::string& Group::backend() const {
  return impl_->backend;
}

namespace {
double reduce_scalar(c10d::Backend* pg, at::Device device, double v, c10d::ReduceOp op) {
  if (!pg) return v;
  std::vector<at::Tensor> t{at::full({1}, v, at::TensorOptions(device).dtype(at::kDouble))};
  c10d::AllreduceOptions o;
  o.reduceOp = op;
  pg->allreduce(t, o)->wait();
  return t[0].item<double>();
}
}  // namespace

double Group::allreduce_sum(double v) {
  return reduce_scalar(impl_->pg.get(), impl_->device, v, c10d::ReduceOp::SUM);
}

double Group::allreduce_max(double v) {
  return reduce_scalar(impl_->pg.get(), impl_->device, v, c10d::ReduceOp::MAX);
}

void Group::barrier() {
  if (impl_->pg) impl_->pg->barrier()->wait();
}

struct GradReducer::State {
  struct Bucket {
    std::vector<size_t> members;  // indices into params
    size_t pending = 0;           // members whose gradient is not in yet
    c10::intrusive_ptr<c10d::Work> work;
  };
  c10d::Backend* pg = nullptr;
  std::vector<at::Tensor> params;
  std::vector<size_t> bucket_of;
  std::vector<bool> ready;
  std::vector<Bucket> buckets;
  size_t next_launch = 0;
  bool armed = false;
  GradReducer::Stats stats;

  // Launches, in index order, every bucket whose members are all in: one
  // grouped in-place all-reduce of their gradients (NCCL: no copy, no flat
  // buffer). Tensors without a gradient are left out, alike on every rank.
  void launch_ready() {
    while (next_launch < buckets.size() && buckets[next_launch].pending == 0) {
      auto& b = buckets[next_launch++];
      std::vector<at::Tensor> grads;
      for (size_t i : b.members)
        if (params[i].grad().defined()) grads.push_back(params[i].grad());
      if (!grads.empty()) b.work = pg->allreduce_coalesced(grads);
    }
  }
  void mark(size_t i) {
    ready[i] = true;
    --buckets[bucket_of[i]].pending;
  }
  // Runs on the autograd engine's thread, one device and one thread per backward.
  void on_grad(size_t i) {
    if (!armed || ready[i]) return;
    mark(i);
    if (buckets[bucket_of[i]].pending == 0) launch_ready();
  }
};

namespace {
struct ReduceHook : torch::autograd::PostAccumulateGradHook {
  ReduceHook(std::shared_ptr<GradReducer::State> s, size_t i) : state(std::move(s)), index(i) {}
  void operator()(const torch::autograd::Variable&) override { state->on_grad(index); }
  std::shared_ptr<GradReducer::State> state;
  size_t index;
};
}  // namespace

GradReducer::GradReducer(Group& group, const std::vector<at::Tensor>& params, int64_t bucket_bytes)
    : state_(std::make_shared<State>()) {
  auto& s = *state_;
  s.pg = group.impl_->pg.get();
  if (!s.pg) return;
  s.params = params;
  // Consecutive params of one dtype share a bucket up to bucket_bytes; a
  // larger param has one of its own.
  int64_t bytes = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    const auto& p = params[i];
    core::check(p.requires_grad() && p.is_leaf(), "GradReducer", "takes leaf tensors that require grad");
    const int64_t b = p.numel() * static_cast<int64_t>(p.element_size());
    if (s.buckets.empty() || bytes + b > bucket_bytes ||
        p.scalar_type() != params[s.buckets.back().members.front()].scalar_type()) {
      s.buckets.emplace_back();
      bytes = 0;
    }
    s.buckets.back().members.push_back(i);
    s.bucket_of.push_back(s.buckets.size() - 1);
    bytes += b;
  }
  s.ready.assign(params.size(), false);
  for (size_t i = 0; i < params.size(); ++i)
    torch::autograd::impl::set_post_acc_grad_hooks(params[i], std::make_unique<ReduceHook>(state_, i));
}

GradReducer::~GradReducer() {
  for (const auto& p : state_->params) torch::autograd::impl::set_post_acc_grad_hooks(p, nullptr);
}

void GradReducer::arm() {
  auto& s = *state_;
  if (!s.pg) return;
  std::fill(s.ready.begin(), s.ready.end(), false);
  for (auto& b : s.buckets) {
    b.pending = b.members.size();
    b.work.reset();
  }
  s.next_launch = 0;
  s.armed = true;
}

void GradReducer::finish() {
  auto& s = *state_;
  if (!s.pg) return;
  core::check(s.armed, "GradReducer", "finish() without arm()");
  s.armed = false;
  s.stats = {static_cast<int>(s.buckets.size()), static_cast<int>(s.next_launch)};
  for (size_t i = 0; i < s.params.size(); ++i)
    if (!s.ready[i]) s.mark(i);
  s.launch_ready();
  for (auto& b : s.buckets)
    if (b.work) b.work->wait();
}

GradReducer::Stats GradReducer::stats() const {
  return state_->stats;
}

int free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) throw core::Error(core::str("free_port: socket: ", std::strerror(errno)));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  socklen_t len = sizeof(addr);
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    const std::string err = std::strerror(errno);
    ::close(fd);
    throw core::Error("free_port: no free port on 127.0.0.1: " + err);
  }
  ::close(fd);
  return ntohs(addr.sin_port);
}

int launch(int nproc, const std::vector<std::string>& argv) {
  core::check(nproc >= 1 && !argv.empty(), "launch", "needs at least one process and a command");
  const int port = free_port();
  struct sigaction sa {};
  sa.sa_handler = on_launcher_signal;  // no SA_RESTART: waitpid returns to forward it
  sigemptyset(&sa.sa_mask);
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);

  std::vector<pid_t> pids;
  const pid_t launcher = ::getpid();
  for (int r = 0; r < nproc; ++r) {
    const pid_t pid = ::fork();
    if (pid < 0) throw core::Error(core::str("launch: fork: ", std::strerror(errno)));
    if (pid == 0) {
      // A rank outlives no launcher: if it dies (even by SIGKILL) the rank gets
      // SIGTERM, checkpoints at its next step and stops.
      ::prctl(PR_SET_PDEATHSIG, SIGTERM);
      if (::getppid() != launcher) ::_exit(core::kExitInterrupted);
      ::setenv("RANK", std::to_string(r).c_str(), 1);
      ::setenv("LOCAL_RANK", std::to_string(r).c_str(), 1);
      ::setenv("WORLD_SIZE", std::to_string(nproc).c_str(), 1);
      ::setenv("MASTER_ADDR", "127.0.0.1", 1);
      ::setenv("MASTER_PORT", std::to_string(port).c_str(), 1);
      ::setenv("PATCH_DIST_LAUNCHED", "1", 1);
      std::vector<char*> args;
      for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
      args.push_back(nullptr);
      ::execv("/proc/self/exe", args.data());
      ::_exit(127);
    }
    pids.push_back(pid);
  }

  int result = 0, running = nproc;
  while (running > 0) {
    int status = 0;
    const pid_t pid = ::waitpid(-1, &status, 0);
    if (pid < 0) {
      if (errno != EINTR) break;
      if (const int sig = g_forward) {  // pass the user's signal on; the ranks checkpoint and stop
        g_forward = 0;
        for (pid_t p : pids) ::kill(p, sig);
      }
      continue;
    }
    --running;
    const int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    for (auto& p : pids)
      if (p == pid) p = -1;
    if (code != 0 && result == 0) {
      result = code;
      // A failed rank leaves the others blocked in a collective: end them.
      if (code != core::kExitInterrupted)
        for (pid_t p : pids)
          if (p > 0) ::kill(p, SIGKILL);
    }
  }
  return result;
}

}  // namespace patch::dist
