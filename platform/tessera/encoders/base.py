"""The encoder interface shared by every modality: config, preprocessing side, encoding side.

Each modality splits into two objects so a Ray Data pipeline can place them apart:

- a :class:`Preprocessor` (CPU tasks): raw input -> one numpy array per item, small enough to travel
  through the object store; bad input raises :class:`~tessera.encoders.errors.MediaError`. It needs
  only the small config files stored with the weights (tokenizer, preprocessing config).
- an :class:`Encoder` (one per actor): loads the model once and turns a list of those arrays into
  L2-normalised ``float32`` vectors ``(N, D)``, in micro-batches of ``batch_size``, under
  ``torch.inference_mode`` and, where the hardware supports it, bf16/fp16 autocast.

Example::

    enc = TextEncoder(TextEncoderConfig())
    inputs = [enc.preprocessor(t) for t in ["red apple", "green pear"]]   # in CPU tasks
    vectors = enc.encode(inputs)                                          # in an actor: (2, 384)

torch is imported by the functions that use it, not with the module: the preprocessing side (configs,
preprocessors, the text tokenizer) then loads in a CPU task without torch's seconds of import time.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import traceback
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Iterator, Literal, Sequence, TypeVar

import numpy as np
from pydantic import Field

from tessera.config import TesseraConfig
from tessera.encoders.errors import MediaError
from tessera.encoders.weights import CheckpointFiles, resolve_weights, weights_checksum
from tessera.storage import Storage, parse_uri

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


class EncoderConfig(TesseraConfig):
    """Settings every encoder shares; each modality subclasses it with its own defaults.

    Args:
        weights: a local folder or an ``s3://`` prefix holding the model in its library's own layout.
        name: label recorded in manifests; None derives it from the weights location.
        batch_size: items per forward pass (``encode`` splits larger inputs).
        max_bytes: raw inputs above this size are rejected as ``oversized``.
        device: ``auto`` (CUDA when available, else CPU), ``cpu`` or ``cuda``.
        bf16_autocast: run the forward pass under autocast: bf16 on CPUs with native bf16
            (AVX512-BF16 / AMX) and on CUDA GPUs that support it, fp16 on older GPUs; on other CPUs
            the flag is ignored and the model runs in fp32.
        cache_dir: where ``s3://`` weights are cached on each node (None: ``~/.cache/tessera/weights``).
    """

    weights: str
    name: str | None = None
    batch_size: int = Field(32, ge=1, le=4096)
    max_bytes: int = Field(20_000_000, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    bf16_autocast: bool = True
    cache_dir: str | None = None


C = TypeVar("C", bound=EncoderConfig)


def cpu_supports_bf16() -> bool:
    """Whether this CPU computes bf16 natively (oneDNN's check: AVX512-BF16, AMX or Arm BF16)."""
    import torch

    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def choose_device(requested: str, key: str = "device") -> torch.device:
    """Map the config's ``device`` to a torch device; asking for ``cuda`` without one is an error naming
    ``key`` (the setting that asked)."""
    import torch

    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"{key} is 'cuda' but torch sees no CUDA device on this node "
                           f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'}): set it to "
                           "'auto', or run this on a node with a GPU and a CUDA build of torch")
    return torch.device(requested)


