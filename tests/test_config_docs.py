"""config/README.md is generated from the config schema and the defaults, and is kept current."""

import subprocess
import sys
from pathlib import Path

from rpat import config_docs
from rpat.config import DEFAULTS
from rpat.schema import schema

ROOT = Path(__file__).resolve().parents[1]


def leaves(d: dict, prefix: str = "") -> dict:
    """Dotted key -> value of every leaf of a nested mapping (a mapping that is empty counts as a leaf)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(leaves(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_config_readme_is_current():
    text = (ROOT / "config" / "README.md").read_text(encoding="utf-8")
    assert text == config_docs.render(), f"config/README.md is stale: run {config_docs.COMMAND}"


def test_every_default_is_documented_with_its_value_and_a_description():
    rows = {r["key"]: r for _, _, group in config_docs.groups(schema(), DEFAULTS) for r in group}
    defaults = leaves({k: v for k, v in DEFAULTS.items() if k not in ("resources",)})
    defaults.update(leaves({"resources": {"default": DEFAULTS["resources"]["default"]}}))
    defaults.update({"resources.by_model": {}, "resources.by_dataset": {}})
    assert set(defaults) <= set(rows)
    for key, value in defaults.items():
        assert rows[key]["default"] == value, key
        assert len(rows[key]["description"]) > 10, f"{key} has no description in rpat/config.schema.yaml"
    # every key of the page is one a config may hold: nothing documented that the schema does not have
    assert {k for k in rows if not k.startswith("grid[]")} - set(defaults) == {"experiment", "recipes",
                                                                              "train.schedule.factor"}
    assert rows["threat.linf.eps"]["type"] == "number, ≥ 0"
    assert config_docs.default_text(rows["threat.linf.eps"]["default"]) == "`8/255`"
    assert rows["methods.trades.beta"]["description"].startswith("β, the weight of the KL term (Zhang et al. 2019")
    assert rows["train.select"]["type"] == "one of `val`, `test`, `last`"
    assert rows["grid[].method"]["default"] == "(required)" and "`rebat`" in rows["grid[].method"]["type"]


def test_check_fails_on_a_stale_file_and_names_the_command(tmp_path):
    out = tmp_path / "README.md"
    out.write_text(config_docs.render().replace("| `rpat.weight` |", "| `rpat.weigth` |"), encoding="utf-8")
    cmd = [sys.executable, "-m", "rpat", "config-docs", "--out", str(out)]
    stale = subprocess.run([*cmd, "--check"], capture_output=True, text=True, cwd=ROOT)
    assert stale.returncode == 1 and f"{out} is stale: run rpat config-docs" in stale.stderr
    assert subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT).returncode == 0
    assert subprocess.run([*cmd, "--check"], capture_output=True, text=True, cwd=ROOT).returncode == 0
    assert out.read_text(encoding="utf-8") == config_docs.render()
