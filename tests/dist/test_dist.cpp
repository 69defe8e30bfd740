// The gradient reducer across two Gloo ranks, run as two threads of this
// process: the sums against the two ranks' local gradients added by hand.
#include <ATen/ATen.h>

#include <cstdlib>
#include <functional>
#include <thread>

#include "catch.h"
#include "dist/dist.h"

using namespace patch;

namespace {

// One rank's leaves: a and b take part in the loss, c does not.
struct Leaves {
  at::Tensor a, b, c, x, y;
  // No random numbers: the ranks are threads, and torch's generator is global.
  explicit Leaves(int rank) {
    const double r = rank + 1;
    a = at::linspace(-1.0, r, 5).requires_grad_();
    b = at::linspace(0.5 * r, -2.0, 12).view({3, 4}).requires_grad_();
    c = at::linspace(0.0, 1.0, 7).requires_grad_();
    x = at::linspace(r, 3.0 * r, 5).sin();
    y = at::linspace(-r, r, 12).view({3, 4}).cos();
  }
  void backward() const { ((a * x).sum() + (b * b * y).sum()).backward(); }
  // The local gradients of one backward.
  at::Tensor grad_a() const { return x; }
  at::Tensor grad_b() const { return 2 * b.detach() * y; }
};

// Runs body(rank, group) on two threads, one Gloo rank each.
void on_two_ranks(const std::function<void(int, dist::Group&)>& body) {
  // c10d's flight recorder, one per process, adds a process group to its map
  // outside its lock on the group's first collective: two groups in one
  // process racing there crash it. Ranks are processes outside this test.
  ::setenv("TORCH_FR_BUFFER_SIZE", "0", /*overwrite=*/1);
  const int port = dist::free_port();
  std::vector<std::thread> threads;
  std::vector<std::string> errors(2);
  for (int rank = 0; rank < 2; ++rank)
    threads.emplace_back([&, rank] {
      try {
        dist::Env env;
        env.rank = env.local_rank = rank;
        env.world = 2;
        env.master_port = port;
        dist::Group group(env, at::kCPU, "gloo");
        body(rank, group);
      } catch (const std::exception& e) {
        errors[static_cast<size_t>(rank)] = e.what();
      }
    });
  for (auto& t : threads) t.join();
  INFO(errors[0] << errors[1]);
  CHECK(errors[0].empty());
  CHECK(errors[1].empty());
}

}  // namespace

TEST_CASE(
    "the gradient reducer sums what each rank accumulated, bucket by bucket during the backward") {
  if (!dist::has_backend("gloo")) {
    SUCCEED("this build has no Gloo headers");
    return;
  }
  const Leaves l0(0), l1(1);
  // Two backward passes per step, the first accumulated locally, the second armed.
  const at::Tensor want_a = 2 * (l0.grad_a() + l1.grad_a());
  const at::Tensor want_b = 2 * (l0.grad_b() + l1.grad_b());
  struct Order {
    bool c_first;
    int overlapped;
  };
  // 40-byte buckets: a (20 B), b (48 B) and c (28 B) have one each. Buckets
  // are launched in index order, so an unused c in front holds back the others.
  for (const Order order : {Order{false, 2}, Order{true, 0}}) {
    std::vector<at::Tensor> got_a(2), got_b(2);
    std::vector<char> c_has_grad(2, 1);  // not vector<bool>: the two threads write one element each
    std::vector<dist::GradReducer::Stats> stats(2);
    on_two_ranks([&](int rank, dist::Group& group) {
      Leaves l(rank);
      std::vector<at::Tensor> params = order.c_first ? std::vector<at::Tensor>{l.c, l.a, l.b}
                                                     : std::vector<at::Tensor>{l.a, l.b, l.c};
      dist::GradReducer reducer(group, params, /*bucket_bytes=*/40);
      l.backward();
      reducer.arm();
      l.backward();
      reducer.finish();
      got_a[static_cast<size_t>(rank)] = l.a.grad().clone();
      got_b[static_cast<size_t>(rank)] = l.b.grad().clone();
      c_has_grad[static_cast<size_t>(rank)] = l.c.grad().defined();
      stats[static_cast<size_t>(rank)] = reducer.stats();
    });
    INFO("c first: " << order.c_first);
    for (int r = 0; r < 2; ++r) {
      REQUIRE(got_a[r].defined());
      CHECK(at::allclose(got_a[r], want_a, 1e-6, 1e-6));
      CHECK(at::allclose(got_b[r], want_b, 1e-6, 1e-6));
      CHECK_FALSE(c_has_grad[r]);
      CHECK(stats[r].buckets == 3);
      CHECK(stats[r].launched_in_backward == order.overlapped);
    }
  }
}
