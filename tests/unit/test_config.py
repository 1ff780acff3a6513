"""Unit tests for the xm/xl domain config parser (sanvisor.model.config), and what the
drivers make of its disks: QEMU's LUNs, scan order and root=, Xen's xl.cfg."""

from __future__ import annotations

from pathlib import Path

import pytest

from sanvisor.agent.diskprobe import image_format, probe_file
from sanvisor.drivers.base import LaunchPlan
from sanvisor.drivers.qemu.argv import build_argv, disk_blockdev, guest_cmdline
from sanvisor.drivers.qemu.guestdisks import (
    BY_ID,
    creation_order,
    disk_lun,
    guest_names,
    guest_root,
    scan_order,
    sd_name,
)
from sanvisor.drivers.xen.xlcfg import disk_entry, render, xen_vdev
from sanvisor.errors import ConfigError
from sanvisor.model.config import ParsedConfig, parse_config, parse_disk, parse_vif
from sanvisor.model.diskspec import nbd_server, nbd_uri
from sanvisor.model.domain import Action, DiskSpec, VifSpec

DATA = Path(__file__).parent / "data"


def parse(text: str, **kw: object) -> ParsedConfig:
    return parse_config(text, filename="vm.cfg", **kw)  # type: ignore[arg-type]


def error(text: str, overrides: tuple[str, ...] = ()) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(text, filename="vm.cfg", overrides=overrides)
    return info.value


# --------------------------------------------------------------------------- the seed file


def test_seed_file_parses_as_is() -> None:
    path = DATA / "seed-vg.cfg"
    text = path.read_text(encoding="utf-8")
    assert "memory = 2048 \n" in text and "] \n" in text  # trailing spaces kept
    cfg = parse_config(text, filename=str(path))
    s = cfg.spec
    assert s.name == "virtualdebian"
    assert s.kernel == "/boot/vmlinuz-2.6.18-6-xen-686"
    assert s.ramdisk == "/boot/initrd.img-2.6.18-6-xen-686"
    assert (s.memory, s.maxmem, s.vcpus, s.maxvcpus) == (2048, 4096, 2, 2)
    assert s.root == "/dev/mapper/VolGroup00-lvroot ro"
    assert s.disks == [DiskSpec("sda", "phy", "/dev/vgvirtualdebian/lvsysteme", "w", "disk")]
    assert len(s.vifs) == 1
    assert s.vifs[0].mac == "00:16:3e:00:00:01"
    assert s.vifs[0].bridge == "xenbr0"
    assert s.vifs[0].model == "virtio-net-pci"
    assert s.vifs[0].type == "bridge"
    assert s.builder == "pv"
    assert s.source == str(path)
    assert s.unknown == {}
    assert cfg.warnings == []
    assert cfg.raw["memory"] == 2048
    assert cfg.raw["disk"] == ["phy:/dev/vgvirtualdebian/lvsysteme,sda,w"]


def test_seed_file_default_filename() -> None:
    cfg = parse_config((DATA / "seed-vg.cfg").read_text(encoding="utf-8"))
    assert cfg.spec.source == "<config>"


@pytest.mark.parametrize(
    ("line", "disk"),
    [
        ("disk=['phy:/dev/sde,/dev/sda:w']", DiskSpec("sda", "phy", "/dev/sde", "w")),
        ("disk=['phy:/dev/mapper/mpath5,/dev/sda,w']",
         DiskSpec("sda", "phy", "/dev/mapper/mpath5", "w")),
    ],
)
def test_old_xm_disk_forms(line: str, disk: DiskSpec) -> None:
    cfg = parse(f"name='old'\n{line}\n")
    assert cfg.spec.disks == [disk]


def test_minimal_defaults() -> None:
    s = parse("name = 'x'").spec
    assert (s.memory, s.maxmem, s.vcpus, s.maxvcpus) == (128, 128, 1, 1)
    assert s.kernel is None and s.extra == "" and s.disks == [] and s.vifs == []
    assert (s.on_poweroff, s.on_reboot, s.on_crash) == (
        Action.DESTROY, Action.RESTART, Action.DESTROY)


def test_all_known_keys() -> None:
    cfg = parse(
        "name='web'\nuuid='6F9619FF-8B86-D011-B42D-00C04FC964FF'\nmemory=512\nmaxmem=1024\n"
        "vcpus=2\nmaxvcpus=4\nkernel='/k'\nramdisk='/r'\nroot='/dev/xvda1'\n"
        "extra='console=hvc0'\non_poweroff='preserve'\non_reboot='destroy'\n"
        "on_crash='coredump-restart'\ntype='pvh'\n"
    )
    s = cfg.spec
    assert s.uuid == "6f9619ff-8b86-d011-b42d-00c04fc964ff"
    assert (s.memory, s.maxmem, s.vcpus, s.maxvcpus) == (512, 1024, 2, 4)
    assert s.extra == "console=hvc0"
    assert s.on_poweroff is Action.PRESERVE
    assert s.on_reboot is Action.DESTROY
    assert s.on_crash is Action.COREDUMP_RESTART
    assert s.builder == "pvh"


# --------------------------------------------------------------------------- syntax


def test_semicolons_comments_and_blank_lines() -> None:
    cfg = parse("\n\n  # c\nname='a'; memory=256 ;vcpus=2;\n;;\nkernel = '/k' # trailing\n\n")
    assert (cfg.spec.name, cfg.spec.memory, cfg.spec.vcpus) == ("a", 256, 2)
    assert cfg.spec.kernel == "/k"


def test_hash_inside_string_is_not_a_comment() -> None:
    assert parse("name='a'\nextra = \"a#b 'c'\"  # real comment").spec.extra == "a#b 'c'"


