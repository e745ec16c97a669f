"""The README, the Procfile and the settings say the same thing as the code."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from fulfilment.config import SETTINGS, Settings, settings_table
from fulfilment.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def test_readme_settings_table_is_current() -> None:
    block = README.split("<!-- settings:start -->\n", 1)[1].split("\n<!-- settings:end -->", 1)[0]
    assert block == settings_table(), "run: fulfilment settings --markdown"


def test_every_setting_is_documented_with_its_default() -> None:
    for setting in SETTINGS:
        assert f"`{setting.env}`" in README


def test_readme_starts_with_the_two_commands() -> None:
    blocks = re.findall(r"```sh\n(.+?)\n```", README)
    assert blocks[0].endswith("fulfilment demo")
    assert blocks[1].endswith("pytest")
    assert "pip install -e" in blocks[0] and "'.[test]'" in blocks[1]


def test_bad_setting_fails_with_one_clear_line() -> None:
    with pytest.raises(ConfigError, match="ONEBOX_READ_TIMEOUT='soon'"):
        Settings.from_env({"ONEBOX_READ_TIMEOUT": "soon"})
    with pytest.raises(ConfigError, match="FULFILMENT_VISIBILITY_TIMEOUT"):
        Settings.from_env({"FULFILMENT_VISIBILITY_TIMEOUT": "100"})


def test_secret_setting_is_never_shown() -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"ONEBOX_API_KEY": "k", "ONEBOX_API_URL": "not a url"})
    settings = Settings.from_env({"ONEBOX_API_KEY": "super-secret-key"})
    assert "super-secret-key" not in repr(settings) + str(caught.value)


def test_procfile_is_valid_for_honcho() -> None:
    done = subprocess.run([sys.executable, "-m", "honcho", "check"], cwd=ROOT,
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    names = {line.split(":", 1)[0] for line in (ROOT / "Procfile").read_text().splitlines()}
    assert names == {"worker", "beat", "sandbox"}
