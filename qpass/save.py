"""``qpass.save``: a quantized model as a Hugging Face directory in the compressed-tensors format.

The smoothing is folded into the saved weights (norms, v_proj / up_proj rows, the linears' columns),
so the directory holds an ordinary W8A8 checkpoint: ``config.json`` with a ``quantization_config``
that the ``compressed-tensors`` package parses, and ``model.safetensors`` with, per quantized linear,
``weight`` (int8 or float8_e4m3fn), ``weight_scale`` (N, 1) and, for static activations,
``input_scale`` (1,); 4-bit weights in groups (weight-only) are packed eight to an int32
(``weight_packed``, ``weight_shape``, ``weight_scale`` per group and, when asymmetric, the integer
``weight_zero_point`` packed likewise). Layers run per-token where a static preset fell back get a
config group of their own. What the format cannot express (a multiply inserted for smoothing, an
outlier split, per-input-channel weights or groups (what AdaDim may choose per layer),
float-zero-point weights, asymmetric static activations) is refused with an error naming the layer.

Fused mixture-of-experts weights (``mlp.experts.gate_up_proj`` (E, 2I, H), ``down_proj`` (E, H, I))
are written as the per-expert linears transformers builds them from (``mlp.experts.{e}.gate_proj``,
``up_proj``, ``down_proj``; ``qpass.expert_names``), each with its own ``weight``, ``weight_scale``
and, static, ``input_scale``, in config groups of their own whose ``re:`` targets match those names.
"""

from __future__ import annotations

import json
import logging
import operator
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from qpass.backend import QPassBackend
from qpass.calibration import Calibration
from qpass.config import AdaDim, PerGroup, PerInputChannelGroup, PerOutputChannel, PerTensor, PerToken, QuantConfig, QuantSpec
from qpass.expert_names import ExpertLayout, expert_layout

logger = logging.getLogger(__name__)

__all__ = ["save"]

# constants of the rewritten graph (by name suffix) that the format holds, and the tensor name
_TENSORS = {".weight_q": "weight", ".weight_scale": "weight_scale", ".weight_zero_point": "weight_zero_point",
            ".input_scale": "input_scale"}
# constants it cannot hold: suffix -> why
_REFUSED = {
    ".smooth_inv_scale": "its smoothing is a multiply inserted before it (nothing could absorb 1/s)",
    ".outlier_channels": "it has an outlier split (LLM.int8())",
    ".outlier_weight": "it has an outlier split (LLM.int8())",
    ".inlier_mask": "it has an outlier split (LLM.int8())",
    ".input_zero_point": "its static activations are asymmetric",
}
# constants of a fused experts parameter (``<param path><suffix>``, each (E, ...)), and the tensor name
_EXPERT_TENSORS = {"_q": "weight", "_scale": "weight_scale", "_zero_point": "weight_zero_point",
                   ".input_scale": "input_scale"}


@dataclass
class _Linear:
    path: str
    tensors: dict[str, torch.Tensor]
    per_token: bool  # a static config's per-token fallback
    row: object = None  # its report row (a fused experts parameter's, for each of its experts)
    target: str = ""  # its config group target, when not its path (experts: one ``re:`` for all)


