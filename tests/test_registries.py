"""Every registry refuses a second entry under a taken name (rpat/registries.py)."""

import pytest

from rpat import data, models, objectives, registries
from rpat.evaluation import measurements


def test_add_keeps_one_entry_per_name():
    table = {}
    assert registries.add(table, "a", 1, "thing") == 1
    with pytest.raises(ValueError, match="thing 'a' is registered twice"):
        registries.add(table, "a", 2, "thing")
    assert table == {"a": 1}


def test_each_registry_refuses_a_taken_name():
    with pytest.raises(ValueError, match="objective 'trades' is registered twice"):
        objectives.register(objectives.OBJECTIVES["trades"])
    with pytest.raises(ValueError, match="model 'cnn' is registered twice"):
        models.register("cnn", "again")(lambda **kw: None)
    with pytest.raises(ValueError, match="dataset 'digits' is registered twice"):
        data.register("digits", "again", 10, 8)(lambda options: None)
    m = measurements.MEASUREMENTS["clean"]
    with pytest.raises(ValueError, match="measurement 'clean' is registered twice"):
        measurements.register(m)
