#pragma once
// The bookkeeping of the expansion pipeline (cuda::ExpandPipeline), with no
// device in it: two buffers, each holding (or receiving) one layer's W ⊙ M,
// and for each layer the one that ran after it last time. acquire() says
// where a layer's weight is or goes and which layer to expand ahead into the
// other buffer; the pipeline carries that out with its streams and events.
// Host code, so its decisions are tested on the CPU.
#include <array>
#include <cstdint>
#include <map>

namespace patch::deploy {

class ExpandSchedule {
 public:
  struct Plan {
    int buffer = 0;              // holds the layer's weight once the plan is carried out
    bool expand = false;         // false: the weight is there already (expanded ahead)
    const void* ahead = nullptr;  // the layer to expand into the other buffer now, if any
  };

  // Until the layers have run once, each is taken to follow the one added before it.
  void add(const void* layer);
  // Forgets the layer (what follows it, what follows into it, a buffer it holds).
  void remove(const void* layer);
  bool contains(const void* layer) const { return layers_.count(layer) != 0; }
  // The plan for `layer`, learning that it follows the layer acquired before it.
  Plan acquire(const void* layer);
  // The buffer acquire() handed out is free again (its reads are enqueued).
  void release();
  // The buffers' layers are gone (the buffers were replaced).
  void clear_buffers() { owner_ = {}; }
  // Acquires of `layer` that found its weight expanded ahead.
  int64_t prefetched(const void* layer) const;

 private:
  struct Layer {
    const void* next = nullptr;
    int64_t prefetched = 0;
  };
  std::map<const void*, Layer> layers_;
  const void *last_added_ = nullptr, *last_acquired_ = nullptr;
  std::array<const void*, 2> owner_{};  // each buffer's layer
  int current_ = -1, last_ = 1;         // the buffer handed out; the one before it
};

}  // namespace patch::deploy
