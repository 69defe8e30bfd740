#include "maskfile/apply.h"

#include <ATen/core/grad_mode.h>

#include "core/error.h"

namespace patch::maskfile {

HardMaskProvider::HardMaskProvider(const sparsity::HardenedLayer& layer, const at::Device& device)
    : grid_(layer.grid), tiles_(layer.tile_dense.to(device)), pattern_(layer.pattern.to(device)) {}

at::Tensor HardMaskProvider::effective_weight(const at::Tensor& weight) {
  return weight * sparsity::build_mask(grid_, tiles_, pattern_, weight.scalar_type());
}

BitmaskProvider::BitmaskProvider(const BitmaskLayer& layer, const at::Device& device) : layer_(layer) {
  layer_.bits = layer.bits.to(device);
}

at::Tensor BitmaskProvider::effective_weight(const at::Tensor& weight) {
  return weight * layer_.mask(weight.scalar_type());
}

void apply_masks(model::Decoder& decoder, const std::vector<sparsity::HardenedLayer>& layers) {
  for (const auto& layer : layers) {
    model::LinearImpl* lin = decoder.linear(layer.name);
    if (!lin) throw core::Error(core::str("masks: layer '", layer.name, "' is not a linear layer of the model"));
    lin->set_provider(std::make_shared<HardMaskProvider>(layer, decoder.options().device));
  }
}

void apply_masks(model::Decoder& decoder, const MaskFile& file) {
  for (const auto& layer : file.layers) {
    model::LinearImpl* lin = decoder.linear(layer.name);
    if (!lin)
      throw core::Error(core::str(file.path, ": layer '", layer.name, "' is not a linear layer of the model"));
    check_layer_shape(file, layer, lin->weight().size(0), lin->weight().size(1));
  }
  apply_masks(decoder, file.layers);
  for (const auto& b : file.bitmasks) {
    model::LinearImpl* lin = decoder.linear(b.name);
    if (!lin) throw core::Error(core::str(file.path, ": layer '", b.name, "' is not a linear layer of the model"));
    if (lin->weight().size(0) != b.out || lin->weight().size(1) != b.in)
      throw core::Error(core::str(file.path, ": layer '", b.name, "': mask is [", b.out, ", ", b.in,
                                  "] but the weight is ", lin->weight().sizes()));
    lin->set_provider(std::make_shared<BitmaskProvider>(b, decoder.options().device));
  }
}

void bake_masks(model::Decoder& decoder) {
  at::NoGradGuard no_grad;
  for (auto* lin : decoder.linears())
    if (lin->provider())
      lin->set_provider(std::make_shared<FixedWeightProvider>(lin->provider()->effective_weight(lin->weight())));
}

}  // namespace patch::maskfile
