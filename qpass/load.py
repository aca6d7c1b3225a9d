"""``qpass.load``: a compressed-tensors checkpoint (``qpass.save``'s, or another tool's) run on
qpass's kernels, with no calibration and no searches.

The stored integers and scales define the quantization; qpass's quantize pass, given the
dequantized weights, reproduces them exactly (per-channel symmetric: ``max |q| = 127`` per row,
so the recomputed scale is the stored one), and static input scales come back through a
calibration whose ranges are ``127 * input_scale``. Per-expert linears (``mlp.experts.{e}.gate_proj``
...) are stacked back into transformers' fused expert parameters (``qpass.expert_names``), their
integers and scales kept per expert, their input scales as per-expert ranges.
"""

from __future__ import annotations

import json
import logging
import os
import weakref
from pathlib import Path

import torch
from torch import nn

from qpass.api import compile as qpass_compile
from qpass.backend import QPassBackend
from qpass.calibration import Calibration, ChannelStats, is_experts_module, is_linear_module
from qpass.config import PerGroup, PerOutputChannel, PerTensor, PerToken, QuantConfig, QuantSpec
from qpass.expert_names import ExpertLayout, expert_layout
from qpass.graph import storage_mark
from qpass.qmath import QuantizedWeight

logger = logging.getLogger(__name__)

__all__ = ["load"]

_LINEAR = nn.Linear(1, 1, bias=False, device="meta")  # what a per-expert module is in the checkpoint's layout


def load(directory: str | os.PathLike, *, compile: bool = True, defer_weights: bool = True,  # noqa: A002
         **compile_kwargs) -> tuple[nn.Module, QPassBackend]:
    """``model, backend = qpass.load(dir)``: the model (fp32, weights dequantized from the stored
    integers) with its forward compiled by ``qpass.compile`` for exactly the stored quantization:
    the backend quantizes each linear with the stored integers and scales as they are.
    ``compile=False`` leaves ``model.forward`` alone and returns the same backend, not yet used
    (``torch.compile(model.forward, backend=backend)`` runs it).

    ``defer_weights`` (with ``compile=True``): the quantized linears' fp32 weights are written only
    when something reads them (``QPassBackend.defer_weights``): the compiled model runs on the
    stored integers alone, so startup skips their dequantization and they take no memory until
    read. Reading ``layer.weight`` (or ``state_dict()``, or calling the layer eagerly) gives the
    dequantized weight. ``defer_weights=False`` writes them all here.

    The weights written here are trusted to equal the stored ones while they stay the same tensors,
    unchanged (their version counter): a layer whose weight was replaced or written in place
    (``weight.mul_(2)``, ``copy_``) is compared and, if changed, quantized again. Writes through
    ``weight.data`` bypass the version counter and are not seen: edit weights under ``torch.no_grad()``."""
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
    experts = _expert_layouts(model, tensors)
    config, layers = _config(qc, linears, directory, experts)
    fp32_experts = tuple(f"{p}.{n}" for p, m in model.named_modules() if is_experts_module(m)
                         for n in ("gate_up_proj", "down_proj") if f"{p}.{n}" not in layers)
    if fp32_experts:  # fused experts the checkpoint keeps in full precision stay so
        config = config.replace(skip=config.skip + fp32_experts)
    state, stats, stored = {}, {}, {}
    deferred: dict[str, tuple[nn.Parameter, QuantizedWeight]] = {}  # path -> (weight left unwritten, its integers)
    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    for param, layout in experts.items():  # per-expert linears -> transformers' fused parameters
        if param in layers:
            stored[param], state[param], stats_e = _fused_experts(tensors, layout, layers[param], config)
            if stats_e is not None:
                stats[param] = stats_e
        else:  # kept in full precision: per-expert float weights, stacked as transformers would
            state[param] = _stack(layout, [[_pop(tensors, f"{n}.weight") for n in layout.names(e)]
                                           for e in range(layout.experts)])
    for path, static in layers.items():
        if path in experts:
            continue
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
        weight = linears[path].weight
        if counts.get(id(weight)) != 1 or not _dequantizable_into(stored[path], weight):  # a tied weight: as the files say
            state[f"{path}.weight"] = stored[path].dequantize()
        elif not (defer_weights and compile):
            stored[path].dequantize_into(weight)
        else:
            deferred[path] = (weight, stored[path])
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
    written = {f"{p}.weight" for p in layers if p in linears and f"{p}.weight" not in state}
    missing = [m for m in missing if m not in tied and m not in written]
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
    backend.defer_weights(model, deferred)
    for path in stored:  # written here as the stored weight dequantized: the quantize pass need not compare them
        param = linears[path].weight if path in linears else None
        if param is not None and counts.get(id(param)) == 1:  # a tied weight may hold the other tensor's values
            backend.stored_params[path] = (weakref.ref(param), storage_mark(param))
    return model, backend


