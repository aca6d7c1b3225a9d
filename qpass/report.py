"""What the passes did: one row per linear, and every smoothing match."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class LayerRow:
    """One linear. Empty fields mean the stage did not touch it."""

    path: str
    smoothing: str = ""  # pattern kind that smoothed it, or "none"
    absorber: str = ""  # the op that took 1/s
    alpha: float | None = None  # a fold per expert: the median of ``expert_alphas``
    expert_alphas: tuple[float, ...] = ()  # a fold per expert (fused experts): each expert's alpha
    outlier_ratio: tuple[float, float] | None = None  # act absmax max/median, before and after smoothing
    reason: str = ""  # why it was not smoothed / quantized / lowered as asked
    weight: str = ""  # weight quantization actually used (AdaDim shows its choice)
    activation: str = ""
    per_token_fallback: bool = False  # static activations asked, per-token dynamic run (dynamic_fallback)
    outlier_channels: int = 0  # input channels kept fp32 by an outlier split
    kernel: str = ""  # lowered kernel, or "reference", in the graph compiled last
    kernels: tuple[str, ...] = ()  # every kernel it runs, over all graphs (oneDNN at prefill, FBGEMM at decode)

    def add_kernel(self, label: str) -> None:
        self.kernel = label
        if label not in self.kernels:
            self.kernels += (label,)
    calibration: str = ""  # why this layer's calibration statistics were not used (qpass.checks)


@dataclass
class ParamInfo:
    """One parameter of the model: its size and what reads it in the compiled graphs
    (``weight of model.layers.0.mlp.up_proj``, ``bias of ...``, ``embedding``, ``op bmm``)."""

    numel: int
    nbytes: int
    ndim: int
    uses: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class Match:
    """One folded pattern: ``absorber`` took 1/s for ``consumers``."""

    kind: str
    absorber: str
    consumers: tuple[str, ...]


@dataclass
class Report:
    """Accumulates over every graph a backend compiles (graph breaks, recompiles)."""

    rows: dict[str, LayerRow] = field(default_factory=dict)
    matches: dict[tuple[str, str], Match] = field(default_factory=dict)
    graphs: int = 0
    params: dict[str, ParamInfo] = field(default_factory=dict)  # every parameter a compiled graph holds
    model_params: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # bound model: numel, bytes, ndim
    model_class: str = ""
    grouped_attention: int = 0  # SDPA calls given the KV heads as stored (``passes.attention``)
    decode_attention: int = 0  # one-query SDPA calls rewritten as Inductor reductions (``passes.attention``)

    def row(self, path: str) -> LayerRow:
        if path not in self.rows:
            self.rows[path] = LayerRow(path)
        return self.rows[path]

    def add_match(self, match: Match) -> None:
        self.matches[(match.kind, match.absorber)] = match

    def counts(self) -> Counter:
        """Folded patterns per kind, e.g. ``{'linear-norm': 2, 'gated-act': 1}``."""
        return Counter(m.kind for m in self.matches.values())

    def __str__(self) -> str:
        cols = ("layer", "smoothing", "absorber", "alpha", "outliers (max/median)", "weight", "act", "kernel", "note")
        lines = []
        for r in self.rows.values():
            ratio = f"{r.outlier_ratio[0]:.0f} -> {r.outlier_ratio[1]:.0f}" if r.outlier_ratio else ""
            alpha = f"{r.alpha:.2f}" if r.alpha is not None else ""
            if len(set(r.expert_alphas)) > 1:
                alpha = f"{min(r.expert_alphas):.2f}-{max(r.expert_alphas):.2f} per expert"
            note = "; ".join(n for n in (f"calibration unusable: {r.calibration}" if r.calibration else "", r.reason) if n)
            lines.append((r.path, r.smoothing, r.absorber, alpha, ratio, r.weight, r.activation,
                          ", ".join(r.kernels) or r.kernel, note))
        widths = [max([len(c)] + [len(line[i]) for line in lines]) for i, c in enumerate(cols)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        out = [fmt.format(*cols), fmt.format(*("-" * w for w in widths))]
        out += [fmt.format(*line).rstrip() for line in lines]
        counts = ", ".join(f"{k}: {v}" for k, v in sorted(self.counts().items())) or "none"
        out.append(f"{len(self.rows)} linears in {self.graphs} graph(s); folded patterns: {counts}")
        return "\n".join(out + self.summary())

    # -- what each stage touched -----------------------------------------------------------------
    def stages(self) -> dict[str, list[str]]:
        """Parameter paths per stage: ``smoothed`` (value changed by a fold, or a smoothed linear's
        weight), ``quantized``, ``lowered`` (quantized and run by a low-precision kernel) and
        ``full precision`` (not quantized: everything else, the parameters in no graph included)."""
        absorbers = {m.absorber for m in self.matches.values() if m.kind != "multiply"}
        out: dict[str, list[str]] = {"smoothed": [], "quantized": [], "lowered": [], "full precision": []}
        for path in self._all_params():
            rows = [self.rows[u.split(" of ", 1)[1]] for u in self._uses(path) if u.startswith("weight of ")
                    and u.split(" of ", 1)[1] in self.rows]
            module = path.rsplit(".", 1)[0]
            if module in absorbers or any(r.smoothing not in ("", "none") for r in rows):
                out["smoothed"].append(path)
            quantized = [r for r in rows if r.weight and not r.weight.startswith("fp32")]
            out["quantized" if quantized else "full precision"].append(path)
            if any(not k.startswith("reference") for r in quantized for k in r.kernels):
                out["lowered"].append(path)
        return out

    def full_precision_reason(self, path: str) -> str:
        """Why ``path`` stays in full precision: what reads it, and for a linear, why it was not quantized."""
        if path not in self.params:
            return "in no compiled graph (Dynamo ran it eagerly, or it did not run)"
        why = []
        for use in sorted(self._uses(path)):
            if use.startswith("weight of "):
                row = self.rows.get(use[len("weight of "):])
                detail = (row.reason or row.weight or "not quantized") if row is not None else "not quantized"
                why.append(f"{use[len('weight of '):]}: {detail}")
            elif use == "embedding":
                why.append("embedding (a lookup, no matmul)")
            elif use.startswith("op "):
                why.append(f"read by {use[3:]} (not a linear qpass quantizes)")
            else:
                why.append(use)
        return "; ".join(why) or "unused in the compiled graphs"

    def summary(self) -> list[str]:
        """The lines ``str(report)`` ends with: parameters and share of parameter bytes per stage, and
        the parameters of two or more dimensions left in full precision, with why."""
        sizes = {p: self._size(p) for p in self._all_params()}
        if not sizes:
            return []
        total_n = sum(n for n, _, _ in sizes.values())
        total_b = sum(b for _, b, _ in sizes.values()) or 1
        scope = f"of {self.model_class}" if self.model_class else "the compiled graphs hold"
        out = [f"parameters {scope}: {total_n:,} ({total_b / 2**20:.2f} MiB)"]
        for stage, paths in self.stages().items():
            n = sum(sizes[p][0] for p in paths)
            b = sum(sizes[p][1] for p in paths)
            out.append(f"  {stage + ':':<16}{n:>14,} parameters, {100 * b / total_b:5.1f}% of parameter bytes")
        full = [p for p in self.stages()["full precision"]]
        matrices = sorted((p for p in full if sizes[p][2] >= 2), key=lambda p: -sizes[p][1])
        if matrices:
            out.append("left in full precision (2-D and larger):")
            width = max(len(p) for p in matrices)
            for p in matrices:
                n, b, _ = sizes[p]
                out.append(f"  {p:<{width}}  {n:>12,}  {100 * b / total_b:5.1f}%  {self.full_precision_reason(p)}")
        vectors = [p for p in full if sizes[p][2] < 2]
        if vectors:
            n = sum(sizes[p][0] for p in vectors)
            b = sum(sizes[p][1] for p in vectors)
            out.append(f"  and {len(vectors)} vectors and scalars (norm weights, biases): {n:,} parameters, "
                       f"{100 * b / total_b:.1f}%")
        return out

    def _all_params(self) -> list[str]:
        return list(dict.fromkeys([*self.model_params, *self.params]))

    def _uses(self, path: str) -> set[str]:
        info = self.params.get(path)
        return info.uses if info is not None else set()

    def _size(self, path: str) -> tuple[int, int, int]:
        info = self.params.get(path)
        return (info.numel, info.nbytes, info.ndim) if info is not None else self.model_params[path]
