"""Every shipped recipe's values do what they say, checked by behaviour on the parts the run builds.

For each recipe the Trainer's own `setup()` builds the run (as `--dry-run` does: the tiny backbone
of the same family, synthetic images with the recipe's real class count; the demo recipes read
their real digits data). Then, against hand computations from docs/algorithms.md and
docs/metrics.md written here (no code of ft_focal.optim / ft_focal.losses is used for them):
- one optimizer update on a tiny batch equals w - lr_0 (g + wd w), with g the method's gradient
  from the recipe's rho / gamma / lam / tail threshold / tail weight / flat ratio;
- the learning rate at update 0, at the end of the warm-up and at the last update follows the
  recipe's schedule over the run's length (epochs x updates per epoch);
- the loss on a fixed batch is CE(z + tau log pi, y) with the recipe's tau;
- LoRA r / alpha / targets and AdaptFormer bottleneck / scale are those of the real modules;
- the head: its scale on the logits, its init (class means by hand; text: the init that ran);
- shot groups of the evaluation use the recipe's thresholds, and one update draws
  train.grad_accum_steps micro-batches adding up to train.batch_size.
Class counts are chosen to sit on the thresholds (20 and 100 and their neighbours), so a `<` that
became `<=` changes the step.
"""
from __future__ import annotations

import atexit
import dataclasses
import functools
import math
import shutil
import tempfile
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch.func import functional_call

from ft_focal.config import load_recipe
from ft_focal.data import synthetic_bundle
from ft_focal.models import preprocess_for, tiny_variant
from ft_focal.models.tuning import AdaptFormerMLP
from ft_focal.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if "accelerate" not in p.parts)
NUM_CLASSES = {"imagenet_lt": 1000, "inat2018": 8142, "places_lt": 365, "cifar100_lt": 100, "cifar10_lt": 10}
# Counts sitting on and around the thresholds the recipes use (tail 20 / 100, shot groups 100 / 20,
# CIFAR-10-LT's 1000 / 200); the remaining classes get FILL.
EDGE_COUNTS = [1500, 1001, 1000, 999, 201, 200, 199, 101, 100, 99, 21, 20, 19, 5]
FILL = 50
BATCH_CLASSES = [0, 2, 4, 6, 7, 8, 9, 10, 11, 12, 13]   # labels of the tiny batch (every class is < 10 or
# maps to an edge count: see _counts)
TINY_BATCH = 6


def ids(paths):
    return [p.relative_to(ROOT / "recipes").as_posix() for p in paths]


def _counts(num_classes: int) -> list[int]:
    """Training counts: the edge counts first (as many as fit), FILL for the rest."""
    edge = EDGE_COUNTS if num_classes >= len(EDGE_COUNTS) else \
        [1500, 1000, 999, 200, 199, 101, 100, 20, 19, 5][:num_classes]
    return list(edge) + [FILL] * (num_classes - len(edge))


def built(rel: str) -> Trainer:
    """The run's parts, built by Trainer.setup as the dry run does (synthetic data, tiny backbone)."""
    trainer = _build(rel)
    # The conftest resets Accelerate's process-global state after every test; the cached Trainer's
    # Accelerator reads it (accelerator.backward), so a fresh Accelerator sets it up again.
    Accelerator(cpu=True)
    return trainer


@pytest.fixture(scope="module", autouse=True)
def _fresh_builds():
    """Each session of this module builds its runs anew: the tests step the optimizers, so a run cached
    by an earlier pytest.main in the same process (mutation testing runs it many times) would start
    from a later state."""
    _build.cache_clear()
    yield
    _build.cache_clear()


@functools.lru_cache(maxsize=None)
def _build(rel: str) -> Trainer:
    path = ROOT / "recipes" / rel
    recipe = load_recipe(str(path))
    out = tempfile.mkdtemp(prefix="wiring_")
    atexit.register(shutil.rmtree, out, True)   # the run writes its resolved recipe there
    tiny = dataclasses.replace(recipe, output_dir=out, model=tiny_variant(recipe.model),
                               data=dataclasses.replace(recipe.data, num_workers=0),
                               train=dataclasses.replace(recipe.train, threads=None, mixed_precision="no",
                                                         compile=False))
    bundle, dataset = None, rel.split("/")[0]
    if dataset in NUM_CLASSES:
        # Two updates per epoch plus a remainder that is dropped (the loader drops the last partial batch).
        bundle = synthetic_bundle(NUM_CLASSES[dataset], preprocess_for(tiny.model),
                                  train_size=2 * recipe.train.batch_size + 3, eval_size=8, seed=0)
        bundle.class_counts = _counts(NUM_CLASSES[dataset])
    trainer = Trainer(tiny, bundle)
    trainer.setup()
    return trainer


