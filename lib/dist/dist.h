#pragma once
// Data-parallel mask learning across processes through PyTorch's c10d: where
// this process stands in a run, its process group (Gloo on CPUs, NCCL on
// GPUs) and the launcher behind `patch-train train --nproc N`.
#include <ATen/ATen.h>

#include <memory>
#include <string>
#include <vector>

namespace patch::dist {

// This process's place in a run, from the variables torchrun sets (RANK,
// WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT): one process when
// WORLD_SIZE is unset. Throws core::ConfigError for inconsistent values.
struct Env {
  int rank = 0, world = 1, local_rank = 0;
  std::string master_addr = "127.0.0.1";
  int master_port = 29500;
  bool launched = false;  // started by launch(): the launcher prepared the run folder
};
Env env_from_environment();

// The device of rank `local_rank` of `world`: cuda:local_rank where
// `requested` is a CUDA device and world > 1 (one GPU per rank), `requested`
// otherwise. Throws core::ConfigError when that GPU does not exist.
at::Device rank_device(at::Device requested, int local_rank, int world);

// Whether this build has the backend ("gloo" needs the Gloo headers at build
// time, "nccl" a CUDA build).
bool has_backend(const std::string& backend);

class Group {
 public:
  // A process group over env.world ranks with `backend` (auto: nccl for CUDA
  // devices, gloo otherwise); one process makes no group and every
  // collective returns at once. Sets NCCL_NVLS_ENABLE=0 unless it is set.
  Group(const Env& env, at::Device device, const std::string& backend);
  ~Group();

  int rank() const;
  int world() const;
  bool is_root() const { return rank() == 0; }
  const std::string& backend() const;  // "none" for one process

  double allreduce_sum(double v);
  double allreduce_max(double v);
  void barrier();

 private:
  friend class GradReducer;
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Sums the gradients of leaf tensors over the ranks while the backward still
// runs, as DDP does. Params are grouped into buckets of about bucket_bytes.
// Once armed, a bucket is all-reduced in place, in the background, as soon as
// autograd has accumulated the gradients of all its members. Buckets are
// launched in their index order, the same on every rank, as collectives must
// be; give `params` in the order the backward reaches them (the reverse of the
// forward) so that they fill one after another. Every rank must run the same
// graph. With two ranks the sum a + b is exact to the bit, so a two-process
// run matches one process accumulating the same two micro-batches. With one
// process it does nothing.
class GradReducer {
 public:
  GradReducer(Group& group, const std::vector<at::Tensor>& params, int64_t bucket_bytes = 128 << 20);
  ~GradReducer();
  GradReducer(const GradReducer&) = delete;
  GradReducer& operator=(const GradReducer&) = delete;

  // Call before this rank's last backward of a step; the earlier ones
  // accumulate locally, as without ranks.
  void arm();
  // Call after that backward: launches what it left (tensors without a
  // gradient keep none) and waits for every sum.
  void finish();

  // Of the last finish(): how many buckets there are and how many of them
  // were launched while the backward ran (overlapping it).
  struct Stats {
    int buckets = 0, launched_in_backward = 0;
  };
  Stats stats() const;

  struct State;

 private:
  std::shared_ptr<State> state_;
};

// A TCP port free on 127.0.0.1 now, for the first rank to bind next.
int free_port();

// Starts `argv` (this program and its arguments) `nproc` times with RANK,
// WORLD_SIZE, LOCAL_RANK, MASTER_ADDR=127.0.0.1 and a free MASTER_PORT set,
// forwards SIGINT and SIGTERM to them, and waits for all. Returns 0, or the
// exit status of the first rank that failed (the others are then killed: they
// would wait for it in a collective); a rank killed by a signal counts as
// 128 + the signal.
int launch(int nproc, const std::vector<std::string>& argv);

}  // namespace patch::dist
