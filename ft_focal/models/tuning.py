"""What is trained: full fine-tuning, head only, LoRA (peft) or AdaptFormer.

LoRA is injected into the BACKBONE with `peft.inject_adapter_in_model`, so parameter names are
the backbone's own plus `lora_A.default` / `lora_B.default` (`base_layer` for the wrapped
weights) and a rebuild with the same config yields identical state_dict keys.

AdaptFormer (docs/algorithms.md): in every block h <- h + MLP(LN(h)) + s * Up(ReLU(Down(x_a))), the
adapter parallel to the MLP; Up zero-initialised (the model starts as the frozen backbone),
Down Kaiming-normal (a = sqrt(5), as LIFT), s a learnable scalar. The block's MLP module is
replaced by `AdaptFormerMLP` so the block's own forward is unchanged. `adapter_norm`:
  "shared": x_a = LN(h), the block's own (frozen) LayerNorm output that feeds the MLP; every
            trainable adapter weight lives in the two nn.Linear modules (down, up) + scale.
  "own":    x_a = LN_a(h) with the adapter's own trainable LayerNorm, exactly as LIFT
            (shijxcs/LIFT models/peft_modules.py AdaptFormer); the block's LayerNorm is moved
            into the wrapper (the block gets nn.Identity) so the wrapper sees h.
"""

from __future__ import annotations

import logging
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ft_focal.errors import UserError

logger = logging.getLogger(__name__)

DEFAULT_LORA_TARGETS = {
    # open_clip <= 3.3 blocks use nn.MultiheadAttention: peft wraps it as a whole ("attn"),
    # LoRA on in_proj and out_proj. Targeting "out_proj" alone would train nothing.
    "open_clip": ["attn", "c_fc", "c_proj"],
    "hf_clip": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "hf_vit": ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"],
    # timm ViT blocks: attn.qkv / attn.proj, mlp.fc1 / mlp.fc2; EVA-02 has attn.q_proj / k_proj / v_proj
    # and a SwiGLU mlp.fc1_g / fc1_x. Names a model lacks match nothing (peft needs only one match).
    "timm": ["qkv", "q_proj", "k_proj", "v_proj", "proj", "fc1", "fc1_g", "fc1_x", "fc2"],
}


def default_lora_targets(family: str) -> list:
    try:
        return list(DEFAULT_LORA_TARGETS[family])
    except KeyError:
        raise UserError(f"model.family: '{family}' is not one of {', '.join(DEFAULT_LORA_TARGETS)}") from None


# --------------------------------------------------------------------------- LoRA


def _open_clip_lora_plan(backbone: nn.Module, targets: list) -> tuple[list, list]:
    """Split the requested targets into module targets and parameter targets for open_clip.

    Blocks with nn.MultiheadAttention take the module target "attn". Newer open_clip blocks
    (custom `Attention` with an `in_proj_weight` parameter, e.g. qk_norm models) cannot be
    wrapped as a module: there "attn" becomes `out_proj` (a Linear) + target_parameters
    ["in_proj_weight"] (peft ParamWrapper)."""
    has_mha = any(isinstance(m, nn.MultiheadAttention) for m in backbone.modules())
    custom_attn = [
        n for n, m in backbone.named_modules()
        if n.endswith("attn") and not isinstance(m, nn.MultiheadAttention) and hasattr(m, "in_proj_weight")
    ]
    if has_mha or not custom_attn or "attn" not in targets:
        return targets, []
    modules = [t for t in targets if t != "attn"] + ["attn.out_proj"]
    return modules, ["in_proj_weight"]


