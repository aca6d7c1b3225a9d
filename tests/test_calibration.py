import pytest
import torch
from torch import nn

import qpass
from tests.models import tiny_model, token_batches


def test_statistics_are_per_input_channel_absmax():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    xs = [torch.tensor([[1.0, -5.0, 0.5, 0.0]]), torch.tensor([[-2.0, 1.0, 0.25, 0.0]])]
    calib = qpass.calibrate(model, xs)
    stats = calib["0"]
    assert stats.absmax.tolist() == [2.0, 5.0, 0.5, 0.0]
    assert stats.min.tolist() == [-2.0, -5.0, 0.25, 0.0] and stats.max.tolist() == [1.0, 1.0, 0.5, 0.0]
    assert stats.tokens == 2 and stats.samples.shape == (2, 4)
    assert set(calib) == {"0", "2"}


def test_keys_are_module_paths_and_model_is_untouched():
    model = tiny_model("llama", layers=1).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    calib = qpass.calibrate(model, token_batches(2))
    assert "model.layers.0.mlp.down_proj" in calib and "lm_head" in calib
    assert calib["model.layers.0.mlp.down_proj"].absmax.shape == (96,)
    assert model.training  # mode restored
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not any(m._forward_pre_hooks for m in model.modules())  # hooks removed


def test_empty_batch_list_is_a_clear_error():
    with pytest.raises(ValueError, match="batch list is empty"):
        qpass.calibrate(nn.Linear(2, 2), [])


def test_model_without_linears_is_a_clear_error():
    with pytest.raises(ValueError, match=r"has no linear layers \(nn.Linear, Conv1D, or a module with a 2-D weight\)"):
        qpass.calibrate(nn.ReLU(), [torch.ones(2)])


def test_save_load_roundtrip(tmp_path):
    calib = qpass.calibrate(tiny_model("gpt2", layers=1), token_batches(2))
    calib.save(tmp_path / "calib.safetensors")
    loaded = qpass.Calibration.load(tmp_path / "calib.safetensors")
    assert list(loaded) == list(calib)
    for k in calib:
        for field in ("absmax", "min", "max", "samples"):
            assert torch.equal(getattr(loaded[k], field), getattr(calib[k], field)), (k, field)
        assert (loaded[k].tokens, loaded[k].nonfinite) == (calib[k].tokens, calib[k].nonfinite)


def test_nonfinite_inputs_are_counted_and_named(caplog):
    model = nn.Sequential(nn.Linear(3, 3))
    with caplog.at_level("WARNING"):
        calib = qpass.calibrate(model, [torch.tensor([[1.0, float("nan"), float("inf")]])])
    assert calib["0"].nonfinite == 2 and calib["0"].absmax.tolist() == [1.0, 0.0, 0.0]
    assert "0: 2 non-finite input values" in caplog.text


def test_unused_layer_is_named(caplog):
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(2, 2), nn.Linear(2, 2)

        def forward(self, x):
            return self.used(x)

    with caplog.at_level("WARNING"):
        calib = qpass.calibrate(TwoHeads(), [torch.ones(1, 2)])
    assert "unused: never called during calibration" in caplog.text and "unused" not in calib


def test_progress_bar_on_long_runs(capsys):
    qpass.calibrate(nn.Linear(2, 2), [torch.ones(1, 2)] * 6, progress=True)
    assert "qpass calibrate" in capsys.readouterr().err


