"""Prefill and decode speed of qpass against fp32 and torchao, in one run.

    python bench/speed.py [--models smollm2 llama2048] [--layers 4] [--presets w8a8_static w8a8_dynamic]
                          [--prefill 512] [--context 512] [--reps 10] [--warmup 3] [--threads N]
                          [--device cpu|cuda] [--dtype fp32|bf16] [--json bench/results/speed_cpu.json]

Workloads (batch 1):
  prefill  ``model(ids[1 x 512], use_cache=False, logits_to_keep=1)``: the prompt, keeping the last
           position's logits as generation does (the lm_head over every position would otherwise be a
           fixed fp32 cost that no contender quantizes);
  decode   one new token against a ``StaticCache`` holding ``--context`` tokens (filled once by the
           fp32 model); every repetition writes the same cache slot, so each step does the same work.
Contenders (each compiled once, ``dynamic=False``; Dynamo is reset between them only with ``--rounds 1``):
  eager and ``torch.compile`` (Inductor, default settings) in the model's dtype; torchao
  ``Int8DynamicActivationInt8WeightConfig`` on a copy of the model, compiled with Inductor freezing
  (scoped with ``config.patch`` around its compiles; without freezing it runs ATen's reference
  ``_int_mm``); each qpass preset on a copy of the model, calibrated on real text (SmolLM2) or random
  tokens (the random Llama; weight-only presets need no calibration), with ``release_weights`` after
  both workloads have compiled.
  ``--dtype bf16`` (a bf16 model; default presets ``w8a16 w4a16``): torchao's weight-only configs
  instead, with freezing: ``Int8WeightOnlyConfig``, ``Int4WeightOnlyConfig`` (no CPU layout in
  torchao 0.18: its row records the error) and ``PrototypeInt4WeightOnlyConfig`` (group 32, the
  same ``_weight_int4pack_mm_for_cpu`` kernel; ``set_inductor_config=False``, no global settings).
  On SmolLM2 (fp32, CPU), llama.cpp on the model's own GGUF requantized to Q8_0 (``bench/llamacpp_contender.py``; skipped, with
  the reason printed, when ``llama_cpp`` is not installed: ``pip install 'qpass[bench]'``).
Timing: every contender is compiled and checked first, then all are timed in ``--rounds`` rounds (5),
taking turns, each round running each contender's share of the prefills and decode steps; so a machine
whose speed drifts over minutes slows every row alike (``--rounds 1``: each contender alone after its
compile, as before). Reported per contender: median milliseconds, speedup over fp32 ``torch.compile``, compile seconds
(first call of each workload), resident weight MB (parameters with storage plus the compiled graphs'
constants; torchao: its quantized tensors), process RSS, and the relative error and cosine of the
logits against fp32 eager on the same inputs. A markdown table per model is printed, everything is
written as JSON.
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import logging
import os
import platform
import statistics
import sys
import time
import unittest.mock
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import transformers
from torch import nn

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]  # this checkout
import qpass  # noqa: E402
import qpass.passes.lower  # noqa: E402
from qpass import realdata  # noqa: E402

import accuracy  # noqa: E402  (bench/accuracy.py, beside this file)

logger = logging.getLogger("bench.speed")

MODELS = ("smollm2", "llama2048")

#: Presets changed in one way (``--variants``), measured in the same run as the presets.
# the accuracy harness's levers (bench/accuracy.py), so both benches run the same configs under one name:
# the per-token budget, and the split of int8 weights into two 7-bit halves on CPUs without VNNI
VARIANTS: dict[str, qpass.QuantConfig] = {name: accuracy.VARIANTS[name] for name in (
    "w8a8_static fallback 1.5x", "w8a8_static fallback 8x", "w8a8_dynamic split all", "w8a8_dynamic split 0.05%",
    "w8a8_static fallback 1.5x split 0.05%", "w8a8_static fallback 1.5x split all")}


@dataclass
class Row:
    name: str
    prefill_ms: float = float("nan")
    decode_ms: float = float("nan")
    prefill_speedup: float = float("nan")  # fp32 torch.compile time / this time
    decode_speedup: float = float("nan")
    compile_s: float = float("nan")  # first prefill call + first decode call
    weight_mb: float = float("nan")
    rss_mb: float = float("nan")
    prefill_err: float = float("nan")  # relative L2 error of the logits vs fp32 eager
    prefill_cos: float = float("nan")
    decode_err: float = float("nan")
    decode_round_ms: list[float] = field(default_factory=list)  # the median step of each round (--rounds)
    kernels: dict[str, int] = field(default_factory=dict)
    error: str = ""


# ----------------------------------------------------------------------------- models and inputs


def load(name: str, layers: int, device: torch.device, dtype: torch.dtype,
         calib_batches: int = 8) -> tuple[nn.Module, str, Callable]:
    """``(model, description, calibration batches factory)``."""
    if name == "smollm2":
        model, tok = realdata.load_smollm2()
        batches = lambda: realdata.calibration_batches(tok, calib_batches, 512)  # noqa: E731
        desc = "SmolLM2-135M (real weights, 30 layers, hidden 576)"
    elif name == "llama2048":
        torch.manual_seed(0)
        config = transformers.LlamaConfig(
            vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
            num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=4096,
        )
        model = transformers.LlamaForCausalLM(config).eval()
        g = torch.Generator().manual_seed(1)
        batches = lambda: [torch.randint(0, 32000, (1, 256), generator=g) for _ in range(4)]  # noqa: E731
        desc = f"random Llama, hidden 2048, FFN 5632, 32 heads / 4 KV heads, {layers} layers"
    else:
        raise ValueError(name)
    return model.to(device=device, dtype=dtype).eval(), desc, batches


def _logits(out) -> torch.Tensor:
    return (out.logits if hasattr(out, "logits") else out[0]).float()


class Workloads:
    """The prompt, the decode token and a filled static cache, shared by every contender."""

    def __init__(self, model: nn.Module, prefill: int, context: int, device: torch.device):
        g = torch.Generator().manual_seed(2)
        vocab = model.config.vocab_size
        self.ids = torch.randint(0, vocab, (1, prefill), generator=g).to(device)
        self.context = context
        self.prompt = torch.randint(0, vocab, (1, context), generator=g).to(device)
        self.token = torch.randint(0, vocab, (1, 1), generator=g).to(device)
        self.position = torch.tensor([context], device=device)

    def new_cache(self, model: nn.Module) -> transformers.StaticCache:
        """A static cache holding the context, filled by ``model`` (eager)."""
        cache = transformers.StaticCache(config=model.config, max_cache_len=self.context + 16)
        with torch.no_grad():
            model(self.prompt, past_key_values=cache, use_cache=True,
                  cache_position=torch.arange(self.context, device=self.prompt.device))
        return cache

    def prefill(self, fn) -> torch.Tensor:
        return _logits(fn(self.ids, use_cache=False, logits_to_keep=1))

    def rewind(self, cache: transformers.StaticCache) -> None:
        """Back to ``context`` tokens: the next step writes the same slot again (the cache layers
        count their length in a tensor that each step advances in place)."""
        for layer in cache.layers:
            layer.cumulative_length.fill_(self.context)

    def decode(self, fn, cache) -> torch.Tensor:
        self.rewind(cache)
        return _logits(fn(self.token, past_key_values=cache, cache_position=self.position, use_cache=True))


# ----------------------------------------------------------------------------- measuring


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _times(call: Callable[[], Any], reps: int, warmup: int, device: torch.device,
           before: Callable[[], Any] = lambda: None) -> list[float]:
    """Wall times of ``reps`` calls of ``call`` in seconds, after ``warmup`` untimed ones;
    ``before`` runs untimed ahead of each call."""
    for _ in range(warmup):
        before()
        call()
    times = []
    for _ in range(reps):
        before()
        _sync(device)
        start = time.perf_counter()
        call()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def _timed_first(call: Callable[[], torch.Tensor], device: torch.device) -> tuple[torch.Tensor, float]:
    _sync(device)
    start = time.perf_counter()
    out = call()
    _sync(device)
    return out, time.perf_counter() - start


def _bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds: inner tensors of a subclass (torchao), mkldnn-packed tensors by numel."""
    if hasattr(t, "__tensor_flatten__") and type(t) not in (torch.Tensor, nn.Parameter):
        names, _ = t.__tensor_flatten__()
        return sum(_bytes(getattr(t, n)) for n in names)
    if t.is_mkldnn:
        return t.numel() * t.element_size()
    return t.untyped_storage().nbytes()