def test_multiline_list_with_comments_and_trailing_comma() -> None:
    cfg = parse(
        "name = 'multi'\n"
        "disk = [\n"
        "  # the system disk\n"
        "  'phy:/dev/vg/sys,xvda,w',   # comment after an item\n"
        "\n"
        "  'file:/srv/data.img,xvdb,r',\n"
        "]\n"
        "vcpus = 2\n"
    )
    assert [d.target for d in cfg.spec.disks] == ["xvda", "xvdb"]
    assert cfg.spec.disks[1] == DiskSpec("xvdb", "file", "/srv/data.img", "r")
    assert cfg.spec.vcpus == 2


def test_list_error_points_at_the_item_line() -> None:
    e = error("name='a'\ndisk = [\n  'phy:/dev/a,xvda,w',\n  'phy:/dev/b,bogus,w',\n]\n")
    assert str(e).startswith("vm.cfg:4: disk: invalid disk target 'bogus'")
    assert (e.file, e.line) == ("vm.cfg", 4)


def test_empty_list_and_single_string_disk() -> None:
    assert parse("name='a'\ndisk=[]\nvif=[ ]").spec.disks == []
    assert parse("name='a'\ndisk='phy:/dev/a,xvda,w'").spec.disks[0].path == "/dev/a"


@pytest.mark.parametrize(
    ("literal", "expected"),
    [
        (r"'a\nb'", "a\nb"),
        (r"'a\tb'", "a\tb"),
        (r"'a\\b'", "a\\b"),
        (r"'it\'s'", "it's"),
        (r'"say \"hi\""', 'say "hi"'),
        (r"'\x41\x42'", "AB"),
        (r"'\101'", "A"),
        ("'double \" inside single'", 'double " inside single'),
        ("\"single ' inside double\"", "single ' inside double"),
        ("'caf\u00e9'", "caf\u00e9"),
        ("''", ""),
    ],
)
def test_string_escapes(literal: str, expected: str) -> None:
    assert parse(f"name='a'\nextra = {literal}\n").spec.extra == expected


@pytest.mark.parametrize(
    ("literal", "expected"),
    [("2048", 2048), ("0x800", 2048), ("0X800", 2048), ("'2048'", 2048), ('" 512 "', 512),
     ("007", 7), ("'0x10'", 16)],
)
def test_integers(literal: str, expected: int) -> None:
    assert parse(f"name='a'\nmemory = {literal}\nmaxmem=4096").spec.memory == expected


def test_floats_are_values_but_not_integers() -> None:
    cfg = parse("name='a'\nshadow_memory = 1.5\nratio = 2e3")
    assert cfg.raw["shadow_memory"] == 1.5 and cfg.raw["ratio"] == 2000.0
    assert str(error("name='a'\nmemory = 1.5")) == "vm.cfg:2: memory: expected an integer, got 1.5"


def test_crlf_line_endings() -> None:
    assert parse("name = 'a'\r\nmemory = 64\r\n").spec.memory == 64


# --------------------------------------------------------------------------- syntax errors


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name='a'\nmemory = 2048 + 1\n", "vm.cfg:2: unexpected character '+'"),
        ("name='a'\nmemory = 2048+1\n", "vm.cfg:2: invalid number '2048+1'"),
        ("name='a'\n\nimport os\n", "vm.cfg:3: expected '=' after 'import', got 'os'"),
        ("name = 'a\n", "vm.cfg:1: string not closed (missing ')"),
        ('name="a\'\n', 'vm.cfg:1: string not closed (missing ")'),
        ("name='a'\ndisk = [ 'x'\nvcpus=2\n",
         "vm.cfg:3: expected ',' or ']' in the list opened on line 2, got 'vcpus'"),
        ("name='a'\ndisk = [ 'x',\n", "vm.cfg:2: list is not closed (missing ']')"),
        ("name='a'\ndisk = 'x' ]\n", "vm.cfg:2: expected end of line after disk = ..., got ']'"),
        ("name='a'\ndisk = [['x']]\n", "vm.cfg:2: lists cannot be nested"),
        ("name='a'\ndisk = [,]\n",
         "vm.cfg:2: expected a string or a number in the list opened on line 2, got ','"),
        ("name = foo\n",
         "vm.cfg:1: expected a value (a quoted string, a number or a [list]), got 'foo'"),
        ("name =\nmemory=1\n",
         "vm.cfg:1: expected a value (a quoted string, a number or a [list]), got end of line"),
        ("name='a'\nmemory\n", "vm.cfg:2: expected '=' after 'memory', got end of line"),
        ("name='a'\n= 3\n", "vm.cfg:2: expected a key, got '='"),
        ("name='a'\n9lives = 3\n", "vm.cfg:2: invalid number '9lives'"),
        ("name='a'\n'k' = 3\n", "vm.cfg:2: expected a key, got string 'k'"),
        ("name='a'\nmemory = 1 2\n", "vm.cfg:2: expected end of line after memory = ..., got 2"),
        ("name='a'\nextra='\\q'\n", "vm.cfg:2: invalid escape '\\q' in string"),
        ("name='a'\nextra='\\xZZ'\n", "vm.cfg:2: invalid escape '\\x' in string"),
        ("name='a'\nmemory = 12abc\n", "vm.cfg:2: invalid number '12abc'"),
        ("name='a'\nvcpus = (2)\n", "vm.cfg:2: unexpected character '('"),
        ("name='a'\nkernel = `ls`\n", "vm.cfg:2: unexpected character '`'"),
        ("name='a'\nextra = 'x' 'y'\n",
         "vm.cfg:2: expected end of line after extra = ..., got string 'y'"),
    ],
)
def test_syntax_errors(text: str, message: str) -> None:
    e = error(text)
    assert str(e) == message
    assert e.file == "vm.cfg"
    assert e.line == int(message.split(":")[1])


def test_duplicate_key_is_an_error() -> None:
    e = error("name='a'\nmemory = 256\n\nmemory = 512\n")
    assert str(e) == "vm.cfg:4: memory: given twice (first on line 2)"


