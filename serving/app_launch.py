"""Start the Streamlit app with the engine already loading: ``python -m serving.app_launch [streamlit flags]``.

Streamlit has no server-start hook, and a page's script runs only when a browser opens it. This launcher
starts the engine's background load (``serving.webapp.engine``) in the server process first, then hands
over to ``streamlit run streamlit_app.py``; the pages find the same engine, already loading or loaded.
The repo's ``.streamlit/config.toml`` applies (localhost, no file watcher); flags given here override it.
"""

from __future__ import annotations

import sys
from pathlib import Path

APP = Path(__file__).resolve().parents[1] / "streamlit_app.py"


def main(argv: list[str] | None = None) -> int:
    from streamlit.web import cli as streamlit_cli

    from serving import webapp

    webapp.engine(webapp.app_home())  # returns at once; the model loads in a background thread
    sys.argv = ["streamlit", "run", str(APP), *(sys.argv[1:] if argv is None else argv)]
    return streamlit_cli.main()


if __name__ == "__main__":
    raise SystemExit(main())
