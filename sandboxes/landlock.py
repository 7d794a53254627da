"""Landlock through raw syscalls (stdlib ctypes): restrict a process and its descendants.

Used inside the jail by the runner. A domain here allows reading and executing the
whole (already minimal) jail, writing only below the given directories, no TCP bind or
connect (ABI >= 4), and no signals or abstract-unix connections to processes outside
the domain (ABI >= 6). Missing kernel support degrades feature by feature; `abi()`
says what the kernel has.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence

_SYS_CREATE_RULESET = 444  # the same number on every Linux architecture
_SYS_ADD_RULE = 445
_SYS_RESTRICT_SELF = 446
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH = 1
_PR_SET_NO_NEW_PRIVS = 38

# filesystem rights by the ABI that introduced them
_FS_EXECUTE, _FS_WRITE_FILE, _FS_READ_FILE, _FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
_FS_V1 = (1 << 13) - 1  # EXECUTE .. MAKE_SYM
_FS_REFER, _FS_TRUNCATE, _FS_IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
_NET_BIND_TCP, _NET_CONNECT_TCP = 1 << 0, 1 << 1
_SCOPE_ABSTRACT_UNIX, _SCOPE_SIGNAL = 1 << 0, 1 << 1

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _RulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def abi() -> int:
    """The kernel's Landlock ABI version; 0 when Landlock is unavailable."""
    v = _libc.syscall(_SYS_CREATE_RULESET, None, ctypes.c_size_t(0), _CREATE_RULESET_VERSION)
    return max(int(v), 0)


def _fs_rights(version: int) -> int:
    rights = _FS_V1
    if version >= 2:
        rights |= _FS_REFER
    if version >= 3:
        rights |= _FS_TRUNCATE
    if version >= 5:
        rights |= _FS_IOCTL_DEV
    return rights


def restrict_self(writable: Sequence[str], readable: Sequence[str] = ("/",)) -> int:
    """Enter a new Landlock domain; returns the ABI used (0: nothing was enforced)."""
    version = abi()
    if version <= 0:
        return 0
    handled_fs = _fs_rights(version)
    attr = _RulesetAttr(handled_fs, 0, 0)
    size = 8
    if version >= 4:
        attr.handled_access_net = _NET_BIND_TCP | _NET_CONNECT_TCP
        size = 16
    if version >= 6:
        attr.scoped = _SCOPE_ABSTRACT_UNIX | _SCOPE_SIGNAL
        size = 24
    fd = _libc.syscall(_SYS_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), 0)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "landlock_create_ruleset failed")
    try:
        read = _FS_EXECUTE | _FS_READ_FILE | _FS_READ_DIR
        for path in readable:
            _add_path(fd, path, read & handled_fs)
        for path in writable:
            _add_path(fd, path, handled_fs)
        if _libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
        if _libc.syscall(_SYS_RESTRICT_SELF, fd, 0) != 0:
            raise OSError(ctypes.get_errno(), "landlock_restrict_self failed")
    finally:
        os.close(fd)
    return version


def _add_path(ruleset_fd: int, path: str, access: int) -> None:
    try:
        pfd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        rule = _PathBeneathAttr(access, pfd)
        if not os.path.isdir(path):
            # files take file rights only
            rule.allowed_access = access & (
                _FS_EXECUTE | _FS_WRITE_FILE | _FS_READ_FILE | _FS_TRUNCATE | _FS_IOCTL_DEV
            )
        if _libc.syscall(_SYS_ADD_RULE, ruleset_fd, _RULE_PATH_BENEATH, ctypes.byref(rule), 0):
            raise OSError(ctypes.get_errno(), f"landlock_add_rule({path}) failed")
    finally:
        os.close(pfd)
