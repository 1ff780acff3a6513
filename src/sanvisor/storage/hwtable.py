"""What multipath-tools 0.9.4 (Debian 12) knows before it reads multipath.conf.

Its built-in defaults, the keywords each section accepts, the entries of its
built-in hardware table that can match the lab array (vendor HITACHI), its
built-in blacklist, and how it reads each value (`normalize`). Checked against
`multipath -t` by tests/storage/test_mpconf.py.
"""

from __future__ import annotations

import math
import re

INT_MAX = 2**31 - 1
UINT_MAX = 2**32 - 1

# `multipath -t` with an empty multipath.conf, the settings sanvisor resolves
# (no_path_retry has no default: "undef", which queues nothing, like "fail").
BUILTIN_DEFAULTS: dict[str, str] = {
    "path_grouping_policy": "failover", "path_selector": "service-time 0",
    "polling_interval": "5", "features": "0", "failback": "manual", "rr_weight": "uniform",
    "rr_min_io": "1000", "rr_min_io_rq": "1", "user_friendly_names": "no",
    "alias_prefix": "mpath", "path_checker": "tur", "prio": "const",
    "find_multipaths": "strict",
}

# The built-in hardware table entries whose vendor regex matches "HITACHI", in table
# order: (vendor, product, settings). The rest of the table (~120 entries) is for
# other vendors' arrays and cannot match a HITACHI device.
HWTABLE: tuple[tuple[str, str, dict[str, str]], ...] = (
    (".*", "dellemc-powerstore", {"no_path_retry": "3"}),
    ("(HITACHI|HP|HPE)", "^OPEN-", {"path_grouping_policy": "multibus"}),
    ("HITACHI", "^DF", {"path_grouping_policy": "group_by_prio", "prio": "hds",
                        "failback": "immediate", "no_path_retry": "queue"}),
    ("HITACHI", "^DF600F", {"path_grouping_policy": "multibus"}),
)

BLACKLIST_DEVNODE = "!^(sd[a-z]|dasd[a-z]|nvme[0-9])"  # built-in blacklist
EXCEPTIONS_PROPERTY = "(SCSI_IDENT_|ID_WWN)"  # built-in blacklist_exceptions

_MAP = ("path_grouping_policy path_selector prio prio_args failback rr_weight no_path_retry "
        "rr_min_io rr_min_io_rq flush_on_last_del features user_friendly_names "
        "deferred_remove delay_watch_checks delay_wait_checks san_path_err_threshold "
        "san_path_err_forget_rate san_path_err_recovery_time marginal_path_err_sample_time "
        "marginal_path_err_rate_threshold marginal_path_err_recheck_gap_time "
        "marginal_path_double_failed_time skip_kpartx max_sectors_kb ghost_delay ")
_PATH = ("uid_attribute getuid_callout path_checker checker alias_prefix fast_io_fail_tmo "
         "dev_loss_tmo eh_deadline retain_attached_hw_handler detect_prio detect_checker "
         "all_tg_pt recheck_wwid ")
_BLIST = "devnode wwid property protocol"

# The keywords each section accepts (libmultipath/dict.c, init_keywords). Others are
# "invalid keyword"s: multipath-tools ignores them with a message.
KEYWORDS: dict[str, frozenset[str]] = {k: frozenset(v.split()) for k, v in {
    "defaults": _MAP + _PATH + (
        "verbosity polling_interval max_polling_interval reassign_maps multipath_dir "
        "uid_attrs max_fds queue_without_daemon checker_timeout allow_usb_devices "
        "pg_timeout mode uid gid bindings_file wwids_file prkeys_file log_checker_err "
        "reservation_key force_sync strict_timing partition_delimiter config_dir "
        "find_multipaths uxsock_timeout retrigger_tries retrigger_delay "
        "missing_uev_wait_timeout disable_changed_wwids remove_retries "
        "find_multipaths_timeout enable_foreign marginal_pathgroups"),
    "devices/device": _MAP + _PATH + (
        "vendor product revision product_blacklist hardware_handler pg_timeout vpd_vendor"),
    "overrides": _MAP + _PATH,
    "overrides/protocol": "type fast_io_fail_tmo dev_loss_tmo eh_deadline",
    "multipaths/multipath": _MAP + "wwid alias pg_timeout mode uid gid reservation_key",
    "blacklist": _BLIST, "blacklist_exceptions": _BLIST,
    "blacklist/device": "vendor product", "blacklist_exceptions/device": "vendor product",
    "devices": "", "multipaths": "",
}.items()}
SUBSECTIONS: dict[str | None, frozenset[str]] = {
    None: frozenset({"defaults", "blacklist", "blacklist_exceptions", "devices",
                     "overrides", "multipaths"}),
    "blacklist": frozenset({"device"}), "blacklist_exceptions": frozenset({"device"}),
    "devices": frozenset({"device"}), "multipaths": frozenset({"multipath"}),
    "overrides": frozenset({"protocol"}),
}
SYNONYMS = {"checker": "path_checker"}

