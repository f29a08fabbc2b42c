"""Multi-crop and evaluation transforms: shapes, channels, the papers' parameters, determinism and
argument validation (the fast path against torchvision v2: test_transforms_vs_v2.py)."""
import pickle

import pytest
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode

from ssl_vit.data.transforms import EvalTransform, MultiCropTransform, blur_kernel_size
from tests.data.transform_inputs import COLOR, GRAY, one_thread  # noqa: F401  (autouse fixture)

INPUTS = {
    "pil_L": lambda: Image.fromarray(GRAY, mode="L"),
    "pil_RGB": lambda: Image.fromarray(COLOR, mode="RGB"),
    "uint8_chw_1": lambda: torch.from_numpy(GRAY).unsqueeze(0),
    "uint8_hw": lambda: torch.from_numpy(GRAY),
    "uint8_chw_3": lambda: torch.from_numpy(COLOR).permute(2, 0, 1).contiguous(),
    "float_chw_3": lambda: torch.from_numpy(COLOR).permute(2, 0, 1).float() / 255,
}


@pytest.mark.parametrize("kind", sorted(INPUTS))
def test_multicrop_shapes_dtypes_channels(kind):
    t = MultiCropTransform(32, 16, n_local=3)
    crops = t(INPUTS[kind]())
    assert len(crops) == 2 + 3 == t.n_crops
    for c in crops[:2]:
        assert c.shape == (3, 32, 32)
    for c in crops[2:]:
        assert c.shape == (3, 16, 16)
    for c in crops:
        assert type(c) is torch.Tensor and c.dtype == torch.float32 and torch.isfinite(c).all()