def autocast_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """The autocast dtype for ``device``, or None to run in fp32."""
    import torch

    if not enabled:
        return None
    if device.type == "cuda":
        # native bf16 only (Ampere and later): torch's default also says yes for cards that emulate it
        # (a T4 would run bf16 autocast without bf16 tensor cores instead of fp16 with them)
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return torch.bfloat16 if cpu_supports_bf16() else None


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm, computed in fp32."""
    import torch

    return torch.nn.functional.normalize(x.float(), p=2.0, dim=-1)


class Preprocessor(ABC, Generic[C]):
    """Raw input -> model input (one numpy array per item), on CPU, without loading the model.

    Loads what it needs (tokenizer, preprocessing config) lazily on first use and drops it when
    pickled, so it is cheap to ship to Ray tasks.

    Args:
        config: the modality's encoder config.
        storage: how to reach ``s3://`` weights (default: from the environment).
        weights_dir: an already resolved local weights folder (the encoder passes its own).
    """

    # The small files the preprocessing side needs from the weights folder.
    config_files: ClassVar[tuple[str, ...]] = ("*.json", "*.txt", "*.model")

    def __init__(self, config: C, storage: Storage | None = None, weights_dir: Path | None = None):
        self.config = config
        self.storage = storage
        self._given_dir = weights_dir
        self._logged_failures: set[tuple[str, str, int]] = set()  # (exception type, file, line)

    def __getstate__(self) -> dict:
        local = self._given_dir if parse_uri(self.config.weights).scheme == "file" else None
        return {"config": self.config, "storage": self.storage, "weights_dir": local}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["config"], state["storage"], state["weights_dir"])

    @functools.cached_property
    def weights_dir(self) -> Path:
        if self._given_dir is not None:
            return self._given_dir
        return resolve_weights(self.config.weights, self.storage, self.config.cache_dir, self.config_files).path

    @abstractmethod
    def __call__(self, raw: Any) -> np.ndarray:
        """Turn one raw item into the model input; raises ``MediaError`` for bad input."""

    def setup(self) -> None:
        """Load what every item needs (the weights folder; subclasses add their config files).

        ``map`` calls it before its first item, so a missing or bad config fails the call instead of
        failing every item one by one.
        """
        _ = self.weights_dir

    def map(self, raws: Sequence[Any]) -> list[np.ndarray | MediaError]:
        """Preprocess many items; a bad item yields its ``MediaError`` in place instead of raising.

        Any other exception from one item (a decoder's ``RuntimeError``, a ``MemoryError``) fails that
        item alone, as ``MediaError("corrupt", "unexpected <type>: <message>")``. It is logged at
        warning level with its traceback the first time it comes from a given place in the code, so a
        bug stays visible without a traceback per item; the item's error records every occurrence.
        Errors from ``setup`` (configuration, storage) are raised.

        Example::

            prep.map([jpeg, b"", wav])    # [array(3, 128, 128), MediaError('empty'), MediaError('wrong_format')]
        """
        self.setup()
        out: list[np.ndarray | MediaError] = []
        for raw in raws:
            try:
                out.append(self(raw))
            except MediaError as err:
                out.append(err)
            except Exception as err:  # recorded as this item's error, logged in _unexpected_failure
                out.append(self._unexpected_failure(err))
        return out

    def _unexpected_failure(self, err: Exception) -> MediaError:
        """The ``corrupt`` error standing for an unexpected exception; logs it once per raising place."""
        message = " ".join(str(err).split())[:300]
        where = traceback.extract_tb(err.__traceback__)[-1]
        key = (type(err).__name__, where.filename, where.lineno or 0)
        if key not in self._logged_failures:
            self._logged_failures.add(key)
            log.warning("%s failed on one item with an unexpected %s (recorded as 'corrupt'; logged once "
                        "per place it is raised)", type(self).__name__, type(err).__name__, exc_info=err)
        return MediaError("corrupt", f"unexpected {type(err).__name__}: {message}")


class Encoder(ABC, Generic[C]):
    """Loads one model once and encodes preprocessed inputs to unit vectors.

    Subclasses set ``modality`` and ``preprocessor_class`` and implement ``_load_model``,
    ``dim`` and ``_forward``.

    Args:
        config: the modality's encoder config.
        storage: how to reach ``s3://`` weights (default: from the environment).
    """

    modality: ClassVar[str]
    preprocessor_class: ClassVar[type[Preprocessor]]

    def __init__(self, config: C, storage: Storage | None = None):
        import torch

        self.config = config
        self.weights_dir = resolve_weights(config.weights, storage, config.cache_dir).path
        self._device = choose_device(config.device, f"{self.modality}.encoder.device")
        self.autocast_dtype = autocast_dtype(self._device, config.bf16_autocast)
        self.preprocessor = self.preprocessor_class(config, storage, weights_dir=self.weights_dir)
        # fp32 weights whatever the checkpoint stores: transformers 5 loads a checkpoint saved in fp16 or
        # bf16 in that dtype, which the CPU runs slowly (fp16) and which would make the fp32 path and
        # autocast's choice of precision depend on the file; autocast does the low-precision work
        self.model = self._load_model().to(self._device, dtype=torch.float32).eval()

    @classmethod
    def check_checkpoint(cls, config: C, files: CheckpointFiles) -> None:
        """Refuse, from the weights folder's configuration files alone, a checkpoint this encoder would
        refuse when it loads: the same code reads them here and in the loading, but no weights are read
        and nothing is downloaded (the embedding job's driver calls it before any work). Each modality
        checks the files its loading reads; what only the weights can tell is left to the loading.

        Raises:
            FileNotFoundError: a file the encoder needs is missing.
            ValueError: a file it cannot use (not JSON, a setting it does not support); the message
                names the file.

        Example::

            ImageEncoder.check_checkpoint(ImageEncoderConfig(weights=uri), CheckpointFiles(uri, storage))
        """

    @abstractmethod
    def _load_model(self) -> torch.nn.Module:
        """Build the model from ``self.weights_dir`` exactly as its library loads a checkpoint."""

    @property
    @abstractmethod
    def dim(self) -> int:
        """Length of the output vectors."""

    @abstractmethod
    def _forward(self, items: list[np.ndarray]) -> torch.Tensor:
        """One micro-batch of preprocessed items -> ``(b, D)`` un-normalised vectors on the device."""

    @property
    def name(self) -> str:
        """``<modality>:<name>``, the name from config or the last two parts of the weights location."""
        label = self.config.name or "/".join(Path(parse_uri(self.config.weights).path).parts[-2:])
        return f"{self.modality}:{label}"

    @property
    def device(self) -> str:
        return str(self._device)

    @functools.cached_property
    def weights_checksum(self) -> str:
        """``sha256:<hex>`` over the weight files (the same wherever the folder was loaded from)."""
        return weights_checksum(self.weights_dir)

    def _micro_batches(self, batch: Sequence[np.ndarray]) -> Iterator[np.ndarray]:
        """Index arrays of the micro-batches to run; in input order by default."""
        n, size = len(batch), self.config.batch_size
        for start in range(0, n, size):
            yield np.arange(start, min(start + size, n))

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        import torch

        return torch.autocast(self._device.type, dtype=self.autocast_dtype)

    def encode(self, batch: Sequence[np.ndarray]) -> np.ndarray:
        """Encode preprocessed items (outputs of ``self.preprocessor``) to unit vectors.

        Args:
            batch: a list of per-item arrays (or one stacked array), any length.

        Returns:
            ``(N, dim)`` float32, rows L2-normalised, in the order of ``batch``.
        """
        import torch

        out = np.empty((len(batch), self.dim), dtype=np.float32)
        with torch.inference_mode():
            for idx in self._micro_batches(batch):
                with self._autocast():
                    vectors = self._forward([batch[i] for i in idx])  # (b, D)
                out[idx] = l2_normalize(vectors).cpu().numpy()
        return out

    def embed(self, raws: Sequence[Any]) -> np.ndarray:
        """Preprocess then encode raw items in this process (for queries and tests).

        Raises:
            MediaError: for the first bad item.
        """
        return self.encode([self.preprocessor(raw) for raw in raws])