def _storage_key(t: torch.Tensor):
    if t.is_mkldnn or (hasattr(t, "__tensor_flatten__") and type(t) not in (torch.Tensor, nn.Parameter)):
        return id(t)
    return t.untyped_storage().data_ptr()


def weight_bytes(model: nn.Module, graphs: list[torch.fx.GraphModule] = ()) -> int:
    """Parameters and buffers that still hold storage (not those ``release_weights`` released), the constants of ``graphs``, and the FBGEMM
    packed weights those graphs use (held in a registry outside every graph), each storage once."""
    from qpass import kernels
    from qpass.graph import constants

    seen, total = set(), 0
    tensors = list(model.parameters()) + list(model.buffers())
    handles = set()
    for gm in graphs:
        tensors += list(gm.buffers()) + list(constants(gm).values())
        handles |= {n.args[2] if n.target is torch.ops.qpass.fbgemm_qlinear.default else n.args[1]
                    for n in gm.graph.nodes
                    if n.target in (torch.ops.qpass.fbgemm_qlinear.default, torch.ops.qpass.fbgemm_dynamic_linear.default)}
    for t in tensors:
        if getattr(t, "qpass_released", None) is not None:  # release_weights: NaN pages, resident only if read
            continue
        key = _storage_key(t)
        if key in seen:
            continue
        seen.add(key)
        total += _bytes(t)
    for h in handles:
        entry = kernels.fbgemm_packed(h)
        total += entry.in_features * entry.out_features  # int8 weights (FBGEMM adds column offsets)
    return total


def rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20
    except OSError:
        return float("nan")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


# ----------------------------------------------------------------------------- contenders


@dataclass
class Contender:
    name: str
    model: nn.Module  # what runs (a copy for torchao / qpass)
    fn: Callable  # the compiled (or eager) callable
    scope: Callable[[], Any] = lambda: _null()  # context for the first calls (torchao: freezing)
    backend: Any = None


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _dtype_name(model: nn.Module) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[next(model.parameters()).dtype]


def _torchao_weight_only(model: nn.Module):
    """torchao's weight-only configs (for bf16 models), each on a copy compiled with freezing."""
    def make(label, config_fn):
        def build():
            from torchao.quantization import quantize_

            copy_ = copy.deepcopy(model)
            quantize_(copy_, config_fn(), filter_fn=_not_lm_head)
            return Contender(label, copy_, torch.compile(copy_, dynamic=False),
                             scope=lambda: torch._inductor.config.patch(freezing=True))
        return label, build

    def int8():
        from torchao.quantization import Int8WeightOnlyConfig
        return Int8WeightOnlyConfig()

    def int4():
        from torchao.quantization import Int4WeightOnlyConfig
        return Int4WeightOnlyConfig(group_size=32)

    def int4_cpu():
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
        return PrototypeInt4WeightOnlyConfig(group_size=32, set_inductor_config=False)

    yield make("torchao int8 weight-only (freezing)", int8)
    yield make("torchao int4 weight-only (freezing)", int4)
    yield make("torchao prototype CPU int4 weight-only, group 32 (freezing)", int4_cpu)