def test_python_is_never_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    for text in (
        f"name='a'\n__import__('os').system('touch {marker}')\n",
        f"import os; os.system('touch {marker}')\nname='a'\n",
        f"name='a'\nmemory = __import__('os').system('touch {marker}')\n",
        f"name = [x for x in open('{marker}', 'w')]\n",
        f"exec(\"open('{marker}', 'w')\")\n",
    ):
        with pytest.raises(ConfigError) as info:
            parse_config(text, filename="evil.cfg")
        assert str(info.value).startswith("evil.cfg:")
    assert not marker.exists()


def test_python_in_override_is_just_a_string(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    cfg = parse_config("name='a'", overrides=[f"extra=__import__('os').system('touch {marker}')"])
    assert cfg.spec.extra == f"__import__('os').system('touch {marker}')"
    assert not marker.exists()


# --------------------------------------------------------------------------- typed values


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("memory = 'abc'", "vm.cfg:2: memory: expected an integer, got 'abc'"),
        ("memory = ['1']", "vm.cfg:2: memory: expected an integer, got a list"),
        ("vcpus = '2.0'", "vm.cfg:2: vcpus: expected an integer, got '2.0'"),
        ("kernel = 42", "vm.cfg:2: kernel: expected a quoted string, got 42"),
        ("root = ['/dev/xvda']", "vm.cfg:2: root: expected a quoted string, got a list"),
        ("disk = 5", "vm.cfg:2: disk: expected a list of strings, got 5"),
        ("disk = ['phy:/dev/a,xvda,w', 7]", "vm.cfg:2: disk: expected a quoted string, got 7"),
        ("uuid = 'not-a-uuid'", "vm.cfg:2: uuid: invalid UUID 'not-a-uuid'"),
        ("builder = 'windows'", "vm.cfg:2: builder: invalid value 'windows' "
                                "(allowed: linux, generic, hvm)"),
        ("type = 'xen'", "vm.cfg:2: type: invalid value 'xen' (allowed: pv, pvh, hvm)"),
        ("extra = 'a'\ncmdline = 'b'",
         "vm.cfg:3: cmdline: 'extra' and 'cmdline' are the same setting; give only one"),
        ("builder = 'hvm'\ntype = 'pv'",
         "vm.cfg:3: type: 'pv' contradicts the domain type set by builder"),
        ("vif = ['mac=01:16:3e:00:00:01']",
         "vm.cfg:2: vif: MAC address '01:16:3e:00:00:01' is a multicast address"),
        ("vif = ['mac=zz']", "vm.cfg:2: vif: invalid MAC address 'zz'"),
    ],
)
def test_type_errors(text: str, message: str) -> None:
    assert str(error("name = 'a'\n" + text)) == message


def test_action_error_lists_allowed_values() -> None:
    e = error("name='a'\n\non_crash = 'explode'")
    assert str(e).startswith("vm.cfg:3: on_crash: invalid value 'explode' (allowed: destroy, ")
    for action in Action:
        assert action.value in str(e)


@pytest.mark.parametrize(
    ("text", "builder"),
    [("builder='linux'", "pv"), ("builder='hvm'", "hvm"), ("builder='generic'", "pv"),
     ("type='pv'", "pv"), ("type='pvh'", "pvh"), ("type='hvm'", "hvm"),
     ("builder='hvm'; type='hvm'", "hvm")],
)
def test_builder_and_type(text: str, builder: str) -> None:
    assert parse(f"name='a'\n{text}").spec.builder == builder


def test_cmdline_is_an_alias_of_extra() -> None:
    assert parse("name='a'\ncmdline='console=ttyS0'").spec.extra == "console=ttyS0"


def test_missing_name() -> None:
    e = error("memory = 256\n")
    assert str(e) == "vm.cfg: name: missing (every domain needs a name)"
    assert e.line is None


# --------------------------------------------------------------------------- validate() with lines


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name='a'\nmemory=512\nmaxmem=256",
         "vm.cfg:3: maxmem: 256 MiB is less than memory (512 MiB)"),
        ("name='a'\nmaxmem=64", "vm.cfg:2: maxmem: 64 MiB is less than memory (128 MiB)"),
        ("name='a'\nvcpus=4\nmaxvcpus=2", "vm.cfg:2: vcpus: 4 is more than maxvcpus (2)"),
        ("name='a'\nmaxvcpus=-1", "vm.cfg:2: vcpus: 1 is more than maxvcpus (-1)"),
        ("name='a'\nmaxvcpus=65", "vm.cfg:2: maxvcpus: 65 is more than 64"),
        ("name='a'\n\nmemory=0", "vm.cfg:3: memory: must be positive, got 0"),
        ("name='a'\nvcpus=-2", "vm.cfg:2: vcpus: must be positive, got -2"),
        ("memory=1\nname='bad name!'", "vm.cfg:2: name: invalid domain name 'bad name!'"),
        ("name='a'\nramdisk='/r'", "vm.cfg:2: ramdisk: given without a kernel"),
        ("name='a'\ndisk=['phy:/dev/a,xvda,w',\n 'phy:/dev/b,/dev/xvda,w']",
         "vm.cfg:2: disk: target xvda used twice"),
        ("name='a'\nvif=['mac=00:16:3e:00:00:01','mac=00:16:3E:00:00:01']",
         "vm.cfg:2: vif: MAC 00:16:3e:00:00:01 used twice"),
    ],
)
def test_validate_errors_name_file_and_line(text: str, message: str) -> None:
    e = error(text)
    assert str(e) == message
    assert e.file == "vm.cfg"


# --------------------------------------------------------------------------- unknown keys


def test_unknown_keys_are_kept_with_a_warning() -> None:
    cfg = parse("name='a'\n# c\nbootloader = '/usr/bin/pygrub'\nvfb = [ 'vnc=1' ]\n")
    assert cfg.spec.unknown == {"bootloader": "/usr/bin/pygrub", "vfb": ["vnc=1"]}
    assert cfg.warnings == [
        "vm.cfg:3: unknown key 'bootloader' (kept)",
        "vm.cfg:4: unknown key 'vfb' (kept)",
    ]


