"""What a smoothing pattern returns: the op that absorbs ``1/s`` and how to fold it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import fx

from qpass.graph import QGraph

__all__ = ["Absorber", "ArgEdits", "Region"]


@dataclass
class Region:
    """Nodes whose outputs the fold divides by ``s``: their probes map each output
    position to a channel, and ``scaled`` marks the channels that change."""

    nodes: list[fx.Node]
    probes: dict[fx.Node, torch.Tensor]
    scaled: torch.Tensor  # bool mask over the channel space of ``probes``


@dataclass
class Absorber:
    """The op before a group of linears that can take ``1/s`` exactly.

    ``fold(edits, s)`` divides the absorber's output channels by ``s`` (one entry per
    producer channel). ``regions`` are the nodes that then carry scaled values,
    beside the consumers' own paths; the smoothing pass checks nothing else reads them.
    """

    kind: str
    name: str  # module path or node name of the absorbing op, for the report
    fold: Callable[["ArgEdits", torch.Tensor], None]
    regions: list[Region] = field(default_factory=list)
    # A fold inside a mixture-of-experts layer: ``fold`` takes one scale per expert and channel,
    # (experts, channels), valid for readers that are grouped matmuls over the same ``offsets``.
    experts: int | None = None
    offsets: fx.Node | None = None
    # An absorbing linear (linear-linear, gated-act): its site, and ``rows[p]``, the output row that
    # takes ``1 / s[p]`` (what learned smoothing needs to see the fold as numbers).
    site: object | None = None
    rows: torch.Tensor | None = None


class ArgEdits:
    """New values for tensor arguments of graph nodes, committed as constants at the end.

    Edits of the same argument compose (v_proj's columns are scaled as a consumer of
    the input norm and its rows as the absorber of o_proj).
    """

    def __init__(self, qg: QGraph):
        self.qg = qg
        self._values: dict[tuple[fx.Node, int], tuple[torch.Tensor, str, str | None]] = {}

    def get(self, node: fx.Node, pos: int, kwarg: str | None = None) -> torch.Tensor | None:
        if (node, pos) in self._values:
            return self._values[(node, pos)][0]
        arg = _get_arg(node, pos, kwarg)
        value = self.qg.value(arg)
        if arg is not None and value is None:
            raise ValueError(f"{node.name}: argument {pos} is not a parameter or constant")
        return value

    def set(self, node: fx.Node, pos: int, value: torch.Tensor, name: str, kwarg: str | None = None) -> None:
        self._values[(node, pos)] = (value, name, kwarg)

    def weight(self, site) -> torch.Tensor:
        """The (edited) weight of the linear at ``site``, laid out as its graph argument."""
        return self.get(*site.weight_arg)

    def set_weight(self, site, value: torch.Tensor) -> None:
        """A weight computed in the graph (``x @ W.T``'s ``W.T``) keeps its graph layout: named
        ``computed_weight``, as no parameter's new value."""
        node, pos, kwarg = site.weight_arg
        w = site.weight_node
        direct = w in self.qg.params or w.op == "get_attr"
        self.set(node, pos, value, f"{site.path}.{'weight' if direct else 'computed_weight'}", kwarg)

    def bias(self, site) -> torch.Tensor | None:
        return None if site.bias_arg is None else self.get(*site.bias_arg)

    def set_bias(self, site, value: torch.Tensor) -> None:
        node, pos, kwarg = site.bias_arg
        self.set(node, pos, value, f"{site.path}.bias", kwarg)

    def __len__(self) -> int:
        return len(self._values)

    def commit(self) -> None:
        for (node, pos), (value, name, kwarg) in self._values.items():
            _set_arg(node, pos, kwarg, self.qg.constant(name, value))
        self._values.clear()


def _get_arg(node: fx.Node, pos: int, kwarg: str | None):
    if len(node.args) > pos:
        return node.args[pos]
    return node.kwargs.get(kwarg) if kwarg else None


def _set_arg(node: fx.Node, pos: int, kwarg: str | None, value) -> None:
    if len(node.args) > pos:
        args = list(node.args)
        args[pos] = value
        node.args = tuple(args)
    elif kwarg:
        node.kwargs = {**node.kwargs, kwarg: value}
    else:
        node.args = (*node.args, *([None] * (pos - len(node.args))), value)