POLICIES = ("failover", "multibus", "group_by_serial", "group_by_prio", "group_by_node_name")
SELECTORS = ("round-robin", "queue-length", "service-time", "historical-service-time",
             "io-affinity")
_C_INT = re.compile(r"[ \t\n\v\f\r]*([+-]?[0-9]+)[ \t\n\v\f\r]*")
_DECIMAL = re.compile(r"[ \t\n\v\f\r]*([0-9]+(?:\.[0-9]+)?)[ \t\n\v\f\r]*")


def normalize(key: str, raw: str) -> tuple[str | None, str | None]:
    """How multipath-tools reads `key raw`: (value, note). A value of None is what it
    takes as "not set"; a note says how it read a value it changed. ValueError for a
    value it would reject (it ignores those lines with a message: sanvisor refuses)."""
    if key == "path_grouping_policy":
        pol = next((p for p in POLICIES if raw.startswith(p)), None)  # strncmp, as theirs
        if pol is None:
            raise ValueError(f"{raw!r} is not failover or multibus, "
                             "group_by_serial, group_by_prio or group_by_node_name")
        return pol, None if pol == raw else f"read as {pol}"
    if key == "path_selector":
        words = raw.split()
        if not words or words[0] not in SELECTORS:
            raise ValueError(f"unknown path selector {raw!r} ({', '.join(SELECTORS)})")
        _arg_count(words[1:], raw, '"round-robin 0"')
        return raw, None
    if key == "features":
        _arg_count(raw.split(), raw, '"0" or "1 queue_if_no_path"')
        return raw, None
    if key == "failback":
        if raw in ("manual", "immediate", "followover"):
            return raw, None
        return _number(raw, 0, "not immediate, manual, followover or a number", zero=True)
    if key == "no_path_retry":
        if raw in ("queue", "fail"):
            return raw, None
        if raw == "0":
            return "fail", None
        return _number(raw, 1, "not a number, queue or fail")
    if key in ("rr_min_io", "rr_min_io_rq"):
        return _number(raw, 0, "not a number", zero=True)
    if key in ("user_friendly_names", "detect_prio", "detect_checker"):
        if raw in ("yes", "1", "no", "0"):
            return ("yes" if raw in ("yes", "1") else "no"), None
        raise ValueError(f"{raw!r} is not yes or no")
    if key == "rr_weight" and raw not in ("priorities", "uniform"):
        raise ValueError(f"{raw!r} is not priorities or uniform")
    if key == "find_multipaths" and raw not in ("on", "yes", "off", "no", "strict",
                                                "greedy", "smart"):
        raise ValueError(f"{raw!r} is not yes, no, strict, greedy or smart")
    if key == "alias_prefix" and "/" in raw:
        raise ValueError(f"{raw!r} contains a slash")
    if key == "polling_interval":
        return _polling_interval(raw)
    return raw, None


def _arg_count(words: list[str], raw: str, example: str) -> None:
    count = _C_INT.fullmatch(words[0]) if words else None
    if count is None or int(count[1]) != len(words) - 1:
        raise ValueError(f"{raw!r}: the first number must count the words after it "
                         f"(e.g. {example}; values with spaces go in double quotes)")


def _number(raw: str, low: int, what: str, zero: bool = False
            ) -> tuple[str | None, str | None]:
    """strtol, capped to [low, INT_MAX] (do_set_int); 0 is "not set" where zero is."""
    m = _C_INT.fullmatch(raw)
    if m is None:
        raise ValueError(f"{raw!r} is {what}")
    n = int(m[1])
    capped = min(max(n, low), INT_MAX)
    note = f"read as {capped} (range {low}..{INT_MAX})" if capped != n else None
    if capped == 0 and zero:
        return None, (f"{note}, which multipath-tools takes as not set" if note
                      else "multipath-tools takes 0 as not set")
    return str(capped), note


def _polling_interval(raw: str) -> tuple[str | None, str | None]:
    m = _DECIMAL.fullmatch(raw)
    if m is None or not math.isfinite(float(m[1])) or float(m[1]) <= 0:
        raise ValueError(f"{raw!r} is not a positive number of seconds")
    if float(m[1]) > UINT_MAX:
        raise ValueError(f"{raw!r} is more seconds than multipath-tools takes ({UINT_MAX})")
    if "." in m[1]:
        return m[1], ("multipath-tools 0.9.4 takes whole seconds only: it would ignore "
                      f"this value (and then never poll); the lab polls every {m[1]} s")
    return str(int(m[1])), None
