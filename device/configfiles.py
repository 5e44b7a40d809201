"""The paths of a config that must be usable before the agent starts: its state directory and the update root.

A config can be valid key by key and still name a state directory the agent cannot make or write (a file where a
parent directory should be, a directory the service user does not own) or an update root that is not there.
``fieldnode run`` refuses such a config before it opens anything (:func:`device.config.check_agent`), and so do
``fieldnode config check`` and ``diag``'s config check, asking as the service user (:func:`service_identity`) when
root asks for it.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

SERVICE_USER = "fieldnode"  # the user and group of the unit (systemd/fieldnode.service, fieldnode.sysusers)
SERVICE_USER_ENV = "FIELDNODE_SERVICE_USER"


def service_user() -> str:
    """The name of the agent's user and group: ``fieldnode``, or ``$FIELDNODE_SERVICE_USER`` for an image that runs
    the unit under another name (the test suite names one that does not exist, so no verdict depends on whether the
    machine that runs it has a ``fieldnode`` user)."""
    return os.environ.get(SERVICE_USER_ENV) or SERVICE_USER


@dataclass(frozen=True)
class Identity:
    """A user the agent may run as, for permission checks made on its behalf.

    Attributes:
        name: The user's name (for messages and the ``chown`` remedy).
        uid: Its user id.
        gids: Its groups (primary and supplementary).
    """

    name: str
    uid: int
    gids: tuple[int, ...] = ()


def service_identity() -> Identity | None:
    """The agent's user ``fieldnode`` when root asks and that user exists; None to ask as this process.

    Root can write anything, so a check made as root says nothing of the service; a check made by any other user
    is made as that user (run it as the agent's user to learn what the agent can do).
    """
    if os.geteuid() != 0:
        return None
    import grp
    import pwd

    name = service_user()
    try:
        pw = pwd.getpwnam(name)
    except KeyError:  # no service user here (a development machine): root runs the agent
        return None
    gids = {pw.pw_gid} | {g.gr_gid for g in grp.getgrall() if name in g.gr_mem}
    return Identity(name, pw.pw_uid, tuple(sorted(gids)))


def can_write(path: str, who: Identity | None) -> bool:
    """Whether ``who`` (this process when None) may create files in the directory ``path``."""
    if who is None:
        return os.access(path, os.W_OK | os.X_OK)
    if who.uid == 0:
        return True
    st = os.stat(path)
    if st.st_uid == who.uid:
        bits = stat.S_IWUSR | stat.S_IXUSR
    elif st.st_gid in who.gids:
        bits = stat.S_IWGRP | stat.S_IXGRP
    else:
        bits = stat.S_IWOTH | stat.S_IXOTH
    return st.st_mode & bits == bits


def _user_name(who: Identity | None) -> str:
    if who is not None:
        return who.name
    import pwd

    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def state_dir_problem(path: str, who: Identity | None = None) -> str | None:
    """Why the agent cannot use ``path`` as its state directory, with the remedy; None when it can.

    A directory that does not exist yet is fine when every existing part of its path is a directory (the agent,
    or systemd's ``StateDirectory=``, makes it); an existing one must be writable by ``who``.
    """
    path = os.path.normpath(path)  # relative stays relative: the agent's working directory decides
    probe = path
    while True:
        try:
            st = os.stat(probe)
        except (FileNotFoundError, NotADirectoryError):  # not made yet, or a file further up: look further up
            parent = os.path.dirname(probe) or "."
            if parent == probe:
                return None
            probe = parent
            continue
        except OSError as exc:
            return f"{path}: cannot look at {probe} ({exc.strerror or exc}); check the directories above it"
        break
    if not stat.S_ISDIR(st.st_mode):
        what = "the state directory itself" if probe == path else f"{probe}, a part of its path,"
        return (f"{path}: {what} is a file, not a directory: the agent cannot make its state there; move the file "
                f"away or set device.state_dir to a directory")
    if probe != path:
        return None  # made at the agent's start
    user = _user_name(who)
    if not can_write(path, who):
        return (f"{path} is not writable by the agent's user {user} (owner uid {st.st_uid}, mode "
                f"{stat.S_IMODE(st.st_mode):04o}): chown {user}: {path}")
    return None


def root_file_problem(path: str) -> str | None:
    """Why the update root metadata ``path`` (``update.root_file``) cannot be read; None when it can."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO named by mistake must not hang
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return f"{path}: not a regular file; point update.root_file at the repository's 1.root.json"
        finally:
            os.close(fd)
    except FileNotFoundError:
        return (f"{path} does not exist: install the repository's 1.root.json there (it comes with the image, "
                f"never fetched), or empty update.root_file and update.repository to turn updates off")
    except OSError as exc:
        return f"{path}: cannot read it ({exc.strerror or exc}); it must be readable by the agent's user"
    return None
