"""doctor's criu.nofile check: it explains CRIU's RLIMIT_NOFILE error line from the capability set."""
from __future__ import annotations

from warmstart.cli import doctor


def test_cap_sys_resource_held_is_ok():
    r = doctor.check_nofile("CapEff:\t000001ffffffffff\n", (1024, 20000))
    assert r.status == "ok" and "CAP_SYS_RESOURCE held" in r.detail


def test_cap_sys_resource_missing_warns_with_the_limit_and_fix():
    # bit 24 cleared, as on this VM and the lent GPU machine (CapEff 000001fffeffffff)
    r = doctor.check_nofile("CapEff:\t000001fffeffffff\n", (1024, 20000))
    assert r.status == "warn"
    assert "20000" in r.detail and "RLIMIT_NOFILE" in r.detail
    assert "CAP_SYS_RESOURCE" in r.fix
