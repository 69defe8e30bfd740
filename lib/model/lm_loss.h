#pragma once
// The language-model loss through the LM head without the [tokens, vocab]
// logits or a recompute: cross-entropy of x w^T, chunk by chunk of rows, with
// each chunk's gradient made while its logits exist.
#include <ATen/ATen.h>

#include <cstdint>

namespace patch::model {

// Sum over the rows of x [n, h] of cross_entropy(x w^T, targets) (w [vocab, h],
// targets [n] int64 in [0, vocab)). The logits are x's dtype; the softmax and
// the sum are float32 (float64 for a float64 x). Chunks of `chunk_rows` rows
// hold the only logits. When x requires grad, each chunk's gradient with
// respect to x, (softmax - onehot) w, is made in the same pass and kept
// ([n, h], x's dtype); backward only scales it. So the head costs two GEMMs
// (an autograd recompute costs three) and one read-read-write of each chunk's
// logits. w must not require grad (the decoder's head is frozen).
at::Tensor linear_cross_entropy(const at::Tensor& x, const at::Tensor& w, const at::Tensor& targets,
                                int64_t chunk_rows);

// One chunk: each row's loss log-sum-exp(z) - z[target] of `logits` [rows,
// vocab] (float32, or float64 for float64 logits), and with `grad` the logits
// overwritten by their gradient softmax(z) - onehot(target), in their dtype.
// A target outside [0, vocab) throws on the CPU and gives a NaN loss on CUDA.
at::Tensor cross_entropy_rows_(at::Tensor& logits, const at::Tensor& targets, bool grad);

namespace cuda {
void cross_entropy_rows_(at::Tensor& logits, const at::Tensor& targets, bool grad, at::Tensor& loss);
}  // namespace cuda

}  // namespace patch::model
