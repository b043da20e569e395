"""The reference forward layer by layer: a decoder reward model whose layers hold their weights only
while they run.

``layerwise_model`` builds transformers' own model class for the checkpoint (the same modules, the
same forward) with its parameters on the meta device, then gives the parts outside the decoder layers
(embeddings, final norm, score head) their float32 weights from the checkpoint's tensors. Each decoder
layer reads its float32 weights from the checkpoint (models/lean/source.py: plain reads in the stored
dtype, converted) just before it runs and drops them after, so a forward holds the embeddings and one
layer, whatever the model's depth. Scores are the float32 model's exactly: the same modules run on the
same float32 weights; only where the weights live between layers differs. Buffers (rotary frequencies)
are built on the CPU as transformers builds them.

``return_freed_buffers`` makes glibc hand each freed buffer of 1 MiB or more back to the system. By
default its threshold for that rises to the size of the largest buffer freed so far (up to 32 MiB),
after which a layer's weights, freed, stay in the heap: a layer-by-layer forward then ends holding
about as much as the whole model.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from rmserve.models.heads import text_body
from rmserve.models.lean.source import TensorSource, body_prefix

# mallopt's parameter number for the mmap threshold (glibc's malloc.h).
M_MMAP_THRESHOLD = -3


def return_freed_buffers() -> bool:
    """Fix glibc's mmap threshold at 1 MiB (the module docstring); False where there is no glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, 1 << 20))


def _assign(module: nn.Module, name: str, value: torch.Tensor) -> None:
    parent, _, leaf = name.rpartition(".")
    owner = module.get_submodule(parent) if parent else module
    owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)


def _load(module: nn.Module, source: TensorSource, prefix: str) -> None:
    for name, _ in list(module.named_parameters()):
        _assign(module, name, source.tensor(prefix + name).to(torch.float32))


def _drop(module: nn.Module) -> None:
    for name, param in list(module.named_parameters()):
        _assign(module, name, torch.empty(param.shape, dtype=param.dtype, device="meta"))


def own_names(source: TensorSource) -> bool:
    """Whether a checkpoint keeps a sequence classifier's own weight names (its body under ``model.``), which
    the layer-by-layer reference reads. transformers renames some checkpoints' weights as it loads them
    (Gemma-3's image-text checkpoints store ``language_model.model.*`` for the class's
    ``model.language_model.*``: conversion_mapping.py, the ``llava`` renamings): those load whole."""
    return body_prefix(source) == "model."


def layerwise_model(
    model_class: Any,
    config: Any,
    source: TensorSource,
    attn: str | None,
    check: Callable[[Any, dict[str, list[Any]]], None] | None = None,
) -> Any:
    """``model_class.from_config(config)`` with float32 weights from ``source``, its decoder layers
    loaded for each forward (the module docstring). ``check`` sees the model built, before any weight
    is read, with its ``loading_info``: where it raises, nothing is read."""
    from accelerate import init_empty_weights

    extra = {"attn_implementation": attn} if attn else {}
    with init_empty_weights(include_buffers=False):
        hf_model = model_class.from_config(config, dtype=torch.float32, **extra)
    hf_model.eval()
    if check is not None:
        check(hf_model, loading_info(hf_model, source))
    prefix = body_prefix(source)
    layers = text_body(hf_model.base_model).layers
    in_layers = {id(p) for p in layers.parameters()}
    for name, param in list(hf_model.named_parameters()):
        if id(param) not in in_layers:
            _assign(hf_model, name, source.tensor(name).to(torch.float32))
    for i, layer in enumerate(layers):
        layer_prefix = f"{prefix}layers.{i}."
        layer.register_forward_pre_hook(lambda m, _args, p=layer_prefix: _load(m, source, p))
        layer.register_forward_hook(lambda m, _args, _out: _drop(m))
    return hf_model


def loading_info(hf_model: Any, source: TensorSource) -> dict[str, list[Any]]:
    """What ``from_pretrained(output_loading_info=True)`` would report for ``hf_model`` read from
    ``source``: its weights the checkpoint lacks, the checkpoint's it does not use, shapes that differ."""
    shapes = {name: tuple(p.shape) for name, p in hf_model.named_parameters()}
    names = source.names()
    return {
        "missing_keys": sorted(set(shapes) - names),
        "unexpected_keys": sorted(names - set(shapes)),
        "mismatched_keys": sorted(n for n in set(shapes) & names if source.shape(n) != shapes[n]),
    }
