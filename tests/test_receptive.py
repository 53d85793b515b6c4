"""The receptive field: closed forms, brute-force reachability over the reference masks, and
the gradient of the last position's output with respect to every input embedding."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from swa_patch import patch_model, receptive_field, unpatch_model
from swa_patch.masks import LayerSpec, reference_mask
from swa_patch.receptive import layer_reach, reach_of_specs, reachable_positions
from tests.models import per_head, tiny_model


def brute_force(specs, n):
    """Positions the last of n tokens depends on: boolean products of the dense masks."""
    reach = torch.zeros(n, dtype=torch.bool)
    reach[-1] = True
    for spec in reversed(specs):
        mask = per_head(reference_mask(spec, n))[0].any(0)    # [n, n], row = query, any head
        reach = (mask & reach[:, None]).any(0)
    return reach.nonzero().flatten().tolist()


spec_st = st.one_of(st.builds(LayerSpec, st.integers(1, 6), st.integers(1, 4), st.integers(0, 3)),
                    st.just(LayerSpec(None)))


@settings(max_examples=200, deadline=None)
@given(specs=st.lists(spec_st, min_size=1, max_size=5), n=st.integers(1, 60))
def test_exact_reach_equals_brute_force(specs, n):
    positions = brute_force(specs, n)
    rows = reach_of_specs(specs, n)
    assert rows[-1].reach == n - positions[0]
    assert rows[-1].reachable == len(positions)
    for top, row in enumerate(rows):                               # every prefix of the stack
        prefix = brute_force(specs[: top + 1], n)
        assert (row.reach, row.reachable) == (n - prefix[0], len(prefix))


@settings(max_examples=200, deadline=None)
@given(specs=st.lists(st.builds(LayerSpec, st.integers(1, 6), st.integers(1, 4)), min_size=1, max_size=5))
def test_long_stream_reach_is_the_sum_of_spans(specs):
    """Without sinks or full layers: reach = sum (W-1)*d + 1, and holes match a sequence long
    enough that the start is out of reach."""
    rows = reach_of_specs(specs)
    assert rows[-1].reach == sum(s.span - 1 for s in specs) + 1
    n = rows[-1].reach + 5
    positions = brute_force(specs, n)
    assert rows[-1].reachable == len(positions) and n - positions[0] == rows[-1].reach


def test_closed_forms_and_holes():
    assert reach_of_specs([LayerSpec(512)] * 24)[-1].reach == 24 * 511 + 1 == 12265
    quarters = [LayerSpec(512, 2 ** (i // 6)) for i in range(24)]
    last = reach_of_specs(quarters)[-1]
    assert last.reach == 6 * 511 * (1 + 2 + 4 + 8) + 1 == 45991
    assert last.holes == 0                      # the d=1 layers fill every gap
    only_dilated = reach_of_specs([LayerSpec(3, 2)] * 3)[-1]
    assert (only_dilated.reach, only_dilated.reachable, only_dilated.holes) == (13, 7, 6)


def test_receptive_field_from_config_and_patched_model():
    model = tiny_model("llama", num_hidden_layers=8)
    assert receptive_field(model.config, window=512) == 8 * 511 + 1
    assert receptive_field(model, window=512, schedule="local-to-dilated") == 2 * 511 * 15 + 1
    assert receptive_field(model, window=8, dilation=[1, 1, 2, 2, 3, 3, 4, 4]) == 7 * 20 + 1
    patch_model(model, window=9, dilation=3, backend="sdpa")
    try:
        assert receptive_field(model) == 8 * 8 * 3 + 1          # the patched model's own settings
    finally:
        unpatch_model(model)


def test_full_layers_need_seq_len_and_native_globals_count():
    model = tiny_model("gemma3_text")               # layers: local, local, global
    with pytest.raises(ValueError, match=r"layers \[2\] use full attention.*seq_len"):
        receptive_field(model, window=16)
    assert receptive_field(model, window=16, seq_len=100) == 100
    assert receptive_field(model, window=[16, 16, 16]) == 46          # override: all windowed
    rows = layer_reach(model, seq_len=100, window=16)
    assert [r.reach for r in rows] == [16, 31, 100] and rows[2].window is None


def test_sinks_only_count_with_seq_len():
    assert receptive_field(tiny_model("llama").config, window=4, sinks=2) == 7
    assert receptive_field(tiny_model("llama").config, window=4, sinks=2, seq_len=50) == 50
    assert reachable_positions(tiny_model("llama").config, 50, window=4, sinks=2) == [0, 1] + list(range(43, 50))


def test_validation_is_the_patch_validation():
    config = tiny_model("llama").config
    with pytest.raises(ValueError, match="dilation has 3 entries"):
        receptive_field(config, window=4, dilation=[1, 2, 3])
    with pytest.raises(TypeError, match="window is required"):
        receptive_field(config)


# ---- empirical: the gradient of the last output is non-zero exactly on the reachable set ----
# The models run in float64, but Llama's RMSNorm computes in float32: with the default
# initializer_range (0.02) each attention hop shrinks a far position's gradient ~1e-3 times and
# after 24 layers it underflows float32 (~1e-43 -> 0).  initializer_range=0.2 keeps the smallest
# in-field gradient near 1e-25, far from underflow.
GRAD_MODEL = dict(dtype=torch.float64, initializer_range=0.2)

def gradient_support(model, n, seed=0):
    torch.manual_seed(seed)
    embeds = torch.randn(1, n, model.config.hidden_size, dtype=torch.float64, requires_grad=True)
    hidden = model(inputs_embeds=embeds, output_hidden_states=True).hidden_states[-1]
    (grad,) = torch.autograd.grad(hidden[0, -1] @ torch.randn(hidden.shape[-1], dtype=torch.float64), embeds)
    return (grad[0].abs().sum(-1) > 0).nonzero().flatten().tolist()


@pytest.mark.parametrize("options,n", [
    (dict(window=3, dilation=2), 40),                                   # holes: even distances only
    (dict(window=4, dilation=[1, 3, 2, 4], sinks=2), 60),               # sinks, mixed dilations
    (dict(window=[3, None, 3, 2], dilation=[2, 1, 1, 5]), 30),          # a full layer
    (dict(window=3, schedule="local-to-dilated"), 60),                  # named schedule
])
def test_gradient_support_is_the_reachable_set(options, n):
    model = tiny_model("llama", num_hidden_layers=4, **GRAD_MODEL, hidden_size=32,
                       intermediate_size=32)
    patch_model(model, backend="sdpa", **options)
    try:
        expected = reachable_positions(model, n)
        assert gradient_support(model, n) == expected
        assert n - expected[0] == receptive_field(model, seq_len=n)
    finally:
        unpatch_model(model)


def test_gradient_confirms_24_layer_quarter_dilated_reach():
    """The shape of the 24 x W=512, dilation 1/2/4/8 by quarter stack, scaled to W=4:
    6*3*(1+2+4+8)+1 = 271 tokens (undilated: 24*3+1 = 73)."""
    model = tiny_model("llama", num_hidden_layers=24, **GRAD_MODEL, hidden_size=16,
                       intermediate_size=16, num_attention_heads=2, num_key_value_heads=1)
    for options, reach in [(dict(window=4, schedule="local-to-dilated"), 271), (dict(window=4), 73)]:
        assert receptive_field(model, **options) == reach
        patch_model(model, backend="sdpa", **options)
        try:
            support = gradient_support(model, 300)
        finally:
            unpatch_model(model)
        assert support == list(range(300 - reach, 300))


# ---- the CLI ---------------------------------------------------------------------------------

def test_cli_table_and_plot(tmp_path, capsys):
    from swa_patch.cli import main

    png = tmp_path / "reach.png"
    assert main(["receptive-field", "--model", "llama", "--layers", "24", "--window", "512",
                 "--dilation", "1x6", "2x6", "4x6", "8x6", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "receptive field: 45991 tokens" in out
    assert len([line for line in out.splitlines() if line.strip()[:2].strip().isdigit()]) == 24
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["receptive-field", "--model", "llama", "--layers", "24", "--window", "512"]) == 0
    assert "receptive field: 12265 tokens" in capsys.readouterr().out


def test_cli_config_path_schedule_and_errors(tmp_path, capsys):
    from swa_patch.cli import main

    tiny_model("gemma3_text").config.save_pretrained(tmp_path)
    assert main(["receptive-field", "--model", str(tmp_path), "--window", "16", "--seq-len", "100"]) == 0
    assert "receptive field: 100 tokens" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="full attention"):
        main(["receptive-field", "--model", str(tmp_path), "--window", "16"])
    with pytest.raises(SystemExit, match="dilation has 3 entries"):
        main(["receptive-field", "--model", "llama", "--layers", "4", "--window", "8", "--dilation", "1", "2", "3"])
    assert main(["receptive-field", "--model", "llama", "--layers", "8", "--window", "8",
                 "--schedule", "local-to-dilated"]) == 0
    assert "receptive field: 211 tokens" in capsys.readouterr().out     # 2*7*15+1