# --------------------------------------------------------------------------- overrides


def test_overrides_replace_file_keys_and_add_new_ones() -> None:
    cfg = parse(
        "name='a'\nmemory=2048\nvif=['bridge=xenbr0']\n",
        overrides=["memory=256", 'vif=["bridge=br0", "bridge=br1"]', "name=foo",
                   "extra=console=hvc0 root=/dev/xvda1", "vcpus = 2"],
    )
    s = cfg.spec
    assert s.memory == 256 and s.maxmem == 256
    assert [v.bridge for v in s.vifs] == ["br0", "br1"]
    assert s.name == "foo"
    assert s.extra == "console=hvc0 root=/dev/xvda1"
    assert s.vcpus == 2
    assert cfg.raw["memory"] == 256
    assert cfg.raw["vif"] == ["bridge=br0", "bridge=br1"]
    assert cfg.raw["name"] == "foo"


def test_override_quoted_and_bare_values() -> None:
    cfg = parse_config(
        "", overrides=["name='quoted'", "kernel=/boot/vmlinuz", "extra=", "ramdisk='/r"]
    )
    s = cfg.spec
    assert (s.name, s.kernel, s.extra, s.ramdisk) == ("quoted", "/boot/vmlinuz", "", "'/r")


def test_override_gives_the_name() -> None:
    assert parse_config("memory=64", overrides=["name=vm1"]).spec.name == "vm1"


def test_last_override_wins() -> None:
    assert parse("name='a'", overrides=["memory=64", "memory=96"]).spec.memory == 96


def test_override_unknown_key_warning() -> None:
    cfg = parse("name='a'", overrides=["memory=256", "foo=bar"])
    assert cfg.warnings == ["command line:2: unknown key 'foo' (kept)"]
    assert cfg.spec.unknown == {"foo": "bar"}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["memory=abc"], "command line:1: memory: expected an integer, got 'abc'"),
        (["vcpus=2", "memory=2048 + 1"],
         "command line:2: memory: expected an integer, got '2048 + 1'"),
        (["memory"], "command line:1: expected KEY=VALUE, got 'memory'"),
        (["vcpus=1", "bad key=1"], "command line:2: expected KEY=VALUE, got 'bad key=1'"),
        (["=5"], "command line:1: expected KEY=VALUE, got '=5'"),
        (["disk=['phy:/dev/a,zz,w']"],
         "command line:1: disk: invalid disk target 'zz' (expected sdX, xvdX, hdX or vdX, "
         "or a partition of one such as xvda2)"),
        (["maxmem=64"], "command line:1: maxmem: 64 MiB is less than memory (128 MiB)"),
        (["cmdline=x"],
         "command line:1: cmdline: 'extra' and 'cmdline' are the same setting; give only one"),
    ],
)
def test_override_errors(overrides: list[str], message: str) -> None:
    e = error("name='a'\nextra='e'\n", tuple(overrides))
    assert str(e) == message
    assert e.file == "command line"


def test_raw_is_plain_python_values() -> None:
    cfg = parse("name='a'\nmemory=0x40\ndisk=['phy:/dev/a,xvda,w']\nfoo=1.5")
    assert cfg.raw == {"name": "a", "memory": 64, "disk": ["phy:/dev/a,xvda,w"], "foo": 1.5}


# --------------------------------------------------------------------------- parse_disk


