#pragma once
// Hard masks into the model through the weight-provider seam: evaluation and
// training's periodic evaluation see W * M without any weight being written.
#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "maskfile/mask_file.h"
#include "model/decoder.h"
#include "sparsity/budget.h"

namespace patch::maskfile {

// Multiplies by the mask rebuilt from the small tile map and pattern on each
// call, so no [out, in] mask is held for every layer at once.
class HardMaskProvider : public model::WeightProvider {
 public:
  HardMaskProvider(const sparsity::HardenedLayer& layer, const at::Device& device);
  at::Tensor effective_weight(const at::Tensor& weight) override;

 private:
  sparsity::TileGrid grid_;
  at::Tensor tiles_, pattern_;
};

// W * unpacked bitmask (unstructured one-shot masks).
class BitmaskProvider : public model::WeightProvider {
 public:
  BitmaskProvider(const BitmaskLayer& layer, const at::Device& device);
  at::Tensor effective_weight(const at::Tensor& weight) override;

 private:
  BitmaskLayer layer_;
};

// A weight computed once, used in place of the dense one: SparseGPT's updated
// weights, and W * M for inference that runs many forwards (generation pays
// for it once per layer instead of once per call, and a CUDA graph can capture
// the forward; rebuilding a mask copies a small table to the device).
class FixedWeightProvider : public model::WeightProvider {
 public:
  explicit FixedWeightProvider(at::Tensor weight) : weight_(std::move(weight)) {}
  at::Tensor effective_weight(const at::Tensor&) override { return weight_; }

 private:
  at::Tensor weight_;
};

// Replaces every installed provider by its effective weight, computed now
// (one more copy of each masked weight in memory).
void bake_masks(model::Decoder& decoder);

// Installs each layer's hard mask on the decoder's linear of the same name.
// Throws core::Error naming the file and layer for a layer the model lacks or a
// shape that does not fit.
void apply_masks(model::Decoder& decoder, const MaskFile& file);
void apply_masks(model::Decoder& decoder, const std::vector<sparsity::HardenedLayer>& layers);

}  // namespace patch::maskfile