# ------------------------------------------------------------------ hand computations


def la_losses(logits: torch.Tensor, y: torch.Tensor, counts: list, tau: float) -> torch.Tensor:
    """docs/algorithms.md: logit adjustment, CE(z + tau log pi, y), per sample."""
    pi = torch.tensor(counts, dtype=logits.dtype) / sum(counts)
    return F.cross_entropy(logits + tau * pi.log(), y, reduction="none")


class Reference:
    """Gradients of weighted per-sample losses at explicit weights (functional_call; no optimizer code)."""

    def __init__(self, trainer: Trainer, x: torch.Tensor, y: torch.Tensor):
        self.model, self.x, self.y = trainer.parts.model, x, y
        self.counts, self.tau = trainer.parts.class_counts, trainer.recipe.loss.tau
        self.w = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}

    def losses(self, w: dict) -> torch.Tensor:
        full = {n: p.detach() for n, p in self.model.named_parameters()}
        full.update(w)
        return la_losses(functional_call(self.model, full, (self.x,)).float(), self.y, self.counts, self.tau)

    def grad(self, w: dict, weights: torch.Tensor, denominator: int | None = None) -> dict:
        leaves = {k: v.clone().requires_grad_(True) for k, v in w.items()}
        loss = (self.losses(leaves) * weights).sum() / (denominator or len(self.y))
        grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        return {k: torch.zeros_like(w[k]) if g is None else g for k, g in zip(leaves, grads, strict=True)}


def _norm(g: dict) -> torch.Tensor:
    return torch.sqrt(sum((v.double() ** 2).sum() for v in g.values())).float()


def _plus(a: dict, b: dict, s: float = 1.0) -> dict:
    return {k: a[k] + s * b[k] for k in a}


def _ascent(ref: Reference, weights: torch.Tensor, rho: float) -> dict:
    """SAM's perturbed gradient of the weighted loss: grad at w + rho g / |g| (docs/algorithms.md)."""
    g = ref.grad(ref.w, weights)
    n = _norm(g)
    return ref.grad(_plus(ref.w, {k: rho * v / (n + 1e-12) for k, v in g.items()}), weights)


def method_gradient(trainer: Trainer, ref: Reference) -> dict:
    """The gradient the recipe's method applies, from docs/algorithms.md and the recipe's values."""
    o, y = trainer.recipe.optim, ref.y
    counts = torch.tensor(trainer.parts.class_counts, dtype=torch.float32)
    one = torch.ones(len(y))
    if o.name == "erm":
        return ref.grad(ref.w, one)
    if o.name == "sam":
        return _ascent(ref, one, o.rho)
    if o.name == "focal_sam":   # a_c = lam (1 - pi_c)^gamma; (1 - a) plain + a perturbed
        a = (o.lam * (1 - counts / counts.sum()) ** o.gamma)[y]
        return _plus(ref.grad(ref.w, 1 - a), _ascent(ref, a, o.rho))
    if o.name == "imbsam":      # tail: n_c < threshold, weighted by tail_weight, perturbed
        tail = (counts < o.tail_threshold).float()[y]
        return _plus(ref.grad(ref.w, 1 - tail), _ascent(ref, o.tail_weight * tail, o.rho))
    if o.name == "sse_sam":     # stage 1 (epoch 0): head with rho_head, tail with rho_tail
        tail = (counts < o.tail_threshold).float()[y]
        return _plus(_ascent(ref, 1 - tail, o.rho_head), _ascent(ref, tail, o.rho_tail))
    if o.name == "ccsam" and o.scope == "network":   # per-class radius (docs/algorithms.md, CC-SAM)
        k = sum(v.numel() for v in ref.w.values())
        wn = _norm(ref.w)
        total = {key: (1 - o.flat_ratio) * v for key, v in ref.grad(ref.w, one).items()}
        for c in sorted(set(y.tolist())):
            m = (y == c).float()
            g = ref.grad(ref.w, m)
            gn = _norm(g)
            rho_c = o.rho * math.sqrt(wn / (2 * gn)) * k ** -0.25 * max(trainer.parts.class_counts[c] - 1, 1) ** -0.25
            eps = {key: math.sqrt(k) * rho_c * v / gn for key, v in g.items()}
            total = _plus(total, ref.grad(_plus(ref.w, eps), m), o.flat_ratio)
        return total
    raise AssertionError(f"no hand computation for optim.name={o.name} (scope {o.scope}): add one")


