"""The Triton backend's host entry points (registered as the ``rmask::triton_*`` ops in
rmask_kernels/triton/__init__.py; autograd glue in rmask_kernels/ops.py).

Every kernel is an implicit GEMM whose input rows are loaded by computed addresses (strides
passed in, bounds masks for the padding), accumulating in fp32 and computing kept outputs only:

forward, by pattern   per mask pattern p (P patterns of channels_per_pattern channels each):
                      M = (image, kept position of p), N = p's channels (cut at conv-group
                      boundaries), K = (tap, input channel of the group).
forward, by position  neuron-like masks (few channels per pattern), groups == 1: per output
                      position q, M = images, N = the channels kept at q (weight rows gathered).
                      With groups > 1 such masks take the by-pattern kernel over every
                      position instead, its stores predicated on the mask (simpler, dense FLOPs).
grad input            gather form: M = input pixels, N = input channels, K = (tap, output
                      channel); grad_output is loaded only where the mask keeps it. Sparse
                      masks: spatial by tap (M = kept rows, one launch per tap), neuron-like
                      by input position (K = the channels kept where each tap lands).
grad weight           two stages: chunks of kept rows each give fp32 partials, summed in a
                      fixed order (deterministic, no atomics). Neuron-like masks: chunks of
                      every row, grad_output read only where kept; sparse ones (groups == 1):
                      per (position, kept channel) pair a row reduced over the images, then
                      per channel its pairs' rows summed in position order.
grad bias             per channel sum of grad_output over the kept positions (torch reduction).

The files: common.py (interpreter, offset types, dtype options), configs.py (block
configurations: the sets, the rule, the measured choice), tiles.py (how the by-pattern kernels
cut rows and channels), geometry.py (argument checks), forward_kernels.py, grad_input_kernels.py
and grad_weight_kernels.py (the @triton.jit kernels), forward.py and backward.py (their host
launchers, and which kernel a call takes).
"""

from .backward import masked_conv2d_backward
from .forward import masked_conv2d_forward

__all__ = ["masked_conv2d_backward", "masked_conv2d_forward"]