def contenders(model: nn.Module, presets: list[str], calib_batches: Callable, torchao: bool, int8_lm_head: bool = False,
               variants: list[str] = (), inductor: bool = True, onednn_decode: bool = False, cpp_wrapper: bool = False,
               weight_only_lm_head: bool = False, whole_prompt: bool = False):
    dt = _dtype_name(model)
    yield f"{dt} eager", lambda: Contender(f"{dt} eager", model, model)
    if inductor:
        yield f"{dt} torch.compile", lambda: Contender(f"{dt} torch.compile", model, torch.compile(model, dynamic=False))
    if torchao and dt != "fp32":
        yield from _torchao_weight_only(model)
    elif torchao:
        def make_torchao():
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

            copy_ = copy.deepcopy(model)
            quantize_(copy_, Int8DynamicActivationInt8WeightConfig(), filter_fn=_not_lm_head)
            return Contender("torchao int8 dynamic (freezing)", copy_, torch.compile(copy_, dynamic=False),
                             scope=lambda: torch._inductor.config.patch(freezing=True))
        yield "torchao int8 dynamic (freezing)", make_torchao
        if cpp_wrapper:
            def make_torchao_cpp():
                c = make_torchao()
                c.name += CPP_WRAPPER
                c.scope = lambda: torch._inductor.config.patch(freezing=True, cpp_wrapper=True)
                return c
            yield "torchao int8 dynamic (freezing)" + CPP_WRAPPER, make_torchao_cpp
    calib = None
    runs = [(name, "") for name in [*presets, *variants]] + [(name, " (int8 lm_head)") for name in presets if int8_lm_head]
    runs += [(name, WEIGHT_ONLY_HEAD) for name in presets if weight_only_lm_head]
    runs += [(name, ONEDNN_DECODE) for name in presets if onednn_decode]
    runs += [(name, CPP_WRAPPER) for name in presets if cpp_wrapper]
    runs += [(name, WHOLE_PROMPT) for name in presets if whole_prompt]
    for name, variant in runs:
        def make_qpass(name=name, variant=variant):
            nonlocal calib
            config = VARIANTS.get(name) or qpass.preset(name)
            config = config.replace(skip=()) if variant == " (int8 lm_head)" else config
            config = config.replace(weight_only=("lm_head",)) if variant == WEIGHT_ONLY_HEAD else config
            needs_calib = config.activation is not None or config.outliers is not None or config.smoothing is not None
            if calib is None and needs_calib:
                device = next(model.parameters()).device
                calib = qpass.calibrate(model, [b.to(device) for b in calib_batches()], progress=False)
            copy_ = copy.deepcopy(model)
            backend = qpass.backend(config, calibration=calib if needs_calib else None, inductor=inductor,
                                    inductor_config={"cpp_wrapper": True} if variant == CPP_WRAPPER else None,
                                    by_block=variant != WHOLE_PROMPT)
            scope = (lambda: unittest.mock.patch.object(qpass.passes.lower, "DECODE_M", 0)) if variant == ONEDNN_DECODE else _null
            return Contender(f"qpass {name}{variant}", copy_, torch.compile(copy_, backend=backend, dynamic=False),
                             scope=scope, backend=backend)
        yield f"qpass {name}{variant}", make_qpass


#: The preset with its prompt graphs compiled whole instead of one decoder block at a time (``by_block=False``)
WHOLE_PROMPT = " (prompt graphs whole)"
#: The preset with ``lm_head``'s weights int8 and its input float (``QuantConfig.weight_only``): at one
#: token a reduction over the stored integers, a quarter of the fp32 head's bytes.
WEIGHT_ONLY_HEAD = " (int8 weight-only lm_head)"

#: The preset with oneDNN at every token count (``lower.DECODE_M = 0`` while it compiles): one packed
#: copy per int8 linear instead of oneDNN's for prefill plus FBGEMM's for decode.
ONEDNN_DECODE = " (oneDNN at decode)"


#: Inductor's C++ wrapper (``torch._inductor.config.cpp_wrapper``): the compiled graph's kernels are
#: called from generated C++ instead of a Python function.
CPP_WRAPPER = " (cpp_wrapper)"


def _not_lm_head(module: nn.Module, fqn: str) -> bool:
    return isinstance(module, nn.Linear) and not fqn.endswith("lm_head")  # qpass skips lm_head too


@dataclass
class Timed:
    """A contender compiled and checked, ready to time: ``prefill`` and ``decode`` run one call each;
    ``before_decode`` runs untimed ahead of each decode call, ``start_decode`` once ahead of a series of
    them (llama.cpp refills its context after prefills)."""
    row: Row
    prefill: Callable[[], Any]
    decode: Callable[[], Any] | None = None
    before_decode: Callable[[], Any] = lambda: None
    start_decode: Callable[[], Any] = lambda: None
    prefill_times: list[float] = field(default_factory=list)
    decode_times: list[float] = field(default_factory=list)


