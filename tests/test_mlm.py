"""Masked-language-model pretraining: BERT masking, the tied MLM head, and ``MLMTask`` on real WordNet glosses."""
from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import needs_wordnet
from torch.utils.data import DataLoader

from lightning_eff.errors import ConfigError
from lightning_eff.learning.ssl.mlm import (
    IGNORE_INDEX,
    bert_encoder,
    build_mlm_head,
    mask_tokens,
    mlm_logits,
)
from lightning_eff.models import create_model
from lightning_eff.tasks import MLMTask

PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
SPECIAL = [PAD, UNK, CLS, SEP, MASK]
VOCAB = 1000


def _random_batch(rows: int = 1024, length: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``[CLS] ... [SEP] [PAD]...`` rows of random lengths, with some [UNK]/[MASK] inside the text."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (rows, length), generator=g)
    ids[torch.rand(rows, length, generator=g) < 0.03] = UNK
    ids[torch.rand(rows, length, generator=g) < 0.01] = MASK
    lengths = torch.randint(3, length + 1, (rows,), generator=g)
    if rows >= 4:  # an all-special row ([CLS][SEP]) and rows with one text token
        lengths[:4] = torch.tensor([2, 3, 3, length])
        ids[:4, 1] = torch.tensor([SEP, 7, 8, 9])
    pos = torch.arange(length).expand(rows, length)
    attention = (pos < lengths[:, None]).long()
    ids[:, 0] = CLS
    ids[pos == (lengths[:, None] - 1)] = SEP
    ids[attention == 0] = PAD
    return ids, attention


def _mask(ids: torch.Tensor, attention: torch.Tensor, seed: int = 1, **kw):
    return mask_tokens(ids, attention, mask_token_id=MASK, vocab_size=VOCAB, special_ids=SPECIAL,
                       generator=torch.Generator().manual_seed(seed), **kw)


def test_mask_tokens_bert_rates_specials_and_labels():
    ids, attention = _random_batch()
    masked, labels = _mask(ids, attention)
    maskable = attention.bool() & ~torch.isin(ids, torch.tensor(SPECIAL))
    selected = labels != IGNORE_INDEX
    n = int(selected.sum())
    # fixed generator: deterministic; ~35k maskable tokens, so the tolerances are > 5 sigma of the sampling noise
    assert maskable.sum() > 30_000
    assert abs(n / int(maskable.sum()) - 0.15) < 0.01
    assert not (selected & ~maskable).any()  # never padding, [CLS], [SEP], [UNK] or an input [MASK]
    assert torch.equal(labels[selected], ids[selected]) and (labels[~selected] == IGNORE_INDEX).all()
    assert torch.equal(masked[~selected], ids[~selected])  # only selected tokens are corrupted
    to_mask = masked[selected] == MASK
    changed = (masked[selected] != ids[selected]) & ~to_mask
    kept = masked[selected] == ids[selected]
    assert abs(float(to_mask.float().mean()) - 0.8) < 0.03
    assert abs(float(changed.float().mean()) - 0.1) < 0.02  # random ids (minus the 1/995 that hit the original)
    assert abs(float(kept.float().mean()) - 0.1) < 0.02
    assert not torch.isin(masked[selected][changed], torch.tensor(SPECIAL)).any()  # random ids are never special
    # every row with a maskable token has a label; the all-special row has none and is untouched
    assert (selected.any(1) == maskable.any(1)).all()
    assert not selected[0].any() and torch.equal(masked[0], ids[0])
    assert selected[1, 1] and selected[2, 1]  # the one text token of a short row is always selected
    # reproducible with a generator, different with another seed
    again = _mask(ids, attention)
    assert torch.equal(again[0], masked) and torch.equal(again[1], labels)
    assert not torch.equal(_mask(ids, attention, seed=2)[1], labels)


def test_mask_tokens_options():
    ids, attention = _random_batch(rows=256)
    masked, labels = _mask(ids, attention, rate=0.5, mask_prob=1.0, random_prob=0.0)
    selected = labels != IGNORE_INDEX
    assert (masked[selected] == MASK).all()
    assert abs(float(selected.sum()) / float((attention.bool() & ~torch.isin(ids, torch.tensor(SPECIAL))).sum()) - 0.5) < 0.02
    # no attention mask: every token is real, padding ids are still special
    _, labels = mask_tokens(ids, None, mask_token_id=MASK, vocab_size=VOCAB, special_ids=SPECIAL)
    assert ((labels != IGNORE_INDEX) <= (ids >= 5)).all()
    for bad, match in [({"rate": 0.0}, "rate"), ({"rate": 1.0}, "rate"), ({"mask_prob": 0.9, "random_prob": 0.2}, "mask_prob")]:
        with pytest.raises(ConfigError, match=match):
            _mask(ids, attention, **bad)


def _tiny_model(vocab: int = VOCAB, classes: int = 26, length: int = 64):
    return create_model("bert_student", num_classes=classes, vocab_size=vocab, num_layers=1, hidden=32, heads=2,
                        max_length=length)


def test_mlm_head_decoder_is_tied_to_the_word_embeddings():
    torch.manual_seed(0)
    model = _tiny_model()
    head = build_mlm_head(model)
    embedding = bert_encoder(model).get_input_embeddings().weight
    decoder = head.predictions.decoder
    assert decoder.weight is embedding and decoder.weight.data_ptr() == embedding.data_ptr()
    assert decoder.bias is head.predictions.bias  # the bias BERT checkpoints name cls.predictions.bias
    params = list(model.parameters()) + list(head.parameters())
    assert len({id(p) for p in params}) == len(params) - 1  # one shared parameter
    # a step on the MLM loss moves the embedding the encoder reads (one tensor, two uses)
    ids, attention = _random_batch(rows=8, length=16)
    masked, labels = _mask(ids, attention)
    positions = labels != IGNORE_INDEX
    logits = mlm_logits(model, head, masked, attention, positions=positions)
    assert logits.shape == (int(positions.sum()), VOCAB)
    assert mlm_logits(model, head, masked, attention).shape == (8, 16, VOCAB)
    before = embedding.detach().clone()
    torch.nn.functional.cross_entropy(logits, labels[positions]).backward()
    torch.optim.SGD(list({id(p): p for p in params}.values()), lr=1.0).step()
    assert not torch.equal(before, embedding) and decoder.weight is embedding


def test_mlm_task_refuses_bad_options_naming_them():
    spec = {"name": "bert_student", "num_classes": 3, "vocab_size": 60, "num_layers": 1, "hidden": 16, "heads": 2}
    for rate in (0, 0.0, 1.0, 1.5):
        with pytest.raises(ConfigError, match="task.mask_rate"):
            MLMTask(spec, mask_rate=rate)
    with pytest.raises(ConfigError, match="task.mask_prob"):
        MLMTask(spec, mask_prob=0.95, random_prob=0.1)
    with pytest.raises(ConfigError, match=r"task.model.*BertClassifier"):
        MLMTask(torch.nn.Linear(4, 2))
    with pytest.raises(ConfigError, match=r"task.model.*BertClassifier"):
        MLMTask({"name": "mobilenetv2_tiny", "num_classes": 10, "in_chans": 1})
    with pytest.raises(ConfigError, match="task.optimizer"):
        MLMTask(spec, optimizer="adam")
    with pytest.raises(ConfigError, match=r"\[MASK\].*tokenizer=wordpiece"):  # no tokenizer and no mask_token_id
        MLMTask(spec).setup("fit")


class _Ids(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 48  # 3 batches: max_steps=3 ends the epoch, so validation runs

    def __getitem__(self, i: int) -> dict:
        ids, attention = _random_batch(rows=1, length=12, seed=i)
        return {"input_ids": ids[0] % 60, "attention_mask": attention[0], "labels": torch.tensor(0)}


def test_mlm_task_bf16_mixed_without_a_datamodule():
    """Plain dataloaders (mask id given), Lightning's bf16-mixed autocast: a finite float32 loss, fit and test run."""
    torch.manual_seed(0)
    task = MLMTask({"name": "bert_student", "num_classes": 3, "vocab_size": 60, "num_layers": 1, "hidden": 16, "heads": 2,
                    "max_length": 12}, mask_token_id=MASK, special_ids=SPECIAL, lr=1e-3)
    trainer = L.Trainer(accelerator="cpu", max_steps=3, precision="bf16-mixed", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1)
    loader = DataLoader(_Ids(), batch_size=16)
    trainer.fit(task, loader, loader)
    assert set(trainer.callback_metrics) >= {"train/mlm_loss", "val/mlm_loss", "val/mlm_acc"}
    assert trainer.callback_metrics["train/mlm_loss"].dtype == torch.float32
    out = trainer.test(task, loader, verbose=False)[0]
    assert torch.isfinite(torch.tensor(out["test/mlm_loss"])) and 0.0 <= out["test/mlm_acc"] <= 1.0
    # a batch with nothing to predict ([CLS] [SEP] rows) gives a zero loss, not a NaN
    empty = {"input_ids": torch.tensor([[CLS, SEP, PAD]] * 2), "attention_mask": torch.tensor([[1, 1, 0]] * 2)}
    loss, _, n = task._masked_loss(empty, None)
    assert n == 0 and float(loss.detach()) == 0.0


@needs_wordnet
def test_mlm_task_learns_on_wordnet_and_saves_the_classifier_backbone(tmp_path):
    from lightning_eff.data import WordNetSupersenseDataModule

    L.seed_everything(0, verbose=False)
    dm = WordNetSupersenseDataModule(tokenizer="wordpiece", vocab_size=500, max_length=32, batch_size=32,
                                     limit_train=640, limit_val=128, limit_test=64)
    dm.setup("fit")
    spec = {"name": "bert_student", "num_classes": dm.num_classes, "vocab_size": dm.vocab_size, "num_layers": 1,
            "hidden": 32, "heads": 2, "max_length": 32, "init_from": None}
    task = MLMTask(spec, lr=3e-3, scheduler="constant")
    trainer = L.Trainer(accelerator="cpu", max_steps=20, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    before = trainer.validate(task, datamodule=dm, verbose=False)[0]
    assert task._mask_token_id == dm.tokenizer.mask_token_id and set(task._special_ids) == set(dm.tokenizer.all_special_ids)
    trainer.fit(task, datamodule=dm)
    after = trainer.validate(task, datamodule=dm, verbose=False)[0]
    # same fixed validation masks before and after: the masked-token loss drops (ln 500 = 6.2 at the start)
    assert after["val/mlm_loss"] < before["val/mlm_loss"] - 0.25, (before, after)  # measured: 6.24 -> 5.68
    assert after["val/mlm_acc"] > before["val/mlm_acc"]
    assert all(p.requires_grad for p in task.model.parameters())  # pooler/classifier thawed after fit
    batch = next(iter(dm.val_dataloader()))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    assert task(inputs).shape == (batch["labels"].shape[0], dm.num_classes)  # forward: the classifier's logits

    path = tmp_path / "mlm.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    fresh = create_model(spec.pop("name"), **spec)
    backbone = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    assert set(backbone) == set(fresh.state_dict())
    fresh.load_state_dict(backbone)  # strict: the fine-tuning model takes the pretrained weights as they are
    assert torch.equal(fresh.bert.bert.embeddings.word_embeddings.weight, task.model.bert.bert.embeddings.word_embeddings.weight)
    head_keys = [k for k in state if k.startswith("mlm_head.")]
    assert head_keys and not any(k.startswith("model.") and "predictions" in k for k in state)
    assert set(state) == {"model." + k for k in backbone} | set(head_keys)  # nothing else in the checkpoint

    # the reloaded task is tied again (the tie is a module attribute, not a state-dict entry)
    reloaded = MLMTask.load_from_checkpoint(path, map_location="cpu", weights_only=False)
    assert reloaded.mlm_head.predictions.decoder.weight is bert_encoder(reloaded.model).get_input_embeddings().weight
    test = trainer.test(task, datamodule=dm, verbose=False)[0]
    assert 0.0 < test["test/mlm_acc"] <= 1.0


def test_mlm_masks_are_drawn_again_exactly_when_a_fit_resumes(tmp_path):
    ids, attention = _random_batch(rows=48, length=16)
    loader = DataLoader([{"input_ids": i, "attention_mask": a} for i, a in zip(ids, attention)], batch_size=16)

    def make():
        torch.manual_seed(0)
        net = create_model("bert_student", num_classes=26, vocab_size=VOCAB, num_layers=1, hidden=32, heads=2,
                           max_length=16, dropout=0.0)  # dropout draws from the global stream, which Lightning does not restore
        return MLMTask(net, lr=3e-3, scheduler="constant", mask_token_id=MASK, special_ids=SPECIAL)

    def fit(task, epochs, ckpt_path=None, save=None):
        trainer = L.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(task, train_dataloaders=loader, ckpt_path=ckpt_path)
        if save:
            trainer.save_checkpoint(save)
        return task

    full = fit(make(), 2)
    fit(make(), 1, save=tmp_path / "mid.ckpt")
    resumed = make()
    torch.manual_seed(99)  # the resumed process's global stream differs: the masks must not depend on it
    fit(resumed, 2, ckpt_path=str(tmp_path / "mid.ckpt"))
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