def lr_factor(kind: str, warmup: int, total: int, step: int) -> float:
    """Linear warm-up to the base LR over `warmup` updates, then cosine / linear decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / (total - warmup)
    return {"cosine": 0.5 * (1 + math.cos(math.pi * t)), "linear": 1 - t, "constant": 1.0}[kind]


def tiny_batch(trainer: Trainer) -> tuple[torch.Tensor, torch.Tensor]:
    size = int(preprocess_for(trainer.recipe.model).get("image_size", 224))
    g = torch.Generator().manual_seed(7)
    x = torch.randn(TINY_BATCH, 3, size, size, generator=g)
    labels = [c for c in BATCH_CLASSES if c < len(trainer.parts.class_counts)]
    y = torch.tensor([labels[i % len(labels)] for i in range(TINY_BATCH)])
    return x, y


# ------------------------------------------------------------------ the checks


@pytest.mark.parametrize("path", RECIPES, ids=ids(RECIPES))
def test_one_update_equals_the_hand_computed_step(path):
    trainer = built(path.relative_to(ROOT / "recipes").as_posix())
    recipe, model, opt = trainer.recipe, trainer.parts.model, trainer.parts.optimizer
    model.train()
    opt.set_epoch(0, recipe.train.epochs)
    x, y = tiny_batch(trainer)
    ref = Reference(trainer, x, y)
    g = method_gradient(trainer, ref)
    o = recipe.optim
    assert o.base == "sgd" and not o.nesterov, "hand computation written for SGD without Nesterov"
    lr0 = o.lr * lr_factor(recipe.train.scheduler, recipe.train.warmup_steps, trainer.parts.total_steps, 0)
    # first SGD update with momentum: buffer = g + wd w, w' = w - lr buffer
    expected = {k: ref.w[k] - lr0 * (g[k] + o.weight_decay * ref.w[k]) for k in ref.w}
    params = dict(model.named_parameters())
    try:
        opt.step(lambda: trainer.parts.loss(model(x).float(), y), targets=y)
        # the whole update vector against the hand-computed one (float32 weights: a per-tensor
        # comparison of tiny steps on weights near 1 would measure rounding, not the method). The
        # tolerance is float32's: the cosine head's gradient is a small difference of large terms when
        # the rows are class means (tiny DINOv2: 3e-3); a wrong rho / gamma / lam / tail set moves the
        # update by several per cent (tests/test_planted_bugs.py checks that these tests fail then).
        got = {k: params[k].detach() - ref.w[k] for k in expected}
        want = {k: expected[k] - ref.w[k] for k in expected}
        error = float(_norm({k: got[k] - want[k] for k in got}) / _norm(want))
        assert error < 1e-2, f"update differs from the hand-computed one by {error:.2e} of its norm"
    finally:   # later tests of this recipe see the built state
        with torch.no_grad():
            for k, v in ref.w.items():
                params[k].copy_(v)


@pytest.mark.parametrize("path", RECIPES, ids=ids(RECIPES))
def test_learning_rate_follows_the_recipe_schedule(path):
    trainer = built(path.relative_to(ROOT / "recipes").as_posix())
    cfg = trainer.recipe.train
    assert trainer.parts.total_steps == cfg.epochs * (len(trainer.parts.data.train) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(trainer.parts.optimizer, trainer.parts.schedule.lr_lambdas[0])
    total, warmup = trainer.parts.total_steps, cfg.warmup_steps
    probes = sorted({0, max(warmup - 1, 0), warmup, total - 1})
    seen = {}
    for step in range(total):
        if step in probes:
            seen[step] = sched.get_last_lr()[0]
        sched.step()
    for step in probes:
        expected = trainer.recipe.optim.lr * lr_factor(cfg.scheduler, warmup, total, step)
        assert seen[step] == pytest.approx(expected, rel=1e-9, abs=1e-12), step
    trainer.parts.schedule.last_epoch = 0
    for group in trainer.parts.optimizer.param_groups:   # back to update 0 for the other tests
        group["lr"] = trainer.recipe.optim.lr * lr_factor(cfg.scheduler, warmup, total, 0)


@pytest.mark.parametrize("path", RECIPES, ids=ids(RECIPES))
def test_loss_on_a_fixed_batch_equals_the_hand_computed_loss(path):
    trainer = built(path.relative_to(ROOT / "recipes").as_posix())
    g = torch.Generator().manual_seed(3)
    logits = 5 * torch.randn(9, len(trainer.parts.class_counts), generator=g)
    y = torch.tensor([c % len(trainer.parts.class_counts) for c in (0, 1, 2, 3, 4, 8, 9, 11, 12)])
    assert trainer.recipe.loss.name == "la", "hand computation written for logit adjustment"
    got = trainer.parts.loss(logits, y)
    torch.testing.assert_close(got, la_losses(logits, y, trainer.parts.class_counts, trainer.recipe.loss.tau))


@pytest.mark.parametrize("path", RECIPES, ids=ids(RECIPES))
def test_tuning_method_is_on_the_real_modules(path):
    trainer = built(path.relative_to(ROOT / "recipes").as_posix())
    tuning, model = trainer.recipe.tuning, trainer.parts.model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    head = {n for n in trainable if n.startswith("head.")}
    assert bool(head) == tuning.train_head
    if tuning.method == "full":
        assert trainable == {n for n, _ in model.named_parameters()}
    elif tuning.method == "adaptformer":
        # docs/algorithms.md: bottleneck 2^max(0, floor(log2(C / 24))) unless the recipe sets it
        C = len(trainer.parts.class_counts)
        bottleneck = tuning.adapter_bottleneck or 2 ** max(0, math.floor(math.log2(C / 24)))
        adapters = [m for m in model.modules() if isinstance(m, AdaptFormerMLP)]
        assert adapters
        for m in adapters:
            assert m.down.out_features == bottleneck and m.up.in_features == bottleneck
            assert m.scale.requires_grad and float(m.scale.detach()) == tuning.adapter_scale_init
        assert all(".adapter." in n for n in trainable - head)
    elif tuning.method == "lora":
        lora = {name: m for name, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
        assert lora
        for m in lora.values():
            assert m.r["default"] == tuning.lora_rank
            assert m.scaling["default"] == pytest.approx(tuning.lora_alpha / tuning.lora_rank)
        wrapped = {name.rsplit(".", 1)[-1] for name in lora}
        targets = set(tuning.lora_targets or {"attn", "c_fc", "c_proj"})   # open_clip default (TuningConfig)
        assert {"c_fc", "c_proj"} & targets <= wrapped
        if "attn" in targets:
            assert any(".attn" in n and "lora" in n for n in trainable)
        assert all("lora_" in n for n in trainable - head)
    else:
        raise AssertionError(f"no check for tuning.method={tuning.method}")


@pytest.mark.parametrize("path", RECIPES, ids=ids(RECIPES))
def test_head_scale_and_init(path):
    trainer = built(path.relative_to(ROOT / "recipes").as_posix())
    model, mcfg = trainer.parts.model, trainer.recipe.model
    assert mcfg.head == "cosine"
    model.eval()
    x, _ = tiny_batch(trainer)
    with torch.no_grad():
        f = model.features(x).float()
        w = model.head.weight.detach()
        expected = mcfg.head_scale * F.normalize(f, dim=-1) @ F.normalize(w, dim=-1).T
        torch.testing.assert_close(model(x).float(), expected, rtol=1e-4, atol=1e-4)
    assert model.head_init_used == mcfg.head_init
    if mcfg.head_init == "class_mean":
        # row c points along the mean unit feature of class c's training images (test transform)
        train = trainer.parts.data.eval_dataset("train")
        sums = torch.zeros_like(w)
        with torch.no_grad():
            for i in range(len(train)):
                image, label = train[i]
                sums[label] += F.normalize(model.features(image[None]).float(), dim=-1)[0]
        present = sums.norm(dim=1) > 0
        cos = F.cosine_similarity(sums[present], w[present], dim=1)
        assert float(cos.min()) > 0.999
    model.train()


@pytest.mark.parametrize("path", RECIPES, ids=ids(RECIPES))
def test_shot_groups_batch_and_accumulation(path):
    from ft_focal.evaluation.evaluate import evaluate_split

    trainer = built(path.relative_to(ROOT / "recipes").as_posix())
    recipe, counts = trainer.recipe, trainer.parts.class_counts
    ev = recipe.eval
    # one image of each edge class, through the evaluation the run uses (its eval config)
    classes = list(range(min(len(counts), len(EDGE_COUNTS))))
    x, _ = tiny_batch(trainer)
    images = [(x[i % len(x)], c) for i, c in enumerate(classes)]
    r = evaluate_split(trainer.parts.model, images, counts, ev, 16)
    shown = [counts[c] for c in classes]
    expected = {"many": sum(n > ev.many_threshold for n in shown), "few": sum(n < ev.few_threshold for n in shown)}
    expected["medium"] = len(shown) - expected["many"] - expected["few"]
    assert {k: r["group_num_classes"].get(k, 0) for k in expected} == expected
    # Another test's Trainer resets Accelerate's process-wide state; the loader needs the device only.
    trainer.parts = dataclasses.replace(trainer.parts, accelerator=types.SimpleNamespace(device=torch.device("cpu")))
    group = next(trainer._groups(0, 0, 1))
    accum = recipe.train.grad_accum_steps or 1
    assert len(group) == accum
    assert sum(len(labels) for _, labels in group) == recipe.train.batch_size
