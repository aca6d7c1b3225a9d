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
    with pytest.raises(ValueError, match="no nn.Linear or Conv1D"):
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
