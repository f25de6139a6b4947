"""Shared by the pages: wait for the engine with a visible "loading the model" progress bar and an estimate."""


import streamlit as st

from serving import webapp


def assistant():
    """The loaded assistant; while it loads, a progress bar with the phase, elapsed time and the estimate
    (the previous load's duration). A failed load shows its error and stops the page."""
    engine = webapp.engine(webapp.app_home())
    if not engine.ready and not engine.error:
        bar = st.progress(0.0, text="Loading the model…")
        while not engine.ready and not engine.error:
            s = engine.status()
            estimate = (f" of about {webapp.format_duration(s['expected_s'])} (the last load)" if s["expected_s"]
                        else " (first start: about a minute on 2 CPU cores)")
            bar.progress(s["fraction"] if s["fraction"] is not None else min(0.9, s["elapsed_s"] / 90),
                         text=f"Loading the model ({s['phase']}): {webapp.format_duration(s['elapsed_s'])}{estimate}. "
                              "The app is usable as soon as this finishes, for every user.")
            engine.wait(0.5)
        bar.empty()
    if engine.error:
        st.error(f"The model could not be loaded: {engine.error}. Check $RAGTUNE_SERVE_CONFIG, then reload the page.")
        st.stop()
    return engine.assistant
