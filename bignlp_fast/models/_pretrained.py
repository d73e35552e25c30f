"""Hugging Face checkpoint directories, read and written without transformers.

A checkpoint directory holds ``config.json`` and the weights as ``model.safetensors`` (or a sharded
``model.safetensors.index.json``) or, from older exports, ``pytorch_model.bin``. The models of this
package use Hugging Face's parameter names, so a checkpoint's state dict loads as it is, after the
few renames :meth:`PretrainedModel.load_hf_state_dict` documents.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from typing import Any, Optional

import torch
import torch.utils._pytree as pytree
from torch import Tensor

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
TORCH_NAME = "pytorch_model.bin"
TORCH_INDEX_NAME = "pytorch_model.bin.index.json"


_WRITTEN_ON_SAVE = ("model_type", "architectures", "torch_dtype", "dtype")


# ---- configs ----------------------------------------------------------------------------------
def model_output(cls):
    """A model's output record: a dataclass, registered as a pytree node so that what walks outputs by
    pytree sees the tensors in it. DistributedDataParallel finds the output tensors it hooks for the
    backward that way: with an unregistered dataclass, ``static_graph=True`` never reduced the
    gradients and ``find_unused_parameters=True`` marked parameters used through an output as unused."""
    cls = dataclasses.dataclass(cls)
    pytree.register_dataclass(cls)
    return cls


class HFConfig:
    """Mixin for the config dataclasses: from/to Hugging Face's config.json dictionaries.

    Keys a dataclass does not know are kept in ``extra`` and written back by :meth:`to_dict`, so a
    config survives a load/save round trip unchanged."""

    model_type: str = ""
    _aliases: dict = {}  # Hugging Face's alternative key -> our field

    @classmethod
    def from_dict(cls, d: dict, **overrides):
        fields = {f.name for f in dataclasses.fields(cls) if f.name != "extra"}
        known, extra = {}, {}
        for key, value in {**d, **overrides}.items():
            key = cls._aliases.get(key, key)
            (known if key in fields else extra)[key] = value
        if "model_type" in extra and extra["model_type"] != cls.model_type:
            raise ValueError(f"{cls.__name__}: config.json describes a {extra['model_type']!r} model, not a "
                             f"{cls.model_type!r} one")
        for key in _WRITTEN_ON_SAVE:  # save_pretrained writes these anew
            extra.pop(key, None)
        return cls(**known, extra=extra)

    def to_dict(self) -> dict:
        d = {**self.extra, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}}
        d["model_type"] = self.model_type
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def read_config(path: str) -> dict:
    file = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"from_pretrained: {path!r} has no {CONFIG_NAME}; expected a Hugging Face checkpoint "
                                f"directory ({CONFIG_NAME} and {SAFETENSORS_NAME} or {TORCH_NAME})")
    with open(file) as f:
        return json.load(f)


# ---- weights ----------------------------------------------------------------------------------
def _read_sharded(path: str, index: str, load) -> dict[str, Tensor]:
    """The union of the shards an index file's weight_map names, each read by ``load(file)``."""
    with open(index) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    state = {}
    for shard in shards:
        state.update(load(os.path.join(path, shard)))
    return state


def read_state_dict(path: str) -> dict[str, Tensor]:
    """The weights of a checkpoint directory: safetensors (single or sharded) first, else
    pytorch_model.bin (single or sharded), as transformers looks for them."""
    single, index = os.path.join(path, SAFETENSORS_NAME), os.path.join(path, SAFETENSORS_INDEX_NAME)
    if os.path.isfile(single) or os.path.isfile(index):
        from safetensors.torch import load_file
        return load_file(single) if os.path.isfile(single) else _read_sharded(path, index, load_file)

    def load_bin(file: str) -> dict[str, Tensor]:
        return torch.load(file, map_location="cpu", weights_only=True)

    single, index = os.path.join(path, TORCH_NAME), os.path.join(path, TORCH_INDEX_NAME)
    if os.path.isfile(single) or os.path.isfile(index):
        return load_bin(single) if os.path.isfile(single) else _read_sharded(path, index, load_bin)
    raise FileNotFoundError(f"from_pretrained: {path!r} has none of {SAFETENSORS_NAME}, {SAFETENSORS_INDEX_NAME}, "
                            f"{TORCH_NAME} or {TORCH_INDEX_NAME}")


def write_checkpoint(path: str, config: dict, state_dict: dict[str, Tensor]) -> None:
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    save_file({k: v.detach().contiguous() for k, v in state_dict.items()}, os.path.join(path, SAFETENSORS_NAME),
              metadata={"format": "pt"})