def _dequantizable_into(stored: QuantizedWeight, weight: torch.Tensor) -> bool:
    """Whether ``stored.dequantize()`` can be written into ``weight`` as one ``q * scale`` (the same
    float32 products): per-channel or per-tensor scales without zero points, int8, same shape and
    device. Such a weight is written in place (``QuantizedWeight.dequantize_into``: one pass over
    the weight instead of a dequantized copy that ``load_state_dict`` copies again) or deferred."""
    return not (stored.group_size or stored.zero_point is not None or stored.q.dtype != torch.int8  # float8 does not promote
                or weight.dtype != torch.float32 or tuple(weight.shape) != tuple(stored.q.shape)
                or weight.device != stored.q.device)


def _expert_layouts(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, ExpertLayout]:
    """{fused experts parameter: its per-expert names} for every fused parameter the files hold per
    expert (``...experts.0.gate_proj.weight``); a checkpoint holding the fused tensor itself loads as is."""
    out = {}
    for path, module in model.named_modules():
        if not is_experts_module(module):
            continue
        for name in ("gate_up_proj", "down_proj"):
            param = f"{path}.{name}"
            if param in tensors:
                continue
            try:
                layout = expert_layout(model, param)
            except ValueError:
                continue  # no per-expert names for this architecture: load_state_dict names the fused one missing
            if not any(k.startswith(layout.modules[0].format(e=0) + ".") for k in tensors):
                continue  # neither form is in the files: load_state_dict names it missing
            out[param] = layout
    return out


