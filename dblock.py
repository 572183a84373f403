"""The DiffusionBlocks ViT: a label-space EDM denoiser whose layers are split into B blocks.

Token 0 carries the noisy label state z (scaled by c_in); tokens 1..P are image patches. Every
layer is modulated by the noise level through an adaptive LayerNorm (adaLN-Zero: each layer starts
as the identity). Block b owns a contiguous group of layers (L/B each by default, or any
--layers_per_block allocation) and denoises the b-th noise range, block 0 the highest noise. The stem (patch,
position and label embeddings, noise MLP) and the head (final LayerNorm, final adaptive LayerNorm, classifier) are
shared by all blocks.

As NVlabs/edm's EDMPrecond: the backbone maps the preconditioned inputs to the raw output F_x, a thin wrapper applies
the EDM scalings and returns the denoised label state D_x = c_skip * z + c_out * F_x, and the head classifies D_x.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import edm
from errors import UserError
from seeds import mix_seed
from vit import ArchConfig

NOISE_FEATURES = 256  # width of the sinusoidal noise-level features
# B when neither --num_blocks nor --layers_per_block is given (released); train's --num_blocks defaults to None
# because the layout's length is the other default.
RELEASED_NUM_BLOCKS = 3
# A per-sample training loss (N,) of (logits, labels, denoised label state D_x, clean target), e.g. losses.Criterion.
Criterion = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class DBlockConfig:
    """Block layout, noise partition and the released program's two switchable quirks.

    No field has a default: train's flags (main.py) are the one source; `config.default_configs().dblock` is the
    default configuration, `dataclasses.replace` of it a variant.
    """

    num_blocks: int
    gamma: float  # log-space overlap between neighbouring blocks' training ranges
    # Layers of each block, block 0 (highest noise) first; None = the even split (released).
    layers_per_block: tuple[int, ...] | None
    partition: str  # block boundaries: equi-probability (released) or uniform in log sigma
    # Released quirk (a): loss = mean(CE) * mean(w) instead of the paper's mean(CE * w).
    batch_mean_loss_weight: bool
    # Released quirk (b): the inference bridge mixes RAW label-embedding rows, although training
    # targets are the L2-normalised rows.
    raw_embedding_bridge: bool

    def layout(self, num_layers: int) -> tuple[int, ...]:
        """Number of layers in each block, block 0 first."""
        return self.layers_per_block or (num_layers // self.num_blocks,) * self.num_blocks

    def validate(self, num_layers: int) -> None:
        """Reject block splits and ranges the method cannot use, naming the flag to change."""
        if self.num_blocks < 1:
            raise UserError(f"--num_blocks must be >= 1, got {self.num_blocks}")
        if self.layers_per_block is not None:
            layout = ",".join(map(str, self.layers_per_block))
            if len(self.layers_per_block) != self.num_blocks:
                raise UserError(
                    f"--layers_per_block {layout} has {len(self.layers_per_block)} blocks but --num_blocks is "
                    f"{self.num_blocks}: drop --num_blocks or make them agree"
                )
            if min(self.layers_per_block) < 1 or sum(self.layers_per_block) != num_layers:
                raise UserError(
                    f"--layers_per_block {layout} must be positive numbers summing to --num_hidden_layers {num_layers}"
                )
        elif num_layers % self.num_blocks:
            raise UserError(
                f"--num_hidden_layers {num_layers} is not divisible by --num_blocks {self.num_blocks}: "
                "choose a block count that divides the depth, or give --layers_per_block"
            )
        if self.partition not in edm.PARTITIONS:
            raise UserError(f"--partition must be one of {', '.join(edm.PARTITIONS)}, got {self.partition!r}")
        if not 0.0 <= self.gamma < 0.5:
            raise UserError(f"--gamma must be in [0, 0.5), got {self.gamma}")


def parse_block_list(text: str | int | None, flag: str) -> list[int] | None:
    """`6,4,2` -> [6, 4, 2]; None stays None; anything else is a one-line error naming the flag."""
    if text is None:
        return None
    try:
        return [int(part) for part in str(text).split(",")]
    except ValueError:
        raise UserError(f"{flag} {text!r} must be comma-separated integers such as 6,4,2") from None


def parse_layers_per_block(text: str | None) -> tuple[int, ...] | None:
    """`6,4,2` -> (6, 4, 2): the layer count of each block."""
    layout = parse_block_list(text, "--layers_per_block")
    return tuple(layout) if layout is not None else None


def resolve_num_blocks(num_blocks: int | None, layout: tuple[int, ...] | None) -> int:
    """B: --num_blocks if given (it must agree with --layers_per_block), else the layout's length, else the
    released 3."""
    if layout is not None and num_blocks is not None and num_blocks != len(layout):
        raise UserError(
            f"--num_blocks {num_blocks} disagrees with --layers_per_block {','.join(map(str, layout))} "
            f"({len(layout)} blocks): drop one of them"
        )
    return num_blocks or (len(layout) if layout else RELEASED_NUM_BLOCKS)


def sinusoidal_features(x: torch.Tensor, dim: int = NOISE_FEATURES, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of scalars x (N,) -> (N, dim): cosine half then sine half."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=x.device, dtype=torch.float32) / half)
    args = x.float()[:, None] * freqs[None]  # (N, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class NoiseEmbedder(nn.Module):
    """c_noise -> sinusoidal features -> Linear -> SiLU -> Linear -> SiLU: the conditioning vector (N, d_c)."""

    def __init__(self, cond_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(NOISE_FEATURES, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    def forward(self, noise_cond: torch.Tensor) -> torch.Tensor:
        return F.silu(self.mlp(sinusoidal_features(noise_cond)))


class SelfAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v projections and dropout on the attention probabilities."""

    def __init__(self, arch: ArchConfig):
        super().__init__()
        d = arch.hidden_size
        self.num_heads = arch.num_attention_heads
        self.query, self.key, self.value, self.out = (nn.Linear(d, d) for _ in range(4))
        self.attn_dropout = arch.attention_probs_dropout_prob
        self.out_dropout = nn.Dropout(arch.hidden_dropout_prob)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, D) -> (N, heads, T, D / heads)."""
        n, t, d = x.shape
        return x.view(n, t, self.num_heads, d // self.num_heads).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self._heads(self.query(x)), self._heads(self.key(x)), self._heads(self.value(x))
        p = self.attn_dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p)  # (N, heads, T, D / heads)
        return self.out_dropout(self.out(y.transpose(1, 2).reshape(n, t, d)))


class MLP(nn.Module):
    """Linear -> GELU -> Linear -> dropout."""

    def __init__(self, arch: ArchConfig):
        super().__init__()
        self.fc1 = nn.Linear(arch.hidden_size, arch.intermediate_size)
        self.fc2 = nn.Linear(arch.intermediate_size, arch.hidden_size)
        self.dropout = nn.Dropout(arch.hidden_dropout_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(F.gelu(self.fc1(x))))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Adaptive LayerNorm modulation x * (1 + scale) + shift, broadcasting (N, D) over tokens."""
    return x * (1 + scale[:, None]) + shift[:, None]


