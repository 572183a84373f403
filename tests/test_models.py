"""Architecture facts of both models: parameter counts, initial state, gradient routing, quirks."""

import math

import pytest
import torch

import dblock
import edm
from dblock import block_for_step
from errors import UserError
from vit import ArchConfig, ViTClassifier, default_arch

TINY = ArchConfig(hidden_size=24, num_hidden_layers=6, num_attention_heads=2, intermediate_size=48, patch_size=8, image_size=16)


def tiny_dblock(**dcfg) -> dblock.DiffusionBlocksViT:
    return dblock.DiffusionBlocksViT(arch=TINY, num_labels=5, dcfg=dblock.DBlockConfig(**dcfg))


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_paper_parameter_counts():
    assert n_params(ViTClassifier(arch=ArchConfig(), num_labels=100)) == 10_302_180
    assert n_params(dblock.DiffusionBlocksViT(arch=ArchConfig(), num_labels=100)) == 10_529_095


def test_dataset_defaults():
    assert default_arch("cifar100") == ArchConfig()
    tin = default_arch("tiny-imagenet")
    assert (tin.hidden_size, tin.num_attention_heads, tin.image_size) == (768, 12, 64)
    assert default_arch("cifar100", hidden_size=64).hidden_size == 64


def test_bad_architectures_are_user_errors():
    with pytest.raises(UserError, match="does not divide --hidden_size"):
        ArchConfig(hidden_size=130, num_attention_heads=4)
    with pytest.raises(UserError, match="not divisible by --num_blocks"):
        dblock.DiffusionBlocksViT(arch=ArchConfig(), num_labels=10, dcfg=dblock.DBlockConfig(num_blocks=5))
    with pytest.raises(UserError, match="--gamma"):
        dblock.DBlockConfig(gamma=-0.1).validate(12)


def test_dblock_blocks_are_contiguous_layer_groups():
    m = dblock.DiffusionBlocksViT(arch=ArchConfig(), num_labels=100)
    assert [len(b) for b in m.blocks] == [4, 4, 4]
    assert m.block_layers()[4] is m.blocks[1][0]


def test_dblock_logits_are_zero_at_init_and_ce_is_log_classes():
    torch.manual_seed(0)
    m = tiny_dblock()
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,))
    z, sigma = torch.randn(4, 24), torch.full((4,), 0.5)
    assert torch.equal(m(x, z, sigma, 1), torch.zeros(4, 5))
    ce = dblock.block_losses(m, x, y, 0)[0]
    assert ce.tolist() == pytest.approx([math.log(5)] * 4, abs=1e-6)


def test_layers_start_as_identity():
    m = tiny_dblock()
    h, c = torch.randn(2, 5, 24), torch.randn(2, 24 // 6)
    assert torch.equal(m.blocks[0][0](h, c), h)


@pytest.mark.parametrize("block", [0, 1, 2])
def test_only_the_drawn_block_and_shared_parts_get_gradients(block):
    torch.manual_seed(0)
    m = tiny_dblock()
    for p in m.parameters():  # move off the zero init so every path carries gradient
        p.data.add_(0.01 * torch.randn_like(p))
    ce, w, _ = dblock.block_losses(m, torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,)), block)
    dblock.reduce_loss(ce, w, batch_mean_loss_weight=True).backward()
    for b, layers in enumerate(m.blocks):
        grads = [p.grad for p in layers.parameters()]
        if b == block:
            assert all(g is not None and g.abs().sum() > 0 for g in grads)
        else:
            assert all(g is None for g in grads)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.shared_parameters())


def test_block_sequence_depends_only_on_seed_and_step():
    seq = [block_for_step(42, s, 3) for s in range(300)]
    assert seq == [block_for_step(42, s, 3) for s in range(300)]
    assert seq != [block_for_step(7, s, 3) for s in range(300)]
    counts = [seq.count(b) for b in range(3)]
    assert min(counts) > 70  # uniform over blocks


def _perturbed(m):
    g = torch.Generator().manual_seed(1)
    for p in m.parameters():
        p.data.add_(0.05 * torch.randn(p.shape, generator=g))
    return m


# Batch losses of the perturbed seed-0 tiny model below, printed by `dblock.training_loss` at commit b66bf5f (before
# the loss returned per-sample values): (released mean(CE) * mean(w), paper mean(CE * w), mean CE).
PINNED_LOSSES = (797.5751953125, 802.9677734375, 1.6463180780410767)


