"""Drift measures: linear CKA against the kernel (HSIC) formula, its invariances, relative L2 by hand, and
hidden states that are the ones the model's own forward computes."""

import pytest
import torch

from nanochat.drift import layer_cka, layer_states, linear_cka, relative_l2
from nanochat.gpt import GPT, GPTConfig, _softcapped_logits, norm


def hsic_cka(x, y):
    """CKA from its definition: HSIC of the linear kernels K = XX', L = YY' with the centring matrix H."""
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    k, l = x.double() @ x.double().T, y.double() @ y.double().T
    hsic = lambda a, b: torch.trace(a @ h @ b @ h)
    return (hsic(k, l) / (hsic(k, k) * hsic(l, l)).sqrt()).item()


def test_linear_cka_equals_the_kernel_definition_and_ignores_rotation_and_scale():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 8, generator=gen)
    y = x @ torch.randn(8, 5, generator=gen) + 0.5 * torch.randn(50, 5, generator=gen)
    assert linear_cka(x, y) == pytest.approx(hsic_cka(x, y), abs=1e-10)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=gen))
    assert linear_cka(x, 3.0 * x @ q + 7.0) == pytest.approx(1.0, abs=1e-10)  # rotation, scale, shift
    assert linear_cka(x, torch.randn(50, 8, generator=gen)) < 0.5


def test_relative_l2_by_hand():
    a = {"w": torch.tensor([3.0, 4.0]), "steps": torch.tensor(7)}  # integer buffers do not count
    b = {"w": torch.tensor([3.0, 1.0]), "steps": torch.tensor(9)}
    assert relative_l2(a, b) == pytest.approx(3.0 / 5.0)
    assert relative_l2(a, a) == 0.0
    with pytest.raises(ValueError, match="different parameters"):
        relative_l2(a, {"v": torch.zeros(2)})


def test_layer_states_are_the_forward_passes_own():
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=16, vocab_size=64, n_layer=3, n_head=2, n_kv_head=2, n_embd=32))
    model.init_weights()
    idx = torch.randint(0, 64, (2, 16))
    states = layer_states(model, idx)
    assert len(states) == 4 and all(s.shape == (32, 32) for s in states)
    assert torch.equal(states[0], norm(model.transformer.wte(idx)).reshape(32, 32))
    logits = model(idx)
    assert torch.allclose(_softcapped_logits(norm(states[-1]), model.lm_head.weight), logits.reshape(32, -1), atol=1e-5)
    assert model.training  # left as it was
    assert layer_cka(model, model, idx) == pytest.approx([1.0] * 4)
