"""Step cost on a GPU (``--device cuda``) and the CPU proxies that predict it (``--proxies``).

    python benchmarks/step_cost.py --device cuda --preset vit-b16        # this file, on a GPU
    python benchmarks/step_cost_gpu.py --proxies                         # CPU: ops, reads, breaks

GPU preset ``vit-b16``: open_clip ViT-B/16 at 224 px, random init (the FLOPs of the OpenAI weights),
the toolkit's cosine head over 1000 classes with ImageNet-LT-like counts, batch 128, bf16 autocast,
SGD (fused, as the recipes on CUDA; ``--foreach`` for torch's default). Workloads: AdaptFormer
(bottleneck 64) and LoRA r=8 (the recipes' targets). Optimizers: ERM, SAM, Focal-SAM official (2F +
3B), Focal-SAM one-backward (2F + 2B) and a bare-torch SAM step (two forward / backward passes, a
foreach norm and perturbation, ``SGD.step``; no wrapper, no non-finite check). All drive ONE model
on one batch; each round runs every optimizer once in a fresh random order, the ratio to SAM is
paired within the round, and the table gives medians over the rounds. ``--compile`` adds the same
rows with the model compiled once (inductor) for all of them. Peak:
``torch.cuda.max_memory_allocated`` during one step above the memory before it.

CPU proxies (tiny open_clip models, bf16 autocast, one steady-state step): aten ops dispatched,
device-to-host reads (``aten._local_scalar_dense``), matmul count, graph breaks of the armed forward
(``torch._dynamo.explain``) and peak bytes, each beside SAM's.
"""
from __future__ import annotations

import argparse
import collections
import os
import random
import statistics
import sys
import time
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402 (after the environment it reads is set)
import torch._functorch.config  # noqa: E402,F401 (donated_buffer)
import torch.nn.functional as F  # noqa: E402 (after the environment it reads is set)
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402 (after the environment it reads is set)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from step_cost import peak_step_memory  # noqa: E402 (after the sys.path entry it needs)

from ft_focal.config import ModelConfig, TuningConfig  # noqa: E402 (after the sys.path entry it needs)
from ft_focal.models import build_classifier, tiny_model_config  # noqa: E402 (after the sys.path entry it needs)
from ft_focal.optim import ERM, SAM, FocalSAM  # noqa: E402 (after the sys.path entry it needs)

FOCAL = dict(rho=0.05, gamma=0.5, lam=0.8)
SGD = dict(lr=0.01, momentum=0.9, weight_decay=5e-4)
WORKLOADS = {"adaptformer": dict(method="adaptformer", adapter_bottleneck=64),
             "lora": dict(method="lora", lora_rank=8)}


def imagenet_lt_counts(n=1000):
    """A Pareto-like profile from 1280 down to 5 images per class (ImageNet-LT's range)."""
    return [max(5, int(1280 * (k + 1) ** -1.1)) for k in range(n)]


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))

    def summary(self):
        mm = sum(v for k, v in self.ops.items() if k in ("aten.mm", "aten.addmm", "aten.bmm"))
        return {"ops": sum(self.ops.values()), "reads": self.ops["aten._local_scalar_dense"], "matmuls": mm}


def make_optimizers(model, counts, fused=False):
    """fused: the base SGD's fused kernel (the recipes' default on CUDA), which skips a non-finite
    update on the device: a steady-state step then reads nothing on the host."""
    params = [p for p in model.parameters() if p.requires_grad]
    sgd = dict(SGD, fused=True) if fused else SGD
    return {
        "ERM": ERM(params, torch.optim.SGD, **sgd),
        "SAM": SAM(params, torch.optim.SGD, rho=0.05, **sgd),
        "Focal-SAM official": FocalSAM(params, torch.optim.SGD, class_counts=counts, **FOCAL, **sgd),
        "Focal-SAM 1-bwd": FocalSAM(params, torch.optim.SGD, class_counts=counts, model=model,
                                    one_backward=True, **FOCAL, **sgd),
    }


