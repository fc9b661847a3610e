"""Time to 97% test accuracy on digits: `make demo`'s config vs a report-style script, side by side.

    python benchmarks/digits_time_to_acc.py                  # 3 alternating runs of each side
    python benchmarks/digits_time_to_acc.py --quick          # 1 run of each, no warm-up
    python benchmarks/digits_time_to_acc.py --repeats 5 --json out.json
    python benchmarks/digits_time_to_acc.py --quick --loop-workers 0 --seed 1   # analysis variants

Engine side: `toolkit.engine.fit` on configs/digits_lenet.yaml as `make demo` runs it (one process,
CPU), with log.test_every_epoch=true so that every epoch's test accuracy is known, and
log.plots=false, log.progress=none, log.tensorboard=false, run.dir in a temporary directory. The
clock starts just before fit() is called, so building the Accelerator, loading and splitting the
data, building the model and writing checkpoints all count; it stops at the `on_epoch_end` of the
first epoch whose test accuracy is >= 97%.

Report-style side: the script the reports wrote, after the PyTorch CIFAR-10 tutorial: a torch
Dataset of PIL images with per-sample torchvision transforms (RandomCrop(32, padding=4) for the
demo's `augment: crop`, ToTensor, Normalize), DataLoader(shuffle=True, batch_size=32,
num_workers=2), `loss.item()` every step with a running loss printed every 100 steps, and a plain
evaluation loop over the test set after every epoch. Same images and split (taken from the
toolkit's digits dataset), same mean/std, same LeNet (from toolkit.models), same seed, same SGD
(lr, momentum, weight decay) and the same lr x0.1 at epoch 15. Its clock starts at the top of
the script's body (dataset and DataLoader creation count) and stops after the first evaluation
>= 97%.

Both sides run all 20 epochs (final accuracy = after epoch 20), in this process, after its
imports (Python/torch import time counts for neither). Runs alternate (loop, engine, loop, ...)
so that drift in the machine's speed hits both; medians; ratio = loop / engine time to 97%.
Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from toolkit.config import load_config
from toolkit.data import DATASETS
from toolkit.engine import fit
from toolkit.models import MODELS

CONFIG = "configs/digits_lenet.yaml"
TARGET = 0.97


# ------------------------------------------------------------------------------------------
# engine side: `make demo`'s config through toolkit.engine.fit


def engine_run(run_dir: Path, seed: int, epochs: int | None = None) -> dict:
    overrides = ["log.test_every_epoch=true", "log.plots=false", "log.progress=none",
                 "log.tensorboard=false", f"run.dir={run_dir}", f"run.seed={seed}"]
    if epochs is not None:
        overrides += [f"train.epochs={epochs}", "sched.milestones=[]"]  # (warm-up only)
    cfg = load_config(CONFIG, overrides)
    ends, accs = [], []

    def on_epoch_end(row: dict) -> None:
        ends.append(time.perf_counter())
        accs.append(row["test_acc"])

    t0 = time.perf_counter()
    summary = fit(cfg, on_epoch_end=on_epoch_end)
    total = time.perf_counter() - t0
    out = _result([e - t0 for e in ends], accs, total, summary["test_acc"])
    epoch_s = [b - a for a, b in zip(ends, ends[1:])]  # epochs 2..N, end to end
    out["setup_s"] = ends[0] - t0 - (statistics.median(epoch_s) if epoch_s else 0.0)  # ~start-up
    out["epoch_s"] = statistics.median(epoch_s) if epoch_s else ends[0] - t0
    out["train_s_per_epoch"] = summary["train_time_s"] / len(ends)  # the engine's own step time
    out["threads"] = torch.get_num_threads()
    return out


# ------------------------------------------------------------------------------------------
# report-style side: the CIFAR-10 tutorial's script, on the same digits


class DigitsPIL(Dataset):
    """The digits split as PIL images, one per sample, with a per-sample transform."""

    def __init__(self, images: list, labels: list, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(self.images[i]), self.labels[i]


def to_pil(split, mean: torch.Tensor, std: torch.Tensor) -> tuple[list, list]:
    """The toolkit's normalised float split -> uint8 RGB PIL images (exact inverse) and int labels."""
    x = split.images * std.view(1, -1, 1, 1) + mean.view(1, -1, 1, 1)  # (N, 3, 32, 32) in 0..1
    u8 = (x * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()  # (N, 32, 32, 3)
    return [Image.fromarray(a) for a in u8], split.labels.tolist()


def loop_run(seed: int, lr: float, momentum: float, weight_decay: float, milestones: list,
             gamma: float, epochs: int, batch_size: int, workers: int, verbose: bool) -> dict:
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    splits = DATASETS.build("digits", split_seed=0)
    mean, std = torch.tensor(splits.meta["mean"]), torch.tensor(splits.meta["std"])
    train_images, train_labels = to_pil(splits.train, mean, std)
    test_images, test_labels = to_pil(splits.test, mean, std)
    normalize = transforms.Normalize(mean.tolist(), std.tolist())
    transform_train = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.ToTensor(), normalize])
    transform_test = transforms.Compose([transforms.ToTensor(), normalize])
    trainset = DigitsPIL(train_images, train_labels, transform_train)
    testset = DigitsPIL(test_images, test_labels, transform_test)
    trainloader = DataLoader(trainset, batch_size=batch_size, shuffle=True, num_workers=workers)
    testloader = DataLoader(testset, batch_size=batch_size, shuffle=False, num_workers=workers)

    net = MODELS.build("lenet", num_classes=10)
    criterion = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=gamma)
    t_setup = time.perf_counter() - t0

    ends, accs = [], []
    data_s, compute_s, eval_s = [], [], []  # per epoch: waiting for batches, fwd/bwd/step, test loop
    step, running_loss = 0, 0.0
    for epoch in range(epochs):
        net.train()
        t_data = t_compute = 0.0
        t = time.perf_counter()
        for inputs, labels in trainloader:
            t1 = time.perf_counter()
            t_data += t1 - t
            optimizer.zero_grad()
            outputs = net(inputs)
            loss = criterion(outputs, labels)
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
            step += 1
            if step % 100 == 0:
                if verbose:
                    print(f"    [{epoch + 1}, {step:5d}] loss: {running_loss / 100:.3f}")
                running_loss = 0.0
            t = time.perf_counter()
            t_compute += t - t1
        scheduler.step()
        t_eval = time.perf_counter()
        net.eval()
        correct = total = 0
        with torch.no_grad():
            for images, labels in testloader:
                outputs = net(images)
                _, predicted = torch.max(outputs, 1)
                total += labels.size(0)
                correct += (predicted == labels).sum().item()
        now = time.perf_counter()
        data_s.append(t_data)
        compute_s.append(t_compute)
        eval_s.append(now - t_eval)
        ends.append(now - t0)
        accs.append(correct / total)
        if verbose:
            print(f"    epoch {epoch + 1}: test acc {correct / total:.2%}")
    out = _result(ends, accs, time.perf_counter() - t0, accs[-1])
    epoch_s = [b - a for a, b in zip(ends, ends[1:])]
    out.update(setup_s=t_setup, epoch_s=statistics.median(epoch_s) if epoch_s else ends[0] - t_setup,
               data_s_per_epoch=statistics.median(data_s), compute_s_per_epoch=statistics.median(compute_s),
               eval_s_per_epoch=statistics.median(eval_s), threads=torch.get_num_threads())
    return out


