"""Parsers of /proc files, on recorded contents."""

import os

from stages.linux import pagemap, procfs

STAT = (
    "4711 (my (odd) prog) S 4700 4711 4600 34816 4711 4194560 1150 0 0 0 3 1 0 0 20 0 1 0 "
    "123456 11485184 786 18446744073709551615 94558586245120 94558586250000 140733999999984 0 0 0 "
    "0 0 0 0 0 0 17 1 0 0 0 0 0 94558586262000 94558586263000 94558600000000 140734000001000 "
    "140734000001050 140734000001050 140734000002000 0\n"
)

SMAPS = """\
55f1c3a00000-55f1c3a01000 r--p 00000000 fe:00 26723                      /usr/bin/my prog
Size:                  4 kB
Rss:                   4 kB
Anonymous:             0 kB
VmFlags: rd mr mw me
7f0000000000-7f0000400000 rw-p 00000000 00:00 0 
Size:               4096 kB
Anonymous:          4096 kB
VmFlags: rd wr mr mw me ac
7ffd1e2f0000-7ffd1e311000 rw-p 00000000 00:00 0                          [stack]
Size:                132 kB
VmFlags: rd wr mr mw me gd ac
7ffd1e3f8000-7ffd1e3fc000 r--p 00000000 00:00 0                          [vvar]
VmFlags: rd mr pf io de dd
7ffd1e3fc000-7ffd1e3fe000 r--p 00000000 00:00 0                          [vvar_vclock]
VmFlags: rd mr pf io de dd
7ffd1e3fe000-7ffd1e400000 r-xp 00000000 00:00 0                          [vdso]
VmFlags: rd ex mr mw me de
7f1000000000-7f1000002000 rw-s 00000000 00:01 1041                       /dev/zero (deleted)
VmFlags: rd wr sh mr mw me ms
7f2000000000-7f2000001000 rw-p 00000000 00:00 0                          [anon:my arena]
VmFlags: rd wr mr mw me ac
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]
VmFlags: ex
"""

FDINFO = "pos:\t1234\nflags:\t02100002\nmnt_id:\t27\nino:\t5\n"

TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:A0F3 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 98765 1 0000000000000000 100 0 0 10 0
"""

UNIX = """\
Num       RefCount Protocol Flags    Type St Inode Path
0000000000000000: 00000003 00000000 00000000 0001 03 55501
0000000000000000: 00010000 00000000 00010000 0001 01 55502 /run/some.sock
"""


def test_stat_with_parentheses_in_comm():
    st = procfs.parse_stat(STAT)
    assert st["pid"] == 4711 and st["comm"] == "my (odd) prog" and st["state"] == "S"
    assert (st["ppid"], st["pgrp"], st["session"]) == (4700, 4711, 4600)
    assert st["num_threads"] == 1
    assert st["start_code"] == 94558586245120 and st["end_code"] == 94558586250000
    assert st["start_stack"] == 140733999999984
    assert st["start_data"] == 94558586262000 and st["start_brk"] == 94558600000000
    assert st["env_end"] == 140734000002000


def test_smaps_kinds_flags_and_paths():
    vmas = procfs.parse_smaps(SMAPS)
    assert [v["kind"] for v in vmas] == [
        "file", "anon", "stack", "vvar", "vvar_vclock", "vdso", "anon", "anon", "vsyscall"]
    assert vmas[0]["path"] == "/usr/bin/my prog" and vmas[0]["prot"] == 1 and vmas[0]["ino"] == 26723
    assert vmas[1]["path"] is None and vmas[1]["prot"] == 3 and not vmas[1]["shared"]
    assert vmas[2]["vmflags"] == ["rd", "wr", "mr", "mw", "me", "gd", "ac"]
    assert vmas[5]["prot"] == 5
    assert vmas[6]["shared"] and vmas[6]["path"] == "/dev/zero (deleted)"
    assert vmas[7]["path"] == "[anon:my arena]"
    assert vmas[8]["start"] == 0xffffffffff600000 and vmas[8]["prot"] == 4


def test_fdinfo_flags_are_octal():
    info = procfs.parse_fdinfo(FDINFO)
    assert info["pos"] == 1234 and info["flags"] == 0o2100002 and info["mnt_id"] == 27


def test_socket_tables():
    assert procfs.parse_net_inodes(TCP) == {98765}
    assert procfs.parse_net_inodes(UNIX) == {55501, 55502}


def test_pagemap_frame_keys():
    zero = 0x3b34
    present = pagemap.PRESENT | 0x1234
    assert pagemap.frame_key(present, zero, file_backed=False) == 0x1234
    assert pagemap.frame_key(pagemap.PRESENT | zero, zero, False) is None          # the zero page
    assert pagemap.frame_key(present | pagemap.FILE_OR_SHARED, zero, True) is None  # the file gives it back
    assert pagemap.frame_key(0, zero, False) is None                                 # not present
    swapped = pagemap.SWAPPED | (77 << 5) | 1  # type 1, offset 77
    key = pagemap.frame_key(swapped, zero, False)
    assert key is not None and key != (77 << 5 | 1) and key & pagemap.SWAP_KEY


# maps as the kernel writes it: a newline in a name as \012, a name's own spaces kept (the
# trailing one of the second line too), a \r as is; the last name is a deleted file's
ODD_MAPS = (
    "7f3000000000-7f3000002000 r--p 00000000 fe:00 4242                       /tmp/nl\\012name\n"
    "7f3000002000-7f3000004000 r--p 00000000 fe:00 4243                       /tmp/two  trail \n"
    "7f3000004000-7f3000006000 r--p 00000000 fe:00 4244                       /tmp/cr\rname\n"
    "7f3000006000-7f3000008000 rw-s 00000000 00:1a 77                         /dev/shm/x (deleted)\n"
)
ODD_PATHS = ["/tmp/nl\nname", "/tmp/two  trail ", "/tmp/cr\rname", "/dev/shm/x (deleted)"]


def test_maps_names_unescaped_and_kept_whole():
    lines = ODD_MAPS.split("\n")[:-1]
    smaps = "".join(line + "\nVmFlags: rd mr\n" for line in lines)
    by_line = [line + "\n" for line in smaps.split("\n")[:-1]]
    # as parse_maps reads the text, as read_smaps hands its lines (each with its "\n"), as text
    for vmas in (procfs.parse_maps(ODD_MAPS), procfs.parse_smaps(by_line), procfs.parse_smaps(smaps)):
        assert [v["path"] for v in vmas] == ODD_PATHS
        assert [v["kind"] for v in vmas] == ["file"] * 4
        # what the name says, until resolve_file_vmas asks the kernel
        assert [v["deleted"] for v in vmas] == [False, False, False, True]


def test_deleted_is_the_kernels_word_not_the_names(tmp_path):
    live = tmp_path / "live (deleted)"
    live.write_bytes(b"x")
    st = os.stat(live)
    dev = procfs.dev_string(st.st_dev)
    assert not procfs.is_deleted(str(live), dev, st.st_ino, st.st_nlink)  # the name leads to it
    assert not procfs.is_deleted(str(live), dev, st.st_ino)               # link count unknown
    assert procfs.is_deleted(str(live), dev, st.st_ino + 1)               # leads to another file
    assert procfs.is_deleted(str(tmp_path / "gone (deleted)"), dev, 5, 1)  # leads nowhere
    assert procfs.is_deleted(str(live), dev, st.st_ino, 0)                # no link left
    assert not procfs.is_deleted("/tmp/plain", dev, 5, 1)                 # no suffix: not unlinked
