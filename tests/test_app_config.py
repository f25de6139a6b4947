"""The repo's .streamlit/config.toml serves the app rather than editing it (issue 15): localhost only, no
file watcher, no run-on-save, no usage statistics; every key is one Streamlit knows (a misspelt key is
ignored by Streamlit without a word)."""

from __future__ import annotations

import tomllib
from pathlib import Path

CONFIG = Path(__file__).resolve().parents[1] / ".streamlit" / "config.toml"


def test_streamlit_config_serves_locally_without_watcher_or_statistics():
    config = tomllib.loads(CONFIG.read_text(encoding="utf-8"))
    server, browser = config["server"], config["browser"]
    assert server["address"] in ("127.0.0.1", "localhost")
    assert server["fileWatcherType"] == "none"
    assert server["runOnSave"] is False
    assert browser["gatherUsageStats"] is False
    assert server["enableXsrfProtection"] is True and server["headless"] is True
    from streamlit.config import get_config_options

    known = get_config_options()
    keys = [f"{section}.{key}" for section, values in config.items() for key in values]
    assert [k for k in keys if k not in known] == []
