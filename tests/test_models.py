"""The model zoo: every architecture × backbone runs forward and backward at any size, the
canonical parameter counts follow from the papers' architectures, the blocks compute their
stated formulas, and bad definitions fail with a message naming the key or the file."""

import inspect
import math
import re
from pathlib import Path

import pytest
import torch
import torchvision

from segpipe import SegpipeError
from segpipe.cli import main
from segpipe.columns import AXES
from segpipe.labels import Labels
from segpipe.models import ARCHITECTURES, BACKBONES, build_model, model_cost, print_model_table
from segpipe.models.blocks import AtrousBlock, AttentionGate, RecurrentConv
from segpipe.models.unetpp import mean_probability_logit
from segpipe.spec import check_spec, encoder_defaults, schema

torch.set_num_threads(1)

# Published parameter counts of torchvision's ResNets (torchvision docs) minus the
# 1000-class fc layer (512·1000 + 1000, or 2048·1000 + 1000 for ResNet-50), which we drop.
RESNET_ENCODER_PARAMETERS = {"resnet18": 11_689_512 - 513_000,
                             "resnet34": 21_797_672 - 513_000,
                             "resnet50": 25_557_032 - 2_049_000}


def small(architecture: str, backbone: str) -> tuple[dict, dict]:
    """A small definition of every combination (ResNets keep all 5 stages)."""
    if backbone == "scratch":
        return {"model": architecture, "width": 8, "depth": 3}, {}
    return {"model": architecture, "width": 8}, {"encoder": backbone, "weights": "none"}


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_every_combination_runs_forward_and_backward_at_any_size(architecture, backbone):
    torch.manual_seed(0)
    model = build_model(*small(architecture, backbone))
    groups = model.parameter_groups()
    everything = list(model.parameters())
    assert sorted(map(id, groups["encoder"] + groups["decoder"])) == sorted(map(id, everything))
    if backbone != "scratch":
        assert sum(p.numel() for p in groups["encoder"]) == RESNET_ENCODER_PARAMETERS[backbone]
    first_layer = groups["encoder"][0]
    assert first_layer.shape[1] == 3  # the convolution that sees the RGB image
    for height, width in [(64, 64), (67, 93)]:
        model.zero_grad(set_to_none=True)
        logits = model(torch.randn(1, 3, height, width))
        assert logits.shape == (1, 1, height, width)
        logits.square().mean().backward()
        assert first_layer.grad is not None and first_layer.grad.abs().sum() > 0
        assert [n for n, p in model.named_parameters() if p.grad is None] == []
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 33, 17)).shape == (2, 1, 33, 17)


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_every_combination_has_a_head_of_the_labels_width(architecture, backbone):
    """Several classes: background + 3 classes -> 4 logit channels, in training (every head of
    U-Net++'s deep supervision) and evaluation."""
    labels = Labels(("a", "b", "c"), configured=True)
    model = build_model(*small(architecture, backbone), labels.outputs)
    outputs = model(torch.randn(2, 3, 35, 29))
    for logits in outputs if isinstance(outputs, list) else [outputs]:
        assert logits.shape == (2, 4, 35, 29)
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 35, 29)).shape == (1, 4, 35, 29)


def test_unetpp_averages_the_heads_softmax_probabilities():
    """Several classes: the softmax of the evaluation output is the mean of the heads' softmax
    probabilities (one head sure of class 2, three unsure: not the softmax of mean logits)."""
    heads = [torch.tensor([0.0, 0.0, 12.0])] + [torch.tensor([1.0, 0.0, -1.0])] * 3
    logits = [h.view(1, 3, 1, 1) for h in heads]
    expected = torch.stack([torch.softmax(h, 0) for h in heads]).mean(0)
    torch.testing.assert_close(torch.softmax(mean_probability_logit(logits), 1).flatten(),
                               expected)
    model = build_model({"model": "unetpp", "width": 2, "depth": 2, "deep_supervision": True},
                        {}, 3).eval()
    with torch.no_grad():
        for head, bias in zip(model.decoder.heads, heads[:2]):
            head.weight.zero_()
            head.bias.copy_(bias)
        probability = torch.softmax(model(torch.randn(1, 3, 8, 8)), 1)[0, :, 0, 0]
    torch.testing.assert_close(probability, torch.stack(
        [torch.softmax(h, 0) for h in heads[:2]]).mean(0))