class AdaLNLayer(nn.Module):
    """Pre-LayerNorm transformer layer whose norms are modulated, and residuals gated, by the noise level."""

    def __init__(self, arch: ArchConfig, cond_dim: int):
        super().__init__()
        d = arch.hidden_size
        self.norm1 = nn.LayerNorm(d, eps=arch.layer_norm_eps)
        self.attn = SelfAttention(arch)
        self.norm2 = nn.LayerNorm(d, eps=arch.layer_norm_eps)
        self.mlp = MLP(arch)
        self.ada = nn.Linear(cond_dim, 6 * d)  # SiLU comes AFTER this projection (as released)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = F.silu(self.ada(c)).chunk(6, dim=-1)  # 6 x (N, D)
        h = h + gate_a[:, None] * self.attn(modulate(self.norm1(h), shift_a, scale_a))
        return h + gate_m[:, None] * self.mlp(modulate(self.norm2(h), shift_m, scale_m))


def seeded_label_table(num_labels: int, dim: int, seed: int, std: float) -> torch.Tensor:
    """The label-embedding table every independent job derives alike from the seed (normal rows, std `std`)."""
    return torch.randn(num_labels, dim, generator=torch.Generator().manual_seed(seed)) * std


class NoisePartition:
    """Noise ranges of the blocks (training) and the block of a noise level (inference), from the block config."""

    arch: ArchConfig
    dcfg: DBlockConfig
    edm_cfg: edm.EDMConfig
    boundaries: list[float]

    @property
    def num_blocks(self) -> int:
        return self.dcfg.num_blocks

    def training_range(self, block: int) -> tuple[float, float]:
        """The gamma-widened noise range a block is trained on."""
        return edm.widened_block_range(block, self.boundaries, self.dcfg.gamma, self.edm_cfg)

    def block_of_sigma(self, sigma: float) -> int:
        """The block that denoises noise level sigma at inference."""
        return edm.block_of_sigma(sigma, self.boundaries)