def _check_dead_mha_targets(backbone: nn.Module) -> None:
    """A LoRA Linear on the out_proj of an un-wrapped nn.MultiheadAttention is never called."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    wrapped = {n for n, m in backbone.named_modules() if isinstance(m, BaseTunerLayer)}
    for name, module in backbone.named_modules():
        if isinstance(module, nn.MultiheadAttention) and not isinstance(module, BaseTunerLayer):
            if name.endswith(".base_layer") and name[: -len(".base_layer")] in wrapped:
                continue  # the MultiheadAttention inside peft's LoRA MultiheadAttention wrapper
            if isinstance(module.out_proj, BaseTunerLayer):
                raise UserError(
                    f"tuning.lora_targets: '{name}.out_proj' is inside nn.MultiheadAttention, whose forward never "
                    "calls it (LoRA there trains nothing); target the attention module itself (e.g. 'attn')"
                )


def _functional_mha_forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                            average_attn_weights=True, is_causal=False):
    """peft's LoRA MultiheadAttention forward without touching the frozen weights.

    peft merges the LoRA delta INTO `in_proj_weight` / `out_proj.weight` before the call and
    subtracts it afterwards; (W + d) - d != W in floating point, so the frozen weights drift by
    rounding at every forward (and a resumed run, which rebuilds them, no longer matches). Here
    the frozen weights are only read; the LoRA parameters, their names and peft's merge / save are
    unchanged.

    Self-attention as CLIP's vision tower calls it (query is key is value, no key padding mask,
    no attention weights returned, no bias_k / bias_v / zero attention) applies the adapters to
    the ACTIVATIONS: qkv = x W_in^T + b + s B(A(x)), out = o W_out^T + b + 2 s B_o(A_o(o)), with
    lora_A / lora_B called as the nn.Linear modules they are. That is the same function as the
    merged weights, and it lets the one-backward Focal-SAM step see every LoRA gradient through
    its layer hooks (a merged weight hides the per-sample structure). Any other call forms the
    effective weights W + s B A out of place and runs F.multi_head_attention_forward.

    peft 0.21 adds the out_proj delta TWICE (its MultiheadAttention.merge adds it, then calls
    out_proj.merge, which adds it again), in its forward and in merge_and_unload alike. We keep
    that effective weight W_out + 2 s B A so an exported adapter gives the same logits when
    loaded with peft; it only rescales the out_proj adapter's learning dynamics (as alpha would).
    LoRA dropout is not applied here, as in peft's merged-weight MultiheadAttention forward.
    """
    base = self.get_base_layer()
    if self.disable_adapters or self.merged:
        return base(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                    attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)
    active = [a for a in self.active_adapters if a in self.lora_A]
    if (query is key and key is value and key_padding_mask is None and not need_weights and not is_causal
            and base._qkv_same_embed_dim and base.bias_k is None and base.bias_v is None
            and not base.add_zero_attn and (attn_mask is None or (attn_mask.dim() == 2 and attn_mask.is_floating_point()))):
        return _lora_self_attention(self, base, active, query, attn_mask), None
    out_base = base.out_proj.get_base_layer()
    in_weight, out_weight = base.in_proj_weight, out_base.weight
    for adapter in active:
        in_weight = in_weight + self.get_delta_weight(adapter).to(in_weight.dtype)
        out_weight = out_weight + 2 * base.out_proj.get_delta_weight(adapter).to(out_weight.dtype)
    if base.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    out, weights = F.multi_head_attention_forward(
        query, key, value, base.embed_dim, base.num_heads, in_weight, base.in_proj_bias, base.bias_k, base.bias_v,
        base.add_zero_attn, base.dropout, out_weight, out_base.bias, training=base.training,
        key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask,
        average_attn_weights=average_attn_weights, is_causal=is_causal)
    if base.batch_first:
        out = out.transpose(0, 1)
    return out, weights


def _lora_self_attention(self, base: nn.MultiheadAttention, active: list, x: torch.Tensor,
                         attn_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Self-attention of x ([B, N, D] if batch_first else [N, B, D]) with LoRA on the activations."""
    qkv = F.linear(x, base.in_proj_weight, base.in_proj_bias)
    for adapter in active:
        qkv = qkv + self.lora_B[adapter](self.lora_A[adapter](x)) * self.scaling[adapter]
    if not base.batch_first:
        qkv = qkv.transpose(0, 1)
    n_batch, n_tokens, _ = qkv.shape
    heads, head_dim = base.num_heads, base.head_dim
    q, k, v = (t.reshape(n_batch, n_tokens, heads, head_dim).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
    attn = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                          dropout_p=base.dropout if base.training else 0.0)
    attn = attn.transpose(1, 2).reshape(n_batch, n_tokens, base.embed_dim)
    if not base.batch_first:
        attn = attn.transpose(0, 1)
    out_lora = base.out_proj
    out = F.linear(attn, out_lora.get_base_layer().weight, out_lora.get_base_layer().bias)
    for adapter in active:
        if adapter in out_lora.lora_A:
            # twice, as peft's merge (see _functional_mha_forward)
            out = out + out_lora.lora_B[adapter](out_lora.lora_A[adapter](attn)) * (2 * out_lora.scaling[adapter])
    return out


