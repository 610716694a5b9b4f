"""Capture and steering hooks: parity with output_hidden_states, cleanup, gradient checkpointing."""

import pytest
import torch

from emotune.hooks import StopForward, capture, steer
from emotune.models import decoder_layers


def test_capture_equals_output_hidden_states(tiny_model):
    ids = torch.randint(3, 100, (2, 9))
    with capture(tiny_model, None) as store:
        out = tiny_model(ids, output_hidden_states=True)
    # hidden_states[0] is the embedding output; hidden_states[l + 1] is block l's output, except
    # the last entry, which has the final norm applied
    for layer in range(3):
        torch.testing.assert_close(store[layer], out.hidden_states[layer + 1])
    assert set(store) == {0, 1, 2, 3}


def test_hooks_are_removed_even_when_the_body_raises(tiny_model):
    blocks = decoder_layers(tiny_model)
    with pytest.raises(RuntimeError, match="boom"):
        with capture(tiny_model, [0, 1]), steer(tiny_model, {2: torch.ones(32)}):
            raise RuntimeError("boom")
    assert all(len(b._forward_hooks) == 0 for b in blocks)


def test_stop_after_last_skips_the_rest_of_the_model(tiny_model):
    calls = []
    handle = decoder_layers(tiny_model)[3].register_forward_hook(lambda *a: calls.append(1))
    with capture(tiny_model, [1], stop_after_last=True) as store, pytest.raises(StopForward):
        tiny_model(torch.randint(3, 100, (1, 5)))
    handle.remove()
    assert 1 in store and calls == []


@pytest.mark.parametrize("reentrant", [True, False])
def test_capture_holds_one_tensor_per_layer_under_gradient_checkpointing(tiny_model, reentrant):
    tiny_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    tiny_model.train()
    tiny_model.config.use_cache = False
    fired = []
    ids = torch.randint(3, 100, (2, 7))
    with capture(tiny_model, [1, 2], detach=False, reduce=lambda layer, h: fired.append(layer) or h) as store:
        out = tiny_model(ids, labels=ids)
        forward_calls = list(fired)
        loss = out.loss + store[2].pow(2).mean()
        loss.backward()
    assert forward_calls == [1, 2]  # once per forward pass
    assert set(store) == {1, 2} and store[2].shape == (2, 7, 32)  # slots overwritten, never appended
    assert tiny_model.model.layers[2].mlp.down_proj.weight.grad is not None


def test_steer_adds_the_vector_to_the_block_output(tiny_model):
    ids = torch.randint(3, 100, (1, 6))
    vector = torch.randn(32)
    with capture(tiny_model, [1]) as plain:
        tiny_model(ids)
    with steer(tiny_model, {1: vector}), capture(tiny_model, [1]) as steered:  # hooks run in order
        tiny_model(ids)
    torch.testing.assert_close(steered[1] - plain[1], vector.expand(1, 6, 32))


def test_steer_with_a_mask_leaves_unmasked_positions_alone(tiny_model):
    ids = torch.randint(3, 100, (1, 6))
    mask = torch.tensor([[0, 0, 0, 1, 1, 1]])
    with capture(tiny_model, [0]) as plain:
        tiny_model(ids)
    with steer(tiny_model, {0: torch.ones(32)}, mask=mask), capture(tiny_model, [0]) as steered:
        tiny_model(ids)
    torch.testing.assert_close(steered[0][0, :3], plain[0][0, :3])
    torch.testing.assert_close(steered[0][0, 3:] - plain[0][0, 3:], torch.ones(3, 32))
