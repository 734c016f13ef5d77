"""The plugin registry and a researcher's policy, end to end."""

from __future__ import annotations

import sys
import textwrap

import pytest

from pcpp_runtime import ParallelConfig, PartialPolicy
from pcpp_runtime.jobs import JobSpec
from pcpp_runtime.registry import PluginLoadError, Registry


class GrowingPortion(PartialPolicy):
    """The README's example: the portion grows from 0.1 to 0.5 over the generation."""

    def portion_at(self, layer, step):
        return 0.1 + 0.4 * step / max(1, layer.num_steps - 1)


def test_registering_twice_is_harmless_and_a_clash_raises():
    registry = Registry("policy", "pcpp_runtime.test_none")
    registry.register("growing", GrowingPortion)
    registry.register("growing", GrowingPortion)
    with pytest.raises(ValueError, match="already registered"):
        registry.register("growing", PartialPolicy)


def _write_plugin(tmp_path, body: str, name: str) -> None:
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
    dist = tmp_path / f"{name}-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[pcpp_runtime.test_policies]\n{name} = {name}:Policy\n")


def test_entry_point_plugins_load_and_broken_ones_raise(tmp_path, monkeypatch):
    _write_plugin(tmp_path, "from pcpp_runtime import FullPolicy\nclass Policy(FullPolicy):\n    pass\n", "goodplugin")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        registry = Registry("policy", "pcpp_runtime.test_policies")
        assert "goodplugin" in registry.names()
        assert registry.get("goodplugin").__module__ == "goodplugin"

        _write_plugin(tmp_path, "raise ImportError('needs numpy 9')\n", "badplugin")
        broken = Registry("policy", "pcpp_runtime.test_policies")
        with pytest.raises(PluginLoadError, match="badplugin.*needs numpy 9"):
            broken.names()
    finally:  # the plugins' modules go with their folder
        for name in ("goodplugin", "badplugin"):
            sys.modules.pop(name, None)


def test_a_researchers_policy_runs_end_to_end(tiny_sd, plugin_registries):
    plugin_registries.policies.register("test-growing", GrowingPortion)  # gone again after the test
    spec = JobSpec(steps=8, seed=0)
    config = ParallelConfig(policy="test-growing", warmup_steps=2)
    _, wrapped = tiny_sd.on_ranks(3, config, spec, 64, 64)
    kv = [wrapped[1].runtime.ledger.received[step]["attention_kv"] for step in range(2, 8)]
    print("middle rank's KV bytes per displaced step:", kv)
    assert kv == sorted(kv) and kv[-1] > kv[0]  # the portion grows, and only those rows travel