class BareSAM:
    """The plainest SAM step in torch: what the toolkit's SAM is compared against."""

    def __init__(self, params, rho=0.05, fused=False):
        self.params, self.rho = params, rho
        self.sgd = torch.optim.SGD(params, **SGD, fused=fused)

    def step(self, closure, targets=None):
        closure().mean().backward()
        grads = [p.grad for p in self.params]
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        eps = torch._foreach_mul(grads, self.rho / (norm + 1e-12))
        with torch.no_grad():
            torch._foreach_add_(self.params, eps)
        for p in self.params:
            p.grad = None
        loss = closure().mean()
        loss.backward()
        with torch.no_grad():
            torch._foreach_sub_(self.params, eps)
        self.sgd.step()
        self.sgd.zero_grad(set_to_none=True)
        return loss.detach()


def bf16_closure(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                 device_type: str) -> Callable[[], torch.Tensor]:
    """Per-sample losses of one fixed batch, forward under bf16 autocast."""

    def closure() -> torch.Tensor:
        with torch.autocast(device_type, dtype=torch.bfloat16):
            logits = forward(x)
        return F.cross_entropy(logits.float(), y, reduction="none")

    return closure


def time_steps(opts: dict, closure: Callable[[], torch.Tensor], y: torch.Tensor, rounds: int, dev: torch.device,
               sync: Callable[[], None]) -> tuple[float, dict, dict]:
    """-> (warm-up seconds, step seconds per optimizer, peak bytes per optimizer); rounds in shuffled order."""
    t0 = time.time()
    for opt in opts.values():   # warm-up (and compile)
        for _ in range(3):
            opt.step(closure, targets=y)
    sync()
    warm = time.time() - t0
    times, peaks = collections.defaultdict(list), collections.defaultdict(list)
    for _ in range(rounds):
        order = list(opts)
        random.shuffle(order)
        for name in order:
            sync()
            base = torch.cuda.memory_allocated() if dev.type == "cuda" else 0
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            opts[name].step(closure, targets=y)
            sync()
            times[name].append(time.perf_counter() - t)
            peaks[name].append(torch.cuda.max_memory_allocated() - base if dev.type == "cuda" else 1)
    return warm, times, peaks


def mode_rows(wl: str, mode: str, opts: dict, warm: float, times: dict, peaks: dict) -> list[dict]:
    rows = []
    sam = times["SAM"]
    for name in opts:
        ratio = statistics.median(a / b for a, b in zip(times[name], sam, strict=True))
        passes = getattr(opts[name], "last_pass_counts", {"forward": 2, "backward": 2})
        row = dict(workload=wl, mode=mode, optimizer=name, ms=1e3 * statistics.median(times[name]),
                   ratio=ratio, peak_gib=max(peaks[name]) / 2 ** 30,
                   peak_ratio=max(peaks[name]) / max(peaks["SAM"]), warmup_s=warm,
                   passes=f"{passes['forward']}F+{passes['backward']}B")
        rows.append(row)
        print_row(row)
    return rows


def run_gpu(args: argparse.Namespace) -> list[dict]:
    dev = torch.device("cpu" if args.smoke else "cuda")
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    counts = imagenet_lt_counts(1000)
    torch._functorch.config.donated_buffer = False   # the official step back-propagates one graph twice
    results = []
    for wl in args.workloads.split(","):
        torch.manual_seed(0)
        mcfg = dict(tiny_model_config("open_clip"), head_init="random") if args.smoke else \
            dict(family="open_clip", name="ViT-B-16", head_init="random")
        model = build_classifier(ModelConfig(**mcfg), TuningConfig(**WORKLOADS[wl]), 1000,
                                 [f"c{i}" for i in range(1000)]).to(dev)
        size = 32 if args.smoke else 224
        opts = make_optimizers(model, counts, fused=not args.foreach)
        opts["bare SAM"] = BareSAM([p for p in model.parameters() if p.requires_grad], fused=not args.foreach)
        x = torch.randn(args.batch, 3, size, size, device=dev)
        y = torch.randint(0, 1000, (args.batch,), device=dev)
        modes = ["eager"] + (["compiled"] if args.compile else [])
        for mode in modes:
            if mode == "compiled":
                torch._dynamo.reset()
                forward = torch.compile(model)
            else:
                forward = model
            closure = bf16_closure(forward, x, y, dev.type)
            warm, times, peaks = time_steps(opts, closure, y, args.rounds, dev, sync)
            results += mode_rows(wl, mode, opts, warm, times, peaks)
            if mode == "compiled":
                torch._dynamo.reset()
        del model, opts
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return results


