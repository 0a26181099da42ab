"""An ONEDNN_MAX_CPU_ISA cap (make demo ISA=avx2) is what the machine reports: fewer instruction sets, no bf16."""
import pytest

from deploy import machine
from deploy.runtime import cpu_supports_bf16

AVX512_BF16 = {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16"}


def test_cap_below_avx512_drops_avx512_bf16_and_vnni_but_keeps_avx2_fma():
    assert machine._capped(AVX512_BF16, None) == AVX512_BF16
    assert machine._capped(AVX512_BF16, "AVX2") == {"avx2", "fma"}
    assert machine._capped(AVX512_BF16, "AVX2_VNNI") == {"avx2", "fma", "avx_vnni"}
    assert machine._capped(AVX512_BF16, "AVX512_CORE_VNNI") == AVX512_BF16 - {"avx512_bf16"}
    assert machine._capped(AVX512_BF16, "AVX512_CORE_BF16") == AVX512_BF16  # at bf16 nothing is taken
    assert machine._capped({"avx2", "fma"}, "AVX") == set()


def test_cpu_info_names_the_cap_and_bf16_follows_it(monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    free = machine.cpu_info()
    assert free["isa_cap"] is None and free["flags"] == free["cpu_flags"]
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")
    capped = machine.cpu_info()
    assert capped["isa_cap"] == "AVX2" and capped["cpu_flags"] == free["cpu_flags"]
    assert not [f for f in capped["flags"] if f.startswith("avx512") or f.startswith("amx")]
    assert set(capped["flags"]) == {"avx2", "fma"} & set(free["cpu_flags"])
    assert not machine.has_native_bf16_flags() and not cpu_supports_bf16()
    # The per-machine cache key of the runtime choice differs: a capped run never reuses an uncapped choice.
    if free["flags"] != capped["flags"]:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
        uncapped_key = machine.machine_key("x")
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
        assert machine.machine_key("x") != uncapped_key


@pytest.mark.parametrize("value", ["", "ALL", "default"])
def test_no_cap_when_unset_or_all(monkeypatch, value):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", value)
    assert machine.isa_cap() is None