class DiffusionBlocksViT(NoisePartition, nn.Module):
    """Label denoiser D(z; image, sigma) built from B independently trainable blocks of transformer layers.

    `built_blocks` builds only those blocks' layers (the others stay empty): an independent job's model.
    `label_seed` replaces the trainable label table by a frozen one derived from that seed, so jobs that
    never communicate denoise in the same label space.
    """

    def __init__(
        self,
        *,
        arch: ArchConfig,
        num_labels: int,
        dcfg: DBlockConfig,
        edm_cfg: edm.EDMConfig = edm.EDMConfig(),
        built_blocks: tuple[int, ...] | None = None,
        label_seed: int | None = None,
    ):
        super().__init__()
        dcfg.validate(arch.num_hidden_layers)
        self.arch, self.dcfg, self.edm_cfg = arch, dcfg, edm_cfg
        self.built_blocks = tuple(range(dcfg.num_blocks)) if built_blocks is None else tuple(built_blocks)
        d, cond_dim = arch.hidden_size, arch.hidden_size // 6
        # Stem (shared)
        self.patch_embed = nn.Conv2d(arch.num_channels, d, kernel_size=arch.patch_size, stride=arch.patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, arch.num_patches + 1, d))
        self.embed_dropout = nn.Dropout(arch.hidden_dropout_prob)
        self.label_embed = nn.Embedding(num_labels, d)
        self.noise_embed = NoiseEmbedder(cond_dim)
        # Blocks, and the ascending noise boundaries that assign them their ranges
        self.blocks = nn.ModuleList(
            nn.ModuleList(AdaLNLayer(arch, cond_dim) for _ in range(n if b in self.built_blocks else 0))
            for b, n in enumerate(dcfg.layout(arch.num_hidden_layers))
        )
        self.boundaries = edm.partition_boundaries(dcfg.partition, dcfg.num_blocks, edm_cfg)
        # Head (shared)
        self.final_norm = nn.LayerNorm(d, eps=arch.layer_norm_eps)
        self.final_ada = nn.Linear(cond_dim, 2 * d)
        self.classifier = nn.Linear(d, num_labels)
        self.reset_parameters()
        if label_seed is not None:
            self.label_embed.weight.data.copy_(seeded_label_table(num_labels, d, label_seed, arch.initializer_range))
            self.label_embed.weight.requires_grad_(False)

    def reset_parameters(self) -> None:
        """ViT init (truncated normal 0.02, zero biases) with adaLN-Zero: modulations and classifier start at zero."""
        std = self.arch.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=std)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.pos_embed, std=std)
        nn.init.normal_(self.label_embed.weight, std=std)
        for m in self.noise_embed.mlp:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
        for layer in self.block_layers():
            nn.init.zeros_(layer.ada.weight)
            nn.init.zeros_(layer.ada.bias)
        for m in (self.final_ada, self.classifier):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def block_layers(self):
        """All transformer layers, block 0 first."""
        return [layer for block in self.blocks for layer in block]

    def shared_parameters(self) -> list[nn.Parameter]:
        """Parameters trained on every step whichever block is drawn (stem and head)."""
        in_blocks = {id(p) for p in self.blocks.parameters()}
        return [p for p in self.parameters() if id(p) not in in_blocks]

    def clean_targets(self, labels: torch.Tensor) -> torch.Tensor:
        """Training targets: L2-normalised label-embedding rows (gradient flows into the table)."""
        return F.normalize(self.label_embed.weight, dim=-1)[labels]

    def bridge_table(self) -> torch.Tensor:
        """Embedding table the sampler mixes with the predicted class probabilities."""
        table = self.label_embed.weight
        return table if self.dcfg.raw_embedding_bridge else F.normalize(table, dim=-1)

    def embed_tokens(self, images: torch.Tensor, z_in: torch.Tensor) -> torch.Tensor:
        """Token sequence (N, 1 + P, D): the scaled label state z_in (N, D), then the patches, plus positions."""
        patches = self.patch_embed(images).flatten(2).transpose(1, 2)  # (N, P, D)
        return self.embed_dropout(torch.cat([z_in[:, None], patches], dim=1) + self.pos_embed)

    def backbone(
        self, images: torch.Tensor, z_in: torch.Tensor, noise_cond: torch.Tensor, block: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The raw network output F_x (N, D) of `block`'s layers, and the noise conditioning vector (N, d_c).

        Inputs are already preconditioned: z_in = c_in * z (N, D) and noise_cond = c_noise (N,). The head is
        modulated by the same conditioning vector, so it is returned rather than computed twice.
        """
        cond = self.noise_embed(noise_cond)  # (N, d_c)
        h = self.embed_tokens(images, z_in)  # (N, 1 + P, D)
        for layer in self.blocks[block]:
            h = layer(h, cond)
        return self.final_norm(h)[:, 0], cond  # (N, D): the label token

    def head(self, D_x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The shared head: denoised label state D_x (N, D) -> final adaptive LayerNorm -> logits (N, num_labels)."""
        shift, scale = F.silu(self.final_ada(cond)).chunk(2, dim=-1)  # 2 x (N, D)
        return self.classifier(D_x * (1 + scale) + shift)

    def denoise_and_classify(
        self, images: torch.Tensor, z: torch.Tensor, sigma: torch.Tensor, block: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The denoised label state D_x = c_skip * z + c_out * F_x (N, D) and its logits (N, num_labels), from one pass.

        The EDM preconditioning wrapped around the backbone, as NVlabs/edm's EDMPrecond: the scalings and D_x are
        computed in fp32 whatever autocast does to the backbone's and the head's layers.
        """
        if block not in self.built_blocks:
            raise ValueError(f"block {block} is not built in this model (it holds blocks {list(self.built_blocks)})")
        z, sigma = z.to(torch.float32), sigma.to(torch.float32)
        c_skip, c_out, c_in, c_noise = edm.scalings(sigma, self.edm_cfg.sigma_data)  # 4 x (N,)
        F_x, cond = self.backbone(images, edm.append_dims(c_in, z.ndim) * z, c_noise, block)
        D_x = edm.append_dims(c_skip, z.ndim) * z + edm.append_dims(c_out, z.ndim) * F_x.to(torch.float32)
        return D_x, self.head(D_x, cond)

    def forward(
        self, images: torch.Tensor, z: torch.Tensor, sigma: torch.Tensor, block: int, denoised: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits (N, num_labels) of the denoised label state, running only `block`'s layers; with `denoised`, the
        pair (D_x, logits) of denoise_and_classify (so --compile, which compiles forward, covers the training loss)."""
        D_x, logits = self.denoise_and_classify(images, z, sigma, block)
        return (D_x, logits) if denoised else logits


def tie_block_layers(model: DiffusionBlocksViT) -> None:
    """Weight tying (--weight_tied): every block runs block 0's layers, the same modules and storages, so a step of
    any block trains them; each block keeps its own noise range."""
    for b in range(1, len(model.blocks)):
        model.blocks[b] = model.blocks[0]
    model._register_load_state_dict_pre_hook(functools.partial(fill_tied_entries, num_blocks=len(model.blocks)))


def fill_tied_entries(state_dict: dict, prefix: str, *args, num_blocks: int) -> None:
    """Load a weight-tied model's weights saved once (safetensors keeps one name of a shared tensor): each of the
    `num_blocks` blocks' entries missing from `state_dict` is the saved block's."""
    pattern = re.compile(re.escape(prefix) + r"blocks\.\d+\.(.*)")
    saved = {m.group(1): state_dict[key] for key in list(state_dict) if (m := pattern.fullmatch(key))}
    for b in range(num_blocks):
        for rest, value in saved.items():
            state_dict.setdefault(f"{prefix}blocks.{b}.{rest}", value)


class AssembledBlocks(NoisePartition, nn.Module):
    """A DiffusionBlocks model assembled from independently trained jobs: each block denoises with the stem
    and head of the job that trained it; all jobs share the seed-derived frozen label table."""

    def __init__(self, members: list[DiffusionBlocksViT]):
        super().__init__()
        first = members[0]
        self.arch, self.dcfg, self.edm_cfg, self.boundaries = first.arch, first.dcfg, first.edm_cfg, first.boundaries
        self.members = nn.ModuleList(members)
        self.owner = {b: i for i, member in enumerate(members) for b in member.built_blocks}

    def clean_targets(self, labels: torch.Tensor) -> torch.Tensor:
        return self.members[0].clean_targets(labels)

    def bridge_table(self) -> torch.Tensor:
        return self.members[0].bridge_table()

    def denoise_and_classify(
        self, images: torch.Tensor, z: torch.Tensor, sigma: torch.Tensor, block: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """D_x and logits of `block`'s denoiser, run by the job that trained it."""
        return self.members[self.owner[block]].denoise_and_classify(images, z, sigma, block)

    def forward(
        self, images: torch.Tensor, z: torch.Tensor, sigma: torch.Tensor, block: int, denoised: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits (with `denoised`: D_x and logits) of `block`'s denoiser, run by the job that trained it."""
        return self.members[self.owner[block]](images, z, sigma, block, denoised)


def block_table(model: NoisePartition) -> list[dict]:
    """Per block, block 0 first: its layer indices, noise range, gamma-widened training range and the
    probability mass of the (truncated) training log-normal inside its range."""
    rows, first = [], 0
    for b, n in enumerate(model.dcfg.layout(model.arch.num_hidden_layers)):
        lo, hi = edm.block_range(b, model.boundaries)
        rows.append(
            {
                "block": b,
                "layers": list(range(first, first + n)),
                "sigma_range": [lo, hi],
                "widened_range": list(model.training_range(b)),
                "probability_mass": edm.probability_mass(lo, hi, model.edm_cfg),
            }
        )
        first += n
    return rows


def block_for_step(seed: int, step: int, num_blocks: int) -> int:
    """Block trained at optimizer step `step`: a function of (seed, step) alone, so alike on every rank and resume."""
    g = torch.Generator().manual_seed(mix_seed(seed, step))
    return int(torch.randint(num_blocks, (1,), generator=g))


def noise_generator(seed: int, step: int, rank: int, micro_batch: int, device: torch.device) -> torch.Generator:
    """Generator of one micro-batch's sigmas, noise and image dropout: derived from (seed, step, rank, micro-batch),
    so DDP ranks draw different noise and a resumed run draws exactly what the straight run would."""
    key = mix_seed(mix_seed(mix_seed(seed, step), rank, multiplier=1_009), micro_batch, multiplier=1_013)
    return torch.Generator(device=device).manual_seed(key)


def denoising_losses(
    model: DiffusionBlocksViT,
    images: torch.Tensor,
    labels: torch.Tensor,
    sigma: torch.Tensor,
    eps: torch.Tensor,
    block: int,
    criterion: Criterion | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample loss (N,) of one block denoising target + sigma * eps, and the EDM weights w(sigma) (N,).

    The loss is `criterion(logits, labels, D_x, target)` (losses.Criterion), or the released cross-entropy of the
    logits when None.
    """
    target = model.clean_targets(labels)  # (N, D)
    z = target + edm.append_dims(sigma, 2) * eps
    D_x, logits = model(images, z, sigma, block, denoised=True)
    if criterion is None:
        loss = F.cross_entropy(logits.float(), labels, reduction="none")
    else:
        loss = criterion(logits, labels, D_x, target)
    return loss, edm.loss_weight(sigma, model.edm_cfg.sigma_data)


def block_losses(
    model: DiffusionBlocksViT,
    images: torch.Tensor,
    labels: torch.Tensor,
    block: int,
    generator: torch.Generator | None = None,
    class_dropout_prob: float = 0.0,
    criterion: Criterion | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample training losses of one block: (loss (N,), EDM weight (N,), sigma (N,)); the caller reduces them.

    The loss is the released cross-entropy unless a `criterion` is given (see denoising_losses).

    Sigmas, then noise, then image dropout (images blanked with `class_dropout_prob`, for guidance) are drawn
    from `generator`, in that order.
    """
    n = labels.shape[0]
    lo, hi = model.training_range(block)
    sigma = edm.sample_truncated_lognormal(n, lo, hi, cfg=model.edm_cfg, device=images.device, generator=generator)
    eps = torch.randn((n, model.arch.hidden_size), device=images.device, generator=generator)
    if model.training and class_dropout_prob > 0:
        keep = torch.rand(n, device=images.device, generator=generator) >= class_dropout_prob
        images = images * edm.append_dims(keep, images.ndim).to(images.dtype)
    loss, w = denoising_losses(model, images, labels, sigma, eps, block, criterion)
    return loss, w, sigma


def reduce_loss(ce: torch.Tensor, w: torch.Tensor, batch_mean_loss_weight: bool) -> torch.Tensor:
    """The batch loss: released mean(CE) * mean(w) (its N x N broadcast), or the paper's mean(CE * w)."""
    return ce.mean() * w.mean() if batch_mean_loss_weight else (ce * w).mean()


def guided_logits(
    model: DiffusionBlocksViT, images: torch.Tensor, z: torch.Tensor, sigma: torch.Tensor, block: int, cfg_scale: float
) -> torch.Tensor:
    """Logits with classifier-free guidance uncond + s * (cond - uncond) as released (s = 0: guidance off);
    the unconditional input is an all-zero image."""
    cond = model(images, z, sigma, block)
    if cfg_scale == 0.0:
        return cond
    uncond = model(torch.zeros_like(images), z, sigma, block)
    return uncond + cfg_scale * (cond - uncond)


def guided_denoised(
    model: DiffusionBlocksViT, images: torch.Tensor, z: torch.Tensor, sigma: torch.Tensor, block: int, cfg_scale: float
) -> torch.Tensor:
    """The denoised label state D_x (N, D), guided as guided_logits guides the logits (s = 0: guidance off)."""
    cond = model(images, z, sigma, block, denoised=True)[0]
    if cfg_scale == 0.0:
        return cond
    uncond = model(torch.zeros_like(images), z, sigma, block, denoised=True)[0]
    return uncond + cfg_scale * (cond - uncond)


def distance_logits(denoised: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Class logits of a label state read directly (models trained with --loss mse): minus its squared distance to
    each clean label embedding (N, num_labels); the nearest embedding wins."""
    return -torch.cdist(denoised.float()[None], targets.float()[None])[0] ** 2


# How the sampler reads a label state: "bridge" (released: softmax of the head's logits mixed over the label table)
# or "denoised" (EDM's own sampler, for --loss mse: the denoised state D_x itself, classified by distance_logits).
READOUTS = ("bridge", "denoised")


def sampler_grid(num_steps: int, cfg: edm.EDMConfig) -> list[float]:
    """The inference sigmas rounded to float32, as the released sampler holds them (this decides boundary routing)."""
    return torch.tensor(edm.inference_sigmas(num_steps, cfg), dtype=torch.float32).tolist()


@dataclass(frozen=True)
class SamplerStep:
    """One step of the sampler: the noise level it denoised, the block that did it, what it saw and predicted."""

    index: int  # 0 .. num_steps - 1
    sigma: float  # this step's noise level (a float32 grid value)
    block: int
    z: torch.Tensor  # (N, D) label state entering the step
    logits: torch.Tensor  # (N, num_labels) guided logits of the state
    # (N, D) the Euler step's target: the bridge estimate softmax(logits) @ table, or D_x (the "denoised" readout)
    denoised: torch.Tensor


@torch.no_grad()
def sampler_steps(
    model: DiffusionBlocksViT,
    images: torch.Tensor,
    num_steps: int,
    cfg_scale: float = 0.0,
    generator: torch.Generator | None = None,
    z0: torch.Tensor | None = None,
    readout: str = READOUTS[0],
) -> Iterator[SamplerStep]:
    """Euler sampler over the CDF-spaced sigma grid, yielding every step; each sigma is denoised by the block whose
    range holds it, and the last step's logits are the prediction.

    z0 is the unscaled starting noise (N, D); drawn from `generator` when not given. `readout` (READOUTS) says
    what a step's state is read as.
    """
    sigmas = sampler_grid(num_steps, model.edm_cfg)
    n, d = images.shape[0], model.arch.hidden_size
    if z0 is None:
        z0 = torch.randn(n, d, device=images.device, generator=generator)
    z = z0 * math.sqrt(1.0 + sigmas[0] ** 2)
    table = model.bridge_table()
    targets = model.clean_targets(torch.arange(table.shape[0], device=images.device))  # (num_labels, D)
    for i, sigma in enumerate(sigmas):
        block = model.block_of_sigma(sigma)
        sigma_n = torch.full((n,), sigma, device=images.device)
        if readout == "denoised":
            denoised = guided_denoised(model, images, z, sigma_n, block, cfg_scale)  # (N, D)
            logits = distance_logits(denoised, targets)
        else:
            logits = guided_logits(model, images, z, sigma_n, block, cfg_scale)
            denoised = logits.float().softmax(dim=-1) @ table.float()  # (N, D)
        yield SamplerStep(i, sigma, block, z, logits, denoised)
        if i + 1 < len(sigmas):
            z = edm.euler_step(z, denoised, sigma, sigmas[i + 1])


def sample_logits(*args, **kwargs) -> torch.Tensor:
    """Class logits (N, num_labels) of the sampler's last step; the arguments are sampler_steps's."""
    for step in sampler_steps(*args, **kwargs):
        pass
    return step.logits
