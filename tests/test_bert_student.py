"""BERT students from teacher layers, attention-matrix distillation, and the CLI's teacher stage."""
from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import TINY_OVERRIDES, needs_fmnist, needs_wordnet

from lightning_eff import ClassificationTask, ConfigError, Distillation
from lightning_eff.cli import compose, run
from lightning_eff.models import create_model
from lightning_eff.models.bert_student import student_from_teacher, student_layer_map


def _teacher(layers=4, **kw):
    torch.manual_seed(0)
    return create_model("bert_teacher", num_classes=5, vocab_size=60, size="tiny", num_layers=layers, max_length=16, **kw)


def test_layer_map_is_distilbert_choice():
    assert student_layer_map(12, 6) == [0, 2, 4, 7, 9, 11]  # HF DistilBERT's initialisation layers
    assert student_layer_map(6, 2) == [0, 5]
    assert student_layer_map(6, 1) == [5]
    with pytest.raises(ConfigError, match="num_layers"):
        student_layer_map(4, 5)


def test_student_copies_teacher_layers_and_shares_shapes():
    teacher = _teacher(4)
    student = student_from_teacher(teacher, 2)
    assert student.config.num_hidden_layers == 2 and student.config.vocab_size == teacher.config.vocab_size
    src, dst = teacher.bert.bert, student.bert.bert
    for k, i in enumerate([0, 3]):
        for (n, a), (_, b) in zip(src.encoder.layer[i].state_dict().items(), dst.encoder.layer[k].state_dict().items()):
            assert torch.equal(a, b), n
    assert torch.equal(src.embeddings.word_embeddings.weight, dst.embeddings.word_embeddings.weight)
    assert torch.equal(teacher.bert.classifier.weight, student.bert.classifier.weight)
    # a copy, not shared storage: training the student never changes the teacher
    assert dst.embeddings.word_embeddings.weight.data_ptr() != src.embeddings.word_embeddings.weight.data_ptr()
    # a 1-layer "student" from a 1-layer teacher is the teacher itself, numerically
    one = _teacher(1).eval()
    ids, mask = torch.randint(0, 60, (3, 9)), torch.ones(3, 9, dtype=torch.long)
    assert torch.allclose(student_from_teacher(one, 1).eval()(ids, mask), one(ids, mask), atol=1e-6)
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in teacher.parameters())


def test_other_width_starts_random_and_bad_layers_refused():
    teacher = _teacher(4)
    narrow = student_from_teacher(teacher, 2, hidden=64, heads=2)
    assert narrow.config.hidden_size == 64
    with pytest.raises(ConfigError, match="layers"):
        student_from_teacher(teacher, 2, layers=[0, 9])


