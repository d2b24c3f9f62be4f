"""RobustBench zoo loading (rpat.models.robustbench): checkpoints written in the zoo's on-disk layout.

The parameter counts are those of RobustBench 1.1.1's own classes for the same entries (its ``model_zoo/cifar10.py``
built with the zoo's ``WideResNet`` / ``PreActResNet``), so an architecture that drifts from the zoo's fails here.
"""

import zlib

import pytest
import torch

from rpat.checkpoint import CheckpointError
from rpat.errors import UnknownName, UserError
from rpat.models import build, param_count
from rpat.models.robustbench import (
    ENTRIES,
    ZooFileMissing,
    ZooPreActResNet18,
    ZooPreActResNet18V2,
    ZooWideResNet,
    load_robustbench,
    read_state_dict,
    strip_prefixes,
    zoo_entry,
    zoo_path,
)

ZOO_PARAMS = {  # (threat model, name) -> parameters of the zoo's model for the entry
    ("Linf", "Standard"): 36_479_194,
    ("Linf", "Carmon2019Unlabeled"): 38_119_866,  # WRN-28-10 + the unused sub_block1 (1,640,672)
    ("Linf", "Sehwag2020Hydra"): 38_119_866,
    ("Linf", "Wang2020Improving"): 38_119_866,
    ("Linf", "Zhang2019Theoretically"): 48_262_586,  # WRN-34-10 + sub_block1
    ("Linf", "Huang2020Self"): 48_262_586,
    ("Linf", "Zhang2019You"): 48_262_586,
    ("Linf", "Rice2020Overfitting"): 184_531_674,  # WRN-34-20
    ("Linf", "Wong2020Fast"): 11_171_146,
    ("Linf", "Andriushchenko2020Understanding"): 11_171_146,
    ("L2", "Standard"): 36_479_194,
    ("L2", "Rice2020Overfitting"): 11_172_170,
}
CIFAR10_MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
CIFAR10_STD = torch.tensor([0.2471, 0.2435, 0.2616]).view(1, 3, 1, 1)


def test_every_entry_has_a_param_count():
    assert {(e.threat_model, e.name) for e in ENTRIES} == set(ZOO_PARAMS)


@pytest.mark.parametrize("threat_model,name", sorted(ZOO_PARAMS))
def test_param_count_matches_the_zoo(threat_model, name):
    with torch.device("meta"):  # counts without allocating 185M parameters
        net = zoo_entry(name, "cifar10", threat_model).build()
    assert param_count(net) == ZOO_PARAMS[(threat_model, name)]


def test_zoo_wrn_is_rpat_wrn_plus_sub_block1():
    with torch.device("meta"):
        zoo = zoo_entry("Carmon2019Unlabeled").build().state_dict()
        ours = build("wrn28_10", num_classes=10).net.state_dict()
    extra = set(zoo) - set(ours)
    assert set(ours) <= set(zoo) and extra and all(k.startswith("sub_block1.") for k in extra)