# Parameter counts by hand. A convolution with BatchNorm has k²·c_in·c_out weights and the
# BatchNorm's γ and β (no bias); a convolution without BatchNorm has a bias instead.
def conv(c_in, c_out, k=3, bn=True):
    return k * k * c_in * c_out + (2 if bn else 1) * c_out


def double(c_in, c_out, bn=True):  # U-Net's two 3×3 convolutions
    return conv(c_in, c_out, bn=bn) + conv(c_out, c_out, bn=bn)


def up(c_in, c_out, mode="transpose"):  # 2×2 transposed conv, bilinear + 1×1 conv, or nearest
    if mode == "nearest":
        return 0
    return conv(c_in, c_out, 2 if mode == "transpose" else 1, bn=False)


def rrcnn(c_in, c_out):  # 1×1 projection (bias) + two recurrent layers sharing ONE conv each
    return conv(c_in, c_out, 1, bn=False) + 2 * conv(c_out, c_out)


def atrous(c_in, c_out):  # 1×1 and three dilated 3×3 branches, 1×1 fusion of the 4·c_out
    return conv(c_in, c_out, 1) + 3 * conv(c_in, c_out) + conv(4 * c_out, c_out, 1)


def gate(c_x, c_g, inter):  # W_x 2×2 (no bias), W_g 1×1 + b_g, ψ 1×1 + b_ψ
    return 4 * c_x * inter + (c_g * inter + inter) + (inter + 1)


