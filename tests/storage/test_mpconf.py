"""multipath.conf parsing (unit)."""

from __future__ import annotations

import pytest

from sanvisor.errors import ConfigError
from sanvisor.storage.mpconf import parse_mpconf
from sanvisor.storage.scsi import dev_name

GOOD = """
# the pool's multipath.conf (the seed's section VI-A fix)
defaults {
    user_friendly_names yes
    polling_interval 0.5
    no_path_retry 4
}
blacklist {
    wwid "3600508b.*"
}
multipaths {
    multipath {
        wwid 360060e80d60095920000000000000001
        alias domU-systeme
        path_grouping_policy failover
    }
}
devices {
    device {
        vendor "HITACHI"
        product "DF600F"
        path_grouping_policy multibus
        path_selector "round-robin 0"
        failback manual
    }
}
"""


def test_settings_precedence_and_aliases() -> None:
    conf = parse_mpconf(GOOD)
    assert conf.user_friendly_names
    assert conf.alias_for("360060e80d60095920000000000000001") == "domU-systeme"
    s = conf.settings_for("360060e80d60095920000000000000001", "HITACHI", "DF600F")
    assert s.path_grouping_policy == "failover"  # multipaths beats devices
    assert s.failback == "manual" and s.polling_interval == 0.5
    assert s.features() == "1 queue_if_no_path"
    other = conf.settings_for("360060e80d60095920000000000000002", "HITACHI", "DF600F")
    assert other.path_grouping_policy == "multibus"
    assert conf.blacklisted("3600508b1001c0000") and not conf.blacklisted("36006")


@pytest.mark.parametrize("text, line, message", [
    ("defaults {\n  polling_interval soon\n}\n", 2, "not a positive number"),
    ("defaults {\n  user_friendly_names yes\n", 1, "is not closed"),
    ("}\n", 1, "without an open section"),
    ("defaults {\n  path_grouping_policy sometimes\n}\n", 2, "not failover or multibus"),
    ("multipaths {\n multipath {\n  alias x\n }\n}\n", 2, "without a wwid"),
    ("defaults {\n  no_path_retry \"later\n}\n", 2, "No closing quotation"),
    ("frobnicate {\n}\n", 1, "unexpected section"),
    ("multipaths {\n multipath {\n  wwid 3a\n  alias db\n }\n multipath {\n  wwid 3b\n"
     "  alias db\n }\n}\n", 6, "alias db is given to two WWIDs: 3a (line 2) and 3b"),
])
def test_errors_name_file_and_line(text: str, line: int, message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_mpconf(text, "pool.conf")
    assert str(exc.value).startswith(f"pool.conf:{line}: ")
    assert message in str(exc.value)


def test_unknown_keywords_warn() -> None:
    conf = parse_mpconf("defaults {\n  fancy_option 3\n}\n", "m.conf")
    assert conf.warnings == ["m.conf:2: unknown keyword 'fancy_option' in defaults (ignored)"]


def test_scsi_names() -> None:
    assert [dev_name(n) for n in (0, 1, 25, 26, 27)] == ["sda", "sdb", "sdz", "sdaa", "sdab"]
