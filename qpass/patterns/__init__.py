"""Smoothing patterns, tried in this order on the op that produces a group of linears' input.

Each pattern module holds its search (``match``), its fold, and an ``Example``
module that exhibits it; ``walk`` holds the channel-preserving walk they share.
"""

from . import experts, gated_act, linear_linear, linear_norm, relu_act
from .base import Absorber, ArgEdits, Region
from .walk import NotChannelPreserving, Walk, trace_channels, walk_back

# One table, applied top to bottom; the first pattern that matches absorbs 1/s.
PATTERNS = (
    linear_norm,  # norm weight (and bias) takes 1/s: free
    linear_linear,  # the previous linear's rows take 1/s: free
    gated_act,  # up's rows take 1/s through act(gate) * up: free
    relu_act,  # fc1's rows take 1/s through relu(fc1(x)), relu(z / s) == relu(z) / s: free
    experts,  # the same inside a mixture-of-experts layer, one scale per expert: free
)

__all__ = ["PATTERNS", "Absorber", "ArgEdits", "Region", "NotChannelPreserving", "Walk", "trace_channels", "walk_back"]