@pytest.mark.parametrize(
    ("spec", "disk"),
    [
        ("phy:/dev/vgvirtualdebian/lvsysteme,sda,w",
         DiskSpec("sda", "phy", "/dev/vgvirtualdebian/lvsysteme", "w", "disk")),
        ("phy:/dev/sde,/dev/sda:w", DiskSpec("sda", "phy", "/dev/sde", "w")),
        ("phy:/dev/sde,/dev/sda:r", DiskSpec("sda", "phy", "/dev/sde", "r")),
        ("phy:/dev/mapper/mpath5,/dev/sda,w", DiskSpec("sda", "phy", "/dev/mapper/mpath5", "w")),
        ("file:/srv/disk.img,xvda,w", DiskSpec("xvda", "file", "/srv/disk.img", "w")),
        ("file:/x.iso,hdc:cdrom,r", DiskSpec("hdc", "file", "/x.iso", "r", "cdrom")),
        ("file:/x.iso,hdc:cdrom", DiskSpec("hdc", "file", "/x.iso", "r", "cdrom")),
        (",hdc:cdrom,r", DiskSpec("hdc", "file", "", "r", "cdrom")),
        ("tap:aio:/x.img,xvda,w", DiskSpec("xvda", "file", "/x.img", "w")),
        ("tap2:tapdisk:aio:/x.img,xvda,w", DiskSpec("xvda", "file", "/x.img", "w")),
        ("aio:/x.img,xvda,w", DiskSpec("xvda", "file", "/x.img", "w")),
        ("raw:/dev/vg/lv,xvda,w", DiskSpec("xvda", "phy", "/dev/vg/lv", "w")),
        ("/dev/vg/lv,xvda,w", DiskSpec("xvda", "phy", "/dev/vg/lv", "w")),
        ("/srv/a.img,xvda,r", DiskSpec("xvda", "file", "/srv/a.img", "r")),
        ("/srv/a.img,xvda", DiskSpec("xvda", "file", "/srv/a.img", "w")),
        ("phy:/dev/a,xvda,w!", DiskSpec("xvda", "phy", "/dev/a", "w")),
        ("phy:/dev/a,xvda,rw", DiskSpec("xvda", "phy", "/dev/a", "w")),
        ("phy:/dev/a,xvda,ro", DiskSpec("xvda", "phy", "/dev/a", "r")),
        ("phy:/dev/a,xvda,R", DiskSpec("xvda", "phy", "/dev/a", "r")),
        ("phy:sda1,sda,w", DiskSpec("sda", "phy", "/dev/sda1", "w")),
        ("file:/x.img,ioemu:hda,w", DiskSpec("hda", "file", "/x.img", "w")),
        (" phy:/dev/a , xvdb , w ", DiskSpec("xvdb", "phy", "/dev/a", "w")),
        ("phy:/dev/a,xvda,w,", DiskSpec("xvda", "phy", "/dev/a", "w")),
        ("/srv/a.img,raw,xvda,r", DiskSpec("xvda", "file", "/srv/a.img", "r")),
        ("target=/x.img, vdev=xvda, access=rw, format=raw", DiskSpec("xvda", "file", "/x.img")),
        ("vdev=xvdb, access=r, target=/dev/vg/lv", DiskSpec("xvdb", "phy", "/dev/vg/lv", "r")),
        ("target=/x.img,vdev=xvda,access=ro", DiskSpec("xvda", "file", "/x.img", "r")),
        ("vdev=hdc, devtype=cdrom, target=/x.iso", DiskSpec("hdc", "file", "/x.iso", "r", "cdrom")),
        ("vdev=hdc, cdrom", DiskSpec("hdc", "file", "", "r", "cdrom")),
        ("/x.iso,hdc,r,format=raw, devtype=cdrom", DiskSpec("hdc", "file", "/x.iso", "r", "cdrom")),
        ("target=/x.img,vdev=xvda,backendtype=phy", DiskSpec("xvda", "phy", "/x.img", "w")),
        ("target=/dev/a,vdev=xvda,backendtype=qdisk", DiskSpec("xvda", "phy", "/dev/a", "w")),
        ("phy:/dev/a,xvda,w,discard", DiskSpec("xvda", "phy", "/dev/a", "w")),
        ("phy:/dev/a,vdb,w", DiskSpec("vdb", "phy", "/dev/a", "w")),
    ],
)
def test_parse_disk(spec: str, disk: DiskSpec) -> None:
    assert parse_disk(spec) == disk


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("", "no guest device"),
        ("phy:/dev/a", "no guest device"),
        ("phy:/dev/a,,w", "no guest device"),
        ("phy:/dev/a,xvda,x", "invalid access mode 'x'"),
        ("phy:/dev/a,xvda,access=z", "invalid access mode 'z'"),
        ("phy:/dev/a,floppy,w", "invalid disk target 'floppy'"),
        ("phy:/dev/a,xvda:bogus,w", "invalid suffix 'bogus'"),
        (",xvda,w", "has no host path"),
        ("qcow2:/x.qcow2,xvda,w", "disk format 'qcow2' is not supported"),
        ("tap:qcow2:/x.qcow2,xvda,w", "disk format 'qcow2' is not supported"),
        ("target=/x,vdev=xvda,format=qcow2", "disk format 'qcow2' is not supported"),
        ("target=/x,vdev=xvda,format=zip", "unknown disk format 'zip'"),
        ("drbd:res0,xvda,w", "unknown disk type prefix 'drbd:'"),
        ("target=/x,vdev=xvda,devtype=floppy", "invalid devtype 'floppy'"),
        ("target=/x,vdev=xvda,backendtype=nbd", "unknown backendtype 'nbd'"),
        ("target=/x,vdev=xvda,colour=red", "unknown disk setting 'colour'"),
        ("vdev=xvda,vdev=xvdb,target=/x", "vdev= given twice"),
        ("/a,xvda,w,target=/b", "gives the path twice"),
        ("/a,raw,xvda,w,extra", "too many fields"),
    ],
)
def test_parse_disk_errors(spec: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(")):
        parse_disk(spec)


# --------------------------------------------------------------------------- parse_vif


def test_parse_vif_seed() -> None:
    assert parse_vif("mac=00:16:3e:00:00:01, bridge=xenbr0") == VifSpec(
        mac="00:16:3e:00:00:01", bridge="xenbr0")


def test_parse_vif_everything() -> None:
    v = parse_vif(" mac = 00:16:3E:AA:BB:CC ,bridge=br0,model=e1000,ip=10.0.0.2/24, "
                  "gateway=10.0.0.1,vifname=web0,rate=10Mb/s,")
    assert v.mac == "00:16:3e:aa:bb:cc"
    assert (v.bridge, v.model, v.ip, v.gateway, v.vifname) == (
        "br0", "e1000", "10.0.0.2/24", "10.0.0.1", "web0")
    assert v.type == "bridge"
    assert v.extra == {"rate": "10Mb/s"}


@pytest.mark.parametrize(
    ("spec", "attrs"),
    [
        ("", {"model": "virtio-net-pci", "type": "bridge", "mac": None}),
        ("model=virtio", {"model": "virtio-net-pci"}),
        ("model=virtio-net", {"model": "virtio-net-pci"}),
        ("model=rtl8139", {"model": "rtl8139"}),
        ("model=E1000", {"model": "e1000"}),
        ("type=ioemu, bridge=br0", {"type": "bridge", "bridge": "br0"}),
        ("type=vif", {"type": "bridge"}),
        ("type=user", {"type": "user"}),
        ("user=1", {"type": "user"}),
        ("nat=1", {"type": "nat"}),
        ("nat=0", {"type": "bridge"}),
        ("script=vif-nat", {"type": "nat", "extra": {"script": "vif-nat"}}),
        ("script=/etc/xen/scripts/vif-bridge", {"type": "bridge"}),
        ("ip=10.0.0.2", {"ip": "10.0.0.2"}),
        ("ip=10.0.0.2 10.0.0.3", {"ip": "10.0.0.2 10.0.0.3"}),
        ("ip=fd00::2/64", {"ip": "fd00::2/64"}),
    ],
)
def test_parse_vif_variants(spec: str, attrs: dict[str, object]) -> None:
    v = parse_vif(spec)
    for k, want in attrs.items():
        assert getattr(v, k) == want, k


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("mac=00:16:3e:00:00", "invalid MAC address"),
        ("mac=03:00:00:00:00:01", "multicast"),
        ("bridge", "expected key=value"),
        ("=x", "expected key=value"),
        ("bridge=", "empty bridge="),
        ("bridge=a,bridge=b", "bridge= given twice"),
        ("model=ne3000", "unknown NIC model 'ne3000'"),
        ("ip=10.0.0.300", "invalid ip address '10.0.0.300'"),
        ("gateway=10.0.0.1/24", "invalid gateway address"),
        ("type=tap", "invalid vif type 'tap'"),
        ("nat=maybe", "nat= must be 1 or 0"),
        ("nat=1,user=1", "several network types: nat, user"),
        ("type=user,script=vif-nat", "several network types: nat, user"),
    ],
)
def test_parse_vif_errors(spec: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        parse_vif(spec)


# --------------------------------------------------------------------------- partition targets


@pytest.mark.parametrize(
    ("spec", "disk"),
    [
        ("phy:/dev/vg/dom-disk,xvda2,w", DiskSpec("xvda2", "phy", "/dev/vg/dom-disk", "w")),
        ("phy:/dev/vg/dom-swap,xvda1,w", DiskSpec("xvda1", "phy", "/dev/vg/dom-swap", "w")),
        ("file:/x.img,hda1,w", DiskSpec("hda1", "file", "/x.img", "w")),
        ("phy:/dev/a,/dev/sdb15:r", DiskSpec("sdb15", "phy", "/dev/a", "r")),
        ("vdev=xvdaa3, target=/dev/a", DiskSpec("xvdaa3", "phy", "/dev/a", "w")),
    ],
)
def test_partition_targets_are_accepted(spec: str, disk: DiskSpec) -> None:
    assert parse_disk(spec) == disk


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("phy:/dev/a,xvda16,w", "partition numbers go from 1 to 15"),
        ("phy:/dev/a,xvda0,w", "partition numbers go from 1 to 15"),
        ("phy:/dev/a,xvda01,w", "partition numbers go from 1 to 15"),
        ("file:/x.iso,hdc1:cdrom,r", "a CD-ROM cannot be a partition"),
    ],
)
def test_partition_target_errors(spec: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        parse_disk(spec)


def test_slots_and_what_collides() -> None:
    assert [DiskSpec(t).slot for t in ("xvda", "sdb", "hda2", "xvdaa15")] == \
        [(0, 0), (1, 0), (0, 2), (26, 15)]
    ok = parse("name='a'\ndisk=['phy:/dev/a,xvda1,w', 'phy:/dev/b,xvda2,w', 'phy:/dev/c,xvdb']")
    assert [d.target for d in ok.spec.disks] == ["xvda1", "xvda2", "xvdb"]
    assert str(error("name='a'\ndisk=['phy:/dev/a,sda,w', 'phy:/dev/b,xvda,w']")) == \
        "vm.cfg:2: disk: sda and xvda name the same disk"
    assert str(error("name='a'\ndisk=['phy:/dev/a,xvda2', 'phy:/dev/b,sda2']")) == \
        "vm.cfg:2: disk: xvda2 and sda2 name the same disk"
    assert str(error("name='a'\n\ndisk=['phy:/dev/a,xvda1', 'phy:/dev/b,xvda']")) == \
        "vm.cfg:3: disk: xvda1 is a partition of xvda, which is also a disk of this " \
        "domain (give one or the other)"


# --------------------------------------------------------------------------- nbd disks


@pytest.mark.parametrize(
    ("spec", "path"),
    [
        ("nbd:127.0.0.1 10809,xvda,w", "nbd://127.0.0.1:10809"),  # xm's block-nbd form
        ("nbd:192.168.0.1  3456,hda1,w", "nbd://192.168.0.1:3456"),
        ("nbd:::1 10810,xvda,w", "nbd://[::1]:10810"),
        ("nbd:array.lab:10811,xvda,w", "nbd://array.lab:10811"),  # QEMU's legacy form
        ("nbd:array,xvda,w", "nbd://array:10809"),
        ("nbd:10.0.0.1:10809:exportname=sys,xvda,w", "nbd://10.0.0.1:10809/sys"),
        ("nbd:[fe80::1]:99,xvda,w", "nbd://[fe80::1]:99"),
        ("nbd://array:10809/lun-1,xvda,w", "nbd://array:10809/lun-1"),
        ("nbd://array/lun-1,xvda,w", "nbd://array:10809/lun-1"),
        ("NBD://[::1]:1/x,xvda,w", "nbd://[::1]:1/x"),
        ("vdev=xvda, access=rw, target=nbd://h:2/e", "nbd://h:2/e"),
    ],
)
def test_nbd_disk_forms(spec: str, path: str) -> None:
    assert parse_disk(spec) == DiskSpec("xvda" if "hda1" not in spec else "hda1", "nbd",
                                        path, "w")


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("nbd:host 99999,xvda,w", "invalid NBD port '99999'"),
        ("nbd:host 0,xvda,w", "invalid NBD port '0'"),
        ("nbd:host port,xvda,w", "invalid NBD port 'port'"),
        ("nbd:bad_host! 1,xvda,w", "invalid NBD server 'bad_host!'"),
        ("nbd:a b c,xvda,w", "invalid NBD disk"),
        ("nbd://,xvda,w", "invalid NBD URI"),
        ("nbd://h:1/a b,xvda,w", "invalid NBD export name"),
        ("target=nbd:h 1, vdev=xvda, backendtype=phy", "backendtype= does not apply"),
    ],
)
def test_nbd_disk_errors(spec: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        parse_disk(spec)


def test_nbd_server_of_the_canonical_uri() -> None:
    assert nbd_server("nbd://127.0.0.1:10809") == ("127.0.0.1", 10809, "")
    assert nbd_server("nbd://[::1]:1/sys") == ("::1", 1, "sys")
    assert nbd_server(nbd_uri("nbd:h 7")) == ("h", 7, "")
    with pytest.raises(ValueError):
        nbd_server("nbd://h/x")  # not canonical: no port


# --------------------------------------------------------------------------- restart=


@pytest.mark.parametrize(
    ("value", "actions"),
    [
        ("onreboot", (Action.DESTROY, Action.RESTART, Action.DESTROY)),
        ("always", (Action.RESTART,) * 3),
        ("never", (Action.DESTROY,) * 3),
    ],
)
def test_restart_sets_the_three_actions(value: str, actions: tuple[Action, ...]) -> None:
    cfg = parse(f"name='a'\nrestart = '{value}'\n")
    assert (cfg.spec.on_poweroff, cfg.spec.on_reboot, cfg.spec.on_crash) == actions
    assert cfg.warnings == [] and cfg.spec.unknown == {}


def test_explicit_on_keys_win_over_restart() -> None:
    cfg = parse("name='a'\nrestart = 'always'\non_crash = 'preserve'\non_reboot = 'restart'\n")
    s = cfg.spec
    assert (s.on_poweroff, s.on_reboot, s.on_crash) == \
        (Action.RESTART, Action.RESTART, Action.PRESERVE)
    assert cfg.warnings == ["vm.cfg:2: restart: 'always' would make on_crash restart; "
                            "on_crash = 'preserve' (vm.cfg:3) wins"]
    over = parse("name='a'\nrestart='never'\n", overrides=["on_poweroff=restart"])
    assert over.spec.on_poweroff is Action.RESTART and over.spec.on_crash is Action.DESTROY
    assert over.warnings == ["vm.cfg:2: restart: 'never' would make on_poweroff destroy; "
                             "on_poweroff = 'restart' (command line:1) wins"]


def test_restart_errors() -> None:
    assert str(error("name='a'\n\nrestart='sometimes'")) == \
        "vm.cfg:3: restart: invalid value 'sometimes' (allowed: onreboot, always, never)"
    assert "expected a quoted string" in str(error("name='a'\nrestart=1"))


# --------------------------------------------------------------------------- memory warning


def test_too_little_memory_for_the_guest_kit_warns() -> None:
    assert parse("name='a'\nmemory = 64\n").warnings == [
        "vm.cfg:2: memory: 64 MiB is less than the guest kit needs to boot (96 MiB)"]
    assert parse("name='a'", overrides=["memory=80"]).warnings == [
        "command line:1: memory: 80 MiB is less than the guest kit needs to boot (96 MiB)"]
    assert parse("name='a'\nmemory=96").warnings == []
    assert parse("name='a'\nmemory=32\nkernel='/boot/vmlinuz'").warnings == []


# --------------------------------------------------------------------------- QEMU: LUNs, order


def _disks(*targets: str) -> list[DiskSpec]:
    return [DiskSpec(t, "file", f"/d/{t}.img") for t in targets]


def test_luns_never_collide_and_keep_the_whole_disk_numbers() -> None:
    assert [disk_lun(t) for t in ("sda", "xvdb", "hdc", "sdz", "sdaa")] == [0, 1, 2, 25, 26]
    assert [disk_lun(t) for t in ("xvda1", "xvda2", "sda15", "xvdb1", "xvdaa1")] == \
        [1025, 1026, 1039, 1041, 1024 + 16 * 26 + 1]
    every = [f"xvd{c}{p}" for c in "abcdefghijklmnopqrstuvwxyz" for p in ["", *range(1, 16)]]
    assert len({disk_lun(t) for t in every}) == len(every)
    assert max(disk_lun(f"xvd{a}{b}15") for a in "ai" for b in "az") <= 16383  # virtio-scsi


def test_scan_order_names_and_creation_order() -> None:
    disks = [*_disks("xvdb", "xvda2", "xvda1"), DiskSpec("hdc", "file", "/x.iso", "r", "cdrom")]
    assert [d.target for d in scan_order(disks)] == ["xvda1", "xvda2", "xvdb", "hdc"]
    assert [d.target for d in creation_order(disks)] == ["hdc", "xvdb", "xvda2", "xvda1"]
    assert guest_names(disks) == {"xvda1": "/dev/sda", "xvda2": "/dev/sdb", "xvdb": "/dev/sdc"}
    assert [sd_name(i) for i in (0, 25, 26, 701)] == ["sda", "sdz", "sdaa", "sdzz"]


@pytest.mark.parametrize(
    ("targets", "root", "udev", "new"),
    [
        # xen-tools: partition targets; the guest has no xvda2, only a disk with that serial
        (("xvda2", "xvda1"), "/dev/xvda2", True, BY_ID + "xvda2"),
        (("xvda2", "xvda1"), "/dev/xvda2", False, "/dev/sdb"),
        (("xvda2", "xvda1"), "xvda1", False, "/dev/sda"),
        (("sda2", "sda1"), "/dev/sda2", False, "/dev/sdb"),
        (("hda1",), "/dev/xvda1", False, "/dev/sda"),  # the same slot, another prefix
        # a whole disk with a partition table: its partition
        (("xvda",), "/dev/xvda1", True, BY_ID + "xvda-part1"),
        (("xvda",), "/dev/xvda1", False, "/dev/sda1"),
        (("sdb",), "/dev/sdb1", False, "/dev/sda1"),  # no sda: the guest calls it sda
        # already the guest's name, or not one of the domain's disks: as written
        (("sda", "sdb"), "/dev/sdb1", True, None),
        (("sda",), "/dev/sda", True, None),
        (("xvda2",), "/dev/xvda3", True, None),
        (("xvda",), "/dev/mapper/vg-root", True, None),
        (("xvda",), "LABEL=root", True, None),
        (("xvda",), "/dev/xvdb1", True, None),
    ],
)
def test_guest_root(targets: tuple[str, ...], root: str, udev: bool, new: str | None) -> None:
    assert guest_root(root, _disks(*targets), udev=udev) == new


def test_argv_partition_targets_root_and_order(tmp_path: Path) -> None:
    spec = parse("name='xt'\nroot='/dev/xvda2 ro'\nextra='x=1 root=/dev/xvda2'\n"
                 "disk=['phy:/dev/vg/dom-disk,xvda2,w', 'phy:/dev/vg/dom-swap,xvda1,w']\n").spec
    plan = LaunchPlan(spec=spec, rundir=tmp_path, kernel=tmp_path / "k", initrd=tmp_path / "i",
                      cmdline="console=ttyS0 root=/dev/xvda2 ro x=1 root=/dev/xvda2")
    argv = build_argv(plan, qemu="q", accel="tcg")
    assert argv[argv.index("-append") + 1] == \
        f"console=ttyS0 root={BY_ID}xvda2 ro x=1 root={BY_ID}xvda2"
    devices = [a for a in argv if a.startswith("scsi-hd,")]
    assert devices == [
        "scsi-hd,id=dev-xvda2,bus=scsi0.0,channel=0,scsi-id=0,lun=1026,drive=disk-xvda2,"
        "serial=xvda2",
        "scsi-hd,id=dev-xvda1,bus=scsi0.0,channel=0,scsi-id=0,lun=1025,drive=disk-xvda1,"
        "serial=xvda1"]
    plan.initrd = None  # no initramfs, no udev: the name the kernel gives it
    assert "root=/dev/sdb ro" in guest_cmdline(plan)
    assert plan.cmdline == "console=ttyS0 root=/dev/xvda2 ro x=1 root=/dev/xvda2"  # kept


def test_nbd_blockdev() -> None:
    bd = disk_blockdev(DiskSpec("sdb", "nbd", "nbd://127.0.0.1:10809"))
    assert bd["file"] == {"driver": "nbd", "server": {"type": "inet", "host": "127.0.0.1",
                                                      "port": "10809"},
                          "reconnect-delay": 30, "node-name": "proto-sdb", "read-only": False,
                          "auto-read-only": False, "discard": "unmap"}
    ro = disk_blockdev(DiskSpec("sdc", "nbd", "nbd://[::1]:7/lun0", "r"))
    assert ro["file"]["server"] == {"type": "inet", "host": "::1", "port": "7"}  # type: ignore[index]
    assert ro["file"]["export"] == "lun0" and ro["read-only"] is True  # type: ignore[index]
    mp = disk_blockdev(DiskSpec("sda", "phy", "/dev/mapper/sys"), "/run/mp/sys.sock")
    assert mp["file"]["server"] == {"type": "unix", "path": "/run/mp/sys.sock"}  # type: ignore[index]
    assert mp["file"]["export"] == "sys"  # type: ignore[index]


# --------------------------------------------------------------------------- Xen: xl.cfg


def test_xen_vdevs_and_root() -> None:
    assert [xen_vdev(t) for t in ("xvda", "xvda2", "sda", "sdb1", "hda1", "sdaa")] == \
        ["xvda", "xvda2", "xvda", "xvdb1", "xvda1", "xvdaa"]
    assert disk_entry(DiskSpec("xvda2", "phy", "/dev/vg/dom-disk")) == \
        "vdev=xvda2, access=rw, format=raw, backendtype=phy, target=/dev/vg/dom-disk"
    spec = parse("name='x'\ndisk=['phy:/dev/a,sda2,w']\n").spec
    text = render(spec, kernel="/k", ramdisk=None, nics=[],
                  cmdline="console=hvc0 root=/dev/sda2 ro other=/dev/sda2")
    assert 'extra = "console=hvc0 root=/dev/xvda2 ro other=/dev/sda2"' in text
    assert 'disk = [ "vdev=xvda2, access=rw' in text
    same = render(spec, kernel="/k", ramdisk=None, nics=[], cmdline="root=/dev/xvda2 ro")
    assert 'extra = "root=/dev/xvda2 ro"' in same


def test_xen_refuses_nbd_disks() -> None:
    with pytest.raises(ConfigError, match=r"^disk xvdb: nbd://h:1: NBD disks are not "
                       r"supported on Xen hosts"):
        disk_entry(DiskSpec("xvdb", "nbd", "nbd://h:1"))


# --------------------------------------------------------------------------- image formats


def test_image_formats_are_recognised(tmp_path: Path) -> None:
    assert image_format(b"QFI\xfb\x00\x00\x00\x03" + bytes(64)) == "qcow2"
    assert image_format(b"QFI\xfb\x00\x00\x00\x01" + bytes(64)) == "qcow"
    assert image_format(b"KDMV" + bytes(80)) == "vmdk"
    assert image_format(bytes(0x40) + b"\x7f\x10\xda\xbe") == "vdi"
    assert image_format(bytes(512)) is None
    assert image_format(b"\xebc\x90" + bytes(509)) is None  # an MBR: raw
    assert image_format(b"") is None
    assert probe_file(tmp_path / "missing") is None


def test_check_disks_refuses_a_qcow2_file(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from sanvisor.agent.host import HostResources

    img = tmp_path / "vm.img"
    img.write_bytes(b"QFI\xfb\x00\x00\x00\x03" + bytes(4096))
    spec = parse(f"name='a'\ndisk=['file:{img},xvda,w', 'nbd:h 1,xvdb,w']\n").spec
    host = SimpleNamespace(remote=False, mapper=None)
    with pytest.raises(ConfigError, match=r"disk xvda: .*vm\.img is a qcow2 image, not raw"):
        HostResources.check_disks(host, spec)  # type: ignore[arg-type]
    img.write_bytes(bytes(4096))
    HostResources.check_disks(host, spec)  # type: ignore[arg-type]  # raw; nbd: no path
