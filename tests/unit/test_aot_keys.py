"""AOT package keys (sdqueue_worker.aot): what changes a key (shapes, strides, constants, layers,
weights), what a signature bakes in, what it cannot hold.
No compile here; tests/integration/test_aot.py builds and loads real packages."""

from __future__ import annotations

import pytest
import torch

from sdqueue.errors import StartupError
from sdqueue_worker.aot import Signature, check_aot_supported, package_key, structure_digest


def key(module: torch.nn.Module, *args: object, **kwargs: object) -> str:
    return package_key(structure_digest(module), Signature(args, kwargs))


def test_a_signature_splits_tensors_from_constants_and_rebuilds_the_call() -> None:
    sample, embeds = torch.zeros(2, 4), torch.ones(2, 3)
    signature = Signature(
        (sample, 5.0), {"encoder_hidden_states": embeds, "return_dict": False, "extra": None}
    )
    assert signature.supported
    assert [t.shape for t in signature.tensors] == [(2, 4), (2, 3)]
    other = (torch.full((2, 4), 7.0), torch.full((2, 3), 8.0))
    args, kwargs = signature.rebuild(other)
    assert args[0] is other[0] and args[1] == 5.0
    assert kwargs["encoder_hidden_states"] is other[1]
    assert kwargs["return_dict"] is False and kwargs["extra"] is None


def test_nested_tensors_are_inputs_too() -> None:
    signature = Signature(
        (), {"added_cond_kwargs": {"text_embeds": torch.zeros(1), "time_ids": torch.zeros(6)}}
    )
    assert [tuple(t.shape) for t in signature.tensors] == [(1,), (6,)]


def test_an_object_argument_cannot_be_baked_in() -> None:
    assert not Signature((torch.zeros(1),), {"callback": object()}).supported


def test_the_key_follows_shapes_dtypes_strides_and_constants() -> None:
    module = torch.nn.Linear(4, 4)
    x = torch.zeros(2, 4)
    base = key(module, x)
    assert key(module, torch.ones(2, 4)) == base  # values are not part of the key
    assert key(module, torch.zeros(3, 4)) != base
    assert key(module, torch.zeros(2, 4, dtype=torch.float64)) != base
    assert key(module, torch.zeros(4, 2).t()) != base  # same shape, other strides
    assert key(module, x, scale=1.0) != key(module, x, scale=0.5)


def test_the_key_follows_the_module_structure_and_its_weights() -> None:
    torch.manual_seed(0)
    first = torch.nn.Linear(4, 4)
    torch.manual_seed(0)
    twin = torch.nn.Linear(4, 4)
    x = torch.zeros(2, 4)
    assert key(first, x) == key(twin, x)
    assert key(torch.nn.Linear(4, 4), x) != key(first, x)  # other weights: inductor may fold them
    assert key(torch.nn.Linear(4, 4, bias=False), x) != key(first, x)
    assert key(torch.nn.Sequential(twin), x) != key(first, x)
    assert key(twin.to(torch.bfloat16), x) != key(first, x)


def test_aot_is_refused_on_the_torch_release_where_packages_crashed() -> None:
    with pytest.raises(StartupError, match="SDQ_AOT=1 needs torch >= 2.13"):
        check_aot_supported("2.11.0+cu130")
    check_aot_supported("2.13.0+cpu")
    check_aot_supported("2.14.1")


def test_aot_is_refused_with_lora_adapters() -> None:
    with pytest.raises(StartupError, match="cannot be combined with SDQ_LORA_DIR"):
        check_aot_supported("2.13.0", loras=True)
