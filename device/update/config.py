"""``[update]``: where a board's model updates come from and what it may install.

Importing this module imports nothing of the update path (no python-tuf): the config loader reads it on every
command.
"""

from __future__ import annotations

from dataclasses import dataclass

from device.configschema import setting

_NAME = dict(pattern=r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", expect="1-64 characters from A-Z, a-z, 0-9, '.', '_', "
                                                                  "'-', starting with a letter or digit")


@dataclass(frozen=True)
class UpdateConfig:
    """``[update]``: signed, encrypted model updates (docs/updates.md)."""

    root_file: str = setting(
        "", "The repository's trusted root metadata (its 1.root.json), installed when the board is provisioned; "
            "never fetched on trust. Empty: updates are off.")
    repository: str = setting(
        "", "Where the repository is: a base URL (https://updates.example/fleet/), an MQTT broker serving it "
            "(mqtts://broker:8883/fieldnode/v1/repo, with [link]'s TLS files; fieldnode repo serve) or a directory "
            "(a USB stick, /media/usb/fleet-repo or file:///...), holding metadata/, targets/ and grants/.")
    credentials_file: str = setting(
        "", "With an https:// repository that needs a login: a file holding USER:PASSWORD (or USER:TOKEN) on one "
            "line, sent as HTTP Basic authentication; never credentials in update.repository itself. Empty: none.")
    identity_file: str = setting(
        "/etc/fieldnode/update.age", "This board's age identity (fieldnode keys generate NAME --kind recipient), "
                                     "mode 0600: it opens the board's release-key files.",
        pattern=r"(?s).*\S.*", expect="a file path")
    hwclass: str = setting("", "This board's hardware class, as releases name it (rpi4, jetson-orin-nano...); "
                               "empty accepts only releases for any class.", allow_empty=True, **_NAME)
    ring: str = setting("stable", "The rollout ring this board follows; it installs releases of this ring only.",
                        **_NAME)
    timeout_s: float = setting(30.0, "Network timeout of one request (connect, and the longest silence).",
                               minimum=1, maximum=3600)
    trial_s: float = setting(
        600.0, "How long a new model serves on trial (seconds of the agent's clock) before it is committed; the "
               "trial also needs trial_min_windows windows, and waits for them on an idle board.",
        minimum=1, maximum=7 * 86400)
    trial_min_windows: int = setting(
        50, "Windows the new model must classify before its trial can pass; latency and shadow agreement are "
            "judged only from this many on.", minimum=1, maximum=1_000_000)
    latency_factor: float = setting(
        1.5, "The new model's median latency may be at most this times the previous model's, both measured on "
             "this board; beyond it the trial fails (trial_failed).", minimum=1, maximum=100)
    shadow: bool = setting(
        True, "During a trial the previous model (the fallback slot, or the bundled model) also classifies each "
              "window (a second worker, not in the saver and critical levels), and the two must agree.")
    min_agreement: float = setting(
        0.9, "With the shadow: the share of windows on which the new and the previous model give the same label "
             "below which the trial fails (trial_failed).", minimum=0, maximum=1)

    def validate(self) -> list[tuple[str, str]]:
        """Updates need both ends: a trusted root and a repository, or neither (updates off); credentials live in
        a file of their own, never in the URL, and travel only over TLS (or to this machine)."""
        scheme, sep, rest = self.repository.partition("://")
        authority = rest.split("/", 1)[0].split("?", 1)[0].split("#", 1)[0] if sep else ""
        if "@" in authority:  # the message never repeats the URL: it holds a password
            return [("update.repository", "credentials (user:password@) do not belong in a URL, which ends up in "
                                          "logs and status; put them in a file named by update.credentials_file")]
        if self.credentials_file:
            host = authority.rsplit(":", 1)[0].strip("[]") if not authority.startswith("[") else \
                authority[1:].split("]", 1)[0]
            if scheme.lower() not in ("http", "https"):
                return [("update.credentials_file", "only an http(s):// repository takes credentials (an MQTT one "
                                                    "logs in with [link]'s)")]
            if scheme.lower() == "http" and host not in ("localhost", "127.0.0.1", "::1"):
                return [("update.credentials_file", "credentials would travel in clear text over http://: use an "
                                                    "https:// repository")]
        if self.root_file and not self.repository:
            return [("update.repository", "empty, but update.root_file is set: say where the repository is")]
        if self.repository and not self.root_file:
            return [("update.root_file", "empty, but update.repository is set: a board never trusts a repository "
                                         "without the root it was provisioned with")]
        return []