def test_per_sample_losses_reduce_to_the_pinned_batch_losses_both_ways():
    torch.manual_seed(0)
    m = _perturbed(tiny_dblock()).eval()
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(6, 3, 16, 16, generator=g), torch.randint(0, 5, (6,), generator=g)
    ce, w, sigma = dblock.block_losses(m, x, y, 2, generator=torch.Generator().manual_seed(3))
    assert ce.shape == w.shape == sigma.shape == (6,)
    released, paper, mean_ce = PINNED_LOSSES
    assert dblock.reduce_loss(ce, w, batch_mean_loss_weight=True).item() == pytest.approx(released, rel=1e-6)
    assert dblock.reduce_loss(ce, w, batch_mean_loss_weight=False).item() == pytest.approx(paper, rel=1e-6)
    assert ce.mean().item() == pytest.approx(mean_ce, rel=1e-6)
    assert torch.equal(w, edm.loss_weight(sigma))
    # The two reductions differ by far more than the tolerance used above.
    assert abs(released - paper) > 100 * 1e-6 * paper


def test_raw_embedding_bridge_quirk():
    raw = _perturbed(tiny_dblock(raw_embedding_bridge=True))
    norm = tiny_dblock(raw_embedding_bridge=False)
    norm.load_state_dict(raw.state_dict())
    assert torch.equal(raw.bridge_table(), raw.label_embed.weight)
    assert torch.allclose(norm.bridge_table().norm(dim=-1), torch.ones(5))
    x = torch.randn(3, 3, 16, 16)
    a = dblock.sample_logits(raw.eval(), x, 3, generator=torch.Generator().manual_seed(0))
    b = dblock.sample_logits(norm.eval(), x, 3, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(a, b)


def test_sampler_visits_each_block_once_with_b_steps(monkeypatch):
    m = tiny_dblock().eval()
    visited = []
    original = dblock.DiffusionBlocksViT.forward

    def spy(self, images, z, sigma, block):
        visited.append((block, round(float(sigma[0]), 5)))
        return original(self, images, z, sigma, block)

    monkeypatch.setattr(dblock.DiffusionBlocksViT, "forward", spy)
    dblock.sample_logits(m, torch.randn(2, 3, 16, 16), 3)
    assert visited == [(0, 80.0), (1, 0.3012), (2, 0.002)]
    visited.clear()
    dblock.sample_logits(m, torch.randn(2, 3, 16, 16), 5)
    assert len(visited) == 5 and [b for b, _ in visited] == sorted(b for b, _ in visited)


def test_cfg_changes_logits_only_when_scale_nonzero():
    m = _perturbed(tiny_dblock()).eval()
    x, z, s = torch.randn(2, 3, 16, 16), torch.randn(2, 24), torch.full((2,), 0.3)
    cond = m(x, z, s, 1)
    assert torch.equal(dblock.guided_logits(m, x, z, s, 1, 0.0), cond)
    uncond = m(torch.zeros_like(x), z, s, 1)
    assert torch.allclose(dblock.guided_logits(m, x, z, s, 1, 2.0), uncond + 2.0 * (cond - uncond))
    assert torch.allclose(dblock.guided_logits(m, x, z, s, 1, 1.0), cond)


def test_compile_flag_compiles_in_place_and_keeps_checkpoint_keys():
    from module import LitClassifier

    tiny = dict(hidden_size=12, num_hidden_layers=3, num_attention_heads=2, intermediate_size=24, patch_size=8, image_size=16)
    plain = LitClassifier(model_type="dblock", arch=tiny, num_labels=3)
    compiled = LitClassifier(model_type="dblock", arch=tiny, num_labels=3, compile_model=True)
    compiled.setup("fit")
    assert compiled.model._compiled_call_impl is not None and plain.model._compiled_call_impl is None
    assert compiled.state_dict().keys() == plain.state_dict().keys()


def test_network_reads_the_label_state_and_the_noise_level():
    """The raw network output F_x depends on the c_in-scaled label state and on sigma (through the noise embedding).

    The denoised estimate also carries z through c_skip, so a network blind to either would still
    classify; this looks at F_x itself (the final LayerNorm's token 0) with the network's input held fixed.
    """
    m = tiny_dblock().eval()
    g = torch.Generator().manual_seed(1)
    for p in m.parameters():  # far from the zero init, so the noise level reaches F_x by more than rounding
        p.data.add_(0.5 * torch.randn(p.shape, generator=g))
    outputs = []
    m.final_norm.register_forward_hook(lambda module, args, out: outputs.append(out[:, 0]))
    x, token, other_token = torch.randn(2, 3, 16, 16, generator=g), torch.randn(2, 24, generator=g), torch.randn(2, 24, generator=g)

    def network_output(token, sigma):
        s = torch.full((2,), sigma)
        m(x, token / edm.c_in(s)[:, None], s, 1)  # z chosen so the network's label token is `token` at every sigma
        return outputs.pop()

    base = network_output(token, 0.3)
    assert (network_output(other_token, 0.3) - base).abs().max() > 0.05, "F_x ignores the label state"
    assert (network_output(token, 3.0) - base).abs().max() > 0.05, "F_x ignores the noise level"
