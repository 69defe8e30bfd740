#include "deploy/verify.h"

#include <ATen/ATen.h>

#include <cmath>
#include <sstream>

#include "core/error.h"
#include "io/checkpoint.h"
#include "maskfile/mask_file.h"

namespace patch::deploy {
namespace {

// Groups inside sparse tiles whose rebuilt mask does not keep exactly two.
int64_t bad_sparse_groups(const maskfile::LayerMask& l) {
  auto kept = l.mask(at::kLong).view({l.grid.out(), l.grid.groups(), 4}).sum(-1);
  auto sparse = l.grid.expand(l.tile_dense.to(at::kFloat)).eq(0).view({l.grid.out(), l.grid.groups(), 4}).select(-1, 0);
  return (kept.ne(2) & sparse).sum().item<int64_t>();
}

struct LayerShape {
  std::string name;
  int64_t out, in;
};

std::vector<LayerShape> layer_shapes(const maskfile::MaskFile& f) {
  std::vector<LayerShape> shapes;
  for (const auto& l : f.layers) shapes.push_back({l.name, l.grid.out(), l.grid.in()});
  for (const auto& b : f.bitmasks) shapes.push_back({b.name, b.out, b.in});
  return shapes;
}

// "name: problem" for every masked layer that a checkpoint lacks or whose shape differs.
std::vector<std::string> shape_problems(const maskfile::MaskFile& f, const io::Checkpoint& ck) {
  std::vector<std::string> out;
  for (const auto& s : layer_shapes(f)) {
    auto it = ck.tensors.find(s.name + ".weight");
    if (it == ck.tensors.end())
      out.push_back(s.name + ": missing");
    else if (it->second.dim() != 2 || it->second.size(0) != s.out || it->second.size(1) != s.in)
      out.push_back(core::str(s.name, ": weight ", it->second.sizes(), " vs mask [", s.out, ", ", s.in, "]"));
  }
  return out;
}

std::string first_few(const std::vector<std::string>& items) {
  std::string s;
  for (size_t i = 0; i < items.size() && i < 3; ++i) s += (i ? "; " : "") + items[i];
  if (items.size() > 3) s += core::str("; and ", items.size() - 3, " more");
  return s;
}

}  // namespace

bool VerifyReport::ok() const {
  for (const auto& c : checks)
    if (!c.ok) return false;
  return true;
}

std::string VerifyReport::format() const {
  std::ostringstream os;
  int failed = 0;
  for (const auto& c : checks) {
    os << (c.ok ? "ok    " : "FAIL  ") << c.name << (c.detail.empty() ? "" : ": " + c.detail) << "\n";
    failed += c.ok ? 0 : 1;
  }
  if (failed)
    os << "verify: FAILED (" << failed << " of " << checks.size() << " checks)\n";
  else
    os << "verify: OK (" << checks.size() << " checks)\n";
  return os.str();
}

VerifyReport verify(const std::string& masks_path, const std::string& model_path, const std::string& pruned_dir) {
  VerifyReport r;
  maskfile::MaskFile f;
  try {
    f = maskfile::read_mask_file(masks_path);
  } catch (const core::Error& e) {
    r.checks.push_back({"mask file is valid", false, e.what()});
    return r;
  }
  r.checks.push_back({"mask file is valid", true,
                      core::str(f.layers.size() + f.bitmasks.size(), " layers, ", f.meta.structure, ", mode ",
                                f.meta.mode)});

  int64_t bad = 0;
  for (const auto& l : f.layers) bad += bad_sparse_groups(l);
  r.checks.push_back({"2:4 inside every sparse tile", bad == 0,
                      bad ? core::str(bad, " groups do not keep exactly 2 of 4") : std::string()});

  const double recount = f.sparsity();
  if (std::isnan(f.meta.achieved_sparsity)) {
    r.checks.push_back({"declared sparsity", true, core::str("not declared; recounted ", recount)});
  } else {
    const bool same = std::abs(f.meta.achieved_sparsity - recount) <= 1e-6;
    r.checks.push_back({"declared sparsity", same,
                        core::str("declared ", f.meta.achieved_sparsity, ", recounted ", recount)});
  }

  if (!model_path.empty()) {
    auto problems = shape_problems(f, io::load_checkpoint(model_path));
    r.checks.push_back({"layers fit " + model_path, problems.empty(), first_few(problems)});
  }
  if (!pruned_dir.empty()) {
    auto ck = io::load_checkpoint(pruned_dir);
    auto problems = shape_problems(f, ck);
    r.checks.push_back({"layers fit " + pruned_dir, problems.empty(), first_few(problems)});
    if (problems.empty()) {
      std::vector<std::string> leaks;
      int64_t total = 0;
      for (const auto& s : layer_shapes(f)) {
        auto zero_here = maskfile::layer_mask(f, s.name, at::kBool).logical_not();
        const int64_t n = (ck.tensors.at(s.name + ".weight").ne(0) & zero_here).sum().item<int64_t>();
        if (n) leaks.push_back(core::str(s.name, ": ", n, " nonzero weights where the mask is 0"));
        total += n;
      }
      r.checks.push_back({"pruned weights are zero where masked", leaks.empty(),
                          leaks.empty() ? std::string() : core::str(total, " in all; ", first_few(leaks))});
    }
  }
  return r;
}

}  // namespace patch::deploy
