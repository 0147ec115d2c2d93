"""Always-on training logs: `train_log.jsonl`, a progress bar or plain progress lines, trackers.

Every `train.log_every_steps` updates (and at the last one) the main process appends one JSON line
to `output_dir/train_log.jsonl`:
  {"update", "epoch", "loss", "lr", "images_per_s", "elapsed_s", "skipped_updates"}
and after each validation one line
  {"update", "epoch", "val": {"overall", "many", "medium", "few", "ece"}}
`epoch` is the 0-based index, as in metrics.json's "history"; the console shows epochs from 1
("epoch 60/60").
`loss` is the mean training loss over the updates since the previous line (skipped, non-finite
updates left out; null when every one was skipped). It is summed ON THE DEVICE and read once per
log line, so the loop reads no device value between log steps (each read is a full GPU sync).
`elapsed_s` counts training time across resumes. A resumed run first drops the lines past its
checkpoint, so the file describes the run that produced the weights, without repeats.

On a terminal the loop shows a tqdm bar; when stdout is not a terminal (nohup, SLURM, `> log.txt`)
it prints one plain line per log step instead, with rate and ETA; both show the latest
validation accuracy, and each validation prints a line of its own. `train.log_with` trackers
(Accelerate) receive the same values.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

LOG_FILE = "train_log.jsonl"


def read_train_log(run_dir: Path) -> list[dict]:
    """The records of a run's train_log.jsonl ([] when there is none); unreadable lines are skipped."""
    path = Path(run_dir) / LOG_FILE
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill mid-write
            continue
    return records


def _truncate_after(path: Path, step: int) -> None:
    """Keep the lines up to update `step` (a resume continues from there), atomically."""
    if not path.is_file():
        return
    kept = [r for r in read_train_log(path.parent) if int(r.get("update", 0)) <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, path)


def validation_summary(result: dict) -> dict:
    """The keys of a split's evaluation (ft_focal/evaluation/evaluate.py) that the log and the run history keep:
    accuracies in [0, 1] overall and by shot group, and ECE."""
    return {k: result.get(k) for k in ("overall", "many", "medium", "few", "ece")}


def percent(value: Optional[float]) -> str:
    """An accuracy (a fraction) as people read it in every command's output: `78.33%`, or `n/a`."""
    return "n/a" if value is None else f"{100 * value:.2f}%"


