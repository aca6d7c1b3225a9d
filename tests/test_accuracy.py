"""The accuracy harness on a tiny model: what each result row counts."""

from __future__ import annotations

import qpass
from qpass.accuracy import FP32, evaluate, format_table, to_json
from tests.models import tiny_model, token_batches


def test_rows_count_fallbacks_and_outlier_channels():
    model = tiny_model("llama", outliers=50.0)
    calib = qpass.calibrate(model, token_batches(2))
    windows = token_batches(2, batch=1, seq=32, seed=5)
    static = qpass.preset("w8a8_static", smoothing=None)
    results = evaluate(model, calib, windows, [
        ("everywhere", static.replace(dynamic_fallback=1.0)),
        ("nowhere", static.replace(dynamic_fallback=None)),
        ("llm_int8", qpass.preset("llm_int8")),
    ], inductor=False)  # what the rows count comes from the report; Inductor would only add compile time
    by_name = {r.name: r for r in results}
    assert by_name[FP32].fallbacks == 0
    assert by_name["everywhere"].fallbacks == by_name["everywhere"].quantized == 14  # 2 layers x 7 linears
    assert by_name["nowhere"].fallbacks == 0
    assert by_name["llm_int8"].outlier_channels > 0 and by_name["llm_int8"].fallbacks == 0
    table = format_table(results)
    assert "14 of 14 linears per-token" in table
    assert f"{by_name['llm_int8'].outlier_channels} fp32 input channels" in table
    assert to_json(results)["results"][1]["fallbacks"] == 14


def test_several_texts_compile_once_and_compare_with_fp32_on_the_same_text():
    model = tiny_model("llama")
    calib = qpass.calibrate(model, token_batches(2))
    texts = {"a": token_batches(1, batch=1, seq=32, seed=5), "b": token_batches(2, batch=1, seq=32, seed=9)}
    results = evaluate(model, calib, texts, ["w8a8_dynamic"], inductor=False)
    fp32, quant = results
    assert set(fp32.texts) == set(quant.texts) == {"a", "b"}
    assert fp32.texts["a"] == (fp32.perplexity, 0.0) and fp32.texts["b"][1] == 0.0
    for t in texts:
        ppl, rel = quant.texts[t]
        assert rel == ppl / fp32.texts[t][0] - 1  # each text against fp32 on that text
    assert (quant.perplexity, quant.rel_change) == quant.texts["a"]  # the first text fills the main fields
    alone = evaluate(model, calib, texts["b"], ["w8a8_dynamic"], inductor=False)
    assert alone[1].perplexity == quant.texts["b"][0] and alone[1].texts == {}
    row = to_json(results)["results"][1]
    assert row["texts"]["b"] == {"perplexity": quant.texts["b"][0], "rel_change": quant.texts["b"][1]}