def test_grayscale_replicated_to_three_equal_channels():
    t = MultiCropTransform(32, 16, 2, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    torch.manual_seed(0)
    for _ in range(5):
        for c in t(Image.fromarray(GRAY, mode="L")):
            assert c.shape[0] == 3
            assert torch.equal(c[0], c[1]) and torch.equal(c[1], c[2])
    t1 = MultiCropTransform(32, 16, 1, mean=(0.5,), std=(0.25,), grayscale_to_rgb=False)
    assert [c.shape[0] for c in t1(Image.fromarray(GRAY, mode="L"))] == [1, 1, 1]


def test_non_square_sizes_and_no_local_crops():
    t = MultiCropTransform((24, 32), (12, 16), 2)
    crops = t(Image.fromarray(COLOR, mode="RGB"))
    assert [tuple(c.shape) for c in crops] == [(3, 24, 32)] * 2 + [(3, 12, 16)] * 2
    t0 = MultiCropTransform(32, None, 0)
    assert len(t0(Image.fromarray(GRAY, mode="L"))) == 2


def test_normalisation_range():
    # mean 0 / std 1 leaves [0, 1] values; ImageNet stats shift them
    t = MultiCropTransform(32, 16, 2, mean=(0.0,), std=(1.0,))
    torch.manual_seed(1)
    for c in t(Image.fromarray(COLOR, mode="RGB")):
        assert c.min() >= 0.0 and c.max() <= 1.0


def test_deterministic_under_manual_seed():
    t = MultiCropTransform(32, 16, 4)
    img = Image.fromarray(GRAY, mode="L")
    torch.manual_seed(42)
    a = t(img)
    torch.manual_seed(42)
    b = t(img)
    torch.manual_seed(43)
    c = t(img)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def _find(compose, cls):
    """Transforms of type cls in a Compose, with the probability they run."""
    found = []
    for step in compose.transforms:
        if isinstance(step, v2.RandomApply):
            found += [(inner, step.p) for inner in step.transforms if isinstance(inner, cls)]
        elif isinstance(step, cls):
            found.append((step, getattr(step, "p", 1.0)))
    return found


@pytest.mark.parametrize(
    "preset, gscale, lscale", [("dinov2", (0.32, 1.0), (0.05, 0.32)), ("dino", (0.4, 1.0), (0.05, 0.4))]
)
def test_papers_parameters(preset, gscale, lscale):
    t = MultiCropTransform(32, 16, 2, preset=preset)
    pipes = {"g0": t.global_transform_0, "g1": t.global_transform_1, "loc": t.local_transform}
    expected_blur = {"g0": 1.0, "g1": 0.1, "loc": 0.5}
    expected_solarize = {"g0": None, "g1": 0.2, "loc": None}
    for name, pipe in pipes.items():
        (rrc, p), = _find(pipe, v2.RandomResizedCrop)
        assert p == 1.0 and rrc.interpolation == InterpolationMode.BICUBIC
        assert tuple(rrc.scale) == pytest.approx(lscale if name == "loc" else gscale)
        assert tuple(rrc.size) == ((16, 16) if name == "loc" else (32, 32))
        (flip, p), = _find(pipe, v2.RandomHorizontalFlip)
        assert p == 0.5
        (cj, p), = _find(pipe, v2.ColorJitter)
        assert p == 0.8
        assert cj.brightness == pytest.approx((0.6, 1.4)) and cj.contrast == pytest.approx((0.6, 1.4))
        assert cj.saturation == pytest.approx((0.8, 1.2)) and cj.hue == pytest.approx((-0.1, 0.1))
        (gray, p), = _find(pipe, v2.RandomGrayscale)
        assert p == 0.2
        (blur, p), = _find(pipe, v2.GaussianBlur)
        assert p == expected_blur[name]
        assert list(blur.sigma) == pytest.approx([0.1, 2.0])
        assert list(blur.kernel_size) == [3, 3]  # 10% of 32 or 16 px, at least 3
        sol = _find(pipe, v2.RandomSolarize)
        if expected_solarize[name] is None:
            assert sol == []
        else:
            (s, p), = sol
            assert p == expected_solarize[name] and s.threshold == 128


@pytest.mark.parametrize(
    "preset, gscale, lscale", [("dinov2", (0.32, 1.0), (0.05, 0.32)), ("dino", (0.4, 1.0), (0.05, 0.4))]
)
def test_papers_parameters_in_crop_specs(preset, gscale, lscale):
    # the specs are what the fast path samples from; the pipelines above are built from them
    t = MultiCropTransform(32, 16, 2, preset=preset)
    specs = t.crop_specs
    assert specs == [t.global_spec_0, t.global_spec_1, t.local_spec, t.local_spec]
    for i, spec in enumerate(specs):
        local = i >= 2
        assert spec.size == ((16, 16) if local else (32, 32))
        assert spec.scale == pytest.approx(lscale if local else gscale)
        assert spec.ratio == pytest.approx((3 / 4, 4 / 3))
        assert spec.flip_p == 0.5
        assert (spec.brightness, spec.contrast, spec.saturation, spec.hue) == (0.4, 0.4, 0.2, 0.1)
        ranges = [v for r in spec.jitter_ranges() for v in r]
        assert ranges == pytest.approx([0.6, 1.4, 0.6, 1.4, 0.8, 1.2, -0.1, 0.1])
        assert spec.color_jitter_p == 0.8 and spec.grayscale_p == 0.2
        assert spec.blur_sigma == (0.1, 2.0) and spec.blur_kernel_size == 3
        assert spec.blur_p == [1.0, 0.1, 0.5, 0.5][i]
        assert spec.solarize_p == [0.0, 0.2, 0.0, 0.0][i] and spec.solarize_threshold == 128
    # the ColorJitter the specification builds derives the same factor ranges
    (cj, _), = _find(t.global_transform_0, v2.ColorJitter)
    v2_ranges = [v for r in (cj.brightness, cj.contrast, cj.saturation, cj.hue) for v in r]
    assert v2_ranges == pytest.approx([v for r in specs[0].jitter_ranges() for v in r])


def test_explicit_scales_override_preset():
    t = MultiCropTransform(32, 16, 1, global_scale=(0.5, 0.9), local_scale=(0.1, 0.2), preset="dino")
    assert t.global_scale == (0.5, 0.9) and t.local_scale == (0.1, 0.2)


def test_blur_kernel_size():
    assert [blur_kernel_size(s) for s in (16, 28, 32, 64, 96, 224)] == [3, 3, 3, 7, 11, 23]
    for s in range(3, 300):
        k = blur_kernel_size(s)
        assert k % 2 == 1 and 3 <= k <= s
        assert k == 3 or abs(k - 0.1 * s) <= 1.5  # about 10% of the crop, floored at 3
    assert blur_kernel_size((64, 32)) == 3  # the shorter side decides


def test_solarize_only_on_global_crop_1_with_uint8_threshold():
    # A white image stays >= 153/255 under brightness jitter (factor >= 0.6), contrast, grayscale
    # and blur; solarisation at 128 turns it into <= 102/255. Crop 0 never solarizes, crop 1
    # does with p = 0.2.
    t = MultiCropTransform(32, 16, 0, mean=(0.0,), std=(1.0,))
    white = torch.full((3, 28, 28), 255, dtype=torch.uint8)
    torch.manual_seed(0)
    n, dark0, dark1 = 80, 0, 0
    for _ in range(n):
        g0, g1 = t(white)
        dark0 += int(g0.mean() < 0.5)
        dark1 += int(g1.mean() < 0.5)
    assert dark0 == 0
    assert 4 <= dark1 <= 30  # binomial(80, 0.2): mean 16, sd 3.6


def test_picklable():
    t = MultiCropTransform(32, 16, 2)
    e = EvalTransform(32)
    t2, e2 = pickle.loads(pickle.dumps(t)), pickle.loads(pickle.dumps(e))
    img = Image.fromarray(GRAY, mode="L")
    torch.manual_seed(0)
    a = t(img)
    torch.manual_seed(0)
    b = t2(img)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert torch.equal(e(img), e2(img))


@pytest.mark.parametrize("kind", sorted(INPUTS))
def test_eval_transform(kind):
    e = EvalTransform(32)
    out = e(INPUTS[kind]())
    assert type(out) is torch.Tensor and out.shape == (3, 32, 32) and out.dtype == torch.float32
    assert torch.equal(out, e(INPUTS[kind]()))  # deterministic


def test_eval_transform_normalises_constant_image():
    e = EvalTransform(16, mean=(0.5, 0.4, 0.3), std=(0.2, 0.1, 0.5))
    out = e(torch.full((1, 28, 28), 102, dtype=torch.uint8))
    v = 102 / 255
    expected = torch.tensor([(v - 0.5) / 0.2, (v - 0.4) / 0.1, (v - 0.3) / 0.5])
    assert torch.allclose(out.mean(dim=(1, 2)), expected, atol=1e-5)
    assert torch.allclose(out, expected.view(3, 1, 1).expand(3, 16, 16), atol=1e-5)
    # crop_pct < 1 resizes larger then center-crops
    assert EvalTransform((24, 32), crop_pct=0.875)(Image.fromarray(COLOR)).shape == (3, 24, 32)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(global_size=0), "global_size"),
        (dict(global_size=-32), "global_size"),
        (dict(global_size=(32, 0)), "global_size"),
        (dict(global_size=32.5), "global_size"),
        (dict(local_size=-1), "local_size"),
        (dict(local_size=None), "local_size"),  # needed when n_local > 0
        (dict(n_local=-1), "n_local"),
        (dict(n_local=1.5), "n_local"),
        (dict(global_scale=(0.5, 0.2)), "global_scale"),
        (dict(global_scale=(0.3, 1.5)), "global_scale"),
        (dict(local_scale=(0.0, 0.3)), "local_scale"),
        (dict(local_scale=(0.1,)), "local_scale"),
        (dict(mean=(0.5, 0.5)), "mean"),
        (dict(std=(0.2, 0.0, 0.2)), "std"),
        (dict(preset="simclr"), "preset"),
        (dict(grayscale_to_rgb="yes"), "grayscale_to_rgb"),
    ],
)
def test_multicrop_bad_arguments(kwargs, name):
    args = dict(global_size=32, local_size=16, n_local=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name) as err:
        MultiCropTransform(**args)
    assert repr(kwargs[name]) in str(err.value)  # the message shows the bad value


@pytest.mark.parametrize(
    "kwargs, name",
    [(dict(size=0), "size"), (dict(size=32, crop_pct=0.0), "crop_pct"), (dict(size=32, std=(-1,)), "std")],
)
def test_eval_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        EvalTransform(**kwargs)


def test_bad_images():
    t = MultiCropTransform(32, 16, 1)
    with pytest.raises(ValueError, match="channels"):
        t(torch.zeros(2, 28, 28, dtype=torch.uint8))
    with pytest.raises(ValueError, match="shape"):
        t(torch.zeros(1, 1, 28, 28, dtype=torch.uint8))
    with pytest.raises(ValueError, match="PIL image"):
        t("not an image")