def unet_count(width=64, depth=4, block=double, decoder_block=None, down="maxpool",
               up_mode="transpose", gates=False, bn=True, head=1):
    """Encoder: block(3, w), then per level a downsampling and block(c, 2c); decoder per level:
    up(2c, c), [gate], block(2c, c) (nearest: no up, block(3c, c)); head: head×head conv."""
    decoder_block = decoder_block or block
    c = [width * 2**i for i in range(depth + 1)]
    total = block(3, c[0]) + conv(c[0], 1, head, bn=False)
    for i in range(1, depth + 1):
        total += block(c[i - 1], c[i]) + (conv(c[i - 1], c[i - 1]) if down == "strided" else 0)
    for i in range(depth):
        upsampled = c[i + 1] if up_mode == "nearest" else c[i]
        total += up(c[i + 1], c[i], up_mode) + decoder_block(c[i] + upsampled, c[i])
        total += gate(c[i], c[i + 1], c[i] // 2) if gates else 0
    return total


def unetpp_count(width=64, depth=4, heads=1, bn=True):
    """U-Net's encoder; node X^{i,j} (j ≥ 1, i + j ≤ D): up(2c_i, c_i) and a double conv of
    (j + 1)·c_i input channels (X^{i,0..j−1} and the upsampled X^{i+1,j−1})."""
    c = [width * 2**i for i in range(depth + 1)]
    total = double(3, c[0], bn) + sum(double(c[i - 1], c[i], bn) for i in range(1, depth + 1))
    for j in range(1, depth + 1):
        for i in range(depth - j + 1):
            total += up(c[i + 1], c[i]) + double((j + 1) * c[i], c[i], bn)
    return total + heads * conv(c[0], 1, 1, bn=False)


def test_the_count_formulas_reproduce_the_unetpp_paper():
    """Zhou et al. 2018 (Table 1) report 7.76M parameters for U-Net and 9.04M for UNet++
    with base width 32, depth 4, convolutions with bias and no BatchNorm."""
    no_bn = lambda c_in, c_out: double(c_in, c_out, bn=False)  # noqa: E731
    assert round(unet_count(32, block=no_bn) / 1e6, 2) == 7.76
    assert round(unetpp_count(32, bn=False) / 1e6, 2) == 9.04


CANONICAL = [  # width 64, depth 4
    ({"model": "unet"}, unet_count()),
    ({"model": "unet", "down": "strided"}, unet_count(down="strided")),
    ({"model": "unet", "up": "bilinear"}, unet_count(up_mode="bilinear")),
    ({"model": "unet", "down": "strided", "up": "bilinear"},
     unet_count(down="strided", up_mode="bilinear")),
    ({"model": "unet", "up": "nearest", "head": 3}, unet_count(up_mode="nearest", head=3)),
    ({"model": "unetpp"}, unetpp_count()),
    ({"model": "unetpp", "deep_supervision": True}, unetpp_count(heads=4)),
    ({"model": "attention_unet"}, unet_count(gates=True)),
    ({"model": "r2unet"}, unet_count(block=rrcnn)),
    ({"model": "r2unet", "t": 3}, unet_count(block=rrcnn)),  # t reuses the same convolution
    ({"model": "attention_r2unet"}, unet_count(block=rrcnn, gates=True)),
    ({"model": "atrous_unet"}, unet_count(decoder_block=atrous)),
]


@pytest.mark.parametrize("architecture, expected", CANONICAL, ids=lambda v: str(v))
def test_canonical_parameter_counts(architecture, expected):
    with torch.device("meta"):  # counting only: no memory, no initialisation
        model = build_model(architecture, {})
    assert sum(p.numel() for p in model.parameters()) == expected


def test_model_cost_counts_every_convolution():
    """U-Net FLOPs by hand: 2·k²·c_in·c_out per output pixel of each convolution; the 2×2
    stride-2 transposed convolution costs 2·c_in·c_out per output pixel."""
    size, c = 64, [16 * 2**i for i in range(4)]
    area = [(size // 2**i) ** 2 for i in range(4)]
    flops = 2 * 9 * (3 * c[0] + c[0] ** 2) * area[0] + 2 * c[0] * area[0]
    for i in range(1, 4):
        flops += 2 * 9 * (c[i - 1] * c[i] + c[i] ** 2) * area[i]
    for i in range(3):
        flops += 2 * c[i + 1] * c[i] * area[i] + 2 * 9 * (3 * c[i] ** 2) * area[i]
    with torch.device("meta"):
        model = build_model({"model": "unet", "width": 16, "depth": 3}, {})
    assert model_cost(model, size) == (unet_count(16, 3), flops / 1e9)


def test_print_model_table_lists_every_combination(capsys):
    print_model_table(size=32)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 + len(ARCHITECTURES) * len(BACKBONES)
    rows = {tuple(line.split()[:2]): line.split()[2] for line in lines[1:]}
    assert set(rows) == {(a, b) for a in ARCHITECTURES for b in BACKBONES}
    assert rows["unet", "scratch"] == f"{unet_count():,}"


def test_the_docs_table_is_the_output_of_segpipe_models_markdown(capsys):
    """docs/models.md shows `segpipe models --markdown` verbatim (about 6 s: FLOPs of all 24
    models at 256×256, counted on the meta device)."""
    docs = (Path(__file__).resolve().parents[1] / "docs" / "models.md").read_text()
    table = re.search(r"<!-- begin: segpipe models --markdown[^>]*-->\n(.*?)"
                      r"<!-- end: segpipe models --markdown -->", docs, re.S)
    assert main(["models", "--markdown"]) == 0
    assert table.group(1) == capsys.readouterr().out


def test_unetpp_deep_supervision_returns_every_nested_output():
    torch.manual_seed(0)
    model = build_model({"model": "unetpp", "width": 4, "depth": 3, "deep_supervision": True}, {})
    x = torch.randn(2, 3, 21, 30)
    outputs = model(x)
    assert isinstance(outputs, list) and len(outputs) == 3
    assert all(o.shape == (2, 1, 21, 30) for o in outputs)
    model.eval()
    with torch.no_grad():
        mean = model(x)
        model.decoder.training = True  # the decoder alone: BatchNorm stays in eval mode
        heads = model(x)
    assert len(heads) == 3
    torch.testing.assert_close(torch.sigmoid(mean), torch.sigmoid(torch.stack(heads)).mean(0))


def test_unetpp_evaluation_averages_the_heads_probabilities():
    """Zhou et al. (2018) average the heads' sigmoid outputs: heads with constant logits
    (−10, 1, 1, 1) give (σ(−10) + 3·σ(1))/4 = 0.548, not σ(mean logit) = σ(−1.75) = 0.148."""
    model = build_model({"model": "unetpp", "width": 2, "depth": 4, "deep_supervision": True},
                        {}).eval()
    with torch.no_grad():
        for head, bias in zip(model.decoder.heads, (-10.0, 1.0, 1.0, 1.0)):
            head.weight.zero_()
            head.bias.fill_(bias)
        probability = torch.sigmoid(model(torch.randn(1, 3, 16, 16)))
    torch.testing.assert_close(probability, torch.full((1, 1, 16, 16), 0.548305),
                               atol=1e-6, rtol=0)
    # No overflow where the heads are sure: σ of the result stays the mean probability.
    logits = [torch.tensor([-200.0, 200.0, 30.0]), torch.tensor([-100.0, 100.0, -30.0])]
    logits = [x.view(1, 1, 1, 3) for x in logits]
    torch.testing.assert_close(torch.sigmoid(mean_probability_logit(logits)),
                               torch.tensor([0.0, 1.0, 0.5]).view(1, 1, 1, 3))


def test_attention_gate_hand_computed():
    """x = [[1, 2], [3, 4]], g = −7, W_x = ones(2×2), W_g = 1, ψ = 1, biases 0:
    α = σ(ReLU(1 + 2 + 3 + 4 − 7)) = σ(3) on the 1×1 grid, resampled to 2×2, output α·x."""
    gate_ = AttentionGate(1, 1, 1)
    for p in gate_.parameters():
        torch.nn.init.ones_(p) if p.dim() == 4 else torch.nn.init.zeros_(p)
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    out = gate_(x, torch.tensor([[[[-7.0]]]]))
    torch.testing.assert_close(out, x * (1 / (1 + math.exp(-3))))


def test_recurrent_conv_shares_one_convolution_over_t_steps():
    """f(z) = ReLU(BN(2z)) with BatchNorm in eval mode (mean 0, var 1): f(z) = 2z·s,
    s = 1/√(1 + 1e-5). For x = 1 and t = 2: h₀ = 2s, h₁ = 2s(1 + h₀), h₂ = 2s(1 + h₁)."""
    layer = RecurrentConv(1, t=2).eval()
    assert sum(p.numel() for p in layer.parameters()) == 9 + 2
    with torch.no_grad():
        layer.conv[0].weight.zero_()
        layer.conv[0].weight[0, 0, 1, 1] = 2.0
        out = layer(torch.ones(1, 1, 3, 3))
    s = 1 / math.sqrt(1 + 1e-5)
    h = 2 * s
    for _ in range(2):
        h = 2 * s * (1 + h)
    torch.testing.assert_close(out, torch.full((1, 1, 3, 3), h))


def test_atrous_block_sees_exactly_its_dilated_taps():
    """The centre output depends on the input at offsets {−r, 0, r}² for r ∈ {6, 12, 18}
    (and the centre, for the 1×1 branch): positive weights keep every ReLU active."""
    block = AtrousBlock(1, 1, (1, 6, 12, 18)).eval()
    for p in block.parameters():
        torch.nn.init.constant_(p, 0.5)
    x = torch.ones(1, 1, 41, 41, requires_grad=True)
    block(x)[0, 0, 20, 20].backward()
    seen = {(int(i) - 20, int(j) - 20) for i, j in x.grad[0, 0].nonzero()}
    assert seen == {(dy * r, dx * r) for r in (6, 12, 18) for dy in (-1, 0, 1) for dx in (-1, 0, 1)}


def test_small_stem_resnet_starts_at_the_image_resolution():
    """stem: small: conv1 is a 3×3 convolution of stride 1, so the pyramid is conv1 (stride 1),
    maxpool + layer1 (2), layer2 (4), layer3 (8), layer4 (16) — one stride-2 stage fewer,
    all used by default — and the ResNet's parameters but conv1's are torchvision's."""
    model = build_model({"model": "unet", "width": 4},
                        {"encoder": "resnet18", "weights": "none", "stem": "small"})
    features = model.encoder(torch.zeros(1, 3, 32, 48))
    assert [tuple(f.shape[1:]) for f in features] == [
        (64, 32, 48), (64, 16, 24), (128, 8, 12), (256, 4, 6), (512, 2, 3)]
    conv1 = model.encoder.stages[0][0]
    assert (conv1.kernel_size, conv1.stride) == ((3, 3), (1, 1))
    assert sum(p.numel() for p in model.encoder.parameters()) == \
        RESNET_ENCODER_PARAMETERS["resnet18"] - 64 * 3 * 7 * 7 + 64 * 3 * 3 * 3
    assert model(torch.randn(2, 3, 30, 44)).shape == (2, 1, 30, 44)
    shallow = build_model({"model": "attention_unet", "width": 4, "depth": 2},
                          {"encoder": "resnet34", "weights": "none", "stem": "small"})
    assert shallow.encoder.out_channels == [64, 64, 128]


def test_resnet_weights_from_a_local_state_dict(tmp_path):
    torch.manual_seed(1)
    reference = torchvision.models.resnet18()
    path = tmp_path / "resnet18.pt"
    torch.save(reference.state_dict(), path)
    model = build_model({"model": "unet", "width": 4, "depth": 2},
                        {"encoder": "resnet18", "weights": str(path)})
    conv1, layer1 = model.encoder.stages[1][0], model.encoder.stages[2][1]
    torch.testing.assert_close(conv1.weight, reference.conv1.weight, rtol=0, atol=0)
    torch.testing.assert_close(layer1.state_dict(), reference.layer1.state_dict(), rtol=0, atol=0)
    assert model.encoder.depth == 2 and model(torch.randn(1, 3, 10, 10)).shape == (1, 1, 10, 10)


def test_imagenet_weights_come_from_the_torch_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    cached = tmp_path / "hub" / "checkpoints" / weights.url.rsplit("/", 1)[1]
    cached.parent.mkdir(parents=True)
    torch.manual_seed(2)
    reference = torchvision.models.resnet18()
    torch.save(reference.state_dict(), cached)
    model = build_model({"model": "unet", "width": 4, "depth": 1},
                        {"encoder": "resnet18", "weights": "imagenet"})
    torch.testing.assert_close(model.encoder.stages[1][0].weight, reference.conv1.weight,
                               rtol=0, atol=0)


def test_missing_imagenet_weights_are_never_downloaded_and_say_how_to_supply_them(
        tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # empty cache
    fetched = []
    monkeypatch.setattr("urllib.request.urlopen", lambda *a, **k: fetched.append(a))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: fetched.append(a))
    path = tmp_path / "hub" / "checkpoints" / "resnet34-b627a593.pth"
    with pytest.raises(SegpipeError, match=rf"^backbone resnet34 with weights: imagenet: {path} "
                                           r"not found \(training never downloads\): on a "
                                           r"machine with internet run `segpipe fetch-weights "
                                           r"--encoder resnet34`"):
        build_model({"model": "attention_r2unet"}, {"encoder": "resnet34", "weights": "imagenet"})
    assert fetched == [] and not any(tmp_path.rglob("*.pth"))


@pytest.mark.parametrize("content, message", [
    (None, "backbone weights file not found"),
    (b"not a pickle", "not a readable PyTorch state dict"),
    ({"conv1.weight": torch.zeros(64, 3, 3, 3)}, "not a state dict of a torchvision resnet18: "
                                                  "Missing key"),
    ([1, 2], "not a state dict"),
])
def test_bad_state_dict_files(tmp_path, content, message):
    path = tmp_path / "weights.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(SegpipeError, match=message) as error:
        build_model({"model": "unet"}, {"encoder": "resnet18", "weights": str(path)})
    assert str(path) in str(error.value)


@pytest.mark.parametrize("architecture, backbone, message", [
    ({"width": 8}, {}, "architecture.model: missing"),
    ({"model": "transunet"}, {}, "model: 'transunet' is not one of unet, unetpp"),
    ({"model": "unet", "dropout": 0.1}, {},
     r"dropout: unknown key \(allowed: model, width, depth, down, up, head\)"),
    ({"model": "unet", "t": 2}, {},
     r"t: unknown key \(allowed: model, width, depth, down, up, head\)"),
    ({"model": "r2unet", "t": 2, "rates": [1]}, {}, r"rates: unknown key \(allowed: .*, t\)"),
    ({"model": "unet", "width": 0}, {}, "width: 0 is less than the minimum of 1"),
    ({"model": "unet", "depth": 2.0}, {}, "depth: 2.0 is not of type 'integer'"),
    ({"model": "unet", "down": "avgpool"}, {}, "down: 'avgpool' is not one of maxpool, strided"),
    ({"model": "unet", "up": "shuffle"}, {},
     "up: 'shuffle' is not one of transpose, bilinear, nearest"),
    ({"model": "unet", "head": 5}, {}, "head: 5 is not one of 1, 3"),
    ({"model": "unetpp", "deep_supervision": "yes"}, {},
     "deep_supervision: 'yes' is not of type 'boolean'"),
    ({"model": "atrous_unet", "rates": []}, {}, r"rates: \[\] should be non-empty"),
    ({"model": "unet"}, {"encoder": "vgg16", "weights": "none"},
     "backbone.encoder: 'vgg16' is not one of scratch, resnet18"),
    ({"model": "unet"}, {"encoder": "resnet34"}, "backbone.weights: missing"),
    ({"model": "unet"}, {"encoder": "resnet34", "weights": "none", "frozen": True},
     r"frozen: unknown key \(allowed: encoder, weights, stem\)"),
    ({"model": "unet"}, {"stem": "small"}, "the scratch encoder takes no weights or stem"),
    ({"model": "unet"}, {"encoder": "resnet18", "weights": "imagenet", "stem": "small"},
     r"stem: small starts from random initialisation \(weights: none\)"),
    ({"model": "unet", "depth": 5}, {"encoder": "resnet18", "weights": "none", "stem": "small"},
     r"architecture.depth: 5 exceeds the 4 stages of the resnet18 encoder \(backbone\) with "
     "stem: small"),
    ({"model": "unet"}, {"weights": "imagenet"}, "the scratch encoder takes no weights"),
    ({"model": "unet", "down": "strided"}, {"encoder": "resnet18", "weights": "none"},
     r"architecture.down: does not apply under the resnet18 encoder \(backbone\)"),
    ({"model": "unet", "depth": 6}, {"encoder": "resnet18", "weights": "none"},
     r"architecture.depth: 6 exceeds the 5 stages of the resnet18 encoder \(backbone\)"),
])
def test_bad_definitions_name_the_key(architecture, backbone, message):
    """Checked where a run enters (`segpipe train`'s spec; the workflow's start checks the
    config by the same schema), not again by build_model."""
    spec = {"run": "r", "seed": 0, "names": dict.fromkeys(AXES, "x"), "architecture": architecture,
            "backbone": backbone, "loss": {"bce": 1.0}, "augmentation": {}, "train": {}}
    with pytest.raises(SegpipeError, match=f"^run spec: .*{message}"):
        check_spec(spec)


def test_the_schema_lists_every_registered_family_with_the_options_of_its_class():
    """The one check between the registry (segpipe/models/, each family registered by its
    module) and the config contract ($defs.architecture.families, from which the enum of
    `model` and each family's unknown-key rule are made), so neither can drift."""
    families = schema()["$defs"]["architecture"]["families"]
    assert list(families) == list(ARCHITECTURES)
    for name, cls in ARCHITECTURES.items():
        options = [p for p in inspect.signature(cls).parameters if p not in ("encoder", "outputs")]
        assert families[name] == options, name
        for option in options:  # each is typed in the schema
            assert option in schema()["$defs"]["architecture"]["properties"], (name, option)


def test_model_defaults_are_written_in_the_schema_only():
    """Every family option has its default in the schema and none in the class signature; an
    option left out of a definition builds the model the schema's default builds."""
    properties = schema()["$defs"]["architecture"]["properties"]
    for name, cls in ARCHITECTURES.items():
        for option in schema()["$defs"]["architecture"]["families"][name]:
            assert "default" in properties[option], option
            assert inspect.signature(cls).parameters[option].default is inspect.Parameter.empty
    explicit = {"model": "atrous_unet", "width": 64, "depth": 4, "down": "maxpool",
                "up": "transpose", "rates": [1, 6, 12, 18]}
    assert {k: properties[k]["default"] for k in explicit if k != "model"} == \
        {k: v for k, v in explicit.items() if k != "model"}
    with torch.device("meta"):
        counts = [sum(p.numel() for p in build_model(d, {}).parameters())
                  for d in ({"model": "atrous_unet"}, explicit)]
        under_resnet = build_model({"model": "unet"}, {"encoder": "resnet34", "weights": "none"})
    assert counts[0] == counts[1]
    assert under_resnet.encoder.depth == 5  # all the stride-2 stages of the ResNet
    assert under_resnet.decoder.head.in_channels == properties["width"]["resnet_default"] == 16


def test_unet_decoder_channel_flow_under_resnet34():
    """Under a ResNet the default decoder is smp's Unet decoder (issue 28, docs/models.md):
    level i (stride 2^i) upsamples every coarser channel by nearest neighbour (layer4's 512,
    then the decoder's 16·2^(i+1)), concatenates the skip f_i (conv1, layer1..layer3; none at
    level 0, where f_0 has 0 channels), and its double convolution returns 16·2^i channels;
    the head is a 3×3 convolution. The parameters are smp.Unet("resnet34")'s."""
    model = build_model({"model": "unet"}, {"encoder": "resnet34", "weights": "none"}, 3)
    assert all(isinstance(u, torch.nn.Upsample) and u.mode == "nearest" and u.scale_factor == 2
               for u in model.decoder.ups)
    blocks = [(b[0][0].in_channels, b[1][0].out_channels) for b in model.decoder.blocks]
    assert blocks == [(0 + 32, 16), (64 + 64, 32), (64 + 128, 64), (128 + 256, 128),
                      (256 + 512, 256)]
    assert (model.decoder.head.in_channels, model.decoder.head.out_channels,
            model.decoder.head.kernel_size) == (16, 3, (3, 3))
    features = model.encoder.eval()(torch.zeros(1, 3, 32, 32))
    assert [tuple(f.shape[1:]) for f in features[:2]] == [(0, 32, 32), (64, 16, 16)]
    decoder = sum(double(c_in, c_out) for c_in, c_out in blocks) + conv(16, 3, 3, bn=False)
    assert sum(p.numel() for p in model.parameters()) == \
        RESNET_ENCODER_PARAMETERS["resnet34"] + decoder
    # the decoder before issue 28 stays selectable: up-convolutions to the level's width and
    # U-Net's 1×1 head (with no image skip now)
    before = build_model({"model": "unet", "up": "transpose", "head": 1},
                         {"encoder": "resnet34", "weights": "none"}, 3)
    assert [(b[0][0].in_channels) for b in before.decoder.blocks] == [16, 96, 128, 256, 512]
    assert before.decoder.head.kernel_size == (1, 1)


def test_a_run_spec_under_a_resnet_writes_the_decoder_defaults_out():
    """The workflow's run spec carries the encoder-dependent defaults (so a changed default is a
    changed run, trained again): under a ResNet those a definition leaves out, none for scratch;
    the model they build is the one the definition builds."""
    resnet = {"encoder": "resnet18", "weights": "none"}
    assert encoder_defaults({"model": "unetpp"}, resnet) == {"width": 16, "up": "nearest",
                                                             "head": 3}
    assert encoder_defaults({"model": "unet", "up": "transpose"}, resnet) == {"width": 16,
                                                                             "head": 3}
    assert encoder_defaults({"model": "unet"}, {}) == {}
    assert encoder_defaults({"model": "unet"}, {**resnet, "stem": "small"}) == {"width": 16}
    with torch.device("meta"):
        counts = {sum(p.numel() for p in build_model(d, resnet).parameters())
                  for d in ({"model": "unet"}, {"model": "unet", **encoder_defaults(
                      {"model": "unet"}, resnet)})}
    assert len(counts) == 1


def test_a_checkpoint_of_the_earlier_resnet_decoder_is_named_as_such(tmp_path):
    """Weights of the decoder segpipe had under a ResNet before issue 28 (up-convolutions, 1×1
    head), saved with a definition that leaves the options out: the error says to retrain."""
    from segpipe.checkpoint import load_checkpoint, make_checkpoint

    backbone = {"encoder": "resnet18", "weights": "none"}
    spec = {"run": "old", "architecture": {"model": "unet", "depth": 2}, "backbone": backbone}
    earlier = build_model({"model": "unet", "depth": 2, "up": "transpose", "head": 1}, backbone)
    torch.save(make_checkpoint(spec, earlier.state_dict(), (8, 8)), tmp_path / "model.pt")
    with pytest.raises(SegpipeError, match=r"the weights do not fit .*; the decoder under a "
                       r"ResNet has changed \(docs/models.md, Backbones\): a run trained before "
                       r"must be trained again$"):
        load_checkpoint(tmp_path / "model.pt")


def test_decoder_under_a_resnet_is_initialised_as_smp_initialises_it():
    """He-uniform convolutions (bound √(6/fan_in)), Xavier-uniform heads (bound
    √(6/(fan_in + fan_out))), zero biases: the std of a uniform(−b, b) is b/√3; scratch models
    keep PyTorch's default (bound 1/√fan_in, 2.45× smaller than He's)."""
    torch.manual_seed(0)
    model = build_model({"model": "unetpp", "deep_supervision": True},
                        {"encoder": "resnet34", "weights": "none"}, 3)
    conv = model.decoder.blocks[0][-1][0][0]  # X^{4,1}: 3×3, 256 + 512 → 256 channels
    bound = math.sqrt(6 / (9 * conv.in_channels))
    assert conv.weight.abs().max() <= bound
    assert conv.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.01)
    for head in model.decoder.heads:
        xavier = math.sqrt(6 / (9 * (head.in_channels + head.out_channels)))
        assert head.weight.abs().max() <= xavier < bound * 10
        assert head.weight.abs().max() > 0.9 * xavier and not head.bias.any()
    scratch = build_model({"model": "unet"}, {})
    default = scratch.decoder.blocks[-1][0][0]
    assert default.weight.abs().max() <= 1 / math.sqrt(9 * default.in_channels)


def test_recurrent_conv_keeps_batchnorm_statistics_per_step():
    """Cooijmans et al. 2017: step k normalises with its own running statistics. With the
    step-1 running variance 4 (the others 1) and f as above: h₀ = 2s, h₁ = 2(1 + h₀)/√(4 + ε),
    h₂ = 2s(1 + h₁)."""
    layer = RecurrentConv(1, t=2).eval()
    with torch.no_grad():
        layer.conv[0].weight.zero_()
        layer.conv[0].weight[0, 0, 1, 1] = 2.0
        layer.step_stats[0].running_var.fill_(4.0)
        out = layer(torch.ones(1, 1, 3, 3))
    s = 1 / math.sqrt(1 + 1e-5)
    h = 2 * s * (1 + 2 * (1 + 2 * s) / math.sqrt(4 + 1e-5))
    torch.testing.assert_close(out, torch.full((1, 1, 3, 3), h))
    layer.train()
    layer(torch.randn(2, 1, 5, 5))  # each step updates its own statistics
    means = [layer.conv[1].running_mean, *(n.running_mean for n in layer.step_stats)]
    assert len({m.item() for m in means}) == 3
