"""Checkpoint names of fused expert weights: one ``(out, in)`` linear per expert.

transformers 5 holds a mixture-of-experts layer's weights fused (``mlp.experts.gate_up_proj``
(E, 2I, H), ``mlp.experts.down_proj`` (E, H, I)) and builds them on load from per-expert checkpoint
names (``mlp.experts.{e}.gate_proj.weight``, ``up_proj``, ``down_proj``) with the conversion mapping
of the model's architecture: ``MergeModulelist(dim=0)`` stacks the experts, ``Concatenate(dim=1)``
joins gate and up. :func:`expert_layout` reads that mapping, so ``qpass.save`` writes and
``qpass.load`` reads exactly the names (and the gate/up order) transformers uses.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["ExpertLayout", "expert_layout"]


@dataclass(frozen=True)
class ExpertLayout:
    """How one fused parameter splits into per-expert linears.

    ``param="model.layers.1.mlp.experts.gate_up_proj"``, ``modules=("model.layers.1.mlp.experts.{e}.gate_proj",
    "model.layers.1.mlp.experts.{e}.up_proj")``: expert ``e``'s rows ``[0, I)`` are its gate_proj,
    ``[I, 2I)`` its up_proj (the order transformers concatenates them in)."""

    param: str
    modules: tuple[str, ...]
    experts: int  # E, the fused parameter's first dimension

    def all_names(self) -> list[str]:
        """Every expert's module paths."""
        return [n for e in range(self.experts) for n in self.names(e)]

    def names(self, e: int) -> list[str]:
        """The module paths of expert ``e``, in the fused order."""
        return [m.format(e=e) for m in self.modules]

    @property
    def target(self) -> str:
        """A compressed-tensors ``re:`` target matching every expert's modules of this parameter."""
        prefix, _, _ = self.modules[0].partition("{e}")
        tails = [m.partition("{e}")[2] for m in self.modules]
        tail = re.escape(tails[0]) if len(tails) == 1 else "(" + "|".join(re.escape(t) for t in tails) + ")"
        return f"re:^{re.escape(prefix)}\\d+{tail}$"

    def split(self, fused: torch.Tensor) -> list[list[torch.Tensor]]:
        """(E, N, ...) -> per expert, one (N / len(modules), ...) tensor per module."""
        return [list(fused[e].chunk(len(self.modules), dim=0)) for e in range(fused.shape[0])]


def expert_layout(model: nn.Module, param: str) -> ExpertLayout:
    """The per-expert names of the fused parameter ``param`` of ``model``, from transformers' own
    conversion mapping for the model's architecture; a ValueError naming ``param`` when the
    architecture has none (its checkpoints then hold the fused tensor, which the compressed-tensors
    format cannot quantize per expert)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter

    for conv in get_model_conversion_mapping(model, add_legacy=False):
        if not isinstance(conv, WeightConverter):
            continue
        sources, targets = conv._original_source_patterns, conv._original_target_patterns
        if len(targets) != 1 or not param.endswith(targets[0]) or not all(s.count("*") == 1 for s in sources):
            continue
        ops = [(type(op), getattr(op, "dim", None)) for op in conv.operations]
        want = [(MergeModulelist, 0)] + ([(Concatenate, 1)] if len(sources) > 1 else [])
        if ops != want or not all(s.endswith(".weight") for s in sources):
            raise ValueError(f"{param}: transformers builds it from {sources} with {conv.operations}; "
                             "qpass writes per-expert linears only for stacked (and gate/up concatenated) weights")
        prefix = param[: -len(targets[0])]
        modules = tuple(prefix + s[: -len(".weight")].replace("*", "{e}") for s in sources)
        return ExpertLayout(param, modules, int(model.get_parameter(param).shape[0]))
    raise ValueError(
        f"{param}: transformers has no per-expert checkpoint names for {type(model).__name__} "
        "(no conversion mapping builds this fused parameter)"
    )