def _random_state(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Random weights and BN statistics (so a loader that skips buffers fails), seeded per key, so two
    implementations with the same keys get the same weights whatever order they register them in."""
    state = {}
    for k, v in net.state_dict().items():
        g = torch.Generator().manual_seed(zlib.crc32(k.encode()))
        if k.endswith("running_var"):
            v = torch.rand(v.shape, generator=g) + 0.5
        elif v.is_floating_point():
            v = torch.randn(v.shape, generator=g) * 0.05
        state[k] = v
    net.load_state_dict(state)
    return state


# First-image logits of the zoo's own classes (RobustBench 1.1.1) under _random_state, on _x(): WideResNet(depth=10,
# widen_factor=2, sub_block1=True), PreActResNet(PreActBlock, [2]*4) and PreActResNet(PreActBlockV2, [2]*4,
# bn_before_fc=True). Ours gave bit-identical outputs; a change in a block's wiring moves these numbers.
ZOO_LOGITS = {
    "wrn": ([0.059539, -0.017693, 0.010606, -0.009054, 0.041647, 0.012735, 0.004051, -0.076519, -0.030213, 0.025591],
            lambda: ZooWideResNet(10, 2, sub_block1=True)),
    "preact": ([0.133689, -0.030677, 0.286598, -0.179831, 0.407994, 0.037289, 0.015239, -0.21543, -0.008904, 0.014],
               ZooPreActResNet18),
    "preact_v2": ([-0.019929, 0.006942, -0.011621, -0.124326, 0.015799, 0.05213, -0.00238, -0.065954, 0.055478,
                   -0.016865], ZooPreActResNet18V2),
}


def _x(n: int = 2) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("arch", sorted(ZOO_LOGITS))
def test_forward_matches_the_zoo(arch):
    expected, make = ZOO_LOGITS[arch]
    net = make().eval()
    _random_state(net)
    with torch.no_grad():
        got = net(_x())[0]
    torch.testing.assert_close(got, torch.tensor(expected), rtol=0, atol=2e-6)


def test_load_matches_the_architecture(tmp_path):
    """Wong2020Fast: PreActResNet-18 with CIFAR-10 normalisation inside; file as the zoo's: a 'state_dict' entry
    with DataParallel 'module.' keys and without the normalisation buffers."""
    torch.manual_seed(0)
    net = ZooPreActResNet18().eval()
    state = _random_state(net)
    path = tmp_path / "cifar10" / "Linf" / "Wong2020Fast.pt"
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}, "epoch": 15}, path)

    model, info = load_robustbench("Wong2020Fast", model_dir=tmp_path, threat_model="linf")
    x = _x(4)
    with torch.no_grad():
        expected = net((x - CIFAR10_MEAN) / CIFAR10_STD)
        got = model(x)
    assert not model.training
    assert torch.equal(got, expected)
    assert info["params"] == 11_171_146 and info["path"] == str(path)
    assert info["architecture"] == "PreActResNet-18" and info["threat_model"] == "Linf"
    assert info["mean"] == [0.4914, 0.4822, 0.4465] and info["std"] == [0.2471, 0.2435, 0.2616]


def test_missing_file_names_path_and_fix(tmp_path):
    with pytest.raises(ZooFileMissing) as err:
        load_robustbench("Carmon2019Unlabeled", model_dir=tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "cifar10" / "Linf" / "Carmon2019Unlabeled.pt") in msg
    assert "download" in msg and "place" in msg
    assert isinstance(err.value, UserError)
    assert not (tmp_path / "cifar10").exists()  # nothing created when downloading is off


def test_unknown_entry_lists_supported():
    with pytest.raises(UnknownName, match="cifar10/Linf/Wong2020Fast"):
        zoo_entry("Nobody2099Robust")


def test_strip_prefixes():
    t = torch.zeros(1)
    got = strip_prefixes({"module.model.conv1.weight": t, "model.fc.bias": t, "block1.layer.0.bn1.weight": t})
    assert list(got) == ["conv1.weight", "fc.bias", "block1.layer.0.bn1.weight"]


def test_wrapper_key_picks_the_entrys_weights(tmp_path):
    """Andriushchenko2020Understanding's file holds {'last': ..., 'best': ...}; the zoo loads 'last'."""
    path = tmp_path / "a.pt"
    torch.save({"best": {"linear.bias": torch.zeros(2)}, "last": {"module.linear.bias": torch.ones(2)}}, path)
    got = read_state_dict(path, zoo_entry("Andriushchenko2020Understanding"))
    assert list(got) == ["linear.bias"] and torch.equal(got["linear.bias"], torch.ones(2))


def test_file_of_another_architecture_is_refused(tmp_path):
    entry = zoo_entry("Wong2020Fast")
    path = zoo_path(tmp_path, entry)
    path.parent.mkdir(parents=True)
    torch.save({"conv1.weight": torch.zeros(64, 3, 3, 3)}, path)
    with pytest.raises(CheckpointError, match="does not fit the PreActResNet-18"):
        load_robustbench("Wong2020Fast", model_dir=tmp_path)


def test_unreadable_file_is_refused(tmp_path):
    path = zoo_path(tmp_path, zoo_entry("Standard"))
    path.parent.mkdir(parents=True)
    path.write_text("<html>Google Drive quota exceeded</html>")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_robustbench("Standard", model_dir=tmp_path)
