"""``qpass.load``: a compressed-tensors checkpoint (``qpass.save``'s, or another tool's) run on
qpass's kernels, with no calibration and no searches.

The stored integers and scales define the quantization; qpass's quantize pass, given the
dequantized weights, reproduces them exactly (per-channel symmetric: ``max |q| = 127`` per row,
so the recomputed scale is the stored one), and static input scales come back through a
calibration whose ranges are ``127 * input_scale``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from qpass.api import compile as qpass_compile
from qpass.backend import QPassBackend
from qpass.calibration import Calibration, ChannelStats, is_linear_module
from qpass.config import PerGroup, PerOutputChannel, PerTensor, PerToken, QuantConfig, QuantSpec
from qpass.qmath import QuantizedWeight

logger = logging.getLogger(__name__)

__all__ = ["load"]


def load(directory: str | os.PathLike, *, compile: bool = True, **compile_kwargs) -> tuple[nn.Module, QPassBackend]:  # noqa: A002
    """``model, backend = qpass.load(dir)``: the model (fp32, weights dequantized from the stored
    integers) with its forward compiled by ``qpass.compile`` for exactly the stored quantization:
    the backend quantizes each linear with the stored integers and scales as they are.
    ``compile=False`` leaves ``model.forward`` alone and returns the same backend, not yet used
    (``torch.compile(model.forward, backend=backend)`` runs it)."""
    import transformers
    from safetensors.torch import load_file

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"qpass.load: {directory} has no config.json")
    hf = json.loads((directory / "config.json").read_text())
    qc = hf.pop("quantization_config", None)
    if not qc or qc.get("quant_method") != "compressed-tensors":
        raise ValueError(f"qpass.load: {directory} is not a compressed-tensors checkpoint (no quantization_config)")
    config_cls = transformers.AutoConfig.for_model(hf["model_type"]).__class__
    model_config = config_cls.from_dict(hf)
    from transformers.initialization import no_init_weights

    with no_init_weights():  # every weight is read from the files below; random init took 13 s of startup (SmolLM2)
        model = transformers.AutoModelForCausalLM.from_config(model_config, dtype=torch.float32).eval()
    # no_init_weights also skips the tying of input and output embeddings (transformers 5.23): tie
    # them here, or a tied model's checkpoint (SmolLM2, which stores no lm_head.weight) is refused
    model.tie_weights()

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"qpass.load: {directory} has no .safetensors file")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(f))

    linears = {p: m for p, m in model.named_modules() if is_linear_module(m)}
    config, layers = _config(qc, linears, directory)
    state, stats, stored = {}, {}, {}
    for path, static in layers.items():
        if isinstance(config.weight.granularity, PerGroup):
            stored[path] = _unpacked(tensors, path, config.weight)
        else:
            q = tensors.pop(f"{path}.weight")
            scale = tensors.pop(f"{path}.weight_scale").float()
            if q.dtype not in (torch.int8, torch.float8_e4m3fn) or f"{path}.weight_zero_point" in tensors:
                raise ValueError(f"qpass.load: {path}: {q.dtype} weights are not read yet (int8 / float8_e4m3fn, symmetric)")
            scale = scale.reshape(-1, 1) if scale.numel() > 1 else scale.reshape(1, 1)
            stored[path] = QuantizedWeight(q, scale, 0)
        q = stored[path].q
        state[f"{path}.weight"] = stored[path].dequantize()
        input_scale = tensors.pop(f"{path}.input_scale", None)
        if static:
            if input_scale is None:
                raise ValueError(f"qpass.load: {path}: static activations without an input_scale")
            k = q.shape[1]
            reach = (input_scale.float().reshape(1) * config.activation.qrange[1]).expand(k).clone()
            stats[path] = ChannelStats(absmax=reach, min=-reach, max=reach.clone(), tokens=1)
    state.update(tensors)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    missing = [m for m in missing if m not in tied]
    if missing or unexpected:
        raise ValueError(f"qpass.load: {directory}: tensors missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    calibration = Calibration(stats) if stats else None
    logger.info("qpass.load: %d quantized linears from %s", len(layers), directory)
    if compile:
        backend = qpass_compile(model, config, calibration, **compile_kwargs)
    else:
        backend = QPassBackend(config, calibration, **compile_kwargs).bind(model)
    backend.stored_weights.update(stored)
    return model, backend


def _config(qc: dict, linears: dict[str, nn.Module], directory: Path) -> tuple[QuantConfig, dict[str, bool]]:
    """The QuantConfig that reproduces ``qc`` and {quantized layer path: its activations are static}.
    Targets and ignore entries match as the format defines (compressed-tensors' own matcher: a module
    path, ``re:`` a regex, or a class name in the module's bases)."""
    try:
        from compressed_tensors.utils.match import is_match
    except ImportError as e:
        raise ImportError("qpass.load reads the compressed-tensors format: pip install compressed-tensors") from e
    ignore = qc.get("ignore") or []
    layers: dict[str, bool] = {}
    weights, acts = set(), set()
    for name, group in qc["config_groups"].items():
        w, a = group.get("weights"), group.get("input_activations")
        if w is None:
            raise ValueError(f"qpass.load: {directory}: config group {name} quantizes no weights")
        weights.add(_weight_spec(w, name))
        act = None if a is None else _act_spec(a, name)
        acts.add(None if act is None else (act.dtype, act.symmetric, act.dynamic and isinstance(act.granularity, PerToken)))
        for path, module in linears.items():
            if path in layers or not is_match(path, module, group["targets"], ignore):
                continue
            layers[path] = act is not None and not act.dynamic
    if len(weights) != 1:
        raise ValueError(f"qpass.load: {directory}: config groups with different weight schemes are not read yet")
    static = any(layers.values())
    kinds = {a for a in acts if a is not None}
    if None in acts and kinds or len({(d, s) for d, s, _ in kinds}) > 1:
        raise ValueError(f"qpass.load: {directory}: config groups with different activation types are not read yet")
    weight = weights.pop()
    activation = None
    if kinds:
        dtype, symmetric, _ = next(iter(kinds))
        activation = QuantSpec(dtype, PerTensor(), symmetric=symmetric, dynamic=False) if static else QuantSpec(
            dtype, PerToken() if any(t for *_, t in kinds) else PerTensor(), symmetric=symmetric)
    dynamic_layers = tuple(p for p, st in layers.items() if not st) if static else ()
    skip = tuple(p for p in linears if p not in layers)
    return QuantConfig(weight, activation, None, skip=skip, dynamic_layers=dynamic_layers), layers


def _unpacked(tensors: dict[str, torch.Tensor], path: str, spec: QuantSpec) -> QuantizedWeight:
    """A ``pack-quantized`` layer's 4-bit groups: values and integer zero points unpacked from int32."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    try:
        packed, shape = tensors.pop(f"{path}.weight_packed"), tensors.pop(f"{path}.weight_shape")
        scale = tensors.pop(f"{path}.weight_scale").float()
    except KeyError as e:
        raise ValueError(f"qpass.load: {path}: a pack-quantized layer without {e.args[0]}") from None
    shape = torch.Size(int(s) for s in shape)
    group = spec.granularity.group_size
    if len(shape) != 2 or shape[1] % group or tuple(scale.shape) != (shape[0], shape[1] // group):
        raise ValueError(f"qpass.load: {path}: weight_shape {tuple(shape)} and weight_scale {tuple(scale.shape)} "
                         f"do not make groups of {group}")
    q = unpack_from_int32(packed, 4, shape)
    zp = tensors.pop(f"{path}.weight_zero_point", None)
    if (zp is None) != spec.symmetric:
        raise ValueError(f"qpass.load: {path}: weight_zero_point {'missing' if zp is None else 'present'} "
                         f"for {'asymmetric' if zp is None else 'symmetric'} weights")
    if zp is not None:
        zp = unpack_from_int32(zp, 4, scale.shape, packed_dim=0).float()
    return QuantizedWeight(q, scale, group, zp)


def _weight_spec(args: dict, group: str) -> QuantSpec:
    dtype = _dtype(args, group)
    if dtype == "int4" and args.get("strategy") == "group" and args.get("group_size"):
        symmetric = bool(args.get("symmetric", True))
        return QuantSpec("int4", PerGroup(int(args["group_size"])), symmetric=symmetric,
                         zero_point="float" if symmetric else "int")
    if not args.get("symmetric", True) or args.get("strategy") not in ("channel", "tensor"):
        raise ValueError(f"qpass.load: config group {group}: {args.get('strategy')} weights are not read yet")
    return QuantSpec(dtype, PerOutputChannel() if args["strategy"] == "channel" else PerTensor())


def _act_spec(args: dict, group: str) -> QuantSpec:
    dtype = _dtype(args, group)
    strategy, dynamic = args.get("strategy"), bool(args.get("dynamic"))
    if strategy == "token" and dynamic:
        return QuantSpec(dtype, PerToken(), symmetric=bool(args.get("symmetric", True)))
    if strategy == "tensor":
        if not dynamic and not args.get("symmetric", True):
            raise ValueError(f"qpass.load: config group {group}: asymmetric static activations are not read yet")
        return QuantSpec(dtype, PerTensor(), symmetric=bool(args.get("symmetric", True)), dynamic=dynamic)
    raise ValueError(f"qpass.load: config group {group}: {strategy} activations are not read yet")


def _dtype(args: dict, group: str) -> str:
    if args.get("num_bits") == 8 and args.get("type") == "int":
        return "int8"
    if args.get("num_bits") == 8 and args.get("type") == "float":
        return "fp8_e4m3"
    if args.get("num_bits") == 4 and args.get("type") == "int":
        return "int4"
    raise ValueError(f"qpass.load: config group {group}: {args.get('num_bits')}-bit {args.get('type')} is not read yet")