# ---- the mixin --------------------------------------------------------------------------------
class PretrainedModel(torch.nn.Module):
    """from_pretrained / from_hf / save_pretrained for a model whose parameter names are Hugging Face's.

    Subclasses set:
      config_class       the config dataclass (an :class:`HFConfig`)
      base_model_prefix  e.g. "bert": the base model's attribute name in the task models
      tied_weights       {key: key it is tied to}: left out of saved checkpoints, tied again on load
      filled_from        {key: key}: weights of their own that are saved, but taken from the other key
                         when a checkpoint lacks them (one written when the two were tied)
      ignored_keys       suffixes of checkpoint keys that are buffers, not weights (e.g. position_ids)
      optional_keys      prefixes of weights a checkpoint may lack (e.g. BERT's pooler, absent from
                         masked-LM checkpoints): newly initialised with a warning, like a task head
      other_keys         prefixes of the base model's weights that this model does not have (the
                         masked LM's: BERT's pooler): ignored with a warning, like another head's
      architecture       the class name written to config.json's "architectures"
    """

    config_class: Any = None
    base_model_prefix: str = ""
    tied_weights: dict = {}
    filled_from: dict = {}
    ignored_keys: tuple = ()
    optional_keys: tuple = ()
    other_keys: tuple = ()
    architecture: str = ""

    # -- loading --
    @classmethod
    def from_pretrained(cls, path: str, *, dtype: Optional[torch.dtype] = None, strict: bool = True,
                        **config_overrides):
        """Load a Hugging Face checkpoint directory (no network, no transformers needed).

        ``config_overrides`` replace config.json's values (e.g. ``num_labels=3``). Weights of a task
        head that the checkpoint lacks (a classifier on top of a base-model checkpoint) are newly
        initialised, with a warning, as transformers does; any other missing weight is an error
        (``strict=False`` makes it a warning).

        The model comes back in eval mode (dropout off), as transformers' ``from_pretrained`` returns
        it: call ``.train()`` to fine-tune.
        """
        config = cls.config_class.from_dict(read_config(path), **config_overrides)
        model = cls(config)
        model.load_hf_state_dict(read_state_dict(path), strict=strict)
        model.eval()
        return model.to(dtype) if dtype is not None else model

    @classmethod
    def from_hf(cls, hf_model: torch.nn.Module, *, strict: bool = True):
        """Convert a loaded transformers model (same architecture) into this class, weights copied."""
        config = cls.config_class.from_dict(hf_model.config.to_dict())
        param = next(hf_model.parameters())
        model = cls(config).to(dtype=param.dtype)
        model.load_hf_state_dict(hf_model.state_dict(), strict=strict)
        return model.to(param.device).train(hf_model.training)

    def load_hf_state_dict(self, state: dict[str, Tensor], strict: bool = True) -> None:
        """Load a Hugging Face state dict.

        Renames applied: the old LayerNorm names ``gamma``/``beta`` become ``weight``/``bias``; the
        base-model prefix is added when a task model loads a base-model checkpoint and removed when a
        base model loads a task-model checkpoint; buffers named in ``ignored_keys`` are skipped; tied
        weights are tied again. Weights of heads this model does not have (outside the base model,
        e.g. a pre-training checkpoint's ``cls.*`` in a classifier) and those under ``other_keys``
        are ignored with a warning, as transformers does; any other weight that does not fit is an
        error (a warning with ``strict=False``).
        """
        own = self.state_dict()
        prefix = self.base_model_prefix + "."
        is_task_model = any(k.startswith(prefix) for k in own)
        renamed = {}
        for key, value in state.items():
            if key.endswith(".gamma") or key.endswith(".beta"):
                key = key[: key.rfind(".")] + (".weight" if key.endswith(".gamma") else ".bias")
            renamed[key] = value
        has_prefix = any(k.startswith(prefix) for k in renamed)
        if is_task_model and not has_prefix:
            renamed = {prefix + k: v for k, v in renamed.items()}
        elif not is_task_model and has_prefix:
            renamed = {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in renamed.items()}
        renamed = {k: v for k, v in renamed.items() if not k.endswith(self.ignored_keys) or k in own}

        def is_foreign(key: str) -> bool:  # another head's weight, or one of a part this model does not have
            if key in own:
                return False
            if key.startswith(self.other_keys):
                return True
            return not key.startswith(prefix) if is_task_model else key.split(".", 1)[0] not in self._modules

        foreign = sorted(filter(is_foreign, renamed))
        if foreign:
            warnings.warn(f"{type(self).__name__}: ignoring the checkpoint's weights {foreign}, which belong to "
                          "parts this model does not have (another task's head)", stacklevel=3)
            renamed = {k: v for k, v in renamed.items() if k not in foreign}
        for key, source in [*self.tied_weights.items(), *self.filled_from.items()]:
            if key in own and key not in renamed and source in renamed:
                renamed[key] = renamed[source]

        unexpected = sorted(set(renamed) - set(own))
        missing = sorted(set(own) - set(renamed))
        head_missing = [k for k in missing if (is_task_model and not k.startswith(prefix))
                        or k.startswith(self.optional_keys)]
        base_missing = [k for k in missing if k not in head_missing]
        problems = []
        if base_missing:
            problems.append(f"missing weights {base_missing}")
        if unexpected:
            problems.append(f"unexpected weights {unexpected}")
        if problems:
            message = f"{type(self).__name__}: the checkpoint does not fit this model: " + "; ".join(problems)
            if strict:
                raise RuntimeError(message)
            warnings.warn(message, stacklevel=3)
        if head_missing:
            warnings.warn(f"{type(self).__name__}: weights {head_missing} are not in the checkpoint and were newly "
                          f"initialised; train the model before using its predictions", stacklevel=3)
        for key, value in renamed.items():
            if key in own and value.shape != own[key].shape:
                raise RuntimeError(f"{type(self).__name__}: checkpoint weight {key} has shape {tuple(value.shape)}, "
                                   f"the model's is {tuple(own[key].shape)} (does config.json match the weights?)")
        with torch.no_grad():
            for key, value in renamed.items():
                if key in own:
                    own[key].copy_(value)

    # -- saving --
    def save_pretrained(self, path: str) -> None:
        """Write config.json and model.safetensors in Hugging Face's format (tied weights written once)."""
        config = self.config.to_dict()
        config["architectures"] = [self.architecture or type(self).__name__]
        config["torch_dtype"] = str(next(self.parameters()).dtype).removeprefix("torch.")
        state = {k: v for k, v in self.state_dict().items() if k not in self.tied_weights}
        write_checkpoint(path, config, state)
