"""Self-supervised pretraining: the cost of a SimCLR step and what a short pretraining buys (survey §3.2.3).

Side by side in one process, on real Fashion-MNIST batches and the same MobileNetV2:

- the two-view SimCLR step (views + encoder on ``2B`` images + projection head + NT-Xent + backward +
  SGD) against the supervised step on the same ``B`` images (forward, cross-entropy, backward, SGD),
  through the interleaved timer;
- a kNN probe (:func:`~lightning_eff.learning.ssl.contrastive.knn_predict`, k=20, on the backbone's
  features; bank = training images, queries = validation images) of the network at initialisation and
  after pretraining with :class:`~lightning_eff.tasks.SimCLRTask` for the given steps: the labels are used
  by the probe only.

Final line: ``RESULT simclr_step_vs_supervised=<r> knn_acc_after_pretrain=<acc> knn_acc_at_init=<acc>
pretrain_steps=<n> noisy=<0|1>``.
"""
from __future__ import annotations

import copy
import time
from typing import Any

import torch
import torch.nn.functional as F

from lightning_eff.bench.common import Timings, bench_parser, set_threads, write_bench
from lightning_eff.learning.ssl.contrastive import embed, knn_predict
from lightning_eff.measure import cpu_capability

__all__ = ["main", "knn_accuracy"]


def knn_accuracy(net: torch.nn.Module, bank: tuple[torch.Tensor, torch.Tensor], query: tuple[torch.Tensor, torch.Tensor],
                 k: int = 20, chunk: int = 512) -> float:
    """kNN accuracy of ``net``'s features (eval mode, no grad): ``bank`` and ``query`` are ``(images, labels)``."""
    net.eval()
    with torch.no_grad():
        feats = [torch.cat([embed(net, x[i : i + chunk]) for i in range(0, len(x), chunk)]) for x, _ in (bank, query)]
    pred = knn_predict(feats[1], feats[0], bank[1], num_classes=int(bank[1].max()) + 1, k=k)
    return float((pred == query[1]).float().mean())


def main(argv: list[str]) -> dict[str, Any]:
    parser = bench_parser("ssl", __doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="SimCLR pretraining steps (default 60 quick, 400 full)")
    args = parser.parse_args(argv)
    threads = set_threads(args.threads)
    from lightning_eff.data import FashionMNISTDataModule
    from lightning_eff.tasks import SimCLRTask

    quick = args.quick
    batch = 128 if quick else 256
    steps = args.steps or (60 if quick else 400)
    spec = {"name": "mobilenetv2_tiny", "small_input_stages": 1} if quick else {"name": "mobilenetv2", "width": 0.5,
                                                                             "small_input_stages": 1}
    spec = {**spec, "num_classes": 10, "in_chans": 1}
    t0 = time.perf_counter()
    dm = FashionMNISTDataModule(batch_size=batch, limit_train=min(55000, batch * steps), limit_val=2000 if quick else 5000,
                                limit_test=16)
    dm.setup("fit")
    bank_n = 5000 if not quick else 2000
    bank = (dm.train_set.transform(dm.train_set.images[:bank_n], augment=False), dm.train_set.labels[:bank_n])
    query = (dm.val_set.transform(dm.val_set.images, augment=False), dm.val_set.labels)

    torch.manual_seed(0)
    task = SimCLRTask(spec, lr=0.3 if quick else 0.5, scheduler="constant")
    task.log = lambda *a, **k: None  # stepped by hand: no Trainer to log to
    knn_init = knn_accuracy(copy.deepcopy(task.model), bank, query)

    # --- step cost, side by side on one real batch
    x, y = next(iter(dm.train_dataloader()))
    ssl_task = copy.deepcopy(task).train()
    sup_net = copy.deepcopy(task.model).train()
    ssl_opt = torch.optim.SGD(ssl_task.parameters(), lr=1e-3, momentum=0.9)
    sup_opt = torch.optim.SGD(sup_net.parameters(), lr=1e-3, momentum=0.9)

    def simclr_step() -> float:
        loss = ssl_task._loss(x)
        ssl_opt.zero_grad(set_to_none=True)
        loss.backward()
        ssl_opt.step()
        return float(loss.detach())

    def supervised_step() -> float:
        loss = F.cross_entropy(sup_net(x), y)
        sup_opt.zero_grad(set_to_none=True)
        loss.backward()
        sup_opt.step()
        return float(loss.detach())

    timer = Timings()
    timer.time("step", {"simclr": simclr_step, "supervised": supervised_step}, rounds=3 if quick else 5, repeats=2,
               warmup=1, threads=threads)
    ratio = timer.ratio("simclr_step_vs_supervised", "step", "simclr", "supervised")

    # --- pretraining, then the probe again
    task.train()
    opt = torch.optim.SGD([p for p in task.parameters() if p.requires_grad], lr=task.hparams.lr, momentum=0.9,
                          weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=task.hparams.lr, total_steps=steps, pct_start=0.1)
    losses, done, started = [], 0, time.perf_counter()
    while done < steps:
        for xb, _ in dm.train_dataloader():
            loss = task._loss(xb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            done += 1
            if done >= steps:
                break
    pretrain_s = time.perf_counter() - started
    knn_after = knn_accuracy(task.model, bank, query)
    payload = {"quick": quick, "cpu_capability": cpu_capability(), "model": spec, "batch": batch, "steps": steps,
               "loss_first": losses[0], "loss_last": sum(losses[-5:]) / min(5, len(losses)), "pretrain_s": pretrain_s,
               "knn": {"k": 20, "bank": bank_n, "queries": len(query[1]), "at_init": knn_init, "after_pretrain": knn_after},
               "wall_s": time.perf_counter() - t0}
    result = {"simclr_step_vs_supervised": ratio, "knn_acc_after_pretrain": knn_after, "knn_acc_at_init": knn_init,
              "pretrain_steps": steps}
    write_bench("ssl", payload, result, args.out, timings=timer)
    return result