def test_all_zero_channel_gets_no_scaling():
    """A channel that never fires (absmax 0) keeps s = 1 and the model stays exact."""
    model = tiny_model("llama", layers=1)
    calib = qpass.calibrate(model, token_batches(2))
    stats = calib["model.layers.0.mlp.down_proj"]
    stats.absmax[:5] = 0.0
    backend = qpass.backend(qpass.QuantConfig(weight=None, activation=None), calibration=calib, inductor=False)
    ids = token_batches(1)[0]
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        out = torch.compile(model, backend=backend, dynamic=False)(ids, use_cache=False).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def _padded(seqs: list[torch.Tensor], side: str, seed: int = 5) -> dict:
    """A tokenizer-style batch: ``seqs`` padded to one length with garbage ids where the mask is 0.
    Left padding passes position_ids from the mask (as ``generate`` does), so real tokens keep theirs."""
    n = max(len(s) for s in seqs)
    g = torch.Generator().manual_seed(seed)
    ids, mask = [], []
    for s in seqs:
        pad = torch.randint(0, 128, (n - len(s),), generator=g)
        real, fill = torch.ones(len(s), dtype=torch.long), torch.zeros(n - len(s), dtype=torch.long)
        ids.append(torch.cat([s, pad] if side == "right" else [pad, s]))
        mask.append(torch.cat([real, fill] if side == "right" else [fill, real]))
    batch = {"input_ids": torch.stack(ids), "attention_mask": torch.stack(mask)}
    if side == "left":
        batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    return batch


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_positions_are_left_out(side):
    """A padded batch gives the statistics of its unpadded sequences: the same tokens, the same
    absmax / min / max (bit for bit before attention mixes tokens, to float rounding after it, as
    attention runs on other shapes), and samples holding exactly the real tokens' rows."""
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, 128, (n,), generator=g) for n in (11, 7, 4)]
    ref = qpass.calibrate(model, [s[None] for s in seqs], samples=10_000)  # samples: keep every row
    calib = qpass.calibrate(model, [_padded(seqs, side)], samples=10_000)
    assert list(calib) == list(ref)
    for k in ref:
        assert calib[k].tokens == ref[k].tokens == 22 and calib[k].samples.shape == ref[k].samples.shape
        exact = ".layers.0.self_attn." in k and not k.endswith("o_proj")
        for field in ("absmax", "min", "max", "samples"):
            tol = 0 if exact else 1e-5
            torch.testing.assert_close(getattr(calib[k], field), getattr(ref[k], field), rtol=tol, atol=tol)


def test_layer_without_the_masks_shape_keeps_all_rows_and_is_named_once(caplog):
    class LastToken(nn.Module):
        """Like a classification head: ``head`` sees only the last token of every sequence."""

        def __init__(self):
            super().__init__()
            self.body, self.head = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x, attention_mask):
            return self.head(self.body(x)[:, -1])

    x = torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    with caplog.at_level("WARNING"):
        calib = qpass.calibrate(LastToken(), [{"x": x, "attention_mask": mask}] * 3)
    assert calib["body"].tokens == 3 * 8 and calib["head"].tokens == 3 * 2
    assert calib["body"].max.tolist() == x[mask.bool()].amax(0).tolist()
    warnings = [r.getMessage() for r in caplog.records if "attention mask" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].endswith("include padded positions: head")


@pytest.mark.parametrize(
    "model, batches, samples, error, message",
    [
        (lambda x: x, [torch.ones(1, 2)], 4, TypeError, "calibrate: model must be a torch.nn.Module, got function"),
        (None, torch.ones(3, 2), 4, TypeError,
         r"calibrate: batches must be a list of model inputs, got a single Tensor; pass \[batch\]"),
        (None, {"input": torch.ones(1, 2)}, 4, TypeError,
         r"calibrate: batches must be a list of model inputs, got a single dict; pass \[batch\]"),
        (None, 3, 4, TypeError, "calibrate: batches must be a list of model inputs, got int"),
        (None, "text", 4, TypeError, "calibrate: batches must be a list of model inputs, got str"),
        (None, [torch.ones(1, 2), 5], 4, TypeError,
         "calibrate: batch 1 must be a tensor, a dict of kwargs or a tuple of args, got int"),
        (None, [torch.ones(1, 2)], True, TypeError, "calibrate: samples must be an int >= 0, got bool"),
        (None, [torch.ones(1, 2)], 2.0, TypeError, "calibrate: samples must be an int >= 0, got float"),
        (None, [torch.ones(1, 2)], -1, ValueError, "calibrate: samples must be an int >= 0, got -1"),
    ],
)
def test_arguments_are_checked_where_they_enter(model, batches, samples, error, message):
    with pytest.raises(error, match=f"^{message}"):
        qpass.calibrate(nn.Linear(2, 2) if model is None else model, batches, samples=samples)


def test_batches_may_be_any_iterable():
    calib = qpass.calibrate(nn.Linear(2, 2), (torch.ones(1, 2) for _ in range(3)))
    assert calib[""].tokens == 3
