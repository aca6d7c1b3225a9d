"""Compile a prompt graph one decoder block at a time, so that identical blocks share one compile.

Inductor's code generation runs per node of the graph it is given: for a model of 30 identical
decoder layers it generates the same kernels 30 times, in Python, before its cache finds them
identical. Split into one piece per block, each piece is a graph of its own, with the block's
weights, scales and cache as inputs: Inductor's FX graph cache keys a graph by its code and its
inputs' shapes, so the first block compiles and every later block of the same shape is a cache
hit (SmolLM2 ``w8a8_dynamic``, 2 threads, cold: 59 s -> 24 s to the first token).

    graph:  embed -> layers.0 (norm, q/k/v, attention, o, norm, gate/up, down) -> layers.1 ... -> norm -> lm_head
    pieces: [embed, rotary, masks] [layers.0] [layers.1] ... [layers.29] [norm, lm_head]

A block is the shallowest module on a node's ``nn_module_stack`` that is an item of a module list
(``model.layers.3``, ``transformer.h.3``); what lies between blocks forms pieces of its own. The
pieces run in the graph's order and exchange the tensors one block hands the next (the residual
stream, the position embeddings, the mask), so the split computes what the whole graph does. What
it gives up: fusing the last kernel of one block with the first of the next, and each piece's call
costs its wrappers' time (SmolLM2, 2 threads: +3% on a 512-token prompt, +5 ms on a 2-token one;
``bench/by_block.py``). Graphs with fewer than two blocks compile whole.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from torch import fx
from torch.fx.passes.split_module import split_module

__all__ = ["block_of", "partition", "compile_by_block"]

# "L['self'].model.layers.3" (Dynamo), "model.layers[3]", "getattr(L['self'].h, '3')" -> the list and the index
_GETATTR_INDEX = re.compile(r"getattr\(([^,()]+), '(\d+)'\)")
_INDEXED = re.compile(r"(?:\.(\d+)|\[(\d+)\])(?=$|[.\[])")


def block_of(node: fx.Node) -> tuple[str, int] | None:
    """``(module list path, index)`` of the shallowest module list item on ``node``'s
    ``nn_module_stack``, or None where the node belongs to no such item."""
    best: tuple[str, int] | None = None
    for entry in (node.meta.get("nn_module_stack") or {}).values():
        path = _GETATTR_INDEX.sub(r"\1.\2", str(entry[0] if isinstance(entry, tuple) else entry))
        match = _INDEXED.search(path)
        if match is None:
            continue
        key = (path[: match.start()], int(match.group(1) or match.group(2)))
        if best is None or len(key[0]) < len(best[0]):
            best = key
    return best


def partition(gm: fx.GraphModule) -> dict[fx.Node, int] | None:
    """Each computing node's piece: block ``k`` (in order of first appearance) is piece ``2k + 2``,
    nodes of no block go to the piece between the blocks they follow (odd numbers, 0 before the
    first), except those computed from constants alone, which go to the first piece that reads them.
    A node never lands in a piece before one it reads, so the pieces run in order. None where the
    graph holds fewer than two blocks."""
    pieces: dict[fx.Node, int] = {}
    blocks: dict[tuple[str, int], int] = {}
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr", "output"):
            continue
        floor = max((pieces[a] for a in node.all_input_nodes if a in pieces), default=0)
        key = block_of(node)
        if key is not None:
            piece = blocks.setdefault(key, 2 * len(blocks) + 2)
        else:
            piece = floor + 1 if floor % 2 == 0 and floor > 0 else floor  # between blocks, after what it reads
        pieces[node] = max(piece, floor)
    if len(blocks) < 2:
        return None
    # A node outside the blocks computed from constants alone (a weight-only lm_head's dequantized
    # weight) runs in the piece that reads it, not where it stands in the graph: a piece's outputs
    # are materialised, so from an earlier piece the whole dequantized weight would be written and
    # handed on at every call (SmolLM2's int8 head: 113 MB, +140 ms on a 512-token prompt).
    constant: dict[fx.Node, bool] = {}
    for node in gm.graph.nodes:
        constant[node] = node.op == "get_attr" or (
            node.op in ("call_function", "call_method") and bool(node.all_input_nodes)
            and all(constant[a] for a in node.all_input_nodes))
    for node in reversed(gm.graph.nodes):
        if node in pieces and constant[node] and block_of(node) is None:
            readers = [pieces[u] for u in node.users if u in pieces]
            if readers:
                pieces[node] = min(readers)
    return pieces


def _example(node: fx.Node):
    for key in ("val", "example_value"):
        if key in node.meta:
            return node.meta[key]
    raise RuntimeError(f"qpass blocks: input {node.name} of a piece has no example value (meta['val'])")


def compile_by_block(gm: fx.GraphModule, compile_piece: Callable[[fx.GraphModule, list], Callable]) -> Callable | None:
    """``gm`` split into pieces (``partition``), each compiled by ``compile_piece(piece, example_inputs)``
    with its inputs' ``meta['val']`` as example inputs; the split module calls them in order. None
    where ``gm`` has fewer than two blocks (compile it whole)."""
    pieces = partition(gm)
    if pieces is None:
        return None
    split = split_module(gm, None, pieces.__getitem__, keep_original_order=True)
    for node in split.graph.nodes:
        if node.op == "call_module":
            sub = getattr(split, node.target)
            inputs = [_example(p) for p in sub.graph.nodes if p.op == "placeholder"]
            compiled = compile_piece(sub, inputs)
            # a plain attribute in the submodule's place: the split module calls it without
            # nn.Module's call machinery (hooks, ...) per piece
            delattr(split, node.target)
            setattr(split, node.target, compiled)
    return split