def _pop(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    try:
        return tensors.pop(name)
    except KeyError:
        raise ValueError(f"qpass.load: {name} is missing (the other experts' modules are in the files)") from None


def _stack(layout: ExpertLayout, per_expert: list[list[torch.Tensor]]) -> torch.Tensor:
    """Per expert, one tensor per module -> (E, ...): the modules concatenated along dim 0 (gate then
    up), the experts stacked, as transformers' conversion does."""
    return torch.stack([torch.cat(mods, dim=0) for mods in per_expert])


def _fused_experts(tensors: dict[str, torch.Tensor], layout: ExpertLayout, static: bool, config: QuantConfig):
    """A fused experts parameter from its per-expert quantized linears: the stored integers and
    scales (E, N, K) / (E, N, 1) or (E, 1, 1), the dequantized fused weight and, for static
    activations, per-expert statistics whose range gives back each expert's ``input_scale``.
    The modules of one expert share the fused layout's input and per-tensor scale: they must agree."""
    experts = layout.experts
    qs, scales, inputs = [], [], []
    for e in range(experts):
        names = layout.names(e)
        q = [_pop(tensors, f"{n}.weight") for n in names]
        sc = [_pop(tensors, f"{n}.weight_scale").float() for n in names]
        inp = [tensors.pop(f"{n}.input_scale", None) for n in names]
        for n, qn in zip(names, q):
            if qn.dtype not in (torch.int8, torch.float8_e4m3fn) or f"{n}.weight_zero_point" in tensors:
                raise ValueError(f"qpass.load: {n}: {qn.dtype} weights are not read yet (int8 / float8_e4m3fn, symmetric)")
        if isinstance(config.weight.granularity, PerTensor):
            if any(not torch.equal(x.reshape(-1), sc[0].reshape(-1)) for x in sc):
                raise ValueError(f"qpass.load: {', '.join(names)}: per-tensor weight scales differ; the fused "
                                 f"{layout.param.rsplit('.', 1)[1]} of expert {e} holds one")
            sc = [sc[0].reshape(1, 1)]
        else:
            sc = [x.reshape(-1, 1) for x in sc]
        if static:
            if any(x is None for x in inp):
                raise ValueError(f"qpass.load: {names[0]}: static activations without an input_scale")
            if any(not torch.equal(x.reshape(1), inp[0].reshape(1)) for x in inp):
                raise ValueError(f"qpass.load: {', '.join(names)}: different input scales; the fused "
                                 f"{layout.param.rsplit('.', 1)[1]} of expert {e} reads one input")
            inputs.append(inp[0].float().reshape(1))
        qs.append(q)
        scales.append(sc)
    stored = QuantizedWeight(_stack(layout, qs), _stack(layout, scales), 0)
    stats = None
    if static:
        k = stored.q.shape[2]
        reach = (torch.cat(inputs) * config.activation.qrange[1])[:, None].expand(experts, k).clone()
        stats = ChannelStats(absmax=reach, min=-reach, max=reach.clone(), tokens=experts,
                             expert_tokens=torch.ones(experts, dtype=torch.long))
    return stored, stored.dequantize(), stats


def _config(qc: dict, linears: dict[str, nn.Module], directory: Path,
            experts: dict[str, ExpertLayout] | None = None) -> tuple[QuantConfig, dict[str, bool]]:
    """The QuantConfig that reproduces ``qc`` and {quantized layer path: its activations are static}.
    Targets and ignore entries match as the format defines (compressed-tensors' own matcher: a module
    path, ``re:`` a regex, or a class name in the module's bases). A fused experts parameter is
    quantized when its per-expert linears are, all by one config group."""
    try:
        from compressed_tensors.utils.match import is_match
    except ImportError as e:
        raise ImportError("qpass.load reads the compressed-tensors format: pip install compressed-tensors") from e
    ignore = qc.get("ignore") or []
    layers: dict[str, bool] = {}
    weights, acts = set(), set()
    float_inputs: list[str] = []  # layers of a group without input activations
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
            if act is None:
                float_inputs.append(path)
        for param, layout in (experts or {}).items():
            hits = [is_match(n, _LINEAR, group["targets"], ignore) for n in layout.all_names()]
            if any(hits) and param not in layers:
                if not all(hits):
                    raise ValueError(f"qpass.load: {directory}: config group {name} quantizes only some experts of "
                                     f"{param} ({sum(hits)} of {len(hits)} linears); the fused weight takes one scheme")
                layers[param] = act is not None and not act.dynamic
                if act is None:
                    float_inputs.append(param)
    if len(weights) != 1:
        raise ValueError(f"qpass.load: {directory}: config groups with different weight schemes are not read yet")
    static = any(layers.values())
    kinds = {a for a in acts if a is not None}
    if len({(d, s) for d, s, _ in kinds}) > 1:
        raise ValueError(f"qpass.load: {directory}: config groups with different activation types are not read yet")
    weight_only = tuple(float_inputs) if kinds else ()  # weight-only layers beside quantized activations
    if kinds and (mixed := [p for p in float_inputs if p in (experts or {})]):
        raise ValueError(f"qpass.load: {directory}: fused experts {mixed[0]} without input activations beside "
                         "quantized ones are not read yet")
    weight = weights.pop()
    activation = None
    if kinds:
        dtype, symmetric, _ = next(iter(kinds))
        activation = QuantSpec(dtype, PerTensor(), symmetric=symmetric, dynamic=False) if static else QuantSpec(
            dtype, PerToken() if any(t for *_, t in kinds) else PerTensor(), symmetric=symmetric)
    dynamic_layers = tuple(p for p, st in layers.items() if not st and p not in weight_only) if static else ()
    skip = tuple(p for p in linears if p not in layers)
    return QuantConfig(weight, activation, None, skip=skip, dynamic_layers=dynamic_layers, weight_only=weight_only), layers


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