def prepare(c: Contender, w: Workloads, ref: dict[str, torch.Tensor], device) -> Timed:
    """Compile ``c`` (its first prefill and decode calls, timed as compile seconds), check its logits
    against fp32 eager, release what qpass allows, count its weights."""
    row = Row(c.name)
    with torch.no_grad():
        cache = w.new_cache(ref["model"])
        with c.scope():
            pre, t1 = _timed_first(lambda: w.prefill(c.fn), device)
            try:
                dec, t2 = _timed_first(lambda: w.decode(c.fn, cache), device)
            except Exception as e:  # noqa: BLE001 - a contender without a decode path still has prefill numbers
                logger.exception("%s: decode failed", c.name)
                dec, t2, row.error = None, 0.0, f"decode: {type(e).__name__}: {e}"[:300]
        row.compile_s = t1 + t2
        if c.backend is not None:
            c.backend.release_weights(c.model)
            row.kernels = dict(collections.Counter(r.kernel or "fp32" for r in c.backend.report.rows.values()))
        row.prefill_err, row.prefill_cos = _rel(pre, ref["prefill"]), _cos(pre, ref["prefill"])
        if dec is not None:
            row.decode_err = _rel(dec, ref["decode"])
    graphs = c.backend.graphs if c.backend is not None else []
    row.weight_mb = weight_bytes(c.model, graphs) / 2**20
    row.rss_mb = rss_mb()
    step = lambda: _logits(c.fn(w.token, past_key_values=cache, cache_position=w.position, use_cache=True))  # noqa: E731
    return Timed(row, prefill=lambda: w.prefill(c.fn), decode=step if dec is not None else None,
                 before_decode=lambda: w.rewind(cache))


