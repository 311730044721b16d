"""Saving and loading models as self-describing folders: ``config.json`` + weights.

A saved folder holds ``config.json`` (the model's class name, a format version and *every* config
field, defaults included) and the weights, as ``model.safetensors`` when the ``safetensors``
package is installed or as a torch ``state_dict`` in ``model.pt`` otherwise. ``Model.load(dir)``
rebuilds the model from the saved config alone, so changing a code default later never changes
what an old artifact loads as.

Example::

    tower = ItemTower(ItemTowerConfig(d_model=64))
    tower.save("out/item_tower")
    same = ItemTower.load("out/item_tower")
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import ClassVar, Self

import torch
from torch import nn

from tessera.config import TesseraConfig

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
TORCH_FILE = "model.pt"
FORMAT_VERSION = 1



def safetensors_available() -> bool:
    """Whether the optional ``safetensors`` package can be imported."""
    return importlib.util.find_spec("safetensors") is not None


class SavableModule(nn.Module):
    """Base for Tessera models: built from one typed config, saved with it, loaded from it alone.

    Subclasses set ``config_class`` and take the config as their only constructor argument.
    """

    config_class: ClassVar[type[TesseraConfig]]

    def __init__(self, config: TesseraConfig):
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, "
                            f"got {type(config).__name__}")
        self.config = config

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``config.json`` and the weights into ``directory`` (created if needed).

        Args:
            directory: target folder; existing files of the same names are overwritten.

        Returns:
            The folder path.
        """
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        if safetensors_available():
            from safetensors.torch import save_file

            weights_file = SAFETENSORS_FILE
            save_file(state, str(out / weights_file))
        else:
            weights_file = TORCH_FILE
            torch.save(state, out / weights_file)
        meta = {
            "model_class": type(self).__name__,
            "format_version": FORMAT_VERSION,
            "weights_file": weights_file,
            "config": self.config.model_dump(mode="json"),
        }
        (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        return out

    @classmethod
    def load(cls, directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> Self:
        """Rebuild a model saved by :meth:`save`, in eval mode.

        Args:
            directory: folder holding ``config.json`` and the weights file it names.
            map_location: device the weights are loaded onto.

        Raises:
            ValueError: the folder holds a different model class or an unknown format version.
            FileNotFoundError: ``config.json`` or the weights file is missing.
        """
        src = Path(directory)
        meta = json.loads((src / CONFIG_FILE).read_text())
        if meta.get("model_class") != cls.__name__:
            raise ValueError(f"{src} holds a {meta.get('model_class')!r}, not a {cls.__name__}")
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{src}: unknown artifact format version {meta.get('format_version')!r}")
        config = cls.config_class.model_validate(meta["config"])
        model = cls(config)
        weights = src / meta["weights_file"]
        if not weights.exists():
            raise FileNotFoundError(f"weights file {weights} named in {src / CONFIG_FILE} is missing")
        if weights.name == SAFETENSORS_FILE:
            if not safetensors_available():
                raise RuntimeError(f"{weights} needs the 'safetensors' package, which is not installed")
            from safetensors.torch import load_file

            state = load_file(str(weights), device=str(map_location))
        else:
            state = torch.load(weights, map_location=map_location, weights_only=True)
        model.load_state_dict(state, strict=True)
        return model.to(map_location).eval()
