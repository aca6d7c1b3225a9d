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
    alpha: float | None = None
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
            note = "; ".join(n for n in (f"calibration unusable: {r.calibration}" if r.calibration else "", r.reason) if n)
            lines.append((r.path, r.smoothing, r.absorber, alpha, ratio, r.weight, r.activation,
                          ", ".join(r.kernels) or r.kernel, note))
        widths = [max([len(c)] + [len(line[i]) for line in lines]) for i, c in enumerate(cols)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        out = [fmt.format(*cols), fmt.format(*("-" * w for w in widths))]
        out += [fmt.format(*line).rstrip() for line in lines]
        counts = ", ".join(f"{k}: {v}" for k, v in sorted(self.counts().items())) or "none"
        out.append(f"{len(self.rows)} linears in {self.graphs} graph(s); folded patterns: {counts}")
        return "\n".join(out)
