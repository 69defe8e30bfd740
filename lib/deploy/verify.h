#pragma once
// Checks that masks (and a pruned checkpoint) are what they claim to be.
#include <string>
#include <vector>

namespace patch::deploy {

struct Check {
  std::string name;
  bool ok = true;
  std::string detail;
};

struct VerifyReport {
  std::vector<Check> checks;
  bool ok() const;
  std::string format() const;  // one line per check, then a summary line
};

// masks_path: the file is read and validated (format, tile map shapes, pattern
// indices); every sparse tile of the rebuilt masks keeps exactly two of each
// four; the declared achieved_sparsity matches the recount. model_path (may be
// empty): every masked layer exists there with the mask's shape. pruned_dir
// (may be empty): a pruned checkpoint holds zeros wherever the masks have zeros
// (so no 2:4 group keeps three), every masked layer and shape present.
VerifyReport verify(const std::string& masks_path, const std::string& model_path, const std::string& pruned_dir);

}  // namespace patch::deploy
