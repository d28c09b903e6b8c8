"""Masked-language-model pretraining task for the BERT classifiers (survey §3.2.3, self-supervised learning).

A stage of its own in a pipeline (``recipes/bert_mlm.yaml``): ``mlm`` pretrains the encoder of the
very model that ``fit`` then fine-tunes, on the same glosses but without their labels, and hands the
encoder over (``hands_over: backbone``).

Why the network stays ``self.model`` and the head lives beside it: the pipeline hands ``task.model``
to the next stage and a checkpoint stores it under ``model.``, so those keys are exactly the
fine-tuned classifier's (its pooler and classifier simply untrained); the MLM head
(``self.mlm_head``, decoder tied to the word embeddings) is pretraining-only, as BERT's is.

The corruption is :func:`lightning_eff.learning.ssl.mlm.mask_tokens`: training draws fresh masks every
step from a generator seeded for that batch (:class:`~lightning_eff.tasks.draws.StepDraws`: the run's seed,
epoch, batch index and rank), so ``fit(ckpt_path=...)`` masks exactly what the uninterrupted run did; validation
and test use a generator seeded with ``val_seed + batch_idx``, so every epoch scores the same masked
tokens and ``val/mlm_loss`` is comparable across epochs and runs.

Example:
    >>> task = MLMTask({"name": "bert_student", "num_classes": 3, "vocab_size": 60, "num_layers": 1, "hidden": 16,
    ...                 "heads": 2}, mask_token_id=4, special_ids=[0, 1, 2, 3, 4])
    >>> task({"input_ids": torch.tensor([[2, 9, 3]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}).shape
    torch.Size([1, 3])
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_eff.batch import call_model, model_inputs
from lightning_eff.errors import ConfigError
from lightning_eff.learning.ssl.mlm import (
    IGNORE_INDEX,
    bert_encoder,
    build_mlm_head,
    mask_tokens,
    mlm_logits,
)
from lightning_eff.models import create_model
from lightning_eff.tasks.classification import (
    check_optimizer_options,
    configure_optimizers,
)
from lightning_eff.tasks.draws import StepDraws
from lightning_eff.validation import check_int, check_number

__all__ = ["MLMTask"]


class MLMTask(StepDraws, L.LightningModule):
    """Masked-token prediction (BERT's MLM objective) on a BERT classifier's encoder; the batch's labels are ignored.

    Args:
        model: a registry spec ``{"name": "bert_student" | "bert_teacher", ...}`` or an ``nn.Module`` that is a
            :class:`~lightning_eff.models.baselines.BertClassifier` or has a Hugging Face ``BertModel`` at
            ``.bert.bert``.
        mask_rate: fraction of the real, non-special tokens predicted per batch, in ``(0, 1)`` (BERT: 0.15).
        mask_prob, random_prob: of the selected tokens, the fraction replaced by ``[MASK]`` / by a random token
            (BERT: 0.8 / 0.1; the rest stay unchanged).
        mask_token_id, special_ids: the tokenizer's ``[MASK]`` id and the ids never selected nor drawn
            (default: the datamodule's ``tokenizer.mask_token_id`` / ``all_special_ids``, read at ``setup``;
            give them when training on plain dataloaders).
        val_seed: seed of the fixed validation/test masks (``val_seed + batch_idx``).
        optimizer, lr, weight_decay, momentum, scheduler, warmup_fraction: as :class:`ClassificationTask`
            (the shared optimizer and schedule code; no decay on norms and biases).

    Raises:
        ConfigError: an option out of its range or choices, or a model that is not a BERT classifier.
            At ``setup``: no ``[MASK]`` id known (a datamodule without a WordPiece tokenizer and no
            ``mask_token_id``) or a tokenizer larger than the model's vocabulary.
    """

    #: What this task logs (``optimized_metric`` is checked against it before training).
    LOGGED_METRICS = ("train/mlm_loss", "val/mlm_loss", "val/mlm_acc", "test/mlm_loss", "test/mlm_acc")

    def __init__(
        self,
        model: dict | nn.Module,
        mask_rate: float = 0.15,
        mask_prob: float = 0.8,
        random_prob: float = 0.1,
        mask_token_id: int | None = None,
        special_ids: Sequence[int] | None = None,
        val_seed: int = 0,
        optimizer: str = "adamw",
        lr: float = 5e-4,
        weight_decay: float = 0.01,
        momentum: float = 0.9,
        scheduler: str = "onecycle",
        warmup_fraction: float = 0.1,
    ) -> None:
        super().__init__()
        check_number("task.mask_rate", mask_rate, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
        check_number("task.mask_prob", mask_prob, low=0.0, high=1.0)
        check_number("task.random_prob", random_prob, low=0.0, high=1.0)
        if mask_prob + random_prob > 1.0 + 1e-9:
            raise ConfigError(f"task.mask_prob={mask_prob} + task.random_prob={random_prob} must be <= 1 "
                              "(the rest of the selected tokens stay unchanged).")
        check_int("task.mask_token_id", mask_token_id, low=0, allow_none=True)
        if special_ids is not None:
            special_ids = [check_int("task.special_ids[]", i, low=0) for i in special_ids]
        check_int("task.val_seed", val_seed, low=0)
        check_optimizer_options(optimizer, lr, weight_decay, momentum, scheduler, warmup_fraction)
        if isinstance(model, nn.Module):
            self.save_hyperparameters(ignore=["model"])
            network = model
        elif isinstance(model, dict) or hasattr(model, "keys"):
            spec = dict(model)
            if "name" not in spec:
                raise ConfigError(f"task.model={spec!r} must be a registry spec with a 'name' (bert_student, bert_teacher).")
            self.save_hyperparameters()
            network = create_model(spec.pop("name"), **spec)
        else:
            raise ConfigError(f"task.model={model!r} must be a registry spec {{name: ...}} or an nn.Module.")
        try:
            encoder = bert_encoder(network)
        except ConfigError as err:
            raise ConfigError(f"task.{err}") from None  # "task.model=<class> is not supported ..."
        self.model = network
        #: pretraining-only head beside the classifier (not under ``model.``), decoder tied to the word embeddings
        self.mlm_head = build_mlm_head(network)
        self.vocab_size = int(encoder.config.vocab_size)
        self._token_vocab = self.vocab_size  # ids random replacements are drawn from (the tokenizer's, at setup)
        self._mask_token_id = mask_token_id
        self._special_ids = list(special_ids) if special_ids is not None else None
        self._frozen: list[nn.Parameter] = []

    # ------------------------------------------------------------------------------------------ setup
    def setup(self, stage: str) -> None:
        """Read ``[MASK]`` and the special ids from the datamodule's tokenizer; freeze what MLM never trains.

        The pooler and classifier get no gradient from the MLM loss; they are frozen while fitting (and
        thawed in :meth:`teardown`) so DDP does not need ``find_unused_parameters`` and the optimizer skips
        them. This runs before the strategy wraps the model and before the optimizers are built.
        """
        tokenizer = getattr(getattr(self._trainer, "datamodule", None), "tokenizer", None) if self._trainer else None
        if tokenizer is not None and not isinstance(tokenizer, str):
            if self._mask_token_id is None:
                self._mask_token_id = getattr(tokenizer, "mask_token_id", None)
            if self._special_ids is None:
                self._special_ids = list(getattr(tokenizer, "all_special_ids", []) or [])
            size = len(tokenizer)
            if size > self.vocab_size:
                raise ConfigError(f"the data's tokenizer has {size} tokens but task.model's vocabulary {self.vocab_size}; "
                                  "build the model with model.vocab_size=len(tokenizer).")
            self._token_vocab = size
        if self._mask_token_id is None:
            raise ConfigError("MLMTask needs a [MASK] token: use data.tokenizer=wordpiece (or a tokenizer folder with a "
                              "mask token), or give task.mask_token_id and task.special_ids.")
        check_int("task.mask_token_id", self._mask_token_id, low=0, high=self._token_vocab - 1)
        if stage == "fit" and not self._frozen:
            unused = [m for name, m in self.model.named_modules() if name.rsplit(".", 1)[-1] in ("pooler", "classifier")]
            self._frozen = [p for m in unused for p in m.parameters() if p.requires_grad]
            for p in self._frozen:
                p.requires_grad_(False)

    def teardown(self, stage: str) -> None:
        """Thaw the pooler and classifier frozen in :meth:`setup` (the next stage fine-tunes them)."""
        for p in self._frozen:
            p.requires_grad_(True)
        self._frozen = []

    # ------------------------------------------------------------------------------------------ steps
    def forward(self, inputs: Any) -> Tensor:
        """The classifier's logits (``self.model``), so generic tools that call a task still work."""
        return call_model(self.model, inputs)

    def _ids(self, batch: Any) -> tuple[Tensor, Tensor | None]:
        inputs = model_inputs(batch)
        if not isinstance(inputs, dict) or "input_ids" not in inputs:
            keys = list(inputs) if isinstance(inputs, dict) else type(inputs).__name__
            raise ConfigError(f"MLMTask needs token ids (batches with 'input_ids'), got {keys}; use data.tokenizer=wordpiece.")
        return inputs["input_ids"], inputs.get("attention_mask")

    def _masked_loss(self, batch: Any, generator: torch.Generator | None) -> tuple[Tensor, Tensor, int]:
        """``(loss, correct, n)``: mean cross-entropy over the masked tokens, how many were predicted right, how many."""
        if self._mask_token_id is None:  # used outside a Trainer (setup not run)
            self.setup("predict")
        input_ids, attention_mask = self._ids(batch)
        masked, labels = mask_tokens(
            input_ids, attention_mask, mask_token_id=self._mask_token_id, vocab_size=self._token_vocab,
            special_ids=self._special_ids or [], rate=self.hparams.mask_rate, mask_prob=self.hparams.mask_prob,
            random_prob=self.hparams.random_prob, generator=generator,
        )
        positions = labels != IGNORE_INDEX
        targets = labels[positions]
        logits = mlm_logits(self.model, self.mlm_head, masked, attention_mask, positions=positions)
        if targets.numel() == 0:  # no row has a maskable token (only [CLS] [SEP]): a zero loss, not a NaN
            return logits.sum() * 0.0, targets.new_zeros(()), 0
        loss = F.cross_entropy(logits.float(), targets)  # float32: bf16-mixed autocast keeps the head in bf16
        correct = (logits.detach().argmax(dim=-1) == targets).sum()
        return loss, correct, int(targets.numel())

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:  # noqa: D102
        loss, _, n = self._masked_loss(batch, self.step_generator(batch_idx, self.device))  # the batch is on self.device
        self.log("train/mlm_loss", loss, prog_bar=True, batch_size=n)
        return loss

    def _eval_step(self, batch: Any, batch_idx: int, stage: str) -> None:
        generator = torch.Generator().manual_seed(int(self.hparams.val_seed) + int(batch_idx))
        loss, correct, n = self._masked_loss(batch, generator)
        # weighted by masked-token count: the epoch value is the mean over tokens, not over batches
        self.log(f"{stage}/mlm_loss", loss, prog_bar=stage == "val", batch_size=n, sync_dist=True)
        self.log(f"{stage}/mlm_acc", correct.float() / max(n, 1), prog_bar=stage == "val", batch_size=n, sync_dist=True)

    def validation_step(self, batch: Any, batch_idx: int) -> None:  # noqa: D102
        self._eval_step(batch, batch_idx, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:  # noqa: D102
        self._eval_step(batch, batch_idx, "test")

    def configure_optimizers(self) -> Any:
        """The optimizer and schedule every task shares (:func:`lightning_eff.tasks.classification.configure_optimizers`),
        over the classifier and the MLM head (the tied embedding once; the frozen pooler/classifier not at all)."""
        return configure_optimizers(self, self.hparams)