def print_row(r):
    print(f"| {r['workload']} | {r['mode']} | {r['optimizer']} | {r['passes']} | {r['ms']:.1f} ms | "
          f"{r['ratio']:.3f} | {r['peak_gib']:.2f} GiB ({r['peak_ratio']:.2f}x) | warm-up {r['warmup_s']:.0f} s |",
          flush=True)


def proxies(family="open_clip"):
    """One steady-state step of SAM and of Focal-SAM one-backward on tiny models (CPU, bf16)."""
    rows = []
    for method in ("lora", "adaptformer"):
        for name in ("SAM", "Focal-SAM 1-bwd"):
            torch.manual_seed(0)
            model = build_classifier(ModelConfig(**tiny_model_config(family)),
                                     TuningConfig(method=method, lora_rank=4), 6, [f"c{i}" for i in range(6)])
            opt = make_optimizers(model, [100, 50, 20, 10, 5, 2])[name]
            x, y = torch.randn(8, 3, 32, 32), torch.tensor([0, 1, 2, 3, 4, 5, 0, 5])

            def closure(model=model, x=x, y=y):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    logits = model(x)
                return F.cross_entropy(logits.float(), y, reduction="none")
            for _ in range(3):
                opt.step(closure, targets=y)
            with OpCounter() as counter:
                opt.step(closure, targets=y)
            peak = peak_step_memory(lambda opt=opt, closure=closure, y=y: opt.step(closure, targets=y))
            row = dict(method=method, optimizer=name, **counter.summary(), peak=peak,
                       breaks=graph_breaks(model, opt, x))
            rows.append(row)
    for r in rows:
        sam = next(s for s in rows if s["method"] == r["method"] and s["optimizer"] == "SAM")
        print(f"| {r['method']} | {r['optimizer']} | {r['ops']} ({r['ops'] / sam['ops']:.3f}x) | {r['reads']} | "
              f"{r['matmuls']} | {r['breaks']} | {r['peak'] / 2 ** 20:.2f} MiB ({r['peak'] / sam['peak']:.3f}x) |")
    return rows


def graph_breaks(model, opt, x):
    sb = getattr(opt, "one_backward", None)
    torch._dynamo.reset()
    ctx = sb.armed(torch.rand(x.shape[0], dtype=torch.float64), x.shape[0]) if sb else _null()
    with ctx, torch.autocast("cpu", dtype=torch.bfloat16):
        explained = torch._dynamo.explain(model)(x)
    torch._dynamo.reset()
    return explained.graph_break_count


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--proxies", action="store_true", help="CPU proxies on tiny models instead of GPU timing")
    ap.add_argument("--preset", default="vit-b16", choices=["vit-b16"])
    ap.add_argument("--workloads", default="adaptformer,lora")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--compile", action="store_true", help="also time the model compiled with inductor")
    ap.add_argument("--foreach", action="store_true",
                    help="base SGD with foreach kernels (one host read per step) instead of fused (none)")
    ap.add_argument("--smoke", action="store_true", help="the GPU code path on the CPU with a tiny model (tests)")
    args = ap.parse_args(argv)
    if args.proxies:
        print("| tuning | optimizer | aten ops (x SAM) | host reads | matmuls | graph breaks | peak (x SAM) |\n"
              "|---|---|---|---|---|---|---|")
        return proxies()
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("step_cost_gpu: no CUDA device (use --proxies on the CPU)")
    device = torch.cuda.get_device_name() if not args.smoke else "cpu (smoke)"
    print(f"device: {device}, torch {torch.__version__}, batch {args.batch}, bf16, "
          f"base SGD {'foreach' if args.foreach else 'fused'}")
    print("| tuning | mode | optimizer | passes | step | x SAM | peak above weights | |\n|---|---|---|---|---|---|---|---|")
    return run_gpu(args)


if __name__ == "__main__":
    main()