def save(
    model: nn.Module,
    config: QuantConfig | str,
    directory: str | os.PathLike,
    *,
    calibration: Calibration | None = None,
    tokenizer=None,
    example_input: torch.Tensor | None = None,
) -> QPassBackend:
    """Quantize ``model`` with ``config`` (and ``calibration``) and write it to ``directory``.

    The model is traced once on ``example_input`` (default: 8 tokens of id 0) with the reference
    path, exactly as ``qpass.compile`` would rewrite it; ``model`` itself is not changed.
    The directory loads with ``transformers.AutoModelForCausalLM.from_pretrained`` (with the
    ``compressed-tensors`` package installed) and with ``qpass.load``. Returns the backend that
    rewrote the model: its ``report`` holds the per-layer decisions written (alpha, granularity,
    per-token fallbacks), which the checkpoint itself does not.
    """
    try:
        from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
    except ImportError as e:
        raise ImportError("qpass.save writes the compressed-tensors format: pip install compressed-tensors") from e
    from safetensors.torch import save_file

    backend = QPassBackend(config, calibration, inductor=False)
    config = backend.config
    _check_config(config)
    backend.config = config.replace(lower=False)
    backend.bind(model)
    ids = example_input if example_input is not None else torch.zeros(1, 8, dtype=torch.long)
    with torch.no_grad():
        torch.compile(model, backend=backend, dynamic=False)(ids, use_cache=False)
    _check_layers(backend.report.rows, config)

    expert_rows = {p: r for p, r in backend.report.rows.items() if "per expert" in r.weight}
    layouts = {p: _expert_layout(model, p, r) for p, r in expert_rows.items()}
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    linears: dict[str, _Linear] = {}
    experts: dict[str, dict[str, torch.Tensor]] = {}
    for gm in backend.graphs:
        for attr, name in gm.qpass_names.items():
            value = getattr(gm, attr).detach().cpu()
            if name in state:  # a smoothed parameter (norm weight, v_proj / up_proj rows)
                state[name] = value.to(state[name].dtype).reshape(state[name].shape)
                continue
            param = next((p for p in layouts if name.startswith(p) and name[len(p):] in _EXPERT_TENSORS), None)
            if param is not None:
                experts.setdefault(param, {})[_EXPERT_TENSORS[name[len(param):]]] = value
                continue
            if name.endswith(".computed_scale"):
                raise ValueError(
                    f"qpass.save: {name[: -len('.computed_scale')]}: smoothing folded into a scale computed from the "
                    "norm weight (Gemma's 1 + w); the checkpoint's weight cannot hold it"
                )
            if name.endswith(".computed_weight"):  # e.g. DeepSeek-V3's router: F.linear(x, weight.type(float32))
                raise ValueError(
                    f"qpass.save: {name[: -len('.computed_weight')]}: smoothing folded into a weight computed in the "
                    "graph (a cast or transpose of the parameter); the checkpoint's weight cannot hold it"
                )
            suffix = next((s for s in (*_TENSORS, *_REFUSED) if name.endswith(s)), None)
            if suffix is None:
                raise ValueError(f"qpass.save: {name}: no compressed-tensors form for this constant")
            path = name[: -len(suffix)]
            if suffix in _REFUSED:
                raise ValueError(f"qpass.save: {path}: {_REFUSED[suffix]}; the compressed-tensors format cannot hold it")
            row = backend.report.rows[path]
            layer = linears.setdefault(path, _Linear(path, {}, row.per_token_fallback))
            layer.tensors[_TENSORS[suffix]] = value

    for gm in backend.graphs:  # q, k, v (gate, up) share one quantized input and its static scale
        for path, scale in _input_scales(gm).items():
            if path in linears and not linears[path].per_token:
                linears[path].tensors.setdefault("input_scale", scale.clone())

    two_d = sorted({p for gm in backend.graphs for p in _per_token_two_d(gm) if p in linears})
    if two_d:
        logger.warning(
            "qpass.save: %d linears take 2-D (tokens, hidden) inputs with per-token activation scales: %s. "
            "The checkpoint says per token, as vLLM and qpass.load run it; transformers' compressed-tensors "
            "runtime (its \"token\" strategy keeps dims 0 and 1 of the input) computes one scale over a whole "
            "2-D input there, i.e. per tensor", len(two_d), ", ".join(two_d))

    for param, tensors in experts.items():
        state.pop(param)
        linears.update(_per_expert(layouts[param], tensors, expert_rows[param]))

    groups: dict[tuple, list[str]] = {}
    for path, layer in linears.items():
        row = layer.row or backend.report.rows[path]
        if not any(g in row.weight for g in ("per-output-channel", "per-tensor", "per-group(")):
            raise ValueError(
                f"qpass.save: {path}: {row.weight} weights; the compressed-tensors format holds per-channel, "
                "per-tensor or per-group (along the input)"
            )
        weight = _weight_args(config.weight, "per-tensor" not in row.weight)
        act = None if config.quantizes_weight_only(path) else _act_args(config.activation, layer.per_token)
        if not layer.target:  # per-expert linears have no parameter of their own (the fused one is popped)
            state.pop(f"{path}.weight")
        if config.weight.dtype == "int4":
            layer.tensors = _packed(layer.tensors)
        for tensor, value in layer.tensors.items():
            if tensor == "weight_scale" and value.dim() == 2 and value.shape[1] != 1 and config.weight.dtype != "int4":
                value = value.reshape(-1, 1)
            if tensor == "input_scale":
                value = value.reshape(1)
            state[f"{path}.{tensor}"] = value.contiguous()
        key = (json.dumps(weight, sort_keys=True), json.dumps(act, sort_keys=True), bool(layer.target))
        targets = groups.setdefault(key, [])
        if (layer.target or path) not in targets:
            targets.append(layer.target or path)

    fmt = {"fp8_e4m3": "float-quantized", "int4": "pack-quantized"}.get(config.weight.dtype, "int-quantized")
    config_groups = {
        f"group_{i}": QuantizationScheme(
            targets=paths,
            weights=QuantizationArgs(**json.loads(w)),
            input_activations=None if a == "null" else QuantizationArgs(**json.loads(a)),
            format=fmt,
        )
        for i, ((w, a, _), paths) in enumerate(sorted(groups.items(), key=lambda kv: (kv[0][2], kv[1][0])))
    }
    ignore = [p for p, r in backend.report.rows.items() if p not in linears and p not in experts]
    qconfig = QuantizationConfig(
        config_groups=config_groups, format=fmt, quantization_status="compressed", ignore=ignore
    )

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    hf_config = model.config.to_dict()
    hf_config["quantization_config"] = qconfig.model_dump(exclude_none=False)
    hf_config["quantization_config"]["quant_method"] = "compressed-tensors"
    state, untied = _untie(model, state, {f"{path}.weight" for path in linears})
    if untied:  # a tied embedding's lm_head stored quantized: the checkpoint holds two weights now
        hf_config["tie_word_embeddings"] = False
        logger.info("qpass.save: %s quantized apart from the embedding it was tied to (tie_word_embeddings=false)",
                    ", ".join(untied))
    _atomic(directory / "model.safetensors", lambda f: save_file(state, f, metadata={"format": "pt"}))
    _atomic(directory / "config.json", lambda f: Path(f).write_text(json.dumps(hf_config, indent=2, default=str)))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    logger.info("qpass.save: %d quantized linears in %d config groups, %d ignored -> %s",
                len(linears), len(config_groups), len(ignore), directory)
    return backend