def _use_functional_mha(backbone: nn.Module) -> None:
    import types

    from peft.tuners.lora.layer import MultiheadAttention as LoraMultiheadAttention

    for module in backbone.modules():
        if isinstance(module, LoraMultiheadAttention):
            module.forward = types.MethodType(_functional_mha_forward, module)


def _timm_lora_exclusions(backbone: nn.Module) -> list:
    """timm: LoRA only inside the transformer blocks. Outside them, "proj" / "fc1" / "fc2" would also
    match the patch embedding's Conv2d and SigLIP's attention-pool head, which are not LoRA targets."""
    return [name for name, module in backbone.named_modules()
            if name and ".blocks." not in f".{name}." and not list(module.children())]


def apply_lora(backbone: nn.Module, family: str, tuning_cfg) -> object:
    from peft import LoraConfig, inject_adapter_in_model

    targets = list(tuning_cfg.lora_targets or default_lora_targets(family))
    if not targets or not all(isinstance(t, str) for t in targets):
        raise UserError("tuning.lora_targets: must be a non-empty list of module names")
    target_parameters: list = []
    if family == "open_clip":
        targets, target_parameters = _open_clip_lora_plan(backbone, targets)
    kwargs = dict(
        r=int(tuning_cfg.lora_rank),
        lora_alpha=float(tuning_cfg.lora_alpha),
        lora_dropout=float(tuning_cfg.lora_dropout),
        target_modules=targets,
        bias="none",
    )
    if target_parameters:
        kwargs["target_parameters"] = target_parameters
    if family == "timm":
        kwargs["exclude_modules"] = _timm_lora_exclusions(backbone)
    if tuning_cfg.lora_rank < 1:
        raise UserError(f"tuning.lora_rank: must be >= 1, got {tuning_cfg.lora_rank}")
    config = LoraConfig(**kwargs)
    try:
        inject_adapter_in_model(config, backbone)
    except ValueError as exc:
        names = sorted({n.rsplit(".", 1)[-1] for n, _ in backbone.named_modules() if n})
        first = str(exc).strip().splitlines()[0][:200]
        raise UserError(
            f"tuning.lora_targets {targets}: {first} (module names in this backbone: {', '.join(names[:40])})"
        ) from None
    _check_dead_mha_targets(backbone)
    _use_functional_mha(backbone)
    if family == "timm":
        from ft_focal.models.backbones.timm import use_lora_in_fused_qkv

        use_lora_in_fused_qkv(backbone)
    n_lora = sum(p.numel() for n, p in backbone.named_parameters() if "lora_" in n)
    if n_lora == 0:
        raise UserError(f"tuning.lora_targets {targets}: no LoRA weights were created")
    wrapped = sorted({n.rsplit(".", 1)[-1] for n, m in backbone.named_modules() if hasattr(m, "lora_A")})
    logger.info("LoRA r=%d alpha=%g on %s (%d params)", config.r, config.lora_alpha, ", ".join(wrapped), n_lora)
    return config


