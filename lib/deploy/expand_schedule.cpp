#include "deploy/expand_schedule.h"

#include "core/error.h"

namespace patch::deploy {

void ExpandSchedule::add(const void* layer) {
  layers_[layer] = Layer{};
  if (last_added_) layers_[last_added_].next = layer;
  last_added_ = layer;
}

void ExpandSchedule::remove(const void* layer) {
  layers_.erase(layer);
  for (auto& [id, l] : layers_)
    if (l.next == layer) l.next = nullptr;
  for (auto& o : owner_)
    if (o == layer) o = nullptr;
  if (last_added_ == layer) last_added_ = nullptr;
  if (last_acquired_ == layer) last_acquired_ = nullptr;
}

ExpandSchedule::Plan ExpandSchedule::acquire(const void* layer) {
  core::check(current_ < 0, "ExpandSchedule", "acquire() before the last acquire() was released");
  auto& l = layers_.at(layer);
  if (last_acquired_ && last_acquired_ != layer) {
    const auto it = layers_.find(last_acquired_);
    if (it != layers_.end()) it->second.next = layer;
  }
  last_acquired_ = layer;
  Plan plan;
  if (owner_[0] == layer || owner_[1] == layer) {
    plan.buffer = owner_[0] == layer ? 0 : 1;
    ++l.prefetched;
  } else {
    // The buffer the layer before did not read; a weight expanded ahead into it
    // for another layer (a wrong guess of the order) is overwritten.
    plan.buffer = 1 - last_;
    plan.expand = true;
    owner_[plan.buffer] = layer;
  }
  current_ = plan.buffer;
  const int other = 1 - plan.buffer;
  if (l.next && l.next != layer && owner_[other] != l.next) {
    plan.ahead = l.next;
    owner_[other] = l.next;
  }
  return plan;
}

void ExpandSchedule::release() {
  if (current_ < 0) return;
  last_ = current_;
  current_ = -1;
}

int64_t ExpandSchedule::prefetched(const void* layer) const {
  const auto it = layers_.find(layer);
  return it == layers_.end() ? 0 : it->second.prefetched;
}

}  // namespace patch::deploy