def _quantized_linears(gm):
    """``(module path, dequantized input node, its scale node)`` of each quantized linear of the
    reference graph (``linear(dequantize(quantize(x, scale)), dequantize(weight_q, ...))``)."""
    from qpass import ops

    for node in gm.graph.nodes:
        if node.op != "call_function" or len(node.args) < 2:
            continue
        x, w = node.args[0], node.args[1]
        if not all(isinstance(n, torch.fx.Node) and n.target is ops.dequantize for n in (x, w)):
            continue
        wq = w.args[0]
        name = gm.qpass_names.get(wq.target, "") if wq.op == "get_attr" else ""
        if name.endswith(".weight_q"):
            yield name[: -len(".weight_q")], x, x.args[1]


def _input_scales(gm) -> dict[str, torch.Tensor]:
    """Module path -> the static scale of its input, read off the reference graph."""
    return {path: getattr(gm, scale.target).detach().cpu() for path, _, scale in _quantized_linears(gm)
            if isinstance(scale, torch.fx.Node) and scale.op == "get_attr"}


def _per_token_two_d(gm) -> list[str]:
    """Module paths whose per-token dynamic activations come from a 2-D ``(tokens, hidden)`` input."""
    from qpass import ops

    out = []
    for path, x, scale in _quantized_linears(gm):
        choose = scale.args[0] if isinstance(scale, torch.fx.Node) and scale.target is operator.getitem else None
        val = x.meta.get("val")
        if (choose is not None and choose.target is ops.choose_qparams and choose.args[1] is True
                and val is not None and val.dim() == 2):
            out.append(path)
    return out