def merge_lora_(backbone: nn.Module) -> bool:
    """Merge every LoRA layer into its base weights in place and unwrap it. Returns True if any."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    merged_any = False
    for _ in range(16):  # nested tuner layers (a LoRA Linear inside a ParamWrapper) surface after a pass
        names = [n for n, m in backbone.named_modules() if isinstance(m, BaseTunerLayer)]
        outer = [n for n in names if not any(n.startswith(o + ".") for o in names if o != n)]
        if not outer:
            break
        for name in outer:
            parent_name, _, attr = name.rpartition(".")
            parent = backbone.get_submodule(parent_name) if parent_name else backbone
            module = getattr(parent, attr)
            if hasattr(module, "unload_and_optionally_merge_module"):
                new = module.unload_and_optionally_merge_module(merge=True, safe_merge=False, adapter_names=None)
            else:
                module.merge()
                new = module.get_base_layer()
            setattr(parent, attr, new)
            merged_any = True
    if hasattr(backbone, "peft_config"):
        try:
            del backbone.peft_config
        except AttributeError:  # pragma: no cover
            pass
    return merged_any


# --------------------------------------------------------------------------- AdaptFormer


class BottleneckAdapter(nn.Module):
    """scale * up(relu(down(x))): the trainable part of AdaptFormer, in one small module.

    ``one_backward_rule = "scale"``: the forward is ``self.scale * self.unscaled(x)``, which lets
    the one-backward Focal-SAM step weight the scale's gradient per sample in closed form
    (ft_focal/optim/one_backward/__init__.py); down / up are plain nn.Linear layers it covers too.
    """

    one_backward_rule = "scale"

    def __init__(self, dim: int, bottleneck: int, scale_init: float = 1.0):
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        self.scale = nn.Parameter(torch.full((1,), float(scale_init)))
        nn.init.kaiming_normal_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)  # the model at init equals the frozen backbone
        nn.init.zeros_(self.up.bias)

    def unscaled(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(F.relu(self.down(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.unscaled(x)


class AdaptFormerMLP(nn.Module):
    """Block MLP + parallel bottleneck adapter: mlp(LN(h)) + scale * up(relu(down(x_a)))."""

    def __init__(
        self,
        mlp: nn.Module,
        dim: int,
        bottleneck: int,
        scale_init: float = 1.0,
        block_norm: Optional[nn.Module] = None,
    ):
        super().__init__()
        self.mlp = mlp
        # adapter_norm="own": the block's LayerNorm lives here and the adapter has its own LN
        self.block_norm = block_norm
        if block_norm is not None:
            eps = getattr(block_norm, "eps", 1e-5)
            self.adapter_norm = nn.LayerNorm(dim, eps=eps)
        else:
            self.adapter_norm = None
        self.adapter = BottleneckAdapter(dim, bottleneck, scale_init)

    @property
    def down(self) -> nn.Linear:
        return self.adapter.down

    @property
    def up(self) -> nn.Linear:
        return self.adapter.up

    @property
    def scale(self) -> nn.Parameter:
        return self.adapter.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.block_norm is None:  # x = LN(h)
            return self.mlp(x) + self.adapter(x)
        return self.mlp(self.block_norm(x)) + self.adapter(self.adapter_norm(x))  # x = h


def apply_adaptformer(blocks: list, mlp_attr: str, norm_attr: str, dim: int, bottleneck: int,
                      scale_init: float, adapter_norm: str = "shared") -> int:
    if bottleneck < 1:
        raise UserError(f"tuning.adapter_bottleneck: must be >= 1, got {bottleneck}")
    if adapter_norm not in ("shared", "own"):
        raise UserError(f"tuning.adapter_norm: '{adapter_norm}' is not one of shared, own")
    if not blocks:
        raise UserError("tuning.method=adaptformer: no transformer blocks found in this backbone")
    for block in blocks:
        mlp = getattr(block, mlp_attr)
        block_norm = None
        if adapter_norm == "own":
            block_norm = getattr(block, norm_attr)
            setattr(block, norm_attr, nn.Identity())
        setattr(block, mlp_attr, AdaptFormerMLP(mlp, dim, bottleneck, scale_init, block_norm))
        ref = next(mlp.parameters(), None)
        if ref is not None:
            getattr(block, mlp_attr).to(device=ref.device, dtype=ref.dtype)
    return len(blocks)