def _result(ends: list, accs: list, total: float, final_acc: float) -> dict:
    hit = next((i for i, a in enumerate(accs) if a >= TARGET), None)
    return {"time_to_target_s": ends[hit] if hit is not None else None,
            "epoch_reached": hit + 1 if hit is not None else None,
            "final_test_acc": final_acc, "total_s": total, "test_acc_per_epoch": accs}


# ------------------------------------------------------------------------------------------


def _median(runs: list, key: str):
    vals = [r[key] for r in runs if r[key] is not None]
    return statistics.median(vals) if vals else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="1 run of each side, no warm-up")
    p.add_argument("--loop-workers", type=int, default=2,
                   help="the loop's DataLoader workers (2, as in the tutorial; 0 for the analysis)")
    p.add_argument("--seed", type=int, help="both sides' seed (default: the config's run.seed, 0)")
    p.add_argument("--verbose", action="store_true", help="print the loop's running loss and per-epoch accuracy")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    repeats = 1 if args.quick else args.repeats

    cfg = load_config(CONFIG)
    o, s = cfg.optim, cfg.sched
    seed = cfg.run.seed if args.seed is None else args.seed
    loop_kw = dict(seed=seed, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                   milestones=list(s.milestones), gamma=s.gamma, epochs=cfg.train.epochs,
                   batch_size=cfg.data.batch_size, workers=args.loop_workers, verbose=args.verbose)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {CONFIG}: {cfg.model.name}, batch "
          f"{cfg.data.batch_size}, {cfg.train.epochs} epochs, seed {seed}, augment {cfg.data.augment}, "
          f"data.num_workers {cfg.data.num_workers}, data.loader {getattr(cfg.data, 'loader', '-')}; "
          f"target test acc {TARGET:.0%}, {repeats} run(s) of each side; loop: {args.loop_workers} DataLoader workers")
    runs = {"loop": [], "engine": []}
    with tempfile.TemporaryDirectory() as tmp:
        if not args.quick:  # warm-up: lazy imports, allocator, first fork
            engine_run(Path(tmp) / "warmup", seed, epochs=1)
            loop_run(**{**loop_kw, "epochs": 1, "verbose": False})
        for r in range(repeats):
            for side in ("loop", "engine"):
                res = (loop_run(**loop_kw) if side == "loop" else engine_run(Path(tmp) / f"engine{r}", seed))
                runs[side].append(res)
                t97 = res["time_to_target_s"]
                print(f"  run {r + 1} {side:6s}  97% at epoch {res['epoch_reached']} after "
                      + (f"{t97:6.2f} s" if t97 is not None else "   never")
                      + f"   20 epochs {res['total_s']:6.2f} s   final test acc {res['final_test_acc']:.2%}"
                      f"   set-up {res['setup_s']:.2f} s, {res['epoch_s']:.3f} s/epoch, "
                      f"threads {res['threads']}")

    med = {side: {k: _median(v, k) for k in ("time_to_target_s", "epoch_reached", "final_test_acc", "total_s",
                                               "setup_s", "epoch_s")} for side, v in runs.items()}
    print()
    print(f"{'':8s} {'time to 97%':>12s} {'epoch':>6s} {'final acc':>10s} {'20 epochs':>10s} "
          f"{'set-up':>7s} {'s/epoch':>8s}   (medians of {repeats})")
    for side in ("loop", "engine"):
        m = med[side]
        t97 = f"{m['time_to_target_s']:.2f} s" if m["time_to_target_s"] is not None else "never"
        print(f"{side:8s} {t97:>12s} {m['epoch_reached'] or '-'!s:>6s} {m['final_test_acc']:>10.2%} "
              f"{m['total_s']:>8.2f} s {m['setup_s']:>5.2f} s {m['epoch_s']:>8.3f}")
    ratio = None
    if med["loop"]["time_to_target_s"] and med["engine"]["time_to_target_s"]:
        ratio = med["loop"]["time_to_target_s"] / med["engine"]["time_to_target_s"]
        print(f"loop / engine time to 97%: {ratio:.2f}x   "
              f"(20 epochs: {med['loop']['total_s'] / med['engine']['total_s']:.2f}x; spread loop "
              f"{min(r['time_to_target_s'] or 0 for r in runs['loop']):.2f}-"
              f"{max(r['time_to_target_s'] or 0 for r in runs['loop']):.2f} s, engine "
              f"{min(r['time_to_target_s'] or 0 for r in runs['engine']):.2f}-"
              f"{max(r['time_to_target_s'] or 0 for r in runs['engine']):.2f} s)")
    lp = {k: statistics.median(r[k] for r in runs["loop"])
          for k in ("data_s_per_epoch", "compute_s_per_epoch", "eval_s_per_epoch")}
    eng_train = statistics.median(r["train_s_per_epoch"] for r in runs["engine"])
    print(f"where an epoch goes (medians): loop: waiting for batches {lp['data_s_per_epoch']:.3f} s, "
          f"fwd/bwd/step/.item() {lp['compute_s_per_epoch']:.3f} s, test loop {lp['eval_s_per_epoch']:.3f} s;  "
          f"engine: training steps {eng_train:.3f} s, val+test+checkpoint "
          f"{med['engine']['epoch_s'] - eng_train:.3f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "medians": med, "ratio": ratio,
                                               "loop_breakdown": lp, "engine_train_s_per_epoch": eng_train},
                                              indent=1))


if __name__ == "__main__":
    main()