def _expert_layout(model: nn.Module, param: str, row) -> ExpertLayout:
    """The per-expert names ``param`` is written under, after refusing what they cannot hold."""
    if not any(g in row.weight for g in ("per-output-channel", "per-tensor")) or "asym" in row.weight:
        raise ValueError(
            f"qpass.save: {param}: {row.weight} weights; fused experts are written per output channel or per "
            "tensor, symmetric (per-group expert weights are not written yet)"
        )
    try:
        return expert_layout(model, param)
    except ValueError as e:
        raise ValueError(f"qpass.save: {e}") from None


def _per_expert(layout: ExpertLayout, tensors: dict[str, torch.Tensor], row) -> dict[str, _Linear]:
    """A fused experts parameter's constants ((E, N, K) weight, (E, N, 1) or (E, 1, 1) scales, (E,)
    static input scales) as one linear per expert and module: gate_up's rows split into gate and up
    (a per-tensor scale goes to both), each expert's input scale to each of its modules."""
    weight, scale = tensors["weight"], tensors["weight_scale"]
    split_scale = scale.shape[1] == weight.shape[1]
    out = {}
    for e, (qs, scales) in enumerate(zip(layout.split(weight), layout.split(scale) if split_scale else
                                         [[scale[e]] * len(layout.modules) for e in range(scale.shape[0])])):
        for path, q, sc in zip(layout.names(e), qs, scales):
            layer = {"weight": q.clone(), "weight_scale": sc.reshape(-1, 1).clone()}  # own storage each (safetensors)
            if "input_scale" in tensors:
                layer["input_scale"] = tensors["input_scale"][e].reshape(1).clone()
            out[path] = _Linear(path, layer, row.per_token_fallback, row, layout.target)
    return out


def _check_config(config: QuantConfig) -> None:
    if config.weight is None:
        raise ValueError("qpass.save: the config quantizes no weights; save the model with save_pretrained instead")
    w, a = config.weight, config.activation
    int4_groups = w.dtype == "int4" and isinstance(w.granularity, PerGroup)
    if not (int4_groups or _per_layer(w)) and (
            w.dtype not in ("int8", "fp8_e4m3") or not isinstance(w.granularity, (PerOutputChannel, PerTensor))):
        raise ValueError(
            f"qpass.save: {w.dtype} {type(w.granularity).__name__} weights are not written yet "
            "(int8 / fp8_e4m3 per-output-channel or per-tensor, int4 per-group are)"
        )
    if not w.symmetric and w.zero_point != "int" and not _per_layer(w):
        raise ValueError(
            "qpass.save: the weights have float zero points; the compressed-tensors format stores integer ones "
            "(QuantSpec(..., symmetric=False, zero_point='int'), as the w4a16 preset has)"
        )
    if not w.symmetric and w.dtype != "int4" and not _per_layer(w):
        raise ValueError("qpass.save: asymmetric 8-bit weights are not written (the format packs zero points of 4-bit groups)")
    if config.outliers is not None:
        raise ValueError("qpass.save: an outlier split (LLM.int8()) has no compressed-tensors form")
    if a is not None and not a.dynamic and not a.symmetric:
        raise ValueError("qpass.save: asymmetric static activations are not written (their zero points are floats)")


