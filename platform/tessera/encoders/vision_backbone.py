"""Load an image backbone from a weights folder, the way its own library stores checkpoints.

Two layouts are read:

- **torchvision**: ``config.json`` = ``{"library": "torchvision", "arch": "resnet18", "kwargs": {...}}``
  plus the architecture's ``state_dict`` as ``model.safetensors`` or a ``*.pth`` / ``*.pt`` file (a
  downloaded torchvision checkpoint such as ``resnet18-f37072fd.pth`` works unchanged). The model is
  built with ``torchvision.models.get_model(arch, weights=None, **kwargs)`` and the state_dict loaded
  strictly; the classifier head is dropped and the last feature map returned.
- **Hugging Face**: a ``save_pretrained`` folder (``config.json`` with a ``model_type``) of a vision
  model such as ViT, ConvNeXt, DINOv2 or a CLIP vision tower, loaded with ``AutoModel.from_pretrained``;
  its ``last_hidden_state`` is returned.

:func:`check_vision_backbone` makes the same checks of ``config.json`` without the weights.

Example::

    backbone = load_vision_backbone(Path("weights/image-resnet18-seeded"))
    feats = backbone(torch.zeros(2, 3, 128, 128))       # (2, 512, 4, 4)
"""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import nn

from tessera.encoders.weights import CheckpointFiles, pretrained_config


class HFVisionBackbone(nn.Module):
    """A Hugging Face vision model: the image embedding it was trained to give when it has one (a CLIP /
    SigLIP-style dual encoder's ``get_image_features``, a ``*WithProjection`` model's ``image_embeds``),
    else its ``last_hidden_state`` for the encoder's pooling."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # pixels: (B, 3, H, W) normalised -> (B, D) embedding, (B, L, D) tokens or (B, C, h, w) feature map
        if hasattr(self.model, "get_image_features"):
            out = self.model.get_image_features(pixel_values=pixels)
            return out if isinstance(out, torch.Tensor) else out.pooler_output  # (B, D)
        out = self.model(pixel_values=pixels)
        embeds = getattr(out, "image_embeds", None)
        return embeds if embeds is not None else out.last_hidden_state


def load_vision_backbone(folder: Path) -> nn.Module:
    """Build the backbone stored in ``folder``; raises ``ValueError`` for an unknown layout."""
    files = CheckpointFiles(folder)
    config = backbone_config(files)
    if config.get("library") == "torchvision":
        return _torchvision_backbone(folder, config, files.where("config.json"))
    return HFVisionBackbone(_hf_model_class(config).from_pretrained(folder, local_files_only=True))


def backbone_config(files: CheckpointFiles) -> dict:
    """The folder's ``config.json``: a torchvision spec or a Hugging Face config.

    Raises:
        FileNotFoundError: there is none.
        ValueError: it is neither (or not a JSON object); the message names the file.
    """
    config = files.json("config.json")
    if config is None:
        raise FileNotFoundError(f"{files.location} has no config.json")
    if config.get("library") == "torchvision" or "model_type" in config:
        return config
    raise ValueError(f"{files.where('config.json')} is neither a torchvision spec (library: torchvision) "
                     "nor a Hugging Face config (model_type)")


def check_vision_backbone(files: CheckpointFiles) -> None:
    """Refuse, from ``config.json`` alone, a folder :func:`load_vision_backbone` would refuse: no config,
    an unknown layout, a torchvision arch that is unknown, takes other ``kwargs`` or is not a supported
    backbone, a Hugging Face config that ``AutoModel`` cannot read. A torchvision arch is built on the
    meta device (no memory, no weights) to see its layers; one that cannot be built there (RegNet
    computes its widths from tensor values) is left to the loading, as is the state_dict."""
    config = backbone_config(files)
    where = files.where("config.json")
    if config.get("library") == "torchvision":
        try:
            with torch.device("meta"):
                model = _torchvision_model(config, where)
        except NotImplementedError:  # a meta tensor holds no values to read
            return
        _feature_layers(model, config["arch"], where)
    else:
        import transformers

        if _hf_model_class(config) is transformers.AutoModel:  # a named class reads config.json its own way
            pretrained_config(files)


def _hf_model_class(config: dict) -> type:
    """The transformers class that loads a Hugging Face vision folder."""
    import transformers  # here, not at import: a decode task needs no transformers

    # AutoModel maps a CLIPVisionModelWithProjection folder to CLIPVisionModel and drops its
    # projection: the class the folder names is taken when it gives an image embedding
    arch = (config.get("architectures") or [""])[0]
    named = getattr(transformers, arch, None) if arch else None
    embeds = named is not None and (arch.endswith("WithProjection") or hasattr(named, "get_image_features"))
    return named if embeds else transformers.AutoModel


def load_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """The state_dict in ``model.safetensors``, else in the folder's single ``*.pth`` / ``*.pt`` file."""
    st = folder / "model.safetensors"
    if st.is_file():
        from safetensors.torch import load_file

        return load_file(st)
    candidates = sorted([*folder.glob("*.pth"), *folder.glob("*.pt")])
    if len(candidates) != 1:
        raise FileNotFoundError(f"{folder} needs model.safetensors or exactly one *.pth / *.pt file, "
                                f"found {[p.name for p in candidates]}")
    return torch.load(candidates[0], map_location="cpu", weights_only=True)


def _torchvision_backbone(folder: Path, config: dict, where: str) -> nn.Module:
    model = _torchvision_model(config, where)
    model.load_state_dict(load_state_dict(folder), strict=True)
    return _feature_layers(model, config["arch"], where)


def _torchvision_model(config: dict, where: str) -> nn.Module:
    """The spec's architecture, randomly initialised (on the default device); ``where`` names the spec."""
    arch = config.get("arch")
    if not isinstance(arch, str):
        raise ValueError(f"{where} names no torchvision arch")
    try:
        return torchvision.models.get_model(arch, weights=None, **config.get("kwargs", {}))
    except (TypeError, ValueError) as err:  # an unknown arch, kwargs it does not take
        raise ValueError(f"{where}: {err}") from err


def _feature_layers(model: nn.Module, arch: str, where: str) -> nn.Module:
    children = dict(model.named_children())
    if "fc" in children and "avgpool" in children:  # ResNet, ResNeXt, Wide ResNet, RegNet
        # everything up to the global pool: (B, 3, H, W) -> (B, C, H/32, W/32)
        return nn.Sequential(*(m for name, m in children.items() if name not in ("avgpool", "fc")))
    raise ValueError(f"{where}: torchvision arch {arch!r} is not supported as a backbone here: use a ResNet / "
                     "RegNet family model, or a Hugging Face vision model folder")