def test_attention_kl_between_bert_teacher_and_student(tmp_path):
    """Transformer attention-matrix KL on eager attention; the student's first layer mimics teacher layer 3."""
    teacher = _teacher(4, attn_implementation="eager").eval()
    student = student_from_teacher(teacher, 2)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 60, (32, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[::2, 7:] = 0
    labels = torch.randint(0, 5, (32,), generator=g)

    class Data(L.LightningDataModule):
        def train_dataloader(self):
            rows = [{"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i]} for i in range(32)]
            return torch.utils.data.DataLoader(rows, batch_size=8)

        def sample_inputs(self, n=1):
            return {"input_ids": ids[:n], "attention_mask": mask[:n]}

    task = ClassificationTask(student, num_classes=5, optimizer="adamw", lr=1e-3, scheduler="constant")
    layer = "bert.bert.encoder.layer.{}.attention.self"
    cb = Distillation(teacher=teacher, layers={layer.format(0): {"teacher": layer.format(3), "loss": "attention_kl"}},
                      kd_weight=0.5, task_weight=0.5)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(tmp_path), limit_val_batches=0, callbacks=[cb])
    trainer.fit(task, datamodule=Data())
    assert trainer.callback_metrics[f"distill/attention_kl/{layer.format(0)}"] > 0
    sdpa_teacher = _teacher(4)
    with pytest.raises(ConfigError, match="eager attention"):
        _fit_attention(tmp_path, sdpa_teacher, Data(), layer)


def _fit_attention(tmp_path, teacher, dm, layer):
    task = ClassificationTask(student_from_teacher(teacher, 2), num_classes=5, scheduler="constant")
    cb = Distillation(teacher=teacher, layers={layer.format(0): {"teacher": layer.format(3), "loss": "attention_kl"}})
    L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, default_root_dir=str(tmp_path), limit_val_batches=0, callbacks=[cb]).fit(task, datamodule=dm)


@needs_wordnet
def test_bert_student_recipe_trains_teacher_then_distils_from_cache(tmp_path):
    overrides = [*TINY_OVERRIDES, f"run_dir={tmp_path}", "++stages.teacher.trainer.max_epochs=1", "++stages.teacher.trainer.limit_train_batches=3",
                 "++stages.teacher.model.num_layers=3", "model.num_layers=1", "++stages.teacher.model.hidden=64", "++stages.teacher.model.heads=2",
                 "++data.vocab_size=500"]
    out = run(compose("bert_student", overrides))
    assert (tmp_path / "teacher" / "teacher.ckpt").is_file()
    assert (tmp_path / "teacher" / "train_logits.pt").is_file()  # the cache, relative to the run folder
    assert 0.0 <= out["metrics"]["teacher/test_acc"] <= 1.0
    rows = out["report"]
    assert {"fp32", "teacher"} <= set(rows)
    assert rows["fp32"]["params"] < rows["teacher"]["params"]
    # a second run reuses the trained teacher checkpoint (no teacher training) and the same student init
    again = run(compose("bert_student", [*overrides, f"run_dir={tmp_path / 'second'}",
                                         f"++stages.teacher.checkpoint={tmp_path / 'teacher' / 'teacher.ckpt'}"]))
    assert again["metrics"]["teacher/test_acc"] == pytest.approx(out["metrics"]["teacher/test_acc"])
    assert not (tmp_path / "second" / "teacher" / "teacher.ckpt").exists()


@needs_fmnist
def test_mobilenet_kd_recipe_and_bad_teacher_config(tmp_path):
    overrides = [*TINY_OVERRIDES, f"run_dir={tmp_path}", "++stages.teacher.trainer.max_epochs=1", "++stages.teacher.trainer.limit_train_batches=2"]
    out = run(compose("mobilenet_kd", overrides))
    assert "teacher" in out["report"] and "teacher/test_acc" in out["metrics"]
    with pytest.raises(ConfigError, match="unknown key stages.teacher.epochs"):
        run(compose("mobilenet_kd", [*overrides, "++stages.teacher.epochs=3"]))
    with pytest.raises(ConfigError, match="stages.teacher.model.name='mobilnetv2'.*Did you mean 'mobilenetv2'"):
        run(compose("mobilenet_kd", [*overrides, "stages.teacher.model.name=mobilnetv2"]))


def test_hugging_face_folder_as_teacher_pretrained_start_and_student_init(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    from lightning_eff.learning.distillation import load_teacher

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=128,
                     max_position_embeddings=16, num_labels=5)
    hf = BertForSequenceClassification(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    ids, mask = torch.randint(0, 60, (2, 8)), torch.ones(2, 8, dtype=torch.long)
    with torch.no_grad():
        reference = hf(input_ids=ids, attention_mask=mask).logits
        loaded = load_teacher(str(tmp_path / "hf")).eval()
        assert torch.allclose(loaded(input_ids=ids, attention_mask=mask).logits, reference, atol=1e-6)
    tuned = create_model("bert_teacher", num_classes=3, vocab_size=60, pretrained=str(tmp_path / "hf"))
    assert torch.equal(tuned.bert.bert.encoder.layer[2].output.dense.weight, hf.bert.encoder.layer[2].output.dense.weight)
    assert tuned.bert.classifier.out_features == 3  # a fresh head for this task
    with pytest.raises(ConfigError, match="vocabulary of 60 .* tokenizer has 61"):
        create_model("bert_teacher", num_classes=3, vocab_size=61, pretrained=str(tmp_path / "hf"))
    with pytest.raises(ConfigError, match="no config.json"):
        create_model("bert_teacher", num_classes=3, vocab_size=60, pretrained=str(tmp_path))
    student = create_model("bert_student", num_classes=5, vocab_size=60, num_layers=2, init_from=str(tmp_path / "hf"))
    assert torch.equal(student.bert.bert.encoder.layer[1].output.dense.weight, hf.bert.encoder.layer[3].output.dense.weight)


def test_temperature_schedule_followed_through_the_callback(tmp_path):
    from test_distillation_callback import Data, UserModule, _teacher, _trainer

    cb = Distillation(teacher=_teacher(), module_attr="net", temperature={"start": 4.0, "end": 1.0, "end_fraction": 1.0})
    trainer = _trainer(tmp_path, [cb], max_epochs=1, limit_train_batches=3)
    trainer.fit(UserModule(), datamodule=Data())
    assert float(trainer.callback_metrics["distill/temperature_step"]) == pytest.approx(2.0)  # step 2 of 3


@needs_wordnet
@pytest.mark.slow
def test_pqrnn_kd_recipe_learns_from_a_wordpiece_teachers_cache(tmp_path):
    """Cross-tokenization offline distillation: a BERT teacher reads WordPiece ids, pQRNN raw strings;
    the cache written from the teacher's datamodule is consumed by the raw-text student by index."""
    from lightning_eff.batch import call_with_inputs, model_inputs
    from lightning_eff.data import WordNetSupersenseDataModule
    from lightning_eff.learning.distillation.offline import (
        TeacherLogitCache,
        cache_teacher_logits,
        default_output_fn,
    )

    limits = dict(limit_train=384, limit_val=128)
    teacher_dm = WordNetSupersenseDataModule(tokenizer="wordpiece", vocab_size=500, max_length=32, batch_size=64, **limits)
    teacher_dm.setup("fit")
    torch.manual_seed(0)
    teacher = create_model("bert_teacher", size="tiny", vocab_size=teacher_dm.vocab_size, num_classes=teacher_dm.num_classes,
                           max_length=32).eval()
    path = tmp_path / "teacher_logits.pt"
    cache = cache_teacher_logits(teacher, teacher_dm, path)
    assert cache.logits.shape == (384, teacher_dm.num_classes) and not teacher_dm.return_index
    # the logits are the teacher's on its own inputs, stored by index
    batch = teacher_dm.train_dataloader().collate_fn([5, 17])  # the dataset yields indices; collate tokenizes
    with torch.no_grad():
        ref = default_output_fn(call_with_inputs(teacher, model_inputs(batch)))
    torch.testing.assert_close(cache.logits[[5, 17]], ref, atol=1e-4, rtol=1e-4)

    # the int8 and export callbacks stay on: they read training batches, which carry indices while the cache is used
    result = run(compose("pqrnn_kd", [f"run_dir={tmp_path / 'run'}", f"callbacks.distill.cache={path}", "model=pqrnn",
                                      "++model.hidden=16", "++model.bottleneck=16", "callbacks.ptq.calibration_batches=2",
                                      *TINY_OVERRIDES]))
    assert 0.0 <= result["metrics"]["test/acc"] <= 1.0
    assert {"fp32", "ptq_int8_x86", "ptq_dynamic_int8_x86"} <= set(result["report"])
    assert not [a for a in result["artifacts"] if "error" in a], result["artifacts"]
    header = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "distill/kd_loss_epoch" in header, header  # the KD term was computed from the cache
    # a cache of another split is refused by count
    other = WordNetSupersenseDataModule(tokenizer="wordpiece", vocab_size=500, max_length=32, limit_train=256, limit_val=128)
    other.setup("fit")
    cache_teacher_logits(teacher, other, tmp_path / "other.pt")
    with pytest.raises(ConfigError, match="holds 256 examples but the training set has 384"):
        run(compose("pqrnn_kd", [f"run_dir={tmp_path / 'bad'}", f"callbacks.distill.cache={tmp_path / 'other.pt'}",
                                 "model=pqrnn", "++model.hidden=16", "++model.bottleneck=16", "callbacks.ptq=null",
                                 "callbacks.ptq_dynamic=null", *TINY_OVERRIDES]))
    assert TeacherLogitCache(path).load(num_examples=384).shape[0] == 384
