"""ft_focal.training.sharding helpers that need no process group: block discovery, activation checkpointing,
the refusals that come before any sharding."""
import pytest
import torch
import torch.nn.functional as F

from ft_focal.config import ModelConfig, TuningConfig
from ft_focal.models import build_classifier, tiny_model_config
from ft_focal.optim import FocalSAM
from ft_focal.training.sharding import checkpoint_blocks, mixed_precision_policy, shard_model, transformer_blocks

COUNTS = [100, 30, 8, 3]


def tiny(tuning="full", targets=None):
    torch.manual_seed(0)
    cfg = ModelConfig(**{**tiny_model_config("open_clip"), "head_init": "random"})
    return build_classifier(cfg, TuningConfig(method=tuning, lora_targets=targets), len(COUNTS)).double()


def test_transformer_blocks_are_the_vision_towers_blocks():
    blocks = transformer_blocks(tiny())
    assert len(blocks) == 2 and all(type(b).__name__ == "ResidualAttentionBlock" for b in blocks)


def test_activation_checkpointing_gives_the_same_focal_sam_step_and_keeps_parameter_names():
    """Focal-SAM back-propagates one forward twice: the recomputed blocks must give the same update."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 3, 32, 32, generator=g, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 0, 2])
    results = []
    for checkpointing in (False, True):
        model = tiny()
        names = [n for n, _ in model.named_parameters()]
        if checkpointing:
            assert checkpoint_blocks(model) == 2
            assert [n for n, _ in model.named_parameters()] == names
        opt = FocalSAM(model.parameters(), torch.optim.SGD, rho=0.05, class_counts=COUNTS, lr=0.1, momentum=0.9,
                       model=model, one_backward=False)
        for _ in range(2):
            opt.step(lambda model=model: F.cross_entropy(model(x), y, reduction="none"), targets=y)
        results.append({n: p.detach().clone() for n, p in model.named_parameters()})
    assert all(torch.allclose(results[0][k], results[1][k], rtol=0, atol=1e-12) for k in results[0])


def test_peft_lora_on_multihead_attention_is_refused_in_one_line():
    with pytest.raises(ValueError, match=r"peft's LoRA on nn.MultiheadAttention.*lora_targets"):
        shard_model(tiny("lora"))


def test_fp16_policy_is_refused():
    assert mixed_precision_policy("no") is None
    assert mixed_precision_policy("bf16").reduce_dtype == torch.float32
    with pytest.raises(ValueError, match="fp16"):
        mixed_precision_policy("fp16")


def test_memory_benchmark_projection_counts_parameters_on_the_meta_device():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import memory_fsdp as bench

    p = bench.count_params("ViT-L-14")
    assert 303e6 < p["total"] - p["head"] < 305e6 and p["tokens"] == 257 and p["layers"] == 24
    full1, full8 = (bench.per_rank_static(p, "full", n, fsdp=True) for n in (1, 8))
    assert bench.per_rank_static(p, "full", 8, fsdp=False) == 4 * 5 * p["total"]   # DDP: 5 fp32 copies
    assert full8 < full1 / 4                                                          # sharded by N
    assert bench.max_batch(bench.per_rank_static(p, "full", 1, False), bench.per_sample_activations(p, False), 24) < \
        bench.max_batch(bench.per_rank_static(p, "full", 8, True), bench.per_sample_activations(p, True), 24)