def _duration(seconds: float) -> str:
    seconds = int(max(0.0, seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class TrainLog:
    """The loop's log: `add_loss` every update (no host read), `write` at log steps (one read)."""

    def __init__(self, out: Path, accelerator: Any, total_steps: int, start_step: int, images_per_update: int,
                 seconds_before: float, steps_per_epoch: int = 0) -> None:
        self.main = accelerator.is_main_process
        self.accelerator = accelerator
        self.total, self.images_per_update = total_steps, images_per_update
        self.path = Path(out) / LOG_FILE
        self.seconds_before, self.started = seconds_before, time.time()
        self._loss_sum: Optional[torch.Tensor] = None
        self._loss_count = 0
        self._mark = self._start = (start_step, time.perf_counter())  # (update, clock): previous line, start
        self._bar = None
        self.epochs = -(-total_steps // steps_per_epoch) if steps_per_epoch > 0 else None
        self.last_val: Optional[float] = None  # overall accuracy of the latest validation
        self._postfix_items: dict = {}
        if self.main:
            _truncate_after(self.path, start_step)
            if sys.stdout.isatty():
                from tqdm.auto import tqdm

                self._bar = tqdm(total=total_steps, initial=min(start_step, total_steps), desc="train",
                                 dynamic_ncols=True, disable=None)

    def elapsed(self) -> float:
        """Training seconds of the run so far, across resumes."""
        return self.seconds_before + time.time() - self.started

    def add_loss(self, loss: Optional[torch.Tensor], skipped: Any = False) -> None:
        """Sum one update's mean loss on its device (no host read), leaving out a skipped update's:
        `skipped` is a bool, or a 0-d device flag (the optimizer skipped on the device)."""
        if loss is None or skipped is True:
            return
        loss = loss.detach() if isinstance(loss, torch.Tensor) else torch.tensor(float(loss))
        keep: Any = 1
        if isinstance(skipped, torch.Tensor):
            keep = 1 - skipped.to(loss.device)
            loss = torch.where(keep > 0, loss, torch.zeros_like(loss))   # NaN * 0 would stay NaN
        self._loss_sum = loss.clone() if self._loss_sum is None else self._loss_sum.add_(loss)
        self._loss_count = keep + self._loss_count

    def tick(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def write(self, step: int, epoch: int, lr: float, skipped: int) -> dict:
        """One log line at update `step`: reads the summed loss from the device (the one host read)."""
        total, count = self._loss_sum, self._loss_count
        count = float(count)   # on the device when the optimizer skips there (the first read syncs)
        loss = float(total) / count if count else None
        self._loss_sum, self._loss_count = None, 0
        now = time.perf_counter()
        updates, seconds = step - self._mark[0], now - self._mark[1]
        self._mark = (step, now)
        rate = updates / seconds if seconds > 0 and updates > 0 else None
        record = {"update": step, "epoch": epoch, "loss": loss, "lr": lr,
                  "images_per_s": None if rate is None else round(rate * self.images_per_update, 2),
                  "elapsed_s": round(self.elapsed(), 3), "skipped_updates": skipped}
        tracked = {"train/lr": lr, "train/skipped_steps": skipped}
        if loss is not None:
            tracked["train/loss"] = loss
        if record["images_per_s"] is not None:
            tracked["train/images_per_s"] = record["images_per_s"]
        self.accelerator.log(tracked, step=step)
        if self.main:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record) + "\n")
            done, seconds = step - self._start[0], now - self._start[1]
            self._show(record, done / seconds if done > 0 and seconds > 0 else None)
        return record

    def write_validation(self, step: int, epoch: int, val: dict) -> None:
        """One line after a validation at update `step` (0-based `epoch`): train_log.jsonl and the console."""
        self.last_val = val.get("overall")
        if not self.main:
            return
        record = {"update": step, "epoch": epoch, "val": val}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        groups = " ".join(f"{k} {percent(val.get(k))}" for k in ("many", "medium", "few"))
        line = (f"validation at update {step}/{self.total}, {self._epoch(epoch)}: overall "
                f"{percent(val.get('overall'))} ({groups})")
        if self._bar is not None:
            self._bar.write(line)
            self._bar.set_postfix(self._postfix(), refresh=True)
        else:
            print(line, flush=True)

    def _epoch(self, epoch: int) -> str:
        """A 0-based epoch index as people count: "epoch 1/60" for the first."""
        return f"epoch {epoch + 1}/{self.epochs}" if self.epochs else f"epoch {epoch + 1}"

    def _postfix(self, loss: Optional[str] = None, lr: Optional[float] = None) -> dict:
        if loss is not None:
            self._postfix_items.update(loss=loss, lr=f"{lr:.2e}")
        if self.last_val is not None:
            self._postfix_items["val"] = percent(self.last_val)
        return dict(self._postfix_items)

    def _show(self, record: dict, rate: Optional[float]) -> None:
        """The bar's postfix, or one plain line; ETA from the mean rate of this process so far."""
        loss = "n/a" if record["loss"] is None else f"{record['loss']:.4f}"
        if self._bar is not None:
            self._bar.set_postfix(self._postfix(loss, record["lr"]))
            return
        step = record["update"]
        eta = _duration((self.total - step) / rate) if rate else "?"
        speed = "?" if record["images_per_s"] is None else f"{record['images_per_s']:.1f} img/s"
        val = "" if self.last_val is None else f" val {percent(self.last_val)}"
        print(f"update {step}/{self.total} ({100 * step / max(1, self.total):.0f}%) {self._epoch(record['epoch'])} "
              f"loss {loss}{val} lr {record['lr']:.2e} {speed} elapsed {_duration(record['elapsed_s'])} ETA {eta}",
              flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
