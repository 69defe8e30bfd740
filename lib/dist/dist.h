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

  // Sums the tensors over the ranks, in place, through one flat buffer (all
  // of one dtype and device). With two ranks the sum a + b is exact to the
  // bit whatever the order, so a two-process run matches a one-process run
  // that accumulates the same two micro-batches.
  void allreduce_sum(const std::vector<at::Tensor>& tensors);
  double allreduce_sum(double v);
  double allreduce_max(double v);
  void barrier();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Starts `argv` (this program and its arguments) `nproc` times with RANK,
// WORLD_SIZE, LOCAL_RANK, MASTER_ADDR=127.0.0.1 and a free MASTER_PORT set,
// forwards SIGINT and SIGTERM to them, and waits for all. Returns 0, or the
// exit status of the first rank that failed (the others are then killed: they
// would wait for it in a collective); a rank killed by a signal counts as
// 128 + the signal.
int launch(int nproc, const std::vector<std::string>& argv);

}  // namespace patch::dist
