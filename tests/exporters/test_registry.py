"""The registry: the config section and its errors, `make`, the composite, the helpers."""

import importlib.util
import math
import subprocess
import sys

import numpy as np
import pytest

from rlhf_jax import config_spec as cs
from rlhf_jax import exporters
from rlhf_jax.exporters import base
from tests.exporters import shared


def test_the_default_section_is_all_off():
  section = exporters.exporters_section()
  assert section.to_dict() == {
    "prometheus": {"enabled": False, "host": "127.0.0.1", "port": 0},
    "wandb": {"project": "", "entity": "", "mode": "offline"},
    "statsd": {"enabled": False, "host": "127.0.0.1", "port": 8125},
  }
  exporters.CONFIG_SPEC.validate(section, "config.exporters")
  for given in (None, section, {}, {"wandb": {"project": "  "}}):
    exporter = exporters.make(given, workdir="/nonexistent", stage="sft")
    assert not exporter and exporter.names == []
    exporter.write(1, {"loss": 1.0})  # does nothing
    exporter.alerts(shared.alerts())
    exporter.close()


@pytest.mark.parametrize(
  "section, message",
  [
    ({"prometheus": {"port": -1}}, r"config\.exporters\.prometheus\.port=-1: must be an int >= 0"),
    ({"prometheus": {"enabled": 1}}, r"config\.exporters\.prometheus\.enabled=1: must be true"),
    ({"prometheus": {"prot": 1}}, r"config\.exporters\.prometheus\.prot is not a known field\. "
     r"Did you mean config\.exporters\.prometheus\.port\?"),
    ({"wandb": {"mode": "ofline"}}, r"config\.exporters\.wandb\.mode='ofline'.*did you mean "
     r"'offline'"),
    ({"statsd": {"port": 0}}, r"config\.exporters\.statsd\.port=0: must be an int >= 1"),
    ({"grafana": {}}, r"config\.exporters\.grafana is not a known field"),
  ],
)  # fmt: skip
def test_bad_fields_name_their_key(section, message):
  with pytest.raises(cs.ConfigError, match=message):
    exporters.CONFIG_SPEC.validate(section, "config.exporters")
  with pytest.raises(cs.ConfigError, match=message):
    exporters.make(section, workdir="/tmp/x", stage="sft")


@pytest.mark.parametrize(
  "section, package, message",
  [
    ({"prometheus": {"enabled": True}}, "prometheus_client",
     r"config\.exporters\.prometheus\.enabled=True needs the Python package prometheus_client"
     r".*pip install 'rlhf_jax\[monitor\]'"),
    ({"wandb": {"project": "p"}}, "wandb",
     r"config\.exporters\.wandb\.project='p' needs the Python package wandb"
     r".*pip install 'rlhf_jax\[wandb\]'"),
  ],
)  # fmt: skip
def test_a_missing_package_names_the_key_and_the_extra(monkeypatch, section, package, message):
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(
    importlib.util, "find_spec", lambda name, *a: None if name == package else find_spec(name, *a)
  )
  with pytest.raises(cs.ConfigError, match=message):
    exporters.CONFIG_SPEC.validate(section, "config.exporters")
  # Installed but failing to import (find_spec finds it): the same error from make.
  monkeypatch.setattr(importlib.util, "find_spec", find_spec)
  monkeypatch.setitem(sys.modules, package, None)  # `import package` raises ImportError
  with pytest.raises(cs.ConfigError, match=message):
    exporters.make(section, workdir="/tmp/x", stage="sft", primary=True)


def test_exporters_that_are_off_need_no_package(monkeypatch):
  # The core install has none of the optional clients: a default config must still run.
  find_spec = importlib.util.find_spec
  optional = {"wandb", "prometheus_client"}
  monkeypatch.setattr(
    importlib.util, "find_spec", lambda name, *a: None if name in optional else find_spec(name, *a)
  )
  exporters.CONFIG_SPEC.validate(exporters.exporters_section(), "config.exporters")
  exporters.CONFIG_SPEC.validate({"wandb": {"project": "  "}}, "config.exporters")
  assert not exporters.make(exporters.exporters_section(), workdir="/tmp/x", stage="sft")


def test_only_the_primary_process_exports():
  section = {"prometheus": {"enabled": True}, "statsd": {"enabled": True}}
  exporter = exporters.make(section, workdir="/tmp/x", stage="ppo", primary=False)
  assert not exporter


class _Recorder(base.Exporter):
  def __init__(self, name, fail=False):
    self.name, self.fail, self.calls = name, fail, []

  def write(self, step, line):
    self.calls.append(("write", step, dict(line)))
    if self.fail:
      raise ConnectionError("the network is down")

  def alerts(self, alerts):
    self.calls.append(("alerts", len(alerts)))
    if self.fail:
      raise ConnectionError("the network is down")

  def close(self):
    self.calls.append(("close",))
    if self.fail:
      raise ConnectionError("cannot finish")


def test_a_failing_exporter_never_stops_the_others(caplog):
  bad, good = _Recorder("bad", fail=True), _Recorder("good")
  composite = base.Composite([bad, good])
  composite.write(np.int64(3), {"loss": 1.0})
  composite.alerts(iter(shared.alerts()))
  composite.alerts([])  # nothing to send
  assert good.calls == [("write", 3, {"loss": 1.0}), ("alerts", 2)]
  assert "Exporter bad: write failed (ConnectionError: the network is down)" in caplog.text
  with pytest.raises(ConnectionError, match="cannot finish"):
    composite.close()
  assert good.calls[-1] == ("close",)  # closed although the first one failed
  assert not composite


def test_numeric_keeps_numbers_only():
  line = {
    "f": 1.5, "i": 2, "b": True, "nan": math.nan, "np": np.float32(0.25), "np_int": np.int32(4),
    "one": np.array([7.0]), "bf": np.array(1.0, dtype=np.float16),
    "s": "text", "none": None, "vec": np.zeros(3), "obj": object(),
  }  # fmt: skip
  out = base.numeric(line)
  assert set(out) == {"f", "i", "b", "nan", "np", "np_int", "one", "bf"}
  assert out["b"] == 1.0 and out["np"] == 0.25 and out["one"] == 7.0 and math.isnan(out["nan"])
  assert all(type(v) is float for v in out.values())


def test_alert_dict_and_known_rules():
  alert = shared.alerts(7)[1]
  assert base.alert_dict(alert)["rule"] == "entropy_collapse"
  assert base.alert_dict(alert.to_dict()) == base.alert_dict(alert)
  assert base.alert_dict({"rule": "r", "value": None})["value"] != 0  # NaN
  from rlhf_jax.monitor import monitor_section

  section = monitor_section().to_dict()
  section["alerts"]["kl_spike"]["enabled"] = False
  rules = base.known_rules({"monitor": section})
  assert rules["entropy_collapse"] == "critical" and "kl_spike" not in rules
  assert base.known_rules({"monitor": {**section, "enabled": False}}) == {}
  assert base.known_rules({}) == {} and base.known_rules({"monitor": "odd"}) == {}


def test_importing_needs_no_optional_package_and_no_jax():
  code = (
    "import sys, rlhf_jax.exporters as e; e.make(e.exporters_section(), workdir='w', stage='s');"
    "print(sorted({'jax', 'wandb', 'prometheus_client'} & set(sys.modules)))"
  )
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]"