def time_in_turns(timed: list[Timed], args, device: torch.device) -> None:
    """Time every contender in ``args.rounds`` rounds, each round running every contender's share of
    the prefills and then of the decode steps in turn, and set each row's medians over all rounds.

    A machine whose speed drifts over minutes (the project's shared 2-core machines: the same compiled
    decode step measured 8 ms and 11 ms ten minutes apart) then slows every contender alike instead of
    whichever one ran in the slow minutes. The first round starts each series with ``args.warmup``
    untimed calls, the others with one (the previous contender's weights have left the caches)."""
    rounds = max(1, args.rounds)
    prefills, decodes = max(1, args.reps // rounds), max(1, args.decode_reps // rounds)
    with torch.no_grad():
        for r in range(rounds):
            warm = args.warmup if r == 0 else 1
            for t in timed:
                t.prefill_times += _times(t.prefill, prefills, warm, device)
                if t.decode is not None:
                    t.start_decode()
                    t.decode_times += _times(t.decode, decodes, warm, device, t.before_decode)
    for t in timed:
        t.row.prefill_ms = 1e3 * statistics.median(t.prefill_times)
        if t.decode_times:
            t.row.decode_ms = 1e3 * statistics.median(t.decode_times)
            t.row.decode_round_ms = [1e3 * statistics.median(t.decode_times[i:i + decodes])
                                     for i in range(0, len(t.decode_times), decodes)]


def prepare_llamacpp(w: Workloads, ref: dict[str, torch.Tensor]) -> Timed:
    """llama.cpp on the same token ids and threads; weights MB is its Q8_0 file (every tensor)."""
    import llamacpp_contender

    row = Row(llamacpp_contender.LlamaCpp.name)
    start = time.perf_counter()
    m = llamacpp_contender.LlamaCpp(torch.get_num_threads(), w.context, w.ids.shape[1])
    row.compile_s = time.perf_counter() - start  # load (and, the first time, the Q8_0 conversion)
    ids, prompt, token = w.ids[0].tolist(), w.prompt[0].tolist(), int(w.token)
    m.prefill(ids)
    pre = torch.from_numpy(m.llm.scores[len(ids) - 1].copy()).float().reshape(ref["prefill"].shape)
    m.fill(prompt)
    m.decode(token)
    dec = torch.from_numpy(m.llm.scores[w.context].copy()).float().reshape(ref["decode"].shape)
    row.prefill_err, row.prefill_cos, row.decode_err = _rel(pre, ref["prefill"]), _cos(pre, ref["prefill"]), _rel(dec, ref["decode"])
    row.weight_mb, row.rss_mb = m.bytes / 2**20, rss_mb()
    return Timed(row, prefill=lambda: m.prefill(ids), decode=lambda: m.decode(token), start_decode=lambda: m.fill(prompt))


def bench_model(name: str, args, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    model, desc, calib_batches = load(name, args.layers, device, dtype, args.calib_batches)
    logger.info("%s: %s", name, desc)
    w = Workloads(model, args.prefill, args.context, device)
    with torch.no_grad():
        cache = w.new_cache(model)
        ref = {"model": model, "prefill": w.prefill(model), "decode": w.decode(model, cache)}
    rows: list[Row] = []
    timed: list[Timed] = []  # compiled, timed together at the end (--rounds > 1)
    turns = args.rounds > 1
    torch._dynamo.reset()
    # every contender's graphs stay in Dynamo's cache of the model's forward until all are timed
    limit = torch._dynamo.config.patch(recompile_limit=64) if turns else _null()

    def add(label: str, ready: Callable[[], Timed]) -> None:
        """Compile and check one contender; time it now (``--rounds 1``) or keep it for the turns.
        A failure is recorded in its row."""
        try:
            t = ready()
            rows.append(t.row)
            if turns:
                timed.append(t)
            else:
                time_in_turns([t], args, device)
        except Exception as e:  # noqa: BLE001 - recorded in the table and the JSON
            logger.exception("%s failed", label)
            rows.append(Row(label, error=f"{type(e).__name__}: {e}"[:300]))
        logger.info("%s", rows[-1])

    with limit:
        for label, make in contenders(model, args.presets, calib_batches, not args.no_torchao, args.int8_lm_head,
                                      args.variants, inductor=not args.eager_graphs, onednn_decode=args.onednn_decode,
                                      cpp_wrapper=args.cpp_wrapper, weight_only_lm_head=args.weight_only_lm_head,
                                      whole_prompt=args.whole_prompt_graphs):
            if args.only and not any(part in label for part in args.only) and not label.endswith("torch.compile"):
                continue
            if not turns:
                torch._dynamo.reset()
            add(label, lambda: prepare(make(), w, ref, device))
        if name == "smollm2" and device.type == "cpu" and not args.no_llamacpp:
            import llamacpp_contender

            why = llamacpp_contender.why_unavailable()
            if why:
                print(why)
            else:
                add(llamacpp_contender.LlamaCpp.name, lambda: prepare_llamacpp(w, ref))
        if timed:
            logger.info("timing %d contenders in %d rounds, taking turns", len(timed), args.rounds)
            time_in_turns(timed, args, device)
    torch._dynamo.reset()
    base_name = f"{_dtype_name(model)} eager" if args.eager_graphs else f"{_dtype_name(model)} torch.compile"
    base = next((r for r in rows if r.name == base_name), None)
    for r in rows:
        if base is not None:
            r.prefill_speedup = base.prefill_ms / r.prefill_ms
            r.decode_speedup = base.decode_ms / r.decode_ms
    return {"model": name, "description": desc, "dtype": _dtype_name(model), "rows": [asdict(r) for r in rows]}


def _spread(values: list[float]) -> str:
    """``min-max`` of the per-round medians: how far the machine's speed drifted during the run."""
    return f"{min(values):.2f}-{max(values):.2f}" if values else ""


def format_table(result: dict[str, Any], args) -> str:
    head = (f"### {result['description']}: prefill 1 x {args.prefill} tokens, decode 1 token after "
            f"{args.context}; median of {args.reps} / {args.decode_reps} runs"
            + (f", every contender taking turns in {args.rounds} rounds" if args.rounds > 1 else "") + "\n\n")
    dt = result.get("dtype", "fp32")
    base = f"{dt} eager" if args.eager_graphs else f"{dt} compile"
    cols = ("contender", "prefill ms", f"prefill vs {base}", "decode ms", "decode ms per round (min-max)",
            f"decode vs {base}", "compile s", "weights MB", "logits rel. err (prefill / decode)")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in result["rows"]:
        if r["error"] and r["prefill_ms"] != r["prefill_ms"]:  # nothing measured
            lines.append(f"| {r['name']} | failed: {r['error'][:120]} |" + " |" * (len(cols) - 2))
            continue
        lines.append(
            f"| {r['name']} | {r['prefill_ms']:.1f} | {r['prefill_speedup']:.2f}x | {r['decode_ms']:.2f} | "
            f"{_spread(r['decode_round_ms'])} | {r['decode_speedup']:.2f}x | {r['compile_s']:.0f} | {r['weight_mb']:.0f} | "
            f"{r['prefill_err']:.3f} / {r['decode_err']:.3f}" + (f" ({r['error'][:100]})" if r["error"] else "") + " |"
        )
    return head + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the random hidden-2048 Llama")
    parser.add_argument("--presets", nargs="+", default=None, choices=sorted(qpass.PRESETS),
                        help="default: w8a8_static w8a8_dynamic (fp32), w8a16 w4a16 (bf16)")
    parser.add_argument("--dtype", default=None, choices=("fp32", "bf16"),
                        help="the model's dtype: the baseline and what the presets run in (default: fp32 on CPU, bf16 on CUDA)")
    parser.add_argument("--variants", nargs="*", default=[], choices=list(VARIANTS), help="presets changed in one way")
    parser.add_argument("--prefill", type=int, default=512, help="prompt tokens")
    parser.add_argument("--context", type=int, default=512, help="tokens in the KV cache before the decode step")
    parser.add_argument("--reps", type=int, default=10, help="timed prefill runs")
    parser.add_argument("--decode-reps", type=int, default=50, help="timed decode steps")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5,
                        help="time every contender in this many rounds, taking turns (the reps are shared out); "
                             "1: each contender timed alone right after its compile, Dynamo reset between them")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--no-torchao", action="store_true")
    parser.add_argument("--only", nargs="+", default=None,
                        help="run only the contenders whose label contains one of these (the torch.compile baseline always runs)")
    parser.add_argument("--no-llamacpp", action="store_true")
    parser.add_argument("--calib-batches", type=int, default=8, help="SmolLM2 calibration batches of 512 tokens")
    parser.add_argument("--int8-lm-head", action="store_true", help="also each preset with lm_head quantized (skip=())")
    parser.add_argument("--weight-only-lm-head", action="store_true",
                        help="also each preset with lm_head's weights int8, its input float (weight_only=('lm_head',))")
    parser.add_argument("--onednn-decode", action="store_true",
                        help="also each preset with oneDNN at decode too (FBGEMM otherwise): one packed copy per linear")
    parser.add_argument("--whole-prompt-graphs", action="store_true",
                        help="also each preset with its prompt graphs compiled whole (by_block=False), not one block at a time")
    parser.add_argument("--cpp-wrapper", action="store_true",
                        help="also torchao and each preset with Inductor's C++ wrapper (cpp_wrapper=True)")
    parser.add_argument("--eager-graphs", action="store_true",
                        help="qpass graphs run without Inductor (qpass.backend(inductor=False)): the same kernels, the "
                             "quant / rescale ops unfused; no fp32 torch.compile row, speedups vs fp32 eager; implies "
                             "--no-torchao. For comparing qpass configs where Inductor's compile is too slow")
    parser.add_argument("--json", type=Path, default=None, help="default bench/results/speed_<device>.json")
    args = parser.parse_args(argv)
    args.no_torchao = args.no_torchao or args.eager_graphs
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, None: torch.float32 if device.type == "cpu" else torch.bfloat16}[args.dtype]
    if args.presets is None:
        args.presets = ["w8a16", "w4a16"] if dtype == torch.bfloat16 and device.type == "cpu" else ["w8a8_static", "w8a8_dynamic"]
    if device.type == "cuda" and not any(p.startswith("fp8") for p in args.presets):
        args.presets += ["fp8_dynamic", "fp8_static"]

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    meta = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else cpu,
        "threads": torch.get_num_threads(), "dtype": str(dtype), "torch": torch.__version__,
        "argv": sys.argv[1:] if argv is None else argv, "inductor": not args.eager_graphs,
        # a CPU without VNNI emulated on this one: oneDNN / FBGEMM limited to AVX2 (vpmaddubsw)
        "isa_limits": {k: os.environ[k] for k in ("ONEDNN_MAX_CPU_ISA", "FBGEMM_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY")
                       if k in os.environ},
        "int8_dot_exact": {k: qpass.kernels.int8_dot_exact(k) for k in qpass.kernels.PROBED_KERNELS
                           if qpass.kernels.kernel_available(k)},
        "int_mm_exact": qpass.kernels.kernel_available("int_mm") and qpass.kernels.int_mm_exact(),
    }
    results = [bench_model(name, args, device, dtype) for name in args.models]
    print(f"{meta['device']}, {meta['threads']} threads, torch {torch.__version__}, baseline {dtype}\n")
    for result in results:
        print(format_table(result, args) + "\n")
    path = args.json or Path(__file__).parent / "results" / f"speed_{device.type}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    logger.info("wrote %s", path)
    return 0 if all(not r["error"] for res in results for r in res["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