def _per_layer(w: QuantSpec) -> bool:
    """Per-input-channel groups, or AdaDim's per-layer choice: refused layer by layer, naming the
    layer, once the model is traced (``_check_layers``)."""
    return isinstance(w.granularity, (AdaDim, PerInputChannelGroup))


def _check_layers(rows: dict, config: QuantConfig) -> None:
    """What ``_check_config`` left to the trace: the first layer with per-input-channel weights
    (scales or groups; compressed-tensors has scales per output channel, per tensor or per
    group of input channels only), then the config's dtype."""
    w = config.weight
    if not _per_layer(w):
        return
    for path, row in rows.items():
        if "per-input-channel" in row.weight:
            raise ValueError(
                f"qpass.save: {path}: {row.weight} weights; the compressed-tensors format has no per-input-channel "
                "scales (per output channel, per tensor, or per group of input channels only)"
            )
    if w.dtype not in ("int8", "fp8_e4m3"):
        raise ValueError(f"qpass.save: {w.dtype} AdaDim weights are not written yet (int8 / fp8_e4m3 are)")


def _weight_args(spec: QuantSpec, per_channel: bool) -> dict:
    if isinstance(spec.granularity, PerGroup):
        return dict(num_bits=4, type="int", symmetric=spec.symmetric, strategy="group",
                    group_size=spec.granularity.group_size, dynamic=False)
    kind = "float" if spec.dtype == "fp8_e4m3" else "int"
    return dict(num_bits=8, type=kind, symmetric=True, strategy="channel" if per_channel else "tensor", dynamic=False)


def _packed(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """int4 values (one per int8) -> the format's ``weight_packed`` (eight to an int32 along the
    input), ``weight_shape`` and ``weight_zero_point`` (integers, packed along the output)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    q = tensors.pop("weight")
    out = {"weight_packed": pack_to_int32(q.to(torch.int8), 4), "weight_shape": torch.tensor(q.shape, dtype=torch.int64)}
    out["weight_scale"] = tensors.pop("weight_scale").reshape(q.shape[0], -1)
    zp = tensors.pop("weight_zero_point", None)
    if zp is not None:
        zp = zp.reshape(q.shape[0], -1)
        if not torch.equal(zp, zp.round()):
            raise ValueError("qpass.save: float zero points cannot be packed")
        out["weight_zero_point"] = pack_to_int32(zp.round().to(torch.int8), 4, packed_dim=0)
    return {**out, **tensors}


def _act_args(spec: QuantSpec | None, per_token_fallback: bool) -> dict | None:
    if spec is None:
        return None
    kind = "float" if spec.dtype == "fp8_e4m3" else "int"
    if per_token_fallback or isinstance(spec.granularity, PerToken):
        return dict(num_bits=8, type=kind, symmetric=spec.symmetric, strategy="token", dynamic=True)
    return dict(num_bits=8, type=kind, symmetric=spec.symmetric, strategy="tensor", dynamic=spec.dynamic)


def _untie(model: nn.Module, state: dict, quantized: set[str]) -> tuple[dict, list[str]]:
    """Drop the second name of tied parameters (``lm_head.weight`` of a tied embedding), as
    ``save_pretrained`` does; safetensors refuses two names for one storage. A name that holds a
    quantized weight (``quantized``: e.g. ``lm_head`` under ``QuantConfig.weight_only``) keeps it:
    its module is returned, and the checkpoint says the weights are no longer tied."""
    seen: dict[int, str] = {}
    untied = []
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen and name in state and seen[id(p)] in state:
            if name in quantized or seen[id(p)] in quantized:
                untied.append(name.removesuffix(".weight") if name in quantized else seen[id(p)].removesuffix(".weight"))
            else:
                state.pop(name)
        seen.setdefault(id(p), name)
    return state, untied


def _atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
